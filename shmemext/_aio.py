"""Waiting for a Value from an event loop: Value.wait_async() and Value.changes(),
and a Queue's get_async() and put_async().

A task that awaits a Value registers a request (its loop, a future and the
version it has seen) with a watcher: a thread of this process that sleeps on
up to _WAIT_ANY_MAX Values at once in one system call (futex_waitv on Linux,
WaitForMultipleObjects on Windows; where neither exists it looks every
millisecond).  When a version moves, the watcher hands the new version to
each waiting task's loop through the loop's door: a file descriptor of its
own (an eventfd, or a pipe) that the loop reads in a reader callback of
its own and settles the futures there: with a CPU busy, round trips between
two processes took 0.8x the time they took through call_soon_threadsafe
(benchmarks/bench_async.py; alike on idle CPUs).  A loop that cannot
watch a descriptor (the proactor), and every loop on Windows, is handed
answers with call_soon_threadsafe.  So 1,000 tasks awaiting 1,000 Values
cost ceil(1000 / _WAIT_ANY_MAX) threads, and none while nothing is
awaited: a watcher with nothing to watch ends after _LINGER seconds.

A Queue's put_async() on a full queue is a request of the same watcher for
room: it sleeps past the queue's count of bytes taken, on the word that
consumers ring after each take (only when someone sleeps there).  Room
that comes is handed to the awaiting puts in turn, to as many as it fits,
each promised its record's size until it has tried (for at most _PROMISE
seconds: a task whose loop never runs it again keeps nothing for good).
So one take wakes one put of its size, not every put that waits.

A new request, a cancelled one and close() ring the watcher's doorbell (or,
for close(), wake its sleep on the block), so it chooses again what to sleep
on: a cancelled task leaves no thread and no waiter count behind.
"""

from __future__ import annotations

import asyncio
import collections
import os
import queue as _stdqueue
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Coroutine
from typing import Optional, Union

from . import _shmemext
from ._shmemext import Queue, Value

_LINGER = 1.0  # seconds a watcher with nothing to watch keeps its thread
_SLICE = 5.0  # its longest sleep: wake-ups end it early, this bounds a lost one
_WARM = 0.05  # seconds a Value stays watched after its last request was answered


class _Room:
    """What a put_async() awaits: room in a queue.  The watcher sleeps past
    the queue's _taken (bytes of records ever taken), on the channel that
    consumers ring after each take."""

    __slots__ = ("queue",)

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    @property
    def name(self) -> str:
        return self.queue.name

    def __eq__(self, other: object) -> bool:
        return type(other) is _Room and other.queue is self.queue

    def __hash__(self) -> int:
        return hash((_Room, id(self.queue)))


# What a watcher sleeps on: a Value's or a Queue's version, or a queue's room.
_Watched = Union[Value, Queue, _Room]


def _version_of(block: _Watched) -> int:
    """A Value's committed sets, a Queue's committed messages (both move the
    same counter of their block), or a queue's room: what the watcher sleeps
    past."""
    kind = type(block)
    if kind is Value:
        return block.version  # type: ignore[union-attr]
    if kind is _Room:
        return block.queue._taken  # type: ignore[union-attr]
    return block._version  # type: ignore[union-attr]


_ONE = (1).to_bytes(8, "little")  # an eventfd takes 8-byte counts; a pipe any bytes


def _close_fds(fds: "tuple[int, ...]") -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _Door:
    """A loop's own descriptor for the watcher to wake it with answers.  It
    lives as long as the loop (the loop's reader callback holds it) or a
    request still to be answered: its descriptors close only when nobody
    can write them any more."""

    __slots__ = ("read_fd", "write_fd", "answers", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        if hasattr(os, "eventfd"):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.read_fd = self.write_fd = fd
            fds: tuple[int, ...] = (fd,)
        else:
            self.read_fd, self.write_fd = fds = os.pipe()
            for fd in fds:
                os.set_blocking(fd, False)
        self.answers: collections.deque[
            tuple[asyncio.Future[int], Optional[int], Optional[BaseException]]
        ] = collections.deque()
        try:
            loop.add_reader(self.read_fd, self._drain)
        except BaseException:
            _close_fds(fds)
            raise
        weakref.finalize(self, _close_fds, fds)

    def deliver(self, future: asyncio.Future[int], version: Optional[int], error: Optional[BaseException]) -> None:
        """From any thread."""
        self.answers.append((future, version, error))
        try:
            os.write(self.write_fd, _ONE)
        except BlockingIOError:
            pass  # a full pipe: the loop is woken already

    def _drain(self) -> None:
        """On the loop: the descriptor first, then the answers, so that an
        answer added meanwhile is read now or woken for again."""
        try:
            os.read(self.read_fd, 4096)
        except BlockingIOError:
            pass
        while self.answers:
            _settle(*self.answers.popleft())


# Each loop's door, or None for a loop that cannot watch a descriptor.
_doors: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Optional[_Door]]" = weakref.WeakKeyDictionary()


def _door_of(loop: asyncio.AbstractEventLoop) -> Optional[_Door]:
    """On the loop's own thread."""
    try:
        return _doors[loop]
    except KeyError:
        pass
    door: Optional[_Door] = None
    if sys.platform != "win32":  # where a selector loop watches sockets only, not a pipe
        try:
            door = _Door(loop)
        except (NotImplementedError, AttributeError):  # a loop without add_reader
            pass
        except OSError:  # out of descriptors: call_soon_threadsafe now, a door another time
            return None
    with _lock:
        _doors[loop] = door
    return door


class _Request:
    __slots__ = ("loop", "door", "future", "seen", "need")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[int], seen: int, need: int) -> None:
        self.loop = loop
        self.door = _door_of(loop)
        self.future = future
        self.seen = seen
        self.need = need  # for room: the size of the record to put


def _settle(future: asyncio.Future[int], version: Optional[int], error: Optional[BaseException]) -> None:
    """On the request's loop."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(version)  # type: ignore[arg-type]


class _Watcher:
    def __init__(self) -> None:
        self.bell = _shmemext._Bell()
        self.requests: dict[_Watched, list[_Request]] = {}
        # Values whose last request was answered lately, watched on for
        # _WARM seconds: a task that asks again at once (a ping-pong, a loop
        # over changes()) then finds the watcher already asleep on the block
        # and needs no ring.  Never also in requests.
        self.warm: dict[_Watched, float] = {}
        # What the watcher sleeps on now, each Value with the version it
        # sleeps past: a request that has seen that very version needs no
        # ring (the next set() wakes the watcher, which then answers it).
        self.sleeping_on: dict[_Watched, int] = {}
        # Room handed to answered put_async() requests that have not tried
        # yet: for each room, those requests with their need and deadline.
        self.promised: dict[_Watched, dict[_Request, tuple[int, float]]] = {}
        # Bumped by every new request: one made after the watcher read the
        # requests, and before it published sleeping_on, makes it look again.
        self.generation = 0
        self.ending = False
        self.thread = threading.Thread(target=self._run, name="shmemext-watcher", daemon=True)

    def load(self) -> int:
        return len(self.requests) + len(self.warm)

    def _run(self) -> None:
        idle_since: Optional[float] = None
        while True:
            rung = self.bell.rings  # before looking: a request added from now on rings again
            values, versions, timeout = self._due()
            if values:
                idle_since = None
            else:
                with _lock:
                    now = time.monotonic()
                    idle_since = idle_since if idle_since is not None else now
                    if not self.requests and not self.warm and now - idle_since >= _LINGER:
                        self.ending = True
                        if self in _watchers:
                            _watchers.remove(self)
                        return
            blocks = tuple(v.queue if isinstance(v, _Room) else v for v in values)
            rooms = tuple(isinstance(v, _Room) for v in values)
            if any(rooms):
                _shmemext._wait_any(blocks, tuple(versions), self.bell, rung, timeout, rooms)
            else:
                _shmemext._wait_any(blocks, tuple(versions), self.bell, rung, timeout)

    def _due(self) -> tuple[list[_Watched], list[int], float]:
        """Hands new versions (or ClosedError) to the requests they are due
        to; returns what is left to sleep on, and for how long.  Versions
        are read outside the lock: a read waits while a close() of its Value
        is being decided."""
        now = time.monotonic()
        with _lock:
            for value in [v for v, until in self.warm.items() if until <= now]:
                del self.warm[value]
                _where.pop(value, None)
            items = [(value, tuple(requests)) for value, requests in self.requests.items()]
            warm = list(self.warm)
            generation = self.generation
        values, versions = [], []
        for value, requests in items:
            try:
                version = _version_of(value)
            except ValueError as closed:  # ClosedError
                self._answer(value, requests, None, closed)
                continue
            if isinstance(value, _Room):
                try:
                    due = self._fitting(value, requests, version)
                except ValueError as closed:
                    self._answer(value, requests, None, closed)
                    continue
            else:
                due = [r for r in requests if r.seen != version]
            if due:
                self._answer(value, due, version, None)
            values.append(value)  # watched on, warm if nothing is left
            versions.append(version)
        for value in warm:
            try:
                versions.append(_version_of(value))
                values.append(value)
            except ValueError:
                with _lock:
                    self.warm.pop(value, None)
                    _where.pop(value, None)
        with _lock:
            self.sleeping_on = dict(zip(values, versions))
            if self.generation != generation:
                # Asked for meanwhile, perhaps past a version read above:
                # the coming sleep ends at once and the watcher looks again.
                self.bell.ring()
            # Until the first warm Value cools (those answered just now included).
            timeout = min([_SLICE] + [until - now for until in self.warm.values()])
        return values, versions, (max(timeout, 0.001) if values else _LINGER)

    def _fitting(self, room: _Room, requests: "tuple[_Request, ...]", taken: int) -> list[_Request]:
        """The requests, oldest first, that the room free now (less what is
        promised) fits, among those that looked before the last take."""
        queue = room.queue
        now = time.monotonic()
        with _lock:
            promises = self.promised.get(room, {})
            for r in [r for r, (_, until) in promises.items() if until <= now]:
                del promises[r]  # its task has not tried in time: its loop may never run it again
            promised = sum(need for need, _ in promises.values())
        free = queue.capacity - queue._used - promised  # read after taken: a take since wakes the sleep
        due = []
        for r in requests:
            if r.seen == taken:
                continue  # it found no room after the last take: it waits for the next
            if r.need > free:
                break  # in turn: a later, smaller put does not pass it
            free -= r.need
            due.append(r)
        return due

    def _answer(
        self, value: _Watched, requests: "list[_Request] | tuple[_Request, ...]", version: Optional[int],
        error: Optional[BaseException],
    ) -> None:
        with _lock:
            waiting = self.requests.get(value, [])
            answered = [r for r in requests if r in waiting]
            for r in answered:
                waiting.remove(r)
                if r.need and error is None:
                    self.promised.setdefault(value, {})[r] = (r.need, time.monotonic() + _PROMISE)
            if not waiting:
                self.requests.pop(value, None)
                if error is None:
                    self.warm[value] = time.monotonic() + _WARM
                else:
                    _where.pop(value, None)
        for r in answered:
            _deliver(r, version, error)


def _deliver(r: _Request, version: Optional[int], error: Optional[BaseException]) -> None:
    if r.door is not None:
        r.door.deliver(r.future, version, error)
        return
    try:
        r.loop.call_soon_threadsafe(_settle, r.future, version, error)
    except RuntimeError:  # its loop is closed: nobody awaits it any more
        pass


_lock = threading.Lock()
_watchers: list[_Watcher] = []
_where: dict[_Watched, _Watcher] = {}


def _forget_after_fork() -> None:
    """A fork() child has none of its parent's threads."""
    global _lock
    _lock = threading.Lock()
    _watchers.clear()
    _where.clear()
    _doors.clear()  # a loop running in the child makes a door of its own


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _watch(
    value: _Watched, seen: int, loop: asyncio.AbstractEventLoop, future: asyncio.Future[int], need: int = 0
) -> tuple[_Watcher, _Request]:
    request = _Request(loop, future, seen, need)
    start = False
    with _lock:
        watcher = _where.get(value)
        if watcher is None:
            limit = _shmemext._WAIT_ANY_MAX
            watcher = next((w for w in _watchers if w.load() < limit and not w.ending), None)
            if watcher is None:
                watcher = _Watcher()
                _watchers.append(watcher)
                start = True
            _where[value] = watcher
        watcher.warm.pop(value, None)
        watcher.requests.setdefault(value, []).append(request)
        watcher.generation += 1
        # Asleep past this very version: the next set() wakes it.
        ring = watcher.sleeping_on.get(value) != seen
    if start:
        try:
            watcher.thread.start()
        except BaseException as error:  # no thread to be had: nobody would ever answer
            _abandon(watcher, request, error)
            raise
    elif ring:
        watcher.bell.ring()
    return watcher, request


def _abandon(watcher: _Watcher, own: _Request, error: BaseException) -> None:
    """A watcher whose thread did not start: the requests that joined `own`
    meanwhile end with the error (own's caller raises it), and it is forgotten."""
    with _lock:
        watcher.ending = True
        if watcher in _watchers:
            _watchers.remove(watcher)
        for value in list(watcher.requests) + list(watcher.warm):
            if _where.get(value) is watcher:
                del _where[value]
        requests = [r for waiting in watcher.requests.values() for r in waiting if r is not own]
        watcher.requests.clear()
        watcher.warm.clear()
    for r in requests:
        _deliver(r, None, error)


def _unwatch(watcher: _Watcher, value: _Watched, request: _Request) -> None:
    with _lock:
        waiting = watcher.requests.get(value)
        if waiting is None or request not in waiting:
            return  # answered already
        waiting.remove(request)
        if waiting:
            return  # still watched for the others
        del watcher.requests[value]
        _where.pop(value, None)
    watcher.bell.ring()  # so that it stops counting itself a waiter of the block


def _version_arg(fname: str, value: Value, version: object) -> int:
    if version is None:
        return value.version
    if not isinstance(version, int):
        raise TypeError(f"{fname}() argument 'version' must be an int or None, not {type(version).__name__}")
    if not 0 <= version < 1 << 64:
        raise ValueError(f"version {version!r} is out of range: versions are 0 to 2**64-1")
    return int(version)


def _timeout_arg(fname: str, timeout: object) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, (str, bytes, bytearray)) or not hasattr(type(timeout), "__float__"):
        raise TypeError(f"{fname}() argument 'timeout' must be None or a number of seconds, not {type(timeout).__name__}")
    seconds = float(timeout)  # type: ignore[arg-type]
    if not seconds >= 0:
        raise ValueError(f"timeout must be None or a number of seconds >= 0, not {timeout!r}")
    return None if seconds > 1e9 else seconds


def _timed_out(value: _Watched, timeout: float, seen: int) -> TimeoutError:
    return TimeoutError(
        f"timed out after {timeout:g} s waiting for a new value in Value '{value.name}' (still version {seen})"
    )


def _expire(future: asyncio.Future[int], error: TimeoutError) -> None:
    if not future.done():
        future.set_exception(error)


async def _wait(
    value: _Watched, seen: int, timeout: Optional[float], need: int = 0,
    held: "Optional[list[tuple[_Watcher, _Watched, _Request]]]" = None,
) -> int:
    """Waits past version `seen`.  For room, `need` is the record's size and
    the request is added to `held`: room it is answered with stays promised
    to it until it is let go (_let_go)."""
    now = _version_of(value)
    if now != seen:
        return now
    if timeout == 0:
        raise _timed_out(value, 0, seen)
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    watcher, request = _watch(value, seen, loop, future, need)
    if held is not None:
        held.append((watcher, value, request))
    timer = None if timeout is None else loop.call_later(timeout, _expire, future, _timed_out(value, timeout, seen))
    try:
        return await future
    finally:
        if timer is not None:
            timer.cancel()
        _unwatch(watcher, value, request)


def wait_async(
    value: Value, version: Optional[int] = None, timeout: Optional[float] = None
) -> Coroutine[object, object, int]:
    """value.wait_async(): the arguments are checked and the version taken now, at the call."""
    if not isinstance(value, Value):
        raise TypeError(f"wait_async() needs a Value, not {type(value).__name__}")
    seen = _version_arg("wait_async", value, version)
    limit = _timeout_arg("wait_async", timeout)
    return _wait(value, seen, limit)


def changes(value: Value, version: Optional[int] = None) -> AsyncIterator[int]:
    """value.changes(): the version to start from is taken now, at the call."""
    if not isinstance(value, Value):
        raise TypeError(f"changes() needs a Value, not {type(value).__name__}")
    return _changes(value, _version_arg("changes", value, version))


async def _changes(value: Value, seen: int) -> AsyncIterator[int]:
    while True:
        seen = await _wait(value, seen, None)
        yield seen


# ---- Queue.get_async() and Queue.put_async() ----------------------------------

# A put_async() on a full queue awaits room in slices of this many seconds:
# a put_nowait() that gave up behind another producer's long copy (not for
# want of room) then tries again, although nothing was taken.
_ROOM_SLICE = 1.0
# How long room handed to an awaiting put stays kept for it.
_PROMISE = 1.0


async def _queue_get(queue: Queue, limit: Optional[float]) -> object:
    loop = asyncio.get_running_loop()
    deadline = None if limit is None else loop.time() + limit
    while True:
        seen = queue._version
        try:
            return queue.get_nowait()
        except _stdqueue.Empty:
            if deadline is not None and loop.time() >= deadline:
                raise _stdqueue.Empty(f"Queue '{queue.name}' stayed empty for {limit:g} s") from None
        # A message committed since `seen` ends this at once.
        left = None if deadline is None else max(deadline - loop.time(), 0.0)
        try:
            await _wait(queue, seen, left)
        except TimeoutError:
            pass  # one more look, then Empty


def queue_get_async(queue: Queue, timeout: Optional[float] = None) -> Coroutine[object, object, object]:
    """queue.get_async(): the arguments are checked at the call."""
    if not isinstance(queue, Queue):
        raise TypeError(f"get_async() needs a Queue, not {type(queue).__name__}")
    return _queue_get(queue, _timeout_arg("get_async", timeout))


def _let_go(held: "list[tuple[_Watcher, _Watched, _Request]]") -> None:
    """Gives back the room promised to a put_async() that has now tried (or
    ended): the watcher hands what is left to the next put in turn."""
    while held:
        watcher, room, request = held.pop()
        with _lock:
            promises = watcher.promised.get(room, {})
            if promises.pop(request, None) is None:
                continue
            if not promises:
                del watcher.promised[room]
            others = bool(watcher.requests.get(room))
        if others:
            watcher.bell.ring()


async def _queue_put(queue: Queue, obj: object, limit: Optional[float]) -> None:
    loop = asyncio.get_running_loop()
    deadline = None if limit is None else loop.time() + limit
    room = _Room(queue)
    held: list[tuple[_Watcher, _Watched, _Request]] = []
    try:
        while True:
            taken = queue._taken
            need = queue._try_put(obj)
            _let_go(held)  # after the try: the room it was promised is used now, or was taken by another
            if not need:
                return
            if deadline is not None and loop.time() >= deadline:
                raise _stdqueue.Full(
                    f"Queue '{queue.name}' stayed full for {limit:g} s: no room for a record of {need} bytes"
                )
            # A message taken since `taken` ends this at once.
            left = _ROOM_SLICE if deadline is None else min(_ROOM_SLICE, max(deadline - loop.time(), 0.0))
            try:
                await _wait(room, taken, left, need, held)
            except TimeoutError:
                pass  # one more try, then Full when the time is up
    finally:
        _let_go(held)  # cancelled, or closed, between an answer and its try


def queue_put_async(queue: Queue, obj: object, timeout: Optional[float] = None) -> Coroutine[object, object, None]:
    """queue.put_async(): the arguments are checked at the call."""
    if not isinstance(queue, Queue):
        raise TypeError(f"put_async() needs a Queue, not {type(queue).__name__}")
    return _queue_put(queue, obj, _timeout_arg("put_async", timeout))
