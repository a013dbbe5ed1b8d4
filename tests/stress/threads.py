"""Threads against one Value, one Segment and one Queue, and threads that close them.

Each round opens a Value, a Segment and a Queue, runs 8 workers that call
every method on them (set/get/wait/read/write/lock/memoryview/repr/attributes,
put/get/put_many/get_many/qsize) and 2 closers that close all three at random
moments, then checks:
- every get() returned a value some thread set (or the empty start);
- every message taken from the queue was put by some thread, and none was
  taken twice;
- nothing raised but what the API promises for a closed or busy block;
- no call is left in flight and no buffer exported;
- close() works afterwards and the names are gone.

    python tests/stress/threads.py --seconds 600      # the long run
    python tests/stress/threads.py --seconds 4        # what the suite runs

Exits 1 on any failure, printing it; a hang is caught by faulthandler, which
dumps every thread's stack and exits.  On a free-threaded CPython run it
with PYTHON_GIL=0.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import queue as stdqueue
import random
import sys
import threading
import time

import shmemext

# One value of each kind the cell stores: a get must return one of these.
VALUES = [
    "",
    "ascii " * 20,
    "latin-1 \xe9\xff " * 10,
    "ucs-2 \u20ac\u4e2d " * 10,
    "ucs-4 \U0001f600 " * 10,
    b"bytes \x00\xff" * 20,
    "x" * 3000,
    b"y" * 3000,
]
SEGMENT_SIZE = 4096
QUEUE_CAPACITY = 2048  # small: full and empty both come often


class Messages:
    """The queue's bookkeeping: what was put (or tried), what was taken."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tried: set[str] = set()
        self.taken: set[str] = set()

    def check(self, got: object, failures: list) -> None:
        with self.lock:
            if not isinstance(got, str) or got not in self.tried:
                failures.append(f"the queue gave {got!r:.60}, which nobody put")
            elif got in self.taken:
                failures.append(f"the queue gave {got!r} twice")
            else:
                self.taken.add(got)


def queue_op(rng: random.Random, q: shmemext.Queue, messages: Messages, tag: str, failures: list) -> None:
    op = rng.randrange(6)
    if op <= 1:
        m = f"{tag}:{rng.random()}" + "q" * rng.randrange(200)
        with messages.lock:
            messages.tried.add(m)
        try:
            q.put(m, timeout=0.005) if op == 0 else q.put_nowait(m)
        except stdqueue.Full:
            pass
    elif op == 2:
        batch = [f"{tag}:{rng.random()}" for _ in range(rng.randrange(1, 5))]
        with messages.lock:
            messages.tried.update(batch)
        try:
            q.put_many(batch)
        except (stdqueue.Full, ValueError):
            pass  # a batch larger than the room there is
    elif op == 3:
        try:
            messages.check(q.get(timeout=rng.choice([0, 0.002])), failures)
        except stdqueue.Empty:
            pass
    elif op == 4:
        try:
            for got in q.get_many(4, timeout=0):
                messages.check(got, failures)
        except stdqueue.Empty:
            pass
    else:
        _ = q.qsize(), q.empty(), q.full(), q.holders, q.closed, repr(q)


def worker(rng: random.Random, value: shmemext.Value, segment: shmemext.Segment, q: shmemext.Queue,
           messages: Messages, stats: dict, failures: list, until: float) -> None:
    closed = shmemext.ClosedError
    ops = 0
    tag = f"{threading.get_ident()}"
    while time.monotonic() < until and not failures:
        op = rng.randrange(14)
        try:
            if op == 0:
                value.set(rng.choice(VALUES))
            elif op == 1:
                got = value.get()
                if got not in VALUES:
                    failures.append(f"get returned {got[:40]!r}, which nobody set")
            elif op == 2:
                try:
                    value.wait(timeout=rng.choice([0, 0.001, 0.01]))
                except TimeoutError:
                    pass
            elif op == 3:
                offset = rng.randrange(SEGMENT_SIZE - 8)
                segment.write(b"\xab" * 8, offset)
            elif op == 4:
                data = segment.read(16, rng.randrange(SEGMENT_SIZE - 16))
                if len(data) != 16:
                    failures.append(f"read gave {len(data)} bytes, not 16")
            elif op == 5:
                try:
                    with segment.lock(timeout=0.02) as lock:
                        segment.write(b"L", 0)
                        if lock.owner_died:
                            failures.append("owner_died with every holder alive")
                except TimeoutError:
                    pass
            elif op == 6:
                with memoryview(segment) as view:
                    view[rng.randrange(SEGMENT_SIZE)] = 1
                    _ = view[0]
            elif op == 7:
                repr(value), repr(segment)
            elif op == 8:
                _ = value.version, value.holders, segment.holders, value.persist, value.closed
            elif op == 9:
                lock = segment.lock(timeout=0.02)
                try:
                    lock.acquire()
                except TimeoutError:
                    continue
                lock.release()
            elif op in (11, 12):
                queue_op(rng, q, messages, tag, failures)
            elif op == 10:
                with value:   # __enter__ on a closed one raises; __exit__ closes it
                    if rng.random() < 0.02:
                        raise _Leave()
            else:
                value.get()
                segment.read(8)
            ops += 1
        except closed:
            stats["closed_errors"] += 1
            if value.closed and segment.closed and q.closed:
                break
        except (BufferError, RuntimeError) as exc:
            # close() from __exit__ while another thread exports or holds the lock
            if "cannot close" not in str(exc):
                failures.append(f"op {op}: {exc!r}")
        except _Leave:
            pass
        except Exception as exc:   # noqa: BLE001 - anything else is a failure
            failures.append(f"op {op}: {exc!r}")
    with stats["lock"]:
        stats["ops"] += ops


class _Leave(Exception):
    pass


def closer(rng: random.Random, value: shmemext.Value, segment: shmemext.Segment, q: shmemext.Queue,
           failures: list, until: float) -> None:
    time.sleep(rng.uniform(0, max(0.0, until - time.monotonic())))
    for obj in rng.sample([value, segment, q], 3):
        for _ in range(200):
            try:
                obj.close()
                break
            except (BufferError, RuntimeError) as exc:
                if "cannot close" not in str(exc):
                    failures.append(f"close: {exc!r}")
                    return
                time.sleep(0.001)   # a view or the lock is held a moment longer
            except Exception as exc:   # noqa: BLE001
                failures.append(f"close: {exc!r}")
                return


def one_round(rng: random.Random, prefix: str, n: int, stats: dict, failures: list) -> None:
    value = shmemext.Value(f"{prefix}-v{n}", 4096)
    segment = shmemext.Segment(f"{prefix}-s{n}", SEGMENT_SIZE)
    q = shmemext.Queue(f"{prefix}-q{n}", QUEUE_CAPACITY)
    messages = Messages()
    until = time.monotonic() + rng.uniform(0.02, 0.3)
    threads = [threading.Thread(target=worker, args=(random.Random(rng.random()), value, segment, q, messages,
                                                     stats, failures, until)) for _ in range(8)]
    threads += [threading.Thread(target=closer, args=(random.Random(rng.random()), value, segment, q, failures,
                                                      until)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for obj in (value, segment, q):
        if obj._inflight != 0:
            failures.append(f"{obj!r}: {obj._inflight} calls still counted in flight")
    if segment._exports != 0:
        failures.append(f"{segment!r}: {segment._exports} exports counted with no view alive")
    try:
        value.close()
        segment.close()
        q.close()
    except Exception as exc:   # noqa: BLE001
        failures.append(f"close after the round: {exc!r}")
    if not (value.closed and segment.closed and q.closed):
        failures.append("not closed after close()")
    for name in (value.name, segment.name, q.name):
        if os.path.exists(f"/dev/shm/{name}"):
            failures.append(f"{name} left in /dev/shm")
    stats["rounds"] += 1
    stats["messages_taken"] += len(messages.taken)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    # A hang is a failure too: every stack, then exit.
    faulthandler.dump_traceback_later(args.seconds + 60, exit=True)
    rng = random.Random(seed)
    prefix = f"shmemext-threads-{os.getpid()}"
    stats = {"rounds": 0, "ops": 0, "closed_errors": 0, "messages_taken": 0, "lock": threading.Lock()}
    failures: list[str] = []
    deadline = time.monotonic() + args.seconds
    n = 0
    while time.monotonic() < deadline and not failures:
        one_round(rng, prefix, n, stats, failures)
        n += 1
    del stats["lock"]
    gil = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
    print(json.dumps({"seed": seed, "gil": gil, **stats, "failures": failures[:20]}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
