"""parallel/fused_step.py: the fused decode step on a parallelized rank model is the composite
step on the same rank model (one process), takes a 16-bit KV cache, and on pp2 stages chained
in one process gives one process's fused step; the kernels' partial / expert-offset variants
sum to the NumPy reference of the whole block.

One process cannot run a real 2-rank group, so the rank models here use `MirrorBackend`: the
collectives of 2-rank groups whose other rank holds the same tensor as this one (all-reduce
doubles, gather repeats), in place of backend.get() under the plan's own process._Group / _Op.
That is not the real model, but it is a non-identity map at each collective that both step
graphs must apply at the same places with the same inputs: a fused path that skipped a
collective, applied it after the residual, or reduced the wrong rows differs by a factor of 2.
The real 2-process runs (tokens identical to one process) are tests/test_dist_parallel.py.
Tolerances: fp32, the same math in other summation orders (kernel dot products vs MindSpore
matmuls) on logits of magnitude ~1-10: 1e-4 absolute; kernel blocks 2e-5 as tests/test_decode_kernel.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from mindspore import nn, ops

from helpers import HF_FIXTURES
from kernel_reference import EPS, call_aot, decode_weights, ref_attn, ref_moe
from qwen3moe.kernels import decode as decode_kernel

pytestmark = pytest.mark.skipif(not decode_kernel.available(), reason="decode kernels not built here")
MQA = HF_FIXTURES / "tiny-mqa-dense"  # dense + sparse layers, 16 experts top-4, one kv head (replicated over tp)
GQA = HF_FIXTURES / "tiny-fp32-gqa"   # every layer sparse; heads*dim 128 (o_proj: 64 input columns a tp2 rank)
CACHE_STORAGE = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}  # bf16: its bits
# a 16-bit cache's logits within 8 x its unit rounding x max|logit| of the float32 cache's
# (tests/test_kv_cache_dtype.py: measured at most 3.3 x on the fixtures)
KV_TOL = {"bfloat16": 2.0 ** -6, "float16": 2.0 ** -9}


class _Mirror(nn.Cell):
    """One collective of a 2-rank group whose other rank holds this rank's tensor (axis 0)."""

    def __init__(self, kind: str, pos: int) -> None:
        super().__init__()
        self.kind, self.pos = kind, pos

    def construct(self, x):
        if self.kind == "sum":
            return x + x
        if self.kind == "gather":
            return ops.concat((x, x), 0)
        half = x.shape[0] // 2
        if self.kind == "sum_own":
            return (x + x)[self.pos * half:(self.pos + 1) * half]
        return ops.concat((x[self.pos * half:(self.pos + 1) * half],) * 2, 0)  # all-to-all


class MirrorBackend:
    """backend.py's interface over _Mirror cells (module docstring)."""

    def __init__(self, pos: int) -> None:
        self.pos = pos

    def all_reduce(self, name, site=""):
        return _Mirror("sum", self.pos)

    def all_gather(self, name, site=""):
        return _Mirror("gather", self.pos)

    def reduce_scatter(self, name, site=""):
        return _Mirror("sum_own", self.pos)

    def all_to_all(self, name, site=""):
        return _Mirror("a2a", self.pos)


@pytest.fixture(scope="module")
def two_layers():
    """tiny-mqa-dense cut to a dense and a sparse layer (fewer graph ops to compile): (config,
    full HF tensors)."""
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.models.config import Qwen3MoeConfig

    full = {p.name: p.asnumpy() for p in Qwen3MoeForCausalLM.from_pretrained(MQA).get_parameters()}
    cfg = Qwen3MoeConfig.from_pretrained(MQA).replace(num_hidden_layers=2, mlp_only_layers=[0], decoder_sparse_step=1)
    return cfg, full


def _rank_model(cfg, full, layout: dict, rank: int, monkeypatch, dispatcher: str = "auto", **build):
    """This rank's parallelized model, its collectives the plan's own process._Op cells over
    MirrorBackend (as under msrun over shm / MCCL); `build`: parallelize's param_dtype /
    quantization."""
    from qwen3moe.parallel import backend
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.parallelize import parallelize
    from qwen3moe.parallel.process import _Group

    monkeypatch.setattr(backend, "get", lambda: MirrorBackend(rank))
    mesh = Mesh(**layout)
    groups = {kind: _Group(f"mirror-{kind}", [0, 1], rank) for kind in ("tp", "ep") if getattr(mesh, kind) > 1}
    return parallelize(cfg, mesh, rank, full.__getitem__, coll=SimpleNamespace(groups=groups),
                       dispatcher=dispatcher, **build).model


def _steps(model, ids, mask, fused: bool, feed=None, n: int = 4, kv: str = "float32"):
    """Prefill + n decode steps on a fresh engine with a `kv` cache: (logits [n + 1, B, V], fed tokens)."""
    from qwen3moe.generation import engine as eng_mod
    from qwen3moe.parallel.fused_step import RankFusedStepCell

    B = ids.shape[0]
    eng = eng_mod.DecodeEngine(model, B, 64, kv_cache_dtype=kv)
    assert eng.fused and isinstance(eng.cell, RankFusedStepCell)  # the rank model runs the fused step
    assert eng.cell.k_cache[0].asnumpy().dtype == CACHE_STORAGE[kv]
    if not fused:
        eng.fused, eng.cell = False, eng_mod._StepCell(model, B, 64, eng.uid)
    out, fed = [eng.prefill(ids, mask)], []
    for t in range(n):
        fed.append(out[-1].argmax(-1) if feed is None else feed[t])
        out.append(eng.decode(fed[-1]))
    return np.stack(out), fed


@pytest.mark.parametrize("layout, rank, batch", [
    pytest.param(dict(tp=2), 1, 3, marks=pytest.mark.slow),
    pytest.param(dict(dp=2, ep=2), 1, 3, marks=pytest.mark.slow),
    pytest.param(dict(tp=2, ep=2), 0, 3, marks=pytest.mark.slow), (dict(tp=2, ep=2), 1, 1),
    pytest.param(dict(dp=2, ep=2, dispatcher="alltoall"), 1, 3, marks=pytest.mark.slow)],
    ids=["tp2-r1-b3", "dp2ep2-r1-b3", "tp2ep2-r0-b3", "tp2ep2-r1-b1", "dp2ep2-alltoall-r1-b3"])  # 6-17 s each at load 10-13
def test_rank_fused_step_equals_composite_step(two_layers, layout, rank, batch, monkeypatch):
    """Prefill + 4 decode steps with left padding on one rank's model: the fused decode graph
    (partial kernels, then the plan's reduce / ep gather + reduce-scatter / tp gather, then the
    residual; head on the vocab slice, then the gather) gives the composite step's logits. Rank
    1 of ep2 holds experts 8-15 (the kernel's expert offset); tp2 x ep2 pads 3 rows to 4 before
    the ep gather; b1: rank 1's own row is the zero pad row, routed to rank 0's experts only
    (caught a division by zero in the kernel with no local assignment). Before: rank models
    always ran the composite step. alltoall: the fused step gathers the rows and combines
    through the all-to-all dispatcher's own return path."""
    layout = dict(layout)
    model = _rank_model(*two_layers, layout, rank, monkeypatch, layout.pop("dispatcher", "auto"))
    rng = np.random.default_rng(batch)
    ids = rng.integers(0, 1000, (batch, 16))
    mask = np.ones_like(ids)
    mask[-1, :5] = 0  # left padding of the last row
    want, fed = _steps(model, ids, mask, fused=False)
    got, _ = _steps(model, ids, mask, fused=True, feed=fed)
    assert np.abs(want).max() > 1.0  # logits of a working model, not all zeros
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout, rank", [(dict(tp=2), 1), pytest.param(dict(dp=2, ep=2), 0, marks=pytest.mark.slow)],
                         ids=["tp2-r1", "dp2ep2-r0"])
def test_rank_fused_step_int8_activations_equals_composite_step(layout, rank, monkeypatch):
    """--activations int8 on a rank model (tiny-fp32-gqa cut to 2 layers, int8 per channel; tp2:
    o_proj's 64 input columns a rank = one int8 chunk of the kernels, whole 16-input activation
    blocks): the fused step with the flag (fcfg[2] = 1, before: forced 0 on ranks) gives the
    composite step's logits, whose quantized cells run the forward ops' int8-activation
    arithmetic (kernels/quant.py act8): the same activation blocks, other float32 summation
    orders: 1e-4 of the largest logit (measured 4e-7 tp2, 3e-7 dp2 x ep2). The float-activation
    fused step differs by far more (the flag takes effect; measured 0.026 tp2, 0.26 dp2 x ep2)."""
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.layers.quant import QuantizationConfig
    from qwen3moe.models.config import Qwen3MoeConfig

    full = {p.name: p.asnumpy() for p in Qwen3MoeForCausalLM.from_pretrained(GQA).get_parameters()}
    cfg = Qwen3MoeConfig.from_pretrained(GQA).replace(num_hidden_layers=2)
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 1000, (3, 16))
    mask = np.ones_like(ids)
    mask[-1, :5] = 0
    logits = {}
    for act in ("int8", "float32"):
        qc = QuantizationConfig(8, -1, activations=act)
        model = _rank_model(cfg, full, dict(layout), rank, monkeypatch, quantization=qc)
        if act == "int8":
            logits["composite"], fed = _steps(model, ids, mask, fused=False)
        logits[act], _ = _steps(model, ids, mask, fused=True, feed=fed)
    mag = np.abs(logits["composite"]).max()
    assert mag > 1.0
    err = {k: np.abs(logits[k] - logits["composite"]).max() / mag for k in ("int8", "float32")}
    assert err["int8"] < 1e-4 < err["float32"] / 10, err


@pytest.mark.parametrize("kind", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
def test_rank_fused_step_16bit_kv_cache(two_layers, kind, monkeypatch):
    """tp2 rank 1 (its kv head: the one replicated over tp) with kv_cache_dtype 16-bit: the
    fused step's cache Parameters hold the rank's kv heads in 16 bits, and its logits over a
    prefill with left padding + 4 decode steps are the float32 cache's within the rounding bound
    KV_TOL but not equal to them (the cache dtype takes effect on the rank; an engine that kept
    a float32 cache fails both)."""
    model = _rank_model(*two_layers, dict(tp=2), 1, monkeypatch)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 1000, (2, 16))
    mask = np.ones_like(ids)
    mask[-1, :5] = 0
    want, fed = _steps(model, ids, mask, fused=True)
    got, _ = _steps(model, ids, mask, fused=True, feed=fed, kv=kind)
    mag, diff = np.abs(want).max(), np.abs(got - want).max()
    assert mag > 1.0
    assert 0 < diff < KV_TOL[kind] * mag, (diff, mag)


class _OneProcessLink:
    """p2p.stage_link's send / recv between two stages run one after another in this process."""

    def __init__(self) -> None:
        self.queue: list[np.ndarray] = []

    def send(self, x, dst: int) -> None:
        self.queue.append(x.asnumpy())

    def recv(self, shape: tuple, src: int) -> np.ndarray:
        msg = self.queue.pop(0)
        assert msg.shape == shape, (msg.shape, shape)
        return msg


def _stage_steps(stages, ids, mask, feed, kv: str) -> np.ndarray:
    """Prefill + decode steps fed `feed` through the StageEngines that pipeline_generate's
    factory makes for the pp2 stage models (stage 0 sends every position's hidden states to
    stage 1): the last stage's logits."""
    from qwen3moe.parallel.fused_step import RankFusedStepCell
    from qwen3moe.parallel.pipeline_generate import stage_engines

    link = _OneProcessLink()
    engines = [stage_engines(link, s, 2, 0)(m, ids.shape[0], ids.shape[1], len(feed), kv)[0]
               for s, m in enumerate(stages)]
    for e in engines:  # every stage runs the plan's fused step on a cache of the requested dtype
        assert e.fused and isinstance(e.cell, RankFusedStepCell)
        assert e.cell.k_cache[0].asnumpy().dtype == CACHE_STORAGE[kv]
    engines[0].prefill(ids, mask)
    out = [engines[1].prefill(ids, mask)]
    for tok in feed:
        engines[0].decode(tok)
        out.append(engines[1].decode(tok))
    assert not link.queue
    return np.stack(out)


@pytest.mark.parametrize("kind, act8", [("float32", False), ("bfloat16", False),
                                        pytest.param("float16", False, marks=pytest.mark.slow), ("bfloat16", True)],
                         ids=["float32", "bfloat16", "float16", "int8-act8-bfloat16"])
def test_pipeline_stages_fused_equal_one_process(kind, act8, monkeypatch):
    """tiny-fp32-gqa as pp2 stages (2 layers each) on StageEngines chained in this process:
    both stages run the fused step (before: the composite step, a 16-bit cache and int8
    activations refused) and the last stage's logits (prefill with left padding + 4 decode
    steps) are one process's fused engine's with the same cache dtype (and int8 weights per
    channel with int8 activations: each stage quantizes its whole rows as one process does):
    the same kernels on the same layers, the hidden states handed over in float32 (1e-5 of
    max|logit|: summation order only; measured 0). 16-bit: that gap is < 1/100 of what the
    16-bit cache moves one process's logits by (a stage that kept a float32 cache fails)."""
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.generation.engine import DecodeEngine
    from qwen3moe.layers.quant import QuantizationConfig
    from qwen3moe.models.config import Qwen3MoeConfig

    qc = QuantizationConfig(8, -1, activations="int8") if act8 else None
    full = {p.name: p.asnumpy() for p in Qwen3MoeForCausalLM.from_pretrained(GQA).get_parameters()}
    one = Qwen3MoeForCausalLM.from_pretrained(GQA, quantization=qc)
    cfg = Qwen3MoeConfig.from_pretrained(GQA)
    stages = [_rank_model(cfg, full, dict(pp=2, micro_batch_num=2), r, monkeypatch, quantization=qc) for r in (0, 1)]
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 1000, (2, 16))
    mask = np.ones_like(ids)
    mask[-1, :5] = 0
    ref, feed = {}, [None] * 4  # greedy on the float32 cache; the others are fed its tokens
    for kv in dict.fromkeys(("float32", kind)):
        eng = DecodeEngine(one, 2, 64, kv_cache_dtype=kv)
        ref[kv] = [eng.prefill(ids, mask)]
        for t in range(4):
            feed[t] = ref[kv][t].argmax(-1) if kv == "float32" else feed[t]
            ref[kv].append(eng.decode(feed[t]))
        ref[kv] = np.stack(ref[kv])
    got = _stage_steps(stages, ids, mask, feed, kind)
    mag, err = np.abs(ref[kind]).max(), np.abs(got - ref[kind]).max()
    assert mag > 1.0
    assert err < 1e-5 * mag, (err, mag)
    if kind != "float32":
        assert err < np.abs(ref[kind] - ref["float32"]).max() / 100


def _split_attn(w, tp):
    """Rank r's attention slices: q heads, kv heads (replicated when tp > K), o_proj columns."""
    D = w["qn"].shape[0]
    N, K = w["wq"].shape[0] // D, w["wk"].shape[0] // D
    n, k = N // tp, max(K // tp, 1)
    for r in range(tp):
        kr = (r * n) // (N // K) // k  # the kv block this rank's query heads use
        q, kv = slice(r * n * D, (r + 1) * n * D), slice(kr * k * D, (kr + 1) * k * D)
        yield r, kr, dict(w, wq=w["wq"][q], wk=w["wk"][kv], wv=w["wv"][kv], wo=np.ascontiguousarray(w["wo"][:, q])), k


@pytest.mark.parametrize("tp, K", [(2, 2), (2, 1), (4, 2)])
def test_attention_partials_sum_to_the_block(tp, K):
    """DecodeAttn with fcfg (eps, scale, 0, 1) on each rank's heads returns o_proj's partial without
    the residual; x + the sum over ranks == the NumPy block (fails if the residual is added or the
    flag ignored: x counted tp times)."""
    B, T, slot, D = 3, 10, 6, 8
    rng = np.random.default_rng(tp + K)
    w = decode_weights(rng, N=4, K=K, D=D)
    x = rng.standard_normal((B, 1, 32)).astype(np.float32)
    kc = rng.standard_normal((B, K, T, D)).astype(np.float32)
    vc = rng.standard_normal((B, K, T, D)).astype(np.float32)
    ang = rng.uniform(0, 3, (B, D // 2)).astype(np.float32)
    cos, sin = np.tile(np.cos(ang), 2)[:, None], np.tile(np.sin(ang), 2)[:, None]
    bias = np.where(rng.random((B, T)) < 0.7, 0.0, -3.0e38).astype(np.float32)
    bias[:, slot] = 0.0
    meta = np.array([slot, 2, 1, 0], np.int32)
    total = x[:, 0].copy()
    for r, kr, wr, k in _split_attn(w, tp):
        y = np.zeros_like(x)
        kcr, vcr = kc[:, kr * k:(kr + 1) * k].copy(), vc[:, kr * k:(kr + 1) * k].copy()
        assert call_aot(decode_kernel.library(), "DecodeAttn",
                        [x, wr["ln1"], wr["wq"], wr["wk"], wr["wv"], wr["qn"], wr["kn"], wr["wo"], kcr, vcr, cos, sin,
                         bias[:, None], meta, np.array([EPS, D ** -0.5, 0.0, 1.0], np.float32), y]) == 0
        total += y[:, 0]
    want, _, _ = ref_attn(w, x[:, 0], kc, vc, cos[:, 0], sin[:, 0], bias, slot)
    np.testing.assert_allclose(total, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("ep, tp, norm, B", [(2, 1, True, 5), (4, 1, False, 5), (1, 2, True, 5), (2, 1, False, 5),
                                             (4, 1, True, 1)])
def test_moe_partials_sum_to_the_block(ep, tp, norm, B):
    """DecodeMoe with fcfg (eps, scale, 0, 1, lo), the full router and a rank's experts lo .. lo + e - 1
    (ep) or every expert's ffn slice (tp): h + the sum of the ranks' partials == the NumPy block
    over all experts (fails if routing were over the local experts only, non-local assignments
    were not dropped, or h were added per rank). B 1, ep 4: 3 assignments, so some rank has none."""
    E, I, top_k = 8, 16, 3
    rng = np.random.default_rng(ep * 10 + tp + norm)
    w = decode_weights(rng, E=E, I=I)
    h = rng.standard_normal((B, 32)).astype(np.float32)
    meta = np.array([0, top_k, int(norm), 0], np.int32)
    e, i = E // ep, I // tp
    total = h.copy()
    for r in range(ep * tp):
        lo, part = (r * e, slice(None)) if ep > 1 else (0, slice(r * i, (r + 1) * i))
        gu = w["wgu"][lo:lo + e]
        gu = np.concatenate([gu[:, :I][:, part], gu[:, I:][:, part]], 1)
        dn = np.ascontiguousarray(w["wd"][lo:lo + e][:, :, part])
        y = np.zeros_like(h)
        assert call_aot(decode_kernel.library(), "DecodeMoe",
                        [h, w["ln2"], w["wr"], np.ascontiguousarray(gu), dn, meta,
                         np.array([EPS, 0.0, 0.0, 1.0, lo], np.float32), y]) == 0
        total += y
    np.testing.assert_allclose(total, ref_moe(w, h, norm, top_k), atol=2e-5, rtol=0)
