"""RMSNorm exactly as HF Qwen3: fp32 `x * rsqrt(mean(x^2) + eps)`, cast back, times weight.

Shapes: any leading dims, last dim = normalised features.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.layers.dtypes import init_param


class RMSNorm(nn.Cell):
    def __init__(self, dim: int, eps: float = 1e-6, param_dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = init_param((dim,), None, "weight", param_dtype)

    def construct(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        x32 = x.astype(ms.float32)
        var = ops.mean(x32 * x32, -1, keep_dims=True)
        y = (x32 * ops.rsqrt(var + self.eps)).astype(in_dtype)
        return self.weight.astype(in_dtype) * y
