"""Segment.read/write and Segment.lock against the peers, in one interleaved run.

    python benchmarks/bench_segment.py [--rounds 5] [--json]

Peers (each the idiomatic fastest way): multiprocessing.shared_memory with
bytes(shm.buf[a:b]) and slice assignment; sysv_ipc.SharedMemory.read/write;
for the lock, posix_ipc.Semaphore acquire/release and multiprocessing.Lock.
posix_ipc and sysv_ipc come with `pip install shmemext[bench]`; a missing one
is reported, not silently skipped.  Medians; ratios are peer / shmemext.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from multiprocessing import shared_memory

import shmemext
from _timing import interleaved

SIZES = {"16 B": 16, "4 KiB": 4096, "1 MiB": 1 << 20, "64 MiB": 64 << 20}


def optional(module: str):
    try:
        return __import__(module)
    except ImportError:
        print(f"note: {module} is not installed (pip install shmemext[bench]); its column is empty", file=sys.stderr)
        return None


def measure(rounds: int) -> dict:
    sysv_ipc, posix_ipc = optional("sysv_ipc"), optional("posix_ipc")
    top = max(SIZES.values())
    name = f"shmemext-bench-seg-{os.getpid()}"
    seg = shmemext.Segment(name, top)
    shm = shared_memory.SharedMemory(create=True, size=top)
    sysv = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, size=top) if sysv_ipc else None
    sem = posix_ipc.Semaphore(f"/{name}-sem", posix_ipc.O_CREX, initial_value=1) if posix_ipc else None
    results: dict = {"copy": [], "lock": {}}
    try:
        for label, n in SIZES.items():
            data = b"x" * n
            buf = shm.buf
            methods = {
                "shmemext read": lambda n=n: seg.read(n),
                "shmemext write": lambda data=data: seg.write(data),
                "shared_memory read": lambda n=n: bytes(buf[0:n]),
                "shared_memory write": lambda data=data, n=n: buf.__setitem__(slice(0, n), data),
            }
            if sysv is not None:
                methods["sysv_ipc read"] = lambda n=n: sysv.read(n)
                methods["sysv_ipc write"] = lambda data=data: sysv.write(data)
            number = 100_000 if n <= 4096 else (200 if n <= 1 << 20 else 4)
            timing = interleaved(methods, number, rounds)
            results["copy"].append({"size": label, "timing": timing})
            del buf
        lock = seg.lock()
        mp_lock = multiprocessing.Lock()

        def shmemext_lock():
            with lock:
                pass

        def mp_lock_cycle():
            with mp_lock:
                pass

        methods = {"shmemext lock": shmemext_lock, "multiprocessing.Lock": mp_lock_cycle}
        if sem is not None:
            def sem_cycle():
                sem.acquire()
                sem.release()

            methods["posix_ipc.Semaphore"] = sem_cycle
        results["lock"] = interleaved(methods, 200_000, rounds)
    finally:
        seg.close()
        shm.close()
        shm.unlink()
        if sysv is not None:
            sysv.detach()
            sysv.remove()
        if sem is not None:
            sem.unlink()
    return results


def print_table(results: dict) -> None:
    print(f"shmemext {shmemext.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; median ns/op")
    print(f"{'payload':<9}{'op':<7}{'shmemext':>12}{'shared_memory':>15}{'x':>7}{'sysv_ipc':>12}{'x':>7}")
    for row in results["copy"]:
        t = row["timing"]
        for op in ("read", "write"):
            ours = t[f"shmemext {op}"]["ns"]
            shm = t[f"shared_memory {op}"]["ns"]
            sysv = t.get(f"sysv_ipc {op}", {}).get("ns")
            sysv_cols = f"{sysv:>12.0f}{sysv / ours:>6.1f}x" if sysv else f"{'-':>12}{'':>7}"
            print(f"{row['size']:<9}{op:<7}{ours:>12.0f}{shm:>15.0f}{shm / ours:>6.1f}x{sysv_cols}")
    lock = results["lock"]
    ours = lock["shmemext lock"]["ns"]
    print(f"\nuncontended lock + unlock (median ns): shmemext {ours:.0f}", end="")
    for peer in ("posix_ipc.Semaphore", "multiprocessing.Lock"):
        if peer in lock:
            print(f", {peer} {lock[peer]['ns']:.0f} ({lock[peer]['ns'] / ours:.1f}x)", end="")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = measure(args.rounds)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
