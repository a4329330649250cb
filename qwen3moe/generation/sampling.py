"""Next-token selection in pure NumPy, with transformers 5.x logits-processor semantics and order.

All processors take float32 logits `[B, V]` and return a new float32 array (inputs are never
modified); removed tokens are set to -inf.  HF builds the list in
`GenerationMixin._get_logits_processor` (generation/utils.py) in this order, and so does `Sampler`:

1. `RepetitionPenaltyLogitsProcessor` (if penalty != 1.0; applied in greedy mode too) over every
   token of `input_ids`, i.e. prompt + generated, left-padding ids included;
2. presence penalty (not in HF; vLLM/OpenAI semantics, recommended by Qwen3's model card): placed
   with the penalties, before temperature, as vLLM does;
3. `MinNewTokensLengthLogitsProcessor`: eos ids -> -inf while fewer than `min_new_tokens` were made;
4. only when `do_sample`: `TemperatureLogitsWarper` (if T != 1.0), `TopKLogitsWarper` (if k != 0),
   `TopPLogitsWarper` (if p < 1.0), `MinPLogitsWarper` (if min_p is set; "applied after temperature
   scaling"), each with `min_tokens_to_keep=1`;
5. sampling from softmax (do_sample) or argmax (greedy; ties -> lowest id, like torch.argmax).

Numerics follow HF on CPU: softmax in float32, top-p's cumulative sum accumulated in float64 and
rounded to float32 (torch's CPU cumsum accumulates in double), thresholds cast to float32 as torch
does with Python scalars.  Sorting is stable, so ties at a cut-off are resolved by token id; torch's
unstable sort may order such ties differently (a measure-zero difference for real logits).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # config.py is pure Python, but keep the runtime import graph minimal
    from qwen3moe.generation.config import GenerationConfig

NEG_INF = np.float32(-np.inf)


def _as_logits(logits: np.ndarray) -> np.ndarray:
    out = np.array(logits, dtype=np.float32, copy=True)
    if out.ndim != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {out.shape}")
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float32: exp(x - max) / sum; -inf -> 0.  A row with no finite logit -> NaN."""
    x = np.asarray(logits, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - np.max(x, axis=-1, keepdims=True))
        return e / np.sum(e, axis=-1, keepdims=True)


def token_counts(ids: np.ndarray | Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
    """counts[b, v] = occurrences of v in ids[b]; negative ids are ignored (a "no token" marker)."""
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 2:
        raise ValueError(f"history ids must be [batch, time], got shape {arr.shape}")
    if arr.size and arr.max() >= vocab_size:
        raise ValueError(f"history holds id {int(arr.max())} >= vocab size {vocab_size}")
    rows = np.broadcast_to(np.arange(arr.shape[0])[:, None], arr.shape)
    keep = arr >= 0
    flat = rows[keep] * vocab_size + arr[keep]  # one bincount for the whole batch
    return np.bincount(flat, minlength=arr.shape[0] * vocab_size).reshape(arr.shape[0], vocab_size)


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF RepetitionPenaltyLogitsProcessor, once per distinct seen token (counts > 0 or a bool mask).

    x -> x * penalty if x < 0 else x / penalty.  penalty > 1 discourages repeats; 1 is a no-op.
    """
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    out = _as_logits(logits)
    mask = np.asarray(seen) > 0
    pen = np.float32(penalty)
    out[mask] = np.where(out[mask] < 0, out[mask] * pen, out[mask] / pen)
    return out


def apply_presence_penalty(logits: np.ndarray, counts: np.ndarray, penalty: float) -> np.ndarray:
    """vLLM/OpenAI presence penalty: x -> x - penalty where count > 0 (generated tokens only in vLLM)."""
    out = _as_logits(logits)
    out -= np.float32(penalty) * (np.asarray(counts) > 0)
    return out


def apply_min_new_tokens(logits: np.ndarray, eos_token_ids: Sequence[int], new_tokens: int,
                         min_new_tokens: int) -> np.ndarray:
    """HF MinNewTokensLengthLogitsProcessor: eos ids -> -inf while new_tokens < min_new_tokens."""
    out = _as_logits(logits)
    if new_tokens < min_new_tokens and len(eos_token_ids):
        out[:, [int(i) for i in eos_token_ids if 0 <= int(i) < out.shape[1]]] = NEG_INF
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """HF TemperatureLogitsWarper: x / T, T > 0 (T < 1 sharpens, T > 1 flattens)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    return _as_logits(logits) / np.float32(temperature)


def apply_top_k(logits: np.ndarray, top_k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """HF TopKLogitsWarper: remove x < (k-th largest x); ties with the k-th value are all kept.

    k = min(max(top_k, min_tokens_to_keep), V).  top_k = 0 disables the warper (HF skips it).
    """
    out = _as_logits(logits)
    if top_k == 0:
        return out
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    k = min(max(int(top_k), min_tokens_to_keep), out.shape[1])
    kth = np.partition(out, out.shape[1] - k, axis=-1)[:, out.shape[1] - k, None]
    out[out < kth] = NEG_INF
    return out


def apply_top_p(logits: np.ndarray, top_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """HF TopPLogitsWarper (nucleus): keep the smallest top set whose probability mass >= top_p.

    Sort ascending, c_i = cumsum(softmax(sorted))_i, remove sorted token i iff c_i <= 1 - top_p, but
    never the last (largest) `min_tokens_to_keep`.  Mass kept = 1 - c_{last removed} > top_p.
    """
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    out = _as_logits(logits)
    order = np.argsort(out, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(out, order, axis=-1)
    cum = np.cumsum(softmax(sorted_logits).astype(np.float64), axis=-1).astype(np.float32)
    remove_sorted = cum <= np.float32(1.0 - top_p)
    remove_sorted[:, out.shape[1] - min_tokens_to_keep:] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    out[remove] = NEG_INF
    return out


def apply_min_p(logits: np.ndarray, min_p: float | None, min_tokens_to_keep: int = 1) -> np.ndarray:
    """HF MinPLogitsWarper: remove tokens with p < min_p * max_p, keeping the `min_tokens_to_keep` best.

    p = softmax(x); min_p None disables; min_p = 0 removes nothing.
    """
    out = _as_logits(logits)
    if min_p is None:
        return out
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    probs = softmax(out)
    remove = probs < np.float32(min_p) * probs.max(axis=-1, keepdims=True)
    best = np.argsort(-out, axis=-1, kind="stable")[:, :min_tokens_to_keep]
    np.put_along_axis(remove, best, False, axis=-1)
    out[remove] = NEG_INF
    return out


def greedy(logits: np.ndarray) -> np.ndarray:
    """argmax per row (int64); ties -> the lowest id, as torch.argmax returns the first maximum."""
    return np.argmax(np.asarray(logits), axis=-1).astype(np.int64)


def sample(logits: np.ndarray, rng: np.random.Generator, share: tuple[int, int] | None = None) -> np.ndarray:
    """Draw one id per row from softmax(logits) by inverse CDF with one uniform per row.

    Uses float64 probabilities; -inf logits have probability 0 and are never drawn (the draw is the
    first index whose cumulative mass exceeds u * total, and zero-mass ids never raise the cumsum).
    share = (first, total): the logits are rows first.. of a batch of `total` rows sampled by
    several processes with the same seed; the uniforms of all `total` rows are drawn and this
    share's used, so each row gets the draw one process sampling the whole batch gives it (rows
    at or past `total` are padding and get 0.5).
    """
    x = np.asarray(logits, dtype=np.float64)
    if not np.isfinite(x.max(axis=-1)).all():
        raise ValueError("cannot sample: a row has no finite logit (all tokens removed or NaN/+inf)")
    probs = np.exp(x - x.max(axis=-1, keepdims=True))
    cdf = np.cumsum(probs, axis=-1)
    if share is None:
        u = rng.random(x.shape[0])
    else:
        u = np.full(x.shape[0], 0.5)
        mine = rng.random(share[1])[share[0]:share[0] + x.shape[0]]
        u[:mine.size] = mine
    u = u * cdf[:, -1]
    idx = np.sum(cdf <= u[:, None], axis=-1)
    # u * total may round up to total: fall back to the last id with non-zero mass
    last_positive = x.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
    return np.minimum(idx, last_positive).astype(np.int64)


class Sampler:
    """Picks the next token of every row from logits, HF-ordered (see the module docstring).

    `Sampler(...)(logits [B, V], history_ids [B, T], prompt_length=P) -> ids [B]` where
    `history_ids` is what HF calls `input_ids` at that step (left-padded prompt + generated so far):
    the repetition penalty sees all of it (pads included, as in HF), the presence penalty and the
    min-new-tokens rule only `history_ids[:, P:]` (vLLM counts output tokens only).  Negative ids in
    the history are ignored.  Precomputed counts can be passed instead (`seen_counts`,
    `output_counts`, `new_tokens`) by a loop that keeps them incrementally.

    Reproducible: one `numpy.random.Generator` seeded with `seed`, consuming exactly one uniform
    per row per sampled step (greedy consumes none), so equal seeds and inputs give equal ids.
    """

    def __init__(self, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float | None = None, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, seed: int | None = None, min_new_tokens: int = 0,
                 eos_token_id: Sequence[int] | int | None = None) -> None:
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        if min_p is not None and not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        if not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        self.do_sample = bool(do_sample)
        self.temperature, self.top_k, self.top_p, self.min_p = float(temperature), int(top_k or 0), float(top_p), min_p
        self.repetition_penalty, self.presence_penalty = float(repetition_penalty), float(presence_penalty)
        self.min_new_tokens = int(min_new_tokens)
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        self.eos_token_id = [int(i) for i in eos]
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.share: tuple[int, int] | None = None  # (first row, batch rows) when rows are split (`sample`)

    @classmethod
    def from_config(cls, config: GenerationConfig) -> Sampler:
        """Build from a GenerationConfig (its eos ids are the ones min_new_tokens suppresses)."""
        return cls(do_sample=config.do_sample, temperature=config.temperature, top_k=config.top_k,
                   top_p=config.top_p, min_p=config.min_p, repetition_penalty=config.repetition_penalty,
                   presence_penalty=config.presence_penalty, seed=config.seed,
                   min_new_tokens=config.min_new_tokens, eos_token_id=config.eos_token_id)

    def process(self, logits: np.ndarray, history_ids: np.ndarray | None = None, prompt_length: int = 0,
                *, seen_counts: np.ndarray | None = None, output_counts: np.ndarray | None = None,
                new_tokens: int | None = None) -> np.ndarray:
        """The processed logits (float32 [B, V]) that `__call__` samples from or argmaxes."""
        out = _as_logits(logits)
        vocab = out.shape[1]
        hist = None if history_ids is None else np.asarray(history_ids, dtype=np.int64).reshape(out.shape[0], -1)
        if self.repetition_penalty != 1.0:
            if seen_counts is None:
                seen_counts = token_counts(_required(hist, "repetition_penalty"), vocab)
            out = apply_repetition_penalty(out, seen_counts, self.repetition_penalty)
        if self.presence_penalty != 0.0:
            if output_counts is None:
                output_counts = token_counts(_required(hist, "presence_penalty")[:, prompt_length:], vocab)
            out = apply_presence_penalty(out, output_counts, self.presence_penalty)
        if self.min_new_tokens > 0:
            if new_tokens is None:
                new_tokens = _required(hist, "min_new_tokens").shape[1] - prompt_length
            out = apply_min_new_tokens(out, self.eos_token_id, new_tokens, self.min_new_tokens)
        if not self.do_sample:
            return out
        return self._warp(out)

    def _warp(self, out: np.ndarray) -> np.ndarray:
        # HF skips a warper when it is a no-op by configuration (T == 1, k == 0, p == 1, min_p None)
        if self.temperature != 1.0:
            out = apply_temperature(out, self.temperature)
        if self.top_k != 0:
            out = apply_top_k(out, self.top_k)
        if self.top_p < 1.0:
            out = apply_top_p(out, self.top_p)
        if self.min_p is not None:
            out = apply_min_p(out, self.min_p)
        return out

    def __call__(self, logits: np.ndarray, history_ids: np.ndarray | None = None, prompt_length: int = 0,
                 **counts: object) -> np.ndarray:
        """Next ids, int64 [B]."""
        processed = self.process(logits, history_ids, prompt_length, **counts)  # type: ignore[arg-type]
        return sample(processed, self.rng, self.share) if self.do_sample else greedy(processed)

    def __repr__(self) -> str:
        return (f"Sampler(do_sample={self.do_sample}, temperature={self.temperature}, top_k={self.top_k}, "
                f"top_p={self.top_p}, min_p={self.min_p}, repetition_penalty={self.repetition_penalty}, "
                f"presence_penalty={self.presence_penalty}, seed={self.seed})")


def _required(history: np.ndarray | None, what: str) -> np.ndarray:
    if history is None:
        raise ValueError(f"{what} needs history_ids (or precomputed counts)")
    return history
