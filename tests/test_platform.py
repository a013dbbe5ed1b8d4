"""What differs between backends: names of every allowed length, and the
lock-file path that macOS and the BSDs take (run on Linux by a build with
SHMEMEXT_LOCK_FILES=1, as CI does once)."""

import os
import signal

import pytest

import shmemext
from conftest import TEST_PREFIX, block_exists, lock_dir, python, short_form, spawn
from shmemext import _shmemext

lock_files = pytest.mark.skipif(
    _shmemext._BACKEND != "posix-lockfiles",
    reason="lock-file backend only (macOS, BSD; Linux built with SHMEMEXT_LOCK_FILES=1)",
)


def long_name(tail):
    base = f"{TEST_PREFIX}-long-"
    return base + tail.rjust(shmemext.NAME_MAX - len(base), "a")


def test_the_longest_names_work_and_stay_apart():
    one, two = long_name("1"), long_name("2")
    assert len(one) == len(two) == shmemext.NAME_MAX
    with shmemext.Value(one, 64) as a, shmemext.Value(two, 64) as b:
        assert a.created and b.created and block_exists(one) and block_exists(two)
        a.set("one")
        b.set("two")
        out = python("import sys, shmemext; v = shmemext.Value(sys.argv[1]); print(v.created, v.get())", one)
        assert out.stdout == "False one\n"
    with shmemext.Value(one, 64) as a:
        assert a.created and a.get() == "", "released with its last holder, like any block"


def test_backend_is_named():
    expected = {"win32"} if os.name == "nt" else {"linux-sysv", "posix-lockfiles"}
    assert _shmemext._BACKEND in expected


@lock_files
def test_lock_files_live_exactly_as_long_as_the_block(name):
    stem = short_form(name)
    files = {f"{stem}.gate", f"{stem}.live", f"{stem}.lock"}
    with shmemext.Value(name, 64) as v:
        assert files <= set(os.listdir(lock_dir()))
        python("import sys, shmemext; shmemext.Value(sys.argv[1]).set('from a child')", name)
        assert v.get() == "from a child", "the child attached through the same lock files"
        assert files <= set(os.listdir(lock_dir())), "a holder's detach leaves them"
    assert not files & set(os.listdir(lock_dir()))


@lock_files
def test_a_long_name_gets_a_stable_short_form():
    name = long_name("stable")
    stem = short_form(name)
    assert len(stem) + 1 <= 31 and "~" in stem
    with shmemext.Value(name, 64):
        assert f"{stem}.live" in os.listdir(lock_dir())
        with open(os.path.join(lock_dir(), f"{stem}.live")) as f:
            assert f.read() == name, "the live file records the full name"


@lock_files
def test_two_names_with_one_short_form_are_an_error():
    name = long_name("collide")
    live = os.path.join(lock_dir(), f"{short_form(name)}.live")
    with shmemext.Value(name, 64):
        with open(live, "w") as f:   # as if another name had hashed to the same short form
            f.write(long_name("other"))
        with pytest.raises(FileExistsError, match="same short OS name") as info:
            shmemext.Value(name, 64)
        assert info.value.filename == name
        with open(live, "w") as f:
            f.write(name)


@lock_files
def test_writer_killed_holding_the_lock_is_an_owner_death(name):
    holder = spawn(
        """
        import sys, time, shmemext
        seg = shmemext.Segment(sys.argv[1], 64)
        held = seg.lock()   # kept: a lock object released when collected would let go
        held.acquire()
        print("held", flush=True)
        time.sleep(60)
        """,
        name,
    )
    try:
        with shmemext.Segment(name, 64) as seg:
            assert holder.stdout.readline() == "held\n"
            with pytest.raises(TimeoutError):
                seg.lock(timeout=0.2).acquire()
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
            with seg.lock(timeout=5) as lock:
                assert lock.owner_died
            with seg.lock(timeout=5) as lock:
                assert not lock.owner_died
    finally:
        holder.kill()
        holder.communicate()


REAPED_HOLDER = """
import signal, sys, shmemext
s = shmemext.Segment(sys.argv[1], 1 << 20, persist=sys.argv[2] == "persist")
s.write(b"x" * (1 << 20))
print("ready", flush=True)
signal.pause()
"""


@lock_files
@pytest.mark.parametrize("persist", [False, True])
def test_a_dead_holders_block_is_reaped_by_the_next_attach_of_any_name(name, persist):
    victim = spawn(REAPED_HOLDER, name, "persist" if persist else "")
    assert victim.stdout.readline() == "ready\n", victim.stderr.read()
    victim.kill()
    victim.wait(timeout=30)
    for f in (victim.stdin, victim.stdout, victim.stderr):
        f.close()
    assert block_exists(name), "no kernel here frees it by itself"
    rows = {r["name"]: r for r in shmemext.blocks()}
    assert rows[name]["alive"] is persist and rows[name]["holders"] in (0, None)
    python("import sys, shmemext; shmemext.Value(sys.argv[1]).close()", name + "-other")
    if persist:
        assert block_exists(name), "a persistent block is never reaped"
        shmemext.unlink(name)
    else:
        assert not block_exists(name), "another name's attach gave the dead block's memory back"
    assert not any(n.startswith(short_form(name) + ".") for n in os.listdir(lock_dir()))


@lock_files
def test_sweep_reaps_dead_blocks_on_the_lock_file_path(name):
    victim = spawn(REAPED_HOLDER, name, "")
    assert victim.stdout.readline() == "ready\n", victim.stderr.read()
    victim.kill()
    victim.wait(timeout=30)
    for f in (victim.stdin, victim.stdout, victim.stderr):
        f.close()
    removed = [r for r in shmemext.sweep() if r["name"] == name]
    assert len(removed) == 1 and removed[0]["kind"] == "segment" and removed[0]["capacity"] == 1 << 20
    assert not block_exists(name)


def test_blocks_lists_a_held_block(name):
    with shmemext.Segment(name, 4096) as s, shmemext.Segment(name, 1) as again:
        rows = {r["name"]: r for r in shmemext.blocks()}
        row = rows[name]
        assert row["kind"] == "segment" and row["capacity"] == 4096 and row["alive"]
        assert row["persist"] is False and row["creator_pid"] == os.getpid()
        if _shmemext._BACKEND == "linux-sysv":
            assert row["holders"] == s.holders == again.holders == 2
        else:
            assert s.holders is None   # flock() tells held or not, never by how many


PLANTER = """
import json, os, sys
import shmemext   # before dropping privileges: the package lives where nobody may read
os.setgroups([]); os.setgid(65534); os.setuid(65534)
base, victim = sys.argv[1], sys.argv[2]
out = {}
def attempt(label, fn):
    try:
        fn()
        out[label] = "allowed"
    except OSError as exc:
        out[label] = "refused: " + type(exc).__name__
root_dir = os.path.join(base, "u0")
if sys.argv[3] == "plant":
    os.mkdir(root_dir, 0o777)   # root's lock directory, made first by somebody else
else:
    attempt("plant a gate", lambda: os.close(os.open(os.path.join(root_dir, "x.gate"), os.O_CREAT | os.O_RDONLY)))
    attempt("plant a live file", lambda: os.close(os.open(os.path.join(root_dir, "x.live"), os.O_CREAT | os.O_RDONLY)))
    attempt("remove root's live file", lambda: os.unlink(os.path.join(root_dir, victim + ".live")))
    attempt("replace root's directory", lambda: os.rename(root_dir, root_dir + ".old"))
print(json.dumps(out))
"""


@lock_files
@pytest.mark.skipif(os.geteuid() != 0, reason="planting files as another user needs root")
def test_lock_files_cannot_be_planted_or_removed_by_another_user(name, tmp_path_factory):
    import json
    import tempfile

    base = tempfile.mkdtemp(prefix="shmemext-locks-", dir="/tmp")
    os.chmod(base, 0o1777)   # shared by every user, like /tmp
    env = {"SHMEMEXT_LOCK_DIR": base, "SHMEMEXT_SIZE": "0"}
    try:
        python(PLANTER, base, name, "plant", env=env, cwd="/")
        code = "import sys, shmemext\ntry:\n    shmemext.Value(sys.argv[1])\nexcept PermissionError as e:\n    print(e)\n"
        out = python(code, name, env=env).stdout
        assert f"its lock directory {base}/u0 cannot be trusted" in out and "owned by uid 65534" in out, out
        os.rmdir(os.path.join(base, "u0"))
        holder = spawn("import sys, shmemext\nv = shmemext.Value(sys.argv[1])\nprint('held', flush=True)\nsys.stdin.readline()",
                       name, env=env)
        try:
            assert holder.stdout.readline() == "held\n", holder.stderr.read()
            st = os.stat(os.path.join(base, "u0"))
            assert st.st_uid == 0 and st.st_mode & 0o777 == 0o711
            tried = json.loads(python(PLANTER, base, name, "try", env=env, cwd="/").stdout)
            assert all(v.startswith("refused") for v in tried.values()), tried
        finally:
            holder.stdin.write("\n")
            holder.stdin.flush()
            holder.wait(timeout=30)
            for f in (holder.stdin, holder.stdout, holder.stderr):
                f.close()
        assert not [n for n in os.listdir(os.path.join(base, "u0")) if n.startswith(name)]
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


FORK_SHORT_OF_FDS = """
import os, resource, sys, time, shmemext
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
blocks = [shmemext.Value(f"{sys.argv[1]}-{i}", 64) for i in range(8)]
for i, b in enumerate(blocks):
    b.set(str(i))
# Leave about one free descriptor, so that fork() can give the child its own
# live file for at most one block.
used = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 1, hard))
parent = os.getpid()
if os.fork() == 0:
    while os.getppid() == parent:
        time.sleep(0.01)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    kept = 0
    for i in range(8):
        again = shmemext.Value(f"{sys.argv[1]}-{i}")
        kept += not again.created and again.get() == str(i)
        again.close()
    print(kept, flush=True)
    for b in blocks:
        b.close()
    os._exit(0)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
"""


@lock_files
def test_a_fork_child_short_of_descriptors_keeps_every_block_on_the_lock_file_path(name):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", FORK_SHORT_OF_FDS, name], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, SHMEMEXT_SIZE="0"))
    out = proc.stdout.readline()
    proc.wait(timeout=60)
    proc.stdout.close()
    assert out == "8\n", "every block outlived the parent under its name while the child used it"
    python("import shmemext; shmemext.sweep()")   # the names the parent kept: reaped once nobody holds them
    assert not [n for n in os.listdir(lock_dir()) if n.startswith(name + "-")]
