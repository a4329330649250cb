"""Training over a simulated dp x tp x pp x ep mesh == the single-device model.

Reference: the unmodified single-device model's own loss (HF semantics: mean CE over valid
labels + router_aux_loss_coef * pooled switch aux loss), its MindSpore gradients and one step of
qwen3moe's AdamW. With M micro-batches the reference is the single-device gradient
accumulation of sum_m CE_m * n_m / N + coef * aux_m / M over the same global micro-batches.
Tolerances (fp32): loss 1e-6 relative and gradients 2e-6 absolute (|g| <= ~0.3): sharding only
reorders sums (row-parallel partials, vocab-parallel sum-exp, gradient buckets); logits 1e-5.
AdamW's first step is lr * g / (|g| + eps): near g = 0 it amplifies a gradient difference by
lr / eps, so the step test uses eps = 1e-3 (gain 10) and compares parameters to 5e-5.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from mindspore import Tensor

from helpers import reference

COMBOS = [  # (dp, tp, pp, ep, micro_batch_num): every degree value at least once
    (1, 1, 1, 1, 1), (1, 2, 1, 1, 1), (1, 4, 1, 1, 1), (1, 2, 1, 2, 1), (2, 1, 1, 2, 1),
    (1, 1, 2, 1, 2), (2, 2, 1, 4, 1), (2, 2, 2, 4, 2),
]
SLOW = [(dp, tp, pp, ep, 2 if pp > 1 else 1) for dp in (1, 2) for tp in (1, 2, 4) for pp in (1, 2)
        for ep in (1, 2, 4) if (dp * tp) % ep == 0]
# CI runs four more (a pipeline with EP, tp=4 with ep=4, dp x pp with EP, dp x tp); the whole
# grid of 28 valid combinations (8- and 16-rank meshes take 40-80 s each on 2 cores) runs with
# QWEN3MOE_FULL_GRID=1
if os.environ.get("QWEN3MOE_FULL_GRID") != "1":
    SLOW = [(1, 2, 2, 2, 2), (1, 4, 1, 4, 1), (2, 1, 2, 2, 2), (2, 2, 1, 1, 1)]
SLOW = [c for c in SLOW if c not in COMBOS]


@pytest.fixture(scope="module")
def setup():
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed

    set_init_seed(0)
    # 3 layers (dense, sparse, sparse) so pp=2 splits a dense and a sparse stage; kv heads = 4
    # so tp=4 shards them (replication: setup_kv2 below); a large aux coefficient
    # makes the router-loss gradient visible next to the CE gradient
    cfg = Qwen3MoeConfig.from_preset("tiny", vocab_size=128, num_hidden_layers=3, mlp_only_layers=[0],
                                     num_key_value_heads=4, head_dim=16, router_aux_loss_coef=0.5)
    model = Qwen3MoeForCausalLM(cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (4, 8))
    labels = ids.copy()
    labels[0, 3] = labels[3, 5] = -100
    return cfg, model, ids, labels


def check_combo(setup, dp, tp, pp, ep, M, sp=False):
    from parallel_sim.dp import ShardedAdamW, allreduce_grads
    from qwen3moe.parallel.mesh import Mesh
    from parallel_sim.trainer import ParallelLM
    from qwen3moe.training.optimizer import AdamW
    from qwen3moe import Qwen3MoeForCausalLM

    cfg, model, ids, labels = setup
    pl = ParallelLM.from_model(model, Mesh(dp=dp, tp=tp, pp=pp, ep=ep, sp=sp, micro_batch_num=M))
    np.testing.assert_allclose(pl.logits(ids), model(ids).logits.asnumpy(), rtol=0, atol=1e-5)
    if sp:  # 7 tokens: the sequence-parallel split pads them to a multiple of tp
        odd = ids[: dp * M, :7]
        np.testing.assert_allclose(pl.logits(odd), model(odd).logits.asnumpy(), rtol=0, atol=1e-5)
    losses, grads = pl.loss_and_grads(ids, labels)
    want_loss, want_grads = reference(cfg, model, ids, labels, dp, M)
    assert sorted(losses) == list(range(pp))  # reported on every stage, not 0 on the first ones
    for value in losses.values():
        assert value == pytest.approx(want_loss, rel=1e-6)
    allreduce_grads(pl, grads, bucket_elems=4096)
    got = pl.full_grads(grads)
    assert set(got) == set(want_grads)
    for name, g in want_grads.items():
        np.testing.assert_allclose(got[name], g, rtol=0, atol=2e-6, err_msg=name)

    opt = ShardedAdamW(pl, lr=1e-2, eps=1e-3, weight_decay=0.1)
    opt.step(grads)
    ref = Qwen3MoeForCausalLM(cfg)
    for p, q in zip(ref.trainable_params(), model.trainable_params()):
        p.set_data(q.data.copy())
    AdamW(ref.trainable_params(), lr=1e-2, eps=1e-3, weight_decay=0.1)(
        tuple(Tensor(want_grads[p.name]) for p in ref.trainable_params()))
    stepped = pl.full_params()
    for p in ref.trainable_params():
        np.testing.assert_allclose(stepped[p.name], p.asnumpy(), rtol=0, atol=5e-5, err_msg=p.name)
    assert_replicas_identical(pl)


def assert_replicas_identical(pl):
    """After the synced step every replica of a shard holds the same values (data parallel,
    router and q/k norm over tp): the all-reduce reached every member."""
    seen: dict = {}
    for s in range(pl.mesh.pp):
        for entries in pl.entries[s].values():
            for p, info in entries:
                key = (info.name, info.tp_rank, info.ep_rank)
                if key in seen:
                    np.testing.assert_array_equal(p.asnumpy(), seen[key], err_msg=p.name)
                else:
                    seen[key] = p.asnumpy()


@pytest.mark.parametrize("dp, tp, pp, ep, M", COMBOS)
def test_training_equals_single_device(setup, dp, tp, pp, ep, M):
    check_combo(setup, dp, tp, pp, ep, M)


@pytest.mark.slow
@pytest.mark.parametrize("dp, tp, pp, ep, M", SLOW)
def test_training_equals_single_device_all_combos(setup, dp, tp, pp, ep, M):
    check_combo(setup, dp, tp, pp, ep, M)


SP_COMBOS = [(1, 2, 1, 1, 1), (1, 4, 1, 1, 1),
             pytest.param(2, 2, 1, 2, 1, marks=pytest.mark.slow), pytest.param(1, 2, 2, 2, 2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("dp, tp, pp, ep, M", SP_COMBOS)
def test_sequence_parallel_equals_single_device(setup, dp, tp, pp, ep, M):
    """Megatron SP (norms / residual split by tokens over tp, all-gather before the column and
    reduce-scatter after the row blocks): same logits, loss, gradients and step."""
    check_combo(setup, dp, tp, pp, ep, M, sp=True)


def test_zero1_equals_unsharded_and_shards_state(setup):
    from parallel_sim.dp import ShardedAdamW, allreduce_grads
    from qwen3moe.parallel.mesh import Mesh
    from parallel_sim.trainer import ParallelLM

    cfg, model, ids, labels = setup
    mesh = Mesh(dp=2)  # experts replicated over dp too, so every sync group has 2 members
    results, state = [], []
    for zero1 in (False, True):
        pl = ParallelLM.from_model(model, mesh)
        opt = ShardedAdamW(pl, zero1=zero1, lr=1e-2, weight_decay=0.1)
        for _ in range(2):  # two steps: the moments carried by the chunks are used
            _, grads = pl.loss_and_grads(ids, labels)
            allreduce_grads(pl, grads)
            opt.step(grads)
        results.append(pl.full_params())
        state.append(opt.state_elems())
        assert_replicas_identical(pl)
    for name, arr in results[0].items():
        np.testing.assert_array_equal(results[1][name], arr, err_msg=name)  # elementwise: exact
    for key, n in state[0].items():  # each of the 2 replicas keeps about half the moments
        assert state[1][key] <= n // 2 + 2 * 2
    with pytest.raises(ValueError, match="no_decay"):
        ShardedAdamW(ParallelLM.from_model(model, mesh), zero1=True, no_decay=("*norm.weight",))


def test_buckets_change_message_count_not_result(setup):
    from parallel_sim.dp import allreduce_grads
    from qwen3moe.parallel.mesh import Mesh
    from parallel_sim.trainer import ParallelLM

    cfg, model, ids, labels = setup
    pl = ParallelLM.from_model(model, Mesh(dp=2))
    _, grads = pl.loss_and_grads(ids, labels)
    small, big = dict(grads), dict(grads)
    n_small = allreduce_grads(pl, small, bucket_elems=2048)
    n_big = allreduce_grads(pl, big, bucket_elems=1 << 24)
    # one message per sync class (dense over dp, router + q/k norm over the stage, experts over
    # edp) vs many small ones
    assert n_big == 3 and n_small > 10
    for k in grads:
        np.testing.assert_array_equal(small[k], big[k])


def test_vocab_parallel_loss_never_gathers_the_vocab(setup):
    from qwen3moe.parallel.mesh import Mesh
    from parallel_sim.trainer import ParallelLM

    cfg, model, ids, labels = setup
    pl = ParallelLM.from_model(model, Mesh(tp=4))
    gathered = []
    orig = pl.coll.gather
    pl.coll.gather = lambda kind, xs, axis=0: gathered.append(next(iter(xs.values())).shape) or orig(kind, xs, axis)
    pl.loss_and_grads(ids, labels)
    assert gathered and all(cfg.vocab_size // 4 not in shape[1:] for shape in gathered), gathered


def test_pipeline_offsets_and_errors(setup):
    from qwen3moe.parallel.mesh import Mesh, MeshError
    from qwen3moe.parallel.ranks import stage_layers
    from parallel_sim.trainer import ParallelLM

    cfg, model, ids, labels = setup
    assert stage_layers(3, 2) == [range(0, 1), range(1, 3)]
    assert stage_layers(3, 2, [1, 0]) == [range(0, 2), range(2, 3)]
    with pytest.raises(MeshError, match="offset"):
        stage_layers(3, 2, [1, 1])
    pl = ParallelLM.from_model(model, Mesh(pp=2, micro_batch_num=2), offset=[1, 0])
    np.testing.assert_allclose(pl.logits(ids), model(ids).logits.asnumpy(), rtol=0, atol=1e-5)
    with pytest.raises(MeshError, match="num_key_value_heads=3 or be a multiple"):  # tp=2, K=3
        ParallelLM(cfg.__class__.from_preset("tiny", num_attention_heads=6, num_key_value_heads=3),
                   Mesh(tp=2), lambda k: None)
    with pytest.raises(ValueError, match="divisible by dp"):
        ParallelLM.from_model(model, Mesh(dp=2, micro_batch_num=4)).split_batch(ids)


@pytest.fixture(scope="module")
def setup_kv2():
    """Two kv heads, so tp=4 replicates each over 2 ranks (vLLM's rule)."""
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed

    set_init_seed(1)
    cfg = Qwen3MoeConfig.from_preset("tiny", vocab_size=128, num_hidden_layers=2, mlp_only_layers=[0],
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     router_aux_loss_coef=0.5)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 128, (4, 8))
    return cfg, Qwen3MoeForCausalLM(cfg), ids, ids.copy()


@pytest.mark.parametrize("dp, tp, sp", [(1, 4, False), pytest.param(2, 4, True, marks=pytest.mark.slow)])
def test_replicated_kv_heads_train_equals_single_device(setup_kv2, dp, tp, sp):
    """tp > num_key_value_heads: each kv head's k/v rows live on tp/K ranks whose gradients
    (from their own q heads) are summed over those ranks: gradients and step == single device."""
    from parallel_sim.dp import sync_classes
    from qwen3moe.parallel.mesh import Mesh
    from parallel_sim.trainer import ParallelLM

    cfg, model = setup_kv2[:2]
    pl = ParallelLM.from_model(model, Mesh(dp=dp, tp=tp))
    assert "kv2" in sync_classes(pl)
    check_combo(setup_kv2, dp, tp, 1, 1, 1, sp=sp)


@pytest.mark.parametrize("dp,tp,pp,ep,M", [(1, 2, 1, 2, 1), (2, 1, 2, 1, 2)], ids=["tp2ep2", "dp2pp2"])
def test_reset_position_ids_equal_single_device(setup, dp, tp, pp, ep, M):
    """Megatron data with reset_position_ids: positions restart after each EOD. The sharded loss
    and gradients use them exactly as the single-device model does (same tolerances as above),
    and they matter: the loss differs from the one with positions 0..S-1."""
    from parallel_sim.dp import allreduce_grads
    from qwen3moe.parallel.mesh import Mesh
    from parallel_sim.trainer import ParallelLM

    cfg, model, ids, labels = setup
    pos = np.stack([np.r_[np.arange(3), np.arange(5)], np.arange(8), np.r_[np.arange(6), np.arange(2)],
                    np.r_[np.arange(2), np.arange(4), np.arange(2)]])
    want_loss, want_grads = reference(cfg, model, ids, labels, dp, M, pos)
    pl = ParallelLM.from_model(model, Mesh(dp=dp, tp=tp, pp=pp, ep=ep, micro_batch_num=M))
    losses, grads = pl.loss_and_grads(ids, labels, pos)
    for value in losses.values():
        assert value == pytest.approx(want_loss, rel=1e-6)
    assert abs(want_loss - reference(cfg, model, ids, labels, dp, M)[0]) > 1e-4
    allreduce_grads(pl, grads, bucket_elems=4096)
    got = pl.full_grads(grads)
    for name, g in want_grads.items():
        np.testing.assert_allclose(got[name], g, rtol=0, atol=2e-6, err_msg=name)


def test_accumulation_groups_take_trainsteps_per_micro_batch_token_means(setup):
    """pretrain --use_parallel pp2 with gradient accumulation 2 (= micro_batch_num) and
    eod_mask_loss: TrainStep's LM loss is the mean over the accumulation micro-batches of each
    one's token mean, so with unequal valid-label counts it is not the global token mean the
    engine used (the pp2 real-process test had to run without eod_mask_loss). With groups=2 the
    sharded loss and gradients equal the mean of the single-device model's (loss, gradients) on
    each micro-batch (its own objective: HF lm_loss + coef * aux); groups=1 keeps the token mean
    over the batch, which differs here."""
    from parallel_sim.dp import allreduce_grads
    from qwen3moe.parallel.mesh import Mesh
    from parallel_sim.trainer import ParallelLM

    cfg, model, ids, _ = setup
    labels = ids.copy()
    labels[0, 1:7] = labels[1, 2] = -100  # micro-batch 0: 7 labels masked of 14, micro-batch 1: none
    parts = [reference(cfg, model, ids[g:g + 2], labels[g:g + 2], 1, 1) for g in (0, 2)]
    want_loss = (parts[0][0] + parts[1][0]) / 2
    pl = ParallelLM.from_model(model, Mesh(pp=2, micro_batch_num=2))
    losses, grads = pl.loss_and_grads(ids, labels, groups=2)
    for value in losses.values():
        assert value == pytest.approx(want_loss, rel=1e-6)
    assert abs(reference(cfg, model, ids, labels, 1, 2)[0] - want_loss) > 1e-3  # the global token mean differs
    allreduce_grads(pl, grads, bucket_elems=4096)
    got = pl.full_grads(grads)
    for name in parts[0][1]:
        np.testing.assert_allclose(got[name], (parts[0][1][name] + parts[1][1][name]) / 2, rtol=0, atol=2e-6,
                                   err_msg=name)
