"""Load-balancing losses as pure functions of per-layer router statistics.

Shapes: T tokens, E experts, K experts per token, L MoE layers.

Every loss here is built from two sufficient statistics per layer, accumulated over whatever
set of tokens the loss is defined on (a micro-batch, all layers, a global batch):
    c_e = sum_t m_t * [e in topk(t)]       (top-k assignment counts, sum_e c_e = K * n)
    s_e = sum_t m_t * p_te                  (router probability mass, sum_e s_e = n)
    n   = sum_t m_t                         (counted tokens; m_t = 0 on padding)

HF switch loss (transformers `load_balancing_loss_func`, pooled over all layers' tokens):
    f_e = c_e / n  (sums to K),  P_e = s_e / n,   aux_hf = E * sum_e f_e * P_e
Perfect balance gives f_e = K/E, P_e = 1/E, aux_hf = K.
Megatron / MindSpore Transformers normalise f by n*K (sums to 1):  aux_megatron = aux_hf / K.
Global-batch variant (Qwen3 recipe): accumulate c, s, n over micro-batches and DP ranks
before the product, so balance is only required across the global batch.
z-loss (ST-MoE): mean_t logsumexp(logits_t)^2.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops


def router_stats(probs_TE: Tensor, idx_TK: Tensor, token_mask_T: Tensor):
    """(c_E, s_E, n) for one layer; token_mask_T is 1.0 for counted tokens, 0.0 for padding."""
    E = probs_TE.shape[-1]
    m_T1 = token_mask_T.astype(ms.float32).reshape(-1, 1)
    onehot_TE = ops.one_hot(idx_TK.astype(ms.int32), E, Tensor(1.0, ms.float32),
                            Tensor(0.0, ms.float32)).sum(1)
    counts_E = (ops.stop_gradient(onehot_TE) * m_T1).sum(0)
    probsum_E = (probs_TE * m_T1).sum(0)
    return counts_E, probsum_E, m_T1.sum()


def switch_aux_loss(counts_E: Tensor, probsum_E: Tensor, n_tokens: Tensor) -> Tensor:
    """HF value: E * sum_e (c_e / n) * (s_e / n). Pass statistics summed over layers to pool."""
    E = counts_E.shape[-1]
    n = ops.maximum(n_tokens, Tensor(1.0, ms.float32))
    return E * ((counts_E / n) * (probsum_E / n)).sum()


def megatron_aux_loss(counts_E: Tensor, probsum_E: Tensor, n_tokens: Tensor, top_k: int) -> Tensor:
    """Megatron-normalised value: f sums to 1, so the result is the HF value / K."""
    return switch_aux_loss(counts_E, probsum_E, n_tokens) / top_k


def z_loss(logits_TE: Tensor, token_mask_T: Tensor) -> Tensor:
    """mean over counted tokens of logsumexp(logits)^2."""
    lse_T = ops.logsumexp(logits_TE.astype(ms.float32), -1)
    m_T = token_mask_T.astype(ms.float32)
    return (lse_T * lse_T * m_T).sum() / ops.maximum(m_T.sum(), Tensor(1.0, ms.float32))
