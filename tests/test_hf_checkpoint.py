"""HF folder load/save: round trips, layouts, dtypes, sharding and one-line errors."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
from qwen3moe.io.safetensors_io import (CheckpointError, SafetensorsFile, bf16_to_f32, f32_to_bf16,
                                        write_safetensors)
from qwen3moe.layers.dtypes import set_init_seed


def tiny(**kw) -> Qwen3MoeForCausalLM:
    set_init_seed(kw.pop("seed", 0))
    cfg = Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=2, vocab_size=128, **kw)
    return Qwen3MoeForCausalLM(cfg)


def params(model) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy() for p in model.get_parameters()}


def test_save_load_round_trip_bit_exact_fp32(tmp_path):
    m = tiny(mlp_only_layers=[0])
    m.save_pretrained(tmp_path / "out", dtype="float32")
    files = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "generation_config.json", "model.safetensors"} <= files
    back = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "out")
    a, b = params(m), params(back)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_saved_names_are_per_expert_hf_layout(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path / "out")
    keys = SafetensorsFile(str(tmp_path / "out" / "model.safetensors")).keys()
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in keys
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)
    gu = m.model.layers[0].mlp.experts.gate_up_proj.asnumpy()
    sf = SafetensorsFile(str(tmp_path / "out" / "model.safetensors"))
    np.testing.assert_array_equal(sf.read("model.layers.0.mlp.experts.3.up_proj.weight"), gu[3, 32:])


def test_fused_layout_loads(tmp_path):
    m = tiny()
    out = tmp_path / "fused"
    out.mkdir()
    m.config.save_pretrained(out)
    write_safetensors(str(out / "model.safetensors"),
                      [(p.name, p.asnumpy(), "F32") for p in m.get_parameters()])
    back = Qwen3MoeForCausalLM.from_pretrained(out)
    for k, v in params(m).items():
        np.testing.assert_array_equal(v, params(back)[k])


def test_sharded_bf16_tied(tmp_path):
    m = tiny(tie_word_embeddings=True)
    m.save_pretrained(tmp_path / "out", dtype="bfloat16", max_shard_size="100KB")
    idx = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(idx["weight_map"].values())
    assert len(shards) > 1 and "lm_head.weight" not in idx["weight_map"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "out", dtype="float32")
    for k, v in params(m).items():
        np.testing.assert_array_equal(bf16_to_f32(f32_to_bf16(v)), params(back)[k], err_msg=k)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert len(back.trainable_params()) == len(m.trainable_params())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=16))
@example([3.39617752923046e+38])
@example([-3.39617752923046e+38])
def test_bf16_rounding_is_nearest_even(xs):
    x = np.array(xs, np.float32)
    y = bf16_to_f32(f32_to_bf16(x))
    # exact reference: pick the closer of the two bf16 neighbours, ties to even mantissa
    u = x.view(np.uint32)
    lo = (u & 0xFFFF0000).view(np.float32)
    hi = ((u & 0xFFFF0000) + 0x10000).astype(np.uint32).view(np.float32)
    # the step past the largest finite bf16 is 2**128 (sign of x): rounding there gives +-inf
    hi64 = np.where(np.isinf(hi), np.copysign(2.0 ** 128, x.astype(np.float64)), hi.astype(np.float64))
    with np.errstate(invalid="ignore"):
        d_lo, d_hi = np.abs(x.astype(np.float64) - lo), np.abs(hi64 - x)
    even_lo = ((u >> 16) & 1) == 0
    want = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(even_lo, lo, hi)))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(y[finite], want[finite])


@pytest.fixture()
def saved(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path / "ok", max_shard_size="60KB")
    return tmp_path / "ok"


def _error(path) -> str:
    with pytest.raises((CheckpointError, ValueError)) as exc:
        Qwen3MoeForCausalLM.from_pretrained(path)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_shard(saved):
    idx = json.loads((saved / "model.safetensors.index.json").read_text())
    victim = sorted(set(idx["weight_map"].values()))[-1]
    os.remove(saved / victim)
    assert victim in _error(saved) and "missing shard" in _error(saved)


def test_truncated_shard(saved):
    victim = sorted(f for f in os.listdir(saved) if f.endswith(".safetensors"))[0]
    data = (saved / victim).read_bytes()
    (saved / victim).write_bytes(data[: len(data) - 100])
    msg = _error(saved)
    assert victim in msg and "truncated" in msg


def test_corrupt_header(saved):
    victim = sorted(f for f in os.listdir(saved) if f.endswith(".safetensors"))[0]
    (saved / victim).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    msg = _error(saved)
    assert victim in msg and "corrupt" in msg


def test_missing_tensor(tmp_path):
    m = tiny()
    out = tmp_path / "m"
    out.mkdir()
    m.config.save_pretrained(out)
    write_safetensors(str(out / "model.safetensors"),
                      [(p.name, p.asnumpy(), "F32") for p in m.get_parameters() if "q_norm" not in p.name])
    msg = _error(out)
    assert "missing tensor" in msg and "q_norm" in msg


def test_wrong_shape_and_unexpected(tmp_path):
    m = tiny()
    out = tmp_path / "m"
    out.mkdir()
    m.config.save_pretrained(out)
    tensors = [(p.name, p.asnumpy(), "F32") for p in m.get_parameters()]
    tensors[0] = (tensors[0][0], np.zeros((3, 3), np.float32), "F32")
    write_safetensors(str(out / "model.safetensors"), tensors)
    msg = _error(out)
    assert tensors[0][0] in msg and "shape" in msg
    tensors[0] = (tensors[0][0], m.get_parameters().__next__().asnumpy(), "F32")
    write_safetensors(str(out / "model.safetensors"), tensors + [("extra.weight", np.zeros(2, np.float32), "F32")])
    assert "unexpected tensor 'extra.weight'" in _error(out)


def test_wrong_per_expert_shape_names_the_expert_tensor(tmp_path):
    """Per-expert HF tensors are written straight into the fused [E, 2I, H] stack: one expert's
    tensor with the wrong shape is a one-line error naming it, not a numpy broadcast error."""
    from qwen3moe.io.hf_checkpoint import hf_tensors

    m = tiny()
    out = tmp_path / "m"
    out.mkdir()
    m.config.save_pretrained(out)
    tensors = [(n, a, t) for n, a, t in hf_tensors(m, "float32")]
    victim = next(i for i, (n, _, _) in enumerate(tensors) if n.endswith("experts.1.up_proj.weight"))
    tensors[victim] = (tensors[victim][0], np.zeros((3, 3), np.float32), "F32")
    write_safetensors(str(out / "model.safetensors"), tensors)
    msg = _error(out)
    assert tensors[victim][0] in msg and "[3, 3]" in msg and "model.safetensors" in msg


def test_save_is_atomic_and_replaces(tmp_path, monkeypatch):
    m = tiny()
    m.save_pretrained(tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    import qwen3moe.io.hf_checkpoint as hc

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hc, "_write_side_files", boom)
    with pytest.raises(RuntimeError):
        m.save_pretrained(tmp_path / "out", dtype="bfloat16")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp folder left behind


def test_tokenizer_and_generation_files_are_copied(tmp_path):
    from helpers import reference_dir

    src = reference_dir("tiny-a")
    m = Qwen3MoeForCausalLM.from_pretrained(src)
    m.save_pretrained(tmp_path / "out")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (src / f).read_bytes()


def test_token_id_out_of_range_names_the_id():
    m = tiny()
    with pytest.raises(ValueError, match=r"input_ids\[0, 1\] = 128 is outside"):
        m([[1, 128, 2]])
    with pytest.raises(ValueError, match=r"= -1 is outside"):
        m([[-1]])
