"""GenerationConfig: decoding parameters, loadable from a model folder's generation_config.json.

Defaults are transformers 5.x's global generation defaults where HF has one (do_sample False,
temperature 1.0, top_k 50, top_p 1.0, min_p None, repetition_penalty 1.0): a folder whose
generation_config.json omits top_k samples with top_k=50 under HF, and so here.  Set top_k=0 to
disable it.  `max_new_tokens` defaults to 32 (HF's is max_length=20 in total; we only count new
tokens).  Qwen3 chat checkpoints ship do_sample true, temperature 0.6, top_p 0.95, top_k 20,
eos [151645, 151643], pad 151643.

Non-HF fields: `presence_penalty` (vLLM/OpenAI semantics), `ignore_eos` (generate all
`max_new_tokens`, vLLM's flag) and `seed` (the Sampler's numpy Generator seed).
`prefill_chunk_size` (HF's name): prompts longer than it are prefilled in chunks of at most that
many tokens (engine.py), bounding the prefill's memory; 0 / None never chunks.
`kv_cache_dtype`: the KV cache's storage, "float32" (HF's fp32 results) or "bfloat16" / "float16"
(half the cache memory and the bytes each decode step reads; keys and values are rounded to nearest
even when written, the math stays float32; the fused kernels only, engine.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3moe.io.jsonfile import read_json_object

GENERATION_CONFIG_NAME = "generation_config.json"
PROMPT_BUCKET = 16  # the engine pads prompts to a multiple of it (fewer prefill graphs); chunks are whole buckets


def _id_list(value: Any, name: str) -> list[int]:
    """eos_token_id is an int or a list of ints in HF files; always a list here."""
    if value is None:
        return []
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in items):
        raise ValueError(f"{name} must be a non-negative int or a list of them, got {value!r}")
    return [int(i) for i in items]


def check_prefill_chunk_size(value: Any) -> None:
    """prefill_chunk_size: a multiple of PROMPT_BUCKET, or 0 / None (never chunk the prefill)."""
    if value is None or (_is_int(value) and value == 0):
        return
    if not (_is_int(value) and value > 0 and value % PROMPT_BUCKET == 0):
        raise ValueError(f"prefill_chunk_size must be a positive multiple of {PROMPT_BUCKET} "
                         f"(or 0 / None: no chunking), got {value!r}")


KV_CACHE_DTYPES = ("float32", "bfloat16", "float16")


def check_kv_cache_dtype(value: Any) -> None:
    """kv_cache_dtype: one of KV_CACHE_DTYPES."""
    if value not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class GenerationConfig:
    """Decoding parameters; `validate()` runs on construction and raises one-line ValueErrors."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    ignore_eos: bool = False
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    prefill_chunk_size: int | None = 1024  # bench/RESULTS.md "Chunked prefill on long prompts"
    kv_cache_dtype: str = "float32"
    # batch 1: a prompt that starts with tokens the model's decode cache already holds (the previous
    # call's prompt and reply: a chat, a document asked again) runs only from where they differ
    prompt_cache: bool = True

    def __post_init__(self) -> None:
        self.eos_token_id = _id_list(self.eos_token_id, "eos_token_id")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        self.stop_strings = list(self.stop_strings or [])
        if self.top_k is None:  # HF files may carry null for "unset": that is "disabled" here
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (one line) on a value HF would reject or that cannot mean anything."""
        self._validate_lengths()
        self._validate_sampling()
        for name in ("pad_token_id", "bos_token_id", "seed"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        for name in ("do_sample", "ignore_eos", "prompt_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def _validate_lengths(self) -> None:
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens > 0):
            raise ValueError(f"max_new_tokens must be an int > 0, got {self.max_new_tokens!r}")
        if not (_is_int(self.min_new_tokens) and self.min_new_tokens >= 0):
            raise ValueError(f"min_new_tokens must be an int >= 0, got {self.min_new_tokens!r}")
        check_prefill_chunk_size(self.prefill_chunk_size)
        check_kv_cache_dtype(self.kv_cache_dtype)

    def _validate_sampling(self) -> None:
        if not _is_number(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.do_sample and self.temperature <= 0:
            # greedy ignores temperature (some configs carry 0.0 with do_sample false), sampling divides by it
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {self.temperature}; "
                             "use do_sample=False for greedy decoding")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not (_is_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not (_is_number(self.min_p) and 0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1] or None, got {self.min_p!r}")
        if not (_is_number(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty!r}")
        if not (_is_number(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0):
            raise ValueError(f"presence_penalty must be in [-2, 2] (vLLM/OpenAI range), got {self.presence_penalty!r}")

    @property
    def effective_pad_token_id(self) -> int | None:
        """HF open-end generation: with no pad id, finished rows are padded with the first eos id."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id[0] if self.eos_token_id else None

    # ------------------------------------------------------------- (de)serialise
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> GenerationConfig:
        """Build from a dict (e.g. generation_config.json); unknown keys (transformers_version,
        max_length, ...) are ignored, and keys set to null keep the default. `overrides` win."""
        names = set(cls.field_names())
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown GenerationConfig field(s): {', '.join(sorted(unknown))}")
        kwargs = {k: v for k, v in data.items() if k in names and v is not None}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (lists copied)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> GenerationConfig:
        """A validated copy with `changes` applied (None values are ignored: "keep")."""
        return self.from_dict(self.to_dict(), **changes)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> GenerationConfig:
        """Read `path/generation_config.json`; without it, eos/bos/pad ids come from config.json.

        A missing folder, or one with neither file, is a one-line ValueError naming the folder.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a folder (expected a model folder with generation_config.json)")
        gen_file, model_file = folder / GENERATION_CONFIG_NAME, folder / "config.json"
        if gen_file.is_file():
            data = _read_json(gen_file)
        elif model_file.is_file():  # HF GenerationConfig.from_model_config: only the special ids
            model = _read_json(model_file)
            data = {k: model.get(k) for k in ("eos_token_id", "bos_token_id", "pad_token_id")}
        else:
            raise ValueError(f"{folder}: neither {GENERATION_CONFIG_NAME} nor config.json found")
        try:
            return cls.from_dict(data, **overrides)
        except ValueError as exc:
            raise ValueError(f"{gen_file if gen_file.is_file() else model_file}: {exc}") from None

    def save_pretrained(self, path: str | Path) -> Path:
        """Write generation_config.json (HF-readable keys; ours are ignored by transformers)."""
        from qwen3moe.io.atomic import atomic_write_text

        out = Path(path) / GENERATION_CONFIG_NAME
        atomic_write_text(out, json.dumps(self.to_dict(), indent=2) + "\n")
        return out


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, ValueError)
