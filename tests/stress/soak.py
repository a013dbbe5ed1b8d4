"""Fault-injection soak: a changing population of processes works on seven
shared names (four Values, two Segments, a Queue) while a supervisor kills them about
12 times a second, in every way a process can end: SIGKILL at random,
SIGKILL while it holds a Segment's lock, SIGKILL inside an 8 MiB set(),
SIGTERM (half the workers turn it into an exception raised inside whatever
call runs), SIGSEGV and os._exit().  Every victim is replaced at once.

The workers: writers and readers of checksummed values (with a second thread
on the same handle), a writer and reader of 8 MiB values, lockers that write
records under a Segment's lock in slow pieces, a waiter (wait()), an asyncio
worker (wait_async() in many tasks, some cancelled), a forker that forks
while its threads use, close and reopen handles, and a producer and a
consumer of checksummed Queue messages (single and in batches).

Checked all the time: no read is torn or foreign (every value carries its
checksum), no operation blocks past --bound seconds (faulthandler ends a
worker that does, and it counts as a hang), only documented exceptions
occur, a record left half-written under a lock comes with owner_died, a
wait is never left asleep while the supervisor's ticker moves the value.
At the end, once every process is gone: no System V segment of the run is
left (the kernel freed them), sweep() leaves no name entry or lock file of
the run, and Shmem is back to its baseline.

    python tests/stress/soak.py --seconds 3600 [--kills-per-second 12 --prefix NAME --json]

Prints a report (JSON with --json) and exits 1 if any invariant broke.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from torn_reads import check_value, make_value  # noqa: E402

# What each worker's state byte says, for the supervisor to aim its kills.
BUSY, IN_LOCK, IN_BIG_SET = 0, 1, 2
BIG = 8 << 20
TICK = 0.02  # the supervisor's ticker sets the ticked Value this often
RECORD_AT = 64  # a Segment record: seq(8) status(1) pad len(4) crc(4) ... payload from 64

POPULATION = ["writer", "writer", "reader", "reader", "big", "locker", "locker", "locker", "waiter", "async",
              "forker", "qproducer", "qconsumer"]


def names(prefix: str) -> dict[str, tuple[str, str, int]]:
    """The seven shared names: key -> (kind, name, capacity)."""
    return {
        "values": ("value", f"{prefix}-v", 4096),
        "ticked": ("value", f"{prefix}-t", 64),
        "big": ("value", f"{prefix}-b", 2 * BIG),
        "forked": ("value", f"{prefix}-f", 1024),
        "seg0": ("segment", f"{prefix}-s0", 1 << 16),
        "seg1": ("segment", f"{prefix}-s1", 1 << 16),
        "queue": ("queue", f"{prefix}-q", 1 << 16),
    }


# ---- the workers ----------------------------------------------------------------------------


class Worker:
    """What every role shares: the log, the state byte, the watchdog, counts."""

    def __init__(self, role: str, prefix: str, seed: int, log: str, state: str, bound: float) -> None:
        import faulthandler

        self.role, self.seed, self.bound = role, seed, bound
        self.rng = random.Random(seed)
        self.names = names(prefix)
        self.out = open(log, "a", buffering=1)
        with open(state, "r+b") as f:
            self.state_map = mmap.mmap(f.fileno(), 1)
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.next_report = 0.0
        self.faulthandler = faulthandler
        signal.signal(signal.SIGUSR1, lambda *_: os._exit(7))
        # SIGTERM becomes an exception inside whatever call runs now; not for lockers
        # (leaving the lock by an exception is a release, not a death) nor for asyncio,
        # whose event loop an exception raised at any bytecode can leave unable to end.
        if role not in ("locker", "async") and seed % 2:
            def on_term(signum: int, frame: object) -> None:
                raise SystemExit(0)

            signal.signal(signal.SIGTERM, on_term)
        self.alive()

    def state(self, value: int) -> None:
        self.state_map[0] = value

    def alive(self) -> None:
        """The watchdog: a process not back here within the bound is stuck."""
        self.faulthandler.dump_traceback_later(self.bound, exit=True, file=self.out)

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def bad(self, what: str) -> None:
        self.count("bad")
        self.out.write(f"BAD {self.role}: {what}\n")

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self.next_report:
            with self.lock:
                self.out.write(json.dumps(self.counts) + "\n")
            self.next_report = now + 0.2

    def open(self, key: str):
        import shmemext

        kind, name, capacity = self.names[key]
        if kind == "value":
            return shmemext.Value(name, capacity)
        if kind == "queue":
            return shmemext.Queue(name, capacity)
        return shmemext.Segment(name, capacity)

    def check(self, value: object, what: str) -> None:
        self.count("reads")
        if value != "" and not check_value(value):  # "" only before the first set
            self.bad(f"torn or foreign {what}: {type(value).__name__} of {len(value)}: {value[:40]!r}")

    def undocumented(self, error: BaseException) -> None:
        self.count("undocumented")
        self.out.write(f"BAD {self.role}: undocumented {type(error).__name__}: {error}\n")


def writer(w: Worker) -> None:
    v, f = w.open("values"), w.open("forked")
    pool = [make_value(w.rng, 4096) for _ in range(24)]
    small = [make_value(w.rng, 1024) for _ in range(8)]
    while True:
        for value in pool:
            v.set(value)
        f.set(w.rng.choice(small))
        w.count("sets", len(pool) + 1)
        w.check(v.get(), "value")
        w.alive()
        w.report()


def reader(w: Worker) -> None:
    import shmemext

    v, big = w.open("values"), w.open("big")
    beat = [time.monotonic()]

    def second_thread() -> None:  # the same handle, from another thread
        while True:
            w.check(v.get(), "value (second thread)")
            beat[0] = time.monotonic()

    threading.Thread(target=second_thread, daemon=True).start()
    while True:
        for _ in range(32):
            w.check(v.get(), "value")
        try:
            w.check(big.get(), "8 MiB value")
        except MemoryError as error:
            w.undocumented(error)
        if time.monotonic() - beat[0] > w.bound:
            w.bad("the second thread's get() did not return within the bound")
        if w.rng.random() < 0.05:  # another handle of the same block, opened and closed
            with shmemext.Value(w.names["values"][1]) as again:
                w.check(again.get(), "value (second handle)")
        w.alive()
        w.report()


def big_writer(w: Worker) -> None:
    big = w.open("big")
    pool = []
    for _ in range(3):
        body = w.rng.randbytes(64) * (BIG // 64 - 1)
        pool.append(zlib.crc32(body).to_bytes(4, "little") + body)
    while True:
        w.state(IN_BIG_SET)
        big.set(w.rng.choice(pool))
        w.state(BUSY)
        w.count("big_sets")
        w.check(big.get(), "8 MiB value")
        w.alive()
        w.report()


def locker(w: Worker) -> None:
    seg = w.open(f"seg{w.seed % 2}")
    mem = memoryview(seg)
    seq = 0
    while True:
        try:
            with seg.lock(timeout=w.bound) as lock:
                w.state(IN_LOCK)
                status = bytes(mem[8:9])
                length = int.from_bytes(mem[16:20], "little")
                crc = int.from_bytes(mem[20:24], "little")
                if lock.owner_died:
                    w.count(f"owner_died_seen_seg{w.seed % 2}")
                if status == b"W" and not lock.owner_died:
                    w.bad("a record left half-written under the lock, and owner_died is False")
                elif status == b"C":
                    payload = bytes(mem[RECORD_AT:RECORD_AT + length]) if length <= len(mem) - RECORD_AT else b""
                    if zlib.crc32(payload) != crc:
                        w.bad(f"a complete record whose checksum is wrong (length {length})")
                    w.count("records_checked")
                seq += 1
                payload = w.rng.randbytes(w.rng.randint(1, 8000))
                mem[8:9] = b"W"
                for k in range(4):  # in pieces, a pause between: kills land inside
                    piece = slice(k * len(payload) // 4, (k + 1) * len(payload) // 4)
                    mem[RECORD_AT + piece.start:RECORD_AT + piece.stop] = payload[piece]
                    time.sleep(0.0003)
                mem[0:8] = seq.to_bytes(8, "little")
                mem[16:20] = len(payload).to_bytes(4, "little")
                mem[20:24] = zlib.crc32(payload).to_bytes(4, "little")
                mem[8:9] = b"C"
                w.state(BUSY)
            w.count("records_written")
        except TimeoutError as error:
            w.bad(f"the lock stayed held past the bound: {error}")
        time.sleep(w.rng.random() * 0.002)
        w.alive()
        w.report()


def lost_wakeup(w: Worker, ticked, seen: int) -> None:
    """A wait that timed out while the ticker moved the value (it sets every
    TICK seconds, and nobody else sets it): three versions or more is a
    wake-up lost."""
    moved = ticked.version - seen
    if moved >= 3:
        w.bad(f"a wait timed out though the value moved {moved} versions meanwhile")
    else:
        w.count("ticker_stalls")


def waiter(w: Worker) -> None:
    ticked, v = w.open("ticked"), w.open("values")
    while True:
        seen = ticked.version
        try:
            ticked.wait(seen, timeout=1.0)
            w.count("wakeups")
        except TimeoutError:
            lost_wakeup(w, ticked, seen)
        try:
            v.wait(v.version, timeout=0.05)
        except TimeoutError:
            pass
        w.alive()
        w.report()


def async_worker(w: Worker) -> None:
    import asyncio

    import shmemext

    ticked, v = w.open("ticked"), w.open("values")

    async def follow(value) -> None:
        while True:
            seen = value.version
            try:
                await value.wait_async(seen, timeout=1.0)
                w.count("async_wakeups")
            except TimeoutError:
                if value is ticked:
                    lost_wakeup(w, ticked, seen)

    async def main() -> None:
        tasks = [asyncio.ensure_future(follow(ticked if i % 2 else v)) for i in range(16)]
        while True:
            await asyncio.sleep(0.05)
            victim = w.rng.randrange(len(tasks))  # a cancelled wait leaves nothing behind
            tasks[victim].cancel()
            tasks[victim] = asyncio.ensure_future(follow(ticked if victim % 2 else v))
            w.count("async_cancels")
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    error = task.exception()
                    if not isinstance(error, shmemext.ClosedError):
                        w.undocumented(error)
            w.alive()
            w.report()

    asyncio.run(main())


def forker(w: Worker) -> None:
    import shmemext

    name = w.names["forked"][1]
    f = w.open("forked")
    beats = {"user": time.monotonic(), "closer": time.monotonic()}

    def user() -> None:  # uses the handle the forks inherit
        while True:
            w.check(f.get(), "value (forker's thread)")
            beats["user"] = time.monotonic()

    def closer() -> None:  # opens and closes handles of the same block while forks happen
        while True:
            h = shmemext.Value(name)
            w.check(h.get(), "value (a handle about to close)")
            h.close()
            beats["closer"] = time.monotonic()

    # Whatever a fork child imports must be imported before the threads start: a
    # module lock another thread holds at fork() is never released in the child.
    "".encode("utf-32-le")
    check_value(make_value(random.Random(0), 64))
    threading.Thread(target=user, daemon=True).start()
    threading.Thread(target=closer, daemon=True).start()
    while True:
        pid = os.fork()
        if pid == 0:
            # faulthandler's watchdog does not survive fork() (its lock may be the parent's):
            # an alarm ends a child that hangs, its stacks written to the log first (the
            # parent reports it too, if it still lives).
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            w.faulthandler.register(signal.SIGALRM, file=w.out, all_threads=True, chain=True)
            signal.alarm(int(w.bound))
            code = 0
            try:
                value = f.get()
                if value != "" and not check_value(value):
                    code = 3
                f.set(make_value(random.Random(os.getpid()), 1024))
                f.close()
            except BaseException:  # noqa: B036 -- the child reports any failure by its exit code
                code = 4
            os._exit(code)
        deadline = time.monotonic() + w.bound
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                if code == 0:
                    w.count("forks")
                elif code == -signal.SIGALRM:
                    w.bad("a fork child hung (its alarm ended it)")
                else:
                    w.bad(f"a fork child failed with {code}")
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                w.bad("a fork child hung")
                break
            time.sleep(0.001)
        for who, beat in beats.items():
            if time.monotonic() - beat > w.bound:
                w.bad(f"the {who} thread did not come back within the bound")
        time.sleep(w.rng.random() * 0.02)
        w.alive()
        w.report()


def queue_producer(w: Worker) -> None:
    import queue

    q = w.open("queue")
    pool = [make_value(w.rng, 2048) for _ in range(16)]
    while True:
        try:  # full only while the consumer is being replaced
            if w.rng.random() < 0.3:
                w.count("queue_puts", q.put_many(w.rng.sample(pool, 4), timeout=w.bound / 4))
            else:
                q.put(w.rng.choice(pool), timeout=w.bound / 4)
                w.count("queue_puts")
        except queue.Full:
            w.count("queue_full")
        w.alive()
        w.report()


def queue_consumer(w: Worker) -> None:
    import queue

    q = w.open("queue")
    while True:
        try:
            got = q.get_many(8, timeout=w.bound / 4) if w.rng.random() < 0.3 else [q.get(timeout=w.bound / 4)]
        except queue.Empty:
            got = []
        for message in got:
            w.count("queue_gets")
            if not check_value(message):
                w.bad(f"torn or foreign queue message: {type(message).__name__} of {len(message)}")
        w.alive()
        w.report()


ROLES = {"writer": writer, "reader": reader, "big": big_writer, "locker": locker, "waiter": waiter,
         "async": async_worker, "forker": forker, "qproducer": queue_producer, "qconsumer": queue_consumer}


def work(role: str, prefix: str, seed: int, log: str, state: str, bound: float) -> None:
    import shmemext

    w = Worker(role, prefix, seed, log, state, bound)
    try:
        ROLES[role](w)
    except SystemExit:
        raise
    except (shmemext.ClosedError, TimeoutError, InterruptedError) as error:
        w.undocumented(error)  # nothing here closes what a worker uses, and every wait is bounded
    except BaseException as error:
        w.undocumented(error)
        raise
    finally:
        w.report(force=True)


# ---- the supervisor ---------------------------------------------------------------------------


def shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    return 0


def sysv_segments(unattached: bool = False) -> set[int]:
    """System V segments, or those no process has attached: once every worker
    is gone, one of the run's is unattached, and one still attached is some
    other program's that came meanwhile."""
    try:
        with open("/proc/sysvipc/shm") as f:
            columns = f.readline().split()
            nattch = columns.index("nattch")
            rows = [line.split() for line in f]
        return {int(row[1]) for row in rows if not unattached or row[nattch] == "0"}
    except (OSError, ValueError):
        return set()


def run_leftovers(prefix: str) -> tuple[list[str], list[str]]:
    """Name entries in /dev/shm and lock files of the run."""
    from shmemext import _shmemext

    entries = sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix)) if os.path.isdir("/dev/shm") else []
    locks: list[str] = []
    if _shmemext._BACKEND == "posix-lockfiles":
        where = os.path.join(os.environ.get("SHMEMEXT_LOCK_DIR") or "/tmp/.shmemext", f"u{os.geteuid()}")
        ours = {short_form(name) for _, name, _ in names(prefix).values()}
        if os.path.isdir(where):
            locks = sorted(n for n in os.listdir(where) if n.rsplit(".", 1)[0] in ours)
        entries = sorted(n for n in os.listdir("/dev/shm") if n in ours)
    return entries, locks


def short_form(name: str) -> str:
    """The name the lock-file path gives the OS: longer than 30 characters,
    a prefix, '~' and a 64-bit FNV-1a hash."""
    if len(name) <= 30:
        return name
    h = 14695981039346656037
    for byte in name.encode("ascii"):
        h = ((h ^ byte) * 1099511628211) & (2**64 - 1)
    return f"{name[:13]}~{h:016x}"


def totals_of(logs: str) -> tuple[dict[str, int], list[str]]:
    totals: dict[str, int] = {}
    problems: list[str] = []
    for entry in sorted(os.listdir(logs)):
        last: dict[str, int] = {}
        dump = False  # inside stacks faulthandler wrote: of a stuck worker, or a fork child's alarm
        with open(os.path.join(logs, entry), errors="replace") as f:
            for line in f:
                stacks = line.startswith(("Current thread 0x", "Thread 0x"))
                if line.startswith("BAD "):
                    problems.append(line.strip())
                elif line.startswith("Timeout (") or (stacks and not dump):
                    problems.append(f"HANG {entry}: {line.strip()}")
                    totals["hangs"] = totals.get("hangs", 0) + 1
                dump = line.startswith("Timeout (") or (dump and not line.startswith("{")) or stacks
                if line.startswith("{"):
                    try:
                        last = json.loads(line)
                    except ValueError:
                        pass  # a line cut short by a kill
        for key, value in last.items():
            totals[key] = totals.get(key, 0) + value
    return totals, problems


def supervise(args: argparse.Namespace) -> dict:
    import shmemext

    prefix = args.prefix
    shmem_before, segments_before = shmem_kib(), sysv_segments()
    logs = tempfile.mkdtemp(prefix="shmemext-soak-")
    rng = random.Random(args.seed)
    seeds = iter(range(1, 1_000_000))
    # The supervisor holds the Segments for the whole run, so that the next holder of a
    # lock is told of a death in it, and the ticked Value, which it sets.  The other
    # names live and die with the workers: a block is made again after its last holder.
    held = {}
    for key, (kind, name, capacity) in names(prefix).items():
        if key in ("ticked", "seg0", "seg1"):
            held[key] = shmemext.Value(name, capacity) if kind == "value" else shmemext.Segment(name, capacity)
    stop_ticking = threading.Event()

    def tick() -> None:
        while not stop_ticking.wait(TICK):
            held["ticked"].set(str(time.monotonic()))

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    # The SIGSEGV a worker is sent is a crash: the kernel is to end the process.  An
    # AddressSanitizer build would run its report instead, inside whatever C library or
    # allocator call the signal interrupted, and can wait forever on a lock held there.
    worker_env = dict(os.environ)
    worker_env["ASAN_OPTIONS"] = ":".join(filter(None, [os.environ.get("ASAN_OPTIONS"), "handle_segv=0"]))

    def start(role: str) -> dict:
        seed = next(seeds)
        log = os.path.join(logs, f"{role}-{seed}.log")
        state = os.path.join(logs, f"{role}-{seed}.state")
        with open(state, "wb") as f:
            f.write(b"\0")
        # A session of its own: its fork children stay in its process group, to be
        # waited for at the end even when it died before them.
        proc = subprocess.Popen(
            [sys.executable, "-W", "ignore::DeprecationWarning", __file__, "--worker", role, "--prefix", prefix,
             "--seed", str(seed), "--log", log, "--state", state, "--bound", str(args.bound)],
            env=worker_env, preexec_fn=no_core_dumps, start_new_session=True)
        groups.append(proc.pid)
        with open(state, "r+b") as f:
            view = mmap.mmap(f.fileno(), 1)
        return {"role": role, "seed": seed, "proc": proc, "state": view}

    groups: list[int] = []
    workers = [start(role) for role in POPULATION]
    dying: list = []
    problems_of_supervisor: list[str] = []
    kills = {"sigkill": 0, "sigkill_in_lock": 0, "sigkill_in_big_set": 0, "sigterm": 0, "sigsegv": 0, "os_exit": 0}
    deaths_in_lock = {"seg0": 0, "seg1": 0}
    started = len(workers)
    deadline = time.monotonic() + args.seconds
    next_kill = time.monotonic()
    while time.monotonic() < deadline:
        # A Poisson clock of its own: the time a kill and a restart take is not added to it.
        next_kill += rng.expovariate(args.kills_per_second)
        time.sleep(max(0.0, next_kill - time.monotonic()))
        kind = rng.choices(list(kills), weights=[35, 15, 10, 15, 10, 15])[0]
        if kind == "sigkill_in_lock":
            pool, aim = [x for x in workers if x["role"] == "locker"], IN_LOCK
        elif kind == "sigkill_in_big_set":
            pool, aim = [x for x in workers if x["role"] == "big"], IN_BIG_SET
        else:
            pool, aim = workers, None
        victim = rng.choice(pool)
        if aim is not None:  # wait for the moment, a little
            until = time.monotonic() + 0.2
            while victim["state"][0] != aim and time.monotonic() < until:
                time.sleep(0.0002)
            if victim["state"][0] != aim:
                continue
        sig = {"sigterm": signal.SIGTERM, "sigsegv": signal.SIGSEGV, "os_exit": signal.SIGUSR1}.get(kind,
                                                                                                 signal.SIGKILL)
        in_lock = victim["role"] == "locker" and victim["state"][0] == IN_LOCK  # lockers die of every signal
        victim["proc"].send_signal(sig)
        kills[kind] += 1
        if in_lock:
            deaths_in_lock[f"seg{victim['seed'] % 2}"] += 1
        dying.append((victim, time.monotonic(), kind))
        workers[workers.index(victim)] = start(victim["role"])
        started += 1
        reap(dying, problems_of_supervisor, args.bound)
    stop_ticking.set()
    ticker.join()
    while dying:
        reap(dying, problems_of_supervisor, args.bound)
        time.sleep(0.01)
    would_not_stop = 0
    for x in workers:
        x["proc"].send_signal(signal.SIGTERM)
    for x in workers:
        try:
            x["proc"].wait(timeout=30)
        except subprocess.TimeoutExpired:
            would_not_stop += 1
            x["proc"].kill()
            x["proc"].wait()
    # Fork children outlive a worker killed before them: each ends by itself, within the bound.
    until = time.monotonic() + args.bound + 5
    while time.monotonic() < until and any(group_alive(g) for g in groups):
        time.sleep(0.05)
    for group in [g for g in groups if group_alive(g)]:
        problems_of_supervisor.append(f"HANG process group {group}: alive {args.bound + 5} s after the run")
        os.killpg(group, signal.SIGKILL)
    totals, problems = totals_of(logs)
    problems += problems_of_supervisor
    for key in ("seg0", "seg1"):  # the last death in a lock, if nobody took it since
        try:
            with held[key].lock(timeout=args.bound) as lock:
                if lock.owner_died:
                    totals[f"owner_died_seen_{key}"] = totals.get(f"owner_died_seen_{key}", 0) + 1
        except TimeoutError:
            problems.append(f"BAD {key}'s lock stayed held after every worker was gone")
    for handle in held.values():
        handle.close()
    entries_after_deaths, _ = run_leftovers(prefix)
    swept = [r["name"] for r in shmemext.sweep()]
    left_segments = sorted(sysv_segments(unattached=True) - segments_before)
    entries, locks = run_leftovers(prefix)
    shmem_after = shmem_kib()
    if not problems and not args.keep_logs:
        import shutil

        shutil.rmtree(logs, ignore_errors=True)
    for key, died in deaths_in_lock.items():
        if died and totals.get(f"owner_died_seen_{key}", 0) == 0:
            problems.append(f"BAD {died} holders of {key}'s lock died holding it, and no acquirer was told")
    report = {
        "seconds": args.seconds, "backend": __import__("shmemext")._shmemext._BACKEND, "workers_started": started,
        "kills": kills, "kills_total": sum(kills.values()), "deaths_in_lock": deaths_in_lock, **totals,
        "would_not_stop": would_not_stop, "sysv_segments_left": left_segments,
        "entries_left_by_deaths": len(entries_after_deaths), "swept": len(swept),
        "entries_left_after_sweep": entries, "lock_files_left_after_sweep": locks,
        "shmem_kib_before": shmem_before, "shmem_kib_after": shmem_after, "problems": problems[:20],
        "problem_count": len(problems), "logs": logs if problems or args.keep_logs else None,
    }
    report["ok"] = (not problems and not would_not_stop and not left_segments and not entries and not locks
                    and shmem_after - shmem_before < 8 * 1024)
    return report


def reap(dying: list, problems: list[str], bound: float) -> None:
    """Collects the victims that have ended; one that outlives the signal it
    was sent by the bound was stuck where the signal could not reach it."""
    for entry in list(dying):
        victim, sent, kind = entry
        if victim["proc"].poll() is not None:
            dying.remove(entry)
        elif time.monotonic() - sent > bound:
            problems.append(f"HANG {victim['role']}-{victim['seed']}: alive {bound} s after its {kind},"
                            f" threads in {kernel_waits(victim['proc'].pid)}")
            victim["proc"].kill()
            victim["proc"].wait()
            dying.remove(entry)


def kernel_waits(pid: int) -> str:
    """Where each thread of a stuck process sleeps in the kernel (Linux), to
    tell a wait of ours from one in a signal handler or the C library."""
    try:
        tasks = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
        waits = []
        for task in tasks:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                run_state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/task/{task}/wchan") as f:
                waits.append(f"{run_state}:{f.read() or '-'}")
        return " ".join(waits)
    except OSError as error:
        return f"(unknown: {error})"


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def no_core_dumps() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--kills-per-second", type=float, default=12.0)
    parser.add_argument("--bound", type=float, default=10.0,
                        help="seconds any one operation may take before it counts as a hang")
    parser.add_argument("--prefix", default=f"shxsoak{os.getpid()}")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--worker", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work(args.worker, args.prefix, args.seed, args.log, args.state, args.bound)
        return 0
    report = supervise(args)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
