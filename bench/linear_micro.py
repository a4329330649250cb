"""Micro-benchmark: MindSpore CPU MatMul under jit vs the OpenBLAS linear kernel (kernels/linear.py)
on the bench-mini dense shapes, in one process with alternating repeats (the machine is shared).

Shapes: T = 1024 tokens (4 x 256), H = 512 hidden; q 512, k/v 256, o 512 out, lm_head 8192 out.
Prints best and median wall ms per call and process CPU ms per call, and GFLOP/s at the best wall.
Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/linear_micro.py [rounds]
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import mindspore as ms
from mindspore import Tensor, ops

from qwen3moe.kernels import linear as lk
from qwen3moe.kernels.build import kernel_library

ms.set_context(mode=ms.GRAPH_MODE)
T, H = 1024, 512
mm_t, mm, mm_ta = ops.MatMul(transpose_b=True), ops.MatMul(), ops.MatMul(transpose_a=True)


@ms.jit
def ms_fwd(x, w):
    return mm_t(x, w)


@ms.jit
def ms_bwd(x, w, dy):
    return mm(dy, w), mm_ta(dy, x)


@ms.jit
def k_fwd(x, w):
    return lk.linear(x, w)


_bwd = ops.Custom(f"{kernel_library('linear')}:LinearBwd", out_shape=lambda x, w, dy: (x, w),
                  out_dtype=lambda x, w, dy: (x, w), func_type="aot")


@ms.jit
def k_bwd(x, w, dy):
    return _bwd(x, w, dy)


@ms.jit
def ms_qkv3(x, a, b, c):
    return mm_t(x, a), mm_t(x, b), mm_t(x, c)


@ms.jit
def ms_qkv_cat(x, wcat):
    return mm_t(x, wcat)


@ms.jit
def k_qkv3(x, a, b, c):
    return lk.linear3(x, a, b, c)


def _time(fn, args, reps):
    out = fn(*args)
    (out[0] if isinstance(out, tuple) else out).asnumpy()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        out = fn(*args)
    (out[0] if isinstance(out, tuple) else out).asnumpy()
    return (time.perf_counter() - w0) / reps * 1e3, (time.process_time() - c0) / reps * 1e3


def main(rounds: int = 7) -> None:
    r = np.random.default_rng(0)
    t = lambda *s: Tensor(r.standard_normal(s).astype(np.float32))
    x = t(T, H)
    ws = {"q/o 512": t(512, H), "k/v 256": t(256, H), "lm_head 8192": t(8192, H)}
    cases = []
    for name, w in ws.items():
        dy = t(T, w.shape[0])
        flops = 2 * T * H * w.shape[0]
        cases += [(f"fwd {name}", flops, [("ms", ms_fwd, (x, w)), ("blas", k_fwd, (x, w))])]
        cases += [(f"bwd {name}", 2 * flops, [("ms", ms_bwd, (x, w, dy)), ("blas", k_bwd, (x, w, dy))])]
    a, b, c = ws["q/o 512"], ws["k/v 256"], t(256, H)
    wcat = Tensor(np.concatenate([a.asnumpy(), b.asnumpy(), c.asnumpy()]))
    cases += [("fwd qkv", 2 * T * H * 1024, [("ms 3", ms_qkv3, (x, a, b, c)), ("ms cat", ms_qkv_cat, (x, wcat)),
                                             ("blas 3", k_qkv3, (x, a, b, c))])]
    res = {(label, v[0]): [] for label, _, variants in cases for v in variants}
    for _ in range(rounds):  # every case and variant once per round, so load drifts hit all alike
        for label, flops, variants in cases:
            reps = max(3, int(1e9 / flops))
            for vname, fn, args in variants:
                res[(label, vname)].append(_time(fn, args, reps))
    for label, flops, variants in cases:
        line = [f"{label:18s}"]
        for vname, _, _ in variants:
            vals = res[(label, vname)]
            bw = min(v[0] for v in vals)
            line.append(f"{vname}: best {bw:6.2f} med {statistics.median(v[0] for v in vals):6.2f} "
                        f"cpu {min(v[1] for v in vals):6.2f} ms ({flops / bw / 1e6:5.1f} GF/s)")
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
