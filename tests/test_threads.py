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
