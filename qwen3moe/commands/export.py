"""`qwen3moe export --checkpoint DIR --output HF_DIR [--dtype bfloat16] [--tokenizer_dir DIR]`.

Turns a training checkpoint (a `step_*` folder written by qwen3moe.training.checkpoint, or the
root holding them: the latest is used) into a Hugging Face folder (config.json +
model.safetensors, per-expert layout) that transformers and `Qwen3MoeForCausalLM.from_pretrained`
load. The model config comes from the checkpoint's trainer_state.json (`extra.model_config`,
written by `qwen3moe pretrain`), or from `--config` (a YAML task file) for older checkpoints.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="training checkpoint -> Hugging Face folder")
    p.add_argument("--checkpoint", required=True, help="step_* folder, or the checkpoint root (latest is used)")
    p.add_argument("--output", required=True, help="HF folder to write")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--config", default=None, help="YAML task file, when the checkpoint has no model config")
    p.add_argument("--tokenizer_dir", default=None, help="copy tokenizer files from this folder")
    p.set_defaults(func=run)


def resolve_step_dir(path: str) -> str:
    from qwen3moe.cli import CliError
    from qwen3moe.training.checkpoint import STATE_FILE, latest_checkpoint

    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CliError(f"--checkpoint {path}: no training checkpoint ({STATE_FILE}) found")
    return latest


def model_config(step_dir: str, config_yaml: str | None):
    from qwen3moe.cli import CliError
    from qwen3moe.commands.pretrain import load
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.training.checkpoint import STATE_FILE

    if config_yaml:
        return load(config_yaml, []).model_config()
    with open(os.path.join(step_dir, STATE_FILE), encoding="utf-8") as fh:
        state = json.load(fh)
    mc = (state.get("extra") or {}).get("model_config")
    if not mc:
        raise CliError(f"{step_dir}: no model config in {STATE_FILE}; pass --config TASK.yaml")
    return Qwen3MoeConfig.from_dict(mc, source=f"{step_dir}/{STATE_FILE}")


def run(args: argparse.Namespace) -> int:
    import mindspore as ms

    from qwen3moe.training.checkpoint import export_pretrained
    from qwen3moe.io.safetensors_io import SafetensorsFile

    ms.set_device("CPU")
    step_dir = resolve_step_dir(args.checkpoint)
    cfg = model_config(step_dir, args.config)
    st = SafetensorsFile(os.path.join(step_dir, "model.safetensors"))
    try:
        model = export_pretrained(cfg, st, args.output, args.dtype, args.tokenizer_dir,
                                  source=f"{step_dir}/model.safetensors")
    finally:
        st.close()
    print(f"exported {step_dir} -> {args.output} ({model.num_parameters():,} parameters, {args.dtype})")
    return 0
