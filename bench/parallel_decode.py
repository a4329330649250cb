"""Where a parallel rank's decode step spends its time (issue 17, generation on 2 processes).

    .venv/bin/python bench/parallel_decode.py [--layouts tp2,dp2ep2] [--batch 1] [--steps 64]

One `msrun` job of 2 processes per layout; each rank loads its parallelized model of
tests/fixtures/hf/tiny-fp32-gqa and times, best ms per decode step over `--steps` steps after a
prefill (compile excluded), each on its own engine:
    fused          the fused step (parallel/fused_step.py) with the plan's collectives
    fused_nocoll   the same rank model built with no groups (every collective an identity: the
                   kernels and the graph without communication; its logits are not the model's)
    composite      the composite step (generation/engine._StepCell) with the collectives
    allreduce      one compiled graph of `n` AllReduces (backend.py: shm or MCCL) over the world group of a [B, 1, H]
                   tensor, per AllReduce (n = the step's in-graph collectives: tp2 1 + 2 L + 1,
                   dp2 x ep2 2 L on the sparse layers)
    host_done      generation.generate's per-step host all-reduce of the unfinished rows (dp > 1)
and one process: the single-process fused step on the whole model. Prints one JSON line per
rank and a summary. Nothing is written to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "tests" / "fixtures" / "hf" / "tiny-fp32-gqa"
LAYOUTS = {"tp2": dict(tp=2), "dp2ep2": dict(dp=2, ep=2), "tp2ep2": dict(tp=2, ep=2)}


def _best_ms(fn, steps: int) -> float:
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def _engine_ms(model, batch: int, steps: int, fused: bool) -> float:
    import numpy as np

    from qwen3moe.generation import engine as eng_mod

    eng = eng_mod.DecodeEngine(model, batch, 128)
    if not fused:
        eng.fused, eng.cell = False, eng_mod._StepCell(model, batch, 128, eng.uid)
    ids = np.full((batch, 8), 5, np.int64)
    tok = eng.prefill(ids, np.ones_like(ids)).argmax(-1)
    eng.decode(tok)  # compile
    return _best_ms(lambda: eng.decode(tok), min(steps, 128 - 10))


def worker(a) -> None:
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, nn
    from mindspore.communication import get_rank, init

    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.generate import all_done
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.parallelize import parallelize

    ms.set_device("CPU")
    init()
    rank = get_rank()
    cfg = Qwen3MoeConfig.from_pretrained(MODEL)
    mesh = Mesh(**LAYOUTS[a.layout])
    model = parallelize(cfg, mesh, rank, str(MODEL)).model
    out = {"rank": rank, "layout": a.layout, "batch": a.batch}
    out["fused"] = _engine_ms(model, a.batch, a.steps, True)
    out["composite"] = _engine_ms(model, a.batch, a.steps, False)
    from types import SimpleNamespace

    bare = parallelize(cfg, mesh, rank, str(MODEL), coll=SimpleNamespace(groups={})).model
    out["fused_nocoll"] = _engine_ms(bare, a.batch, a.steps, True)
    L = cfg.num_hidden_layers
    n = 2 * L + 2 if mesh.tp > 1 else 2 * L

    from qwen3moe.parallel import backend

    class Chain(nn.Cell):  # the backend's all-reduce (shm or MCCL), one call site each
        def __init__(self):
            super().__init__()
            self.ars = nn.CellList([backend.get().all_reduce(None, f"bench {i}") for i in range(n)])

        @ms.jit
        def construct(self, x):
            for ar in self.ars:
                x = ar(x) * 0.5
            return x

    chain, x = Chain(), Tensor(np.ones((a.batch, 1, cfg.hidden_size), np.float32))
    chain(x).asnumpy()
    out["allreduce"] = _best_ms(lambda: chain(x).asnumpy(), a.steps) / n
    out["allreduce_n"], out["backend"] = n, backend.get().kind
    out["host_done"] = _best_ms(lambda: all_done(False), a.steps)
    print("RESULT " + json.dumps(out), flush=True)


def single(a) -> float:
    from qwen3moe import Qwen3MoeForCausalLM

    return _engine_ms(Qwen3MoeForCausalLM.from_pretrained(MODEL), a.batch, a.steps, True)


def main() -> None:
    sys.path.insert(0, str(REPO))
    from qwen3moe.commands.msrun import msrun_command

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default="tp2,dp2ep2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.layout:
        return worker(a)
    if a.single:
        print(json.dumps({"single_fused": single(a)}))
        return
    env = dict(os.environ, PYTHONPATH=str(REPO), GLOG_v="3",
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    print(f"bench/parallel_decode.py: load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; batch {a.batch}",
          flush=True)
    one = subprocess.run([sys.executable, __file__, "--single", "--batch", str(a.batch), "--steps", str(a.steps)],
                         env=env, capture_output=True, text=True, timeout=600)
    print(f"  single process fused step: {one.stdout.strip() or one.stderr[-800:]}", flush=True)
    for layout in a.layouts.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = msrun_command(2, ["--layout", layout, "--batch", str(a.batch), "--steps", str(a.steps)],
                                log_dir=f"{tmp}/logs", timeout_s=300, script=__file__)
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp)
            lines = [ln.split("RESULT ", 1)[1] for f in sorted(Path(tmp, "logs").glob("worker_*.log"))
                     for ln in f.read_text(errors="replace").splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not lines:
                print(f"  {layout}: failed (exit {p.returncode}): {p.stderr[-1500:]}", flush=True)
                continue
            for ln in lines:
                r = json.loads(ln)
                print(f"  {layout} rank {r['rank']}: fused {r['fused']:.2f} ms, no collectives "
                      f"{r['fused_nocoll']:.2f} ms, composite {r['composite']:.2f} ms, {r['backend']} AllReduce "
                      f"{r['allreduce']:.3f} ms x {r['allreduce_n']} a step, host all_done {r['host_done']:.2f} ms",
                      flush=True)
    print(f"load at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
