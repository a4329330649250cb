"""Fused MoE C++ op (kernels/moe.py) against an independent NumPy reference: forward, and the
backward kernel's gradients to x, the routing weights and both expert weight stacks.

fp32 tolerances: values are O(1) sums of <= 64 products, so float32 reassociation (BLAS blocking
vs NumPy float64 reference) stays below ~1e-5 relative; we allow rtol 1e-4 / atol 1e-5.
Covers experts receiving zero tokens (E up to 16 with few tokens), T*K not a multiple of anything
(prime T), K = 1 and duplicate-free top-k, I = 8 (scalar SwiGLU loop) and 40 (AVX-512 blocks + tail),
PyNative and compiled (ms.jit) runs.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mindspore as ms
from mindspore import Tensor, nn

from qwen3moe.kernels import moe

pytestmark = pytest.mark.skipif(not moe.available(), reason="fused MoE kernel not buildable here")
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _case(seed, T, K, E, H=16, I=8):
    r = np.random.default_rng(seed)
    x = r.standard_normal((T, H)).astype(np.float32)
    idx = np.stack([r.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32).reshape(T, K)
    w = r.random((T, K)).astype(np.float32)
    gu = (r.standard_normal((E, 2 * I, H)) * 0.3).astype(np.float32)
    dn = (r.standard_normal((E, H, I)) * 0.3).astype(np.float32)
    dy = r.standard_normal((T, H)).astype(np.float32)
    return x, idx, w, gu, dn, dy


def _reference(x, idx, w, gu, dn, dy):
    """float64 forward and hand-derived backward of y_t = sum_j w_tj * down_e(silu(g) * u)."""
    x, w, gu, dn, dy = (a.astype(np.float64) for a in (x, w, gu, dn, dy))
    T, K = idx.shape
    I = dn.shape[2]
    y, dx, dw = np.zeros_like(x), np.zeros_like(x), np.zeros_like(w)
    dgu, ddn = np.zeros_like(gu), np.zeros_like(dn)
    for t in range(T):
        for j in range(K):
            e = idx[t, j]
            h = gu[e] @ x[t]
            g, u = h[:I], h[I:]
            s = 1 / (1 + np.exp(-g))
            a = g * s * u
            out = dn[e] @ a
            y[t] += w[t, j] * out
            dw[t, j] = dy[t] @ out
            dout = w[t, j] * dy[t]
            ddn[e] += np.outer(dout, a)
            da = dn[e].T @ dout
            dh = np.concatenate([da * u * s * (1 + g * (1 - s)), da * g * s])
            dgu[e] += np.outer(dh, x[t])
            dx[t] += gu[e].T @ dh
    return y, (dx, dw, dgu, ddn)


class _Loss(nn.Cell):
    """sum(moe(x) * dy): its gradient w.r.t. the inputs is the backward kernel applied to dy."""

    @ms.jit
    def construct(self, x, idx, w, gu, dn, dy):
        return (moe.moe_experts(x, idx, w, gu, dn) * dy).sum()


_GRAD = ms.value_and_grad(_Loss(), grad_position=(0, 2, 3, 4))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), T=st.sampled_from([1, 2, 3, 7, 13, 31]), I=st.sampled_from([8, 40]),
       ek=st.sampled_from([(8, 2), (4, 4), (16, 4), (16, 1), (3, 3)]))
def test_forward_and_backward_match_numpy(seed, T, I, ek):
    E, K = ek
    x, idx, w, gu, dn, dy = _case(seed, T, K, E, I=I)
    y_ref, grads_ref = _reference(x, idx, w, gu, dn, dy)
    y = moe.moe_experts(Tensor(x), Tensor(idx), Tensor(w), Tensor(gu), Tensor(dn)).asnumpy()
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    loss, grads = _GRAD(*(Tensor(a) for a in (x, idx, w, gu, dn, dy)))
    np.testing.assert_allclose(float(loss.asnumpy()), float((y_ref * dy).sum()), rtol=1e-4, atol=1e-4)
    for name, g, ref in zip(("dx", "dw", "dgate_up", "ddown"), grads, grads_ref):
        np.testing.assert_allclose(g.asnumpy(), ref, rtol=1e-4, atol=1e-5, err_msg=name)


def test_experts_with_zero_tokens_get_zero_weight_gradients():
    """Every token picks experts 0 and 1 only: the other experts' weight grads must be exactly 0
    (the kernel writes them, it does not leave stale memory), and the forward still matches."""
    x, _, w, gu, dn, dy = _case(5, 11, 2, 8)
    idx = np.tile(np.array([[1, 0]], np.int32), (11, 1))
    y_ref, (_, _, dgu_ref, ddn_ref) = _reference(x, idx, w, gu, dn, dy)
    _, (_, _, dgu, ddn) = _GRAD(*(Tensor(a) for a in (x, idx, w, gu, dn, dy)))
    assert not np.any(dgu.asnumpy()[2:]) and not np.any(ddn.asnumpy()[2:])
    np.testing.assert_allclose(dgu.asnumpy(), dgu_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ddn.asnumpy(), ddn_ref, rtol=1e-4, atol=1e-5)


def test_bucket_order_does_not_depend_on_previous_call():
    """Two consecutive calls with different routings (same shapes, one compiled graph) each give
    their own reference result: no state leaks between calls."""
    f = ms.jit(moe.moe_experts)
    for seed in (1, 2):
        x, idx, w, gu, dn, dy = _case(seed, 9, 3, 6)
        y = f(Tensor(x), Tensor(idx), Tensor(w), Tensor(gu), Tensor(dn)).asnumpy()
        np.testing.assert_allclose(y, _reference(x, idx, w, gu, dn, dy)[0], rtol=1e-4, atol=1e-5)


def test_reused_scratch_across_sizes():
    """The kernels keep their scratch between calls (per thread, grown to the largest call):
    a large call, then a smaller one (stale, larger buffers), then a larger one again (regrown)
    each match the reference, forward and gradients (same tolerances as above)."""
    for seed, T, K, E, H, I in ((3, 40, 4, 8, 32, 16), (4, 5, 2, 4, 16, 8), (6, 64, 4, 16, 48, 24)):
        x, idx, w, gu, dn, dy = _case(seed, T, K, E, H, I)
        y_ref, grads_ref = _reference(x, idx, w, gu, dn, dy)
        y = moe.moe_experts(Tensor(x), Tensor(idx), Tensor(w), Tensor(gu), Tensor(dn)).asnumpy()
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
        _, grads = _GRAD(*(Tensor(a) for a in (x, idx, w, gu, dn, dy)))
        for name, g, ref in zip(("dx", "dw", "dgate_up", "ddown"), grads, grads_ref):
            np.testing.assert_allclose(g.asnumpy(), ref, rtol=1e-4, atol=1e-5, err_msg=f"T={T} {name}")


def test_out_of_range_expert_id_fails():
    x, idx, w, gu, dn, _ = _case(0, 4, 2, 4)
    idx[2, 1] = 4  # E = 4: ids must be in [0, 4)
    with pytest.raises(Exception):
        moe.moe_experts(Tensor(x), Tensor(idx), Tensor(w), Tensor(gu), Tensor(dn)).asnumpy()


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.sampled_from([1, 5, 17]))
def test_block_kernel_equals_composite_without_renorm(seed, T):
    """norm_topk_prob=False through the whole MoE block: outputs and gradients (x, router weight,
    both expert stacks) of the fused path equal MindSpore autodiff of the composite path."""
    from qwen3moe.layers.dtypes import set_init_seed
    from qwen3moe.models.qwen3_moe import Qwen3MoeSparseMoeBlock

    r = np.random.default_rng(seed)
    x, dy = Tensor(r.standard_normal((T, 16)).astype(np.float32)), Tensor(r.standard_normal((T, 16)).astype(np.float32))
    results = []
    for backend in ("composite", "kernel"):
        set_init_seed(seed)
        block = Qwen3MoeSparseMoeBlock(16, 8, 3, 8, False, init_std=0.3, moe_backend=backend)
        assert block.use_kernel == (backend == "kernel")
        fn = ms.value_and_grad(lambda v: (block(v)[0] * dy).sum(), 0, block.trainable_params())
        loss, (gx, gw) = fn(x)
        results.append([loss.asnumpy(), gx.asnumpy()] + [g.asnumpy() for g in gw])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_capacity_path_is_not_routed_through_the_kernel():
    """A capacity factor (token dropping) keeps the composite capacity path even when the kernel
    is requested: the dropped tokens' outputs must equal the composite block's."""
    from qwen3moe.layers.dtypes import set_init_seed
    from qwen3moe.models.qwen3_moe import Qwen3MoeSparseMoeBlock

    x = Tensor(np.random.default_rng(0).standard_normal((12, 16)).astype(np.float32))
    outs = []
    for backend in ("composite", "kernel"):
        set_init_seed(4)
        block = Qwen3MoeSparseMoeBlock(16, 4, 2, 8, True, init_std=0.3, moe_backend=backend,
                                       capacity_factor=0.5)
        assert not block.use_kernel
        outs.append(block(x)[0].asnumpy())
    np.testing.assert_array_equal(outs[0], outs[1])
