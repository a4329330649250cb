"""Does the compiled pipeline's stage backward recompute the forward? One process, the tiny
preset (or --preset / --hidden), one "stage" = the whole model, B x S tokens:

    .venv/bin/python bench/stage_backward.py [--batch 4] [--seq 128] [--reps 30] [--hidden 256]

  forward      the stage's compiled forward alone (pipeline_step.StageForward)
  vjp F / B    that forward under mindspore.vjp (what the pipeline runs), then its backward
  recompute    objectives.StageGrad: one graph holding forward + backward (the backward of
               a pipeline stage that recomputes its forward), after the same forward
  fused        value_and_grad in one graph (objectives.LossGrad: no pipeline, the floor)
Ratios: (vjp F + vjp B) / (forward + recompute) < 1 is the saved recomputation; vjp B vs
recompute - forward says whether the vjp backward holds a forward. Min and median of `reps`
rounds, the four interleaved so machine load hits them alike; each in wall time and in this
process's CPU time (all its threads: robust to other processes' load). Prints a table; copy it to
bench/RESULTS.md with the command and the load.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=0, help="override hidden_size (0: the preset's)")
    ap.add_argument("--preset", default="tiny")
    a = ap.parse_args()

    import mindspore as ms
    from mindspore import ParameterTuple, Tensor, ops

    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed
    from qwen3moe.models.inputs import prepare_inputs
    from qwen3moe.parallel.objectives import LossGrad, StageGrad
    from qwen3moe.parallel.pipeline_step import StageForward

    ms.set_device("CPU")
    set_init_seed(0)
    kw = dict(hidden_size=a.hidden) if a.hidden else {}
    cfg = Qwen3MoeConfig.from_preset(a.preset, **kw)
    model = Qwen3MoeForCausalLM(cfg)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (a.batch, a.seq)).astype(np.int32)
    t = prepare_inputs(cfg, ids, labels=ids)
    args = (t.input_ids, t.cos, t.sin, t.bias, t.token_mask, t.labels)
    E = cfg.num_experts
    params = ParameterTuple(model.trainable_params())
    fwd = StageForward(model, True, None, True)
    recompute, fused = StageGrad(model, True, True), LossGrad(model)
    lm_w, aux_w = Tensor(1.0, ms.float32), Tensor(np.full(E, 1e-3, np.float32))
    zeros_h = ops.zeros((a.batch, a.seq, cfg.hidden_size), ms.float32)
    L = sum(map(cfg.is_sparse_layer, range(cfg.num_hidden_layers)))
    sens = (lm_w, aux_w, ops.zeros(2 * E, ms.float32), ops.zeros((L, E), ms.float32))
    def vjp_backward():
        _, g = pending.pop()(*sens)
        return g[0]

    pending = []
    runs = {"forward": lambda: fwd(*args)[0],
            "vjp F": lambda: pending.append(ms.vjp(lambda *x: fwd(*x), *args, weights=params)[1]) or lm_w,
            "vjp B": vjp_backward,
            "recompute": lambda: recompute(*args, zeros_h, lm_w, aux_w)[1][0],
            "fused": lambda: fused(*args)[1][0]}
    wall, cpu = ({k: [] for k in runs} for _ in range(2))
    for i in range(a.reps + 2):
        for k, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run().asnumpy()
            if i >= 2:  # the first rounds compile
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    print(f"preset {a.preset} hidden {cfg.hidden_size} layers {cfg.num_hidden_layers}, {a.batch} x {a.seq} tokens, "
          f"{a.reps} rounds")
    for what, times in (("wall", wall), ("cpu", cpu)):
        mins = {k: min(v) for k, v in times.items()}
        meds = {k: float(np.median(v)) for k, v in times.items()}
        for k in times:
            print(f"  {what:4s} {k:10s} min {1e3 * mins[k]:8.1f} ms   median {1e3 * meds[k]:8.1f} ms")
        for name, d in (("min", mins), ("median", meds)):
            print(f"  {what} {name}: (vjp F + vjp B) / (forward + recompute) = "
                  f"{(d['vjp F'] + d['vjp B']) / (d['forward'] + d['recompute']):.2f}; "
                  f"vjp B / (recompute - forward) = {d['vjp B'] / max(d['recompute'] - d['forward'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
