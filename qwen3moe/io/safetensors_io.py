"""Minimal, strict safetensors reader/writer on plain numpy (no framework import).

Why our own: bf16 has no numpy dtype, so we read raw uint16 and widen exactly; reads go through
`os.pread` per tensor (or per row range) so loading never keeps a whole shard mapped in RSS;
every malformed-file case gets a one-line error naming the file and tensor.
Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data block.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import numpy as np

from qwen3moe.errors import Qwen3MoeError
from qwen3moe.io.atomic import atomic_write_bytes  # noqa: F401  (re-exported for callers)

_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_, "F8_E4M3": np.uint8}
_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
          np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}


class CheckpointError(Qwen3MoeError, ValueError):
    """A checkpoint file problem, reported in one line naming the file and tensor."""


def check_tensor_names(where: str, have, need, needed_for: str | None = None,
                       unexpected: bool = True) -> None:
    """The one-line error of every loader for tensors `need` that `have` lacks (named with what
    needs them) and, when `unexpected`, for tensors in `have` that nothing needs."""
    missing = [k for k in need if k not in have]
    if missing:
        why = f" (needed for {needed_for})" if needed_for and needed_for != missing[0] else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}{why}" + _more(missing))
    extra = sorted(set(have) - set(need)) if unexpected else []
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]!r} (the model has no such parameter)"
                              + _more(extra))


def _more(names: list) -> str:
    return f" and {len(names) - 1} more" if len(names) > 1 else ""


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """Exact widening: bf16 is the top half of an f32."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _e4m3_table() -> np.ndarray:
    """float8_e4m3fn (the OCP "E4M3" of FP8 checkpoints) -> float32 for all 256 codes, from the
    format's definition: sign bit, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
    subnormal (m/8 * 2^-6); S.1111.111 is NaN; no infinities (S.1111.110 = 448, the max)."""
    b = np.arange(256)
    e, m = (b >> 3) & 15, (b & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    mag = np.where((e == 15) & (m == 7), np.nan, mag)
    return (np.where(b >> 7, -1.0, 1.0) * mag).astype(np.float32)


E4M3_TABLE = _e4m3_table()


def e4m3_to_f32(u8: np.ndarray) -> np.ndarray:
    """Exact widening of F8_E4M3 bytes (a 256-entry table lookup)."""
    return E4M3_TABLE[u8]


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even (NaN stays NaN), returned as raw uint16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)
    return rounded


class SafetensorsFile:
    """Lazy reader: header parsed and validated at open, tensors read on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from None
        size = os.fstat(self._fd).st_size
        raw = os.pread(self._fd, 8, 0)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors header length {n} (file has {size} bytes)")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (a JSON object expected)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + n
        self.entries: dict[str, dict] = header
        for name, e in header.items():
            self._validate(name, e, size)
        self._check_contiguous()

    def _validate(self, name: str, e: dict, size: int) -> None:
        if not isinstance(e, dict):
            raise CheckpointError(f"{self.path}: header entry for tensor {name!r} is not an object")
        if str(e.get("dtype")).startswith("F8_") and e["dtype"] != "F8_E4M3":
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {e['dtype']}; the only 8-bit float "
                                  f"read is F8_E4M3 (float8_e4m3fn)")
        if e.get("dtype") not in _NP_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
        shape = e.get("shape")
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            raise CheckpointError(f"{self.path}: tensor {name!r} has no valid 'shape' (a list of sizes), "
                                  f"got {shape!r}")
        offsets = e.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{self.path}: tensor {name!r} has no valid 'data_offsets' ([begin, end]), "
                                  f"got {offsets!r}")
        begin, end = offsets
        itemsize = np.dtype(_NP_DTYPES[e["dtype"]]).itemsize
        if end - begin != int(np.prod(e["shape"], dtype=np.int64)) * itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r} byte range does not match shape {e['shape']}")
        if self.data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated file: tensor {name!r} needs bytes up to "
                f"{self.data_start + end}, file has {size}")

    def _check_contiguous(self) -> None:
        """Tensors tile the data block from 0 without gaps or overlaps (as the reference reader
        requires), so no entry can point at another tensor's bytes."""
        pos = 0
        for name, e in sorted(self.entries.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
            if e["data_offsets"][0] != pos:
                raise CheckpointError(f"{self.path}: tensor {name!r} data_offsets {e['data_offsets']} leave a gap "
                                      f"or overlap (expected to begin at {pos})")
            pos = e["data_offsets"][1]

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> np.ndarray:  # a read-only mapping name -> tensor
        return self.read(name)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor as float32 (floats widened exactly) or its integer dtype; `rows` slices dim 0."""
        e = self.entries[name]
        shape = list(e["shape"])
        np_dtype = np.dtype(_NP_DTYPES[e["dtype"]])
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np_dtype.itemsize if shape else np_dtype.itemsize
        begin, end = e["data_offsets"]
        if rows is not None:
            if not shape:
                raise CheckpointError(f"{self.path}: tensor {name!r} is a scalar, cannot slice rows")
            r0, r1 = rows
            begin, end, shape[0] = begin + r0 * row_bytes, begin + r1 * row_bytes, r1 - r0
        buf = os.pread(self._fd, end - begin, self.data_start + begin)
        if len(buf) != end - begin:
            raise CheckpointError(f"{self.path}: short read for tensor {name!r} (file truncated?)")
        return _widen(np.frombuffer(buf, dtype=np_dtype).reshape(shape), e["dtype"])

    def read_raw(self, name: str) -> np.ndarray:
        """A tensor's stored bytes (uint8, no widening): copying a tensor costs its own size."""
        begin, end = self.entries[name]["data_offsets"]
        buf = os.pread(self._fd, end - begin, self.data_start + begin)
        if len(buf) != end - begin:
            raise CheckpointError(f"{self.path}: short read for tensor {name!r} (file truncated?)")
        return np.frombuffer(buf, np.uint8)

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """A hyperslab (one contiguous range per leading dims of `index`, others whole), read
        with one pread per contiguous run, so a rank splitting an inner dim (row-parallel
        weights) reads only its bytes. Widened like `read`."""
        e = self.entries[name]
        shape = list(e["shape"])
        if len(index) > len(shape):
            raise CheckpointError(f"{self.path}: tensor {name!r} has {len(shape)} dims, slice has {len(index)}")
        rng = [range(*sl.indices(n)) for sl, n in zip(index, shape)] + [range(n) for n in shape[len(index):]]
        if any(r.step != 1 for r in rng):
            raise CheckpointError(f"{self.path}: tensor {name!r}: only contiguous slices are supported")
        np_dtype = np.dtype(_NP_DTYPES[e["dtype"]])
        inner = len(shape) - 1  # merge trailing dims read whole into one run
        while inner > 0 and len(rng[inner]) == shape[inner]:
            inner -= 1
        run_elems = len(rng[inner]) * int(np.prod(shape[inner + 1:], dtype=np.int64))
        strides = np.cumprod([1] + shape[::-1])[::-1][1:]  # element strides per dim
        out = np.empty([len(r) for r in rng], np_dtype)
        flat = out.reshape(-1, run_elems) if out.size else out
        base = self.data_start + e["data_offsets"][0]
        for k, lead in enumerate(np.ndindex(*[len(r) for r in rng[:inner]])):
            start = sum((rng[d][i]) * int(strides[d]) for d, i in enumerate(lead)) + rng[inner].start * int(strides[inner])
            nbytes = run_elems * np_dtype.itemsize
            buf = os.pread(self._fd, nbytes, base + start * np_dtype.itemsize)
            if len(buf) != nbytes:
                raise CheckpointError(f"{self.path}: short read for tensor {name!r} (file truncated?)")
            flat[k] = np.frombuffer(buf, np_dtype)
        return _widen(out, e["dtype"])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _widen(arr: np.ndarray, tag: str) -> np.ndarray:
    """Stored values -> float32 (exactly) for float tags; integers as stored. F8_E4M3 gives the raw
    FP8 values: a checkpoint's block scales are applied by hf_checkpoint.CheckpointSource."""
    if tag == "BF16":
        return bf16_to_f32(arr)
    if tag == "F8_E4M3":
        return e4m3_to_f32(arr)
    if tag in ("F16", "F64"):
        return arr.astype(np.float32)
    return arr


def _is_size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


FLOAT_TAGS = ("F32", "F16", "BF16", "F64", "F8_E4M3")


def check_finite(arr: np.ndarray, name: str, path: str) -> None:
    """NaN/Inf anywhere in a float tensor -> CheckpointError naming it. min and max propagate NaN
    and see +-Inf, and need no temporary array (np.isfinite(arr).all() would allocate one)."""
    if arr.size and arr.dtype.kind == "f" and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        raise CheckpointError(f"{path}: tensor {name!r} holds non-finite values (NaN or Inf)")


def write_safetensors(path: str, tensors: Iterable[tuple[str, np.ndarray, str]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write (name, array, dtype_tag) triples; BF16 arrays are passed as raw uint16 bits.

    Returns the number of data bytes. Written to `path` directly: callers write into a temp
    folder that is renamed into place when complete.
    """
    items = list(tensors)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, arr, tag in items:
        nbytes = arr.nbytes
        header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)  # align the data block like the reference writer
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hbytes)))
        fh.write(hbytes)
        for _, arr, _ in items:
            fh.write(np.ascontiguousarray(arr).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    return offset


def dtype_tag(arr: np.ndarray) -> str:
    return _NAMES[np.dtype(arr.dtype)]
