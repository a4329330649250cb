"""Prompt caching (GenerationConfig.prompt_cache): a batch-1 prompt that starts with tokens the
model's decode cache holds from the previous call runs only from where it differs.

The kept tokens' k/v are the ones a fresh prefill computes for them (same positions, same keys
before them); the rest runs as one more chunk of a chunked prefill. So the tolerance is the
chunked prefill's (tests/test_chunked_prefill.py): CHUNK_TOL = 1e-4 on the logits (float32 GEMMs
over other row counts reassociate sums: ~1e-5 measured there), and greedy tokens are identical.
HF parity: the fixtures' prompts after a call on their first tokens give HF's tokens and logits.
Shapes: S prompt length, N new tokens, V vocab.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

from helpers import HF_FIXTURES, generation_dirs, reference_dir

from qwen3moe import Qwen3MoeForCausalLM
from qwen3moe.generation.config import GenerationConfig
from qwen3moe.generation.engine import pow2_chunks
from qwen3moe.generation.generate import GenerationRun, resolve_config

CHUNK_TOL = 1e-4
TOL_16BIT = {"bfloat16": 2.0 ** -6, "float16": 2.0 ** -9}  # x max|logit|: test_reuse_with_16bit_cache
N_NEW = 6


@pytest.fixture(scope="module")
def tiny():
    return Qwen3MoeForCausalLM.from_pretrained(reference_dir("tiny-a"))


def _run(model, ids, cache=True, n_new=N_NEW, **cfg):
    """(run, output ids [1, S + N], step logits [N, 1, V]) of a greedy call on `ids`."""
    config = resolve_config(model, max_new_tokens=n_new, do_sample=False, ignore_eos=True, prompt_cache=cache, **cfg)
    run = GenerationRun(model, np.asarray(ids)[None], None, config, keep_logits=True)
    out = run.run()
    return run, out, np.stack(run.step_logits)


def _same_as_fresh(model, ids, keep, **cfg):
    """A call on `ids` keeps `keep` cached tokens and gives a fresh prefill's tokens and logits."""
    run, out, logits = _run(model, ids, **cfg)
    assert run.keep == run.stats.cached_tokens == keep
    fresh, want, want_logits = _run(model, ids, cache=False, **cfg)
    assert fresh.keep == 0
    np.testing.assert_array_equal(out, want)
    diff = float(np.abs(logits - want_logits).max())
    tol = TOL_16BIT[cfg["kv_cache_dtype"]] * float(np.abs(want_logits).max()) if "kv_cache_dtype" in cfg else CHUNK_TOL
    assert diff < tol, (diff, tol)
    return out


def _conversation(model, **cfg):
    """First call on A; then A + its reply + more (keeps A and the reply's fed tokens), a prompt
    diverging inside A (the cache cut back), A again (all but its last token kept)."""
    model.__dict__.pop("_decode_engines", None)  # no engine of an earlier test
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    a = rng.integers(0, V, 40)
    first, out, _ = _run(model, a, **cfg)
    assert first.keep == 0
    follow = np.concatenate([out[0], rng.integers(0, V, 21)])  # the reply's last token was never fed
    _same_as_fresh(model, follow, keep=40 + N_NEW - 1, **cfg)
    _same_as_fresh(model, np.concatenate([a[:25], rng.integers(0, V, 7)]), keep=25, **cfg)
    _same_as_fresh(model, a, keep=25, **cfg)  # the previous call kept a[:25] and its own tokens
    _same_as_fresh(model, a, keep=39, **cfg)


def test_reuse_equals_fresh_prefill_fused(tiny):
    _conversation(tiny)


def test_reuse_equals_fresh_prefill_chunked(tiny):
    _conversation(tiny, prefill_chunk_size=16)


def test_reuse_equals_fresh_prefill_composite(composite):
    _conversation(Qwen3MoeForCausalLM.from_pretrained(reference_dir("tiny-a")))


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_reuse_with_16bit_cache(kind):
    """A kept token's k/v came from another GEMM than a fresh prefill's (ulps apart in float32),
    so its 16-bit rounding may land one 16-bit ulp away: the bound is the 16-bit cache's own
    (tests/test_kv_cache_dtype.py: 2^-6 / 2^-9 x max|logit|), and the tokens are identical."""
    _conversation(Qwen3MoeForCausalLM.from_pretrained(HF_FIXTURES / "tiny-fp32-gqa", quantization="int8"),
                  kv_cache_dtype=kind)


def test_growth_moves_the_cache_to_a_larger_engine(tiny):
    """A follow-up past the engine's slots: a larger engine takes over the kept slots' k/v."""
    tiny.__dict__.pop("_decode_engines", None)
    rng = np.random.default_rng(1)
    V = tiny.config.vocab_size
    a = rng.integers(0, V, 20)
    first, out, _ = _run(tiny, a)
    longer = np.concatenate([out[0], rng.integers(0, V, 200)])
    assert first.engine.slots_needed(len(longer), 20 + N_NEW - 1, N_NEW) > first.engine.slots
    run, got, logits = _run(tiny, longer)
    assert run.keep == 20 + N_NEW - 1 and run.engine is not first.engine
    assert run.engine.slots >= run.engine.slots_needed(len(longer), run.keep, N_NEW)
    assert first.engine not in tiny.__dict__["_decode_engines"].values()  # moved, not kept twice
    fresh, want, want_logits = _run(tiny, longer, cache=False)
    np.testing.assert_array_equal(got, want)
    assert float(np.abs(logits - want_logits).max()) < CHUNK_TOL


def test_no_reuse_when_off_or_nothing_matches(tiny):
    rng = np.random.default_rng(3)
    a = rng.integers(0, tiny.config.vocab_size, 30)
    _run(tiny, a)
    run, _, _ = _run(tiny, a, cache=False)
    assert run.keep == 0
    other = a.copy()
    other[0] = (a[0] + 1) % tiny.config.vocab_size
    _same_as_fresh(tiny, other, keep=0)
    assert GenerationConfig().prompt_cache is True
    with pytest.raises(ValueError, match=r"^prompt_cache must be a bool, got 1$"):
        GenerationConfig(prompt_cache=1)


def test_batch_of_two_is_not_cached(tiny):
    ids = np.random.default_rng(2).integers(0, tiny.config.vocab_size, (2, 24))
    config = resolve_config(tiny, max_new_tokens=2, do_sample=False, ignore_eos=True)
    GenerationRun(tiny, ids, None, config).run()
    assert GenerationRun(tiny, ids, None, config).keep == 0
    one = GenerationRun(tiny, ids[:1], None, config)
    assert one.keep == 0  # the batch-2 engine keeps no token record


@pytest.mark.parametrize("folder", generation_dirs(), ids=lambda p: p.name)
def test_reuse_matches_hf(folder):
    """Each fixture row alone, after a call on its first half: HF's tokens and logits."""
    ref = np.load(folder / "ref_outputs.npz")
    model = Qwen3MoeForCausalLM.from_pretrained(folder)
    n_new = ref["gen_new_ids"].shape[1]
    for row in range(ref["gen_input_ids"].shape[0]):
        real = ref["gen_input_ids"][row][ref["gen_attention_mask"][row] > 0]
        _, first, _ = _run(model, real[:len(real) // 2], n_new=n_new, cache=False)
        fed = first[0, :-1]  # the cache holds the first call's prompt and every new token but the last
        same = fed[:len(real) - 1] == real[:len(fed)][:len(real) - 1]
        run, out, logits = _run(model, real, n_new=n_new)
        assert run.keep == (len(same) if same.all() else int(np.argmin(same))) >= len(real) // 2
        np.testing.assert_array_equal(out[0, len(real):], ref["gen_new_ids"][row])
        diff = float(np.abs(logits[:, 0] - ref["gen_step_logits"][:, row]).max())
        assert diff < CHUNK_TOL, diff  # test_generation.test_greedy_matches_hf's bound


@given(n16=st.integers(1, 300), chunk16=st.sampled_from([0, 1, 2, 3, 5, 8, 64]))
def test_pow2_chunks(n16, chunk16):
    """Steps of 16 x 2^k tokens, at most the chunk size, largest first, summing to n; the fewest
    such steps (the binary digits of n / 16, any power above the bound repeated)."""
    n, chunk = 16 * n16, 16 * chunk16
    steps = pow2_chunks(n, chunk)
    assert sum(steps) == n and steps == sorted(steps, reverse=True)
    assert all(s % 16 == 0 and (s // 16) & (s // 16 - 1) == 0 and (not chunk or s <= chunk) for s in steps)
    top = max(s for s in (16 * 2 ** k for k in range(12)) if not chunk or s <= chunk)
    assert len(steps) == n // top + bin((n % top) // 16).count("1")


@pytest.mark.parametrize("flag", [[], ["--prompt_cache", "false"]])
def test_cli_prompts_sharing_a_prefix(flag, tmp_path, capsys):
    """`generate` with a .txt of prompts at batch 1: the second prompt (the first one's text and
    more) runs from the cache unless --prompt_cache false; the completions are the same."""
    from qwen3moe.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("the same long opening line of words, then one\nthe same long opening line of words, then two\n")
    out = tmp_path / "o.txt"
    argv = ["generate", "--pretrained_model_dir", str(reference_dir("tiny-a")), "--predict_data", str(prompts),
            "--max_new_tokens", "3", "--ignore_eos", "--output", str(out)]
    assert main(argv + flag) == 0
    err = capsys.readouterr().err
    assert ("prompt tokens from the prompt cache" in err) == (not flag), err
    completions = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    assert main(argv + ["--prompt_cache", "false"]) == 0
    assert [json.loads(line)["completion"] for line in out.read_text().splitlines()] == completions


def test_chat_session_turns_reuse_the_cache():
    """ChatSession: each turn re-renders the conversation; turn 2 keeps turn 1's prompt up to the
    assistant's reply (the template renders earlier replies without the think block) and its
    reply equals a fresh generate of the same rendered prompt."""
    from qwen3moe import ChatSession, Tokenizer
    from qwen3moe.generation.generate import generate

    folder = HF_FIXTURES / "tiny-fp32-gqa"
    model, tok = Qwen3MoeForCausalLM.from_pretrained(folder), Tokenizer.from_pretrained(folder)
    model.__dict__.pop("_decode_engines", None)
    options = {"max_new_tokens": 6, "do_sample": False, "ignore_eos": True}
    chat = ChatSession(model, tok, enable_thinking=False, options=options)
    first = "".join(chat.send("Hello there, how are you?"))
    assert chat.stats.cached_tokens == 0
    prompt1 = tok.encode(tok.apply_chat_template(chat.history[:1], add_generation_prompt=True, enable_thinking=False))
    second = "".join(chat.send("And again?"))
    prompt2 = tok.encode(tok.apply_chat_template(chat.history[:3], add_generation_prompt=True, enable_thinking=False))
    same = np.asarray(prompt1[:len(prompt2)]) == np.asarray(prompt2[:len(prompt1)])
    assert chat.stats.cached_tokens == int(np.argmin(same)) > 0
    assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in chat.history[1::2]] == [first, second]
    want = generate(model, [prompt2], prompt_cache=False, **options)[0, len(prompt2):]
    assert second == tok.decode(want.tolist(), skip_special_tokens=True)
