"""The root of the library's user-facing errors.

Bad input, a bad config key, an invalid parallel layout, a missing checkpoint file: library code
raises a subclass of `Qwen3MoeError` whose message names the file, key or argument and what was
expected, in one line. `qwen3moe.cli` alone turns it into `qwen3moe <command>: error: <message>`
and exit code 2; library code never prints and never exits.
"""
from __future__ import annotations


class Qwen3MoeError(Exception):
    """A user error reported by the library (one line; cli.py maps it to exit code 2)."""


class TaskConfigError(Qwen3MoeError, ValueError):
    """A task-config problem: one line with the dotted key path (training/task_config.py and its
    value checks in training/task_checks.py raise it; defined here so neither imports the other
    back)."""
