"""Named shared-memory blocks that live exactly as long as a process holds them.

Importing this package maps the default block (named by ``SHMEMEXT_NAME``,
sized by ``SHMEMEXT_SIZE``; ``SHMEMEXT_SIZE=0`` turns it off), the way a DLL
maps its shared section when a process loads it.  ``set``/``get`` copy a
value in and out of it; ``Value`` opens any number of other named cells.
"""

from types import ModuleType as _ModuleType
from typing import TYPE_CHECKING as _TYPE_CHECKING

if _TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine

from ._version import __version__


def _name_owner(name: str) -> "int | None":
    """The uid that owns the OS object of a block's name, if it can be seen."""
    import os

    try:
        return os.stat(os.path.join("/dev/shm", name)).st_uid   # Linux: the name is a file there
    except OSError:
        pass
    try:
        import importlib

        fd = importlib.import_module("_posixshmem").shm_open("/" + name, os.O_RDONLY, 0)
    except (ImportError, OSError):
        return None
    try:
        return os.fstat(fd).st_uid
    finally:
        os.close(fd)


def _denied_default(denied: PermissionError) -> PermissionError:
    """The import error when another user holds the default block's name:
    who holds it, and how to get past it."""
    import os

    name = denied.filename
    owner = _name_owner(name) if isinstance(name, str) else None
    if owner is None or owner == os.geteuid():
        return denied
    try:
        import pwd

        who = f"uid {owner} ({pwd.getpwuid(owner).pw_name})"
    except (ImportError, KeyError):
        who = f"uid {owner}"
    return PermissionError(
        denied.errno,
        f"the default block's name '{name}' is held by {who}, not by you (uid {os.geteuid()}): another user "
        f"created it first, so this user's default block cannot be made there. Import with "
        f"SHMEMEXT_NAME set to a name of your own (e.g. SHMEMEXT_NAME={name}-1), or with SHMEMEXT_SIZE=0 to "
        f"do without the default block; an administrator can remove the other user's name "
        f"(python -m shmemext unlink {name}, run as that user or root)",
        name,
    )


def _installed_copy(here: str) -> "str | None":
    """Another shmemext package directory on sys.path that holds the compiled module."""
    import importlib.machinery
    import os
    import sys

    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or os.curdir), "shmemext")
        if os.path.normcase(candidate) == os.path.normcase(here) or not os.path.isdir(candidate):
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if os.path.exists(os.path.join(candidate, "_shmemext" + suffix)):
                return candidate
    return None


def _load_extension() -> _ModuleType:
    import os

    try:
        from . import _shmemext
    except PermissionError as denied:
        if os.environ.get("SHMEMEXT_NAME"):
            raise
        raise _denied_default(denied) from denied
    except ImportError as missing:
        installed = _installed_copy(os.path.dirname(os.path.abspath(__file__)))
        if installed is not None:
            # This is a source tree that stands first on sys.path (python -m
            # shmemext from a clone): take the compiled module of the copy
            # that is installed; the version check below still guards it.
            __path__.append(installed)
            from . import _shmemext

            return _shmemext
        raise ImportError(
            f"shmemext's compiled module is missing from {os.path.dirname(__file__)}: this looks like "
            f"an unbuilt source tree. Install the package (pip install .) and run from another "
            f"directory, or build it in place (python setup.py build_ext --inplace)"
        ) from missing
    return _shmemext


def _running_as_command() -> bool:
    """Whether this import is that of the command line (python -m shmemext,
    or the shmemext script), where a failure is one line, not a traceback."""
    import os
    import sys

    argv = list(getattr(sys, "orig_argv", []))
    for i, arg in enumerate(argv[1:], 1):
        if arg == "-m":
            return argv[i + 1 : i + 2] == ["shmemext"]
        if arg.startswith("-m"):
            return arg == "-mshmemext"
        if not arg.startswith("-"):
            break
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return os.path.splitext(script)[0] in ("shmemext", "shmemext-script")


try:
    _shmemext = _load_extension()
except (OSError, ValueError) as _failure:
    if not _running_as_command():
        raise
    import sys as _sys

    print(f"shmemext: error: the default block cannot be mapped: {_failure}", file=_sys.stderr)
    raise SystemExit(1) from None

if _shmemext.__version__ != __version__:
    raise ImportError(
        f"shmemext's compiled module is version {_shmemext.__version__} but the "
        f"package is {__version__}: the build is stale; reinstall shmemext"
    )

from ._shmemext import (  # noqa: E402
    _C_API as _C_API,   # the capsule other extensions import: shmemext._C_API
    ClosedError,
    CorruptBlockError,
    DEFAULT_CAPACITY,
    Error,
    ForeignBlockError,
    MAX_CAPACITY,
    NAME_MAX,
    QUEUE_DEFAULT_CAPACITY,
    Queue,
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
    "ClosedError",
    "CorruptBlockError",
    "DEFAULT_CAPACITY",
    "Error",
    "ForeignBlockError",
    "MAX_CAPACITY",
    "NAME_MAX",
    "QUEUE_DEFAULT_CAPACITY",
    "Queue",
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
    "wait_async",
    "changes",
]


def _default_value() -> Value:
    if default is None:
        raise RuntimeError("the default block is disabled (SHMEMEXT_SIZE=0); use shmemext.Value(name) instead")
    return default


def wait_async(version: "int | None" = None, timeout: "float | None" = None) -> "Coroutine[object, object, int]":
    """Value.wait_async() on the default block: await it for the next version."""
    return _default_value().wait_async(version, timeout)


def changes(version: "int | None" = None) -> "AsyncIterator[int]":
    """Value.changes() on the default block: async for version in shmemext.changes()."""
    return _default_value().changes(version)


def get_include() -> str:
    """The directory holding shmemext.h, for extensions that use the C API:
    Extension(..., include_dirs=[shmemext.get_include()])."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")
