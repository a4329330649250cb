"""Sharded loading / saving: each rank reads only its slices of an HF folder; a per-rank
checkpoint re-shards to another layout and exports to an HF folder. Values are compared
exactly (slicing moves bytes, no arithmetic); logits after a re-shard to 1e-5 (fp32 summation
order of the new layout)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed

    set_init_seed(1)
    cfg = Qwen3MoeConfig.from_preset("tiny", vocab_size=128, num_hidden_layers=3, mlp_only_layers=[0],
                                     num_key_value_heads=2, head_dim=16)
    model = Qwen3MoeForCausalLM(cfg)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)  # per-expert HF layout, as released checkpoints
    return model, path


@pytest.mark.parametrize("dp, tp, pp, ep", [(1, 2, 1, 1), (2, 1, 1, 2), (1, 4, 2, 4), (2, 2, 1, 4)])
def test_each_rank_reads_only_its_slices(saved, dp, tp, pp, ep):
    """Each process's sharded load (`parallelize` from the HF folder, one rank at a time) reads
    exactly the slices it holds, and they equal the simulated ranks' shards of the full model."""
    from types import SimpleNamespace

    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.parallelize import parallelize
    from parallel_sim.trainer import ParallelLM

    model, path = saved
    mesh = Mesh(dp=dp, tp=tp, pp=pp, ep=ep, micro_batch_num=pp)
    want = ParallelLM.from_model(model, mesh, train=False)
    cfg = Qwen3MoeConfig.from_pretrained(path)
    expected_bytes = 0
    for rank in range(mesh.world_size):  # as each process would: only its own rank is built
        got = parallelize(cfg, mesh, rank, str(path), coll=SimpleNamespace(groups={}))
        s, n = divmod(rank, dp * tp)
        mine = {i.name: p.asnumpy() for p, i in want.entries[s][n]}
        assert mine and set(mine) == {i.name for _, i in got.entries}
        for p, i in got.entries:
            np.testing.assert_array_equal(p.asnumpy(), mine[i.name], err_msg=i.name)
        held = sum(p.asnumpy().nbytes for p, _ in got.entries)
        assert got.bytes_read == held  # read exactly what it holds: no full tensor, no other rank's slice
        expected_bytes += held
    assert expected_bytes >= sum(p.asnumpy().nbytes for p in model.get_parameters())


def test_sharded_save_reshard_and_export(saved, tmp_path):
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.parallel.checkpoint import export_hf, load_sharded, save_sharded
    from parallel_sim.dp import ShardedAdamW, allreduce_grads
    from qwen3moe.parallel.mesh import Mesh
    from parallel_sim.trainer import ParallelLM

    model, _ = saved
    ids = np.random.default_rng(3).integers(0, 128, (2, 6))
    a = ParallelLM.from_model(model, Mesh(tp=2, pp=2, micro_batch_num=2))
    _, grads = a.loss_and_grads(ids, ids)  # a trained state, so the check is not the initial weights
    allreduce_grads(a, grads)
    ShardedAdamW(a, lr=1e-2).step(grads)
    files = save_sharded(a, tmp_path / "ckpt")
    assert len(files) == 4
    full = load_sharded(tmp_path / "ckpt")
    want = a.full_params()
    assert set(full) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(full[k], v, err_msg=k)
    b = ParallelLM(model.config, Mesh(dp=2, ep=2), full.__getitem__)  # a different layout
    ref = a.logits(ids)
    np.testing.assert_allclose(b.logits(ids), ref, rtol=0, atol=1e-5)
    export_hf(tmp_path / "ckpt", model.config, tmp_path / "hf")
    exported = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "hf")
    np.testing.assert_allclose(exported(ids).logits.asnumpy(), ref, rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="rank_"):
        load_sharded(tmp_path)


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data(),
       tag=st.sampled_from(["F32", "BF16", "F16"]))
@settings(max_examples=40, deadline=None)
def test_read_slice_equals_numpy_slicing(tmp_path_factory, shape, data, tag):
    """Any contiguous hyperslab read with preads == numpy slicing of the whole tensor."""
    from qwen3moe.io.safetensors_io import SafetensorsFile, bf16_to_f32, f32_to_bf16, write_safetensors

    arr = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    raw = {"F32": arr, "BF16": f32_to_bf16(arr), "F16": arr.astype(np.float16)}[tag]
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    write_safetensors(str(path), [("x", raw, tag)])
    whole = {"F32": arr, "BF16": bf16_to_f32(raw), "F16": raw.astype(np.float32)}[tag]
    index = []
    for n in shape[:data.draw(st.integers(0, len(shape)))]:
        a = data.draw(st.integers(0, n - 1))
        index.append(slice(a, data.draw(st.integers(a + 1, n))))
    f = SafetensorsFile(str(path))
    np.testing.assert_array_equal(f.read_slice("x", tuple(index)), whole[tuple(index)])
    f.close()


def test_use_parallel_outside_launch_is_a_one_line_error(tmp_path, capsys):
    from helpers import HF_FIXTURES, cli_error

    assert "qwen3moe launch --nproc 2" in cli_error(["generate", "--pretrained_model_dir", str(HF_FIXTURES / "tiny-fp32-gqa"),
                                                     "--predict_data", "hi", "--use_parallel", "True",
                                                     "--parallel_config.model_parallel", "2"], capsys)


@pytest.mark.parametrize("layout, env, words", [
    (["--parallel_config.model_parallel", "3"], {}, "tp=3 must divide num_attention_heads"),
    (["--parallel_config.model_parallel", "2"], {"WORLD_SIZE": "4"}, "world size 4 != dp*tp*pp = 1*2*1 = 2"),
    (["--parallel_config.expert_parallel", "3"], {}, "ep=3 must divide num_experts"),
    (["--parallel_config.pipeline_stage", "5"], {}, "pp=5 must be <= num_hidden_layers=4"),
    (["--parallel_config.pipeline_stage", "2", "--parallel_config.micro_batch_num", "3", "--predict_batch_size", "4",
      "--parallel_config.data_parallel", "2"], {}, "micro_batch_num=3: more decode micro-batches than the 2 rows"),
], ids=["heads", "world", "experts", "stages", "micro-batches"])
def test_invalid_generation_layout_is_one_line_before_any_work(capsys, monkeypatch, layout, env, words):
    """An impossible layout for the model (config.json only) or for the launched world size is
    refused in one line before init() or any weight is read (was: a traceback from inside the
    per-rank engine, or a hang waiting for a cluster)."""
    from helpers import HF_FIXTURES, cli_error

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert words in cli_error(["generate", "--pretrained_model_dir", str(HF_FIXTURES / "tiny-fp32-gqa"), "--predict_data",
                               "hi", "--use_parallel", "True", *layout], capsys)


def test_train_state_resolve_and_layout_check(tmp_path):
    """Only folders with the state file count (rank 0 writes it after every rank finished);
    optimizer state saved under another layout is refused in one line naming both layouts."""
    import json

    from qwen3moe.io.safetensors_io import CheckpointError
    from qwen3moe.parallel import train_state
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.training.checkpoint import step_dirs

    root = tmp_path / "checkpoint_sharded"
    for step, complete in ((2, True), (4, True), (6, False)):
        d = root / f"step_{step}"
        d.mkdir(parents=True)
        if complete:
            (d / train_state.STATE).write_text(json.dumps({"step": step, "layout": "dp1.tp2.pp1.ep1.sp0"}))
    assert [s for s, _ in step_dirs(str(root), train_state.STATE)] == [2, 4]
    assert train_state.resolve(str(root)).endswith("step_4")
    assert train_state.resolve(str(root / "step_2")).endswith("step_2")
    assert train_state.resolve(str(root / "step_6")) is None
    assert train_state.layout(Mesh(tp=2)) == "dp1.tp2.pp1.ep1.sp0"

    class Opt:  # the layout check comes before any file is read
        model = None
    with pytest.raises(CheckpointError, match=r"dp1\.tp2\.pp1\.ep1\.sp0, this run is dp2\.tp1") as err:
        train_state.load_optimizer(str(root / "step_4"), Opt(), Mesh(dp=2))
    assert "\n" not in str(err.value)
