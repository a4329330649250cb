"""qwen3moe: Qwen3-MoE language models on MindSpore, HF-exact.

Heavy imports (MindSpore) happen lazily on first attribute access, so data tools and the CLI
start fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Qwen3MoeConfig": "qwen3moe.models.config",
    "Qwen3MoeForCausalLM": "qwen3moe.models.qwen3_moe",
    "Qwen3MoeModel": "qwen3moe.models.qwen3_moe",
    "GenerationConfig": "qwen3moe.generation.config",
    "Tokenizer": "qwen3moe.io.tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwen3moe' has no attribute {name!r}")


__all__ = list(_LAZY)
