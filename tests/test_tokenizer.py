"""Tokenizer: bundled Qwen3 ids, HF-exact chat template rendering, tiny-a prompts, streaming decode."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen3moe.io.tokenizer import StreamDecoder, Tokenizer, TokenizerError
from helpers import reference_dir

QWEN_END_NO_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_pretrained(reference_dir("tiny-a"))


def test_bundled_encode_known_ids(tok: Tokenizer) -> None:
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    assert tok.encode_batch(["Hello world", "hi"]) == [[9707, 1879], [6023]]
    assert tok.decode([9707, 1879]) == "Hello world"


def test_bundled_special_tokens(tok: Tokenizer) -> None:
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.vocab_size == 151643 and len(tok) == 151669  # HF: vocab_size excludes added tokens
    assert tok.token_to_id("<think>") == 151667 and tok.token_to_id("</think>") == 151668
    assert tok.id_to_token(151644) == "<|im_start|>"
    assert 151645 in tok.all_special_ids
    assert tok.decode([9707, 151645], skip_special_tokens=True) == "Hello"
    assert tok.decode([9707, 151645]) == "Hello<|im_end|>"


def test_chat_no_thinking_ids(tok: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n" + QWEN_END_NO_THINK)
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, tokenize=True)
    assert ids[-7:] == [151644, 77091, 198, 151667, 271, 151668, 271]
    assert ids == tok.encode(text)
    # thinking on (the default): the prompt stops at the assistant header, the model opens <think>
    assert tok.apply_chat_template(msgs).endswith("<|im_start|>assistant\n")
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("assistant\n")


def test_multi_turn_reasoning_is_stripped_from_history(tok: Tokenizer) -> None:
    """Qwen3 drops <think> of assistant turns before the last user query, keeps it after it."""
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
            {"role": "user", "content": "times 3?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
                    "<|im_start|>user\ntimes 3?<|im_end|>\n<|im_start|>assistant\n")
    last = msgs + [{"role": "assistant", "content": "<think>\nmultiply\n</think>\n\n12"}]
    text = tok.apply_chat_template(last, add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\n<think>\nmultiply\n</think>\n\n12<|im_end|>\n")
    rc = msgs[:1] + [{"role": "assistant", "content": "12", "reasoning_content": "r"}]
    assert tok.apply_chat_template(rc, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\nr\n</think>\n\n12<|im_end|>\n")


def test_tools_section_and_tool_calls(tok: Tokenizer) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Météo <now>",
                                              "parameters": {"type": "object", "properties": {}}}}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "22C"}]
    text = tok.apply_chat_template(msgs, tools=[tool])
    # HF tojson: ensure_ascii=False and no HTML escaping ("<" stays "<", é stays é)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions")
    assert "<tools>\n" + json.dumps(tool, ensure_ascii=False) + "\n</tools>" in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            "\n</tool_call><|im_end|>\n") in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n22C\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_template_environment_matches_hf(tok: Tokenizer) -> None:
    src = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
           "|{{ eos_token }}|{{ {'a': 'é<'} | tojson(indent=1) }}|{{ strftime_now('%Y') | length }}")
    text = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
                                   chat_template=src)
    assert text == 'x|<|im_end|>|{\n "a": "é<"\n}|4'
    with pytest.raises(Exception, match="boom"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ raise_exception('boom') }}")
    batch = tok.apply_chat_template([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]])
    assert isinstance(batch, list) and len(batch) == 2


def test_tiny_a_prompts_match_reference(tiny: Tokenizer) -> None:
    ref = reference_dir("tiny-a")
    meta = json.loads((ref / "ref_meta.json").read_text())["self_consistency"]
    rows = np.load(ref / "ref_outputs.npz")["gen_input_ids"]
    pad = 1021
    assert tiny.pad_token_id == pad and tiny.eos_token_id == 1023

    def unpad(row: np.ndarray) -> list[int]:
        first = int(np.argmax(row != pad))
        return row[first:].tolist()

    assert tiny.encode(meta["gen_prompt_text"]) == unpad(rows[0])
    chat = [{"role": "user", "content": meta["gen_prompt_chat"]}]
    assert tiny.apply_chat_template(chat, add_generation_prompt=True, tokenize=True) == unpad(rows[1])


def test_hf_reference_samples() -> None:
    """Encode/decode and chat renders recorded from transformers for the shared reference tokenizer."""
    ref = reference_dir("tokenizer")
    t = Tokenizer.from_pretrained(ref)
    data = json.loads((ref / "tokenizer_ref.json").read_text())
    assert len(t) == data["vocab_size"]
    assert {k: t.token_to_id(k) for k in data["special_tokens"]} == data["special_tokens"]
    for s in data["encode_samples"]:
        assert t.encode(s["text"]) == s["ids"], s["text"]
        assert t.decode(s["ids"]) == s["decoded"]
        assert t.decode(s["ids"], skip_special_tokens=True) == s["decoded_skip_special"]
    for c in data["chat_template_samples"]:
        kw = {k: v for k, v in c.items() if k not in ("messages", "rendered", "ids")}
        assert t.apply_chat_template(c["messages"], **kw) == c["rendered"]
        assert t.apply_chat_template(c["messages"], tokenize=True, **kw) == c["ids"]


def test_unusable_folders(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="not a folder"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer.json") as err:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a usable tokenizer"):
        Tokenizer.from_pretrained(tmp_path)
    assert issubclass(TokenizerError, ValueError)


def test_eos_pad_fallback_from_generation_config(tmp_path) -> None:
    src = reference_dir("tiny-a")
    shutil.copy(src / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1023, 1021], "pad_token_id": 1021}))
    t = Tokenizer.from_pretrained(tmp_path)
    assert (t.eos_token_id, t.pad_token_id, t.eos_token) == (1023, 1021, None)
    with pytest.raises(TokenizerError, match="no chat_template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


# ------------------------------------------------------------------ streaming
MULTIBYTE = ["你好，世界！今天天气很好。", "emoji 🤖🎉👍🏽 mix", "龘靐🦜🫠ꙮ 𠀋𪚥", "Ünïcödé ĉàŝè", "日本語のテキスト", "a\n\tb  c"]


def _stream(t: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    dec = StreamDecoder(t, skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


def _check_stream(t: Tokenizer, ids: list[int], skip: bool = False) -> None:
    pieces = _stream(t, ids, skip)
    full = t.decode(ids, skip_special_tokens=skip)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("text", MULTIBYTE)
def test_stream_multibyte_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    _check_stream(tok, ids)
    assert "".join(_stream(tok, ids)) == text


def test_stream_holds_partial_characters(tok: Tokenizer) -> None:
    # rare characters need several byte-level tokens: single ids decode to U+FFFD, the stream holds them
    text = "龘靐🦜🫠"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces = _stream(tok, ids)
    assert "" in pieces[:-1] and all("\ufffd" not in p for p in pieces)
    dec = StreamDecoder(tok)
    assert dec.extend(ids[:1]) + dec.extend(ids[1:]) + dec.flush() == text
    truncated = StreamDecoder(tok)
    held = truncated.extend(ids[:1])
    assert held == "" and truncated.flush() == tok.decode(ids[:1])  # flush renders it as decode does


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(st.sampled_from(MULTIBYTE), st.text(max_size=12)), max_size=4),
       noise=st.lists(st.integers(0, 151700), max_size=6), skip=st.booleans(), data=st.data())
def test_stream_property(tok: Tokenizer, parts: list[str], noise: list[int], skip: bool, data) -> None:
    ids = tok.encode("".join(parts))
    for n in noise:  # splice random ids (byte fragments, specials, out-of-vocab) at random places
        ids.insert(data.draw(st.integers(0, len(ids))), n)
    _check_stream(tok, ids, skip)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 1023), max_size=30))
def test_stream_property_tiny(tiny: Tokenizer, ids: list[int]) -> None:
    _check_stream(tiny, ids)


# -------------------------------------------------------------- stop strings
def _stop_stream(t: Tokenizer, ids: list[int], stops: list[str]) -> tuple[str, bool]:
    from qwen3moe.generation.streaming import StopStringStream

    s = StopStringStream(t, stops)
    pieces = [s.push(i) for i in ids]
    return "".join(pieces) + s.flush(), s.stopped


def test_stop_string_split_across_tokens(tok: Tokenizer) -> None:
    from qwen3moe.generation.streaming import StopStringStream

    ids = tok.encode("The answer is 42.\nObservation: done")
    s = StopStringStream(tok, ["Observation:"])
    pieces = [s.push(i) for i in ids]
    assert "".join(pieces) == "The answer is 42.\n" and s.stopped and s.flush() == ""
    assert not any("Obs" in p for p in pieces)
    assert _stop_stream(tok, tok.encode("no stop here, Obs"), ["Observation:"]) == ("no stop here, Obs", False)
    # the stop string completed first wins: "b" ends before "abc" would
    assert _stop_stream(tok, tok.encode("xabc"), ["abc", "b"]) == ("xa", True)
    assert _stop_stream(tok, tok.encode("xabc"), ["ab", "b"]) == ("x", True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet="ab 中🦜\n", max_size=30), stops=st.lists(st.text("ab 中🦜", min_size=1, max_size=4),
                                                                       max_size=3))
def test_stop_stream_property(tok: Tokenizer, text: str, stops: list[str]) -> None:
    ids = tok.encode(text)
    full = tok.decode(ids)
    ends = [(full.find(s) + len(s), full.find(s)) for s in stops if s in full]
    want = full[:min(ends)[1]] if ends else full
    assert _stop_stream(tok, ids, stops) == (want, bool(ends))
