"""Global gradient norm with one C++ sum-of-squares pass per fp32 gradient.

`global_norm(grads)` = sqrt(sum_i ||g_i||^2), the same contract as training/optimizer.py's
composite `global_norm` (which stays the reference and the fallback for non-fp32 gradients or
when kernels are unavailable / QWEN3MOE_KERNELS=0). The per-tensor sums are accumulated in double
inside the kernel, then summed in fp32 over the (few hundred) tensors.
"""
from __future__ import annotations

import functools

import mindspore as ms
from mindspore import Tensor, ops

from qwen3moe.kernels.build import kernel_library
from qwen3moe.training.optimizer import global_norm as composite_global_norm


@functools.lru_cache(maxsize=None)
def _op():
    lib = kernel_library("sumsq")
    if lib is None:
        return None
    return ops.Custom(f"{lib}:SumSquares", out_shape=lambda g: [1], out_dtype=lambda g: ms.float32,
                      func_type="aot")


def available() -> bool:
    return _op() is not None


def global_norm(grads) -> Tensor:
    """sqrt(sum_i ||g_i||^2) in fp32 (graph-traceable); kernel path when every gradient is fp32."""
    if not _all_fp32(grads):
        return composite_global_norm(grads)
    sq = _op()
    return ops.sqrt(ops.concat([sq(g) for g in grads]).sum())


def _all_fp32(grads) -> bool:
    if not available():
        return False
    for g in grads:
        if g.dtype != ms.float32:
            return False
    return True
