"""The benchmark suite: shmemext against what a user would pick instead, in one run.

    python benchmarks/run.py [--quick] [--json FILE] [--plot FILE] [--no-redis]

(python -m shmemext bench is a much smaller check of an installed package:
shmemext/_quick.py.)

Sections, each measured interleaved (one round of every method, then the
next round) so that noise on a shared machine hits all methods alike:

copy      get/set of one value: shmemext.set/get, Value, Segment.write/read
          (bytes), and the peers done the idiomatic fastest way: an 8-byte
          length header (struct) plus a slice copy on
          multiprocessing.shared_memory, on mmap of a /dev/shm file and on a
          posix_ipc block, sysv_ipc read/write, and a local Redis; str goes
          through UTF-8 encode/decode for all of them.  Floors: an empty C
          call, an in-process copy of the same size (bytes(memoryview)) and
          the cheapest codec that builds the same str.
scaling   gets per second with 1, 2, 4, 8 reader processes on one value
          while one writer process sets it without pause; get latency and
          the retries the readers needed.
roundtrip a 64-byte value ping-ponged between two processes.
lock      an uncontended lock/unlock.

Medians of the rounds; spreads are min..max.  Ratios are against the fastest
peer of the same cell.  The measuring process uses a default block of its own
(never the user's).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import mmap
import multiprocessing
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import timeit
from multiprocessing import shared_memory
from typing import Any, Callable

import shmemext

KiB, MiB = 1024, 1024 * 1024
SIZES = [16, 256, 4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB]
QUICK_SIZES = [16, 4 * KiB, 1 * MiB]
KINDS = ["ascii", "latin1", "ucs2", "ucs4", "bytes"]
QUICK_KINDS = ["ascii", "ucs2", "bytes"]
WIDTH = {"ascii": 1, "latin1": 1, "ucs2": 2, "ucs4": 4, "bytes": 1}
# Text whose first character fixes the PEP 393 width even in the shortest payload.
PATTERN = {
    "ascii": "The quick brown fox jumps over the lazy dog. ",
    "latin1": "\xe9t\xe9: caf\xe9 cr\xe8me, d\xe9j\xe0 vu, na\xefve fa\xe7ade. ",
    "ucs2": "\u20ac 5 \u0426\u0435\u043d\u0430 \u6771\u4eac text ",
    "ucs4": "\U0001f600 rocket \U0001f680 and text ",
}
CHEAPEST_CODEC = {"ascii": "ascii", "latin1": "latin-1", "ucs2": "utf-16-le", "ucs4": "utf-32-le"}
HEADER = struct.Struct("<Q")
PEERS = ["shared_memory", "mmap", "posix_ipc", "sysv_ipc", "redis"]
OURS = ["shmemext", "Value", "Segment"]
FLOORS = ["empty C call", "memcpy", "codec"]


def payload(kind: str, nbytes: int) -> str | bytes:
    """nbytes as stored: nbytes // width characters for str."""
    if kind == "bytes":
        return bytes(range(256)) * (nbytes // 256) + bytes(range(nbytes % 256))
    chars = nbytes // WIDTH[kind]
    pattern = PATTERN[kind]
    return (pattern * (chars // len(pattern) + 1))[:chars]


def size_label(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB" if n >= KiB else f"{n} B"


def fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            value = ns / scale
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return f"{ns:.0f}ns"


class Progress:
    """One line per step on stderr, with an estimate of the time left."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.start = time.monotonic()
        self.weight_done = 0.0

    def step(self, what: str, weight_done: float, weight_total: float) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.start
        left = ""
        if weight_done > 0:
            left = f", about {elapsed / weight_done * (weight_total - weight_done):.0f}s left"
        print(f"[{elapsed:5.0f}s] {what}{left}", file=sys.stderr, flush=True)


MIN_CALLS = 5


def interleaved(methods: dict[str, Callable[[], object]], rounds: int, sample_s: float) -> dict[str, dict[str, float]]:
    """Calibrates each method to about sample_s a sample (at least MIN_CALLS
    calls, so that the first call of a sample, which finds the caches full of
    the previous method's data, does not dominate it), then times `rounds`
    rounds of all of them, one method after another in each round."""
    numbers = {}
    for name, fn in methods.items():
        fn()   # one-time costs (first touch of pages) are not what is measured
        number, took = 1, 0.0
        while True:
            took = timeit.timeit(fn, number=number)
            if took >= sample_s / 5 or number >= 1 << 24:
                break
            number *= 4
        numbers[name] = max(MIN_CALLS, int(number * sample_s / max(took, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            samples[name].append(timeit.timeit(fn, number=numbers[name]) / numbers[name] * 1e9)
    return {
        name: {"ns": statistics.median(s), "min": min(s), "max": max(s), "number": numbers[name]}
        for name, s in samples.items()
    }


# ---- peers -----------------------------------------------------------------


def optional_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def header_ops(buf: Any, value: str | bytes, slice_read: Callable[[int], bytes]) -> tuple[Callable[[], None], Callable[[], object]]:
    """set/get of a length-prefixed value in a writable buffer, str as UTF-8."""
    is_str = isinstance(value, str)
    pack, unpack = HEADER.pack_into, HEADER.unpack_from

    if is_str:
        def set_str(value: str = value) -> None:  # type: ignore[assignment]
            data = value.encode()
            pack(buf, 0, len(data))
            buf[8 : 8 + len(data)] = data

        def get_str() -> str:
            return slice_read(unpack(buf, 0)[0]).decode()

        return set_str, get_str

    def set_bytes(data: bytes = value) -> None:  # type: ignore[assignment]
        pack(buf, 0, len(data))
        buf[8 : 8 + len(data)] = data

    def get_bytes() -> bytes:
        return slice_read(unpack(buf, 0)[0])

    return set_bytes, get_bytes


class SharedMemoryPeer:
    name = "shared_memory"

    def __init__(self, capacity: int) -> None:
        self.shm = shared_memory.SharedMemory(create=True, size=capacity + 8)
        self.buf: memoryview = self.shm.buf  # type: ignore[assignment]  # None only after close()

    def ops(self, value: str | bytes) -> tuple[Callable[[], None], Callable[[], object]]:
        buf = self.buf
        return header_ops(buf, value, lambda n: bytes(buf[8 : 8 + n]))

    def close(self) -> None:
        del self.buf
        self.shm.close()
        self.shm.unlink()


class MmapPeer:
    """mmap of a file in /dev/shm (or the temp dir where there is none)."""

    name = "mmap"

    def __init__(self, capacity: int) -> None:
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self.path = tempfile.mkstemp(prefix="shmemext-bench-", dir=where)
        try:
            os.ftruncate(fd, capacity + 8)
            self.map = mmap.mmap(fd, capacity + 8)
        finally:
            os.close(fd)

    def ops(self, value: str | bytes) -> tuple[Callable[[], None], Callable[[], object]]:
        m = self.map
        return header_ops(m, value, lambda n: m[8 : 8 + n])

    def close(self) -> None:
        self.map.close()
        os.unlink(self.path)


class PosixIpcPeer(MmapPeer):
    name = "posix_ipc"

    def __init__(self, capacity: int) -> None:
        posix_ipc = importlib.import_module("posix_ipc")

        self.shm = posix_ipc.SharedMemory(f"/shmemext-bench-{os.getpid()}", posix_ipc.O_CREX, size=capacity + 8)
        self.map = mmap.mmap(self.shm.fd, capacity + 8)
        self.shm.close_fd()

    def close(self) -> None:
        self.map.close()
        self.shm.unlink()


class SysvIpcPeer:
    name = "sysv_ipc"

    def __init__(self, capacity: int) -> None:
        sysv_ipc = importlib.import_module("sysv_ipc")

        self.shm = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, size=capacity + 8)

    def ops(self, value: str | bytes) -> tuple[Callable[[], None], Callable[[], object]]:
        write, read = self.shm.write, self.shm.read
        pack, unpack = HEADER.pack, HEADER.unpack

        def set_() -> None:
            raw = value.encode() if isinstance(value, str) else value
            write(pack(len(raw)), 0)
            write(raw, 8)

        def get_() -> object:
            raw = read(unpack(read(8, 0))[0], 8)
            return raw.decode() if isinstance(value, str) else raw

        return set_, get_

    def close(self) -> None:
        self.shm.detach()
        self.shm.remove()


class RedisServer:
    """A throwaway redis-server on loopback, started and stopped here."""

    def __init__(self) -> None:
        redis = importlib.import_module("redis")

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--proto-max-bulk-len", "1gb"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class RedisPeer:
    name = "redis"

    def __init__(self, server: RedisServer) -> None:
        self.client = server.client

    def ops(self, value: str | bytes) -> tuple[Callable[[], None], Callable[[], object]]:
        client, key, is_str = self.client, "shmemext-bench", isinstance(value, str)
        return (
            functools.partial(client.set, key, value),
            (lambda: client.get(key).decode()) if is_str else functools.partial(client.get, key),
        )

    def close(self) -> None:
        self.client.delete("shmemext-bench")


def available_peers(use_redis: bool) -> tuple[list[str], dict[str, str]]:
    """The peers present here, and why each missing one is missing."""
    present, missing = ["shared_memory", "mmap"], {}
    for name in ("posix_ipc", "sysv_ipc"):
        if optional_module(name) is None:
            missing[name] = "not installed (pip install 'shmemext[bench]')"
        else:
            present.append(name)
    if not use_redis:
        missing["redis"] = "left out (--no-redis)"
    elif shutil.which("redis-server") is None:
        missing["redis"] = "no redis-server on PATH (apt-get install redis-server)"
    elif optional_module("redis") is None:
        missing["redis"] = "the redis client is not installed (pip install 'shmemext[bench]')"
    else:
        present.append("redis")
    return present, missing


# ---- the copy grid -----------------------------------------------------------


def measure_copy(sizes: list[int], kinds: list[str], peers: list[str], rounds: int, sample_s: float,
                 progress: Any) -> list[dict[str, Any]]:
    capacity = max(sizes)
    utf8_capacity = 2 * capacity   # UTF-8 takes up to twice the bytes of Latin-1 (1.5x of UCS-2)
    tag = f"shmemext-bench-{os.getpid()}"
    value_cell = shmemext.Value(f"{tag}-value", capacity)
    segment = shmemext.Segment(f"{tag}-segment", capacity)
    redis_server = RedisServer() if "redis" in peers else None
    opened: dict[str, Any] = {}
    factories: dict[str, Callable[[], Any]] = {
        "shared_memory": lambda: SharedMemoryPeer(utf8_capacity),
        "mmap": lambda: MmapPeer(utf8_capacity),
        "posix_ipc": lambda: PosixIpcPeer(utf8_capacity),
        "sysv_ipc": lambda: SysvIpcPeer(utf8_capacity),
        "redis": lambda: RedisPeer(redis_server),  # type: ignore[arg-type]
    }
    rows = []
    cells = [(kind, size) for kind in kinds for size in sizes]
    weights = [1.0 + size / MiB for _, size in cells]
    try:
        for name in peers:
            opened[name] = factories[name]()
        for i, (kind, size) in enumerate(cells):
            progress.step(f"copy {i + 1}/{len(cells)}: {kind} {size_label(size)}", sum(weights[:i]), sum(weights))
            value = payload(kind, size)
            raw = value if isinstance(value, bytes) else value.encode(CHEAPEST_CODEC[kind])
            view = memoryview(raw)
            methods: dict[str, Callable[[], object]] = {
                "set shmemext": functools.partial(shmemext.set, value),
                "get shmemext": shmemext.get,
                "set Value": functools.partial(value_cell.set, value),
                "get Value": value_cell.get,
            }
            if kind == "bytes":
                methods["set Segment"] = functools.partial(segment.write, raw)
                methods["get Segment"] = functools.partial(segment.read, size)
            for name in peers:
                set_op, get_op = opened[name].ops(value)
                set_op()
                methods[f"set {name}"] = set_op
                methods[f"get {name}"] = get_op
            methods["empty C call"] = sys.getrecursionlimit
            methods["memcpy"] = functools.partial(bytes, view)
            if kind != "bytes":
                methods["codec"] = functools.partial(raw.decode, CHEAPEST_CODEC[kind])
            shmemext.set(value)
            value_cell.set(value)
            segment.write(raw)
            for name, fn in methods.items():
                if name.startswith("get "):
                    got = fn()
                    if got != value:
                        raise AssertionError(f"{name} returned a different {kind} value of {size} bytes")
            heavy = size >= 16 * MiB
            if i == 0:
                # Discarded: the first cells of a fresh process measured slow on
                # every method here (the machine settling), so the first one
                # runs for a while before anything counts.
                settle_until = time.monotonic() + (0.5 if sample_s < 0.005 else 3.0)
                while time.monotonic() < settle_until:
                    interleaved(methods, 1, sample_s)
            timing = interleaved(methods, max(3, rounds // 2) if heavy else rounds, sample_s)
            rows.append({"kind": kind, "size": size, "timing": timing})
    finally:
        for peer in opened.values():
            peer.close()
        if redis_server is not None:
            redis_server.close()
        value_cell.close()
        segment.close()
    return rows


def best_peer(timing: dict[str, dict[str, float]], op: str, peers: list[str]) -> tuple[str, float] | None:
    found = [(timing[f"{op} {p}"]["ns"], p) for p in peers if f"{op} {p}" in timing]
    if not found:
        return None
    ns, name = min(found)
    return name, ns


def print_copy(rows: list[dict[str, Any]], peers: list[str], out: Any) -> None:
    columns = OURS + peers + ["memcpy", "codec"]
    print("\n## copy: median time per call (spread of shmemext: min..max of the rounds)", file=out)
    head = f"{'payload':<15}{'op':<4}" + "".join(f"{c:>14}" for c in columns) + f"{'vs best peer':>22}{'x empty C':>10}{'spread':>17}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for row in rows:
        t = row["timing"]
        for op in ("get", "set"):
            cells = []
            for c in columns:
                key = f"{op} {c}" if c in OURS or c in peers else c
                cells.append(fmt_ns(t[key]["ns"]) if key in t else "-")
            ours = t[f"{op} shmemext"]
            best = best_peer(t, op, peers)
            ratio = f"{best[1] / ours['ns']:.1f}x {best[0]}" if best else "-"
            spread = f"{fmt_ns(ours['min'])}..{fmt_ns(ours['max'])}"
            print(f"{row['kind'] + ' ' + size_label(row['size']):<15}{op:<4}" + "".join(f"{c:>14}" for c in cells)
                  + f"{ratio:>22}{ours['ns'] / t['empty C call']['ns']:>9.1f}x{spread:>17}", file=out)


# ---- scaling -----------------------------------------------------------------


def scaling_writer(name: str, start: Any, stop: Any, counts: Any) -> None:
    v = shmemext.Value(name)
    a, b = payload("ascii", 256), payload("ascii", 256)[::-1]
    start.wait()
    n = 0
    while not stop.is_set():
        for _ in range(1000):
            v.set(a)
            v.set(b)
        n += 2000
    counts.put(("writer", n, 0, 0, []))
    v.close()


def scaling_reader(name: str, seconds: float, start: Any, counts: Any) -> None:
    v = shmemext.Value(name)
    get, clock = v.get, time.perf_counter_ns
    valid = {payload("ascii", 256), payload("ascii", 256)[::-1]}
    start.wait()
    n, batch, batches, torn = 0, 200, [], 0
    deadline = clock() + int(seconds * 1e9)
    while True:
        t0 = clock()
        for _ in range(batch):
            got = get()
        t1 = clock()
        torn += got not in valid
        batches.append((t1 - t0) / batch)
        n += batch
        if t1 > deadline:
            break
    retries, locked = v._read_stats()
    counts.put(("reader", n, retries, locked, batches, torn))
    v.close()


def measure_scaling(reader_counts: list[int], seconds: float, progress: Any) -> list[dict[str, Any]]:
    ctx: Any = multiprocessing.get_context("spawn")
    name = f"shmemext-bench-{os.getpid()}-scaling"
    holder = shmemext.Value(name, 4096)
    holder.set(payload("ascii", 256))
    rows = []
    try:
        for i, readers in enumerate(reader_counts):
            progress.step(f"scaling: {readers} reader(s) and 1 writer", i, len(reader_counts))
            start, stop, counts = ctx.Event(), ctx.Event(), ctx.Queue()
            procs = [ctx.Process(target=scaling_reader, args=(name, seconds, start, counts)) for _ in range(readers)]
            writer = ctx.Process(target=scaling_writer, args=(name, start, stop, counts))
            for p in procs + [writer]:
                p.start()
            time.sleep(0.3 + 0.1 * readers)   # let every process import and open the block
            t0 = time.perf_counter()
            start.set()
            results = [counts.get(timeout=seconds + 60) for _ in procs]
            wall = time.perf_counter() - t0
            stop.set()
            writer_result = counts.get(timeout=60)
            for p in procs + [writer]:
                p.join(60)
            gets = sum(r[1] for r in results)
            lat = sorted(x for r in results for x in r[4])
            rows.append({
                "readers": readers,
                "gets_per_s": gets / wall,
                "per_reader_per_s": gets / wall / readers,
                "sets_per_s": writer_result[1] / wall,
                "get_ns_median": statistics.median(lat),
                "get_ns_p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                "retries_per_1000": 1000 * sum(r[2] for r in results) / max(gets, 1),
                "locked_reads": sum(r[3] for r in results),
                "torn": sum(r[5] for r in results),
            })
    finally:
        holder.close()
    return rows


def print_scaling(rows: list[dict[str, Any]], out: Any) -> None:
    cpus = os.cpu_count() or 1
    print("\n## scaling: 256-byte str, readers calling get() while one writer calls set() without pause", file=out)
    if cpus < 9:
        print(f"   ({cpus} CPUs here: with more than {max(cpus - 1, 1)} reader(s) the processes share cores, "
              f"so the totals show time-slicing, not the protocol)", file=out)
    head = f"{'readers':>8}{'gets/s':>13}{'per reader':>13}{'writer sets/s':>15}{'get median':>12}{'get p99':>10}{'retries/1000':>14}{'locked':>8}{'torn':>6}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        print(f"{r['readers']:>8}{r['gets_per_s']:>13,.0f}{r['per_reader_per_s']:>13,.0f}{r['sets_per_s']:>15,.0f}"
              f"{fmt_ns(r['get_ns_median']):>12}{fmt_ns(r['get_ns_p99']):>10}{r['retries_per_1000']:>14.2f}"
              f"{r['locked_reads']:>8}{r['torn']:>6}", file=out)


# ---- round trips --------------------------------------------------------------

PING = b"p" * 64


def rt_shmemext_poll(role: str, names: tuple[str, str], rounds: int, conn: Any) -> list[int]:
    mine, theirs = (shmemext.Value(n) for n in (names if role == "a" else names[::-1]))
    seen = theirs.version
    times = []
    if role == "a":
        conn.recv()
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            mine.set(PING)
            while theirs.version == seen:
                pass
            seen += 1
            theirs.get()
            times.append(time.perf_counter_ns() - t0)
    else:
        conn.send(True)
        for _ in range(rounds):
            while theirs.version == seen:
                pass
            seen += 1
            mine.set(theirs.get())
    mine.close()
    theirs.close()
    return times


def rt_shmemext_wait(role: str, names: tuple[str, str], rounds: int, conn: Any) -> list[int]:
    mine, theirs = (shmemext.Value(n) for n in (names if role == "a" else names[::-1]))
    seen = theirs.version
    times = []
    if role == "a":
        conn.recv()
        time.sleep(0.05)
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            mine.set(PING)
            seen = theirs.wait(seen)
            theirs.get()
            times.append(time.perf_counter_ns() - t0)
    else:
        conn.send(True)
        for _ in range(rounds):
            seen = theirs.wait(seen)
            mine.set(theirs.get())
    mine.close()
    theirs.close()
    return times


def rt_shared_memory_poll(role: str, names: tuple[str, str], rounds: int, conn: Any) -> list[int]:
    """A counter and a length in front of the payload, per direction; polled."""
    blocks = [shared_memory.SharedMemory(n) for n in (names if role == "a" else names[::-1])]
    mine: memoryview = blocks[0].buf  # type: ignore[assignment]  # None only after close()
    theirs: memoryview = blocks[1].buf  # type: ignore[assignment]
    unpack, pack = HEADER.unpack_from, struct.Struct("<QQ").pack_into
    seen, sent = unpack(theirs, 0)[0], unpack(mine, 0)[0]
    times = []

    def send(data: bytes) -> None:
        nonlocal sent
        mine[16 : 16 + len(data)] = data
        sent += 1
        pack(mine, 0, sent, len(data))

    def receive() -> bytes:
        nonlocal seen
        while unpack(theirs, 0)[0] == seen:
            pass
        seen += 1
        return bytes(theirs[16 : 16 + unpack(theirs, 8)[0]])

    if role == "a":
        conn.recv()
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            send(PING)
            receive()
            times.append(time.perf_counter_ns() - t0)
    else:
        conn.send(True)
        for _ in range(rounds):
            send(receive())
    for b in blocks:
        b.close()
    return times


def rt_pipe(role: str, names: Any, rounds: int, conn: Any) -> list[int]:
    times = []
    if role == "a":
        conn.recv_bytes()
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            conn.send_bytes(PING)
            conn.recv_bytes()
            times.append(time.perf_counter_ns() - t0)
    else:
        conn.send_bytes(b"ready")
        for _ in range(rounds):
            conn.send_bytes(conn.recv_bytes())
    return times


def rt_socketpair(role: str, sock: Any, rounds: int, conn: Any) -> list[int]:
    times = []
    n = len(PING)

    def recv_exact() -> bytes:
        data = sock.recv(n)
        while len(data) < n:
            data += sock.recv(n - len(data))
        return data

    if role == "a":
        conn.recv()
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            sock.sendall(PING)
            recv_exact()
            times.append(time.perf_counter_ns() - t0)
    else:
        conn.send(True)
        for _ in range(rounds):
            sock.sendall(recv_exact())
    return times


def rt_semaphores(role: str, names: tuple[str, str], rounds: int, conn: Any) -> list[int]:
    """A posix_ipc.Semaphore pair: no payload, only the wake-ups."""
    posix_ipc = importlib.import_module("posix_ipc")

    ping, pong = (posix_ipc.Semaphore(n) for n in names)
    times = []
    if role == "a":
        conn.recv()
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            ping.release()
            pong.acquire()
            times.append(time.perf_counter_ns() - t0)
    else:
        conn.send(True)
        for _ in range(rounds):
            ping.acquire()
            pong.release()
    ping.close()
    pong.close()
    return times


def rt_partner(fn: Callable[..., list[int]], args: Any, rounds: int, conn: Any) -> None:
    fn("b", args, rounds, conn)


def run_roundtrip(method: str, rounds: int) -> list[int]:
    ctx: Any = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    tag = f"shmemext-bench-{os.getpid()}-rt"
    cleanup: list[Callable[[], None]] = []
    if method in ("shmemext poll", "shmemext wait"):
        names = (f"{tag}-ab", f"{tag}-ba")
        cells = [shmemext.Value(n, 128) for n in names]
        cleanup += [c.close for c in cells]
        fn: Callable[..., list[int]] = rt_shmemext_poll if method == "shmemext poll" else rt_shmemext_wait
        args_a: Any = names
        args_b: Any = names
    elif method == "shared_memory poll":
        blocks = [shared_memory.SharedMemory(create=True, size=256) for _ in range(2)]
        for b in blocks:
            cleanup += [b.close, b.unlink]
        fn, args_a = rt_shared_memory_poll, (blocks[0].name, blocks[1].name)
        args_b = args_a
    elif method == "posix_ipc.Semaphore pair":
        posix_ipc = importlib.import_module("posix_ipc")

        names = (f"/{tag}-ping", f"/{tag}-pong")
        sems = [posix_ipc.Semaphore(n, posix_ipc.O_CREX) for n in names]
        for sem in sems:
            cleanup += [sem.unlink, sem.close]
        fn, args_a, args_b = rt_semaphores, names, names
    elif method == "socketpair":
        end_a, end_b = socket.socketpair()
        cleanup += [end_a.close, end_b.close]
        fn, args_a, args_b = rt_socketpair, end_a, end_b
    else:
        fn, args_a, args_b = rt_pipe, None, None
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=rt_partner, args=(fn, args_b, rounds, theirs))
    child.start()
    try:
        return fn("a", args_a, rounds, mine)
    finally:
        child.join(60)
        for step in cleanup:
            step()


ROUNDTRIP_METHODS = ["shmemext poll", "shmemext wait", "shared_memory poll", "multiprocessing.Pipe", "socketpair",
                     "posix_ipc.Semaphore pair"]


def wake_partner(name: str, rounds: int, ready: Any) -> None:
    v = shmemext.Value(name, 128)
    ready.set()
    for _ in range(rounds):
        time.sleep(0.0005)
        v.set(time.perf_counter_ns().to_bytes(8, "little"))   # CLOCK_MONOTONIC: one clock for all processes
    v.close()


def measure_wake_latency(rounds: int) -> dict[str, float]:
    """One way: set() in one process until wait() returns in another."""
    ctx: Any = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    name = f"shmemext-bench-{os.getpid()}-wake"
    v = shmemext.Value(name, 128)
    ready = ctx.Event()
    child = ctx.Process(target=wake_partner, args=(name, rounds, ready))
    seen = v.version
    child.start()
    ready.wait()
    lat = []
    while seen < rounds:   # two quick sets may wake a waiter once: count versions, not wake-ups
        seen = v.wait(seen, timeout=30)
        now = time.perf_counter_ns()
        lat.append(now - int.from_bytes(v.get(), "little"))   # type: ignore[arg-type]
    child.join(60)
    v.close()
    lat.sort()
    return {"median_us": statistics.median(lat) / 1e3, "p10_us": lat[len(lat) // 10] / 1e3,
            "p90_us": lat[len(lat) * 9 // 10] / 1e3, "samples": len(lat)}


def measure_roundtrip(rounds: int, progress: Any) -> dict[str, dict[str, float]]:
    result = {}
    methods = list(ROUNDTRIP_METHODS)
    if not sys.platform.startswith("linux"):
        methods.remove("socketpair")   # spawn cannot send a socket
    if optional_module("posix_ipc") is None:
        methods.remove("posix_ipc.Semaphore pair")
    for i, method in enumerate(methods):
        progress.step(f"round trip: {method}", i, len(methods))
        times = sorted(run_roundtrip(method, rounds)[rounds // 10 :])   # the first tenth warms up
        result[method] = {
            "median_us": statistics.median(times) / 1e3,
            "p10_us": times[len(times) // 10] / 1e3,
            "p90_us": times[len(times) * 9 // 10] / 1e3,
        }
    return result


def print_roundtrip(result: dict[str, dict[str, float]], wake: dict[str, float] | None, out: Any) -> None:
    print("\n## round trip: a 64-byte value from one process to another and back", file=out)
    print("   (poll: spin on the version; wait: Value.wait, asleep in the kernel until set() wakes it)", file=out)
    peers = [m for m in result if not m.startswith("shmemext")]
    best = min(result[m]["median_us"] for m in peers)
    head = f"{'method':<26}{'median':>10}{'p10':>10}{'p90':>10}{'vs best peer':>14}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for m, r in result.items():
        print(f"{m:<26}{r['median_us']:>8.1f}us{r['p10_us']:>8.1f}us{r['p90_us']:>8.1f}us{best / r['median_us']:>13.1f}x",
              file=out)
    if wake is not None:
        print(f"one-way wake-up, set() in one process until wait() returns in another: median {wake['median_us']:.1f}us "
              f"(p10 {wake['p10_us']:.1f}us, p90 {wake['p90_us']:.1f}us)", file=out)


# ---- lock ------------------------------------------------------------------------


def measure_lock(rounds: int, sample_s: float) -> dict[str, dict[str, float]]:
    seg = shmemext.Segment(f"shmemext-bench-{os.getpid()}-lock", 64)
    lock = seg.lock()
    mp_lock = multiprocessing.Lock()

    def ours() -> None:
        lock.acquire()
        lock.release()

    def mp() -> None:
        mp_lock.acquire()
        mp_lock.release()

    methods: dict[str, Callable[[], object]] = {"Segment.lock": ours, "multiprocessing.Lock": mp}
    posix_ipc = optional_module("posix_ipc")
    sem = None
    if posix_ipc is not None:
        sem = posix_ipc.Semaphore(f"/shmemext-bench-{os.getpid()}", posix_ipc.O_CREX, initial_value=1)

        def semaphore() -> None:
            sem.acquire()
            sem.release()

        methods["posix_ipc.Semaphore"] = semaphore
    try:
        return interleaved(methods, rounds, sample_s)
    finally:
        if sem is not None:
            sem.unlink()
            sem.close()
        seg.close()


def print_lock(result: dict[str, dict[str, float]], out: Any) -> None:
    print("\n## lock: uncontended acquire + release", file=out)
    for m, t in result.items():
        print(f"{m:<22}{fmt_ns(t['ns']):>10}", file=out)


# ---- targets ---------------------------------------------------------------------


def targets(copy_rows: list[dict[str, Any]], peers: list[str]) -> list[tuple[bool, str]]:
    lines: list[tuple[bool, str]] = []
    small = [(r, op) for r in copy_rows for op in ("get", "set") if r["size"] <= 4 * KiB]
    if small:
        worst = None
        for r, op in small:
            best = best_peer(r["timing"], op, peers)
            if best is None:
                continue
            ratio = best[1] / r["timing"][f"{op} shmemext"]["ns"]
            if worst is None or ratio < worst[0]:
                worst = (ratio, f"{r['kind']} {size_label(r['size'])} {op} vs {best[0]}")
        if worst is not None:
            lines.append((worst[0] >= 3, f"get/set 16 B..4 KiB at least 3x the fastest peer: worst {worst[0]:.1f}x ({worst[1]})"))
    large = [(r, op) for r in copy_rows for op in ("get", "set") if r["size"] >= MiB and r["kind"] != "bytes"]
    if large:
        worst_peer, worst_floor = None, None
        for r, op in large:
            t = r["timing"]
            ours = t[f"{op} shmemext"]["ns"]
            best = best_peer(t, op, peers)
            label = f"{r['kind']} {size_label(r['size'])} {op}"
            if best is not None and (worst_peer is None or best[1] / ours < worst_peer[0]):
                worst_peer = (best[1] / ours, f"{label} vs {best[0]}")
            floor = ours / t["memcpy"]["ns"]
            if worst_floor is None or floor > worst_floor[0]:
                worst_floor = (floor, label)
        if worst_peer is not None:
            lines.append((worst_peer[0] >= 2, f"str of 1 MiB and more at least 2x the fastest peer: worst {worst_peer[0]:.2f}x ({worst_peer[1]})"))
        if worst_floor is not None:
            lines.append((worst_floor[0] <= 1.25, f"str of 1 MiB and more within 1.25x of the memcpy floor: worst {worst_floor[0]:.2f}x ({worst_floor[1]})"))
    tiny = [r for r in copy_rows if r["size"] == 16]
    if tiny:
        worst_ratio, worst_kind = max((r["timing"]["get shmemext"]["ns"] / r["timing"]["empty C call"]["ns"], r["kind"]) for r in tiny)
        lines.append((worst_ratio <= 3, f"a 16-byte get costs at most 3 empty C calls: worst {worst_ratio:.1f} ({worst_kind})"))
    return lines


# ---- driver ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "shmemext": shmemext.__version__,
        "python": platform.python_implementation() + " " + platform.python_version(),
        "platform": platform.platform(),
        "cpu": model,
        "cpus": os.cpu_count(),
    }


def plot(copy_rows: list[dict[str, Any]], peers: list[str], path: str) -> None:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'shmemext[plot]'") from None
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")

    kinds = [k for k in KINDS if any(r["kind"] == k for r in copy_rows)]
    fig, axes = plt.subplots(2, len(kinds), figsize=(4 * len(kinds), 7.5), sharex=True, sharey=True, squeeze=False)
    methods = OURS + peers + ["memcpy"]
    colors = {m: f"C{i}" for i, m in enumerate(OURS + PEERS + ["memcpy"])}   # the same in every panel
    for col, kind in enumerate(kinds):
        rows = sorted((r for r in copy_rows if r["kind"] == kind), key=lambda r: r["size"])
        for row_i, op in enumerate(("get", "set")):
            ax = axes[row_i][col]
            for m in methods:
                key = m if m == "memcpy" else f"{op} {m}"
                pts = [(r["size"], r["timing"][key]["ns"]) for r in rows if key in r["timing"]]
                if pts:
                    style = "-" if m in OURS else ":" if m == "memcpy" else "--"
                    ax.plot(*zip(*pts), style, marker="o", markersize=3, label=m, color=colors[m])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{op} {kind}")
            ax.grid(True, which="major", alpha=0.3)
            if row_i == 1:
                ax.set_xlabel("payload bytes")
            if col == 0:
                ax.set_ylabel("ns per call (median)")
    labels: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    fig.legend(list(labels.values()), list(labels), loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    info = machine()
    fig.suptitle(f"shmemext {info['shmemext']} vs peers, {info['python']}, {info['cpus']} CPUs ({info['cpu']}); "
                 f"solid: shmemext, dashed: peers, dotted: in-process copy", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=90)


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip().upper().removesuffix("B").removesuffix("I")
        scale = {"K": KiB, "M": MiB}.get(part[-1:], 1)
        try:
            n = int(part[:-1] if scale != 1 else part) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: sizes are whole numbers of bytes, K or M (like 16,4K,1M)") from None
        if not 16 <= n <= 1 << 30:
            raise argparse.ArgumentTypeError(f"size {n} is out of range: 16 bytes to 1 GiB")
        sizes.append(n)
    return sorted(set(sizes))


def parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(KINDS)}")
    return kinds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=(__doc__ or "The benchmark suite.").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, kinds and rounds (about 30 s)")
    parser.add_argument("--sections", default="copy,scaling,roundtrip,lock",
                        help="comma-separated: copy, scaling, roundtrip, lock (default: all)")
    parser.add_argument("--rounds", type=int, help="rounds per copy cell (default 15, quick 5)")
    parser.add_argument("--sizes", type=parse_sizes, help="payload sizes for the copy section, e.g. 16,4K,1M")
    parser.add_argument("--kinds", type=parse_kinds, help=f"payload kinds for the copy section, of {','.join(KINDS)}")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON ('-': stdout, the table goes to stderr)")
    parser.add_argument("--plot", metavar="PNG", help="draw ns/op against payload size per method (needs matplotlib)")
    parser.add_argument("--no-redis", dest="redis", action="store_false", help="leave out the Redis peer")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def measure_and_report(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"copy", "scaling", "roundtrip", "lock"}
    if unknown:
        raise SystemExit(f"unknown section(s): {', '.join(sorted(unknown))}")
    quick = args.quick
    sizes, kinds = (QUICK_SIZES, QUICK_KINDS) if quick else (SIZES, KINDS)
    sizes, kinds = args.sizes or sizes, args.kinds or kinds
    rounds = args.rounds or (5 if quick else 15)
    sample_s = 0.002 if quick else 0.01
    peers, missing = available_peers(args.redis and not quick)
    if quick and args.redis:
        missing["redis"] = "left out of --quick"
    reader_counts = [1, 2] if quick else [1, 2, 4, 8]
    scale_s = 0.5 if quick else 3.0
    rt_rounds = 2000 if quick else 20000
    out = sys.stderr if args.json == "-" else sys.stdout
    progress = Progress(args.quiet)

    # Weights in rough seconds, for the time-left estimate.
    copy_w = 0.0 if "copy" not in sections else len(sizes) * len(kinds) * (0.6 if quick else 3.5)
    scale_w = len(reader_counts) * (scale_s + 1.5) if "scaling" in sections else 0.0
    rt_w = len(ROUNDTRIP_METHODS) * (0.3 if quick else 3.0) if "roundtrip" in sections else 0.0
    total = copy_w + scale_w + rt_w + 1

    results: dict[str, Any] = {"machine": machine(), "quick": quick, "peers": peers, "missing_peers": missing}
    if "copy" in sections:
        results["copy"] = measure_copy(sizes, kinds, peers, rounds, sample_s, _Scaled(progress, copy_w, total))
    if "scaling" in sections:
        results["scaling"] = measure_scaling(reader_counts, scale_s, _Scaled(progress, scale_w, total, copy_w))
    if "roundtrip" in sections:
        results["roundtrip"] = measure_roundtrip(rt_rounds, _Scaled(progress, rt_w, total, copy_w + scale_w))
        results["wake"] = measure_wake_latency(rt_rounds // 4)
    if "lock" in sections:
        results["lock"] = measure_lock(rounds, sample_s)

    info = results["machine"]
    print(f"shmemext {info['shmemext']}, {info['python']}, {info['platform']}", file=out)
    print(f"{info['cpus']} CPUs: {info['cpu']}; {'quick' if quick else 'full'} run, {rounds} rounds per cell", file=out)
    for name, why in missing.items():
        print(f"peer {name}: {why}", file=out)
    if "copy" in results:
        print_copy(results["copy"], peers, out)
    if "scaling" in results:
        print_scaling(results["scaling"], out)
    if "roundtrip" in results:
        print_roundtrip(results["roundtrip"], results.get("wake"), out)
    if "lock" in results:
        print_lock(results["lock"], out)
    if "copy" in results or "roundtrip" in results:
        lines = targets(results.get("copy", []), peers)
        rt = results.get("roundtrip", {})
        if "shmemext wait" in rt and "multiprocessing.Pipe" in rt:
            ratio = rt["multiprocessing.Pipe"]["median_us"] / rt["shmemext wait"]["median_us"]
            lines.append((ratio >= 5, f"round trip through wait() at least 5x lower than multiprocessing.Pipe: {ratio:.1f}x"))
        results["targets"] = [{"pass": ok, "what": what} for ok, what in lines]
        print("\n## targets (medians of this run)", file=out)
        for ok, what in lines:
            print(f"{'PASS' if ok else 'FAIL'}  {what}", file=out)
    if args.json:
        text = json.dumps(results, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    if args.plot:
        if "copy" not in results:
            raise SystemExit("--plot draws the copy section: include it in --sections")
        plot(results["copy"], peers, args.plot)
        print(f"\nchart written to {args.plot}", file=out)
    return 0


class _Scaled:
    """A Progress view for one section: maps its own steps into the run's weights."""

    def __init__(self, progress: Progress, weight: float, total: float, offset: float = 0.0) -> None:
        self.progress, self.weight, self.total, self.offset = progress, weight, total, offset

    def step(self, what: str, done: float, of: float) -> None:
        self.progress.step(what, self.offset + self.weight * done / max(of, 1e-9), self.total)


def _sizes_asked(argv: list[str]) -> list[int]:
    for i, arg in enumerate(argv):
        text = arg.split("=", 1)[1] if arg.startswith("--sizes=") else argv[i + 1] if arg == "--sizes" and i + 1 < len(argv) else None
        if text is not None:
            try:
                return parse_sizes(text)
            except argparse.ArgumentTypeError:
                return []   # the measuring process reports it
    return []


def run(argv: list[str] | None = None) -> int:
    """Runs the suite in a fresh interpreter with a default block of its own,
    large enough for the biggest payload; the user's default block is never touched."""
    env = dict(os.environ)
    env["SHMEMEXT_NAME"] = f"shmemext-bench-{os.getpid()}"
    env["SHMEMEXT_SIZE"] = str(max([16 * MiB, *_sizes_asked(argv if argv is not None else sys.argv[1:])]) + 64)
    cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])]
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(measure_and_report(sys.argv[1:]))
