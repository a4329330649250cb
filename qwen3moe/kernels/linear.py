"""Bias-free fp32 linear layers (y = x @ W^T, HF [out, in] weights) as custom ops with a backward
kernel (kernels/csrc/linear.cc, oneDNN's dnnl_sgemm or OpenBLAS; see kernels/build.py).

Shapes: T rows (all leading dims of x), I in-features, O out-features.
`linear(x, w)` = layers/linear.py's `ops.MatMul(transpose_b=True)(x, w)`. `linear3(x, wq, wk, wv)`
returns the three projections of one input from one op (three GEMMs; the dX terms are summed in
the kernel). Inputs must be contiguous; gradients flow to x and every weight.
Used by layers/linear.py for fp32 (q/k/v/o, dense MLP, lm_head): oneDNN's sgemm beats
MindSpore's MatMul on the backward shapes (bench/linear_micro.py, bench/ab_kernel.py; figures in
bench/RESULTS.md).
"""
from __future__ import annotations

import functools

from mindspore import Tensor, ops

from qwen3moe.kernels.build import kernel_library


def _out(x, w):
    return list(x[:-1]) + [w[0]]


@functools.lru_cache(maxsize=None)
def _op1():
    lib = kernel_library("linear")
    if lib is None:
        return None
    bwd = ops.Custom(f"{lib}:LinearBwd", out_shape=lambda x, w, dy: (x, w),
                     out_dtype=lambda x, w, dy: (x, w), func_type="aot")

    def bprop(x, w, out, dout):
        return bwd(x, w, dout)

    return ops.Custom(f"{lib}:LinearFwd", out_shape=_out, out_dtype=lambda x, w: x,
                      func_type="aot", bprop=bprop)


@functools.lru_cache(maxsize=None)
def _op3():
    lib = kernel_library("linear")
    if lib is None:
        return None
    bwd = ops.Custom(f"{lib}:Linear3Bwd",
                     out_shape=lambda x, a, b, c, da, db, dc: (x, a, b, c),
                     out_dtype=lambda x, a, b, c, da, db, dc: (x, a, b, c), func_type="aot")

    def bprop(x, wa, wb, wc, out, dout):
        return bwd(x, wa, wb, wc, dout[0], dout[1], dout[2])

    return ops.Custom(f"{lib}:Linear3Fwd",
                      out_shape=lambda x, a, b, c: (_out(x, a), _out(x, b), _out(x, c)),
                      out_dtype=lambda x, a, b, c: (x, x, x), func_type="aot", bprop=bprop)


def available() -> bool:
    return _op1() is not None


def _check(x: Tensor, *ws: Tensor) -> None:
    for w in ws:
        if len(w.shape) != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"linear kernel: weight {w.shape} does not match input {x.shape}")


def linear(x: Tensor, w_OI: Tensor) -> Tensor:
    """x [..., I] fp32, w [O, I] fp32 -> [..., O]."""
    _check(x, w_OI)
    return _op1()(x, w_OI)


def linear3(x: Tensor, wa: Tensor, wb: Tensor, wc: Tensor):
    """(x @ wa^T, x @ wb^T, x @ wc^T) from one op."""
    _check(x, wa, wb, wc)
    return _op3()(x, wa, wb, wc)
