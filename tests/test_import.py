"""Import maps the default block; the environment configures it."""

import os
import subprocess
import sys

import pytest

import shmemext

from conftest import block_exists, linux_only, lock_dir, python, shm_path, sysv_backend


def test_import_creates_and_exit_releases_the_default_block(name):
    out = python("import shmemext; d = shmemext.default; print(d.name, d.created, d.capacity)",
                 env={"SHMEMEXT_NAME": name}).stdout
    assert out == f"{name} True 4096\n"
    assert not block_exists(name)


def test_shmemext_size_sets_the_capacity(name):
    out = python("import shmemext; print(shmemext.default.capacity)",
                 env={"SHMEMEXT_NAME": name, "SHMEMEXT_SIZE": "100000"}).stdout
    assert out == "100000\n"


def test_shmemext_size_zero_disables_the_default_block(name):
    out = python(
        """
        import shmemext
        print(shmemext.default)
        try:
            shmemext.get()
        except RuntimeError as e:
            print(e)
        """,
        env={"SHMEMEXT_NAME": name, "SHMEMEXT_SIZE": "0"},
    ).stdout
    assert out.splitlines()[0] == "None"
    assert "disabled (SHMEMEXT_SIZE=0)" in out
    assert not block_exists(name)


@pytest.mark.parametrize(
    "env, exc, fragment",
    [
        ({"SHMEMEXT_SIZE": "lots"}, "ValueError", "SHMEMEXT_SIZE=lots is not a capacity"),
        ({"SHMEMEXT_SIZE": "-5"}, "ValueError", "SHMEMEXT_SIZE=-5"),
        ({"SHMEMEXT_NAME": "no/slashes"}, "ValueError", "invalid block name 'no/slashes'"),
    ],
)
def test_bad_configuration_fails_the_import(env, exc, fragment):
    proc = python("import shmemext", env=env, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(exc) and fragment in last, proc.stderr


@linux_only
def test_import_fails_when_the_existing_default_block_is_too_small(name):
    with open(shm_path(name), "wb") as f:
        f.write(b"not ours" * 2000)
    try:
        proc = python("import shmemext", env={"SHMEMEXT_NAME": name}, check=False)
        assert proc.returncode != 0
        assert f"shmemext.ForeignBlockError: block '{name}': exists but is not a shmemext block" in proc.stderr
    finally:
        os.unlink(shm_path(name))


@linux_only
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a block to another user needs root")
def test_import_fails_with_oserror_when_the_block_cannot_be_opened(name):
    # A block of another user's, private to them.
    python("import sys, shmemext; shmemext.Value(sys.argv[1], persist=True)", name)
    os.chown(shm_path(name), 65534, 65534)
    try:
        proc = python("import shmemext", env={"SHMEMEXT_NAME": name}, check=False)
        assert proc.returncode != 0
        assert "PermissionError" in proc.stderr and name in proc.stderr.strip().splitlines()[-1]
    finally:
        shmemext.unlink(name)
        locks = lock_dir()   # the lock-file path: root's lock files, left where the chown found them
        for stale in [n for n in os.listdir(locks) if n.rsplit(".", 1)[0] == name] if locks else []:
            os.unlink(os.path.join(locks, stale))


def test_reimport_gives_a_new_module_with_its_own_default_block(name):
    out = python(
        """
        import sys, importlib
        import shmemext._shmemext as first
        first.set("one")
        del sys.modules["shmemext._shmemext"]
        second = importlib.import_module("shmemext._shmemext")
        print(first is second, first.default is second.default, second.get(), second.default.created)
        """,
        env={"SHMEMEXT_NAME": name},
    ).stdout
    assert out == "False False one False\n"


def test_stale_build_is_refused():
    proc = python(
        """
        import sys, importlib
        import shmemext._version as v
        v.__version__ = "0.0.0-other"
        sys.modules.pop("shmemext")
        import shmemext
        """,
        check=False,
    )
    assert "ImportError" in proc.stderr and "stale" in proc.stderr


def test_version_matches_the_installed_metadata():
    import importlib.metadata

    import shmemext

    assert shmemext.__version__ == importlib.metadata.version("shmemext")


def _can_mount_namespace():
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not _can_mount_namespace(), reason="mounting a small /dev/shm needs a mount namespace (root)")
@pytest.mark.skipif(sysv_backend(), reason="System V memory is not limited by the size of /dev/shm (see test_kernel_lifetime)")
def test_full_dev_shm_raises_enospc_not_sigbus(name):
    code = (
        "import errno, sys, shmemext\n"
        "small = shmemext.Value(sys.argv[1] + '-small', 1 << 20)\n"
        "try:\n"
        "    shmemext.Value(sys.argv[1], 64 << 20)\n"
        "except OSError as e:\n"
        "    print(e.errno == errno.ENOSPC, sys.argv[1] in str(e), str(e))\n"
        "small.set(b'x' * (1 << 20)); print(small.get() == b'x' * (1 << 20))\n"
        "import os; print(sorted(os.listdir('/dev/shm')))\n"
    )
    script = (
        "mount -t tmpfs -o size=8m tmpfs /dev/shm && "
        f"SHMEMEXT_SIZE=0 {sys.executable} -c \"$0\" {name}"
    )
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("True True"), proc.stdout
    assert "No space left on device" in lines[0]
    assert f"of {(64 << 20) * 2 + 4096} bytes" in lines[0], "the message says how much did not fit"
    assert lines[1] == "True"
    assert lines[2] == f"['{name}-small']", "the failed block left nothing behind"
