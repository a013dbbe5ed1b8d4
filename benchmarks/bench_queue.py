"""shmemext.Queue against the message queues a user would pick instead, in one run.

    python benchmarks/bench_queue.py [--rounds 3] [--sections stream,mpmc,pingpong,pickled] [--json FILE]

Peers (each skipped when it is not installed): multiprocessing.Queue,
multiprocessing.Pipe, faster-fifo, posix_ipc.MessageQueue, pyzmq
(ipc:// PUSH/PULL; for many to many through a zmq proxy) and iceoryx2
publish-subscribe (one to one only: each subscriber gets every sample, so
it is no work queue; its subscriber polls).  Processes are forked, so that
the peers' handles are inherited as their docs ask.

stream    1 producer -> 1 consumer, N bytes messages of each size: ns per
          message from the first put to the last get, and the copy floor
          (two in-process copies of the message) for the large sizes.
mpmc      4 producers -> 4 consumers, the same.
pingpong  16 bytes there and back over two queues (a Value set/wait round
          trip for reference).
busy      the same with every CPU oversubscribed: two spinning processes
          a CPU, at the same priority (the methods that sleep when idle).
pickled   1 -> 1 of a small dict, pickled by each queue.

Every cell is measured in rounds, one method after another within a round,
so that noise on a shared machine hits them alike: medians, min..max
spreads, and ratios against the best peer of the same cell.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
from typing import Any, Callable

import shmemext
import suite

KiB, MiB = 1024, 1024 * 1024
STREAM_SIZES = [16, 256, 4 * KiB, 64 * KiB, MiB]
MPMC_SIZES = [16, 4 * KiB, 64 * KiB]
COUNT = {16: 40000, 256: 40000, 4 * KiB: 20000, 64 * KiB: 3000, MiB: 300}
CTX = mp.get_context("fork")
END = b"E"


def optional(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        return None


faster_fifo = optional("faster_fifo")
posix_ipc = optional("posix_ipc")
zmq = optional("zmq")
iox2 = optional("iceoryx2")
_serial = iter(range(1 << 30))


def fresh_name(what: str) -> str:
    return f"bq-{os.getpid()}-{what}-{next(_serial)}"


# ---- the methods: make() in the parent before forking; send/recv made in each process ----


class Method:
    """A queue kind: make(size) returns a channel whose sender() and
    receiver() give a put and a get function in the process that calls them."""

    mpmc = True

    def done_sending(self, all_received: Any) -> None:
        """In a producer process about to exit: what it sent must still
        arrive.  all_received is an Event the parent sets once every
        message has come (for unordered methods only)."""
        self.flush()

    def flush(self) -> None:
        """In a process about to exit: what it sent must still arrive."""

    # Whether an end marker put after every producer is done comes out after
    # their messages (one queue in one order); pyzmq's sockets are several.
    ordered = True


class ShmemextQueue(Method):
    label = "shmemext.Queue"

    def make(self, size: int, cap: int) -> Any:
        name = fresh_name("q")
        keep = shmemext.Queue(name, cap)
        return {"name": name, "keep": keep}

    def sender(self, ch: Any) -> Callable[[Any], None]:
        return shmemext.Queue(ch["name"]).put

    def receiver(self, ch: Any) -> Callable[[], Any]:
        return shmemext.Queue(ch["name"]).get

    def close(self, ch: Any) -> None:
        ch["keep"].close()


class MpQueue(Method):
    label = "multiprocessing.Queue"

    def make(self, size: int, cap: int) -> Any:
        return CTX.Queue(maxsize=max(4, cap // max(size, 64)))

    def sender(self, ch: Any) -> Callable[[Any], None]:
        return ch.put

    def receiver(self, ch: Any) -> Callable[[], Any]:
        return ch.get

    def close(self, ch: Any) -> None:
        ch.close()
        ch.join_thread()


class Pipe(Method):
    label = "multiprocessing.Pipe"
    mpmc = False

    def make(self, size: int, cap: int) -> Any:
        return CTX.Pipe(duplex=False)

    def sender(self, ch: Any) -> Callable[[Any], None]:
        return ch[1].send_bytes

    def receiver(self, ch: Any) -> Callable[[], Any]:
        return ch[0].recv_bytes

    def close(self, ch: Any) -> None:
        ch[0].close()
        ch[1].close()


class FasterFifo(Method):
    label = "faster-fifo"

    def make(self, size: int, cap: int) -> Any:
        # bytes travel as they are, as ours do: its fastest use.
        return faster_fifo.Queue(max_size_bytes=cap, loads=bytes, dumps=bytes)

    def sender(self, ch: Any) -> Callable[[Any], None]:
        return ch.put

    def receiver(self, ch: Any) -> Callable[[], Any]:
        def get() -> Any:
            while True:  # its default gives up after 10 s, and many consumers see spurious Empty
                try:
                    return ch.get(timeout=10)
                except queue.Empty:
                    pass

        return get

    def close(self, ch: Any) -> None:
        ch.close()


class FasterFifoPickled(FasterFifo):
    label = "faster-fifo"

    def make(self, size: int, cap: int) -> Any:
        return faster_fifo.Queue(max_size_bytes=cap)


def mq_limit(what: str, default: int) -> int:
    """The system's POSIX message queue limits (Linux: /proc/sys/fs/mqueue)."""
    try:
        with open(f"/proc/sys/fs/mqueue/{what}") as f:
            return int(f.read())
    except OSError:
        return default


class PosixMq(Method):
    label = "posix_ipc.MessageQueue"
    # Unprivileged, a queue holds at most msg_max messages of msgsize_max bytes.
    depth = mq_limit("msg_max", 10)
    largest = mq_limit("msgsize_max", 8192)

    def make(self, size: int, cap: int) -> Any:
        name = "/" + fresh_name("mq")
        depth = max(2, min(self.depth, cap // max(size, 1)))
        mq = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_messages=depth, max_message_size=max(size, 16))
        return {"name": name, "keep": mq}

    def sender(self, ch: Any) -> Callable[[Any], None]:
        return posix_ipc.MessageQueue(ch["name"]).send

    def receiver(self, ch: Any) -> Callable[[], Any]:
        mq = posix_ipc.MessageQueue(ch["name"])
        return lambda: mq.receive()[0]

    def close(self, ch: Any) -> None:
        ch["keep"].close()
        ch["keep"].unlink()


_zmq_contexts: dict[int, Any] = {}


def zmq_context() -> Any:
    """One per process: a forked child must not use its parent's."""
    pid = os.getpid()
    if pid not in _zmq_contexts:
        _zmq_contexts[pid] = zmq.Context()
    return _zmq_contexts[pid]


class Zmq(Method):
    label = "pyzmq ipc PUSH/PULL"
    ordered = False

    def make(self, size: int, cap: int) -> Any:
        return {"front": f"ipc:///tmp/{fresh_name('zf')}", "back": f"ipc:///tmp/{fresh_name('zb')}", "proxy": None}

    def start_proxy(self, ch: Any) -> None:
        """For many to many: a PULL -> PUSH device in a process of its own."""
        def run() -> None:
            ctx = zmq_context()
            front, back = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
            front.bind(ch["front"])
            back.bind(ch["back"])
            try:
                zmq.proxy(front, back)
            except zmq.ContextTerminated:
                pass

        ch["proxy"] = CTX.Process(target=run, daemon=True)
        ch["proxy"].start()

    def sender(self, ch: Any) -> Callable[[Any], None]:
        sock = zmq_context().socket(zmq.PUSH)
        sock.connect(ch["front"])
        return lambda m: sock.send(m, copy=len(m) < 64 * KiB)

    def receiver(self, ch: Any) -> Callable[[], Any]:
        sock = zmq_context().socket(zmq.PULL)
        if ch.get("many"):
            sock.connect(ch["back"])
        else:
            sock.bind(ch["front"])
        return sock.recv

    def done_sending(self, all_received: Any) -> None:
        # A process that exits with messages in its context's queues loses
        # them, and so does one whose messages wait unread at the proxy: a
        # proxy drops what it has not read from a peer that disconnects.
        all_received.wait()
        self.flush()

    def flush(self) -> None:
        zmq_context().destroy(linger=-1)
        del _zmq_contexts[os.getpid()]

    def close(self, ch: Any) -> None:
        if ch["proxy"] is not None:
            ch["proxy"].terminate()
            ch["proxy"].join()


_iox2_nodes: dict[int, Any] = {}


class Iceoryx2(Method):
    """Publish-subscribe of u8 slices, lossless: no safe overflow, and a
    publisher that retries until the subscriber has room.  The publisher is
    made before the subscriber (iceoryx2 0.9/0.10 loses samples the other
    way round with safe overflow off), so its producer starts first."""

    label = "iceoryx2 publish-subscribe"
    mpmc = False
    producer_first = True

    def make(self, size: int, cap: int) -> Any:
        return {"name": fresh_name("iox"), "size": max(size, 16), "depth": max(2, min(256, cap // max(size, 1)))}

    def _service(self, ch: Any) -> Any:
        pid = os.getpid()
        if pid not in _iox2_nodes:
            iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
            _iox2_nodes[pid] = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        return (
            _iox2_nodes[pid]
            .service_builder(iox2.ServiceName.new(ch["name"]))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .subscriber_max_buffer_size(ch["depth"])
            .enable_safe_overflow(False)
            .open_or_create()
        )

    def sender(self, ch: Any) -> Callable[[Any], None]:
        publisher = (
            self._service(ch)
            .publisher_builder()
            .initial_max_slice_len(ch["size"])
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )

        connected = []

        def put(message: bytes) -> None:
            if not connected:  # the subscribers came after the publisher
                publisher.update_connections()
                connected.append(True)
            sample = publisher.loan_slice_uninit(len(message))
            ctypes.memmove(sample.payload().as_ptr(), message, len(message))
            sample.assume_init().send()

        ch.setdefault("publishers", []).append(publisher)
        return put

    def receiver(self, ch: Any) -> Callable[[], Any]:
        subscriber = self._service(ch).subscriber_builder().create()

        def get() -> bytes:
            while True:
                sample = subscriber.receive()
                if sample is not None:
                    payload = sample.payload()
                    return ctypes.string_at(payload.as_ptr(), payload.len())

        ch.setdefault("subscribers", []).append(subscriber)
        return get

    def close(self, ch: Any) -> None:
        ch.pop("publishers", None)
        ch.pop("subscribers", None)


def methods(pickled: bool = False) -> list[Method]:
    found: list[Method] = [ShmemextQueue(), MpQueue()]
    if not pickled:
        found.append(Pipe())
    if faster_fifo is not None:
        found.append(FasterFifoPickled() if pickled else FasterFifo())
    if posix_ipc is not None and not pickled:
        found.append(PosixMq())
    if zmq is not None and not pickled:
        found.append(Zmq())
    if iox2 is not None and not pickled:
        found.append(Iceoryx2())
    return found


def fits(method: Method, size: int) -> bool:
    return not isinstance(method, PosixMq) or size <= PosixMq.largest


# ---- measuring ------------------------------------------------------------------


def _consume(get: Callable[[], Any], ordered: bool, stamps: Any, counts: Any, slot: int) -> None:
    if ordered:
        while True:
            m = get()
            if m == END:
                break
            stamps[slot] = time.perf_counter()
    else:  # counted, for the parent to see when all have come
        n = 0
        while True:
            m = get()
            if m == END:
                break
            n += 1
            stamps[slot] = time.perf_counter()
            counts[slot] = n


def stream_once(method: Method, size: int, producers: int, consumers: int, message: Any = None) -> float:
    """ns per message, first put to last get."""
    count = COUNT.get(size, 20000) if message is None else 20000
    message = message if message is not None else bytes(size)
    cap = max(1 * MiB, 8 * (size + 64))
    ch = method.make(size, cap)
    if isinstance(method, Zmq) and (producers > 1 or consumers > 1):
        ch["many"] = True
        method.start_proxy(ch)
    stamps = CTX.Array("d", consumers, lock=False)
    counts = CTX.Array("q", consumers, lock=False)
    ready = CTX.Semaphore(0)  # one release a process, when its end is made
    each = count // producers
    go = CTX.Event()
    all_received = CTX.Event()
    # One to one, the producer ends the stream itself, so that no third
    # party needs an end of its own (iceoryx2's must come before the
    # subscriber's).
    self_ending = producers == 1 and consumers == 1

    def consume(slot: int) -> None:
        get = method.receiver(ch)
        ready.release()
        _consume(get, method.ordered, stamps, counts, slot)

    def produce() -> None:
        put = method.sender(ch)
        ready.release()
        go.wait()
        for _ in range(each):
            put(message)
        if self_ending:
            put(END)
        method.done_sending(all_received)

    cons = [CTX.Process(target=consume, args=(k,)) for k in range(consumers)]
    prods = [CTX.Process(target=produce) for _ in range(producers)]
    for group in ([prods, cons] if getattr(method, "producer_first", False) else [cons, prods]):
        for proc in group:
            proc.start()
        for _ in group:
            ready.acquire()
    time.sleep(0.05)  # connected
    t0 = time.perf_counter()
    go.set()
    lost = False
    if method.ordered:
        for p in prods:
            p.join()
    else:
        waited = time.perf_counter()
        while sum(counts) < each * producers and not lost:
            time.sleep(0.001)
            lost = time.perf_counter() - waited > 10
        if lost:
            print(f"  {method.label}: {each * producers - sum(counts)} of {each * producers} messages never came",
                  file=sys.stderr, flush=True)
            for c in cons:
                c.kill()
        all_received.set()
        for p in prods:
            p.join()
    if self_ending:
        for c in cons:
            c.join()
    else:
        put = method.sender(ch)
        while any(c.is_alive() for c in cons):
            put(END)
            for c in cons:
                c.join(0.01)
    t1 = max(stamps)
    method.close(ch)
    return float("nan") if lost else (t1 - t0) / (each * producers) * 1e9


def pingpong_once(method: Method, rounds: int = 5000) -> float:
    there, back = method.make(16, 64 * KiB), method.make(16, 64 * KiB)
    message = bytes(16)
    ready = CTX.Event()
    put = method.sender(there)  # each sender before its receiver, for iceoryx2

    def partner() -> None:
        get, put = method.receiver(there), method.sender(back)
        ready.set()
        while True:
            m = get()
            put(m)
            if m == END:
                method.flush()
                return

    p = CTX.Process(target=partner)
    p.start()
    ready.wait()
    get = method.receiver(back)
    for _ in range(100):  # warm
        put(message)
        get()
    t0 = time.perf_counter()
    for _ in range(rounds):
        put(message)
        get()
    t1 = time.perf_counter()
    put(END)
    get()
    p.join()
    method.close(there)
    method.close(back)
    return (t1 - t0) / rounds * 1e9


def _spin() -> None:
    while True:
        pass


class Oversubscribed:
    """Two spinning processes a CPU while it is entered."""

    def __enter__(self) -> "Oversubscribed":
        self.spinners = [CTX.Process(target=_spin, daemon=True) for _ in range(2 * (os.cpu_count() or 1))]
        for p in self.spinners:
            p.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.spinners:
            p.kill()
            p.join()


def value_pingpong_once(rounds: int = 5000) -> float:
    a, b = fresh_name("va"), fresh_name("vb")
    va, vb = shmemext.Value(a, 64), shmemext.Value(b, 64)

    def partner() -> None:
        x, y = shmemext.Value(a), shmemext.Value(b)
        seen = x.version
        while True:
            seen = x.wait(seen)
            m = x.get()
            y.set(m)
            if m == END:
                return

    p = CTX.Process(target=partner)
    p.start()
    time.sleep(0.05)
    message = bytes(16)
    seen = vb.version
    t0 = 0.0
    for i in range(rounds + 100):
        if i == 100:
            t0 = time.perf_counter()
        va.set(message)
        seen = vb.wait(seen)
    t1 = time.perf_counter()
    va.set(END)
    p.join()
    va.close()
    vb.close()
    return (t1 - t0) / rounds * 1e9


def copy_floor(size: int) -> float:
    """One in-process copy of the message into a new bytes object, as a get
    makes.  A queue copies twice, once on each side; with the two sides on
    two CPUs the stream's floor is one copy, on one CPU two."""
    src = bytes(size)
    view = memoryview(src)
    n = max(10, 20 * MiB // max(size, 1))
    t0 = time.perf_counter()
    for _ in range(n):
        bytes(view)
    return (time.perf_counter() - t0) / n * 1e9


def summarize(samples: list[float]) -> dict[str, float]:
    good = [x for x in samples if not math.isnan(x)]
    if len(good) < len(samples):  # a run that lost messages has no time
        return {"ns": float("nan"), "min": float("nan"), "max": float("nan"), "lost_runs": len(samples) - len(good)}
    return {"ns": statistics.median(samples), "min": min(samples), "max": max(samples)}


def isolated(fn: Callable[[], float]) -> float:
    """fn() in a process of its own, so that no peer's state (a zmq
    context, an iceoryx2 node, a feeder thread) outlives its measurement
    into the next method's forked processes."""
    mine, theirs = CTX.Pipe(duplex=False)

    def run() -> None:
        theirs.send(fn())

    p = CTX.Process(target=run)
    p.start()
    result = mine.recv() if mine.poll(600) else float("nan")
    p.join(10)
    if p.is_alive():
        p.kill()
        p.join()
    return result


def run_cells(cells: dict[str, dict[str, Callable[[], float]]], rounds: int) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for cell, fns in cells.items():
        samples: dict[str, list[float]] = {m: [] for m in fns}
        for _ in range(rounds):
            for m, fn in fns.items():
                samples[m].append(isolated(fn))
        out[cell] = {m: summarize(s) for m, s in samples.items()}
        print(f"  {cell}: done", file=sys.stderr, flush=True)
    return out


def fmt(ns: float) -> str:
    return f"{ns / 1000:.2f} us" if ns >= 1000 else f"{ns:.0f} ns"


def report(title: str, table: dict[str, dict[str, dict[str, float]]], ours: str, extra: list[str]) -> list[str]:
    lines = [f"\n{title}", ""]
    for cell, row in table.items():
        peers = {m: r for m, r in row.items() if m != ours and m not in extra and not math.isnan(r["ns"])}
        best = min(peers, key=lambda m: peers[m]["ns"]) if peers else None
        lines.append(f"{cell}")
        for m, r in sorted(row.items(), key=lambda kv: (math.isnan(kv[1]["ns"]), kv[1]["ns"])):
            if math.isnan(r["ns"]):
                lines.append(f"  {m:<28} lost messages in {r['lost_runs']} of the runs: no figure")
                continue
            ratio = f"  best peer / this: {row[best]['ns'] / r['ns']:.2f}x" if best and m == ours else ""
            lines.append(f"  {m:<28} {fmt(r['ns']):>10}  ({fmt(r['min'])} .. {fmt(r['max'])}){ratio}")
        if best is not None:
            mpq = row.get("multiprocessing.Queue")
            if mpq is not None and ours in row:
                lines.append(f"  multiprocessing.Queue / shmemext.Queue: {mpq['ns'] / row[ours]['ns']:.1f}x")
    return lines


def machine() -> str:
    m = suite.machine()
    return f"{m['cpu']}, {m['cpus']} CPUs, {m['platform']}, {m['python']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sections", default="stream,mpmc,pingpong,busy,pickled")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    results: dict[str, Any] = {"machine": machine()}
    lines = [f"shmemext.Queue and its peers on {results['machine']}; {args.rounds} rounds, medians (min .. max)"]
    if "stream" in sections:
        cells = {}
        for size in STREAM_SIZES:
            row = {m.label: (lambda m=m, size=size: stream_once(m, size, 1, 1)) for m in methods() if fits(m, size)}
            if size >= 64 * KiB:
                row["copy floor (1 copy)"] = lambda size=size: copy_floor(size)
            cells[f"1 -> 1, {size} B"] = row
        results["stream"] = run_cells(cells, args.rounds)
        lines += report("stream: ns per message", results["stream"], "shmemext.Queue", ["copy floor (1 copy)"])
    if "mpmc" in sections:
        cells = {}
        for size in MPMC_SIZES:
            cells[f"4 -> 4, {size} B"] = {
                m.label: (lambda m=m, size=size: stream_once(m, size, 4, 4)) for m in methods() if m.mpmc and fits(m, size)
            }
            cells[f"1 -> 1 again, {size} B"] = {"shmemext.Queue": lambda size=size: stream_once(ShmemextQueue(), size, 1, 1)}
        results["mpmc"] = run_cells(cells, args.rounds)
        lines += report("many to many: ns per message", results["mpmc"], "shmemext.Queue", [])
    if "pingpong" in sections:
        row = {m.label: (lambda m=m: pingpong_once(m)) for m in methods()}
        row["shmemext.Value set/wait"] = value_pingpong_once
        results["pingpong"] = run_cells({"16 B there and back": row}, args.rounds)
        lines += report("ping-pong: ns per round trip", results["pingpong"], "shmemext.Queue", ["shmemext.Value set/wait"])
    if "busy" in sections:
        # Methods that sleep when idle: iceoryx2's subscriber spins.
        sleepers = [m for m in methods() if not isinstance(m, Iceoryx2)]
        row = {m.label: (lambda m=m: pingpong_once(m, 500)) for m in sleepers}
        row["shmemext.Value set/wait"] = lambda: value_pingpong_once(500)
        with Oversubscribed():
            results["busy"] = run_cells({f"16 B there and back, {2 * (os.cpu_count() or 1)} spinners": row}, args.rounds)
        lines += report("ping-pong, every CPU oversubscribed: ns per round trip", results["busy"], "shmemext.Queue",
                        ["shmemext.Value set/wait"])
    if "pickled" in sections:
        obj = {"id": 12345, "name": "job", "args": [1, 2.5, "x"], "done": False}
        row = {m.label: (lambda m=m: stream_once(m, 0, 1, 1, message=obj)) for m in methods(pickled=True)}
        results["pickled"] = run_cells({"1 -> 1, a small dict": row}, args.rounds)
        lines += report("pickled objects: ns per message", results["pickled"], "shmemext.Queue", [])
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
