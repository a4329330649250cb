"""AdamW (torch semantics), schedules and clipping against NumPy references.

AdamW tolerance 1e-6 abs over 3 steps: fp32 update of O(lr)=1e-2 per step on values O(1);
the NumPy reference runs in float64, so the gap is fp32 rounding (~1e-7 per op).
"""
from __future__ import annotations

import math

import numpy as np
import pytest


def numpy_adamw(ps, grads_seq, lr, betas, eps, wd):
    """torch.optim.AdamW (foreach=False) transcribed to float64 NumPy."""
    ps = [p.astype(np.float64) for p in ps]
    m = [np.zeros_like(p) for p in ps]
    v = [np.zeros_like(p) for p in ps]
    for t, grads in enumerate(grads_seq, start=1):
        for i, g in enumerate(grads):
            ps[i] = ps[i] * (1 - lr * wd[i])
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            denom = np.sqrt(v[i]) / math.sqrt(1 - betas[1] ** t) + eps
            ps[i] = ps[i] - lr / (1 - betas[0] ** t) * m[i] / denom
    return ps


def test_adamw_matches_torch_semantics():
    import mindspore as ms
    from mindspore import Parameter, Tensor

    from qwen3moe.training import AdamW
    from qwen3moe.training.optimizer import DEFAULT_NO_DECAY

    rng = np.random.default_rng(0)
    init = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]
    params = [Parameter(Tensor(init[0]), name="layer.proj.weight"),
              Parameter(Tensor(init[1]), name="layer.input_layernorm.weight")]
    opt = AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, no_decay=DEFAULT_NO_DECAY)
    grads_seq = [[rng.normal(size=p.shape).astype(np.float32) for p in init] for _ in range(3)]
    for grads in grads_seq:
        opt(tuple(Tensor(g) for g in grads))
    ref = numpy_adamw(init, grads_seq, 1e-2, (0.9, 0.95), 1e-8, [0.1, 0.0])
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.asnumpy(), r, rtol=0, atol=1e-6)
    assert float(opt.step.asnumpy()) == 3.0
    assert np.abs(opt.exp_avg[0].asnumpy()).max() > 0


def test_adamw_set_lr_no_recompile_effect():
    from mindspore import Parameter, Tensor

    from qwen3moe.training import AdamW

    p = Parameter(Tensor(np.ones(3, np.float32)), name="w")
    opt = AdamW([p], lr=1e-2)
    opt.set_lr(0.0)
    opt((Tensor(np.ones(3, np.float32)),))
    np.testing.assert_array_equal(p.asnumpy(), np.ones(3, np.float32))
    assert opt.get_lr() == 0.0


def test_adamw_lr_as_graph_input_equals_set_lr():
    """update(grads, lr) (parallel/step.py feeds the schedule's lr as an input of its update
    graph) == set_lr(lr) then update(grads): the same float32 lr in the same formula, so the
    parameters and moments are bit-identical; it also writes learning_rate (what a later update
    without an lr input uses)."""
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn

    from qwen3moe.training import AdamW

    class Step(nn.Cell):
        def __init__(self, opt):
            super().__init__()
            self.opt = opt

        @ms.jit
        def construct(self, grads, lr):
            return self.opt.update(grads, lr)

    rng = np.random.default_rng(3)
    w0, gs = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((3, 4, 3)).astype(np.float32)
    lrs = [1e-2, 3.3e-3, 7.7e-4]
    pa, pb = Parameter(Tensor(w0), name="a"), Parameter(Tensor(w0), name="b")
    oa, ob = AdamW([pa], lr=0.5, weight_decay=0.1), AdamW([pb], lr=0.5, weight_decay=0.1)
    step = Step(ob)
    for lr, g in zip(lrs, gs):
        oa.set_lr(lr)
        oa((Tensor(g),))
        ob.set_lr(lr, compiled=False)  # the host copy only: the graph input carries it
        step((Tensor(g),), Tensor(ob.get_lr(), ms.float32))
        assert oa.get_lr() == ob.get_lr() == float(np.float32(lr))
    np.testing.assert_array_equal(pb.asnumpy(), pa.asnumpy())
    np.testing.assert_array_equal(ob.exp_avg_sq[0].asnumpy(), oa.exp_avg_sq[0].asnumpy())
    assert float(ob.learning_rate.asnumpy()) == float(np.float32(lrs[-1]))
    assert "_lr_setter" not in ob.__dict__  # no compiled assign was made


def test_schedules():
    from qwen3moe.training import Schedule, cosine_with_warmup, linear_with_warmup, constant_with_warmup

    c = cosine_with_warmup(1.0, 10, 110, min_lr=0.1)
    assert c(0) == pytest.approx(0.1) and c(9) == pytest.approx(1.0)
    assert c(10) == pytest.approx(1.0) and c(60) == pytest.approx(0.55) and c(110) == pytest.approx(0.1)
    assert c(500) == pytest.approx(0.1)
    lin = linear_with_warmup(2.0, 0, 100)
    assert lin(0) == 2.0 and lin(50) == pytest.approx(1.0) and lin(100) == 0.0
    const = constant_with_warmup(3e-4, 4)
    assert const(1) == pytest.approx(1.5e-4) and const(1000) == 3e-4
    with pytest.raises(ValueError):
        Schedule("exp")


def test_clip_and_global_norm():
    import mindspore as ms
    from mindspore import Tensor

    from qwen3moe.training.optimizer import clip_by_global_norm, global_norm

    gs = (Tensor(np.full((2, 2), 3.0, np.float32)), Tensor(np.full((1,), 4.0, np.float32)))
    n = global_norm(gs)
    assert float(n.asnumpy()) == pytest.approx(math.sqrt(36 + 16))
    clipped = clip_by_global_norm(gs, 1.0, n)
    assert float(global_norm(clipped).asnumpy()) == pytest.approx(1.0, rel=1e-5)
    same = clip_by_global_norm(gs, 100.0, n)
    np.testing.assert_array_equal(same[0].asnumpy(), gs[0].asnumpy())


def test_decay_mask():
    from qwen3moe.training import DEFAULT_NO_DECAY, decay_mask

    names = ["model.norm.weight", "model.layers.0.self_attn.q_norm.weight", "a.bias", "lm_head.weight"]
    assert decay_mask(names, DEFAULT_NO_DECAY) == [False, False, False, True]
    assert decay_mask(names) == [False, False, False, True]
    assert decay_mask(names, ()) == [True] * 4
