"""The benchmark suite's entry point: every section, full size grid.

    python benchmarks/run.py [--quick] [--json FILE] [--plot FILE] [--sections copy,...] [--no-redis]

Needs shmemext installed, and the peers for a side-by-side run
(pip install -r benchmarks/requirements.txt; a local redis-server is used
when it is on PATH).  See suite.py for what is measured and how.
"""

import sys

import suite

if __name__ == "__main__":
    sys.exit(suite.run(sys.argv[1:]))
