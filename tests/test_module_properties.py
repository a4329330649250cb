"""Hypothesis properties of the layer modules (Linear fp32/bf16, QuantizedLinear int8/int4,
Qwen3MoeMLP, Qwen3MoeAttention) against independent NumPy float64 references, on both compute
paths each module has (C++ kernel and composite MindSpore), plus attention causality and
left-padding invariance, with and without the KV cache. Function-level invariants (RoPE, GQA,
router, dispatch, MoE block) are in test_properties.py.

Tolerances (fp32 compute): outputs are O(1) sums of <= 64 products of O(1) terms, so float32
reassociation (BLAS blocking vs float64) stays below ~1e-5 relative; we allow rtol 1e-4 /
atol 1e-5. Invariance checks (same math on rearranged inputs) use atol 1e-5. The cached decoder
compares to the full recompute at 1e-4 (logits O(1), different op order, softmax over more slots).
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
from einops import rearrange, repeat
from hypothesis import HealthCheck, given, settings, strategies as st
from mindspore import Tensor

import mindspore as ms
from qwen3moe.layers.attention import Qwen3MoeAttention
from qwen3moe.layers.dtypes import set_init_seed, write_param
from qwen3moe.layers.linear import Linear
from qwen3moe.layers.mlp import Qwen3MoeMLP
from qwen3moe.layers.rope import rope_cos_sin, rope_parameters
from qwen3moe.models.inputs import causal_bias

SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# the composite attention path runs ~40 PyNative ops per call: fewer examples keep it to seconds
ATTN_SETTINGS = settings(SETTINGS, max_examples=6)
seeds = st.integers(0, 2**31 - 1)
TOL = dict(rtol=1e-4, atol=1e-5)


def rng(seed):
    return np.random.default_rng(seed)


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even) -> float32, by bit arithmetic (independent of MindSpore)."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def silu(x):
    return x / (1 + np.exp(-x))


@contextlib.contextmanager
def composite(*cells):
    """Force the composite MindSpore path of every cell below `cells` (kernels off), then restore."""
    saved = []
    for cell in cells:
        for _, c in cell.cells_and_names():
            for flag in ("use_kernel", "use_norm_rope"):
                if hasattr(c, flag):
                    saved.append((c, flag, getattr(c, flag)))
                    setattr(c, flag, False)
    try:
        yield
    finally:
        for c, flag, value in saved:
            setattr(c, flag, value)


def run(cell, *args, path: str):
    """Run `cell` on its kernel path or with kernels forced off; asserts the kernel path is built."""
    if path == "kernel":
        assert any(getattr(c, "use_kernel", False) for _, c in cell.cells_and_names()), "no kernel built"
        return cell(*args)
    with composite(cell):
        return cell(*args)


PATHS = ["kernel", "composite"]


# ---------------------------------------------------------------------------------------- Linear

@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seed=seeds, T=st.integers(1, 9), IO=st.sampled_from([(16, 8), (8, 24), (64, 33), (5, 3)]),
       bias=st.booleans())
def test_linear_fp32_equals_numpy_matmul(path, seed, T, IO, bias):
    I, O = IO
    r = rng(seed)
    lin = Linear(I, O, bias)
    w, b = r.standard_normal((O, I)).astype(np.float32), r.standard_normal(O).astype(np.float32)
    write_param(lin.weight, w)
    if bias:
        write_param(lin.bias, b)
    x = r.standard_normal((T, I)).astype(np.float32)
    y = run(lin, Tensor(x), path=path)
    assert y.shape == (T, O) and y.dtype == ms.float32
    want = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0)
    np.testing.assert_allclose(y.asnumpy(), want, **TOL)


@SETTINGS
@given(seed=seeds, T=st.integers(1, 9), IO=st.sampled_from([(16, 8), (64, 33)]), bias=st.booleans())
def test_linear_bf16_weights_compute_in_fp32(seed, T, IO, bias):
    """bf16 storage, fp32 compute: y == x @ bf16(W)^T in float32 (x is not rounded to bf16)."""
    I, O = IO
    r = rng(seed)
    lin = Linear(I, O, bias, param_dtype="bf16")
    w, b = r.standard_normal((O, I)).astype(np.float32), r.standard_normal(O).astype(np.float32)
    write_param(lin.weight, w)
    if bias:
        write_param(lin.bias, b)
    assert lin.weight.dtype == ms.bfloat16
    x = r.standard_normal((T, I)).astype(np.float32)
    y = lin(Tensor(x))
    assert y.shape == (T, O) and y.dtype == ms.float32
    want = x.astype(np.float64) @ bf16_round(w).T.astype(np.float64) + (bf16_round(b) if bias else 0)
    np.testing.assert_allclose(y.asnumpy(), want, **TOL)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seed=seeds, T=st.integers(1, 9), mode=st.sampled_from(["int8", "int4"]),
       IO=st.sampled_from([(64, 16), (32, 8), (128, 24)]), per_channel=st.booleans())
def test_quantized_linear_equals_numpy_dequantized_matmul(path, seed, T, mode, IO, per_channel):
    """QuantizedLinear == x @ W^T with W = (u - z) * s built in float64 from codes drawn before
    packing (kernel_reference.quant_arrays, independent of the layer's unpacking). Bound: the layer
    computes with the float32 rounding of W, so |err| <= 1e-5 * sum_k |x_k W_ok| (+ 1e-6)."""
    from kernel_reference import quant_arrays
    from qwen3moe.layers.quant import QuantizedLinear

    I, O = IO
    r = rng(seed)
    g = I if per_channel else 8
    (q, s, z), w = quant_arrays(r, (O, I), mode, g)
    lin = QuantizedLinear(I, O, 8 if mode == "int8" else 4, g)
    for param, arr in zip((lin.qweight, lin.scales, lin.qzeros), (q, s, z)):
        param.set_data(Tensor(arr))
    x = r.standard_normal((T, I)).astype(np.float32)
    y = run(lin, Tensor(x), path=path).asnumpy()
    assert y.shape == (T, O) and y.dtype == np.float32
    err = np.abs(y - x.astype(np.float64) @ w.T)
    assert np.all(err <= 1e-5 * (np.abs(x.astype(np.float64)) @ np.abs(w).T) + 1e-6), err.max()


# ------------------------------------------------------------------------------------------- MLP

@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(seed=seeds, T=st.integers(1, 9), HF=st.sampled_from([(16, 8), (8, 24), (32, 40)]))
def test_mlp_is_swiglu(path, seed, T, HF):
    """down(silu(gate x) * up x) against NumPy; gate and up are distinct (a swap changes the value)."""
    H, F = HF
    set_init_seed(seed)
    mlp = Qwen3MoeMLP(H, F, init_std=0.3)
    x = rng(seed).standard_normal((T, H)).astype(np.float64)
    g, u, d = (p.weight.asnumpy().astype(np.float64) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    y = run(mlp, Tensor(x.astype(np.float32)), path=path)
    assert y.shape == (T, H)
    np.testing.assert_allclose(y.asnumpy(), (silu(x @ g.T) * (x @ u.T)) @ d.T, **TOL)


# ------------------------------------------------------------------------------------- Attention

# (N query heads, K kv heads): two of three have several kv heads each serving several query
# heads, so a wrong query-head -> kv-head map shows in most examples
HEADS = st.sampled_from([(4, 2), (6, 2), (4, 1)])
D_HEAD, HIDDEN, THETA = 16, 24, 10000.0


def attention_module(seed, N, K):
    set_init_seed(seed)
    a = Qwen3MoeAttention(HIDDEN, N, K, D_HEAD, 1e-6, init_std=0.3)
    r = rng(seed + 7)  # non-trivial q/k norm weights, so a skipped or swapped norm shows
    write_param(a.q_norm.weight, 1 + 0.5 * r.standard_normal(D_HEAD))
    write_param(a.k_norm.weight, 1 + 0.5 * r.standard_normal(D_HEAD))
    return a


def tables(pos_BS):
    inv, scale = rope_parameters(D_HEAD, THETA, None, 4096)
    return rope_cos_sin(pos_BS, inv, scale)


def padded_positions(mask_BS):
    """As the model and the decoder: cumsum(mask) - 1 on real tokens, 1 on pads (transformers 5)."""
    pos = np.cumsum(mask_BS, 1) - 1
    pos[mask_BS == 0] = 1
    return pos


def attention_reference(a, x_BSH, cos_BSD, sin_BSD, bias_B1SS):
    """HF Qwen3 attention in float64: per-head q/k RMSNorm, RoPE (rotate-half), GQA, softmax, o_proj."""
    W = {n: getattr(a, n).weight.asnumpy().astype(np.float64)
         for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    N, K, D = a.num_heads, a.num_kv_heads, a.head_dim

    def norm(t, w):
        return t / np.sqrt((t ** 2).mean(-1, keepdims=True) + 1e-6) * w

    def rope(t):  # t [B, heads, S, D]
        rot = np.concatenate([-t[..., D // 2:], t[..., :D // 2]], -1)
        return t * cos_BSD[:, None] + rot * sin_BSD[:, None]

    heads = lambda t, n: rearrange(t, "b s (n d) -> b n s d", n=n)
    q = rope(norm(heads(x_BSH @ W["q_proj"].T, N), a.q_norm.weight.asnumpy()))
    k = rope(norm(heads(x_BSH @ W["k_proj"].T, K), a.k_norm.weight.asnumpy()))
    v = heads(x_BSH @ W["v_proj"].T, K)
    k, v = (repeat(t, "b k s d -> b (k g) s d", g=N // K) for t in (k, v))  # head n = k*G + g reads kv head k
    s = np.einsum("bnsd,bntd->bnst", q, k) / np.sqrt(D) + bias_B1SS
    p = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("bnst,bntd->bnsd", p / p.sum(-1, keepdims=True), v)
    return rearrange(o, "b n s d -> b s (n d)") @ W["o_proj"].T


def left_padded_batch(seed, lengths, S):
    """x [B, S, H] with row b's lengths[b] real tokens at the right end; mask [B, S]."""
    r = rng(seed)
    mask = np.zeros((len(lengths), S), np.int64)
    for b, n in enumerate(lengths):
        mask[b, S - n:] = 1
    return r.standard_normal((len(lengths), S, HIDDEN)).astype(np.float32), mask


def attend(a, x, mask, path):
    cos, sin = tables(padded_positions(mask))
    bias = causal_bias(mask, *mask.shape)
    out = run(a, Tensor(x), Tensor(cos), Tensor(sin), Tensor(bias), path=path).asnumpy()
    return out, (cos, sin, bias)


@pytest.mark.parametrize("path", PATHS)
@ATTN_SETTINGS
@given(seed=seeds, heads=HEADS, lengths=st.lists(st.integers(1, 7), min_size=1, max_size=3))
def test_attention_module_equals_reference_on_padded_batch(path, seed, heads, lengths):
    a = attention_module(seed, *heads)
    x, mask = left_padded_batch(seed, lengths, 7)
    out, (cos, sin, bias) = attend(a, x, mask, path)
    assert out.shape == x.shape
    want = attention_reference(a, x.astype(np.float64), cos, sin, bias)
    real = mask.astype(bool)  # fully masked pad queries have no defined output
    np.testing.assert_allclose(out[real], want[real], **TOL)


@pytest.mark.parametrize("path", PATHS)
@ATTN_SETTINGS
@given(seed=seeds, heads=HEADS, lengths=st.lists(st.integers(2, 7), min_size=2, max_size=3),
       data=st.data())
def test_attention_causal_and_blind_to_pads(path, seed, heads, lengths, data):
    """Changing future tokens or pad tokens never changes the outputs at earlier real positions."""
    a = attention_module(seed, *heads)
    x, mask = left_padded_batch(seed, lengths, 7)
    cut = data.draw(st.integers(8 - max(lengths), 6), "cut")  # keeps >= 1 real position before the cut
    changed = x.copy()
    changed[:, cut:] = rng(seed + 1).standard_normal(changed[:, cut:].shape)
    changed[mask == 0] = 100.0  # pads: large values would dominate any score that reads them
    before, _ = attend(a, x, mask, path)
    after, _ = attend(a, changed, mask, path)
    keep = mask.astype(bool) & (np.arange(7) < cut)[None]
    assert keep.any()
    np.testing.assert_allclose(after[keep], before[keep], atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@ATTN_SETTINGS
@given(seed=seeds, heads=HEADS, n=st.integers(1, 7), pads=st.integers(1, 5))
def test_attention_left_padding_invariant(path, seed, heads, n, pads):
    """A row left-padded by `pads` gives the same real-position outputs as the row alone."""
    a = attention_module(seed, *heads)
    x, _ = left_padded_batch(seed, [n], n)
    padded = np.concatenate([rng(seed + 2).standard_normal((1, pads, HIDDEN)).astype(np.float32), x], 1)
    mask = np.r_[np.zeros(pads, np.int64), np.ones(n, np.int64)][None]
    alone, _ = attend(a, x, np.ones((1, n), np.int64), path)
    out, _ = attend(a, padded, mask, path)
    np.testing.assert_allclose(out[:, pads:], alone, atol=1e-5)


# -------------------------------------------------------- Attention with the KV cache (decoder)

@pytest.fixture(scope="module")
def tiny_lm():
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM

    set_init_seed(11)
    cfg = Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=2, vocab_size=64, initializer_range=0.2)
    return Qwen3MoeForCausalLM(cfg)


_ENGINES: dict = {}


def decode_engine(model, path):
    """One DecodeEngine per path for all examples (each engine compiles its own step graphs): the
    fused-kernel step graph, or the composite graph (the reference and fallback)."""
    from qwen3moe.generation import engine

    if path not in _ENGINES:
        with pytest.MonkeyPatch.context() as mp:
            if path == "composite":
                mp.setattr(engine, "fused_eligible", lambda model: False)
            _ENGINES[path] = engine.DecodeEngine(model, 2, 64)
    return _ENGINES[path]


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=seeds, lengths=st.tuples(st.integers(1, 12), st.integers(1, 12)))
def test_cached_decode_left_padding_invariant(tiny_lm, path, seed, lengths):
    """Prefill + 2 cached decode steps of two left-padded rows give each row's logits from the
    uncached forward of that row alone (so pads, positions and cache slots are all right).
    Fixed shapes (prompt width 12, 64 slots, reference width 15) keep it to one compile each."""
    r = rng(seed)
    P, steps = 12, 3
    rows = [r.integers(0, 64, m + steps - 1) for m in lengths]
    ids, mask = np.zeros((2, P), np.int64), np.zeros((2, P), np.int64)
    for b, m in enumerate(lengths):
        ids[b, P - m:], mask[b, P - m:] = rows[b][:m], 1
    eng = decode_engine(tiny_lm, path)
    assert eng.fused == (path == "kernel")
    got = [eng.prefill(ids, mask)]
    for t in range(steps - 1):
        got.append(eng.decode(np.array([rows[b][lengths[b] + t] for b in range(2)])))
    # reference: each row alone from position 0, right-padded (causal: trailing pads are never read)
    alone = np.zeros((2, P + steps), np.int64)
    for b in range(2):
        alone[b, :len(rows[b])] = rows[b]
    full = tiny_lm(alone).logits.asnumpy()
    for b, m in enumerate(lengths):
        np.testing.assert_allclose(np.stack([g[b] for g in got]), full[b, m - 1:m - 1 + steps], atol=1e-4)
