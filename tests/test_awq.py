"""AWQ folders (io/awq.py): the unpacking checked against an independent packer / dequantizer
(tools/awq_unpack.py), a synthetic AWQ folder of the tiny GQA fixture read exactly (composite:
bit for bit; kernels: same tokens, logits within a stated tolerance), and one-line errors.

Shapes: O out-features, I in-features, G groups, g group size.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from safetensors.numpy import load_file, save_file

from helpers import HF_FIXTURES, REPO, assert_close_to_reference, awq_folder, cli_error, dequantized_reference

from qwen3moe import Qwen3MoeForCausalLM
from qwen3moe.io.awq import awq_qweight, awq_unpack
from qwen3moe.io.quantized import quantized_cells
from qwen3moe.io.safetensors_io import CheckpointError
from qwen3moe.layers.quant import dequantize

sys.path.insert(0, str(REPO / "tools"))
import awq_unpack as tool  # noqa: E402  (independent implementation of the format)

FP32 = HF_FIXTURES / "tiny-fp32-gqa"


@settings(max_examples=25, deadline=None)
@given(O8=st.integers(1, 6), g=st.sampled_from([32, 64, 128]), G=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_unpacking_matches_the_independent_dequantization(O8, g, G, seed):
    """Random q / z / scales packed by the tool, converted by io/awq.py into the in-memory layout:
    layers.quant.dequantize of it == the tool's dequantization, bit for bit."""
    rng = np.random.default_rng(seed)
    O, I = 8 * O8, g * G
    q = rng.integers(0, 16, (I, O))
    z = rng.integers(0, 16, (G, O))
    s = rng.standard_normal((G, O)).astype(np.float16)
    packed = tool.pack(q, z, s)
    qweight = awq_qweight(packed["qweight"])
    zeros = np.ascontiguousarray(awq_unpack(packed["qzeros"]).T)
    assert qweight.shape == (O, I // 2) and qweight.dtype == np.uint8
    got = dequantize(qweight, np.ascontiguousarray(packed["scales"].T), zeros, 4)
    want = tool.dequantize(packed["qweight"], packed["qzeros"], packed["scales"])
    np.testing.assert_array_equal(got, want)


def test_folder_reads_exactly_on_the_composite_path(tmp_path, composite):
    """Every projection AWQ-packed by the tool: the loaded model's forward is the fp32 forward
    of the tool's dequantized weights, bit for bit (same values, same composite sums)."""
    folder, deq = awq_folder(tmp_path / "awq", FP32)
    qm = Qwen3MoeForCausalLM.from_pretrained(folder)
    cells = quantized_cells(qm)
    assert all(c.bits == 4 and c.group_size == 32 and c.g_idx is None and c.perm is None
               for n, c in cells.items() if n != "lm_head.weight")
    ref = dequantized_reference(qm, deq, FP32)
    ids = np.random.default_rng(4).integers(0, qm.config.vocab_size, (2, 8))
    np.testing.assert_array_equal(qm(ids).logits.asnumpy(), ref(ids).logits.asnumpy())


# The C++ kernels sum each group's products in another fp32 order than the composite matmul of
# the dequantized weights: measured worst |difference| 0.5-2.1e-6 x max|logit| on this model
# (seeds 4-7); 10x margin. A wrong nibble order is far outside (test_unpacking_... fails first).
KERNEL_TOL = 2e-5


def test_folder_on_the_kernels_matches_the_dequantized_model(tmp_path):
    from qwen3moe.generation.fused_step import not_fused_reason

    folder, deq = awq_folder(tmp_path / "awq", FP32)
    qm = Qwen3MoeForCausalLM.from_pretrained(folder)
    assert not_fused_reason(qm) is None  # the C++ kernels and the fused decode step apply
    ref = dequantized_reference(qm, deq, FP32)
    assert_close_to_reference(qm, ref, KERNEL_TOL)


@pytest.fixture(scope="module")
def awq_src(tmp_path_factory):
    return awq_folder(tmp_path_factory.mktemp("awq") / "awq", FP32)[0]


def test_generate_cli_reads_the_folder(awq_src, tmp_path, capsys):
    """`qwen3moe generate` on the AWQ folder (before: refused, quant_method 'awq')."""
    from qwen3moe.cli import main as cli_main

    out = tmp_path / "out.jsonl"
    argv = ["generate", "--pretrained_model_dir", str(awq_src), "--predict_data", "The quick brown fox",
            "--max_new_tokens", "4", "--ignore_eos", "--output", str(out)]
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert json.loads(out.read_text().splitlines()[0])["completion_tokens"] == 4


# ---- one-line errors ------------------------------------------------------------------------
def _with_config(folder, **entries):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(entries)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder, edit):
    t = load_file(folder / "model.safetensors")
    edit(t)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _copy(awq_src, tmp_path):
    import shutil

    return shutil.copytree(awq_src, tmp_path / "awq")


@pytest.mark.parametrize("entries,match", [
    (dict(version="gemv"), r"config\.json: quantization_config\.version 'gemv' is not supported"),
    (dict(version="exllama"), r"quantization_config\.version 'exllama' is not supported"),
    (dict(bits=8), r"quantization_config\.bits 8 is not supported in an AWQ folder"),
    (dict(zero_point=False), r"quantization_config\.zero_point False is not supported"),
    (dict(group_size=16), r"quantization_config\.group_size 16 is not supported"),
    (dict(modules_to_not_convert=["experts.3.down_proj"]),
     r"modules_to_not_convert entry 'experts\.3\.down_proj' keeps model\.layers\.0\.mlp\.experts\.3\.down_proj in float"),
    (dict(modules_to_not_convert=["gate"]), r"entry 'gate' keeps model\.layers\.0\.mlp\.experts\.0\.gate_proj in float"),
    (dict(config_groups={}), r"quantization_config\.config_groups = \{\} is not supported in an AWQ folder"),
])
def test_refused_configs(awq_src, tmp_path, entries, match):
    folder = _copy(awq_src, tmp_path)
    _with_config(folder, **entries)
    with pytest.raises(CheckpointError, match=match) as e:
        Qwen3MoeForCausalLM.from_pretrained(folder)
    assert "\n" not in str(e.value)


def test_router_and_lm_head_in_modules_to_not_convert_load(awq_src, tmp_path, composite):
    """The model keeps them float anyway: the same model as without the list."""
    folder = _copy(awq_src, tmp_path)
    _with_config(folder, modules_to_not_convert=["mlp.gate.", "lm_head"])
    ids = np.arange(8)[None]
    np.testing.assert_array_equal(Qwen3MoeForCausalLM.from_pretrained(folder)(ids).logits.asnumpy(),
                                  Qwen3MoeForCausalLM.from_pretrained(awq_src)(ids).logits.asnumpy())


def _quantized_router(t):
    W = t.pop("model.layers.1.mlp.gate.weight")
    t["model.layers.1.mlp.gate.qweight"] = np.zeros((W.shape[1], W.shape[0] // 8), np.int32)


def _quantized_head(t):
    W = t.pop("lm_head.weight")
    t["lm_head.qweight"] = np.zeros((W.shape[1], W.shape[0] // 8), np.int32)


P = "model.layers.2.mlp.experts.5.down_proj"


@pytest.mark.parametrize("edit,match", [
    (_quantized_router, r"quantized tensor 'model\.layers\.1\.mlp\.gate\.qweight'"),
    (_quantized_head, r"quantized tensor 'lm_head\.qweight'"),
    (lambda t: t.pop(f"{P}.qzeros"), rf"missing tensor {P}\.qzeros \(AWQ 4-bit folder\)"),
    (lambda t: t.update({f"{P}.qweight": t[f"{P}.qweight"].T.copy()}),
     rf"tensor '{P}\.qweight' is I32 \[8, 32\], expected I32 \[32, 8\]"),
    (lambda t: t.update({f"{P}.g_idx": np.arange(32, dtype=np.int32) // 32}), rf"unexpected tensor '{P}\.g_idx'"),
])
def test_refused_tensors(awq_src, tmp_path, edit, match):
    folder = _copy(awq_src, tmp_path)
    _edit_tensors(folder, edit)
    with pytest.raises(CheckpointError, match=match) as e:
        Qwen3MoeForCausalLM.from_pretrained(folder)
    assert "\n" not in str(e.value)


def test_quantize_option_on_an_awq_folder_is_refused(awq_src, tmp_path, capsys):
    for argv in (["generate", "--pretrained_model_dir", str(awq_src), "--predict_data", "hi", "--quantize", "int4"],
                 ["generate", "--pretrained_model_dir", str(awq_src), "--predict_data", "hi", "--group_size", "64"],
                 ["quantize", "--pretrained_model_dir", str(awq_src), "--output", str(tmp_path / "x")]):
        err = cli_error(argv, capsys)
        assert "already quantized" in err, err
    assert not (tmp_path / "x").exists()
    with pytest.raises(CheckpointError, match=r"already quantized \(4-bit AWQ\); load it without"):
        Qwen3MoeForCausalLM.from_pretrained(awq_src, quantization="int4")
