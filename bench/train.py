"""Train-step benchmark: qwen3moe vs HF transformers + torch.optim.AdamW, same run, 2 threads.

    .venv/bin/python bench/train.py [--batch 4 --seq 256 --steps 4]

Loss = LM + 1e-3 * HF aux loss, AdamW, no clipping, batch 4 x 256 on bench-mini. Prints tokens/s,
the ratio against HF's best experts implementation, and MFU (3x the forward matmul FLOPs per step:
forward + backward) against the best 2048^3 matmul rate measured by bench/forward.py's probe.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONFIG_DIR, REPO, ensure_bench_folder, forward_flops, ref_python, run_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--peak-gflops", type=float, default=None, help="matmul peak for MFU (default: probe)")
    a = ap.parse_args()
    folder = ensure_bench_folder()
    cfg = json.loads((CONFIG_DIR / "config.json").read_text())
    args = [str(folder), str(a.batch), str(a.seq), str(a.steps)]
    ours = run_json(sys.executable, str(REPO / "bench" / "_train_ours.py"), args)
    hf = {} if a.skip_hf else run_json(ref_python(), str(REPO / "bench" / "_train_hf.py"), args)
    peak = a.peak_gflops * 1e9 if a.peak_gflops else _probe_peak()
    tokens, flops = a.batch * a.seq, 3 * forward_flops(cfg, a.batch, a.seq)
    tps = tokens / ours["best_s"]
    print(f"bench-mini train step {a.batch}x{a.seq} (lm + 1e-3 aux, AdamW), 2 threads; matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s")
    print(f"  qwen3moe        {tps:7.0f} tok/s  MFU {flops / ours['best_s'] / peak:5.1%}  step {ours['best_s']:.2f}s "
          f"(median {ours['median_s']:.2f}s), compile {ours['compile_s']:.1f}s, peak RSS {ours['peak_rss_mb']:.0f} MB")
    best = 0.0
    for impl in ("eager", "grouped_mm"):
        r = hf.get(impl, {})
        if "best_s" in r:
            best = max(best, tokens / r["best_s"])
            print(f"  HF {impl:11s} {tokens / r['best_s']:7.0f} tok/s  MFU {flops / r['best_s'] / peak:5.1%}")
        elif r:
            print(f"  HF {impl:11s} unavailable: {r['error']}")
    if best:
        print(f"  ratio qwen3moe / HF best = {tps / best:.2f}x (target >= 1.5x); losses {ours['losses']}")


def _probe_peak() -> float:
    import time

    import numpy as np

    a = np.random.randn(2048, 2048).astype(np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(5))
    return 2 * 2048**3 / best


def _timed(fn) -> float:
    import time

    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
