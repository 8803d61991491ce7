"""``medalign`` command line: a thin dispatcher over the sub-command modules of ``medalign.cli``.

Each sub-command module offers ``register(subparsers)`` and sets ``func`` to a
``run(args) -> int``.

A ``MedAlignError`` becomes one line on stderr and exit code 2; nothing else is printed.
A reader that closes the pipe early (``| head``) ends the command quietly (exit 141).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from medalign import __version__
from medalign.core.errors import MedAlignError

# Order is the order shown in ``medalign --help``.
COMMAND_MODULES = ["screen", "batch", "eval", "calibrate", "train", "adapt", "phantoms", "label_reports", "models", "web"]
TORCH_COMMANDS = {"screen", "batch", "eval", "calibrate", "train", "adapt"}
# Commands re-run with glibc's tuned allocator (medalign.core.allocator): training only.
# Screening peaks higher with it and is not faster (Testing/benchmarks/memory_peak.py).
TUNED_ALLOCATOR_COMMANDS = {"train"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medalign",
        description="Zero-shot CT abnormality screening with local alignment maps.",
    )
    parser.add_argument("--version", action="version", version=f"medalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"medalign.cli.{name}")
        except ModuleNotFoundError as exc:  # a command still being written must not break the rest
            if exc.name == f"medalign.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if argv is None and args.command in TUNED_ALLOCATOR_COMMANDS:  # a real command line, not a call from Python
        from medalign.core.allocator import reexec_with_tuned_allocator

        reexec_with_tuned_allocator(sys.argv[1:])  # returns only when no re-run is needed
    try:
        if args.command in TORCH_COMMANDS:
            from medalign.core.device import configure_cpu_threads, resolve_device

            if getattr(args, "device", None) is not None:
                resolve_device(args.device)  # a misspelt or absent device: one sentence before any work
            configure_cpu_threads()  # the CPU thread count follows the machine (or MEDALIGN_THREADS)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
        return code
    except BrokenPipeError:
        return _reader_went_away()
    except MedAlignError as exc:
        print(f"medalign: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medalign: cancelled", file=sys.stderr)
        return 130



def _reader_went_away() -> int:
    """``medalign models show X | head``: the reader closed the pipe. Point stdout at
    /dev/null so Python's final flush cannot print a BrokenPipeError, and exit as a
    SIGPIPE-killed process would (128 + 13), the shell convention."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141
