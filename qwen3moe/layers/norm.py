"""RMSNorm exactly as HF Qwen3: fp32 `x * rsqrt(mean(x^2) + eps)`, cast back, times weight.

Shapes: any leading dims, last dim = normalised features.
fp32 activations (with fp32 weights, or stored bf16 ones widened) go through the fused C++ op
(kernels/rmsnorm.py, forward and backward in one pass each) when it builds here; the composite
form below is the reference.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.kernels import rmsnorm as rmsnorm_kernel
from qwen3moe.layers.dtypes import init_param, widen


class RMSNorm(nn.Cell):
    def __init__(self, dim: int, eps: float = 1e-6, param_dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = init_param((dim,), None, "weight", param_dtype)
        self.use_kernel = rmsnorm_kernel.available()
        self.eps_1 = Tensor([eps], ms.float32)

    def construct(self, x: Tensor) -> Tensor:
        if self.use_kernel and x.dtype == ms.float32:  # a stored bf16 weight is widened (exact)
            return rmsnorm_kernel.rms_norm(x, widen(self.weight), self.eps_1)
        return self.composite(x)

    def composite(self, x: Tensor) -> Tensor:
        # casts only where the dtypes differ (resolved at trace time): each graph op costs
        # several microseconds, which a decode step of ~20 ops per layer notices
        in_dtype = x.dtype
        x32 = widen(x)
        var = ops.mean(x32 * x32, -1, keep_dims=True)
        y = widen(x32 * ops.rsqrt(var + self.eps), in_dtype)
        return widen(self.weight, in_dtype) * y
