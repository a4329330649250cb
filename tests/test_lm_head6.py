"""The opt-in 6-bit lm_head (QuantizationConfig(lm_head_bits=6), docs/quantization.md) against an
independent NumPy reference of its documented layout, written here from the layout's definition
(index arithmetic per input, not layers/quant.py's slice-wise pack / unpack):
  row of 3I/4 bytes; byte j < I/2: low nibble = u[2j] & 15, high nibble = u[2j+1] & 15;
  byte I/2 + m: u[4m + t] >> 4 at bits 2t .. 2t+1; one group per row, z = 32, float16 scale,
  W = (u - 32) * s, s = max|W_row| / 31 rounded up to float16, u = rint(W / s) + 32.
Kernels (decode rows / head, quantized linear, vector and portable loops, fp32 and int8
activations), the composite dequantization, a tiny model and the one-line errors.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import HF_FIXTURES, cli_error
from kernel_reference import act8_reference, call_aot, rms_ref
from qwen3moe import Qwen3MoeForCausalLM
from qwen3moe.kernels import decode as decode_kernel
from qwen3moe.kernels import quant
from qwen3moe.layers.quant import QuantizationConfig, QuantizationError, dequantize, pack, quantize, unpack

FP32 = HF_FIXTURES / "tiny-fp32-gqa"
TIED = HF_FIXTURES / "tiny-bf16-tied-yarn"
kernels = pytest.mark.skipif(not (decode_kernel.available() and quant.available()), reason="kernels not built here")


# ---- independent reference ----------------------------------------------------------------
def ref_pack6(u: np.ndarray) -> np.ndarray:
    O, I = u.shape
    out = np.zeros((O, 3 * I // 4), np.uint8)
    for k in range(I):
        out[:, k // 2] |= ((u[:, k] & 15) << (4 * (k % 2))).astype(np.uint8)
        out[:, I // 2 + k // 4] |= (((u[:, k] >> 4) & 3) << (2 * (k % 4))).astype(np.uint8)
    return out


def ref_unpack6(q: np.ndarray) -> np.ndarray:
    I = q.shape[-1] * 4 // 3
    k = np.arange(I)
    lo = (q[:, k // 2] >> (4 * (k % 2))) & 15
    hi = (q[:, I // 2 + k // 4] >> (2 * (k % 4))) & 3
    return (lo | (hi << 4)).astype(np.int64)


def ref_quantize6(w: np.ndarray):
    """(u int64 [O, I], s float16 [O, 1]) from the definition, row by row."""
    O, I = w.shape
    u, s = np.zeros((O, I), np.int64), np.zeros((O, 1), np.float16)
    for o in range(O):
        x = np.float32(np.abs(w[o]).max()) / np.float32(31)
        h = np.float16(x)
        s[o, 0] = np.nextafter(h, np.float16(np.inf)) if np.float32(h) < x else h
        sf = np.float32(s[o, 0])
        u[o] = 32 if sf == 0 else np.rint(w[o].astype(np.float32) / sf).astype(np.int64) + 32
    return u, s


def ref_weight(q, s, z) -> np.ndarray:
    """float64 W of the layout (exact: u - z integer, s a float16)."""
    return (ref_unpack6(q) - z.astype(np.int64)) * s.astype(np.float64)


def case(rng, O: int, I: int, sym: bool = True):
    u = rng.integers(0, 64, (O, I))
    z = np.full((O, 1), 32, np.uint8) if sym else rng.integers(0, 64, (O, 1)).astype(np.uint8)
    s = (rng.uniform(0.5, 2.0, (O, 1)) * 0.01).astype(np.float16)
    return [ref_pack6(u), s, z]


# ---- (a) format ------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(O=st.integers(1, 6), I4=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-4, 0.02, 3.0, 900.0]))
def test_pack_quantize_match_reference(O, I4, seed, scale):
    """pack / unpack are the documented layout; quantize is RTN on the unclipped grid, so
    |W - deq| <= s/2 per weight, slack: fp32 rounding of w/s and of (u - z) * s (2 ulp of |W|)."""
    I = 4 * I4
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 64, (O, I)).astype(np.uint8)
    np.testing.assert_array_equal(pack(u, 6), ref_pack6(u))
    np.testing.assert_array_equal(unpack(ref_pack6(u), 6), u)
    w = (rng.standard_normal((O, I)) * scale).astype(np.float32)
    w[0, 0] = 0.0 if O == 1 else w[0, 0]
    q, s, z = quantize(w, 6, I)
    ru, rs = ref_quantize6(w)
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_array_equal(q, ref_pack6(ru))
    assert (z == 32).all() and ru.min() >= 1 and ru.max() <= 63
    err = np.abs(w - dequantize(q, s, z, 6))
    assert (err <= s.astype(np.float32) / 2 + 2 * np.spacing(np.abs(w))).all()
    np.testing.assert_array_equal(dequantize(q, s, z, 6), ref_weight(q, s, z).astype(np.float32))


def test_composite_dequant_is_the_reference():
    """dequant_graph (QWEN3MOE_KERNELS=0's path) computes exactly (u - z) * s."""
    from mindspore import Tensor

    from qwen3moe.layers.quant import dequant_graph

    arrays = case(np.random.default_rng(5), 7, 96, sym=False)
    got = dequant_graph(*[Tensor(a) for a in arrays], 6).asnumpy()
    np.testing.assert_array_equal(got, ref_weight(*arrays).astype(np.float32))


# ---- (b) kernels ---------------------------------------------------------------------------
def decode_rows(x, arrays, act8: bool) -> np.ndarray:
    y = np.zeros((x.shape[0], arrays[0].shape[0]), np.float32)
    fcfg = np.array([1e-6, 1.0, 1.0 if act8 else 0.0], np.float32)
    assert call_aot(decode_kernel.library(), "DecodeRows", [x, *arrays, fcfg, y]) == 0
    return y


def check(y, x, arrays, act8: bool):
    """fp32 activations: vs float64 x @ W^T within 1e-5 of sum |x| |W| (fp32 summation order
    over <= 512 products: ~I * 2^-24 relative, x10 margin). act8: vs kernel_reference's exact
    int8-activation arithmetic, 1e-5 of the pieces' magnitudes (as tests/test_act8_kernel.py)."""
    q, s, z = arrays
    if act8:
        ref, mag = act8_reference(x, ref_unpack6(q), z, s)
        np.testing.assert_array_less(np.abs(y - ref), 1e-5 * mag + 1e-30)
        return
    w = ref_weight(q, s, z)
    tol = 1e-5 * (np.abs(x.astype(np.float64)) @ np.abs(w).T) + 1e-30
    np.testing.assert_array_less(np.abs(y - x.astype(np.float64) @ w.T), tol)


def _portable(on: bool) -> None:
    quant.set_portable(on)  # one flag for both libraries (the inline function's unique static)


@kernels
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(I=st.sampled_from([32, 96, 128, 256, 384]), O=st.integers(1, 41), B=st.integers(1, 6), sym=st.booleans(),
       act8=st.booleans(), portable=st.booleans(), seed=st.integers(0, 2**16))
def test_decode_rows_match_reference(I, O, B, sym, act8, portable, seed):
    """The decode row kernels (the head's loop): AVX-512 (I % 32 == 0, act8: I % 128 == 0, else
    the fp32-activation loops) and the portable scalar loops."""
    rng = np.random.default_rng(seed)
    arrays = case(rng, O, I, sym)
    x = (rng.standard_normal((B, I)) * rng.choice([0.1, 1, 30], (B, 1))).astype(np.float32)
    _portable(portable)
    try:
        y = decode_rows(x, arrays, act8)
    finally:
        _portable(False)
    check(y, x, arrays, act8 and I % 128 == 0)


@kernels
@pytest.mark.parametrize("portable", [False, True], ids=["vector", "portable"])
@pytest.mark.parametrize("act8", [False, True], ids=["fp32", "act8"])
def test_decode_head_matches_reference(portable, act8):
    """DecodeHead: logits of the last position = rms(x[:, -1]) @ W^T (vocab rows in 256-row tasks)."""
    rng = np.random.default_rng(1)
    B, S, H, V = 2, 3, 256, 700
    arrays = case(rng, V, H)
    x = rng.standard_normal((B, S, H)).astype(np.float32)
    norm = rng.uniform(0.5, 1.5, H).astype(np.float32)
    y = np.zeros((B, V), np.float32)
    fcfg = np.array([1e-6, 1.0, float(act8)], np.float32)
    _portable(portable)
    try:
        assert call_aot(decode_kernel.library(), "DecodeHead", [x, norm, *arrays, fcfg, y]) == 0
    finally:
        _portable(False)
    z = rms_ref(x[:, -1].astype(np.float64), norm.astype(np.float64)).astype(np.float32)
    check(y, z, arrays, act8)


@kernels
@pytest.mark.parametrize("portable", [False, True], ids=["vector", "portable"])
@pytest.mark.parametrize("T", [1, 3, 37])
@pytest.mark.parametrize("act8", [False, True], ids=["fp32", "act8"])
def test_quant_linear_matches_reference(portable, T, act8):
    """QuantLinearFwd[A8]: decode rows for few x rows, the dequantized-tile GEMM / int8 GEMM
    (6-bit rows unpacked to bytes) for many."""
    from mindspore import Tensor

    rng = np.random.default_rng(T)
    arrays = case(rng, 90, 256, sym=False)
    x = rng.standard_normal((T, 256)).astype(np.float32)
    _portable(portable)
    try:
        y = quant.linear(Tensor(x), *[Tensor(a) for a in arrays], 6, act8=act8).asnumpy()
    finally:
        _portable(False)
    check(y, x, arrays, act8)


# ---- (d) a tiny model -------------------------------------------------------------------------
def test_tiny_model_lm_head6(monkeypatch):
    """from_pretrained(..., lm_head_bits=6): the lm_head holds the reference quantization of the
    folder's float lm_head; the kernel forward equals the composite one (QWEN3MOE_KERNELS=0) up to
    fp32 summation order (1e-4 of max |logit|, as tests/test_quant.py), greedy tokens equal."""
    from helpers import clear_kernel_caches
    from qwen3moe.io.hf_checkpoint import CheckpointSource

    ids = np.random.default_rng(2).integers(0, 1024, (2, 9))
    outs = []
    for env in ("1", "0"):
        monkeypatch.setenv("QWEN3MOE_KERNELS", env)
        clear_kernel_caches()
        m = Qwen3MoeForCausalLM.from_pretrained(FP32, quantization="int4", group_size=32, lm_head_bits=6)
        head = m.lm_head
        assert head.bits == 6 and head.use_kernel == (env == "1" and quant.available())
        outs.append((m(ids).logits.asnumpy(), np.asarray(m.generate(ids, max_new_tokens=4, do_sample=False,
                                                                      ignore_eos=True))))
    clear_kernel_caches()
    w = CheckpointSource(str(FP32)).read("lm_head.weight").astype(np.float32)
    u, s = ref_quantize6(w)
    np.testing.assert_array_equal(head.qweight.asnumpy(), ref_pack6(u))
    np.testing.assert_array_equal(head.scales.asnumpy(), s)
    np.testing.assert_array_equal(head.dequant().asnumpy(), ((u - 32) * s.astype(np.float64)).astype(np.float32))
    (a, ga), (b, gb) = outs
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    np.testing.assert_array_equal(ga, gb)


def test_gptq_folder_loads_its_float_lm_head_in_6_bits(tmp_path):
    """A GPTQ folder (ours, written by `quantize`) keeps the lm_head float: lm_head_bits=6 loads
    it as the reference 6-bit quantization, the projections as stored (the same model as with
    quantization= on the float folder)."""
    from qwen3moe.cli import main

    out = tmp_path / "q"
    assert main(["quantize", "--pretrained_model_dir", str(FP32), "--output", str(out), "--bits", "4",
                 "--group_size", "32"]) == 0
    a = Qwen3MoeForCausalLM.from_pretrained(FP32, quantization="int4", group_size=32, lm_head_bits=6)
    b = Qwen3MoeForCausalLM.from_pretrained(out, lm_head_bits=6)
    assert b.lm_head.bits == 6
    np.testing.assert_array_equal(a.lm_head.qweight.asnumpy(), b.lm_head.qweight.asnumpy())
    ids = np.random.default_rng(3).integers(0, a.config.vocab_size, (2, 9))
    np.testing.assert_array_equal(a(ids).logits.asnumpy(), b(ids).logits.asnumpy())


def test_tensor_parallel_lm_head_rows_are_the_single_process_rows():
    """tp=2: each rank quantizes its vocab rows of the float lm_head (per row, so a row split is
    exact): its 6-bit cell equals the single-process cell's rows."""
    from types import SimpleNamespace

    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.parallelize import parallelize

    qc = QuantizationConfig(8, -1, lm_head_bits=6)  # per channel: no group for a tp split to cut
    one = Qwen3MoeForCausalLM.from_pretrained(FP32, quantization=qc).lm_head
    cfg, V = Qwen3MoeConfig.from_pretrained(FP32), one.out_features
    for r in range(2):
        head = parallelize(cfg, Mesh(tp=2), r, str(FP32), coll=SimpleNamespace(groups={}),
                           quantization=qc).model.lm_head.inner
        rows = slice(r * V // 2, (r + 1) * V // 2)
        assert head.bits == 6
        for name in ("qweight", "scales", "qzeros"):
            np.testing.assert_array_equal(getattr(head, name).asnumpy(), getattr(one, name).asnumpy()[rows])


# ---- (e) errors ------------------------------------------------------------------------------
def test_bad_lm_head_bits_are_one_line_errors():
    cases = [
        (lambda: QuantizationConfig(4, 128, lm_head_bits=4), "quantization lm_head_bits must be one of (8, 6), got 4"),
        (lambda: Qwen3MoeForCausalLM.from_pretrained(FP32, lm_head_bits=6), "lm_head_bits=6 is only used with"),
        (lambda: Qwen3MoeForCausalLM.from_pretrained(TIED, quantization="int8", lm_head_bits=6),
         "lm_head_bits=6 needs an untied lm_head"),
        (lambda: Qwen3MoeForCausalLM.from_pretrained(FP32, quantization=QuantizationConfig(8, -1), lm_head_bits=6),
         "lm_head_bits is set both"),
    ]
    for fn, words in cases:
        with pytest.raises(ValueError) as info:
            fn()
        assert words in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert issubclass(QuantizationError, ValueError)


@pytest.mark.parametrize("argv,words", [
    (["--lm_head_bits", "6"], "lm_head_bits=6 is only used with"),
    (["--quantize", "int8", "--lm_head_bits", "6", "--tied"], "needs an untied lm_head"),
])
def test_cli_lm_head_bits_errors(argv, words, capsys, tmp_path):
    folder = TIED if "--tied" in argv else FP32
    argv = [a for a in argv if a != "--tied"]
    err = cli_error(["generate", "--pretrained_model_dir", str(folder), "--predict_data", "hi",
                     "--max_new_tokens", "1", "--output", str(tmp_path / "o.jsonl"), *argv], capsys)
    assert words in err, err


def test_cli_bad_value_is_refused(capsys):
    from qwen3moe.cli import main

    with pytest.raises(SystemExit) as info:
        main(["generate", "--pretrained_model_dir", str(FP32), "--predict_data", "hi", "--lm_head_bits", "5"])
    assert info.value.code == 2 and "--lm_head_bits" in capsys.readouterr().err
