"""Linear layer with the HF weight layout [out, in]; inputs are token-major 2-D `x_TI`.

Shapes: T tokens, I in-features, O out-features.
"""
from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from qwen3moe.layers.dtypes import init_param


class Linear(nn.Cell):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 init_std: float = 0.02, param_dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = init_param((out_features, in_features), init_std, "weight", param_dtype)
        self.bias = init_param((out_features,), 0.0, "bias", param_dtype) if bias else None
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x_TI: Tensor) -> Tensor:
        w_OI = self.weight
        if w_OI.dtype != x_TI.dtype:  # bf16 storage, fp32 compute
            w_OI = w_OI.astype(x_TI.dtype)
        y_TO = self.matmul(x_TI, w_OI)
        if self.bias is not None:
            y_TO = y_TO + self.bias.astype(x_TI.dtype)
        return y_TO
