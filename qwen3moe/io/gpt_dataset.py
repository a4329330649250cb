"""GPTDataset with megatron-core 0.16 semantics: identical samples, in numpy (no torch, no C++).

Pipeline for one prefix (`data_path` = [w1, p1, w2, p2, ...] or [p1, ...]):
  split  "a,b,c" -> normalised book-ends -> sequence ranges [round(lo*n), round(hi*n)) (GPT splits
         by sequence, not document);
  epochs smallest e with e * tokens_per_epoch >= num_samples * seq_length + 1;
  separate final epoch when the last epoch would contribute < int(0.8 * samples per epoch);
  document_index: the split's sequence ids tiled per epoch (int32), shuffled with ONE
         numpy.random.RandomState(seed) (the final epoch shuffled separately when separated);
  sample_index: sample i starts at global token i * seq_length of the document_index stream
         (each sample holds seq_length + 1 tokens; the next starts on its last token), stored as
         (position in document_index, offset); computed with one searchsorted instead of a loop;
  shuffle_index: arange(samples) shuffled with the same RandomState (two ranges if separated).
Blending: weights normalised; dataset d is built with ceil(ceil(N*w_d)*1.005) samples, the blend
has sum_d ceil(N*w_d) samples, and sample i goes to the dataset with the largest
w_d * max(i, 1) - used_d (ties -> lowest d).
Shapes: S sequence length, N samples.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass

import numpy as np

from qwen3moe.io.indexed_dataset import IndexedDataset

SURPLUS = 0.005
PAD_DEFAULT = -1  # megatron's _PAD_TOKEN_ID when the tokenizer has no pad


@dataclass(frozen=True)
class GPTConfig:
    seq_length: int
    seed: int = 1234
    split: str = "1,0,0"
    eod_id: int | None = None
    pad_id: int = PAD_DEFAULT
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    create_attention_mask: bool = False


def split_ranges(split: str, n: int) -> list[tuple[int, int] | None]:
    vals = [float(v) for v in re.findall(r"[.0-9]+", split)]
    vals += [0.0] * (3 - len(vals))
    if len(vals) != 3 or any(v < 0 for v in vals) or sum(vals) == 0:
        raise ValueError(f"split must be three non-negative ratios like '99,1,0', got {split!r}")
    w = (np.array(vals, np.float64) / np.sum(np.array(vals, np.float64))).tolist()
    ends = np.cumsum([0.0] + w).tolist()
    out = []
    for lo, hi in zip(ends[:-1], ends[1:]):
        out.append(None if hi <= lo else (int(round(lo * float(n))), int(round(hi * float(n)))))
    return out


def _document_index(ids: np.ndarray, epochs: int, rs: np.random.RandomState, separate: bool) -> np.ndarray:
    if not separate or epochs == 1:
        doc = np.tile(ids, epochs).astype(np.int32)
        rs.shuffle(doc)
        return doc
    first = _document_index(ids, epochs - 1, rs, False)
    return np.concatenate((first, _document_index(ids, 1, rs, False)))


def _shuffle_index(num: int, total: int, rs: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num, dtype=dtype)
    rs.shuffle(first)
    if num == total:
        return first
    last = np.arange(num, total, dtype=dtype)
    rs.shuffle(last)
    return np.concatenate((first, last))


def sample_index(sizes: np.ndarray, doc_index: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """(num_samples + 1, 2) rows of (document_index position, offset); vectorised build_sample_idx."""
    lengths = sizes[doc_index].astype(np.int64)
    ends = np.cumsum(lengths)
    starts_q = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    pos = np.searchsorted(ends, starts_q, side="right")
    offsets = starts_q - (ends[pos] - lengths[pos])
    out = np.stack([pos, offsets], axis=1)
    out[0] = 0  # megatron records (0, 0) for the first sample even when that document is empty
    return out.astype(np.int32 if out.max(initial=0) <= np.iinfo(np.int32).max else np.int64)


class GPTDataset:
    """One prefix's split: `len`, `ds[i]` -> dict of numpy arrays (megatron-core item semantics)."""

    def __init__(self, prefix: str, num_samples: int, cfg: GPTConfig, split_id: int = 0,
                 cache_dir: str | None = None) -> None:
        self.prefix, self.cfg = prefix, cfg
        self.dataset = IndexedDataset(prefix)
        rng = split_ranges(cfg.split, len(self.dataset))[split_id]
        if rng is None:
            raise ValueError(f"split {cfg.split!r} gives no sequences to split {split_id} of {prefix}")
        self.indices = np.arange(rng[0], rng[1], dtype=np.int32)
        self.num_samples = num_samples
        self.document_index, self.sample_index, self.shuffle_index = self._indices(cache_dir)

    def _build(self):
        S, sizes = self.cfg.seq_length, self.dataset.sequence_lengths
        tokens = int(np.sum(sizes[self.indices]))
        if tokens <= 1:
            raise ValueError(f"{self.prefix}: the split has {tokens} tokens, cannot build samples")
        epochs = max(1, math.ceil((self.num_samples * S + 1) / tokens))
        separate, sans_final = False, 0
        if epochs > 1:
            sans_final = ((epochs - 1) * tokens - 1) // S
            per_epoch = (tokens - 1) // S
            separate = (self.num_samples - sans_final) < int(0.80 * per_epoch)
        rs = np.random.RandomState(self.cfg.seed)
        doc = _document_index(self.indices, epochs, rs, separate)
        total = (epochs * tokens - 1) // S
        samp = sample_index(sizes, doc, S, total)
        shuf = _shuffle_index(sans_final if separate else total, total, rs)
        return doc, samp, shuf

    def _indices(self, cache_dir: str | None):
        key = json.dumps({"prefix": os.path.abspath(self.prefix), "n": self.num_samples,
                          "idx": [int(self.indices[0]) if len(self.indices) else 0, len(self.indices)],
                          **asdict(self.cfg)}, sort_keys=True)
        digest = hashlib.md5(key.encode()).hexdigest()
        cache = cache_dir or os.path.join(os.path.dirname(os.path.abspath(self.prefix)), "cache")
        paths = [os.path.join(cache, f"{digest}-{n}_index.npy") for n in ("document", "sample", "shuffle")]
        if all(os.path.isfile(p) for p in paths):
            return tuple(np.load(p, mmap_mode="r") for p in paths)
        arrays = self._build()
        os.makedirs(cache, exist_ok=True)
        for p, a in zip(paths, arrays):
            tmp = p + f".tmp{os.getpid()}.npy"
            np.save(tmp, a)
            os.replace(tmp, p)
        return arrays

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def text(self, idx: int) -> np.ndarray:
        i = int(self.shuffle_index[idx])
        (b, bo), (e, eo) = self.sample_index[i], self.sample_index[i + 1]
        doc = self.document_index
        if b == e:
            parts = [self.dataset.get(int(doc[b]), int(bo), int(eo - bo + 1))]
        else:
            parts = [self.dataset.get(int(doc[j]), int(bo) if j == b else 0, None if j < e else int(eo) + 1)
                     for j in range(b, e + 1)]
        text = np.concatenate(parts).astype(np.int64)
        want = self.cfg.seq_length + 1
        return np.concatenate([text, np.full(want - len(text), self.cfg.pad_id, np.int64)]) if len(text) < want else text

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        return make_item(self.text(idx), self.cfg)


def make_item(text: np.ndarray, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """tokens/labels/loss_mask/position_ids (+ attention_mask) exactly as megatron-core builds them."""
    tokens, labels = text[:-1].copy(), text[1:].copy()
    S = len(tokens)
    loss_mask = np.ones(S, np.float32)
    if cfg.eod_mask_loss and cfg.eod_id is not None:
        loss_mask[tokens == cfg.eod_id] = 0.0
    position_ids = np.arange(S, dtype=np.int64)
    # segment id of each position = number of EOD tokens strictly before it (a document ends
    # with its EOD, the next starts right after it)
    eods = np.nonzero(tokens == cfg.eod_id)[0] if cfg.eod_id is not None else np.zeros(0, np.int64)
    segment = np.searchsorted(eods, position_ids, side="left")
    if cfg.reset_position_ids and len(eods):
        starts = np.concatenate([[0], eods + 1])
        position_ids = position_ids - starts[segment]
    loss_mask[labels == cfg.pad_id] = 0.0
    tokens[tokens == cfg.pad_id] = 0
    labels[labels == cfg.pad_id] = 0
    item = {"input_ids": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    if cfg.create_attention_mask:
        allowed = np.tril(np.ones((S, S), bool))
        if cfg.reset_attention_mask:  # no attention across an EOD (megatron zeroes [i+1:, :i+1])
            allowed &= segment[:, None] == segment[None, :]
        item["attention_mask"] = ~allowed[None]  # True = masked, megatron's convention
    return item


class BlendedDataset:
    """Greedy error-minimising interleave of several GPTDatasets (megatron build_blending_indices)."""

    def __init__(self, datasets: list[GPTDataset], weights: list[float], size: int) -> None:
        self.datasets, self.size = datasets, size
        # megatron-core normalises the (already normalised) weights a second time here; the
        # last-ulp differences this makes can flip greedy ties, so do the same
        w = np.asarray(weights, np.float64)
        w = np.asarray((w / np.sum(w)).tolist(), np.float64)
        self.dataset_index, self.dataset_sample_index = blending_indices(w, size)
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, (n, ds) in enumerate(zip(counts, datasets)):
            if n > len(ds):
                raise ValueError(f"the blend draws {n} samples from dataset {d} ({ds.prefix}) which has "
                                 f"only {len(ds)}: raise the 0.5% surplus or the sample count")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        d = int(self.dataset_index[idx])
        item = self.datasets[d][int(self.dataset_sample_index[idx])]
        item["dataset_id"] = np.int64(d)
        return item


def blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """megatron's build_blending_indices: sample i goes to the dataset with the largest error
    w_d * max(i, 1) - used_d, the first one on ties (the C++ scan's strict '>').

    Plain Python floats are IEEE doubles like the C++ ones, so the choices are identical; a
    scalar loop beats numpy calls per sample (bench/RESULTS.md, Data pipeline).
    """
    w = [float(x) for x in weights]
    used = [0] * len(w)
    choice = [0] * size
    others = range(1, len(w))
    for i in range(size):
        x = float(i) if i > 1 else 1.0
        best, err = 0, w[0] * x - used[0]
        for d in others:
            e = w[d] * x - used[d]
            if e > err:
                best, err = d, e
        choice[i] = best
        used[best] += 1
    ds_index = np.asarray(choice, np.int16)
    # the k-th draw from dataset d is its sample k
    ds_sample = np.zeros(size, np.int64)
    for d in range(len(w)):
        hit = ds_index == d
        ds_sample[hit] = np.arange(int(hit.sum()))
    return ds_index, ds_sample


def parse_data_path(data_path: list | tuple | str) -> tuple[list[str], list[float] | None]:
    items = [data_path] if isinstance(data_path, str) else [str(x) for x in data_path]
    if len(items) % 2 == 0:
        try:
            weights = [float(w) for w in items[0::2]]
            return [p.strip() for p in items[1::2]], weights
        except ValueError:
            pass
    return [p.strip() for p in items], None


def build_gpt_dataset(data_path, seq_length: int, num_samples: int, seed: int = 1234, split: str = "1,0,0",
                      eod_mask_loss: bool = False, reset_position_ids: bool = False,
                      reset_attention_mask: bool = False, create_attention_mask: bool = False,
                      pad_id: int = PAD_DEFAULT, eod_id: int | None = None, split_id: int = 0,
                      cache_dir: str | None = None, allow_ambiguous_pad_tokens: bool = False):
    """The training split (split_id 0) of `data_path` with megatron-core 0.16 sample order.

    As megatron-core 0.16: a pad id equal to the EOD id (the seed's `pad: 151643`) is reset to -1
    unless `allow_ambiguous_pad_tokens`, so real EOD tokens are never masked or zeroed as padding.
    """
    for name, on in (("eod_mask_loss", eod_mask_loss), ("reset_position_ids", reset_position_ids),
                     ("reset_attention_mask", reset_attention_mask)):
        if on and eod_id is None:  # each acts on EOD tokens: it would silently do nothing
            raise ValueError(f"{name}=True needs eod_id (the end-of-document token id), got none")
    if pad_id == eod_id and not allow_ambiguous_pad_tokens:
        pad_id = PAD_DEFAULT
    cfg = GPTConfig(seq_length, seed, split, eod_id, pad_id, eod_mask_loss, reset_position_ids,
                    reset_attention_mask, create_attention_mask)
    prefixes, weights = parse_data_path(data_path)
    if len(prefixes) == 1 and weights is None:
        return GPTDataset(prefixes[0], num_samples, cfg, split_id, cache_dir)
    if weights is None:
        raise ValueError("blending several prefixes needs weights: data_path = [w1, p1, w2, p2, ...]")
    w = np.asarray(weights, np.float64)
    w = (w / w.sum()).tolist()
    target = [int(math.ceil(num_samples * x)) for x in w]
    built = [int(math.ceil(math.ceil(num_samples * x) * (1 + SURPLUS))) for x in w]
    datasets = [GPTDataset(p, n, cfg, split_id, cache_dir) for p, n in zip(prefixes, built)]
    return BlendedDataset(datasets, w, sum(target))
