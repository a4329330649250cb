"""qwen3moe: Qwen3-MoE language models on MindSpore, HF-exact.

Heavy imports (MindSpore) happen lazily on first attribute access, so data tools and the CLI
start fast.
"""
from __future__ import annotations

import importlib
import os

# The C++ kernels (qwen3moe/kernels) run OpenMP regions between MindSpore ops: idle OpenMP threads
# must sleep rather than spin, or they take the cores MindSpore's own thread pool needs for the next
# op (bench/RESULTS.md, "Figures moved from docstrings"). libgomp reads this when it loads
# (MindSpore loads it at import), so it only takes effect when qwen3moe is imported first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A failed graph compile makes MindSpore write rank_<N>/om/analyze_fail.ir under $MS_OM_PATH, by
# default the current folder: the user's. MindSpore reads the variable when it writes the dump
# (not at import), so this works whichever is imported first; a user's own setting wins.
os.environ.setdefault("MS_OM_PATH", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "qwen3moe", "mindspore"))

__version__ = "0.1.0"

_LAZY = {
    "Qwen3MoeConfig": "qwen3moe.models.config",
    "Qwen3MoeForCausalLM": "qwen3moe.models.qwen3_moe",
    "Qwen3MoeModel": "qwen3moe.models.qwen3_moe",
    "GenerationConfig": "qwen3moe.generation.config",
    "ChatSession": "qwen3moe.generation.chat",
    "Tokenizer": "qwen3moe.io.tokenizer",
    "QuantizationConfig": "qwen3moe.layers.quant",
    "decode_runtime": "qwen3moe.generation.runtime",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwen3moe' has no attribute {name!r}")


__all__ = list(_LAZY)
