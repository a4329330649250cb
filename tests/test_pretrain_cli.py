"""`qwen3moe pretrain` / `run` / `export` end to end on the tiny CPU config, plus NaN-step skipping."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from helpers import REPO, cli_error
from qwen3moe.cli import main

CONFIGS = REPO / "examples" / "configs"
TINY = str(CONFIGS / "pretrain_tiny_cpu.yaml")
TOKENIZER = REPO / "qwen3moe" / "assets" / "tiny-tokenizer"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 4-step tiny run (checkpoint at step 4) shared by the tests below."""
    root = tmp_path_factory.mktemp("pretrain")
    tokens = root / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 1024, 4000).astype(np.int32))
    common = ["--config", TINY, "--output_dir", str(root / "out"), "--runner_config.mfu_probe_size", "128",
              "--model.model_config.num_hidden_layers", "2",  # 2 of the preset's 4 layers: faster compiles
              f"--train_dataset.data_loader.config.data_path=['{tokens}']"]
    assert main(["pretrain", *common, "--runner_config.train_steps", "4"]) == 0
    return root, common


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_plots_and_checkpoint_written(run_dir):
    out = run_dir[0] / "out"
    recs = _records(out)
    assert [r["step"] for r in recs] == [2, 4]
    for key in ("loss", "aux", "z", "grad_norm", "lr", "tokens_per_s", "tflops", "mfu", "peak_rss_mib",
                "expert_load_max", "expert_load_mean", "skipped_total"):
        assert recs[-1][key] is not None, key
    assert math.isfinite(recs[-1]["loss"]) and 0 < recs[-1]["mfu"] and recs[-1]["expert_load_max"] >= 1.0
    assert len(recs[-1]["expert_load_per_layer"]) == 2 and np.asarray(recs[-1]["expert_share"]).shape == (2, 8)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(float(r["step"])) for r in rows] == [2, 4] and "mfu" in rows[0]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "expert_load.png").stat().st_size > 1000
    assert (out / "checkpoint" / "step_00000004" / "trainer_state.json").is_file()
    assert "model_parallel: 1" in (out / "resolved_config.yaml").read_text()


def test_resume_continues_from_saved_step(run_dir, capsys):
    root, common = run_dir
    capsys.readouterr()
    assert main(["run", "--run_mode", "train", "--resume_training", "True", *common,
                 "--runner_config.train_steps", "6"]) == 0
    printed = capsys.readouterr().out
    assert "at step 4" in printed and "step     6/6" in printed and "step     2/6" not in printed
    out = root / "out"
    assert [r["step"] for r in _records(out)] == [2, 4, 6]
    state = json.loads((out / "checkpoint" / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["extra"]["model_config"]["num_experts"] == 8


def test_export_loads_with_from_pretrained_and_predict_runs(run_dir, tmp_path):
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.io.safetensors_io import SafetensorsFile

    ckpt = run_dir[0] / "out" / "checkpoint"
    hf = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(hf), "--dtype", "float32",
                 "--tokenizer_dir", str(TOKENIZER)]) == 0
    model = Qwen3MoeForCausalLM.from_pretrained(str(hf))
    st = SafetensorsFile(str(sorted(ckpt.iterdir())[-1] / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    got = {p.name: p for p in model.get_parameters()}[name].asnumpy()
    np.testing.assert_array_equal(got, st.read(name))
    st.close()
    assert main(["run", "--config", str(CONFIGS / "predict_qwen3_moe.yaml"), "--run_mode", "predict",
                 "--pretrained_model_dir", str(hf), "--predict_data", "Return the", "--max_new_tokens", "2",
                 "--output_dir", str(tmp_path / "pred")]) == 0
    line = json.loads((tmp_path / "pred" / "text_generation_result.txt").read_text().splitlines()[0])
    assert line["prompt"] == "Return the" and line["completion_tokens"] <= 2


# ---- non-finite steps ---------------------------------------------------------------------
class _FakeStep:
    """Returns NaN loss (as a skipped step) at the given 1-based steps."""

    def __init__(self, bad: set[int]) -> None:
        self.bad, self.steps_done, self.model, self.optimizer, self.schedule = bad, 0, None, None, None

    def __call__(self, batch) -> dict:
        self.steps_done += 1
        nan = self.steps_done in self.bad
        return {"step": self.steps_done, "loss": float("nan") if nan else 1.0, "lm_loss": 1.0, "aux": 0.0,
                "aux_megatron": 0.0, "z": 0.0, "grad_norm": float("nan") if nan else 0.5, "lr": 1e-3,
                "tokens": 8, "step_time_s": 0.01, "expert_load_max": [1.0], "skipped": nan}


class _FakeData:
    def batch(self, i: int) -> int:
        return i


def test_nonfinite_steps_counted_and_run_continues(tmp_path):
    from qwen3moe.training.metrics import MetricsLogger
    from qwen3moe.training.trainer import Trainer, TrainerConfig

    lines: list[str] = []
    tr = Trainer(_FakeStep({2, 3, 6}), _FakeData(), TrainerConfig(total_steps=8, log_interval=4, nan_abort_after=3,
                                                                   progress=True),
                 log=lines.append, metrics=MetricsLogger(str(tmp_path)))
    assert len(tr.fit()) == 8 and tr.skipped_total == 3
    assert sum("update skipped" in s for s in lines) == 3 and any("skipped: 3" in s for s in lines)
    assert [r["skipped_total"] for r in _records(tmp_path)] == [2, 3]


def test_one_loop_drives_a_step_with_its_own_checkpointer(tmp_path):
    """Trainer.fit is the loop of every step kind: a step whose state lives elsewhere (the sharded
    ParallelTrainStep) brings a checkpointer; the loop resumes through it (start step 3, batches
    3.. only), saves through it every save interval and at the end, never the single-process way."""
    from qwen3moe.training.trainer import Trainer, TrainerConfig

    class Checkpointer:
        def __init__(self) -> None:
            self.saved: list[int] = []

        def resume(self, trainer) -> int:
            trainer.step_fn.steps_done = 3
            return 3

        def save(self, trainer, step: int) -> str:
            self.saved.append(step)
            return f"ck/{step}"

    class Data:
        def __init__(self) -> None:
            self.seen: list[int] = []

        def batch(self, i: int) -> int:
            self.seen.append(i)
            return i

    ck, data, lines = Checkpointer(), Data(), []
    tr = Trainer(_FakeStep(set()), data, TrainerConfig(total_steps=9, log_interval=3, save_interval=4,
                                                       checkpoint_dir=str(tmp_path / "unused"), save_at_end=True),
                 log=lines.append, checkpointer=ck)
    history = tr.fit()
    assert data.seen == list(range(3, 9)) and [m["step"] for m in history] == list(range(4, 10))
    assert ck.saved == [4, 8, 9] and not (tmp_path / "unused").exists()
    assert any("saved ck/9" in line for line in lines)


def test_consecutive_nonfinite_steps_abort():
    from qwen3moe.training.trainer import Trainer, TrainerConfig, TrainingAborted

    tr = Trainer(_FakeStep(set(range(4, 20))), _FakeData(), TrainerConfig(total_steps=20, nan_abort_after=3),
                 log=lambda s: None)
    with pytest.raises(TrainingAborted, match="3 consecutive steps with non-finite loss or gradients"):
        tr.fit()
    assert len(tr.history) == 6


def test_trainstep_skips_update_on_nonfinite_loss():
    from mindspore import Tensor

    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.training import AdamW
    from qwen3moe.training.step import TrainStep

    cfg = Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=1)
    model = Qwen3MoeForCausalLM(cfg)
    step = TrainStep(model, AdamW(model.trainable_params(), lr=1e-2), skip_nonfinite=True)
    ids = np.random.default_rng(1).integers(0, 1024, (1, 8))
    m = step(ids)
    assert not m["skipped"] and float(step.optimizer.step.asnumpy()) == 1.0
    emb = model.model.embed_tokens.weight
    emb.set_data(Tensor(np.full(emb.shape, np.nan, np.float32)))
    before = {p.name: p.asnumpy().copy() for p in model.trainable_params() if "embed" not in p.name}
    m = step(ids)
    assert m["skipped"] and not math.isfinite(m["loss"]) and step.steps_done == 2
    assert float(step.optimizer.step.asnumpy()) == 1.0
    for p in model.trainable_params():
        if p.name in before:
            np.testing.assert_array_equal(p.asnumpy(), before[p.name])
    assert all(float(np.abs(a.asnumpy()).sum()) == 0.0 for a in step.graph.acc)


def test_gpt_batches_frame_megatron_samples_for_the_model_shift():
    """A GPTDataset sample (S inputs, S shifted labels) is one [S+1] row: the model's shift makes
    position t predict text[t + 1] for all S labels; loss_mask 0 -> -100; position_ids (reset
    ones) passed on only when asked, one more for the last row position; micro-batches wrap."""
    from qwen3moe.io.gpt_loader import GPTBatches
    from qwen3moe.training.recipe import MicroBatches

    text = np.arange(20)
    items = [{"input_ids": text[i:i + 4], "labels": text[i + 1:i + 5], "loss_mask": np.array([1, 1, 0, 1]),
              "position_ids": np.array([0, 1, 0, 1])} for i in range(0, 12, 4)]
    b = GPTBatches(items, 2).batch(0)
    np.testing.assert_array_equal(b["input_ids"], [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]])
    # the model shifts: position t is trained on labels[t + 1]; labels[:, 0] is never a target
    np.testing.assert_array_equal(b["labels"][:, 1:], [[1, 2, -100, 4], [5, 6, -100, 8]])
    assert "position_ids" not in b
    np.testing.assert_array_equal(GPTBatches(items, 2, position_ids=True).batch(0)["position_ids"],
                                  [[0, 1, 0, 1, 2]] * 2)
    micro = MicroBatches(GPTBatches(items, 1), accum=2).batch(1)
    assert [m["input_ids"][0, 0] for m in micro] == [8, 0]  # samples 2 and 3 (wraps around)


def test_pretrain_on_megatron_indexed_data(tmp_path):
    from qwen3moe.io.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "corpus_text_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    rng = np.random.default_rng(2)
    for _ in range(20):
        builder.add_item(np.append(rng.integers(0, 1000, int(rng.integers(10, 60))), 1023))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    out = tmp_path / "out"
    assert main(["pretrain", "--config", TINY, "--output_dir", str(out), "--runner_config.mfu_probe_size", "0",
                 f"--train_dataset.data_loader.config.data_path=['1', '{prefix}']",
                 "--runner_config.train_steps", "2", "--model.model_config.num_hidden_layers", "1"]) == 0
    recs = _records(out)
    assert recs[-1]["step"] == 2 and math.isfinite(recs[-1]["loss"]) and recs[-1]["mfu"] is None


def test_compute_dtype_and_recompute_keys(run_dir, tmp_path, capsys):
    """fp16 compute + recompute of every layer run end to end (loss scale in the metrics);
    bfloat16 compute is one line naming the key; a bad recompute list names its key."""
    root, common = run_dir
    common = [c if not c.startswith(str(root / "out")) else str(tmp_path / "out") for c in common]
    assert main(["pretrain", *common, "--runner_config.train_steps", "2", "--runner_config.compute_dtype", "float16",
                 "--recompute_config.recompute", "True", "--runner_wrapper.scale_sense", "1024"]) == 0
    recs = _records(tmp_path / "out")
    assert recs and all(math.isfinite(r["loss"]) for r in recs)
    for args, words in ((["--runner_config.compute_dtype", "bfloat16"], "runner_config.compute_dtype: bfloat16"),
                        (["--recompute_config.recompute", "[5]"], "recompute_config.recompute: 5 layers requested")):
        err = cli_error(["pretrain", *common, "--runner_config.train_steps", "1", *args], capsys)
        assert err.startswith(f"qwen3moe pretrain: error: {words}"), err
