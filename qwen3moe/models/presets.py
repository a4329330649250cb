"""Named configs: the released Qwen3-MoE models (values from their config.json) and test sizes."""
from __future__ import annotations

from typing import Any

_COMMON = dict(
    vocab_size=151936, hidden_act="silu", rms_norm_eps=1e-6, initializer_range=0.02,
    num_key_value_heads=4, head_dim=128, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], tie_word_embeddings=False, router_aux_loss_coef=0.001,
    attention_bias=False, use_sliding_window=False, sliding_window=None,
    bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16",
)

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": dict(
        _COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, max_position_embeddings=40960, max_window_layers=48,
        rope_theta=1e6),
    "qwen3-235b-a22b": dict(
        _COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=94,
        num_attention_heads=64, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=1536, max_position_embeddings=40960, max_window_layers=94,
        rope_theta=1e6),
    # tiny: a 4-layer model for tests and the CPU demo
    "tiny": dict(
        _COMMON, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=1024,
        max_window_layers=4, rope_theta=1e6, bos_token_id=1021, eos_token_id=1023,
        torch_dtype="float32"),
}
# 2507 releases: same shapes, 256K native context and a larger rope_theta
PRESETS["qwen3-30b-a3b-instruct-2507"] = dict(
    PRESETS["qwen3-30b-a3b"], max_position_embeddings=262144, rope_theta=1e7)
PRESETS["qwen3-30b-a3b-thinking-2507"] = dict(PRESETS["qwen3-30b-a3b-instruct-2507"])
PRESETS["qwen3-235b-a22b-instruct-2507"] = dict(
    PRESETS["qwen3-235b-a22b"], max_position_embeddings=262144, rope_theta=5e6)
PRESETS["qwen3-235b-a22b-thinking-2507"] = dict(PRESETS["qwen3-235b-a22b-instruct-2507"])
PRESETS["qwen3-30b-a3b-2507"] = PRESETS["qwen3-30b-a3b-instruct-2507"]
PRESETS["qwen3-235b-a22b-2507"] = PRESETS["qwen3-235b-a22b-instruct-2507"]


def preset_dict(name: str) -> dict[str, Any]:
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[key])
