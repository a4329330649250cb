"""`qwen3moe pretrain --config FILE.yaml [--dry-run] [--section.key value ...]`.

The task file has the MindSpore Transformers shape (see qwen3moe/training/task_config.py and
examples/configs/). A run builds the model (`model.preset` and/or `model.model_config`, or the
HF folder in `load_checkpoint`), the data (Megatron `.bin/.idx` through qwen3moe.io.gpt_dataset
when present, or a 1-D `.npy` token array), the AdamW optimizer and LR schedule, then trains
with qwen3moe.training.Trainer, logging metrics to <output_dir>/metrics.{jsonl,csv}, saving
checkpoints to <output_dir>/checkpoint/step_*/ and plots to <output_dir>/. `resume_training:
True` continues from the latest checkpoint there (or from `load_checkpoint` if that is one).
"""
from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

from qwen3moe.io.safetensors_io import CheckpointError
from qwen3moe.training.task_config import SCHEDULES, TaskConfig, TaskConfigError, load_task_config

GiB = 2 ** 30


def add_overrides_support(p: argparse.ArgumentParser) -> None:
    """Let this sub-parser collect unknown `--section.key value` tokens into args.overrides.

    argparse's top-level parse_args rejects what a sub-parser leaves over, so the sub-parser
    instance keeps the leftovers itself (the top-level parser in cli.py stays untouched).
    """
    original = p.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = original(args, namespace)
        ns.overrides = list(getattr(ns, "overrides", None) or []) + list(extra)
        return ns, []

    p.parse_known_args = types.MethodType(parse_known_args, p)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("pretrain", allow_abbrev=False,
                              help="pretrain from a seed-style YAML task config",
                              description="pretrain --config FILE.yaml [--dry-run] [--section.key value ...]")
    p.add_argument("--config", required=True, help="YAML task file (MindSpore Transformers shape)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the resolved config, parameter count and memory estimate, then exit")
    add_overrides_support(p)
    p.set_defaults(func=run)


def load(path: str, overrides: list[str], extra: dict | None = None) -> TaskConfig:
    from qwen3moe.cli import CliError

    try:
        return load_task_config(path, overrides, extra)
    except TaskConfigError as exc:
        raise CliError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config, getattr(args, "overrides", []))
    return execute(cfg, dry_run=args.dry_run)


def execute(cfg: TaskConfig, dry_run: bool = False) -> int:
    """Print notes and the resolved config; dry-run report or a training run."""
    for note in cfg.notes:
        print(f"note: {note}", file=sys.stderr)
    print("# resolved config\n" + cfg.to_yaml(), flush=True)
    if dry_run:
        print(dry_run_report(cfg))
        return 0
    if cfg.use_parallel and world_size() > 1:  # under `qwen3moe launch`: the sharded trainer
        from qwen3moe.parallel.pretrain import train as train_parallel

        os.makedirs(cfg.output_dir, exist_ok=True)
        return train_parallel(cfg)
    check_world_size(cfg)
    os.makedirs(cfg.output_dir, exist_ok=True)
    Path(cfg.output_dir, "resolved_config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    return train(cfg)


# ---- dry run --------------------------------------------------------------------------------
def dry_run_report(cfg: TaskConfig) -> str:
    """Parameter counts and the per-device memory estimate of the configured parallel layout."""
    from qwen3moe.parallel.mesh import Mesh, MeshError
    from qwen3moe.parallel.planner import estimate

    mc = _model_config(cfg)
    pc, seq = cfg.parallel_config, cfg.train_dataset.data_loader.config.seq_length
    lines = [f"parameters: {mc.num_parameters():,} total, {mc.num_parameters(active=True):,} active "
             f"({mc.num_hidden_layers} layers, {mc.num_experts} experts, top-{mc.num_experts_per_tok})"]
    mesh = Mesh(dp=pc.data_parallel, tp=pc.model_parallel, pp=pc.pipeline_stage, ep=pc.expert_parallel,
                sp=pc.use_seq_parallel, micro_batch_num=pc.micro_batch_num)
    try:
        mesh.validate(num_layers=mc.num_hidden_layers, num_heads=mc.num_attention_heads,
                      num_kv_heads=mc.num_key_value_heads, num_experts=mc.num_experts)
    except MeshError as exc:
        return "\n".join(lines + [f"memory estimate: parallel layout invalid: {exc}"])
    est = estimate(mc, mesh, seq, mbs=cfg.runner_config.batch_size, mode="train",
                   recompute=bool(cfg.recompute_config.recompute))
    lines.append(f"memory estimate per device (dp={mesh.dp} tp={mesh.tp} pp={mesh.pp} ep={mesh.ep}, "
                 f"{mesh.world_size} devices, seq {seq}, micro-batch {cfg.runner_config.batch_size}): "
                 f"weights {est.weights / GiB:.2f} GiB, grads {est.grads / GiB:.2f} GiB, "
                 f"optimizer {est.optimizer / GiB:.2f} GiB, activations {est.activations / GiB:.2f} GiB, "
                 f"total {est.total / GiB:.2f} GiB")
    return "\n".join(lines)


def _model_config(cfg: TaskConfig):
    from qwen3moe.cli import CliError
    from qwen3moe.models.config import Qwen3MoeConfig

    try:
        if cfg.load_checkpoint and Path(cfg.load_checkpoint, "config.json").is_file():
            return Qwen3MoeConfig.from_pretrained(cfg.load_checkpoint)
        return cfg.model_config()
    except (TaskConfigError, ValueError) as exc:
        raise CliError(str(exc)) from None


def world_size() -> int:
    for var in ("WORLD_SIZE", "RANK_SIZE", "MS_WORKER_NUM"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def check_world_size(cfg: TaskConfig) -> None:
    """use_parallel in one process (world size > 1 took the sharded trainer above): say so."""
    if not cfg.use_parallel:
        return
    print("note: use_parallel: True with world size 1: running single-process "
          "(parallel_config is used for the memory estimate only)", file=sys.stderr)


# ---- data -----------------------------------------------------------------------------------
class MicroBatches:
    """batch(i) -> one batch, or a list of `accum` micro-batches, from an indexable source."""

    def __init__(self, source: Any, accum: int) -> None:
        self.source, self.accum = source, accum

    def batch(self, i: int):
        if self.accum == 1:
            return self.source.batch(i)
        return [self.source.batch(i * self.accum + j) for j in range(self.accum)]


class GptBatches:
    """Batches of Megatron GPTDataset samples, in dataset order (resumable by index).

    GPTDataset items are (tokens, labels = tokens shifted by one); the model shifts labels
    itself, so labels are realigned to the inputs: position t+1 holds the label of t, and the
    label of the last position is dropped (-100). loss_mask 0 -> ignored (-100).
    """

    def __init__(self, dataset: Any, batch_size: int) -> None:
        self.dataset, self.batch_size = dataset, batch_size

    def __len__(self) -> int:
        return len(self.dataset) // self.batch_size

    def batch(self, i: int) -> dict:
        n = len(self.dataset)
        items = [self.dataset[(i * self.batch_size + j) % n] for j in range(self.batch_size)]
        ids = np.stack([np.asarray(it["input_ids"], np.int64) for it in items])
        lab = np.stack([np.asarray(it["labels"], np.int64) for it in items])
        mask = np.stack([np.asarray(it.get("loss_mask", np.ones_like(it["labels"])), np.float32) for it in items])
        lab = np.where(mask > 0, lab, -100)
        labels = np.full_like(ids, -100)
        labels[:, 1:] = lab[:, :-1]
        out = {"input_ids": ids, "labels": labels}
        if all("position_ids" in it for it in items):  # reset after EOD when the config asks
            out["position_ids"] = np.stack([np.asarray(it["position_ids"], np.int64) for it in items])
        return out


def build_data(cfg: TaskConfig, num_samples: int):
    """(batch source, samples available or None) for the configured data_path."""
    from qwen3moe.cli import CliError
    from qwen3moe.training.trainer import TokenWindows

    dc, r = cfg.train_dataset.data_loader.config, cfg.runner_config
    paths = [str(p) for p in dc.data_path] or ([dc.dataset_dir] if dc.dataset_dir else [])
    if len(paths) == 1 and paths[0].endswith(".npy"):
        if not os.path.isfile(paths[0]):
            raise CliError(f"train_dataset.data_loader.config.data_path: {paths[0]} not found")
        tokens = np.load(paths[0], mmap_mode="r")
        if tokens.ndim != 1 or len(tokens) <= dc.seq_length:
            raise CliError(f"{paths[0]}: need a 1-D token array longer than seq_length={dc.seq_length}")
        windows = TokenWindows(np.asarray(tokens), dc.seq_length, r.batch_size, seed=dc.seed)
        return MicroBatches(windows, r.gradient_accumulation_steps), (len(tokens) - 1) // dc.seq_length
    if not paths:
        raise CliError("train_dataset.data_loader.config.data_path is empty")
    from qwen3moe.io.gpt_dataset import build_gpt_dataset

    try:
        kw = {"pad_id": dc.pad} if dc.pad is not None else {}
        # no attention_mask: the model builds its causal mask (reset_attention_mask is not applied)
        ds = build_gpt_dataset(paths, dc.seq_length, num_samples, seed=dc.seed, split=dc.split,
                               eod_mask_loss=dc.eod_mask_loss, reset_position_ids=dc.reset_position_ids,
                               create_attention_mask=False, eod_id=dc.eod, **kw)
    except (OSError, ValueError) as exc:
        raise CliError(f"train_dataset: {str(exc).splitlines()[0]}") from None
    return MicroBatches(GptBatches(ds, r.batch_size), r.gradient_accumulation_steps), len(ds)


def total_steps(cfg: TaskConfig, samples: int | None) -> int:
    """runner_config.train_steps, else lr_schedule.total_steps, else epochs over the data."""
    from qwen3moe.cli import CliError

    r = cfg.runner_config
    if r.train_steps > 0:
        return r.train_steps
    if cfg.lr_schedule.total_steps > 0:
        return cfg.lr_schedule.total_steps
    per_step = r.batch_size * r.gradient_accumulation_steps
    if samples:
        return max(1, r.epochs * samples // per_step)
    raise CliError("cannot tell the number of steps: set runner_config.train_steps or lr_schedule.total_steps")


def requested_samples(cfg: TaskConfig) -> int:
    """Samples to build a Megatron dataset with: sizes[0], else steps x global batch."""
    sizes = cfg.train_dataset.data_loader.sizes
    if sizes and int(sizes[0]) > 0:
        return int(sizes[0])
    r = cfg.runner_config
    steps = r.train_steps if r.train_steps > 0 else cfg.lr_schedule.total_steps
    return max(1, steps) * r.batch_size * r.gradient_accumulation_steps


# ---- model, optimizer, schedule -------------------------------------------------------------
def build_model(cfg: TaskConfig):
    from qwen3moe.cli import CliError
    from qwen3moe.layers.dtypes import set_init_seed
    from qwen3moe.models.qwen3_moe import Qwen3MoeForCausalLM

    ck = cfg.load_checkpoint
    if ck and Path(ck, "config.json").is_file():
        return Qwen3MoeForCausalLM.from_pretrained(ck, dtype=None)
    if ck and not cfg.resume_training:
        raise CliError(f"load_checkpoint {ck}: not a HF folder (no config.json); training checkpoints "
                       "are continued with resume_training: True")
    set_init_seed(cfg.seed)
    return Qwen3MoeForCausalLM(_model_config(cfg))


def build_schedule(cfg: TaskConfig, steps: int):
    from qwen3moe.training.schedules import Schedule

    ls = cfg.lr_schedule
    peak = cfg.optimizer.learning_rate if cfg.optimizer.learning_rate is not None else ls.learning_rate
    total = ls.total_steps if ls.total_steps > 0 else steps
    warmup = ls.warmup_steps or int(round(ls.warmup_ratio * total))
    min_lr = ls.min_lr if ls.min_lr is not None else ls.lr_end
    return Schedule(SCHEDULES.get(ls.type.lower(), "cosine"), peak, warmup, max(1, total), min_lr)


def step_arguments(cfg: TaskConfig, model: Any, steps: int) -> dict:
    """TrainStep's optimizer, clip, schedule and loss scale from the config (recompute and
    compute dtype applied to the model)."""
    from qwen3moe.training.optimizer import DEFAULT_NO_DECAY, AdamW

    o, w = cfg.optimizer, cfg.runner_wrapper
    sched = build_schedule(cfg, steps)
    opt = AdamW(model.trainable_params(), lr=sched(0), betas=tuple(o.betas), eps=o.eps,
                weight_decay=o.weight_decay, no_decay=DEFAULT_NO_DECAY if o.no_decay_norms_and_biases else ())
    apply_recompute_config(cfg, model)
    return {"optimizer": opt, "clip": w.max_grad_norm if w.use_clip_grad else None, "schedule": sched,
            "loss_scale": apply_precision_config(cfg, model)}


def build_step(cfg: TaskConfig, model: Any, steps: int):
    from qwen3moe.training.step import TrainStep

    return TrainStep(model, skip_nonfinite=True, **step_arguments(cfg, model, steps), **cfg.moe_training())


def apply_precision_config(cfg: TaskConfig, model: Any):
    """runner_config.compute_dtype on the model; the dynamic loss scale for fp16 (else None)."""
    from qwen3moe.cli import CliError
    from qwen3moe.training.precision import DynamicLossScale, PrecisionError, set_compute_dtype

    try:
        dtype = set_compute_dtype(model, cfg.runner_config.compute_dtype, "runner_config.compute_dtype")
        return DynamicLossScale.from_scale_sense(cfg.runner_wrapper.scale_sense) if dtype == "float16" else None
    except PrecisionError as exc:
        raise CliError(str(exc)) from None


def apply_recompute_config(cfg: TaskConfig, model: Any) -> list[int]:
    """Mark decoder layers for recompute per recompute_config.recompute (training/recompute.py)."""
    from qwen3moe.cli import CliError
    from qwen3moe.training.recompute import RecomputeError, apply_recompute

    try:
        return apply_recompute(model, cfg.recompute_config.recompute, cfg.parallel_config.pipeline_stage)
    except RecomputeError as exc:
        raise CliError(str(exc)) from None


# ---- the run --------------------------------------------------------------------------------
def train(cfg: TaskConfig) -> int:
    import mindspore as ms

    from qwen3moe.training.metrics import MetricsLogger, measure_peak_flops, train_flops_per_token
    from qwen3moe.training.trainer import Trainer, TrainerConfig, TrainingAborted

    ms.set_device("CPU")
    ms.set_seed(cfg.seed)
    model = build_model(cfg)
    data, samples = build_data(cfg, requested_samples(cfg))
    steps = total_steps(cfg, samples)
    step_fn = build_step(cfg, model, steps)
    r, seq = cfg.runner_config, cfg.train_dataset.data_loader.config.seq_length
    peak = measure_peak_flops(r.mfu_probe_size)
    print(f"model: {model.num_parameters():,} parameters ({model.num_parameters(active=True):,} active); "
          f"{steps} steps of {r.batch_size * r.gradient_accumulation_steps} x {seq} tokens; "
          f"matmul probe peak {peak / 1e12:.3f} TFLOP/s", flush=True)
    metrics = MetricsLogger(cfg.output_dir, train_flops_per_token(model.config, seq), peak)
    trainer = Trainer(step_fn, data, trainer_config(cfg, model, steps), log=lambda s: print(s, flush=True),
                      metrics=metrics)
    try:
        trainer.fit()
    except (TrainingAborted, TaskConfigError, CheckpointError) as exc:
        from qwen3moe.cli import CliError

        raise CliError(str(exc)) from None
    print(f"done: {len(trainer.history)} steps; metrics in {metrics.jsonl_path} and {metrics.csv_path}")
    return 0


def trainer_config(cfg: TaskConfig, model: Any, steps: int):
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
        checkpoint_extra={"model_config": model.config.to_dict(), "data": cfg.data_geometry()},
        resume_override=tuple(cfg.resume_override))
