"""Chunked prefill (engine.prefill with prefill_chunk_size): the same logits and tokens as one
prefill step, on the fused and the composite graph, for fp32 / bf16 / int8 weights, and HF parity.

Tolerance: a chunked prefill computes every query over the same keys as one step, but the
fused graph's GEMMs run over other row counts (the chunk's tokens per expert; the attention
kernel's 64-row blocks cut at other key counts), so float32 sums are reassociated: a few ulps
per element that reach ~1e-5 of logits of magnitude ~10 after the 2 tiny layers (a few ulps of
8-16). The composite graph gives identical logits here. CHUNK_TOL = 1e-4 keeps 10x above that
reassociation and 290x under the smallest top-1 margin of the HF references (0.029, tiny-a),
and the greedy tokens must be identical.
Shapes: B batch, S prompt length, P bucketed prompt length, N new tokens, V vocab.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import HF_FIXTURES, cli_error, generation_dirs, reference_dir

from qwen3moe import Qwen3MoeForCausalLM
from qwen3moe.generation.config import GenerationConfig
from qwen3moe.generation.engine import get_engine
from qwen3moe.generation.generate import GenerationRun, generate, resolve_config

CHUNK_TOL = 1e-4
N_NEW = 6
PAD = 1021


def _batch(vocab: int, S: int, short: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Batch 2, left padded: row 0 all S tokens, row 1 its last `short` only."""
    ids = np.random.default_rng(seed).integers(0, vocab, (2, S))
    mask = np.ones((2, S), np.int64)
    mask[1, :S - short] = 0
    ids[1, :S - short] = PAD
    return ids, mask


def _run(model, ids, mask, chunk):
    """Greedy tokens [B, S + N] and every step's logits [N, B, V] with prefill_chunk_size=chunk."""
    cfg = resolve_config(model, max_new_tokens=N_NEW, do_sample=False, ignore_eos=True, pad_token_id=PAD)
    run = GenerationRun(model, ids, mask, cfg.replace(prefill_chunk_size=chunk), keep_logits=True)
    out = run.run()
    return out, np.stack(run.step_logits)


def _check_chunked(model, S: int, short: int, chunks=(16, 32)) -> None:
    ids, mask = _batch(model.config.vocab_size, S, short)
    want_ids, want = _run(model, ids, mask, 0)
    for chunk in chunks:
        got_ids, got = _run(model, ids, mask, chunk)
        np.testing.assert_array_equal(got_ids, want_ids, err_msg=f"chunk {chunk}")
        diff = float(np.abs(got - want).max())
        assert diff < CHUNK_TOL, (chunk, diff)


# S=64: P=64, a multiple of both chunks; S=70: P=80, 16 | 80 but chunks of 32 end with 16 tokens.
# Row 1 (30 real tokens) leaves its first 34 / 50 slots as padding: whole chunks of it are empty.
@pytest.mark.parametrize("S", [64, 70])
def test_chunked_equals_one_step_fused(S, tiny):
    model = tiny
    engine, _ = get_engine(model, 2, S, N_NEW)
    assert engine.fused
    _check_chunked(model, S, short=30)


@pytest.mark.parametrize("S", [64, 70])
def test_chunked_equals_one_step_composite(S, composite):
    model = Qwen3MoeForCausalLM.from_pretrained(reference_dir("tiny-a"))
    engine, _ = get_engine(model, 2, S, N_NEW)
    assert not engine.fused
    _check_chunked(model, S, short=30)


def test_chunked_bf16_and_int8_fused():
    for model in (Qwen3MoeForCausalLM.from_pretrained(HF_FIXTURES / "tiny-bf16-tied-yarn", dtype="bfloat16"),
                  Qwen3MoeForCausalLM.from_pretrained(HF_FIXTURES / "tiny-fp32-gqa", quantization="int8")):
        assert get_engine(model, 2, 70, N_NEW)[0].fused
        _check_chunked(model, 70, short=30, chunks=(16,))


def test_chunk_state_matches_one_step(tiny):
    """cursor, valid slots and next positions end as after one step (decode continues from them)."""
    model = tiny
    ids, mask = _batch(model.config.vocab_size, 80, 30)
    engine, P = get_engine(model, 2, 80, N_NEW)
    states = []
    for chunk in (0, 32):
        engine.prefill(ids, mask, chunk)
        states.append((engine.cursor, engine.valid_BT.copy(), engine.next_pos_B.copy()))
    assert states[0][0] == states[1][0] == P
    np.testing.assert_array_equal(states[0][1], states[1][1])
    np.testing.assert_array_equal(states[0][2], states[1][2])


@pytest.fixture(scope="module")
def tiny():
    return Qwen3MoeForCausalLM.from_pretrained(reference_dir("tiny-a"))


@pytest.mark.parametrize("folder", generation_dirs(), ids=lambda p: p.name)
def test_chunked_generation_matches_hf(folder):
    """The fixtures' 31-token prompts (P=32) in two chunks of 16; row 0's first chunk is mostly padding."""
    ref = np.load(folder / "ref_outputs.npz")
    model = Qwen3MoeForCausalLM.from_pretrained(folder)
    n_new = ref["gen_new_ids"].shape[1]
    cfg = resolve_config(model, max_new_tokens=n_new, do_sample=False, pad_token_id=PAD, prefill_chunk_size=16)
    run = GenerationRun(model, ref["gen_input_ids"], ref["gen_attention_mask"], cfg, keep_logits=True)
    np.testing.assert_array_equal(run.run(), ref["gen_output_ids"])
    diff = np.abs(np.stack(run.step_logits) - ref["gen_step_logits"]).max()
    assert diff < 1e-4, diff  # test_generation.test_greedy_matches_hf's bound for the unchunked run


@pytest.mark.parametrize("bad", [8, 24, -16, 1.5, True, "16"])
def test_bad_chunk_size_is_one_line_error(bad, tiny):
    with pytest.raises(ValueError, match=r"^prefill_chunk_size must be a positive multiple of 16") as exc:
        GenerationConfig(prefill_chunk_size=bad)
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match=r"prefill_chunk_size must be"):
        generate(tiny, [[1, 2, 3]], max_new_tokens=1, prefill_chunk_size=bad)


@pytest.mark.parametrize("value", [0, None, 16, 2048])
def test_good_chunk_sizes(value):
    assert GenerationConfig(prefill_chunk_size=value).prefill_chunk_size == value


def test_cli_bad_chunk_size_exit_2(tmp_path, capsys):
    argv = ["generate", "--pretrained_model_dir", str(reference_dir("tiny-a")), "--predict_data", "x",
            "--prefill_chunk_size", "100", "--output", str(tmp_path / "o.txt")]
    assert "--prefill_chunk_size must be a positive multiple of 16" in cli_error(argv, capsys)
    assert not (tmp_path / "o.txt").exists()


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("layout", [["--parallel_config.pipeline_stage", "2"],
                                    ["--parallel_config.model_parallel", "2"]], ids=["pp2", "tp2"])
def test_chunked_parallel_generate_matches_one_unchunked_process(tmp_path, layout):
    """`generate --use_parallel` with --prefill_chunk_size 16 on 2 processes (pp2: each stage runs
    the prompt's chunks in order, sending each chunk's hidden states on; tp2: the rank's fused
    step) gives the completions of one process prefilling each prompt in one step."""
    import json
    import os
    import subprocess
    import sys

    from helpers import REPO, launch

    words = "the quick brown fox jumps over the lazy dog while the cat sat on a warm mat and slept "
    (tmp_path / "p.txt").write_text(f"{words * 4}\n{words * 2}once\n")
    common = ["generate", "--pretrained_model_dir", str(HF_FIXTURES / "tiny-fp32-gqa"), "--predict_data",
              str(tmp_path / "p.txt"), "--predict_batch_size", "2", "--max_new_tokens", "6", "--do_sample", "false"]
    rc, err, _ = launch(tmp_path, *common, "--prefill_chunk_size", "16", "--use_parallel", "True", *layout,
                        "--output", str(tmp_path / "par.jsonl"))
    assert rc == 0, err[-3000:]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    one = subprocess.run([sys.executable, "-m", "qwen3moe.cli", *common, "--prefill_chunk_size", "0",
                          "--output", str(tmp_path / "one.jsonl")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-2000:]
    par, ref = ([json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("par.jsonl", "one.jsonl"))
    assert min(r["prompt_tokens"] for r in ref) > 32  # three chunks of 16 or more for each prompt
    assert [(p["completion"], p["completion_tokens"]) for p in par] == [(r["completion"], r["completion_tokens"])
                                                                       for r in ref]
