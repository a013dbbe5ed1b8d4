# The types as users meet them: shmemext.Value, not shmemext._shmemext.Value
# (the compiled module's stub re-exports these).
import sys
from collections.abc import AsyncIterator, Coroutine
from types import TracebackType
from typing import Any, Final, Literal, Protocol, TypedDict, final

from typing_extensions import Buffer, Self, TypeAlias

if sys.version_info >= (3, 12):
    _BytesLike: TypeAlias = Buffer
else:
    class _NumPyArray(Protocol):
        # NumPy's stubs give ndarray no __buffer__ before 3.12: its array interface stands for it.
        @property
        def __array_interface__(self) -> dict[str, Any]: ...

    _BytesLike: TypeAlias = Buffer | _NumPyArray

__all__ = [
    "ClosedError",
    "CorruptBlockError",
    "DEFAULT_CAPACITY",
    "Error",
    "ForeignBlockError",
    "MAX_CAPACITY",
    "NAME_MAX",
    "Segment",
    "SegmentLock",
    "Value",
    "__version__",
    "changes",
    "blocks",
    "default",
    "get_include",
    "get",
    "set",
    "sweep",
    "unlink",
    "wait",
    "wait_async",
]

__version__: Final[str]
_C_API: Final[object]  # a PyCapsule holding the C API table (shmemext.h)
DEFAULT_CAPACITY: Final[int]
MAX_CAPACITY: Final[int]
NAME_MAX: Final[int]

class Error(ValueError): ...
class ForeignBlockError(Error): ...
class CorruptBlockError(Error): ...
class ClosedError(Error): ...

@final
class Value:
    """A named value cell shared between processes."""

    def __new__(
        cls,
        name: str,
        capacity: int | None = None,
        *,
        persist: bool = False,
        mode: int = 0o600,
        scope: Literal["session", "global"] = "session",
        security: str | None = None,
        create: bool = True,
    ) -> Self: ...
    @property
    def name(self) -> str: ...
    @property
    def capacity(self) -> int: ...
    @property
    def created(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def version(self) -> int: ...
    @property
    def persist(self) -> bool: ...
    @property
    def holders(self) -> int | None: ...
    @property
    def _inflight(self) -> int: ...
    def get(self) -> str | bytes: ...
    def set(self, value: str | _BytesLike, /) -> None: ...
    def wait(self, version: int | None = None, timeout: float | None = None) -> int: ...
    def wait_async(self, version: int | None = None, timeout: float | None = None) -> Coroutine[object, object, int]: ...
    def changes(self, version: int | None = None) -> AsyncIterator[int]: ...
    @property
    def _waiters(self) -> int: ...
    def close(self) -> None: ...
    def _read_stats(self) -> tuple[int, int]: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> None: ...

@final
class Segment:
    """A named block of raw shared memory with the buffer protocol."""

    def __new__(
        cls,
        name: str,
        size: int,
        *,
        persist: bool = False,
        mode: int = 0o600,
        readonly: bool = False,
        scope: Literal["session", "global"] = "session",
        security: str | None = None,
        create: bool = True,
    ) -> Self: ...
    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def created(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def persist(self) -> bool: ...
    @property
    def holders(self) -> int | None: ...
    @property
    def readonly(self) -> bool: ...
    @property
    def _exports(self) -> int: ...
    @property
    def _inflight(self) -> int: ...
    def read(self, n: int = -1, offset: int = 0) -> bytes: ...
    def write(self, data: _BytesLike, offset: int = 0) -> int: ...
    def lock(self, timeout: float | None = None) -> SegmentLock: ...
    def close(self) -> None: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __release_buffer__(self, buffer: memoryview, /) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> None: ...

@final
class SegmentLock:
    """A Segment's cross-process lock; made by Segment.lock()."""

    @property
    def owner_died(self) -> bool: ...
    @property
    def segment(self) -> Segment: ...
    def acquire(self, timeout: float | None = None) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> None: ...

default: Final[Value | None]

def get() -> str | bytes: ...
def set(value: str | _BytesLike, /) -> None: ...
def wait(version: int | None = None, timeout: float | None = None) -> int: ...
def wait_async(version: int | None = None, timeout: float | None = None) -> Coroutine[object, object, int]: ...
def changes(version: int | None = None) -> AsyncIterator[int]: ...
def unlink(name: str, /) -> None: ...

class BlockInfo(TypedDict):
    name: str
    kind: Literal["value", "segment"] | None
    size: int
    capacity: int | None
    holders: int | None
    persist: bool | None
    alive: bool
    creator_pid: int | None
    created: float | None

def blocks() -> list[BlockInfo]: ...
def sweep() -> list[BlockInfo]: ...
def get_include() -> str: ...
