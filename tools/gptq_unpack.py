"""Independent NumPy reader/writer of GPTQ-format weights, written from the published format
(AutoGPTQ / GPTQModel / transformers), NOT importing qwen3moe: tests use it to check our writer
and reader against a second implementation.

Format of one linear W [O, I] (HF [out, in]) with b bits, F = 32 / b values per 32-bit word,
group size g (-1: g = I), G = I / g groups:
  qweight int32 [I / F, O]: word [r, o] holds inputs k = r*F + j (j = 0..F-1) of output o, value j
          in bits [j*b, (j+1)*b) (least significant first);
  qzeros  int32 [G, O / F]: word [grp, c] holds the zero points of outputs o = c*F + j, same bits;
          checkpoint_format "gptq" (v1) stores (z - 1) mod 2^b, "gptq_v2" stores z;
  scales  float16 [G, O];  g_idx int32 [I]: group of input k.
  W[o, k] = (q[k, o] - z[g_idx[k], o]) * scales[g_idx[k], o]
This version works word by word with Python integers (slow, fine for test-sized tensors).

    python tools/gptq_unpack.py FOLDER TENSOR_PREFIX   # prints the dequantized matrix's stats
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _values(word: int, bits: int) -> list[int]:
    word &= 0xFFFFFFFF
    return [(word >> (j * bits)) & ((1 << bits) - 1) for j in range(32 // bits)]


def _word(values: list[int], bits: int) -> int:
    word = 0
    for j, v in enumerate(values):
        assert 0 <= v < (1 << bits)
        word |= v << (j * bits)
    return word - (1 << 32) if word >= 1 << 31 else word  # as a signed int32


def unpack_qweight(qweight: np.ndarray, bits: int) -> np.ndarray:
    """int32 [I/F, O] -> int64 q [I, O]."""
    F = 32 // bits
    rows, O = qweight.shape
    q = np.zeros((rows * F, O), np.int64)
    for r in range(rows):
        for o in range(O):
            for j, v in enumerate(_values(int(qweight[r, o]), bits)):
                q[r * F + j, o] = v
    return q


def unpack_qzeros(qzeros: np.ndarray, bits: int, v1: bool) -> np.ndarray:
    """int32 [G, O/F] -> int64 z [G, O] (v1: (stored + 1) mod 2^b)."""
    F = 32 // bits
    G, C = qzeros.shape
    z = np.zeros((G, C * F), np.int64)
    for grp in range(G):
        for c in range(C):
            for j, v in enumerate(_values(int(qzeros[grp, c]), bits)):
                z[grp, c * F + j] = (v + 1) % (1 << bits) if v1 else v
    return z


def dequantize(qweight, qzeros, scales, g_idx, bits: int, v1: bool = True) -> np.ndarray:
    """float32 W [O, I] from the four GPTQ tensors."""
    q = unpack_qweight(np.asarray(qweight), bits)
    z = unpack_qzeros(np.asarray(qzeros), bits, v1)
    s = np.asarray(scales).astype(np.float32)
    gi = np.asarray(g_idx).astype(np.int64)
    I, O = q.shape
    w = np.zeros((O, I), np.float32)
    for k in range(I):
        w[:, k] = (q[k, :] - z[gi[k], :]).astype(np.float32) * s[gi[k], :]
    return w


def pack(q: np.ndarray, z: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, bits: int,
         v1: bool = True) -> dict[str, np.ndarray]:
    """Integer values q [I, O], zero points z [G, O], scales [G, O], g_idx [I] -> GPTQ tensors."""
    F = 32 // bits
    I, O = q.shape
    G = z.shape[0]
    qweight = np.array([[_word([int(q[r * F + j, o]) for j in range(F)], bits) for o in range(O)]
                        for r in range(I // F)], np.int32)
    stored = z - (1 if v1 else 0)
    mask = (1 << bits) - 1
    qzeros = np.array([[_word([int(stored[grp, c * F + j]) & mask for j in range(F)], bits)
                        for c in range(O // F)] for grp in range(G)], np.int32)
    return {"qweight": qweight, "qzeros": qzeros, "scales": np.asarray(scales, np.float16),
            "g_idx": np.asarray(g_idx, np.int32)}


def main(argv: list[str]) -> int:
    from safetensors.numpy import load_file

    folder, prefix = Path(argv[0]), argv[1]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v for k, v in load_file(f).items() if k.startswith(prefix + ".")})
    w = dequantize(tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"],
                   tensors[f"{prefix}.g_idx"], qc["bits"], qc.get("checkpoint_format", "gptq") == "gptq")
    print(f"{prefix}: {list(w.shape)} mean {w.mean():.6g} std {w.std():.6g} max|w| {np.abs(w).max():.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
