"""Named shared-memory blocks that live exactly as long as a process holds them.

Importing this package maps the default block (named by ``SHMEMEXT_NAME``,
sized by ``SHMEMEXT_SIZE``; ``SHMEMEXT_SIZE=0`` turns it off), the way a DLL
maps its shared section when a process loads it.  ``set``/``get`` copy a
value in and out of it; ``Value`` opens any number of other named cells.
"""

from types import ModuleType as _ModuleType

from ._version import __version__


def _load_extension() -> _ModuleType:
    try:
        from . import _shmemext
    except ImportError as missing:
        import os

        raise ImportError(
            f"shmemext's compiled module is missing from {os.path.dirname(__file__)}: this looks like "
            f"an unbuilt source tree. Install the package (pip install .) and run from another "
            f"directory, or build it in place (python setup.py build_ext --inplace)"
        ) from missing
    return _shmemext


_shmemext = _load_extension()

if _shmemext.__version__ != __version__:
    raise ImportError(
        f"shmemext's compiled module is version {_shmemext.__version__} but the "
        f"package is {__version__}: the build is stale; reinstall shmemext"
    )

from ._shmemext import (  # noqa: E402
    _C_API,
    DEFAULT_CAPACITY,
    MAX_CAPACITY,
    NAME_MAX,
    Segment,
    SegmentLock,
    Value,
    blocks,
    default,
    get,
    set,
    sweep,
    unlink,
    wait,
)

__all__ = [
    "DEFAULT_CAPACITY",
    "MAX_CAPACITY",
    "NAME_MAX",
    "Segment",
    "SegmentLock",
    "Value",
    "__version__",
    "blocks",
    "default",
    "get_include",
    "get",
    "set",
    "sweep",
    "unlink",
    "wait",
]


def get_include() -> str:
    """The directory holding shmemext.h, for extensions that use the C API:
    Extension(..., include_dirs=[shmemext.get_include()])."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")
