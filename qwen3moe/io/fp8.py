"""FP8 block-quantized folders (Qwen's `*-FP8` releases, DeepSeek-V3 style) read as float folders.

Format (config.json and safetensors), as transformers' finegrained_fp8 integration and vLLM's
Fp8Config read it:
  quantization_config: {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                        "weight_block_size": [bm, bn]}   (Qwen: [128, 128])
  <module>.weight            F8_E4M3 [O, I]  (float8_e4m3fn codes, safetensors_io.E4M3_TABLE)
  <module>.weight_scale_inv  F32 / BF16 [ceil(O / bm), ceil(I / bn)]  (Qwen: BF16)
  W[o, k] = fp8(weight[o, k]) * float32(weight_scale_inv[o // bm, k // bn])
(the last block row / column may be partial). Which modules are FP8 is decided by the stored
dtypes: Qwen keeps embed_tokens, lm_head, norms and the router (`mlp.gate`) in BF16, which
`modules_to_not_convert` lists informally. `activation_scheme` "dynamic" only matters to FP8
matmul kernels; we dequantize the weights once at load, so the math is the float path's.

`split_scales` pairs each F8 weight with its scales when a CheckpointSource opens the folder
and hides the scale tensors; `CheckpointSource.read` / `read_slice` then return dequantized
float32 (`apply_scales`), so every loader (float, bf16, quantize-on-load, `qwen3moe quantize`,
sharded parallel loading) reads an FP8 folder as the float folder it encodes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from qwen3moe.io.safetensors_io import CheckpointError, SafetensorsFile

SCALE_SUFFIX = "_scale_inv"  # "<module>.weight" -> "<module>.weight_scale_inv"
SCALE_TAGS = ("F32", "BF16", "F16")
_STATIC_SCALES = (".input_scale", ".activation_scale")


@dataclass(frozen=True)
class Fp8Spec:
    block: tuple[int, int]  # (bm rows, bn input columns) per scale


def fp8_spec(directory: str) -> Fp8Spec | None:
    """The folder's fp8 quantization_config (config.json), checked; None when it has none."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            qc = json.load(fh).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # Qwen3MoeConfig.from_pretrained reports a broken config.json
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp8":
        return None
    where = f"{path}: quantization_config"
    if qc.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{where}.fmt {qc['fmt']!r} is not supported (only 'e4m3')")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise CheckpointError(f"{where}.activation_scheme {scheme!r} is not supported (only 'dynamic': "
                              f"the weights are dequantized at load, static input scales cannot take effect)")
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"{where}.weight_block_size {block!r} is not supported "
                              f"(expected [rows, cols] of positive integers, e.g. [128, 128])")
    if qc.get("scale_fmt", "float") != "float":
        raise CheckpointError(f"{where}.scale_fmt {qc['scale_fmt']!r} is not supported (only 'float')")
    for key in ("modules_to_not_convert", "ignored_layers"):
        names = qc.get(key)
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise CheckpointError(f"{where}.{key} must be a list of module names, got {names!r}")
    return Fp8Spec((block[0], block[1]))


def split_scales(directory: str, where: dict[str, SafetensorsFile]
                 ) -> tuple[Fp8Spec | None, dict[str, tuple[str, SafetensorsFile]]]:
    """(spec, {weight key: (scale key, its file)}) of a folder's tensors `where`, from which the
    scale tensors are removed; ({} when the folder holds no FP8 weight). Every inconsistency
    between config.json and the tensors is a one-line CheckpointError."""
    f8 = [k for k, st in where.items() if st.dtype(k) == "F8_E4M3"]
    scales = [k for k in where if k.endswith(SCALE_SUFFIX)]
    spec = fp8_spec(directory)
    if not f8 and not scales:
        if spec is not None:
            raise CheckpointError(f"{directory}: config.json quantization_config says fp8 but no tensor is F8_E4M3")
        return None, {}
    if spec is None:
        k = (f8 or scales)[0]
        raise CheckpointError(f"{where[k].path}: tensor {k!r} is an FP8 tensor but {directory}/config.json has no "
                              f"quantization_config with quant_method 'fp8'")
    static = [k for k in where if k.endswith(_STATIC_SCALES)]
    if static:
        raise CheckpointError(f"{where[static[0]].path}: tensor {static[0]!r}: static activation scales are not "
                              f"supported (activation_scheme 'dynamic' expected)")
    pairs = {k: _scale_of(directory, where, k, spec) for k in f8}
    for k in scales:
        w = k[:-len(SCALE_SUFFIX)]
        if w not in pairs:
            got = f"is {where[w].dtype(w)}" if w in where else "is missing"
            raise CheckpointError(f"{where[k].path}: tensor {k!r} scales {w!r}, which {got} "
                                  f"(expected an F8_E4M3 weight)")
        del where[k]
    return spec, pairs


def _scale_of(directory: str, where: dict[str, SafetensorsFile], key: str, spec: Fp8Spec):
    st = where[key]
    shape = st.shape(key)
    if not key.endswith(".weight") or len(shape) != 2:
        raise CheckpointError(f"{st.path}: F8_E4M3 tensor {key!r} {list(shape)}: expected a 2-D "
                              f"'<module>.weight' with block scales (the per-expert FP8 layout)")
    skey = key + SCALE_SUFFIX
    if skey not in where:
        raise CheckpointError(f"{directory}: missing tensor {skey!r} (block scales of the F8_E4M3 weight {key!r})")
    sst = where[skey]
    (O, I), (bm, bn) = shape, spec.block
    want = [-(-O // bm), -(-I // bn)]
    if list(sst.shape(skey)) != want or sst.dtype(skey) not in SCALE_TAGS:
        raise CheckpointError(f"{sst.path}: tensor {skey!r} is {sst.dtype(skey)} {list(sst.shape(skey))}, expected "
                              f"{'/'.join(SCALE_TAGS)} {want} for {key!r} {[O, I]} with quantization_config."
                              f"weight_block_size {[bm, bn]}")
    return skey, sst


def apply_scales(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], row0: int = 0,
                 col0: int = 0) -> np.ndarray:
    """w [R, C] float32: rows row0.. and columns col0.. of an FP8 weight's decoded values, scaled
    in place by their blocks' scale_inv [SR, SC]: one float32 multiply per value (what
    `q.float() * s.float()` computes), one block row at a time (no [R, C] scale temporary)."""
    bm, bn = block
    R, C = w.shape
    if not w.size:
        return w
    col_block = (col0 + np.arange(C)) // bn
    for b in range(row0 // bm, (row0 + R - 1) // bm + 1):
        r0, r1 = max(b * bm - row0, 0), min((b + 1) * bm - row0, R)
        w[r0:r1] *= scale_inv[b, col_block]
    return w
