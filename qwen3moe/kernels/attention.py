"""Fused attention core (scores, bias, softmax, PV with GQA) as a MindSpore custom op with a
backward kernel, and its forward-only twin for generation.

Shapes: B batch, N query heads, K kv heads, S queries, T keys, D head_dim.
`attention_core(q_BNSD, k_BKTD, v_BKTD, bias_B1ST)` = softmax(q k^T * D^-0.5 + bias) v, the same
contract as layers/attention.py `grouped_attention` with scale D^-0.5 (Qwen3's scaling). The
additive bias carries causal and padding masks and gets no gradient.
`attention_infer` (same arguments) returns the same o bit for bit without computing the [B, N, S, T]
probabilities the backward needs, so a long prompt's prefill never holds them.
"""
from __future__ import annotations

import functools

from mindspore import Tensor, ops

from qwen3moe.kernels.build import kernel_library


@functools.lru_cache(maxsize=None)
def _op():
    lib = kernel_library("attention_core")
    if lib is None:
        return None
    bwd = ops.Custom(f"{lib}:AttnCoreBwd", out_shape=lambda q, k, v, b, p, do: (q, k, k),
                     out_dtype=lambda q, k, v, b, p, do: (q, q, q), func_type="aot")

    def bprop(q, k, v, bias, out, dout):
        dq, dk, dv = bwd(q, k, v, bias, out[1], dout[0])
        return dq, dk, dv, ops.zeros_like(bias)

    return ops.Custom(f"{lib}:AttnCoreFwd",
                      out_shape=lambda q, k, v, b: (q, [q[0], q[1], q[2], k[2]]),
                      out_dtype=lambda q, k, v, b: (q, q), func_type="aot", bprop=bprop)


@functools.lru_cache(maxsize=None)
def _infer_op():
    lib = kernel_library("attention_core")
    return ops.Custom(f"{lib}:AttnCoreInfer", out_shape=lambda q, k, v, b: q, out_dtype=lambda q, k, v, b: q,
                      func_type="aot")


def available() -> bool:
    return _op() is not None


def attention_core(q_BNSD: Tensor, k_BKTD: Tensor, v_BKTD: Tensor, bias_B1ST: Tensor) -> Tensor:
    """fp32 only; inputs must be contiguous (the kernel reads raw row-major buffers)."""
    return _op()(q_BNSD, k_BKTD, v_BKTD, bias_B1ST)[0]


def attention_infer(q_BNSD: Tensor, k_BKTD: Tensor, v_BKTD: Tensor, bias_B1ST: Tensor) -> Tensor:
    """softmax(q k^T * D^-0.5 + bias) v -> o_BNSD, equal to `attention_core`'s bit for bit, forward
    only (no gradient). A per-thread scratch of at most 64 x T floats replaces attention_core's [B, N, S, T]
    probabilities. fp32 only; inputs must be contiguous."""
    return _infer_op()(q_BNSD, k_BKTD, v_BKTD, bias_B1ST)
