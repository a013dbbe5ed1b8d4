"""The seed's lifetime, with real separate processes."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

import shmemext
from conftest import block_exists, ours, os_name, python, spawn, sysv_backend


# The seed's lifetime holds for both kinds of block: the same tests, parametrized.
PRELUDE = {
    "value": (
        "import shmemext\n"
        "def open_block(n, **kw): return shmemext.Value(n, **kw)\n"
        "def put(b, s): b.set(s)\n"
        "def take(b): return b.get()\n"
        "def mark(b, i): b.set(str(i))\n"
        "def count(b): return b.version\n"
    ),
    "segment": (
        "import shmemext\n"
        "def open_block(n, **kw): return shmemext.Segment(n, 4096, **kw)\n"
        "def put(b, s): d = s.encode(); b.write(len(d).to_bytes(4, 'little') + d)\n"
        "def take(b): return b.read(int.from_bytes(b.read(4), 'little'), 4).decode()\n"
        "def mark(b, i): b.write(b'\\x01', 1024 + i)\n"
        "def count(b): return sum(b.read(64, 1024))\n"
    ),
}
KINDS = pytest.mark.parametrize("kind", sorted(PRELUDE))


def with_prelude(kind, code):
    return PRELUDE[kind] + textwrap.dedent(code)


def wait_gone(block, timeout=10.0):
    deadline = time.monotonic() + timeout
    while block_exists(block) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not block_exists(block)


def test_parent_writes_child_reads(name):
    with shmemext.Value(name) as v:
        v.set("This is a test string")
        out = python(
            """
            import sys, shmemext
            v = shmemext.Value(sys.argv[1])
            print(v.created, v.get())
            v.set(b"child was here")
            """,
            name,
        ).stdout
        assert out == "False This is a test string\n"
        assert v.get() == b"child was here"
        assert v.version == 2


def test_default_block_is_shared_between_processes():
    shmemext.set("\u20ac from the parent")
    out = python("import shmemext; print(shmemext.get()); shmemext.set('from the child')").stdout
    assert out == "\u20ac from the parent\n"
    assert shmemext.get() == "from the child"


STARTER = """
import sys
sys.stdin.readline()           # start together
b = open_block(sys.argv[1])
print(b.created, flush=True)
sys.stdin.readline()           # all have attached
mark(b, int(sys.argv[3]))
while count(b) < int(sys.argv[2]):
    pass
print(count(b), flush=True)
"""


@KINDS
def test_eight_processes_attach_at_once_exactly_one_creates(name, kind):
    n = 8
    procs = [spawn(with_prelude(kind, STARTER), name, str(n), str(i)) for i in range(n)]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    created = [p.stdout.readline().strip() for p in procs]
    assert created.count("True") == 1 and created.count("False") == n - 1, created
    for p in procs:
        p.stdin.write("set\n")
        p.stdin.flush()
    counts = [p.communicate(timeout=30)[0].strip() for p in procs]
    assert counts == [str(n)] * n, "all share one block: every process saw all 8 marks"
    assert all(p.returncode == 0 for p in procs)
    assert wait_gone(name)


HOLDER = """
import sys
b = open_block(sys.argv[1])
put(b, "held by " + sys.argv[2])
print(b.created, flush=True)
sys.stdin.readline()
"""


@KINDS
@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_block_is_released_when_every_holder_is_gone(name, kind, how):
    procs = [spawn(with_prelude(kind, HOLDER), name, str(i)) for i in range(4)]
    created = [p.stdout.readline() for p in procs]
    assert created.count("True\n") == 1 and created.count("False\n") == 3
    assert block_exists(name)
    for p in procs:
        if how == "exit":
            p.stdin.write("\n")
            p.stdin.flush()
        else:
            p.kill()
        p.wait(timeout=30)
        p.stdout.close(), p.stdin.close(), p.stderr.close()
    if how == "exit":
        assert not block_exists(name), "the last normal exit releases the block"
    code = "import sys\nb = open_block(sys.argv[1])\nprint(b.created, repr(take(b)))"
    assert python(with_prelude(kind, code), name).stdout == "True ''\n"
    assert not block_exists(name), "nothing of ours is left in /dev/shm"


@KINDS
def test_create_false_opens_only_a_live_block(name, kind):
    ctor = (lambda **kw: shmemext.Value(name, **kw)) if kind == "value" else (lambda **kw: shmemext.Segment(name, 64, **kw))
    with pytest.raises(FileNotFoundError, match=name) as missing:
        ctor(create=False)
    assert missing.value.filename == name and "does not exist" in str(missing.value)
    assert not block_exists(name), "a refused open leaves nothing behind"
    # Held by another process: opened, not created.
    holder = spawn(with_prelude(kind, HOLDER), name, "0")
    assert holder.stdout.readline() == "True\n"
    with ctor(create=False) as b:
        assert not b.created
    # Its holder SIGKILLed: what is left is dead, and is "not found" too (and is cleared).
    holder.kill()
    holder.wait(timeout=30)
    holder.stdout.close(), holder.stdin.close(), holder.stderr.close()
    with pytest.raises(FileNotFoundError):
        ctor(create=False)
    assert not block_exists(name)
    # Persistent, with no holder: it exists.
    python(with_prelude(kind, "import sys\nput(open_block(sys.argv[1], persist=True), 'kept')"), name)
    try:
        with ctor(create=False) as b:
            assert not b.created and b.persist
    finally:
        shmemext.unlink(name)


OPEN_EXISTING = """
import sys, time
import shmemext
found = missing = 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        with shmemext.Value(sys.argv[1], create=False) as v:
            assert not v.created, "create=False created a block"
            found += 1
    except FileNotFoundError:
        missing += 1
print(found, missing)
"""
MAKE_AND_DROP = """
import sys, time
import shmemext
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    with shmemext.Value(sys.argv[1]) as v:
        v.set("x")
        time.sleep(0.0005)
"""


def test_create_false_racing_creators_and_last_detaches(name):
    # Openers that must never create, against a process that creates the
    # block and lets it go again: once, a refused open removed lock files a
    # newcomer had just made, and openers found a half-made block.
    procs = [spawn(OPEN_EXISTING, name, "2") for _ in range(3)] + [spawn(MAKE_AND_DROP, name, "2")]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(out)
    counts = [tuple(map(int, o.split())) for o in outs[:3]]
    assert sum(f for f, _ in counts) > 0 and sum(m for _, m in counts) > 0, counts
    assert wait_gone(name)
    assert [b for b in shmemext.blocks() if b["name"] == name] == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
@KINDS
def test_forked_child_keeps_the_block_after_its_parent_exits(name, kind, tmp_path):
    result = tmp_path / "result"
    script = """
    import os, sys, time
    name, result, os_name = sys.argv[1], sys.argv[2], sys.argv[3]
    def block_exists(name):
        import _posixshmem
        try:
            os.close(_posixshmem.shm_open(os_name, os.O_RDONLY, 0))
            return True
        except FileNotFoundError:
            return False
    b = open_block(name)
    put(b, "from before the fork")
    parent = os.getpid()   # read before the fork: the parent may be gone before the child runs
    pid = os.fork()
    if pid == 0:
        while os.getppid() == parent:       # wait until the parent has exited
            time.sleep(0.01)
        alive = block_exists(name)
        text = take(b)
        put(b, "child outlived parent")
        again = open_block(name)
        ok = alive and text == "from before the fork" and not again.created and take(again) == "child outlived parent"
        again.close()
        b.close()
        with open(result, "w") as f:
            f.write("ok" if ok else f"bad {alive} {text!r}")
        os._exit(0)
    """
    python(with_prelude(kind, script), name, str(result), os_name(name))
    deadline = time.monotonic() + 20
    while not result.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert result.read_text() == "ok"
    assert wait_gone(name), "released when the forked child detached"


def test_multiprocessing_children_of_every_start_method(name, tmp_path):
    script = tmp_path / "mp_children.py"
    script.write_text(textwrap.dedent("""
    import multiprocessing as mp, sys, shmemext
    def child(name):
        print(shmemext.Value(name).get(), flush=True)
    if __name__ == "__main__":
        v = shmemext.Value(sys.argv[1])
        v.set("mp")
        for method in ("fork", "spawn", "forkserver"):
            p = mp.get_context(method).Process(target=child, args=(sys.argv[1],))
            p.start(); p.join()
            assert p.exitcode == 0
        print(v.created, v.get())
    """))
    out = subprocess.run(
        [sys.executable, str(script), name], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out == "mp\nmp\nmp\nTrue mp\n"


@KINDS
def test_persist_keeps_the_block_until_unlinked(name, kind):
    python(with_prelude(kind, "import sys\nput(open_block(sys.argv[1], persist=True), 'kept')"), name)
    assert block_exists(name)
    code = "import sys\nb = open_block(sys.argv[1])\nprint(b.created, b.persist, take(b))"
    assert python(with_prelude(kind, code), name).stdout == "False True kept\n"
    shmemext.unlink(name)
    assert not block_exists(name)
    with pytest.raises(FileNotFoundError, match=name):
        shmemext.unlink(name)


def test_unlink_while_in_use_gives_newcomers_a_new_block(name):
    with shmemext.Value(name) as old:
        old.set("old")
        shmemext.unlink(name)
        with shmemext.Value(name) as new:
            assert new.created and new.get() == ""
            new.set("new")
            assert old.get() == "old"


def test_persist_flag_given_later_sticks_or_is_refused(name):
    with shmemext.Value(name) as v:
        assert not v.persist
        if sysv_backend():
            # The kernel frees this block with its last holder, and that cannot be undone.
            with pytest.raises(ValueError, match="already open without persist=True"):
                shmemext.Value(name, persist=True)
            assert not v.persist
            return
        with shmemext.Value(name, persist=True):
            assert v.persist
    assert block_exists(name)
    shmemext.unlink(name)


@KINDS
def test_interpreter_exit_detaches_blocks_left_open(name, kind):
    # The objects are never closed: the module's exit hook must detach them.
    code = "import sys\nsys.modules['keep'] = open_block(sys.argv[1])\nkeep2 = open_block(sys.argv[1])"
    python(with_prelude(kind, code), name)
    assert not block_exists(name)


def test_default_block_is_private_to_the_user_by_default():
    env = dict(os.environ)
    env.pop("SHMEMEXT_NAME")
    out = subprocess.run(
        [sys.executable, "-c", "import os, shmemext; print(shmemext.default.name == f'shmemext-{os.geteuid()}')"],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert out == "True\n"


def test_no_leftovers_from_this_module():
    assert ours() == []
