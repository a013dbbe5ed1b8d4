import contextlib
import ctypes
import itertools
import os
import struct
import subprocess
import sys
import textwrap

import pytest

# The test process must not touch the user's own default block.
TEST_PREFIX = f"shmemext-test-{os.getpid()}"
os.environ["SHMEMEXT_NAME"] = f"{TEST_PREFIX}-default"
os.environ.pop("SHMEMEXT_SIZE", None)

SHM_DIR = "/dev/shm"
_counter = itertools.count()


@pytest.fixture(autouse=True, scope="session")
def _outside_the_source_tree(tmp_path_factory):
    """Child processes started with -c or -m put the working directory first on
    sys.path; run them from elsewhere so they import the installed package, not
    the unbuilt source tree."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


def ours():
    """Names in /dev/shm that belong to this test run (the default block aside)."""
    if not os.path.isdir(SHM_DIR):
        return []
    return sorted(
        n for n in os.listdir(SHM_DIR) if n.startswith(TEST_PREFIX) and n != f"{TEST_PREFIX}-default"
    )


def lock_dir():
    """Where the lock-file backend (macOS, BSD; Linux built with
    SHMEMEXT_LOCK_FILES=1) keeps this user's lock files, or None for other backends."""
    from shmemext import _shmemext

    if _shmemext._BACKEND != "posix-lockfiles":
        return None
    return os.path.join(os.environ.get("SHMEMEXT_LOCK_DIR") or "/tmp/.shmemext", f"u{os.geteuid()}")


@pytest.fixture
def name():
    """A block name unique to this test, checked to be released afterwards."""
    block = f"{TEST_PREFIX}-{next(_counter)}"
    yield block
    leftover = [n for n in ours() if n == block]
    for n in leftover:
        os.unlink(os.path.join(SHM_DIR, n))
    assert not leftover, f"block {block} was left in {SHM_DIR}"
    locks = lock_dir()
    if locks is not None and os.path.isdir(locks):
        stale = [n for n in os.listdir(locks) if n.rsplit(".", 1)[0] == block]
        for n in stale:
            os.unlink(os.path.join(locks, n))
        assert not stale, f"lock files {stale} of block {block} were left in {locks}"


def python(code, *args, env=None, timeout=60, check=True, **kwargs):
    """Runs code in a new Python process; returns the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def spawn(code, *args, env=None, **kwargs):
    """Starts code in a new Python process without waiting."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=full_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def shm_path(block):
    return os.path.join(SHM_DIR, block)


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="reads or edits the block as a file in /dev/shm, which only Linux has",
)


def fnv1a_64(text):
    h = 14695981039346656037
    for byte in text.encode("ascii"):
        h = ((h ^ byte) * 1099511628211) & (2**64 - 1)
    return h


def short_form(block):
    """The OS name of a block on the lock-file path, without its slash: names
    longer than 30 characters are cut to a prefix, '~' and a hash."""
    return block if len(block) <= 30 else f"{block[:13]}~{fnv1a_64(block):016x}"


def os_name(block):
    """The name the OS knows the block by."""
    from shmemext import _shmemext

    if _shmemext._BACKEND == "win32":
        return "Local\\" + block
    return "/" + (short_form(block) if _shmemext._BACKEND == "posix-lockfiles" else block)


def block_exists(block):
    """Whether the OS still has the named object, on every platform."""
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenFileMappingW.restype = ctypes.c_void_p
        handle = kernel32.OpenFileMappingW(0x0004, False, os_name(block))   # FILE_MAP_READ
        if handle:
            kernel32.CloseHandle(ctypes.c_void_p(handle))
        return bool(handle)
    import _posixshmem

    try:
        fd = _posixshmem.shm_open(os_name(block), os.O_RDONLY, 0)
    except FileNotFoundError:
        return False
    os.close(fd)
    return True


# The name entry a Linux (System V) block keeps in /dev/shm: see ext/platform_sysv.c.
ENTRY = struct.Struct("<8sIiQQQII8xq")


def sysv_backend():
    from shmemext import _shmemext

    return _shmemext._BACKEND == "linux-sysv"


def read_entry(block):
    """The fields of a block's name entry (System V backend)."""
    with open(shm_path(block), "rb") as f:
        magic, version, shmid, token, size, ipc_ns, uid, pid, created = ENTRY.unpack(f.read(ENTRY.size))
    assert magic == b"SHXENTRY", magic
    return {"shmid": shmid, "token": token, "size": size, "ipc_ns": ipc_ns, "uid": uid, "pid": pid}


_libc = ctypes.CDLL(None, use_errno=True)
if hasattr(_libc, "shmat"):
    _libc.shmat.restype = ctypes.c_void_p
    _libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    _libc.shmdt.argtypes = [ctypes.c_void_p]


@contextlib.contextmanager
def block_bytes(block):
    """A writable view of all of a block's memory, header included, as another
    process that may write the block sees it (Linux)."""
    if sysv_backend():
        entry = read_entry(block)
        addr = _libc.shmat(entry["shmid"], None, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "shmat", block)
        try:
            view = memoryview((ctypes.c_char * entry["size"]).from_address(addr)).cast("B")
            yield view
            view.release()
        finally:
            _libc.shmdt(ctypes.c_void_p(addr))
    else:
        import mmap

        with open(shm_path(block), "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            view = memoryview(m)
            yield view
            view.release()


def shmem_kib():
    """Shmem of /proc/meminfo: every page of shared memory the system holds."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    raise AssertionError("no Shmem line in /proc/meminfo")


def maps_of(block):
    """How many mappings of the block this process has (Linux)."""
    with open("/proc/self/maps") as f:
        lines = f.read().splitlines()
    if sysv_backend():
        # A System V segment shows as /SYSV<key> with the segment id as its inode.
        shmid = str(read_entry(block)["shmid"])
        return sum(1 for line in lines if "/SYSV" in line and line.split()[4] == shmid)
    return sum(1 for line in lines if line.endswith("/" + block) or line.endswith("/" + block + " (deleted)"))


# A process that takes a Segment's lock, writes half a record and waits on stdin (to be killed).
LOCK_HOLDER = """
import sys, shmemext
seg = shmemext.Segment(sys.argv[1], 64)
lock = seg.lock()
lock.acquire()
seg.write(b"half")
print("holding", flush=True)
sys.stdin.readline()
"""

# Rounds of: a thread closes a Value while the main thread forks; the child uses the
# handle (through Python, or through the C API of the consumer module at argv[3]) and
# exits 0 if it was still open, 1 if closed.  Prints how many children hung.
FORK_WHILE_CLOSING = """
import importlib.util, os, sys, threading, time, shmemext
name, rounds = sys.argv[1], int(sys.argv[2])
consumer = None
if len(sys.argv) > 3:
    spec = importlib.util.spec_from_file_location("consumer", sys.argv[3])
    consumer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(consumer)
outcomes = {"hung": 0, "closed": 0, "open": 0}
for i in range(rounds):
    v = shmemext.Value(name, 64)
    v.set(b"x")
    go = threading.Event()
    closer = threading.Thread(target=lambda: (go.wait(), v.close()))
    closer.start()
    go.set()
    time.sleep((i % 20) * 0.00002)   # lets the closer get to a different point each round
    pid = os.fork()
    if pid == 0:
        try:
            if consumer is not None:
                consumer.object_set(v, b"from the child")   # the C API's own way into the handle
                os._exit(0)
            got = v.get()
            v.set(b"child")
            v.version
            v.close()
            os._exit(0 if got == b"x" else 3)
        except (OSError, shmemext.ClosedError):
            os._exit(1 if consumer is not None or v.closed else 4)
    closer.join()
    deadline = time.monotonic() + 5
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            assert code in (0, 1), code
            outcomes["open" if code == 0 else "closed"] += 1
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            outcomes["hung"] += 1
            break
        time.sleep(0.001)
print(outcomes)
"""
