"""OpenBLAS linear C++ ops (kernels/linear.py: `linear`, `linear3`) vs a float64 NumPy reference,
forward and gradients, in PyNative and under jit (both ops in one graph: their bprops must not mix).

The kernels split columns over OpenMP threads above ~0.5M MACs, so both the serial and the
threaded paths (including splits that are not multiples of 16) are exercised.
Tolerances: O(1) inputs, float32 GEMMs with reductions over up to 1024 terms: rtol 1e-4 and atol
1e-4 * sqrt(K) (K the reduction length). A transposed or mis-strided operand errs at O(1).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mindspore as ms
from mindspore import Tensor, ops

from qwen3moe.kernels import linear as lk

pytestmark = pytest.mark.skipif(not lk.available(), reason="linear kernel not buildable here")
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _loss(x, w1, wa, wb, wc, d1, da, db, dc):
    y1 = lk.linear(x, w1)
    ya, yb, yc = lk.linear3(x, wa, wb, wc)
    return (y1 * d1).sum() + (ya * da).sum() + (yb * db).sum() + (yc * dc).sum()


_GRAD = ops.grad(_loss, grad_position=(0, 1, 2, 3, 4))
_GRAD_JIT = ms.jit(_GRAD)


def _close(got, ref, k):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.sqrt(max(k, 1)))


@SETTINGS
@given(seed=st.integers(0, 10_000), lead=st.sampled_from([(1,), (7,), (2, 5), (1024,)]),
       i=st.sampled_from([1, 3, 64, 512]), outs=st.sampled_from([(1, 1, 1, 1), (5, 8, 3, 3), (512, 512, 256, 256)]),
       jit=st.booleans())
def test_linear_ops_equal_numpy(seed, lead, i, outs, jit):
    _check_case(seed, lead, i, outs, jit)


@pytest.mark.parametrize("lead,i,outs", [((4, 256), 512, (8192, 512, 256, 256)),  # bench-mini shapes
                                         ((333,), 100, (37, 70, 5, 19))])  # threaded, ragged splits
def test_threaded_shapes_equal_numpy(lead, i, outs):
    _check_case(0, lead, i, outs, jit=True)


def _check_case(seed, lead, i, outs, jit):
    r = np.random.default_rng(seed)
    x = r.standard_normal(lead + (i,)).astype(np.float32)
    ws = [r.standard_normal((o, i)).astype(np.float32) for o in outs]
    ds = [r.standard_normal(lead + (o,)).astype(np.float32) for o in outs]
    y1 = lk.linear(Tensor(x), Tensor(ws[0])).asnumpy()
    y3 = [t.asnumpy() for t in lk.linear3(Tensor(x), *(Tensor(w) for w in ws[1:]))]
    x64 = x.astype(np.float64)
    for got, w in zip([y1, *y3], ws):
        assert got.shape == lead + (w.shape[0],)
        _close(got, x64 @ w.astype(np.float64).T, i)
    grads = (_GRAD_JIT if jit else _GRAD)(Tensor(x), *(Tensor(w) for w in ws), *(Tensor(d) for d in ds))
    x2 = x64.reshape(-1, i)
    d2 = [d.astype(np.float64).reshape(x2.shape[0], -1) for d in ds]
    dx = sum(d @ w.astype(np.float64) for d, w in zip(d2, ws)).reshape(x.shape)
    _close(grads[0].asnumpy(), dx, sum(outs))
    for g, d in zip(grads[1:], d2):
        _close(g.asnumpy(), d.T @ x2, x2.shape[0])


def test_mismatched_in_features_fails():
    with pytest.raises(ValueError, match="does not match"):
        lk.linear(Tensor(np.ones((4, 3), np.float32)), Tensor(np.ones((2, 5), np.float32))).asnumpy()
