"""Regressions for what a fault-injection soak and a hostile review found:
each test here failed before its fix.  Cross-process claims are tested with
real processes."""

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import shmemext

from conftest import FORK_WHILE_CLOSING, LOCK_HOLDER, SHM_DIR, TEST_PREFIX, spawn, sysv_backend

posix_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")


def run_script(code, *args, timeout=120):
    """Runs code in a new Python process with fork()'s warning about threads
    silenced (the child forks from a threaded process on purpose)."""
    proc = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@posix_only
def test_fork_while_another_thread_closes_leaves_a_usable_child(name):
    """A close() another thread has begun never ends in a fork() child: the
    child's handle must settle (closed if the detach had happened, else open)
    instead of waiting for a closer that does not exist there."""
    out = run_script(FORK_WHILE_CLOSING, name, "60")
    outcomes = eval(out)
    assert outcomes["hung"] == 0, outcomes
    assert outcomes["closed"] > 0, outcomes   # the rounds did reach the window


SIGNAL_FORK = """
import os, signal, sys, shmemext
v = shmemext.Value(sys.argv[1], 64)
children = []

def fork_here(signum, frame):
    pid = os.fork()
    if pid == 0:
        children.append("me")   # this process is the child from here on
    else:
        children.append(pid)

signal.signal(signal.SIGALRM, fork_here)
signal.setitimer(signal.ITIMER_REAL, 0.05)
try:
    v.wait(timeout=0.3)     # the handler, and so the fork, runs inside this call
except TimeoutError:
    pass
if children == ["me"]:
    # The call the handler ran in has left: nothing in flight, and close works.
    code = 0 if v._inflight == 0 else 10 + v._inflight
    v.close()
    os._exit(code if v.closed else 9)
assert v._inflight == 0
status = os.waitpid(children[0], 0)[1]
print(os.waitstatus_to_exitcode(status))
v.close()
"""


@posix_only
def test_fork_from_a_signal_handler_inside_a_call_keeps_the_count():
    """The forking thread may be inside a call (a signal handler runs there):
    the child's in-flight count keeps that call, so leaving it makes 0, not -1."""
    out = run_script(SIGNAL_FORK, f"{TEST_PREFIX}-sigfork")
    assert out.strip() == "0", out


FLIPPER = """
import sys, time
sys.path.insert(0, sys.argv[3])
from conftest import block_bytes
offset, seconds = int(sys.argv[2]), float(sys.argv[4])
high, low = bytes([0x00, 0x01]), b"A\\x00"
with block_bytes(sys.argv[1]) as mem:
    print("flipping", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            mem[offset:offset + 2] = high
            mem[offset:offset + 2] = low
"""


def canonical(s):
    """The str CPython builds for these characters (the narrowest width)."""
    return s.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="writes the block's memory from outside (Linux)")
@pytest.mark.parametrize("char_index", [14, 1023])
def test_checked_copy_sees_exactly_the_bytes_it_stores(name, char_index):
    """Another process rewrites one character of the committed value back
    and forth between U+0100 and 'A' without touching the slot's counter.
    Every get() returns a str CPython could have built, or refuses the value
    as corrupt: the width check is of the bytes that end up in the result,
    never of a second load of the shared original (the AVX2 copy once stored
    some head and tail bytes twice)."""
    here = os.path.dirname(os.path.abspath(__file__))
    with shmemext.Value(name, capacity=4096) as v:
        text = ["A"] * 1024
        text[char_index] = "\u0100"
        v.set("".join(text))   # version 1: slot 1, 2048 bytes of UCS-2
        slot1 = 4096 + 4096
        flipper = spawn(FLIPPER, name, str(slot1 + 2 * char_index), here, "3")
        try:
            assert flipper.stdout.readline() == "flipping\n", flipper.stderr.read()
            gets = invalid = corrupt = 0
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                for _ in range(200):
                    try:
                        s = v.get()
                    except shmemext.CorruptBlockError:
                        corrupt += 1
                        continue
                    gets += 1
                    if s != canonical(s):
                        invalid += 1
        finally:
            flipper.kill()
            flipper.wait(timeout=30)
            flipper.stdout.close(), flipper.stderr.close(), flipper.stdin.close()
        assert invalid == 0, f"{invalid} invalid str in {gets} gets ({corrupt} refused as corrupt)"
        assert corrupt > 0 and gets > 0, (gets, corrupt)


def test_owner_death_survives_an_acquire_that_meets_a_close(name):
    """The acquire that inherits a dead holder's lock may meet a close() of
    its handle and give the lock back: the next acquirer anywhere must still
    be told that a holder died (the state is kept in the block until told)."""
    untold = 0
    rounds = 10
    with shmemext.Segment(name, 64) as keeper:   # another attachment, which stays
        for _ in range(rounds):
            seg = shmemext.Segment(name, 64)
            holder = spawn(LOCK_HOLDER, name)
            try:
                assert holder.stdout.readline() == "holding\n", holder.stderr.read()
                outcome = []

                def acquire():
                    try:
                        with seg.lock(timeout=10) as lock:
                            outcome.append(lock.owner_died)
                    except shmemext.ClosedError:
                        outcome.append("closed")

                acquirer = threading.Thread(target=acquire)
                acquirer.start()
                time.sleep(0.05)   # the acquirer sleeps on the held lock
                closer = threading.Thread(target=seg.close)
                closer.start()
                time.sleep(0.002)  # the close() has begun, and waits for the acquirer
                holder.kill()
                acquirer.join(timeout=30)
                closer.join(timeout=30)
            finally:
                holder.kill()
                holder.wait(timeout=30)
                holder.stdout.close(), holder.stderr.close(), holder.stdin.close()
            with keeper.lock(timeout=5) as lock:
                told = lock.owner_died
            if outcome != [True] and not told:
                untold += 1
        with keeper.lock(timeout=5) as lock:
            assert not lock.owner_died, "told once"
    assert untold == 0, f"{untold} of {rounds} deaths told to nobody"


SETTER = """
import sys, shmemext
v = shmemext.Value(sys.argv[1], 64)
print("ready", flush=True)
for line in sys.stdin:
    v.set(line.strip())
    print("set", flush=True)
"""


def test_async_wait_made_while_the_watcher_looks_is_not_missed(name):
    """A wait_async() request made while the watcher is between reading the
    requests and going to sleep (here: stuck reading the version of a Value
    whose close() is being decided) must be seen: rung for, or looked at
    again, never left for the watcher's long sleep."""
    setter = spawn(SETTER, f"{name}-x")
    try:
        assert setter.stdout.readline() == "ready\n", setter.stderr.read()
        latencies = []
        for round_ in range(5):
            x = shmemext.Value(f"{name}-x", 64)
            b = shmemext.Value(f"{name}-b-{round_}", capacity=128 << 20)
            b.set(bytes(128 << 20))
            getting = threading.Event()

            def get_until_closed():
                getting.set()
                with pytest.raises(shmemext.ClosedError):
                    while True:
                        b.get()   # tens of ms each, without the GIL: a close() waits for it

            async def main():
                first = asyncio.ensure_future(x.wait_async())
                on_b = asyncio.ensure_future(b.wait_async())
                await asyncio.sleep(0.05)                        # the watcher sleeps on x and b
                sync_wait = threading.Thread(target=get_until_closed)
                sync_wait.start()
                await asyncio.to_thread(getting.wait)
                await asyncio.sleep(0.005)
                closer = threading.Thread(target=b.close)
                closer.start()
                await asyncio.sleep(0.002)
                first.cancel()                                 # rings: the watcher looks, and blocks on b
                await asyncio.sleep(0.005)
                again = asyncio.ensure_future(x.wait_async())   # x was watched a moment ago
                await asyncio.sleep(0.1)
                sent = time.monotonic()
                setter.stdin.write("new\n")
                setter.stdin.flush()
                await asyncio.wait_for(again, timeout=10)
                latencies.append(time.monotonic() - sent)
                with pytest.raises(shmemext.ClosedError):
                    await on_b
                await asyncio.to_thread(closer.join)
                await asyncio.to_thread(sync_wait.join)
                assert setter.stdout.readline() == "set\n"

            asyncio.run(main())
            x.close()
        assert max(latencies) < 0.5, latencies
    finally:
        setter.stdin.close()
        setter.wait(timeout=30)
        setter.stdout.close(), setter.stderr.close()


def test_a_watcher_thread_that_cannot_start_fails_the_wait(name, monkeypatch):
    """No thread, nobody to answer: the wait raises at once instead of
    waiting for ever, and the next wait gets a watcher of its own."""
    from shmemext import _aio

    start = threading.Thread.start

    def refuse(thread):
        if thread.name == "shmemext-watcher":
            raise RuntimeError("can't start new thread")
        return start(thread)

    with shmemext.Value(name, 64) as v:
        async def main():
            monkeypatch.setattr(_aio, "_watchers", [])   # none to share: a new one is made
            monkeypatch.setattr(_aio, "_where", {})
            monkeypatch.setattr(threading.Thread, "start", refuse)
            with pytest.raises(RuntimeError, match="can't start new thread"):
                await asyncio.wait_for(v.wait_async(timeout=30), timeout=5)
            monkeypatch.setattr(threading.Thread, "start", start)
            waiting = asyncio.ensure_future(v.wait_async(timeout=30))
            await asyncio.sleep(0.05)
            await asyncio.to_thread(v.set, "x")
            assert await asyncio.wait_for(waiting, timeout=5) == 1

        asyncio.run(main())
        assert not any(w.thread.name == "shmemext-watcher" and not w.thread.is_alive() and w in _aio._watchers
                       for w in list(_aio._watchers))


CREATOR = """
import sys, shmemext
shmemext.Segment(sys.argv[1], 1 << 20)
"""


def sysv_segments():
    """shmid -> the row of /proc/sysvipc/shm."""
    with open("/proc/sysvipc/shm") as f:
        header = f.readline().split()
        rows = [dict(zip(header, line.split())) for line in f]
    return {int(r["shmid"]): r for r in rows}


def _has_strace():
    import shutil

    return shutil.which("strace") is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="System V segments (Linux)")
@pytest.mark.skipif(not _has_strace(), reason="needs strace (apt-get install strace) to kill at a system call")
@pytest.mark.parametrize("killed_at", ["shmat", "shmctl"])
@pytest.mark.parametrize("cleaner", ["sweep", "reopen"])
def test_a_creator_killed_before_marking_its_segment_leaks_nothing(name, killed_at, cleaner, tmp_path):
    """A creator SIGKILLed between shmget() and marking the segment for
    removal (strace kills it as it enters shmat, or the shmctl that marks it)
    used to leak the segment for good: nothing attached it, the kernel would
    not free it, and sweep() did not know it.  The entry now names it, by its
    key, before it exists: sweep() or the next open of the name removes it."""
    if not sysv_backend():
        pytest.skip("the System V backend's segments")
    trace = os.path.join(str(tmp_path), "trace")
    traced = subprocess.run(
        ["strace", "-f", "-qq", "-o", trace, "-e", f"trace={killed_at}", "-e", f"inject={killed_at}:signal=KILL",
         sys.executable, "-c", CREATOR, name],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, SHMEMEXT_SIZE="0"))
    assert traced.returncode != 0, traced
    with open(trace) as f:
        creator = int(next(line for line in f if killed_at in line).split()[0])
    leaked = [shmid for shmid, r in sysv_segments().items()
              if int(r["cpid"]) == creator and not int(r["perms"], 8) & 0o1000]
    assert len(leaked) == 1, "the creator left its segment unmarked (the window under test)"
    if cleaner == "sweep":
        shmemext.sweep()
        assert not os.path.exists(os.path.join(SHM_DIR, name))
    else:
        with shmemext.Segment(name, 64) as again:
            assert again.created
    assert leaked[0] not in sysv_segments(), "its segment is gone"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="name entries in /dev/shm (Linux)")
def test_empty_name_entries_are_listed_and_swept(name):
    """A creator killed between making /dev/shm/NAME and writing the entry
    leaves it empty: ls and blocks() show it (dead), and sweep() removes it,
    but not one whose gate a live creator holds."""
    if not sysv_backend():
        pytest.skip("the System V backend's name entries")
    path = os.path.join(SHM_DIR, name)
    open(path, "wb").close()   # what such a creator leaves
    os.chmod(path, 0o600)
    rows = [r for r in shmemext.blocks() if r["name"] == name]
    assert len(rows) == 1 and rows[0]["alive"] is False, rows
    assert name in subprocess.run([sys.executable, "-m", "shmemext", "ls"], capture_output=True, text=True,
                                  check=True).stdout
    busy = path + "-busy"
    open(busy, "wb").close()
    import fcntl
    import struct

    holder = os.open(busy, os.O_RDWR)
    try:
        fcntl.fcntl(holder, getattr(fcntl, "F_OFD_SETLK", 37), struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 1, 0))
        removed = [r["name"] for r in shmemext.sweep()]
        assert name in removed and not os.path.exists(path)
        assert os.path.basename(busy) not in removed and os.path.exists(busy), "a creator at work keeps it"
        assert os.path.basename(busy) not in [r["name"] for r in shmemext.blocks()]
    finally:
        os.close(holder)
        os.unlink(busy)


SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _can_build():
    return os.path.exists(os.path.join(SOURCE_TREE, "setup.py"))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the lock-file switch is for Linux builds")
@pytest.mark.skipif(not _can_build(), reason="needs the source tree")
def test_a_build_switch_rebuilds_the_module(tmp_path):
    """`SHMEMEXT_LOCK_FILES=1 pip install .` after a plain `pip install .` in
    the same tree (pip builds in the tree's build/) must give the lock-file
    module, not the plain one it built before, and back again."""
    import shutil
    import zipfile

    tree = tmp_path / "tree"
    shutil.copytree(SOURCE_TREE, tree, ignore=shutil.ignore_patterns("build", "*.so", ".git", "__pycache__", "*.egg-info"))

    def backend_built(**switches):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SHMEMEXT_", "LD_PRELOAD", "ASAN_", "UBSAN_"))}
        env.update(switches)
        out = tmp_path / f"wheels-{len(os.listdir(tmp_path))}"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), "."], cwd=tree, env=env,
                       check=True, capture_output=True, timeout=600)
        (wheel,) = os.listdir(out)
        with zipfile.ZipFile(out / wheel) as z:
            module = z.read(next(n for n in z.namelist() if "_shmemext" in n and not n.endswith(".pyi")))
        return [b for b in (b"posix-lockfiles", b"linux-sysv") if b in module]

    assert backend_built() == [b"linux-sysv"]
    assert backend_built(SHMEMEXT_LOCK_FILES="1") == [b"posix-lockfiles"]
    assert backend_built() == [b"linux-sysv"]


WAIT_ANY_AFTER_A_FAILURE = """
import sys, shmemext
from shmemext import _shmemext
v = shmemext.Value(sys.argv[1], 64)
bell = _shmemext._Bell()
for _ in range(4):
    _shmemext._wait_any((v,), (v.version,), bell, bell.rings, 0.2)
v.close()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="futex_waitv (Linux)")
@pytest.mark.skipif(not _has_strace(), reason="needs strace (apt-get install strace) to fail a system call")
def test_one_failed_wait_on_many_does_not_make_every_later_one_poll(name, tmp_path):
    """A futex_waitv that fails once with an error other than ENOSYS (here
    EINVAL, injected by strace) costs that one wait its sleep: the waits
    after it sleep in the kernel again instead of polling every 0.1 ms."""
    if _shmemext_wait_any_max() == 0:
        pytest.skip("this build polls by design (no wait on many words)")
    trace = os.path.join(str(tmp_path), "trace")
    subprocess.run(
        ["strace", "-f", "-qq", "-o", trace, "-e", "trace=futex_waitv,nanosleep,clock_nanosleep",
         "-e", "inject=futex_waitv:error=EINVAL:when=1", sys.executable, "-c", WAIT_ANY_AFTER_A_FAILURE, name],
        check=True, capture_output=True, text=True, timeout=120)
    with open(trace) as f:
        calls = f.read()
    sleeps = calls.count("futex_waitv(")
    polls = calls.count("nanosleep(")
    assert sleeps >= 4, f"{sleeps} futex_waitv calls, {polls} polls"
    # The failed wait polls out its 0.2 s (about 1,000 polls here); four polled waits made about 4,000.
    assert polls < 2500, f"{polls} polls: the waits after the failure polled"


def _shmemext_wait_any_max():
    from shmemext import _shmemext

    return _shmemext._WAIT_ANY_MAX if _shmemext._BACKEND == "linux-sysv" else 0


FORK_WHILE_A_THREAD_WAITS_FOR_THE_GATE = """
import os, signal, sys, threading, time, shmemext
name = sys.argv[1]
opened = []
waiter = threading.Thread(target=lambda: opened.append(shmemext.Value(name)))
waiter.start()                 # waits for the gate, which the test holds
time.sleep(0.2)
pid = os.fork()                # while that thread polls for the gate, its descriptor open
if pid == 0:
    signal.alarm(5)            # a child that hangs dies of SIGALRM
    time.sleep(0.6)            # the parent's thread has taken the gate and finished by now
    with shmemext.Value(name) as v:
        v.set(b"child")
    os._exit(0)
waiter.join()
opened[0].close()
status = os.waitpid(pid, 0)[1]
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="holds a name entry's gate by hand (Linux)")
def test_a_fork_child_does_not_keep_a_gate_another_thread_was_waiting_for(name):
    """A thread that waits for another process's gate lets the registry go
    between tries, with the descriptor it polls on open: a fork() then gave
    the child that descriptor, and the lock the parent's thread took on it
    later stayed held through the child's copy, so the child's own next
    attach or detach of the name waited for itself for ever."""
    if not sysv_backend():
        pytest.skip("the System V backend's gate is a lock on the name entry")
    import fcntl
    import struct

    with shmemext.Value(name, 64):
        gate = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            fcntl.fcntl(gate, getattr(fcntl, "F_OFD_SETLK", 37), struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 1, 0))
            child = subprocess.Popen([sys.executable, "-W", "ignore::DeprecationWarning", "-c",
                                      FORK_WHILE_A_THREAD_WAITS_FOR_THE_GATE, name],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)
        finally:
            os.close(gate)     # lets the waiting thread in
        out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.strip() == "0", f"the fork child ended with {out.strip()} (-14: it hung on the gate)"
