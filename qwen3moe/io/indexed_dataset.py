"""Megatron indexed dataset (.bin/.idx), byte-identical with megatron-core 0.16's writer.

.idx, little-endian: magic b"MMIDIDX\\x00\\x00" (9 bytes), version u64 = 1, dtype code u8,
sequence count S u64, document count D u64 (= documents + 1), then int32 lengths[S],
int64 byte pointers[S], int64 document_indices[D] (starting with 0).
.bin: the concatenated tokens, no header. Shapes: S sequences, D document boundaries.
No torch, no mindspore: plain numpy, memory-mapped reads.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import numpy as np

from qwen3moe.errors import Qwen3MoeError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDatasetError(Qwen3MoeError, ValueError):
    """A malformed .idx/.bin pair: one line naming the file and what is wrong."""


def optimal_dtype(vocab_size: int | None) -> type:
    """megatron-core's rule: uint16 when the vocabulary fits (< 65500), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class IndexedDatasetBuilder:
    """Append documents (a document = one or more sequences), then `finalize` the .idx.

    Writes go to `<prefix>.bin.tmp` / `.idx.tmp` and are renamed on finalize, so an interrupted
    build never leaves a half-written dataset under the final name.
    """

    def __init__(self, bin_path: str, dtype=np.int32) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise IndexedDatasetError(f"{bin_path}: unsupported token dtype {self.dtype}")
        self.bin_path = bin_path
        self._tmp = bin_path + ".tmp"
        self._fh = open(self._tmp, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Sequence[int]) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        if sum(lengths) != arr.size:
            raise IndexedDatasetError(f"{self.bin_path}: sequence lengths {list(lengths)} do not sum to "
                                      f"the document's {arr.size} tokens")
        self._fh.write(arr.tobytes(order="C"))
        self.sequence_lengths.extend(int(n) for n in lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def add_documents(self, tokens: np.ndarray, sequence_lengths: np.ndarray,
                      sequences_per_document: np.ndarray) -> None:
        """Many documents in one write: the same bytes as `add_document` called per document.

        `tokens` holds all their sequences back to back, `sequence_lengths` one entry per
        sequence, `sequences_per_document` how many of those sequences each document owns (0 for
        an empty document). Preprocessing uses it to skip per-document Python overhead.
        """
        arr = np.asarray(tokens, dtype=self.dtype)
        lengths = np.asarray(sequence_lengths, dtype=np.int64)
        counts = np.asarray(sequences_per_document, dtype=np.int64)
        if int(lengths.sum()) != arr.size or int(counts.sum()) != lengths.size:
            raise IndexedDatasetError(f"{self.bin_path}: {lengths.size} sequence lengths summing to "
                                      f"{int(lengths.sum())} for {arr.size} tokens and "
                                      f"{int(counts.sum())} sequences across the documents")
        self._fh.write(arr.tobytes(order="C"))
        base = len(self.sequence_lengths)
        self.sequence_lengths.extend(lengths.tolist())
        self.document_indices.extend((base + np.cumsum(counts)).tolist())

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """One sequence without closing the document (megatron-core's add_item)."""
        arr = np.asarray(tokens, dtype=self.dtype)
        self._fh.write(arr.tobytes(order="C"))
        self.sequence_lengths.append(int(arr.size))

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self, idx_path: str) -> None:
        self._fh.close()
        lengths = np.asarray(self.sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        header = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", CODE_OF[self.dtype])
        header += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(self.document_indices))
        body = lengths.tobytes() + pointers.tobytes() + np.asarray(self.document_indices, np.int64).tobytes()
        with open(idx_path + ".tmp", "wb") as fh:
            fh.write(header + body)
        os.replace(self._tmp, self.bin_path)
        os.replace(idx_path + ".tmp", idx_path)

    def abort(self) -> None:
        """Drop the partial files (a failed preprocessing run leaves nothing behind)."""
        self._fh.close()
        for p in (self._tmp,):
            if os.path.exists(p):
                os.unlink(p)


class IndexedDataset:
    """Memory-mapped reader: `ds[i]` is sequence i, `ds.get(i, offset, length)` a slice of it."""

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        idx, bin_ = path_prefix + ".idx", path_prefix + ".bin"
        for p in (idx, bin_):
            if not os.path.isfile(p):
                raise IndexedDatasetError(f"{p}: not found (data_path is the prefix without .bin/.idx)")
        self._read_index(idx)
        size = os.path.getsize(bin_)
        need = int(self.sequence_lengths.astype(np.int64).sum()) * self.dtype.itemsize
        if size < need:
            raise IndexedDatasetError(f"{bin_}: truncated: the index needs {need} bytes, file has {size}")
        self._bin = np.memmap(bin_, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)

    def _read_index(self, idx: str) -> None:
        with open(idx, "rb") as fh:
            data = fh.read()
        if data[:9] != MAGIC:
            raise IndexedDatasetError(f"{idx}: bad magic {data[:9]!r}, not a Megatron MMIDIDX index")
        if len(data) < 34:
            raise IndexedDatasetError(f"{idx}: truncated header ({len(data)} bytes)")
        (version,) = struct.unpack("<Q", data[9:17])
        if version != VERSION:
            raise IndexedDatasetError(f"{idx}: unsupported index version {version} (expected {VERSION})")
        code = data[17]
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx}: unknown dtype code {code} (expected one of {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n_seq, n_doc = struct.unpack("<QQ", data[18:34])
        want = 34 + n_seq * 4 + n_seq * 8 + n_doc * 8
        if len(data) < want:
            raise IndexedDatasetError(f"{idx}: truncated: {len(data)} bytes, header promises {want}")
        off = 34
        self.sequence_lengths = np.frombuffer(data, np.int32, n_seq, off)
        self.sequence_pointers = np.frombuffer(data, np.int64, n_seq, off + 4 * n_seq)
        self.document_indices = np.frombuffer(data, np.int64, n_doc, off + 12 * n_seq)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range [0, {len(self)})")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        n = int(self.sequence_lengths[i]) - offset if length is None else length
        return np.array(self._bin[start:start + n])

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.astype(np.int64).sum())
