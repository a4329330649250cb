"""Reference RoPE tables from transformers 5.24 for every scaling type (needs the `reference` extra).

    .venv-ref/bin/python tools/make_rope_fixtures.py   # writes tests/fixtures/rope/rope_ref.npz + .json
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Qwen3MoeConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "rope"
CASES = {
    "default": {"rope_type": "default", "rope_theta": 1e6},
    "linear": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.5},
    "dynamic_short": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0, "seq_len": 100},
    "dynamic_long": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0, "seq_len": 1000},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0, "original_max_position_embeddings": 128,
                    "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
    "yarn_notrunc": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64,
                     "truncate": False},
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    arrays, meta = {}, {"transformers": transformers.__version__, "torch": torch.__version__, "cases": {}}
    for name, params in CASES.items():
        params = dict(params)
        seq_len = params.pop("seq_len", None)
        cfg = Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, head_dim=32, max_position_embeddings=256,
                             rope_parameters=params)
        if params["rope_type"] == "default":
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

            inv, scale = Qwen3MoeRotaryEmbedding.compute_default_rope_parameters(cfg)
        else:
            inv, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", seq_len=seq_len)
        arrays[f"{name}.inv_freq"] = inv.numpy().astype(np.float32)
        arrays[f"{name}.attention_scaling"] = np.float64(scale)
        meta["cases"][name] = {"rope_parameters": params, "seq_len": seq_len, "head_dim": 32,
                               "max_position_embeddings": 256}
    np.savez(OUT / "rope_ref.npz", **arrays)
    (OUT / "rope_ref.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
