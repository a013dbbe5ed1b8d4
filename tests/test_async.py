"""Value.wait_async() and Value.changes(): asyncio consumers in real separate processes."""

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import shmemext
from shmemext import _shmemext

from conftest import ours, python

try:
    import uvloop
except ImportError:  # not built for every platform and CPython
    uvloop = None

LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


def run(coro, loop_kind="asyncio"):
    if loop_kind == "uvloop":
        return uvloop.run(coro)
    return asyncio.run(coro)


def watchers():
    return sum(1 for t in threading.enumerate() if t.name == "shmemext-watcher")


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


CONSUMER = """
import asyncio, json, sys, threading, time
import shmemext
base, count, final = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
values = [shmemext.Value(f"{base}-{i}", 64) for i in range(count)]

async def consume(v):
    seen, got = v.version, []
    while seen < final:
        seen = await v.wait_async(seen, timeout=60)
        got.append(seen)
    return got

async def main():
    tasks = [asyncio.ensure_future(consume(v)) for v in values]
    await asyncio.sleep(0.2)
    threads = threading.active_count()
    print("ready", threads, flush=True)
    results = await asyncio.gather(*tasks)
    await asyncio.sleep(0.5)  # a watcher keeps watching a Value for a moment after its last request
    waiters = [v._waiters for v in values]
    print(json.dumps({"threads": threads, "results": results, "waiters": waiters}), flush=True)

asyncio.run(main())
"""

PRODUCER = """
import sys, time
import shmemext
base, count, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
values = [shmemext.Value(f"{base}-{i}", 64) for i in range(count)]
for r in range(rounds):
    for v in values:
        v.set(f"round {r}")
    time.sleep(0.002)
"""


@pytest.mark.parametrize("count", [1, 10, 1000])
def test_async_consumers_in_another_process_see_every_version_or_a_later_one(name, count):
    rounds = 20 if count < 1000 else 5
    # The test holds the blocks, so versions only grow from 0 to `rounds`.
    held = [shmemext.Value(f"{name}-{i}", 64) for i in range(count)]
    try:
        consumer = subprocess.Popen(
            [sys.executable, "-c", CONSUMER, name, str(count), str(rounds)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = consumer.stdout.readline()
        assert line.startswith("ready"), consumer.stderr.read()
        threads = int(line.split()[1])
        assert threads <= 1 + math.ceil(count / _shmemext._WAIT_ANY_MAX), f"{threads} threads for {count} tasks"
        python(PRODUCER, name, str(count), str(rounds), timeout=120)
        out, err = consumer.communicate(timeout=120)
        assert consumer.returncode == 0, err
        report = json.loads(out)
        for got in report["results"]:
            assert got == sorted(set(got)) and got[-1] == rounds and all(1 <= v <= rounds for v in got)
        assert report["waiters"] == [0] * count
        assert all(v.version == rounds for v in held)
    finally:
        for v in held:
            v.close()
    assert not [n for n in ours() if n.startswith(f"{name}-")]


def test_consumers_keep_working_when_the_producer_is_sigkilled_mid_stream(name):
    count = 10
    held = [shmemext.Value(f"{name}-{i}", 64) for i in range(count)]
    consumer_code = """
import asyncio, sys
import shmemext
base, count = sys.argv[1], int(sys.argv[2])
values = [shmemext.Value(f"{base}-{i}", 64) for i in range(count)]

async def consume(v):
    seen = v.version
    while True:
        seen = await v.wait_async(seen, timeout=60)
        if v.get() == "done":
            return seen

async def main():
    tasks = [asyncio.ensure_future(consume(v)) for v in values]
    await asyncio.sleep(0.2)
    print("ready", flush=True)
    print(sum(1 for _ in await asyncio.gather(*tasks)), flush=True)

asyncio.run(main())
"""
    try:
        consumer = subprocess.Popen(
            [sys.executable, "-c", consumer_code, name, str(count)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert consumer.stdout.readline().strip() == "ready", consumer.stderr.read()
        producer = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent("""
                import sys, shmemext
                values = [shmemext.Value(f"{sys.argv[1]}-{i}", 64) for i in range(int(sys.argv[2]))]
                print("go", flush=True)
                n = 0
                while True:
                    n += 1
                    for v in values:
                        v.set("x" * (n % 60))
            """), name, str(count)],
            stdout=subprocess.PIPE, text=True,
        )
        assert producer.stdout.readline().strip() == "go"
        time.sleep(0.3)
        producer.send_signal(signal.SIGKILL)
        producer.wait()
        producer.stdout.close()
        assert consumer.poll() is None, "the consumers must still be waiting"
        for v in held:
            v.set("done")
        out, err = consumer.communicate(timeout=60)
        assert consumer.returncode == 0 and out.split()[-1] == str(count), err
    finally:
        for v in held:
            v.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_wait_async_returns_the_new_version_set_by_another_process(name, loop_kind):
    with shmemext.Value(name, 64) as v:
        async def main():
            seen = v.version
            setter = asyncio.get_running_loop().run_in_executor(
                None, lambda: python(f"import shmemext; shmemext.Value({name!r}).set('hi')")
            )
            now = await v.wait_async(seen, timeout=30)
            await setter
            return seen, now
        seen, now = run(main(), loop_kind)
        assert now == seen + 1 and v.get() == "hi"


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_timeouts(name, loop_kind):
    with shmemext.Value(name, 64) as v:
        async def main():
            start = time.monotonic()
            with pytest.raises(TimeoutError, match=rf"after 0.2 s .* Value '{name}' \(still version 0\)"):
                await v.wait_async(timeout=0.2)
            took = time.monotonic() - start
            with pytest.raises(TimeoutError):
                await v.wait_async(timeout=0)  # a poll
            v.set("a")
            assert await v.wait_async(0, timeout=0) == 1  # differs already: at once
            assert await v.wait_async(0) == 1
            return took
        took = run(main(), loop_kind)
        assert 0.19 <= took < 5
        assert wait_until(lambda: v._waiters == 0)


def test_bad_arguments_are_refused_at_the_call(name):
    with shmemext.Value(name, 64) as v:
        with pytest.raises(TypeError, match="'version' must be an int or None, not str"):
            v.wait_async("1")
        with pytest.raises(ValueError, match=r"version -1 is out of range"):
            v.wait_async(-1)
        with pytest.raises(ValueError, match=r"version 18446744073709551616 is out of range"):
            v.wait_async(1 << 64)
        with pytest.raises(TypeError, match="'timeout' must be None or a number of seconds, not str"):
            v.wait_async(None, "1")
        with pytest.raises(ValueError, match=r"timeout must be .* >= 0, not -1"):
            v.wait_async(timeout=-1)
        with pytest.raises(ValueError, match=r"not nan"):
            v.wait_async(timeout=float("nan"))
        with pytest.raises(TypeError):
            v.wait_async(1, 2, 3)
        with pytest.raises(TypeError, match="unexpected keyword"):
            v.wait_async(versoin=1)
        with pytest.raises(TypeError, match="'version' must be an int or None"):
            v.changes(1.5)
        with pytest.raises(TypeError, match="needs a Value"):
            shmemext._aio.wait_async(object())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_cancelling_leaves_no_thread_and_no_waiter_behind(name, loop_kind):
    with shmemext.Value(name, 64) as v:
        async def main():
            tasks = [asyncio.ensure_future(v.wait_async()) for _ in range(5)]
            await asyncio.sleep(0.1)
            counted = v._waiters
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            return counted
        # One watcher sleeps for all five tasks (a polling one counts no waiter).
        assert run(main(), loop_kind) == _shmemext._WAIT_ANY_SLEEPS
        assert wait_until(lambda: v._waiters == 0), "the watcher still counts itself a waiter"
        assert wait_until(lambda: watchers() == 0), "the watcher thread did not end"
        # And a set() afterwards finds nothing to wake, and breaks nothing.
        v.set("after")
        assert v.get() == "after"


def test_a_timed_out_wait_leaves_no_waiter_behind(name):
    with shmemext.Value(name, 64) as v:
        async def main():
            with pytest.raises(TimeoutError):
                await v.wait_async(timeout=0.05)
        asyncio.run(main())
        assert wait_until(lambda: v._waiters == 0)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_close_ends_pending_async_waits_with_closed_error(name, loop_kind):
    v = shmemext.Value(name, 64)

    async def main():
        tasks = [asyncio.ensure_future(v.wait_async()) for _ in range(3)]
        gen = v.changes()
        stream = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.1)
        start = time.monotonic()
        v.close()
        took = time.monotonic() - start
        results = await asyncio.wait_for(asyncio.gather(*tasks, stream, return_exceptions=True), 10)
        return took, results
    took, results = run(main(), loop_kind)
    assert took < 1.0, f"close() waited {took:.3f} s for the watcher"
    for r in results:
        assert isinstance(r, shmemext.ClosedError) and isinstance(r, ValueError), r
    with pytest.raises(shmemext.ClosedError):
        v.wait_async()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_changes_yields_new_versions_and_skips_what_it_was_too_slow_for(name, loop_kind):
    with shmemext.Value(name, 64) as v:
        async def main():
            seen = []
            stream = v.changes()

            def produce():
                for i in range(5):
                    time.sleep(0.02)
                    v.set(str(i))
            producer = threading.Thread(target=produce)
            producer.start()
            async for version in stream:
                seen.append(version)
                if version >= 5:
                    break
            producer.join()
            # Slow: three sets while nobody looks come out as one, the last.
            for i in range(3):
                v.set(f"late {i}")
            seen.append(await stream.__anext__())
            await stream.aclose()
            return seen
        seen = run(main(), loop_kind)
        assert seen == sorted(set(seen)) and seen[-2] == 5 and seen[-1] == 8


def test_the_default_block_has_them_too():
    async def main():
        seen = shmemext.default.version
        waiting = asyncio.ensure_future(shmemext.wait_async())
        stream = shmemext.changes()
        await asyncio.sleep(0.05)
        shmemext.set("default")
        return seen, await asyncio.wait_for(waiting, 10), await asyncio.wait_for(stream.__anext__(), 10)
    seen, now, streamed = asyncio.run(main())
    assert now == streamed == seen + 1


def test_many_tasks_on_one_value_share_one_watcher(name):
    with shmemext.Value(name, 64) as v:
        async def main():
            tasks = [asyncio.ensure_future(v.wait_async()) for _ in range(500)]
            await asyncio.sleep(0.1)
            counts = (watchers(), v._waiters)
            v.set("everyone")
            return counts, await asyncio.wait_for(asyncio.gather(*tasks), 10)
        (threads, counted), results = asyncio.run(main())
        assert threads == 1 and counted == _shmemext._WAIT_ANY_SLEEPS
        assert results == [1] * 500


def test_many_values_take_few_threads(name):
    count = 2 * _shmemext._WAIT_ANY_MAX + 1
    values = [shmemext.Value(f"{name}-{i}", 64) for i in range(count)]
    try:
        async def main():
            tasks = [asyncio.ensure_future(v.wait_async()) for v in values]
            await asyncio.sleep(0.2)
            threads = watchers()
            for v in reversed(values):
                v.set("x")
            return threads, await asyncio.wait_for(asyncio.gather(*tasks), 30)
        threads, results = asyncio.run(main())
        assert threads == 3 and results == [1] * count
    finally:
        for v in values:
            v.close()


def test_tasks_on_several_loops_in_several_threads(name):
    with shmemext.Value(name, 64) as v:
        results = []

        def on_its_own_loop():
            results.append(asyncio.run(v.wait_async(0, timeout=30)))
        threads = [threading.Thread(target=on_its_own_loop) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        v.set("all loops")
        for t in threads:
            t.join(30)
        assert results == [1] * 4


def _open_fds():
    return len(os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"))


@pytest.mark.skipif(sys.platform == "win32", reason="Windows loops are answered with call_soon_threadsafe")
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_each_loop_is_woken_through_a_descriptor_of_its_own_closed_with_it(name, loop_kind):
    """The watcher wakes a loop by writing its door (an eventfd on Linux, a
    pipe elsewhere), read by the loop itself; a loop's door closes once the
    loop is gone, so loops run one after another leave no descriptor behind."""
    import gc

    from shmemext import _aio

    with shmemext.Value(name, 64) as v:
        async def one_wait():
            door = _aio._door_of(asyncio.get_running_loop())
            assert door is not None
            if sys.platform.startswith("linux"):
                assert os.readlink(f"/proc/self/fd/{door.read_fd}") == "anon_inode:[eventfd]"
            seen = v.version
            threading.Timer(0.01, v.set, ("x",)).start()
            return await v.wait_async(seen, timeout=10) - seen

        assert run(one_wait(), loop_kind) == 1  # the first makes what stays (a watcher, imports)
        gc.collect()
        before = _open_fds()
        for _ in range(20):
            assert run(one_wait(), loop_kind) == 1
        gc.collect()
        assert _open_fds() <= before + 1


def test_a_loop_that_cannot_watch_a_descriptor_is_answered_all_the_same(name):
    """A loop without add_reader (the Windows proactor's kind) is handed its
    answers with call_soon_threadsafe."""
    from shmemext import _aio

    class NoReaders(asyncio.SelectorEventLoop):
        def add_reader(self, fd, callback, *args):
            raise NotImplementedError

    with shmemext.Value(name, 64) as v:
        async def waits():
            assert _aio._door_of(asyncio.get_running_loop()) is None
            seen = v.version
            threading.Timer(0.05, v.set, ("x",)).start()
            return await v.wait_async(seen, timeout=10) - seen

        loop = NoReaders()
        try:
            assert loop.run_until_complete(waits()) == 1
        finally:
            loop.close()


def test_a_loop_whose_door_cannot_be_made_is_answered_all_the_same(name, monkeypatch):
    """Out of descriptors (EMFILE) when a loop's door is made: this wait is
    answered with call_soon_threadsafe, and a later one makes the door."""
    import errno

    from shmemext import _aio

    class NoDescriptors:
        def __init__(self, loop):
            raise OSError(errno.EMFILE, "Too many open files")

    with shmemext.Value(name, 64) as v:
        async def waits():
            seen = v.version
            threading.Timer(0.05, v.set, ("x",)).start()
            return await v.wait_async(seen, timeout=10) - seen

        async def twice():
            monkeypatch.setattr(_aio, "_Door", NoDescriptors)
            assert await waits() == 1
            assert asyncio.get_running_loop() not in _aio._doors
            monkeypatch.undo()
            assert await waits() == 1
            return _aio._doors.get(asyncio.get_running_loop()) is not None or sys.platform == "win32"

        assert asyncio.run(twice())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_fork_child_waits_with_watchers_of_its_own(name):
    with shmemext.Value(name, 64) as v:
        async def parent_waits():
            return await v.wait_async(timeout=0.05)
        with pytest.raises(TimeoutError):
            asyncio.run(parent_waits())  # leaves a lingering watcher thread behind
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)

                async def child():
                    waiting = asyncio.ensure_future(v.wait_async(timeout=20))
                    await asyncio.sleep(0.05)
                    os.write(w, b"w")
                    return await waiting
                code = 0 if asyncio.run(child()) == 1 else 2
            finally:
                os._exit(code)
        os.close(w)
        assert os.read(r, 1) == b"w"
        os.close(r)
        v.set("to the child")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
