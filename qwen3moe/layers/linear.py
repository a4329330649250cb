"""Linear layer with the HF weight layout [out, in]; inputs are token-major 2-D `x_TI`.

Shapes: T tokens, I in-features, O out-features.
fp32 x and weight go through the linear kernel (kernels/linear.py: oneDNN sgemm forward and a
backward that sums dX in place) when it is built, faster than MindSpore's MatMul on the backward
shapes (bench/RESULTS.md). Other dtypes use ops.MatMul.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.kernels import linear as linear_kernel
from qwen3moe.layers.dtypes import init_param, widen


def project(x_TI: Tensor, w_OI: Tensor, use_kernel: bool, matmul) -> Tensor:
    """x @ w^T in x's dtype (w widened if stored narrower), through the kernel for fp32."""
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

    def construct(self, x_TI: Tensor) -> Tensor:
        y_TO = project(x_TI, self.weight, self.use_kernel, self.matmul)
        if self.bias is not None:
            y_TO = y_TO + self.bias.astype(x_TI.dtype)
        return y_TO
