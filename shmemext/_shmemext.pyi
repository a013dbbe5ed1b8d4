# The compiled module: what the package re-exports (typed in __init__.pyi),
# and what only it has.
from typing import Final

from shmemext import (
    DEFAULT_CAPACITY as DEFAULT_CAPACITY,
    MAX_CAPACITY as MAX_CAPACITY,
    NAME_MAX as NAME_MAX,
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

_BACKEND: Final[str]   # which OS mechanism this build uses: "linux-sysv", "posix-lockfiles" or "win32"
