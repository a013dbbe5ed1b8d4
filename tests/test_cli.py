"""python -m shmemext, run as a user would."""

import os
import signal
import subprocess
import sys

from conftest import block_exists


def cli(*args, env=None, timeout=60):
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "shmemext", *args], env=full, capture_output=True, text=True, timeout=timeout
    )


def test_demo_prints_what_the_child_read(name):
    proc = cli("demo", env={"SHMEMEXT_NAME": name})
    assert proc.returncode == 0, proc.stderr
    assert "Child process read from shared memory: This is a test string\n" in proc.stdout
    assert not block_exists(name)


def test_demo_on_a_named_block(name):
    proc = cli("demo", "--name", name)
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[-1] == "Child process read from shared memory: This is a test string"


def test_hold_keeps_a_block_for_set_and_get(name):
    hold = subprocess.Popen(
        [sys.executable, "-m", "shmemext", "hold", "--name", name, "--size", "128"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert hold.stdout.readline().startswith(f"holding block '{name}' (capacity 128")
        proc = cli("set", "--name", name, "kept by hold")
        assert proc.returncode == 0 and proc.stderr == ""
        assert cli("get", "--name", name).stdout == "kept by hold\n"
        info = cli("info", "--name", name).stdout
        assert "capacity: 128" in info and "version:  1" in info and "created:  False" in info
    finally:
        hold.send_signal(signal.SIGINT)
        out, _ = hold.communicate(timeout=30)
    assert hold.returncode == 0 and f"released block '{name}'" in out
    assert not block_exists(name)


def test_set_on_an_unheld_block_says_the_value_goes_away(name):
    proc = cli("set", "--name", name, "lost")
    assert proc.returncode == 0
    assert "goes away when this command exits" in proc.stderr
    assert "hold --name" in proc.stderr and "--persist" in proc.stderr


def test_set_persist_then_unlink(name):
    assert cli("set", "--persist", "--name", name, "kept").returncode == 0
    assert cli("get", "--name", name).stdout == "kept\n"
    assert "persist:  True" in cli("info", "--name", name).stdout
    assert cli("unlink", name).returncode == 0
    assert not block_exists(name)


def test_errors_are_one_line_and_nonzero(name):
    for args, fragment in [
        (("get", "--name", "../etc"), "invalid block name '../etc'"),
        (("unlink", name), "No such file or directory"),
        (("set", "--name", name, "--size", "4", "too long"), "does not fit the capacity of 4 bytes"),
    ]:
        proc = cli(*args)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("shmemext: error: ") and fragment in lines[0], proc.stderr


def test_usage_errors_exit_2():
    assert cli().returncode == 2
    assert cli("frobnicate").returncode == 2
    assert cli("info", "--size", "lots").returncode == 2


def test_version_flag():
    import shmemext

    assert cli("--version").stdout.strip() == f"shmemext {shmemext.__version__}"


def test_the_cli_works_without_docstrings():
    # python -OO drops docstrings; the parser once built its description from one.
    for args in (["--version"], ["ls"], ["bench", "--help"]):
        proc = subprocess.run([sys.executable, "-OO", "-m", "shmemext", *args], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, SHMEMEXT_SIZE="0"))
        assert proc.returncode == 0, (args, proc.stderr)


def test_the_demo_runs_from_the_root_of_a_source_checkout():
    # There the source package comes first on sys.path (python -m puts the
    # current directory there), without the compiled module: the installed
    # copy's is used, for the parent and for the child it starts.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "shmemext", "__init__.py")):
        import pytest

        pytest.skip("no source checkout beside the tests")
    proc = subprocess.run([sys.executable, "-m", "shmemext", "demo"], cwd=root, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "Child process read from shared memory: This is a test string"
