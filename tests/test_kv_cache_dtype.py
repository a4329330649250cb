"""16-bit KV cache (GenerationConfig.kv_cache_dtype "bfloat16" / "float16", fused kernels only).

Kernels: with a 16-bit cache, DecodeAttn and AttnCoreInfer give BIT FOR BIT what the float32
kernels give on a float32 cache holding the widened values (widening is exact; the rounding of
k/v when written is the only difference), and the values written into the cache equal a NumPy
rounding of the float32 k/v (bf16 round-to-nearest-even written below; fp16: astype(np.float16)).

Generation: a 16-bit cache perturbs each cached k/v by a relative rounding error of at most 2^-9
(bf16) / 2^-12 (fp16); through the 2 tiny layers (attention scores, softmax, residuals, the
second layer's own keys) the logits moved by at most 3.3 x 2^-9 (bf16) and 2.2 x 2^-12 (fp16)
of the largest |logit| in measurement over every HF fixture x {fp32, bf16, int8 weights} x
{chunk 0, 16}, so the bound is 8 x the unit rounding times max|logit|: 2^-6 (bf16) and 2^-9
(fp16). Greedy tokens equal the float32 cache's in every measured case, and so the HF reference
tokens where the float32 cache gives them (fp32 weights): asserted exactly. Under `generate
--use_parallel` (tp2, pp2 launches, slow) the tokens are one process's with the same cache; the
ranks' / stages' cache storage and logits: tests/test_parallel_fused.py.
Shapes: B batch, N/K query/kv heads, S queries, T cache slots, D head_dim, H hidden.
"""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from helpers import HF_FIXTURES, cli_error, reference_dir
from kernel_reference import MASKED, call_aot, decode_weights

from qwen3moe import Qwen3MoeForCausalLM
from qwen3moe.generation.config import GenerationConfig
from qwen3moe.generation.engine import cache_bytes, get_engine
from qwen3moe.generation.errors import GenerationError
from qwen3moe.generation.generate import GenerationRun, generate, resolve_config
from qwen3moe.kernels import attention as ak
from qwen3moe.kernels import decode as dk

pytestmark = pytest.mark.skipif(not dk.available(), reason="decode kernels not built here")
PAD = 1021
TOL = {"bfloat16": 2.0 ** -6, "float16": 2.0 ** -9}  # x max|logit| (module docstring)


def bf16_rne(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, nearest of the two neighbouring bf16 values, ties to the even one."""
    u = np.asarray(x, np.float32).view(np.uint32)
    lo_bits = (u >> 16).astype(np.uint32)                    # truncation (toward zero)
    lo = (lo_bits << 16).view(np.float32).astype(np.float64)
    hi = ((lo_bits + 1) << 16).view(np.float32).astype(np.float64)  # next one away from zero
    d_lo, d_hi = np.abs(x - lo), np.abs(hi - x)
    up = (d_hi < d_lo) | ((d_hi == d_lo) & (lo_bits % 2 == 1))
    return np.where(up, lo_bits + 1, lo_bits).astype(np.uint16)


def narrow(x: np.ndarray, kind: str) -> np.ndarray:
    return bf16_rne(x) if kind == "bfloat16" else np.asarray(x, np.float32).astype(np.float16)


def widen(c: np.ndarray) -> np.ndarray:
    return (c.astype(np.uint32) << 16).view(np.float32) if c.dtype == np.uint16 else c.astype(np.float32)


def test_bf16_rne_reference():
    """The test's own rounding on hand-made ties and near-ties (1 + 2^-8 is a tie between 1 and 1 + 2^-7)."""
    x = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -(1 + 2 ** -8), 3.0], np.float32)
    np.testing.assert_array_equal(widen(bf16_rne(x)), [1.0, 1 + 2 ** -6, 1 + 2 ** -7, -1.0, 3.0])


# ---- kernels -------------------------------------------------------------------------------------

B, H, N, K, T = 2, 32, 4, 2, 12


def _attn_args(rng, w, D, kc, vc, slot, valid):
    """DecodeAttn's arguments for one step writing `slot`; the bias shows the earlier valid slots
    only (the step's own k/v, which the float32 kernel attends unrounded, is hidden)."""
    bias = np.where(valid, 0.0, MASKED).astype(np.float32)[:, None]
    valid[:, slot] = True
    x = rng.standard_normal((B, 1, H)).astype(np.float32)
    ang = rng.uniform(0, 3, (B, 1, D // 2)).astype(np.float32)
    cos, sin = np.tile(np.cos(ang), 2), np.tile(np.sin(ang), 2)
    meta = np.array([slot, 2, 1, 0], np.int32)
    fcfg = np.array([1e-6, D ** -0.5], np.float32)
    names = ("ln1", "wq", "wk", "wv", "qn", "kn", "wo")
    return [x, *(w[n] for n in names), kc, vc, cos, sin, bias, meta, fcfg, np.zeros((B, 1, H), np.float32)]


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
@pytest.mark.parametrize("D", [8, 32])  # 8: the scalar attention loops; 32: the AVX-512 ones
def test_decode_attn_16bit_cache_bit_exact(kind, D):
    """Two consecutive steps, each query seeing the slots before its own (a 16-bit step attends
    its own k/v rounded, the float32 one unrounded; generation tests cover that difference), so
    the second reads the first's rounded write: y equals the float32 kernel's on the widened cache
    bit for bit, and the cache equals NumPy's rounding of the float32 kernel's cache (old slots
    round-trip, the new slot is the rounded k/v)."""
    rng = np.random.default_rng(7)
    w = decode_weights(rng, H=H, N=N, K=K, D=D)
    k16, v16 = (narrow(rng.standard_normal((B, K, T, D)).astype(np.float32), kind) for _ in range(2))
    valid = np.zeros((B, T), bool)
    valid[:, 2:5] = True
    for slot in (5, 6):
        k32, v32 = widen(k16), widen(v16)
        args = _attn_args(rng, w, D, k16, v16, slot, valid)
        args32 = args[:8] + [k32, v32] + args[10:-1] + [np.zeros((B, 1, H), np.float32)]
        assert call_aot(dk.library(), "DecodeAttn", args) == 0
        assert call_aot(dk.library(), "DecodeAttn", args32) == 0
        assert np.array_equal(args[-1], args32[-1]), np.abs(args[-1] - args32[-1]).max()
        assert np.abs(k32[:, :, slot]).min() > 0  # the float32 kernel wrote the slot
        np.testing.assert_array_equal(k16, narrow(k32, kind))
        np.testing.assert_array_equal(v16, narrow(v32, kind))


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_cache_write_rounds(kind):
    rng = np.random.default_rng(1)
    S, D, slot0 = 5, 16, 3
    k, v = (rng.standard_normal((B, K, S, D)).astype(np.float32) * 3 for _ in range(2))
    kc0 = narrow(rng.standard_normal((B, K, T, D)).astype(np.float32), kind)
    kc, vc = kc0.copy(), kc0.copy()
    done = np.zeros(1, np.float32)
    assert call_aot(dk.library(), "CacheWrite", [k, v, kc, vc, np.array([slot0, 0, 0, 0], np.int32), done]) == 0
    want_k, want_v = kc0.copy(), kc0.copy()
    want_k[:, :, slot0:slot0 + S], want_v[:, :, slot0:slot0 + S] = narrow(k, kind), narrow(v, kind)
    np.testing.assert_array_equal(kc, want_k)
    np.testing.assert_array_equal(vc, want_v)


def _causal_case(seed, N_, K_, S, T_, D, pad):
    r = np.random.default_rng(seed)
    q = r.standard_normal((2, N_, S, D)).astype(np.float32)
    k, v = (r.standard_normal((2, K_, T_, D)).astype(np.float32) for _ in range(2))
    bias = np.zeros((2, 1, S, T_), np.float32)
    for s in range(S):  # the queries are the last S slots of the cache; later slots masked
        bias[:, 0, s, T_ - S + s + 1:] = MASKED
    bias[0, 0, :, :pad] = MASKED  # left padding of row 0 (pad >= T - S + 1 masks whole rows)
    return q, k, v, bias


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
@pytest.mark.parametrize("S,T_,pad", [(150, 150, 7), (70, 200, 0), (20, 64, 50), (33, 1100, 900)])
def test_attention_infer_16bit_bit_exact(kind, S, T_, pad):
    """Several 64-row query blocks with causal key cuts, GQA, left padding (fully masked rows in
    the third case), a cache tail: o equals the float32 op's on the widened k/v bit for bit."""
    q, k, v, bias = _causal_case(S + T_, 8, 2, S, T_, 16, pad)
    k16, v16 = narrow(k, kind), narrow(v, kind)
    o16 = ak.attention_infer(Tensor(q), Tensor(k16), Tensor(v16), Tensor(bias)).asnumpy()
    o32 = ak.attention_infer(Tensor(q), Tensor(widen(k16)), Tensor(widen(v16)), Tensor(bias)).asnumpy()
    assert o16.dtype == np.float32 and np.isfinite(o16).all()
    assert np.array_equal(o16, o32), np.abs(o16 - o32).max()
    assert not np.array_equal(o32, ak.attention_infer(*(Tensor(a) for a in (q, k, v, bias))).asnumpy())


# ---- generation ----------------------------------------------------------------------------------

def _greedy(model, ref, kv, chunk):
    cfg = resolve_config(model, max_new_tokens=ref["gen_new_ids"].shape[1], do_sample=False, pad_token_id=PAD,
                         prefill_chunk_size=chunk, kv_cache_dtype=kv)
    run = GenerationRun(model, ref["gen_input_ids"], ref["gen_attention_mask"], cfg, keep_logits=True)
    out = run.run()
    assert run.engine.fused and run.engine.kv_cache_dtype == kv
    return out, np.stack(run.step_logits)


def _check_against_float32(model, ref, kind, chunk, hf_tokens):
    """Batch 2 with left padding (the fixtures' prompts, row 0 padded), the 16-bit cache vs float32."""
    want_ids, want = _greedy(model, ref, "float32", chunk)
    got_ids, got = _greedy(model, ref, kind, chunk)
    np.testing.assert_array_equal(got_ids, want_ids)
    if hf_tokens:
        np.testing.assert_array_equal(got_ids, ref["gen_output_ids"])
    diff = float(np.abs(got - want).max())
    assert 0 < diff < TOL[kind] * float(np.abs(want).max()), (diff, np.abs(want).max())


@pytest.fixture(scope="module")
def tiny():
    return Qwen3MoeForCausalLM.from_pretrained(reference_dir("tiny-a"))


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
@pytest.mark.parametrize("chunk", [0, 16])
def test_generation_matches_float32_cache_and_hf(tiny, kind, chunk):
    ref = np.load(reference_dir("tiny-a") / "ref_outputs.npz")
    _check_against_float32(tiny, ref, kind, chunk, hf_tokens=True)


def test_bf16_weights_with_bf16_cache():
    folder = HF_FIXTURES / "tiny-bf16-tied-yarn"
    model = Qwen3MoeForCausalLM.from_pretrained(folder, dtype="bfloat16")
    _check_against_float32(model, np.load(folder / "ref_outputs.npz"), "bfloat16", 16, hf_tokens=True)


def test_int8_weights_with_bf16_cache():
    """int8 weights change 10% of the HF tokens here (float32 cache too): the bf16 cache must give
    the float32 cache's tokens."""
    folder = HF_FIXTURES / "tiny-fp32-gqa"
    model = Qwen3MoeForCausalLM.from_pretrained(folder, quantization="int8")
    _check_against_float32(model, np.load(folder / "ref_outputs.npz"), "bfloat16", 16, hf_tokens=False)


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_cache_bytes_halve(tiny, kind):
    sizes = {}
    for kv in ("float32", kind):
        engine, _ = get_engine(tiny, 2, 40, 30, kv)
        params = list(engine.cell.k_cache) + list(engine.cell.v_cache)
        sizes[kv] = sum(p.nbytes for p in params)
        assert sizes[kv] == cache_bytes(tiny, 2, engine.slots, kv)
    assert sizes[kind] * 2 == sizes["float32"]


@pytest.mark.parametrize("bad", ["fp16", "bf16", "float64", None, 16])
def test_bad_kv_cache_dtype_is_one_line_error(tiny, bad):
    with pytest.raises(ValueError, match=r"^kv_cache_dtype must be one of float32, bfloat16, float16") as exc:
        GenerationConfig(kv_cache_dtype=bad)
    assert "\n" not in str(exc.value)
    if bad is not None:  # None is "unset" for generate's keywords
        with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of"):
            generate(tiny, [[1, 2, 3]], max_new_tokens=1, kv_cache_dtype=bad)


def test_cli_bad_kv_cache_dtype_exit_2(tmp_path, capsys):
    argv = ["generate", "--pretrained_model_dir", str(reference_dir("tiny-a")), "--predict_data", "x",
            "--kv_cache_dtype", "half", "--output", str(tmp_path / "o.txt")]
    assert "--kv_cache_dtype must be one of float32, bfloat16, float16" in cli_error(argv, capsys)
    assert not (tmp_path / "o.txt").exists()


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_16bit_cache_on_composite_path_is_error(composite, kind):
    model = Qwen3MoeForCausalLM.from_pretrained(reference_dir("tiny-a"))
    with pytest.raises(GenerationError, match=rf"^kv_cache_dtype={kind} needs the fused decode kernels") as exc:
        generate(model, [[1, 2, 3]], max_new_tokens=2, kv_cache_dtype=kind)
    assert "\n" not in str(exc.value) and "QWEN3MOE_KERNELS=0" in str(exc.value)
    assert generate(model, [[1, 2, 3]], max_new_tokens=2, kv_cache_dtype="float32").shape == (1, 5)


def test_16bit_cache_on_composite_pipeline_stages_is_error(composite):
    """Pipeline stages run the fused step where the kernels apply (tests/test_parallel_fused.py);
    without them every stage refuses a 16-bit cache with the engine's one-line error."""
    from qwen3moe.parallel.pipeline_generate import stage_engines

    model = Qwen3MoeForCausalLM.from_pretrained(reference_dir("tiny-a"))
    for stage in (0, 1):
        with pytest.raises(GenerationError, match=r"^kv_cache_dtype=bfloat16 needs the fused decode kernels, which do "
                                                  r"not apply here \(the C\+\+ kernels are off") as exc:
            stage_engines(None, stage, 2, 0)(model, 1, 16, 4, "bfloat16")
        assert "\n" not in str(exc.value) and str(exc.value).endswith("use kv_cache_dtype=float32")


def test_cli_kv_cache_dtype_reaches_the_engine(composite, tmp_path, capsys):
    """--kv_cache_dtype bfloat16 on the composite path is refused by the engine: the flag is not dropped."""
    argv = ["generate", "--pretrained_model_dir", str(reference_dir("tiny-a")), "--predict_data", "x",
            "--max_new_tokens", "2", "--kv_cache_dtype", "bfloat16", "--output", str(tmp_path / "o.txt")]
    assert "kv_cache_dtype=bfloat16 needs the fused decode kernels" in cli_error(argv, capsys)
    assert not (tmp_path / "o.txt").exists()


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("layout, kind", [
    (["--parallel_config.model_parallel", "2"], "bfloat16"), (["--parallel_config.model_parallel", "2"], "float16"),
    (["--parallel_config.pipeline_stage", "2"], "bfloat16"), (["--parallel_config.pipeline_stage", "2"], "float16"),
    (["--parallel_config.pipeline_stage", "2", "--parallel_config.model_parallel", "2"], "bfloat16"),
    (["--parallel_config.pipeline_stage", "2", "--parallel_config.model_parallel", "2"], "float16"),
], ids=["tp2-bfloat16", "tp2-float16", "pp2-bfloat16", "pp2-float16", "pp2tp2-bfloat16", "pp2tp2-float16"])
def test_parallel_generate_16bit_cache_matches_one_process(tmp_path, layout, kind):
    """`generate --use_parallel --kv_cache_dtype bfloat16 / float16` (tp2: each rank caches its
    kv head; pp2: each stage its 2 layers, both on the fused step; pp2 x tp2 on 4 processes)
    gives the greedy completions of one process with the same cache, which are the float32
    cache's here; rank 0's summary names the cache the engines hold (a rank that dropped the
    option would report no 16-bit cache; before: pp2 refused it). 2 prompts of 78 and 153
    tokens, 8 new."""
    import json

    from helpers import launch

    from qwen3moe.cli import main

    words = "the quick brown fox jumps over the lazy dog while the cat sat on a warm mat and slept "
    (tmp_path / "p.txt").write_text(f"{words * 4}\n{words * 2}once\n")
    common = ["generate", "--pretrained_model_dir", str(HF_FIXTURES / "tiny-fp32-gqa"), "--predict_data",
              str(tmp_path / "p.txt"), "--predict_batch_size", "2", "--max_new_tokens", "8", "--do_sample", "false"]
    rc, err, _ = launch(tmp_path, *common, "--kv_cache_dtype", kind, "--use_parallel", "True", *layout,
                        "--output", str(tmp_path / "par.jsonl"), nproc=int(np.prod([int(n) for n in layout[1::2]])))
    assert rc == 0, err[-3000:]
    assert f"(fused step, {kind} KV cache)" in (tmp_path / "logs" / "worker_0.log").read_text()
    for kv in (kind, "float32"):  # one process, here
        assert main([*common, "--kv_cache_dtype", kv, "--output", str(tmp_path / f"{kv}.jsonl")]) == 0
    par, one, fp32 = ([json.loads(x) for x in (tmp_path / f"{f}.jsonl").read_text().splitlines()]
                      for f in ("par", kind, "float32"))
    assert len(par) == 2 and all(p["completion_tokens"] == 8 for p in par)
    assert [(p["completion"], p["completion_tokens"]) for p in par] == [(o["completion"], o["completion_tokens"])
                                                                       for o in one]
    assert [o["completion"] for o in one] == [f["completion"] for f in fp32]
