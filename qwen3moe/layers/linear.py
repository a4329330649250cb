"""Linear layer with the HF weight layout [out, in]; inputs are token-major 2-D `x_TI`.

Shapes: T tokens, I in-features, O out-features.
fp32 x and weight go through the linear kernel (kernels/linear.py: oneDNN sgemm forward and a
backward that sums dX in place) when it is built, faster than MindSpore's MatMul on the backward
shapes (bench/RESULTS.md). bf16 storage (or a tied bf16-bits embedding) with fp32 x goes through
the forward-only kernels/quant.py op when it is built: it widens weight rows while streaming, so
no fp32 copy of the weight exists (for a 151936 x 2048 lm_head that copy is 1.2 GB per call).
Otherwise (QWEN3MOE_KERNELS=0) the weight is widened exactly and ops.MatMul runs.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.kernels import linear as linear_kernel
from qwen3moe.kernels import quant as quant_kernel
from qwen3moe.layers.dtypes import BF16_BITS, init_param, widen


def project(x_TI: Tensor, w_OI: Tensor, use_kernel: bool, matmul, bf16_kernel: bool = False) -> Tensor:
    """x @ w^T in x's dtype (w widened if stored narrower), through the kernels for fp32 x."""
    if bf16_kernel and x_TI.dtype == ms.float32 and w_OI.dtype in (ms.bfloat16, BF16_BITS):
        return quant_kernel.linear(x_TI, w_OI)  # no gradient: bf16 storage is inference-only
    w_OI = widen(w_OI, x_TI.dtype)  # bf16 storage (or a tied bf16-bits embedding), fp32 compute
    if use_kernel and x_TI.dtype == ms.float32:
        return linear_kernel.linear(x_TI, w_OI)
    return matmul(x_TI, w_OI)


class Linear(nn.Cell):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 init_std: float = 0.02, param_dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = init_param((out_features, in_features), init_std, "weight", param_dtype)
        self.bias = init_param((out_features,), 0.0, "bias", param_dtype) if bias else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.use_kernel = linear_kernel.available()
        self.bf16_kernel = quant_kernel.available()

    def construct(self, x_TI: Tensor) -> Tensor:
        y_TO = project(x_TI, self.weight, self.use_kernel, self.matmul, self.bf16_kernel)
        if self.bias is not None:
            y_TO = y_TO + self.bias.astype(x_TI.dtype)
        return y_TO
