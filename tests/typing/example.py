"""Uses the public API the way a user would; checked by mypy --strict in CI."""

from __future__ import annotations

import shmemext


def roundtrip(name: str) -> str | bytes:
    with shmemext.Value(name, capacity=64, persist=False, mode=0o600) as cell:
        cell.set("text")
        cell.set(b"bytes")
        cell.set(bytearray(b"x"))
        version: int = cell.version
        created: bool = cell.created
        assert version >= 0 and created in (True, False)
        try:
            new: int = cell.wait(version, timeout=0.0)
        except TimeoutError:
            new = version
        assert new >= version
        return cell.get()


def raw(name: str) -> int:
    with shmemext.Segment(name, 4096, readonly=False) as seg:
        view = memoryview(seg)
        view[0] = 1
        view.release()
        with seg.lock(timeout=1.0) as lock:
            died: bool = lock.owner_died
            assert not died
        lock2: shmemext.SegmentLock = seg.lock()
        lock2.acquire(timeout=None)
        lock2.release()
        return seg.write(seg.read(4, offset=0), 4) + seg.size


def module_level() -> None:
    shmemext.set("x")
    value: str | bytes = shmemext.get()
    include: str = shmemext.get_include()
    default: shmemext.Value | None = shmemext.default
    print(value, include, default, shmemext.__version__, shmemext.DEFAULT_CAPACITY)
    shmemext.unlink("never-made")
