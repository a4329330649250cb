"""The generation library's user-facing error (cli.py maps it to one line and exit code 2)."""
from __future__ import annotations

from qwen3moe.errors import Qwen3MoeError


class GenerationError(Qwen3MoeError, ValueError):
    """A generate call or request that cannot give a meaningful result: one line naming the argument."""
