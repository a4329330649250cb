"""`qwen3moe pretrain --config FILE.yaml [--dry-run] [--section.key value ...]`.

The task file has the MindSpore Transformers shape (see qwen3moe/training/task_config.py and
examples/configs/). The run is assembled by qwen3moe/training/recipe.py
(model from `model.preset` / `model.model_config` or the HF folder in `load_checkpoint`; data
from Megatron `.bin/.idx` or a 1-D `.npy` token array; AdamW and the LR schedule) and trained
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

from qwen3moe.training.task_config import TaskConfig, TaskConfigError, load_task_config

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
    """The task file with its overrides (a TaskConfigError names the bad key)."""
    return load_task_config(path, overrides, extra)


def preflight(args: argparse.Namespace, world_size: int) -> None:
    """`qwen3moe launch` checks the task before starting `world_size` workers."""
    from qwen3moe.parallel.pretrain import check_request

    cfg = load(args.config, getattr(args, "overrides", []))
    if args.dry_run:
        return
    if not cfg.use_parallel:
        raise TaskConfigError(f"pretrain on {world_size} processes needs use_parallel: True (or "
                              f"--use_parallel True); without it every process would train the whole model "
                              f"into {cfg.output_dir}")
    check_request(cfg, world_size)


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
    from qwen3moe.parallel.mesh import launched_world_size

    if cfg.use_parallel and launched_world_size() > 1:  # under `qwen3moe launch`: the sharded trainer
        from qwen3moe.parallel.pretrain import train as train_parallel

        os.makedirs(cfg.output_dir, exist_ok=True)
        return train_parallel(cfg, log=lambda s: print(s, flush=True))
    check_world_size(cfg)
    os.makedirs(cfg.output_dir, exist_ok=True)
    Path(cfg.output_dir, "resolved_config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    return train(cfg)


# ---- dry run --------------------------------------------------------------------------------
def dry_run_report(cfg: TaskConfig) -> str:
    """Parameter counts and the per-device memory estimate of the configured parallel layout."""
    from qwen3moe.parallel.mesh import Mesh, MeshError
    from qwen3moe.parallel.planner import estimate
    from qwen3moe.training.recipe import model_config

    mc = model_config(cfg)
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


def check_world_size(cfg: TaskConfig) -> None:
    """use_parallel in one process (world size > 1 took the sharded trainer above): say so."""
    if not cfg.use_parallel:
        return
    print("note: use_parallel: True with world size 1: running single-process "
          "(parallel_config is used for the memory estimate only)", file=sys.stderr)


# ---- the run --------------------------------------------------------------------------------
def train(cfg: TaskConfig) -> int:
    """Single-process training (training/recipe.py), log lines on stdout."""
    import mindspore as ms

    from qwen3moe.training import recipe

    ms.set_device("CPU")
    trainer = recipe.train(cfg, log=lambda s: print(s, flush=True))
    m = trainer.metrics
    print(f"done: {len(trainer.history)} steps; metrics in {m.jsonl_path} and {m.csv_path}")
    return 0
