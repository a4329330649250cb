"""The decode attention's grouped-query loops (kernels/csrc/decode_attend.h) vs the NumPy reference.

DecodeAttn attends the G query heads of each kv head together: scores in blocks of 16 keys
(reduced by one transposed sum; blocks where every key is masked skipped; the last T % 16 keys one
at a time), values in tiles of 16 KB (32 float32 or 64 16-bit rows at D 128), heads in passes of
8, 4, 2 and 1. These cases reach every one of those paths: G from 1 to 16 (Qwen3-30B-A3B has
G = 8, Qwen3-235B-A22B 16), head dims on the vector path (16, 128) and off it (48: the scalar
loops), T across several blocks and tiles, masks that are random, a written prefix (the cache's
unwritten tail) or a single key, and all three cache dtypes (read widened, exactly: the reference
gets the widened cache).

Tolerance: float32 with other summation orders (dots of D <= 128, softmax over T <= 200, the
o_proj of N * D <= 2048 inputs into |y| <= ~23): 1e-5 x max|y| + 1e-5, against a worst
measured 6.5e-7 x max|y| over 300 seeded cases of this test's shapes.
Shapes: B batch, N/K query/kv heads, G = N / K, T cache slots, D head_dim, H hidden.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_reference import MASKED, call_aot, decode_weights, ref_attn
from qwen3moe.kernels import decode as dk

pytestmark = pytest.mark.skipif(not dk.available(), reason="decode kernels not built here")
H = 32


def _cache(rng, shape, kind):
    """(the cache as the kernel holds it, its float32 values)"""
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "float32":
        return x, x
    if kind == "float16":
        h = x.astype(np.float16)
        return h, h.astype(np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncated: any bf16 value will do
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


def _valid(rng, pattern, B, T, slot):
    """Which cache slots each row sees (the step's own slot is hidden: a 16-bit step attends its
    own k/v rounded, which the float32 reference does not model; tests/test_kv_cache_dtype.py does)."""
    if pattern == "random":
        valid = rng.random((B, T)) < 0.5
    elif pattern == "prefix":  # written slots [0, n), the tail unwritten, as during generation
        valid = np.arange(T)[None, :] < rng.integers(1, T + 1, (B, 1))
    else:  # one key, anywhere
        valid = np.zeros((B, T), bool)
        valid[np.arange(B), rng.integers(0, T, B)] = True
    valid[:, slot] = False
    empty = ~valid.any(1)
    valid[empty, (slot + 1) % T if T > 1 else 0] = True  # at least one key besides the hidden slot
    return valid


@settings(max_examples=60, deadline=None)
@given(G=st.sampled_from([1, 2, 3, 5, 8, 9, 16]), K=st.integers(1, 2), D=st.sampled_from([16, 48, 128]),
       T=st.integers(2, 200), kind=st.sampled_from(["float32", "bfloat16", "float16"]),
       pattern=st.sampled_from(["random", "prefix", "one"]), seed=st.integers(0, 2**16))
def test_grouped_decode_attention_matches_numpy(G, K, D, T, kind, pattern, seed):
    rng = np.random.default_rng(seed)
    B, N = 2, G * K
    w = decode_weights(rng, H=H, N=N, K=K, D=D)
    kc, kc32 = _cache(rng, (B, K, T, D), kind)
    vc, vc32 = _cache(rng, (B, K, T, D), kind)
    slot = int(rng.integers(0, T))
    valid = _valid(rng, pattern, B, T, slot)
    bias = np.where(valid, 0.0, MASKED).astype(np.float32)
    x = rng.standard_normal((B, 1, H)).astype(np.float32)
    ang = rng.uniform(0, 3, (B, D // 2)).astype(np.float32)
    cos, sin = np.tile(np.cos(ang), 2)[:, None], np.tile(np.sin(ang), 2)[:, None]
    y = np.zeros_like(x)
    args = [x, w["ln1"], w["wq"], w["wk"], w["wv"], w["qn"], w["kn"], w["wo"], kc, vc, cos, sin, bias[:, None],
            np.array([slot, 2, 1, 0], np.int32), np.array([1e-6, D ** -0.5], np.float32), y]
    assert call_aot(dk.library(), "DecodeAttn", args) == 0
    y_ref, _, _ = ref_attn(w, x[:, 0], kc32, vc32, cos[:, 0], sin[:, 0], bias, slot)
    np.testing.assert_allclose(y[:, 0], y_ref, rtol=0, atol=1e-5 * np.abs(y_ref).max() + 1e-5)
