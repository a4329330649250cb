"""Training checkpoint: atomic save, keep-last-K, and bit-identical resume."""
from __future__ import annotations

import os

import numpy as np
import pytest


def make_run(seed: int, **step_kw):
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed
    from qwen3moe.training import AdamW, cosine_with_warmup
    from qwen3moe.training.step import TrainStep

    set_init_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=2))
    opt = AdamW(model.trainable_params(), lr=1e-3, weight_decay=0.1)
    sched = cosine_with_warmup(3e-3, 2, 6, min_lr=1e-4)
    return model, opt, TrainStep(model, opt, aux_coef=1e-3, z_coef=1e-4, clip=1.0, schedule=sched,
                                            **step_kw), sched


def batch_at(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 1000, (2, 12))


def run_steps(step, rng, n):
    return [step(batch_at(rng))["loss"] for _ in range(n)]


def test_resume_is_bit_identical(tmp_path):
    from qwen3moe.training.checkpoint import load_training_checkpoint, save_training_checkpoint, step_dirs

    model, opt, step, sched = make_run(0)
    rng = np.random.default_rng(7)
    full = run_steps(step, rng, 6)

    model, opt, step, sched = make_run(0)
    rng = np.random.default_rng(7)
    first = run_steps(step, rng, 3)
    root = str(tmp_path / "ckpt")
    for s in (1, 2, 3):  # keep_last=2 prunes step 1
        save_training_checkpoint(root, s, model, opt, schedule=sched.to_dict(), data_position=s,
                                 np_rng=rng, keep_last=2)
    assert [s for s, _ in step_dirs(root)] == [2, 3]
    assert not [d for d in os.listdir(root) if d.startswith(".")]  # no temp folders left

    model2, opt2, step2, _ = make_run(123)  # different init: everything must come from the checkpoint
    rng2 = np.random.default_rng(999)
    state = load_training_checkpoint(root, model2, opt2, np_rng=rng2)
    assert state["step"] == 3 and state["data_position"] == 3
    step2.steps_done = state["step"]
    rest = run_steps(step2, rng2, 3)
    assert first + rest == full  # exact float equality: bit-identical loss sequence


def test_roundtrip_restores_every_value(tmp_path):
    from qwen3moe.training.checkpoint import load_training_checkpoint, save_training_checkpoint

    model, opt, step, _ = make_run(0)
    step(batch_at(np.random.default_rng(0)))
    path = save_training_checkpoint(str(tmp_path), 1, model, opt)
    model2, opt2, _, _ = make_run(5)
    load_training_checkpoint(path, model2, opt2)
    for a, b in zip(model.get_parameters(), model2.get_parameters()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    sa, sb = opt.state_arrays(), opt2.state_arrays()
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])
    assert opt2.get_lr() == opt.get_lr()


@pytest.mark.parametrize("guarded", [False, True])
def test_rollback_in_the_same_process_after_compiled_steps(tmp_path, guarded):
    """Loading a checkpoint into a model and optimizer whose compiled step already ran (a
    rollback) must continue exactly as from the saved state. The guarded step (skip_nonfinite)
    updates in `ms.jit` graphs: with `set_data` they kept the old buffers (this test failed)."""
    from qwen3moe.training.checkpoint import load_training_checkpoint, save_training_checkpoint

    model, opt, step, sched = make_run(0, skip_nonfinite=guarded)
    rng = np.random.default_rng(3)
    run_steps(step, rng, 2)
    path = save_training_checkpoint(str(tmp_path), 2, model, opt, np_rng=rng)
    want = run_steps(step, rng, 2)  # steps 3, 4 from the saved state
    run_steps(step, rng, 1)  # step 5 moves every buffer on
    state = load_training_checkpoint(path, model, opt, np_rng=rng)  # roll back to step 2
    step.steps_done = state["step"]
    assert run_steps(step, rng, 2) == want  # exact: same compiled graphs, same values


def test_optimizer_state_load_after_a_compiled_update():
    """AdamW called directly (`ms.jit` update) then given new state: the next update uses it."""
    import mindspore as ms
    from mindspore import Parameter, Tensor
    from qwen3moe.training import AdamW

    def fresh():
        p = Parameter(Tensor(np.ones((4, 16), np.float32)), name="w")
        return p, AdamW([p], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    g = (Tensor(np.full((4, 16), 0.5, np.float32)),)
    p, opt = fresh()
    opt(g)
    state = {k: np.zeros_like(v) for k, v in opt.state_arrays().items()}
    from qwen3moe.layers.dtypes import write_param
    write_param(p, np.ones((4, 16), np.float32))
    opt.load_state_arrays(state)
    opt(g)
    p2, opt2 = fresh()
    opt2(g)
    np.testing.assert_array_equal(p.asnumpy(), p2.asnumpy())  # 0.9 everywhere, not 1.0 or 0.8
    assert float(opt.step.asnumpy()) == 1.0 and ms.float32 == p.dtype
