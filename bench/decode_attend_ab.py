"""A/B of the fused decode step's attention (DecodeAttn) over a long KV cache: this checkout's
decode kernel library against another checkout's (e.g. main in a `git worktree`), same inputs.

Qwen3-30B-A3B attention geometry (32 query / 4 kv heads, head_dim 128) with hidden size 64, so
the q/k/v/o projections are negligible and the time is the attention over T cached keys. Each
checkout runs in its own worker process (the decode thread pool is shared by every kernel library
in a process); the workers take turns per configuration, the first side alternating per round, so
machine load falls on both sides alike. Prints every round's median wall time per call and mean
process CPU time per call (both threads; steadier than wall when another job holds a core), then
new / old of the medians over rounds and of the best rounds, and the max |difference| of the outputs.

Usage (from the checkout root; build main once: git worktree add --detach /tmp/attn-main main):
  PYTHONPATH=. python bench/decode_attend_ab.py --old /tmp/attn-main [--lengths 2048,8192,16384]
      [--dtypes float32,bfloat16] [--batches 1,4] [--rounds 5] [--calls 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 32, 4, 128
_DTYPES = {np.dtype(np.float32): b"float32", np.dtype(np.uint16): b"bfloat16", np.dtype(np.int32): b"int32"}


def _call(lib, arrays: list) -> int:
    """DecodeAttn as ops.Custom aot calls it, on numpy buffers (uint16 arrays labelled bfloat16)."""
    import ctypes

    n = len(arrays)
    shp = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
    return lib.DecodeAttn(n, (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays]),
                          (ctypes.c_int * n)(*[a.ndim for a in arrays]),
                          (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(x, ctypes.POINTER(ctypes.c_int64))
                                                                 for x in shp]),
                          (ctypes.c_char_p * n)(*[_DTYPES[a.dtype] for a in arrays]), None, None)


def _inputs(T: int, dtype: str, B: int) -> list:
    """DecodeAttn's arguments for one query per row at slot T - 1 (every key unmasked)."""
    rng = np.random.default_rng(0)
    H, N, K, D = HIDDEN, HEADS, KV_HEADS, HEAD_DIM
    f = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    kc = rng.standard_normal((B, K, T, D)).astype(np.float32)
    if dtype == "bfloat16":
        kc = (kc.view(np.uint32) >> 16).astype(np.uint16)
    ang = rng.uniform(0, 3, (B, D // 2)).astype(np.float32)
    return [f(B, 1, H), 1 + f(H), f(N * D, H), f(K * D, H), f(K * D, H), 1 + f(D), 1 + f(D), f(H, N * D),
            kc, kc.copy(), np.tile(np.cos(ang), 2)[:, None], np.tile(np.sin(ang), 2)[:, None],
            np.zeros((B, 1, T), np.float32), np.array([T - 1, 2, 1, 0], np.int32),
            np.array([1e-6, D ** -0.5], np.float32), np.zeros((B, 1, H), np.float32)]


def _worker(checkout: str) -> None:
    """Serve `T dtype B calls` lines: print the median wall and the mean process CPU seconds per call and
    the first 8 outputs."""
    import ctypes

    sys.path.insert(0, checkout)
    from qwen3moe.kernels.build import kernel_library

    path = kernel_library("decode_layer")
    if path is None:
        sys.exit(f"{checkout}: no decode kernel library (see kernels/build.py)")
    lib = ctypes.CDLL(path)
    cache: dict = {}
    for line in sys.stdin:
        T, dtype, B, calls = line.split()
        key = (int(T), dtype, int(B))
        if key not in cache:
            cache.clear()  # one configuration's caches at a time (16K keys, batch 4, float32: 268 MB)
            cache[key] = _inputs(*key)
        args = cache[key]
        ts = []
        for i in range(int(calls) + 2):  # the first two calls warm the caches
            if i == 2:
                c0 = time.process_time()
            t0 = time.perf_counter()
            if _call(lib, args) != 0:
                sys.exit(f"DecodeAttn failed for {key}")
            ts.append(time.perf_counter() - t0)
        cpu = (time.process_time() - c0) / int(calls)
        print(statistics.median(ts[2:]), cpu, " ".join(map(repr, args[-1].ravel()[:8].tolist())), flush=True)


def _spawn(checkout: str):
    return subprocess.Popen([sys.executable, __file__, "--worker", checkout], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1)


def _ask(proc, cfg: tuple, calls: int):
    proc.stdin.write(f"{cfg[0]} {cfg[1]} {cfg[2]} {calls}\n")
    out = proc.stdout.readline().split()
    if not out:
        sys.exit(f"worker stopped at {cfg}")
    return float(out[0]), float(out[1]), np.array(out[2:], np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", help="checkout to compare against (its kernels are built on first use)")
    ap.add_argument("--new", default=str(Path(__file__).resolve().parent.parent), help="default: this checkout")
    ap.add_argument("--lengths", default="2048,8192,16384")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=30, help="timed calls per side, configuration and round")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return _worker(a.worker)
    if not a.old:
        ap.error("--old <checkout> is required")
    for side in (a.old, a.new):
        if not (Path(side) / "qwen3moe" / "kernels" / "build.py").is_file():
            ap.error(f"{side}: not a qwen3moe checkout (no qwen3moe/kernels/build.py)")
    for d in a.dtypes.split(","):
        if d not in ("float32", "bfloat16"):
            ap.error(f"--dtypes: expected float32 or bfloat16, got {d!r}")
    cfgs = [(int(T), d, int(B)) for B in a.batches.split(",") for d in a.dtypes.split(",")
            for T in a.lengths.split(",")]
    sides = {"old": _spawn(a.old), "new": _spawn(a.new)}
    times = {(s, c): [] for s in sides for c in cfgs}
    cpus = {(s, c): [] for s in sides for c in cfgs}
    diff = dict.fromkeys(cfgs, 0.0)
    print(f"load {os.getloadavg()[0]:.2f}; old {a.old}, new {a.new}")
    for r in range(a.rounds):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        for c in cfgs:
            outs = {}
            for s in order:
                t, cpu, outs[s] = _ask(sides[s], c, a.calls)
                times[(s, c)].append(t)
                cpus[(s, c)].append(cpu)
            diff[c] = max(diff[c], float(np.abs(outs["new"] - outs["old"]).max()))
            print(f"round {r} T={c[0]:5d} {c[1]:8s} B={c[2]}: wall old {1e3 * times[('old', c)][-1]:.3f} "
                  f"new {1e3 * times[('new', c)][-1]:.3f} ms, cpu old {1e3 * cpus[('old', c)][-1]:.3f} "
                  f"new {1e3 * cpus[('new', c)][-1]:.3f} ms", flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")
    print("medians over rounds (ms); new/old of the medians and of the best rounds")
    print("     T dtype    B  wall old  new   new/old best   cpu old  new   new/old best   max|diff|")
    for c in cfgs:
        o, n, co, cn = times[("old", c)], times[("new", c)], cpus[("old", c)], cpus[("new", c)]
        med = statistics.median
        print(f"{c[0]:6d} {c[1]:8s} {c[2]}  {1e3 * med(o):6.3f} {1e3 * med(n):6.3f}  {med(n) / med(o):.3f} "
              f"{min(n) / min(o):.3f}   {1e3 * med(co):6.3f} {1e3 * med(cn):6.3f}  {med(cn) / med(co):.3f} "
              f"{min(cn) / min(co):.3f}   {diff[c]:.1e}")
    for p in sides.values():
        p.stdin.close()
        p.wait()


if __name__ == "__main__":
    main()
