"""generate / stream_generate: HF parity (tiny-a + fixtures), KV cache == full recompute, stopping rules.

Shapes: B batch, S prompt length, N new tokens, V vocab.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import generation_dirs, reference_dir

from qwen3moe import Qwen3MoeForCausalLM
from qwen3moe.generation.generate import GenerationRun, generate, resolve_config, stream_generate
from qwen3moe.generation.engine import compile_count
from qwen3moe.io.tokenizer import Tokenizer

N_NEW = 12
PAD = 1021


@pytest.fixture(scope="module")
def tiny():
    d = reference_dir("tiny-a")
    return Qwen3MoeForCausalLM.from_pretrained(d), dict(np.load(d / "ref_outputs.npz"))


@pytest.mark.parametrize("folder", generation_dirs(), ids=lambda p: p.name)
def test_greedy_matches_hf(folder):
    ref = np.load(folder / "ref_outputs.npz")
    model = Qwen3MoeForCausalLM.from_pretrained(folder)
    n_new = ref["gen_new_ids"].shape[1]
    run = GenerationRun(model, ref["gen_input_ids"], ref["gen_attention_mask"],
                        resolve_config(model, max_new_tokens=n_new, do_sample=False, pad_token_id=PAD),
                        keep_logits=True)
    out = run.run()
    np.testing.assert_array_equal(out, ref["gen_output_ids"])
    diff = np.abs(np.stack(run.step_logits) - ref["gen_step_logits"]).max()
    assert diff < 1e-4, diff
    if folder.name != "tiny-a":  # unpadded singles: checked once (compiles cost ~2 s per shape)
        return
    for i in (0, 1):  # each prompt alone (unpadded) gives the same tokens
        single = ref[f"gen_single{i}_output_ids"]
        prompt = ref["gen_input_ids"][i][ref["gen_attention_mask"][i] > 0][None]
        np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=n_new, do_sample=False), single)


def test_cached_decode_equals_full_recompute(tiny):
    model, ref = tiny
    ids, mask = ref["gen_input_ids"], ref["gen_attention_mask"]
    run = GenerationRun(model, ids, mask, resolve_config(model, max_new_tokens=8, ignore_eos=True),
                        keep_logits=True)
    out = run.run()
    full_mask = np.concatenate([mask, np.ones((2, 8), np.int64)], 1)
    pos = np.cumsum(full_mask, 1) - 1
    pos[full_mask == 0] = 1
    logits = model(out, attention_mask=full_mask, position_ids=pos).logits.asnumpy()
    S = ids.shape[1]
    full = logits[:, S - 1:S + 7].transpose(1, 0, 2)
    assert np.abs(np.stack(run.step_logits) - full).max() < 1e-4


def test_batched_equals_per_row_and_no_recompile(tiny):
    model, _ = tiny
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 1000, 9), rng.integers(0, 1000, 5)
    ids = np.stack([a, np.concatenate([np.full(4, PAD), b])])
    mask = np.stack([np.ones(9, np.int64), np.r_[np.zeros(4, np.int64), np.ones(5, np.int64)]])
    out = generate(model, ids, mask, max_new_tokens=6, ignore_eos=True)
    before = compile_count()
    again = generate(model, ids, mask, max_new_tokens=6, ignore_eos=True)
    assert compile_count() == before  # same shapes: compiled graphs are reused
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(out[0, 9:], generate(model, a[None], max_new_tokens=6, ignore_eos=True)[0, 9:])
    np.testing.assert_array_equal(out[1, 9:], generate(model, b[None], max_new_tokens=6, ignore_eos=True)[0, 5:])


def test_seeded_sampling_reproducible(tiny):
    model, ref = tiny
    kw = dict(max_new_tokens=N_NEW, do_sample=True, temperature=1.5, top_k=0, ignore_eos=True)
    ids, mask = ref["gen_input_ids"], ref["gen_attention_mask"]
    x1 = generate(model, ids, mask, seed=7, **kw)
    x2 = generate(model, ids, mask, seed=7, **kw)
    x3 = generate(model, ids, mask, seed=8, **kw)
    np.testing.assert_array_equal(x1, x2)
    assert not np.array_equal(x1, x3)
    assert (x1[:, ids.shape[1]:] < 1024).all()


def test_eos_stops_row_and_pads(tiny):
    model, ref = tiny
    new = ref["gen_new_ids"]
    eos = int(new[0, 3])
    assert eos not in new[0, :3]
    out = generate(model, ref["gen_input_ids"], ref["gen_attention_mask"], max_new_tokens=N_NEW,
                   eos_token_id=eos, pad_token_id=PAD)
    S = ref["gen_input_ids"].shape[1]
    np.testing.assert_array_equal(out[0, S:S + 4], new[0, :4])
    assert (out[0, S + 4:] == PAD).all()
    k = next((j for j in range(N_NEW) if new[1, j] == eos), N_NEW - 1)
    np.testing.assert_array_equal(out[1, S:S + k + 1], new[1, :k + 1])
    # ignore_eos: all tokens, the same greedy continuation
    full = generate(model, ref["gen_input_ids"], ref["gen_attention_mask"], max_new_tokens=N_NEW,
                    eos_token_id=eos, ignore_eos=True)
    np.testing.assert_array_equal(full, ref["gen_output_ids"])


def test_min_new_tokens_suppresses_eos(tiny):
    model, ref = tiny
    eos = int(ref["gen_new_ids"][0, 0])
    ids, mask = ref["gen_input_ids"][:1], ref["gen_attention_mask"][:1]
    assert generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos).shape[1] == ids.shape[1] + 1
    out = generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos, min_new_tokens=4)
    assert eos not in out[0, ids.shape[1]:ids.shape[1] + 4]


def test_stop_strings_and_streaming(tiny):
    model, ref = tiny
    tok = Tokenizer.from_pretrained(reference_dir("tiny-a"))
    prompt = ref["gen_input_ids"][1][None]
    full = generate(model, prompt, max_new_tokens=N_NEW, ignore_eos=True)
    new = full[0, prompt.shape[1]:]
    pieces = list(stream_generate(model, prompt, max_new_tokens=N_NEW, ignore_eos=True, tokenizer=tok))
    assert "".join(pieces) == tok.decode(new, skip_special_tokens=True)
    text = tok.decode(new)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    out = generate(model, prompt, max_new_tokens=N_NEW, ignore_eos=True, stop_strings=[stop], tokenizer=tok)
    got = out[0, prompt.shape[1]:]
    assert stop in tok.decode(got) and stop not in tok.decode(got[:-1])
    np.testing.assert_array_equal(got, new[:len(got)])
    streamed = "".join(stream_generate(model, prompt, max_new_tokens=N_NEW, ignore_eos=True,
                                       stop_strings=[stop], tokenizer=tok, skip_special_tokens=False))
    assert streamed == text[:text.find(stop)]


def test_config_defaults_from_folder(tiny):
    model, ref = tiny
    cfg = resolve_config(model)
    assert cfg.eos_token_id == [1023, 1021] and cfg.pad_token_id == 1021 and cfg.max_new_tokens == 32
    assert resolve_config(model, max_new_tokens=5, ignore_eos=True).ignore_eos
    with pytest.raises(ValueError):
        generate(model, ref["gen_input_ids"], max_new_tokens=0)
    with pytest.raises(ValueError):
        generate(model, [[5000]], max_new_tokens=2)


def _split_batch(model):
    """The row-split tests' batch of 3 (row 1 left-padded by 4), their seeded sampling options,
    and the batch's tokens generated without EOS: (ids, mask, options, free-running tokens)."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 1000, (3, 9))
    mask = np.ones_like(ids)
    ids[1, :4], mask[1, :4] = PAD, 0
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.3, top_k=50, top_p=0.95, seed=11)
    free = GenerationRun(model, ids, mask, resolve_config(model, ignore_eos=True, **kw)).run()
    return ids, mask, kw, free


@pytest.mark.slow  # 4 engine shapes to compile: ~10 s quiet, ~60 s at load 20
def test_row_split_equals_one_batch(tiny):
    """Two data-parallel shares of a batch of 3 (RowSplit: rows 0-1 and row 2 + a padding row),
    stepped in lockstep as two processes would be, with seeded sampling and one row stopping at
    EOS early: together they give one GenerationRun's tokens on the whole batch. Catches a share
    drawing uniforms for its own rows only (rows 2+ get row 0's draws) and a share stopping
    before the other's rows are done."""
    from qwen3moe.generation.generate import RowSplit

    d = reference_dir("tiny-a")
    model = tiny[0]
    ids, mask, kw, free = _split_batch(model)
    eos = int(free[2, 9 + 2])  # row 2 stops at its third token (maybe earlier), the others go on
    cfg = resolve_config(model, eos_token_id=eos, pad_token_id=PAD, **kw)
    want = GenerationRun(model, ids, mask, cfg).run()
    assert want.shape[1] == 9 + 8 and (want[2, 9 + 3:] == PAD).all()
    runs = []
    done = lambda mine: all(r.finished.all() for r in runs)  # noqa: E731 (the all-reduce of two ranks)
    for part in (0, 1):  # a model each: engines (KV caches) are kept per model and batch shape
        m = Qwen3MoeForCausalLM.from_pretrained(d) if part else model
        runs.append(GenerationRun(m, ids, mask, cfg, split=RowSplit(2, part, done)))
    for _ in zip(*(r.steps() for r in runs)):
        pass
    assert runs[1].finished[1]  # the padding row is finished from the start
    np.testing.assert_array_equal(np.concatenate([r.output() for r in runs])[:3], want)


@pytest.mark.slow  # engine shapes to compile, as above
def test_row_split_start_done_drops_the_step_after_all_rows_stop(tiny):
    """RowSplit.start_done (the dp ranks' rows-done question sent before the next decode step,
    answered after it): every row stops at EOS before max_new_tokens, so both shares run one
    step past the last token and drop it. Together they give one GenerationRun's tokens, with
    its length (fails if the dropped step's tokens were kept or a share stopped a step apart),
    and run one engine step more than they count. The two shares are stepped as two processes
    would be: a share's answer waits for the other's question of the same step."""
    from qwen3moe.generation.generate import RowSplit

    model = tiny[0]
    ids, mask, kw, free = _split_batch(model)
    eos = sorted({int(free[b, 9 + 2]) for b in range(3)})  # every row stops by its third token
    cfg = resolve_config(model, eos_token_id=eos, pad_token_id=PAD, **kw)
    want = GenerationRun(model, ids, mask, cfg).run()
    assert want.shape[1] <= 9 + 3
    flags: dict[int, list[bool]] = {0: [], 1: []}
    gens: dict[int, object] = {}

    def start(part):
        def ask(mine):
            flags[part].append(mine)
            i, other = len(flags[part]) - 1, 1 - part

            def answer():
                while len(flags[other]) <= i:  # the other process reaches the same question
                    ended = next(gens[other], None) is None
                    assert not ended or len(flags[other]) > i, "the other share stopped a step apart"
                return all(flags[p][i] for p in (0, 1))
            return answer
        return ask

    d = reference_dir("tiny-a")
    runs = [GenerationRun(m, ids, mask, cfg, split=RowSplit(2, part, lambda mine: 1 / 0, start(part)))
            for part, m in ((0, model), (1, Qwen3MoeForCausalLM.from_pretrained(d)))]
    gens.update({p: r.steps() for p, r in enumerate(runs)})
    for p in (0, 1):
        for _ in gens[p]:
            pass
    np.testing.assert_array_equal(np.concatenate([r.output() for r in runs])[:3], want)
    steps = want.shape[1] - 9 - 1  # decode steps one process counts
    assert [r.stats.decode_steps for r in runs] == [steps, steps]
    assert [len(f) for f in flags.values()] == [steps + 1, steps + 1]  # one dropped step each
