"""python -m shmemext bench: a quick check of this machine and this install.

A few seconds of Value.set/get against multiprocessing.shared_memory (the
standard library's shared memory, done the fastest idiomatic way) and an
in-process copy of the same bytes, and a wait() round trip against a
multiprocessing.Pipe.  The full side-by-side suite, with every peer, size
and section, is benchmarks/run.py in the source tree.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import struct
import sys
import time
import timeit
from typing import Any, Callable

import shmemext

KiB, MiB = 1024, 1024 * 1024
SIZES = [16, 4 * KiB, 1 * MiB]
KINDS = ["str", "bytes"]
ROUNDTRIPS = 2000

COLUMNS = [
    ("Value", "shmemext.Value.set() / .get() of the payload"),
    ("shared_memory", "multiprocessing.shared_memory: an 8-byte length header and a slice copy; str through UTF-8"),
    ("copy", "the floor: one in-process copy of the same bytes (bytes(memoryview)), no sharing at all"),
    ("vs peer", "shared_memory's time over Value's: how many times faster Value is (higher is better)"),
    ("vs copy", "Value's time over the copy's (1.00 = as fast as a plain copy; lower is better)"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=7, metavar="N",
                        help="timing rounds per cell, each method once per round (default 7)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object instead")


def _payload(kind: str, size: int) -> str | bytes:
    text = ("The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:size]
    return text if kind == "str" else text.encode("ascii")


def _size_label(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB" if n >= KiB else f"{n} B"


def _ns_label(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} us"
    return f"{ns:.0f} ns"


def _ratio_label(r: float) -> str:
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def _interleaved(methods: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ns per call of each method; one round of every method after
    another, so that load on the machine hits them alike."""
    numbers = {}
    for method, fn in methods.items():   # enough calls for about 2 ms a sample
        n = 1
        while timeit.timeit(fn, number=n) < 0.002 and n < 1 << 20:
            n *= 4
        numbers[method] = n
    samples: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for method, fn in methods.items():
            samples[method].append(timeit.timeit(fn, number=numbers[method]) / numbers[method] * 1e9)
    return {m: statistics.median(s) for m, s in samples.items()}


def _copy_cell(value: shmemext.Value, shm: Any, kind: str, size: int, rounds: int) -> dict[str, dict[str, float]]:
    data = _payload(kind, size)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    view = memoryview(bytearray(raw))
    buf = shm.buf

    def shm_set() -> None:
        b = data.encode("utf-8") if isinstance(data, str) else data
        struct.pack_into("<Q", buf, 0, len(b))
        buf[8:8 + len(b)] = b

    def shm_get() -> object:
        (n,) = struct.unpack_from("<Q", buf, 0)
        b = bytes(buf[8:8 + n])
        return b.decode("utf-8") if kind == "str" else b

    value.set(data)
    shm_set()
    times = _interleaved({
        "set Value": functools.partial(value.set, data),
        "set shared_memory": shm_set,
        "get Value": value.get,
        "get shared_memory": shm_get,
        "copy": functools.partial(bytes, view),
    }, rounds)
    return {op: {"Value": times[f"{op} Value"], "shared_memory": times[f"{op} shared_memory"], "copy": times["copy"]}
            for op in ("set", "get")}


def _wait_partner(names: tuple[str, str], rounds: int) -> None:
    ping, pong = shmemext.Value(names[0]), shmemext.Value(names[1])
    seen = 0   # the blocks are new: the first ping is version 1, however late this process starts
    for n in range(rounds):
        seen = ping.wait(seen, timeout=60)
        pong.set(b"%d" % n)


def _pipe_partner(conn: Any, rounds: int) -> None:
    for _ in range(rounds):
        conn.send_bytes(conn.recv_bytes())


def wait_roundtrip_us(rounds: int) -> float:
    """Median us of a round trip between two processes: set() answered by the
    partner's set(), each side in wait().  (benchmarks/bench_wait_load.py uses it too.)"""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    names = (f"shmemext-quick-ping-{os.getpid()}", f"shmemext-quick-pong-{os.getpid()}")
    with shmemext.Value(names[0], 64) as ping, shmemext.Value(names[1], 64) as pong:
        child = ctx.Process(target=_wait_partner, args=(names, rounds))
        child.start()
        samples, seen = [], 0
        for n in range(rounds):
            t = time.perf_counter_ns()
            ping.set(b"%d" % n)
            seen = pong.wait(seen, timeout=60)
            samples.append(time.perf_counter_ns() - t)
        child.join(60)
    return statistics.median(samples) / 1e3


def pipe_roundtrip_us(rounds: int) -> float:
    """The same through a multiprocessing.Pipe."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_pipe_partner, args=(there, rounds))
    child.start()
    samples = []
    for _ in range(rounds):
        t = time.perf_counter_ns()
        here.send_bytes(b"x" * 64)
        here.recv_bytes()
        samples.append(time.perf_counter_ns() - t)
    child.join(60)
    return statistics.median(samples) / 1e3


def _targets(cells: list[dict[str, Any]], rt: dict[str, float]) -> list[tuple[bool, str]]:
    """The README's targets that these cells measure (str only: for raw bytes
    every method is one copy and the allocation of its result)."""
    def label(c: dict[str, Any]) -> str:
        return f"{c['kind']} {_size_label(c['size'])} {c['op']}"

    text = [c for c in cells if c["kind"] == "str"]
    small = [(c["peer_ratio"], label(c)) for c in text if c["size"] <= 4 * KiB]
    large = [(c["copy_ratio"], label(c)) for c in text if c["size"] >= MiB]
    lines = []
    if small:
        worst = min(small)
        lines.append((worst[0] >= 3, f"str of 16 B to 4 KiB at least 3x faster than shared_memory: worst "
                                     f"{_ratio_label(worst[0])} ({worst[1]})"))
    if large:
        worst = max(large)
        lines.append((worst[0] <= 1.25, f"str of 1 MiB within 1.25x of the copy: worst {_ratio_label(worst[0])} ({worst[1]})"))
    ratio = rt["Pipe"] / rt["wait()"]
    lines.append((ratio >= 5, f"wait() round trip at least 5x shorter than a Pipe's: {_ratio_label(ratio)}"))
    return lines


def run(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        print(f"shmemext: error: --rounds must be at least 1, not {args.rounds}", file=sys.stderr)
        return 2
    from multiprocessing import shared_memory

    name = f"shmemext-quick-{os.getpid()}"
    started = time.monotonic()
    cells: list[dict[str, Any]] = []
    with shmemext.Value(name, max(SIZES)) as value:
        shm = shared_memory.SharedMemory(create=True, size=max(SIZES) + 8)
        try:
            for kind in KINDS:
                for size in SIZES:
                    for op, t in _copy_cell(value, shm, kind, size, args.rounds).items():
                        cells.append({"kind": kind, "size": size, "op": op, "ns": t,
                                      "peer_ratio": t["shared_memory"] / t["Value"], "copy_ratio": t["Value"] / t["copy"]})
        finally:
            shm.close()
            shm.unlink()
    rt = {"wait()": wait_roundtrip_us(ROUNDTRIPS), "Pipe": pipe_roundtrip_us(ROUNDTRIPS)}
    targets = _targets(cells, rt)
    info = {"shmemext": shmemext.__version__, "python": f"{platform.python_implementation()} {platform.python_version()}",
            "platform": platform.platform(), "cpus": os.cpu_count(), "seconds": round(time.monotonic() - started, 1)}
    if args.json:
        print(json.dumps({"machine": info, "copy": cells, "roundtrip_us": rt,
                          "targets": [{"met": ok, "what": what} for ok, what in targets]}, indent=2))
        return 0
    print(f"shmemext {info['shmemext']} on {info['python']}, {info['platform']}, {info['cpus']} CPUs "
          f"({info['seconds']} s)")
    print(f"\nMedian time per call over {args.rounds} rounds, every method timed in each round. Columns:")
    for column, meaning in COLUMNS:
        print(f"  {column:<14} {meaning}")
    head = f"\n{'payload':<14}{'op':<5}{'Value':>10}{'shared_memory':>15}{'copy':>10}{'vs peer':>9}{'vs copy':>9}"
    print(head)
    print("-" * (len(head) - 1))
    for c in cells:
        t = c["ns"]
        print(f"{c['kind'] + ' ' + _size_label(c['size']):<14}{c['op']:<5}{_ns_label(t['Value']):>10}"
              f"{_ns_label(t['shared_memory']):>15}{_ns_label(t['copy']):>10}"
              f"{_ratio_label(c['peer_ratio']):>9}{_ratio_label(c['copy_ratio']):>9}")
    print(f"\nRound trip of a short value between two processes (median of {ROUNDTRIPS}): "
          f"set() + wait() {rt['wait()']:.1f} us, multiprocessing.Pipe {rt['Pipe']:.1f} us")
    print("\nWhat the benchmark suite aims at, as measured in this run. Other work on this machine moves "
          "these figures,\nso a target missed here is a hint to measure on a quiet machine "
          "(benchmarks/run.py in the source tree), not a broken install:")
    for ok, what in targets:
        print(f"  {'met' if ok else 'missed':<7} {what}")
    return 0
