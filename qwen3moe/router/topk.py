"""Top-k softmax router (HF Qwen3MoeTopKRouter): fp32 softmax, top-k, optional renorm.

Shapes: T tokens, H hidden, E experts, K experts per token.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.layers.dtypes import init_param


def route(logits_TE: Tensor, top_k: int, norm_topk_prob: bool):
    """(probs_TE fp32, weights_TK in logits dtype, idx_TK int32) from router logits."""
    probs_TE = ops.softmax(logits_TE.astype(ms.float32), -1)
    weights_TK, idx_TK = ops.topk(probs_TE, top_k)
    if norm_topk_prob:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdims=True)
    return probs_TE, weights_TK.astype(logits_TE.dtype), idx_TK.astype(ms.int32)


class TopKRouter(nn.Cell):
    """Holds `weight` [E, H] (HF `mlp.gate.weight`); logits = x @ W^T, no bias."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool,
                 init_std: float = 0.02, param_dtype=None) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.weight = init_param((num_experts, hidden_size), init_std, "weight", param_dtype)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x_TH: Tensor):
        logits_TE = self.matmul(x_TH, self.weight.astype(x_TH.dtype))
        probs_TE, weights_TK, idx_TK = route(logits_TE, self.top_k, self.norm_topk_prob)
        return logits_TE, probs_TE, weights_TK, idx_TK
