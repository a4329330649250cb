"""1F1B schedule properties and the backward rules of the simulated collectives."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st


@given(pp=st.integers(1, 6), M=st.integers(1, 10))
@settings(max_examples=60, deadline=None)
def test_one_f_one_b_schedule(pp, M):
    from parallel_sim.schedule import one_f_one_b, run_schedule

    if M < pp:  # the mesh requires micro_batch_num >= pp; the schedule still must not deadlock
        M = pp
    for s in range(pp):
        ops = one_f_one_b(pp, M, s)
        assert sorted(ops) == sorted([("F", m) for m in range(M)] + [("B", m) for m in range(M)])
        warm = min(pp - s - 1, M)
        assert ops[:warm] == [("F", m) for m in range(warm)]
        if warm < M:  # steady state alternates one forward with one backward
            assert ops[warm:warm + 2] == [("F", warm), ("B", 0)]
        in_flight, peak = 0, 0
        for op, _ in ops:
            in_flight += 1 if op == "F" else -1
            peak = max(peak, in_flight)
        assert peak <= pp - s  # the memory bound that makes 1F1B better than all-forward-first
    events = run_schedule(pp, M, lambda s, op, m: None)
    pos = {e: i for i, e in enumerate(events)}
    for m in range(M):
        for s in range(1, pp):
            assert pos[(s - 1, "F", m)] < pos[(s, "F", m)]
            assert pos[(s, "B", m)] < pos[(s - 1, "B", m)]


@given(pp=st.integers(1, 6), M=st.integers(1, 10))
@settings(max_examples=40, deadline=None)
def test_lifo_schedule_pops_the_newest_forward(pp, M):
    """pipeline_step.lifo (the compiled pipeline's order, pipeline_step.py): each backward is that of
    the newest pending forward (MindSpore keeps pending vjp forwards on a stack), every op once,
    and the stages' lists execute without deadlock in dependency order."""
    from parallel_sim.schedule import run_schedule
    from qwen3moe.parallel.pipeline_step import lifo

    M = max(M, pp)
    for s in range(pp):
        ops, pending = lifo(pp, M, s), []
        assert sorted(ops) == sorted([("F", m) for m in range(M)] + [("B", m) for m in range(M)])
        for op, m in ops:
            if op == "F":
                pending.append(m)
            else:
                assert pending.pop() == m
    events = run_schedule(pp, M, lambda s, op, m: None, schedule=lifo)
    pos = {e: i for i, e in enumerate(events)}
    for m in range(M):
        for s in range(1, pp):
            assert pos[(s - 1, "F", m)] < pos[(s, "F", m)]
            assert pos[(s, "B", m)] < pos[(s - 1, "B", m)]


def test_schedule_order_is_the_executed_order():
    """The executor of a real pp=2, M=3 training step follows the 1F1B lists exactly."""
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.parallel.mesh import Mesh
    from parallel_sim.schedule import one_f_one_b
    from parallel_sim.trainer import ParallelLM

    cfg = Qwen3MoeConfig.from_preset("tiny", vocab_size=64, num_hidden_layers=2, num_key_value_heads=4,
                                     head_dim=16, mlp_only_layers=[0, 1])
    pl = ParallelLM.from_model(Qwen3MoeForCausalLM(cfg), Mesh(pp=2, micro_batch_num=3))
    ids = np.random.default_rng(1).integers(0, 64, (3, 4))
    pl.loss_and_grads(ids, ids)
    for s in range(2):
        assert [(op, m) for t, op, m in pl.events if t == s] == one_f_one_b(2, 3, s)
    assert pl.events[:3] == [(0, "F", 0), (1, "F", 0), (0, "F", 1)]


@given(size=st.integers(1, 4), rows=st.integers(1, 3), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_sim_collectives_values_and_backward_rules(size, rows, seed):
    """Forward values and the per-rank Megatron backward of each collective, checked by
    differentiating sum_r <out_r, w_r> for random cotangents w_r."""
    import mindspore as ms
    from mindspore import Tensor
    from parallel_sim.collectives import SimCollectives

    rng = np.random.default_rng(seed)
    coll = SimCollectives(1, size, size)
    xs = [rng.standard_normal((rows * size, 3)).astype(np.float32) for _ in range(size)]
    ws = {"reduce": [rng.standard_normal((rows * size, 3)).astype(np.float32) for _ in range(size)]}
    cases = {  # name: (call, forward value of rank r, gradient wrt x_r given cotangents w)
        "reduce": (lambda d: coll.reduce("tp", d), lambda r: sum(xs), lambda w, r: w[r]),
        "copy": (lambda d: coll.copy("tp", d), lambda r: xs[r], lambda w, r: sum(w)),
        "gather": (lambda d: coll.gather("tp", d, 0), lambda r: np.concatenate(xs),
                   lambda w, r: np.split(w[r], size)[r]),
        "scatter": (lambda d: coll.scatter("tp", d, 0), lambda r: np.split(xs[r], size)[r],
                    lambda w, r: np.concatenate(w)),
        "reduce_scatter": (lambda d: coll.reduce_scatter("ep", d, 0), lambda r: np.split(sum(xs), size)[r],
                           lambda w, r: np.concatenate(w)),
        "gather_rs": (lambda d: coll.gather_rs("ep", d, 0), lambda r: np.concatenate(xs),
                      lambda w, r: sum(np.split(wi, size)[r] for wi in w)),
    }
    for name, (call, value, grad) in cases.items():
        out = call({r: Tensor(x) for r, x in enumerate(xs)})
        for r in range(size):
            np.testing.assert_allclose(out[r].asnumpy(), value(r), rtol=1e-6, atol=1e-6, err_msg=name)
        w = [rng.standard_normal(out[r].shape).astype(np.float32) for r in range(size)]

        def f(*x):
            o = call(dict(enumerate(x)))
            return sum((o[r] * Tensor(w[r])).sum() for r in range(size))

        g = ms.grad(f, grad_position=tuple(range(size)))(*[Tensor(x) for x in xs])
        g = g if isinstance(g, tuple) else (g,)
        for r in range(size):
            np.testing.assert_allclose(g[r].asnumpy(), grad(w, r), rtol=1e-5, atol=1e-5, err_msg=name)
