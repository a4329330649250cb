"""Quantized weights with an input permutation (act-order GPTQ converted at load time: columns
sorted by group plus perm int32 [I], y[o] = sum_j W[o, j] x[perm[j]]; csrc/quant_perm.h) through
every op that reads quantized weights, against independent NumPy references.

Weights come from kernel_reference.quant_arrays (codes, zero points and fp16 scales drawn first,
W built in float64), perms from the rng (per expert for stacked experts). The float references
multiply x by the stored W with x gathered by perm, or (layer references) use W back in input
order, W_in[:, perm[j]] = W[:, j]: the same products. Tolerances are those of the tests of the
unpermuted ops (test_quant_kernel.py, test_decode_quant_kernel.py, test_act8_kernel.py,
test_prefill_act8.py), since gathering x adds no arithmetic; where the unpermuted op on
already-gathered rows exists (linear, DecodeRows, experts sharing one perm) the results must be
identical. Both the AVX-512 and the portable scalar loops run.
"""
from __future__ import annotations

import numpy as np
import pytest

from kernel_reference import (EPS, MASKED, act8_reference, call_aot, decode_weights, quant_arrays, ref_attn, ref_moe,
                              rms_ref)
from qwen3moe.kernels import decode as decode_kernel
from qwen3moe.kernels import quant

pytestmark = pytest.mark.skipif(not (quant.available() and decode_kernel.available()), reason="kernels not built here")
MODES = [("int8", None), ("int4", 32), ("int4", 128)]


@pytest.fixture(params=[False, True], ids=["vector", "portable"])
def portable(request):
    quant.set_portable(request.param)
    yield request.param
    quant.set_portable(False)


def permuted(rng, shape, mode, g, scale=0.05):
    """(kernel arrays + [perm], stored W float64 [..., O, I], perm [..., I], W in input order)."""
    arrays, w = quant_arrays(rng, shape, mode, g, scale)
    *lead, _, I = shape
    perm = np.stack([rng.permutation(I) for _ in range(int(np.prod(lead)))]).reshape(*lead, I).astype(np.int32)
    w_in = np.take_along_axis(w, np.argsort(perm, -1)[..., None, :], -1)
    return arrays + [perm], w, perm, w_in


def unpack(arrays, I):
    q, s, z = arrays[:3]
    u = q if q.shape[-1] == I else np.stack([q & 15, q >> 4], -1).reshape(*q.shape[:-1], I)
    return u, z, s


def linear(x, arrays, act8=False):
    y = np.zeros((x.shape[0], arrays[0].shape[0]), np.float32)
    assert call_aot(quant.library(), "QuantLinearFwdA8" if act8 else "QuantLinearFwd", [x, *arrays, y]) == 0
    return y


@pytest.mark.parametrize("mode,g", MODES)
@pytest.mark.parametrize("T", [1, 3, 20, 64])
def test_linear(portable, mode, g, T):
    """Decode rows (T 1, 3) and the GEMMs (T 20, 64), fp32 and int8 activations: the same numbers
    as the unpermuted weight on x[:, perm], and the references within the unpermuted tests' bounds
    (fp32: 1e-5 of sum |x W|; act8 rows: 1e-5 of the pieces' magnitudes; act8 GEMM: its
    regrouped sums, bounded here by 1e-3 of the output scale as test_prefill_act8's experts)."""
    rng = np.random.default_rng(T)
    I = 256
    arrays, w, perm, _ = permuted(rng, (40, I), mode, g)
    x = rng.standard_normal((T, I)).astype(np.float32)
    xp = np.ascontiguousarray(x[:, perm])
    y = linear(x, arrays)
    np.testing.assert_array_equal(y, linear(xp, arrays[:3]))
    ref = xp.astype(np.float64) @ w.T
    assert np.all(np.abs(y - ref) <= 1e-5 * (np.abs(xp) @ np.abs(w).T) + 1e-30)
    y8 = linear(x, arrays, act8=True)
    np.testing.assert_array_equal(y8, linear(xp, arrays[:3], act8=True))
    ref8, mag = act8_reference(xp, *unpack(arrays, I))
    bound = 1e-5 * mag if T < 5 else 1e-3 * np.abs(ref8).max()
    assert np.all(np.abs(y8 - ref8) <= bound + 1e-30)
    assert not np.array_equal(y8, y)  # the int8 mode took effect


def test_linear_through_python():
    """kernels.quant.linear / moe_experts take the 4-tuples (and the loose tensors + bits) and give
    the op's numbers; a wrong perm is a one-line error."""
    from mindspore import Tensor

    rng = np.random.default_rng(1)
    arrays, w, perm, _ = permuted(rng, (24, 128), "int4", 32)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    weight = tuple(Tensor(a) for a in arrays)
    y = quant.linear(Tensor(x), weight).asnumpy()
    np.testing.assert_array_equal(y, linear(x, arrays))
    np.testing.assert_array_equal(quant.linear(Tensor(x), *weight, 4).asnumpy(), y)
    with pytest.raises(ValueError, match=r"linear weight: expected perm int32 \[128\]"):
        quant.linear(Tensor(x), weight[:3] + (Tensor(perm.astype(np.int64)),))
    gu_a, dn_a = permuted(rng, (2, 128, 128), "int8", None)[0], permuted(rng, (2, 128, 64), "int8", None)[0]
    gu, dn = tuple(Tensor(a) for a in gu_a), tuple(Tensor(a) for a in dn_a)
    idx, wt = np.array([[1], [0]], np.int32), np.ones((2, 1), np.float32)
    route = (Tensor(x), Tensor(idx), Tensor(wt))
    y = np.zeros_like(x)
    assert call_aot(quant.library(), "QuantMoeFwd", [x, idx, wt, *gu_a, *dn_a, y]) == 0
    np.testing.assert_array_equal(quant.moe_experts(*route, gu, dn).asnumpy(), y)
    np.testing.assert_array_equal(quant.moe_experts(*route, *gu, *dn, 8).asnumpy(), y)
    with pytest.raises(ValueError, match=r"experts down: expected perm int32 \[2, 64\]"):
        quant.moe_experts(*route, gu, dn[:3] + (Tensor(dn[3].asnumpy()[:, :32]),))
    with pytest.raises(ValueError, match="pass \\(gate_up, down\\) tuples when only one carries a perm"):
        quant.moe_experts(*route, *gu, *dn[:3])


def _moe_case(rng, mode, g, H, F, down_perm=True):
    E, T, K = 6, 40, 2
    gu, gu_w, gu_p, _ = permuted(rng, (E, 2 * F, H), mode, g, scale=0.002)
    dn, dn_w, dn_p, _ = permuted(rng, (E, H, F), mode, g, scale=0.002)
    if not down_perm:
        dn, dn_p = dn[:3], np.tile(np.arange(F, dtype=np.int32), (E, 1))
    x = rng.standard_normal((T, H)).astype(np.float32)
    idx = np.stack([rng.choice(E - 1, K, replace=False) for _ in range(T)]).astype(np.int32)
    idx[:3, 0] = E - 1  # expert E-1: 3 rows (rows path), the others ~16 (GEMM)
    wt = rng.random((T, K)).astype(np.float32)
    return (x, idx, wt), (gu, gu_w, gu_p), (dn, dn_w, dn_p)


def _moe_ref(x, idx, wt, gu, dn, act8):
    """sum_j w_tj down_e(SwiGLU(gate_up_e(x_t[perm_gu[e]]))[perm_dn[e]]), fp32 or act8 projections."""
    (gu_a, gu_w, gu_p), (dn_a, dn_w, dn_p) = gu, dn
    H, F = x.shape[1], dn_w.shape[2]
    y = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(idx[t]):
            xe = x[t, gu_p[e]]
            h = act8_reference(xe[None], *(v[e] for v in unpack(gu_a, H)))[0][0] if act8 else gu_w[e] @ xe
            h = h.astype(np.float32)
            a = (h[:F] / (1 + np.exp(-h[:F])) * h[F:]).astype(np.float32)[dn_p[e]]
            d = act8_reference(a[None], *(v[e] for v in unpack(dn_a, F)))[0][0] if act8 else dn_w[e] @ a
            y[t] += wt[t, j] * d
    return y


@pytest.mark.parametrize("mode,g,H,F", [("int8", None, 128, 64), ("int4", 32, 128, 128), ("int4", 128, 256, 128)])
@pytest.mark.parametrize("act8", [False, True])
@pytest.mark.parametrize("down_perm", [True, False])
def test_moe_experts(portable, mode, g, H, F, act8, down_perm):
    """Per-expert perms on gate_up (and down): experts with 3 rows and ~16 rows in one call.
    Bounds as test_quant_kernel (fp32: 1e-4) and test_prefill_act8 (act8: 1e-3 of the output scale).
    Widths that take int8 activations (int4: multiples of 128 inputs), as the reference applies them."""
    rng = np.random.default_rng(H + F)
    (x, idx, wt), gu, dn = _moe_case(rng, mode, g, H, F, down_perm)
    y = np.zeros_like(x)
    fn = "QuantMoeFwdA8" if act8 else "QuantMoeFwd"
    assert call_aot(quant.library(), fn, [x, idx, wt, *gu[0], *dn[0], y]) == 0
    ref = _moe_ref(x, idx, wt, gu, dn, act8)
    tol = 1e-3 if act8 else 1e-4
    np.testing.assert_allclose(y, ref, rtol=0 if act8 else 1e-4, atol=tol * np.abs(ref).max())


def test_moe_experts_shared_perm_is_the_gathered_input(portable):
    """Every expert with the same gate_up perm p: exactly the unpermuted experts on x[:, p]."""
    rng = np.random.default_rng(3)
    (x, idx, wt), gu, dn = _moe_case(rng, "int4", 32, 128, 64, down_perm=False)
    p = gu[2][0]
    for act8 in (False, True):
        fn = "QuantMoeFwdA8" if act8 else "QuantMoeFwd"
        y, y_ref = np.zeros_like(x), np.zeros_like(x)
        assert call_aot(quant.library(), fn, [x, idx, wt, *gu[0][:3], np.tile(p, (6, 1)), *dn[0], y]) == 0
        assert call_aot(quant.library(), fn, [np.ascontiguousarray(x[:, p]), idx, wt, *gu[0][:3], *dn[0], y_ref]) == 0
        np.testing.assert_array_equal(y, y_ref)


class Act8Proj:
    """A permuted quantized projection in the int8-activation arithmetic for ref_attn / ref_moe,
    which write `x @ W.T` and `W[e] @ v`: applied to the input gathered by perm (act8_reference)."""
    __array_ufunc__ = None  # numpy defers `x @ proj` to __rmatmul__

    def __init__(self, arrays, perm, I):
        self.uzs, self.perm, self.I = unpack(arrays, I), perm, I
        self.shape = self.uzs[0].shape

    @property
    def T(self):
        return self

    def __getitem__(self, e):
        p = Act8Proj.__new__(Act8Proj)
        p.uzs, p.perm, p.I, p.shape = tuple(a[e] for a in self.uzs), self.perm[e], self.I, self.uzs[0][e].shape
        return p

    def __rmatmul__(self, x):
        return act8_reference(np.ascontiguousarray(x[..., self.perm], dtype=np.float32), *self.uzs)[0]

    def __matmul__(self, v):
        return self.__rmatmul__(v[None])[0]


def _in_order(w, perm):
    """W back in input order: W_in[..., perm[j]] = W[..., j]."""
    return np.take_along_axis(w, np.argsort(perm, -1)[..., None, :], -1)


def _layer(rng, mode, g, down_perm, act8):
    """Kernel arrays per weight and the reference weights (input order; act8: Act8Proj) of one
    layer, H 128, 4 query / 2 kv heads of 32, 6 experts of ffn 256; router / lm_head int8 [6, 128]
    with perms. wq and wk share a perm (one gathered input for both), wv and wo have their own."""
    w = decode_weights(rng, H=128, N=4, K=2, D=32, E=6, I=256)
    args, ref = {}, dict(w)
    for name in ("wq", "wk", "wv", "wo", "wgu", "wd", "wr"):
        m, gg = ("int8", None) if name == "wr" else (mode, g)
        arrays, stored, perm, _ = permuted(rng, w[name].shape, m, gg, scale=0.2 / (128 if m == "int8" else 8))
        if name == "wk":
            arrays[3] = perm = args["wq"][3]
        if name == "wd" and not down_perm:
            arrays, perm = arrays[:3], np.tile(np.arange(perm.shape[-1], dtype=np.int32), (perm.shape[0], 1))
        args[name] = arrays
        ref[name] = _in_order(stored, perm).astype(np.float32)
        if act8 and name != "wr":  # the router's rows keep fp32 activations in the int8 mode
            ref[name] = Act8Proj(arrays, perm, w[name].shape[-1])
    ref["head"] = Act8Proj(args["wr"], args["wr"][3], 128) if act8 else ref["wr"]
    return args, ref


@pytest.mark.parametrize("mode,g", MODES)
@pytest.mark.parametrize("act8", [False, True])
@pytest.mark.parametrize("b,down_perm", [(1, True), (1, False), (3, True)])
def test_decode_layer(portable, mode, g, act8, b, down_perm):
    """DecodeAttn, DecodeMoe (batch 1, top-2: expert ffn slices unless down has a perm) and
    DecodeHead with every projection permuted, against the NumPy layer references: fp32 within
    test_decode_quant_kernel's bound (2e-5 + 1e-5 relative); act8 against the same references
    with each projection in the act8 arithmetic on its gathered input, 1e-3 of the output scale
    (the reference's fp32 norms / SwiGLU may flip an activation rounding, as test_prefill_act8).
    act8 routes to all 6 experts, so the ffn is not sliced into widths the int8 mode does not
    take (int4 chunks of 128 inputs; those slices keep fp32 activations)."""
    rng = np.random.default_rng(b)
    top_k = 6 if act8 else 2
    args, ref = _layer(rng, mode, g, down_perm, act8)
    k, d, t, e = 2, 32, 9, 6
    kc, vc = (rng.standard_normal((b, k, t, d)).astype(np.float32) for _ in range(2))
    slot = 4
    bias = np.where(rng.random((b, t)) < 0.6, 0.0, MASKED).astype(np.float32)
    bias[:, slot] = 0
    x = rng.standard_normal((b, 1, 128)).astype(np.float32)
    ang = rng.uniform(0, 3, (b, d // 2)).astype(np.float32)
    cos, sin = np.tile(np.cos(ang), 2)[:, None], np.tile(np.sin(ang), 2)[:, None]
    meta = np.array([slot, top_k, 1, 0], np.int32)
    fcfg = np.array([EPS, d ** -0.5, float(act8)], np.float32)
    a = args
    h, kc_new, vc_new = np.zeros_like(x), kc.copy(), vc.copy()
    assert call_aot(decode_kernel.library(), "DecodeAttn",
                    [x, ref["ln1"], *a["wq"], *a["wk"], *a["wv"], ref["qn"], ref["kn"], *a["wo"], kc_new, vc_new, cos,
                     sin, bias[:, None], meta, fcfg, h]) == 0
    y = np.zeros_like(x)
    assert call_aot(decode_kernel.library(), "DecodeMoe", [h, ref["ln2"], *a["wr"], *a["wgu"], *a["wd"], meta, fcfg,
                                                           y]) == 0
    logits = np.zeros((b, e), np.float32)
    assert call_aot(decode_kernel.library(), "DecodeHead", [y, ref["ln1"], *a["wr"], fcfg, logits]) == 0
    h_ref, kc_ref, _ = ref_attn(ref, x[:, 0], kc, vc, cos[:, 0], sin[:, 0], bias, slot)
    y_ref = ref_moe(ref, h[:, 0].astype(np.float64), True, top_k)
    head_ref = rms_ref(y[:, 0], ref["ln1"]) @ ref["head"].T
    if act8:  # the branches without their residuals
        pairs = ((h[:, 0] - x[:, 0], h_ref - x[:, 0]), (y[:, 0] - h[:, 0], y_ref - h[:, 0]), (logits, head_ref))
        for got, want in pairs:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
    else:
        np.testing.assert_allclose(h[:, 0], h_ref, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(kc_new, kc_ref, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(y[:, 0], y_ref, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(logits, head_ref, atol=2e-5, rtol=1e-5)


def rows(x, arrays, act8):
    y = np.zeros((x.shape[0], arrays[0].shape[0]), np.float32)
    fcfg = np.array([EPS, 1.0, float(act8)], np.float32)
    assert call_aot(decode_kernel.library(), "DecodeRows", [x, *arrays, fcfg, y]) == 0
    return y


@pytest.mark.parametrize("mode,g", MODES)
def test_decode_rows_are_the_gathered_input(portable, mode, g):
    """DecodeRows (the decode row kernels on arbitrary x) with a perm: identical to the unpermuted
    weight on x[:, perm], with fp32 and with int8 activations (quantized after the gather)."""
    rng = np.random.default_rng(4)
    arrays, _, perm, _ = permuted(rng, (70, 256), mode, g)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    xp = np.ascontiguousarray(x[:, perm])
    for act8 in (False, True):
        np.testing.assert_array_equal(rows(x, arrays, act8), rows(xp, arrays[:3], act8))


def _bad(perm, at=0, value=None):
    bad = perm.copy()
    bad.reshape(-1, bad.shape[-1])[0 if bad.ndim == 1 else -1, at] = bad.shape[-1] if value is None else value
    return bad


def test_out_of_range_perm_fails():
    """An entry outside [0, I) (I or negative) makes each op return an error (nothing read out of
    bounds); a perm after a float weight, or of the wrong shape, is not taken: the op's layout check fails."""
    rng = np.random.default_rng(5)
    arrays, _, perm, _ = permuted(rng, (8, 64), "int8", None)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    y = np.zeros((2, 8), np.float32)
    lib, dlib = quant.library(), decode_kernel.library()
    for fn in ("QuantLinearFwd", "QuantLinearFwdA8"):
        assert call_aot(lib, fn, [x, *arrays, y]) == 0
        for value in (64, -1):
            assert call_aot(lib, fn, [x, *arrays[:3], _bad(perm, 5, value), y]) != 0
        assert call_aot(lib, fn, [x, *arrays[:3], perm[:32].copy(), y]) != 0
    bf16 = quant_arrays(rng, (8, 64), "bf16")[0]
    assert call_aot(lib, "QuantLinearFwd", [x, *bf16, perm, y]) != 0
    fcfg = np.array([EPS, 1.0], np.float32)
    logits = np.zeros((2, 8), np.float32)
    for lm in (arrays[:3] + [_bad(perm)], [rng.standard_normal((8, 64)).astype(np.float32), perm]):
        assert call_aot(dlib, "DecodeHead", [x[:, None], np.ones(64, np.float32), *lm, fcfg, logits]) != 0
    assert call_aot(dlib, "DecodeRows", [x, *arrays[:3], _bad(perm), fcfg, y]) != 0

    (xm, idx, wt), gu, dn = _moe_case(rng, "int8", None, 128, 64)
    ym = np.zeros_like(xm)
    assert call_aot(lib, "QuantMoeFwd", [xm, idx, wt, *gu[0], *dn[0], ym]) == 0
    for g_perm, d_perm in ((_bad(gu[2]), dn[2]), (gu[2], _bad(dn[2], value=-7))):  # the last expert has rows
        assert call_aot(lib, "QuantMoeFwd", [xm, idx, wt, *gu[0][:3], g_perm, *dn[0][:3], d_perm, ym]) != 0


@pytest.mark.parametrize("weight", ["wq", "wv", "wo", "wr", "wgu", "wd"])
def test_out_of_range_perm_fails_in_the_decode_layer(weight):
    rng = np.random.default_rng(6)
    args, ref = _layer(rng, "int4", 32, True, False)
    if weight in ("wgu", "wd"):  # every expert of one row of top-6 runs: the last one is checked
        args[weight][3] = _bad(args[weight][3], 3)
    else:
        args[weight][3] = _bad(args[weight][3], 3, -1)
    x = rng.standard_normal((1, 1, 128)).astype(np.float32)
    meta = np.array([0, 6, 1, 0], np.int32)
    fcfg = np.array([EPS, 32 ** -0.5], np.float32)
    out = np.zeros_like(x)
    a, dlib = args, decode_kernel.library()
    kc, sin = np.zeros((1, 2, 4, 32), np.float32), np.zeros((1, 1, 32), np.float32)
    cos = np.ones_like(sin)
    attn = call_aot(dlib, "DecodeAttn", [x, ref["ln1"], *a["wq"], *a["wk"], *a["wv"], ref["qn"], ref["kn"], *a["wo"],
                                         kc, kc.copy(), cos, sin, np.zeros((1, 1, 4), np.float32), meta, fcfg, out])
    moe = call_aot(dlib, "DecodeMoe", [x, ref["ln2"], *a["wr"], *a["wgu"], *a["wd"], meta, fcfg, out])
    assert (attn != 0) == (weight in ("wq", "wv", "wo"))
    assert (moe != 0) == (weight in ("wr", "wgu", "wd"))
