"""Fused attention core (scores, bias, softmax, PV with GQA) as a MindSpore custom op with a
backward kernel.

Shapes: B batch, N query heads, K kv heads, S queries, T keys, D head_dim.
`attention_core(q_BNSD, k_BKTD, v_BKTD, bias_B1ST)` = softmax(q k^T * D^-0.5 + bias) v, the same
contract as layers/attention.py `grouped_attention` with scale D^-0.5 (Qwen3's scaling). The
additive bias carries causal and padding masks and gets no gradient.
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


def available() -> bool:
    return _op() is not None


def attention_core(q_BNSD: Tensor, k_BKTD: Tensor, v_BKTD: Tensor, bias_B1ST: Tensor) -> Tensor:
    """fp32 only; inputs must be contiguous (the kernel reads raw row-major buffers)."""
    return _op()(q_BNSD, k_BKTD, v_BKTD, bias_B1ST)[0]
