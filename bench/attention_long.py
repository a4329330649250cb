"""Long-prompt attention core: AttnCoreFwd (o and the [B, N, S, T] probabilities kept for the
backward) vs AttnCoreInfer (o only, generation's prefill), causal, at Qwen3-30B-A3B's geometry.

    PATH=.venv/bin:$PATH PYTHONPATH=. python bench/attention_long.py [--seq 512 2048 4096 8192] [--reps 5] [--reuse]

B = 1, N = 32 query heads, K = 4 kv heads, D = 128, S = T. The ops are called directly (ops.Custom
aot convention through ctypes, bench/quant_ops.py `Kernel`), variants alternating call by call in a
rotating order so machine load hits them alike. Variants: "fwd" gets a fresh p each call (np.empty:
its pages fault in on first write, as a graph's fresh output buffer does), "infer" no p; with
--reuse also "fwd-reuse", the same p every call (pages already mapped: what is left is writing and
re-reading it; the process then holds two p buffers); with --fwd-lib PATH also "fwd-lib", that
build's AttnCoreFwd with a fresh p (e.g. main's cached ~/.cache/qwen3moe/attention_core-*.so). p takes N x S^2 x 4 B (8.6 GB at 8192):
where that exceeds --max-p-gb, the run uses N = 8, K = 1 (one kv head's group of 8, the same
per-head work: tasks are per query head) and prints ms scaled by 32 / 8. Prints best / median ms per call, GFLOP/s of the causal work actually done (the 64-row
blocks up to their key cut), the ratios fwd / infer of the medians, and the 1-min load.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant_ops import Kernel  # noqa: E402

N, K, D, ROWS = 32, 4, 128, 64  # ROWS: the kernel's query block (kRows in csrc/attention_core.cc)


def causal_flops(S: int, heads: int) -> float:
    """QK^T and PV over each 64-row block's keys up to its last row's diagonal (the kernel's cut)."""
    keys = sum(min(ROWS, S - i0) * min(S, i0 + ROWS) for i0 in range(0, S, ROWS))
    return 2 * 2 * heads * keys * D


def call_variant(calls, v: str, q, kk, vv, bias, p_kept):
    """One timed call of variant v; returns (ms, o)."""
    o = np.empty_like(q)
    t0 = time.perf_counter()
    if v == "infer":
        calls["infer"]("AttnCoreInfer", [q, kk, vv, bias, o])
    else:
        p = p_kept if v == "fwd-reuse" else np.empty((*q.shape[:3], kk.shape[2]), np.float32)
        calls[v]("AttnCoreFwd", [q, kk, vv, bias, o, p])
    return 1e3 * (time.perf_counter() - t0), o


def run(calls, S: int, reps: int, max_p_gb: float, reuse: bool, rng) -> None:
    n, k = (N, K) if N * S * S * 4 / 1e9 <= max_p_gb else (8, 1)
    q = rng.standard_normal((1, n, S, D), dtype=np.float32)
    kk, vv = rng.standard_normal((2, 1, k, S, D), dtype=np.float32)
    bias = np.triu(np.full((S, S), -1e9, np.float32), 1).reshape(1, 1, S, S)
    p_kept = np.zeros((1, n, S, S), np.float32) if reuse else None
    if p_kept is not None:
        p_kept.fill(0.0)  # np.zeros maps its pages lazily: touch them once
    variants = ("fwd", "infer") + ("fwd-reuse",) * reuse + ("fwd-lib",) * ("fwd-lib" in calls)
    times, outs = {v: [] for v in variants}, {}
    for r in range(reps):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            ms, outs[v] = call_variant(calls, v, q, kk, vv, bias, p_kept)
            times[v].append(ms * N / n)
    same = all(np.array_equal(outs[v], outs["infer"]) for v in variants)
    flops = causal_flops(S, N)
    med = {v: float(np.median(times[v])) for v in variants}
    for v in variants:
        print(f"S={S:5d} {v:9s} best {min(times[v]):9.1f} ms  median {med[v]:9.1f} ms  "
              f"{flops / med[v] / 1e6:6.1f} GFLOP/s  runs " + " ".join(f"{t:.0f}" for t in times[v]), flush=True)
    ratios = "  ".join(f"{v}/infer {med[v] / med['infer']:4.2f}x" for v in variants if v != "infer")
    print(f"S={S:5d} heads run {n}/{k} (ms per 32 heads)  {ratios}  o equal: {same}  "
          f"load {os.getloadavg()[0]:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-p-gb", type=float, default=2.2, help="largest p buffer (GB) to allocate at 32 heads")
    ap.add_argument("--reuse", action="store_true", help="also time AttnCoreFwd into one pre-mapped p")
    ap.add_argument("--fwd-lib", help="also time AttnCoreFwd of this attention_core build (fresh p)")
    a = ap.parse_args()
    ours = Kernel("attention_core")
    calls = {"fwd": ours, "infer": ours, "fwd-reuse": ours}
    if a.fwd_lib:
        calls["fwd-lib"] = Kernel.__new__(Kernel)
        calls["fwd-lib"].lib = ctypes.CDLL(a.fwd_lib)
    print(f"1-min load {os.getloadavg()[0]:.2f}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}",
          flush=True)
    for S in a.seq:
        run(calls, S, a.reps, a.max_p_gb, a.reuse, np.random.default_rng(S))


if __name__ == "__main__":
    main()
