"""bf16 / int8 / int4 forward ops (kernels/quant.py) against an independent NumPy reference.

The reference never unpacks: it draws the integer codes u, zero points z and fp16 scales s first,
builds W = (u - z) * s in float64 from them, and only then packs u into the kernel layout (4 bits:
low nibble = even input index) as docs/quantization.md specifies. Asymmetric zero points and
every group size that divides I are drawn, so a swapped nibble, a wrong group index or a misread
zero point errs at O(1).
Tolerance: the kernel's dequantized weights are the exact float32 rounding of (u - z) * s (one
rounding), so it differs from the float64 reference only by fp32 rounding and summation order:
|err| <= 1e-5 * sum_k |x_k W_ok| (fp32 summation error ~ sqrt(n) eps of the absolute sum, n <= 512).
Both code paths run: AVX-512 (I a multiple of 32 and of the group) and the portable scalar loops
(forced with set_portable, and taken by shapes the vector path does not cover).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mindspore as ms
from mindspore import Tensor

from kernel_reference import call_aot, quant_arrays
from qwen3moe.kernels import quant
from qwen3moe.layers.quant import QuantizedWeight

pytestmark = pytest.mark.skipif(not quant.available(), reason="quant kernels not buildable here")
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def make_weight(rng, shape, mode, g=None):
    """(tensors for the op, float64 reference W) for a weight of `shape` [..., O, I]."""
    arrays, w = quant_arrays(rng, shape, mode, g)
    if mode == "bf16":
        return (Tensor(w.astype(np.float32), dtype=ms.bfloat16),), w
    return tuple(Tensor(a) for a in arrays), w


def _check(got, x, w):
    ref = x.astype(np.float64) @ np.swapaxes(w, -1, -2)
    bound = np.abs(x.astype(np.float64)) @ np.abs(np.swapaxes(w, -1, -2))
    assert got.shape == ref.shape
    assert np.all(np.abs(got - ref) <= 1e-5 * bound + 1e-30), np.abs(got - ref).max()


@pytest.fixture(params=["amx", "vector", "portable"])
def portable(request):
    """The kernels' code paths: AMX tiles (csrc/quant_amx_bf16.h: bf16 / int8 / int4 rows in whole
    16-row tiles, >= 16 x rows) where this process can run them, else the AVX-512 loops; the
    AVX-512 loops; the portable scalar loops."""
    quant.set_amx(request.param == "amx" and quant.amx_supported())
    quant.set_portable(request.param == "portable")
    yield request.param == "portable"
    quant.set_portable(False)
    quant.set_amx(quant.amx_supported())


@SETTINGS
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(["bf16", "int8", "int4"]),
       lead=st.sampled_from([(1,), (3,), (2, 5), (17,), (40,)]), O=st.sampled_from([1, 3, 7, 64, 130]),
       I=st.sampled_from([32, 64, 96, 256, 40]), gdiv=st.sampled_from([1, 2, 4, 8]), per_row=st.booleans())
def test_linear_equals_numpy(portable, seed, mode, lead, O, I, gdiv, per_row):
    """Decode-shaped (T < 16: streaming rows) and prefill-shaped (T >= 16: dequantized tiles + sgemm)."""
    rng = np.random.default_rng(seed)
    g = I if per_row or mode == "bf16" else I // gdiv
    if mode == "int4" and g % 2:
        g = I
    weight, w = make_weight(rng, (O, I), mode, g)
    x = rng.standard_normal((*lead, I)).astype(np.float32)
    got = quant.linear(Tensor(x), weight).asnumpy()
    _check(got, x, w)
    if mode != "bf16":  # the loose form the model side calls: tensors then bits
        loose = quant.linear(Tensor(x), *weight, 8 if mode == "int8" else 4).asnumpy()
        np.testing.assert_array_equal(loose, got)


@ms.jit
def _jit_linear(x, *weight):
    return quant.linear(x, weight)


def test_linear_real_geometry_under_jit():
    """q_proj / o_proj shapes of Qwen3-30B-A3B at g 128, one decode row and a 40-row prefill, compiled."""
    rng = np.random.default_rng(0)
    for mode in ("int4", "int8", "bf16"):
        weight, w = make_weight(rng, (4096, 2048), mode, 128 if mode == "int4" else None)
        for T in (1, 40):
            x = rng.standard_normal((T, 2048)).astype(np.float32)
            _check(_jit_linear(Tensor(x), *weight).asnumpy(), x, w)


def _moe_reference(x, idx, wt, gu, dn):
    F = dn.shape[2]
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            h = gu[idx[t, j]] @ x[t]
            a = h[:F] / (1 + np.exp(-h[:F])) * h[F:]
            y[t] += wt[t, j] * (dn[idx[t, j]] @ a)
    return y


@SETTINGS
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(["bf16", "int8", "int4"]), T=st.sampled_from([1, 3, 29]),
       E=st.sampled_from([2, 5, 16]), K=st.integers(1, 2), H=st.sampled_from([32, 64, 48]), F=st.sampled_from([32, 64]),
       g=st.sampled_from([None, 16, 32]))
def test_moe_experts_equal_numpy(portable, seed, mode, T, E, K, H, F, g):
    """Experts with no rows, one row (streaming) and >= 16 rows (tiles + sgemm: T 29, few experts)."""
    rng = np.random.default_rng(seed)
    gate_up, gu = make_weight(rng, (E, 2 * F, H), mode, g if g is None or H % g == 0 else 16)
    down, dn = make_weight(rng, (E, H, F), mode, g)
    x = rng.standard_normal((T, H)).astype(np.float32)
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    wt = rng.random((T, K)).astype(np.float32)
    y = quant.moe_experts(Tensor(x), Tensor(idx), Tensor(wt), gate_up, down).asnumpy()
    np.testing.assert_array_equal(quant.moe_experts(Tensor(x), Tensor(idx), Tensor(wt), *gate_up, *down).asnumpy(), y)
    ref = _moe_reference(x, idx, wt, gu, dn)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_many_rows_equal_numpy(portable, mode):
    """Prefill-sized calls: whole and partial 64-row token groups (T 130 = 64 + 64 + 2), 24-row
    weight blocks plus a tail (O 50), 16-row tiles in blocks of 4 plus 1 (O 80), and experts
    holding > 64 rows each."""
    rng = np.random.default_rng(1)
    for O in (50, 80):
        weight, w = make_weight(rng, (O, 256), mode, 64)
        x = rng.standard_normal((130, 256)).astype(np.float32)
        _check(quant.linear(Tensor(x), weight).asnumpy(), x, w)
    T, E, H, F = 150, 2, 128, 96
    gate_up, gu = make_weight(rng, (E, 2 * F, H), mode, 32)
    down, dn = make_weight(rng, (E, H, F), mode, 32)
    x = rng.standard_normal((T, H)).astype(np.float32)
    idx = rng.integers(0, E, (T, 1)).astype(np.int32)
    wt = rng.random((T, 1)).astype(np.float32)
    y = quant.moe_experts(Tensor(x), Tensor(idx), Tensor(wt), gate_up, down).asnumpy()
    ref = _moe_reference(x, idx, wt, gu, dn)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("bad,match", [
    (lambda q, s, z: (q, s.astype(ms.float32), z), "scales float16"),
    (lambda q, s, z: (q[:, :5], s, z), "qweight uint8"),
    (lambda q, s, z: (q, Tensor(np.ones((8, 3), np.float16)), Tensor(np.ones((8, 3), np.uint8))),
     "G dividing the input width, 64"),
    (lambda q, s, z: (q, s, z[:, :1]), "qzeros uint8"),
    (lambda q, s, z: (q, s), "2 tensors"),
    (lambda q, s, z: (q, s, z, 8), "bits=8 does not match"),
    (lambda q, s, z: (q, s, z, 6), "bits=6 does not match"),
    # 6 bits (one group per row): [O, 3 I / 4] = [8, 48] fits, one byte short does not
    (lambda q, s, z: (Tensor(np.zeros((8, 47), np.uint8)), s[:, :1], z[:, :1]),
     r"P = 64 \(8 bits\), 32 \(4 bits\) or 48 \(6 bits\) for input width 64 in 1 groups"),
    (lambda q, s, z: (q, s, z, 5), "linear weight: bits: expected 4, 6 or 8, got 5$"),
])
def test_bad_weight_is_a_one_line_error(bad, match):
    weight, _ = make_weight(np.random.default_rng(0), (8, 64), "int4", 32)
    with pytest.raises(ValueError, match=match) as info:
        quant.linear(Tensor(np.ones((2, 64), np.float32)), *bad(*weight))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("I", [4, 64, 2048, 6144])
def test_packed_width_is_the_layout_rule(I):
    """The bytes per qweight row as docs/quantization.md states them, and as the layer allocates."""
    want = {8: I, 6: 3 * I // 4, 4: I // 2}
    assert {b: quant.packed_width(I, b) for b in want} == want
    for b in want:  # per channel (6 bits: one group per row)
        assert QuantizedWeight((), 3, I, b, I).qweight.shape == (3, want[b])
    with pytest.raises(ValueError, match="bits: expected 4, 6 or 8, got 5"):
        quant.packed_width(I, 5)


def _cpp_takes(I: int, P: int, G: int, lead: tuple) -> bool:
    """Whether csrc/quant_common.h parse_weight takes a uint8 qweight [*lead, O, P] with scales /
    qzeros [*lead, O, G] at input width I, transcribed from its C++ (the kind follows from P)."""
    if P <= 0 or G <= 0 or I % G:
        return False
    if P == I:  # kQ8
        return True
    if 2 * P == I:  # kQ4: g = I / G even
        return (I // G) % 2 == 0
    if 4 * P == 3 * I:  # kQ6: one group a row, no lead
        return G == 1 and not lead and I % 4 == 0
    return False


def _quant_weight(lead: tuple, O: int, P: int, G: int) -> tuple:
    return (Tensor(np.zeros((*lead, O, P), np.uint8)), Tensor(np.zeros((*lead, O, G), np.float16)),
            Tensor(np.zeros((*lead, O, G), np.uint8)))


@settings(max_examples=300, deadline=None)
@given(I=st.integers(1, 70), O=st.integers(1, 3), lead=st.sampled_from([(), (2,)]), G=st.integers(1, 72),
       width=st.sampled_from(["8", "4", "6", "4+1", "6+1", "any"]), any_P=st.integers(1, 80))
def test_check_weight_takes_what_the_kernels_take(I, O, lead, G, width, any_P):
    """check_weight accepts exactly the quantized shapes parse_weight does (odd or group-straddling
    int4 and 6-bit shapes included), and the kernel agrees on the 2-D ones: a call returns status 0
    iff the weight was taken (tiny zero weights: the run is cheap)."""
    P = max(1, {"8": I, "4": I // 2, "6": 3 * I // 4, "4+1": I // 2 + 1, "6+1": 3 * I // 4 + 1, "any": any_P}[width])
    weight = _quant_weight(lead, O, P, G)
    want = _cpp_takes(I, P, G, lead)
    try:
        quant.check_weight("w", weight, I, lead)
        took = True
    except ValueError as e:
        assert str(e).startswith("w: expected qweight uint8 [") and "\n" not in str(e), str(e)
        took = False
    assert took == want, (I, P, G, lead)
    if not lead:
        arrays = [a.asnumpy() for a in weight]
        status = call_aot(quant.library(), "QuantLinearFwd",
                          [np.ones((1, I), np.float32), *arrays, np.zeros((1, O), np.float32)])
        assert (status == 0) == want, (I, P, G, status)


@pytest.mark.parametrize("I,P,G,lead,takes", [
    (7, 3, 1, (), False),      # odd width int4 (3 * 2 != 7): the kernels refuse it
    (7, 7, 7, (), True),       # the same width as int8, per input
    (6, 3, 1, (), True),       # int4, one group of 6
    (6, 3, 3, (), True),       # int4, groups of 2
    (6, 3, 2, (), False),      # int4, groups of 3: a byte would hold two groups
    (12, 9, 1, (), True),      # 6 bits
    (12, 9, 1, (2,), False),   # 6 bits for experts
    (12, 9, 2, (), False),     # 6 bits in two groups
    (10, 7, 1, (), False),     # 3 * 10 / 4 rounded down: no 6-bit layout
])
def test_check_weight_explicit_widths(I, P, G, lead, takes):
    weight = _quant_weight(lead, 4, P, G)
    if takes:
        quant.check_weight("experts down", weight, I, lead)
        return
    with pytest.raises(ValueError, match=rf"^experts down: expected qweight uint8 .* for input width {I} in {G} "
                                         rf"groups a row .*, got \({', '.join(map(str, (*lead, 4, P)))}\)$"):
        quant.check_weight("experts down", weight, I, lead)


def test_odd_width_int4_is_refused_before_the_kernel():
    """In a linear call: the one-line ValueError naming the weight, not the kernel's failed status."""
    with pytest.raises(ValueError, match=r"^linear weight: expected qweight uint8 \[O, P\] with P = 7 \(8 bits\) "):
        quant.linear(Tensor(np.ones((2, 7), np.float32)), *_quant_weight((), 8, 3, 1), 4)
