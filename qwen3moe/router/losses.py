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
Sequence-level variant (DeepSeek-V2/V3, Megatron `seq_aux_loss`): the same product taken per
sequence b with its own statistics c_be, s_be, n_b, then averaged over sequences:
    aux_seq_hf = (1/B) sum_b E * sum_e (c_be / n_b) * (s_be / n_b),   aux_seq_megatron = aux_seq_hf / K
It asks every sequence to be balanced on its own (stronger than the batch loss); with B = 1 it
is the micro-batch loss.
z-loss (ST-MoE): mean_t logsumexp(logits_t)^2.
"""
from __future__ import annotations

import numpy as np
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


def router_seq_stats(probs_TE: Tensor, idx_TK: Tensor, token_mask_T: Tensor, batch: int):
    """(c_BE, s_BE, n_B): router_stats per sequence; tokens are laid out (b, s) row-major, T = B*S."""
    E = probs_TE.shape[-1]
    m_BS1 = token_mask_T.astype(ms.float32).reshape(batch, -1, 1)
    onehot_TE = ops.one_hot(idx_TK.astype(ms.int32), E, Tensor(1.0, ms.float32),
                            Tensor(0.0, ms.float32)).sum(1)
    counts_BE = (ops.stop_gradient(onehot_TE).reshape(batch, -1, E) * m_BS1).sum(1)
    probsum_BE = (probs_TE.reshape(batch, -1, E) * m_BS1).sum(1)
    return counts_BE, probsum_BE, m_BS1.sum((1, 2))


def seq_aux_loss(counts_BE: Tensor, probsum_BE: Tensor, n_B: Tensor) -> Tensor:
    """Sequence-level aux loss, HF scale: mean over sequences of E * sum_e (c_be/n_b)(s_be/n_b).

    Derivation: Megatron's `sequence_load_balancing_loss_func` (and DeepSeek-V2's L_ExpBal with
    f_i = E/(K S) * count_i, P_i = mean_t p_ti per sequence) is (1/B) sum_b sum_e f_be P_be with
    f_be = E c_be / (K n_b), P_be = s_be / n_b; that is aux_seq_hf / K (`seq_aux_loss_megatron`).
    Padding is excluded through the counts (n_b = counted tokens of sequence b); a fully padded
    sequence has c = s = 0 and contributes 0. Pass statistics summed over layers to pool layers.
    """
    E = counts_BE.shape[-1]
    n_B1 = ops.maximum(n_B, Tensor(1.0, ms.float32)).reshape(-1, 1)
    return E * ((counts_BE / n_B1) * (probsum_BE / n_B1)).sum(-1).mean()


def seq_aux_loss_megatron(counts_BE: Tensor, probsum_BE: Tensor, n_B: Tensor, top_k: int) -> Tensor:
    """Megatron `seq_aux_loss` value (f sums to 1 per sequence): seq_aux_loss / K."""
    return seq_aux_loss(counts_BE, probsum_BE, n_B) / top_k


def switch_aux_loss(counts_E: Tensor, probsum_E: Tensor, n_tokens: Tensor) -> Tensor:
    """HF value: E * sum_e (c_e / n) * (s_e / n). Pass statistics summed over layers to pool."""
    E = counts_E.shape[-1]
    n = ops.maximum(n_tokens, Tensor(1.0, ms.float32))
    return E * ((counts_E / n) * (probsum_E / n)).sum()


def switch_aux_weights(counts_E, n_tokens) -> np.ndarray:
    """w_e = E * c_e / n^2 (host, float64). With the counts held fixed the switch loss is linear
    in the probability mass, switch_aux_loss = sum_e w_e * s_e, so sum_e w_e * s_e' over any
    subset of the tokens (one rank's rows, one pipeline stage's layers) is that subset's share of
    the pooled loss, and w is its gradient with respect to s' (the counts carry none)."""
    c_E = np.asarray(counts_E, np.float64)
    return c_E.shape[-1] * c_E / max(float(n_tokens), 1.0) ** 2


def z_loss(logits_TE: Tensor, token_mask_T: Tensor) -> Tensor:
    """mean over counted tokens of logsumexp(logits)^2."""
    lse_T = ops.logsumexp(logits_TE.astype(ms.float32), -1)
    m_T = token_mask_T.astype(ms.float32)
    return (lse_T * lse_T * m_T).sum() / ops.maximum(m_T.sum(), Tensor(1.0, ms.float32))
