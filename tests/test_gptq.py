"""GPTQ folders: our writer checked by an independent unpacker (tools/gptq_unpack.py), reload ==
quantize-on-load, a hand-built third-party folder (asym, act-order g_idx, v1 and v2 zero points,
4 and 8 bits) read exactly, the CLI, and one-line errors.

Shapes: O out-features, I in-features, G groups, E experts.
"""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from safetensors.numpy import load_file, save_file

from helpers import (HF_FIXTURES, REPO, assert_close_to_reference, cli_error, dequantized_reference,
                     third_party_gptq_folder)

from qwen3moe import Qwen3MoeForCausalLM
from qwen3moe.cli import main as cli_main
from qwen3moe.io.gptq import quantize_folder, to_gptq
from qwen3moe.io.quantized import quantized_cells
from qwen3moe.layers.quant import QuantizationConfig, dequantize, quantize, quantize_codes

sys.path.insert(0, str(REPO / "tools"))
import gptq_unpack  # noqa: E402  (independent implementation of the format)

BF16 = HF_FIXTURES / "roundtrip-bf16"  # per-expert bf16 shards (tiny-fp32-gqa rounded)
FP32 = HF_FIXTURES / "tiny-fp32-gqa"


def _tensors(folder) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("bits,g", [(4, 32), (8, -1)])
def test_written_folder_matches_independent_unpacker(tmp_path, bits, g):
    out = tmp_path / "q"
    quantize_folder(str(BF16), str(out), QuantizationConfig(bits, g), max_shard_size="40KB")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "gptq", "bits": bits, "group_size": g, "sym": True, "desc_act": False,
                  "checkpoint_format": "gptq", "lm_head": False}
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file()
    t, src = _tensors(out), _tensors(BF16)
    sym_word = {4: 0x77777777, 8: 0x7F7F7F7F}[bits]  # v1: z - 1 = 7 / 127 in every slot
    names = ["model.layers.1.mlp.experts.3.up_proj", "model.layers.0.mlp.experts.7.down_proj",
             "model.layers.2.self_attn.o_proj", "model.layers.3.self_attn.k_proj"]
    for p in names:
        assert t[f"{p}.qweight"].dtype == np.int32 and t[f"{p}.scales"].dtype == np.float16
        assert (t[f"{p}.qzeros"].view(np.uint32) == sym_word).all()
        W = src[f"{p}.weight"].astype(np.float32)
        assert t[f"{p}.qweight"].shape == (W.shape[1] * bits // 32, W.shape[0])
        independent = gptq_unpack.dequantize(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"],
                                             t[f"{p}.g_idx"], bits, v1=True)
        gg = W.shape[1] if g == -1 else g
        np.testing.assert_array_equal(independent, dequantize(*quantize(W, bits, gg), bits))
    # the library's reader lands the same values in the in-memory layout
    cells = quantized_cells(Qwen3MoeForCausalLM.from_pretrained(out))
    c = cells["model.layers.1.mlp.experts.gate_up_proj"]
    lib = dequantize(c.qweight.asnumpy(), c.scales.asnumpy(), c.qzeros.asnumpy(), bits)
    p = names[0]
    independent = gptq_unpack.dequantize(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"],
                                         t[f"{p}.g_idx"], bits)
    np.testing.assert_array_equal(lib[3, lib.shape[1] // 2:], independent)


def _reference_codes(w: np.ndarray, bits: int, g: int):
    """The quantizer's math as first written (one abs-max reduction per group), kept as the
    reference for the faster tree reduction and byte packing."""
    *lead, O, I = w.shape
    qmax = 2 ** (bits - 1) - 1
    w_g = w.astype(np.float32).reshape(*lead, O, I // g, g)
    x = np.abs(w_g).max(-1) / np.float32(qmax)
    h = x.astype(np.float16)
    scales = np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)
    s = scales.astype(np.float32)[..., None]
    u = (np.rint(w_g / np.where(s == 0, np.float32(1), s)) + 2 ** (bits - 1)).astype(np.uint8)
    return u.reshape(*lead, O, I), scales


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([4, 8]), g=st.sampled_from([32, 64, 128, -1]), rows=st.integers(1, 4),
       groups=st.integers(1, 3), seed=st.integers(0, 2 ** 16), scale=st.sampled_from([1e-6, 0.02, 3.0]))
def test_fast_quantizer_equals_reference_math(bits, g, rows, groups, seed, scale):
    """quantize_codes (tree abs-max) on stacked experts [E, O, I] and to_gptq (byte-folding
    packer) equal the first implementation's math and tools/gptq_unpack.pack bit for bit."""
    rng = np.random.default_rng(seed)
    O, I = 8 * rows, (64 if g == -1 else g) * groups
    gg = I if g == -1 else g
    w = (rng.standard_normal((2, O, I)) * scale).astype(np.float32)
    w[0, 0, :gg] = 0.0  # an all-zero group: scale 0
    w[1, 2, 1] = 40 * scale  # an outlier owning its group's scale
    w = ((w.view(np.uint32) >> 16) << 16).view(np.float32)  # bf16 values, as read from the hub's folders
    u, scales, qzeros = quantize_codes(w, bits, gg)
    ref_u, ref_s = _reference_codes(w, bits, gg)
    np.testing.assert_array_equal(u, ref_u)
    np.testing.assert_array_equal(scales.view(np.uint16), ref_s.view(np.uint16))
    for e in range(2):
        got = to_gptq(u[e], scales[e], qzeros[e], bits)
        want = gptq_unpack.pack(ref_u[e].T.astype(np.int64), np.full((I // gg, O), 2 ** (bits - 1)),
                                ref_s[e].T, np.arange(I) // gg, bits, v1=True)
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            assert got[key].dtype == want[key].dtype, key
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([4, 8]), g=st.sampled_from([8, 16, 32]), groups=st.integers(1, 4),
       rows=st.sampled_from([8, 16]), seed=st.integers(0, 2 ** 16))  # the GPTQ words' multiples
def test_sort_by_group_is_the_act_order_weight(bits, g, groups, rows, seed):
    """An act-order map (g columns per group, scattered) sorted by group: the stored columns with
    their input order perm dequantize to the same W as the map read as stored (tools/
    gptq_unpack's per-column formula, written independently), for odd and even inputs in either
    nibble; and a map with a group of the wrong size is refused (UnsortableMap)."""
    from qwen3moe.io.act_order import UnsortableMap, sort_by_group
    from qwen3moe.layers.quant import pack

    rng = np.random.default_rng(seed)
    I = g * groups
    g_idx = (np.argsort(rng.permutation(I)) // g).astype(np.int32)
    u = rng.integers(0, 2 ** bits, (rows, I)).astype(np.uint8)
    s = rng.uniform(0.5, 2, (groups, rows)).astype(np.float16)
    z = rng.integers(0, 2 ** bits, (groups, rows))
    packed, perm = sort_by_group(pack(u, bits), g_idx, bits, g, "t")
    want = gptq_unpack.dequantize(**gptq_unpack.pack(u.T, z, s, g_idx, bits, v1=False), bits=bits, v1=False)
    got = dequantize(packed, np.ascontiguousarray(s.T), np.ascontiguousarray(z.T, np.uint8), bits)
    np.testing.assert_array_equal(got[:, np.argsort(perm)], want)
    if groups > 1:
        bad = g_idx.copy()
        bad[np.nonzero(bad == 0)[0][0]] = 1  # group 0 one column short, group 1 one long
        with pytest.raises(UnsortableMap, match=r"t\.g_idx does not put exactly"):
            sort_by_group(pack(u, bits), bad, bits, g, "t")


def test_reload_equals_quantize_on_load(tmp_path):
    out = tmp_path / "q"
    assert cli_main(["quantize", "--pretrained_model_dir", str(BF16), "--output", str(out), "--bits", "4",
                     "--group_size", "32"]) == 0
    a = Qwen3MoeForCausalLM.from_pretrained(BF16, quantization="int4", group_size=32)
    b = Qwen3MoeForCausalLM.from_pretrained(out)
    ids = np.random.default_rng(3).integers(0, a.config.vocab_size, (2, 9))
    np.testing.assert_array_equal(a(ids).logits.asnumpy(), b(ids).logits.asnumpy())
    assert not list(tmp_path.glob(".q.tmp-*"))  # the temporary folder was renamed away


@pytest.mark.parametrize("bits,v1", [(4, True), pytest.param(8, False, marks=pytest.mark.slow)])
def test_third_party_asym_act_order_folder_reads_exactly(tmp_path, bits, v1, composite):
    """Maps drawn per projection (gate and up differ): the weights are held as stored with their
    group maps, and the composite forward is the fp32 forward of the same values, bit for bit."""
    folder, deq = third_party_gptq_folder(tmp_path / f"gptq{bits}", FP32, bits, v1)
    qm = Qwen3MoeForCausalLM.from_pretrained(folder)
    assert all(c.perm is None and c.g_idx is not None for n, c in quantized_cells(qm).items() if n != "lm_head.weight")
    ref = dequantized_reference(qm, deq, FP32)
    ids = np.random.default_rng(4).integers(0, qm.config.vocab_size, (2, 8))
    np.testing.assert_array_equal(qm(ids).logits.asnumpy(), ref(ids).logits.asnumpy())


# Sorting a projection's columns by group changes only the order of its fp32 sums (x[perm] @
# W_sorted^T = x @ W^T in exact arithmetic): measured worst |difference| 0.6-1.3e-6 x max|logit|
# on this model (3 seeds, int4 and int8, kernels and composite); the same folder with every perm
# replaced by the identity (inputs not gathered): 1.5 x max|logit|.
SORTED_TOL = 2e-5


@pytest.mark.parametrize("bits,v1,kernels", [(4, True, True), (4, True, False), (8, False, True)])
def test_act_order_folder_with_gptq_maps_runs_sorted(tmp_path, bits, v1, kernels, request):
    """GPTQ's own maps (q/k/v and gate/up sharing theirs): the columns are sorted by group with an
    input order perm (contiguous groups: the C++ kernels and the fused decode step apply), and
    the logits and greedy tokens equal the independent dequantization's fp32 model."""
    from qwen3moe.generation.fused_step import not_fused_reason

    if not kernels:
        request.getfixturevalue("composite")
    folder, deq = third_party_gptq_folder(tmp_path / f"gptq{bits}", FP32, bits, v1, shared_maps=True)
    qm = Qwen3MoeForCausalLM.from_pretrained(folder)
    cells = {n: c for n, c in quantized_cells(qm).items() if n != "lm_head.weight"}
    assert all(c.g_idx is None and c.perm is not None for c in cells.values())
    assert not (cells["model.layers.0.self_attn.q_proj.weight"].perm.asnumpy() == np.arange(qm.config.hidden_size)).all()
    assert (not_fused_reason(qm) is None) == kernels
    ref = dequantized_reference(qm, deq, FP32)
    assert_close_to_reference(qm, ref, SORTED_TOL)


def _edit_config(folder, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_bad_gptq_folders_are_one_line_errors(tmp_path, capsys):
    base = tmp_path / "q"
    quantize_folder(str(FP32), str(base), QuantizationConfig(4, 32))
    cases = [({"bits": 3}, "quantization_config.bits 3 is not supported"),
             ({"quant_method": "bitsandbytes"}, "quantization_config.quant_method 'bitsandbytes' is not supported"),
             ({"group_size": 100}, "quantization_config.group_size 100 is not supported"),
             ({"group_size": 64}, "group_size 64 does not divide the input dimension 32"),
             ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported")]
    for i, (change, words) in enumerate(cases):
        folder = tmp_path / f"bad{i}"
        shutil.copytree(base, folder)
        _edit_config(folder, **change)
        with pytest.raises(ValueError) as info:
            Qwen3MoeForCausalLM.from_pretrained(folder)
        assert words in str(info.value) and "\n" not in str(info.value), str(info.value)
    # a missing scales tensor
    folder = tmp_path / "noscales"
    shutil.copytree(base, folder)
    t = load_file(folder / "model.safetensors")
    del t["model.layers.2.self_attn.v_proj.scales"]
    save_file(t, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.2\.self_attn\.v_proj\.scales"):
        Qwen3MoeForCausalLM.from_pretrained(folder)
    # quantizing an already-quantized folder: API and both commands
    for kw in (dict(quantization="int8"), dict(group_size=64)):  # group_size: before, silently ignored
        with pytest.raises(ValueError, match="already quantized"):
            Qwen3MoeForCausalLM.from_pretrained(base, **kw)
    for argv in (["generate", "--pretrained_model_dir", str(base), "--predict_data", "hi", "--quantize", "int4"],
                 ["generate", "--pretrained_model_dir", str(base), "--predict_data", "hi", "--group_size", "64"],
                 ["quantize", "--pretrained_model_dir", str(base), "--output", str(tmp_path / "x")],
                 ["quantize", "--pretrained_model_dir", str(FP32), "--output", str(tmp_path / "y"), "--bits", "3"]):
        err = cli_error(argv, capsys)
        assert ("already quantized" in err) or ("bits must be 4 or 8, got 3" in err), err
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.tmp-*"))


@pytest.mark.slow
def test_generate_cli_quantize_and_bf16(tmp_path, capsys):
    for extra in (["--quantize", "int4", "--group_size", "32"], ["--quantize", "int8"], ["--dtype", "auto"]):
        out = tmp_path / "out.jsonl"
        argv = ["generate", "--pretrained_model_dir", str(BF16), "--predict_data", "The quick brown fox",
                "--max_new_tokens", "4", "--ignore_eos", "--output", str(out), *extra]
        assert cli_main(argv) == 0, capsys.readouterr().err
        row = json.loads(out.read_text().splitlines()[0])
        assert row["completion_tokens"] == 4
