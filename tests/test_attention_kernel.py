"""Fused attention core C++ op (kernels/attention.py) vs an independent NumPy float64 reference
(forward and hand-derived backward) and vs the composite `grouped_attention`.

Tolerances: O(1) inputs, sums over <= 64 keys, float32 with a polynomial exp (rel. err < 1e-7):
rtol 1e-4 / atol 2e-5 covers float32 reassociation, well below any real indexing / masking bug
(which shows up at O(1e-1)). Covers GQA (G = 1, 2, 4), S != T (a cache tail), padding rows that
are fully masked, and PyNative + compiled runs. `attention_infer` (the forward-only op generation
uses) must equal `attention_core`'s output exactly: the same float32 operations in the same order.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mindspore as ms
from mindspore import Tensor, nn

from qwen3moe.kernels import attention as ak
from qwen3moe.layers.attention import Qwen3MoeAttention, grouped_attention

pytestmark = pytest.mark.skipif(not ak.available(), reason="attention kernel not buildable here")
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MASK = -1e9


def _case(seed, B, N, K, S, T, D, pad=None):
    r = np.random.default_rng(seed)
    q = r.standard_normal((B, N, S, D)).astype(np.float32)
    k, v = (r.standard_normal((B, K, T, D)).astype(np.float32) for _ in range(2))
    bias = np.zeros((B, 1, S, T), np.float32)
    for s in range(S):  # causal with the queries at the end of the keys (S <= T)
        bias[:, 0, s, T - S + s + 1:] = MASK
    pad = r.integers(0, T) if pad is None else pad
    bias[0, 0, :, :pad] = MASK  # left padding in batch row 0 (may mask whole rows)
    do = r.standard_normal((B, N, S, D)).astype(np.float32)
    return q, k, v, bias, do


def _reference(q, k, v, bias, do):
    q, k, v, bias, do = (a.astype(np.float64) for a in (q, k, v, bias, do))
    B, N, S, D = q.shape
    G = N // k.shape[1]
    kk, vv = np.repeat(k, G, 1), np.repeat(v, G, 1)
    # the bias add is rounded to float32 as both implementations do: a fully masked (padding) row
    # becomes exactly uniform there (-1e9 swallows the scores), not softmax(scores)
    x = ((q @ kk.transpose(0, 1, 3, 2) / np.sqrt(D)).astype(np.float32) + bias.astype(np.float32)).astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = p @ vv
    dv = (p.transpose(0, 1, 3, 2) @ do)
    dp = do @ vv.transpose(0, 1, 3, 2)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True)) / np.sqrt(D)
    dq, dk = ds @ kk, ds.transpose(0, 1, 3, 2) @ q
    fold = lambda a: a.reshape(B, -1, G, *a.shape[2:]).sum(2)  # the G heads sharing a kv head
    return o, (dq, fold(dk), fold(dv))


class _Loss(nn.Cell):
    @ms.jit
    def construct(self, q, k, v, bias, do):
        return (ak.attention_core(q, k, v, bias) * do).sum()


_GRAD = ms.grad(_Loss(), grad_position=(0, 1, 2))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), nk=st.sampled_from([(2, 2), (4, 2), (8, 2), (4, 1)]),
       st_=st.sampled_from([(1, 1), (5, 5), (3, 9), (17, 17)]), D=st.sampled_from([4, 16]))
def test_forward_and_backward_match_numpy(seed, nk, st_, D):
    (N, K), (S, T) = nk, st_
    q, k, v, bias, do = _case(seed, 2, N, K, S, T, D)
    o_ref, grads_ref = _reference(q, k, v, bias, do)
    o = ak.attention_core(*(Tensor(a) for a in (q, k, v, bias))).asnumpy()
    np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=2e-5)
    grads = _GRAD(*(Tensor(a) for a in (q, k, v, bias, do)))
    for name, g, ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        np.testing.assert_allclose(g.asnumpy(), ref, rtol=1e-4, atol=2e-5, err_msg=name)


def test_equals_composite_grouped_attention():
    q, k, v, bias, do = _case(3, 2, 8, 4, 16, 16, 8)
    a = ak.attention_core(*(Tensor(x) for x in (q, k, v, bias))).asnumpy()
    b = grouped_attention(*(Tensor(x) for x in (q, k, v, bias)), 8 ** -0.5).asnumpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def test_attention_module_kernel_equals_composite_with_gradients():
    """The whole attention layer (projections, q/k norm, RoPE, core, o_proj) in PyNative: output
    and parameter gradients with the kernel equal those of the composite core."""
    from qwen3moe.layers.dtypes import set_init_seed

    r = np.random.default_rng(0)
    B, S = 2, 6
    x = Tensor(r.standard_normal((B, S, 32)).astype(np.float32))
    cos, sin = (Tensor(f(r.random((B, S, 8))).astype(np.float32)) for f in (np.cos, np.sin))
    bias = Tensor(_case(1, B, 4, 2, S, S, 8)[3])
    res = []
    for use_kernel in (True, False):
        set_init_seed(1)
        att = Qwen3MoeAttention(32, 4, 2, 8, init_std=0.3)
        att.use_kernel = use_kernel
        fn = ms.value_and_grad(lambda t: att(t, cos, sin, bias).sum(), 0, att.trainable_params())
        out, (gx, gw) = fn(x)
        res.append([out.asnumpy(), gx.asnumpy()] + [g.asnumpy() for g in gw])
    for a, b in zip(*res):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("S,T", [(150, 150), (70, 200), (130, 2200)])
def test_multiple_query_blocks_with_causal_key_cuts(S, T):
    """S > 64 spans several 64-row query blocks, each reading only the keys up to its last
    unmasked one (the last block partial), and T > 2048 runs q k^T in three key chunks: forward
    (attention_core and attention_infer) and gradients still match the reference."""
    q, k, v, bias, do = _case(11, 2, 4, 2, S, T, 8)
    o_ref, grads_ref = _reference(q, k, v, bias, do)
    o = ak.attention_core(*(Tensor(a) for a in (q, k, v, bias))).asnumpy()
    np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=2e-5)
    assert np.array_equal(ak.attention_infer(*(Tensor(a) for a in (q, k, v, bias))).asnumpy(), o)
    for name, g, ref in zip(("dq", "dk", "dv"), _GRAD(*(Tensor(a) for a in (q, k, v, bias, do))), grads_ref):
        np.testing.assert_allclose(g.asnumpy(), ref, rtol=1e-4, atol=2e-5, err_msg=name)


class _InferAndCore(nn.Cell):
    @ms.jit
    def construct(self, q, k, v, bias):
        return ak.attention_infer(q, k, v, bias), ak.attention_core(q, k, v, bias)


def _infer_and_core(compiled, *arrays):
    q, k, v, bias = (Tensor(a) for a in arrays)
    if compiled:
        return tuple(t.asnumpy() for t in _InferAndCore()(q, k, v, bias))
    return ak.attention_infer(q, k, v, bias).asnumpy(), ak.attention_core(q, k, v, bias).asnumpy()


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), nk=st.sampled_from([(2, 2), (4, 2), (8, 2), (4, 1)]),
       S=st.integers(1, 150), extra=st.integers(0, 40), pad_frac=st.floats(0.0, 1.0), D=st.sampled_from([4, 16]))
def test_infer_equals_core_bit_for_bit(compiled, seed, nk, S, extra, pad_frac, D):
    """Forward-only op vs attention_core over GQA G = 1, 2, 4, S <= T (a cache tail), several 64-row
    query blocks with causal key cuts, and left padding up to every key (fully masked rows)."""
    (N, K), T = nk, S + extra
    q, k, v, bias, do = _case(seed, 2, N, K, S, T, D, pad=int(round(pad_frac * T)))
    o_infer, o_core = _infer_and_core(compiled, q, k, v, bias)
    assert o_infer.shape == (2, N, S, D) and o_infer.dtype == np.float32
    assert np.array_equal(o_infer, o_core), f"max diff {np.abs(o_infer - o_core).max()}"
    np.testing.assert_allclose(o_infer, _reference(q, k, v, bias, do)[0], rtol=1e-4, atol=2e-5)


def test_masked_probabilities_leave_no_subnormals():
    """The stored probabilities hold no subnormal floats: a masked key's exp(-87.3) / sum falls
    below FLT_MIN, and every later product with such an operand takes a microcode assist (the
    512-token prefill attention ran 9x slower, bench/RESULTS.md). The op flushes results below
    FLT_MIN to zero (common.h FlushDenormals; a row whose sum is ~1 keeps exp(-87.3) itself, a
    normal float); the caller's MXCSR is restored after."""
    from kernel_reference import call_aot
    from qwen3moe.kernels.build import kernel_library

    q, k, v, bias, _ = _case(5, 1, 4, 2, 130, 130, 16, pad=0)
    o, p = np.zeros_like(q), np.zeros((1, 4, 130, 130), np.float32)
    assert call_aot(kernel_library("attention_core"), "AttnCoreFwd", [q, k, v, bias, o, p]) == 0
    tiny = (p != 0) & (np.abs(p) < np.finfo(np.float32).tiny)
    assert not tiny.any(), f"{tiny.sum()} subnormal probabilities"
    x = np.array([1e-39], np.float32)  # the caller's thread still keeps subnormals
    assert x[0] * np.float32(2) != 0
