"""Grouped SwiGLU experts as MindSpore custom ops (forward and backward kernels).

Shapes: A rows sorted by expert, H hidden, I expert ffn, E experts.
`grouped_swiglu(x_AH, offsets_E1, w_gate_up_E2IH, w_down_EHI)` returns y_AH; its gradient
flows to x and both weights through the backward kernel.
"""
from __future__ import annotations

import functools

import mindspore as ms
from mindspore import Tensor, ops

from qwen3moe.kernels.build import kernel_library


@functools.lru_cache(maxsize=None)
def _ops():
    lib = kernel_library("grouped_experts")
    if lib is None:
        return None
    bwd = ops.Custom(f"{lib}:GroupedSwigluBwd",
                     out_shape=lambda x, off, wgu, wd, gu, dy: (x, wgu, wd),
                     out_dtype=lambda x, off, wgu, wd, gu, dy: (x, x, x), func_type="aot")

    def bprop(x, off, wgu, wd, out, dout):
        dx, dwgu, dwd = bwd(x, off, wgu, wd, out[1], dout[0])
        return dx, ops.zeros_like(off), dwgu, dwd

    fwd = ops.Custom(f"{lib}:GroupedSwigluFwd",
                     out_shape=lambda x, off, wgu, wd: (x, [x[0], wgu[1]]),
                     out_dtype=lambda x, off, wgu, wd: (x, x), func_type="aot", bprop=bprop)
    return fwd


def available() -> bool:
    return _ops() is not None


def grouped_swiglu(x_AH: Tensor, offsets_E1: Tensor, w_gate_up_E2IH: Tensor, w_down_EHI: Tensor) -> Tensor:
    return _ops()(x_AH, offsets_E1, w_gate_up_E2IH, w_down_EHI)[0]
