"""Change notification: waiting for a new value across processes, without polling."""

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

import shmemext
from conftest import block_bytes, linux_only, python, spawn

WAITER = """
import sys, time, shmemext
v = shmemext.Value(sys.argv[1])
seen = v.version
print("ready", flush=True)
new = v.wait(seen, timeout=30)
print(new, v.get(), flush=True)
"""


def test_one_set_wakes_every_waiting_process(name):
    with shmemext.Value(name) as v:
        waiters = [spawn(WAITER, name) for _ in range(4)]
        for w in waiters:
            assert w.stdout.readline() == "ready\n"
        time.sleep(0.2)  # all of them asleep in the kernel by now
        t0 = time.monotonic()
        v.set("wake up")
        outs = [w.communicate(timeout=30)[0] for w in waiters]
        assert time.monotonic() - t0 < 5
        assert outs == ["1 wake up\n"] * 4
        assert all(w.returncode == 0 for w in waiters)


def test_wait_returns_at_once_when_the_version_already_differs(name):
    with shmemext.Value(name) as v:
        v.set("a")
        assert v.wait(0) == 1
        assert v.wait(version=12345, timeout=0) == 1
        with pytest.raises(ValueError, match="version -1 is out of range"):
            v.wait(-1)


def test_timeouts(name):
    with shmemext.Value(name) as v:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"timed out after 0.2 s waiting for a new value in Value '{name}' \(still version 0\)"):
            v.wait(timeout=0.2)
        assert 0.19 <= time.monotonic() - t0 < 2
        with pytest.raises(TimeoutError):
            v.wait(timeout=0)
        with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0"):
            v.wait(timeout=-1)
        with pytest.raises(TypeError, match=r"wait\(\) got an unexpected keyword argument 'seen'"):
            v.wait(seen=0)
        with pytest.raises(TypeError, match=r"wait\(\) argument 'timeout' must be None or a number of seconds, not str"):
            v.wait(timeout="1")
        with pytest.raises(TypeError, match=r"wait\(\) argument 'version' must be an int or None, not str"):
            v.wait("1")


def test_waiter_times_out_when_the_last_other_holder_dies(name):
    with shmemext.Value(name) as v:
        other = spawn("import sys, shmemext; v = shmemext.Value(sys.argv[1]); print('up', flush=True); sys.stdin.readline()", name)
        assert other.stdout.readline() == "up\n"
        killer = threading.Timer(0.2, other.kill)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            v.wait(timeout=1.0)
        assert 0.99 <= time.monotonic() - t0 < 3
        other.wait(timeout=30)
        other.stdout.close(), other.stdin.close(), other.stderr.close()
        v.set("still works")
        assert v.get() == "still works"


@linux_only
def test_wake_counter_wrap_around(name):

    with shmemext.Value(name) as v:
        with block_bytes(name) as memory:
            memory[200:204] = (0xFFFFFFFF).to_bytes(4, "little")   # the 32-bit word waiters sleep on
        results = []
        t = threading.Thread(target=lambda: results.append(v.wait(timeout=10)))
        t.start()
        time.sleep(0.2)
        v.set("wrapped")
        t.join(timeout=10)
        assert results == [1]
        with block_bytes(name) as memory:
            assert int.from_bytes(memory[200:204], "little") == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="the count is repaired where a wake-up says how many it woke: Linux's futex")
def test_a_killed_waiters_count_is_repaired_by_the_next_sets(name):
    with shmemext.Value(name) as v:
        doomed = spawn(WAITER, name)
        assert doomed.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 10
        while v._waiters == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # asleep in the kernel
        doomed.send_signal(signal.SIGKILL)
        doomed.communicate(timeout=30)
        assert v._waiters == 1
        for i in range(5):
            v.set(f"after {i}")
        assert v._waiters == 0
        live = [spawn(WAITER, name) for _ in range(2)]
        for w in live:
            assert w.stdout.readline() == "ready\n"
        time.sleep(0.2)
        t0 = time.monotonic()
        v.set("still heard")
        outs = [w.communicate(timeout=30)[0] for w in live]
        assert time.monotonic() - t0 < 5
        assert outs == ["6 still heard\n"] * 2
        assert v._waiters == 0


def test_an_infinite_timeout_waits_forever(name):
    with shmemext.Value(name) as v:
        threading.Timer(0.2, lambda: v.set("x")).start()
        assert v.wait(timeout=float("inf")) == 1
        threading.Timer(0.2, lambda: v.set("y")).start()
        assert v.wait(timeout=1e300) == 2


def test_the_gil_is_released_while_waiting(name):
    with shmemext.Value(name) as v:
        ticks = []
        stop = threading.Event()

        def ticker():
            while not stop.is_set():
                ticks.append(1)
                time.sleep(0.001)

        t = threading.Thread(target=ticker)
        t.start()
        with pytest.raises(TimeoutError):
            v.wait(timeout=0.3)
        stop.set()
        t.join()
        assert len(ticks) > 50


def test_ctrl_c_interrupts_a_wait_promptly(name):
    script = """
    import os, signal, sys, threading, time, shmemext
    v = shmemext.Value(sys.argv[1])
    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    try:
        v.wait()
    except KeyboardInterrupt:
        print(f"interrupted {time.monotonic() - t0 < 1.5}")
    """
    assert python(script, name).stdout == "interrupted True\n"


def test_module_level_wait_uses_the_default_block():
    seen = shmemext.default.version
    threading.Timer(0.1, lambda: shmemext.set("tick")).start()
    assert shmemext.wait(seen, timeout=10) == seen + 1


def test_watch_prints_each_new_value(name):
    with shmemext.Value(name) as v:
        watch = subprocess.Popen([sys.executable, "-m", "shmemext", "watch", "--name", name],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert "watching block" in watch.stderr.readline()
            for n, text in enumerate(("one", "two", "three"), 1):
                v.set(text)
                assert json.loads(watch.stdout.readline()) == {"version": n, "type": "str", "value": text}
                time.sleep(0.05)
        finally:
            watch.send_signal(signal.SIGINT)
            watch.communicate(timeout=30)
        assert watch.returncode == 130
