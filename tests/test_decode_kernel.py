"""Fused decode kernels (kernels/decode.py) vs an independent NumPy reference, and the fused engine
vs the composite engine.

Shapes: B batch, H hidden, N/K query/kv heads, D head_dim, T cache slots, E experts, I expert ffn.
Tolerances: float32 with different summation orders (dots of length <= 64, softmax over <= 12
keys, 2 top-k terms): 1e-5 absolute on O(1) activations.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn

from kernel_reference import (EPS, MASKED, call_aot, decode_weights as _weights, ref_attn as _ref_attn,
                              ref_moe as _ref_moe, rms_ref as _rms)
from qwen3moe.kernels import decode as decode_kernel

pytestmark = pytest.mark.skipif(not decode_kernel.available(), reason="decode kernels not built here")

B, H, N, K, D, T, E, I, TOPK = 3, 32, 4, 2, 8, 12, 6, 16, 2
_NAMES = ("ln1", "wq", "wk", "wv", "qn", "kn", "wo", "ln2", "wr", "wgu", "wd")


class _Layer(nn.Cell):
    """One decode step of one layer in a compiled graph, the caches as Parameters (as the engine)."""

    def __init__(self, w, kc, vc):
        super().__init__()
        self.w = ParameterTuple([Parameter(Tensor(w[k]), name=k) for k in _NAMES])
        self.kc = Parameter(Tensor(kc), name="kc", requires_grad=False)
        self.vc = Parameter(Tensor(vc), name="vc", requires_grad=False)
        self.dops = decode_kernel.DecodeOps(B, 1, H, E)  # head test: router weight as a [V=E, H] lm_head
        self.fcfg = Tensor(np.array([EPS, D ** -0.5], np.float32))

    @ms.jit
    def construct(self, x, cos, sin, bias, meta):
        ln1, wq, wk, wv, qn, kn, wo, ln2, wr, wgu, wd = self.w
        h = self.dops.attn(x, ln1, wq, wk, wv, qn, kn, wo, self.kc, self.vc, cos, sin, bias, meta, self.fcfg)
        y = self.dops.moe(h, ln2, wr, wgu, wd, meta, self.fcfg)
        return h, y, self.dops.head(y, ln1, wr, self.fcfg)


@pytest.mark.parametrize("norm_topk", [True, False])
def test_two_consecutive_steps_match_numpy(norm_topk):
    rng = np.random.default_rng(3 + norm_topk)
    w = _weights(rng)
    kc = rng.standard_normal((B, K, T, D)).astype(np.float32)
    vc = rng.standard_normal((B, K, T, D)).astype(np.float32)
    valid = np.zeros((B, T), bool)
    valid[:, :5] = True
    valid[1, :2] = False  # left padding of row 1
    valid[2, :4] = False
    layer = _Layer(w, kc, vc)
    for slot in (5, 6):  # the second step must see the first step's in-place cache write
        valid[:, slot] = True
        bias = np.where(valid, 0.0, MASKED).astype(np.float32)
        x = rng.standard_normal((B, H)).astype(np.float32)
        ang = rng.uniform(0, 3, (B, D // 2)).astype(np.float32)
        cos, sin = np.tile(np.cos(ang), 2), np.tile(np.sin(ang), 2)
        meta = np.array([slot, TOPK, int(norm_topk), 0], np.int32)
        h, y, logits = layer(Tensor(x[:, None]), Tensor(cos[:, None]), Tensor(sin[:, None]), Tensor(bias[:, None]),
                     Tensor(meta))
        h_ref, kc, vc = _ref_attn(w, x, kc, vc, cos, sin, bias, slot)
        np.testing.assert_allclose(h.asnumpy()[:, 0], h_ref, atol=1e-5, rtol=0)
        y_ref = _ref_moe(w, h_ref, norm_topk)
        np.testing.assert_allclose(y.asnumpy()[:, 0], y_ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(logits.asnumpy(), _rms(y_ref, w["ln1"]) @ w["wr"].T, atol=1e-5, rtol=0)
        np.testing.assert_allclose(layer.kc.asnumpy(), kc, atol=1e-5, rtol=0)
        np.testing.assert_allclose(layer.vc.asnumpy(), vc, atol=1e-5, rtol=0)


def test_fused_engine_equals_composite_engine():
    """Prefill + 5 decode steps, batch 3 with left padding: the fused graph (kernels, in-place cache)
    gives the composite graph's logits (scatter_nd_update cache, MindSpore ops)."""
    from helpers import reference_dir

    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.generation import engine as eng_mod

    model = Qwen3MoeForCausalLM.from_pretrained(reference_dir("tiny-a"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (3, 16))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    runs = []
    for fused in (True, False):
        eng = eng_mod.DecodeEngine(model, 3, 64)
        assert eng.fused  # fp32 tiny-a with kernels built: the fused graph is the default
        if not fused:
            eng.fused, eng.cell = False, eng_mod._StepCell(model, 3, 64, eng.uid)
        out = [eng.prefill(ids, mask)]
        for _ in range(5):
            out.append(eng.decode(out[-1].argmax(-1)))
        runs.append(np.stack(out))
    np.testing.assert_allclose(runs[0], runs[1], atol=2e-5, rtol=0)


def _call(fn: str, arrays: list) -> int:
    return call_aot(decode_kernel.library(), fn, arrays)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 9), h16=st.booleans(), d=st.sampled_from([4, 8, 16, 32, 64]), k=st.integers(1, 3),
       g=st.integers(1, 3), t=st.integers(2, 20), e=st.integers(2, 9), i=st.sampled_from([8, 16, 24, 48]),
       top_k=st.integers(1, 4), norm=st.booleans(), seed=st.integers(0, 2**16))
def test_kernels_match_numpy_any_shape(b, h16, d, k, g, t, e, i, top_k, norm, seed):
    """Every shape path (vector blocks when H % 16 == 0, scalar tails otherwise, expert slicing at
    small batches, partially filled caches): attention block, cache write, MoE block, head."""
    top_k = min(top_k, e)
    H_ = 32 if h16 else 40
    rng = np.random.default_rng(seed)
    w = _weights(rng, H=H_, N=k * g, K=k, D=d, E=e, I=i)
    kc = rng.standard_normal((b, k, t, d)).astype(np.float32)
    vc = rng.standard_normal((b, k, t, d)).astype(np.float32)
    slot = int(rng.integers(0, t))
    valid = rng.random((b, t)) < 0.6
    valid[:, slot] = True  # the current token always sees itself
    bias = np.where(valid, 0.0, MASKED).astype(np.float32)
    x = rng.standard_normal((b, 1, H_)).astype(np.float32)
    ang = rng.uniform(0, 3, (b, d // 2)).astype(np.float32)
    cos, sin = np.tile(np.cos(ang), 2)[:, None], np.tile(np.sin(ang), 2)[:, None]
    meta = np.array([slot, top_k, int(norm), 0], np.int32)
    fcfg = np.array([EPS, d ** -0.5], np.float32)
    h = np.zeros_like(x)
    kc_new, vc_new = kc.copy(), vc.copy()
    assert _call("DecodeAttn", [x, w["ln1"], w["wq"], w["wk"], w["wv"], w["qn"], w["kn"], w["wo"], kc_new, vc_new,
                                cos, sin, bias[:, None], meta, fcfg, h]) == 0
    h_ref, kc_ref, vc_ref = _ref_attn(w, x[:, 0], kc, vc, cos[:, 0], sin[:, 0], bias, slot)
    np.testing.assert_allclose(h[:, 0], h_ref, atol=2e-5, rtol=0)
    np.testing.assert_allclose(kc_new, kc_ref, atol=2e-5, rtol=0)
    np.testing.assert_allclose(vc_new, vc_ref, atol=2e-5, rtol=0)
    y = np.zeros_like(x)
    assert _call("DecodeMoe", [h, w["ln2"], w["wr"], w["wgu"], w["wd"], meta, fcfg, y]) == 0
    y_ref = _ref_moe(w, h[:, 0], norm, top_k)
    np.testing.assert_allclose(y[:, 0], y_ref, atol=2e-5, rtol=0)
    logits = np.zeros((b, e), np.float32)
    assert _call("DecodeHead", [y, w["ln1"], w["wr"], fcfg, logits]) == 0
    np.testing.assert_allclose(logits, _rms(y[:, 0], w["ln1"]) @ w["wr"].T, atol=2e-5, rtol=0)
    # a prefill's k/v copied into slots [slot0, slot0 + S)
    S = int(rng.integers(1, t + 1))
    slot0 = int(rng.integers(0, t - S + 1))
    k_new = rng.standard_normal((b, k, S, d)).astype(np.float32)
    v_new = rng.standard_normal((b, k, S, d)).astype(np.float32)
    done = np.zeros(1, np.float32)
    assert _call("CacheWrite", [k_new, v_new, kc_new, vc_new, np.array([slot0, 0, 0, 0], np.int32), done]) == 0
    kc_ref[:, :, slot0:slot0 + S], vc_ref[:, :, slot0:slot0 + S] = k_new, v_new
    np.testing.assert_allclose(kc_new, kc_ref, atol=2e-5, rtol=0)
    np.testing.assert_allclose(vc_new, vc_ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("b", [5, 8, 9])
def test_moe_bench_shapes_rows_sharing_experts(b):
    """bench-mini MoE shapes (H 512, 32 experts, I 256, top-4): rows that are near copies of one
    another route to the same experts, so an expert gets every row (several 4-row batch passes over
    each weight block, the prefetch running in the first only) and partial batches (5, 9 rows: 1-row
    tails); the last row is independent (an expert with one row)."""
    Hb, Eb, Ib, top_k = 512, 32, 256, 4
    rng = np.random.default_rng(b)
    w = _weights(rng, H=Hb, N=1, K=1, D=16, E=Eb, I=Ib)
    w["wgu"], w["wd"] = w["wgu"] * 0.1, w["wd"] * 0.5  # O(1) outputs at H 512, I 256 (tolerance is absolute)
    base = rng.standard_normal(Hb).astype(np.float32)
    h = (base + 0.01 * rng.standard_normal((b, Hb))).astype(np.float32)
    h[-1] = rng.standard_normal(Hb)
    z = _rms(h, w["ln2"])
    top = np.argsort(-(z @ w["wr"].T), -1)[:, :top_k]
    shared = set(top[0]).intersection(*map(set, top[:-1]))
    assert shared, "test setup: the near-copy rows should share an expert"
    y = np.zeros((b, 1, Hb), np.float32)
    meta = np.array([0, top_k, 1, 0], np.int32)
    assert _call("DecodeMoe", [h[:, None], w["ln2"], w["wr"], w["wgu"], w["wd"], meta,
                               np.array([EPS, 0.25], np.float32), y]) == 0
    np.testing.assert_allclose(y[:, 0], _ref_moe(w, h, True, top_k), atol=2e-5, rtol=0)


def test_kernel_rejects_bad_slot():
    """A slot past the cache is refused (non-zero status), the cache left untouched."""
    rng = np.random.default_rng(0)
    w = _weights(rng)
    kc = np.zeros((B, K, T, D), np.float32)
    vc = np.zeros_like(kc)
    out = np.zeros((B, 1, H), np.float32)
    args = [np.ones((B, 1, H), np.float32), w["ln1"], w["wq"], w["wk"], w["wv"], w["qn"], w["kn"], w["wo"], kc, vc,
            np.ones((B, 1, D), np.float32), np.zeros((B, 1, D), np.float32), np.zeros((B, 1, T), np.float32),
            np.array([T, TOPK, 1, 0], np.int32), np.array([EPS, D ** -0.5], np.float32), out]
    assert _call("DecodeAttn", args) != 0
    assert not kc.any() and not vc.any()
