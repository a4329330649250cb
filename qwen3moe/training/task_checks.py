"""Value checks of a task config that training depends on (called by task_config's loader):
run length, optimizer, schedule and data options a run cannot use, and `resume_override`.
Each failure is one TaskConfigError line naming the YAML key, the value and what is expected."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qwen3moe.errors import TaskConfigError

if TYPE_CHECKING:  # annotations only: task_config calls these checks
    from qwen3moe.training.task_config import TaskConfig

RESUME_OVERRIDES = ("model", "data")


def check_training_values(cfg: TaskConfig) -> None:
    """Run, optimizer and schedule values a training run cannot use: one line naming the key."""
    r, o, ls, w = cfg.runner_config, cfg.optimizer, cfg.lr_schedule, cfg.runner_wrapper
    seq = cfg.train_dataset.data_loader.config.seq_length
    checks = [("runner_config.batch_size", r.batch_size, r.batch_size >= 1, ">= 1"),
              ("runner_config.gradient_accumulation_steps", r.gradient_accumulation_steps,
               r.gradient_accumulation_steps >= 1, ">= 1"),
              ("runner_config.log_interval", r.log_interval, r.log_interval >= 1, ">= 1"),
              ("runner_config.epochs", r.epochs, r.epochs >= 1, ">= 1"),
              ("runner_config.train_steps", r.train_steps, r.train_steps == -1 or r.train_steps >= 1,
               "-1 (from lr_schedule.total_steps or epochs) or >= 1"),
              ("train_dataset.data_loader.config.seq_length", seq, seq >= 1, ">= 1"),
              ("optimizer.learning_rate", o.learning_rate, o.learning_rate is None or o.learning_rate >= 0, ">= 0"),
              ("lr_schedule.learning_rate", ls.learning_rate, ls.learning_rate >= 0, ">= 0"),
              ("optimizer.eps", o.eps, o.eps > 0, "> 0"),
              ("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
              ("optimizer.betas", o.betas, len(o.betas) == 2 and all(
                  isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in o.betas),
               "two numbers in [0, 1)"),
              ("lr_schedule.warmup_steps", ls.warmup_steps, ls.warmup_steps >= 0, ">= 0"),
              ("lr_schedule.warmup_ratio", ls.warmup_ratio, 0 <= ls.warmup_ratio <= 1, "in [0, 1]"),
              ("lr_schedule.total_steps", ls.total_steps, ls.total_steps == -1 or ls.total_steps >= 1,
               "-1 (the run's step count) or >= 1"),
              ("lr_schedule.min_lr", ls.min_lr, ls.min_lr is None or ls.min_lr >= 0, ">= 0"),
              ("lr_schedule.lr_end", ls.lr_end, ls.lr_end >= 0, ">= 0"),
              ("runner_wrapper.max_grad_norm", w.max_grad_norm, not w.use_clip_grad or w.max_grad_norm > 0, "> 0"),
              ("train_dataset.data_loader.config.reset_attention_mask",
               cfg.train_dataset.data_loader.config.reset_attention_mask,
               not cfg.train_dataset.data_loader.config.reset_attention_mask,
               "false (the train step always uses the plain causal mask; true would be silently ignored)")]
    for key, value, ok, expected in checks:
        if not ok:
            raise TaskConfigError(f"{key} must be {expected}, got {value!r}")
    dc = cfg.train_dataset.data_loader.config
    if len(dc.data_path) == 1 and str(dc.data_path[0]).endswith(".npy"):
        for name in ("eod_mask_loss", "reset_position_ids"):
            if getattr(dc, name):  # TokenWindows are plain windows: it would silently do nothing
                raise TaskConfigError(f"train_dataset.data_loader.config.{name}: applies to Megatron .bin/.idx "
                                      "data only, not to a .npy token array")
    peak = o.learning_rate if o.learning_rate is not None else ls.learning_rate
    floor, floor_key = (ls.min_lr, "lr_schedule.min_lr") if ls.min_lr is not None else (ls.lr_end, "lr_schedule.lr_end")
    if floor > peak:
        raise TaskConfigError(f"{floor_key} ({floor}) is above the peak learning rate ({peak}): "
                              "the schedule would rise instead of decay")
    if ls.total_steps >= 1 and ls.warmup_steps > ls.total_steps:
        raise TaskConfigError(f"lr_schedule.warmup_steps ({ls.warmup_steps}) is longer than "
                              f"lr_schedule.total_steps ({ls.total_steps})")


def resume_override(value: Any) -> list[str]:
    """`model,data` / [model, data] -> ["model", "data"]; anything else is an error."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    names = [str(v).strip() for v in items if str(v).strip()]
    bad = [n for n in names if n not in RESUME_OVERRIDES]
    if bad:
        raise TaskConfigError(f"resume_override: {bad[0]!r} is not one of {', '.join(RESUME_OVERRIDES)}")
    return names
