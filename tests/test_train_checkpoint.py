"""Training checkpoint: atomic save, keep-last-K, and bit-identical resume."""
from __future__ import annotations

import os

import numpy as np


def make_run(seed: int):
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed
    from qwen3moe.training import AdamW, cosine_with_warmup
    from qwen3moe.training.step import TrainStep

    set_init_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=2))
    opt = AdamW(model.trainable_params(), lr=1e-3, weight_decay=0.1)
    sched = cosine_with_warmup(3e-3, 2, 6, min_lr=1e-4)
    return model, opt, TrainStep(model, opt, aux_coef=1e-3, z_coef=1e-4, clip=1.0, schedule=sched), sched


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
