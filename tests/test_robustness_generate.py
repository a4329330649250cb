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
    from helpers import HF_FIXTURES, cli_error

    err = cli_error(["generate", "--pretrained_model_dir", str(HF_FIXTURES / "tiny-fp32-gqa"), "--predict_data", "Hi",
                     "--max_new_tokens", "10000000000", "--output", str(tmp_path / "out.jsonl")], capsys)
    assert err.startswith("qwen3moe generate: error: max_new_tokens=10000000000: the float32 KV cache"), err
    assert not (tmp_path / "out.jsonl").exists()


# ---- every decoding option is checked before the model loads (GenerateRequest.check) ------------
def _config_only(tmp_path, generation_config: dict | None = None):
    """A model folder with a valid config.json but no tokenizer and no weights: any load fails,
    with an error of its own (no tokenizer.json)."""
    import json
    import shutil

    from helpers import HF_FIXTURES

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(HF_FIXTURES / "tiny-fp32-gqa" / "config.json", folder)
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


@pytest.fixture
def no_load(monkeypatch):
    """Loading a tokenizer or a model fails the test (the checks must come first)."""
    from qwen3moe.io.tokenizer import Tokenizer
    from qwen3moe.models.qwen3_moe import Qwen3MoeForCausalLM

    def fail(*args, **kwargs):
        raise AssertionError("the model folder was loaded before the options were checked")

    monkeypatch.setattr(Tokenizer, "from_pretrained", fail)
    monkeypatch.setattr(Qwen3MoeForCausalLM, "from_pretrained", fail)


BAD_OPTIONS = [
    (["--top_p", "2"], "--top_p must be in (0, 1], got 2.0"),
    (["--do_sample", "--temperature", "-1"], "--temperature must be > 0 when do_sample=True, got -1.0"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be an int > 0, got 0"),
    (["--min_new_tokens", "-1"], "--min_new_tokens must be an int >= 0, got -1"),
    (["--top_k", "-1"], "--top_k must be an int >= 0"),
    (["--min_p", "1.5"], "--min_p must be in [0, 1] or None, got 1.5"),
    (["--repetition_penalty", "0"], "--repetition_penalty must be > 0"),
    (["--presence_penalty", "3"], "--presence_penalty must be in [-2, 2]"),
    (["--seed", "-1"], "--seed must be a non-negative int or None, got -1"),
    (["--stop_strings", ""], "--stop_strings must be non-empty strings, got ['']"),
    (["--kv_cache_dtype", "int8"], "--kv_cache_dtype must be one of float32, bfloat16, float16, got 'int8'"),
    (["--prefill_chunk_size", "17"], "--prefill_chunk_size must be a positive multiple of 16"),
]


@pytest.mark.parametrize("flags, message", BAD_OPTIONS, ids=[f[0][-2].lstrip("-") for f in BAD_OPTIONS])
def test_bad_option_is_refused_before_the_model_loads(tmp_path, capsys, no_load, flags, message):
    """Was: every option but prefill_chunk_size / kv_cache_dtype was checked by resolve_config
    after the tokenizer and the weights were loaded (minutes for the 48-layer model)."""
    from helpers import cli_error

    argv = ["generate", "--pretrained_model_dir", str(_config_only(tmp_path)), "--predict_data", "hi",
            "--output", str(tmp_path / "o.txt"), *flags]
    assert cli_error(argv, capsys).startswith(f"qwen3moe generate: error: {message}")
    assert not (tmp_path / "o.txt").exists()


def test_run_predict_and_parallel_generate_check_the_options_too(tmp_path, capsys, no_load):
    """`qwen3moe run --run_mode predict` delegates to generate; the parallel path's check_request
    (and `qwen3moe launch`'s preflight) starts with GenerateRequest.check()."""
    from helpers import REPO, cli_error
    from qwen3moe.generation.batch import GenerateRequest
    from qwen3moe.parallel.generate import check_request
    from qwen3moe.parallel.mesh import Mesh

    folder = _config_only(tmp_path)
    err = cli_error(["run", "--config", str(REPO / "examples" / "configs" / "predict_qwen3_moe.yaml"), "--run_mode",
                     "predict", "--pretrained_model_dir", str(folder), "--predict_data", "hi", "--max_new_tokens", "0",
                     "--output_dir", str(tmp_path / "pred")], capsys)
    assert err == "qwen3moe run: error: --max_new_tokens must be an int > 0, got 0", err
    for mesh in (Mesh(), Mesh(tp=2)):
        with pytest.raises(GenerationError, match=r"^--top_p must be in \(0, 1\], got 2.0$"):
            check_request(GenerateRequest(str(folder), "hi", options={"top_p": 2.0}), mesh, world_size=mesh.world_size)
    with pytest.raises(GenerationError, match="^unknown generate option"):
        GenerateRequest(str(folder), "hi", options={"topp": 0.5}).check()


@pytest.mark.parametrize("folder_config, options, message", [
    # the folder samples: --temperature 0 cannot (on the defaults alone, do_sample False, it would pass)
    ({"do_sample": True, "temperature": 0.6}, {"temperature": 0.0}, "--temperature must be > 0 when do_sample=True"),
    # the folder's greedy temperature 0 with --do_sample: the file's value, named with the flag
    ({"do_sample": False, "temperature": 0.0}, {"do_sample": True},
     "generation_config.json: temperature must be > 0 when do_sample=True, got 0.0; use do_sample=False for greedy "
     "decoding (with --do_sample)"),
    ({"top_p": 7}, {}, "generation_config.json: top_p must be in (0, 1], got 7"),  # a bad file, before the weights
])
def test_options_are_checked_merged_over_the_folders_generation_config(tmp_path, no_load, folder_config, options,
                                                                      message):
    from qwen3moe.generation.batch import GenerateRequest, load

    req = GenerateRequest(str(_config_only(tmp_path, folder_config)), "hi", options=options)
    with pytest.raises(GenerationError) as exc:
        load(req)
    assert message in str(exc.value) and "\n" not in str(exc.value), exc.value


@pytest.mark.parametrize("folder_config, options, ignore_eos", [
    ({"do_sample": True, "temperature": 0.6, "top_k": 20}, {"temperature": 0.0, "do_sample": False}, False),
    ({"temperature": 0.0}, {"max_new_tokens": 3, "stop_strings": ["x"]}, True),
    (None, {"top_p": 0.5, "kv_cache_dtype": "bfloat16", "prefill_chunk_size": 0}, False),
])
def test_request_config_is_resolve_config_of_the_loaded_folder(tmp_path, folder_config, options, ignore_eos):
    """load() takes the checked config: the one resolve_config gives a model loaded from the folder."""
    from types import SimpleNamespace

    from qwen3moe.generation.batch import OPTION_KEYS, GenerateRequest
    from qwen3moe.generation.generate import resolve_config

    folder = _config_only(tmp_path, folder_config)
    req = GenerateRequest(str(folder), "hi", ignore_eos=ignore_eos, options={k: options.get(k) for k in OPTION_KEYS})
    req.check()
    loaded = SimpleNamespace(source_dir=str(folder))  # what from_pretrained and the parallel builds set
    assert req.generation_config() == resolve_config(loaded, None, ignore_eos, **options)
