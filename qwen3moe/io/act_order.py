"""Act-order GPTQ projections sorted by group (io/gptq.py reads them through sort_by_group): GPTQ
quantizes the columns in order of decreasing Hessian diagonal, so g_idx scatters each group's
g columns over the row; sorted, the groups are contiguous again and the kernels read the
projection with its inputs gathered, x[perm] (docs/quantization.md "Act-order folders").

Shapes: O out-features, I in-features, P packed bytes a row (I or I // 2), g group size.
"""
from __future__ import annotations

import numpy as np

from qwen3moe.io.safetensors_io import CheckpointError


class UnsortableMap(CheckpointError):
    """An act-order map sort_by_group cannot turn into contiguous groups with one input order
    (GPTQ's own maps always can: gate and up share their inputs, hence their map)."""


def sort_by_group(packed: np.ndarray, g_idx: np.ndarray | None, bits: int, g: int, where: str) -> tuple:
    """An act-order projection (qweight [O, P] in HF column order, its map g_idx [I] or None for
    plain groups) -> (qweight with the columns sorted by group, perm [I]): stored column j is
    HF column perm[j], and groups are contiguous again (GPTQ act-order puts exactly g columns in
    each group), so the kernels read it with x[perm]."""
    I = packed.shape[-1] * 8 // bits
    if g_idx is None:
        return packed, np.arange(I, dtype=np.int32)
    perm = np.argsort(g_idx, kind="stable").astype(np.int32)
    if not np.array_equal(g_idx[perm], np.arange(I) // g):
        raise UnsortableMap(f"{where}.g_idx does not put exactly {g} columns in each group (an act-order map "
                              f"does: g_idx[order[i]] = i // group_size)")
    return take_columns(packed, perm, bits), perm


def take_columns(packed: np.ndarray, cols: np.ndarray, bits: int) -> np.ndarray:
    """qweight [O, P] -> the qweight of the columns `cols` of its values, in that order. 4 bits:
    each value's byte taken, shifted to its nibble, and pairs packed again (3.5x faster than
    unpacking the whole row first: the loader sorts every act-order projection)."""
    if bits == 8:
        return np.take(packed, cols, axis=1)
    u = np.take(packed, cols >> 1, axis=1)
    u >>= ((cols & 1) * 4).astype(np.uint8)  # odd inputs sit in the high nibble
    u &= 15
    return u[:, 0::2] | (u[:, 1::2] << 4)
