"""Run assembly: a `TaskConfig` -> model, data, schedule, optimizer and train-step arguments.

One place turns the seed-style task file into the objects a run needs; `qwen3moe pretrain`,
the parallel trainers (parallel/pretrain.py, parallel/compiled.py), the demo and the examples
use it instead of rebuilding the wiring. Problems are `TaskConfigError`s naming the key
(PrecisionError / RecomputeError from their modules); nothing here prints.

Data: Megatron `.bin/.idx` prefixes through io/gpt_dataset.py (GPTDataset sample order), or a
1-D `.npy` token array through TokenWindows. Steps: runner_config.train_steps, else
lr_schedule.total_steps, else epochs over the data.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen3moe.io.gpt_loader import GPTBatches
from qwen3moe.training.task_config import SCHEDULES, TaskConfig, TaskConfigError

DATA_KEY = "train_dataset.data_loader.config.data_path"


# ---- data -----------------------------------------------------------------------------------
class MicroBatches:
    """batch(i) -> one batch, or a list of `accum` micro-batches, from an indexable source."""

    def __init__(self, source: Any, accum: int) -> None:
        self.source, self.accum = source, accum

    def batch(self, i: int):
        if self.accum == 1:
            return self.source.batch(i)
        return [self.source.batch(i * self.accum + j) for j in range(self.accum)]


def build_data(cfg: TaskConfig, num_samples: int):
    """(batch source, samples available or None) for the configured data_path."""
    from qwen3moe.training.trainer import TokenWindows

    dc, r = cfg.train_dataset.data_loader.config, cfg.runner_config
    paths = [str(p) for p in dc.data_path] or ([dc.dataset_dir] if dc.dataset_dir else [])
    if len(paths) == 1 and paths[0].endswith(".npy"):
        if not os.path.isfile(paths[0]):
            raise TaskConfigError(f"{DATA_KEY}: {paths[0]} not found")
        tokens = np.load(paths[0], mmap_mode="r")
        if tokens.ndim != 1 or len(tokens) <= dc.seq_length:
            raise TaskConfigError(f"{paths[0]}: need a 1-D token array longer than seq_length={dc.seq_length}")
        windows = TokenWindows(np.asarray(tokens), dc.seq_length, r.batch_size, seed=dc.seed)
        return MicroBatches(windows, r.gradient_accumulation_steps), (len(tokens) - 1) // dc.seq_length
    if not paths:
        raise TaskConfigError(f"{DATA_KEY} is empty")
    from qwen3moe.io.gpt_dataset import build_gpt_dataset

    try:
        kw = {"pad_id": dc.pad} if dc.pad is not None else {}
        # no attention_mask: the model builds its causal mask (reset_attention_mask is not applied)
        ds = build_gpt_dataset(paths, dc.seq_length, num_samples, seed=dc.seed, split=dc.split,
                               eod_mask_loss=dc.eod_mask_loss, reset_position_ids=dc.reset_position_ids,
                               create_attention_mask=False, eod_id=dc.eod, **kw)
    except (OSError, ValueError) as exc:
        raise TaskConfigError(f"train_dataset: {str(exc).splitlines()[0]}") from None
    data = GPTBatches(ds, r.batch_size)  # position ids ride along with reset_position_ids
    return MicroBatches(data, r.gradient_accumulation_steps), len(ds)


def total_steps(cfg: TaskConfig, samples: int | None) -> int:
    """runner_config.train_steps, else lr_schedule.total_steps, else epochs over the data."""
    r = cfg.runner_config
    if r.train_steps > 0:
        return r.train_steps
    if cfg.lr_schedule.total_steps > 0:
        return cfg.lr_schedule.total_steps
    per_step = r.batch_size * r.gradient_accumulation_steps
    if samples:
        return max(1, r.epochs * samples // per_step)
    raise TaskConfigError("cannot tell the number of steps: set runner_config.train_steps or "
                          "lr_schedule.total_steps")


def requested_samples(cfg: TaskConfig) -> int:
    """Samples to build a Megatron dataset with: sizes[0], else steps x global batch."""
    sizes = cfg.train_dataset.data_loader.sizes
    if sizes and int(sizes[0]) > 0:
        return int(sizes[0])
    r = cfg.runner_config
    steps = r.train_steps if r.train_steps > 0 else cfg.lr_schedule.total_steps
    return max(1, steps) * r.batch_size * r.gradient_accumulation_steps


# ---- model, optimizer, schedule -------------------------------------------------------------
def model_config(cfg: TaskConfig):
    """The model config: the HF folder's config.json in load_checkpoint, else the task file's."""
    from qwen3moe.models.config import Qwen3MoeConfig

    try:
        if cfg.load_checkpoint and Path(cfg.load_checkpoint, "config.json").is_file():
            return Qwen3MoeConfig.from_pretrained(cfg.load_checkpoint)
        return cfg.model_config()
    except TaskConfigError:
        raise
    except ValueError as exc:
        raise TaskConfigError(str(exc).splitlines()[0]) from None


def build_model(cfg: TaskConfig):
    """The HF folder in load_checkpoint, or the configured model with seeded initialisation."""
    from qwen3moe.layers.dtypes import set_init_seed
    from qwen3moe.models.qwen3_moe import Qwen3MoeForCausalLM

    ck = cfg.load_checkpoint
    if ck and Path(ck, "config.json").is_file():
        # fp32 master weights whatever the folder stores: bf16 storage is inference-only here (its
        # forward ops carry no gradient and AdamW updates fp32 parameters)
        return Qwen3MoeForCausalLM.from_pretrained(ck, dtype="float32")
    if ck and not cfg.resume_training:
        raise TaskConfigError(f"load_checkpoint {ck}: not a HF folder (no config.json); training checkpoints "
                              "are continued with resume_training: True")
    set_init_seed(cfg.seed)
    return Qwen3MoeForCausalLM(model_config(cfg))


def build_schedule(cfg: TaskConfig, steps: int):
    from qwen3moe.training.schedules import Schedule

    ls = cfg.lr_schedule
    peak = cfg.optimizer.learning_rate if cfg.optimizer.learning_rate is not None else ls.learning_rate
    total = ls.total_steps if ls.total_steps > 0 else steps
    warmup = ls.warmup_steps or int(round(ls.warmup_ratio * total))
    min_lr = ls.min_lr if ls.min_lr is not None else ls.lr_end
    return Schedule(SCHEDULES.get(ls.type.lower(), "cosine"), peak, warmup, max(1, total), min_lr)


def optimizer_arguments(cfg: TaskConfig) -> dict:
    """AdamW keyword arguments (betas, eps, weight decay, no-decay names) from the optimizer section."""
    from qwen3moe.training.optimizer import DEFAULT_NO_DECAY

    o = cfg.optimizer
    return {"betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            "no_decay": DEFAULT_NO_DECAY if o.no_decay_norms_and_biases else ()}


def step_arguments(cfg: TaskConfig, model: Any, steps: int, make_optimizer: Callable | None = None) -> dict:
    """TrainStep's optimizer, clip, schedule and loss scale from the config (recompute and
    compute dtype applied to the model). `make_optimizer(params, lr=, **adamw)` replaces AdamW
    (parallel/step.RankAdamW)."""
    from qwen3moe.training.optimizer import AdamW

    w = cfg.runner_wrapper
    sched = build_schedule(cfg, steps)
    opt = (make_optimizer or AdamW)(model.trainable_params(), lr=sched(0), **optimizer_arguments(cfg))
    apply_recompute_config(cfg, model)
    return {"optimizer": opt, "clip": w.max_grad_norm if w.use_clip_grad else None, "schedule": sched,
            "loss_scale": apply_precision_config(cfg, model)}


def build_step(cfg: TaskConfig, model: Any, steps: int):
    from qwen3moe.training.step import TrainStep

    return TrainStep(model, skip_nonfinite=True, **step_arguments(cfg, model, steps), **cfg.moe_training())


def apply_precision_config(cfg: TaskConfig, model: Any):
    """runner_config.compute_dtype on the model; the dynamic loss scale for fp16 (else None)."""
    from qwen3moe.training.precision import DynamicLossScale, set_compute_dtype

    dtype = set_compute_dtype(model, cfg.runner_config.compute_dtype, "runner_config.compute_dtype")
    return DynamicLossScale.from_scale_sense(cfg.runner_wrapper.scale_sense) if dtype == "float16" else None


def apply_recompute_config(cfg: TaskConfig, model: Any) -> list[int]:
    """Mark decoder layers for recompute per recompute_config.recompute (training/recompute.py)."""
    from qwen3moe.training.recompute import apply_recompute

    return apply_recompute(model, cfg.recompute_config.recompute, cfg.parallel_config.pipeline_stage)


def trainer_config(cfg: TaskConfig, model: Any, steps: int):
    """TrainerConfig: log / save intervals from the callbacks, checkpoints under output_dir."""
    from qwen3moe.training.checkpoint import STATE_FILE, latest_checkpoint
    from qwen3moe.training.trainer import TrainerConfig

    r, ckpt_cb, loss_cb = cfg.runner_config, cfg.callback("CheckpointMonitor"), cfg.callback("MFLossMonitor")
    ck_dir = os.path.join(cfg.output_dir, "checkpoint")
    resume_from = None
    lc = cfg.load_checkpoint
    if cfg.resume_training and lc and (Path(lc, STATE_FILE).is_file() or latest_checkpoint(lc)):
        resume_from = lc
    return TrainerConfig(
        total_steps=steps, log_interval=int(loss_cb.get("per_print_times", r.log_interval)),
        save_interval=int(ckpt_cb.get("save_checkpoint_steps", 0)), checkpoint_dir=ck_dir,
        keep_last=int(ckpt_cb.get("keep_checkpoint_max", 2)), time_budget_s=r.time_budget_s,
        resume=bool(cfg.resume_training), resume_from=resume_from, nan_abort_after=r.nan_abort_after,
        plot_dir=cfg.output_dir, save_at_end=True,
        checkpoint_extra=checkpoint_extra(cfg, model.config),
        resume_override=tuple(cfg.resume_override))


def checkpoint_extra(cfg: TaskConfig, config: Any = None) -> dict:
    """What a resumed run must match (training/trainer.check_resume), stored with every training
    checkpoint, single-process or sharded: the model config (`config`, default the run's) and
    the data geometry."""
    return {"model_config": (config or model_config(cfg)).to_dict(), "data": cfg.data_geometry()}


# ---- the single-process run -----------------------------------------------------------------
@dataclass
class Run:
    """The assembled single-process run (`assemble`), before training."""
    cfg: TaskConfig
    model: Any
    data: Any
    steps: int
    step: Any


def assemble(cfg: TaskConfig) -> Run:
    """Model (seeded), data, step count and compiled TrainStep of a single-process run."""
    import mindspore as ms

    ms.set_seed(cfg.seed)
    model = build_model(cfg)
    data, samples = build_data(cfg, requested_samples(cfg))
    steps = total_steps(cfg, samples)
    return Run(cfg, model, data, steps, build_step(cfg, model, steps))


def describe(run: Run, peak_flops: float) -> str:
    """One line: parameters, steps, tokens per step, the matmul probe's peak."""
    r, seq = run.cfg.runner_config, run.cfg.train_dataset.data_loader.config.seq_length
    m = run.model
    return (f"model: {m.num_parameters():,} parameters ({m.num_parameters(active=True):,} active); "
            f"{run.steps} steps of {r.batch_size * r.gradient_accumulation_steps} x {seq} tokens; "
            f"matmul probe peak {peak_flops / 1e12:.3f} TFLOP/s")


def train(cfg: TaskConfig, log: Callable[[str], None] = lambda s: None):
    """Assemble and fit a single-process run; metrics to <output_dir>/metrics.{jsonl,csv}.
    Returns the finished Trainer (history, metrics). Raises TrainingAborted on a run of
    non-finite steps."""
    from qwen3moe.training.metrics import MetricsLogger, measure_peak_flops, train_flops_per_token
    from qwen3moe.training.trainer import Trainer

    run = assemble(cfg)
    peak = measure_peak_flops(cfg.runner_config.mfu_probe_size)
    log(describe(run, peak))
    seq = cfg.train_dataset.data_loader.config.seq_length
    metrics = MetricsLogger(cfg.output_dir, train_flops_per_token(run.model.config, seq), peak)
    trainer = Trainer(run.step, run.data, trainer_config(cfg, run.model, run.steps), log=log, metrics=metrics)
    trainer.fit()
    return trainer
