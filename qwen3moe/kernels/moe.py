"""Fused MoE experts (dispatch + grouped SwiGLU + weighted combine) as one MindSpore custom op.

Shapes: T tokens, K top-k, A = T*K assignments, H hidden, I expert ffn, E experts.
`moe_experts(x_TH, idx_TK, w_TK, w_gate_up_E2IH, w_down_EHI)` returns
y_TH = sum_j w_tj * SwiGLU_{idx_tj}(x_t). Gradients flow to x, the routing weights w (and from
there through MindSpore's softmax/top-k to the router) and both expert weights, via one backward
kernel. The routing indices carry no gradient.
"""
from __future__ import annotations

import functools

import mindspore as ms
from mindspore import Tensor, ops

from qwen3moe.kernels.build import kernel_library


def _fwd_shape(x, idx, w, wgu, wd):
    A = idx[0] * idx[1]
    return x, [A, wgu[1]], [A, x[1]], [A], [wgu[0] + 1]


def _fwd_dtype(x, idx, w, wgu, wd):
    return x, x, x, ms.int32, ms.int32


@functools.lru_cache(maxsize=None)
def _op():
    lib = kernel_library("moe_fused")
    if lib is None:
        return None
    bwd = ops.Custom(f"{lib}:MoeFusedBwd",
                     out_shape=lambda x, idx, w, wgu, wd, gu, ye, row, off, dy: (x, w, wgu, wd),
                     out_dtype=lambda x, idx, w, wgu, wd, gu, ye, row, off, dy: (x, x, x, x),
                     func_type="aot")

    def bprop(x, idx, w, wgu, wd, out, dout):
        dx, dw, dwgu, dwd = bwd(x, idx, w, wgu, wd, out[1], out[2], out[3], out[4], dout[0])
        return dx, ops.zeros_like(idx), dw, dwgu, dwd

    return ops.Custom(f"{lib}:MoeFusedFwd", out_shape=_fwd_shape, out_dtype=_fwd_dtype,
                      func_type="aot", bprop=bprop)


def available() -> bool:
    return _op() is not None


def moe_experts(x_TH: Tensor, idx_TK: Tensor, w_TK: Tensor, w_gate_up_E2IH: Tensor,
                w_down_EHI: Tensor) -> Tensor:
    """fp32 only (the kernel reads raw float32 buffers); idx must be int32 in [0, E)."""
    return _op()(x_TH, idx_TK, w_TK, w_gate_up_E2IH, w_down_EHI)[0]
