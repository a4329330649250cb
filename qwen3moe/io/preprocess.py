"""jsonl -> Megatron .bin/.idx with an HF tokenizer (megatron-core tools/preprocess_data.py semantics).

Per json key K the output is `<prefix>_<K>_document.{bin,idx}`. A document whose value is a list
is a list of sentences, one sequence each; empty sentences are dropped; with append_eod the EOD
token closes the last sequence of a non-empty document. Tokenisation runs in worker processes
over chunks of lines, results are written in input order, so output is identical for any worker
count. Everything is written to temp files and renamed only when the whole input succeeded.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from qwen3moe.io.indexed_dataset import IndexedDatasetBuilder, optimal_dtype

CHUNK = 1024  # lines per worker task (one encode_batch call each)


class PreprocessError(ValueError):
    """Bad input: one line naming the file, line number and what was expected."""


@dataclass
class Options:
    input: str
    output_prefix: str
    tokenizer_dir: str
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    eod_token: str | None = None
    workers: int = 1
    dtype: str = "auto"
    log_interval: int = 1000


def load_hf_tokenizer(directory: str):
    from tokenizers import Tokenizer

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise PreprocessError(f"{directory}: no tokenizer.json (expected a Hugging Face tokenizer folder)")
    return Tokenizer.from_file(path)


def resolve_eod(tok, directory: str, eod_token: str | None) -> int:
    """--eod-token, else <|endoftext|> when the vocabulary has it, else the eos token."""
    name = eod_token
    if name is None:
        name = "<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else None
    if name is None:
        cfg = os.path.join(directory, "tokenizer_config.json")
        eos = json.load(open(cfg, encoding="utf-8")).get("eos_token") if os.path.isfile(cfg) else None
        name = eos.get("content") if isinstance(eos, dict) else eos
    tid = tok.token_to_id(name) if name else None
    if tid is None:
        raise PreprocessError(f"{directory}: EOD token {name!r} is not in the vocabulary (use --eod-token)")
    return tid


_TOK = None


def _init_worker(directory: str, serial: bool = False) -> None:
    """Load the tokenizer in a worker. With several worker processes each encodes serially:
    the library's own thread pool in every process would oversubscribe the cores."""
    global _TOK
    if serial:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOK = load_hf_tokenizer(directory)


def _encode_chunk(args: tuple[list[tuple[int, str]], tuple[str, ...], int, bool]):
    """[(line number, raw json)] -> per line, per key: (token ids, sentence lengths).

    All sentences of the chunk go through ONE encode_batch call (the tokenizers library then
    parallelises across them), which is what keeps preprocessing near encode_batch speed.
    """
    lines, keys, eod, append_eod = args
    sentences: list[str] = []
    spans = []  # per line, per key: (first sentence, sentence count)
    for lineno, raw in lines:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            return ("error", f"line {lineno}: invalid JSON ({exc.msg})")
        if not isinstance(obj, dict):
            return ("error", f"line {lineno}: expected a JSON object")
        per_key = []
        for key in keys:
            if key not in obj:
                return ("error", f"line {lineno}: missing key {key!r}")
            value = obj[key]
            sents = value if isinstance(value, list) else [value]
            if not all(isinstance(x, str) for x in sents):
                return ("error", f"line {lineno}: key {key!r} must be a string or a list of strings")
            per_key.append((len(sentences), len(sents)))
            sentences.extend(sents)
        spans.append(per_key)
    encoded = [e.ids for e in _TOK.encode_batch(sentences, add_special_tokens=False)] if sentences else []
    return ("ok", [[_document(encoded[a:a + n], eod, append_eod) for a, n in per_key] for per_key in spans])


def _document(encoded: list[list[int]], eod: int, append_eod: bool) -> tuple[list[int], list[int]]:
    """Concatenate non-empty sentences; EOD closes the last one of a non-empty document."""
    ids, lens = [], []
    for e in encoded:
        if e:
            ids.extend(e)
            lens.append(len(e))
    if ids and append_eod:
        ids.append(eod)
        lens[-1] += 1
    return ids, lens


def _chunks(path: str) -> Iterator[list[tuple[int, str]]]:
    batch = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                batch.append((lineno, line))
            if len(batch) == CHUNK:
                yield batch
                batch = []
    if batch:
        yield batch


def preprocess(opts: Options, progress=None) -> dict[str, str]:
    """Run the conversion; returns {json key: output prefix}. Raises PreprocessError on bad input."""
    if not os.path.isfile(opts.input):
        raise PreprocessError(f"{opts.input}: input file not found")
    tok = load_hf_tokenizer(opts.tokenizer_dir)
    eod = resolve_eod(tok, opts.tokenizer_dir, opts.eod_token)
    dtype = optimal_dtype(tok.get_vocab_size(with_added_tokens=True)) if opts.dtype == "auto" else \
        {"uint16": np.uint16, "int32": np.int32}[opts.dtype]
    prefixes = {k: f"{opts.output_prefix}_{k}_document" for k in opts.json_keys}
    os.makedirs(os.path.dirname(os.path.abspath(opts.output_prefix)), exist_ok=True)
    builders = {k: IndexedDatasetBuilder(p + ".bin", dtype) for k, p in prefixes.items()}
    tasks = ((c, tuple(opts.json_keys), eod, opts.append_eod) for c in _chunks(opts.input))
    pool = mp.get_context("fork").Pool(opts.workers, _init_worker, (opts.tokenizer_dir, True)) \
        if opts.workers > 1 else None
    try:
        results = pool.imap(_encode_chunk, tasks) if pool else map(_encode_chunk, tasks)
        if pool is None:
            global _TOK
            _TOK = tok  # reuse: loading a 151k-vocab tokenizer.json costs ~0.35 s
        _write_all(results, builders, opts, progress)
        for k, b in builders.items():
            b.finalize(prefixes[k] + ".idx")
    except BaseException:
        for b in builders.values():
            b.abort()
        raise
    finally:
        if pool:
            pool.terminate()
    return prefixes


def _write_all(results, builders, opts: Options, progress) -> None:
    docs = tokens = 0
    t0 = time.perf_counter()
    for status, payload in results:
        if status == "error":
            raise PreprocessError(f"{opts.input}: {payload}")
        for per_key in payload:
            for key, (ids, lens) in zip(opts.json_keys, per_key):
                builders[key].add_document(ids, lens)
                tokens += len(ids)
            docs += 1
        if progress:
            dt = max(time.perf_counter() - t0, 1e-9)
            progress(docs, tokens, docs / dt, tokens / dt)
