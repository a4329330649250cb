"""Per-token cross-entropy over the vocabulary as one custom op with a backward kernel.

Shapes: T tokens, V vocab. `token_cross_entropy(logits_TV, labels_T)` = `ops.cross_entropy(
logits_TV, labels_T, reduction="none")` for fp32 logits and labels in [0, V) (callers map
ignored labels to a valid id and mask the result, as models/qwen3_moe.py does). The composite op
stays the reference and the fallback (QWEN3MOE_KERNELS=0, non-fp32 logits).
"""
from __future__ import annotations

import functools

import mindspore as ms
from mindspore import Tensor, ops

from qwen3moe.kernels.build import kernel_library


@functools.lru_cache(maxsize=None)
def _op():
    lib = kernel_library("cross_entropy")
    if lib is None:
        return None
    bwd = ops.Custom(f"{lib}:CrossEntropyBwd", out_shape=lambda x, lab, lse, dce, dlse: x,
                     out_dtype=lambda x, lab, lse, dce, dlse: x, func_type="aot")

    def bprop(x, labels, out, dout):
        return bwd(x, labels, out[1], dout[0], dout[1]), ops.zeros_like(labels)

    return ops.Custom(f"{lib}:CrossEntropyFwd", out_shape=lambda x, lab: ([x[0]], [x[0]]),
                      out_dtype=lambda x, lab: (x, x), func_type="aot", bprop=bprop)


def available() -> bool:
    return _op() is not None


def token_cross_entropy(logits_TV: Tensor, labels_T: Tensor) -> Tensor:
    """ce_T (fp32); the kernel when built and the logits are fp32, else the composite op."""
    if available() and logits_TV.dtype == ms.float32:
        return _op()(logits_TV, labels_T.astype(ms.int32))[0]
    return ops.cross_entropy(logits_TV.astype(ms.float32), labels_T, reduction="none")
