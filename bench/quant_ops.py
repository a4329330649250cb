"""Fused decode-layer kernels per weight storage at the Qwen3-30B-A3B geometry, random weights.

    PATH=.venv/bin:$PATH PYTHONPATH=. python bench/quant_ops.py [--batch 1 8] [--reps 30] [--head]
    PATH=.venv/bin:$PATH PYTHONPATH=. python bench/quant_ops.py --rows 64 512 [--reps 10]

One decoder layer (hidden 2048, 32/4 heads, head_dim 128, 128 experts top-8, expert ffn 768;
int4 group 128, int8 per output channel) is built once per mode: fp32, bf16, int8, int4 (random
codes; ~4.6 GB in all, the fp32 experts being 2.4 GB). The attention op (KV cache 256 slots, 200
valid) and the MoE op are called directly (ops.Custom aot convention through ctypes, so no graph
dispatch is timed), modes alternating call by call so machine load hits them alike; each call
gets a fresh random input, so the router picks fresh experts and weights stream from memory.
Prints best / median ms per layer (attn + moe) and the ratio fp32 / mode of the medians.
--head adds the lm_head (vocab 151936) per mode: fp32 1.2 GB more.
--profile: batch 1, attention / MoE / lm_head op by op per mode (the head in the model's storage:
int8 per channel in the quantized modes), ms and GB/s of the weight bytes each op reads, plus the
"-a8" modes (the same int8 / int4 weights, int8 activations); --experts 32 keeps the fp32 run
under 2 GB (8 of 32 experts per call are still far beyond the L3).
--rows T ... times the prefill-shaped forward ops instead (kernels/csrc/quant_ops.cc; fp32: the
linear.cc / moe_fused.cc ops the fp32 model runs): q_proj (4096 x 2048) on T rows and the fused
experts on T tokens (top-8 of 128 drawn at random: ~T/16 rows per expert), best / median ms;
modes int8-a8 / int4-a8: the same weights with int8 activations (the opt-in mode's ops).
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


def layer(rng, mode, head, E=E, head_mode=None):
    w = {name: weight(rng, shape, mode) for name, shape in
         (("wq", (N * D, H)), ("wk", (K * D, H)), ("wv", (K * D, H)), ("wo", (H, N * D)),
          ("wgu", (E, 2 * F, H)), ("wd", (E, H, F)))}
    w["wr"] = weight(rng, (E, H), "fp32")  # the router stays as loaded (fp32 here)
    if head:
        w["head"] = weight(rng, (V, H), head_mode or mode)
    return w


def profile(modes, reps, rng, E) -> None:
    """B=1 attention, MoE and lm_head ops per mode, modes alternating call by call."""
    base = {m.removesuffix("-a8") for m in modes}
    layers = {m: layer(rng, m, True, E, "int8" if m in ("int8", "int4") else m) for m in sorted(base)}
    nbytes = lambda arrs: sum(a.nbytes for a in arrs)  # noqa: E731
    ones = lambda n: np.ones(n, np.float32)  # noqa: E731
    kc, vc = rng.standard_normal((2, 1, K, T, D), dtype=np.float32)
    bias = np.where(np.arange(T) < 200, 0.0, np.finfo(np.float32).min).astype(np.float32).reshape(1, 1, T)
    cos, sin = np.ones((1, 1, D), np.float32), np.zeros((1, 1, D), np.float32)
    meta = np.array([199, TOPK, 1, 0], np.int32)
    call = Kernel()
    times = {(m, op): [] for m in modes for op in ("attn", "moe", "head")}
    for _ in range(reps):
        x = rng.standard_normal((1, 1, H), dtype=np.float32)
        for m in modes:
            w = layers[m.removesuffix("-a8")]
            fcfg = np.array([1e-6, D ** -0.5, float(m.endswith("-a8"))], np.float32)
            h, y, logits = np.empty_like(x), np.empty_like(x), np.empty((1, V), np.float32)
            t0 = time.perf_counter()
            call("DecodeAttn", [x, ones(H), *w["wq"], *w["wk"], *w["wv"], ones(D), ones(D), *w["wo"], kc, vc, cos, sin,
                                bias, meta, fcfg, h])
            t1 = time.perf_counter()
            call("DecodeMoe", [h, ones(H), *w["wr"], *w["wgu"], *w["wd"], meta, fcfg, y])
            t2 = time.perf_counter()
            call("DecodeHead", [y, ones(H), *w["head"], fcfg, logits])
            t3 = time.perf_counter()
            for op, dt in (("attn", t1 - t0), ("moe", t2 - t1), ("head", t3 - t2)):
                times[m, op].append(1e3 * dt)
    for m in modes:
        w = layers[m.removesuffix("-a8")]
        read = {"attn": nbytes(w["wq"] + w["wk"] + w["wv"] + w["wo"]),
                "moe": nbytes(w["wr"]) + TOPK / E * nbytes(w["wgu"] + w["wd"]), "head": nbytes(w["head"])}
        parts = []
        for op in ("attn", "moe", "head"):
            med = float(np.median(times[m, op]))
            parts.append(f"{op} {med:7.3f} ms {read[op] / med / 1e6:5.1f} GB/s")
        total = sum(float(np.median(times[m, op])) for op in ("attn", "moe", "head"))
        print(f"B=1 {m:8s} " + " | ".join(parts) + f" | 1 layer + head {total:7.3f} ms", flush=True)


class Kernel:
    def __init__(self, name: str = "decode_layer"):
        from qwen3moe.kernels.build import kernel_library

        self.lib = ctypes.CDLL(kernel_library(name))

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


def prefill_ops(layers, modes, rows, reps, rng) -> None:
    """q_proj and fused experts on T rows per mode, modes alternating call by call."""
    quant, linear, moe = Kernel("quant_ops"), Kernel("linear"), Kernel("moe_fused")
    for T in rows:
        times = {(m, op): [] for m in modes for op in ("q_proj", "experts")}
        for _ in range(reps):
            x = rng.standard_normal((T, H), dtype=np.float32)
            idx = np.argsort(rng.random((T, E)), axis=1)[:, :TOPK].astype(np.int32)
            w = rng.random((T, TOPK), dtype=np.float32)
            for m in modes:
                lw, a8 = layers[m.removesuffix("-a8")], "A8" if m.endswith("-a8") else ""
                y = np.empty((T, N * D), np.float32)
                t0 = time.perf_counter()
                if m == "fp32":
                    linear("LinearFwd", [x, *lw["wq"], y])
                else:
                    quant("QuantLinearFwd" + a8, [x, *lw["wq"], y])
                t1 = time.perf_counter()
                out = np.empty_like(x)
                if m == "fp32":
                    A = T * TOPK
                    moe("MoeFusedFwd", [x, idx, w, *lw["wgu"], *lw["wd"], out, np.empty((A, 2 * F), np.float32),
                                        np.empty((A, H), np.float32), np.empty(A, np.int32), np.empty(E + 1, np.int32)])
                else:
                    quant("QuantMoeFwd" + a8, [x, idx, w, *lw["wgu"], *lw["wd"], out])
                t2 = time.perf_counter()
                times[m, "q_proj"].append(1e3 * (t1 - t0))
                times[m, "experts"].append(1e3 * (t2 - t1))
        for op in ("q_proj", "experts"):
            base = np.median(times[modes[0], op])
            for m in modes:
                med = np.median(times[m, op])
                print(f"T={T} {op:7s} {m:5s}: best {min(times[m, op]):8.2f} ms  median {med:8.2f} ms  "
                      f"{modes[0]}/{m} {base / med:4.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--head", action="store_true")
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--rows", type=int, nargs="+", help="time the prefill ops on these row counts instead")
    ap.add_argument("--profile", action="store_true", help="B=1 op by op with the model's head storage")
    ap.add_argument("--experts", type=int, default=E)
    a = ap.parse_args()
    if a.profile:
        return profile(a.modes, a.reps, np.random.default_rng(0), a.experts)
    call = Kernel()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    layers = {m: layer(rng, m, a.head) for m in dict.fromkeys(m.removesuffix("-a8") for m in a.modes)}
    print(f"weights built in {time.perf_counter() - t0:.0f} s")
    if a.rows:
        return prefill_ops(layers, a.modes, a.rows, a.reps, rng)
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
