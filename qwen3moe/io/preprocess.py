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
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain

import numpy as np

from qwen3moe.errors import Qwen3MoeError
from qwen3moe.io.indexed_dataset import IndexedDatasetBuilder, optimal_dtype

CHUNK = 1024  # lines per worker task (one encode_batch call each)


class PreprocessError(Qwen3MoeError, ValueError):
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


def _parse_chunk(lines: list[tuple[int, str]], keys: tuple[str, ...]):
    """-> ((per key: all sentences of the chunk, per key: sentences per line), None) or (None, error)."""
    sentences: list[list[str]] = [[] for _ in keys]
    counts: list[list[int]] = [[] for _ in keys]
    for lineno, raw in lines:
        if isinstance(raw, NotUtf8):
            return None, f"line {lineno}: {raw}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            return None, f"line {lineno}: invalid JSON ({exc.msg})"
        if not isinstance(obj, dict):
            return None, f"line {lineno}: expected a JSON object"
        for k, key in enumerate(keys):
            if key not in obj:
                return None, f"line {lineno}: missing key {key!r}"
            value = obj[key]
            sents = value if isinstance(value, list) else [value]
            if not all(isinstance(x, str) for x in sents):
                return None, f"line {lineno}: key {key!r} must be a string or a list of strings"
            sentences[k].extend(sents)
            counts[k].append(len(sents))
    return (sentences, counts), None


def _encode(tok, sentences: list[str]) -> list[list[int]]:
    """One batched call for the whole chunk (the library parallelises inside it). The `_fast`
    variant skips the character offsets we never use; the ids are the same."""
    if not sentences:
        return []
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    return [e.ids for e in encode(sentences, add_special_tokens=False)]


def _assemble(ids: list[list[int]], per_doc: list[int], eod: int, append_eod: bool):
    """Sentence ids -> (tokens, sequence lengths, sequences per document) for one json key.

    megatron's rule, vectorised over the chunk: empty sentences are dropped, and with append_eod
    the EOD token closes the last sequence of every document that has any token.
    """
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.fromiter(chain.from_iterable(ids), np.int64, int(lens.sum()))
    doc_of = np.repeat(np.arange(len(per_doc)), np.asarray(per_doc, np.int64))
    keep = lens > 0
    lens, doc_of = lens[keep], doc_of[keep]
    seqs = np.bincount(doc_of, minlength=len(per_doc))
    if append_eod and lens.size:
        last = np.cumsum(seqs)[seqs > 0] - 1  # each non-empty document's last sequence
        flat = np.insert(flat, np.cumsum(lens)[last], eod)
        lens[last] += 1
    return flat, lens, seqs


def _encode_chunk(args: tuple[list[tuple[int, str]], tuple[str, ...], int, bool]):
    """Worker task: [(line number, raw json)] -> ("ok", lines, per key arrays) or ("error", msg)."""
    lines, keys, eod, append_eod = args
    parsed, err = _parse_chunk(lines, keys)
    if err:
        return ("error", err)
    sentences, counts = parsed
    per_key = [_assemble(_encode(_TOK, s), c, eod, append_eod) for s, c in zip(sentences, counts)]
    return ("ok", len(lines), per_key)


def _threaded(chunks, keys: tuple[str, ...], eod: int, append_eod: bool, tok, depth: int = 2):
    """Single-process pipeline: encode_batch runs in a thread (it releases the GIL) while this
    thread parses the next chunks and writes the previous ones; results stay in input order."""
    def finish(counts, futures):
        return ("ok", len(counts[0]) if counts else 0,
                [_assemble(f.result(), c, eod, append_eod) for f, c in zip(futures, counts)])

    with ThreadPoolExecutor(1) as pool:
        pending: deque = deque()
        for lines in chunks:
            parsed, err = _parse_chunk(lines, keys)
            if err:  # earlier chunks first, so the error is reported for the right line
                while pending:
                    yield finish(*pending.popleft())
                yield ("error", err)
                return
            sentences, counts = parsed
            pending.append((counts, [pool.submit(_encode, tok, s) for s in sentences]))
            if len(pending) > depth:
                yield finish(*pending.popleft())
        while pending:
            yield finish(*pending.popleft())


class NotUtf8(str):
    """Stands in for an undecodable line (the text is the reason), so the parser reports it in
    input order like any other bad line, also from a worker process."""


def _chunks(path: str) -> Iterator[list[tuple[int, str]]]:
    """Non-blank lines with their numbers."""
    batch = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if raw.strip():
                try:
                    batch.append((lineno, raw.decode("utf-8")))
                except UnicodeDecodeError as exc:
                    batch.append((lineno, NotUtf8(f"not valid UTF-8 ({exc.reason} at byte {exc.start} of the line)")))
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
        results = pool.imap(_encode_chunk, tasks) if pool else \
            _threaded(_chunks(opts.input), tuple(opts.json_keys), eod, opts.append_eod, tok)
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
    for status, *payload in results:
        if status == "error":
            raise PreprocessError(f"{opts.input}: {payload[0]}")
        n_docs, per_key = payload
        for key, (flat, lens, seqs) in zip(opts.json_keys, per_key):
            builders[key].add_documents(flat, lens, seqs)
            tokens += flat.size
        docs += n_docs
        if progress:
            dt = max(time.perf_counter() - t0, 1e-9)
            progress(docs, tokens, docs / dt, tokens / dt)
