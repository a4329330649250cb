"""Issue 15 part B, training side: validated optimizer/schedule/run keys, resume refusing a
different model or data geometry, metrics rows after a resume, and silent data no-ops."""
from __future__ import annotations

import pytest

from helpers import REPO, cli_error
from qwen3moe.training.task_config import TaskConfigError, load_task_config

TINY = str(REPO / "examples" / "configs" / "pretrain_tiny_cpu.yaml")


@pytest.mark.parametrize("key, value, expected", [
    ("optimizer.learning_rate", "-1e-3", "optimizer.learning_rate must be >= 0"),
    ("lr_schedule.learning_rate", "-5e-3", "lr_schedule.learning_rate must be >= 0"),
    ("optimizer.betas", "[0.9, 1.0]", "optimizer.betas"),
    ("optimizer.betas", "[-0.1, 0.95]", "optimizer.betas"),
    ("optimizer.betas", "[0.9]", "optimizer.betas"),
    ("optimizer.eps", "0", "optimizer.eps must be > 0"),
    ("optimizer.weight_decay", "-0.1", "optimizer.weight_decay must be >= 0"),
    ("lr_schedule.warmup_steps", "-2", "lr_schedule.warmup_steps must be >= 0"),
    ("lr_schedule.warmup_ratio", "1.5", "lr_schedule.warmup_ratio"),
    ("lr_schedule.total_steps", "0", "lr_schedule.total_steps"),
    ("lr_schedule.min_lr", "-1e-4", "lr_schedule.min_lr must be >= 0"),
    ("lr_schedule.lr_end", "1.0", "lr_schedule.lr_end"),  # above the 5e-3 peak: the schedule would climb
    ("runner_config.train_steps", "0", "runner_config.train_steps"),
    ("runner_config.epochs", "0", "runner_config.epochs must be >= 1"),
    ("train_dataset.data_loader.config.seq_length", "0", "train_dataset.data_loader.config.seq_length must be >= 1"),
    ("runner_wrapper.max_grad_norm", "0", "runner_wrapper.max_grad_norm must be > 0"),
    # a silent no-op before: the train step always uses the plain causal mask
    ("train_dataset.data_loader.config.reset_attention_mask", "True",
     "train_dataset.data_loader.config.reset_attention_mask must be false"),
])
def test_bad_optimizer_schedule_and_run_values_name_the_key(key, value, expected):
    with pytest.raises(TaskConfigError) as exc:
        load_task_config(TINY, [f"--{key}", value])
    msg = str(exc.value)
    assert expected in msg and "\n" not in msg, msg


@pytest.mark.parametrize("flag", ["eod_mask_loss", "reset_position_ids"])
def test_eod_options_on_npy_tokens_are_an_error(flag):
    with pytest.raises(TaskConfigError, match=f"config.{flag}: applies to Megatron"):
        load_task_config(TINY, [f"--train_dataset.data_loader.config.{flag}", "True"])


def test_warmup_longer_than_schedule_is_refused():
    with pytest.raises(TaskConfigError, match="lr_schedule.warmup_steps"):
        load_task_config(TINY, ["--lr_schedule.warmup_steps", "10", "--lr_schedule.total_steps", "8"])


def test_valid_edge_values_are_accepted():
    cfg = load_task_config(TINY, ["--optimizer.betas", "[0.0, 0.0]", "--optimizer.learning_rate", "0",
                                  "--lr_schedule.lr_end", "0", "--lr_schedule.warmup_ratio", "1.0",
                                  "--runner_config.train_steps", "-1"])
    assert cfg.optimizer.betas == [0.0, 0.0] and cfg.optimizer.learning_rate == 0.0


def test_library_optimizer_and_schedule_refuse_bad_values():
    import mindspore as ms

    from qwen3moe.training.optimizer import AdamW
    from qwen3moe.training.schedules import Schedule

    p = [ms.Parameter(ms.Tensor([1.0], ms.float32), name="w")]
    for kw in ({"lr": -1e-3}, {"eps": 0.0}, {"weight_decay": -0.1}, {"betas": (0.9, 1.0)}, {"lr": float("nan")}):
        with pytest.raises(ValueError):
            AdamW(p, **kw)
    for kw in ({"peak_lr": -1.0}, {"min_lr": -1e-5}):
        with pytest.raises(ValueError):
            Schedule("cosine", total_steps=10, **kw)


# ---- resume with a different model or data geometry (BAD 4) ----------------------------------
@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A 1-layer tiny run of 2 steps with its checkpoint at step 2 (one layer: a faster compile)."""
    import numpy as np

    from qwen3moe.cli import main

    root = tmp_path_factory.mktemp("resume")
    tokens = root / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 1024, 4000).astype(np.int32))
    common = ["--config", TINY, "--output_dir", str(root / "out"), "--runner_config.mfu_probe_size", "0",
              "--model.model_config.num_hidden_layers", "1", "--resume_training", "True",
              f"--train_dataset.data_loader.config.data_path=['{tokens}']",
              f"--load_checkpoint={root / 'out' / 'checkpoint'}"]
    assert main(["pretrain", *common, "--runner_config.train_steps", "2"]) == 0
    return root, common


def test_pretrain_from_a_bf16_hf_folder_trains_fp32_master_weights(tmp_path):
    """A bf16 HF folder as load_checkpoint: the weights are widened to fp32 (exact) and train; it
    died inside MindSpore before (the bf16 storage path has no gradient: 'Custom's bprop not
    defined')."""
    import json

    import numpy as np

    from helpers import HF_FIXTURES
    from qwen3moe.cli import main

    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 1024, 4000).astype(np.int32))
    out = tmp_path / "out"
    assert main(["pretrain", "--config", TINY, "--output_dir", str(out), "--runner_config.mfu_probe_size", "0",
                 f"--train_dataset.data_loader.config.data_path=['{tokens}']", "--runner_config.train_steps", "2",
                 f"--load_checkpoint={HF_FIXTURES / 'tiny-bf16-tied-yarn'}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)


def _tree(path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("override, field, old, new", [
    (["--model.model_config.num_hidden_layers", "2"], "model.model_config.num_hidden_layers", "1", "2"),
    (["--model.model_config.rope_theta", "10000.0"], "model.model_config.rope_theta", "1000000.0", "10000.0"),
    (["--runner_config.batch_size", "4"], "runner_config.batch_size", "2", "4"),
    (["--train_dataset.data_loader.config.seq_length", "16"], "train_dataset.data_loader.config.seq_length",
     "32", "16"),
])
def test_resume_with_other_geometry_is_refused_and_keeps_checkpoints(two_step_run, capsys, override, field, old, new):
    root, common = two_step_run
    before = _tree(root / "out" / "checkpoint")
    err = cli_error(["pretrain", *common, "--runner_config.train_steps", "4", *override], capsys)
    assert field in err and old in err and new in err, err
    assert "resume_override" in err
    assert _tree(root / "out" / "checkpoint") == before  # nothing trained, saved or pruned


def test_resume_override_data_resumes_with_a_new_batch_size(two_step_run, capsys):
    from qwen3moe.cli import main

    root, common = two_step_run
    capsys.readouterr()
    assert main(["pretrain", *common, "--runner_config.train_steps", "2", "--runner_config.batch_size", "4",
                 "--resume_override", "data", "--output_dir", str(root / "out_b")]) == 0
    assert "at step 2" in capsys.readouterr().out  # (train_steps 2: resumed, nothing left to run)


def test_resume_override_model_still_refuses_tensors_the_model_lacks(two_step_run, capsys):
    root, common = two_step_run
    err = cli_error(["pretrain", *common, "--runner_config.train_steps", "4", "--resume_override", "model",
                     "--model.model_config.num_hidden_layers", "2", "--output_dir", str(root / "out_c")], capsys)
    assert "missing tensor 'model.layers.1." in err and "model.safetensors" in err, err


def test_checkpoint_tensors_the_model_lacks_are_an_error(tmp_path):
    """A 2-layer checkpoint into a 1-layer model: today layers 1.. were silently ignored."""
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.io.safetensors_io import CheckpointError
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.training.checkpoint import load_training_checkpoint, save_training_checkpoint
    from qwen3moe.training.optimizer import AdamW

    def model_and_opt(layers):
        m = Qwen3MoeForCausalLM(Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=layers))
        return m, AdamW(m.trainable_params())

    save_training_checkpoint(str(tmp_path), 1, *model_and_opt(2))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.1\..*and \d+ more"):
        load_training_checkpoint(str(tmp_path), *model_and_opt(1))


def test_resume_override_names_are_validated():
    with pytest.raises(TaskConfigError, match="resume_override"):
        load_task_config(TINY, ["--resume_override", "modle"])


def test_resume_replaces_metrics_rows_of_steps_it_re_runs(two_step_run, tmp_path, capsys):
    """Rows logged after the checkpoint (a run killed at step 4 after saving at 2) belong to steps
    the resumed run trains again: they are dropped, so each step has one row, the resumed one."""
    import csv
    import json
    import shutil

    from qwen3moe.cli import main

    root, common = two_step_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2]
    with open(out / "metrics.jsonl", "a") as fh:  # what the killed run logged past its checkpoint
        fh.write(json.dumps({**rows[0], "step": 4.0, "loss": 99.0}) + "\n" + '{"step": 6.0, "lo')
    with open(out / "metrics.csv", "a") as fh:
        fh.write("4.0,99.0\n")
    capsys.readouterr()
    assert main(["pretrain", *common, "--output_dir", str(out), f"--load_checkpoint={out / 'checkpoint'}",
                 "--runner_config.train_steps", "2"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2]
    assert [float(r["step"]) for r in csv.DictReader((out / "metrics.csv").open())] == [2.0]


@pytest.mark.parametrize("flag", ["reset_position_ids", "eod_mask_loss", "reset_attention_mask"])
def test_eod_options_without_eod_id_are_an_error(flag):
    """Each acts on EOD tokens: without eod_id they silently did nothing."""
    from helpers import FIXTURES
    from qwen3moe.io.gpt_dataset import build_gpt_dataset

    prefix = str(FIXTURES / "megatron_gpt" / "golden_a_text_document")
    with pytest.raises(ValueError, match=f"{flag}=True needs eod_id"):
        build_gpt_dataset(prefix, 8, 4, **{flag: True})
    assert len(build_gpt_dataset(prefix, 8, 4, eod_id=0, **{flag: True})) >= 4


def test_gpt_batches_feed_position_resets():
    """A dataset that resets position ids after EOD (alone or blended) has them fed to the model
    with its [B, S+1] rows: the dataset's S positions plus one for the last row position (they
    were once dropped silently); without the reset no position ids are passed (the model's 0..S)."""
    import numpy as np

    from helpers import FIXTURES
    from qwen3moe.io.gpt_dataset import build_gpt_dataset
    from qwen3moe.io.gpt_loader import GPTBatches

    prefix = str(FIXTURES / "megatron_gpt" / "golden_a_text_document")
    ds = build_gpt_dataset(prefix, 16, 8, eod_id=1023, reset_position_ids=True)
    b = GPTBatches(ds, 4).batch(0)
    want = np.stack([ds[i]["position_ids"] for i in range(4)])
    assert (want != np.arange(16)).any()  # the fixture has EODs inside these samples
    np.testing.assert_array_equal(b["position_ids"][:, :-1], want)
    np.testing.assert_array_equal(b["position_ids"][:, -1], want[:, -1] + 1)
    blend = build_gpt_dataset(["1", prefix, "1", prefix.replace("_a_", "_b_")], 16, 8, eod_id=1023,
                              reset_position_ids=True)
    assert GPTBatches(blend, 2).batch(0)["position_ids"].shape == (2, 17)
    plain = GPTBatches(build_gpt_dataset(prefix, 8, 4, eod_id=0), 2).batch(0)
    assert plain["input_ids"].shape == (2, 9) and "position_ids" not in plain
