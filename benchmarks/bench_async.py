"""wait_async() against an asyncio socket pair between the same two processes, and 1,000 idle waiters.

    python benchmarks/bench_async.py [--runs 5] [--rounds 2000] [--waiters 1000]

Two processes, each running an asyncio loop, ping-pong a short value: through
Value.set + `await Value.wait_async()`, through two Queues (put, then
`await Queue.get_async()`), and through a socket pair read with
`loop.sock_recv` (the asyncio way to wait for another process), in the same
run.  The one-way wake-up latency is the time from a set() (or send) in one
process to the awaiting task running in the other, on the monotonic clock
both share.  Prints the median of each run, as the median and min-max over
the runs.  Then it parks --waiters tasks on as many Values in one process
and reports what they cost: threads, resident memory, and CPU time while
nothing is set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid

import shmemext

PEER = r"""
import asyncio, os, socket, sys, time
import shmemext
kind, a, b, rounds, fd = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

async def values():
    ping, pong = shmemext.Value(a, 64), shmemext.Value(b, 64)
    seen = ping.version
    for _ in range(rounds):
        seen = await ping.wait_async(seen, timeout=30)
        pong.set(ping.get())

async def queues():
    there, back = shmemext.Queue(a), shmemext.Queue(b)
    for _ in range(rounds):
        back.put(await there.get_async(timeout=30))

async def sockets():
    loop = asyncio.get_running_loop()
    s = socket.socket(fileno=fd)
    s.setblocking(False)
    for _ in range(rounds):
        data = await loop.sock_recv(s, 64)
        await loop.sock_sendall(s, data)

asyncio.run({"value": values, "queue": queues, "socket": sockets}[kind]())
"""


def start_peer(kind: str, a: str, b: str, rounds: int, fd: int = -1) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", PEER, kind, a, b, str(rounds), str(fd)],
                            pass_fds=(fd,) if fd >= 0 else ())


async def block_run(kind: str, rounds: int) -> float:
    """The median round trip, in us, through two Values (set(), then await
    wait_async()) or two Queues (put(), then await get_async()); the first
    one warms up."""
    tag = uuid.uuid4().hex[:8]
    a, b = f"bench-async-{tag}-{kind}-a", f"bench-async-{tag}-{kind}-b"
    if kind == "value":
        ping, pong = shmemext.Value(a, 64), shmemext.Value(b, 64)
        seen = pong.version

        async def trip() -> None:
            nonlocal seen
            ping.set("x" * 16)
            seen = await pong.wait_async(seen, timeout=30)
    else:
        ping, pong = shmemext.Queue(a, 4096), shmemext.Queue(b, 4096)

        async def trip() -> None:
            ping.put(b"x" * 16)
            await pong.get_async(timeout=30)

    peer = start_peer(kind, a, b, rounds + 1)
    await asyncio.sleep(0.3)
    trips = []
    try:
        for _ in range(rounds + 1):
            start = time.perf_counter_ns()
            await trip()
            trips.append(time.perf_counter_ns() - start)
    finally:
        peer.wait(30)
        ping.close()
        pong.close()
    return statistics.median(trips[1:]) / 1e3


async def socket_run(rounds: int) -> float:
    loop = asyncio.get_running_loop()
    mine, theirs = socket.socketpair()
    peer = start_peer("socket", "-", "-", rounds + 1, theirs.fileno())
    theirs.close()
    mine.setblocking(False)
    trips = []
    try:
        for _ in range(rounds + 1):
            start = time.perf_counter_ns()
            await loop.sock_sendall(mine, b"x" * 16)
            await loop.sock_recv(mine, 64)
            trips.append(time.perf_counter_ns() - start)
    finally:
        peer.wait(30)
        mine.close()
    return statistics.median(trips[1:]) / 1e3


WAKE_PEER = r"""
import sys, time
import shmemext
v = shmemext.Value(sys.argv[1], 64)
for _ in range(int(sys.argv[2])):
    time.sleep(0.002)
    v.set(str(time.perf_counter_ns()))
"""


async def wake_latency(rounds: int) -> float:
    """Median us from a set() in another process to the awaiting task running."""
    name = f"bench-async-{uuid.uuid4().hex[:8]}-w"
    v = shmemext.Value(name, 64)
    peer = subprocess.Popen([sys.executable, "-c", WAKE_PEER, name, str(rounds)])
    lat = []
    try:
        seen = v.version
        last = seen + rounds
        while seen < last:  # two sets close together are one wake-up
            seen = await v.wait_async(seen, timeout=30)
            now = time.perf_counter_ns()
            lat.append(now - int(v.get()))
    finally:
        peer.wait(30)
        v.close()
    return statistics.median(lat[5:]) / 1e3


async def hop_floor(rounds: int) -> float:
    """Median us from call_soon_threadsafe in another thread of this process
    to the loop running the callback: what any design that waits in a
    thread and hands over to the loop pays on top of that thread's wake-up."""
    loop = asyncio.get_running_loop()
    lat = []
    for _ in range(rounds):
        future: asyncio.Future[int] = loop.create_future()
        sent = [0]

        def fire() -> None:
            time.sleep(0.002)
            sent[0] = time.perf_counter_ns()
            loop.call_soon_threadsafe(future.set_result, 0)
        thread = threading.Thread(target=fire)
        thread.start()
        await future
        lat.append(time.perf_counter_ns() - sent[0])
        thread.join()
    return statistics.median(lat[5:]) / 1e3


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def idle_cost(count: int, seconds: float) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    values = [shmemext.Value(f"bench-async-{tag}-{i}", 64) for i in range(count)]
    await asyncio.sleep(1.5)  # the watchers of the runs before end
    try:
        threads_before, rss_before = threading.active_count(), rss_kib()
        tasks = [asyncio.ensure_future(v.wait_async()) for v in values]
        await asyncio.sleep(0.5)
        threads, rss = threading.active_count(), rss_kib()
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for v in values:
            v.close()
    return {"threads": threads - threads_before, "rss_kib": rss - rss_before, "cpu": cpu}


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.1f} [{min(xs):.1f}-{max(xs):.1f}]"


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_async.py", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"value": [], "queue": [], "socket": [], "wake": [], "hop": []}

    async def runs() -> None:
        for _ in range(args.runs):
            results["value"].append(await block_run("value", args.rounds))
            results["queue"].append(await block_run("queue", args.rounds))
            results["socket"].append(await socket_run(args.rounds))
            results["wake"].append(await wake_latency(200))
            results["hop"].append(await hop_floor(200))

    asyncio.run(runs())
    v, s = statistics.median(results["value"]), statistics.median(results["socket"])
    print(f"{os.cpu_count()} CPUs; median of each run (us): median over {args.runs} runs [min-max]")
    print(f"round trip   wait_async {spread(results['value'])}   socket pair {spread(results['socket'])}   "
          f"socket/wait_async {s / v:5.2f}x")
    q = statistics.median(results["queue"])
    print(f"round trip   Queue get_async {spread(results['queue'])}   get_async/wait_async {q / v:5.2f}x   "
          f"socket/get_async {s / q:5.2f}x")
    print(f"wake-up      set() in another process -> task running: {spread(results['wake'])}   "
          f"(a thread's call_soon_threadsafe -> the loop: {spread(results['hop'])})")
    cost = asyncio.run(idle_cost(args.waiters, args.idle_seconds))
    print(f"{args.waiters} idle waiters on {args.waiters} Values: {cost['threads']:.0f} threads, "
          f"{cost['rss_kib'] / 1024:.1f} MiB more resident, {cost['cpu'] * 100:.2f}% of a CPU while idle "
          f"(watchers sleep {'in the kernel' if shmemext._shmemext._WAIT_ANY_SLEEPS else 'by polling'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
