"""Fused decode-layer kernels per weight storage at the Qwen3-30B-A3B geometry, random weights.

    PATH=.venv/bin:$PATH PYTHONPATH=. python bench/quant_ops.py [--batch 1 8] [--reps 30] [--head]

One decoder layer (hidden 2048, 32/4 heads, head_dim 128, 128 experts top-8, expert ffn 768;
int4 group 128, int8 per output channel) is built once per mode: fp32, bf16, int8, int4 (random
codes; ~4.6 GB in all, the fp32 experts being 2.4 GB). The attention op (KV cache 256 slots, 200
valid) and the MoE op are called directly (ops.Custom aot convention through ctypes, so no graph
dispatch is timed), modes alternating call by call so machine load hits them alike; each call
gets a fresh random input, so the router picks fresh experts and weights stream from memory.
Prints best / median ms per layer (attn + moe) and the ratio fp32 / mode of the medians.
--head adds the lm_head (vocab 151936) per mode: fp32 1.2 GB more.
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

H, N, K, D, E, TOPK, F, V, T = 2048, 32, 4, 128, 128, 8, 768, 151936, 256
MODES = ("fp32", "bf16", "int8", "int4")
_DT = {np.dtype(np.float32): b"float32", np.dtype(np.uint16): b"bfloat16", np.dtype(np.uint8): b"uint8",
       np.dtype(np.float16): b"float16", np.dtype(np.int32): b"int32"}


def weight(rng, shape, mode):
    """Random weight of `shape` [..., O, I] in `mode` storage, as the kernel's param list."""
    n = int(np.prod(shape))
    if mode == "fp32":
        return [(rng.standard_normal(n, dtype=np.float32) * 0.02).reshape(shape)]
    if mode == "bf16":
        return [(rng.standard_normal(n, dtype=np.float32) * 0.02).view(np.uint32).__rshift__(16)
                .astype(np.uint16).reshape(shape)]
    g = shape[-1] if mode == "int8" else 128
    qshape = (*shape[:-1], shape[-1] if mode == "int8" else shape[-1] // 2)
    q = np.frombuffer(rng.bytes(int(np.prod(qshape))), np.uint8).reshape(qshape)
    gshape = (*shape[:-1], shape[-1] // g)
    s = (rng.uniform(0.5, 1.5, gshape) * (0.02 / (64 if mode == "int8" else 4))).astype(np.float16)
    z = np.full(gshape, 128 if mode == "int8" else 8, np.uint8)
    return [q, s, z]


def layer(rng, mode, head):
    w = {name: weight(rng, shape, mode) for name, shape in
         (("wq", (N * D, H)), ("wk", (K * D, H)), ("wv", (K * D, H)), ("wo", (H, N * D)),
          ("wgu", (E, 2 * F, H)), ("wd", (E, H, F)))}
    w["wr"] = weight(rng, (E, H), "fp32")  # the router stays as loaded (fp32 here)
    if head:
        w["head"] = weight(rng, (V, H), mode)
    return w


class Kernel:
    def __init__(self):
        from qwen3moe.kernels import decode

        self.lib = ctypes.CDLL(decode.library())

    def __call__(self, fn, arrays):
        n = len(arrays)
        shp = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
        rc = getattr(self.lib, fn)(n, (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays]),
                                   (ctypes.c_int * n)(*[a.ndim for a in arrays]),
                                   (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(x, ctypes.POINTER(ctypes.c_int64))
                                                                          for x in shp]),
                                   (ctypes.c_char_p * n)(*[_DT[a.dtype] for a in arrays]), None, None)
        if rc != 0:
            raise RuntimeError(f"{fn} returned {rc}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--head", action="store_true")
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    a = ap.parse_args()
    call = Kernel()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    layers = {m: layer(rng, m, a.head) for m in a.modes}
    print(f"weights built in {time.perf_counter() - t0:.0f} s")
    ones = lambda n: np.ones(n, np.float32)  # noqa: E731
    fcfg = np.array([1e-6, D ** -0.5], np.float32)
    for B in a.batch:
        kc = {m: rng.standard_normal((B, K, T, D), dtype=np.float32) for m in a.modes}
        vc = {m: rng.standard_normal((B, K, T, D), dtype=np.float32) for m in a.modes}
        bias = np.where(np.arange(T) < 200, 0.0, np.finfo(np.float32).min).astype(np.float32)
        bias = np.broadcast_to(bias, (B, 1, T)).copy()
        cos, sin = np.ones((B, 1, D), np.float32), np.zeros((B, 1, D), np.float32)
        meta = np.array([199, TOPK, 1, 0], np.int32)
        times = {m: [] for m in a.modes}
        htimes = {m: [] for m in a.modes}
        for _ in range(a.reps):
            x = rng.standard_normal((B, 1, H), dtype=np.float32)
            for m in a.modes:
                w = layers[m]
                h, y = np.empty_like(x), np.empty_like(x)
                t0 = time.perf_counter()
                call("DecodeAttn", [x, ones(H), *w["wq"], *w["wk"], *w["wv"], ones(D), ones(D), *w["wo"], kc[m],
                                    vc[m], cos, sin, bias, meta, fcfg, h])
                call("DecodeMoe", [h, ones(H), *w["wr"], *w["wgu"], *w["wd"], meta, fcfg, y])
                times[m].append(1e3 * (time.perf_counter() - t0))
                if a.head:
                    logits = np.empty((B, V), np.float32)
                    t0 = time.perf_counter()
                    call("DecodeHead", [y, ones(H), *w["head"], fcfg, logits])
                    htimes[m].append(1e3 * (time.perf_counter() - t0))
        base = np.median(times[a.modes[0]])
        for m in a.modes:
            med = np.median(times[m])
            line = (f"B={B} {m:5s} layer (attn+moe): best {min(times[m]):6.2f} ms  median {med:6.2f} ms  "
                    f"{a.modes[0]}/{m} {base / med:4.2f}x")
            if a.head:
                hm = np.median(htimes[m])
                line += f"  | head median {hm:6.2f} ms  {np.median(htimes[a.modes[0]]) / hm:4.2f}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
