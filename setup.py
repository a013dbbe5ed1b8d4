"""Build the shmemext._shmemext extension.

The version lives in shmemext/_version.py only; it is compiled into the
extension so that a stale build fails loudly at import.

Environment switches:
  SHMEMEXT_WERROR=1    treat compiler warnings as errors (CI does)
  SHMEMEXT_SANITIZE=1  build with AddressSanitizer + UndefinedBehaviorSanitizer
                       (gcc/clang).  Python itself is not instrumented, so run
                       it with the runtime preloaded, as .ci/run does:
                       LD_PRELOAD=$(gcc -print-file-name=libasan.so)
                       ASAN_OPTIONS=detect_leaks=0 python -m pytest
  SHMEMEXT_LOCK_FILES=1  on Linux, use the backend path macOS and the BSDs
                       take (flock() on lock files, no robust mutexes, names
                       cut to 31 bytes), so that it is tested here
"""

import os
import re
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "shmemext", "_version.py"), encoding="utf-8") as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def extension():
    version = read_version()
    # The CPython glue (glue.h lists its files), then the pure-C core.
    glue = ["ext/module.c", "ext/py_block.c", "ext/py_value.c", "ext/py_segment.c", "ext/py_lock.c", "ext/py_args.c",
            "ext/py_watch.c", "ext/py_queue.c"]
    # The pure-C core, one file per mechanism (ext/core.h lists them).
    core = ["ext/block.c", "ext/copy.c", "ext/value.c", "ext/wait.c", "ext/queue.c", "ext/error.c", "ext/handle.c",
            "ext/text.c"]
    sources = glue + ["ext/capi.c"] + core
    libraries = []
    if sys.platform == "win32":
        sources.append("ext/platform_win32.c")
        compile_args = ["/W4", "/std:c11", "/experimental:c11atomics"]
        if os.environ.get("SHMEMEXT_WERROR") == "1":
            compile_args.append("/WX")
        libraries.append("advapi32")
    else:
        # What POSIX systems share, and the backend of this one: System V
        # memory the kernel frees by itself on Linux, lock files elsewhere.
        lock_files = not sys.platform.startswith("linux") or os.environ.get("SHMEMEXT_LOCK_FILES") == "1"
        sources += ["ext/platform_posix.c", "ext/platform_lockfiles.c" if lock_files else "ext/platform_sysv.c"]
        compile_args = ["-std=c11", "-Wall", "-Wextra", "-fvisibility=hidden"]
        if os.environ.get("SHMEMEXT_WERROR") == "1":
            compile_args.append("-Werror")
        if sys.platform.startswith("linux"):
            libraries += ["rt", "pthread"]
    link_args = []
    lock_files = [("SHX_FORCE_LOCK_FILES", "1")] if os.environ.get("SHMEMEXT_LOCK_FILES") == "1" else []
    if os.environ.get("SHMEMEXT_SANITIZE") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        compile_args += sanitize + ["-O1", "-g"]
        link_args += sanitize
    return Extension(
        "shmemext._shmemext",
        sources=sources,
        depends=["ext/platform.h", "ext/platform_posix.h", "ext/segment.h", "ext/core.h", "ext/handle.h", "ext/glue.h", "ext/capi.h",
                 "shmemext/include/shmemext.h"],
        include_dirs=["ext"],
        define_macros=[("SHMEMEXT_VERSION", '"%s"' % version)] + lock_files,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        libraries=libraries,
    )


# The switches that change what is compiled.  Each combination builds into a
# directory of its own, and the module is built again whenever the last one
# linked came from another: setuptools would otherwise take a module built
# without the switch for up to date (its sources have not changed).
VARIANT_SWITCHES = ("SHMEMEXT_LOCK_FILES", "SHMEMEXT_SANITIZE", "SHMEMEXT_WERROR")


def variant():
    on = [name[len("SHMEMEXT_"):].lower() for name in VARIANT_SWITCHES if os.environ.get(name) == "1"]
    return "-".join(on) or "plain"


class BuildVariant(build_ext):
    def finalize_options(self):
        super().finalize_options()
        self.variant_stamp = os.path.join(self.build_temp, "variant")
        self.build_temp = os.path.join(self.build_temp, variant())

    def run(self):
        try:
            with open(self.variant_stamp, encoding="utf-8") as f:
                last = f.read()
        except OSError:
            last = None
        if last != variant():
            self.force = True
        super().run()
        os.makedirs(os.path.dirname(self.variant_stamp), exist_ok=True)
        with open(self.variant_stamp, "w", encoding="utf-8") as f:
            f.write(variant())


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildVariant})
