"""The int4 decode rows read 64 bytes at a time (kernels/csrc/quant_q4w.h: groups of 128 inputs or
multiples, float32 activations) against a NumPy float64 product of the dequantized weights
(docs/quantization.md layout, codes and fp16 scales drawn by kernel_reference.quant_arrays).

Shapes cover what the layout has to get right: row widths with more than 16 groups (the scales are
converted 16 groups at a time, the last batch masked), groups of 2 chunks (g 256) and one group per
row, zero points that change from group to group, output rows not a multiple of the 2- / 4-row
blocks (tail), batch rows 1-9 (the 2-row blocks at batch 1, 4-row blocks with 1-4 batch rows
otherwise).
Tolerance: 1e-5 of max |x| @ |W|^T: each product is rounded once and at most I of them are summed
in float32 (I * 2^-24 < 2e-4 relative to the sum of magnitudes in the worst case, ~1e-6 typical
for a random-sign sum: 10x margin on the typical, and a wrong lane, nibble or table gives O(1)).
"""
from __future__ import annotations

import numpy as np
import pytest

from kernel_reference import call_aot, quant_arrays
from qwen3moe.kernels import decode as decode_kernel
from qwen3moe.kernels import quant

pytestmark = pytest.mark.skipif(not decode_kernel.available(), reason="decode kernels not built here")


def _rows(x, arrays):
    y = np.zeros((x.shape[0], arrays[0].shape[0]), np.float32)
    fcfg = np.array([1e-6, 1.0, 0.0], np.float32)
    assert call_aot(decode_kernel.library(), "DecodeRows", [x, *arrays, fcfg, y]) == 0
    return y


def _check(rng, I, g, O, B, sym):
    arrays, w = quant_arrays(rng, (O, I), "int4", g, scale=0.01)
    if sym:
        arrays[2][:] = 8
        w = (np.stack([arrays[0] & 15, arrays[0] >> 4], -1).reshape(O, I).astype(np.float64) - 8) * np.repeat(
            arrays[1].astype(np.float64), g, -1)
    x = (rng.standard_normal((B, I)) * rng.choice([0.1, 1, 30], (B, 1))).astype(np.float32)
    ref = x.astype(np.float64) @ w.T
    tol = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T).max()
    y = _rows(x, arrays)
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol)
    quant.set_portable(True)  # the scalar definition, same numbers to summation order
    try:
        np.testing.assert_allclose(_rows(x, arrays), ref, rtol=0, atol=tol)
    finally:
        quant.set_portable(False)
    return y


@pytest.mark.parametrize("I,g", [(2048, 128), (2560, 128), (768, 128), (1024, 256), (384, 384)])
def test_int4_wide_rows_match_numpy(I, g):
    rng = np.random.default_rng(I + g)
    for O, B, sym in ((1, 1, True), (3, 2, False), (4, 1, False), (5, 1, True), (37, 3, False), (64, 8, True),
                      (66, 9, False), (130, 1, False)):
        _check(rng, I, g, O, B, sym)

