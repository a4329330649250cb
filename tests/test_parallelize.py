"""parallel/parallelize.py: this rank's model from the model's own classes with the plan applied
from outside.

Fast (one process, no collectives): every parameter's HF name, shape, ShardInfo and values
against ranks.py's engine shards (build_stage) and against slicing the full HF tensors; with
mesh 1x1 the planned model's compiled logits, loss and aux equal the unmodified model's bit
for bit (the wrappers add nothing).
Real processes (`dist` + `slow`, ~40-60 s a launch, 150-270 s at load 12): each rank's compiled
forward (logits gathered over tp, router logits, hidden states) == the single-process model on
that rank's rows (fixture tiny-mqa-dense: dense and sparse layers, one kv head replicated over
tp = 2; tp2 + sequence parallel also with T = 21, one zero pad row), and each parameter's compiled
gradient of loss = lm_loss + coef * aux, summed over its ShardInfo sync group, == the sliced
single-process gradient of sum over dp ranks of their losses.
Tolerances: logits, router logits and hidden states 2e-5 absolute (|logits| ~ 1: fp32 sums split over ranks in another order);
gradients 1e-5 of the tensor's largest reference entry plus 1e-4 relative (same reason, summed
over up to 4 partial contributions)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from helpers import HF_FIXTURES, launch

MQA = HF_FIXTURES / "tiny-mqa-dense"


def _full(path) -> dict[str, np.ndarray]:
    from qwen3moe import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(path)
    return model, {p.name: p.asnumpy() for p in model.get_parameters()}


@pytest.mark.parametrize("layout", [dict(tp=2), dict(dp=2, ep=2), dict(tp=4), dict(dp=2, tp=2, ep=4),
                                    dict(tp=2, pp=2, micro_batch_num=2), dict(tp=2, sp=True),
                                    dict(dp=2, tp=2, ep=2, sp=True)],
                         ids=["tp2", "dp2ep2", "tp4", "dp2tp2ep4", "tp2pp2", "tp2sp", "dp2tp2ep2sp"])
def test_plan_shards_match_engine_and_full_tensors(layout):
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.parallelize import parallelize
    from parallel_sim.ranks import build_stage
    from qwen3moe.parallel.ranks import slice_for, stage_layers

    cfg = Qwen3MoeConfig.from_pretrained(MQA)
    _, full = _full(MQA)
    mesh = Mesh(**layout)
    for rank in range(mesh.world_size):
        rm = parallelize(cfg, mesh, rank, full.__getitem__, coll=SimpleNamespace(groups={}))
        s = mesh.coords(rank)["pp"]
        layers = stage_layers(cfg.num_hidden_layers, mesh.pp)[s]
        assert rm.layers == layers and rm.local_config.num_hidden_layers == len(layers)
        assert rm.local_config.num_key_value_heads == mesh.kv_heads_per_rank(cfg.num_key_value_heads)
        _, engine = build_stage(cfg, mesh, s, rank % (mesh.dp * mesh.tp), layers, full.__getitem__)
        want = {i.name: (i, p.shape) for p, i in engine}
        got = {p.name: (i, p.shape) for p, i in rm.entries}
        assert got == want, (rank, set(got) ^ set(want))
        for p, info in rm.entries:
            assert info.name == p.name and rm.info(p.name) is info
            np.testing.assert_array_equal(p.asnumpy(), slice_for(info, full[p.name]), err_msg=p.name)


def test_plan_on_one_rank_is_the_model():
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.parallelize import parallelize

    model, _ = _full(MQA)
    rm = parallelize(Qwen3MoeConfig.from_pretrained(MQA), Mesh(), 0, str(MQA), coll=SimpleNamespace(groups={}))
    assert rm.bytes_read == sum(p.asnumpy().nbytes for p, _ in rm.entries)
    ids = np.random.default_rng(0).integers(0, 1024, (2, 7))
    a = rm.model(ids, labels=ids, output_router_logits=True)
    b = model(ids, labels=ids, output_router_logits=True)
    np.testing.assert_array_equal(a.logits.asnumpy(), b.logits.asnumpy())
    np.testing.assert_array_equal(a.aux_loss.asnumpy(), b.aux_loss.asnumpy())
    np.testing.assert_array_equal(a.loss.asnumpy(), b.loss.asnumpy())


def test_plan_refuses_layouts_it_cannot_run():
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.mesh import Mesh, MeshError
    from qwen3moe.parallel.parallelize import parallelize

    cfg = Qwen3MoeConfig.from_pretrained(MQA)
    with pytest.raises(MeshError, match="etp=2 with ep=2"):
        parallelize(cfg, Mesh(dp=2, tp=2, ep=2, etp=2), 0, coll=SimpleNamespace(groups={}))
    with pytest.raises(MeshError, match="dispatcher 'tp'.*sequence parallel"):
        parallelize(cfg, Mesh(tp=2, sp=True), 0, dispatcher="tp", coll=SimpleNamespace(groups={}))
    with pytest.raises(MeshError, match="dispatcher 'alltoall' needs ep > 1"):
        parallelize(cfg, Mesh(tp=2, sp=True), 0, dispatcher="alltoall", coll=SimpleNamespace(groups={}))


def test_generate_refuses_sequence_parallel():
    """sp is a training layout (the decode step runs the layers' modules on whole rows)."""
    from qwen3moe.generation.batch import GenerateRequest
    from qwen3moe.generation.errors import GenerationError
    from qwen3moe.parallel.generate import check_request
    from qwen3moe.parallel.mesh import Mesh

    with pytest.raises(GenerationError, match="sequence parallel"):
        check_request(GenerateRequest(str(MQA), "hello"), Mesh(tp=2, sp=True))


def _reference(batch: int, seq: int, dp: int):
    """Per dp rank: logits, loss, aux of the single-process model on its rows, and the
    gradient of sum over ranks of their losses (lm_loss + coef * aux)."""
    import mindspore as ms
    from mindspore import ParameterTuple

    from qwen3moe.models.inputs import prepare_inputs
    from qwen3moe.parallel.distcheck import data

    model, _ = _full(MQA)
    cfg = model.config
    ids = data(cfg.vocab_size, batch, seq)
    b = batch // dp
    params = ParameterTuple(model.trainable_params())
    per, grads = [], None
    for r in range(dp):
        rows = ids[r * b:(r + 1) * b]
        out = model(rows, labels=rows, output_router_logits=True)
        hidden = np.stack([x.asnumpy() for x in model(rows, output_hidden_states=True).hidden_states])
        per.append((out.logits.asnumpy(), float(out.loss.asnumpy()), float(out.aux_loss.asnumpy()),
                    np.stack([x.asnumpy() for x in out.router_logits]), hidden))
        t = prepare_inputs(cfg, rows, labels=rows)
        g = ms.grad(lambda: model.construct(t.input_ids, t.cos, t.sin, t.bias, t.token_mask, t.labels,
                                            0, True, False)[1], None, params)()
        g = [x.asnumpy() for x in g]
        grads = g if grads is None else [a + x for a, x in zip(grads, g)]
    return per, {p.name: x for p, x in zip(params, grads)}


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("layout, batch", [(["--tp", "2"], 4), (["--dp", "2", "--ep", "2"], 4),
                                           (["--pp", "2", "--micro_batch_num", "2"], 4),
                                           (["--tp", "2", "--sp"], 4),  # sequence parallel, T = 28
                                           (["--tp", "2", "--sp"], 3)],  # T = 21: a zero pad row
                         ids=["tp2", "dp2ep2", "pp2", "tp2sp", "tp2sp-oddT"])
def test_compiled_rank_forward_and_gradients_equal_one_process(tmp_path, layout, batch):
    from qwen3moe.parallel.mesh import Mesh

    seq = 7
    # one timed repeat (the benchmark's job); up to 4 graphs compile per rank: 480 s under load
    rc, err, results = launch(tmp_path, "dist-parallel", "--model", str(MQA), "--mode", "forward", "--steps", "1",
                              "--batch", str(batch), "--seq", str(seq), "--out", str(tmp_path), *layout,
                              timeout=480)
    assert rc == 0, err[-3000:]
    assert sorted(r["rank"] for r in results) == [0, 1], results
    sizes = [a for a in layout if a != "--sp"]
    mesh = Mesh(**{sizes[i][2:]: int(sizes[i + 1]) for i in range(0, len(sizes), 2)}, sp="--sp" in layout)
    per, ref_grads = _reference(batch, seq, mesh.dp)
    got = {r: np.load(tmp_path / f"forward_rank{r}.npz") for r in range(2)}
    if mesh.pp > 1:  # stage 0 holds layers 0-2, stage 1 layers 3-5 and returns the logits;
        # gradients through StageGrad (counts forward, aux weights and input gradients back)
        assert [r["layers"] for r in sorted(results, key=lambda r: r["rank"])] == [[0, 1, 2], [3, 4, 5]]
        assert "logits" not in got[0].files
        np.testing.assert_allclose(got[1]["logits"], per[0][0], rtol=0, atol=2e-5)
        _check_grads(got, "grad", ref_grads, mesh)
        return
    for r, arrs in got.items():
        logits, loss, aux, router_logits, hidden = per[mesh.coords(r)["dp"]]
        np.testing.assert_allclose(arrs["logits"], logits, rtol=0, atol=2e-5)
        np.testing.assert_allclose(float(arrs["loss"]), loss, rtol=1e-5)
        np.testing.assert_allclose(float(arrs["aux"]), aux, rtol=1e-5)
        np.testing.assert_allclose(arrs["router_logits"], router_logits, rtol=0, atol=2e-5)
        np.testing.assert_allclose(arrs["hidden"], hidden, rtol=0, atol=2e-5)
    _check_grads(got, "grad", ref_grads, mesh)
    if mesh.tp > 1:  # gather_logits=False: vocab-split logits, vocab-parallel cross-entropy
        for r, arrs in got.items():
            logits, loss = per[mesh.coords(r)["dp"]][:2]
            v = logits.shape[-1] // mesh.tp
            np.testing.assert_allclose(arrs["vlogits"], logits[..., r * v:(r + 1) * v], rtol=0, atol=2e-5)
            np.testing.assert_allclose(float(arrs["vloss"]), loss, rtol=1e-5)
        _check_grads(got, "vgrad", ref_grads, mesh)


def _check_grads(got: dict, tag: str, ref_grads: dict, mesh) -> None:
    from qwen3moe.parallel.mesh import stage_groups
    from qwen3moe.parallel.ranks import ShardInfo, slice_for

    keys = {n: {k.split("|")[1]: k for k in got[n].files if k.startswith(tag + "|")} for n in got}
    assert set().union(*keys.values()) == set(ref_grads)  # every parameter, on its stage
    for n in got:
        for name, key in keys[n].items():
            info = ShardInfo(name, *[int(x) if x.isdigit() else x for x in key.split("|")[2:]])
            local = n % (mesh.dp * mesh.tp)  # stage-local rank; group members are ranks of n's stage
            group = [n - local + k for k in next(g for g in stage_groups(info.sync, mesh.dp, mesh.tp,
                                                                          mesh.ep * mesh.expert_tp) if local in g)]
            if info.style != "replicate":  # one shard position per sync group
                assert all(keys[m][name] == key for m in group), (key, group)
            total = sum(got[m][keys[m][name]] for m in group)
            want = slice_for(info, ref_grads[name])
            np.testing.assert_allclose(total, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=key)
