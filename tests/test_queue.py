"""shmemext.Queue: the interface, delivery across real processes, crashes,
blocking, and bytes another process wrote."""

import os
import pickle
import queue
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

import shmemext
from conftest import block_bytes, block_exists, linux_only, python, spawn

TAIL, HEAD, RING = 512, 576, 4096  # offsets in the block: ext/queue.h


# ---- the interface -----------------------------------------------------------


def test_messages_keep_their_type(name):
    with shmemext.Queue(name, 1 << 16) as q:
        sent = [b"bytes", b"", "ascii", "", "latin-1 \xe9", "ucs2 \u65e5\u672c", "ucs4 \U0001f600",
                bytearray(b"ba"), memoryview(b"mv"), {"a": [1, 2.5, None]}, (1, "two"), 12345, None]
        for m in sent:
            q.put(m)
        got = [q.get() for _ in sent]
    expected = [bytes(m) if isinstance(m, (bytearray, memoryview)) else m for m in sent]
    assert got == expected
    assert [type(g) for g in got] == [type(e) for e in expected]


def test_numpy_arrays_travel_out_of_band_and_writable(name):
    np = pytest.importorskip("numpy")
    a = np.arange(250_000, dtype="f8").reshape(500, 500)
    with shmemext.Queue(name, 4 << 20) as q:
        q.put(a)
        # The array's bytes are in the record once, beside a small pickle.
        assert a.nbytes <= q._used <= a.nbytes + 1024
        b = q.get()
    assert (b == a).all() and b.dtype == a.dtype and b.shape == a.shape
    assert b.flags.writeable
    b[0, 0] = -1  # its own memory, not the queue's
    # A buffer that is not contiguous travels in line.
    with shmemext.Queue(name, 4 << 20) as q:
        q.put(a[:, ::2])
        assert (q.get() == a[:, ::2]).all()


def test_fifo_counts_and_limits(name):
    with shmemext.Queue(name, 100) as q:
        assert q.capacity == 112 and q.max_message == 96 and q.created
        assert q.empty() and not q.full() and q.qsize() == 0
        q.put(b"a" * 40)  # a record of 16 + 48
        q.put(b"b")  # 16 + 16
        assert q.qsize() == 2 and not q.empty() and not q.full() and q._used == 96
        q.put(b"")  # the last 16 bytes
        assert q.full()
        with pytest.raises(queue.Full, match=f"Queue '{name}' is full"):
            q.put_nowait(b"x")
        t0 = time.monotonic()
        with pytest.raises(queue.Full, match="stayed full for 0.2 s"):
            q.put(b"x", timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 2
        with pytest.raises(queue.Full):
            q.put(b"x", block=False, timeout=5)
        assert [q.get(), q.get(), q.get_nowait()] == [b"a" * 40, b"b", b""]
        with pytest.raises(queue.Empty, match=f"Queue '{name}' is empty"):
            q.get_nowait()
        with pytest.raises(queue.Empty, match="stayed empty for 0.1 s"):
            q.get(timeout=0.1)
        with pytest.raises(ValueError, match=r"a message of 97 bytes never fits Queue .*largest message is 96 bytes"):
            q.put(b"z" * 97)
        assert q.empty()


def test_bad_arguments(name):
    with pytest.raises(ValueError, match="capacity 10 is too small: a queue needs at least 64 bytes"):
        shmemext.Queue(name, 10)
    with pytest.raises(TypeError):
        shmemext.Queue(name, "big")
    with shmemext.Queue(name, 256) as q:
        with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0"):
            q.get(timeout=-1)
        with pytest.raises(TypeError, match="argument 'timeout'"):
            q.put(b"x", timeout="soon")
        with pytest.raises(ValueError, match="max_messages must be at least 1, not 0"):
            q.get_many(0)
        with pytest.raises(TypeError):
            q.put()
        with pytest.raises(TypeError, match="not contiguous"):
            q.put(memoryview(b"abcdef")[::2])
        with pytest.raises((pickle.PicklingError, AttributeError)):  # as pickle.dumps raises it
            q.put(lambda: 0)
        assert q.empty()  # nothing was written by a failed put


def test_an_existing_queue_keeps_its_capacity(name):
    with shmemext.Queue(name, 4096) as a, shmemext.Queue(name) as b, shmemext.Queue(name, 1000) as c:
        assert a.created and not b.created and not c.created
        assert b.capacity == c.capacity == 4096
        with pytest.raises(shmemext.Error, match="exists with a capacity of 4096 bytes, less than the 8192"):
            shmemext.Queue(name, 8192)
        with pytest.raises(shmemext.Error, match="is a queue, not a value cell"):
            shmemext.Value(name)
        a.put("shared")
        assert c.get() == "shared"
        assert [b for b in shmemext.blocks() if b["name"] == name][0]["kind"] == "queue"
    with pytest.raises(FileNotFoundError):
        shmemext.Queue(name, create=False)
    assert shmemext.QUEUE_DEFAULT_CAPACITY == 1 << 20


def test_batches(name):
    with shmemext.Queue(name, 1 << 16) as q:
        assert q.put_many(str(i) for i in range(100)) == 100
        assert q.get_many(30) == [str(i) for i in range(30)]
        assert q.get_many(1000) == [str(i) for i in range(30, 100)]
        with pytest.raises(queue.Empty):
            q.get_many(5, timeout=0.05)
        with pytest.raises(queue.Full):
            q.put_many([b"x" * 30000, b"y" * 30000, b"z" * 30000], block=False)
        assert q.get_many(10) == [b"x" * 30000, b"y" * 30000]  # the ones before the error went in


def test_get_many_keeps_a_later_error_for_the_next_get(name):
    with shmemext.Queue(name, 1 << 16) as q:
        q.put(b"fine")
        q.put(_Unloadable())
        q.put(b"after")
        assert q.get_many(10) == [b"fine"]
        with pytest.raises(RuntimeError, match="cannot be loaded"):
            q.get()
        assert q.get() == b"after"


class _Unloadable:
    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise RuntimeError("cannot be loaded")


def test_closed_queue(name):
    q = shmemext.Queue(name, 256)
    q.put(b"x")
    q.close()
    q.close()
    assert q.closed and "closed" in repr(q)
    for call in (q.get, q.get_nowait, q.qsize, q.empty, q.full, lambda: q.put(b"y"), lambda: q.get_many(3)):
        with pytest.raises(shmemext.ClosedError, match=f"Queue '{name}' is closed"):
            call()
    assert not block_exists(name)


def test_persist_and_unlink(name):
    python(
        """
        import sys, shmemext
        shmemext.Queue(sys.argv[1], 4096, persist=True).put("kept")
        """,
        name,
    )
    with shmemext.Queue(name, create=False) as q:
        assert q.persist and q.get() == "kept"
    shmemext.unlink(name)


# ---- who may unpickle ----------------------------------------------------------


def test_pickles_from_a_queue_others_can_write_are_refused(name):
    with shmemext.Queue(name, 4096, mode=0o666) as shared:
        assert not shared.unpickle
        shared.put({"x": 1})
        shared.put("text travels")
        with pytest.raises(shmemext.Error, match="did not unpickle it: the queue can be written by other users"):
            shared.get()
        assert shared.get() == "text travels"
        # An opener asking for a private queue still finds it writable by others.
        with shmemext.Queue(name) as private_ask:
            assert not private_ask.unpickle
        with shmemext.Queue(name, unpickle=True) as trusting:
            trusting.put([1, 2])
            assert trusting.get() == [1, 2]
    with shmemext.Queue(name, 4096) as private:
        assert private.unpickle
        with shmemext.Queue(name, unpickle=False) as careful:
            private.put((1,))
            with pytest.raises(shmemext.Error, match="unpickle"):
                careful.get()


POLLER = """
import os, sys, shmemext
q = shmemext.Queue(sys.argv[1], 4096)
q.put(b"one")
for _ in range(3):   # warm: first calls may import or allocate
    q.qsize(); q.empty(); q.full()
os.getppid()          # the markers around the loop in the trace
for _ in range(1000):
    q.qsize(); q.empty(); q.full()
os.getppid()
q.get_nowait()
try:
    q.get_nowait()
except Exception:
    pass
os.getpid()
for _ in range(1000):
    try:
        q.get_nowait()
    except Exception:
        pass
os.getpid()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("strace") is None,
                    reason="counts system calls with strace (Linux)")
def test_looking_at_a_queue_makes_no_system_call(name, tmp_path):
    """qsize(), empty(), full() and a get_nowait() on an empty queue read the
    ring's counters: no system call, so a polling loop costs no kernel time."""
    trace = str(tmp_path / "trace")
    subprocess.run(["strace", "-f", "-qq", "-o", trace, sys.executable, "-c", POLLER, name],
                   check=True, capture_output=True, timeout=120)
    with open(trace) as f:
        calls = [line.split(None, 1)[1] for line in f if line.split(None, 1)[1:]]
    for marker in ("getppid(", "getpid("):
        at = [i for i, c in enumerate(calls) if c.startswith(marker)]
        assert len(at) >= 2, calls[-20:]
        between = calls[at[-2] + 1 : at[-1]]
        assert between == [], f"system calls between the {marker} markers: {between[:10]}"


# ---- processes -------------------------------------------------------------------

PRODUCER = """
import struct, sys, zlib, shmemext
name, me, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
q = shmemext.Queue(name)
batch = []
for i in range(count):
    body = bytes([(i + me) & 255]) * ((i * 7 + me) % 200)
    msg = struct.pack("<III", me, i, zlib.crc32(body)) + body
    if i % 3 == 0:
        batch.append(msg)
        if len(batch) == 8:
            q.put_many(batch)
            batch = []
    else:
        if batch:
            q.put_many(batch)
            batch = []
        q.put(msg)
q.put_many(batch)
"""

CONSUMER = """
import struct, sys, zlib, shmemext
name, producers, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
q = shmemext.Queue(name)
seen = [0] * (producers * count)
last = [-1] * producers
bad = 0
ends = 0
while not ends:
    for msg in q.get_many(64):
        if msg == b"end":  # one per consumer, after every message: others' go back
            ends += 1
            continue
        me, i, crc = struct.unpack_from("<III", msg)
        if zlib.crc32(msg[12:]) != crc or i <= last[me]:
            bad += 1
        last[me] = i
        seen[me * count + i] += 1
q.put_many([b"end"] * (ends - 1))
sys.stdout.write(f"{bad}\\n{bytes(seen).hex()}\\n")
"""


def test_four_by_four_a_million_messages_each_once_in_order(name):
    producers, consumers, each = 4, 4, 250_000
    with shmemext.Queue(name, 1 << 20) as q:
        cons = [spawn(CONSUMER, name, str(producers), str(each)) for _ in range(consumers)]
        prods = [spawn(PRODUCER, name, str(p), str(each)) for p in range(producers)]
        for p in prods:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        for _ in cons:
            q.put(b"end")
        seen = bytearray(producers * each)
        for c in cons:
            out, err = c.communicate(timeout=300)
            assert c.returncode == 0, err
            bad, counts = out.split()
            assert int(bad) == 0, "a torn, corrupt or out-of-order message"
            for i, n in enumerate(bytes.fromhex(counts)):
                seen[i] += n
        assert seen == bytearray([1]) * (producers * each), "a message lost or delivered twice"
        assert q.empty()


KILLED_PRODUCER = """
import os, struct, sys, zlib, shmemext
name, me, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
q = shmemext.Queue(name)
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
print("up", flush=True)
i = 0
while True:
    body = os.urandom(i % 300)
    q.put(struct.pack("<III", me, i, zlib.crc32(body)) + body)
    os.pwrite(fd, struct.pack("<q", i), 0)   # committed up to i
    i += 1
"""

KILLED_CONSUMER = """
import os, struct, sys, zlib, shmemext
name, log = sys.argv[1], sys.argv[2]
q = shmemext.Queue(name)
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
print("up", flush=True)
while True:
    msg = q.get()
    me, i, crc = struct.unpack_from("<III", msg)
    whole = zlib.crc32(msg[12:]) == crc
    os.write(fd, struct.pack("<IIi", me, i, 1 if whole else 0))
"""


def test_killing_producers_and_consumers_loses_nothing_committed(name, tmp_path):
    """SIGKILL at random moments: every message a producer committed is
    received exactly once, whole, except at most one per killed consumer
    (the one it had taken when it died); and the queue keeps working."""
    rng = random.Random(1)
    seconds = float(os.environ.get("SHMEMEXT_QUEUE_KILL_SECONDS", "8"))
    q = shmemext.Queue(name, 1 << 14)  # small: producers often wait for room
    incarnations = []  # (kind, producer id or None, log path)
    live = {}

    def start(kind, slot):
        n = len(incarnations)
        log = str(tmp_path / f"{kind}-{n}")
        if kind == "p":
            proc = spawn(KILLED_PRODUCER, name, str(n), log)
        else:
            proc = spawn(KILLED_CONSUMER, name, log)
        incarnations.append((kind, n, log))
        live[(kind, slot)] = proc
        assert proc.stdout.readline().strip() == "up"  # killed at work, not while starting

    try:
        _kill_at_random(rng, seconds, q, start, live, incarnations)
    finally:
        for proc in live.values():
            proc.kill()
            proc.communicate()
        q.close()


def _kill_at_random(rng, seconds, q, start, live, incarnations):
    consumer_kills = 0
    for slot in range(2):
        start("p", slot)
        start("c", slot)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(rng.uniform(0.01, 0.12))
        kind, slot = rng.choice(sorted(live))
        proc = live[(kind, slot)]
        proc.kill()
        proc.communicate()
        consumer_kills += kind == "c"
        start(kind, slot)
    for proc in live.values():
        proc.kill()
        proc.communicate()
    live.clear()
    # What is left: taken by the test itself, through the same queue.
    received = []
    for kind, _, log in incarnations:
        if kind == "c":
            with open(log, "rb") as f:
                data = f.read()
            received += [struct.unpack_from("<IIi", data, k) for k in range(0, len(data) - len(data) % 12, 12)]
    for msg in q.get_many(1 << 20, timeout=0.5) if not q.empty() else []:
        me, i, crc = struct.unpack_from("<III", msg)
        received.append((me, i, 1))
    assert all(whole for _, _, whole in received), "a torn message"
    pairs = [(me, i) for me, i, _ in received]
    assert len(pairs) == len(set(pairs)), "a message delivered twice"
    committed = set()
    for kind, n, log in incarnations:
        if kind == "p" and os.path.getsize(log) == 8:
            with open(log, "rb") as f:
                (last,) = struct.unpack("<q", f.read())
            committed |= {(n, i) for i in range(last + 1)}
    missing = committed - set(pairs)
    assert len(missing) <= consumer_kills, f"{len(missing)} committed messages lost, {consumer_kills} consumers killed"
    assert len(committed) > 1000, "the test moved too few messages to mean anything"
    # Still working for everyone.
    q.put(b"after")
    assert q.get(timeout=5) == b"after"
    print(f"{len(committed)} committed, {len(pairs)} received, {len(missing)} lost with "
          f"{consumer_kills} killed consumers, {len(incarnations) - 4 - consumer_kills} killed producers")


def test_the_kernel_frees_a_queue_whose_holders_were_killed(name):
    procs = [spawn("import sys, shmemext; q = shmemext.Queue(sys.argv[1]); q.put(b'x'); print('up', flush=True); "
                   "sys.stdin.readline()", name) for _ in range(3)]
    for p in procs:
        assert p.stdout.readline().strip() == "up"
    assert block_exists(name)
    for p in procs:
        p.kill()
        p.communicate()
    # The memory went with its last holder: nothing is left to open, and what
    # names it (a few bytes on Linux) is cleared by that try.
    with pytest.raises(FileNotFoundError):
        shmemext.Queue(name, create=False)
    assert not block_exists(name)


NOWAIT_PRODUCER = """
import queue, sys, shmemext
q = shmemext.Queue(sys.argv[1])
full = 0
message = b"m" * 4000  # a copy long enough for others to find the lock held
for i in range(2000):
    try:
        q.put_nowait(message)
    except queue.Full:
        full += 1
print(full)
"""


def test_put_nowait_with_room_never_fails_for_other_producers(name):
    """A put that only tries waits out another producer's copy: with room
    for every message, six producers racing never see queue.Full."""
    with shmemext.Queue(name, 64 << 20) as q:  # room for all 12,000
        procs = [spawn(NOWAIT_PRODUCER, name) for _ in range(6)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [out.strip() for out, _ in outs] == ["0"] * 6, outs
        assert q.qsize() == 12000


def test_a_fork_child_uses_the_queue_it_inherited(name):
    if not hasattr(os, "fork"):
        pytest.skip("no fork() here")
    with shmemext.Queue(name, 4096) as there, shmemext.Queue(name + "-back", 4096) as back:
        pid = os.fork()
        if pid == 0:
            try:
                there.put(("from the child", os.getpid()))
                code = 0 if back.get(timeout=5) == "from the parent" else 1
            except BaseException:
                code = 2
            os._exit(code)
        msg, child = there.get(timeout=5)
        assert msg == "from the child" and child == pid
        back.put("from the parent")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_threads_share_one_handle(name):
    with shmemext.Queue(name, 1 << 12) as q:
        got = []
        errors = []

        def produce(me):
            try:
                for i in range(5000):
                    q.put((me, i))
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        def consume():
            try:
                while True:
                    m = q.get(timeout=10)
                    if m is None:
                        return
                    got.append(m)
            except BaseException as e:  # pragma: no cover
                errors.append(e)

        threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
        threads += [threading.Thread(target=consume) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads[:4]:
            t.join()
        for _ in range(4):
            q.put(None)
        for t in threads[4:]:
            t.join()
        assert not errors
        assert sorted(got) == [(k, i) for k in range(4) for i in range(5000)]


# ---- blocking ----------------------------------------------------------------------


def test_blocked_get_and_put_are_woken_across_processes(name):
    with shmemext.Queue(name, 64) as q:
        p = spawn("import sys, time, shmemext; q = shmemext.Queue(sys.argv[1]); time.sleep(0.3); q.put('late')", name)
        t0 = time.monotonic()
        assert q.get(timeout=10) == "late"
        assert 0.2 < time.monotonic() - t0 < 5
        p.communicate(timeout=10)
        q.put(b"x" * 32)
        q.put(b"")  # full: 48 + 16 of 64
        p = spawn("import sys, time, shmemext; q = shmemext.Queue(sys.argv[1]); time.sleep(0.3); print(q.get())", name)
        t0 = time.monotonic()
        q.put(b"z", timeout=10)
        assert 0.2 < time.monotonic() - t0 < 5
        assert p.communicate(timeout=10)[0].strip() == "b'" + "x" * 32 + "'"


def test_close_from_another_thread_ends_a_blocked_get_and_put(name):
    q = shmemext.Queue(name, 64)
    outcome = []

    def blocked():
        try:
            q.get()
        except shmemext.ClosedError:
            outcome.append("closed")

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    q.close()
    t.join(5)
    assert outcome == ["closed"] and time.monotonic() - t0 < 2
    q = shmemext.Queue(name, 64)
    q.put(b"x" * 48)

    def blocked_put():
        try:
            q.put(b"y" * 16)
        except shmemext.ClosedError:
            outcome.append("closed put")

    t = threading.Thread(target=blocked_put)
    t.start()
    time.sleep(0.2)
    q.close()
    t.join(5)
    assert outcome[-1] == "closed put"


@pytest.mark.skipif(os.name == "nt", reason="SIGINT to a child process")
def test_ctrl_c_ends_a_blocked_get_and_put(name):
    for op in ("q.get()", "q.put(b'y' * 16)"):
        p = spawn(
            f"""
            import sys, shmemext
            q = shmemext.Queue(sys.argv[1], 64)
            q.put(b'x' * 48)
            q.get() if {op!r} == 'q.get()' else None
            print('waiting', flush=True)
            try:
                {op}
            except KeyboardInterrupt:
                print('interrupted', flush=True)
            """,
            name,
        )
        assert p.stdout.readline().strip() == "waiting"
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=5)
        assert out.strip() == "interrupted", err


def test_async_get_and_put(name):
    import asyncio

    async def main():
        with shmemext.Queue(name, 64) as q:
            task = asyncio.ensure_future(q.get_async(timeout=5))
            await asyncio.sleep(0.05)
            python("import sys, shmemext; shmemext.Queue(sys.argv[1]).put({'from': 'elsewhere'})", name)
            assert await task == {"from": "elsewhere"}
            with pytest.raises(queue.Empty, match="stayed empty for 0.05 s"):
                await q.get_async(timeout=0.05)
            await q.put_async(b"x" * 48)
            with pytest.raises(queue.Full):
                await q.put_async(b"y" * 16, timeout=0.05)
            putter = asyncio.ensure_future(q.put_async(b"y" * 16))
            await asyncio.sleep(0.05)
            assert await q.get_async() == b"x" * 48
            await asyncio.wait_for(putter, 5)
            assert q.get_nowait() == b"y" * 16
            # Many idle tasks share the watcher; cancelling them leaves nothing behind.
            waiting = [asyncio.ensure_future(q.get_async()) for _ in range(200)]
            await asyncio.sleep(0.05)
            for t in waiting:
                t.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            with pytest.raises(TypeError):
                q.get_async(timeout="x")

    asyncio.run(main())


# Takes messages until it has seen argv[2] distinct ones starting with b"p",
# pausing argv[3] seconds (default none) after each take.
DRAIN = r"""
import sys, time, shmemext
q = shmemext.Queue(sys.argv[1])
want, seen = int(sys.argv[2]), set()
pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
while len(seen) < want:
    m = q.get(timeout=30)
    if m.startswith(b"p"):
        seen.add(m)
    if pause:
        time.sleep(pause)
print(len(seen))
"""


def _fill(q, message):
    """Puts `message` until the queue is full."""
    while True:
        try:
            q.put_nowait(message)
        except queue.Full:
            return


async def _drained_while_awaited(name, putters, tasks, *pause):
    """A consumer in another process takes the queue's messages while the
    put_async() tasks wait: every task ends, and it saw each of them once."""
    import asyncio

    drain = spawn(DRAIN, name, str(tasks), *pause)
    await asyncio.wait_for(asyncio.gather(*putters), 60)
    out, err = drain.communicate(timeout=60)
    assert drain.returncode == 0, err
    assert out.split() == [str(tasks)]


def test_put_async_sleeps_until_another_process_takes(name):
    """Idle put_async() tasks on a full queue sleep in the watcher (no
    polling: little CPU, one thread), and every one is let in as a consumer
    in another process makes room."""
    import asyncio

    tasks = 1000

    async def main():
        with shmemext.Queue(name, 256) as q:
            _fill(q, b"f" * 16)
            # One idle task first: what the watcher costs by itself (nothing
            # where it sleeps in the kernel, a look every millisecond where
            # it polls), which many tasks must not multiply.
            one = asyncio.ensure_future(q.put_async(b"one"))
            await asyncio.sleep(0.2)
            alone = time.process_time()
            await asyncio.sleep(1.0)
            alone = time.process_time() - alone
            one.cancel()
            await asyncio.gather(one, return_exceptions=True)
            putters = [asyncio.ensure_future(q.put_async(b"p%04d" % i)) for i in range(tasks)]
            try:
                await asyncio.sleep(0.2)
                cpu = time.process_time()
                await asyncio.sleep(1.0)
                cpu = time.process_time() - cpu
                watchers = [t for t in threading.enumerate() if t.name == "shmemext-watcher"]
                assert not any(p.done() for p in putters)
                # Looking every 10 ms, as a poll per task would, costs 100,000 tries a second.
                assert cpu < alone + 0.1, f"{tasks} idle put_async() tasks used {cpu:.2f} s of CPU in 1 s ({alone:.2f} s for one)"
                if shmemext._shmemext._WAIT_ANY_SLEEPS:
                    assert cpu < 0.15, f"{tasks} idle put_async() tasks used {cpu:.2f} s of CPU in 1 s"
                assert len(watchers) == 1
                await _drained_while_awaited(name, putters, tasks)
            finally:
                for p in putters:
                    p.cancel()
                await asyncio.gather(*putters, return_exceptions=True)

    asyncio.run(main())


def test_a_take_wakes_the_put_async_its_room_fits_not_every_one(name, monkeypatch):
    """Room is handed to awaiting puts in turn: as a consumer in another
    process takes one record at a time, about one put_async() task is woken
    per take, not every task that waits (which costs tasks**2 / 2 wake-ups),
    and every message still arrives once."""
    import asyncio

    from shmemext import _aio

    tasks = 300
    answers = []
    settle = _aio._settle

    def counting_settle(future, version, error):
        answers.append(error)
        settle(future, version, error)

    monkeypatch.setattr(_aio, "_settle", counting_settle)

    async def main():
        with shmemext.Queue(name, 1024) as q:
            _fill(q, b"f" * 16)  # records of one size: a take makes room for exactly one put
            putters = [asyncio.ensure_future(q.put_async(b"p%015d" % i)) for i in range(tasks)]
            try:
                await asyncio.sleep(0.2)
                assert not any(p.done() for p in putters)
                await _drained_while_awaited(name, putters, tasks, "0.002")  # one take at a time
            finally:
                for p in putters:
                    p.cancel()
                await asyncio.gather(*putters, return_exceptions=True)

    asyncio.run(main())
    assert not any(answers)
    assert len(answers) < 2 * tasks, f"{len(answers)} wake-ups of put_async() tasks for {tasks} takes"


def test_room_promised_to_a_cancelled_put_async_goes_to_the_next(name):
    """A put_async() answered with room but cancelled before it tried gives
    the room back at once: the next awaiting put gets it without waiting for
    another take."""
    import asyncio

    async def main():
        with shmemext.Queue(name, 64) as q:
            q.put(b"x" * 16)
            q.put(b"y" * 16)  # full: two records of 32 bytes
            first = asyncio.ensure_future(q.put_async(b"a" * 16))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(q.put_async(b"b" * 16))
            await asyncio.sleep(0.05)
            # The take and the cancel in one step of the loop: the first is
            # answered with the room, and cancelled before it can try.
            assert q.get_nowait() == b"x" * 16
            deadline = time.monotonic() + 5
            while not _promised(q) and time.monotonic() < deadline:
                time.sleep(0.001)
            assert _promised(q) == 32
            first.cancel()
            started = time.monotonic()
            await asyncio.wait_for(second, 0.5)  # not the 1 s a put waits before it looks again
            assert time.monotonic() - started < 0.5
            assert first.cancelled()
            assert [q.get_nowait(), q.get_nowait()] == [b"y" * 16, b"b" * 16]

    asyncio.run(main())


def test_room_promised_to_a_put_async_whose_loop_stalls_is_kept_only_a_while(name, monkeypatch):
    """Room promised to a put whose loop does not run it (stalled, or gone)
    is kept for _PROMISE seconds, not for good: after it, a take hands the
    room to the next put in turn."""
    import asyncio

    from shmemext import _aio

    monkeypatch.setattr(_aio, "_PROMISE", 0.2)
    monkeypatch.setattr(_aio, "_ROOM_SLICE", 30.0)  # no retry of its own comes to the rescue
    with shmemext.Queue(name, 64) as q:
        q.put(b"x" * 16)
        q.put(b"y" * 16)  # full: two records of 32 bytes
        loop_a = asyncio.new_event_loop()
        a_waits = threading.Event()

        def run_a():
            async def a():
                waiting = asyncio.ensure_future(q.put_async(b"a" * 16))  # a 32-byte record
                await asyncio.sleep(0.05)
                a_waits.set()
                await waiting
            loop_a.run_until_complete(a())

        thread_a = threading.Thread(target=run_a)
        thread_a.start()
        try:
            assert a_waits.wait(10)

            async def b():
                waiting = asyncio.ensure_future(q.put_async(b"b" * 32))  # a 48-byte record, after a's
                await asyncio.sleep(0.05)
                loop_a.call_soon_threadsafe(time.sleep, 1.5)  # a's loop stalls
                await asyncio.sleep(0.05)
                assert q.get_nowait() == b"x" * 16  # room for a: promised to it, which does not run
                await asyncio.sleep(0.4)  # the promise lapses
                assert q.get_nowait() == b"y" * 16  # 64 bytes free, none kept for a: b fits
                started = time.monotonic()
                await asyncio.wait_for(waiting, 1.0)
                return time.monotonic() - started

            assert asyncio.run(b()) < 1.0  # a's loop was still stalled: b did not wait for it
            assert q.get_nowait() == b"b" * 32  # room for a again, which then gets in
        finally:
            thread_a.join(30)
            if not thread_a.is_alive():
                loop_a.close()
        assert q.get(timeout=10) == b"a" * 16


def _promised(q):
    from shmemext import _aio

    return sum(need for w in list(_aio._watchers) for room, promises in list(w.promised.items())
               if room.queue is q for need, _ in list(promises.values()))


def test_close_from_another_thread_ends_a_put_async_awaiting_room(name):
    import asyncio

    async def main():
        q = shmemext.Queue(name, 64)
        q.put(b"x" * 48)
        putter = asyncio.ensure_future(q.put_async(b"y" * 16))
        await asyncio.sleep(0.1)
        closer = threading.Timer(0.1, q.close)
        closer.start()
        start = time.monotonic()
        with pytest.raises(shmemext.ClosedError):
            await asyncio.wait_for(putter, 5)
        closer.join()
        # Woken by the close, not by the watcher's next look a second on.
        assert time.monotonic() - start < 0.6

    asyncio.run(main())


# ---- bytes another process wrote ----------------------------------------------------


@linux_only
def test_hostile_bytes_never_crash_a_consumer(name):
    rng = random.Random(7)
    with shmemext.Queue(name, 1024, unpickle=False) as q:
        outcomes = {"message": 0, "corrupt": 0, "empty": 0, "full": 0}

        def repair():  # as an owner would: drop what the ring holds
            with block_bytes(name) as mem:
                mem[TAIL : TAIL + 8] = mem[HEAD : HEAD + 8]

        for _ in range(3000):
            for _ in range(rng.randrange(4)):
                try:
                    q.put_nowait(bytes(rng.randrange(256) for _ in range(rng.randrange(64))))
                except queue.Full:
                    outcomes["full"] += 1
                except shmemext.CorruptBlockError:
                    outcomes["corrupt"] += 1
                    repair()
            with block_bytes(name) as mem:
                where = rng.choice([TAIL, HEAD, RING, RING + rng.randrange(1024 - 8)])
                k = rng.choice([1, 4, 8])
                mem[where : where + k] = bytes(rng.randrange(256) for _ in range(k))
            for _ in range(4):
                try:
                    m = q.get_nowait()
                    assert isinstance(m, (bytes, str))
                    outcomes["message"] += 1
                except queue.Empty:
                    outcomes["empty"] += 1
                except shmemext.CorruptBlockError:
                    outcomes["corrupt"] += 1
                    repair()
                except shmemext.Error as e:  # a type that says pickle: refused
                    assert "unpickle" in str(e)
                    outcomes["corrupt"] += 1
                assert 0 <= q.qsize() <= 1024 // 16 and q._used <= 1024
        assert outcomes["corrupt"] > 100 and outcomes["message"] > 100, outcomes


@linux_only
def test_a_corrupt_ring_is_reported_with_the_queue_name(name):
    with shmemext.Queue(name, 256) as q:
        q.put(b"abc")
        with block_bytes(name) as mem:
            mem[RING : RING + 8] = struct.pack("<Q", 1 << 40)
        with pytest.raises(shmemext.CorruptBlockError, match=f"block '{name}': holds a corrupt value"):
            q.get()
        with block_bytes(name) as mem:
            mem[TAIL : TAIL + 8] = struct.pack("<Q", 1 << 50)
        with pytest.raises(shmemext.CorruptBlockError):
            q.put(b"x")
        assert q.qsize() == 0


def test_a_queue_in_a_subprocess_script(name):
    out = subprocess.run(
        [sys.executable, "-c", "import shmemext, sys; q = shmemext.Queue(sys.argv[1]); q.put('hi'); print(q.get())",
         name],
        capture_output=True, text=True, timeout=30,
    )
    assert out.stdout.strip() == "hi", out.stderr


def test_peek_leaves_a_message_until_dropped_and_put_raw_never_loads(name):
    """What the bridge is built on: copy without taking, take once handed on."""
    q = shmemext.Queue(name, 4096)
    q.put("t\u00e9xt")
    q.put(b"raw")
    q.put({"a": 1})
    first = q._peek()
    assert first[2:] == (0, "t\u00e9xt") and q.qsize() == 3
    second = q._peek(first[1])
    third = q._peek(second[1])
    assert second[2:] == (1, b"raw") and third[2] == 6 and pickle.loads(third[3]) == {"a": 1}
    with pytest.raises(queue.Empty):
        q._peek(third[1], timeout=0.05)
    with pytest.raises(ValueError, match="is not a run of records"):
        q._drop(first[0], first[1] + 8)
    assert q._drop(first[0], second[1]) is True and q.qsize() == 1
    assert q._drop(first[0], second[1]) is False   # already taken
    assert q._peek(first[0]) is None                # gone
    assert q.get() == {"a": 1}
    # A pickle that runs code when loaded travels as bytes: _put_raw does not load it.
    evil = pickle.dumps(os.getpid)[:-1] + b"(tR."   # calls os.getpid() on load, harmlessly
    q._put_raw(6, evil)
    assert q._peek()[2:] == (6, evil)
    assert q.get() == os.getpid()
    with pytest.raises(ValueError, match="kind 3 is not 1"):
        q._put_raw(3, b"x")
    with pytest.raises(TypeError):
        q._put_raw(1, "not bytes")
    q.close()
    with pytest.raises(shmemext.ClosedError):
        q._peek()

