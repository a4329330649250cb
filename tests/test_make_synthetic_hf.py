"""tools/make_synthetic_hf.py: a tiny-geometry 1-layer folder in the hub's layout is readable by the
safetensors library (an independent reader) and by our loader, and its index is consistent."""
from __future__ import annotations

import json
import time
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import make_synthetic_hf as syn  # noqa: E402

TINY = ["hidden_size=64", "num_experts=4", "num_experts_per_tok=2", "moe_intermediate_size=32",
        "num_attention_heads=4", "num_key_value_heads=2", "head_dim=16", "vocab_size=512"]


def _make(tmp_path, dtype: str) -> Path:
    out = tmp_path / f"syn-{dtype}"
    args = ["--preset", "qwen3-30b-a3b", "--layers", "1", "--dtype", dtype, "--out", str(out),
            "--shard_size", "150000"]
    syn.main(args + [a for kv in TINY for a in ("--set", kv)])
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_folder_layout_and_index(tmp_path, dtype):
    out = _make(tmp_path, dtype)
    cfg = json.loads((out / "config.json").read_text())
    # the published config.json keys, only geometry overridden
    assert set(cfg) == set(syn.CONFIGS["qwen3-30b-a3b"])
    assert cfg["num_hidden_layers"] == 1 and cfg["torch_dtype"] == dtype
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 2 and shards == sorted(set(index["weight_map"].values()))
    assert all(s.startswith("model-") and s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    seen, total = {}, 0
    tag = {"bfloat16": "BF16", "float32": "F32"}[dtype]
    for s in shards:
        with safe_open(str(out / s), framework="numpy") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                assert sl.get_dtype() == tag
                seen[k] = s
                total += int(np.prod(sl.get_shape())) * (2 if dtype == "bfloat16" else 4)
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    names = set(seen)
    for j in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.0.mlp.experts.{j}.{proj}.weight" in names
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.mlp.gate.weight", "model.layers.0.self_attn.q_norm.weight"} <= names
    assert len(names) == 1 + 8 + 1 + 4 * 3 + 2  # embed, attn+norms, router, experts, norm, head
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_values_read_by_safetensors_and_our_loader(tmp_path):
    from qwen3moe.io.hf_checkpoint import CheckpointSource
    from qwen3moe.models.qwen3_moe import Qwen3MoeForCausalLM

    out = _make(tmp_path, "float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]

    def ref(name):
        with safe_open(str(out / index[name]), framework="numpy") as f:
            return f.get_tensor(name)

    w = ref("model.layers.0.mlp.experts.3.down_proj.weight")
    assert w.shape == (64, 32)
    # real-ish weights: N(0, 0.02), not constant or periodic within the tensor
    assert abs(float(w.std()) - 0.02) < 0.004 and abs(float(w.mean())) < 0.004
    assert len(np.unique(w)) == w.size
    norm = ref("model.layers.0.input_layernorm.weight")
    assert abs(float(norm.mean()) - 1.0) < 0.01
    src = CheckpointSource(str(out))
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.experts.3.down_proj.weight"):
        np.testing.assert_array_equal(src.read(name), ref(name))
    model = Qwen3MoeForCausalLM.from_pretrained(str(out))
    params = {p.name: p.asnumpy() for p in model.get_parameters()}
    np.testing.assert_array_equal(params["lm_head.weight"], ref("lm_head.weight"))
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 64


def test_bf16_values_match_the_float32_draw(tmp_path):
    """Same seed: the bf16 folder holds the float32 folder's values rounded to bf16."""
    from qwen3moe.io.hf_checkpoint import CheckpointSource

    a, b = CheckpointSource(str(_make(tmp_path, "float32"))), CheckpointSource(str(_make(tmp_path, "bfloat16")))
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_allclose(b.read(name), a.read(name), rtol=2 ** -8, atol=0)


def test_bad_override_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="--set 'nope=1'"):
        syn.main(["--preset", "qwen3-30b-a3b", "--out", str(tmp_path / "x"), "--set", "nope=1"])
    assert not (tmp_path / "x").exists()


def test_stream_mode_feeds_the_quantizer_shard_by_shard(tmp_path):
    """--stream writes the same bytes; bench/big.py's StreamedSource quantizes a folder while it
    is written (max_ahead 1: at most one complete shard waits), deletes every bf16 shard once
    read, and gives the same GPTQ folder as quantizing the finished folder."""
    import filecmp
    import threading
    from types import SimpleNamespace

    from qwen3moe.io.gptq import quantize_folder
    from qwen3moe.layers.quant import QuantizationConfig

    sys.path.insert(0, str(REPO / "bench"))
    from big import StreamedSource

    whole = _make(tmp_path, "bfloat16")
    shards = sorted(p.name for p in whole.glob("model-*.safetensors"))
    args = ["--preset", "qwen3-30b-a3b", "--layers", "1", "--dtype", "bfloat16", "--shard_size", "150000",
            *[a for kv in TINY for a in ("--set", kv)]]
    syn.main(args + ["--out", str(tmp_path / "s0"), "--stream"])
    for f in [*shards, "model.safetensors.index.json", "config.json"]:
        assert filecmp.cmp(whole / f, tmp_path / "s0" / f, shallow=False), f
    qc = QuantizationConfig(4, 32)
    quantize_folder(str(whole), str(tmp_path / "q-whole"), qc)
    out = tmp_path / "s1"
    writer = threading.Thread(target=syn.main, args=(args + ["--out", str(out), "--stream", "--max_ahead", "1"],))
    writer.start()
    producer = SimpleNamespace(poll=lambda: None if writer.is_alive() else 0)  # a Popen's poll()
    while not any(out.glob(".model-*.partial")) and not any(out.glob("model-*.safetensors")):
        assert writer.is_alive()
        time.sleep(0.05)
    quantize_folder(str(out), str(tmp_path / "q-stream"), qc, source=StreamedSource(str(out), producer))
    writer.join(timeout=60)
    assert not list(out.glob("model-*.safetensors")) and not list(out.glob(".*partial"))
    for f in sorted(p.name for p in (tmp_path / "q-whole").iterdir()):
        assert filecmp.cmp(tmp_path / "q-whole" / f, tmp_path / "q-stream" / f, shallow=False), f
