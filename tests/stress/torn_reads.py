"""Torn-read stress: writer processes commit checksummed values of random
lengths (1 byte up to the capacity; str of every PEP 393 kind, and bytes)
while reader processes verify every get().  Any torn, mixed or invented
value fails its checksum.

    python tests/stress/torn_reads.py --seconds 300 --writers 2 --readers 4

Prints one JSON line of totals and exits 1 on any bad read.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import zlib

ALPHABETS = {
    "ascii": "abcdefghijklmnopqrstuvwxyz0123456789",
    "latin1": "ab\xe9\xff\xc0",
    "ucs2": "ab\xe9\u20ac\u0100\uffff",
    "ucs4": "a\xe9\u20ac\U0001f600\U0010ffff",
}
WIDTH = {"ascii": 1, "latin1": 1, "ucs2": 2, "ucs4": 4}


def _crc_text(body: str) -> int:
    return zlib.crc32(body.encode("utf-32-le"))


def make_value(rng: random.Random, capacity: int) -> str | bytes:
    kind = rng.choice(["bytes", "ascii", "latin1", "ucs2", "ucs4"])
    if kind == "bytes":
        body = rng.randbytes(rng.randint(0, capacity - 4))
        return zlib.crc32(body).to_bytes(4, "little") + body
    alphabet = ALPHABETS[kind]
    units = rng.randint(9, max(9, capacity // WIDTH[kind]))
    # The widest character first, so the str really is of this kind.
    body = alphabet[-1] + "".join(rng.choices(alphabet, k=units - 9))
    return f"{_crc_text(body):08x}" + body


def check_value(value: str | bytes) -> bool:
    if isinstance(value, bytes):
        return len(value) >= 4 and int.from_bytes(value[:4], "little") == zlib.crc32(value[4:])
    try:
        return len(value) >= 9 and int(value[:8], 16) == _crc_text(value[8:])
    except ValueError:
        return False


def writer(name: str, capacity: int, seconds: float, seed: int) -> dict:
    import shmemext

    rng = random.Random(seed)
    pool = [make_value(rng, capacity) for _ in range(48)]
    pool.append(b"\x00\x00\x00\x00")  # the one-byte-ish extreme: an empty body
    v = shmemext.Value(name, capacity)
    sets = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for value in pool:
            v.set(value)
        sets += len(pool)
    return {"sets": sets}


def reader(name: str, capacity: int, seconds: float, seed: int) -> dict:
    import shmemext

    v = shmemext.Value(name, capacity)
    reads = bad = empty = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(64):
            value = v.get()
            reads += 1
            if value == "":
                empty += 1
                if reads > empty:  # "" only before the first set, never after a value
                    bad += 1
                continue
            if not check_value(value):
                bad += 1
                if bad <= 3:
                    print(f"bad read: {type(value).__name__} of {len(value)}: {value[:40]!r}", file=sys.stderr)
    return {"reads": reads, "bad": bad, "empty": empty}


def run(name: str, seconds: float, writers: int, readers: int, capacity: int) -> dict:
    """Runs the stress in separate processes and returns the totals."""
    import shmemext

    holder = shmemext.Value(name, capacity)  # keeps the block for the whole run
    procs = []
    for i in range(writers + readers):
        role = "writer" if i < writers else "reader"
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", role, "--name", name, "--capacity", str(capacity),
                 "--seconds", str(seconds), "--seed", str(i)],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    totals = {"sets": 0, "reads": 0, "bad": 0, "empty": 0, "failed_workers": 0}
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 120)
        if p.returncode != 0:
            totals["failed_workers"] += 1
            continue
        for key, value in json.loads(out).items():
            totals[key] = totals.get(key, 0) + value
    totals["version"] = holder.version
    holder.close()
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=64 * 1024)
    parser.add_argument("--name", default=f"shmemext-stress-{os.getpid()}")
    parser.add_argument("--worker", choices=["writer", "reader"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work = writer if args.worker == "writer" else reader
        print(json.dumps(work(args.name, args.capacity, args.seconds, args.seed)))
        return 0
    totals = run(args.name, args.seconds, args.writers, args.readers, args.capacity)
    print(json.dumps(totals))
    return 0 if totals["bad"] == 0 and totals["failed_workers"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
