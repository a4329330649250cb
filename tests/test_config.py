"""Qwen3MoeConfig: HF key variants, presets, exact parameter counts, clear errors."""
from __future__ import annotations

import json

import pytest

from qwen3moe.models.config import ConfigError, Qwen3MoeConfig
from qwen3moe.models.presets import PRESETS


def test_30b_parameter_counts_exact():
    c = Qwen3MoeConfig.from_preset("qwen3-30b-a3b")
    assert c.num_parameters() == 30_532_122_624
    assert c.num_parameters(active=True) == 3_353_032_704


def test_235b_shape_and_count_is_plausible():
    c = Qwen3MoeConfig.from_preset("qwen3-235b-a22b")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.moe_intermediate_size) == (94, 4096, 64, 4, 1536)
    assert 234e9 < c.num_parameters() < 236e9 and 21e9 < c.num_parameters(active=True) < 23e9


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    c = Qwen3MoeConfig.from_preset(name)
    assert Qwen3MoeConfig.from_dict(c.to_dict()) == c


def test_key_variants_are_equivalent():
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                num_hidden_layers=2, vocab_size=100, moe_intermediate_size=8, num_experts_per_tok=2)
    legacy = Qwen3MoeConfig.from_dict({**base, "num_experts": 8, "rope_theta": 5e5, "torch_dtype": "bfloat16",
                                       "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 64}})
    v5 = Qwen3MoeConfig.from_dict({**base, "num_local_experts": 8, "dtype": "bfloat16",
                                   "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                                       "original_max_position_embeddings": 64}})
    assert legacy == v5
    assert v5.rope_type == "yarn" and v5.num_experts == 8 and v5.torch_dtype == "bfloat16"


def test_head_dim_is_read_not_derived():
    c = Qwen3MoeConfig.from_dict(dict(hidden_size=64, num_attention_heads=4, head_dim=16))
    assert c.head_dim == 16
    assert Qwen3MoeConfig.from_dict(dict(hidden_size=64, num_attention_heads=4)).head_dim == 16


def test_sparse_layer_rule():
    c = Qwen3MoeConfig.from_dict(dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert [c.is_sparse_layer(i) for i in range(6)] == [False, True, False, False, False, True]


def test_unknown_keys_survive_round_trip(tmp_path):
    d = Qwen3MoeConfig.from_preset("tiny").to_dict()
    d["some_future_field"] = {"x": 1}
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = Qwen3MoeConfig.from_pretrained(tmp_path)
    assert c.to_dict()["some_future_field"] == {"x": 1}


@pytest.mark.parametrize("change, words", [
    ({"num_attention_heads": 5}, "num_key_value_heads"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type"),
    ({"torch_dtype": "int8"}, "torch_dtype"),
    ({"mlp_only_layers": [7]}, "mlp_only_layers"),
])
def test_bad_config_one_line_error(tmp_path, change, words):
    d = {**Qwen3MoeConfig.from_preset("tiny").to_dict(), **change}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as exc:
        Qwen3MoeConfig.from_pretrained(tmp_path)
    msg = str(exc.value)
    assert words in msg and "config.json" in msg and "\n" not in msg


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Qwen3MoeConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="invalid JSON"):
        Qwen3MoeConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="qwen3_moe"):
        Qwen3MoeConfig.from_pretrained(tmp_path)
