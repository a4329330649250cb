"""Fused RMSNorm C++ op (kernels/rmsnorm.py) vs a float64 NumPy reference (forward and
hand-derived backward) and vs the composite layers/norm.py path, through the RMSNorm layer.

Tolerances: O(1) inputs (rows scaled by 1e-3..1e2), float32 sums over D <= 512 terms:
rtol 1e-5 / atol 1e-5 on y, dx to 1e-5 of its terms' scale max|r dy w| (it cancels), and on dw (a sum over up to 4096 rows, accumulated in double by
the kernel) rtol 1e-5 / atol 1e-4. An indexing or formula bug shows up at O(1e-1).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mindspore as ms
from mindspore import Tensor, nn

from qwen3moe.kernels import rmsnorm as rk
from qwen3moe.layers.norm import RMSNorm

pytestmark = pytest.mark.skipif(not rk.available(), reason="RMSNorm kernel not buildable here")
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _case(seed, shape):
    r = np.random.default_rng(seed)
    x = r.standard_normal(shape) * 10.0 ** r.uniform(-3, 2, shape[:-1] + (1,))
    w = r.standard_normal(shape[-1])
    dy = r.standard_normal(shape)
    return x.astype(np.float32), w.astype(np.float32), dy.astype(np.float32)


def _reference(x, w, dy, eps):
    x, w, dy = (a.astype(np.float64) for a in (x, w, dy))
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    xh = x * r
    gw = dy * w
    dx = r * (gw - xh * (gw * xh).mean(-1, keepdims=True))
    dw = (dy * xh).reshape(-1, x.shape[-1]).sum(0)
    return w * xh, dx, dw


class _Loss(nn.Cell):
    def __init__(self, norm: RMSNorm, kernel: bool) -> None:
        super().__init__()
        self.norm, self.kernel = norm, kernel

    def construct(self, x, dy):
        y = self.norm(x) if self.kernel else self.norm.composite(x)
        return (y * dy).sum()


def _run(x, w, dy, eps, kernel, jit):
    norm = RMSNorm(x.shape[-1], eps)
    norm.weight.set_data(Tensor(w))
    assert norm.use_kernel
    loss = _Loss(norm, kernel)
    y = (norm(Tensor(x)) if kernel else norm.composite(Tensor(x))).asnumpy()
    fn = ms.value_and_grad(loss, grad_position=0, weights=[norm.weight])
    if jit:
        fn = ms.jit(fn)
    _, (dx, (dw,)) = fn(Tensor(x), Tensor(dy))
    return y, dx.asnumpy(), dw.asnumpy()


@SETTINGS
@given(seed=st.integers(0, 10_000), shape=st.sampled_from([(1, 1), (3, 7), (2, 5, 4, 64), (1025, 512)]),
       eps=st.sampled_from([1e-6, 1e-2]))
def test_kernel_equals_numpy_forward_and_grads(seed, shape, eps):
    x, w, dy = _case(seed, shape)
    y, dx, dw = _run(x, w, dy, eps, kernel=True, jit=False)
    ry, rdx, rdw = _reference(x, w, dy, eps)
    np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
    # dx cancels (exactly 0 for D = 1): compare at the scale of its terms r * dy * w
    r = 1.0 / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps)
    np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-5 * np.abs(r * dy * w).max())
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-4)


def test_kernel_equals_composite_compiled():
    x, w, dy = _case(1, (4, 256, 8, 64))
    got = _run(x, w, dy, 1e-6, kernel=True, jit=True)
    ref = _run(x, w, dy, 1e-6, kernel=False, jit=True)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
