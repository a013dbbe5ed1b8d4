"""Command line: python -m shmemext {demo,get,set,info,hold,watch,ls,sweep,unlink,bench,bridge}."""

from __future__ import annotations

import argparse
import base64
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


EXIT_INTERRUPTED = 128 + signal.SIGINT   # what a shell reports for a command ended by Ctrl-C


class NoSuchBlock(Exception):
    """A reading command named a block that nobody holds."""


def _default_name() -> str:
    if shmemext.default is None:
        raise RuntimeError("the default block is disabled (SHMEMEXT_SIZE=0): pass --name")
    return shmemext.default.name


def _open(args: argparse.Namespace) -> shmemext.Value:
    """The block a writing command names, created if nobody holds it."""
    persist = getattr(args, "persist", False)
    if args.name is None and args.size is None and not persist and shmemext.default is not None:
        return shmemext.default
    name = _default_name() if args.name is None else args.name
    return shmemext.Value(name, args.size, persist=persist)


def _open_existing(args: argparse.Namespace) -> shmemext.Value:
    """The block a reading command names; never created."""
    if args.name is None:
        block = shmemext.default
        if block is None:
            _default_name()
        assert block is not None
        if block.created:   # this command's own import made it: no process held it
            raise NoSuchBlock(f"no block named '{block.name}' exists (the default block: no process holds it)")
        return block
    try:
        return shmemext.Value(args.name, create=False)
    except FileNotFoundError:
        raise NoSuchBlock(f"no block named '{args.name}' exists: no process holds it, and it does not persist") from None


def _record(version: int, value: str | bytes) -> str:
    """One value as a JSON object on one line: bytes in base64, so any value is one unambiguous line."""
    if isinstance(value, bytes):
        return json.dumps({"version": version, "type": "bytes", "value": base64.b64encode(value).decode("ascii")})
    return json.dumps({"version": version, "type": "str", "value": value})


def cmd_demo(args: argparse.Namespace) -> int:
    block = _open(args)
    block.set(DEMO_TEXT)
    print(f"Parent process wrote to shared memory: {DEMO_TEXT}", flush=True)
    env = dict(os.environ, SHMEMEXT_NAME=block.name)
    env.pop("SHMEMEXT_SIZE", None)
    return subprocess.run([sys.executable, "-c", DEMO_CHILD], env=env).returncode


def cmd_get(args: argparse.Namespace) -> int:
    block = _open_existing(args)
    version = block.version
    value = block.get()
    sys.stdout.flush()
    if args.json:
        print(_record(version, value), flush=True)
    elif isinstance(value, bytes):
        sys.stdout.buffer.write(value)   # exactly the bytes, nothing added
        sys.stdout.buffer.flush()
    else:
        print(value, flush=True)
    return 0


def _value_to_set(args: argparse.Namespace) -> str | bytes:
    if args.value is None and sys.stdin.isatty():
        raise ValueError("set needs a value: give it as an argument, or pipe it in (or pass '-' to type it, "
                         "ending with Ctrl-D)")
    if args.value is None or args.value == "-":
        data = sys.stdin.buffer.read()
        if args.bytes:
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"standard input is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                             f"pass --bytes to store it as bytes") from None
    # The argument's own bytes (os.fsencode undoes the surrogateescape decoding of argv).
    return os.fsencode(args.value) if args.bytes else args.value


def cmd_set(args: argparse.Namespace) -> int:
    value = _value_to_set(args)
    block = _open(args)
    block.set(value)
    if block.created and not block.persist:   # made by this command: nobody else holds it
        print(
            f"shmemext: note: no other process holds block '{block.name}', so the value goes away "
            f"when this command exits. Keep the block alive with "
            f"'python -m shmemext hold --name {block.name}' in another terminal, "
            f"or make it persistent with --persist.",
            file=sys.stderr,
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    block = _open_existing(args)
    # This command's own attachment is not one of the holders worth showing.
    holders = None if block.holders is None else block.holders - 1
    info = {"name": block.name, "capacity": block.capacity, "version": block.version, "persist": block.persist,
            "holders": holders}
    if args.json:
        print(json.dumps(info))
        return 0
    for key, value in info.items():
        print(f"{key + ':':<10}{'-' if value is None else value}")
    return 0


def _catch_stop_signals() -> tuple[threading.Event, list[int]]:
    """SIGINT and SIGTERM set the event; the list gets which came.  Installed
    before the command says it is ready, so that no signal finds the default action."""
    stop, received = threading.Event(), []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop, received


def cmd_hold(args: argparse.Namespace) -> int:
    block = _open(args)
    stop, received = _catch_stop_signals()
    print(f"holding block '{block.name}' (capacity {block.capacity}, pid {os.getpid()}); "
          f"press Ctrl-C to release it", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    block.close()
    print(f"released block '{block.name}'", file=sys.stderr, flush=True)
    return 128 + received[0]   # the status a shell gives a command ended by that signal


def cmd_watch(args: argparse.Namespace) -> int:
    block = _open_existing(args)
    seen = block.version
    print(f"watching block '{block.name}' from version {seen}: one JSON line per new value; "
          f"press Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        while True:
            seen = block.wait(seen)
            value = block.get()   # the newest: sets made while printing are folded into it
            print(_record(seen, value), flush=True)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


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
    from shmemext import _quick

    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--name", help="block name (default: the default block, $SHMEMEXT_NAME)")
    sized = argparse.ArgumentParser(add_help=False, parents=[which])
    sized.add_argument("--size", type=_capacity, help="capacity in bytes when the block is created")
    persist = argparse.ArgumentParser(add_help=False)
    persist.add_argument("--persist", action="store_true", help="keep the block after the last process detaches")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead")

    parser = argparse.ArgumentParser(prog="python -m shmemext", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"shmemext {shmemext.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("demo", parents=[sized], help="write a string and read it back from a child process").set_defaults(func=cmd_demo)
    p = sub.add_parser("get", parents=[which], help="print the committed value (a block nobody holds is an error)",
                       description="Print the committed value: a str and a newline, or bytes exactly as stored. "
                                   "--json prints {\"version\", \"type\", \"value\"} on one line, bytes in base64.")
    p.add_argument("--json", action="store_true", help="one JSON object: version, type (str or bytes), value")
    p.set_defaults(func=cmd_get)
    p = sub.add_parser("set", parents=[sized, persist], help="commit a value (from the argument, or standard input)")
    p.add_argument("value", nargs="?", help="the value; '-' or none reads standard input")
    p.add_argument("--bytes", action="store_true", help="store bytes: the argument's bytes, or standard input as it is "
                                                        "(without it, standard input must be UTF-8 and is stored as str)")
    p.set_defaults(func=cmd_set)
    sub.add_parser("info", parents=[which, as_json], help="print name, capacity, version, persist, other holders").set_defaults(func=cmd_info)
    sub.add_parser("hold", parents=[sized, persist], help="keep a block alive until interrupted").set_defaults(func=cmd_hold)
    sub.add_parser("watch", parents=[which], help="print each new value as a JSON line, until Ctrl-C").set_defaults(func=cmd_watch)
    p = sub.add_parser("bench", help="a quick check of speed on this machine (benchmarks/run.py has the full suite)",
                       description=(_quick.__doc__ or "").split("\n\n")[0].replace("\n", " "))
    _quick.add_arguments(p)
    p.set_defaults(func=_quick.run)
    p = sub.add_parser("ls", parents=[as_json], help="list this user's blocks: kind, size, persist, holders, creator, age")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("sweep", parents=[as_json], help="remove names whose memory is gone, and memory nothing names or holds")
    p.set_defaults(func=cmd_sweep)
    sub.add_parser("bridge", add_help=False,
                   help="carry Values and Queues between hosts through Redis (needs shmemext[redis]; bridge --help)")
    p = sub.add_parser("unlink", help="remove a block's name (a persistent one)")
    p.add_argument("block", metavar="NAME")
    p.set_defaults(func=cmd_unlink)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bridge"]:
        from shmemext import bridge

        return bridge.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except NoSuchBlock as exc:
        print(f"shmemext: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        print(f"shmemext: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
