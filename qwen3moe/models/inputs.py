"""Host-side input preparation: checks, positions, RoPE tables, additive masks, shifted labels.

Everything data-dependent is computed here in numpy so the compiled graph sees static shapes.
Shapes: B batch, S sequence, D head_dim, T = B*S.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Tensor

from qwen3moe.layers.rope import rope_cos_sin, rope_parameters
from qwen3moe.models.config import Qwen3MoeConfig

MASK_VALUE = float(np.finfo(np.float32).min)  # finite (HF's min): fully masked rows stay NaN-free


@dataclass
class GraphInputs:
    input_ids: Tensor
    cos: Tensor
    sin: Tensor
    bias: Tensor
    token_mask: Tensor
    labels: Tensor | None


def to_numpy_2d(x, name: str, dtype=np.int64) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.asnumpy()
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, seq], got shape {arr.shape}")
    if arr.shape[0] == 0:  # MindSpore would fail deep inside graph compile
        raise ValueError(f"{name} has batch size 0: pass at least one row")
    if arr.size and not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(dtype)


def check_token_ids(ids: np.ndarray, vocab_size: int) -> None:
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        b, s = np.argwhere(bad)[0]
        raise ValueError(f"input_ids[{b}, {s}] = {ids[b, s]} is outside the vocabulary [0, {vocab_size})")


def causal_bias(mask_BS: np.ndarray | None, B: int, S: int, T: int | None = None,
                q_offset: int = 0) -> np.ndarray:
    """Additive bias [B,1,S,T]: 0 where query s (at absolute slot q_offset+s) may attend key t."""
    T = S if T is None else T
    allowed = np.arange(T)[None, :] <= (np.arange(S)[:, None] + q_offset)
    allowed = np.broadcast_to(allowed, (B, S, T))
    if mask_BS is not None:
        allowed = allowed & (mask_BS[:, None, :T] > 0)
    return np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None]


def rope_tables(config: Qwen3MoeConfig, position_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    seq_len = int(position_ids.max()) + 1 if position_ids.size else 1
    inv_freq, scale = rope_parameters(config.head_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings, seq_len)
    return rope_cos_sin(position_ids, inv_freq, scale)


def prepare_inputs(config: Qwen3MoeConfig, input_ids, attention_mask=None, position_ids=None,
                   labels=None, logits_to_keep: int = 0) -> GraphInputs:
    ids = to_numpy_2d(input_ids, "input_ids")
    B, S = ids.shape
    if S == 0:
        raise ValueError("input_ids is empty: need at least one token per row")
    check_token_ids(ids, config.vocab_size)
    mask = None
    if attention_mask is not None:
        mask = to_numpy_2d(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    if position_ids is None:
        pos = np.broadcast_to(np.arange(S, dtype=np.int64), (B, S))
    else:
        pos = to_numpy_2d(position_ids, "position_ids")
        if pos.shape != ids.shape:
            raise ValueError(f"position_ids shape {pos.shape} != input_ids shape {ids.shape}")
    if not isinstance(logits_to_keep, (int, np.integer)) or isinstance(logits_to_keep, bool):
        raise ValueError(f"logits_to_keep must be an int (0 = every position), got {logits_to_keep!r}")
    if not 0 <= logits_to_keep <= S:
        raise ValueError(f"logits_to_keep must be in [0, {S}], got {logits_to_keep}")
    cos, sin = rope_tables(config, pos)
    token_mask = (mask if mask is not None else np.ones((B, S))).reshape(-1).astype(np.float32)
    lab = None
    if labels is not None:
        if logits_to_keep:
            raise ValueError("labels need logits for every position: use logits_to_keep=0")
        lab_np = to_numpy_2d(labels, "labels")
        if lab_np.shape != ids.shape:
            raise ValueError(f"labels shape {lab_np.shape} != input_ids shape {ids.shape}")
        shifted = np.concatenate([lab_np[:, 1:], np.full((B, 1), -100)], axis=1)
        bad = (shifted != -100) & ((shifted < 0) | (shifted >= config.vocab_size))
        if bad.any():
            raise ValueError(f"labels contain {shifted[bad][0]}, outside [0, {config.vocab_size}) and not -100")
        lab = Tensor(shifted.reshape(-1).astype(np.int32))
    return GraphInputs(Tensor(ids.astype(np.int32)), Tensor(cos), Tensor(sin),
                       Tensor(causal_bias(mask, B, S)), Tensor(token_mask), lab)
