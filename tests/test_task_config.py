"""Seed-style YAML task configs: loading, validation with closest-key suggestions, overrides, dry-run."""
from __future__ import annotations

import pytest
import yaml

from helpers import REPO, cli_error
from qwen3moe.cli import main
from qwen3moe.training.task_config import (TaskConfigError, load_task_config, parse_overrides)

CONFIGS = REPO / "examples" / "configs"
SEED = CONFIGS / "pretrain_qwen3_30b_a3b_4k.yaml"


def test_seed_yaml_loads_with_mapped_values():
    cfg = load_task_config(str(SEED))
    assert cfg.seed == 42 and cfg.run_mode == "train" and cfg.use_parallel is True
    dc = cfg.train_dataset.data_loader.config
    assert dc.eod == 151643 and dc.pad == 151643 and dc.seq_length == 4096
    assert dc.data_path == ["1", "/path/wiki103-megatron_text_document"]
    pc = cfg.parallel_config
    assert (pc.data_parallel, pc.model_parallel, pc.pipeline_stage, pc.expert_parallel) == (1, 4, 4, 4)
    assert cfg.optimizer.betas == [0.9, 0.95] and cfg.lr_schedule.learning_rate == 3e-5
    mc = cfg.model_config()
    assert mc.num_parameters() == 30_532_122_624 and mc.num_parameters(active=True) == 3_353_032_704
    assert mc.torch_dtype == "float32"  # params_dtype -> torch_dtype
    assert cfg.moe_training() == {"aux_coef": 0.001, "aux_mode": "megatron", "z_coef": 0.0}
    assert cfg.callback("CheckpointMonitor")["save_checkpoint_steps"] == 1000
    assert any("context" in n for n in cfg.notes) and any("compute_dtype" in n for n in cfg.notes)


@pytest.mark.parametrize("name", ["predict_qwen3_moe.yaml", "pretrain_tiny_cpu.yaml"])
def test_shipped_configs_load(name):
    cfg = load_task_config(str(CONFIGS / name))
    assert cfg.to_yaml() and yaml.safe_load(cfg.to_yaml())["run_mode"] == cfg.run_mode


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_task_config(str(SEED), ["--runner_config.batch_size", "2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    again = load_task_config(str(path))
    assert again.to_dict() == cfg.to_dict()


def test_unknown_file_key_suggests_closest(tmp_path):
    raw = yaml.safe_load(SEED.read_text())
    raw["parallel_config"]["model_paralel"] = 2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TaskConfigError, match=r"unknown key parallel_config\.model_paralel; "
                                              r"did you mean parallel_config\.model_parallel\?"):
        load_task_config(str(path))


def test_unknown_nested_and_model_keys(tmp_path):
    raw = yaml.safe_load(SEED.read_text())
    raw["train_dataset"]["data_loader"]["config"]["seq_lenght"] = 8
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TaskConfigError, match=r"train_dataset\.data_loader\.config\.seq_length\?"):
        load_task_config(str(path))
    with pytest.raises(TaskConfigError, match=r"did you mean model\.model_config\.num_experts_per_tok\?"):
        load_task_config(str(SEED), ["--model.model_config.num_expert_per_tok", "4"])
    with pytest.raises(TaskConfigError, match=r"did you mean optimizer\?"):
        load_task_config(str(SEED), ["--optimiser.eps", "1e-6"])


def test_unknown_callback_key_suggests(tmp_path):
    raw = yaml.safe_load(SEED.read_text())
    raw["callbacks"][1]["save_checkpoint_step"] = 10
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TaskConfigError, match=r"did you mean callbacks\[1\]\.save_checkpoint_steps\?"):
        load_task_config(str(path))


def test_dotted_override_typo_suggests():
    with pytest.raises(TaskConfigError, match=r"did you mean parallel_config\.model_parallel\?"):
        load_task_config(str(SEED), ["--parallel_config.model_paralel", "2"])


def test_overrides_are_typed():
    cfg = load_task_config(str(SEED), [
        "--parallel_config.model_parallel", "2", "--lr_schedule.learning_rate=1e-4",
        "--optimizer.betas", "[0.8, 0.9]", "--recompute_config.recompute", "false",
        "--train_dataset.data_loader.config.data_path", "['x.npy']", "--output_dir", "/tmp/o",
        "--model.model_config.rope_theta", "10000"])
    assert cfg.parallel_config.model_parallel == 2 and isinstance(cfg.parallel_config.model_parallel, int)
    assert cfg.lr_schedule.learning_rate == 1e-4 and isinstance(cfg.lr_schedule.learning_rate, float)
    assert cfg.optimizer.betas == [0.8, 0.9] and cfg.recompute_config.recompute is False
    assert cfg.train_dataset.data_loader.config.data_path == ["x.npy"] and cfg.output_dir == "/tmp/o"
    assert cfg.model_config().rope_theta == 10000.0
    assert parse_overrides(["--a.b", "1.e-8", "--c", "yes"]) == [("a.b", 1e-8), ("c", True)]


def test_bad_types_and_values():
    with pytest.raises(TaskConfigError, match=r"parallel_config\.model_parallel: expected int"):
        load_task_config(str(SEED), ["--parallel_config.model_parallel", "two"])
    with pytest.raises(TaskConfigError, match="missing value"):
        load_task_config(str(SEED), ["--seed"])
    with pytest.raises(TaskConfigError, match="run_mode"):
        load_task_config(str(SEED), ["--run_mode", "dance"])


def test_dry_run_prints_config_params_and_memory(capsys):
    assert main(["pretrain", "--config", str(SEED), "--dry-run", "--parallel_config.model_parallel", "2",
                 "--parallel_config.expert_parallel", "2"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "model_parallel: 2" in out
    assert "30,532,122,624 total" in out and "3,353,032,704 active" in out
    assert "memory estimate per device (dp=1 tp=2 pp=4 ep=2" in out and "GiB" in out


def test_cli_reports_unknown_override_as_user_error(capsys):
    err = cli_error(["pretrain", "--config", str(SEED), "--dry-run", "--parallel_config.model_paralel", "2"], capsys)
    assert "did you mean parallel_config.model_parallel?" in err


def test_run_seed_flags_map_to_config(capsys):
    assert main(["run", "--config", str(SEED), "--run_mode", "train", "--use_parallel", "True",
                 "--batch_size", "2", "--device_id", "0", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "batch_size: 2" in captured.out and "--device_id" in captured.err


def test_use_parallel_with_world_size_above_one_is_an_error(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["run", "--config", str(SEED), "--run_mode", "train"]) == 2
    assert "qwen3moe launch --nproc N" in capsys.readouterr().err  # not started by msrun
