"""`qwen3moe` command line: one sub-command per module, registered lazily.

Each command module exposes `add_parser(subparsers)` which adds its sub-parser and sets
`func(args) -> int` as the default. Modules are imported only when listed here, so a
command that needs no MindSpore (preprocess, wikitext-to-jsonl) starts fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

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


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


# library exceptions that describe bad input (each names the file, key or argument): one line,
# exit 2. Matched by name so the CLI needs no import of the modules defining them.
USER_ERRORS = frozenset({"ConfigError", "CheckpointError", "PreprocessError", "OutputError", "TokenizerError",
                         "TaskConfigError", "MeshError", "GenerationError", "LaunchError"})
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


def _is_user_error(exc: BaseException) -> bool:
    return any(c.__name__ in USER_ERRORS and c.__module__.startswith("qwen3moe.") for c in type(exc).__mro__)


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
    except CliError as exc:
        return _fail(args.command, str(exc))
    except KeyboardInterrupt:
        print(f"qwen3moe {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        quiet_broken_stdout()
        return 0
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        return _fail(args.command, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def _fail(command: str, message: str) -> int:
    print(f"qwen3moe {command}: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    # run via the package module so commands' `qwen3moe.cli.CliError` is the class caught in main
    from qwen3moe.cli import main as _main

    sys.exit(_main())
