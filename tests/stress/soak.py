"""Soak: writers and readers on one value cell for N minutes while random
workers are SIGKILLed (writers too, so some die inside set() holding the
lock) and replaced.  At the end every worker is stopped and the run checks:
no torn value was ever read, and the block is gone from /dev/shm.

    python tests/stress/soak.py --minutes 10 [--writers 2 --readers 3 --kill-every 0.5]

Prints the totals as JSON and exits 1 on any bad read or leftover.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from torn_reads import check_value, make_value  # noqa: E402


def work(role: str, name: str, capacity: int, seed: int, log: str) -> None:
    """Runs until SIGTERM (a clean exit) or SIGKILL; appends cumulative counts
    to `log` about every 0.2 s, and every bad read at once."""
    import shmemext

    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    rng = random.Random(seed)
    v = shmemext.Value(name, capacity)
    sets = reads = bad = 0
    pool = [make_value(rng, capacity) for _ in range(32)] if role == "writer" else []
    with open(log, "a", buffering=1) as out:
        next_report = time.monotonic() + 0.2
        while not stop:
            if role == "writer":
                for value in pool:
                    v.set(value)
                sets += len(pool)
            else:
                for _ in range(64):
                    value = v.get()
                    reads += 1
                    if value != "" and not check_value(value):
                        bad += 1
                        out.write(f"BAD {type(value).__name__} {len(value)} {value[:40]!r}\n")
            if time.monotonic() >= next_report:
                out.write(json.dumps({"sets": sets, "reads": reads, "bad": bad}) + "\n")
                next_report = time.monotonic() + 0.2
        out.write(json.dumps({"sets": sets, "reads": reads, "bad": bad}) + "\n")
    v.close()


def totals_from(log: str) -> dict:
    last, bad_lines = {"sets": 0, "reads": 0, "bad": 0}, 0
    with open(log) as f:
        for line in f:
            if line.startswith("BAD "):
                bad_lines += 1
                continue
            try:
                last = json.loads(line)
            except ValueError:
                pass   # a line cut short by SIGKILL
    last["bad"] = max(last["bad"], bad_lines)
    return last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--capacity", type=int, default=64 * 1024)
    parser.add_argument("--kill-every", type=float, default=0.5, help="seconds between SIGKILLs")
    parser.add_argument("--name", default=f"shmemext-soak-{os.getpid()}")
    parser.add_argument("--worker", nargs=3, metavar=("ROLE", "SEED", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        role, seed, log = args.worker
        work(role, args.name, args.capacity, int(seed), log)
        return 0

    logs = tempfile.mkdtemp(prefix="shmemext-soak-")
    rng = random.Random(1)
    seeds = iter(range(1_000_000))
    started = {"writer": 0, "reader": 0}

    def start(role: str) -> tuple[str, subprocess.Popen]:
        seed = next(seeds)
        started[role] += 1
        log = os.path.join(logs, f"{role}-{seed}.log")
        cmd = [sys.executable, __file__, "--name", args.name, "--capacity", str(args.capacity),
               "--worker", role, str(seed), log]
        return log, subprocess.Popen(cmd)

    workers = [(role, *start(role)) for role in ["writer"] * args.writers + ["reader"] * args.readers]
    kills = {"writer": 0, "reader": 0}
    deadline = time.monotonic() + args.minutes * 60
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0, 2 * args.kill_every))
        i = rng.randrange(len(workers))
        role, log, proc = workers[i]
        proc.kill()
        proc.wait()
        kills[role] += 1
        workers[i] = (role, *start(role))
    for _, _, proc in workers:
        proc.send_signal(signal.SIGTERM)
    stuck = 0
    for _, _, proc in workers:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            stuck += 1
            proc.kill()
    totals = {"sets": 0, "reads": 0, "bad": 0}
    for entry in os.listdir(logs):
        for key, value in totals_from(os.path.join(logs, entry)).items():
            totals[key] += value
    shutil.rmtree(logs, ignore_errors=True)
    leftover = os.path.exists(f"/dev/shm/{args.name}")
    report = {"minutes": args.minutes, **totals, "started": started, "killed": kills,
              "workers_that_would_not_stop": stuck, "block_left_in_dev_shm": leftover}
    print(json.dumps(report))
    return 0 if totals["bad"] == 0 and not leftover and stuck == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
