"""The Redis bridge, between "hosts" on this machine.

Each host is a set of processes whose blocks carry the host's own name
prefix (LOCAL=REMOTE in the bridge's arguments maps them to one name in
Redis), with one bridge process per host, all through one redis-server that
the tests start on loopback.  Everything runs in separate processes: the
bridges are `python -m shmemext bridge` as users run it.
"""

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import TEST_PREFIX

redis = pytest.importorskip("redis") if not os.environ.get("CI") else __import__("redis")
import shmemext  # noqa: E402

REDIS_SERVER = shutil.which("redis-server")
if REDIS_SERVER is None:
    if os.environ.get("CI"):
        raise RuntimeError("the bridge tests need redis-server (apt-get install redis-server)")
    pytest.skip("redis-server is not installed (apt-get install redis-server)", allow_module_level=True)

_hosts = iter(range(10**6))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server of our own on loopback, durable (every write fsynced to its log), restartable;
    with a password and TLS (a certificate made here) when asked."""

    def __init__(self, tmp_path, password=None, tls=False):
        self.dir = tmp_path / "redis"
        self.dir.mkdir(exist_ok=True)
        self.port = free_port()
        self.password = password
        self.cert = None
        if tls:
            self.cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                            "-out", str(self.cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                            "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
            self.key = key
        self.proc = None
        self.start()

    @property
    def url(self):
        auth = f":{self.password}@" if self.password else ""
        if self.cert:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.cert}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self):
        args = [REDIS_SERVER, "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--logfile", "redis.log"]
        if self.cert:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.cert),
                     "--tls-key-file", str(self.key), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.02)

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def wipe(self):
        """Its data gone, as a Redis without persistence loses it."""
        shutil.rmtree(self.dir)
        self.dir.mkdir()

    def client(self):
        return redis.Redis.from_url(self.url)


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path)
    yield s
    s.kill()


class Bridge:
    """One `python -m shmemext bridge` process; its stderr collected."""

    def __init__(self, url, prefix, args, bridge_id):
        self.args = [sys.executable, "-m", "shmemext", "bridge", "--redis", url, "--prefix", prefix,
                     "--id", bridge_id, *args]
        self.log = []
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def read(stream=self.proc.stderr):
            with stream:
                for line in stream:
                    self.log.append(line)
                    if "connected to" in line:
                        ready.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        assert ready.wait(20), f"bridge did not connect: {''.join(self.log)}"

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.reader.join(10)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(10) == 0, "".join(self.log)
        self.reader.join(10)


@pytest.fixture
def bridges():
    started = []

    def start(url, prefix, args, bridge_id):
        b = Bridge(url, prefix, args, bridge_id)
        started.append(b)
        return b

    yield start
    for b in started:
        if b.proc.poll() is None:
            b.kill()


def wait_for_log(bridge, text, timeout=20):
    deadline = time.monotonic() + timeout
    while text not in "".join(bridge.log):
        assert time.monotonic() < deadline, f"no {text!r} in {''.join(bridge.log)}"
        time.sleep(0.05)


def host_name(host, name):
    return f"{TEST_PREFIX}-h{host}.{name}"


def new_prefix():
    return f"t{os.getpid()}-{next(_hosts)}:"


def run(code, *args):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)])


def lines_in(paths):
    """Every line the consumers wrote to these files, duplicates included."""
    return [line for path in paths if path.exists() for line in path.read_text().splitlines()]


def settle(read, timeout=20.0):
    """Waits until read() gives the same answer twice, 0.5 s apart."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError(f"never settled: {last!r}")


WRITER = """
import sys, time, shmemext
v = shmemext.Value(sys.argv[1])
tag, n = sys.argv[2], int(sys.argv[3])
for i in range(n):
    v.set(f"{tag}:{i}" if i % 2 else f"{tag}:{i}".encode())
    if i % 64 == 0:
        time.sleep(0.001)
"""

# Records every value it sees; fails if any writer's number goes back.
READER = """
import sys, json, shmemext
v = shmemext.Value(sys.argv[1])
out = sys.argv[2]
last, seen, version = {}, 0, 0
while True:
    try:
        version = v.wait(version, timeout=3)
    except TimeoutError:
        break
    got = v.get()
    text = got.decode() if isinstance(got, bytes) else got
    if text == "stop":
        break
    tag, i = text.rsplit(":", 1)
    i = int(i)
    if isinstance(got, bytes) != (i % 2 == 0):
        raise SystemExit(f"{text}: its type changed on the way")
    if i < last.get(tag, -1):
        raise SystemExit(f"{tag} went back from {last[tag]} to {i}")
    last[tag] = i
    seen += 1
json.dump({"seen": seen, "last": last}, open(out, "w"))
"""


def value_hosts(server, bridges, hosts, extra=()):
    prefix = new_prefix()
    started = [
        bridges(server.url, prefix, [f"{host_name(h, 'v')}=v", *extra], f"host{h}") for h in range(hosts)
    ]
    return prefix, started


def final_values(server, prefix, hosts):
    def read():
        values = [shmemext.Value(host_name(h, "v")).get() for h in range(hosts)]
        stored = server.client().hmget(f"{prefix}value:v", ["version", "kind", "data"])
        return values, stored

    values, (version, kind, data) = settle(read)
    want = data.decode() if kind == b"s" else data
    assert values == [want] * hosts, (values, want)
    return int(version)


def test_a_set_reaches_the_other_host_with_its_type(server, bridges):
    prefix, _ = value_hosts(server, bridges, 2)
    a, b = shmemext.Value(host_name(0, "v")), shmemext.Value(host_name(1, "v"))
    seen = b.version
    a.set("h\u00e9llo \udc80")   # a lone surrogate travels too
    seen = b.wait(seen, timeout=10)
    assert b.get() == "h\u00e9llo \udc80"
    a.set(b"\x00bytes")
    b.wait(seen, timeout=10)
    assert b.get() == b"\x00bytes"
    # A set on b goes back to a, and nothing echoes.
    b.set("from b")
    deadline = time.monotonic() + 10
    while a.get() != "from b":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert final_values(server, prefix, 2) == 3


def test_interleaved_sets_from_two_hosts_end_the_same_everywhere(server, bridges, tmp_path):
    hosts, per_writer = 2, 5000
    prefix, _ = value_hosts(server, bridges, hosts)
    readers = [run(READER, host_name(h, "v"), tmp_path / f"r{h}.json") for h in range(hosts)]
    time.sleep(0.3)
    writers = [run(WRITER, host_name(h, "v"), f"w{h}", per_writer) for h in range(hosts)]
    for w in writers:
        assert w.wait(120) == 0
    version = final_values(server, prefix, hosts)
    # Nothing echoed: Redis ordered no more versions than there were sets.
    assert 1 <= version <= hosts * per_writer
    for r in readers:
        assert r.wait(60) == 0
    for h in range(hosts):
        report = json.loads((tmp_path / f"r{h}.json").read_text())
        assert report["seen"] > 0
        # A host's own writer's last value was seen there.
        assert report["last"][f"w{h}"] == per_writer - 1


@pytest.mark.parametrize("keep_data", [True, False], ids=["restarted", "restarted-empty"])
def test_redis_killed_in_the_middle_then_caught_up(server, bridges, tmp_path, keep_data):
    hosts = 2
    prefix, started = value_hosts(server, bridges, hosts)
    writers = [run(WRITER, host_name(h, "v"), f"w{h}", 3000) for h in range(hosts)]
    time.sleep(0.3)
    server.kill()
    if not keep_data:
        server.wipe()
    time.sleep(1.0)   # local work goes on meanwhile
    server.start()
    for w in writers:
        assert w.wait(120) == 0
    for b in started:
        wait_for_log(b, "connected again")
        assert "unreachable" in "".join(b.log)
    final_values(server, prefix, hosts)


def test_a_bridge_killed_and_restarted_catches_up(server, bridges):
    prefix, started = value_hosts(server, bridges, 2)
    a, b = shmemext.Value(host_name(0, "v")), shmemext.Value(host_name(1, "v"))
    writer = run(WRITER, host_name(0, "v"), "w0", 3000)
    time.sleep(0.3)
    started[1].kill()
    time.sleep(0.5)
    started[1].start()
    assert writer.wait(120) == 0
    final_values(server, prefix, 2)
    # The bridge down again; a set on its host meanwhile goes out when it is back.
    started[1].kill()
    b.set("while b's bridge was down")
    started[1].start()
    deadline = time.monotonic() + 10
    while a.get() != "while b's bridge was down":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # And a restart with nothing new locally adopts what Redis has.
    started[1].kill()
    a.set("while b's bridge was down, from a")
    time.sleep(0.3)
    started[1].start()
    final_values(server, prefix, 2)
    assert b.get() == "while b's bridge was down, from a"


def wait_value(v, want, timeout=10):
    deadline = time.monotonic() + timeout
    while v.get() != want:
        assert time.monotonic() < deadline, f"{v.name} holds {v.get()!r}, not {want!r}"
        time.sleep(0.01)


def test_a_value_too_big_for_a_host_is_said_and_skipped_there(server, bridges):
    prefix = new_prefix()
    small = shmemext.Value(host_name(1, "v"), 16)
    big = shmemext.Value(host_name(0, "v"), 4096)
    bridges(server.url, prefix, [f"{host_name(0, 'v')}=v"], "host0")
    b = bridges(server.url, prefix, [f"{host_name(1, 'v')}=v"], "host1")
    big.set("x" * 100)
    wait_for_log(b, "does not fit")
    big.set("fits")
    wait_value(small, "fits")
    assert b.proc.poll() is None


def test_a_restart_tells_an_applied_value_from_a_local_set(server, bridges):
    """What a bridge last told Redis decides, after a SIGKILL, whether the
    local value is news: a value it applied is not passed on again (which
    would undo a newer one), a local set is."""
    from shmemext.bridge import _digest

    prefix, started = value_hosts(server, bridges, 2)
    a, b = shmemext.Value(host_name(0, "v")), shmemext.Value(host_name(1, "v"))
    a.set("one")
    wait_value(b, "one")
    client = server.client()
    key, field = f"{prefix}value:v", "seen:host1"
    settle(lambda: client.hget(key, field))
    assert client.hget(key, field).decode() == f"{b.version} {_digest(b's', b'one')}"
    started[1].kill()
    a.set("two")              # newer than what b holds, while b's bridge is away
    time.sleep(0.2)
    started[1].start()
    wait_value(b, "two")
    time.sleep(0.3)
    assert a.get() == "two"   # not undone by b's "one"
    # Killed after telling Redis it would apply "three" as the next version,
    # before applying it; then one local set on b takes that version number.
    started[1].kill()
    client.hset(key, field, f"{b.version + 1} {_digest(b's', b'three')}")
    b.set("b's own")
    started[1].start()
    wait_value(a, "b's own")
    final_values(server, prefix, 2)


# Writes until told to stop, a number a set.
ENDLESS_WRITER = """
import sys, time, shmemext
v = shmemext.Value(sys.argv[1])
tag, stop = sys.argv[2], shmemext.Value(sys.argv[3])
i = 0
while stop.get() != "stop":
    v.set(f"{tag}:{i}" if i % 2 else f"{tag}:{i}".encode())
    i += 1
    time.sleep(0.0005)
v.set(f"{tag}:{i}" if i % 2 else f"{tag}:{i}".encode())
"""


def test_bridges_killed_again_and_again_while_three_hosts_write(server, bridges, tmp_path):
    """Every SHMEMEXT_BRIDGE_SOAK seconds (6 by default), one of three hosts'
    bridges is SIGKILLed and restarted, while a writer on each host sets
    and a reader on each host checks that no writer's numbers go back."""
    import random

    hosts, seconds = 3, float(os.environ.get("SHMEMEXT_BRIDGE_SOAK", "6"))
    prefix, started = value_hosts(server, bridges, hosts)
    stop = host_name(9, "stop")
    stopper = shmemext.Value(stop)
    readers = [run(READER, host_name(h, "v"), tmp_path / f"r{h}.json") for h in range(hosts)]
    writers = [run(ENDLESS_WRITER, host_name(h, "v"), f"w{h}", stop) for h in range(hosts)]
    rng = random.Random(7)
    kills = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        b = started[rng.randrange(hosts)]
        time.sleep(rng.uniform(0, 0.3))
        b.kill()
        kills += 1
        time.sleep(rng.uniform(0, 0.2))
        b.start()
    stopper.set("stop")
    for w in writers:
        assert w.wait(60) == 0
    version = final_values(server, prefix, hosts)
    for r in readers:
        assert r.wait(60) == 0, "a reader saw a writer's numbers go back (see its output)"
    seen = [json.loads((tmp_path / f"r{h}.json").read_text())["seen"] for h in range(hosts)]
    print(f"{kills} bridges killed; {version} versions in Redis; values seen per host {seen}")
    stopper.close()


PRODUCER = """
import sys, shmemext
q = shmemext.Queue(sys.argv[1], 1 << 20)
tag, n = sys.argv[2], int(sys.argv[3])
for i in range(n):
    m = f"{tag}:{i}"
    q.put(m if i % 3 == 0 else m.encode() if i % 3 == 1 else {"m": m})
"""

CONSUMER = """
import sys, shmemext, queue
q = shmemext.Queue(sys.argv[1], 1 << 20)
with open(sys.argv[2], "w") as out:
    while True:
        try:
            got = q.get_many(256, timeout=0.2)
        except queue.Empty:
            continue
        for m in got:
            m = m["m"] if isinstance(m, dict) else m.decode() if isinstance(m, bytes) else m
            if m == "stop":
                sys.exit(0)
            out.write(m + "\\n")
        out.flush()
"""


def test_queue_from_two_hosts_to_three_with_bridges_killed(server, bridges, tmp_path):
    per_producer = 50_000
    prefix = new_prefix()
    send = [(0, "out"), (1, "out")]
    receive = [0, 1, 2]
    started = {}
    for h in range(3):
        args = ["--claim-after", "2"]
        if (h, "out") in send:
            args += ["--send", f"{host_name(h, 'out')}=jobs"]
        args += ["--receive", f"{host_name(h, 'in')}=jobs", "--capacity", str(1 << 20)]
        started[h] = bridges(server.url, prefix, args, f"host{h}")
    outputs = {h: tmp_path / f"c{h}.txt" for h in receive}
    consumers = {h: run(CONSUMER, host_name(h, "in"), outputs[h]) for h in receive}
    held = [shmemext.Queue(host_name(h, "out"), 1 << 20) for h, _ in send]   # see below
    producers = [run(PRODUCER, host_name(h, "out"), f"p{h}", per_producer) for h, _ in send]

    def taken():
        return lines_in(outputs.values())

    # Mid-way: host 1's bridge (a sender and a receiver) is killed and
    # restarted; host 2's receiving bridge is killed for good, and what it
    # had read and not acknowledged is claimed by the others.
    while len(taken()) < per_producer // 2:
        time.sleep(0.05)
    started[1].kill()
    started[2].kill()
    time.sleep(0.5)
    started[1].start()
    for p in producers:
        assert p.wait(120) == 0
    want = {f"p{h}:{i}" for h, _ in send for i in range(per_producer)}
    deadline = time.monotonic() + 60
    while not want <= set(taken()):
        assert time.monotonic() < deadline, f"{len(want - set(taken()))} messages never arrived"
        time.sleep(0.2)
    time.sleep(0.5)
    for h in receive:
        shmemext.Queue(host_name(h, "in")).put("stop")
    for h in (0, 1):
        assert consumers[h].wait(20) == 0
    consumers[2].kill()
    consumers[2].wait()
    lines = taken()
    assert set(lines) == want, "a message arrived that nobody put"
    duplicates = len(lines) - len(set(lines))
    print(f"{len(want)} messages, {duplicates} delivered twice")
    # At least once: duplicates only from the bridges killed between a
    # local put and its acknowledgement, a batch each at most.
    assert duplicates <= 4 * 256
    # Nothing left behind in Redis: every message acknowledged and deleted.
    client = server.client()
    assert settle(lambda: client.xlen(f"{prefix}queue:jobs")) == 0
    for q in held:
        q.close()


def test_queue_with_bridges_killed_again_and_again(server, bridges, tmp_path):
    """Two hosts put, three take; one bridge SIGKILLed and restarted after
    another for SHMEMEXT_BRIDGE_SOAK seconds (6 by default): every message
    arrives, none that nobody put."""
    import random

    seconds = float(os.environ.get("SHMEMEXT_BRIDGE_SOAK", "6"))
    per_producer = 20_000
    prefix = new_prefix()
    started = {}
    for h in range(3):
        args = ["--claim-after", "1", "--capacity", str(1 << 20), "--receive", f"{host_name(h, 'in')}=jobs"]
        if h < 2:
            args += ["--send", f"{host_name(h, 'out')}=jobs"]
        started[h] = bridges(server.url, prefix, args, f"host{h}")
    outputs = {h: tmp_path / f"c{h}.txt" for h in range(3)}
    consumers = {h: run(CONSUMER, host_name(h, "in"), outputs[h]) for h in range(3)}
    # Held here, as `python -m shmemext hold` would: a queue that nobody
    # holds is freed by the kernel with its messages, and a producer that
    # has finished while its bridge is dead would leave nobody.
    held = [shmemext.Queue(host_name(h, "out"), 1 << 20) for h in range(2)]
    rng = random.Random(11)
    kills = 0
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        producers = [run(PRODUCER, host_name(h, "out"), f"r{rounds}p{h}", per_producer) for h in range(2)]
        while any(p.poll() is None for p in producers):
            b = started[rng.randrange(3)]
            time.sleep(rng.uniform(0, 0.4))
            b.kill()
            kills += 1
            time.sleep(rng.uniform(0, 0.2))
            b.start()
        for p in producers:
            assert p.wait(120) == 0
        rounds += 1
    want = {f"r{r}p{h}:{i}" for r in range(rounds) for h in range(2) for i in range(per_producer)}

    def taken():
        return lines_in(outputs.values())

    deadline = time.monotonic() + 90
    while not want <= set(taken()):
        if time.monotonic() > deadline:
            for c in consumers.values():
                c.kill()
                c.wait()
            client = server.client()
            key = f"{prefix}queue:jobs"
            missing = sorted(want - set(taken()))
            raise AssertionError(
                f"{len(missing)} of {len(want)} messages never arrived, e.g. {missing[:3]}; stream length "
                f"{client.xlen(key)}, pending {client.xpending(key, f'{prefix}bridges')}, queues "
                f"{[shmemext.Queue(host_name(h, q)).qsize() for h in range(3) for q in ('out', 'in')]}")
        time.sleep(0.2)
    time.sleep(0.5)
    for h in range(3):
        shmemext.Queue(host_name(h, "in")).put("stop")
    for c in consumers.values():
        assert c.wait(20) == 0
    lines = taken()
    assert set(lines) == want, "a message arrived that nobody put"
    print(f"{len(want)} messages, {kills} bridges killed, {len(lines) - len(want)} delivered twice")
    for q in held:
        q.close()


def test_queue_through_a_redis_killed_in_the_middle(server, bridges, tmp_path):
    n = 20_000
    prefix = new_prefix()
    sender = bridges(server.url, prefix, ["--send", f"{host_name(0, 'out')}=jobs"], "host0")
    receiver = bridges(server.url, prefix, ["--receive", f"{host_name(1, 'in')}=jobs"], "host1")
    out = tmp_path / "c.txt"
    consumer = run(CONSUMER, host_name(1, "in"), out)
    producer = run(PRODUCER, host_name(0, "out"), "p", n)

    def taken():
        return lines_in([out])

    while len(taken()) < n // 4:
        time.sleep(0.02)
    server.kill()
    time.sleep(0.5)
    server.start()
    assert producer.wait(120) == 0
    want = {f"p:{i}" for i in range(n)}
    deadline = time.monotonic() + 60
    while not want <= set(taken()):
        assert time.monotonic() < deadline, f"{len(want - set(taken()))} messages never arrived"
        time.sleep(0.1)
    shmemext.Queue(host_name(1, "in")).put("stop")
    assert consumer.wait(20) == 0
    lines = taken()
    assert set(lines) == want
    print(f"{n} messages, {len(lines) - len(want)} delivered twice")
    for b in (sender, receiver):
        wait_for_log(b, "connected again")


def test_hostile_entries_are_dropped_and_said(server, bridges):
    prefix = new_prefix()
    b = bridges(server.url, prefix, ["--receive", f"{host_name(0, 'in')}=q", f"{host_name(0, 'v')}=v"], "host0")
    q = shmemext.Queue(host_name(0, "in"))
    v = shmemext.Value(host_name(0, "v"))
    client = server.client()
    client.xadd(f"{prefix}queue:q", {"k": "99", "d": b"x"})
    client.xadd(f"{prefix}queue:q", {"nothing": "here"})
    client.xadd(f"{prefix}queue:q", {"k": "7", "d": b"\xff" * 40})   # a framed pickle that is not one
    client.xadd(f"{prefix}queue:q", {"k": "0", "d": b"\xff\xfe not UTF-8"})
    client.xadd(f"{prefix}queue:q", {"k": "1", "d": b"fine"})
    client.publish(f"{prefix}value:v", b"not a version")
    client.publish(f"{prefix}value:v", b"99 someone z data")
    client.publish(f"{prefix}value:v", b"98 someone s \xff")
    # The bad pickle reached the queue as bytes-to-be-loaded, never loaded by
    # the bridge; loading it here is refused as corrupt.
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        try:
            got.append(q.get(timeout=0.2))
        except shmemext.CorruptBlockError as e:
            got.append(e)
        except queue.Empty:
            pass
    assert [type(g) for g in got] == [shmemext.CorruptBlockError, bytes], got
    assert v.version == 0
    time.sleep(0.3)
    log = "".join(b.log)
    assert "kind b'99'" in log and "kind b''" in log and "not 'version origin kind data'" in log, log
    assert "kind b'z'" in log and log.count("not UTF-8") == 2, log
    assert b.proc.poll() is None
    # A hash whose version is not a number stops the bridge's session, not the bridge.
    client.hset(f"{prefix}value:v", "version", "many")
    client.publish(f"{prefix}value:v", b"97 someone s fine")   # a version 97 after the garbage is applied
    deadline = time.monotonic() + 10
    while v.get() != "fine":
        assert time.monotonic() < deadline, "".join(b.log)
        time.sleep(0.02)
    server.kill()
    time.sleep(0.3)
    server.start()
    wait_for_log(b, "holds version b'many', not a number")
    client.hset(f"{prefix}value:v", "version", "5")
    wait_for_log(b, "connected again")
    assert b.proc.poll() is None


def test_tls_and_a_password_never_printed(tmp_path, bridges):
    secret = "s3cret-Pa55"
    s = RedisServer(tmp_path, password=secret, tls=True)
    try:
        prefix = new_prefix()
        b = bridges(s.url, prefix, [f"{host_name(0, 'v')}=v"], "host0")
        bridges(s.url, prefix, [f"{host_name(1, 'v')}=v"], "host1")
        shmemext.Value(host_name(0, "v")).set("over TLS")
        deadline = time.monotonic() + 10
        while shmemext.Value(host_name(1, "v")).get() != "over TLS":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        s.kill()
        time.sleep(0.5)
        s.start()
        wait_for_log(b, "connected again")
        b.stop()
        log = "".join(b.log)
        assert secret not in log and ":***@" in log, log
        # A wrong password: an error, and still not the password.
        wrong = s.url.replace(secret, "wrong-" + secret)
        proc = subprocess.Popen([sys.executable, "-m", "shmemext", "bridge", "--redis", wrong, "--id", "x",
                                 host_name(1, "v")], stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert "unreachable" in err and "AuthenticationError" in err, err
        assert secret not in err
    finally:
        s.kill()


def test_the_library_and_asyncio(server):
    import asyncio

    from shmemext.bridge import Bridge

    prefix = new_prefix()
    a, b = host_name(0, "v"), host_name(1, "v")
    with Bridge(server.url, [f"{a}=v"], prefix=prefix, bridge_id="a") as one, \
            Bridge(server.url, [f"{b}=v"], prefix=prefix, bridge_id="b") as two:
        t = threading.Thread(target=one.run)
        t.start()

        async def main():
            task = asyncio.ensure_future(two.run_async())
            vb = shmemext.Value(b)
            seen = vb.version
            shmemext.Value(a).set("async")
            for _ in range(100):
                if vb.get() == "async":
                    break
                seen = await vb.wait_async(seen, timeout=10)
            assert vb.get() == "async"
            two.close()
            await asyncio.wait_for(task, 10)

        asyncio.run(main())
        one.close()
        t.join(10)
        assert not t.is_alive()


def test_bad_arguments(server, name):
    from shmemext.bridge import Bridge

    q = shmemext.Queue(name)
    with pytest.raises(ValueError, match="is a Queue: bridge it with send= or receive="):
        Bridge(server.url, [name])
    with pytest.raises(ValueError, match="nothing to bridge"):
        Bridge(server.url)
    with pytest.raises(ValueError, match="expected NAME or LOCAL=REMOTE"):
        Bridge(server.url, ["x="])
    with pytest.raises(ValueError, match="named twice"):
        Bridge(server.url, send=[name], receive=[name])
    with pytest.raises(ValueError, match="claim_after"):
        Bridge(server.url, send=[name], claim_after=0)
    q.close()
    p = subprocess.run([sys.executable, "-m", "shmemext", "bridge", name], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "SHMEMEXT_REDIS_URL"})
    assert p.returncode == 2 and "--redis URL is required" in p.stderr
    p = subprocess.run([sys.executable, "-m", "shmemext", "bridge", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--send" in p.stdout and "--receive" in p.stdout
    # Without redis-py: the core module never needs it; the bridge says what to install.
    code = ("import sys; sys.modules['redis'] = None; import shmemext, shmemext.bridge; "
            "from shmemext.__main__ import main; sys.exit(main(['bridge', '--redis', 'redis://127.0.0.1:1/0', 'v']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 2 and "pip install 'shmemext[redis]'" in p.stderr, p.stderr
