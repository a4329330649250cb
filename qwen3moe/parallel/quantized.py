"""Quantized rank models (parallelize.py with `quantization=`, or a GPTQ folder): the
QuantizedWeight cells hold exactly the rank's part of the whole tensor, split as the float
weight is (ShardInfo of the float name).

Quantize-on-load (quantize_shard): each cell is filled from the rank's float slice of its
weight, read as a float rank model reads it (ranks.read_slice: checkpoint.ShardReader preads
only the slice), then quantized (layers/quant.quantize, io/quantized.quantize_rows): column /
vocab rows of qweight, scales and qzeros are the rows of the whole tensor's; a row-parallel slice
(input columns) gives the whole tensor's groups when the group size divides the per-rank input
dimension (check_quantized_layout); per channel, the rank quantizes the whole rows and keeps its
columns (_quantize_whole_rows).
GPTQ folder (fill_gptq_shard): the stored tensors of a projection read into the in-memory
layout (io/gptq.fill_from_gptq, as one process reads them) and sliced: output rows with the
whole act-order g_idx; input columns with their packed bytes and the groups they use: their
block of whole groups (check_gptq_layout), per channel each row's one group, act-order their
slice of g_idx (group numbers kept) and all the row's groups (hold_row_groups).
Shapes: E experts, O out-features, I in-features, P packed bytes per row, G groups per row.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from qwen3moe.io.gptq import QUANT_KEYS, GptqSpec, fill_from_gptq
from qwen3moe.io.quantized import empty_arrays, fill_cell, quantize_rows
from qwen3moe.layers.quant import QuantizationConfig, QuantizationError, QuantizedWeight, quantize, use_group_maps
from qwen3moe.parallel.mesh import Mesh
from qwen3moe.parallel.ranks import ShardInfo, checked, expert_slices, row_blocks


def native_name(qweight_name: str) -> str:
    """The float weight a quantized cell holds, by the name of its qweight: a linear's
    "...q_proj.qweight" -> "...q_proj.weight", an expert stack's "...experts.gate_up_proj.qweight"
    -> "...experts.gate_up_proj" (io/quantized.quantized_cells' names)."""
    base = qweight_name[:-len(".qweight")]
    return base if ".experts." in base else f"{base}.weight"


def _row_parallel_dims(cfg, mesh: Mesh) -> list[tuple]:
    """(what, input dim, ranks splitting it, axis, config key) of each row-parallel projection."""
    tp, etp, attn = mesh.tp, mesh.expert_tp, cfg.num_attention_heads * cfg.head_dim
    dims = [("self_attn.o_proj", attn, tp, "tp", "num_attention_heads*head_dim")]
    if any(not cfg.is_sparse_layer(i) for i in range(cfg.num_hidden_layers)):
        dims.append(("mlp.down_proj", cfg.intermediate_size, tp, "tp", "intermediate_size"))
    if cfg.num_experts:
        dims.append(("mlp.experts.down_proj", cfg.moe_intermediate_size, etp, "etp", "moe_intermediate_size"))
    return dims


# csrc/quant_vnni.h chunk_inputs: the kernels take int8 activations for a quantized projection
# only when its input dimension is a multiple of this (act8_fits); other rows run float activations
ACT8_CHUNK_INPUTS = {8: 64, 4: 128}


def check_quantized_layout(cfg, mesh: Mesh, qc: QuantizationConfig) -> None:
    """Each rank quantizes its own slice of a row-parallel projection (o_proj, down_proj: input
    dim split), so the group size must divide the per-rank input dimension: then the rank's
    groups are those of the whole tensor. Per channel (-1): the rank quantizes the whole rows and
    keeps its columns (quantize_shard), so any split holds one process's scales. int8
    activations: check_act8_layout."""
    if qc.int8_activations:
        check_act8_layout(cfg, mesh, qc)
    if qc.group_size == -1:
        return
    for what, n, d, axis, name in _row_parallel_dims(cfg, mesh):
        if (n // d) % qc.group_size:
            raise QuantizationError(f"quantization group_size {qc.group_size} does not divide the per-rank input "
                                    f"dimension {n // d} of {what} ({name} {n} / {axis} {d}); use a group size "
                                    f"dividing it, or -1 (per channel)")


def check_act8_layout(cfg, mesh: Mesh, qc: QuantizationConfig) -> None:
    """int8 activations are quantized per row in blocks of 16 inputs, so a row-parallel slice
    whose width is a multiple of the kernels' chunk (ACT8_CHUNK_INPUTS, a multiple of 16) holds
    whole blocks of the whole row: a rank's integer sums are one process's, its partial output
    differs only in float32 summation order (as float activations under tp). A slice narrower
    than that of a projection whose whole row takes int8 activations would run float
    activations on the ranks: refused."""
    chunk = ACT8_CHUNK_INPUTS[qc.bits]
    for what, n, d, axis, name in _row_parallel_dims(cfg, mesh):
        if d > 1 and n % chunk == 0 and (n // d) % chunk:
            raise QuantizationError(f"the per-rank input dimension {n // d} of {what} ({name} {n} / {axis} {d}) is "
                                    f"not a multiple of {chunk}, the int{qc.bits} chunk of the int8-activation "
                                    f"kernels, so the ranks would run it with float activations where one process "
                                    f"runs int8; use {axis} 1 for it (ep, dp) or weight-only quantization")


def check_gptq_layout(cfg, mesh: Mesh, spec: GptqSpec, directory) -> None:
    """A GPTQ folder's row-parallel projection splits exactly when each rank's columns keep the
    groups they use: a group size dividing the per-rank input dimension (a block of whole groups;
    act-order: all groups, hold_row_groups), or per channel (-1: the one group of each row)."""
    g = spec.config.group_size
    for what, n, d, axis, name in _row_parallel_dims(cfg, mesh):
        if d > 1 and g != -1 and (n // d) % g:
            raise QuantizationError(f"{directory}: {spec.format.upper()} folder: its group_size {g} does not divide the per-rank input "
                                    f"dimension {n // d} of {what} ({name} {n} / {axis} {d}), so its groups cannot be "
                                    f"split exactly; use {axis} 1 (ep, pp, dp), or shard the float folder with "
                                    f"--quantize")


def hold_row_groups(model, cfg, mesh: Mesh, spec: GptqSpec | None) -> None:
    """An act-order GPTQ folder on ranks: every act-order cell holds its weights as stored, with
    their group maps (use_group_map; the composite path, as a row split cuts the sorted groups);
    each row-parallel cell (o_proj, dense down_proj over tp, the experts' down_proj over etp)
    holds all G groups of its whole rows, as its columns' g_idx may name any of them
    (QuantizedWeight.hold_groups; G * O scales and zeros more a rank). Call on the freshly built
    rank model, before its Parameters are named."""
    if spec is None or not spec.config.desc_act:
        return
    use_group_maps(model)
    if spec.config.group_size == -1:
        return  # per channel: the one group of each row
    split = {what: (n, d) for what, n, d, _, _ in _row_parallel_dims(cfg, mesh) if d > 1}
    for name, cell in model.cells_and_names():
        hit = next((w for w in split if name.endswith("." + w)), None)
        if isinstance(cell, QuantizedWeight) and hit is not None:
            cell.hold_groups(split[hit][0] // spec.config.group_size)


def fill_gptq_shard(cell: QuantizedWeight, info: ShardInfo, cfg, src, spec: GptqSpec) -> int:
    """Fill `cell` with the rank's slice of the GPTQ projection(s) behind the float weight
    `info.name` (src: the folder's CheckpointSource): each projection read whole into the
    in-memory layout (io/gptq.fill_from_gptq, as one process reads them; an expert stack one projection of one of this
    rank's experts at a time), then split as the float weight is (_split_gptq). Returns the
    bytes read."""
    lead = tuple(cell.qweight.shape[:-2])
    rows_split = info.style not in ("row", "expert_row")  # output rows (column, gate_up); else input columns
    if lead:
        base, kind = info.name.rsplit(".", 1)
        projs = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
        lo = info.ep_rank * (cfg.num_experts // info.ep_size)
        prefixes = [f"{base}.{lo + j}.{p}" for j in range(lead[0]) for p in projs]
    else:
        projs, prefixes = ("",), [info.name[:-len(".weight")]]
    T, rows, I = info.tp_size, cell.out_features // len(projs), cell.in_features
    full = (rows * T, I) if rows_split else (rows, I * T)
    fill_from_gptq(src, cell, prefixes, spec, full, lambda whole: _split_gptq(whole, rows_split, info.tp_rank, T))
    return sum(int(np.prod(src.shape(n), dtype=np.int64)) * (2 if src.dtype(n) == "F16" else 4)
               for p in prefixes for n in (f"{p}.{k}" for k in QUANT_KEYS) if n in src.where)


def _split_gptq(whole: tuple, rows_split: bool, t: int, T: int) -> tuple:
    """Rank t of T's part of one projection (qweight [O, P], scales / qzeros [O, G], g_idx [I] or
    None): output rows with the whole map; or input columns, their packed bytes and the groups
    they use: with an act-order map, its columns (group numbers kept) and all G groups (any
    column may name any: hold_row_groups); per channel the one group of each row; plain groups
    their block of G / T."""
    q, s, z, g_idx = whole
    if T == 1:
        return whole
    if rows_split:
        rows = slice(t * (q.shape[0] // T), (t + 1) * (q.shape[0] // T))
        return q[rows], s[rows], z[rows], g_idx
    P = q.shape[1] // T
    cols = q[:, t * P:(t + 1) * P]
    if g_idx is not None:
        n = g_idx.shape[0] // T
        return cols, s, z, g_idx[t * n:(t + 1) * n]
    if s.shape[1] == 1:
        return cols, s, z, None
    G = s.shape[1] // T
    return cols, s[:, t * G:(t + 1) * G], z[:, t * G:(t + 1) * G], None


def quantize_shard(cell: QuantizedWeight, info: ShardInfo, cfg, get, who: str, per_channel: bool = False) -> None:
    """Quantize the rank's float slice of `info.name` into `cell`: a linear in row blocks
    (io/quantized.quantize_rows: bounded quantizer temporaries; ranks.row_blocks: read in blocks
    where the split allows), an expert stack one expert at a time (ranks.expert_slices: the float
    transient is one expert's slice). per_channel (group_size -1) on a row-parallel slice: the
    whole rows are quantized, as one process does (_quantize_whole_rows)."""
    shape = (*cell.qweight.shape[:-1], cell.in_features)
    if per_channel and info.style in ("row", "expert_row") and info.tp_size > 1:
        _quantize_whole_rows(cell, info, cfg, get, shape, who)
        return
    if len(shape) == 2:
        quantize_rows(cell, row_blocks(info, cfg, get, shape, who))
        return
    q, s, z = empty_arrays(cell)
    for j, arr in enumerate(expert_slices(info, cfg, get, shape[0])):
        q[j], s[j], z[j] = quantize(checked(arr, (1, *shape[1:]), info, who)[0], cell.bits, cell.group_size)
    fill_cell(cell, q, s, z)


def _quantize_whole_rows(cell: QuantizedWeight, info: ShardInfo, cfg, get, shape: tuple, who: str) -> None:
    """A per-channel row-parallel slice (input columns t of T): one scale / zero per output row of
    the WHOLE row, as one process quantizes it. The unsplit weight is read in row blocks (a
    linear: the "column" split of its rows, ranks.row_blocks) or one expert at a time, quantized
    per whole row, and the rank keeps its columns' packed bytes and the rows' scales / zeros."""
    t, T = info.tp_rank, info.tp_size
    whole = replace(info, tp_rank=0, tp_size=1)
    cols = slice(t * shape[-1], (t + 1) * shape[-1])
    if len(shape) == 2:
        quantize_rows(cell, row_blocks(replace(whole, style="column"), cfg, get, (shape[0], shape[1] * T), who),
                      cols)
        return
    q, s, z = empty_arrays(cell)
    P = q.shape[-1]
    for j, arr in enumerate(expert_slices(whole, cfg, get, shape[0])):
        w = checked(arr, (1, shape[1], shape[2] * T), info, who)[0]
        packed, s[j], z[j] = quantize(w, cell.bits, w.shape[-1])
        q[j] = packed[:, t * P:(t + 1) * P]
    fill_cell(cell, q, s, z)
