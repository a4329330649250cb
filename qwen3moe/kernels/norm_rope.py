"""Qwen3's per-head q/k RMSNorm + RoPE + head-major transpose as one custom op with a backward
kernel.

Shapes: B batch, S sequence, H heads, D head_dim. `norm_rope(x_BSHD, w_D, eps_1, cos_BSD, sin_BSD)`
returns [B, H, S, D] = apply_rope(RMSNorm(x).transpose(0, 2, 1, 3), cos, sin) (layers/norm.py +
layers/rope.py, which stay the reference and the fallback). Gradients flow to x and w; the
cos/sin tables are host inputs and get none.
`swap_axes12(x)` [B, A, C, D] -> [B, C, A, D] is a copy (its own backward), used instead of a
MindSpore Transpose on the prefill path: in a CPU graph a Transpose's input stays allocated until
the graph ends, so a many-layer graph kept every layer's activations (kernels/csrc/norm_rope.cc).
"""
from __future__ import annotations

import functools

from mindspore import Tensor, ops

from qwen3moe.kernels.build import kernel_library


@functools.lru_cache(maxsize=None)
def _op():
    lib = kernel_library("norm_rope")
    if lib is None:
        return None
    bwd = ops.Custom(f"{lib}:NormRopeBwd", out_shape=lambda x, w, c, s, r, dy: (x, w),
                     out_dtype=lambda x, w, c, s, r, dy: (x, w), func_type="aot")

    def bprop(x, w, eps, cos, sin, out, dout):
        dx, dw = bwd(x, w, cos, sin, out[1], dout[0])
        return dx, dw, ops.zeros_like(eps), ops.zeros_like(cos), ops.zeros_like(sin)

    return ops.Custom(f"{lib}:NormRopeFwd",
                      out_shape=lambda x, w, e, c, s: ([x[0], x[2], x[1], x[3]], [x[0], x[1], x[2]]),
                      out_dtype=lambda x, w, e, c, s: (x, x), func_type="aot", bprop=bprop)


@functools.lru_cache(maxsize=None)
def _swap_op():
    lib = kernel_library("norm_rope")
    shape = lambda x: [x[0], x[2], x[1], x[3]]
    back = ops.Custom(f"{lib}:SwapAxes12", out_shape=shape, out_dtype=lambda x: x, func_type="aot")

    def bprop(x, out, dout):
        return (back(dout),)

    return ops.Custom(f"{lib}:SwapAxes12", out_shape=shape, out_dtype=lambda x: x, func_type="aot", bprop=bprop)


def available() -> bool:
    return _op() is not None


def norm_rope(x_BSHD: Tensor, w_D: Tensor, eps_1: Tensor, cos_BSD: Tensor, sin_BSD: Tensor) -> Tensor:
    """All fp32 and contiguous; D even."""
    return _op()(x_BSHD, w_D, eps_1, cos_BSD, sin_BSD)[0]


def swap_axes12(x: Tensor) -> Tensor:
    """x [B, A, C, D] float32 contiguous -> [B, C, A, D] (= x.transpose(0, 2, 1, 3)), a copy."""
    return _swap_op()(x)
