"""ns per get/set of the default-block API against multiprocessing.shared_memory.

    python benchmarks/bench_core.py [--rounds 7] [--json]

Measured in one run, interleaved round by round, so machine noise hits every
method alike: shmemext.get/set, the same through a Value, the
multiprocessing.shared_memory equivalent (an 8-byte length header + slice
copy, encode/decode for str), an empty C call (sys.getrecursionlimit) and an
in-process copy of the same payload (bytes(memoryview)).  Medians of the
rounds; ratios are against the shared_memory equivalent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from multiprocessing import shared_memory

os.environ.setdefault("SHMEMEXT_NAME", f"shmemext-bench-{os.getpid()}")
os.environ["SHMEMEXT_SIZE"] = str((1 << 20) + 64)

import shmemext  # noqa: E402
from _timing import interleaved  # noqa: E402

SIZES = {"16 B": 16, "4 KiB": 4096, "1 MiB": 1 << 20}


def payload(kind: str, nbytes: int) -> str | bytes:
    return b"x" * nbytes if kind == "bytes" else "x" * nbytes


def make_mp_ops(shm: shared_memory.SharedMemory, value: str | bytes):
    buf = shm.buf
    is_str = isinstance(value, str)

    def mp_set(value=value):
        data = value.encode() if is_str else value
        n = len(data)
        buf[0:8] = n.to_bytes(8, "little")
        buf[8 : 8 + n] = data

    def mp_get():
        n = int.from_bytes(buf[0:8], "little")
        data = bytes(buf[8 : 8 + n])
        return data.decode() if is_str else data

    return mp_set, mp_get


def measure(rounds: int) -> list[dict]:
    shm = shared_memory.SharedMemory(create=True, size=(1 << 20) + 64)
    value_cell = shmemext.Value(f"{os.environ['SHMEMEXT_NAME']}-value", (1 << 20) + 64)
    empty = sys.getrecursionlimit
    rows = []
    try:
        for kind in ("str", "bytes"):
            for label, nbytes in SIZES.items():
                value = payload(kind, nbytes)
                raw = value.encode() if kind == "str" else value
                view = memoryview(raw)
                mp_set, mp_get = make_mp_ops(shm, value)
                shmemext.set(value)
                value_cell.set(value)
                mp_set()
                number = 200_000 if nbytes <= 4096 else 400
                methods = {
                    "shmemext.set": lambda value=value: shmemext.set(value),
                    "shmemext.get": shmemext.get,
                    "Value.set": lambda value=value: value_cell.set(value),
                    "Value.get": value_cell.get,
                    "shared_memory set": mp_set,
                    "shared_memory get": mp_get,
                    "empty C call": empty,
                    "memcpy floor": lambda view=view: bytes(view),
                }
                timing = interleaved(methods, number, rounds)
                rows.append({"kind": kind, "size": label, "ns": {m: t["ns"] for m, t in timing.items()},
                             "spread": {m: (t["min"], t["max"]) for m, t in timing.items()}})
    finally:
        value_cell.close()
        shm.close()
        shm.unlink()
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"shmemext {shmemext.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; median ns/op")
    header = f"{'payload':<12}{'op':<6}{'shmemext':>10}{'Value':>10}{'shm equiv':>11}{'speedup':>9}{'empty C':>9}{'x empty':>9}{'memcpy':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        ns = row["ns"]
        for op in ("get", "set"):
            ours, peer = ns[f"shmemext.{op}"], ns[f"shared_memory {op}"]
            print(
                f"{row['kind'] + ' ' + row['size']:<12}{op:<6}{ours:>10.0f}{ns[f'Value.{op}']:>10.0f}{peer:>11.0f}"
                f"{peer / ours:>8.1f}x{ns['empty C call']:>9.0f}{ours / ns['empty C call']:>8.1f}x"
                f"{ns['memcpy floor']:>9.0f}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args()
    rows = measure(args.rounds)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
