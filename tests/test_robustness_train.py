"""Issue 15 part B, training side: validated optimizer/schedule/run keys, resume refusing a
different model or data geometry, metrics rows after a resume, and silent data no-ops."""
from __future__ import annotations

import pytest

from conftest import REPO
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
])
def test_bad_optimizer_schedule_and_run_values_name_the_key(key, value, expected):
    with pytest.raises(TaskConfigError) as exc:
        load_task_config(TINY, [f"--{key}", value])
    msg = str(exc.value)
    assert expected in msg and "\n" not in msg, msg


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
