"""ns per set/get through the C API (a loop inside a C consumer) next to the
same through Python calls, and an in-process memcpy of the same size.

    python benchmarks/bench_capi.py

Builds the test consumer extension (tests/cmodule) with the system compiler
against shmemext.get_include(), as a user's extension would be built.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import shmemext  # noqa: E402
import test_capi  # noqa: E402
from _timing import interleaved  # noqa: E402


def main() -> int:
    consumer = test_capi.load(test_capi.build_consumer(tempfile.mkdtemp()))
    print(f"shmemext {shmemext.__version__}, Python {sys.version.split()[0]}; median ns per call, bytes values")
    print(f"{'size':>6}  {'C set':>8} {'C get':>8} {'memcpy':>8}  {'Py set':>8} {'Py get':>8}")
    for size in (16, 4096):
        name = f"shmemext-bench-capi-{os.getpid()}-{size}"
        holder = shmemext.Value(name, size)
        runs = [consumer.bench(name, size, 1_000_000 if size == 16 else 300_000) for _ in range(5)]
        c_set, c_get, c_copy = (statistics.median(r[i] for r in runs) for i in range(3))
        data = b"x" * size
        py = interleaved({"set": lambda: holder.set(data), "get": holder.get}, 200_000, 5)
        print(f"{size:>6}  {c_set:>8.1f} {c_get:>8.1f} {c_copy:>8.1f}  {py['set']['ns']:>8.1f} {py['get']['ns']:>8.1f}")
        holder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
