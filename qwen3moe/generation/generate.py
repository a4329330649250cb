"""`generate` / `stream_generate`: the host decode loop over the static-KV-cache engine.

Shapes: B batch, S prompt length (left padded), P bucketed prompt length, V vocab, N new tokens.
Decoding parameters left as None come from the model folder's generation_config.json (HF's
behaviour), else from GenerationConfig's defaults. Sampling runs on the host (Sampler, numpy,
HF-ordered processors); every row stops on any eos id or stop string and is then padded.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwen3moe.generation.config import GenerationConfig
from qwen3moe.generation.engine import DecodeEngine, compile_count, get_engine
from qwen3moe.generation.errors import GenerationError
from qwen3moe.generation.sampling import Sampler
from qwen3moe.generation.streaming import StopStringStream
from qwen3moe.models.inputs import check_token_ids, to_numpy_2d

_OVERRIDABLE = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                "min_p", "repetition_penalty", "presence_penalty", "eos_token_id", "pad_token_id",
                "seed", "stop_strings")


def resolve_config(model: Any, generation_config: GenerationConfig | None = None,
                   ignore_eos: bool = False, **overrides: Any) -> GenerationConfig:
    """Explicit arguments > `generation_config` > the folder's generation_config.json > defaults."""
    base = generation_config
    if base is None:
        src = getattr(model, "source_dir", None)
        if src and Path(src).is_dir() and any((Path(src) / f).is_file()
                                             for f in ("generation_config.json", "config.json")):
            base = GenerationConfig.from_pretrained(src)
        elif isinstance(getattr(model, "generation_config", None), GenerationConfig):
            base = model.generation_config
        else:
            c = model.config
            base = GenerationConfig(eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                                    bos_token_id=c.bos_token_id)
    changes = {k: v for k, v in overrides.items() if k in _OVERRIDABLE and v is not None}
    if ignore_eos:
        changes["ignore_eos"] = True
    return base.replace(**changes)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0          # real (unpadded) prompt tokens over all rows
    new_tokens: list[int] = field(default_factory=list)  # per row, up to and including its stop token
    prefill_s: float = 0.0
    decode_s: float = 0.0           # decode steps plus host sampling
    decode_steps: int = 0
    engine_s: float = 0.0           # time inside the compiled decode steps (decode_s - engine_s = host)
    compiles: int = 0               # graph signatures compiled so far in this process


class GenerationRun:
    """One generate call: `for next_B in run.steps(): ...`, then `run.output()` [B, S + n] int64."""

    def __init__(self, model: Any, input_ids: Any, attention_mask: Any, config: GenerationConfig,
                 tokenizer: Any = None, keep_logits: bool = False) -> None:
        self.config = config
        self.step_logits: list[np.ndarray] | None = [] if keep_logits else None  # raw [B, V] per step
        check_rectangular(input_ids)
        ids = to_numpy_2d(input_ids, "input_ids")
        if ids.shape[1] == 0:
            raise ValueError("input_ids is empty: need at least one token per row")
        check_token_ids(ids, model.config.vocab_size)
        mask = np.ones_like(ids) if attention_mask is None else to_numpy_2d(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if not mask.any(axis=1).all():
            raise ValueError("attention_mask has a row without any real token")
        self.ids, self.mask = ids, (mask > 0).astype(np.int64)
        longest, limit = int(self.mask.sum(1).max()), model.config.max_position_embeddings
        if longest > limit:
            raise GenerationError(f"input_ids: a prompt of {longest} tokens is longer than the model's "
                                  f"max_position_embeddings={limit}; shorten it (positions past it were never trained)")
        self.pad = config.effective_pad_token_id if config.effective_pad_token_id is not None else 0
        self.eos = set() if config.ignore_eos else set(config.eos_token_id)
        self.sampler = Sampler.from_config(config)
        self.stops = None
        if config.stop_strings:
            tok = tokenizer or _load_tokenizer(model)
            self.stops = [StopStringStream(tok, config.stop_strings) for _ in range(ids.shape[0])]
        self.engine, self.P = get_engine(model, ids.shape[0], ids.shape[1], config.max_new_tokens)
        self.history = ids
        self.finished = np.zeros(ids.shape[0], bool)
        self.stats = GenerationStats(prompt_tokens=int(self.mask.sum()), new_tokens=[0] * ids.shape[0])

    def _prefill(self) -> np.ndarray:
        B, S = self.ids.shape
        lead = self.P - S  # bucket padding on the left: masked, positions unchanged
        ids = np.concatenate([np.full((B, lead), self.pad, np.int64), self.ids], 1)
        mask = np.concatenate([np.zeros((B, lead), np.int64), self.mask], 1)
        t0 = time.perf_counter()
        logits = self.engine.prefill(ids, mask)
        self.stats.prefill_s = time.perf_counter() - t0
        return logits

    def steps(self) -> Iterator[np.ndarray]:
        """Yields each step's tokens [B] (finished rows already replaced by the pad id)."""
        logits_BV = self._prefill()
        S, n_max = self.ids.shape[1], self.config.max_new_tokens
        t0 = time.perf_counter()
        for step in range(n_max):
            check_finite(logits_BV, step)
            if self.step_logits is not None:
                self.step_logits.append(logits_BV)
            nxt = self.sampler(logits_BV, self.history, prompt_length=S)
            nxt = np.where(self.finished, self.pad, nxt).astype(np.int64)
            self.history = np.concatenate([self.history, nxt[:, None]], 1)
            self._update_finished(nxt)
            yield nxt
            if self.finished.all() or step == n_max - 1:
                break
            t1 = time.perf_counter()
            logits_BV = self.engine.decode(nxt)
            self.stats.engine_s += time.perf_counter() - t1
            self.stats.decode_steps += 1
        self.stats.decode_s = time.perf_counter() - t0
        self.stats.compiles = compile_count()

    def _update_finished(self, nxt_B: np.ndarray) -> None:
        for b, tok in enumerate(nxt_B.tolist()):
            if self.finished[b]:
                continue
            self.stats.new_tokens[b] += 1
            if tok in self.eos:
                self.finished[b] = True
            elif self.stops is not None:
                self.stops[b].push(tok)
                self.finished[b] = self.stops[b].stopped

    def run(self) -> np.ndarray:
        for _ in self.steps():
            pass
        return self.output()

    def output(self) -> np.ndarray:
        return self.history.astype(np.int64)


def check_finite(logits_BV: np.ndarray, step: int) -> None:
    """NaN/Inf logits (NaN weights, a broken config) would be argmax-ed to token 0 and decoded as
    garbage: stop instead. One max per row on the host, where the logits already are for sampling
    (no extra device sync; ~35 us for a 152k vocabulary): it is NaN when any logit of the row is,
    +Inf for an infinite one, -Inf when the whole row is -Inf (a partly -Inf row is a valid mask)."""
    bad = ~np.isfinite(logits_BV.max(axis=1))
    if not bad.any():
        return
    rows = np.flatnonzero(bad).tolist()
    raise GenerationError(f"generation step {step}: the model produced non-finite logits (NaN or Inf) for batch "
                          f"row {rows[0]}" + (f" and {len(rows) - 1} more" if len(rows) > 1 else "")
                          + "; its weights or config are broken (NaN/Inf weights, rms_norm_eps <= 0)")


def check_rectangular(input_ids: Any) -> None:
    """Rows of different lengths (a list of lists): say how to batch them."""
    if not isinstance(input_ids, (list, tuple)) or not all(isinstance(r, (list, tuple, np.ndarray)) for r in input_ids):
        return
    lengths = [len(r) for r in input_ids]
    other = next((n for n in lengths if n != lengths[0]), None)
    if other is not None:
        raise GenerationError(f"input_ids rows have different lengths {lengths[0]} and {other}: pad every row on the "
                              "left to one length with the pad token id and pass attention_mask (0 on the padding)")


def _load_tokenizer(model: Any) -> Any:
    from qwen3moe.io.tokenizer import Tokenizer

    src = getattr(model, "source_dir", None)
    if not src:
        raise ValueError("stop_strings need a tokenizer: pass tokenizer= (the model has no source folder)")
    return Tokenizer.from_pretrained(src)


def generate(model: Any, input_ids: Any, attention_mask: Any = None, max_new_tokens: int | None = None,
             min_new_tokens: int | None = None, do_sample: bool | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None,
             presence_penalty: float | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, ignore_eos: bool = False, seed: int | None = None,
             stop_strings: str | list[str] | None = None, tokenizer: Any = None,
             generation_config: GenerationConfig | None = None) -> np.ndarray:
    """Prompt + new tokens, numpy int64 [B, S + n] (n <= max_new_tokens; finished rows padded)."""
    cfg = resolve_config(model, generation_config, ignore_eos, max_new_tokens=max_new_tokens,
                         min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature,
                         top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                         presence_penalty=presence_penalty, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, seed=seed, stop_strings=stop_strings)
    return GenerationRun(model, input_ids, attention_mask, cfg, tokenizer).run()


def stream_generate(model: Any, input_ids: Any, attention_mask: Any = None, tokenizer: Any = None,
                    skip_special_tokens: bool = True, **kwargs: Any) -> Iterator[str]:
    """Yield the new text of a single prompt piece by piece (never half a UTF-8 character).

    Takes generate's keyword arguments. The text ends before a stop string (vLLM style); the
    concatenation equals decoding the generated ids (cut before the stop string).
    """
    gen_cfg = kwargs.pop("generation_config", None)
    ignore_eos = bool(kwargs.pop("ignore_eos", False))
    cfg = resolve_config(model, gen_cfg, ignore_eos, **kwargs)
    tok = tokenizer or _load_tokenizer(model)
    run = GenerationRun(model, input_ids, attention_mask, cfg, tok)
    if run.ids.shape[0] != 1:
        raise ValueError(f"stream_generate takes one prompt, got a batch of {run.ids.shape[0]}")
    stream = StopStringStream(tok, cfg.stop_strings, skip_special_tokens=skip_special_tokens)
    for nxt_B in run.steps():
        if not stream.stopped:
            piece = stream.push(int(nxt_B[0]))
            if piece:
                yield piece
    tail = stream.flush()
    if tail:
        yield tail


__all__ = ["generate", "stream_generate", "resolve_config", "GenerationRun", "GenerationStats",
           "DecodeEngine", "compile_count"]
