"""Loading into a quantized model: quantize a float (bf16/fp32) HF folder tensor by tensor, or
read a GPTQ folder's packed tensors (io/gptq.py), into the QuantizedWeight cells.

Shapes: E experts, O out-features, I in-features, P packed bytes per row, G groups per row.
Peak memory: the quantized model plus one source tensor in float32 (a single expert's
projection for per-expert folders; the whole [E, 2I, H] stack only for fused-layout folders)
and the quantized arrays of the cell being filled. The float model is never built.
"""
from __future__ import annotations

import numpy as np

from qwen3moe.io.hf_checkpoint import (EXPERT_KEY_MAP, ROW_BLOCK_ELEMENTS, CheckpointSource, check_unexpected,
                                       load_param, native_sources, read_native, read_weight)
from qwen3moe.io.safetensors_io import CheckpointError
from qwen3moe.kernels.quant import packed_width
from qwen3moe.layers.quant import QuantizationConfig, QuantizedWeight, quantize


def quantized_cells(model) -> dict[str, QuantizedWeight]:
    """Native weight name -> its QuantizedWeight cell ("...q_proj.weight" for a linear, the fused
    expert name "...experts.gate_up_proj" for a stack)."""
    out = {}
    for name, cell in model.cells_and_names():
        if isinstance(cell, QuantizedWeight):
            out[name if name.endswith(tuple(EXPERT_KEY_MAP)) and ".experts." in name else f"{name}.weight"] = cell
    return out


def fill_cell(cell: QuantizedWeight, qweight: np.ndarray, scales: np.ndarray, qzeros: np.ndarray,
              g_idx: np.ndarray | None = None, perm: np.ndarray | None = None) -> None:
    """Set a cell's tensors (shapes checked by the callers against the cell's); an act-order
    cell's perm defaults to the identity (plain groups)."""
    from mindspore import Tensor

    cell.qweight.set_data(Tensor.from_numpy(np.ascontiguousarray(qweight, np.uint8)))
    cell.scales.set_data(Tensor.from_numpy(np.ascontiguousarray(scales, np.float16)))
    cell.qzeros.set_data(Tensor.from_numpy(np.ascontiguousarray(qzeros, np.uint8)))
    if cell.g_idx is not None:
        G = cell.scales.shape[-1]
        default = np.repeat(np.arange(G, dtype=np.int32), cell.in_features // G)
        g = np.broadcast_to(default if g_idx is None else g_idx, tuple(cell.g_idx.shape))
        cell.g_idx.set_data(Tensor.from_numpy(np.ascontiguousarray(g, np.int32)))
    if cell.perm is not None:
        p = np.broadcast_to(np.arange(cell.in_features, dtype=np.int32) if perm is None else perm,
                            tuple(cell.perm.shape))
        cell.perm.set_data(Tensor.from_numpy(np.ascontiguousarray(p, np.int32)))


def empty_arrays(cell: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uninitialised (qweight, scales, qzeros) arrays of the cell's shapes, to fill and fill_cell."""
    return (np.empty(tuple(cell.qweight.shape), np.uint8), np.empty(tuple(cell.scales.shape), np.float16),
            np.empty(tuple(cell.qzeros.shape), np.uint8))


def quantize_cell(src: CheckpointSource, name: str, cell: QuantizedWeight, num_experts: int) -> list[str]:
    """Read the float weight(s) behind native `name`, quantize into `cell`; returns the keys used."""
    shape = (*cell.qweight.shape[:-1], cell.in_features)
    keys = native_sources(name, num_experts, set(src.where))
    if len(keys) == 1 and len(shape) == 2 and keys[0] in src.where and src.shape(keys[0]) == shape:
        _quantize_rows(src, keys[0], cell)  # a linear (the lm_head is 311M weights): by row blocks
        return keys
    if len(keys) == 1:  # a fused-layout expert stack, or a mismatch read_native reports
        fill_cell(cell, *quantize(read_native(src, name, shape, num_experts), cell.bits, cell.group_size))
        return keys
    q, s, z = empty_arrays(cell)
    per = len(keys) // num_experts
    rows = shape[1] // per
    for i, k in enumerate(keys):  # one expert projection at a time
        if k not in src.where:
            raise CheckpointError(f"{src.directory}: missing tensor {k!r} (needed for {name})")
        part = read_weight(src, k)
        if tuple(part.shape) != (rows, shape[2]):
            raise CheckpointError(f"{src.file_of(k)}: tensor {k!r} has shape {list(part.shape)}, "
                                  f"expected {[rows, shape[2]]} for {name}")
        j, r = divmod(i, per)
        sl = slice(r * rows, (r + 1) * rows)
        q[j, sl], s[j, sl], z[j, sl] = quantize(part, cell.bits, cell.group_size)
    fill_cell(cell, q, s, z)
    return keys


def quantize_rows(cell: QuantizedWeight, blocks, columns: slice | None = None) -> None:
    """Quantize a linear's float rows into `cell`: `blocks` yields (first row, float32 [n, I]
    block) pairs covering the O rows; each block is quantized ROW_BLOCK_ELEMENTS values at a
    time (bounded quantizer temporaries: the lm_head is 311M weights). `columns`: the blocks hold
    whole rows of a weight of which the cell keeps these input columns, quantized per channel
    (one scale / zero per whole row, kept whole; qweight: the columns' packed bytes: int8 / int4
    with bounds on a byte boundary, _column_bytes)."""
    q, s, z = empty_arrays(cell)
    keep = slice(None) if columns is None else _column_bytes(cell, columns)
    for b0, block in blocks:
        g = cell.group_size if columns is None else block.shape[1]
        step = max(1, ROW_BLOCK_ELEMENTS // block.shape[1])
        for r0 in range(0, block.shape[0], step):
            rows = slice(b0 + r0, b0 + min(r0 + step, block.shape[0]))
            packed, s[rows], z[rows] = quantize(block[r0:r0 + step], cell.bits, g)
            q[rows] = packed[:, keep]
    fill_cell(cell, q, s, z)


def _column_bytes(cell: QuantizedWeight, columns: slice) -> slice:
    """The packed bytes of input `columns` (cell.in_features of them) in a whole packed row: int8 /
    int4 rows store the inputs in column order, one or two a byte, so bounds on a byte boundary
    (even ones for int4) cut whole bytes; a 6-bit row spreads each input over two planes
    (layers/quant.pack), so no byte range holds just some columns."""
    where = f"quantize_rows: {cell.qweight.name} ({cell.bits} bits)"
    if cell.bits not in (4, 8):
        raise ValueError(f"{where}: columns need 4 or 8 bits (a {cell.bits}-bit row is not stored column by column)")
    a, b = columns.start, columns.stop
    ints = isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer))
    if (columns.step not in (None, 1) or not ints or a < 0 or b - a != cell.in_features
            or a * cell.bits % 8 or b * cell.bits % 8):
        raise ValueError(f"{where}: columns {a}:{b} must be the cell's {cell.in_features} inputs with bounds "
                         f"on a byte boundary (even for 4 bits)")
    return slice(packed_width(a, cell.bits), packed_width(b, cell.bits))


def _quantize_rows(src: CheckpointSource, key: str, cell: QuantizedWeight) -> None:
    from qwen3moe.io.safetensors_io import FLOAT_TAGS, check_finite

    st = src.where[key]
    if st.dtype(key) not in FLOAT_TAGS:
        raise CheckpointError(f"{st.path}: tensor {key!r} has dtype {st.dtype(key)}, expected a floating-point "
                              f"weight ({', '.join(FLOAT_TAGS)})")
    O, step = cell.out_features, max(1, ROW_BLOCK_ELEMENTS // cell.in_features)

    def blocks():
        for r0 in range(0, O, step):
            part = src.read(key, rows=(r0, min(O, r0 + step)))
            check_finite(part, key, st.path)
            yield r0, part

    quantize_rows(cell, blocks())


def load_quantizing(cls, directory: str, config, qc: QuantizationConfig, param_dtype):
    """from_pretrained(..., quantization=...) on a float folder."""
    from qwen3moe.layers.dtypes import skip_init

    src = CheckpointSource(directory)
    with skip_init():
        model = cls(config, param_dtype=param_dtype, quantization=qc)
    cells = quantized_cells(model)
    owned = {id(p) for c in cells.values() for p in c.get_parameters()}
    used: set[str] = set()
    for name, cell in cells.items():
        used.update(quantize_cell(src, name, cell, config.num_experts))
    used.update(load_plain(src, model, owned, config))
    check_unexpected(src, used, config)
    model.source_dir = directory
    return model


def load_plain(src: CheckpointSource, model, skip: set[int], config) -> set[str]:
    """The unquantized Parameters (embeddings, norms, router, a float lm_head)."""
    used: set[str] = set()
    for p in model.get_parameters():
        if id(p) in skip:
            continue
        load_param(src, p, config.num_experts)
        used.update(native_sources(p.name, config.num_experts, set(src.where)))
    return used

