"""The lm_head's decode row op alone: int8 per channel against the opt-in 6 bits, same run.

    OMP_WAIT_POLICY=PASSIVE python bench/lm_head_rows.py [--rows 151936] [--hidden 2048] [--batch 1] [--reps 15]

Calls the fused decode library's DecodeRows entry (the head op's loop without its norm,
kernels/csrc/decode_layer.cc) on random weights of the real lm_head shape, with float32 and with
int8 activations, the int8 and 6-bit calls interleaved rep by rep. Prints per case the median wall
time, the weight GB/s and the 6-bit / int8 time ratio (the byte ratio is 0.75).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def weights(rng, O: int, I: int, bits: int) -> list[np.ndarray]:
    q = rng.integers(0, 256, (O, I if bits == 8 else 3 * I // 4), dtype=np.uint8)
    return [q, np.full((O, 1), 0.01, np.float16), np.full((O, 1), 128 if bits == 8 else 32, np.uint8)]


def main() -> None:
    from kernel_reference import call_aot
    from qwen3moe.kernels import decode

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    lib = decode.library()
    if lib is None:
        sys.exit("decode kernels are not built here")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.batch, a.hidden)).astype(np.float32)
    w = {bits: weights(rng, a.rows, a.hidden, bits) for bits in (8, 6)}
    for act8 in (0.0, 1.0):
        fcfg = np.array([1e-6, 1.0, act8], np.float32)
        y = np.zeros((a.batch, a.rows), np.float32)
        wall = {8: [], 6: []}
        for rep in range(a.reps + 1):
            for bits in (8, 6):
                t = time.perf_counter()
                assert call_aot(lib, "DecodeRows", [x, *w[bits], fcfg, y]) == 0
                if rep:  # the first call warms up
                    wall[bits].append(time.perf_counter() - t)
        med = {bits: statistics.median(v) for bits, v in wall.items()}
        for bits in (8, 6):
            print(f"{'int8' if act8 else 'fp32'} activations, {bits}-bit rows: {med[bits] * 1e3:7.2f} ms  "
                  f"{w[bits][0].nbytes / med[bits] / 1e9:5.1f} GB/s")
        print(f"  6-bit / int8 time: {med[6] / med[8]:.3f} (bytes 0.750)")


if __name__ == "__main__":
    main()
