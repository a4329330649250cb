"""Training checkpoint: atomic save, keep-last-K, and bit-identical resume."""
from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import batch_at, make_run


def run_steps(step, rng, n):
    return [step(batch_at(rng))["loss"] for _ in range(n)]


@pytest.fixture(scope="module")
def full():
    """Losses of an uninterrupted 6-step run (seed 0, batches from default_rng(7))."""
    model, opt, step, sched = make_run(0)
    return run_steps(step, np.random.default_rng(7), 6)


def test_resume_is_bit_identical(tmp_path, full):
    from qwen3moe.training.checkpoint import load_training_checkpoint, save_training_checkpoint, step_dirs

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


_KILLED_RUN = r"""
import os, signal, sys
import numpy as np
import qwen3moe.training.checkpoint as ck
from helpers import batch_at, make_run

root, kill_at = sys.argv[1], int(sys.argv[2])
write = ck.write_safetensors


def write_then_die(path, *a, **k):
    n = write(path, *a, **k)
    if f".step_{kill_at:08d}.tmp-" in path and path.endswith("model.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-save: model written, optimizer and state not
    return n


ck.write_safetensors = write_then_die
model, opt, step, sched = make_run(0)
rng = np.random.default_rng(7)
for s in range(1, 7):
    step(batch_at(rng))
    ck.save_training_checkpoint(root, s, model, opt, schedule=sched.to_dict(), data_position=s, np_rng=rng,
                                keep_last=2)
"""


def test_kill_9_mid_save_resumes_exactly_and_cleans_up(tmp_path, full):
    """A process SIGKILLed while writing step 3's checkpoint leaves .step_00000003.tmp-*; resuming
    removes it (and any .old-* leftover) and continues with the uninterrupted loss sequence."""
    import signal
    import subprocess
    import sys

    from helpers import REPO
    from qwen3moe.training.checkpoint import load_training_checkpoint, save_training_checkpoint

    root = tmp_path / "ckpt"
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(root), "3"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (root / ".step_00000002.old-x1y2").mkdir()  # a kill between swap-out and delete of a re-save
    leftovers = sorted(d for d in os.listdir(root) if d.startswith("."))
    assert len(leftovers) == 2 and leftovers[1].startswith(".step_00000003.tmp-"), leftovers

    model2, opt2, step2, _ = make_run(123)
    rng2 = np.random.default_rng(999)
    state = load_training_checkpoint(str(root), model2, opt2, np_rng=rng2)
    assert sorted(os.listdir(root)) == ["step_00000001", "step_00000002"]  # temp folders removed on resume
    assert state["step"] == 2
    step2.steps_done = state["step"]
    assert run_steps(step2, rng2, 4) == full[2:]  # exact: bit-identical continuation

    (root / ".step_00000007.tmp-abc").mkdir()
    save_training_checkpoint(str(root), 3, model2, opt2, keep_last=2)  # and on (re)start of saving
    assert sorted(os.listdir(root)) == ["step_00000002", "step_00000003"]


def test_trainer_start_removes_leftovers_before_the_first_step(tmp_path):
    """A run killed during its first save has no checkpoint to resume: its temp folder still goes
    at start, before any step (issue: "on start and on resume"), not only at the next save."""
    from qwen3moe.training.trainer import Trainer, TrainerConfig

    root = tmp_path / "ckpt"
    (root / ".step_00000002.tmp-k1").mkdir(parents=True)
    (root / ".step_00000002.tmp-k1" / "model.safetensors").write_bytes(b"partial")
    (root / ".step_00000001.old-k2").mkdir()
    seen = []

    class FirstStep(Exception):
        pass

    def step_fn(batch):
        seen.append(sorted(os.listdir(root)))
        raise FirstStep

    data = type("Data", (), {"batch": lambda self, i: None})()
    cfg = TrainerConfig(total_steps=4, save_interval=2, checkpoint_dir=str(root), progress=False)
    with pytest.raises(FirstStep):
        Trainer(step_fn, data, cfg, log=lambda s: None).fit()
    assert seen == [[]]


@pytest.mark.parametrize("damage", ["truncated_model", "truncated_optimizer", "bad_json"])
def test_corrupt_latest_checkpoint_is_a_one_line_error(tmp_path, damage):
    from qwen3moe.io.safetensors_io import CheckpointError
    from qwen3moe.training.checkpoint import load_training_checkpoint, save_training_checkpoint

    model, opt, step, _ = make_run(0)
    root = tmp_path / "ckpt"
    for s in (1, 2):
        save_training_checkpoint(str(root), s, model, opt)
    victim = root / "step_00000002" / {"truncated_model": "model.safetensors", "bad_json": "trainer_state.json",
                                       "truncated_optimizer": "optimizer.safetensors"}[damage]
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_training_checkpoint(str(root), model, opt)
    msg = str(exc.value)
    assert victim.name in msg and "step_00000001" in msg and "\n" not in msg, msg
