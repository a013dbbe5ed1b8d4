"""Segment: raw shared memory with the buffer protocol, read/write, and the lock."""

import gc
import struct
import threading
import time

import pytest

import shmemext
from conftest import LOCK_HOLDER, python, spawn

np = pytest.importorskip("numpy")


def test_new_segment_is_zero_filled_and_exactly_sized(name):
    with shmemext.Segment(name, 1000) as seg:
        assert seg.created and seg.size == 1000 and not seg.readonly
        assert seg.read() == b"\x00" * 1000
        view = memoryview(seg)
        assert view.nbytes == 1000 and not view.readonly and view.format == "B"
        view.release()


def test_numpy_array_is_shared_with_another_process_without_copies(name):
    with shmemext.Segment(name, 8 * 1000) as seg:
        arr = np.frombuffer(seg, dtype=np.float64)
        assert arr.base is not None and np.shares_memory(arr, np.frombuffer(seg, dtype=np.float64))
        arr[:] = np.arange(1000) * 0.5
        out = python(
            """
            import sys, numpy as np, shmemext
            seg = shmemext.Segment(sys.argv[1], 8000)
            a = np.frombuffer(seg, dtype=np.float64)
            print(a.sum(), seg.created)
            a *= 2                       # write back through the buffer, no copy
            del a
            seg.close()
            """,
            name,
        ).stdout
        assert out == f"{(np.arange(1000) * 0.5).sum()} False\n"
        assert arr[999] == 999.0, "the child's in-place write is visible here"
        del arr


def test_struct_and_ctypes_views(name):
    import ctypes

    with shmemext.Segment(name, 64) as seg:
        struct.pack_into("<qd", seg, 8, 42, 1.5)
        assert struct.unpack_from("<qd", seg, 8) == (42, 1.5)
        c = (ctypes.c_int64 * 8).from_buffer(seg)
        assert c[1] == 42
        c[0] = 7
        assert seg.read(8) == (7).to_bytes(8, "little")
        del c


def test_read_write_at_offsets_and_bounds(name):
    with shmemext.Segment(name, 100) as seg:
        assert seg.write(b"abc", 97) == 3
        assert seg.write(bytearray(b"xy")) == 2
        assert seg.read(2) == b"xy"
        assert seg.read(offset=97) == b"abc"
        assert seg.read(3, 97) == b"abc"
        assert seg.read(0, 100) == b""
        assert seg.write(data=b"q", offset=50) == 1 and seg.read(n=1, offset=50) == b"q"
        with pytest.raises(ValueError, match=r"write ends at byte 101, beyond its size of 100 bytes"):
            seg.write(b"abcd", 97)
        with pytest.raises(ValueError, match=r"read ends at byte 102, beyond its size of 100 bytes"):
            seg.read(3, 99)
        with pytest.raises(ValueError, match="offset 101 is out of range: it must be between 0 and 100"):
            seg.read(0, 101)
        with pytest.raises(ValueError, match="offset -1 is out of range"):
            seg.write(b"", -1)
        with pytest.raises(ValueError, match="n must be -1"):
            seg.read(-2)
        with pytest.raises(ValueError, match="out of range"):
            seg.read(0, 1 << 80)
        with pytest.raises(TypeError, match="contiguous bytes-like"):
            seg.write("text")
        with pytest.raises(TypeError):
            seg.read("1")
        with pytest.raises(TypeError, match=r"read\(\) got multiple values for argument 'n'"):
            seg.read(1, n=1)
        with pytest.raises(TypeError, match=r"write\(\) got an unexpected keyword argument '\\udc80'"):
            seg.write(b"x", **{"\udc80": 1})   # not UTF-8: once a NULL formatted with %s
        with pytest.raises(TypeError, match=r"write\(\) got an unexpected keyword argument 'offest'"):
            seg.write(b"x", offest=1)
        with pytest.raises(TypeError, match=r"write\(\) missing required argument 'data'"):
            seg.write(offset=1)
        assert seg.read(3, 97) == b"abc", "refused writes changed nothing"


def test_readonly_refuses_writes_everywhere(name):
    with shmemext.Segment(name, 16) as rw, shmemext.Segment(name, 16, readonly=True) as ro:
        rw.write(b"hello")
        assert ro.readonly and ro.read(5) == b"hello"
        with pytest.raises(TypeError, match="readonly"):
            ro.write(b"x")
        view = memoryview(ro)
        assert view.readonly
        with pytest.raises(TypeError):
            view[0] = 1
        view.release()
        arr = np.frombuffer(ro, dtype="u1")
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 1
        del arr
        import ctypes

        with pytest.raises(TypeError, match="not writable"):
            (ctypes.c_char * 16).from_buffer(ro)


def test_sizes(name):
    with shmemext.Segment(name, 5000) as seg:
        with shmemext.Segment(name, 10) as again:
            assert again.size == 5000 and not again.created
        with pytest.raises(ValueError, match="capacity of 5000 bytes, less than the 5001 bytes asked for"):
            shmemext.Segment(name, 5001)
        assert seg.size == 5000
    for bad in (0, -1, 1 << 60):
        with pytest.raises(ValueError, match="size .* out of range"):
            shmemext.Segment(name, bad)
    with pytest.raises(TypeError, match="size must be int"):
        shmemext.Segment(name, None)
    with pytest.raises(TypeError):
        shmemext.Segment(name)


def test_value_and_segment_names_do_not_mix(name):
    with shmemext.Value(name):
        with pytest.raises(ValueError, match="is a value cell, not a raw segment"):
            shmemext.Segment(name, 10)


def test_close_with_a_live_view_raises_and_keeps_the_mapping(name):
    seg = shmemext.Segment(name, 64)
    view = memoryview(seg)
    arr = np.frombuffer(seg, dtype="u1")
    assert seg._exports == 2
    with pytest.raises(BufferError, match="2 exported buffer"):
        seg.close()
    view[0] = 9
    assert arr[0] == 9 and not seg.closed
    view.release()
    del arr
    assert seg._exports == 0
    seg.close()
    assert seg.closed


def test_views_keep_the_segment_alive_after_the_name_is_dropped(name):
    seg = shmemext.Segment(name, 64)
    view = memoryview(seg)
    del seg
    gc.collect()
    view[0:3] = b"abc"
    assert bytes(view[0:3]) == b"abc"
    view.release()


def test_use_after_close_raises(name):
    seg = shmemext.Segment(name, 64)
    lock = seg.lock()
    seg.close()
    seg.close()
    for op in (seg.read, lambda: seg.write(b"x"), lambda: memoryview(seg), seg.lock, lock.acquire,
               lock.release, lambda: seg.persist):
        with pytest.raises(ValueError, match="closed"):
            op()
    assert repr(seg) == f"<shmemext.Segment name='{name}' closed>"


def test_close_del_gc_across_threads_never_crashes(name):
    errors = []

    def worker(seg):
        for _ in range(200):
            try:
                v = memoryview(seg)
                seg.write(b"abcd", 4)
                seg.read()   # 1 MiB: copied without the GIL, racing close()
                v.release()
                seg.close()
            except (ValueError, BufferError, RuntimeError):
                pass
            except Exception as exc:  # anything else is a bug
                errors.append(exc)

    for _ in range(20):
        seg = shmemext.Segment(name, 1 << 20)
        threads = [threading.Thread(target=worker, args=(seg,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        del seg
        gc.collect()
    assert errors == []


LOCK_COUNTER = """
import sys, shmemext
seg = shmemext.Segment(sys.argv[1], 64)
sys.stdin.readline()
for _ in range(int(sys.argv[2])):
    with seg.lock():
        n = int.from_bytes(seg.read(8), "little")
        seg.write((n + 1).to_bytes(8, "little"))
print("done", flush=True)
"""


def test_lock_serializes_two_processes_counting(name):
    with shmemext.Segment(name, 64) as seg:
        procs = [spawn(LOCK_COUNTER, name, "100000") for _ in range(2)]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0 and out == "done\n", err
        assert int.from_bytes(seg.read(8), "little") == 200_000


def test_holder_killed_does_not_block_others_and_reports_owner_death(name):
    with shmemext.Segment(name, 64) as seg:
        holder = spawn(LOCK_HOLDER, name)
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(TimeoutError, match=f"timed out after 0.2 s waiting for the lock of Segment '{name}'"):
            seg.lock(timeout=0.2).acquire()
        holder.kill()
        died_at = time.monotonic()
        holder.wait(timeout=30)
        holder.stdout.close(), holder.stdin.close(), holder.stderr.close()
        with seg.lock(timeout=5) as lock:
            assert time.monotonic() - died_at < 1.0
            assert lock.owner_died, "the acquirer learns the previous holder died"
            assert seg.read(4) == b"half"
        with seg.lock(timeout=1) as lock:
            assert not lock.owner_died


def test_lock_semantics_within_a_process(name):
    with shmemext.Segment(name, 64) as seg:
        lock = seg.lock()
        assert lock.acquire() is True
        with pytest.raises(RuntimeError, match="not re-entrant"):
            seg.lock().acquire()
        with pytest.raises(RuntimeError, match="release it first"):
            seg.close()
        # Another thread waits, and cannot release what it does not hold.
        results = []

        def other():
            try:
                seg.lock().release()
            except RuntimeError as e:
                results.append(str(e))
            try:
                seg.lock(timeout=0.1).acquire()
            except TimeoutError:
                results.append("timeout")

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert results[0].endswith("is not held by this thread") and results[1] == "timeout"
        lock.release()
        kept = []
        t = threading.Thread(target=lambda: kept.append(seg.lock(timeout=1)) or kept[0].acquire())
        t.start()
        t.join()
        # That thread ended holding it: the kernel hands it on as an owner death.
        with seg.lock(timeout=1) as again:
            assert again.owner_died
        with seg.lock(timeout=1) as again:
            assert not again.owner_died
            del kept[:]   # the dead thread's lock object must not release ours
            gc.collect()
            with pytest.raises(TimeoutError):
                _acquire_elsewhere(seg)


def _acquire_elsewhere(seg):
    """Tries the lock from another thread; re-raises what it raised."""
    box = []

    def run():
        try:
            seg.lock(timeout=0.05).acquire()
        except BaseException as exc:
            box.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if box:
        raise box[0]


def test_lock_dropped_while_held_is_released(name):
    with shmemext.Segment(name, 64) as seg:
        seg.lock().acquire()   # the lock object is dropped at once
        gc.collect()
        with seg.lock(timeout=0.5) as lock:
            assert not lock.owner_died


def test_an_infinite_lock_timeout_waits(name):
    with shmemext.Segment(name, 64) as seg:
        held = seg.lock()
        held.acquire()
        got = []
        t = threading.Thread(target=lambda: got.append(seg.lock(timeout=float("inf")).acquire()))
        t.start()
        time.sleep(0.2)
        assert got == [], "still waiting"
        held.release()
        t.join(timeout=10)
        assert got == [True]


def test_bad_lock_timeouts(name):
    with shmemext.Segment(name, 64) as seg:
        for bad in (-1, float("nan")):
            with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0"):
                seg.lock(bad)
        with pytest.raises(TypeError, match=r"lock\(\) argument 'timeout' must be None or a number of seconds, not str"):
            seg.lock("soon")
        with pytest.raises(TypeError, match=r"lock\(\) takes at most 1 argument \(2 given\)"):
            seg.lock(1, 2)


def test_ctrl_c_interrupts_a_lock_wait(name):

    script = """
    import os, signal, sys, threading, time, shmemext
    seg = shmemext.Segment(sys.argv[1], 64)
    held = seg.lock()
    holder = threading.Thread(target=lambda: (held.acquire(), time.sleep(30)), daemon=True)
    holder.start(); time.sleep(0.2)
    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    try:
        seg.lock().acquire()
    except KeyboardInterrupt:
        print(f"interrupted {time.monotonic() - t0 < 2}")
    os._exit(0)
    """
    try:
        assert python(script, name).stdout == "interrupted True\n"
    finally:
        shmemext.unlink(name)  # os._exit skipped the detach


def test_repr(name):
    with shmemext.Segment(name, 64, readonly=True) as seg:
        assert repr(seg) == f"<shmemext.Segment name='{name}' size=64 readonly>"


@pytest.mark.parametrize("n", [4096, 100_000, 16 << 20])
def test_a_write_from_a_view_of_the_same_segment_is_a_move(name, n):
    # Forward by one byte over itself: right at every size only if it moves, not copies.
    with shmemext.Segment(name, n + 1) as seg:
        pattern = bytes(range(251)) * (n // 251 + 1)
        seg.write(pattern[:n])
        view = memoryview(seg)
        try:
            assert seg.write(view[0:n], 1) == n
        finally:
            view.release()
        assert seg.read(1) == pattern[:1] and seg.read(n, 1) == pattern[:n]
        view = memoryview(seg)
        try:
            seg.write(view[1 : n + 1], 0)   # and back by one
        finally:
            view.release()
        assert seg.read(n) == pattern[:n]


def test_close_refuses_while_another_thread_holds_the_lock_even_if_its_lock_object_is_gone(name):
    import threading

    seg = shmemext.Segment(name, 64)
    taken, release = threading.Event(), threading.Event()
    handed = []

    def holder():
        lock = seg.lock()
        lock.acquire()
        handed.append(lock)   # the object goes to another thread, which drops it
        taken.set()
        release.wait(10)
        seg.lock().release()   # released through another lock object of this thread

    t = threading.Thread(target=holder)
    t.start()
    assert taken.wait(10)
    handed.clear()   # the lock object dies here, in a thread that does not hold the lock
    with pytest.raises(RuntimeError, match="another thread of this process"):
        seg.close()
    release.set()
    t.join(10)
    seg.close()
    assert seg.closed


def test_close_forgets_a_lock_whose_thread_ended_holding_it(name):
    import threading

    seg = shmemext.Segment(name, 64)
    keep = []
    t = threading.Thread(target=lambda: keep.append(seg.lock().__enter__()))
    t.start()
    t.join(10)
    keep.clear()
    seg.close()   # the thread is gone: its lock was handed on, nothing is held here
    with shmemext.Segment(name, 64) as again, again.lock(timeout=5):
        pass
