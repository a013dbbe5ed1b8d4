"""Named shared-memory blocks that live exactly as long as a process holds them.

Importing this package maps the default block (named by ``SHMEMEXT_NAME``,
sized by ``SHMEMEXT_SIZE``; ``SHMEMEXT_SIZE=0`` turns it off), the way a DLL
maps its shared section when a process loads it.  ``set``/``get`` copy a
value in and out of it; ``Value`` opens any number of other named cells.
"""

from ._version import __version__
from . import _shmemext

if _shmemext.__version__ != __version__:
    raise ImportError(
        f"shmemext's compiled module is version {_shmemext.__version__} but the "
        f"package is {__version__}: the build is stale; reinstall shmemext"
    )

from ._shmemext import (  # noqa: E402
    DEFAULT_CAPACITY,
    MAX_CAPACITY,
    NAME_MAX,
    Value,
    default,
    get,
    set,
    unlink,
)

__all__ = [
    "DEFAULT_CAPACITY",
    "MAX_CAPACITY",
    "NAME_MAX",
    "Value",
    "__version__",
    "default",
    "get",
    "set",
    "unlink",
]
