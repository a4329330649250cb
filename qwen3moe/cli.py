"""`qwen3moe` command line: one sub-command per module, registered lazily.

Each command module exposes `add_parser(subparsers)` which adds its sub-parser and sets
`func(args) -> int` as the default. Modules are imported only when listed here, so a
command that needs no MindSpore (preprocess, wikitext-to-jsonl) starts fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from qwen3moe.errors import Qwen3MoeError

# sub-command modules, in --help order; each defines add_parser(subparsers)
COMMAND_MODULES = [
    "qwen3moe.commands.preprocess",
    "qwen3moe.commands.wikitext",
    "qwen3moe.commands.plan",
    "qwen3moe.commands.launch",
    "qwen3moe.commands.generate",
    "qwen3moe.commands.pretrain",
    "qwen3moe.commands.run",
    "qwen3moe.commands.export",
    "qwen3moe.commands.quantize",
]


class CliError(Qwen3MoeError):
    """A user error found by a command's own argument checks: printed as one line, exit code 2."""


# library exceptions describing bad input derive from qwen3moe.errors.Qwen3MoeError (each names
# the file, key or argument): one line, exit 2
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


def quiet_broken_stdout() -> None:
    """stdout's reader went away (`| head`): point stdout at /dev/null so the final flush at exit
    does not raise again; the command's files are written regardless (see generate)."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3moe", description="Qwen3-MoE on MindSpore")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        importlib.import_module(mod_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports MindSpore (seconds): Ctrl-C often lands here
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("qwen3moe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Qwen3MoeError as exc:  # library and command errors alike: one line, exit 2
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail(args.command, first)
    except KeyboardInterrupt:
        print(f"qwen3moe {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        quiet_broken_stdout()
        return 0


def _fail(command: str, message: str) -> int:
    print(f"qwen3moe {command}: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    # run via the package module so `qwen3moe.cli.CliError` is one class for commands and main
    from qwen3moe.cli import main as _main

    sys.exit(_main())
