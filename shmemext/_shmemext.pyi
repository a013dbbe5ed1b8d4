# The compiled module: what the package re-exports (typed in __init__.pyi),
# and what only it has.
from typing import Final, final

from shmemext import (
    DEFAULT_CAPACITY as DEFAULT_CAPACITY,
    MAX_CAPACITY as MAX_CAPACITY,
    NAME_MAX as NAME_MAX,
    QUEUE_DEFAULT_CAPACITY as QUEUE_DEFAULT_CAPACITY,
    Queue as Queue,
    ClosedError as ClosedError,
    CorruptBlockError as CorruptBlockError,
    Error as Error,
    ForeignBlockError as ForeignBlockError,
    Segment as Segment,
    SegmentLock as SegmentLock,
    Value as Value,
    __version__ as __version__,
    _C_API as _C_API,
    blocks as blocks,
    default as default,
    get as get,
    set as set,
    sweep as sweep,
    unlink as unlink,
    wait as wait,
)

@final
class _Bell:
    def __init__(self) -> None: ...
    def ring(self) -> None: ...
    @property
    def rings(self) -> int: ...

_WAIT_ANY_MAX: Final[int]     # Values one _wait_any sleeps on
_WAIT_ANY_SLEEPS: Final[int]  # 1: in the kernel; 0: it looks every millisecond

def _wait_any(
    values: tuple[Value | Queue, ...],
    versions: tuple[int, ...],
    bell: _Bell,
    rings: int,
    timeout: float,
    room: tuple[bool, ...] = ...,
    /,
) -> list[int]: ...

_BACKEND: Final[str]   # which OS mechanism this build uses: "linux-sysv", "posix-lockfiles" or "win32"
