"""Issue 15 part B, generation: non-finite logits stop generation with a one-line
GenerationError (exit 2 from the CLI); a prompt longer than max_position_embeddings, a
max_new_tokens whose KV cache cannot fit in memory, and ragged rows are one-line errors
raised before any graph runs or cache is allocated."""
from __future__ import annotations

import numpy as np
import pytest

from qwen3moe.generation.errors import GenerationError


@pytest.fixture(scope="module")
def model():
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed

    set_init_seed(3)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=1, max_position_embeddings=64,
                                                          eos_token_id=None))


def _poison(model, name: str, value: float):
    """Set one weight to `value` (in place); returns a restore function."""
    from mindspore import Tensor

    p = {q.name: q for q in model.get_parameters()}[name]
    saved = p.asnumpy().copy()
    bad = saved.copy()
    bad.flat[0] = value
    p.set_data(Tensor(bad))
    return lambda: p.set_data(Tensor(saved))


@pytest.mark.parametrize("name, value, do_sample", [
    ("model.norm.weight", float("nan"), False),  # every logit of every row
    ("model.norm.weight", float("inf"), False),
    ("lm_head.weight", float("nan"), True),      # one logit per row (token 0): sampling would raise inside numpy
])
def test_non_finite_logits_stop_generation(model, name, value, do_sample):
    from qwen3moe.generation.generate import generate

    restore = _poison(model, name, value)
    try:
        with pytest.raises(GenerationError) as exc:
            generate(model, np.array([[5, 6, 7], [8, 9, 10]]), max_new_tokens=3, do_sample=do_sample, seed=0)
    finally:
        restore()
    msg = str(exc.value)
    assert "non-finite logits" in msg and "row 0" in msg and "\n" not in msg, msg
    out = generate(model, np.array([[5, 6, 7]]), max_new_tokens=3, do_sample=False)  # restored: runs
    assert out.shape == (1, 6)


def test_generation_error_is_a_cli_user_error():
    from qwen3moe.errors import Qwen3MoeError

    assert isinstance(GenerationError("x"), Qwen3MoeError)  # cli.py: one line, exit 2


def test_prompt_longer_than_max_position_embeddings_is_refused(model):
    from qwen3moe.generation.generate import generate

    with pytest.raises(GenerationError, match="65 tokens.*max_position_embeddings=64"):
        generate(model, np.ones((1, 65), np.int64), max_new_tokens=1)


def test_huge_max_new_tokens_is_refused_before_allocating(model):
    from qwen3moe.generation.generate import generate

    with pytest.raises(GenerationError, match=r"max_new_tokens=10000000000: .*KV cache.*GiB"):
        generate(model, np.array([[5, 6, 7]]), max_new_tokens=10_000_000_000)


def test_ragged_rows_ask_for_padding_and_attention_mask(model):
    from qwen3moe.generation.generate import generate

    with pytest.raises(GenerationError, match="pad.*attention_mask") as exc:
        generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=1)
    assert "lengths 3 and 2" in str(exc.value)


def test_cli_reports_a_generation_error_in_one_line(tmp_path, capsys):
    from helpers import HF_FIXTURES
    from qwen3moe.cli import main

    rc = main(["generate", "--pretrained_model_dir", str(HF_FIXTURES / "tiny-fp32-gqa"), "--predict_data", "Hi",
               "--max_new_tokens", "10000000000", "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("qwen3moe generate: error: max_new_tokens=10000000000: the float32 KV cache"), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out.jsonl").exists()
