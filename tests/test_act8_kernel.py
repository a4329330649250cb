"""The opt-in int8-activation mode of the decode kernels (kernels/csrc/quant_vnni.h) against an
independent NumPy implementation of its arithmetic (docs/quantization.md "int8 activations"):
activations quantized per row in blocks of 16, symmetric, q = rint(x * 127 / max|x|), sx = max|x| / 127;
integer products (u - z) * q summed exactly; each (activation block, weight group) piece scaled by
sx * s_w in float. The reference sums exactly (int64 and float64); the kernel sums the pieces in
float32, so the tolerance is 1e-5 of the sum of the pieces' magnitudes (float32 rounding of
sx * s_w and of <= I / 4 additions: well under 1e-6 relative each, x10 margin).
Weights come from kernel_reference.quant_arrays (codes, zero points and fp16 scales drawn first).
Both the AVX512-VNNI loop and the portable scalar loop run; with int8 activations off the same
entry point must give the fp32-activation result (1e-5 of the magnitudes as well).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import REPO
from kernel_reference import act8_case, act8_reference, call_aot, quant_arrays
from qwen3moe.kernels import decode as decode_kernel
from qwen3moe.kernels import quant

pytestmark = pytest.mark.skipif(not decode_kernel.available(), reason="decode kernels not built here")
BLOCK = 16
MEASURED = 0.0133  # max |logit diff| / max |logit|, int4 g128 int8-activations vs weight-only, _steps below
QUALITY_MODEL = REPO / "tests" / "fixtures" / "quality" / "model"


def unpack(arrays, I):
    q, s, z = arrays
    u = q if q.shape[-1] == I else np.stack([q & 15, q >> 4], -1).reshape(*q.shape[:-1], I)
    return u, z, s


def rows(x, arrays, act8: bool) -> np.ndarray:
    y = np.zeros((x.shape[0], arrays[0].shape[0]), np.float32)
    fcfg = np.array([1e-6, 1.0, 1.0 if act8 else 0.0], np.float32)
    assert call_aot(decode_kernel.library(), "DecodeRows", [x, *arrays, fcfg, y]) == 0
    return y


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([8, 4]), g=st.sampled_from([None, 16, 32, 64, 128]), I=st.sampled_from([128, 256, 384]),
       O=st.integers(1, 70), B=st.integers(1, 9), sym=st.booleans(), portable=st.booleans(),
       zero_block=st.booleans(), seed=st.integers(0, 2**16))
def test_rows_match_numpy(bits, g, I, O, B, sym, portable, zero_block, seed):
    rng = np.random.default_rng(seed)
    arrays, x = act8_case(rng, bits, g, I, O, B, sym, zero_block, BLOCK)
    u, z, s = unpack(arrays, I)
    ref, mag = act8_reference(x, u, z, s)
    quant.set_portable(portable)
    try:
        y = rows(x, arrays, act8=True)
        y_fp = rows(x, arrays, act8=False)
    finally:
        quant.set_portable(False)
    np.testing.assert_array_less(np.abs(y - ref), 1e-5 * mag + 1e-30)
    w = (u.astype(np.float64) - np.repeat(z, I // z.shape[1], 1)) * np.repeat(s.astype(np.float64), I // z.shape[1], 1)
    fp_ref = x.astype(np.float64) @ w.T
    np.testing.assert_allclose(y_fp, fp_ref, rtol=0, atol=1e-5 * (np.abs(x) @ np.abs(w).T).max())


def test_vector_and_scalar_loops_agree_at_real_width():
    """2048-wide rows (the 30B-A3B hidden size), many rows and batch 8: both loops, same numbers
    to float32 summation order."""
    rng = np.random.default_rng(3)
    for mode, g in (("int8", None), ("int4", 128)):
        arrays, _ = quant_arrays(rng, (300, 2048), mode, g, scale=0.01)
        arrays[2][:] = 128 if mode == "int8" else 8
        x = rng.standard_normal((8, 2048)).astype(np.float32)
        y = rows(x, arrays, act8=True)
        quant.set_portable(True)
        try:
            y_s = rows(x, arrays, act8=True)
        finally:
            quant.set_portable(False)
        ref, mag = act8_reference(x, *unpack(arrays, 2048))
        np.testing.assert_array_less(np.abs(y - ref), 1e-5 * mag)
        np.testing.assert_array_less(np.abs(y_s - ref), 1e-5 * mag)


def test_shapes_outside_the_mode_use_fp32_activations():
    """A row width that is not a whole number of 64-input chunks (int8) keeps the fp32-activation
    result exactly: the mode only applies where its layout fits."""
    rng = np.random.default_rng(4)
    arrays, w = quant_arrays(rng, (20, 96), "int8", None, scale=0.01)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    np.testing.assert_array_equal(rows(x, arrays, act8=True), rows(x, arrays, act8=False))


def _steps(quantization=None, folder=QUALITY_MODEL, **options):
    """Prefill + 8 greedy decode steps of the trained quality fixture (hidden 128: every
    projection fits the int8-activation layout) with the step logits."""
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.generation.generate import GenerationRun, resolve_config

    model = Qwen3MoeForCausalLM.from_pretrained(folder, quantization=quantization, **options)
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 12))
    run = GenerationRun(model, ids, None, resolve_config(model, max_new_tokens=8, do_sample=False, ignore_eos=True),
                        keep_logits=True)
    run.run()
    return np.stack(run.step_logits)


def test_generation_with_int8_activations():
    """QuantizationConfig(activations="int8") reaches the step kernels (every step's logits
    change: the decode layers, the prefill's layers and its lm_head too) and the change stays within the
    activation rounding error: measured max |diff| 1.33% of the largest logit on this fixture
    (MEASURED), bound 3x that (a wrong activation scale or lane order gives O(1) differences)."""
    from qwen3moe import QuantizationConfig

    weight_only = _steps(QuantizationConfig(4, 128))
    act8 = _steps(QuantizationConfig(4, 128, activations="int8"))
    assert all(not np.array_equal(a, w) for a, w in zip(act8, weight_only))
    rel = np.abs(act8 - weight_only).max() / np.abs(weight_only).max()
    assert rel <= 3 * MEASURED


def test_gptq_folder_takes_int8_activations(tmp_path):
    """from_pretrained(gptq_folder, activations="int8"): the quantize-on-load model with
    QuantizationConfig(activations="int8") of the same float folder, step for step (the folder
    stores exactly those values; same kernels), and not the folder's weight-only load (the
    option took effect)."""
    from qwen3moe import QuantizationConfig
    from qwen3moe.cli import main

    out = tmp_path / "q"
    assert main(["quantize", "--pretrained_model_dir", str(QUALITY_MODEL), "--output", str(out), "--bits", "4",
                 "--group_size", "128"]) == 0
    on_load = _steps(QuantizationConfig(4, 128, activations="int8"))
    stored = _steps(folder=out, activations="int8")
    np.testing.assert_array_equal(stored, on_load)
    assert all(not np.array_equal(a, w) for a, w in zip(stored, _steps(folder=out)))


def test_int8_activations_of_a_float_folder_are_one_line_errors(capsys):
    from helpers import cli_error
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.io.safetensors_io import CheckpointError

    with pytest.raises(CheckpointError, match="activations='int8' is only used with quantization"):
        Qwen3MoeForCausalLM.from_pretrained(QUALITY_MODEL, activations="int8")
    err = cli_error(["generate", "--pretrained_model_dir", str(QUALITY_MODEL), "--predict_data", "hi",
                     "--activations", "int8"], capsys)
    assert "activations='int8' is only used with quantization" in err


def test_int8_activations_without_kernels_is_an_error(monkeypatch):
    from helpers import clear_kernel_caches
    from qwen3moe import QuantizationConfig, Qwen3MoeForCausalLM

    with pytest.raises(ValueError, match="activations must be one of"):
        QuantizationConfig(4, 128, activations="int4")
    monkeypatch.setenv("QWEN3MOE_KERNELS", "0")
    clear_kernel_caches()
    try:
        with pytest.raises(ValueError, match="activations='int8' needs the fused decode kernels"):
            Qwen3MoeForCausalLM.from_pretrained(QUALITY_MODEL, quantization=QuantizationConfig(8, -1, activations="int8"))
    finally:
        monkeypatch.delenv("QWEN3MOE_KERNELS")
        clear_kernel_caches()
