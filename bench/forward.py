"""Prefill benchmark: qwen3moe vs HF transformers on the bench-mini folder, same run, 2 threads.

    .venv/bin/python bench/forward.py [--batch 4 --seq 256 --reps 5]

Prints tokens/s for both, the ratio against HF's best experts implementation (eager or
grouped_mm), MFU against the best measured 2048^3 fp32 matmul rate, and load-time peak RSS.
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
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()
    folder = ensure_bench_folder()
    cfg = json.loads((CONFIG_DIR / "config.json").read_text())
    args = [str(folder), str(a.batch), str(a.seq), str(a.reps)]
    ours = run_json(sys.executable, str(REPO / "bench" / "_forward_ours.py"), args)
    hf = {} if a.skip_hf else run_json(ref_python(), str(REPO / "bench" / "_forward_hf.py"), args)
    tokens = a.batch * a.seq
    flops = forward_flops(cfg, a.batch, a.seq)
    peak = max(ours["matmul_flops"], hf.get("matmul_flops", 0))
    ours_tps = tokens / ours["best_s"]
    print(f"bench-mini prefill {a.batch}x{a.seq}, 2 threads; matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(ours {ours['matmul_flops'] / 1e9:.1f}, torch {hf.get('matmul_flops', 0) / 1e9:.1f})")
    print(f"  qwen3moe      {ours_tps:8.0f} tok/s  MFU {flops / ours['best_s'] / peak:5.1%}  "
          f"compile {ours['compile_s']:.1f}s  peak RSS {ours['peak_rss_mb']:.0f} MB")
    model_mb = (folder / "model.safetensors").stat().st_size / 2**20
    print(f"  load: {ours['load_s']:.2f}s, RSS growth {ours['load_rss_mb']:.0f} MB for a {model_mb:.0f} MB "
          f"fp32 model ({ours['load_rss_mb'] / model_mb:.2f}x)")
    best = None
    for impl in ("eager", "grouped_mm"):
        r = hf.get(impl)
        if not r:
            continue
        if "error" in r:
            print(f"  HF {impl:10s} unavailable: {r['error']}")
            continue
        tps = tokens / r["best_s"]
        best = max(best or 0, tps)
        print(f"  HF {impl:10s} {tps:8.0f} tok/s  MFU {flops / r['best_s'] / peak:5.1%}")
    if best:
        print(f"  ratio qwen3moe / HF best = {ours_tps / best:.2f}x (target >= 1.25x)")


if __name__ == "__main__":
    main()
