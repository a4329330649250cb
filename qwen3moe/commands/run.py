"""`qwen3moe run`: MindSpore Transformers' `run_mindformer.py` command line, same flags.

    python run_mindformer.py --config X.yaml --run_mode train --use_parallel True ...
becomes
    qwen3moe run --config X.yaml --run_mode train --use_parallel True ...
Flags that set a config key (run_mode, use_parallel, load_checkpoint, resume_training, seed,
output_dir, pretrained_model_dir, epochs, batch_size, ...) override the YAML; any other
`--section.key value` is a dotted override. `--run_mode train|finetune` trains (as `qwen3moe
pretrain`), `--run_mode predict` runs `qwen3moe generate` with pretrained_model_dir,
predict_data and predict_batch_size. Ascend-only flags (device_id, device_target, mode,
register_path, ...) are accepted and ignored with a note.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from qwen3moe.commands.generate import _bool
from qwen3moe.commands.pretrain import add_overrides_support, execute, load

# flag -> dotted config key
CONFIG_FLAGS = {
    "run_mode": "run_mode", "use_parallel": "use_parallel", "load_checkpoint": "load_checkpoint",
    "resume_training": "resume_training", "seed": "seed", "output_dir": "output_dir",
    "pretrained_model_dir": "pretrained_model_dir", "auto_trans_ckpt": "auto_trans_ckpt",
    "only_save_strategy": "only_save_strategy", "src_strategy_path_or_dir": "src_strategy_path_or_dir",
    "epochs": "runner_config.epochs", "batch_size": "runner_config.batch_size",
    "gradient_accumulation_steps": "runner_config.gradient_accumulation_steps",
    "sink_mode": "runner_config.sink_mode", "train_dataset_dir": "train_dataset.data_loader.config.data_path",
    "do_eval": "do_eval", "profile": "profile",
}
IGNORED_FLAGS = ("mode", "device_id", "device_target", "register_path", "transform_process_num",
                 "strategy_load_checkpoint", "remote_save_url", "num_samples", "eval_dataset_dir")
BOOL_FLAGS = ("use_parallel", "auto_trans_ckpt", "only_save_strategy", "sink_mode", "do_eval", "profile")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("run", allow_abbrev=False, help="run_mindformer.py-compatible train/predict",
                              description="run --config FILE.yaml --run_mode train|predict [seed flags] "
                                          "[--section.key value ...]")
    p.add_argument("--config", required=True, help="YAML task file (MindSpore Transformers shape)")
    for flag in CONFIG_FLAGS:
        kind = _bool if flag in BOOL_FLAGS else (int if flag in ("epochs", "batch_size", "seed",
                                                                 "gradient_accumulation_steps") else str)
        p.add_argument(f"--{flag}", type=kind, default=None)
    for flag in IGNORED_FLAGS:
        p.add_argument(f"--{flag}", default=None, help=argparse.SUPPRESS)
    p.add_argument("--predict_data", default=None, help="predict: a prompt or a .txt file, one prompt a line")
    p.add_argument("--predict_batch_size", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=None, help="predict: tokens to generate")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="train: print the resolved config, parameter count and memory estimate, then exit")
    add_overrides_support(p)
    p.set_defaults(func=run)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """Config keys set by seed-style flags (only those given)."""
    out: dict[str, Any] = {}
    for flag, key in CONFIG_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag == "resume_training":
            value = _resume_value(value)
        if flag == "train_dataset_dir":
            value = [value]
        out[key] = value
    return out


def _resume_value(text: str) -> Any:
    """run_mindformer accepts true/false or a checkpoint name for --resume_training."""
    try:
        return _bool(text)
    except argparse.ArgumentTypeError:
        return text


def run(args: argparse.Namespace) -> int:
    ignored = [f"--{f}" for f in IGNORED_FLAGS if getattr(args, f) is not None]
    if ignored:
        print(f"note: ignored on CPU: {', '.join(ignored)}", file=sys.stderr)
    cfg = load(args.config, getattr(args, "overrides", []), flag_values(args))
    if cfg.run_mode in ("train", "finetune"):
        return execute(cfg, dry_run=args.dry_run)
    if cfg.run_mode == "predict":
        return predict(cfg, args)
    from qwen3moe.cli import CliError

    raise CliError(f"--run_mode {cfg.run_mode}: not supported (use train, finetune or predict)")


def predict(cfg: Any, args: argparse.Namespace) -> int:
    """Delegate to `qwen3moe generate` with the seed's predict flags."""
    from qwen3moe.cli import CliError
    from qwen3moe.commands import generate

    model_dir = cfg.pretrained_model_dir or (cfg.load_checkpoint if cfg.load_checkpoint else "")
    if not model_dir:
        raise CliError("--run_mode predict needs --pretrained_model_dir (an HF folder) or pretrained_model_dir "
                       "in the config")
    if not args.predict_data:
        raise CliError("--run_mode predict needs --predict_data (a prompt or a .txt file)")
    os.makedirs(cfg.output_dir, exist_ok=True)
    argv = ["generate", "--pretrained_model_dir", model_dir, "--predict_data", args.predict_data,
            "--predict_batch_size", str(args.predict_batch_size or 1), "--seed", str(cfg.seed),
            "--output", os.path.join(cfg.output_dir, "text_generation_result.txt")]
    if args.max_new_tokens is not None:
        argv += ["--max_new_tokens", str(args.max_new_tokens)]
    parser = argparse.ArgumentParser(prog="qwen3moe run")
    generate.add_parser(parser.add_subparsers(dest="command"))
    return generate.run(parser.parse_args(argv))
