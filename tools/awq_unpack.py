"""Independent NumPy packer / dequantizer of AWQ "GEMM" weights (AutoAWQ WQLinear_GEMM, read by
transformers and vLLM as quant_method "awq"), written from the published format, NOT importing
qwen3moe: tests use it as a second implementation of io/awq.py.

Format of one linear W [O, I] (HF [out, in]), 4 bits, group size g, G = I / g groups:
  qweight int32 [I, O / 8]: word [k, c] holds q[k, o] of outputs o = 8c .. 8c + 7, output
          8c + ORDER[i] in bits [4i, 4i + 4), ORDER = [0, 2, 4, 6, 1, 3, 5, 7];
  qzeros  int32 [G, O / 8]: word [grp, c] holds z[grp, 8c + ORDER[i]] the same way (z as is);
  scales  float16 [G, O].
  W[o, k] = (q[k, o] - z[k // g, o]) * scales[k // g, o]
This version works word by word with Python integers (slow, fine for test-sized tensors).

    python tools/awq_unpack.py FOLDER TENSOR_PREFIX   # prints the dequantized matrix's stats
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _word(values: list[int]) -> int:
    """8 values in output order (column 8c + j) -> a signed int32 word in AWQ's slot order."""
    word = 0
    for i in range(8):
        v = values[ORDER[i]]
        assert 0 <= v < 16
        word |= v << (4 * i)
    return word - (1 << 32) if word >= 1 << 31 else word


def _values(word: int) -> list[int]:
    """A word -> its 8 values in output order."""
    word &= 0xFFFFFFFF
    out = [0] * 8
    for i in range(8):
        out[ORDER[i]] = (word >> (4 * i)) & 15
    return out


def _pack_rows(m: np.ndarray) -> np.ndarray:
    rows, O = m.shape
    return np.array([[_word([int(m[r, 8 * c + j]) for j in range(8)]) for c in range(O // 8)]
                     for r in range(rows)], np.int32).reshape(rows, O // 8)


def _unpack_rows(words: np.ndarray) -> np.ndarray:
    rows, C = words.shape
    out = np.zeros((rows, C * 8), np.int64)
    for r in range(rows):
        for c in range(C):
            out[r, 8 * c:8 * c + 8] = _values(int(words[r, c]))
    return out


def pack(q: np.ndarray, z: np.ndarray, scales: np.ndarray) -> dict[str, np.ndarray]:
    """Integer values q [I, O], zero points z [G, O] (0..15), scales [G, O] -> AWQ tensors."""
    return {"qweight": _pack_rows(np.asarray(q)), "qzeros": _pack_rows(np.asarray(z)),
            "scales": np.asarray(scales, np.float16)}


def dequantize(qweight, qzeros, scales) -> np.ndarray:
    """float32 W [O, I] from the three AWQ tensors (g = I / G)."""
    q = _unpack_rows(np.asarray(qweight))
    z = _unpack_rows(np.asarray(qzeros))
    s = np.asarray(scales).astype(np.float32)
    I, O = q.shape
    g = I // s.shape[0]
    w = np.zeros((O, I), np.float32)
    for k in range(I):
        w[:, k] = (q[k, :] - z[k // g, :]).astype(np.float32) * s[k // g, :]
    return w


def main(argv: list[str]) -> int:
    from safetensors.numpy import load_file

    folder, prefix = Path(argv[0]), argv[1]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    if qc.get("quant_method") != "awq" or str(qc.get("version", "gemm")).lower() != "gemm":
        print(f"{folder}: not an AWQ 'gemm' folder: {qc}", file=sys.stderr)
        return 2
    tensors: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v for k, v in load_file(f).items() if k.startswith(prefix + ".")})
    w = dequantize(tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"])
    print(f"{prefix}: {list(w.shape)} mean {w.mean():.6g} std {w.std():.6g} max|w| {np.abs(w).max():.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
