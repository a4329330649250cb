"""Megatron .bin/.idx: byte-identical with megatron-core 0.16.1 (shared/reference/megatron),
reader semantics, round trips and one-line errors; preprocess CLI and the WikiText converter."""
from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import FIXTURES, cli_error, reference_dir
from qwen3moe.cli import main as cli
from qwen3moe.io.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError

MEG = reference_dir("megatron")
TOK = str(reference_dir("tokenizer"))
CASES = {"ref_uint16_eodtok": ["--eod-token", "<|im_end|>", "--dtype", "uint16"],
         "ref_int32_endoftext": ["--dtype", "int32"]}


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_is_byte_identical_to_megatron(tmp_path, name, workers):
    prefix = str(tmp_path / name)
    assert cli(["preprocess", "--input", str(MEG / "sample.jsonl"), "--output-prefix", prefix,
                "--tokenizer-dir", TOK, "--append-eod", "--workers", str(workers), *CASES[name]]) == 0
    for ext in (".bin", ".idx"):
        assert sha(f"{prefix}_text_document{ext}") == sha(MEG / f"{name}_text_document{ext}"), ext
    assert sorted(os.listdir(tmp_path)) == sorted(f"{name}_text_document{e}" for e in (".bin", ".idx"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_reader_matches_megatron_reader(name):
    want = json.loads((MEG / "reference_read.json").read_text())["references"][name]["read"]
    ds = IndexedDataset(str(MEG / f"{name}_text_document"))
    assert ds.dtype == np.dtype(want["dtype"]) and len(ds) == want["num_sequences"]
    assert len(ds.document_indices) - 1 == want["num_documents"] and ds.num_tokens == want["num_tokens"]
    assert ds.sequence_lengths[:9].tolist() == want["sequence_lengths_head"]
    assert ds.document_indices[:9].tolist() == want["document_indices_head"]
    for i, seq in enumerate(want["first_sequences"]):
        assert ds[i].tolist() == seq
    d = ds.document_indices
    for j, doc in enumerate(want["first_documents"]):
        got = [t for i in range(d[j], d[j + 1]) for t in ds[i].tolist()]
        assert got == doc
    assert ds.get(0, offset=2, length=3).tolist() == want["first_sequences"][0][2:5]


docs_strategy = st.lists(st.lists(st.lists(st.integers(0, 65000), min_size=0, max_size=20), max_size=4),
                         max_size=12)


@settings(max_examples=50, deadline=None)
@given(docs_strategy, st.sampled_from([np.uint16, np.int32]))
def test_builder_reader_round_trip(tmp_path_factory, docs, dtype):
    prefix = str(tmp_path_factory.mktemp("rt") / "d")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for doc in docs:
        b.add_document([t for s in doc for t in s], [len(s) for s in doc])
    b.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    seqs = [s for doc in docs for s in doc]
    assert len(ds) == len(seqs) and [ds[i].tolist() for i in range(len(ds))] == seqs
    assert ds.document_indices.tolist() == list(np.cumsum([0] + [len(d) for d in docs]))


def _corrupt(tmp_path, mutate) -> str:
    prefix = str(tmp_path / "x")
    b = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    b.add_document([1, 2, 3], [3])
    b.finalize(prefix + ".idx")
    mutate(prefix)
    with pytest.raises(IndexedDatasetError) as exc:
        IndexedDataset(prefix)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def _patch(path, offset, data):
    raw = bytearray(open(path, "rb").read())
    raw[offset:offset + len(data)] = data
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("mutate, words", [
    (lambda p: _patch(p + ".idx", 0, b"NOTMAGIC!"), "bad magic"),
    (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 7)), "version 7"),
    (lambda p: _patch(p + ".idx", 17, b"\x63"), "unknown dtype code 99"),
    (lambda p: open(p + ".idx", "r+b").truncate(40), "truncated"),
    (lambda p: open(p + ".bin", "r+b").truncate(4), "truncated"),
    (lambda p: os.remove(p + ".bin"), "not found"),
])
def test_corrupt_files_one_line_errors(tmp_path, mutate, words):
    msg = _corrupt(tmp_path, mutate)
    assert words in msg and "x." in msg


def test_preprocess_bad_line_names_it_and_leaves_nothing(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    out = tmp_path / "out"
    out.mkdir()
    argv = ["preprocess", "--input", str(src), "--output-prefix", str(out / "p"), "--tokenizer-dir", TOK]
    assert "line 3" in cli_error(argv, capsys) and os.listdir(out) == []
    src.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    err = cli_error(argv, capsys)
    assert "line 2" in err and "'text'" in err and os.listdir(out) == []


def test_wikitext_to_jsonl(tmp_path):
    out = tmp_path / "wiki.jsonl"
    assert cli(["wikitext-to-jsonl", "--input", str(FIXTURES / "data" / "wiki.sample.tokens"),
                "--output", str(out)]) == 0
    arts = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["title"] for a in arts] == ["Valkyria Chronicles III", "Tower Building of the Little Rock Arsenal"]
    text = arts[0]["text"]
    assert "role-playing" in text and "1,000 copies, about 2.5% of \"expectations\"." in text
    assert "\n\nGameplay\n\n" in text and "\n\nPlot\n\n" in text and "(released in 2011) isn't short." in text
    assert cli(["wikitext-to-jsonl", "--input", str(FIXTURES / "data" / "wiki.sample.tokens"),
                "--output", str(out), "--keep-artifacts"]) == 0
    assert "role @-@ playing" in out.read_text()


@pytest.mark.parametrize("name", ["golden_a_text_document", "golden_b_text_document"])
def test_builder_bytes_equal_megatron_core_builder(tmp_path, name):
    """tests/fixtures/megatron_gpt/golden_{a,b} were written by megatron-core 0.16.1's own
    IndexedDatasetBuilder (uint16 / int32, with empty documents): rebuilding the same documents
    with ours gives the same bytes."""
    src = IndexedDataset(str(FIXTURES / "megatron_gpt" / name))
    prefix = str(tmp_path / name)
    b = IndexedDatasetBuilder(prefix + ".bin", src.dtype)
    d = src.document_indices
    for j in range(len(d) - 1):
        seqs = [src[i] for i in range(d[j], d[j + 1])]
        b.add_document(np.concatenate(seqs) if seqs else [], [len(s) for s in seqs])
    b.finalize(prefix + ".idx")
    for ext in (".bin", ".idx"):
        assert sha(prefix + ext) == sha(FIXTURES / "megatron_gpt" / f"{name}{ext}"), ext
