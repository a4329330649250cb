"""Fused in-place AdamW kernel (kernels/adamw.py) vs the composite MindSpore update and a NumPy
float32 reference of torch.optim.AdamW's formula, over consecutive steps.

The kernel follows the composite path's float32 operation order with FMA contraction off, so
parameters and moments must be bit-identical to the composite path (assert_array_equal); the
NumPy reference (float32, same order) is held to 2 ulp-ish (rtol 1e-6) because NumPy may
evaluate `b1 * m + (1 - b1) * g` with different intermediate rounding of the scalars.
"""
from __future__ import annotations

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor

from qwen3moe.kernels import adamw as adamw_kernel
from qwen3moe.training import AdamW

pytestmark = pytest.mark.skipif(not adamw_kernel.available(), reason="AdamW kernel not buildable here")
SHAPES = [(3, 5), (70000,), (1,), (4, 2, 3)]  # 70000 > the kernel's OpenMP threshold


def _params(seed):
    r = np.random.default_rng(seed)
    names = ["a.weight", "big", "n.norm.weight", "c"]
    return [Parameter(Tensor(r.standard_normal(s).astype(np.float32)), name=n) for s, n in zip(SHAPES, names)]


def _run(fused: bool, steps=3, lr=1e-2):
    params = _params(0)
    opt = AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, no_decay=("*norm.weight",))
    assert (opt.fused is not None) == adamw_kernel.usable_for(params)
    if not fused:
        opt.fused = None
    assert opt.fused is (adamw_kernel.fused_update if fused else None)
    r = np.random.default_rng(1)
    grads_seq = [[r.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]
    for grads in grads_seq:
        opt(tuple(Tensor(g) for g in grads))
    state = [p.asnumpy().copy() for p in params] + [m.asnumpy().copy() for m in opt.exp_avg]
    return state + [v.asnumpy().copy() for v in opt.exp_avg_sq], float(opt.step.asnumpy()), grads_seq


def _numpy_adamw(grads_seq, lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, wd=(0.1, 0.1, 0.0, 0.1)):
    f = np.float32
    ps = [p.asnumpy().copy() for p in _params(0)]
    ms_, vs = [np.zeros_like(p) for p in ps], [np.zeros_like(p) for p in ps]
    for t, grads in enumerate(grads_seq, 1):
        bc1 = f(1) - f(b1) ** f(t)
        bc2s = np.sqrt(f(1) - f(b2) ** f(t))
        for i, g in enumerate(grads):
            ps[i] = ps[i] * (f(1) - f(lr) * f(wd[i]))
            ms_[i] = f(b1) * ms_[i] + f(1 - b1) * g
            vs[i] = f(b2) * vs[i] + f(1 - b2) * g * g
            ps[i] = ps[i] - (f(lr) / bc1) * ms_[i] / (np.sqrt(vs[i]) / bc2s + f(eps))
    return ps + ms_ + vs


def test_fused_equals_composite_bitwise_over_steps():
    fused, t_f, _ = _run(True)
    comp, t_c, grads_seq = _run(False)
    assert t_f == t_c == 3.0
    for a, b in zip(fused, comp):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fused, _numpy_adamw(grads_seq)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_train_step_with_fused_adamw_equals_composite():
    """Inside the compiled train step (no clipping, so nothing else orders the update after the
    backward): two steps give the same parameters with the fused and the composite optimizer,
    i.e. no backward op read a parameter after the kernel overwrote it."""
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed
    from qwen3moe.training.step import TrainStep

    ids = np.random.default_rng(2).integers(0, 64, (2, 8))
    out = []
    for fused in (True, False):
        set_init_seed(7)
        cfg = Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=2, vocab_size=64)
        model = Qwen3MoeForCausalLM(cfg)
        opt = AdamW(model.trainable_params(), lr=1e-2, weight_decay=0.1)
        if not fused:
            opt.fused = None
        assert opt.fused is (adamw_kernel.fused_update if fused else None)
        step = TrainStep(model, opt, aux_coef=1e-3, clip=None)
        losses = [step(ids)["loss"] for _ in range(2)]
        out.append((losses, [p.asnumpy().copy() for p in model.trainable_params()]))
    assert out[0][0] == out[1][0]
    for a, b in zip(out[0][1], out[1][1]):
        np.testing.assert_array_equal(a, b)
