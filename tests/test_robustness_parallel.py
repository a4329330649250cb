"""Issue 15 part B, BAD 10: the parallel loaders give the single-process loader's one-line
CheckpointError (same helper, same text) for a missing tensor, never a raw KeyError."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed

    set_init_seed(1)
    cfg = Qwen3MoeConfig.from_preset("tiny", vocab_size=128, num_hidden_layers=2, num_key_value_heads=2,
                                     head_dim=16)
    model = Qwen3MoeForCausalLM(cfg)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)  # per-expert HF layout
    return model, path


def _without(src, dst, drop: str):
    """A copy of HF folder `src` whose safetensors lack tensor `drop`."""
    import shutil

    from qwen3moe.io.safetensors_io import SafetensorsFile, write_safetensors

    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        st = SafetensorsFile(str(f))
        tensors = [(k, st.read(k), st.entries[k]["dtype"]) for k in st.keys() if k != drop]
        st.close()
        write_safetensors(str(f), tensors)
    return dst


@pytest.mark.parametrize("drop", ["model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.o_proj.weight",
                                  "model.layers.1.mlp.experts.0.up_proj.weight"])
def test_parallel_load_missing_tensor_is_the_single_process_error(saved, tmp_path, drop):
    folder = _without(saved[1], tmp_path / "m", drop)
    _assert_parallel_load_error_is_single(folder, f"missing tensor {drop!r}")


def test_sharded_checkpoint_missing_tensor_names_the_folder(saved, tmp_path):
    from qwen3moe.io.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
    from qwen3moe.parallel.checkpoint import export_hf, load_sharded, save_sharded
    from qwen3moe.parallel.mesh import Mesh
    from parallel_sim.trainer import ParallelLM

    model = saved[0]
    d = tmp_path / "sharded"
    save_sharded(ParallelLM.from_model(model, Mesh(tp=2), train=False), d)
    f = d / "rank_0.safetensors"
    st = SafetensorsFile(str(f))
    keys = [k for k in st.keys() if not k.startswith("model.norm.weight|")]
    tensors = [(k, st.read(k), "F32") for k in keys]
    st.close()
    for g in d.glob("rank_*.safetensors"):  # every rank loses it (replicated tensor)
        if g != f:
            sg = SafetensorsFile(str(g))
            rest = [(k, sg.read(k), "F32") for k in sg.keys() if not k.startswith("model.norm.weight|")]
            sg.close()
            write_safetensors(str(g), rest)
    write_safetensors(str(f), tensors)
    with pytest.raises(CheckpointError, match=r"sharded.*missing tensor 'model\.norm\.weight'"):
        export_hf(d, model.config, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"sharded.*missing tensor 'model\.norm\.weight'"):
        load_sharded(d)["model.norm.weight"]  # the getter --use_parallel resumes through
    np.testing.assert_equal(sorted(p.name for p in d.iterdir()), ["rank_0.safetensors", "rank_1.safetensors"])


# ---- killed parallel saves leave no temp files or partial step folders (BAD 3, --use_parallel) ----
def _killed_saves(root):
    """step_2 complete but holding a killed re-save's temps; step_4 a save killed before its state file."""
    from qwen3moe.parallel.train_state import STATE

    (root / "step_2").mkdir(parents=True)
    for name in ("rank_0.safetensors", "optim_rank_0.safetensors", STATE, ".optim_rank_1.safetensors.tmp",
                 ".rank_1.safetensors.tmp", f".{STATE}.tmp"):
        (root / "step_2" / name).write_text("{}" if name == STATE else "x")
    (root / "step_4").mkdir()
    for name in ("rank_0.safetensors", ".optim_rank_0.safetensors.tmp"):
        (root / "step_4" / name).write_text("x")
    for d, name in (("step_00000003", "trainer_state.json"), ("step_5", "notes.txt")):  # not ours: kept
        (root / d).mkdir()
        (root / d / name).write_text("keep")


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_parallel_resume_removes_killed_save_leftovers(tmp_path):
    from qwen3moe.parallel.train_state import STATE, resolve

    _killed_saves(tmp_path)
    assert resolve(str(tmp_path)) == str(tmp_path / "step_2")
    assert _listing(tmp_path) == ["step_00000003", "step_00000003/trainer_state.json", "step_2",
                                  "step_2/optim_rank_0.safetensors", f"step_2/{STATE}", "step_2/rank_0.safetensors",
                                  "step_5", "step_5/notes.txt"]


def test_parallel_save_removes_killed_save_leftovers(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from qwen3moe.parallel import checkpoint, train_state

    _killed_saves(tmp_path)
    monkeypatch.setattr(checkpoint, "save_sharded", lambda pl, d: (d.mkdir(), (d / "rank_0.safetensors").write_text("x")))
    monkeypatch.setattr(train_state, "rank_optimizers", lambda opt: {})
    mesh = SimpleNamespace(dp=1, tp=1, pp=1, ep=1, sp=False, world_size=1)
    train_state.save(str(tmp_path), 6, SimpleNamespace(mesh=mesh), None, 0, lambda: None, keep_last=2)
    assert _listing(tmp_path) == ["step_00000003", "step_00000003/trainer_state.json", "step_2",
                                  "step_2/optim_rank_0.safetensors", f"step_2/{train_state.STATE}",
                                  "step_2/rank_0.safetensors", "step_5", "step_5/notes.txt", "step_6",
                                  f"step_6/{train_state.STATE}", "step_6/rank_0.safetensors"]


# ---- sharded resume checks the model / data geometry as single-process resume does ----
def test_sharded_resume_refuses_another_model_or_data_geometry(tmp_path, monkeypatch):
    """`pretrain --use_parallel` resume: a sharded checkpoint saved (through ShardedCheckpointer,
    as the Trainer saves) with another model config or data geometry is refused before any
    tensor is read, in one line naming the key and both values (trainer.check_resume, the
    single-process rule), unless resume_override names it. Once resumed silently."""
    from types import SimpleNamespace

    import mindspore.ops as ops

    from helpers import REPO
    from qwen3moe.parallel import checkpoint, train_state
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.training.task_config import load_task_config
    from qwen3moe.training.trainer import ResumeMismatchError

    yaml, root = str(REPO / "examples" / "configs" / "pretrain_tiny_cpu.yaml"), tmp_path / "checkpoint_sharded"
    # no processes: the rank files, the optimizer state and the barrier's AllReduce are stubbed
    monkeypatch.setattr(checkpoint, "save_sharded", lambda pl, d: d.mkdir(parents=True))
    monkeypatch.setattr(train_state, "rank_optimizers", lambda opt: {})
    monkeypatch.setattr(ops, "AllReduce", lambda: (lambda t: t))
    step = SimpleNamespace(pl=SimpleNamespace(mesh=Mesh(tp=2)), optimizer=None)
    trainer = SimpleNamespace(config=SimpleNamespace(checkpoint_dir=str(root), keep_last=2))
    train_state.ShardedCheckpointer(load_task_config(yaml, []), step, 0, lambda s: None).save(trainer, 2)

    def resume(*overrides):
        return train_state.resume_path(load_task_config(yaml, ["--resume_training", "True", "--load_checkpoint",
                                                            str(root), *overrides]))

    assert resume().endswith("step_2")
    with pytest.raises(ResumeMismatchError, match=r"model\.model_config\.num_hidden_layers is 4 in the checkpoint "
                                                  r"but 2 in this run") as err:
        resume("--model.model_config.num_hidden_layers", "2")
    assert "\n" not in str(err.value) and "resume_override" in str(err.value)
    with pytest.raises(ResumeMismatchError, match=r"runner_config\.batch_size is 2 in the checkpoint but 4"):
        resume("--runner_config.batch_size", "4")
    assert resume("--model.model_config.num_hidden_layers", "2", "--resume_override", "model").endswith("step_2")


def test_distcheck_run_is_a_library_call_checked_before_any_collective():
    """parallel/distcheck.run takes explicit parameters (once an argparse namespace: library code
    shaped by the command) and refuses a layout the model cannot take in one line, before
    init() (no msrun here: reaching init would fail differently)."""
    from helpers import HF_FIXTURES
    from qwen3moe.parallel import distcheck
    from qwen3moe.parallel.mesh import MeshError

    model = str(HF_FIXTURES / "tiny-fp32-gqa")  # 4 heads, 2 kv heads, 8 experts, 4 layers
    with pytest.raises(MeshError, match=r"^tp=3 must divide num_attention_heads=4$"):
        distcheck.run(model, "load", tp=3)
    with pytest.raises(MeshError, match=r"^ep=3 must divide num_experts=8$"):
        distcheck.run(model, "generate", dp=3, ep=3)
    with pytest.raises(MeshError, match=r"^pp=8 must be <= num_hidden_layers=4$"):
        distcheck.run(model, "load", pp=8, micro_batch_num=8)


@pytest.mark.parametrize("extra", ["model.layers.1.self_attn.extra_proj.weight", "model.layers.7.mlp.gate.weight"])
def test_parallel_load_unexpected_tensor_is_the_single_process_error(saved, tmp_path, extra):
    """A folder tensor the model does not read (a stray key; a layer the config lacks) is the
    single-process loader's one-line error on the sharded path too (once silently ignored)."""
    import shutil

    from qwen3moe.io.safetensors_io import SafetensorsFile, write_safetensors

    folder = tmp_path / "m"
    shutil.copytree(saved[1], folder)
    f = sorted(folder.glob("*.safetensors"))[-1]
    st = SafetensorsFile(str(f))
    tensors = [(k, st.read(k), st.entries[k]["dtype"]) for k in st.keys()]
    st.close()
    write_safetensors(str(f), tensors + [(extra, np.ones((4, 4), np.float32), "F32")])
    _assert_parallel_load_error_is_single(folder, f"unexpected tensor {extra!r}")


@pytest.mark.slow
@pytest.mark.dist
def test_pipeline_generation_non_finite_logits_is_the_single_process_error(tmp_path):
    """Non-finite logits (a finite final-norm weight of 3e38 overflows to Inf on the last stage; the
    loader refuses NaN weights themselves) in `generate --use_parallel` with pp2: every
    stage exits 2 with the single-process one-line GenerationError (generation/generate.check_finite)
    instead of token 0 or a first stage waiting forever for tokens: the last stage sends -1 for the
    broken rows before raising, and the first stage raises the same error from them."""
    import os
    import re
    import shutil
    import subprocess
    import sys

    from helpers import HF_FIXTURES, REPO, launch
    from qwen3moe.io.safetensors_io import SafetensorsFile, write_safetensors

    folder = shutil.copytree(HF_FIXTURES / "tiny-fp32-gqa", tmp_path / "m")
    f = folder / "model.safetensors"
    st = SafetensorsFile(str(f))
    tensors = [(k, np.full_like(st.read(k), 3e38) if k == "model.norm.weight" else st.read(k), st.entries[k]["dtype"]) for k in st.keys()]
    st.close()
    write_safetensors(str(f), tensors)
    args = ["generate", "--pretrained_model_dir", str(folder), "--predict_data", "hello world",
            "--max_new_tokens", "4", "--do_sample", "false"]
    single = subprocess.run([sys.executable, "-m", "qwen3moe.cli", *args, "--output", str(tmp_path / "one.jsonl")],
                            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=240)
    want = single.stderr.strip().splitlines()[-1]
    assert single.returncode == 2 and re.search(r"generation step 0: the model produced non-finite logits", want), want
    rc, err, _ = launch(tmp_path, *args, "--use_parallel", "True", "--parallel_config.pipeline_stage", "2",
                        "--output", str(tmp_path / "par.jsonl"))
    assert rc != 0
    for r in (0, 1):
        log = (tmp_path / "logs" / f"worker_{r}.log").read_text()
        assert want in log.splitlines() and "Traceback" not in log, (r, log[-2000:])


def _assert_parallel_load_error_is_single(folder, needle: str) -> None:
    """The sharded load of `folder` fails with exactly the single-process one-line error."""
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.io.safetensors_io import CheckpointError
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.parallelize import parallelize

    with pytest.raises(CheckpointError) as single:
        Qwen3MoeForCausalLM.from_pretrained(str(folder))
    with pytest.raises(CheckpointError) as parallel:  # rank 0 of a real tp2 x ep2 launch, no groups here
        parallelize(Qwen3MoeConfig.from_pretrained(folder), Mesh(tp=2, ep=2, dp=1), 0, str(folder),
                    coll=SimpleNamespace(groups={}))
    assert needle in str(single.value)
    assert str(parallel.value) == str(single.value) and "\n" not in str(parallel.value)
