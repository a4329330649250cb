"""The int8-activation mode in the forward / prefill ops (kernels/quant.py `act8=True`:
csrc/quant_vnni.h rows for 1-4 x rows, csrc/quant_gemm8.h's token-in-lane GEMM above) against
the NumPy implementation of the mode's arithmetic (kernel_reference.act8_reference: activations
quantized per 16-input block, integer sums exact in int64, float64 scaling).

Tolerance: the GEMM regroups the sum as s_w * (sum_b sx_b * sum_k u q - z * sum_b sx_b * sum_k q)
per weight group, in float32. Each partial sum is exact before its float conversion (|sum u q| <=
255 * 127 * 16 < 2^24), so the error is float32 rounding of at most I / 16 + 2G additions of terms
bounded by `regrouped_magnitude` below: <= (I / 16 + 2G) * 2^-24 relative to it, 7.8e-6 at I = 2048
g = 128; bound 1e-5 of it (the decode rows' terms are a subset, tests/test_act8_kernel.py).
Both the AVX512-VNNI loop and the portable scalar loop run.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kernel_reference import ACT_BLOCK, act8_case, act8_reference, call_aot, quant_arrays, quantize_act
from qwen3moe.kernels import quant

pytestmark = pytest.mark.skipif(not quant.available(), reason="quant kernels not built here")


def unpack(arrays, I):
    q, s, z = arrays
    u = q if q.shape[-1] == I else np.stack([q & 15, q >> 4], -1).reshape(*q.shape[:-1], I)
    return u, z, s


def regrouped_magnitude(x_TI, u_OI, z_OG, s_OG):
    """[T, O]: sum over groups of |s_w| * (sum_b |sx_b sum_k u q| + |z| sum_b |sx_b sum_k q|)."""
    q, sx = quantize_act(x_TI)
    O, I = u_OI.shape
    G = z_OG.shape[1]
    NB = I // ACT_BLOCK
    uq = np.abs(np.einsum("tbk,obk->tob", q.reshape(-1, NB, ACT_BLOCK), u_OI.astype(np.int64).reshape(O, NB, ACT_BLOCK))
                * sx.astype(np.float64)[:, None, :])
    zq = np.abs(q.reshape(-1, NB, ACT_BLOCK).sum(-1) * sx.astype(np.float64))  # [T, NB]
    per_g = (uq.reshape(*uq.shape[:2], G, NB // G).sum(-1)
             + z_OG.astype(np.float64)[None] * zq.reshape(-1, 1, G, NB // G).sum(-1))
    return (np.abs(s_OG.astype(np.float64))[None] * per_g).sum(-1)


def check_linear(x, arrays, y):
    u, z, s = unpack(arrays, x.shape[1])
    ref, mag = act8_reference(x, u, z, s)
    bound = 1e-5 * np.maximum(mag, regrouped_magnitude(x, u, z, s)) + 1e-30
    np.testing.assert_array_less(np.abs(y - ref), bound)


@contextmanager
def portable(on: bool):
    """The kernels' portable scalar path on (or the vector path), back to the vector path after."""
    quant.set_portable(on)
    try:
        yield
    finally:
        quant.set_portable(False)


def linear(x, arrays, act8=True):
    y = np.zeros((x.shape[0], arrays[0].shape[0]), np.float32)
    assert call_aot(quant.library(), "QuantLinearFwdA8" if act8 else "QuantLinearFwd", [x, *arrays, y]) == 0
    return y


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([8, 4]), g=st.sampled_from([None, 32, 64, 128]), I=st.sampled_from([128, 256, 384]),
       O=st.integers(1, 53), T=st.sampled_from([1, 4, 5, 7, 16, 17, 33, 64, 100]), sym=st.booleans(),
       scalar=st.booleans(), zero_block=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_matches_numpy(bits, g, I, O, T, sym, scalar, zero_block, seed):
    """1-4 rows (decode rows), 5+ rows (GEMM): one partial token vector (T 5, 7), a pair and a
    partial single (T 33), whole pairs (T 64) and a partial pair (T 100); weight blocks of 24 rows
    with 1-23 left over (O up to 53)."""
    rng = np.random.default_rng(seed)
    arrays, x = act8_case(rng, bits, g, I, O, T, sym, zero_block, ACT_BLOCK)
    with portable(scalar):
        y = linear(x, arrays)
    check_linear(x, arrays, y)


def test_vector_and_scalar_agree_at_real_geometry():
    """q_proj-sized weight (1000 x 2048 rows: 41 blocks + 16) on 130 rows: vector and scalar
    GEMM both within the bound of the reference."""
    rng = np.random.default_rng(5)
    for mode, g in (("int8", None), ("int4", 128)):
        arrays, _ = quant_arrays(rng, (1000, 2048), mode, g, scale=0.01)
        arrays[2][:] = 128 if mode == "int8" else 8
        x = rng.standard_normal((130, 2048)).astype(np.float32)
        check_linear(x, arrays, linear(x, arrays))
        with portable(True):
            y_s = linear(x, arrays)
        check_linear(x, arrays, y_s)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([8, 4]), g=st.sampled_from([None, 32, 64, 128]), I=st.sampled_from([128, 256, 384]),
       O=st.integers(16, 70), T=st.sampled_from([5, 16, 17, 33, 100]), sym=st.booleans(), seed=st.integers(0, 2**16))
def test_amx_tiles_equal_vpdpbusd(bits, g, I, O, T, sym, seed):
    """Where this process can run AMX tiles (csrc/quant_amx.h), the GEMM on them gives the
    vpdpbusd loop's outputs bit for bit: the same exact integer block sums, then the same float
    operations in the same order. Rows in 16-row tiles with 0-15 left to the vector loop (O 16-70),
    partial token vectors (T 5, 17, 33, 100). Elsewhere asking for AMX is an error."""
    if not quant.amx_supported():
        with pytest.raises(RuntimeError, match="AMX"):
            quant.set_amx(True)
        return
    rng = np.random.default_rng(seed)
    arrays, x = act8_case(rng, bits, g, I, O, T, sym, False, ACT_BLOCK)
    try:
        quant.set_amx(False)
        y_vnni = linear(x, arrays)
    finally:
        quant.set_amx(True)
    np.testing.assert_array_equal(linear(x, arrays), y_vnni)


def test_shapes_outside_the_mode_keep_fp32_activations():
    """An input width that is not a whole 64-input chunk (int8: the decode rule) and bf16
    weights give the fp32-activation result exactly."""
    rng = np.random.default_rng(6)
    for mode, shape in (("int8", (20, 96)), ("bf16", (20, 128))):
        arrays, _ = quant_arrays(rng, shape, mode, None, scale=0.01)
        x = rng.standard_normal((40, shape[1])).astype(np.float32)
        np.testing.assert_array_equal(linear(x, arrays), linear(x, arrays, act8=False))


def _moe_reference(x, idx, wt, gate_up, down):
    """sum_j w_tj * down(SwiGLU(gate_up(x_t))) with each projection in the act8 arithmetic."""
    (gu_u, gu_z, gu_s), (d_u, d_z, d_s) = gate_up, down
    F = d_u.shape[2]
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            h, _ = act8_reference(x[t:t + 1], gu_u[e], gu_z[e], gu_s[e])
            h = h[0].astype(np.float32)
            a = (h[:F] / (1 + np.exp(-h[:F])) * h[F:]).astype(np.float32)
            d, _ = act8_reference(a[None], d_u[e], d_z[e], d_s[e])
            y[t] += wt[t, j] * d[0]
    return y


@pytest.mark.parametrize("mode,g", [("int8", None), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("scalar", [False, True])
def test_moe_experts_match_numpy(mode, g, scalar):
    """Experts with 0, 3 (decode rows) and ~16 rows (GEMM) in one call, H 256, F 128.
    The reference rounds each expert's gate_up output and SwiGLU to float32 as the kernel holds
    them; the activation quantization of the down input can then flip a rounding where the
    kernel's float32 gate_up differs in the last bit, so the bound is relative to the output
    scale (1e-3), not the per-term bound above."""
    rng = np.random.default_rng(7)
    E, H, F, T, K = 6, 256, 128, 40, 2
    gate_up, _ = quant_arrays(rng, (E, 2 * F, H), mode, g, scale=0.002)
    down, _ = quant_arrays(rng, (E, H, F), mode, g, scale=0.002)
    x = rng.standard_normal((T, H)).astype(np.float32)
    idx = np.stack([rng.choice(E - 1, K, replace=False) for _ in range(T)]).astype(np.int32)
    idx[:3, 0] = E - 1  # expert E-1: 3 rows; expert 0..E-2: ~16 each
    wt = rng.random((T, K)).astype(np.float32)
    y = np.zeros_like(x)
    with portable(scalar):
        assert call_aot(quant.library(), "QuantMoeFwdA8", [x, idx, wt, *gate_up, *down, y]) == 0
    counts = np.bincount(idx.ravel(), minlength=E)
    assert counts[E - 1] < 5 and counts[:E - 1].min() >= 5
    ref = _moe_reference(x, idx, wt, tuple(unpack(gate_up, H)), tuple(unpack(down, F)))
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-3 * np.abs(ref).max())
    y_fp = np.zeros_like(x)
    assert call_aot(quant.library(), "QuantMoeFwd", [x, idx, wt, *gate_up, *down, y_fp]) == 0
    assert not np.array_equal(y, y_fp)  # the mode took effect


FORWARD_MEASURED = 0.0072  # max |logit diff| / max |logit|, int4 g128 act8 vs weight-only forward below


def test_model_forward_takes_the_mode():
    """QuantizationConfig(activations="int8") reaches the forward / prefill layers (attention
    projections, experts, lm_head): every position's logits change, within the activation
    rounding error (measured FORWARD_MEASURED on the trained quality fixture, bound 3x that; a
    wrong scale or lane order gives O(1) differences)."""
    from mindspore import Tensor

    from helpers import REPO
    from qwen3moe import QuantizationConfig, Qwen3MoeForCausalLM

    ids = Tensor(np.random.default_rng(2).integers(0, 1000, (2, 40)).astype(np.int32))
    logits = {}
    for act in ("float32", "int8"):
        model = Qwen3MoeForCausalLM.from_pretrained(REPO / "tests" / "fixtures" / "quality" / "model",
                                                    quantization=QuantizationConfig(4, 128, activations=act))
        logits[act] = model(ids).logits.asnumpy()
    a, w = logits["int8"], logits["float32"]
    assert (np.abs(a - w).max(-1) > 0).all()
    assert np.abs(a - w).max() / np.abs(w).max() <= 3 * FORWARD_MEASURED
