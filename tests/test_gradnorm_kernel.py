"""Global gradient norm through the C++ sum-of-squares kernel (kernels/gradnorm.py) against a
float64 NumPy reference and the composite MindSpore norm (training/optimizer.py).

Tolerance: the kernel sums each tensor in double, so its only float32 roundings are the per-tensor
result, the fp32 sum over <= 6 tensors and the sqrt: a few ulp, rtol 1e-6 against float64. The
composite path sums in float32 (error ~ sqrt(N) ulp for N up to 3e5), held to rtol 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from qwen3moe.kernels import gradnorm
from qwen3moe.training.optimizer import global_norm as composite_global_norm

pytestmark = pytest.mark.skipif(not gradnorm.available(), reason="sum-of-squares kernel not buildable here")
SHAPES = [(3, 5), (300001,), (1,), (4, 2, 3), (64, 4100)]  # > and < the kernel's OpenMP threshold


class _Norm(nn.Cell):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    @ms.jit
    def construct(self, grads):
        return self.fn(grads)


def _grads(seed, dtype=np.float32):
    r = np.random.default_rng(seed)
    return [(r.standard_normal(s) * r.uniform(1e-4, 10)).astype(dtype) for s in SHAPES]


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_norm_equals_float64_reference(seed):
    grads = _grads(seed)
    ref = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    got = float(_Norm(gradnorm.global_norm)(tuple(Tensor(g) for g in grads)).asnumpy())
    comp = float(_Norm(composite_global_norm)(tuple(Tensor(g) for g in grads)).asnumpy())
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_allclose(comp, ref, rtol=1e-5)


def test_single_large_value_and_zeros():
    grads = [np.zeros(s, np.float32) for s in SHAPES]
    grads[1][123456] = 3.0
    grads[4][7, 9] = -4.0
    got = float(_Norm(gradnorm.global_norm)(tuple(Tensor(g) for g in grads)).asnumpy())
    assert got == 5.0


def test_non_fp32_gradients_use_the_composite_path():
    grads = _grads(3, np.float16)
    got = float(_Norm(gradnorm.global_norm)(tuple(Tensor(g) for g in grads)).asnumpy())
    ref = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    np.testing.assert_allclose(got, ref, rtol=1e-2)  # composite sums in float16 -> float32 cast
