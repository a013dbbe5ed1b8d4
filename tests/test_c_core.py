"""The pure-C core and POSIX backend, driven by tests/c/test_core.c without Python."""

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(sys.platform == "win32", reason="the Windows build of the driver runs under Wine in CI")
def test_c_driver(tmp_path):
    make = shutil.which("make")
    assert make, "make is needed to build tests/c"
    build = subprocess.run([make, "-C", os.path.join(HERE, "c"), f"BUILD={tmp_path}", "check"],
                           capture_output=True, text=True, timeout=300)
    print(build.stdout)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "FAIL" not in build.stdout
    summary = [line for line in build.stdout.splitlines() if line.endswith(" failed")]
    assert len(summary) == 1 and summary[0].endswith(" passed, 0 failed")
    assert int(summary[0].split()[0]) >= 50
