"""Load-balancing losses (router/losses.py) against independent NumPy references.

Tolerance 1e-5 relative: every value is a sum of E products of fp32 ratios in [0, K], computed
by MindSpore in fp32 and by the reference in fp64.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from mindspore import Tensor

from qwen3moe.router.losses import (router_seq_stats, router_stats, seq_aux_loss, seq_aux_loss_megatron,
                                    switch_aux_loss)


def np_seq_aux(probs_BSE: np.ndarray, idx_BSK: np.ndarray, mask_BS: np.ndarray, top_k: int) -> float:
    """Megatron sequence_load_balancing_loss_func written out per sequence (loops, fp64):
    f_be = E / (K n_b) * #{t in b counted: e in topk(t)},  P_be = mean over counted t of p_te,
    loss = mean_b sum_e f_be P_be."""
    B, S, E = probs_BSE.shape
    total = 0.0
    for b in range(B):
        n = max(mask_BS[b].sum(), 1.0)
        f, P = np.zeros(E), np.zeros(E)
        for t in range(S):
            if mask_BS[b, t]:
                for e in idx_BSK[b, t]:
                    f[e] += E / (top_k * n)
                P += probs_BSE[b, t] / n
        total += float((f * P).sum())
    return total / B


def routed(seed: int, B: int, S: int, E: int, K: int, pad: bool):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (B, S, E))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    idx = np.argsort(-probs, -1, kind="stable")[..., :K].astype(np.int32)
    mask = np.ones((B, S), np.float32)
    if pad:
        for b, keep in enumerate(rng.integers(0, S + 1, B)):  # ragged right padding, may be empty
            mask[b, keep:] = 0.0
    return probs, idx, mask


def ms_seq_aux(probs, idx, mask, K):
    B, S, E = probs.shape
    c, s, n = router_seq_stats(Tensor(probs.reshape(B * S, E)), Tensor(idx.reshape(B * S, K)),
                               Tensor(mask.reshape(-1)), B)
    return float(seq_aux_loss_megatron(c, s, n, K).asnumpy()), float(seq_aux_loss(c, s, n).asnumpy())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), S=st.integers(1, 12),
       EK=st.sampled_from([(4, 1), (8, 2), (6, 3), (16, 4)]), pad=st.booleans())
def test_seq_aux_matches_numpy_reference(seed, B, S, EK, pad):
    E, K = EK
    probs, idx, mask = routed(seed, B, S, E, K, pad)
    megatron, hf = ms_seq_aux(probs, idx, mask, K)
    ref = np_seq_aux(probs, idx, mask, K)
    assert megatron == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert hf == pytest.approx(K * ref, rel=1e-5, abs=1e-7)  # HF scale = K x Megatron


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), S=st.integers(1, 16), pad=st.booleans())
def test_seq_aux_of_one_sequence_is_the_micro_batch_loss(seed, S, pad):
    probs, idx, mask = routed(seed, 1, S, 8, 2, pad)
    _, hf = ms_seq_aux(probs, idx, mask, 2)
    c, s, n = router_stats(Tensor(probs[0]), Tensor(idx[0]), Tensor(mask[0]))
    assert hf == pytest.approx(float(switch_aux_loss(c, s, n).asnumpy()), rel=1e-6, abs=1e-7)


def test_seq_aux_differs_from_batch_aux_when_sequences_differ():
    """Two sequences each routed to a different half of the experts: balanced as a batch (the
    batch loss is at its minimum K) but not per sequence (each sequence's loss is 2K)."""
    E, K, S = 4, 1, 6
    probs = np.zeros((2, S, E), np.float32)
    probs[0, :, 0] = probs[0, :, 1] = 0.5
    probs[1, :, 2] = probs[1, :, 3] = 0.5
    idx = np.zeros((2, S, K), np.int32)
    idx[0, ::2, 0], idx[0, 1::2, 0], idx[1, ::2, 0], idx[1, 1::2, 0] = 0, 1, 2, 3
    mask = np.ones((2, S), np.float32)
    _, seq = ms_seq_aux(probs, idx, mask, K)
    c, s, n = router_stats(Tensor(probs.reshape(-1, E)), Tensor(idx.reshape(-1, K)), Tensor(mask.reshape(-1)))
    assert float(switch_aux_loss(c, s, n).asnumpy()) == pytest.approx(K)
    assert seq == pytest.approx(2 * K)
