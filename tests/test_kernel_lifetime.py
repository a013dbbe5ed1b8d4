"""The kernel gives a block's memory back when its last holder ends, however
it ends: measured in /proc/meminfo, with real separate processes and no
later open of the name (Linux, System V backend)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import shmemext
from conftest import TEST_PREFIX, python, read_entry, shm_path, shmem_kib, spawn, sysv_backend

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not sysv_backend(),
    reason="kernel-counted memory is the Linux System V backend's (the lock-file path reaps instead)",
)

MIB = 1 << 20
SIZE = 192 * MIB   # memory per block: every page written by its holder

# Opens a block of `kind` whose memory is SIZE bytes and writes every page.
OPEN = """
import os, sys, shmemext
SIZE = %d
def open_block(name, kind, **kw):
    if kind == "value":
        b = shmemext.Value(name, SIZE // 2 - 4096, **kw)
        b.set(b"a" * b.capacity)    # slot 1
        b.set(b"b" * b.capacity)    # slot 0: both slots' pages now written
    else:
        b = shmemext.Segment(name, SIZE - 4096, **kw)
        b.write(b"s" * b.size)
    return b
""" % SIZE

HOLDER = OPEN + """
import ctypes, signal
block = open_block(sys.argv[1], sys.argv[2], persist=sys.argv[3] == "persist")
print("ready", flush=True)
how = sys.stdin.readline().strip()
if how == "os_exit":
    os._exit(0)
elif how == "sigterm":
    os.kill(os.getpid(), signal.SIGTERM)
elif how == "segfault":
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)   # a sanitizer's handler would turn the crash into an exit
    ctypes.string_at(0)
signal.pause()   # sigkill: the test kills us
"""

KINDS = pytest.mark.parametrize("kind", ["value", "segment"])


def live_segments():
    """The ids of every System V segment the kernel holds (/proc/sysvipc/shm)."""
    with open("/proc/sysvipc/shm") as f:
        return {int(line.split()[1]) for line in f.readlines()[1:]}


def wait_released(shmids, held_kib, size, timeout=1.0):
    """Waits until the kernel has freed the segments; returns (seconds, Shmem drop in KiB).
    The drop is measured from a reading taken while they were held, so it is
    the block's memory coming back, not an absolute level others could move."""
    t0 = time.monotonic()
    while (set(shmids) & live_segments()) and time.monotonic() - t0 < timeout:
        time.sleep(0.005)
    elapsed = time.monotonic() - t0
    assert not set(shmids) & live_segments(), f"segments {shmids} still exist after {elapsed:.2f} s"
    drop = held_kib - wait_for_shmem(lambda kib: held_kib - kib >= 0.9 * size / 1024, timeout=1.0)
    assert drop >= 0.9 * size / 1024, f"Shmem dropped by only {drop} KiB of {size >> 10} KiB"
    return elapsed, drop


def wait_for_shmem(predicate, timeout=1.0):
    """Polls Shmem until predicate(kib) holds; returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        kib = shmem_kib()
        if predicate(kib) or time.monotonic() > deadline:
            return kib
        time.sleep(0.01)


def entry_is_small(block):
    """Nothing of more than a page stays under /dev/shm for the name."""
    try:
        st = os.stat(shm_path(block))
    except FileNotFoundError:
        return True
    return st.st_size <= 4096 and st.st_blocks * 512 <= 4096


def drop(block):
    """Removes a dead block's leftover entry, as `sweep` would."""
    if os.path.exists(shm_path(block)):
        shmemext.unlink(block)


def start_holder(name, kind, persist=False):
    """A holder process with every page of its block written; returns it, the
    segment's id and a Shmem reading taken while it is held."""
    p = spawn(HOLDER, name, kind, "persist" if persist else "")
    line = p.stdout.readline()
    if line != "ready\n":
        p.kill()
        finish(p)
        raise AssertionError(f"the holder did not start: {line!r}")
    shmid = read_entry(name)["shmid"]
    assert shmid in live_segments()
    return p, shmid, shmem_kib()


def finish(p):
    p.wait(timeout=30)
    for f in (p.stdin, p.stdout, p.stderr):
        f.close()


@KINDS
@pytest.mark.parametrize("how", ["sigkill", "os_exit", "sigterm", "segfault"])
def test_only_holder_ending_gives_the_memory_back_at_once(name, kind, how):
    p, shmid, held = start_holder(name, kind)
    try:
        if how == "sigkill":
            p.kill()
        else:
            p.stdin.write(how + "\n")
            p.stdin.flush()
        wait_released([shmid], held, SIZE)
    finally:
        p.kill()
        finish(p)
    expected = {"sigkill": -9, "os_exit": 0, "sigterm": -15, "segfault": -11}[how]
    assert p.returncode == expected
    assert entry_is_small(name)
    drop(name)


POOL = OPEN + """
import multiprocessing as mp
keep = None
def init(prefix, kind):
    global keep
    keep = open_block(f"{prefix}-w{os.getpid()}", kind)   # a worker's cache: never closed
def pid(_):
    return os.getpid()
if __name__ == "__main__":
    pool = mp.get_context("fork").Pool(2, initializer=init, initargs=(sys.argv[1], sys.argv[2]))
    # A worker runs tasks only after its initializer: once both have answered, both blocks exist.
    while len(set(pool.map(pid, range(8)))) < 2:
        pass
    print("ready", flush=True)
    if sys.stdin.readline().strip() == "terminate":
        pool.terminate()
    else:
        pool.close()
    pool.join()
    print("joined", flush=True)
    sys.stdin.readline()
"""


@KINDS
@pytest.mark.parametrize("how", ["close", "terminate"])
def test_fork_pool_workers_that_keep_blocks_give_them_back(name, kind, how):
    p = spawn(POOL, name, kind)
    try:
        assert p.stdout.readline() == "ready\n"
        workers = [n for n in os.listdir("/dev/shm") if n.startswith(name + "-w")]
        assert len(workers) == 2, "two workers, a block each"
        shmids = [read_entry(w)["shmid"] for w in workers]
        held = shmem_kib()
        p.stdin.write(how + "\n")
        p.stdin.flush()
        assert p.stdout.readline() == "joined\n"
        wait_released(shmids, held, 2 * SIZE)
        p.stdin.write("\n")
        p.stdin.flush()
    finally:
        p.kill()
        finish(p)
    assert all(entry_is_small(w) for w in workers)
    for w in workers:
        drop(w)


FORK_LAST = OPEN + """
block = open_block(sys.argv[1], sys.argv[2])
parent = os.getpid()
if os.fork() == 0:
    import time
    while os.getppid() == parent:
        time.sleep(0.01)
    print("alone", flush=True)
    sys.stdin.readline()
    os._exit(0)
print("ready", flush=True)
sys.stdin.readline()
"""


@KINDS
def test_a_forked_child_that_ends_last_gives_the_memory_back(name, kind):
    p = spawn(FORK_LAST, name, kind)
    try:
        assert p.stdout.readline() == "ready\n"
        shmid = read_entry(name)["shmid"]
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(timeout=30)
        assert p.stdout.readline() == "alone\n"
        assert shmid in live_segments(), "the child still holds it after its parent exited"
        held = shmem_kib()
        p.stdin.write("\n")   # the child's stdin is the same pipe
        p.stdin.flush()
        wait_released([shmid], held, SIZE)
    finally:
        p.kill()
        finish(p)
    assert entry_is_small(name)
    drop(name)


@KINDS
def test_a_survivor_keeps_the_data_when_another_holder_dies(name, kind):
    p, shmid, _ = start_holder(name, kind)
    if kind == "value":
        survivor = shmemext.Value(name)
        expected = b"b" * survivor.capacity
        read = survivor.get
    else:
        survivor = shmemext.Segment(name, 1)
        expected = b"s" * survivor.size
        read = survivor.read
    assert not survivor.created and survivor.holders == 2
    p.kill()
    finish(p)
    deadline = time.monotonic() + 5
    while survivor.holders != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert survivor.holders == 1
    assert read() == expected, "the data outlives the holder that wrote it"
    assert shmid in live_segments()
    held = shmem_kib()
    survivor.close()
    wait_released([shmid], held, SIZE)
    assert not os.path.exists(shm_path(name)), "the last detach removes the name too"


@KINDS
def test_a_persistent_block_survives_sigkill_of_every_holder_until_unlinked(name, kind):
    p, shmid, _ = start_holder(name, kind, persist=True)
    p.kill()
    finish(p)
    time.sleep(0.2)
    assert shmid in live_segments(), "persist=True outlives every holder"
    code = OPEN + """
b = shmemext.Value(sys.argv[1]) if sys.argv[2] == "value" else shmemext.Segment(sys.argv[1], 1)
data = b.get() if sys.argv[2] == "value" else b.read()
print(b.created, b.persist, b.holders, data[:1], len(set(data)))
"""
    out = python(code, name, kind).stdout.split()
    assert out == ["False", "True", "1", "b'b'" if kind == "value" else "b's'", "1"]
    held = shmem_kib()
    shmemext.unlink(name)
    wait_released([shmid], held, SIZE)   # unlink gives the memory back
    assert not os.path.exists(shm_path(name))


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "shmemext", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SHMEMEXT_SIZE="0"))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_ls_shows_live_blocks_with_holders_and_sweep_removes_a_dead_entry(name):
    with shmemext.Value(name, 64) as v, shmemext.Value(name) as again:
        rows = {r["name"]: r for r in json.loads(cli("ls", "--json"))}
        mine = rows[name]
        assert mine["kind"] == "value" and mine["capacity"] == 64 and mine["holders"] == 2
        assert mine["alive"] and mine["persist"] is False and mine["creator_pid"] == os.getpid()
        assert name in cli("ls")
        assert v.holders == again.holders == 2
    dead = name + "-dead"
    victim = spawn("import sys, signal, shmemext; v = shmemext.Value(sys.argv[1]); print(1, flush=True); signal.pause()",
                   dead)
    assert victim.stdout.readline() == "1\n"
    victim.kill()
    finish(victim)
    assert os.path.exists(shm_path(dead)) and entry_is_small(dead), "a crash leaves only the small entry"
    rows = {r["name"]: r for r in json.loads(cli("ls", "--json"))}
    assert rows[dead]["alive"] is False and rows[dead]["holders"] is None
    removed = json.loads(cli("sweep", "--json"))
    # Other dead entries of this user's may go too: sweep is for the whole user.
    assert dead in [r["name"] for r in removed if not r["alive"]]
    assert not os.path.exists(shm_path(dead))
    assert "nothing to sweep" in cli("sweep")


def test_sweep_gives_back_memory_nothing_names(name):
    # A persistent block whose name entry was deleted by hand: nothing can reach it any more.
    python("import sys, shmemext; shmemext.Segment(sys.argv[1], 1 << 20, persist=True).write(b'x' * (1 << 20))", name)
    shmid = read_entry(name)["shmid"]
    os.unlink(shm_path(name))
    assert shmid in live_segments()
    removed = json.loads(cli("sweep", "--json"))
    orphans = [r for r in removed if r["alive"] and r["name"] == f"(shmid {shmid})"]
    assert len(orphans) == 1 and orphans[0]["kind"] == "segment" and orphans[0]["capacity"] == 1 << 20, removed
    assert shmid not in live_segments()


def _can_unshare_ipc():
    try:
        return subprocess.run(["unshare", "-i", "true"], capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


needs_ipc_namespace = pytest.mark.skipif(not _can_unshare_ipc(), reason="a new IPC namespace needs root")


@needs_ipc_namespace
def test_kernel_limits_are_named_in_a_clear_oserror(name):
    code = textwrap.dedent("""
    import errno, os, sys, shmemext
    def write(path, value):
        with open(path, "w") as f:
            f.write(value)
    write("/proc/sys/kernel/shmmax", str(8 << 20))
    small = shmemext.Value(sys.argv[1] + "-small", 1 << 20)
    try:
        shmemext.Value(sys.argv[1], 64 << 20)
    except OSError as e:
        print(e.errno == errno.EINVAL, sys.argv[1] in str(e), str(e))
    write("/proc/sys/kernel/shmmni", "1")
    try:
        shmemext.Segment(sys.argv[1] + "-2", 4096)
    except OSError as e:
        print(e.errno == errno.ENOSPC, str(e))
    small.set(b"x" * (1 << 20)); print(small.get() == b"x" * (1 << 20))
    print(sorted(n for n in os.listdir("/dev/shm") if n.startswith(sys.argv[1])))
    """)
    proc = subprocess.run(["unshare", "-i", sys.executable, "-c", code, name], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, SHMEMEXT_SIZE="0"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("True True") and "kernel.shmmax" in lines[0], lines[0]
    assert f"of {(64 << 20) * 2 + 4096} bytes" in lines[0], "the message says how much was asked"
    assert lines[1].startswith("True") and "kernel.shmmni" in lines[1], lines[1]
    assert lines[2] == "True"
    assert lines[3] == f"['{name}-small']", "the failed blocks left nothing behind"


@needs_ipc_namespace
def test_another_ipc_namespace_gets_a_clear_error_not_a_second_block(name):
    with shmemext.Value(name) as v:
        v.set("from the first namespace")
        code = "import sys, shmemext\ntry:\n    shmemext.Value(sys.argv[1])\nexcept OSError as e:\n    print(e)\n"
        proc = subprocess.run(["unshare", "-i", sys.executable, "-c", code, name], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, SHMEMEXT_SIZE="0"))
        assert proc.returncode == 0, proc.stderr
        assert "another IPC namespace" in proc.stdout and name in proc.stdout, proc.stdout
        assert v.get() == "from the first namespace" and v.holders == 1


def test_no_leftovers_of_this_module():
    leftovers = [n for n in os.listdir("/dev/shm") if n.startswith(TEST_PREFIX) and not n.endswith("-default")]
    assert leftovers == []


FEW_DESCRIPTORS = """
import os, resource, sys, time, shmemext
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
before = len(os.listdir("/proc/self/fd"))
blocks = [shmemext.Value(f"{sys.argv[1]}-{i}", 64) for i in range(200)]
for i, b in enumerate(blocks):
    b.set(str(i))
assert len(os.listdir("/proc/self/fd")) == before, "a block keeps no descriptor open"
parent = os.getpid()
if os.fork() == 0:
    while os.getppid() == parent:
        time.sleep(0.01)
    ok = all(b.get() == str(i) and b.holders == 1 for i, b in enumerate(blocks))
    again = shmemext.Value(f"{sys.argv[1]}-7")
    print("ok" if ok and not again.created and again.get() == "7" else "lost", flush=True)
    again.close()
    for b in blocks:
        b.close()
    os._exit(0)
"""


def test_a_fork_child_short_of_descriptors_keeps_every_block(name):
    proc = subprocess.Popen([sys.executable, "-c", FEW_DESCRIPTORS, name], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, SHMEMEXT_SIZE="0"))
    out = proc.stdout.readline()   # the forked child's, after its parent exited
    proc.wait(timeout=60)
    proc.stdout.close()
    assert out == "ok\n"
    deadline = time.monotonic() + 10
    while any(n.startswith(name + "-") for n in os.listdir("/dev/shm")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(n.startswith(name + "-") for n in os.listdir("/dev/shm")), "the child's detaches removed the names"


def test_persist_is_refused_where_the_kernel_would_not_keep_it(name):
    if not _can_unshare_ipc():
        pytest.skip("a new IPC namespace needs root")
    code = ("import sys, shmemext\nopen('/proc/sys/kernel/shm_rmid_forced', 'w').write('1')\n"
            "try:\n    shmemext.Value(sys.argv[1], persist=True)\nexcept OSError as e:\n    print(e)\n"
            "v = shmemext.Value(sys.argv[1]); v.set('fine'); print(v.get())\n")
    proc = subprocess.run(["unshare", "-i", sys.executable, "-c", code, name], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, SHMEMEXT_SIZE="0"))
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert "kernel.shm_rmid_forced is 1" in first and name in first
    assert second == "fine"
