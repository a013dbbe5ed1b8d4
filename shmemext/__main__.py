"""Command line: python -m shmemext {demo,get,set,info,hold,watch,ls,sweep,unlink,bench}."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

import shmemext

# Not taken from a docstring: python -OO drops those.
DESCRIPTION = "Named shared memory that lives exactly as long as some process holds it."
DEMO_TEXT = "This is a test string"
DEMO_CHILD = 'import shmemext; print("Child process read from shared memory:", shmemext.get(), flush=True)'


def _open(args: argparse.Namespace) -> shmemext.Value:
    persist = getattr(args, "persist", False)
    if args.name is None and args.size is None and not persist and shmemext.default is not None:
        return shmemext.default
    name = args.name or (shmemext.default.name if shmemext.default is not None else None)
    if name is None:
        raise RuntimeError("the default block is disabled (SHMEMEXT_SIZE=0): pass --name")
    return shmemext.Value(name, args.size, persist=persist)


def cmd_demo(args: argparse.Namespace) -> int:
    block = _open(args)
    block.set(DEMO_TEXT)
    print(f"Parent process wrote to shared memory: {DEMO_TEXT}", flush=True)
    env = dict(os.environ, SHMEMEXT_NAME=block.name)
    env.pop("SHMEMEXT_SIZE", None)
    return subprocess.run([sys.executable, "-c", DEMO_CHILD], env=env).returncode


def cmd_get(args: argparse.Namespace) -> int:
    value = _open(args).get()
    if isinstance(value, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(value + b"\n")
    else:
        print(value)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    block = _open(args)
    block.set(args.value)
    if block._sole_holder() and not block.persist:
        print(
            f"shmemext: note: no other process holds block '{block.name}', so the value goes away "
            f"when this command exits. Keep the block alive with "
            f"'python -m shmemext hold --name {block.name}' in another terminal, "
            f"or make it persistent with --persist.",
            file=sys.stderr,
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    block = _open(args)
    print(f"name:     {block.name}")
    print(f"capacity: {block.capacity}")
    print(f"version:  {block.version}")
    print(f"created:  {block.created}")
    print(f"persist:  {block.persist}")
    return 0


def cmd_hold(args: argparse.Namespace) -> int:
    block = _open(args)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(
        f"holding block '{block.name}' (capacity {block.capacity}, pid {os.getpid()}); "
        f"press Ctrl-C to release it",
        flush=True,
    )
    while not stop.wait(0.5):
        pass
    block.close()
    print(f"released block '{block.name}'", flush=True)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    block = _open(args)
    seen = block.version
    print(f"watching block '{block.name}' from version {seen}; press Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        while True:
            seen = block.wait(seen)
            value = block.get()   # the newest: sets made while printing are folded into it
            if isinstance(value, bytes):
                print(repr(value), flush=True)
            else:
                print(value, flush=True)
    except KeyboardInterrupt:
        return 0


def _size_text(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _age_text(created: float | None) -> str:
    if created is None:
        return "-"
    seconds = max(0, int(time.time() - created))
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds // span}{unit}"
    return f"{seconds}s"


def _print_blocks(rows: list[Any], empty: str) -> None:
    if not rows:
        print(empty)
        return
    header = ("NAME", "KIND", "CAPACITY", "MEMORY", "PERSIST", "HOLDERS", "CREATOR", "AGE", "STATE")
    table = [header]
    for r in rows:
        table.append((
            r["name"], r["kind"] or "-", _size_text(r["capacity"]), _size_text(r["size"] or None),
            "-" if r["persist"] is None else ("yes" if r["persist"] else "no"),
            "-" if r["holders"] is None else str(r["holders"]),
            "-" if r["creator_pid"] is None else str(r["creator_pid"]), _age_text(r["created"]),
            "live" if r["alive"] else "dead",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def cmd_ls(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = [dict(r) for r in shmemext.blocks()]
    own = shmemext.default.name if shmemext.default is not None else None
    for r in rows:
        # This command's own attachment to the default block is not a holder worth showing.
        if r["name"] == own and r["holders"] is not None:
            r["holders"] -= 1
    rows.sort(key=lambda r: r["name"])
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_blocks(rows, "no blocks of this user's")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    removed: list[dict[str, Any]] = [dict(r) for r in shmemext.sweep()]
    if args.json:
        print(json.dumps(removed, indent=2))
        return 0
    if not removed:
        print("nothing to sweep: every name of this user's has its memory, and all memory is named or held")
    for r in removed:
        if r["alive"]:
            print(f"removed {_size_text(r['size'])} of memory {r['name']} that no name or process held")
        else:
            print(f"removed the name '{r['name']}', whose memory was already gone")
    return 0


def cmd_unlink(args: argparse.Namespace) -> int:
    shmemext.unlink(args.block)
    return 0


def _capacity(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes") from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", help="block name (default: the default block, $SHMEMEXT_NAME)")
    common.add_argument("--size", type=_capacity, help="capacity in bytes when the block is created")
    persist = argparse.ArgumentParser(add_help=False)
    persist.add_argument("--persist", action="store_true", help="keep the block after the last process detaches")

    parser = argparse.ArgumentParser(prog="python -m shmemext", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"shmemext {shmemext.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("demo", parents=[common], help="write a string and read it back from a child process").set_defaults(func=cmd_demo)
    sub.add_parser("get", parents=[common], help="print the committed value").set_defaults(func=cmd_get)
    p = sub.add_parser("set", parents=[common, persist], help="commit a value")
    p.add_argument("value")
    p.set_defaults(func=cmd_set)
    sub.add_parser("info", parents=[common, persist], help="print name, capacity, version, created, persist").set_defaults(func=cmd_info)
    sub.add_parser("hold", parents=[common, persist], help="keep a block alive until interrupted").set_defaults(func=cmd_hold)
    sub.add_parser("watch", parents=[common], help="print each new value as it is committed, until Ctrl-C").set_defaults(func=cmd_watch)
    sub.add_parser("bench", add_help=False,
                   help="a quick benchmark against the peers (--full for the whole suite, --help for options)")
    p = sub.add_parser("ls", help="list this user's blocks: kind, size, persist, holders, creator, age")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("sweep", help="remove names whose memory is gone, and memory nothing names or holds")
    p.add_argument("--json", action="store_true", help="print what was removed as a JSON list")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("unlink", help="remove a block's name (a persistent one)")
    p.add_argument("block", metavar="NAME")
    p.set_defaults(func=cmd_unlink)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Its own options and its own process (see shmemext._bench.run).
        from shmemext import _bench

        return _bench.run(argv[1:], quick_default=True)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        print(f"shmemext: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
