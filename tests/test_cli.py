"""python -m shmemext, run as a user would."""

import base64
import json
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


def start_hold(name, *extra):
    hold = subprocess.Popen([sys.executable, "-m", "shmemext", "hold", "--name", name, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    banner = hold.stderr.readline()
    assert banner.startswith(f"holding block '{name}'"), banner
    return hold, banner


def test_hold_keeps_a_block_for_set_and_get(name):
    import shmemext

    hold, banner = start_hold(name, "--size", "128")
    try:
        assert banner.startswith(f"holding block '{name}' (capacity 128")
        proc = cli("set", "--name", name, "kept by hold")
        assert proc.returncode == 0 and proc.stderr == ""
        assert cli("get", "--name", name).stdout == "kept by hold\n"
        info = cli("info", "--name", name).stdout
        holders = "-" if shmemext.Value(name).holders is None else "1"   # None: the OS cannot tell
        assert "capacity: 128" in info and "version:  1" in info and f"holders:  {holders}" in info
    finally:
        hold.send_signal(signal.SIGINT)
        out, err = hold.communicate(timeout=30)
    # Ended by Ctrl-C: the status a shell gives an interrupted command, and nothing on stdout.
    assert hold.returncode == 130 and out == "" and f"released block '{name}'" in err
    assert not block_exists(name)


def test_hold_ended_by_sigterm_exits_143(name):
    hold, _ = start_hold(name)
    hold.send_signal(signal.SIGTERM)
    hold.communicate(timeout=30)
    assert hold.returncode == 143
    assert not block_exists(name)


def test_reading_commands_never_create(name):
    for args in (("get", "--name", name), ("info", "--name", name), ("watch", "--name", name)):
        proc = cli(*args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert proc.stdout == ""
        assert proc.stderr == f"shmemext: error: no block named '{name}' exists: no process holds it, and it does not persist\n"
        assert not block_exists(name)
    # The default block, when no process holds it (the command's own import made it just now).
    proc = cli("get", env={"SHMEMEXT_NAME": name})
    assert proc.returncode == 1 and "no block named" in proc.stderr and "the default block" in proc.stderr
    assert not block_exists(name)
    # Options of creation belong to the commands that create.
    assert cli("info", "--persist", "--name", name).returncode == 2
    assert cli("get", "--size", "64", "--name", name).returncode == 2
    proc = cli("get", "--name", "")
    assert proc.returncode == 1 and "invalid block name ''" in proc.stderr


def test_bytes_and_text_round_trip_exactly(name):
    hold, _ = start_hold(name)
    try:
        raw = bytes(range(256)) + b"\n"
        assert subprocess.run([sys.executable, "-m", "shmemext", "set", "--bytes", "--name", name],
                              input=raw, capture_output=True, timeout=60).returncode == 0
        got = subprocess.run([sys.executable, "-m", "shmemext", "get", "--name", name], capture_output=True, timeout=60)
        assert got.returncode == 0 and got.stdout == raw   # nothing added
        record = json.loads(cli("get", "--json", "--name", name).stdout)
        assert record["type"] == "bytes" and base64.b64decode(record["value"]) == raw and record["version"] == 1
        # Standard input as text ('-' or no argument), stored as str.
        assert subprocess.run([sys.executable, "-m", "shmemext", "set", "--name", name, "-"], input="multi\nline\n",
                              capture_output=True, text=True, timeout=60).returncode == 0
        assert json.loads(cli("get", "--json", "--name", name).stdout) == {"version": 2, "type": "str",
                                                                          "value": "multi\nline\n"}
        # The argument's own bytes.
        assert cli("set", "--bytes", "--name", name, "h\u00e9").returncode == 0
        record = json.loads(cli("get", "--json", "--name", name).stdout)
        assert record["type"] == "bytes" and base64.b64decode(record["value"]) == "h\u00e9".encode()
        bad = subprocess.run([sys.executable, "-m", "shmemext", "set", "--name", name], input=b"\xff",
                             capture_output=True, timeout=60)
        assert bad.returncode == 1 and b"not UTF-8 text" in bad.stderr and b"--bytes" in bad.stderr
    finally:
        hold.send_signal(signal.SIGINT)
        hold.communicate(timeout=30)


def test_watch_prints_one_json_line_per_value_and_exits_130(name):
    import shmemext

    with shmemext.Value(name) as block:
        watch = subprocess.Popen([sys.executable, "-m", "shmemext", "watch", "--name", name],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert watch.stderr.readline().startswith(f"watching block '{name}' from version 0")
            block.set("two\nlines")
            assert json.loads(watch.stdout.readline()) == {"version": 1, "type": "str", "value": "two\nlines"}
            block.set(b"\x00")
            assert json.loads(watch.stdout.readline()) == {"version": 2, "type": "bytes", "value": "AA=="}
        finally:
            watch.send_signal(signal.SIGINT)
            watch.communicate(timeout=30)
        assert watch.returncode == 130


def test_import_errors_are_one_line(name):
    for env, fragment in [({"SHMEMEXT_NAME": "../etc"}, "invalid block name '../etc'"),
                          ({"SHMEMEXT_SIZE": "lots"}, "SHMEMEXT_SIZE=lots")]:
        for command in ([sys.executable, "-m", "shmemext", "ls"], [sys.executable, "-c",
                        "import sys; sys.argv[0] = 'shmemext'; from shmemext.__main__ import main"]):
            proc = subprocess.run(command, env=dict(os.environ, **env), capture_output=True, text=True, timeout=60)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1, (command, proc.stderr)
            assert lines[0].startswith("shmemext: error: the default block cannot be mapped: ") and fragment in lines[0]
    # A program that imports shmemext still gets the exception itself.
    proc = subprocess.run([sys.executable, "-c", "import shmemext"], env=dict(os.environ, SHMEMEXT_NAME="../etc"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError" in proc.stderr


def test_set_on_an_unheld_block_says_the_value_goes_away(name):
    proc = cli("set", "--name", name, "lost")
    assert proc.returncode == 0
    assert "goes away when this command exits" in proc.stderr
    assert "hold --name" in proc.stderr and "--persist" in proc.stderr


def test_set_persist_then_unlink(name):
    import shmemext

    assert cli("set", "--persist", "--name", name, "kept").returncode == 0
    assert cli("get", "--name", name).stdout == "kept\n"
    assert json.loads(cli("info", "--json", "--name", name).stdout) == {
        "name": name, "capacity": 4096, "version": 1, "persist": True,
        "holders": None if shmemext.Value(name).holders is None else 0}
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
    assert cli("set", "--size", "lots", "x").returncode == 2
    assert cli("bench", "--rounds", "many").returncode == 2


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


def test_bench_is_a_quick_check_that_explains_itself():
    proc = cli("bench", "--rounds", "1", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for column in ("Value", "shared_memory", "copy", "vs peer", "vs copy"):
        assert f"\n  {column} " in out, column   # every column is explained
    assert "0.0x" not in out and "FAIL" not in out
    assert "not a broken install" in out
    figures = json.loads(cli("bench", "--rounds", "1", "--json", timeout=120).stdout)
    assert {(c["kind"], c["size"], c["op"]) for c in figures["copy"]} == {
        (k, n, op) for k in ("str", "bytes") for n in (16, 4096, 1 << 20) for op in ("get", "set")}
    assert figures["roundtrip_us"]["wait()"] > 0 and figures["roundtrip_us"]["Pipe"] > 0
    assert all(isinstance(t["met"], bool) for t in figures["targets"])
