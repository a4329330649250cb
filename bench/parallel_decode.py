"""Where a parallel rank's decode step spends its time (issue 17, generation on 2 processes).

    .venv/bin/python bench/parallel_decode.py [--layouts tp2,dp2ep2] [--batch 1] [--steps 64]
                                              [--loop-tokens 64] [--model tiny|bench-mini]

One `msrun` job of 2 processes per layout; each rank loads its parallelized model of
tests/fixtures/hf/tiny-fp32-gqa (`--model bench-mini`: bench/common.py's random bench-mini
folder, 8 layers, hidden 512, 32 experts, vocab 8192) and times, best ms per decode step over
`--steps` steps after a prefill (compile excluded; `--steps 0`: the loop alone), each on its
own engine:
    fused          the fused step (parallel/fused_step.py) with the plan's collectives
    fused_nocoll   the same rank model built with no groups (every collective an identity: the
                   kernels and the graph without communication; its logits are not the model's)
    composite      the composite step (generation/engine._StepCell) with the collectives
    allreduce      one compiled graph of `n` AllReduces (backend.py: shm or MCCL) over the world
                   group of a [B, 1, H] tensor, per AllReduce (n = the step's in-graph
                   collectives: tp2 1 + 2 L + 1, dp2 x ep2 2 L on the sparse layers)
    host_done      the dp ranks' rows-done sum from the host (parallel/generate.all_done)
    loop           the whole host loop (generation.generate.GenerationRun, --loop-tokens greedy
                   and seeded-sampling tokens, ignore_eos, after one compiling run): ms per token
                   (wall, and this process's CPU time, all threads), split into the compiled
                   step (engine.decode), the sampler and the rows-done sum (both halves of
                   RowSplit.start_done); the shared-memory ops' waits (ops, futex sleeps, ms
                   waited a token); the busiest threads' CPU ms a token
and one process: the single-process fused step and loop on the whole model. Every process sets
the decode runtime as `qwen3moe generate` does (generation/runtime.py; QWEN3MOE_GRAPH_PIPELINE=on
keeps MindSpore's graph pipeline). Prints one JSON line per rank and a summary. Nothing is
written to bench/RESULTS.md.
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
TINY = REPO / "tests" / "fixtures" / "hf" / "tiny-fp32-gqa"


def model_dir(name: str) -> Path:
    if name == "tiny":
        return TINY
    sys.path.insert(0, str(REPO / "bench"))
    from common import ensure_bench_folder

    return ensure_bench_folder()
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


class _Timed:
    """fn with its calls' wall and process CPU seconds summed; `of(g)`: g timed into the same sums."""

    def __init__(self, fn=None) -> None:
        self.fn, self.wall, self.cpu = fn, 0.0, 0.0

    def __call__(self, *args, **kwargs):
        return self._run(self.fn, *args, **kwargs)

    def of(self, g):
        return lambda *args, **kwargs: self._run(g, *args, **kwargs)

    def _run(self, g, *args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        try:
            return g(*args, **kwargs)
        finally:
            self.wall += time.perf_counter() - w
            self.cpu += time.process_time() - c


def _loop(model, batch: int, tokens: int, sample: bool, split_of=None) -> dict:
    """ms per token of GenerationRun's decode loop, split by phase (module docstring)."""
    import numpy as np

    from qwen3moe.generation.config import GenerationConfig
    from qwen3moe.generation.generate import GenerationRun

    cfg = GenerationConfig(max_new_tokens=tokens, ignore_eos=True, do_sample=sample, seed=1234,
                           temperature=0.8, top_k=20, top_p=0.9, prompt_cache=False)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, 8))
    GenerationRun(model, ids, None, cfg, split=split_of(_Timed()) if split_of else None).run()  # compile
    done = _Timed()
    run = GenerationRun(model, ids, None, cfg, split=split_of(done) if split_of else None)
    step, run.sampler = _Timed(run.engine.decode), _Timed(run.sampler)
    run.engine.decode = step
    shm0, th0 = _shm_stats(), _thread_cpu()
    w, c = time.perf_counter(), time.process_time()
    run.run()
    w, c = time.perf_counter() - w, time.process_time() - c
    th1 = _thread_cpu()
    del run.engine.decode  # the engine is cached on the model: back to its method
    n = run.stats.decode_steps + 1  # tokens sampled: the prefill's and one per decode step
    out = {"wall": 1e3 * w / n, "cpu": 1e3 * c / n, "step": 1e3 * step.wall / n, "step_cpu": 1e3 * step.cpu / n,
           "sampler": 1e3 * run.sampler.wall / n, "done": 1e3 * done.wall / n}
    busy = sorted(((th1[t][1] - th0.get(t, (None, 0.0))[1], th1[t][0]) for t in th1), reverse=True)[:4]
    out["threads"] = [[name, round(1e3 * sec / n, 3)] for sec, name in busy if sec > 0]
    shm1 = _shm_stats()
    if shm0 and shm1:
        out.update({k: (shm1[k] - shm0[k]) / n * (1e3 if k == "wait_s" else 1) for k in shm0})
    return out


def _thread_cpu() -> dict:
    """{thread id: (name, CPU seconds)} of this process's threads (/proc; clock ticks)."""
    ticks, out = os.sysconf("SC_CLK_TCK"), {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        out[task.name] = (f"{name}:{task.name}", (int(rest[11]) + int(rest[12])) / ticks)
    return out


def _shm_stats() -> dict | None:
    """The shared-memory counters when this process joined a segment (never in the single process)."""
    from qwen3moe.parallel import shm

    return shm.stats() if shm._STATE.get("ok") else None


def _step_split(a, cfg, mesh, rank, folder, model) -> dict:
    """Best ms of the fused step, without collectives, the composite step, an AllReduce, all_done."""
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, nn

    from qwen3moe.parallel.generate import all_done
    from qwen3moe.parallel.parallelize import parallelize

    from types import SimpleNamespace

    from qwen3moe.parallel import backend

    out = {"fused": _engine_ms(model, a.batch, a.steps, True), "composite": _engine_ms(model, a.batch, a.steps, False)}
    bare = parallelize(cfg, mesh, rank, str(folder), coll=SimpleNamespace(groups={})).model
    out["fused_nocoll"] = _engine_ms(bare, a.batch, a.steps, True)
    L = cfg.num_hidden_layers
    n = 2 * L + 2 if mesh.tp > 1 else 2 * L

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
    return out


def worker(a) -> None:
    import mindspore as ms
    from mindspore.communication import get_rank, init

    from qwen3moe.generation.runtime import decode_runtime
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.generate import all_done, start_done
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.parallelize import parallelize

    ms.set_device("CPU")
    mesh = Mesh(**LAYOUTS[a.layout])
    decode_runtime()  # as `qwen3moe generate` (QWEN3MOE_GRAPH_PIPELINE=on keeps MindSpore's pipeline)
    init()
    rank = get_rank()
    folder = model_dir(a.model)
    cfg = Qwen3MoeConfig.from_pretrained(folder)
    model = parallelize(cfg, mesh, rank, str(folder)).model
    out = {"rank": rank, "layout": a.layout, "batch": a.batch}
    if a.steps:  # 0: the loop alone
        out.update(_step_split(a, cfg, mesh, rank, folder, model))
    split_of = None
    if mesh.dp > 1:
        from qwen3moe.generation.generate import RowSplit

        def split_of(timer):  # all_done and both halves of start_done timed by `timer`
            return RowSplit(mesh.dp, mesh.coords(rank)["dp"], timer.of(all_done),
                            lambda mine: timer.of(timer.of(start_done)(mine)))
    for mode in ("greedy", "sample"):
        out["loop_" + mode] = _loop(model, a.batch, a.loop_tokens, mode == "sample", split_of)
    print("RESULT " + json.dumps(out), flush=True)


def single(a) -> dict:
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.generation.runtime import decode_runtime

    decode_runtime()
    model = Qwen3MoeForCausalLM.from_pretrained(model_dir(a.model))
    return {"fused": _engine_ms(model, a.batch, a.steps, True) if a.steps else float("nan"),
            **{"loop_" + m: _loop(model, a.batch, a.loop_tokens, m == "sample") for m in ("greedy", "sample")}}


def _loop_line(r: dict) -> str:
    shm = f"; shm {r['ops']:.0f} ops, {r['sleeps']:.1f} sleeps, {r['wait_s']:.2f} ms waited" if "ops" in r else ""
    threads = ", ".join(f"{name} {ms:.2f}" for name, ms in r.get("threads", []))
    return (f"{r['wall']:.2f} ms/token (cpu {r['cpu']:.2f}): step {r['step']:.2f} (cpu {r['step_cpu']:.2f}), "
            f"sampler {r['sampler']:.2f}, rows done {r['done']:.2f}{shm}; busiest threads (cpu ms/token) {threads}")


def _commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def main() -> None:
    sys.path.insert(0, str(REPO))
    from qwen3moe.commands.msrun import msrun_command

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default="tp2,dp2ep2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64, help="timed steps of the step split (0: the loop alone)")
    ap.add_argument("--loop-tokens", type=int, default=64)
    ap.add_argument("--model", choices=("tiny", "bench-mini"), default="tiny")
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.layout:
        return worker(a)
    if a.single:
        print("RESULT " + json.dumps(single(a)))
        return
    env = dict(os.environ, PYTHONPATH=str(REPO), GLOG_v="3",
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    print(f"bench/parallel_decode.py: {a.model}, batch {a.batch}; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          f"; code {_commit()}", flush=True)
    common = ["--batch", str(a.batch), "--steps", str(a.steps), "--loop-tokens", str(a.loop_tokens), "--model", a.model]
    model_dir(a.model)  # written once, before the jobs
    one = subprocess.run([sys.executable, __file__, "--single", *common], env=env, capture_output=True, text=True,
                         timeout=600)
    got = [ln.split("RESULT ", 1)[1] for ln in one.stdout.splitlines() if ln.startswith("RESULT ")]
    if not got:
        print(f"  single process failed: {one.stderr[-800:]}", flush=True)
    else:
        r = json.loads(got[0])
        print(f"  single process: fused step {r['fused']:.2f} ms", flush=True)
        for mode in ("greedy", "sample"):
            print(f"    loop {mode:6s} {_loop_line(r['loop_' + mode])}", flush=True)
    for layout in a.layouts.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = msrun_command(2, ["--layout", layout, *common],
                                log_dir=f"{tmp}/logs", timeout_s=300, script=__file__)
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp)
            lines = [ln.split("RESULT ", 1)[1] for f in sorted(Path(tmp, "logs").glob("worker_*.log"))
                     for ln in f.read_text(errors="replace").splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not lines:
                print(f"  {layout}: failed (exit {p.returncode}): {p.stderr[-1500:]}", flush=True)
                continue
            for ln in lines:
                r = json.loads(ln)
                print(f"  {layout} rank {r['rank']}" + (f": fused {r['fused']:.2f} ms, no collectives "
                      f"{r['fused_nocoll']:.2f} ms, composite {r['composite']:.2f} ms, {r['backend']} AllReduce "
                      f"{r['allreduce']:.3f} ms x {r['allreduce_n']} a step, host all_done {r['host_done']:.2f} ms"
                      if "fused" in r else ""), flush=True)
                for mode in ("greedy", "sample"):
                    print(f"    loop {mode:6s} {_loop_line(r['loop_' + mode])}", flush=True)
    print(f"load at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
