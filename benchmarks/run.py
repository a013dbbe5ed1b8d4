"""The benchmark suite's entry point: every section, full size grid.

    python benchmarks/run.py [--quick] [--json FILE] [--plot FILE] [--sections copy,...] [--no-redis]

Needs shmemext installed (pip install '.[bench,plot]' for every peer and the
chart; a local redis-server is used when it is on PATH).  See
shmemext/_bench.py for what is measured and how.
"""

import sys

from shmemext import _bench

if __name__ == "__main__":
    sys.exit(_bench.run(sys.argv[1:]))
