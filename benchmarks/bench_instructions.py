"""Instructions per call of Value.set/get, counted by valgrind's callgrind.

    python benchmarks/bench_instructions.py [--sizes 16,4096] [--calls 50000]

Wall-clock figures on a shared machine move by tens of percent between runs;
the number of instructions a call executes does not.  Each figure is the
difference between a run of N calls and a run of none, divided by N, so
start-up and teardown cancel out (PYTHONHASHSEED is fixed, so both runs take
the same paths).  It counts the whole call as Python makes it: the loop, the
method lookup and the copy.  Use it to compare two builds (run it with each
one's interpreter); time is what benchmarks/run.py measures.

Needs valgrind on PATH.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

CHILD = """
import sys, shmemext
calls, size, op, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
v = shmemext.Value(name, max(size, 16))
payload = b"x" * size
v.set(payload)
call = v.set if op == "set" else v.get
args = (payload,) if op == "set" else ()
for _ in range(calls):
    call(*args)
v.close()
"""


def instructions(calls: int, size: int, op: str) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    name = f"shmemext-bench-ir-{os.getpid()}"
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c", CHILD,
         str(calls), str(size), op, name],
        capture_output=True, text=True, env=env, check=True)
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if match is None:
        raise RuntimeError(f"callgrind printed no total:\n{proc.stderr}")
    return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,4096", help="payload sizes in bytes, comma-separated")
    parser.add_argument("--calls", type=int, default=50000)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not on PATH (apt-get install valgrind)", file=sys.stderr)
        return 2
    import shmemext

    print(f"shmemext {shmemext.__version__} from {os.path.dirname(shmemext.__file__)}, {sys.version.split()[0]}"
          f"{' free-threaded' if not getattr(sys, '_is_gil_enabled', lambda: True)() else ''}")
    print(f"{'op':4} {'bytes':>6} {'instructions per call':>22}")
    for size in (int(s) for s in args.sizes.split(",")):
        for op in ("set", "get"):
            per_call = (instructions(args.calls, size, op) - instructions(0, size, op)) / args.calls
            print(f"{op:4} {size:>6} {per_call:>22.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
