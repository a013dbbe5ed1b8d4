"""Never torn: concurrent writers and readers, and writers killed mid-set."""

import importlib.util
import os
import signal
import sys
import time

import pytest

import shmemext
from conftest import TEST_PREFIX, block_bytes, linux_only, spawn

_spec = importlib.util.spec_from_file_location(
    "torn_reads", os.path.join(os.path.dirname(__file__), "stress", "torn_reads.py")
)
torn_reads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torn_reads)


def test_stress_values_check_themselves():
    import random

    rng = random.Random(1)
    for _ in range(200):
        value = torn_reads.make_value(rng, 4096)
        assert torn_reads.check_value(value)
        # A value with part of another one's body must fail its checksum.
        other = torn_reads.make_value(rng, 4096)
        if type(other) is type(value) and len(value) > 20 and len(other) > 20 and value[12:] != other[12:]:
            assert not torn_reads.check_value(value[:12] + other[12:])
    assert not torn_reads.check_value("00000000" + "x")


def test_no_torn_reads_under_concurrent_writers(name):
    totals = torn_reads.run(name, seconds=3.0, writers=2, readers=2, capacity=16 * 1024)
    assert totals["failed_workers"] == 0
    assert totals["bad"] == 0, totals
    assert totals["reads"] > 1000 and totals["sets"] > 1000, totals
    assert totals["version"] == totals["sets"]


BIG_WRITER = """
import sys, shmemext
v = shmemext.Value(sys.argv[1], int(sys.argv[2]))
values = [bytes([k]) * int(sys.argv[2]) for k in (1, 2)]
print("writing", flush=True)
k = 0
while True:
    v.set(values[k & 1])
    k += 1
"""


@linux_only
def test_writer_killed_mid_set_leaves_a_whole_value_and_a_usable_lock(name):
    size = 256 << 20
    with shmemext.Value(name, size) as v:
        v.set("before")
        mid_write = 0
        for attempt in range(3):
            writer = spawn(BIG_WRITER, name, str(size))
            assert writer.stdout.readline() == "writing\n"
            time.sleep(0.15 + 0.05 * attempt)  # inside one of its 256 MiB copies, most likely
            start_version = v.version
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
            writer.stdout.close(), writer.stdin.close(), writer.stderr.close()

            version = v.version
            mid_write += _slot_seq(name, (version + 1) & 1) % 2 == 1
            got = v.get()
            if isinstance(got, str):
                assert got == "before"
            else:
                assert len(got) == size and got.count(got[:1]) == size, "a whole committed value"
            assert version >= start_version

            t0 = time.monotonic()
            v.set("after the crash")
            assert time.monotonic() - t0 < 1.0, "the next set() gets the dead writer's lock promptly"
            assert v.get() == "after the crash"
            v.set("before")
        assert mid_write >= 1, "at least one writer died in the middle of a set()"


def _slot_seq(block, index):
    """The sequence counter of a slot, read from the block's bytes (odd: a write never finished)."""
    with block_bytes(block) as memory:
        return int.from_bytes(memory[256 + 64 * index : 264 + 64 * index], "little")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the soak reads /proc and /dev/shm (Linux)")
def test_fault_injection_soak_holds_every_invariant():
    """A short run of tests/stress/soak.py (CI runs it longer, and
    CONTRIBUTING.md says how to run it for an hour): workers of every role
    killed in every way about ten times a second and replaced; nothing torn
    or foreign read, nothing stuck past the bound, no undocumented exception,
    every death in a lock told, and nothing of the run left at the end."""
    import json
    import subprocess

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stress", "soak.py")
    proc = subprocess.run([sys.executable, script, "--seconds", "15", "--json", "--prefix", f"{TEST_PREFIX}-soak"],
                          capture_output=True, text=True, timeout=600)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], (report, proc.stderr[-2000:])
    assert report["kills_total"] >= 60, report["kills"]
    assert all(report["kills"][kind] > 0 for kind in report["kills"]), report["kills"]
    assert report["sets"] > 0 and report["reads"] > 0 and report["records_written"] > 0
    assert report.get("forks", 0) > 0 and report.get("wakeups", 0) > 0 and report.get("async_wakeups", 0) > 0
