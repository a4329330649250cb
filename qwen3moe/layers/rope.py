"""Rotary position embedding (non-interleaved rotate-half), with HF rope scaling types.

cos/sin tables are computed on the host in numpy float32 (as HF does in fp32) and fed to the
compiled graph, so shapes stay static and positions can be arbitrary per row (left padding).
Shapes: B batch, S sequence, D head_dim, N heads.
"""
from __future__ import annotations

import math

import numpy as np
from mindspore import Tensor, ops


def rope_parameters(head_dim: int, theta: float, scaling: dict | None,
                    max_position_embeddings: int, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Return (inv_freq [D/2] float32, attention_scaling) for the configured rope type.

    `seq_len` only matters for "dynamic" (NTK): HF grows the base once the sequence passes
    max_position_embeddings and caches it (stateful: a later shorter call above the original
    length keeps the grown base). We evaluate it statelessly per call from the longest position,
    which equals HF for any single call on a fresh model and for monotonically growing decoding.
    """
    rtype = (scaling or {}).get("rope_type", "default")
    D = head_dim
    exponent = np.arange(0, D, 2, dtype=np.int64).astype(np.float32) / np.float32(D)
    base_inv = lambda base: (1.0 / (np.float32(base) ** exponent)).astype(np.float32)
    if rtype == "default":
        return base_inv(theta), 1.0
    factor = float(scaling["factor"])
    if rtype == "linear":
        return (base_inv(theta) / np.float32(factor)).astype(np.float32), 1.0
    if rtype == "dynamic":
        # transformers 5.24 scales against config.max_position_embeddings (not the dict's original)
        orig = max_position_embeddings
        if seq_len is None or seq_len <= orig:
            return base_inv(theta), 1.0
        base = theta * ((factor * seq_len / orig) - (factor - 1)) ** (D / (D - 2))
        return base_inv(base), 1.0
    if rtype == "yarn":
        return _yarn(D, theta, scaling, max_position_embeddings)
    raise ValueError(f"rope_type {rtype!r} is not supported")


def _yarn(D: int, theta: float, s: dict, max_pos: int) -> tuple[np.ndarray, float]:
    """YaRN as transformers 5.24 `_compute_yarn_parameters` (beta_fast 32, beta_slow 1, truncate)."""
    factor = float(s["factor"])
    orig = int(s.get("original_max_position_embeddings") or max_pos)
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    get_mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attn = s.get("attention_factor")
    if attn is None:
        attn = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
                if mscale and mscale_all_dim else get_mscale(factor))
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
    corr = lambda rot: (D * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))
    low, high = corr(beta_fast), corr(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(D // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extra_factor = (1 - ramp).astype(np.float32)
    pos_freqs = (np.float32(theta) ** (np.arange(0, D, 2, dtype=np.int64).astype(np.float32) / np.float32(D)))
    inv_extra = (1.0 / pos_freqs).astype(np.float32)
    inv_inter = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv = inv_inter * (1 - extra_factor) + inv_extra * extra_factor
    return inv.astype(np.float32), float(attn)


def rope_cos_sin(position_ids_BS: np.ndarray, inv_freq: np.ndarray, attention_scaling: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [B, S, D] float32 for integer positions, HF layout cat(freqs, freqs)."""
    freqs = position_ids_BS.astype(np.float32)[..., None] * inv_freq[None, None, :].astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos = (np.cos(emb) * np.float32(attention_scaling)).astype(np.float32)
    sin = (np.sin(emb) * np.float32(attention_scaling)).astype(np.float32)
    return cos, sin


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), -1)


def apply_rope(x_BNSD: Tensor, cos_B1SD: Tensor, sin_B1SD: Tensor) -> Tensor:
    return x_BNSD * cos_B1SD + rotate_half(x_BNSD) * sin_B1SD
