"""Generation benchmark: qwen3moe generate vs HF transformers generate on bench-mini, 2 threads each.

    .venv/bin/python bench/generate.py [--reps 3] [--rounds 1] [--skip-hf] [--no-results]

End-to-end tokens/s for batch 1 and batch 8 (16-token prompts, 64 new tokens, ignore_eos, greedy),
prefill tokens/s (4 x 256 prompt), graph compile count, and a short per-step profile of our decode
(attention+norms / MoE / lm_head / host). Each side runs in its own subprocess (this file with
--worker ours|hf); HF uses the reference venv (QWEN3MOE_REF_PYTHON or .venv-ref/bin/python).
Appends a "## Generation" section to bench/RESULTS.md.
Shapes: B batch, S prompt length, N new tokens, H hidden, V vocab.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = ((1, 16, 64), (8, 16, 64))  # (B, S, N)
PREFILL = (4, 256)


def _prompts(B: int, S: int, vocab: int = 8192) -> np.ndarray:
    return np.random.default_rng(B * 1000 + S).integers(0, vocab - 8, (B, S))


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ----------------------------------------------------------------------------- workers
def worker_ours(folder: str, reps: int) -> dict:
    from common import generation_runtime

    generation_runtime()  # as `qwen3moe generate`: MindSpore's graph pipeline off
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.generation.generate import GenerationRun, generate, resolve_config
    from qwen3moe.generation.engine import compile_count

    model = Qwen3MoeForCausalLM.from_pretrained(folder, dtype="float32")
    out: dict = {}
    for B, S, N in CASES:
        ids = _prompts(B, S)
        t0 = time.perf_counter()
        generate(model, ids, max_new_tokens=N, ignore_eos=True, do_sample=False, prompt_cache=False)
        out[f"first_b{B}_s"] = time.perf_counter() - t0  # includes the compiles
        out[f"gen_b{B}_s"] = _best(lambda: generate(model, ids, max_new_tokens=N, ignore_eos=True,
                                                    do_sample=False, prompt_cache=False), reps)
        run = GenerationRun(model, ids, None, resolve_config(model, max_new_tokens=N, ignore_eos=True,
                                                             do_sample=False, prompt_cache=False))
        run.run()
        out[f"step_b{B}_ms"] = 1e3 * run.stats.decode_s / max(run.stats.decode_steps, 1)
        out[f"profile_b{B}"] = profile_step(model, B, run)
    B, S = PREFILL
    ids = _prompts(B, S)
    cfg = resolve_config(model, max_new_tokens=1, ignore_eos=True, do_sample=False, prompt_cache=False)
    GenerationRun(model, ids, None, cfg).run()
    times = []
    for _ in range(reps):
        run = GenerationRun(model, ids, None, cfg)
        run.run()
        times.append(run.stats.prefill_s)
    out["prefill_s"] = min(times)
    out["compiles"] = compile_count()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def profile_step(model, B: int, run) -> dict:
    """Split one decode step (cache T of the B x 16 + 64 case, 20 valid slots): the whole compiled
    step (graph call + logits transfer), then on the fused path each part alone in its own
    compiled graph with the same shapes: the 8 attention-block ops, the 8 MoE-block ops, final
    norm + lm_head. host = generate's loop time minus time inside engine.decode (sampling,
    history); decode() - graph = the engine's per-step host work (masks, cos/sin, tensors)."""
    from mindspore import Tensor

    from qwen3moe.generation.engine import get_engine

    engine, _ = get_engine(model, B, 16, 64)
    nxt = np.zeros(B, np.int64)

    def decode():
        engine.cursor = 20
        engine.decode(nxt)

    out = {"fused": engine.fused, "decode_ms": 1e3 * _best(decode, 20)}
    cfg = model.config
    cos, sin = np.ones((B, 1, cfg.head_dim), np.float32), np.zeros((B, 1, cfg.head_dim), np.float32)
    bias = np.zeros((B, 1, engine.slots), np.float32)
    meta = np.array([20, cfg.num_experts_per_tok, int(cfg.norm_topk_prob), 0], np.int32)
    if not engine.fused:
        return out
    args = [Tensor(cos), Tensor(sin), Tensor(bias), Tensor(meta)]
    step_args = [Tensor(nxt.reshape(B, 1).astype(np.int32)), *args]
    engine.cell(*step_args).asnumpy()
    out["graph_ms"] = 1e3 * _best(lambda: engine.cell(*step_args).asnumpy(), 20)
    x = Tensor(np.random.default_rng(0).standard_normal((B, 1, cfg.hidden_size)).astype(np.float32))
    for part in ("attn", "moe", "head"):
        probe = _probe_cell()(engine.cell, part)
        probe(x, *args).asnumpy()
        out[f"{part}_ms"] = 1e3 * _best(lambda: probe(x, *args).asnumpy(), 20)
    steps = max(run.stats.decode_steps, 1)
    out["host_ms"] = 1e3 * (run.stats.decode_s - run.stats.engine_s) / steps
    return out


def _probe_cell():
    import mindspore as ms
    from mindspore import nn

    class Probe(nn.Cell):
        """One part of the fused decode step over all layers, compiled alone."""

        def __init__(self, step, part: str) -> None:
            super().__init__(auto_prefix=False)
            self.step, self.part = step, part

        @ms.jit
        def construct(self, x_B1H, cos, sin, bias, meta):
            body, y = self.step.net.model, x_B1H
            if self.part == "head":
                return self.step.head(y)
            i = 0
            for layer in body.layers:
                if self.part == "attn":
                    y = self.step._decode_attention(layer, y, cos, sin, bias, meta, i)
                else:
                    y = self.step._mlp(layer, y, meta)
                i += 1
            return y

    return Probe


def worker_hf(folder: str, reps: int) -> dict:
    """HF generate with each experts implementation; the best one per case counts (as bench/forward.py)."""
    import torch

    torch.set_num_threads(2)
    out: dict = {"impl": {}}
    for impl in ("eager", "grouped_mm"):
        try:
            res = _hf_cases(folder, impl, reps)
        except Exception as exc:  # an implementation missing in this transformers build
            out["impl"][impl] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        out["impl"][impl] = res
        for key, val in res.items():
            if key not in out or val < out[key]:
                out[key] = val
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _hf_cases(folder: str, impl: str, reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa",
                                                 experts_implementation=impl).eval()
    res: dict = {}
    with torch.inference_mode():
        for B, S, N in CASES:
            ids = torch.from_numpy(_prompts(B, S))
            kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0,
                      attention_mask=torch.ones_like(ids))
            model.generate(ids, **kw)
            res[f"gen_b{B}_s"] = _best(lambda: model.generate(ids, **kw), reps)
        ids = torch.from_numpy(_prompts(*PREFILL))
        model(ids, logits_to_keep=1)
        res["prefill_s"] = _best(lambda: model(ids, logits_to_keep=1), reps)
    return res


# ----------------------------------------------------------------------------- driver
def report(ours: dict, hf: dict, reps: int) -> list[str]:
    lines = []
    for B, S, N in CASES:
        o = B * N / ours[f"gen_b{B}_s"]
        h = B * N / hf[f"gen_b{B}_s"] if hf else None
        ratio = f"  ratio {o / h:.2f}x (target >= 2x)" if h else ""
        lines.append(f"generate b{B} (prompt {S}, {N} new, ignore_eos): qwen3moe {o:7.1f} tok/s"
                     + (f", HF {h:7.1f} tok/s" if h else "") + ratio
                     + f"; our decode step {ours[f'step_b{B}_ms']:.1f} ms, first call {ours[f'first_b{B}_s']:.1f} s")
        p = ours[f"profile_b{B}"]
        if p["fused"]:
            lines.append(f"  b{B} step profile (best of 20): engine.decode {p['decode_ms']:.2f} ms = compiled step "
                         f"{p['graph_ms']:.2f} (alone: attention ops {p['attn_ms']:.2f}, MoE ops {p['moe_ms']:.2f}, "
                         f"norm+lm_head {p['head_ms']:.2f}) + engine host work; generate loop host "
                         f"(sampling, history) {p['host_ms']:.2f} ms")
        else:
            lines.append(f"  b{B}: composite decode graph (fused kernels unavailable), engine.decode "
                         f"{p['decode_ms']:.2f} ms")
    B, S = PREFILL
    o = B * S / ours["prefill_s"]
    h = B * S / hf["prefill_s"] if hf else None
    lines.append(f"prefill {B}x{S}: qwen3moe {o:.0f} tok/s" + (f", HF {h:.0f} tok/s, ratio {o / h:.2f}x" if h else ""))
    if hf:
        impls = {k: (v if isinstance(v, str) else {c: round(t, 3) for c, t in v.items()})
                 for k, v in hf["impl"].items()}
        lines.append(f"HF per experts implementation (best-of seconds; best one used above): {impls}")
    lines.append(f"graph compiles (qwen3moe worker, all cases): {ours['compiles']}; peak RSS ours "
                 f"{ours['peak_rss_mb']:.0f} MB" + (f", HF {hf['peak_rss_mb']:.0f} MB" if hf else "")
                 + f"; best of {reps}")
    return lines


def _merge_best(a: dict, b: dict) -> dict:
    """Per-key best of two worker results: the smaller time (keys ending _s / _ms), nested dicts
    key by key, the larger peak RSS; anything else from the first."""
    if not a:
        return b
    out = dict(a)
    for key, val in b.items():
        old = a.get(key)
        if isinstance(val, dict) and isinstance(old, dict):
            out[key] = _merge_best(old, val)
        elif key.endswith(("_s", "_ms")) and isinstance(val, (int, float)) and isinstance(old, (int, float)):
            out[key] = min(old, val)
        elif key == "peak_rss_mb":
            out[key] = max(old, val)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="alternate ours/HF workers this many times")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--worker", choices=("ours", "hf"))
    ap.add_argument("--folder")
    a = ap.parse_args()
    if a.worker:
        fn = worker_ours if a.worker == "ours" else worker_hf
        print(json.dumps(fn(a.folder, a.reps)))
        return
    from common import REPO, ensure_bench_folder, ref_python, run_json

    folder = str(ensure_bench_folder())
    args = ["--folder", folder, "--reps", str(a.reps)]
    ours: dict = {}
    hf: dict = {}
    loads = []
    for _ in range(a.rounds):  # alternate the sides so a load burst from other jobs hits both
        loads.append(os.getloadavg()[0])
        ours = _merge_best(ours, run_json(sys.executable, __file__, ["--worker", "ours", *args]))
        if not a.skip_hf:
            loads.append(os.getloadavg()[0])
            hf = _merge_best(hf, run_json(ref_python(), __file__, ["--worker", "hf", *args]))
    loads.append(os.getloadavg()[0])
    lines = report(ours, hf, a.reps)
    lines.append(f"{a.rounds} round(s) alternating qwen3moe / HF workers, best per side; 1-min load average "
                 f"before each worker and at the end: {', '.join(f'{x:.1f}' for x in loads)} (2 cores)")
    print("\n".join(lines))
    if not a.no_results:
        cmd = "python bench/generate.py " + " ".join(sys.argv[1:])
        stamp = time.strftime("%Y-%m-%d %H:%M")
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(f"\n## Generation\n\n{stamp}, bench-mini, 2 threads each, `{cmd.strip()}`\n\n```\n"
                     + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
