"""RMSNorm (last dimension) as one custom op with a backward kernel.

Shapes: x [..., D] fp32 (contiguous), w [D]. `rms_norm(x, w, eps)` = layers/norm.py's composite
`w * (x * rsqrt(mean(x^2) + eps))` (HF Qwen3RMSNorm in fp32), which stays the reference and the
fallback (QWEN3MOE_KERNELS=0, non-fp32 activations or weights). Gradients flow to x and w.
"""
from __future__ import annotations

import functools

import mindspore as ms
from mindspore import Tensor, ops

from qwen3moe.kernels.build import kernel_library


@functools.lru_cache(maxsize=None)
def _op():
    lib = kernel_library("rmsnorm")
    if lib is None:
        return None
    bwd = ops.Custom(f"{lib}:RmsNormBwd", out_shape=lambda x, w, r, dy: (x, w),
                     out_dtype=lambda x, w, r, dy: (x, w), func_type="aot")

    def bprop(x, w, eps, out, dout):
        dx, dw = bwd(x, w, out[1], dout[0])
        return dx, dw, ops.zeros_like(eps)

    def rows(x):
        n = 1
        for s in x[:-1]:
            n *= s
        return [n]

    return ops.Custom(f"{lib}:RmsNormFwd", out_shape=lambda x, w, e: (x, rows(x)),
                      out_dtype=lambda x, w, e: (x, x), func_type="aot", bprop=bprop)


def available() -> bool:
    return _op() is not None


def rms_norm(x: Tensor, w: Tensor, eps: Tensor) -> Tensor:
    """fp32 x and w; eps a float32 tensor of shape [1]."""
    return _op()(x, w, eps)[0]
