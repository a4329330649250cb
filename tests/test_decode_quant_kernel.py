"""The fused decode kernels (DecodeAttn / DecodeMoe / DecodeHead) over bf16, int8 and int4 weights
against the NumPy decode reference of test_decode_kernel.py run on the dequantized weights.

Weights come from kernel_reference.quant_arrays: integer codes, zero points and fp16 scales are
drawn first and W = (u - z) * s is built from them, independently of the kernels' unpacking.
Tolerance: as test_decode_kernel.py (float32, different summation orders, O(1) activations):
2e-5 absolute plus 1e-5 relative (asymmetric codes give larger weights); the kernel's dequantized weights are the float32 rounding of (u - z) * s, the
reference uses the same values. Both the AVX-512 and the portable scalar loops run.
"""
from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn

from kernel_reference import (EPS, MASKED, call_aot, decode_weights as _weights, quant_arrays, ref_attn as _ref_attn,
                              ref_moe as _ref_moe, rms_ref as _rms)
from qwen3moe.kernels import decode as decode_kernel
from qwen3moe.kernels import quant

pytestmark = pytest.mark.skipif(not decode_kernel.available(), reason="decode kernels not built here")
_PROJ = ("wq", "wk", "wv", "wo", "wgu", "wd")  # quantized; the router and lm_head may be any mode


def _call(fn: str, arrays: list) -> int:
    return call_aot(decode_kernel.library(), fn, arrays)


def _store(rng, w: dict, mode: str, g, head_mode: str):
    """Replace the float weights by `mode` storage: returns (kernel arrays per name, dequantized w)."""
    args, ref = {}, dict(w)
    for name, val in w.items():
        m = mode if name in _PROJ else (head_mode if name == "wr" else "fp32")
        if m == "fp32":
            args[name] = [val]
            continue
        I = val.shape[-1]
        gg = g if g is not None and I % g == 0 and (m != "int4" or g % 2 == 0) else None
        arrays, deq = quant_arrays(rng, val.shape, m, gg, scale=0.2 / (128 if m == "int8" else 8))
        args[name], ref[name] = arrays, deq.astype(np.float32)
    if mode == "bf16":  # norms stored as bf16 too in a bf16 model
        for name in ("ln1", "qn", "kn", "ln2"):
            bits = w[name].view(np.uint32) >> 16
            args[name] = [bits.astype(np.uint16)]
            ref[name] = (bits << 16).view(np.float32)
    return args, ref


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["bf16", "int8", "int4"]), head_mode=st.sampled_from(["fp32", "bf16", "int8", "int4"]),
       b=st.integers(1, 6), H=st.sampled_from([32, 64, 40, 48]), d=st.sampled_from([16, 32]), g=st.sampled_from([None, 16, 32]),
       e=st.integers(2, 9), i=st.sampled_from([32, 64, 24]), top_k=st.integers(1, 4), portable=st.booleans(),
       seed=st.integers(0, 2**16))
def test_quantized_layer_matches_numpy(mode, head_mode, b, H, d, g, e, i, top_k, portable, seed):
    """Attention block (with the cache write), MoE block (expert slices at small batches) and head."""
    rng = np.random.default_rng(seed)
    top_k, k, t = min(top_k, e), 2, 9
    w = _weights(rng, H=H, N=2 * k, K=k, D=d, E=e, I=i)
    args, ref = _store(rng, w, mode, g, head_mode)
    kc = rng.standard_normal((b, k, t, d)).astype(np.float32)
    vc = rng.standard_normal((b, k, t, d)).astype(np.float32)
    slot = int(rng.integers(0, t))
    valid = rng.random((b, t)) < 0.6
    valid[:, slot] = True
    bias = np.where(valid, 0.0, MASKED).astype(np.float32)
    x = rng.standard_normal((b, 1, H)).astype(np.float32)
    ang = rng.uniform(0, 3, (b, d // 2)).astype(np.float32)
    cos, sin = np.tile(np.cos(ang), 2)[:, None], np.tile(np.sin(ang), 2)[:, None]
    meta = np.array([slot, top_k, 1, 0], np.int32)
    fcfg = np.array([EPS, d ** -0.5], np.float32)
    quant.set_portable(portable)
    try:
        h, kc_new, vc_new = np.zeros_like(x), kc.copy(), vc.copy()
        a = args
        assert _call("DecodeAttn", [x, *a["ln1"], *a["wq"], *a["wk"], *a["wv"], *a["qn"], *a["kn"], *a["wo"], kc_new,
                                    vc_new, cos, sin, bias[:, None], meta, fcfg, h]) == 0
        h_ref, kc_ref, vc_ref = _ref_attn(ref, x[:, 0], kc, vc, cos[:, 0], sin[:, 0], bias, slot)
        np.testing.assert_allclose(h[:, 0], h_ref, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(kc_new, kc_ref, atol=2e-5, rtol=1e-5)
        y = np.zeros_like(x)
        assert _call("DecodeMoe", [h, *a["ln2"], *a["wr"], *a["wgu"], *a["wd"], meta, fcfg, y]) == 0
        np.testing.assert_allclose(y[:, 0], _ref_moe(ref, h[:, 0], True, top_k), atol=2e-5, rtol=1e-5)
        # the one-op layer (the engine's decode step): both halves in one call, the two ops' exact
        # results and cache writes; too few inputs are refused
        y1, kc1, vc1 = np.zeros_like(x), kc.copy(), vc.copy()
        attn_in = [x, *a["ln1"], *a["wq"], *a["wk"], *a["wv"], *a["qn"], *a["kn"], *a["wo"], kc1, vc1, cos, sin,
                   bias[:, None], meta, fcfg]
        assert _call("DecodeLayer", [*attn_in, *a["ln2"], *a["wr"], *a["wgu"], *a["wd"], meta, fcfg, y1]) == 0
        np.testing.assert_array_equal(y1, y)
        np.testing.assert_array_equal(kc1, kc_new)
        np.testing.assert_array_equal(vc1, vc_new)
        assert _call("DecodeLayer", [*attn_in, y1]) != 0
        logits = np.zeros((b, e), np.float32)
        assert _call("DecodeHead", [y, *a["ln1"], *a["wr"], fcfg, logits]) == 0
        np.testing.assert_allclose(logits, _rms(y[:, 0], ref["ln1"]) @ ref["wr"].T, atol=2e-5, rtol=1e-5)
    finally:
        quant.set_portable(False)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.sampled_from([8, 4]), act8=st.booleans(), R=st.integers(2, 6), e=st.integers(3, 8),
       top_k=st.integers(2, 4), sym=st.booleans(), portable=st.booleans(), seed=st.integers(0, 2**16))
def test_moe_rows_are_batch_invariant(bits, act8, R, e, top_k, sym, portable, seed):
    """DecodeMoe over R token rows gives each row what a call on that row alone gives, with int8
    and with float32 activations, at real-kernel widths (H 256, ffn 128: int4 g128 rows take their
    kernel-ordered / quantized inputs). Each token row is prepared once and copied to its top_k
    assignments, so a wrong token-to-row mapping gives O(1) differences. The per-row values are the
    same computation (same routing, gate/up rows and SwiGLU, same down inputs); only the down
    projection's split into ffn slices depends on the number of active experts, so partial sums add
    in another order: tolerance 1e-5 of the largest expert output (float32 rounding of <= 4 parts).
    The row kernels themselves are checked against NumPy in test_act8_kernel.py and above."""
    rng = np.random.default_rng(seed)
    H, I, top_k = 256, 128, min(top_k, e)
    mode, g = ("int8", None) if bits == 8 else ("int4", 128)
    gu, _ = quant_arrays(rng, (e, 2 * I, H), mode, g, scale=0.01)
    dn, _ = quant_arrays(rng, (e, H, I), mode, g, scale=0.01)
    if sym:
        gu[2][:], dn[2][:] = 1 << (bits - 1), 1 << (bits - 1)
    ln2 = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    wr = rng.standard_normal((e, H)).astype(np.float32)
    h = (rng.standard_normal((R, 1, H)) * rng.choice([0.1, 1, 30], (R, 1, 1))).astype(np.float32)
    meta = np.array([0, top_k, 1, 0], np.int32)
    fcfg = np.array([EPS, 0.0, 1.0 if act8 else 0.0], np.float32)

    def moe(x):
        y = np.zeros_like(x)
        assert _call("DecodeMoe", [x, ln2, wr, *gu, *dn, meta, fcfg, y]) == 0
        return y

    quant.set_portable(portable)
    try:
        batched = moe(h)
        single = np.concatenate([moe(h[r:r + 1]) for r in range(R)])
    finally:
        quant.set_portable(False)
    out = np.abs(batched - h).max()
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5 * out)


def test_bad_quantized_weight_is_refused():
    """scales whose group count does not divide the input width: non-zero status, no write."""
    rng = np.random.default_rng(0)
    w = _weights(rng, H=32, N=2, K=1, D=16, E=4, I=32)
    q, s, z = quant_arrays(rng, (4, 32), "int8")[0]
    bad = np.zeros((4, 3), np.float16)
    logits = np.zeros((1, 4), np.float32)
    x = np.ones((1, 1, 32), np.float32)
    fcfg = np.array([EPS, 0.25], np.float32)
    assert _call("DecodeHead", [x, w["ln1"], q, bad, np.zeros((4, 3), np.uint8), fcfg, logits]) != 0
    assert _call("DecodeHead", [x, w["ln1"], q, s, z, fcfg, logits]) == 0


class _Step(nn.Cell):
    """Attention + MoE + head of one layer in a compiled graph with bf16 / uint8 / float16
    Parameters: checks the dtype labels MindSpore hands the kernels."""

    def __init__(self, args, kc, vc, B, H, E, bits=False):
        super().__init__()
        self.names = list(args)
        flat = [(f"{n}{j}", a) for n in self.names for j, a in enumerate(args[n])]
        self.w = ParameterTuple([Parameter(_param(a, bits), name=nm, requires_grad=False) for nm, a in flat])
        self.count = [len(args[n]) for n in self.names]
        self.kc = Parameter(Tensor(kc), name="kc", requires_grad=False)
        self.vc = Parameter(Tensor(vc), name="vc", requires_grad=False)
        self.dops = decode_kernel.DecodeOps(B, 1, H, E)
        self.fcfg = Tensor(np.array([EPS, 16 ** -0.5], np.float32))

    def get(self, name):
        i = self.names.index(name)
        start = sum(self.count[:i])
        return tuple(self.w[start + j] for j in range(self.count[i]))

    @ms.jit
    def construct(self, x, cos, sin, bias, meta):
        g = self.get
        h = self.dops.attn(x, *g("ln1"), *g("wq"), *g("wk"), *g("wv"), *g("qn"), *g("kn"), *g("wo"), self.kc, self.vc,
                           cos, sin, bias, meta, self.fcfg)
        y = self.dops.moe(h, *g("ln2"), *g("wr"), *g("wgu"), *g("wd"), meta, self.fcfg)
        return h, y, self.dops.head(y, *g("ln1"), *g("wr"), self.fcfg)


def _param(a, bits):
    """bf16 (bit pattern a) as a bfloat16 tensor, or kept as uint16 bits (how the model holds
    the bf16 weights it gathers from)."""
    if a.dtype == np.uint16 and not bits:
        return Tensor((a.astype(np.uint32) << 16).view(np.float32), dtype=ms.bfloat16)
    return Tensor(a)


@pytest.mark.parametrize("mode", ["bf16", "bf16-bits", "int8", "int4"])
def test_compiled_graph_with_quantized_parameters(mode):
    rng = np.random.default_rng(7)
    B, H, K, D, T, E = 2, 64, 2, 16, 8, 6
    w = _weights(rng, H=H, N=4, K=K, D=D, E=E, I=32)
    bits = mode == "bf16-bits"
    mode = "bf16" if bits else mode
    args, ref = _store(rng, w, mode, 32, "bf16" if mode == "bf16" else "int8")
    kc = rng.standard_normal((B, K, T, D)).astype(np.float32)
    vc = rng.standard_normal((B, K, T, D)).astype(np.float32)
    cell = _Step(args, kc, vc, B, H, E, bits)
    bias = np.zeros((B, T), np.float32)
    bias[:, 5:] = MASKED
    x = rng.standard_normal((B, H)).astype(np.float32)
    cos, sin = np.ones((B, D), np.float32), np.zeros((B, D), np.float32)
    meta = np.array([4, 2, 1, 0], np.int32)
    h, y, logits = cell(Tensor(x[:, None]), Tensor(cos[:, None]), Tensor(sin[:, None]), Tensor(bias[:, None]),
                        Tensor(meta))
    h_ref, _, _ = _ref_attn(ref, x, kc, vc, cos, sin, bias, 4)
    np.testing.assert_allclose(h.asnumpy()[:, 0], h_ref, atol=2e-5, rtol=1e-5)
    y_ref = _ref_moe(ref, h_ref, True, 2)
    np.testing.assert_allclose(y.asnumpy()[:, 0], y_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(logits.asnumpy(), _rms(y_ref, ref["ln1"]) @ ref["wr"].T, atol=2e-5, rtol=1e-5)


def _greedy(folder, **load):
    """Prefill + 6 greedy steps (batch 2, left padding) with step logits; the engine's path."""
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.generation.generate import GenerationRun, resolve_config

    model = Qwen3MoeForCausalLM.from_pretrained(folder, **load)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, model.config.vocab_size, (2, 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    run = GenerationRun(model, ids, mask, resolve_config(model, max_new_tokens=6, do_sample=False, ignore_eos=True),
                        keep_logits=True)
    tokens = np.asarray(run.run())
    fused = [e.fused for e in model.__dict__.get("_decode_engines", {}).values()]
    return tokens, np.stack(run.step_logits), fused


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4-g32"])
def test_kernels_equal_composite_path(mode, monkeypatch):
    """A bf16 / int8 / int4 model generates through the kernels (quantized prefill ops, fused decode
    kernels) and through the composite path (QWEN3MOE_KERNELS=0: dequantize in the graph): same
    tokens, step logits equal to fp32 rounding (different summation orders through 2-4 layers:
    1e-4 of the largest logit, as test_bf16's kernel-vs-composite bound)."""
    from helpers import HF_FIXTURES

    from helpers import clear_kernel_caches

    if mode == "bf16":
        folder, load = HF_FIXTURES / "roundtrip-bf16", dict(dtype=None)
    else:
        folder = HF_FIXTURES / "tiny-fp32-gqa"
        load = dict(quantization=mode[:4], group_size=32 if mode.endswith("g32") else None)
    tokens, logits, fused = _greedy(folder, **load)
    assert fused == [True]  # the kernels' path really ran
    monkeypatch.setenv("QWEN3MOE_KERNELS", "0")
    clear_kernel_caches()
    try:
        ref_tokens, ref_logits, ref_fused = _greedy(folder, **load)
    finally:
        monkeypatch.delenv("QWEN3MOE_KERNELS")
        clear_kernel_caches()
    assert ref_fused == [False]
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4 * np.abs(ref_logits).max())

