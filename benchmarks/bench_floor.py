"""Value.get/set against the copy floor: the same bytes copied by CPython itself.

    python benchmarks/bench_floor.py [--runs 5] [--sizes 16,256,4K,64K,1M,16M,64M] [--kinds ...] [--cells 3] [--json FILE]

Per point (payload kind and size) three Value blocks are used in turn, each
holding its own payload, and so are three floor buffers: a call's source and
destination are warm in the caches, as in a program that moves values
around, but no point measures one line copied over itself.  A Value's two
slots make a set() touch (2 + 1) x cells x size where the floor touches
2 x cells x size: --cells moves the sizes where the first outgrows a cache
level and the second does not.  The floor is
    set: mv[:] = payload, into a memoryview of a bytearray of the same size;
    get: buf[8:8 + n], a new bytes object copied out of a bytes buffer,
which is one copy each (plus, for get, the allocation of the result, as
Value.get pays it too).  Methods are timed in rounds, in a new random order
each round.  Each run is a separate process; the table gives per cell the
median over runs of the median ratio ours / floor, and the worst run.
Targets: median ratio at most 1.15 everywhere, no run above 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import timeit

KiB, MiB = 1024, 1024 * 1024
SIZES = [16, 256, 4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB]
KINDS = ["bytes", "ascii", "latin1", "ucs2", "ucs4"]
WIDTH = {"bytes": 1, "ascii": 1, "latin1": 1, "ucs2": 2, "ucs4": 4}
CODEC = {"ascii": "ascii", "latin1": "latin-1", "ucs2": "utf-16-le", "ucs4": "utf-32-le"}
CHAR = {"ascii": "a", "latin1": "\xe9", "ucs2": "\u20ac", "ucs4": "\U0001f600"}
TARGET, WORST = 1.15, 1.3


def parse_sizes(text: str) -> list[int]:
    units = {"": 1, "K": KiB, "M": MiB}
    sizes = []
    for part in text.split(","):
        part = part.strip().upper().rstrip("B").rstrip("I")
        number, unit = (part[:-1], part[-1]) if part[-1:] in ("K", "M") else (part, "")
        sizes.append(int(number) * units[unit])
    return sizes


def payload(kind: str, size: int, variant: int) -> str | bytes:
    """`size` bytes as stored: one wide character first fixes the width, the rest varies per block."""
    units = size // WIDTH[kind]
    if kind == "bytes":
        return (bytes(range(variant, variant + 251)) * (size // 251 + 1))[:size]
    filler = "abcdefghijklmnopqrstuvwxyz"[variant::3]
    body = (filler * (units // len(filler) + 1))[: units - 1]
    return CHAR[kind] + body


def measure(kinds: list[str], sizes: list[int], rounds: int, cells: int = 3) -> list[dict]:
    import shmemext

    rows = []
    each = range(cells)
    for size in sizes:
        blocks = [shmemext.Value(f"shmemext-floor-{os.getpid()}-{i}", size) for i in each]
        try:
            for kind in kinds:
                values = [payload(kind, size, i) for i in each]
                # The floor copies the same bytes as stored (never bytes(size), whose
                # untouched pages all read one shared zero page, which is always cached).
                raws = [v.encode(CODEC[kind]) if isinstance(v, str) else v for v in values]
                for b, v in zip(blocks, values):
                    b.set(v)
                env = {f"b{i}": b for i, b in enumerate(blocks)}
                env.update({f"p{i}": v for i, v in enumerate(values)})
                env.update({f"r{i}": r for i, r in enumerate(raws)})
                env.update({f"m{i}": memoryview(bytearray(size)) for i in each})
                env.update({f"s{i}": bytes(8) + r + bytes(8) for i, r in enumerate(raws)})
                env["n"] = size
                env.update({f"get{i}": b.get for i, b in enumerate(blocks)})
                env.update({f"set{i}": b.set for i, b in enumerate(blocks)})
                stmts = {
                    "get ours": "; ".join(f"get{i}()" for i in each),
                    "get floor": "; ".join(f"s{i}[8:8 + n]" for i in each),
                    "set ours": "; ".join(f"set{i}(p{i})" for i in each),
                    "set floor": "; ".join(f"m{i}[:] = r{i}" for i in each),
                }
                timers = {m: timeit.Timer(s, globals=env) for m, s in stmts.items()}
                number = {}
                for m, t in timers.items():
                    k = 1
                    while t.timeit(k) < 0.003 and k < 1 << 20:
                        k *= 2
                    number[m] = k
                samples: dict[str, list[float]] = {m: [] for m in timers}
                order = list(timers)
                for _ in range(rounds):
                    random.shuffle(order)
                    for m in order:
                        samples[m].append(timers[m].timeit(number[m]) / number[m] / cells * 1e9)
                ns = {m: statistics.median(s) for m, s in samples.items()}
                for op in ("get", "set"):
                    rows.append({"kind": kind, "size": size, "op": op, "ours_ns": ns[f"{op} ours"],
                                 "floor_ns": ns[f"{op} floor"], "ratio": ns[f"{op} ours"] / ns[f"{op} floor"]})
        finally:
            for b in blocks:
                b.close()
    return rows


def size_label(n: int) -> str:
    for unit, name in ((MiB, "MiB"), (KiB, "KiB")):
        if n >= unit:
            return f"{n / unit:g} {name}"
    return f"{n} B"


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_floor.py", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="separate processes, each a full measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds per cell within a run (default 7)")
    parser.add_argument("--sizes", type=parse_sizes, default=SIZES)
    parser.add_argument("--kinds", type=lambda t: t.split(","), default=KINDS)
    parser.add_argument("--cells", type=int, default=3, help="Value blocks (and floor buffers) used in turn (default 3)")
    parser.add_argument("--json", metavar="FILE", help="write every run's rows as JSON")
    parser.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cells < 1:
        parser.error(f"--cells must be at least 1, not {args.cells}")
    if args.one_run:
        json.dump(measure(args.kinds, args.sizes, args.rounds, args.cells), sys.stdout)
        return 0
    runs = []
    for r in range(args.runs):
        print(f"run {r + 1} of {args.runs}...", file=sys.stderr, flush=True)
        env = dict(os.environ, SHMEMEXT_SIZE="0")   # no default block: only the measured ones
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one-run", "--rounds", str(args.rounds), "--cells", str(args.cells),
                              "--sizes", ",".join(map(str, args.sizes)), "--kinds", ",".join(args.kinds)],
                             env=env, capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    cells: dict[tuple[str, str], dict[int, list[float]]] = {}
    for run in runs:
        for row in run:
            cells.setdefault((row["op"], row["kind"]), {}).setdefault(row["size"], []).append(row["ratio"])
    print(f"ratio = Value / floor (below 1 is faster than CPython's own copy); median of {args.runs} runs, "
          f"worst run in brackets; targets: median <= {TARGET}, every run <= {WORST}")
    head = f"{'op, kind':<14}" + "".join(f"{size_label(s):>15}" for s in args.sizes)
    print(head)
    misses = []
    for (op, kind), by_size in cells.items():
        line = f"{op + ' ' + kind:<14}"
        for size in args.sizes:
            ratios = by_size[size]
            med, worst = statistics.median(ratios), max(ratios)
            mark = "*" if med > TARGET or worst > WORST else " "
            if mark == "*":
                misses.append(f"{op} {kind} {size_label(size)}: {med:.2f} ({worst:.2f})")
            line += f"{med:>8.2f} ({worst:.2f}){mark}"[-15:].rjust(15)
        print(line)
    print("targets met everywhere" if not misses else "missed (*): " + "; ".join(misses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
