"""AWQ folders (AutoAWQ "GEMM" format, also what transformers / vLLM read as quant_method "awq"):
their packed tensors converted exactly into the in-memory int4 layout of layers/quant.py
(asymmetric, contiguous groups: QuantizationConfig(4, g, sym=False)), so they run on the
same kernels as GPTQ folders (io/gptq.py holds the loader; this module the format).

Shapes: O out-features, I in-features, g group size, G = I // g groups, C = O // 8 words a row.
On disk, per projection `<prefix>.{qweight,qzeros,scales}` (no g_idx: groups are contiguous):
  qweight int32 [I, C]: word [k, c] holds inputs k of the 8 outputs 8c..8c+7, packed along the
          OUTPUT dim in AWQ's interleaved order: bits 4i..4i+3 (slot i) hold output
          8c + AWQ_ORDER[i], AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7);
  qzeros  int32 [G, C]: the zero points, packed the same way (stored as is, no "minus one");
  scales  float16 [G, O].
  W[o, k] = (q[k, o] - z[k // g, o]) * scales[k // g, o]
Sources: AutoAWQ awq/modules/linear/gemm.py (WQLinear_GEMM.from_linear packs with order_map
[0, 2, 4, 6, 1, 3, 5, 7]; qweight [I, O // 8], qzeros [G, O // 8], scales [G, O]) and
awq/utils/packing_utils.py (dequantize_gemm: unpack, AWQ_REVERSE_ORDER, (q - z) * s); vLLM
model_executor/layers/quantization/awq_triton.py (awq_dequantize_kernel: the same shifts and
reverse order, (iweights - zeros) * scales). AutoAWQ's zero_point false (symmetric) produces no
zeros, which WQLinear_GEMM.from_linear asserts against: such folders are refused here.
"""
from __future__ import annotations

import numpy as np

from qwen3moe.io.safetensors_io import CheckpointError
from qwen3moe.layers.quant import GROUP_SIZES, QuantizationConfig

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # slot i of a word holds output 8c + AWQ_ORDER[i]
AWQ_KEYS = ("qweight", "qzeros", "scales")
# transformers' AwqConfig runtime settings (fusing, kernel backend): no effect on the stored tensors
_RUNTIME_KEYS = ("backend", "do_fuse", "fuse_max_seq_len", "modules_to_fuse", "exllama_config")
_FORMAT_KEYS = ("quant_method", "bits", "group_size", "zero_point", "version", "modules_to_not_convert")


def awq_config(qc: dict, where: str, config) -> QuantizationConfig:
    """An AWQ quantization_config checked: the QuantizationConfig of its projections."""
    for key in qc:
        if key not in _FORMAT_KEYS + _RUNTIME_KEYS:
            raise CheckpointError(f"{where}: quantization_config.{key} = {qc[key]!r} is not supported in an AWQ "
                                  f"folder (known keys: {', '.join(_FORMAT_KEYS)})")
    version = qc.get("version", "gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        raise CheckpointError(f"{where}: quantization_config.version {version!r} is not supported (only AWQ 'gemm' "
                              f"packing)")
    bits, g = qc.get("bits"), qc.get("group_size", 128)
    if bits != 4:
        raise CheckpointError(f"{where}: quantization_config.bits {bits!r} is not supported in an AWQ folder (4)")
    if g not in GROUP_SIZES:
        raise CheckpointError(f"{where}: quantization_config.group_size {g!r} is not supported "
                              f"(one of {GROUP_SIZES})")
    if qc.get("zero_point", True) is not True:
        raise CheckpointError(f"{where}: quantization_config.zero_point {qc['zero_point']!r} is not supported "
                              f"(AWQ 'gemm' folders store zero points: zero_point true)")
    _check_not_converted(qc.get("modules_to_not_convert"), where, config)
    return QuantizationConfig(4, g, sym=False)


def projection_names(config) -> list[str]:
    """The module names of the projections a quantized model quantizes (HF names)."""
    names = []
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkvo"]
        mlp = (f"mlp.experts.{j}" for j in range(config.num_experts)) if config.is_sparse_layer(i) else ("mlp",)
        names += [f"model.layers.{i}.{m}.{p}" for m in mlp for p in ("gate_proj", "up_proj", "down_proj")]
    return names


def _check_not_converted(modules, where: str, config) -> None:
    """modules_to_not_convert: AutoAWQ skips every linear whose name contains an entry (a
    substring match), so an entry matching a projection we quantize means float tensors among
    packed ones, which the model cannot hold; entries naming only float modules (the router
    `mlp.gate`, lm_head) are what the model keeps float anyway."""
    if modules is None:
        return
    if not (isinstance(modules, list) and all(isinstance(m, str) and m for m in modules)):
        raise CheckpointError(f"{where}: quantization_config.modules_to_not_convert must be null or a list of "
                              f"module names, got {modules!r}")
    names = projection_names(config)
    for m in modules:
        hit = next((n for n in names if m in n), None)
        if hit is not None:
            raise CheckpointError(f"{where}: quantization_config.modules_to_not_convert entry {m!r} keeps {hit} "
                                  f"in float; mixed float / quantized projections are not supported")


def read_awq(src, prefix: str, out_features: int, in_features: int, spec):
    """One projection's AWQ tensors -> (qweight [O, I // 2] u8, scales [O, G] f16,
    qzeros [O, G] u8, None): the in-memory layout, the same values (no re-quantizing)."""
    O, I = out_features, in_features
    g = I if spec.config.group_size == -1 else spec.config.group_size
    if I % g or I % 2 or O % 8:
        raise CheckpointError(f"{src.directory}: {prefix} [{O}, {I}] cannot be AWQ-packed with group_size {g} "
                              f"(needs O % 8 == 0, an even I and I % group_size == 0)")
    G, C = I // g, O // 8
    want = {"qweight": ([I, C], "I32"), "qzeros": ([G, C], "I32"), "scales": ([G, O], "F16")}
    arrays = {}
    for key, (shape, tag) in want.items():
        name = f"{prefix}.{key}"
        if name not in src.where:
            raise CheckpointError(f"{src.directory}: missing tensor {name} (AWQ 4-bit folder)")
        st = src.where[name]
        if list(st.shape(name)) != shape or st.dtype(name) != tag:
            raise CheckpointError(f"{st.path}: tensor {name!r} is {st.dtype(name)} {list(st.shape(name))}, "
                                  f"expected {tag} {shape}")
        arrays[key] = src.read(name)
    return (awq_qweight(arrays["qweight"]), np.ascontiguousarray(arrays["scales"].T, np.float16),
            np.ascontiguousarray(awq_unpack(arrays["qzeros"]).T), None)


# slot of output j within its word: the inverse permutation of AWQ_ORDER
_SLOT_OF = np.argsort(AWQ_ORDER)


def awq_unpack(words: np.ndarray) -> np.ndarray:
    """int32 [R, C] AWQ words -> u8 [R, 8C] values in output order."""
    w = np.ascontiguousarray(words, np.int32).view(np.uint32)
    slots = (w[:, :, None] >> (np.arange(8, dtype=np.uint32) * 4)) & np.uint32(15)  # [R, C, 8] by slot
    return slots[:, :, _SLOT_OF].reshape(w.shape[0], -1).astype(np.uint8)


# the nibble-merged words below: byte m of the first holds slot 2m, of the second slot 2m + 1
_FIRST_COLUMNS = tuple(AWQ_ORDER[2 * m] for m in range(4))
_SECOND_COLUMNS = tuple(AWQ_ORDER[2 * m + 1] for m in range(4))


def awq_qweight(qweight: np.ndarray) -> np.ndarray:
    """AWQ qweight int32 [I, C] -> in-memory u8 [O, I // 2] (input 2p in the low nibble of byte p,
    2p + 1 in the high). The words are transposed first ([C, I]: 4 bytes an element, cheaper
    than a byte transpose), inputs 2p and 2p + 1 merged nibble-wise a word at a time (each byte
    then holds one output's two inputs), and each byte written to its output's row."""
    w = np.ascontiguousarray(np.ascontiguousarray(qweight, np.int32).view(np.uint32).T)  # [C, I]
    C, I = w.shape
    even, odd = w[:, 0::2], w[:, 1::2]
    low = np.uint32(0x0F0F0F0F)
    first = (even & low) | ((odd & low) << np.uint32(4))       # slots 0, 2, 4, 6
    second = ((even >> np.uint32(4)) & low) | (odd & ~low)     # slots 1, 3, 5, 7
    out = np.empty((C, 8, I // 2), np.uint8)
    for m in range(4):  # the assignment keeps the low byte (unsafe cast, as intended)
        out[:, _FIRST_COLUMNS[m], :] = first >> np.uint32(8 * m)
        out[:, _SECOND_COLUMNS[m], :] = second >> np.uint32(8 * m)
    return out.reshape(C * 8, I // 2)
