"""Qwen3MoeConfig: HF transformers `qwen3_moe` config as a typed dataclass.

Field names are the HF ones. `from_dict` accepts every key variant found in released and
transformers-4/5 written config.json files; `to_dict` writes JSON that transformers loads.
Unknown keys are kept in `extra` and written back, so a round trip loses nothing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from qwen3moe.errors import Qwen3MoeError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(Qwen3MoeError, ValueError):
    """A config.json / preset problem: one line naming the key and what was expected."""


@dataclass
class Qwen3MoeConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    attention_dropout: float = 0.0
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    num_experts: int = 128
    norm_topk_prob: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    mlp_only_layers: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # not an HF field: expert capacity factor with token dropping; None = dropless like HF
    moe_capacity_factor: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(self)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "Qwen3MoeConfig":
        d = dict(d)
        if "num_local_experts" in d:
            d.setdefault("num_experts", d.pop("num_local_experts"))
        if "dtype" in d:
            d.setdefault("torch_dtype", d.pop("dtype"))
        rope_params = d.pop("rope_parameters", None)
        if rope_params:
            rope_params = dict(rope_params)
            if "rope_theta" in rope_params:
                d["rope_theta"] = rope_params.pop("rope_theta")
            rtype = rope_params.get("rope_type", rope_params.get("type", "default"))
            if rtype != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = rope_params
        if d.get("torch_dtype") is None:
            d["torch_dtype"] = "float32"
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        extra.update(d.get("extra", {}) if isinstance(d.get("extra"), dict) else {})
        for k in ("extra", "architectures", "model_type"):  # always written by to_dict
            extra.pop(k, None)
        try:
            return cls(**known, extra=extra)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Qwen3MoeConfig":
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ConfigError(f"{file}: not found (expected a Hugging Face model folder with config.json)")
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{file}: not UTF-8 text") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a JSON object, found {type(data).__name__}")
        model_type = data.get("model_type", "qwen3_moe")
        if model_type not in ("qwen3_moe",):
            raise ConfigError(f"{file}: model_type is {model_type!r}, expected 'qwen3_moe'")
        return cls.from_dict(data, source=file)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "Qwen3MoeConfig":
        from qwen3moe.models.presets import preset_dict

        return cls.from_dict({**preset_dict(name), **overrides}, source=f"preset {name!r}")

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if d["moe_capacity_factor"] is None:  # keep HF config.json clean unless dropping is on
            del d["moe_capacity_factor"]
        out: dict[str, Any] = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}
        out.update({k: v for k, v in self.extra.items() if k not in d})
        out.update(d)
        out["architectures"] = ["Qwen3MoeForCausalLM"]
        out["model_type"] = "qwen3_moe"
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from qwen3moe.io.atomic import atomic_write_text

        atomic_write_text(os.path.join(directory, "config.json"), self.to_json())

    # ---- derived quantities -------------------------------------------------------------
    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    def is_sparse_layer(self, i: int) -> bool:
        """HF rule: MoE iff not in mlp_only_layers, experts exist and (i+1) % step == 0."""
        return (
            i not in self.mlp_only_layers
            and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0
        )

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count from the config alone (no weights). `active` counts k of E experts."""
        H, D = self.hidden_size, self.head_dim
        attn = H * D * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + 2 * D
        if self.attention_bias:
            attn += D * (self.num_attention_heads + 2 * self.num_key_value_heads) + H
        total = 0
        for i in range(self.num_hidden_layers):
            total += attn + 2 * H
            if self.is_sparse_layer(i):
                n_exp = self.num_experts_per_tok if active else self.num_experts
                total += self.num_experts * H + n_exp * 3 * H * self.moe_intermediate_size
            else:
                total += 3 * H * self.intermediate_size
        emb = self.vocab_size * H
        return total + H + (emb if self.tie_word_embeddings else 2 * emb)

    def validate(self) -> None:
        _check_types(self)
        if self.num_experts and not _is_int(self.moe_intermediate_size, 1):
            raise ConfigError(f"moe_intermediate_size must be a positive integer when num_experts > 0, "
                              f"got {self.moe_intermediate_size!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_experts < 0 or (self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts):
            raise ConfigError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                f"got {self.num_experts_per_tok}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act must be 'silu' (Qwen3-MoE), got {self.hidden_act!r}")
        if self.use_sliding_window:
            raise ConfigError("use_sliding_window: true is not supported (no released Qwen3-MoE uses it)")
        if self.moe_capacity_factor is not None and not (_is_number(self.moe_capacity_factor)
                                                         and self.moe_capacity_factor > 0):
            raise ConfigError(f"moe_capacity_factor must be > 0 or null, got {self.moe_capacity_factor!r}")
        if str(self.torch_dtype) not in _DTYPES:
            raise ConfigError(f"torch_dtype must be one of {_DTYPES}, got {self.torch_dtype!r}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"mlp_only_layers has layer indices outside [0, {self.num_hidden_layers}): {bad}")

    def replace(self, **changes: Any) -> "Qwen3MoeConfig":
        return dataclasses.replace(self, **changes)


# per-field value rules (type and range); a failing field is named in a one-line ConfigError
_POSITIVE_INT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "decoder_sparse_step")
_NONNEG_INT = ("moe_intermediate_size", "num_experts", "num_experts_per_tok", "max_window_layers")
_BOOL = ("use_cache", "tie_word_embeddings", "attention_bias", "use_sliding_window", "norm_topk_prob",
         "output_router_logits")
# name -> (lower bound, lower bound allowed, upper bound or None)
_FLOAT = {"rms_norm_eps": (0.0, False, None), "rope_theta": (0.0, False, None),
          "initializer_range": (0.0, True, None), "attention_dropout": (0.0, True, 1.0),
          "router_aux_loss_coef": (0.0, True, None)}


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_types(c: "Qwen3MoeConfig") -> None:
    """Every numeric/bool field has the right type and range (JSON gives strings, floats, bools
    where ints belong; rms_norm_eps <= 0 would turn every norm into NaN)."""
    for name in _POSITIVE_INT + (("head_dim",) if c.head_dim is not None else ()):
        if not _is_int(getattr(c, name), 1):
            raise ConfigError(f"{name} must be a positive integer, got {getattr(c, name)!r}")
    for name in _NONNEG_INT:
        if not _is_int(getattr(c, name), 0):
            raise ConfigError(f"{name} must be an integer >= 0, got {getattr(c, name)!r}")
    for name in _BOOL:
        if not isinstance(getattr(c, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(c, name)!r}")
    for name, (low, closed, high) in _FLOAT.items():
        v = getattr(c, name)
        if not _is_number(v) or v < low or (v == low and not closed) or (high is not None and v > high):
            want = f"{'>=' if closed else '>'} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise ConfigError(f"{name} must be a finite number {want}, got {v!r}")
    if c.sliding_window is not None and not _is_int(c.sliding_window, 1):
        raise ConfigError(f"sliding_window must be a positive integer or null, got {c.sliding_window!r}")
    for name in ("bos_token_id", "pad_token_id"):
        if getattr(c, name) is not None and not _is_int(getattr(c, name), 0):
            raise ConfigError(f"{name} must be a token id (integer >= 0) or null, got {getattr(c, name)!r}")
    eos = c.eos_token_id
    if eos is not None and not (_is_int(eos, 0) or isinstance(eos, list) and all(_is_int(e, 0) for e in eos)):
        raise ConfigError(f"eos_token_id must be a token id, a list of token ids or null, got {eos!r}")
    if c.mlp_only_layers is not None and not (isinstance(c.mlp_only_layers, (list, tuple)) and all(_is_int(i, 0) for i in c.mlp_only_layers)):
        raise ConfigError(f"mlp_only_layers must be a list of layer indices, got {c.mlp_only_layers!r}")
    if c.rope_scaling is not None and not isinstance(c.rope_scaling, dict):
        raise ConfigError(f"rope_scaling must be an object or null, got {c.rope_scaling!r}")
    if not isinstance(c.hidden_act, str):
        raise ConfigError(f"hidden_act must be a string, got {c.hidden_act!r}")


def _normalise_rope_scaling(rs: dict | None) -> dict | None:
    """Accept `type` or `rope_type`; drop the default type; check required fields."""
    if not rs:
        return None
    rs = dict(rs)
    rtype = rs.pop("type", None) or rs.get("rope_type") or "default"
    rs.pop("rope_theta", None)
    if rtype not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling.rope_type must be one of {ROPE_TYPES}, got {rtype!r}")
    if rtype == "default":
        return None
    rs["rope_type"] = rtype
    factor = rs.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1.0 and rtype != "linear" or factor <= 0:
        raise ConfigError(f"rope_scaling.factor must be a number >= 1 for {rtype!r}, got {factor!r}")
    return rs
