"""Where a decode step's time goes, per weight mode, on a real-geometry folder.

    OMP_WAIT_POLICY=PASSIVE python bench/decode_profile.py --folder /work/data/synth-2l \
        [--modes bf16,int8,int4] [--steps 64] [--reps 20] [--batch 1]

Per mode (own subprocess): `--batch` 16-token prompts, `--steps` greedy decode steps through the engine
(ignore_eos), split into the time inside the compiled step (engine) and the host's share (sampling,
input tensors, logits copy); then the step's parts run alone in compiled cells on the model's own
weights: the lm_head op, the attention ops of every layer, the MoE ops of every layer, and an
empty compiled call (graph launch). Each part: median wall ms and median process CPU ms per call
(process CPU time counts every thread: > wall when the kernels' second thread worked, and it is
less sensitive to other tenants' load than wall time). Weight bytes per token per part are
printed so the parts' GB/s can be read off (batch B > 1: the MoE reads the experts B tokens
route to, E (1 - (1 - k / E)^B) of each layer's E under uniform routing, the estimate used).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant import MODES, head_cell  # noqa: E402

PROMPT = 16


def _nbytes(params) -> int:
    return sum(int(np.prod(p.shape)) * p.itemsize for p in params)


def _timed(fn, reps: int) -> tuple[float, float]:
    wall, cpu = [], []
    fn()
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(1e3 * (time.perf_counter() - t0))
        cpu.append(1e3 * (time.process_time() - c0))
    return statistics.median(wall), statistics.median(cpu)


def _parts(cell, reps: int, x_B1H, cos, sin, bias, meta) -> dict:
    """The fused step's parts alone (cell: the engine's FusedStepCell)."""
    import mindspore as ms
    from mindspore import Tensor, nn

    class Layers(nn.Cell):
        def __init__(self, attn: bool):
            super().__init__(auto_prefix=False)
            self.c, self.attn = cell, attn

        @ms.jit
        def construct(self, x, cos_, sin_, bias_, meta_):
            i = 0
            for layer in self.c.net.model.layers:
                if self.attn:
                    x = self.c._decode_attention(layer, x, cos_, sin_, bias_, meta_, i)
                else:
                    x = self.c._mlp(layer, x, meta_)
                i += 1
            return x

    class Empty(nn.Cell):
        @ms.jit
        def construct(self, x):
            return x + 1.0

    head, attn, moe, empty = head_cell(cell), Layers(True), Layers(False), Empty()
    small = Tensor(np.zeros((1,), np.float32))
    return {
        "lm_head": _timed(lambda: head(x_B1H).asnumpy(), reps),
        "attention": _timed(lambda: attn(x_B1H, cos, sin, bias, meta).asnumpy(), reps),
        "moe": _timed(lambda: moe(x_B1H, cos, sin, bias, meta).asnumpy(), reps),
        "empty graph": _timed(lambda: empty(small).asnumpy(), reps),
    }


def token_bytes(model) -> int:
    """Weight bytes a b1 decode step reads in all (the parts of _bytes summed)."""
    return sum(_bytes(model).values())


def _bytes(model, batch: int = 1) -> dict:
    """Weight bytes one decode step of `batch` rows reads per part (MoE: router + the experts the
    rows route to: top-k at batch 1, the uniform-routing expectation above)."""
    cfg = model.config
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    share = (1 - (1 - k / E) ** batch)  # of each layer's experts
    out = {"lm_head": 0, "attention": 0, "moe": 0}
    for p in model.get_parameters():
        n = p.name
        size = int(np.prod(p.shape)) * p.itemsize
        if n.startswith("lm_head"):
            out["lm_head"] += size
        elif ".self_attn." in n and "norm" not in n:
            out["attention"] += size
        elif ".mlp.experts." in n:
            out["moe"] += round(size * share)
        elif ".mlp.gate" in n:
            out["moe"] += size
    return out


def worker(folder: str, mode: str, steps: int, reps: int, batch: int) -> dict:
    from common import generation_runtime

    generation_runtime()  # as `qwen3moe generate`: MindSpore's graph pipeline off
    from mindspore import Tensor

    from common import load_kwargs
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.generation.generate import GenerationRun, resolve_config
    from qwen3moe.models.inputs import rope_tables

    model = Qwen3MoeForCausalLM.from_pretrained(folder, **load_kwargs(MODES[mode]))
    ids = np.random.default_rng(100).integers(0, 151643, (batch, PROMPT))
    cfg = resolve_config(model, max_new_tokens=steps + 1, ignore_eos=True, do_sample=False, prompt_cache=False)
    out: dict = {"bytes": _bytes(model, batch)}
    runs = []
    for i in range(3):  # the first compiles
        r = GenerationRun(model, ids, None, cfg)
        c0 = time.process_time()
        r.run()
        st = r.stats
        runs.append((1e3 * st.decode_s / st.decode_steps, 1e3 * st.engine_s / st.decode_steps,
                     1e3 * (time.process_time() - c0) / (st.decode_steps + 1)))
    out["step"] = runs[1:]
    eng = r.engine
    if not eng.fused:
        raise SystemExit(f"{mode}: the engine did not take the fused step")
    T = eng.slots
    x = Tensor(np.random.default_rng(1).standard_normal((batch, 1, model.config.hidden_size)).astype(np.float32))
    cos, sin = rope_tables(model.config, np.full((batch, 1), PROMPT + 3))
    bias = np.full((batch, 1, 1, T), -3.4e38, np.float32)
    bias[..., :PROMPT + 3] = 0
    meta = Tensor(np.array([PROMPT + 3, *eng.meta_head], np.int32))
    out["parts"] = _parts(eng.cell, reps, x, Tensor(cos), Tensor(sin), Tensor(bias), meta)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/work/data/synth-2l")
    ap.add_argument("--modes", default="bf16,int8,int4")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--worker")
    a = ap.parse_args()
    if a.batch < 1:
        sys.exit(f"--batch: expected a positive number of rows, got {a.batch}")
    if a.worker:
        print(json.dumps(worker(a.folder, a.worker, a.steps, a.reps, a.batch)))
        return
    from common import REPO, bench_env

    for mode in a.modes.split(","):
        if mode not in MODES:
            sys.exit(f"--modes: unknown {mode!r}; choose from {sorted(MODES)}")
        load0 = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--folder", a.folder, "--steps",
                               str(a.steps), "--reps", str(a.reps), "--batch", str(a.batch)],
                              capture_output=True, text=True,
                              env=dict(bench_env(), OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO)))
        if proc.returncode != 0:
            print(f"{mode}: worker failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{mode}, batch {a.batch} (1-min load {load0:.1f} -> {os.getloadavg()[0]:.1f})")
        for wall, engine, cpu in r["step"]:
            print(f"  step {wall:7.2f} ms wall ({1e3 * a.batch / wall:6.1f} tok/s), in the graph {engine:7.2f}, host "
                  f"{wall - engine:5.2f}; process CPU {cpu:7.2f} ms per step")
        for part, (wall, cpu) in r["parts"].items():
            mb = r["bytes"].get(part, 0) / 1e6
            rate = f", {mb:6.1f} MB: {mb / wall:5.1f} GB/s wall" if mb else ""
            print(f"  {part:12s} {wall:7.2f} ms wall, {cpu:7.2f} ms CPU{rate}")


if __name__ == "__main__":
    main()
