"""Training checkpoints: model + optimizer moments + step + schedule + data position + RNG.

Layout (one folder per save, written atomically: temp folder + rename, so a crash mid-save
leaves the previous checkpoints intact and never a half-written one):
    <root>/step_00000042/model.safetensors       native parameter names (fused experts), exact dtype
    <root>/step_00000042/optimizer.safetensors   exp_avg.*, exp_avg_sq.*, adamw.step (fp32)
    <root>/step_00000042/trainer_state.json      step, lr, schedule, data position, RNG states, extra
Only the newest `keep_last` step folders are kept. A process killed mid-save leaves a
`.step_N.tmp-*` (or `.old-*`) folder: saving and resuming remove them. Resuming restores every value bit-exactly
(fp32 stored as F32, bf16 parameters as BF16 bits), so an interrupted run continues with the
same loss sequence as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import mindspore as ms
from mindspore import nn

from qwen3moe.io.atomic import atomic_directory
from qwen3moe.io.jsonfile import read_json_object
from qwen3moe.io.safetensors_io import (CheckpointError, SafetensorsFile, check_finite, check_tensor_names,
                                        f32_to_bf16, write_safetensors)
from qwen3moe.layers.dtypes import write_param

_STEP_DIR = re.compile(r"^step_(\d+)$")  # step_00000004 here, step_4 (parallel/train_state.py)
_LEFTOVER = re.compile(r"^\.step_\d{8}\.(tmp|old)-")  # atomic_directory's temp names
STATE_FILE = "trainer_state.json"


def _param_triples(params) -> list[tuple[str, np.ndarray, str]]:
    out = []
    for p in params:
        if p.dtype == ms.bfloat16:
            out.append((p.name, f32_to_bf16(p.astype(ms.float32).asnumpy()), "BF16"))
        else:
            out.append((p.name, np.ascontiguousarray(p.asnumpy(), np.float32), "F32"))
    return out


def rng_state(np_rng: np.random.Generator | None = None) -> dict:
    """Python `random`, the given numpy Generator and MindSpore's global seed, JSON-ready."""
    return {"python": _jsonable(random.getstate()),
            "numpy": np_rng.bit_generator.state if np_rng is not None else None,
            "mindspore_seed": ms.get_seed()}


def restore_rng(state: dict, np_rng: np.random.Generator | None = None) -> None:
    random.setstate(_tuplify(state["python"]))
    if np_rng is not None and state.get("numpy") is not None:
        np_rng.bit_generator.state = state["numpy"]
    if state.get("mindspore_seed") is not None:
        ms.set_seed(state["mindspore_seed"])


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def step_dirs(root: str, state_file: str = STATE_FILE) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints under root (step_<N> folders holding `state_file`,
    which is written last), oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root)
             if (m := _STEP_DIR.match(d)) and os.path.isfile(os.path.join(root, d, state_file))]
    return sorted(found)


def remove_leftovers(root: str, pattern: re.Pattern = _LEFTOVER) -> list[str]:
    """Delete the temp folders (or files) of saves that were killed: entries of `root` whose name
    matches `pattern` (single writer per root: nothing else can be writing them). Returns their names."""
    if not os.path.isdir(root):
        return []
    gone = sorted(d for d in os.listdir(root) if pattern.match(d))
    for d in gone:
        path = os.path.join(root, d)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return gone


def latest_checkpoint(root: str, state_file: str = STATE_FILE) -> str | None:
    dirs = step_dirs(root, state_file)
    return dirs[-1][1] if dirs else None


def save_training_checkpoint(root: str, step: int, model: nn.Cell, optimizer, *,
                             schedule: dict | None = None, data_position: Any = None,
                             np_rng: np.random.Generator | None = None, extra: dict | None = None,
                             keep_last: int = 3) -> str:
    """Write <root>/step_<step> atomically, then prune to the newest `keep_last`. Returns its path."""
    path = os.path.join(root, f"step_{step:08d}")
    state = {"step": int(step), "lr": optimizer.get_lr(), "schedule": schedule,
             "data_position": data_position, "rng": rng_state(np_rng), "extra": extra or {}}
    remove_leftovers(root)
    with atomic_directory(path) as tmp:
        write_safetensors(os.path.join(tmp, "model.safetensors"), _param_triples(model.get_parameters()),
                          {"format": "qwen3moe-train"})
        opt = [(k, np.ascontiguousarray(v, np.float32), "F32") for k, v in optimizer.state_arrays().items()]
        write_safetensors(os.path.join(tmp, "optimizer.safetensors"), opt, {"format": "qwen3moe-train"})
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=1)
    for _, old in step_dirs(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_training_checkpoint(path: str, model: nn.Cell, optimizer,
                             np_rng: np.random.Generator | None = None,
                             check: Callable[[dict, str], None] | None = None) -> dict:
    """Restore parameters, optimizer moments/step/lr and RNG from `path` (a step folder, or a
    root whose latest step folder is used). Returns the trainer_state dict. Every file is
    checked before anything is restored: a damaged checkpoint is a CheckpointError naming the
    file (and the previous complete step to resume from instead), never a half-restored model.
    `check(state, path)` runs before any tensor is loaded (the trainer refuses another model or
    data geometry)."""
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        remove_leftovers(path)
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path}: no training checkpoint ({STATE_FILE}) found")
        path = latest
    else:
        remove_leftovers(os.path.dirname(os.path.abspath(path)))
    try:
        st, so, state = _open(path)
    except CheckpointError as exc:
        older = [d for _, d in step_dirs(os.path.dirname(os.path.abspath(path))) if d < os.path.abspath(path)]
        hint = f"; resume from the previous one, {older[-1]}, or delete this one" if older else ""
        raise CheckpointError(f"{exc}{hint}") from None
    try:
        if check is not None:
            check(state, path)
        params = list(model.get_parameters())
        check_tensor_names(st.path, st.entries, [p.name for p in params])
        for p in params:
            write_param(p, st.read(p.name))  # in place: also right after compiled steps ran
        optimizer.load_state_arrays({k: so.read(k) for k in so.keys()})
    finally:
        st.close()
        so.close()
    optimizer.set_lr(state["lr"])
    restore_rng(state["rng"], np_rng)
    state["path"] = path
    return state


def export_pretrained(config, tensors, out_dir, dtype: str | None = None,
                      tokenizer_dir=None, source: str = "checkpoint"):
    """Native-named full tensors (a mapping name -> array, e.g. a training checkpoint's
    model.safetensors or a re-assembled sharded one) -> HF folder, through the model's own
    saver (per-expert layout), plus the tokenizer files of `tokenizer_dir`. Returns the model.
    A missing, unexpected or mis-shaped tensor is a CheckpointError naming `source`."""
    from mindspore import Tensor

    from qwen3moe.io.hf_checkpoint import copy_tokenizer_files
    from qwen3moe.layers.dtypes import skip_init
    from qwen3moe.models.qwen3_moe import Qwen3MoeForCausalLM

    with skip_init():  # every weight is overwritten next: skip the random init
        model = Qwen3MoeForCausalLM(config)
    params = list(model.get_parameters())
    check_tensor_names(source, tensors, [p.name for p in params])  # missing or unexpected: one line
    for p in params:
        arr = np.asarray(tensors[p.name], np.float32)
        if arr.size != int(np.prod(p.shape)):
            raise CheckpointError(f"{source}: {p.name!r} has shape {arr.shape}, the model expects {tuple(p.shape)}")
        check_finite(arr, p.name, source)  # never export NaN/Inf weights
        t = Tensor(arr.reshape(p.shape))
        p.set_data(t if p.dtype == ms.float32 else t.astype(p.dtype))
    model.save_pretrained(out_dir, dtype=dtype)
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return model


def _open(path: str) -> tuple[SafetensorsFile, SafetensorsFile, dict]:
    """Open and validate (headers, sizes, JSON) the three files of a step folder."""
    state = read_json_object(os.path.join(path, STATE_FILE), CheckpointError)
    st = SafetensorsFile(os.path.join(path, "model.safetensors"))
    try:
        return st, SafetensorsFile(os.path.join(path, "optimizer.safetensors")), state
    except CheckpointError:
        st.close()
        raise
