"""Sharding plans as data: parameter-name pattern -> how the tensor is split across ranks.

Styles (Megatron names): "column" splits the output dim (dim 0 of an HF [out, in] weight),
"row" the input dim (dim 1; the partial outputs are summed by an all-reduce), "vocab" splits
the vocabulary rows of the embedding / lm_head, "gate_up" splits the I rows of a fused
[E, 2I, H] gate_up_proj as two halves (gate rows and up rows each split), "expert_row" the I
columns of [E, H, I] down_proj, "expert" the E dim (expert parallelism), "replicate" copies.
Plans are applied from outside the model (`shard_array`), so layers/ never see parallel code.
Shapes: E experts, I expert ffn, H hidden, V vocab.
"""
from __future__ import annotations

import re

import numpy as np

TP_PLAN: dict[str, str] = {
    r"self_attn\.(q|k|v)_proj\.weight$": "column",
    r"self_attn\.o_proj\.weight$": "row",
    r"self_attn\.(q|k)_norm\.weight$": "replicate",
    r"mlp\.(gate|up)_proj\.weight$": "column",
    r"mlp\.down_proj\.weight$": "row",
    r"mlp\.gate\.weight$": "replicate",
    r"mlp\.experts\.gate_up_proj$": "gate_up",
    r"mlp\.experts\.down_proj$": "expert_row",
    r"embed_tokens\.weight$": "vocab",
    r"lm_head\.weight$": "vocab",
    r"(layernorm|norm)\.weight$": "replicate",
}


def style_of(name: str, plan: dict[str, str]) -> str:
    for pattern, style in plan.items():
        if re.search(pattern, name):
            return style
    return "replicate"


def shard_array(arr: np.ndarray, style: str, rank: int, size: int) -> np.ndarray:
    """The slice of `arr` that rank `rank` of `size` holds under `style`."""
    if size == 1 or style == "replicate":
        return arr
    if style in ("column", "vocab", "expert"):
        return _split(arr, 0, rank, size)
    if style == "row":
        return _split(arr, 1, rank, size)
    if style == "expert_row":
        return _split(arr, 2, rank, size)
    if style == "gate_up":
        half = arr.shape[1] // 2
        return np.concatenate([_split(arr[:, :half], 1, rank, size), _split(arr[:, half:], 1, rank, size)], 1)
    raise ValueError(f"unknown shard style {style!r}")


def _split(arr: np.ndarray, dim: int, rank: int, size: int) -> np.ndarray:
    if arr.shape[dim] % size:
        raise ValueError(f"dim {dim} of shape {arr.shape} is not divisible by {size} ranks")
    n = arr.shape[dim] // size
    return np.take(arr, np.arange(rank * n, (rank + 1) * n), axis=dim)
