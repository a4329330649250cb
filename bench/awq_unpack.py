"""AWQ load-time conversion micro-benchmark: one projection's AWQ tensors -> the in-memory int4
layout (io/awq.py), against a GPTQ folder's conversion of the same projection (io/gptq.py's
qweight transpose + qzeros unpack), measured interleaved in one process.

    python bench/awq_unpack.py [--reps 200] [--rounds 5]

Geometry: Qwen3-30B-A3B's expert projections, group 128 (gate/up [768, 2048], down [2048, 768]).
Prints the median ms a projection for each and the ratio AWQ / GPTQ; process CPU time too.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's qwen3moe

from qwen3moe.io.awq import awq_qweight, awq_unpack  # noqa: E402
from qwen3moe.io.gptq import unpack_int32  # noqa: E402


def _awq(t):
    return (awq_qweight(t["qweight"]), np.ascontiguousarray(t["scales"].T),
            np.ascontiguousarray(awq_unpack(t["qzeros"]).T))


def _gptq(t):  # what read_gptq does to the same-sized tensors
    packed = np.ascontiguousarray(t["qweight"].astype("<u4", copy=False).T).view(np.uint8)
    z = (unpack_int32(t["qzeros"], 4, 1).astype(np.int32) + 1) & 15
    return packed, np.ascontiguousarray(t["scales"].T), np.ascontiguousarray(z.T, np.uint8)


def _time(fn, t, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(t)
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for O, I in ((768, 2048), (2048, 768)):
        G = I // 128
        words = lambda *s: rng.integers(-2**31, 2**31, s, dtype=np.int64).astype(np.int32)  # noqa: E731
        awq = {"qweight": words(I, O // 8), "qzeros": words(G, O // 8), "scales": rng.random((G, O)).astype(np.float16)}
        gptq = {"qweight": words(I // 8, O), "qzeros": words(G, O // 8), "scales": awq["scales"]}
        runs = {"awq": [], "gptq": []}
        c0 = time.process_time()
        for _ in range(args.rounds):
            runs["awq"].append(_time(_awq, awq, args.reps))
            runs["gptq"].append(_time(_gptq, gptq, args.reps))
        cpu = (time.process_time() - c0) / (2 * args.rounds * args.reps) * 1e3
        a, g = np.median(runs["awq"]), np.median(runs["gptq"])
        print(f"[{O}, {I}] g128: awq {a:.3f} ms | gptq {g:.3f} ms | awq / gptq {a / g:.2f}x "
              f"(rounds awq {', '.join(f'{x:.3f}' for x in runs['awq'])}; gptq "
              f"{', '.join(f'{x:.3f}' for x in runs['gptq'])}; mean CPU {cpu:.3f} ms a call)")


if __name__ == "__main__":
    main()
