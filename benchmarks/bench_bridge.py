"""The Redis bridge: latency and throughput between two "hosts", against redis-py alone.

    python benchmarks/bench_bridge.py [--runs 5] [--rounds 300] [--sets 20000] [--messages 50000] [--json FILE]

Starts a redis-server of its own on loopback (durable as the tests run it:
appendfsync always, or --fsync no for the default Redis setting of
everysec), and two bridges, one per host; a host is a set of blocks whose
names carry the host's prefix (LOCAL=REMOTE), so both run on this machine.

- Round trip: a process on host A sets a Value and waits for the answer on
  another; a process on host B waits on its copy of the first Value and sets
  its copy of the second.  Half the round trip is the latency from a set()
  on one host to a wait() returning on the other.  The floor, in the same
  run: the same ping-pong with redis-py alone (SET + PUBLISH in a pipeline,
  a SUBSCRIBE connection waiting on the other side), which is what a user
  writes without the bridge.
- Bridged sets: a writer on A sets as fast as it can; how many versions a
  second reach B (the bridge passes on the newest, so fewer arrive than were
  set), and how long after the last set its value is there.  Against: SET +
  PUBLISH round trips a second from one redis-py client.
- Queue: messages a second from a sent queue on A to a received queue on B,
  against redis-py alone moving the same messages through a stream with a
  consumer group in batches of 256 (XADD pipelined; XREADGROUP, XACK, XDEL).

Figures: median and min-max over --runs; the CPU is named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import redis

import shmemext

PING_BRIDGED = r"""
import sys, time, shmemext
ping, pong, rounds, role = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
a, b = shmemext.Value(ping), shmemext.Value(pong)
if role == "answer":
    seen = a.version
    for i in range(rounds + 1):
        seen = a.wait(seen, timeout=30)
        b.set(a.get())
else:
    seen = b.version
    times = []
    time.sleep(0.5)
    for i in range(rounds + 1):
        t = time.perf_counter_ns()
        a.set(str(i))
        while True:
            seen = b.wait(seen, timeout=30)
            if b.get() == str(i):
                break
        times.append(time.perf_counter_ns() - t)
    print(" ".join(map(str, times[1:])))
"""

PING_REDIS = r"""
import sys, time, redis
url, ping, pong, rounds, role = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
r = redis.Redis.from_url(url)
sub = r.pubsub()
mine, theirs = (pong, ping) if role == "answer" else (ping, pong)
sub.subscribe(theirs)
sub.get_message(timeout=5)
def send(v):
    p = r.pipeline(transaction=False)
    p.set(mine, v)
    p.publish(mine, v)
    p.execute()
def receive(want=None):
    while True:
        m = sub.get_message(timeout=30)
        if m and m["type"] == "message" and (want is None or m["data"] == want):
            return m["data"]
if role == "answer":
    print("ready", flush=True)
    for i in range(rounds + 1):
        send(receive())
else:
    time.sleep(0.5)
    times = []
    for i in range(rounds + 1):
        t = time.perf_counter_ns()
        send(str(i))
        receive(str(i).encode())
        times.append(time.perf_counter_ns() - t)
    print(" ".join(map(str, times[1:])))
"""

STREAM_FLOOR = r"""
import sys, redis
url, key, n, role = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
r = redis.Redis.from_url(url)
if role == "put":
    for start in range(0, n, 256):
        p = r.pipeline(transaction=False)
        for i in range(start, min(n, start + 256)):
            p.xadd(key, {"k": "1", "d": b"m%d" % i})
        p.execute()
else:
    got = 0
    while got < n:
        reply = r.xreadgroup("g", "c", {key: ">"}, count=256, block=5000)
        if not reply:
            continue
        ids = [i for i, _ in reply[0][1]]
        p = r.pipeline(transaction=True)
        p.xack(key, "g", *ids)
        p.xdel(key, *ids)
        p.execute()
        got += len(ids)
"""


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, fsync: str) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            sys.exit("needs redis-server (apt-get install redis-server)")
        self.dir = tempfile.mkdtemp()
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
             "--appendonly", "yes", "--appendfsync", fsync], stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(500):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Bridges:
    """Two bridge processes, hosts A and B."""

    def __init__(self, url: str, prefix: str, specs: dict[str, list[str]]) -> None:
        self.procs = []
        for host, args in specs.items():
            p = subprocess.Popen([sys.executable, "-m", "shmemext", "bridge", "--redis", url, "--prefix", prefix,
                                  "--id", host, *args], stderr=subprocess.PIPE, text=True)
            assert p.stderr is not None
            for line in p.stderr:
                if "connected to" in line:
                    break
            else:
                raise RuntimeError(f"bridge {host} did not connect")
            threading.Thread(target=p.stderr.read, daemon=True).start()
            self.procs.append(p)

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def ping_pong(cmd_a: list[str], cmd_b: list[str], says_ready: bool) -> float:
    """Median round trip in us."""
    answer = subprocess.Popen(cmd_b, stdout=subprocess.PIPE, text=True)
    if says_ready:
        assert answer.stdout is not None
        answer.stdout.readline()
    out = subprocess.run(cmd_a, capture_output=True, text=True, check=True, timeout=300).stdout
    answer.wait(30)
    times = [int(t) for t in out.split()]
    return statistics.median(times) / 1000


def bridged_sets(a: shmemext.Value, b: shmemext.Value, n: int) -> tuple[float, float]:
    """(versions a second arriving on B, ms from the last set to its arrival there)."""
    arrived = []
    done = threading.Event()
    last = f"last {uuid.uuid4().hex}"

    def watch() -> None:
        seen = b.version
        while True:
            seen = b.wait(seen, timeout=30)
            arrived.append(time.perf_counter())
            if b.get() == last:
                done.set()
                return

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.1)
    start = time.perf_counter()
    for i in range(n):
        a.set(f"v{i}")
    a.set(last)
    end = time.perf_counter()
    assert done.wait(60)
    t.join()
    return len(arrived) / (arrived[-1] - start), (arrived[-1] - end) * 1000


def redis_set_rate(url: str, n: int) -> float:
    r = redis.Redis.from_url(url)
    start = time.perf_counter()
    for i in range(n):
        p = r.pipeline(transaction=False)
        p.set("rate", i)
        p.publish("rate", i)
        p.execute()
    return n / (time.perf_counter() - start)


def queue_rate(a: shmemext.Queue, b: shmemext.Queue, n: int) -> float:
    def put() -> None:
        for i in range(n):
            a.put(b"m%d" % i)

    t = threading.Thread(target=put)
    start = time.perf_counter()
    t.start()
    got = 0
    while got < n:
        got += len(b.get_many(1024, timeout=60))
    elapsed = time.perf_counter() - start
    t.join()
    return n / elapsed


def stream_floor(url: str, n: int) -> float:
    key = f"floor-{uuid.uuid4().hex}"
    r = redis.Redis.from_url(url)
    r.xgroup_create(key, "g", id="0", mkstream=True)
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", STREAM_FLOOR, url, key, str(n), role]) for role in ("put", "get")]
    for p in procs:
        assert p.wait(300) == 0
    r.delete(key)
    return n / (time.perf_counter() - start)


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):9.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--sets", type=int, default=20000)
    ap.add_argument("--messages", type=int, default=50000)
    ap.add_argument("--fsync", choices=["always", "everysec", "no"], default="always")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    server = Server(args.fsync)
    tag = uuid.uuid4().hex[:8]
    prefix = f"bench-{tag}:"
    names = {h: {k: f"bench-{tag}-{h}.{k}" for k in ("ping", "pong", "rate", "out", "in")} for h in "AB"}
    specs = {
        "A": [f"{names['A']['ping']}=ping", f"{names['A']['pong']}=pong", f"{names['A']['rate']}=rate",
              "--send", f"{names['A']['out']}=q"],
        "B": [f"{names['B']['ping']}=ping", f"{names['B']['pong']}=pong", f"{names['B']['rate']}=rate",
              "--receive", f"{names['B']['in']}=q"],
    }
    blocks = {h: {k: (shmemext.Queue(n, 1 << 22) if k in ("out", "in") else shmemext.Value(n, 256))
                  for k, n in names[h].items()} for h in "AB"}
    bridges = Bridges(server.url, prefix, specs)
    res: dict[str, list[float]] = {k: [] for k in ("bridged_rtt_us", "redis_rtt_us", "bridged_sets_per_s",
                                                   "last_set_ms", "redis_sets_per_s", "queue_msgs_per_s",
                                                   "stream_floor_msgs_per_s")}
    try:
        for run in range(args.runs):
            res["bridged_rtt_us"].append(ping_pong(
                [sys.executable, "-c", PING_BRIDGED, names["A"]["ping"], names["A"]["pong"], str(args.rounds), "ask"],
                [sys.executable, "-c", PING_BRIDGED, names["B"]["ping"], names["B"]["pong"], str(args.rounds),
                 "answer"], False))
            key = f"{prefix}floor{run}:"
            res["redis_rtt_us"].append(ping_pong(
                [sys.executable, "-c", PING_REDIS, server.url, key + "ping", key + "pong", str(args.rounds), "ask"],
                [sys.executable, "-c", PING_REDIS, server.url, key + "ping", key + "pong", str(args.rounds),
                 "answer"], True))
            rate, last_ms = bridged_sets(blocks["A"]["rate"], blocks["B"]["rate"], args.sets)
            res["bridged_sets_per_s"].append(rate)
            res["last_set_ms"].append(last_ms)
            res["redis_sets_per_s"].append(redis_set_rate(server.url, args.sets // 4))
            res["queue_msgs_per_s"].append(queue_rate(blocks["A"]["out"], blocks["B"]["in"], args.messages))
            res["stream_floor_msgs_per_s"].append(stream_floor(server.url, args.messages))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)
    finally:
        bridges.close()
        server.close()
    print(f"# {cpu_name()}, {os.cpu_count()} CPUs, CPython {platform.python_version()}, redis-server appendfsync "
          f"{args.fsync}, {time.strftime('%Y-%m-%d')}; median (min-max) of {args.runs} runs")
    rtt, floor = res["bridged_rtt_us"], res["redis_rtt_us"]
    print(f"round trip, us:            bridged {spread(rtt)}   redis-py alone {spread(floor)}   "
          f"ratio {statistics.median(rtt) / statistics.median(floor):.2f}x")
    print(f"one way (half), us:        bridged {statistics.median(rtt) / 2:9.1f}   redis-py alone "
          f"{statistics.median(floor) / 2:9.1f}")
    print(f"sets reaching B, /s:       bridged {spread(res['bridged_sets_per_s'])}   "
          f"(the last {spread(res['last_set_ms'])} ms after it was set)")
    print(f"SET+PUBLISH round trips/s: redis-py alone {spread(res['redis_sets_per_s'])}")
    q, f = res["queue_msgs_per_s"], res["stream_floor_msgs_per_s"]
    print(f"queue messages A -> B, /s: bridged {spread(q)}   redis-py stream alone {spread(f)}   "
          f"ratio {statistics.median(q) / statistics.median(f):.2f}x")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "fsync": args.fsync, "date": time.strftime("%Y-%m-%d"), "runs": res}, out, indent=1)


if __name__ == "__main__":
    main()
