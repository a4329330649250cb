"""NumPy references shared by the kernel tests: the fused decode step (attention block with
its cache write, MoE block) and the quantized weight layout (codes drawn before packing).
Independent of the kernels: float math straight from HF Qwen3-MoE and docs/quantization.md."""
from __future__ import annotations

import ctypes

import numpy as np

_AOT_DTYPES = {np.dtype(np.float32): b"float32", np.dtype(np.uint16): b"bfloat16", np.dtype(np.uint8): b"uint8",
               np.dtype(np.float16): b"float16", np.dtype(np.int32): b"int32"}


def call_aot(library: str, fn: str, arrays: list) -> int:
    """Call a kernel entry point as ops.Custom aot calls it, on numpy buffers (uint16 arrays are
    labelled bfloat16). Returns the kernel's status."""
    lib = ctypes.CDLL(library)
    n = len(arrays)
    shp = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
    return getattr(lib, fn)(n, (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays]),
                            (ctypes.c_int * n)(*[a.ndim for a in arrays]),
                            (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(x, ctypes.POINTER(ctypes.c_int64))
                                                                   for x in shp]),
                            (ctypes.c_char_p * n)(*[_AOT_DTYPES[a.dtype] for a in arrays]), None, None)

EPS = 1e-6
MASKED = float(np.finfo(np.float32).min)


def rms_ref(x, w):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS))


def rope_ref(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., h:], x[..., :h]], -1) * sin


def ref_attn(w, x_BH, kc, vc, cos_BD, sin_BD, bias_BT, slot):
    """x + o_proj(attention(rms(x))) for one query per row; returns (y, new k cache, new v cache)."""
    B, K, _, D = kc.shape
    N = w["wq"].shape[0] // D
    xn = rms_ref(x_BH, w["ln1"])
    q = rms_ref((xn @ w["wq"].T).reshape(B, N, D), w["qn"])
    k = rms_ref((xn @ w["wk"].T).reshape(B, K, D), w["kn"])
    v = (xn @ w["wv"].T).reshape(B, K, D)
    q, k = rope_ref(q, cos_BD[:, None], sin_BD[:, None]), rope_ref(k, cos_BD[:, None], sin_BD[:, None])
    kc, vc = kc.copy(), vc.copy()
    kc[:, :, slot], vc[:, :, slot] = k, v
    kk = np.repeat(kc, N // K, axis=1)  # query head n uses kv head n // G
    vv = np.repeat(vc, N // K, axis=1)
    s = np.einsum("bnd,bntd->bnt", q, kk) * D ** -0.5 + bias_BT[:, None]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bnt,bntd->bnd", p, vv).reshape(B, N * D)
    return x_BH + o @ w["wo"].T, kc, vc


def ref_moe(w, h_BH, norm_topk, top_k=2):
    I = w["wd"].shape[2]
    z = rms_ref(h_BH, w["ln2"])
    logits = z @ w["wr"].T
    pr = np.exp(logits - logits.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    idx = np.argsort(-pr, -1, kind="stable")[:, :top_k]
    wt = np.take_along_axis(pr, idx, -1)
    if norm_topk:
        wt = wt / wt.sum(-1, keepdims=True)
    y = np.zeros_like(h_BH)
    for b in range(h_BH.shape[0]):
        for j in range(top_k):
            gu = w["wgu"][idx[b, j]] @ z[b]
            g, u = gu[:I], gu[I:]
            y[b] += wt[b, j] * (w["wd"][idx[b, j]] @ (g / (1 + np.exp(-g)) * u))
    return h_BH + y


def decode_weights(rng, H=32, N=4, K=2, D=8, E=6, I=16):
    f = lambda *s, sc=0.2: (rng.standard_normal(s) * sc).astype(np.float32)  # noqa: E731
    return dict(ln1=1 + f(H), wq=f(N * D, H), wk=f(K * D, H), wv=f(K * D, H), qn=1 + f(D), kn=1 + f(D),
                wo=f(H, N * D), ln2=1 + f(H), wr=f(E, H, sc=1.0), wgu=f(E, 2 * I, H), wd=f(H * E, I).reshape(E, H, I))


def quant_arrays(rng, shape, mode, g=None, scale=0.05):
    """(numpy tensors of the layout, float64 W) for a weight of `shape` [..., O, I]; bf16 is its
    uint16 bit pattern. |W| ~ scale * 2 ** bits / 2 for the quantized modes."""
    *lead, O, I = shape
    if mode == "bf16":
        bits = (rng.standard_normal(shape).astype(np.float32) * scale * 4).view(np.uint32) >> 16
        return [bits.astype(np.uint16)], (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    nbits = 8 if mode == "int8" else 4
    g = I if g is None else g
    G = I // g
    u = rng.integers(0, 2 ** nbits, shape).astype(np.uint8)
    z = rng.integers(0, 2 ** nbits, (*lead, O, G)).astype(np.uint8)
    s = (rng.uniform(0.5, 2.0, (*lead, O, G)) * rng.choice([-1, 1], (*lead, O, G)) * scale).astype(np.float16)
    w = (u.astype(np.float64) - np.repeat(z, g, -1)) * np.repeat(s.astype(np.float64), g, -1)
    q = u if nbits == 8 else (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    return [q, s, z], w


# ---- the int8-activation mode (docs/quantization.md "int8 activations") ----------------
ACT_BLOCK = 16


def quantize_act(x_BI: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int64 [B, I], sx float32 [B, I // 16]) in float32 math, as specified."""
    B, I = x_BI.shape
    xb = x_BI.astype(np.float32).reshape(B, I // ACT_BLOCK, ACT_BLOCK)
    amax = np.abs(xb).max(-1)
    safe = np.where(amax > 0, amax, np.float32(1))
    inv = np.where(amax > 0, np.float32(127) / safe, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xb * inv[..., None]), -127, 127).astype(np.int64).reshape(B, I)
    return q, (amax / np.float32(127)).astype(np.float32)


def act8_reference(x_BI, u_OI, z_OG, s_OG):
    """y [B, O] float64 and the sum of |pieces| [B, O] (for the tolerance)."""
    q, sx = quantize_act(x_BI)
    O, I = u_OI.shape
    g = I // z_OG.shape[1]
    piece = min(g, ACT_BLOCK)  # a piece lies in one activation block and one weight group
    P = I // piece
    wz = u_OI.astype(np.int64) - np.repeat(z_OG.astype(np.int64), g, 1)  # exact
    d = np.einsum("bpk,opk->bop", q.reshape(-1, P, piece), wz.reshape(O, P, piece))  # exact int64
    k0 = np.arange(P) * piece
    scale = (sx[:, k0 // ACT_BLOCK].astype(np.float64)[:, None, :]
             * s_OG[:, k0 // g].astype(np.float64)[None, :, :])
    terms = d * scale
    return terms.sum(-1), np.abs(terms).sum(-1)


def act8_case(rng, bits: int, g, I: int, O: int, rows: int, sym: bool, zero_block: bool, block: int):
    """Weights and activations for the int8-activation kernels' tests: quant_arrays [O, I] (int8
    per channel, or int4 in groups of g; g dropped where it does not divide I, int4 defaults to
    128), sym: the default zero point; x [rows, I] at magnitudes 0.1 / 1 / 30 per row, zero_block:
    row 0's second activation block of `block` inputs all zero (a zero block scale)."""
    if g is not None and I % g:
        g = None
    if bits == 4 and g is None:
        g = 128
    arrays, _ = quant_arrays(rng, (O, I), "int8" if bits == 8 else "int4", g, scale=0.01)
    if sym:  # the default zero point (precomputed zero-point term in the kernel)
        arrays[2][:] = 1 << (bits - 1)
    x = (rng.standard_normal((rows, I)) * rng.choice([0.1, 1, 30], (rows, 1))).astype(np.float32)
    if zero_block:
        x[0, block:2 * block] = 0
    return arrays, x
