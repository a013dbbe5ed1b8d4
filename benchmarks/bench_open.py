"""What opening and closing a block costs, beside the peers in the same run.

    python benchmarks/bench_open.py [--rounds N] [--number N] [--json FILE]

create+close: a name nobody holds, made and released each time (shmemext
Value and Segment; multiprocessing.shared_memory create + close + unlink).
attach+close: a block another handle of this process holds, joined and left.
Figures are medians in microseconds with the spread over rounds; ratios are
against multiprocessing.shared_memory measured in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
from multiprocessing import shared_memory

import shmemext
from _timing import interleaved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=300)
    parser.add_argument("--json")
    args = parser.parse_args()

    prefix = f"bench-open-{os.getpid()}"
    held = shmemext.Value(prefix + "-held")
    held_seg = shmemext.Segment(prefix + "-heldseg", 4096)

    def value_create() -> None:
        shmemext.Value(prefix + "-v").close()

    def segment_create() -> None:
        shmemext.Segment(prefix + "-s", 4096).close()

    def value_attach() -> None:
        shmemext.Value(prefix + "-held").close()

    def segment_attach() -> None:
        shmemext.Segment(prefix + "-heldseg", 1).close()

    def mp_create() -> None:
        m = shared_memory.SharedMemory(prefix + "-mp", create=True, size=8192 + 4096)
        m.close()
        m.unlink()

    mp_held = shared_memory.SharedMemory(prefix + "-mpheld", create=True, size=8192 + 4096)

    def mp_attach() -> None:
        shared_memory.SharedMemory(prefix + "-mpheld").close()

    methods = {
        "Value create+close": value_create,
        "Segment create+close": segment_create,
        "shared_memory create+unlink": mp_create,
        "Value attach+close": value_attach,
        "Segment attach+close": segment_attach,
        "shared_memory attach+close": mp_attach,
    }
    try:
        result = interleaved(methods, args.number, args.rounds)
    finally:
        held.close()
        held_seg.close()
        mp_held.close()
        mp_held.unlink()
    peer = {"create": result["shared_memory create+unlink"]["ns"], "attach": result["shared_memory attach+close"]["ns"]}
    print(f"{'operation':30} {'us':>8} {'spread':>17} {'x shared_memory':>16}")
    for method, r in result.items():
        ratio = r["ns"] / peer["create" if "create" in method else "attach"]
        print(f"{method:30} {r['ns'] / 1e3:8.1f} {r['min'] / 1e3:8.1f}-{r['max'] / 1e3:<8.1f} {ratio:15.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
