"""The generation library's user-facing error (cli.py maps it to one line and exit code 2)."""
from __future__ import annotations


class GenerationError(ValueError):
    """A generate call that cannot give a meaningful result: one line naming the argument."""
