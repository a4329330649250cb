"""FP8 folders (Qwen's `*-FP8` layout: F8_E4M3 weights with block `weight_scale_inv`) read by
converting at load, checked against torch's dequantization recorded by tools/make_fp8_fixture.py
(torch's float8_e4m3fn encoding and decoding, independent of our NumPy table): the decoded
weights bit for bit, the float32 / bf16 / int8 / int4 loads against the same loads of a float
folder holding torch's values, `qwen3moe quantize` / `generate --quantize` from FP8, sharded
reads, F32 scales, a hypothesis property of the block scaling of any window, and the one-line
errors.

Fixture: tests/fixtures/hf/tiny-fp8 (roundtrip-bf16's first 2 layers; block [16, 24] so tensors
of 32 / 64 / 128 rows and columns have several blocks and partial ones in both dims).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import HF_FIXTURES, cli_error

from qwen3moe import Qwen3MoeForCausalLM
from qwen3moe.cli import main as cli_main
from qwen3moe.io.gptq import quantize_folder
from qwen3moe.io.hf_checkpoint import CheckpointSource, param_f32
from qwen3moe.io.fp8 import apply_scales
from qwen3moe.io.safetensors_io import E4M3_TABLE, SafetensorsFile, f32_to_bf16, write_safetensors
from qwen3moe.layers.quant import QuantizationConfig

FP8 = HF_FIXTURES / "tiny-fp8"
REF = json.loads((FP8 / "fp8_reference.json").read_text())["tensors"]  # torch's dequantization, hashed
IDS = np.random.default_rng(7).integers(0, 1024, (2, 8))


def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def test_e4m3_table_is_torchs_decoding():
    """All 256 codes: bit-identical values to torch's float8_e4m3fn -> float32, NaN where torch's."""
    torch_codes = np.load(FP8 / "fp8_reference.npz")["e4m3_codes"]
    nan = np.isnan(torch_codes)
    np.testing.assert_array_equal(np.isnan(E4M3_TABLE), nan)
    assert nan.sum() == 2  # S.1111.111 only: no infinities
    np.testing.assert_array_equal(E4M3_TABLE[~nan].view(np.uint32), torch_codes[~nan].view(np.uint32))
    assert E4M3_TABLE[0x7E] == 448 and E4M3_TABLE[0x01] == 2.0 ** -9 and np.signbit(E4M3_TABLE[0x80])


def test_dequantized_weights_equal_torch_bit_for_bit():
    src = CheckpointSource(str(FP8))
    assert sorted(src.scales) == sorted(REF) and len(REF) == 2 * (4 + 8 * 3)  # 2 layers: attention + experts
    assert not [k for k in src.where if k.endswith("_scale_inv")]  # scales are hidden from the loaders
    for name, want in REF.items():
        w = src.read(name)
        assert _sha(w) == want["f32"], name
        assert _sha(f32_to_bf16(w)) == want["bf16"], name
        O, I = w.shape  # row blocks (lm_head-style streaming) and hyperslabs (sharded loading) off block edges
        np.testing.assert_array_equal(src.read(name, rows=(5, O - 3)), w[5:O - 3])
        np.testing.assert_array_equal(src.read_slice(name, (slice(7, O), slice(9, I - 2))), w[7:, 9:I - 2])
    recorded = np.load(FP8 / "fp8_reference.npz")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight"):
        np.testing.assert_array_equal(src.read(name), recorded[name])


@settings(max_examples=60, deadline=None)
@given(O=st.integers(1, 70), I=st.integers(1, 70), bm=st.integers(1, 40), bn=st.integers(1, 40),
       cut=st.tuples(*[st.floats(0, 1)] * 4), seed=st.integers(0, 2**16))
def test_scaling_a_part_equals_the_part_of_the_scaled_weight(O, I, bm, bn, cut, seed):
    """apply_scales on any row/column window (row-block streaming, per-rank hyperslabs) with its
    offsets gives that window of the whole weight scaled, for any block size, partial or not."""
    rng = np.random.default_rng(seed)
    w = E4M3_TABLE[rng.integers(0, 256, (O, I))]
    w[np.isnan(w)] = 1.0
    s = rng.standard_normal((-(-O // bm), -(-I // bn))).astype(np.float32)
    r0, c0 = int(cut[0] * O), int(cut[1] * I)
    r1, c1 = r0 + int(cut[2] * (O - r0)), c0 + int(cut[3] * (I - c0))
    whole = apply_scales(w.copy(), s, (bm, bn))
    np.testing.assert_array_equal(apply_scales(w[r0:r1, c0:c1].copy(), s, (bm, bn), r0, c0), whole[r0:r1, c0:c1])
    o, k = rng.integers(0, O), rng.integers(0, I)  # and the definition, one element
    assert whole[o, k] == np.float32(w[o, k] * s[o // bm, k // bn])


def test_f32_scales_read_like_bf16_ones(tmp_path):
    """DeepSeek-style F32 weight_scale_inv (here the BF16 scales of one shard widened exactly):
    the same torch-exact weights."""
    folder = _copy(tmp_path, "f32")

    def widen(items):
        return [(k, (r.view(np.uint16).astype(np.uint32) << 16).view(np.float32), "F32", sh)
                if k.endswith("_scale_inv") else (k, r, t, sh) for k, r, t, sh in items]

    _rewrite_shard(folder, widen)
    src = CheckpointSource(str(folder))
    assert {st.dtype(k) for k, st in src.scales.values()} == {"F32", "BF16"}
    for name, want in REF.items():
        assert _sha(src.read(name)) == want["f32"], name


@pytest.fixture(scope="module")
def dequantized(tmp_path_factory):
    """A float folder holding torch's dequantized values (F32) and the BF16 rest as stored."""
    out = tmp_path_factory.mktemp("deq") / "deq"
    out.mkdir()
    src = CheckpointSource(str(FP8))
    tensors = []
    for name in sorted(src.where):
        if name in src.scales:
            w = src.read(name)
            assert _sha(w) == REF[name]["f32"]  # exactly torch's values
            tensors.append((name, w, "F32"))
        else:
            tensors.append((name, src.where[name].read_raw(name).view(np.uint16).reshape(src.shape(name)), "BF16"))
    write_safetensors(str(out / "model.safetensors"), tensors)
    cfg = json.loads((FP8 / "config.json").read_text())
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy2(FP8 / f, out / f)
    return out


def _params(model) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy() for p in model.get_parameters()}


def _assert_same_params(a, b) -> None:
    pa, pb = _params(a), _params(b)
    assert sorted(pa) == sorted(pb)
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


def test_fp8_loads_as_float32_and_bf16(dequantized):
    fp8, ref = (Qwen3MoeForCausalLM.from_pretrained(f, dtype="float32") for f in (FP8, dequantized))
    _assert_same_params(fp8, ref)
    np.testing.assert_array_equal(fp8(IDS).logits.asnumpy(), ref(IDS).logits.asnumpy())
    model = Qwen3MoeForCausalLM.from_pretrained(FP8, dtype=None)  # the folder's dtype: bfloat16
    assert model.config.torch_dtype == "bfloat16" and "quantization_config" not in model.config.extra
    params = {p.name: p for p in model.get_parameters()}
    q = params["model.layers.1.self_attn.o_proj.weight"]
    assert "16" in str(q.dtype)  # bf16 storage, not a float32 copy
    assert _sha(f32_to_bf16(param_f32(q))) == REF["model.layers.1.self_attn.o_proj.weight"]["bf16"]
    gate_up = f32_to_bf16(param_f32(params["model.layers.0.mlp.experts.gate_up_proj"]))  # [E, 2I, H]
    I = gate_up.shape[1] // 2
    for j in range(gate_up.shape[0]):  # = transformers' dequantize=True (fp32 product rounded to bf16)
        assert _sha(gate_up[j, :I]) == REF[f"model.layers.0.mlp.experts.{j}.gate_proj.weight"]["bf16"]
        assert _sha(gate_up[j, I:]) == REF[f"model.layers.0.mlp.experts.{j}.up_proj.weight"]["bf16"]
    _assert_same_params(model, Qwen3MoeForCausalLM.from_pretrained(dequantized, dtype="bfloat16"))


@pytest.mark.parametrize("quantization,group_size", [("int8", None), ("int4", 32), ("int4", None)])
def test_quantize_on_load_from_fp8(dequantized, quantization, group_size):
    """Re-quantized from the dequantized values: the same tensors as quantizing torch's float
    values (so the same logits: the quantized forward is test_quant.py's; a generation runs in
    test_generate_quantize_from_fp8)."""
    kw = dict(quantization=quantization, group_size=group_size)
    if group_size is None and quantization == "int4":  # the default g128 does not divide H = 64
        with pytest.raises(ValueError, match="group_size 128 does not divide the input dimension 64"):
            Qwen3MoeForCausalLM.from_pretrained(FP8, **kw)
        return
    model = Qwen3MoeForCausalLM.from_pretrained(FP8, **kw)
    assert model.quantization.bits == int(quantization[-1])
    _assert_same_params(model, Qwen3MoeForCausalLM.from_pretrained(dequantized, **kw))


def test_quantize_command_from_fp8(dequantized, tmp_path, capsys):
    assert cli_main(["quantize", "--pretrained_model_dir", str(FP8), "--output", str(tmp_path / "q"),
                     "--bits", "4", "--group_size", "32"]) == 0, capsys.readouterr().err
    quantize_folder(str(dequantized), str(tmp_path / "ref"), QuantizationConfig(4, 32))
    got, want = CheckpointSource(str(tmp_path / "q")), CheckpointSource(str(tmp_path / "ref"))
    assert sorted(got.where) == sorted(want.where)
    for name in want.where:
        assert got.dtype(name) == want.dtype(name), name
        np.testing.assert_array_equal(got.where[name].read_raw(name), want.where[name].read_raw(name), err_msg=name)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"


@pytest.mark.slow
def test_generate_quantize_from_fp8(tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    argv = ["generate", "--pretrained_model_dir", str(FP8), "--predict_data", "The quick brown fox",
            "--max_new_tokens", "3", "--ignore_eos", "--output", str(out), "--quantize", "int4", "--group_size", "32"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert json.loads(out.read_text().splitlines()[0])["completion_tokens"] == 3


# ---- one-line errors ------------------------------------------------------------------------
def _copy(tmp_path, name: str, **qc_changes):
    folder = tmp_path / name
    shutil.copytree(FP8, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in qc_changes.items():
        if v is None:
            cfg["quantization_config"].pop(k, None)
        else:
            cfg["quantization_config"][k] = v
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _rewrite_shard(folder, edit) -> None:
    """Rewrite the shard holding the q_proj of layer 0 with `edit(list of (name, raw, tag))`."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    fname = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    st = SafetensorsFile(str(folder / fname))
    items = [(k, st.read_raw(k), st.dtype(k), st.shape(k)) for k in st.keys()]
    st.close()
    items = edit(items)
    write_safetensors(str(folder / fname), [(k, raw.view(np.uint8), tag) for k, raw, tag, _ in items])
    header_fix = {k: shape for k, _, _, shape in items}  # write_safetensors records the raw byte shape
    _fix_shapes(folder / fname, header_fix)
    index["weight_map"] = {**{k: v for k, v in index["weight_map"].items() if v != fname},
                           **{k: fname for k in header_fix}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _fix_shapes(path, shapes: dict) -> None:
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    for k, shape in shapes.items():
        header[k]["shape"] = list(shape)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("case,words", [
    ("static", "quantization_config.activation_scheme 'static' is not supported"),
    ("fmt", "quantization_config.fmt 'e5m2' is not supported (only 'e4m3')"),
    ("block", r"tensor '\S+\.weight_scale_inv' is BF16 \[\d+, \d+\], expected F32/BF16/F16 \[\d+, \d+\] for "
              r"'\S+\.weight' \[\d+, \d+\] with quantization_config\.weight_block_size \[32, 32\]"),
    ("per_tensor", "quantization_config.weight_block_size None is not supported"),
    ("no_scale", f"missing tensor '{Q}.weight_scale_inv' (block scales of the F8_E4M3 weight '{Q}.weight')"),
    ("e5m2", f"tensor '{Q}.weight' has dtype F8_E5M2; the only 8-bit float read is F8_E4M3"),
    ("input_scale", f"tensor '{Q}.input_scale': static activation scales are not supported"),
    ("no_config", "config.json has no quantization_config with quant_method 'fp8'"),
])
def test_bad_fp8_folders_are_one_line_errors(tmp_path, capsys, case, words):
    changes = {"static": {"activation_scheme": "static"}, "fmt": {"fmt": "e5m2"},
               "block": {"weight_block_size": [32, 32]}, "per_tensor": {"weight_block_size": None}}
    folder = _copy(tmp_path, case, **changes.get(case, {}))
    if case == "no_scale":
        _rewrite_shard(folder, lambda items: [i for i in items if i[0] != f"{Q}.weight_scale_inv"])
    elif case == "e5m2":
        _rewrite_shard(folder, lambda items: [(k, r, "F8_E5M2" if k == f"{Q}.weight" else t, s)
                                              for k, r, t, s in items])
    elif case == "input_scale":
        _rewrite_shard(folder, lambda items: items + [(f"{Q}.input_scale", np.ones(1, np.float32), "F32", (1,))])
    elif case == "no_config":
        cfg = json.loads((folder / "config.json").read_text())
        del cfg["quantization_config"]
        (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as info:
        Qwen3MoeForCausalLM.from_pretrained(folder)
    msg = str(info.value)
    assert (re.search(words, msg) if case == "block" else words in msg) and "\n" not in msg, msg
    if case == "static":  # the commands: exit 2 with that line, nothing written
        for argv in (["generate", "--pretrained_model_dir", str(folder), "--predict_data", "hi"],
                     ["quantize", "--pretrained_model_dir", str(folder), "--output", str(tmp_path / "q")]):
            assert words in cli_error(argv, capsys)
        assert not list(tmp_path.glob("*q*"))


def test_sharded_reads_of_fp8_are_slices_of_the_dequantized_weights():
    """parallel/checkpoint.ShardReader (each rank reads only its slices) on the FP8 folder: row- and
    column-split projections and an expert block split over tp, against torch-exact full reads."""
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.checkpoint import ShardReader
    from qwen3moe.parallel.ranks import ShardInfo

    cfg, src, reader = Qwen3MoeConfig.from_pretrained(FP8), CheckpointSource(str(FP8)), ShardReader(FP8)
    q, o = "model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    np.testing.assert_array_equal(reader.read_shard(ShardInfo(q, "column", 1, 2), cfg), src.read(q)[64:])
    np.testing.assert_array_equal(reader.read_shard(ShardInfo(o, "row", 1, 2), cfg), src.read(o)[:, 64:])
    down = reader.read_shard(ShardInfo("model.layers.1.mlp.experts.down_proj", "row", 1, 2, 1, 2), cfg)
    I = cfg.moe_intermediate_size
    want = np.stack([src.read(f"model.layers.1.mlp.experts.{j}.down_proj.weight")[:, I // 2:] for j in range(4, 8)])
    np.testing.assert_array_equal(down, want)
