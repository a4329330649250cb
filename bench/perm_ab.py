"""A/B of the kernels' input permutations (act-order weights, csrc/quant_perm.h) on real shapes:
the reference library built from a git ref (default main) vs this checkout's, both without a perm
(the no-perm paths must cost the same), and this checkout's with a perm (the gather's cost).

Shapes (Qwen3-30B-A3B): QuantLinearFwd on q_proj int4 g128 [4096, 2048] at 1 row (decode rows)
and 64 rows (GEMM); DecodeMoe at batch 1 (H 2048, 128 experts of ffn 768, int4 g128, fp32
router, top-8; perms on gate_up [E, H] and down [E, F]), the token cycling through 32 inputs so
the experts change between calls. Each round runs every side for `calls` calls, the sides' order
rotating; prints process CPU time and wall per call (median over rounds) and the ratios to the reference.
Usage: OMP_WAIT_POLICY=PASSIVE python bench/perm_ab.py [--ref main] [--rounds 7] [--calls 40]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from kernel_reference import _AOT_DTYPES, quant_arrays  # noqa: E402
from qwen3moe.kernels import build  # noqa: E402


def ref_libraries(ref: str) -> dict:
    """quant_ops / decode_layer compiled from `ref`'s csrc (build.py's flags and cache)."""
    tmp = Path(tempfile.mkdtemp(prefix="perm_ab_"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "qwen3moe/kernels/csrc"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    saved, build.CSRC = build.CSRC, tmp / "qwen3moe" / "kernels" / "csrc"
    try:
        return {n: build.kernel_library.__wrapped__(n) for n in ("quant_ops", "decode_layer")}
    finally:
        build.CSRC = saved


def perms(rng, lead, I):
    return np.stack([rng.permutation(I) for _ in range(lead)]).astype(np.int32)


def cases(rng):
    """name -> (entry, function name, args without perms, args with perms)."""
    out = {}
    q_arrays, _ = quant_arrays(rng, (4096, 2048), "int4", 128, scale=0.01)
    qp = perms(rng, 1, 2048)[0]
    for T in (1, 64):
        x = [rng.standard_normal((T, 2048)).astype(np.float32)]
        y = np.zeros((T, 4096), np.float32)
        out[f"linear T={T}"] = ("quant_ops", "QuantLinearFwd", lambda i, x=x, y=y: [x[0], *q_arrays, y],
                                lambda i, x=x, y=y: [x[0], *q_arrays, qp, y])
    E, H, F = 128, 2048, 768
    gu, _ = quant_arrays(rng, (E, 2 * F, H), "int4", 128, scale=0.01)
    dn, _ = quant_arrays(rng, (E, H, F), "int4", 128, scale=0.01)
    gp, dp = perms(rng, E, H), perms(rng, E, F)
    router = (rng.standard_normal((E, H)) * 0.05).astype(np.float32)
    hs = [rng.standard_normal((1, 1, H)).astype(np.float32) for _ in range(32)]
    ln, meta, fcfg = np.ones(H, np.float32), np.array([0, 8, 1, 0], np.int32), np.array([1e-6, 1.0], np.float32)
    y = np.zeros((1, 1, H), np.float32)
    out["DecodeMoe B=1"] = ("decode_layer", "DecodeMoe",
                            lambda i: [hs[i % 32], ln, router, *gu, *dn, meta, fcfg, y],
                            lambda i: [hs[i % 32], ln, router, *gu, gp, *dn, dp, meta, fcfg, y])
    return out


class Call:
    """One entry point on fixed numpy buffers, the aot argument arrays built once (as
    kernel_reference.call_aot builds them per call: that would add ~20 us to every call timed)."""

    def __init__(self, lib: str, fn: str, arrays: list) -> None:
        n = len(arrays)
        self.keep = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
        self.args = (n, (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays]),
                     (ctypes.c_int * n)(*[a.ndim for a in arrays]),
                     (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(x, ctypes.POINTER(ctypes.c_int64))
                                                            for x in self.keep]),
                     (ctypes.c_char_p * n)(*[_AOT_DTYPES[a.dtype] for a in arrays]), None, None)
        self.fn, self.arrays = getattr(ctypes.CDLL(lib), fn), arrays

    def __call__(self) -> None:
        assert self.fn(*self.args) == 0


def run(calls_list, calls):
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(calls):
        calls_list[i % len(calls_list)]()
    return (time.process_time() - c0) / calls * 1e3, (time.perf_counter() - w0) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="main")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=40)
    a = ap.parse_args()
    ref = ref_libraries(a.ref)
    new = {n: build.kernel_library(n) for n in ref}
    print(f"load {os.getloadavg()[0]:.2f}; ref {a.ref}: {ref}; new: {new}")
    for name, (lib, fn, plain, permuted) in cases(np.random.default_rng(0)).items():
        n = 32 if "Moe" in fn else 1
        sides = {s: [Call(path, fn, args(i)) for i in range(n)]
                 for s, (path, args) in {"ref": (ref[lib], plain), "new": (new[lib], plain),
                                         "new+perm": (new[lib], permuted)}.items()}
        t = {s: [] for s in sides}
        for calls in sides.values():  # warm-up: pages, pool threads
            run(calls, 3)
        order = list(sides)
        for r in range(a.rounds):  # the sides' order rotates: none always runs first
            for s in order[r % 3:] + order[:r % 3]:
                t[s].append(run(sides[s], a.calls))
        med = {s: np.median(np.array(v), 0) for s, v in t.items()}
        cells = "  ".join(f"{s} cpu {m[0]:.3f} wall {m[1]:.3f} ms" for s, m in med.items())
        print(f"{name}: {cells}  new/ref cpu {med['new'][0] / med['ref'][0]:.3f}  "
              f"perm/new cpu {med['new+perm'][0] / med['new'][0]:.3f}")
        print("  all rounds (cpu ms): " + "; ".join(f"{s} " + ",".join(f"{c:.3f}" for c, _ in v) for s, v in t.items()))


if __name__ == "__main__":
    main()
