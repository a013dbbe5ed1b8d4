"""Carries Values and Queues between hosts through Redis (or Valkey).

One bridge process runs on each host.  Local processes keep using their
Values and Queues at shared-memory speed; the bridge passes what changes
on to Redis and what Redis has from other hosts back into the local blocks.
Needs redis-py: ``pip install 'shmemext[redis]'``.

Values.  Redis orders every set: one script bumps the value's version,
stores the value and publishes it.  A bridge applies only versions newer
than the last it applied or wrote, so nothing echoes and the last writer in
Redis order wins on every host.  A remote value is applied only while the
local value is the one the bridge last saw (``Value._set_if``): a local set()
not yet passed on is published first, and the older remote value dropped.

Queues.  A sending bridge copies each message out of a local queue, adds it
to a Redis stream, and only then takes it from the local queue
(``Queue._peek``/``_drop``).  A receiving bridge reads the stream in one
consumer group shared by all bridges, puts each message into a local queue,
and only then acknowledges (and deletes) it.  A bridge that dies leaves its
unacknowledged messages pending; a restarted bridge of the same id
delivers them again, and after ``claim_after`` seconds any other bridge
claims them.  So every message Redis accepted is delivered at least once;
one can be delivered twice when a bridge dies between handing it on and
acknowledging it.  Pickled messages travel as bytes and are never loaded by
the bridge.
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import sys
import threading
import time
from typing import Any, Iterable, TextIO
from urllib.parse import urlsplit, urlunsplit

import shmemext

__all__ = ["Bridge"]

# Kinds of message in the stream: text travels as UTF-8, the rest as the
# local queue holds them (Queue._peek's kinds).
_TEXT, _BYTES = 0, 1
_PICKLES = (6, 7)

# The value's hash: version, kind (b: bytes, s: UTF-8 text), data, origin,
# and per bridge the local version it last passed on or applied.
_PUBLISH = """
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'kind', ARGV[1], 'data', ARGV[2], 'origin', ARGV[3], 'seen:' .. ARGV[3], ARGV[4])
redis.call('PUBLISH', KEYS[1], v .. ' ' .. ARGV[3] .. ' ' .. ARGV[1] .. ' ' .. ARGV[2])
return v
"""

_BATCH = 256           # messages a queue link moves per round trip
_POLL = 0.25           # seconds a blocking local or Redis call waits before looking at close()
_BACKOFF_FIRST, _BACKOFF_MOST = 0.1, 5.0


def safe_url(url: str) -> str:
    """The URL with any password replaced, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


def _split_name(spec: str) -> tuple[str, str]:
    """'LOCAL' or 'LOCAL=REMOTE' -> (local, remote)."""
    local, sep, remote = spec.partition("=")
    if not local or (sep and not remote):
        raise ValueError(f"bridge name {spec!r}: expected NAME or LOCAL=REMOTE")
    return local, remote if sep else local


def _digest(kind: bytes, raw: bytes) -> str:
    """A value's fingerprint, told to Redis before the value is applied."""
    return hashlib.blake2b(kind + b":" + raw, digest_size=16).hexdigest()


def _encode(obj: str | bytes) -> tuple[bytes, bytes]:
    if isinstance(obj, str):
        return b"s", obj.encode("utf-8", "surrogatepass")
    return b"b", obj


class _ValueLink:
    """One Value and its Redis hash and channel."""

    def __init__(self, value: shmemext.Value, key: str) -> None:
        self.value = value
        self.key = key
        self.lock = threading.Lock()
        self.applied = 0                     # the newest Redis version reflected locally
        self.local_seen: int | None = None   # the local version last published or applied

    def read(self) -> tuple[int, str | bytes]:
        """The local value and its version, read consistently."""
        while True:
            before = self.value.version
            data = self.value.get()
            if self.value.version == before:
                return before, data


class _Intents:
    """Writes that tell Redis of a local change, sent before the change is
    made and their replies read later: a bridge killed just after the change
    has told Redis already, since the kernel still delivers what was sent."""

    def __init__(self, client: Any) -> None:
        self.connection = client.connection_pool.make_connection()
        self.connection.connect()
        self.unread = 0

    def send(self, *args: object) -> None:
        self.connection.send_command(*args)
        self.unread += 1
        if self.unread >= _BATCH:
            self.drain()

    def drain(self) -> None:
        while self.unread:
            self.unread -= 1
            self.connection.read_response()

    def close(self) -> None:
        self.connection.disconnect()


class _SessionOver(Exception):
    """A worker saw the session end (close(), or another worker lost Redis)."""


class Bridge:
    """Carries Values and Queues between this host and others through Redis.

    ``values``: names of local Values, each ``NAME`` or ``LOCAL=REMOTE`` (the
    local block's name, and the name every host shares in Redis).
    ``send``: local Queues whose messages leave through Redis (this bridge
    takes every message from them).  ``receive``: local Queues that this
    bridge fills from Redis.  A host whose processes both put and get on one
    logical queue uses two local queues, one sent and one received.
    ``prefix`` starts every Redis key; ``bridge_id`` names this bridge to
    Redis and must differ between bridges (default: the host name and the
    names bridged); ``claim_after`` is how long a message stays with a
    receiving bridge that does not acknowledge it before another takes it.

    ``run()`` blocks until ``close()`` (from another thread or a signal
    handler); ``await run_async()`` runs it in a worker thread for asyncio.
    Each local Value and Queue has a thread of its own that sleeps in the
    kernel until there is work, so a change goes on without crossing an
    event loop.  Losing Redis stops nothing local: the bridge says so on
    ``log`` (stderr), retries with backoff, and catches up.
    """

    def __init__(
        self,
        redis_url: str,
        values: Iterable[str] = (),
        *,
        send: Iterable[str] = (),
        receive: Iterable[str] = (),
        prefix: str = "shmemext:",
        bridge_id: str | None = None,
        claim_after: float = 30.0,
        capacity: int | None = None,
        log: TextIO | None = None,
    ) -> None:
        try:
            import redis  # noqa: F401
        except ImportError:
            raise ImportError("the bridge needs redis-py: pip install 'shmemext[redis]'") from None
        self.redis_url = redis_url
        self.claim_after = float(claim_after)
        if not self.claim_after > 0:
            raise ValueError(f"claim_after must be > 0 seconds, not {claim_after!r}")
        self._log_to = log
        value_specs = [_split_name(s) for s in values]
        send_specs = [_split_name(s) for s in send]
        receive_specs = [_split_name(s) for s in receive]
        if not (value_specs or send_specs or receive_specs):
            raise ValueError("nothing to bridge: name at least one Value, or a queue to send or receive")
        locals_ = [local for local, _ in value_specs + send_specs + receive_specs]
        for name in locals_:
            if locals_.count(name) > 1:
                raise ValueError(f"local block {name!r} is named twice: a queue is either sent or received")
        self.bridge_id = bridge_id or f"{socket.gethostname()}:{','.join(sorted(locals_))}"
        if not self.bridge_id or any(c.isspace() for c in self.bridge_id):
            raise ValueError(f"bridge_id {self.bridge_id!r} must be non-empty, without spaces")
        self._values: list[_ValueLink] = []
        self._send: list[tuple[shmemext.Queue, str]] = []
        self._receive: list[tuple[shmemext.Queue, str]] = []
        try:
            for local, remote in value_specs:
                try:
                    v = shmemext.Value(local, capacity)
                except shmemext.Error as e:
                    if "is a queue" in str(e):
                        raise ValueError(f"{local!r} is a Queue: bridge it with send= or receive= (--send/--receive)") from None
                    raise
                self._values.append(_ValueLink(v, f"{prefix}value:{remote}"))
            for local, remote in send_specs:
                self._send.append((shmemext.Queue(local, capacity), f"{prefix}queue:{remote}"))
            for local, remote in receive_specs:
                self._receive.append((shmemext.Queue(local, capacity), f"{prefix}queue:{remote}"))
        except BaseException:
            self._close_blocks()
            raise
        self._group = f"{prefix}bridges"
        self._closing = threading.Event()
        self._session_over = threading.Event()
        self._failure: BaseException | None = None
        self._was_down = False
        self._connected_once = False
        self._running = threading.Lock()

    # ---- life ---------------------------------------------------------------

    def close(self) -> None:
        """Ends run() or run_async() soon (within a quarter of a second); safe from any thread and signal handler."""
        self._closing.set()
        self._session_over.set()

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        with self._running:   # run() in another thread has let go of the blocks
            self._close_blocks()

    def _close_blocks(self) -> None:
        for link in getattr(self, "_values", []):
            link.value.close()
        for q, _ in getattr(self, "_send", []) + getattr(self, "_receive", []):
            q.close()

    def _log(self, message: str) -> None:
        out = self._log_to if self._log_to is not None else sys.stderr
        print(f"shmemext bridge {self.bridge_id}: {message}", file=out, flush=True)

    async def run_async(self) -> None:
        """run() in a worker thread, for asyncio; cancelling it closes the bridge."""
        import asyncio

        future = asyncio.get_running_loop().run_in_executor(None, self.run)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            self.close()
            await future
            raise

    def run(self) -> None:
        """Bridge until close()."""
        import redis
        from redis.exceptions import RedisError

        if not self._running.acquire(blocking=False):
            raise RuntimeError("this bridge is already running")
        try:
            delay = _BACKOFF_FIRST
            while not self._closing.is_set():
                client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=5, socket_keepalive=True,
                                              health_check_interval=10)
                try:
                    self._session(client)
                    delay = _BACKOFF_FIRST
                except Exception as e:
                    if self._closing.is_set():
                        break
                    self._was_down = True
                    if isinstance(e, (RedisError, OSError)):
                        self._log(f"Redis at {safe_url(self.redis_url)} unreachable ({type(e).__name__}: {e}); "
                                  f"local work goes on; retrying in {delay:.1f} s")
                    else:   # what Redis holds made no sense to us; it may be mended meanwhile
                        self._log(f"stopped by {type(e).__name__}: {e}; local work goes on; retrying in {delay:.1f} s")
                    self._closing.wait(delay)
                    delay = min(delay * 2, _BACKOFF_MOST)
                finally:
                    client.close()
        finally:
            self._running.release()

    def _session(self, client: Any) -> None:
        """One connection's life: subscribe, catch up, follow; returns on close(), raises when Redis goes."""
        client.ping()
        self._session_over.clear()
        self._failure = None
        if self._closing.is_set():
            return
        publish = client.register_script(_PUBLISH)
        pubsub = client.pubsub()
        intents = _Intents(client)
        try:
            if self._values:
                pubsub.subscribe(*[link.key for link in self._values])
            for link in self._values:
                self._catch_up(client, publish, intents, link)
            intents.drain()
            for _, key in self._receive:
                self._make_group(client, key)
            if self._was_down:
                self._log(f"connected again to {safe_url(self.redis_url)}; caught up")
                self._was_down = False
            elif not self._connected_once:
                self._log(f"connected to {safe_url(self.redis_url)}")
            self._connected_once = True
            jobs: list[tuple[Any, tuple[Any, ...]]] = []
            if self._values:
                jobs.append((self._follow, (publish, intents, pubsub)))
            jobs += [(self._watch, (client, publish, link)) for link in self._values]
            jobs += [(self._send_queue, (client, q, key)) for q, key in self._send]
            jobs += [(self._receive_queue, (client, q, key)) for q, key in self._receive]
            threads = [threading.Thread(target=self._worker, args=job, daemon=True,
                                        name=f"shmemext-bridge-{job[0].__name__}") for job in jobs]
            for t in threads:
                t.start()
            self._session_over.wait()
            for t in threads:
                t.join()
            if self._failure is not None:
                raise self._failure
        finally:
            for closing in (pubsub, intents):
                try:
                    closing.close()
                except Exception:
                    pass

    def _worker(self, job: Any, args: tuple[Any, ...]) -> None:
        try:
            job(*args)
        except _SessionOver:
            pass
        except BaseException as e:
            if self._failure is None and not self._session_over.is_set():
                self._failure = e
            self._session_over.set()

    def _going_on(self) -> None:
        if self._session_over.is_set():
            raise _SessionOver

    # ---- values -------------------------------------------------------------

    def _publish(self, publish: Any, link: _ValueLink) -> None:
        """Passes the local value on (under link.lock)."""
        version, data = link.read()
        kind, raw = _encode(data)
        redis_version = int(publish(keys=[link.key], args=[kind, raw, self.bridge_id, version]))
        link.local_seen = version
        link.applied = max(link.applied, redis_version)

    def _apply(self, publish: Any, intents: _Intents, link: _ValueLink, version: int, kind: bytes,
               raw: bytes) -> None:
        """A version from Redis, made local unless it is old or a local set() is waiting to be passed on
        (under link.lock)."""
        if version <= link.applied:
            return
        data: str | bytes = raw
        why = None if kind in (b"s", b"b") else f"kind {kind!r}, not b or s"
        if kind == b"s":
            try:
                data = raw.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as e:
                why = f"text that is not UTF-8 ({e})"
        if why is not None:
            self._log(f"{link.key}: version {version} has {why}: ignored")
            return
        expect = link.local_seen if link.local_seen is not None else link.value.version
        seen_field = f"seen:{self.bridge_id}"
        intents.send("HSET", link.key, seen_field, f"{expect + 1} {_digest(kind, raw)}")
        try:
            written = link.value._set_if(data, expect)
        except ValueError as e:   # too big for the local capacity
            intents.send("HSET", link.key, seen_field, expect)
            self._log(f"{link.key}: version {version} not applied: {e}")
            link.applied = version
            return
        if written is None:
            # A local set() came after what we last saw: it is newer than
            # this version in every order that matters, so it goes out now.
            self._publish(publish, link)
            return
        link.local_seen = written
        link.applied = version

    def _catch_up(self, client: Any, publish: Any, intents: _Intents, link: _ValueLink) -> None:
        """On (re)connecting: whichever of Redis and the local value changed last without the other knowing."""
        with link.lock:
            fields: Any = client.hmget(link.key, ["version", "kind", "data", f"seen:{self.bridge_id}"])
            if fields[0] is not None and not fields[0].isdigit():
                raise ValueError(f"{link.key} holds version {fields[0][:40]!r}, not a number")
            local_version = link.value.version
            if link.local_seen is None:
                # Started afresh: what this bridge last passed on or was about
                # to apply (written before applying it), if it ran before.
                # "N": it published local version N; "N DIGEST": it was about to
                # make the value of that digest local version N.
                told = (fields[3] or b"").split()
                told_version = int(told[0]) if told and told[0].isdigit() else None
                if told_version is None or local_version == told_version - 1:
                    link.local_seen = local_version   # never ran here, or was killed before applying
                elif local_version == told_version:
                    if len(told) == 1 or _digest(*_encode(link.read()[1])) == told[1].decode(errors="replace"):
                        link.local_seen = local_version   # applied it, or passed it on
                elif local_version == 0:
                    link.local_seen = 0   # a block made anew, never written
            if fields[0] is None or int(fields[0]) < link.applied:
                # Redis has no value, or lost what it had: ours is the news.
                link.applied = 0
                if local_version > 0:
                    self._publish(publish, link)
                else:
                    link.local_seen = local_version
                return
            if link.local_seen is None or local_version != link.local_seen:
                # Set locally while the bridge or Redis was away, unless it is what Redis has.
                _, data = link.read()
                if _encode(data) != (fields[1], fields[2]):
                    self._publish(publish, link)
                    return
                link.local_seen = local_version
            self._apply(publish, intents, link, int(fields[0]), fields[1] or b"b", fields[2] or b"")

    def _follow(self, publish: Any, intents: _Intents, pubsub: Any) -> None:
        """Versions other hosts publish."""
        links = {link.key.encode(): link for link in self._values}
        me = self.bridge_id.encode()
        while True:
            self._going_on()
            msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
            if msg is None:
                intents.drain()
                msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=_POLL)
            if msg is None or msg.get("type") != "message":
                continue
            link = links.get(msg["channel"])
            if link is None:
                continue
            parts: list[bytes] = msg["data"].split(b" ", 3)
            if len(parts) != 4 or not parts[0].isdigit():
                self._log(f"{link.key}: a message that is not 'version origin kind data': ignored")
                continue
            if parts[1] == me:
                continue
            with link.lock:
                self._apply(publish, intents, link, int(parts[0]), parts[2], parts[3])

    def _watch(self, client: Any, publish: Any, link: _ValueLink) -> None:
        """Local sets, passed on."""
        while True:
            self._going_on()
            seen = link.local_seen if link.local_seen is not None else link.value.version
            try:
                link.value.wait(seen, timeout=_POLL)
            except TimeoutError:
                continue
            with link.lock:
                if link.value.version != link.local_seen:
                    self._publish(publish, link)

    # ---- queues -------------------------------------------------------------

    def _peek_batch(self, q: shmemext.Queue) -> tuple[int, int, list[tuple[int, str | bytes]]] | None:
        """Up to _BATCH messages from the oldest, left in q: (start, end, messages); None when none came."""
        try:
            got = q._peek(None, _POLL)
        except queue.Empty:
            return None
        if got is None:
            return None
        start, end, kind, data = got
        batch = [(kind, data)]
        while len(batch) < _BATCH:
            try:
                got = q._peek(end, 0)
            except queue.Empty:
                break
            if got is None:
                break
            _, end, kind, data = got
            batch.append((kind, data))
        return start, end, batch

    def _send_queue(self, client: Any, q: shmemext.Queue, key: str) -> None:
        while True:
            self._going_on()
            got = self._peek_batch(q)
            if got is None:
                continue
            start, end, batch = got
            pipe = client.pipeline(transaction=False)
            for kind, data in batch:
                raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
                pipe.xadd(key, {"k": str(kind), "d": raw, "o": self.bridge_id})
            pipe.execute()
            if not q._drop(start, end):
                self._log(f"{q.name}: another consumer takes from this sent queue; "
                          "its messages may reach Redis twice")

    def _make_group(self, client: Any, key: str) -> None:
        from redis.exceptions import ResponseError

        try:
            client.xgroup_create(key, self._group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _put_batch(self, q: shmemext.Queue, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        """Puts each entry's message into q, waiting for room; how many were handled before the session ended."""
        for n, (entry_id, fields) in enumerate(entries):
            kind_text = fields.get(b"k", b"")
            raw = fields.get(b"d", b"")
            kind = int(kind_text) if kind_text.isdigit() else -1
            if kind == _TEXT:
                try:
                    message: Any = raw.decode("utf-8", "surrogatepass")
                except UnicodeDecodeError as e:
                    self._log(f"{q.name}: stream entry {entry_id!r} is text that is not UTF-8 ({e}): dropped")
                    continue
            elif kind in (_BYTES,) + _PICKLES:
                message = raw
            else:
                self._log(f"{q.name}: stream entry {entry_id!r} has kind {kind_text!r}: dropped")
                continue
            while True:
                if self._session_over.is_set():
                    return n
                try:
                    if kind == _TEXT:
                        q.put(message, timeout=_POLL)
                    else:
                        q._put_raw(kind, message, timeout=_POLL)
                    break
                except queue.Full:
                    continue
                except ValueError as e:   # never fits the local queue
                    self._log(f"{q.name}: stream entry {entry_id!r} dropped: {e}")
                    break
        return len(entries)

    def _deliver(self, client: Any, q: shmemext.Queue, key: str, entries: Any) -> None:
        # An entry deleted while pending comes without fields: only acknowledged.
        gone = [i for i, f in entries if f is None]
        entries = [(i, f) for i, f in entries if f is not None]
        put = self._put_batch(q, entries) if entries else 0
        ids = [i for i, _ in entries[:put]]
        if ids or gone:
            pipe = client.pipeline(transaction=True)
            pipe.xack(key, self._group, *(ids + gone))
            if ids:
                pipe.xdel(key, *ids)
            pipe.execute()
        self._going_on()

    def _receive_queue(self, client: Any, q: shmemext.Queue, key: str) -> None:
        me = self.bridge_id
        # What this bridge read before it last stopped, and never acknowledged.
        while True:
            reply: Any = client.xreadgroup(self._group, me, {key: "0"}, count=_BATCH)
            entries = reply[0][1] if reply else []
            if not entries:
                break
            self._deliver(client, q, key, entries)
        next_claim = time.monotonic()
        claim_ms = int(self.claim_after * 1000)
        while True:
            self._going_on()
            if time.monotonic() >= next_claim:
                # What a bridge that died (or hangs) left unacknowledged.
                cursor: Any = "0-0"
                while True:
                    reply = client.xautoclaim(key, self._group, me, claim_ms, cursor, count=_BATCH)
                    cursor, entries = reply[0], reply[1]
                    self._deliver(client, q, key, entries)
                    if cursor in (b"0-0", "0-0"):
                        break
                next_claim = time.monotonic() + min(self.claim_after / 2, 5.0)
            reply = client.xreadgroup(self._group, me, {key: ">"}, count=_BATCH, block=int(_POLL * 1000))
            if reply:
                self._deliver(client, q, key, reply[0][1])


def main(argv: list[str]) -> int:
    """python -m shmemext bridge ...: see --help."""
    import argparse
    import signal

    p = argparse.ArgumentParser(
        prog="python -m shmemext bridge",
        description="Carry Values (and Queues) between hosts through Redis: run one bridge on each host.")
    p.add_argument("--redis", default=os.environ.get("SHMEMEXT_REDIS_URL"), metavar="URL",
                   help="redis://[user:password@]host:port/db, or rediss:// for TLS (default: $SHMEMEXT_REDIS_URL, "
                        "which keeps a password out of the process list; it is never printed)")
    p.add_argument("--prefix", default="shmemext:", help="start of every Redis key (default: %(default)s)")
    p.add_argument("--id", dest="bridge_id", default=None,
                   help="this bridge's name to Redis, unique among bridges (default: host name and the names)")
    p.add_argument("--send", action="append", default=[], metavar="QUEUE[=REMOTE]",
                   help="a local queue whose messages leave through Redis (repeatable)")
    p.add_argument("--receive", action="append", default=[], metavar="QUEUE[=REMOTE]",
                   help="a local queue this bridge fills from Redis (repeatable)")
    p.add_argument("--claim-after", type=float, default=30.0, metavar="SECONDS",
                   help="take over messages another receiving bridge left unacknowledged this long (default: 30)")
    p.add_argument("--capacity", type=int, default=None, help="capacity of blocks this bridge creates")
    p.add_argument("names", nargs="*", metavar="NAME[=REMOTE]", help="Values to bridge")
    args = p.parse_args(argv)
    if not args.redis:
        p.error("--redis URL is required (or set SHMEMEXT_REDIS_URL)")
    try:
        bridge = Bridge(args.redis, args.names, send=args.send, receive=args.receive, prefix=args.prefix,
                        bridge_id=args.bridge_id, claim_after=args.claim_after, capacity=args.capacity)
    except (ValueError, ImportError, OSError) as e:
        print(f"python -m shmemext bridge: {e}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: object) -> None:
        bridge.close()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    with bridge:
        bridge._log(f"bridging {len(bridge._values)} value(s), sending {len(bridge._send)} and receiving "
                    f"{len(bridge._receive)} queue(s) through {safe_url(args.redis)}")
        bridge.run()
    return 0
