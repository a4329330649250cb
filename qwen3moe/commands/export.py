"""`qwen3moe export --checkpoint DIR --output HF_DIR [--dtype bfloat16] [--tokenizer_dir DIR]`.

Turns a training checkpoint (a `step_*` folder written by qwen3moe.training.checkpoint, or the
root holding them: the latest is used) into a Hugging Face folder (config.json +
model.safetensors, per-expert layout) that transformers and `Qwen3MoeForCausalLM.from_pretrained`
load. The model config comes from the checkpoint's trainer_state.json (`extra.model_config`,
written by `qwen3moe pretrain`), or from `--config` (a YAML task file) for older checkpoints.
"""
from __future__ import annotations

import argparse
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


def check_output(output: str, checkpoint: str, step_dir: str) -> None:
    """The output may not be, or be inside, the checkpoint tree: the root holding the step
    folders, the given --checkpoint or the step folder read (writing there mixes an HF folder
    into training state, and an earlier version deleted every checkpoint doing so)."""
    from qwen3moe.cli import CliError
    from qwen3moe.training.checkpoint import step_dirs

    out = os.path.realpath(output)
    trees = {os.path.realpath(checkpoint), os.path.realpath(step_dir)}
    root = os.path.dirname(os.path.realpath(step_dir))
    if step_dirs(root):
        trees.add(root)
    for tree in sorted(trees):
        if out == tree or out.startswith(tree + os.sep):
            raise CliError(f"--output {output}: is inside the training checkpoint tree {tree}; "
                           "export to a folder outside it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"--output {output}: is a file, expected a folder")


def model_config(step_dir: str, config_yaml: str | None):
    from qwen3moe.cli import CliError
    from qwen3moe.commands.pretrain import load
    from qwen3moe.io.jsonfile import read_json_object
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.training.checkpoint import STATE_FILE

    if config_yaml:
        return load(config_yaml, []).model_config()
    state = read_json_object(os.path.join(step_dir, STATE_FILE), CliError)
    mc = (state.get("extra") or {}).get("model_config")
    if not mc:
        raise CliError(f"{step_dir}: no model config in {STATE_FILE}; pass --config TASK.yaml")
    return Qwen3MoeConfig.from_dict(mc, source=f"{step_dir}/{STATE_FILE}")


def run(args: argparse.Namespace) -> int:
    import mindspore as ms

    from qwen3moe.io.safetensors_io import SafetensorsFile
    from qwen3moe.training.checkpoint import export_pretrained

    ms.set_device("CPU")
    step_dir = resolve_step_dir(args.checkpoint)
    check_output(args.output, args.checkpoint, step_dir)
    cfg = model_config(step_dir, args.config)
    st = SafetensorsFile(os.path.join(step_dir, "model.safetensors"))
    try:
        model = export_pretrained(cfg, st, args.output, args.dtype, args.tokenizer_dir,
                                  source=f"{step_dir}/model.safetensors")
    finally:
        st.close()
    print(f"exported {step_dir} -> {args.output} ({model.num_parameters():,} parameters, {args.dtype})")
    return 0
