"""A/B of the fused decode ops alone (kernels/csrc/decode_layer.cc) on bench-mini shapes.

    .venv/bin/python bench/decode_ops.py [--batch 8] [--reps 40] [--part moe|attn|head] [LIB.so ...]

Each library (default: the current build) runs the 8 layers' ops of one part in a compiled Cell on
fixed random weights (8 distinct layers, so weights stream from memory as in a real step); the
libraries alternate call by call in one process, so machine load hits them alike. Prints per
library best / median wall ms per step and CPU ms per step (process time: > wall means the pool's
helper thread worked too). Build an old version with e.g.
`git show REV:qwen3moe/kernels/csrc/decode_layer.cc > /tmp/old.cc && g++ -O3 -march=native
-fopenmp -shared -fPIC -std=c++17 /tmp/old.cc -o /tmp/old.so`.
Shapes: B batch, H hidden 512, N/K heads 8/4, D 64, T cache slots 128, E 32 experts, I 256, V 8192.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

H, N, K, D, T, E, I, TOPK, V, L = 512, 8, 4, 64, 128, 32, 256, 4, 8192, 8


def _cell(lib: str, part: str, B: int, rng):
    import mindspore as ms
    from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

    f = lambda *s, sc=0.05: Parameter(Tensor((rng.standard_normal(s) * sc).astype(np.float32)))  # noqa: E731
    op = {"attn": "DecodeAttn", "moe": "DecodeMoe", "head": "DecodeHead"}[part]
    shape = [B, V] if part == "head" else [B, 1, H]

    class Part(nn.Cell):
        def __init__(self):
            super().__init__()
            self.op = ops.Custom(f"{lib}:{op}", out_shape=shape, out_dtype=ms.float32, func_type="aot")
            self.ln = f(H, sc=1.0)
            self.fcfg = Tensor(np.array([1e-6, D ** -0.5], np.float32))
            if part == "moe":
                self.w = ParameterTuple([f(E, H, sc=1.0) for _ in range(L)] + [f(E, 2 * I, H) for _ in range(L)]
                                        + [f(E, H, I) for _ in range(L)])
            elif part == "attn":
                self.w = ParameterTuple([f(N * D, H) for _ in range(L)] + [f(K * D, H) for _ in range(2 * L)]
                                        + [f(H, N * D) for _ in range(L)] + [f(D, sc=1.0)])
                self.kc = ParameterTuple([f(B, K, T, D, sc=1.0) for _ in range(L)])
                self.vc = ParameterTuple([f(B, K, T, D, sc=1.0) for _ in range(L)])
            else:
                self.w = ParameterTuple([f(V, H)])

        @ms.jit
        def construct(self, x, cos, sin, bias, meta):
            if part == "head":
                return self.op(x, self.ln, self.w[0], self.fcfg)
            for i in range(L):
                if part == "moe":
                    x = self.op(x, self.ln, self.w[i], self.w[L + i], self.w[2 * L + i], meta, self.fcfg)
                else:
                    w = self.w
                    x = self.op(x, self.ln, w[i], w[L + i], w[2 * L + i], w[4 * L], w[4 * L], w[3 * L + i],
                                self.kc[i], self.vc[i], cos, sin, bias, meta, self.fcfg)
            return x

    return Part()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("libs", nargs="*")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--part", default="moe", choices=("moe", "attn", "head"))
    a = ap.parse_args()
    import mindspore as ms
    from mindspore import Tensor

    from qwen3moe.kernels import decode as decode_kernel

    ms.set_device("CPU")
    libs = a.libs or [decode_kernel.library()]
    B = a.batch
    cells = [_cell(lib, a.part, B, np.random.default_rng(0)) for lib in libs]
    rng = np.random.default_rng(1)
    bias = np.where(np.arange(T) < 80, 0.0, np.finfo(np.float32).min).astype(np.float32)
    args = [Tensor(rng.standard_normal((B, 1, H)).astype(np.float32)),
            Tensor(np.ones((B, 1, D), np.float32)), Tensor(np.zeros((B, 1, D), np.float32)),
            Tensor(np.broadcast_to(bias, (B, 1, T)).copy()), Tensor(np.array([79, TOPK, 1, 0], np.int32))]
    outs = [c(*args).asnumpy() for c in cells]
    for lib, o in zip(libs, outs):
        print(f"{Path(lib).name}: max |out - first lib's| = {np.abs(o - outs[0]).max():.2e}")
    wall, cpu = [[] for _ in libs], [[] for _ in libs]
    for _ in range(a.reps):
        for j, c in enumerate(cells):
            t0, c0 = time.perf_counter(), time.process_time()
            c(*args).asnumpy()
            wall[j].append(1e3 * (time.perf_counter() - t0))
            cpu[j].append(1e3 * (time.process_time() - c0))
    for lib, w, c in zip(libs, wall, cpu):
        print(f"{a.part} B={B} {Path(lib).name}: best {min(w):.2f} ms, median {np.median(w):.2f} ms, "
              f"cpu median {np.median(c):.2f} ms per step ({L} layers)")


if __name__ == "__main__":
    main()
