"""RoPE scaling types vs transformers 5.24 (tests/fixtures/rope, tools/make_rope_fixtures.py).

inv_freq in fp32: 1 ulp (~1e-7 relative) between numpy's and torch's float32 pow; attention
scaling is a float64 scalar computed the same way: 1e-12.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import FIXTURES
from qwen3moe.layers.rope import rope_parameters
from qwen3moe.models.config import Qwen3MoeConfig

META = json.loads((FIXTURES / "rope" / "rope_ref.json").read_text())
REF = np.load(FIXTURES / "rope" / "rope_ref.npz")


@pytest.mark.parametrize("name", sorted(META["cases"]))
def test_rope_tables_match_transformers(name):
    case = META["cases"][name]
    params = dict(case["rope_parameters"])
    cfg = Qwen3MoeConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "head_dim": case["head_dim"],
                                    "max_position_embeddings": case["max_position_embeddings"],
                                    "rope_parameters": params})
    inv, scale = rope_parameters(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings,
                                 case["seq_len"])
    np.testing.assert_allclose(inv, REF[f"{name}.inv_freq"], rtol=3e-7, atol=0)
    assert abs(scale - float(REF[f"{name}.attention_scaling"])) < 1e-12
