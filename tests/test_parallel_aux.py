"""Global-batch aux loss across data-parallel ranks (parallel/aux.py) with simulated ranks.

Tolerances: values 1e-6 (fp32 sums of O(1) terms); gradients 1e-6 abs (entries up to ~0.1,
the rank split changes only the summation order: observed <= 1.2e-7).
"""
from __future__ import annotations

import numpy as np
import pytest
import mindspore as ms
from mindspore import ParameterTuple, Tensor

from qwen3moe.models.inputs import prepare_inputs
from parallel_sim.aux import SimComm, global_aux_terms
from qwen3moe.router.losses import switch_aux_loss


def tiny_model():
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed

    set_init_seed(0)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=2))


def pooled_stats(model, ids: np.ndarray):
    """(c_E, s_E, n) pooled over the sparse layers (n counted once per layer, as HF pools)."""
    t = prepare_inputs(model.config, ids)
    counts_LE, probsum_LE, n = model.construct(t.input_ids, t.cos, t.sin, t.bias, t.token_mask,
                                               None, 0, True, False)[-1]
    L = counts_LE.shape[0]
    return counts_LE.sum(0), probsum_LE.sum(0), n * L


def test_global_aux_over_two_ranks_equals_single_process_on_the_concatenated_batch():
    model = tiny_model()
    x = np.random.default_rng(7).integers(0, 1024, (4, 12))
    halves = [x[:2], x[2:]]
    weights = ParameterTuple([p for p in model.trainable_params() if "gate" in p.name])

    def full_aux():
        return switch_aux_loss(*pooled_stats(model, x))

    def dp_aux():
        terms = global_aux_terms(SimComm(2), [pooled_stats(model, h) for h in halves])
        return terms[0] + terms[1]

    v_full, g_full = ms.value_and_grad(full_aux, None, weights)()
    v_dp, g_dp = ms.value_and_grad(dp_aux, None, weights)()
    assert float(v_dp.asnumpy()) == pytest.approx(float(v_full.asnumpy()), abs=1e-6)
    assert max(float(np.abs(g.asnumpy()).max()) for g in g_full) > 1e-4  # the router is trained
    for a, b in zip(g_full, g_dp):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=0, atol=1e-6)
    # a per-rank loss (no reduction) is a different objective: the test can tell them apart
    local = sum(float(switch_aux_loss(*pooled_stats(model, h)).asnumpy()) for h in halves) / 2
    assert abs(local - float(v_full.asnumpy())) > 1e-4


def test_train_step_global_aux_over_micro_batches_and_dp_ranks():
    """Two dp ranks x two micro-batches of one row each, counts reduced through the
    `stats_reducer` hook, rank gradients averaged (what dp all-reduce-mean does) == the
    single-process global aux over the four micro-batches (equal token counts, so the LM part
    is the same mean too)."""
    from qwen3moe.training import AdamW
    from qwen3moe.training.step import TrainStep

    model = tiny_model()
    opt = AdamW(model.trainable_params(), lr=1e-3)
    x = np.random.default_rng(8).integers(0, 1024, (4, 12))
    ranks = [[x[0:1], x[1:2]], [x[2:3], x[3:4]]]
    local: dict[int, tuple] = {}

    def capture(r):
        def fn(C, N):
            local[r] = (C, N)
            return C, N, 1
        return fn

    step = TrainStep(model, opt, aux_coef=0.1, aux_mode="global")  # one compiled graph for all
    for r, micro in enumerate(ranks):
        step.stats_reducer = capture(r)
        step.gradients(micro)

    def reduced(C, N):
        return local[0][0] + local[1][0], local[0][1] + local[1][1], 2

    step.stats_reducer = reduced
    per_rank = [step.gradients(m) for m in ranks]
    step.stats_reducer = None
    _, full_g = step.gradients(ranks[0] + ranks[1])
    no_dp = [step.gradients(m)[1] for m in ranks]
    for i, g in enumerate(full_g):
        mean = (per_rank[0][1][i] + per_rank[1][1][i]) / 2
        np.testing.assert_allclose(mean, g, rtol=0, atol=1e-6)
    gate = next(i for i, p in enumerate(opt.parameters) if "gate" in p.name)
    assert np.abs((no_dp[0][gate] + no_dp[1][gate]) / 2 - full_g[gate]).max() > 1e-5
