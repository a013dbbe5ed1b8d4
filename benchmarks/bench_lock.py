"""What each writer lock costs a set(), measured side by side in one run.

    python benchmarks/bench_lock.py [--rounds N] [--number N]

A block private to its user (mode 0o600, the default) takes a robust
process-shared mutex in the block; one that other users may write
(mode 0o666) takes a lock the kernel keeps (an OFD lock on its name entry on
Linux), since the bytes of the block are theirs too.  Shown: Value.set of
16 B and 4 KiB, and an uncontended Segment.lock() acquire + release, in ns,
with the ratio of shared to private.
"""

from __future__ import annotations

import argparse
import os

import shmemext
from _timing import interleaved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()
    prefix = f"bench-lock-{os.getpid()}"
    blocks = {mode: (shmemext.Value(f"{prefix}-v{mode:o}", 4096, mode=mode),
                     shmemext.Segment(f"{prefix}-s{mode:o}", 4096, mode=mode)) for mode in (0o600, 0o666)}
    small, page = b"x" * 16, b"y" * 4096
    methods = {}
    for mode, (value, segment) in blocks.items():
        label = "private 0o600" if mode == 0o600 else "shared 0o666"
        lock = segment.lock()
        methods[f"set 16 B, {label}"] = lambda v=value: v.set(small)
        methods[f"set 4 KiB, {label}"] = lambda v=value: v.set(page)
        methods[f"lock+unlock, {label}"] = lambda lk=lock: (lk.acquire(), lk.release())
    try:
        result = interleaved(methods, args.number, args.rounds)
    finally:
        for value, segment in blocks.values():
            value.close()
            segment.close()
    print(f"{'operation':28} {'ns':>8} {'spread':>15} {'shared / private':>17}")
    for method, r in result.items():
        private = result[method.replace("shared 0o666", "private 0o600")]["ns"]
        print(f"{method:28} {r['ns']:8.0f} {r['min']:7.0f}-{r['max']:<7.0f} {r['ns'] / private:16.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
