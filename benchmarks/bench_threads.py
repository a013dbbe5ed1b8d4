"""Many threads calling one object against one object each (free-threaded CPython).

    python benchmarks/bench_threads.py [--runs 5] [--seconds 0.5] [--threads 1,2,4,8] [--op get]

Every call enters and leaves its object's guard (one counter of calls in
flight per object), so threads calling one Value share that counter's cache
line; threads calling a Value each share nothing.  For each thread count,
prints the calls per second of all threads together in both cases and the
ratio (shared / separate: 1.0 is scaling like separate objects), as the median
and min-max over the runs.  Meaningful on a build without the GIL and with at
least as many CPUs as threads; more threads than CPUs measure time-sharing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid

import shmemext


def calls_per_second(objects: list, op: str, seconds: float) -> float:
    """All threads start together and stop together; returns total calls / s."""
    counts = [0] * len(objects)
    go = threading.Barrier(len(objects) + 1)
    stop = threading.Event()

    def worker(i: int, obj) -> None:
        call = getattr(obj, op)
        args = ("x" * 16,) if op == "set" else ()
        go.wait()
        n = 0
        while not stop.is_set():
            for _ in range(200):
                call(*args)
            n += 200
        counts[i] = n

    threads = [threading.Thread(target=worker, args=(i, o)) for i, o in enumerate(objects)]
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--threads", default="1,2,4,8")
    parser.add_argument("--op", choices=["get", "set"], default="get")
    args = parser.parse_args()
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    print(f"{os.cpu_count()} CPUs; CPython {sys.version.split()[0]}, GIL {'on' if gil else 'off'}; Value.{args.op}()")
    tag = uuid.uuid4().hex[:8]
    counts = [int(n) for n in args.threads.split(",")]
    values = [shmemext.Value(f"bench-threads-{tag}-{i}", 64) for i in range(max(counts))]
    for v in values:
        v.set("x" * 16)
    try:
        print(f"{'threads':>7}  {'one Value, calls/s':>24}  {'a Value each, calls/s':>24}  {'shared/separate':>16}")
        for n in counts:
            shared, separate, ratio = [], [], []
            for _ in range(args.runs):
                s = calls_per_second([values[0]] * n, args.op, args.seconds)
                p = calls_per_second(values[:n], args.op, args.seconds)
                shared.append(s)
                separate.append(p)
                ratio.append(s / p)

            def cell(xs: list[float], fmt: str) -> str:
                return f"{format(statistics.median(xs), fmt)} [{format(min(xs), fmt)}-{format(max(xs), fmt)}]"

            print(f"{n:>7}  {cell([x / 1e6 for x in shared], '.2f') + ' M':>24}  "
                  f"{cell([x / 1e6 for x in separate], '.2f') + ' M':>24}  {cell(ratio, '.2f'):>16}")
    finally:
        for v in values:
            v.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
