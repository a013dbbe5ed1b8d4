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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fuzz harness drives the POSIX backend")
def test_fuzz_corpus_and_crash_reproducers_replay_cleanly(tmp_path):
    """Every saved hostile-block input (tests/fuzz/corpus, and each crash ever
    found, kept in tests/fuzz/crashes) runs under ASan/UBSan without a report."""
    make = shutil.which("make")
    assert make, "make is needed to build tests/fuzz"
    run = subprocess.run([make, "-C", os.path.join(HERE, "fuzz"), f"BUILD={tmp_path}", "replay"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    ran = [line for line in run.stdout.splitlines() if line.endswith(" inputs ran")]
    corpus = len(os.listdir(os.path.join(HERE, "fuzz", "corpus")))
    crashes = len([n for n in os.listdir(os.path.join(HERE, "fuzz", "crashes")) if not n.startswith(".")])
    assert ran == [f"{corpus + crashes} inputs ran"], run.stdout
