"""Mesh coordinates/groups/validation and the layout planner (pure arithmetic, no devices)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from qwen3moe.models.config import Qwen3MoeConfig
from qwen3moe.parallel.mesh import Mesh, MeshError
from qwen3moe.parallel.planner import GiB, estimate, plan

C30 = Qwen3MoeConfig.from_preset("qwen3-30b-a3b")


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 3]),
       st.sampled_from([1, 2, 4, 8]))
def test_coordinates_and_groups_partition_ranks(dp, tp, pp, ep):
    m = Mesh(dp=dp, tp=tp, pp=pp, ep=ep, micro_batch_num=4)
    if (dp * tp) % (ep * m.expert_tp):
        with pytest.raises(MeshError, match="ep"):
            m.validate(num_layers=8, num_heads=32, num_kv_heads=4, num_experts=8)
        return
    m.validate(num_layers=8, num_heads=32, num_kv_heads=4, num_experts=8)
    for r in range(m.world_size):
        c = m.coords(r)
        assert m.rank_of(c["tp"], c["dp"], c["pp"]) == r
    sizes = {"tp": tp, "dp": dp, "pp": pp, "ep": ep, "etp": m.expert_tp, "edp": m.edp}
    for kind, size in sizes.items():
        groups = m.groups(kind)
        assert sorted(r for g in groups for r in g) == list(range(m.world_size))
        assert all(len(g) == size for g in groups), kind
    assert all(g == list(range(g[0], g[0] + tp)) for g in m.groups("tp"))  # tp ranks are consecutive


@pytest.mark.parametrize("mesh, words", [
    (Mesh(tp=3), "num_attention_heads"),
    (Mesh(tp=8, dp=1), None),  # 8 > 4 kv heads and a multiple: KV heads replicated, valid
    (Mesh(ep=3, dp=3), "num_experts"),
    (Mesh(pp=99, micro_batch_num=99), "num_hidden_layers"),
    (Mesh(pp=4, micro_batch_num=2), "micro_batch_num"),
    (Mesh(sp=True), "sequence parallel"),
    (Mesh(ep=4, dp=2), r"must divide dp\*tp"),
])
def test_mesh_validation_messages(mesh, words):
    kw = dict(num_layers=48, num_heads=32, num_kv_heads=4, num_experts=128)
    if words is None:
        mesh.validate(**kw)
        assert mesh.kv_heads_per_rank(4) == 1
        return
    with pytest.raises(MeshError, match=words):
        mesh.validate(**kw)


def test_world_size_mismatch():
    with pytest.raises(MeshError, match="world size 8"):
        Mesh(dp=2, tp=2).validate(num_layers=4, num_heads=4, num_kv_heads=2, num_experts=8, world_size=8)


def test_single_device_memory_matches_hand_count():
    e = estimate(C30, Mesh(), seq=4096, mode="infer")
    assert e.weights == 2 * C30.num_parameters()
    assert e.kv_cache == 4096 * 96 * 1024  # 96 KiB per token in bf16 (DESIGN.md)
    t = estimate(C30, Mesh(), seq=4096, mode="train")
    assert t.grads == 2 * t.weights and t.optimizer == 6 * t.weights


def test_zero1_and_experts_shard_memory():
    base = estimate(C30, Mesh(dp=4, micro_batch_num=1), seq=4096)
    z = estimate(C30, Mesh(dp=4, micro_batch_num=1), seq=4096, zero1=True)
    assert z.optimizer == pytest.approx(base.optimizer / 4)
    ep = estimate(C30, Mesh(dp=4, ep=4, micro_batch_num=1), seq=4096)
    assert ep.weights < base.weights / 3  # experts are ~98% of the parameters


def test_plan_includes_seed_layouts_and_ranks_fitting_first():
    train = plan(C30, 16, 64 * GiB, 4096, preset="qwen3-30b-a3b")
    assert any(e.seed and (e.mesh.dp, e.mesh.tp, e.mesh.pp, e.mesh.ep) == (1, 4, 4, 4) for e in train)
    fits = [e.total <= 0.9 * 64 * GiB for e in train]
    assert fits == sorted(fits, reverse=True)
    c235 = Qwen3MoeConfig.from_preset("qwen3-235b-a22b")
    infer = plan(c235, 16, 64 * GiB, 4096, preset="qwen3-235b-a22b", mode="infer")
    assert infer[0].seed  # the seed's model_parallel 16 is the lowest-latency layout that fits


def test_plan_cli(capsys):
    from helpers import cli_error
    from qwen3moe.cli import main

    assert main(["plan", "--preset", "qwen3-30b-a3b", "--devices", "2", "--mode", "infer"]) == 0
    out = capsys.readouterr().out
    assert "(seed layout)" in out and "30,532,122,624" in out
    assert "nope" in cli_error(["plan", "--preset", "nope", "--devices", "2"], capsys)
    assert "lots" in cli_error(["plan", "--preset", "qwen3-30b-a3b", "--devices", "2", "--device-memory", "lots"], capsys)
