"""Many threads on one Value and one Segment, with threads closing them
(tests/stress/threads.py, bounded here; run it longer by hand)."""

import json
import os
import subprocess
import sys

import pytest

import shmemext

STRESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stress", "threads.py")


@pytest.mark.parametrize("seed", [1, 2])
def test_threads_calling_and_closing_at_random(seed):
    proc = subprocess.run([sys.executable, STRESS, "--seconds", "3", "--seed", str(seed)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["failures"] == [] and report["rounds"] >= 3 and report["ops"] > 1000, report


def test_close_waits_for_a_copy_in_flight_in_another_thread(name):
    """A 64 MiB set copies without the GIL; close() from another thread waits
    for it instead of unmapping under it, and the set completes."""
    import threading
    import time

    v = shmemext.Value(name, 64 << 20)
    big = b"z" * (64 << 20)
    errors = []

    def setter():
        try:
            for _ in range(20):
                v.set(big)
        except shmemext.ClosedError:
            pass
        except Exception as exc:   # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=setter)
    t.start()
    time.sleep(0.05)
    v.close()
    t.join()
    assert errors == [] and v.closed and v._inflight == 0


def test_import_keeps_the_gil_off_on_a_free_threaded_build():
    code = "import sys, shmemext; print(sys._is_gil_enabled() if hasattr(sys, '_is_gil_enabled') else 'n/a')"
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    free_threaded = bool(__import__("sysconfig").get_config_var("Py_GIL_DISABLED"))
    if free_threaded and os.environ.get("PYTHON_GIL") != "1":
        assert proc.stdout.strip() == "False", "importing shmemext turned the GIL back on"
    else:
        assert proc.stdout.strip() in ("True", "n/a")


def test_a_fork_child_closes_a_block_other_threads_were_inside(name):
    """A thread waits in wait() and another copies when the main thread forks:
    in the child those threads do not exist, so their calls never leave, and
    close() there must not wait for them."""
    import threading
    import time

    v = shmemext.Value(name, 16 << 20)
    stop = threading.Event()

    def waiter():
        while not stop.is_set():
            try:
                v.wait(timeout=0.2)
            except TimeoutError:
                pass

    def copier():
        big = b"c" * (16 << 20)
        while not stop.is_set():
            v.set(big)

    threads = [threading.Thread(target=waiter), threading.Thread(target=copier)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert v._inflight >= 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # fork() with threads running
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            start = time.monotonic()
            v.close()
            code = 0 if v.closed and time.monotonic() - start < 5 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    status = done[1]
    stop.set()
    for t in threads:
        t.join()
    v.close()
    assert done[0] != 0, "close() in the fork child hung, waiting for calls of threads it does not have"
    assert os.waitstatus_to_exitcode(status) == 0
