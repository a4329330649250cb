"""GenerationConfig: HF defaults, generation_config.json loading, round trips, one-line validation errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qwen3moe.generation.config import GenerationConfig
from qwen3moe.generation.sampling import Sampler
from helpers import reference_dir

QWEN3_CHAT = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
              "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
              "transformers_version": "4.51.0"}


def test_defaults_follow_hf() -> None:
    c = GenerationConfig()
    assert (c.do_sample, c.temperature, c.top_k, c.top_p, c.min_p, c.repetition_penalty) == (
        False, 1.0, 50, 1.0, None, 1.0)
    assert c.eos_token_id == [] and c.stop_strings == [] and c.effective_pad_token_id is None


def test_qwen3_chat_generation_config(tmp_path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(QWEN3_CHAT))
    c = GenerationConfig.from_pretrained(tmp_path)
    assert (c.do_sample, c.temperature, c.top_p, c.top_k) == (True, 0.6, 0.95, 20)
    assert c.eos_token_id == [151645, 151643] and c.pad_token_id == 151643 and c.bos_token_id == 151643
    s = Sampler.from_config(c)
    assert (s.do_sample, s.temperature, s.top_k, s.top_p, s.eos_token_id) == (True, 0.6, 20, 0.95, [151645, 151643])
    assert GenerationConfig.from_pretrained(tmp_path, do_sample=False, max_new_tokens=5).max_new_tokens == 5


def test_tiny_a_folder() -> None:
    c = GenerationConfig.from_pretrained(reference_dir("tiny-a"))
    assert (c.do_sample, c.eos_token_id, c.pad_token_id, c.bos_token_id) == (False, [1023, 1021], 1021, 1021)


def test_config_json_fallback_and_int_eos(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7, "bos_token_id": 1, "hidden_size": 8}))
    c = GenerationConfig.from_pretrained(tmp_path)
    assert c.eos_token_id == [7] and c.bos_token_id == 1 and c.pad_token_id is None
    assert c.effective_pad_token_id == 7  # HF: pad with the first eos for open-end generation


def test_round_trip(tmp_path) -> None:
    c = GenerationConfig.from_dict(QWEN3_CHAT, min_p=0.05, presence_penalty=1.5, stop_strings="END", seed=3)
    assert c.stop_strings == ["END"]
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d and GenerationConfig.from_dict(d) == c
    c.save_pretrained(tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path) == c
    assert c.replace(top_k=0).top_k == 0 and c.replace(top_k=None).top_k == 20


@pytest.mark.parametrize("kwargs, match", [
    ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
    ({"top_p": 1.5}, "top_p"),
    ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0 when do_sample=True"),
    ({"do_sample": True, "temperature": -1.0}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"min_new_tokens": -1}, "min_new_tokens"),
    ({"eos_token_id": [1, -2]}, "eos_token_id"),
    ({"pad_token_id": -1}, "pad_token_id"),
    ({"stop_strings": [""]}, "stop_strings"),
    ({"do_sample": "yes"}, "do_sample"),
])
def test_validation_errors_are_one_line(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match) as err:
        GenerationConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_greedy_ignores_temperature_zero() -> None:
    """HF accepts temperature 0 when not sampling: the warpers are off, every row takes its argmax."""
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32)
    config = GenerationConfig(do_sample=False, temperature=0.0, top_k=3, top_p=0.5, min_p=0.9)
    np.testing.assert_array_equal(Sampler.from_config(config)(logits), logits.argmax(-1))


def test_folder_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a folder"):
        GenerationConfig.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="neither generation_config.json nor config.json"):
        GenerationConfig.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0}))
    with pytest.raises(ValueError, match="generation_config.json: temperature") as err:
        GenerationConfig.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match="unknown GenerationConfig field"):
        GenerationConfig.from_dict({}, topp=0.3)
