"""bf16 weights end to end: held as bf16 (bits), computed in fp32, identical to the fp32 load.

bf16 -> fp32 is exact, so on the same compute path (the composite one: the fused kernels take
fp32 weights only) a bf16 load of a bf16 folder must give bit-identical logits and tokens to the
fp32 load of the same folder. Fixtures: roundtrip-bf16 (13 shards, per-expert, untied) and
tiny-bf16-tied-yarn (tied embeddings: the lm_head reads the bf16-bits embedding).
Shapes: B batch, S prompt length, V vocab.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import HF_FIXTURES

from qwen3moe import Qwen3MoeForCausalLM
from qwen3moe.generation.generate import GenerationRun, resolve_config

BF16_DIRS = [HF_FIXTURES / "roundtrip-bf16", HF_FIXTURES / "tiny-bf16-tied-yarn"]


def _ids(model, B=2, S=9, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.vocab_size, (B, S))
    mask = np.ones((B, S), np.int64)
    mask[1, :3] = 0  # left padding in row 1
    return ids, mask


def _storage(model) -> dict[str, str]:
    return {p.name: str(p.dtype) for p in model.get_parameters()}


@pytest.mark.parametrize("folder", [BF16_DIRS[0], pytest.param(BF16_DIRS[1], marks=pytest.mark.slow)],
                         ids=lambda p: p.name)
def test_bf16_load_identical_to_fp32_load(folder, composite):
    m32 = Qwen3MoeForCausalLM.from_pretrained(folder, dtype="float32")
    m16 = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=None)  # the folder's dtype: bfloat16
    kinds = _storage(m16)
    assert kinds["model.embed_tokens.weight"] == "UInt16"  # gathered: bf16 bits
    assert kinds["model.layers.0.mlp.experts.gate_up_proj"] == "UInt16"
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "BFloat16"
    assert all(k in ("UInt16", "BFloat16") for k in kinds.values()), kinds
    ids, mask = _ids(m32)
    a = m32(ids, attention_mask=mask).logits.asnumpy()
    b = m16(ids, attention_mask=mask).logits.asnumpy()
    np.testing.assert_array_equal(a, b)
    # generate: prefill + decode, batch 2, greedy with step logits, then sampling
    outs = []
    for m in (m32, m16):
        run = GenerationRun(m, ids, mask, resolve_config(m, max_new_tokens=6, do_sample=False,
                                                         ignore_eos=True), keep_logits=True)
        greedy = run.run()
        sampled = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20,
                             temperature=1.5, seed=3, ignore_eos=True)
        outs.append((greedy, np.stack(run.step_logits), np.asarray(sampled)))
    for x, y in zip(*outs):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_bf16_with_kernels_built_matches_the_fp32_load():
    """With kernels available (the default), the bf16 model's experts run the forward-only bf16
    kernel (kernels/quant.py, never the fp32 MoE kernel), decode reads bf16 in the decode kernels,
    and it agrees with the fp32 (kernel) load to fp32 rounding."""
    folder = BF16_DIRS[0]
    m32 = Qwen3MoeForCausalLM.from_pretrained(folder, dtype="float32")
    m16 = Qwen3MoeForCausalLM.from_pretrained(folder, dtype="bfloat16")
    assert all(layer.mlp.use_kernel for layer in m16.model.layers if layer.is_sparse)
    ids, mask = _ids(m32, seed=1)
    a = m32(ids, attention_mask=mask).logits.asnumpy()
    b = m16(ids, attention_mask=mask).logits.asnumpy()
    # same weights, different summation orders (oneDNN vs MindSpore GEMMs): fp32 rounding only
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(a).max())
    g32 = m32.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, ignore_eos=True)
    g16 = m16.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, ignore_eos=True)
    np.testing.assert_array_equal(np.asarray(g32), np.asarray(g16))


def test_bf16_save_round_trip_is_bit_exact(tmp_path):
    """A bf16-bits model saves its exact values (the save path widens the bits, not casts them)."""
    folder = BF16_DIRS[1]
    m16 = Qwen3MoeForCausalLM.from_pretrained(folder, dtype="bfloat16")
    m16.save_pretrained(tmp_path / "out", dtype="bfloat16")
    from qwen3moe.io.hf_checkpoint import CheckpointSource

    a, b = CheckpointSource(str(folder)), CheckpointSource(str(tmp_path / "out"))
    for name in a.where:
        np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)


def test_bf16_load_takes_the_stored_bits(monkeypatch):
    """A bf16 load of a BF16 folder copies the stored bits into every Parameter: no Parameter is
    widened to fp32 and rounded back (that cost the fp32 expert stack plus numpy's rounding
    temporaries: the load peak of a 1-layer 30B-A3B folder was 5.7 GB for 2.5 GB of weights)."""
    from qwen3moe.io import hf_checkpoint

    rounded: list[str] = []
    store = hf_checkpoint.store_param
    monkeypatch.setattr(hf_checkpoint, "store_param", lambda p, arr: (rounded.append(p.name), store(p, arr)))
    m16 = Qwen3MoeForCausalLM.from_pretrained(BF16_DIRS[0], dtype="bfloat16")
    assert rounded == []
    assert {str(p.dtype) for p in m16.get_parameters()} == {"UInt16", "BFloat16"}


def test_bf16_forward_widens_no_weight_matrix(monkeypatch):
    """With kernels built, the bf16 forward streams every weight matrix through the kernels:
    no 2-D/3-D Parameter reaches `widen` (a widened 151936 x 2048 lm_head is 1.2 GB per call,
    a widened [128, 1536, 2048] expert stack 1.6 GB). PyNative, so the Python-level spies run."""
    from mindspore import Parameter

    from qwen3moe.kernels import quant as quant_kernel
    from qwen3moe.layers import dtypes, experts, linear

    if not quant_kernel.available():
        pytest.skip("kernels/quant.py op not built here (the composite path widens by design)")
    monkeypatch.setenv("QWEN3MOE_PYNATIVE", "1")
    widened: list[tuple] = []

    def spy(w, dtype=dtypes.ms.float32):
        if isinstance(w, Parameter) and len(w.shape) >= 2:
            widened.append((w.name, tuple(w.shape)))
        return dtypes.widen(w, dtype)

    monkeypatch.setattr(linear, "widen", spy)
    monkeypatch.setattr(experts, "widen", spy)
    m16 = Qwen3MoeForCausalLM.from_pretrained(BF16_DIRS[0], dtype="bfloat16")
    m32 = Qwen3MoeForCausalLM.from_pretrained(BF16_DIRS[0], dtype="float32")
    ids, mask = _ids(m16, seed=2)
    b = m16(ids, attention_mask=mask).logits.asnumpy()
    assert widened == []
    a = m32(ids, attention_mask=mask).logits.asnumpy()
    # same weights, the kernels' summation order: fp32 rounding only (as the test above)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(a).max())
