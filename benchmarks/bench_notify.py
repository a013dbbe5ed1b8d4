"""Cross-process wake-up latency and ping-pong round trips through Value.wait,
against multiprocessing.Pipe, socket.socketpair and a posix_ipc.Semaphore
pair, in one run; and set() with nobody waiting.

    python benchmarks/bench_notify.py [--rounds 2000]

Each ping-pong sends a 64-byte payload from one process to another and back.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

import shmemext
from _timing import interleaved

PAYLOAD = b"p" * 64


def shmemext_partner(name: str, rounds: int) -> None:
    v = shmemext.Value(name, 128)
    seen = v.version
    for _ in range(rounds):
        seen = v.wait(seen)
        v.set(PAYLOAD)
        seen += 1


def shmemext_pingpong(rounds: int) -> list[float]:
    name = f"shmemext-bench-notify-{os.getpid()}"
    v = shmemext.Value(name, 128)
    child = mp.get_context("fork").Process(target=shmemext_partner, args=(name, rounds))
    child.start()
    times = []
    seen = v.version
    time.sleep(0.2)
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        v.set(PAYLOAD)
        seen = v.wait(seen + 1)
        v.get()
        times.append(time.perf_counter_ns() - t0)
    child.join()
    v.close()
    return times


def pipe_partner(conn, rounds: int) -> None:
    for _ in range(rounds):
        conn.send_bytes(conn.recv_bytes())


def pipe_pingpong(rounds: int) -> list[float]:
    a, b = mp.Pipe()
    child = mp.get_context("fork").Process(target=pipe_partner, args=(b, rounds))
    child.start()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        a.send_bytes(PAYLOAD)
        a.recv_bytes()
        times.append(time.perf_counter_ns() - t0)
    child.join()
    return times


def socket_partner(sock, rounds: int) -> None:
    for _ in range(rounds):
        sock.sendall(sock.recv(64))


def socket_pingpong(rounds: int) -> list[float]:
    a, b = socket.socketpair()
    child = mp.get_context("fork").Process(target=socket_partner, args=(b, rounds))
    child.start()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        a.sendall(PAYLOAD)
        a.recv(64)
        times.append(time.perf_counter_ns() - t0)
    child.join()
    return times


def semaphore_partner(names, rounds: int) -> None:
    import posix_ipc

    ping, pong = (posix_ipc.Semaphore(n) for n in names)
    for _ in range(rounds):
        ping.acquire()
        pong.release()


def semaphore_pingpong(rounds: int) -> list[float] | None:
    try:
        import posix_ipc
    except ImportError:
        print("note: posix_ipc is not installed (pip install shmemext[bench]); no semaphore row", file=sys.stderr)
        return None
    names = (f"/shmemext-ping-{os.getpid()}", f"/shmemext-pong-{os.getpid()}")
    ping, pong = (posix_ipc.Semaphore(n, posix_ipc.O_CREX) for n in names)
    child = mp.get_context("fork").Process(target=semaphore_partner, args=(names, rounds))
    child.start()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        ping.release()
        pong.acquire()
        times.append(time.perf_counter_ns() - t0)
    child.join()
    for s in (ping, pong):
        s.unlink()
    return times


def latency_partner(name: str, rounds: int, ready) -> None:
    v = shmemext.Value(name, 128)
    ready.set()
    for _ in range(rounds):
        time.sleep(0.0005)
        v.set(time.perf_counter_ns().to_bytes(8, "little"))


def wake_latency(rounds: int) -> list[float]:
    name = f"shmemext-bench-wake-{os.getpid()}"
    v = shmemext.Value(name, 128)
    ready = mp.get_context("fork").Event()
    child = mp.get_context("fork").Process(target=latency_partner, args=(name, rounds, ready))
    seen = v.version
    child.start()
    ready.wait()
    out = []
    while seen < rounds:   # two quick sets wake a waiter once: count versions, not wake-ups
        seen = v.wait(seen, timeout=30)
        now = time.perf_counter_ns()
        out.append(now - int.from_bytes(v.get(), "little"))
    child.join()
    v.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    print(f"shmemext {shmemext.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    rows = {}
    # Interleave the methods over several batches so noise hits them alike.
    methods = {"shmemext wait": shmemext_pingpong, "multiprocessing.Pipe": pipe_pingpong,
               "socket.socketpair": socket_pingpong, "posix_ipc.Semaphore pair": semaphore_pingpong}
    for _ in range(3):
        for label, fn in methods.items():
            times = fn(args.rounds)
            if times is not None:
                rows.setdefault(label, []).extend(times)
    print("ping-pong round trip of 64 bytes (median us, p10 - p90):")
    base = statistics.median(rows["multiprocessing.Pipe"])
    for label, times in rows.items():
        deciles = statistics.quantiles(times, n=10)
        med = statistics.median(times)
        print(f"  {label:<26}{med / 1000:>8.1f}   ({deciles[0] / 1000:.1f} - {deciles[-1] / 1000:.1f})"
              f"   {base / med:>5.1f}x vs Pipe")
    lat = wake_latency(args.rounds)
    print(f"one-way wake-up latency, set() -> wait() returns in another process: median "
          f"{statistics.median(lat) / 1000:.1f} us (p90 {statistics.quantiles(lat, n=10)[-1] / 1000:.1f} us)")
    with shmemext.Value(f"shmemext-bench-nowait-{os.getpid()}", 64) as v:
        t = interleaved({"set 16 B str, nobody waiting": lambda: v.set("x" * 16)}, 200_000, 7)
    print(f"set() of 16 B str with nobody waiting: {t['set 16 B str, nobody waiting']['ns']:.0f} ns")
    target = base / statistics.median(rows["shmemext wait"])
    print(f"target: round trip at least 5x lower than multiprocessing.Pipe: {'PASS' if target >= 5 else 'FAIL'} ({target:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
