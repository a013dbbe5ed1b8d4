"""Hardening: properties over arbitrary values, other users, threads,
subinterpreters, leaks, and Ctrl-C in the middle of a long set()."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmemext
from conftest import SHM_DIR, block_bytes, lock_dir, maps_of, python, read_entry, spawn, sysv_backend

NOBODY = 65534

# Every code point, lone surrogates included: a str may hold them.
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=1024)


def test_any_str_or_bytes_up_to_the_capacity_round_trips(name):
    with shmemext.Value(name, 4096) as v:

        @settings(max_examples=500, deadline=None)
        @given(st.one_of(any_text, st.binary(max_size=4096)))
        def round_trip(value):
            v.set(value)
            got = v.get()
            # CPython's str equality compares the PEP 393 width first, so this
            # also says get() built the str at the narrowest width, as CPython would.
            assert type(got) is type(value) and got == value

        round_trip()


def test_anything_over_the_capacity_is_refused_and_the_old_value_stays(name):
    with shmemext.Value(name, 256) as v:
        v.set("kept")

        @settings(max_examples=200, deadline=None)
        @given(st.one_of(st.binary(min_size=257, max_size=2048),
                         st.text(alphabet=st.characters(blacklist_categories=()), min_size=257, max_size=600)))
        def too_big(value):
            with pytest.raises(ValueError, match=r"does not fit the capacity of 256 bytes"):
                v.set(value)
            assert v.get() == "kept"

        too_big()


# ---- other users ------------------------------------------------------------------

# Python and shmemext are imported as root (their files may sit in a directory
# only root can read), then the child drops to nobody for good.
AS_NOBODY = """
import ctypes, errno, importlib.util, json, os, sys
import shmemext
extension = importlib.util.find_spec("shmemext._shmemext")
os.setgroups([]); os.setgid(%d); os.setuid(%d)
private, shared = sys.argv[1], sys.argv[2]
out = {}
def attempt(label, fn):
    try:
        fn()
        out[label] = "allowed"
    except PermissionError as exc:
        out[label] = "refused: " + str(exc)
attempt("open private", lambda: shmemext.Value(private))
attempt("open private as a segment", lambda: shmemext.Segment(private, 64))
attempt("read the private object", lambda: open("/dev/shm/" + private, "rb").read())
attempt("unlink private", lambda: shmemext.unlink(private))
if len(sys.argv) > 3:
    # The memory itself, reached by its System V id as any process could try.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    def attach_by_id():
        if libc.shmat(int(sys.argv[3]), None, 0) in (None, ctypes.c_void_p(-1).value):
            raise PermissionError(ctypes.get_errno(), "shmat")
    attempt("attach the private memory by id", attach_by_id)
attempt("open shared without a mode", lambda: shmemext.Value(shared))
def use_shared():
    v = shmemext.Value(shared, mode=0o666)
    out["shared value"] = v.get()
    v.set("written by nobody")
    v.close()
attempt("open shared", use_shared)
# This user's own default block: module init again, now as nobody.
os.environ.pop("SHMEMEXT_NAME", None)
os.environ.pop("SHMEMEXT_SIZE", None)
module = importlib.util.module_from_spec(extension)
extension.loader.exec_module(module)
out["default name"] = module.default.name
st = os.stat("/dev/shm/" + module.default.name)
out["default owner"] = [st.st_uid, oct(st.st_mode & 0o777)]
module.default.close()
print(json.dumps(out))
""" % (NOBODY, NOBODY)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                    reason="dropping to another user needs root (CI runs as root)")
def test_another_user_cannot_open_read_or_unlink_a_private_block(name):
    import json

    shared_name = name + "-shared"
    private = shmemext.Value(name, 64)
    shared = shmemext.Value(shared_name, 64, mode=0o666)
    try:
        private.set("secret")
        shared.set("for everyone")
        by_id = [str(read_entry(name)["shmid"])] if sysv_backend() else []
        proc = python(AS_NOBODY, name, shared_name, *by_id, env={"SHMEMEXT_SIZE": "0"}, cwd="/")
        out = json.loads(proc.stdout)
        for what in ("open private", "open private as a segment", "read the private object", "unlink private",
                     *(["attach the private memory by id"] if by_id else [])):
            assert out[what].startswith("refused"), (what, out[what])
        assert name in out["open private"], "the message names the block"
        # Joining another user's block takes an explicit mode too: the default
        # (0o600) says "mine only", so a block of someone else is refused.
        assert out["open shared without a mode"].startswith("refused") and "explicit mode" in out["open shared without a mode"]
        assert out["open shared"] == "allowed" and out["shared value"] == "for everyone"
        assert shared.get() == "written by nobody"
        assert private.get() == "secret" and os.path.exists(os.path.join(SHM_DIR, name))
        # Two users, two default blocks, each private to its user.
        root_default = python("import shmemext; print(shmemext.default.name)", env={"SHMEMEXT_NAME": ""}).stdout
        assert out["default name"] == f"shmemext-{NOBODY}" != root_default.strip() == "shmemext-0"
        assert out["default owner"] == [NOBODY, "0o600"]
    finally:
        private.close()
        shared.close()


# ---- threads ----------------------------------------------------------------------


def test_threads_setting_and_getting_large_values_never_see_a_torn_one(name):
    # Large enough that every copy runs with the GIL released.
    values = [bytes([i]) * (200 << 10) for i in range(3)] + ["\u20ac" * (100 << 10), "\U0001f600" * (50 << 10)]
    valid = set(values)
    errors = []
    with shmemext.Value(name, 1 << 20) as v:

        def worker(k):
            try:
                for i in range(150):
                    v.set(values[(k + i) % len(values)])
                    if v.get() not in valid:
                        errors.append("torn")
            except Exception as exc:   # noqa: BLE001 - any exception is a failure here
                errors.append(repr(exc))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert v.version == 8 * 150
    assert errors == []


def test_close_racing_get_and_set_is_an_error_never_a_crash(name):
    unexpected = []
    for _ in range(10):
        v = shmemext.Value(name, 1 << 20)
        v.set(b"x" * (1 << 20))
        stop = threading.Event()

        def user():
            while not stop.is_set():
                try:
                    v.get()
                    v.set(b"y" * (1 << 20))
                except ValueError as exc:
                    assert "closed" in str(exc)
                    return
                except Exception as exc:   # noqa: BLE001
                    unexpected.append(repr(exc))
                    return

        threads = [threading.Thread(target=user) for _ in range(4)]
        for t in threads:
            t.start()
        closed = False
        deadline = time.monotonic() + 10
        while not closed and time.monotonic() < deadline:
            try:
                v.close()
                closed = True
            except RuntimeError as exc:
                assert "while another thread is using it" in str(exc)
        stop.set()
        for t in threads:
            t.join()
        assert closed
        gc.collect()
    assert unexpected == []


# ---- subinterpreters ----------------------------------------------------------------

SUBINTERPRETERS = """
import os, sys, threading
try:
    import _interpreters as interpreters            # 3.13
except ImportError:
    import _xxsubinterpreters as interpreters       # 3.12
import shmemext
name = sys.argv[1]
sub_code = '''
import shmemext
v = shmemext.Value(%r, 64)
v.set("from a subinterpreter")
shmemext.set("default from a subinterpreter")
'''
sub = interpreters.create()   # an isolated interpreter, with its own GIL
interpreters.run_string(sub, sub_code % name)
assert shmemext.get() == "default from a subinterpreter", "one default block, shared"
with shmemext.Value(name) as v:
    assert not v.created and v.get() == "from a subinterpreter", "the subinterpreter still holds it"
interpreters.destroy(sub)
with shmemext.Value(name) as v:
    assert v.created, "released when the interpreter ended"

# Two interpreters with their own GIL, at once, on one block.
counter = '''
import shmemext
v = shmemext.Value(%r, 64)
for i in range(2000):
    v.set(str(i))
    assert v.get().isdigit()
v.close()
'''
subs = [interpreters.create() for _ in range(2)]
with shmemext.Value(name + "-2", 64) as total:
    threads = [threading.Thread(target=interpreters.run_string, args=(s, counter % (name + "-2"))) for s in subs]
    for t in threads: t.start()
    for t in threads: t.join()
    assert total.version == 4000, total.version
for s in subs:
    interpreters.destroy(s)
print("ok")
"""


@pytest.mark.skipif(sys.version_info < (3, 12), reason="subinterpreters with their own GIL need Python 3.12+")
def test_subinterpreters_import_use_and_release_their_blocks(name):
    assert python(SUBINTERPRETERS, name, timeout=120).stdout == "ok\n"


# ---- leaks ---------------------------------------------------------------------------


def _rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _under_address_sanitizer():
    return _maps_mentioning("libasan") > 0


def _maps_mentioning(text):
    with open("/proc/self/maps") as f:
        return sum(text in line for line in f)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_every_operation_and_error_path_leaks_nothing(name):
    v = shmemext.Value(name, 1 << 16)
    seg = shmemext.Segment(name + "-seg", 1 << 16)
    big = "\u20ac" * (1 << 14)

    def expect(exc, fn, *args):
        try:
            fn(*args)
        except exc:
            pass
        else:
            raise AssertionError(f"{fn} did not raise {exc}")

    def once():
        for value in ("text", b"bytes", big, memoryview(b"view")):
            v.set(value)
            v.get()
        assert v.version > 0
        v.wait(0, 0)
        shmemext.set("default")
        shmemext.get()
        seg.write(b"abc", 10)
        seg.read(3, 10)
        memoryview(seg).release()
        with seg.lock():
            pass
        with shmemext.Value(name + "-tmp", 64) as tmp:
            tmp.set("x")
        with shmemext.Segment(name + "-tmp-seg", 64) as tmp_seg:
            tmp_seg.write(b"y")
        expect(ValueError, v.set, b"x" * ((1 << 16) + 1))
        expect(TypeError, v.set, 3.5)
        expect(ValueError, shmemext.Value, "bad/name")
        expect(ValueError, seg.read, 10, 1 << 16)
        expect(TimeoutError, v.wait, v.version, 0)
        closed = shmemext.Value(name + "-closed", 64)
        closed.close()
        expect(ValueError, closed.get)

    def snapshot():
        gc.collect()
        return (sys.getallocatedblocks(), _rss_kib(), len(os.listdir("/proc/self/fd")),
                maps_of(name) + maps_of(name + "-seg"))

    for _ in range(300):
        once()
    before = snapshot()
    for _ in range(3000):
        once()
    after = snapshot()
    v.close()
    seg.close()
    assert after[0] - before[0] < 50, f"Python objects grew from {before[0]} to {after[0]}"
    if not _under_address_sanitizer():   # its quarantine keeps freed memory resident on purpose
        assert after[1] - before[1] < 2048, f"RSS grew from {before[1]} KiB to {after[1]} KiB"
    assert after[2] == before[2], "file descriptors leaked"
    assert after[3] == before[3] == 2, "mappings leaked"
    gc.collect()
    assert _maps_mentioning(name) == 0, "close() unmapped everything"


# ---- Ctrl-C during a long set ---------------------------------------------------------

INTERRUPTED_WRITER = """
import sys, shmemext
a, b = "a" * (64 << 20), "b" * (64 << 20)
v = shmemext.Value(sys.argv[1], 64 << 20)
print("writing", flush=True)
try:
    while True:
        v.set(a)
        v.set(b)
except KeyboardInterrupt:
    got = v.get()
    print("consistent" if got in (a, b) else "TORN", flush=True)
    v.set("after")
    print(v.get(), flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a process")
def test_ctrl_c_during_long_sets_leaves_a_whole_value(name):
    # A reader in this process keeps the block alive and checks it too.
    with shmemext.Value(name, 64 << 20) as reader:
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(INTERRUPTED_WRITER), name],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "writing\n"
        for delay in (0.3, 0.05):
            time.sleep(delay)
            got = reader.get()
            assert got == "" or got in ("a" * (64 << 20), "b" * (64 << 20))
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=60)
        assert out == "consistent\nafter\n"
        assert reader.get() == "after"


# ---- blocks other users may write: the writer lock is the kernel's ---------------

LOCK_HOLDER = """
import sys, shmemext
seg = shmemext.Segment(sys.argv[1], 1, mode=0o666)
lock = seg.lock()
lock.acquire()
print("held", flush=True)
sys.stdin.readline()
lock.release()
seg.write(b"after", 0)
print("released", flush=True)
"""

SCRIBBLER = """
import sys, shmemext
seg = shmemext.Segment(sys.argv[1], 1, mode=0o666)
print("attached", flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="writes the block's header as another process")
def test_a_scribbled_lock_area_cannot_steer_a_shared_blocks_lock_holder(name):
    # glibc follows pointers kept inside a robust mutex when it unlocks; in a
    # block others may write, those bytes are theirs.  Such blocks take a lock
    # the kernel keeps, so nothing scribbled there is ever followed.


    with shmemext.Segment(name, 4096, mode=0o666) as seg:
        holder = spawn(LOCK_HOLDER, name)
        try:
            assert holder.stdout.readline() == "held\n"
            with block_bytes(name) as memory:
                memory[64 + 16 : 64 + 128] = b"\x41" * 112   # all of the lock area but its marker and owner
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.stdout.readline() == "released\n"
            assert holder.wait(timeout=30) == 0, holder.stderr.read()
        finally:
            holder.kill()
            holder.wait()
            for f in (holder.stdin, holder.stdout, holder.stderr):
                f.close()
        assert seg.read(5) == b"after"
        with seg.lock() as lock:
            assert not lock.owner_died


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills a lock holder")
def test_a_shared_blocks_kernel_lock_reports_its_holders_death(name):
    with shmemext.Segment(name, 4096, mode=0o666) as seg:
        holder = spawn(LOCK_HOLDER, name)
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(TimeoutError):
            seg.lock(timeout=0.05).__enter__()
        holder.kill()
        holder.wait()
        for f in (holder.stdin, holder.stdout, holder.stderr):
            f.close()
        with seg.lock(timeout=5) as lock:
            assert lock.owner_died, "the next holder learns that the last one died holding it"
        with seg.lock(timeout=5) as lock:
            assert not lock.owner_died


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="writes the block's header as another process")
def test_odd_sequences_in_a_shared_value_send_get_to_the_kernel_lock_not_a_crash(name):


    with shmemext.Value(name, 64, mode=0o666) as v:
        v.set("committed")
        with block_bytes(name) as memory:
            memory[256:264] = (1).to_bytes(8, "little")   # both slots' sequence words odd: a writer mid-write
            memory[320:328] = (3).to_bytes(8, "little")
        assert v.get() == "committed"
        v.set("next")
        assert v.get() == "next"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="writes the block's header as another process")
def test_a_reader_never_waits_unboundedly_on_a_scribbled_lock(name):
    with shmemext.Value(name, 64) as v:
        v.set("committed")
        with block_bytes(name) as memory:
            saved = bytes(memory[64:192])
            memory[256:264] = (1).to_bytes(8, "little")   # both sequence words odd: get() needs the lock
            memory[320:328] = (3).to_bytes(8, "little")
            if shmemext._shmemext._BACKEND == "linux-sysv":
                memory[64:68] = (0x3FFFFFFF).to_bytes(4, "little")   # "held" by a thread that does not exist
            else:
                memory[72:76] = (1).to_bytes(4, "little")
        if shmemext._shmemext._BACKEND != "linux-sysv":
            pytest.skip("the lock-file lock is the kernel's: a scribbled word cannot hold it")
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="scribbled"):
            v.get()
        assert time.monotonic() - t0 < 10
        with block_bytes(name) as memory:
            memory[64:192] = saved
            memory[256:264] = (2).to_bytes(8, "little")
            memory[320:328] = (2).to_bytes(8, "little")
        v.set("again")
        assert v.get() == "again"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="writes the block's header as another process")
def test_a_value_whose_lock_is_stuck_does_not_hold_up_async_waits_on_others(name):
    """Waits count themselves under each value's lock: one watcher thread
    serves both values here, and the one whose lock nobody can take must not
    keep it from the other's set() in another process."""
    import asyncio

    with shmemext.Value(name, 64) as stuck, shmemext.Value(name + "-fine", 64) as fine:
        if shmemext._shmemext._BACKEND != "linux-sysv":
            pytest.skip("the lock-file lock is the kernel's: a scribbled word cannot hold it")
        with block_bytes(name) as memory:
            saved = bytes(memory[64:192])
            memory[64:68] = (0x3FFFFFFF).to_bytes(4, "little")   # "held" by a thread that does not exist
        setter = spawn("""
            import sys, time, shmemext
            v = shmemext.Value(sys.argv[1])
            sys.stdin.readline()
            v.set("now")
            print(time.monotonic(), flush=True)
            sys.stdin.readline()
        """, name + "-fine")

        async def main():
            stuck_wait = asyncio.ensure_future(stuck.wait_async(timeout=30))
            fine_wait = asyncio.ensure_future(fine.wait_async(timeout=20))
            await asyncio.sleep(0.3)   # both asleep in the watcher by now
            setter.stdin.write("\n")
            setter.stdin.flush()
            version = await fine_wait
            woken = time.monotonic()
            assert not stuck_wait.done()
            stuck_wait.cancel()
            return version, woken

        try:
            version, woken = asyncio.run(main())
            set_at = float(setter.stdout.readline())
        finally:
            setter.communicate("\n", timeout=30)
            with block_bytes(name) as memory:
                memory[64:192] = saved
        assert version == fine.version
        assert woken - set_at < 0.25, f"woken {woken - set_at:.3f} s after the set"
        stuck.set("again")
        assert stuck.get() == "again"


SQUATTED = """
import importlib.util, os, sys
import shmemext
extension = importlib.util.find_spec("shmemext._shmemext")
os.setgroups([]); os.setgid(%d); os.setuid(%d)
os.environ.pop("SHMEMEXT_NAME", None)
os.environ.pop("SHMEMEXT_SIZE", None)
try:
    extension.loader.exec_module(importlib.util.module_from_spec(extension))
    print("imported")
except PermissionError as denied:
    print(shmemext._denied_default(denied))
""" % (NOBODY, NOBODY)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                    reason="squatting another user's default name needs root")
def test_a_squatted_default_name_fails_the_import_saying_who_and_what_to_do():
    squatted = os.path.join(SHM_DIR, f"shmemext-{NOBODY}")
    assert not os.path.exists(squatted)
    with open(squatted, "w"):
        pass   # an empty file of root's is enough
    try:
        out = python(SQUATTED, env={"SHMEMEXT_SIZE": "0"}, cwd="/").stdout
    finally:
        os.unlink(squatted)
    assert f"the default block's name 'shmemext-{NOBODY}' is held by uid 0 (root), not by you (uid {NOBODY})" in out
    assert "SHMEMEXT_NAME" in out and "SHMEMEXT_SIZE=0" in out


GATE_HOLDER = """
import fcntl, os, struct, sys, time
if sys.argv[2] == "linux-sysv":
    fd = os.open("/dev/shm/" + sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    # struct flock for an OFD write lock on byte 0 (the attach gate), as a stopped creator would hold it.
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hh4xqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
else:
    directory = os.path.join(os.environ.get("SHMEMEXT_LOCK_DIR") or "/tmp/.shmemext", f"u{os.geteuid()}")
    os.makedirs(directory, 0o711, exist_ok=True)
    fd = os.open(os.path.join(directory, sys.argv[1] + ".gate"), os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""

OPENER = """
import sys, time, shmemext
print("opening", flush=True)
t0 = time.monotonic()
try:
    shmemext.Value(sys.argv[1])
    print("opened")
except KeyboardInterrupt:
    print(f"interrupted after {time.monotonic() - t0:.2f}s", flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="takes the gate as a stopped process would")
def test_ctrl_c_ends_an_open_waiting_for_a_gate_another_process_holds(name):
    backend = shmemext._shmemext._BACKEND
    if backend == "posix-lockfiles" and len(name) > 30:
        pytest.skip("the lock files of a long name have a short form")
    holder = spawn(GATE_HOLDER, name, backend)
    try:
        assert holder.stdout.readline() == "held\n", holder.stderr.read()
        opener = spawn(OPENER, name, env={"SHMEMEXT_SIZE": "0"})
        assert opener.stdout.readline() == "opening\n"
        time.sleep(0.5)
        opener.send_signal(signal.SIGINT)
        out, _ = opener.communicate(timeout=30)
        assert out.startswith("interrupted after"), out
        assert float(out.split()[-1].rstrip("s")) < 2.0
        opener.stdin.close(), opener.stderr.close()
    finally:
        holder.kill()
        holder.wait()
        for f in (holder.stdin, holder.stdout, holder.stderr):
            f.close()
        if backend == "linux-sysv":
            os.unlink(os.path.join(SHM_DIR, name))
        else:
            directory = lock_dir()
            for suffix in (".gate", ".live", ".lock"):
                try:
                    os.unlink(os.path.join(directory, name + suffix))
                except FileNotFoundError:
                    pass


CLOSER = """
import sys, time, shmemext
v = shmemext.Value(sys.argv[1])
print("opened", flush=True)
sys.stdin.readline()          # the gate is taken now
t0 = time.monotonic()
try:
    v.close()
    print("closed")
except KeyboardInterrupt:
    print(f"interrupted after {time.monotonic() - t0:.2f}s closed={v.closed}", flush=True)
sys.stdin.readline()          # the gate is free again
v.close()
print("closed", v.closed, flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="takes the gate as a stopped process would")
def test_ctrl_c_ends_a_close_waiting_for_the_gate_and_close_works_later(name):
    backend = shmemext._shmemext._BACKEND
    if backend == "posix-lockfiles" and len(name) > 30:
        pytest.skip("the lock files of a long name have a short form")
    closer = spawn(CLOSER, name, env={"SHMEMEXT_SIZE": "0"})
    holder = None
    try:
        assert closer.stdout.readline() == "opened\n", closer.stderr.read()
        holder = spawn(GATE_HOLDER, name, backend)
        assert holder.stdout.readline() == "held\n", holder.stderr.read()
        closer.stdin.write("\n")
        closer.stdin.flush()
        time.sleep(0.5)
        closer.send_signal(signal.SIGINT)
        line = closer.stdout.readline()
        assert line.startswith("interrupted after") and line.strip().endswith("closed=False"), line
        assert float(line.split()[2].rstrip("s")) < 2.0
        holder.kill()
        holder.wait()
        closer.stdin.write("\n")
        closer.stdin.flush()
        assert closer.stdout.readline() == "closed True\n"
        assert closer.wait(timeout=30) == 0
    finally:
        for p in (closer, holder):
            if p is not None:
                p.kill()
                p.wait()
                for f in (p.stdin, p.stdout, p.stderr):
                    f.close()
