"""Quantize-on-load for a rank model (parallelize.py with `quantization=`): each QuantizedWeight
cell is filled from the rank's float slice of its weight, read as a float rank model reads it
(ranks.read_slice: checkpoint.ShardReader preads only the slice), then quantized here
(layers/quant.quantize, io/quantized.fill_cell). The quantized tensors are split as the float
weight is (ShardInfo of the float name): column / vocab rows of qweight, scales and qzeros are
the rows of the whole tensor's; a row-parallel slice (input columns) gives the whole tensor's
groups when the group size divides the per-rank input dimension (check_quantized_layout).
Shapes: E experts, O out-features, I in-features.
"""
from __future__ import annotations

from qwen3moe.io.quantized import empty_arrays, fill_cell, quantize_rows
from qwen3moe.layers.quant import QuantizationConfig, QuantizationError, QuantizedWeight, quantize
from qwen3moe.parallel.mesh import Mesh
from qwen3moe.parallel.ranks import ShardInfo, checked, expert_slices, row_blocks


def native_name(qweight_name: str) -> str:
    """The float weight a quantized cell holds, by the name of its qweight: a linear's
    "...q_proj.qweight" -> "...q_proj.weight", an expert stack's "...experts.gate_up_proj.qweight"
    -> "...experts.gate_up_proj" (io/quantized.quantized_cells' names)."""
    base = qweight_name[:-len(".qweight")]
    return base if ".experts." in base else f"{base}.weight"


def check_quantized_layout(cfg, mesh: Mesh, qc: QuantizationConfig) -> None:
    """Each rank quantizes its own slice of a row-parallel projection (o_proj, down_proj: input
    dim split), so the group size must divide the per-rank input dimension: then the rank's
    groups are those of the whole tensor. A per-channel (-1) scale of such a slice is per output
    channel of the rank's input columns (the groups of the whole tensor quantized with group size
    in / tp)."""
    if qc.group_size == -1:
        return
    tp, etp, attn = mesh.tp, mesh.expert_tp, cfg.num_attention_heads * cfg.head_dim
    dims = [("self_attn.o_proj", attn, tp, "tp", "num_attention_heads*head_dim")]
    if any(not cfg.is_sparse_layer(i) for i in range(cfg.num_hidden_layers)):
        dims.append(("mlp.down_proj", cfg.intermediate_size, tp, "tp", "intermediate_size"))
    if cfg.num_experts:
        dims.append(("mlp.experts.down_proj", cfg.moe_intermediate_size, etp, "etp", "moe_intermediate_size"))
    for what, n, d, axis, name in dims:
        if (n // d) % qc.group_size:
            raise QuantizationError(f"quantization group_size {qc.group_size} does not divide the per-rank input "
                                    f"dimension {n // d} of {what} ({name} {n} / {axis} {d}); use a group size "
                                    f"dividing it, or -1 (per channel)")


def quantize_shard(cell: QuantizedWeight, info: ShardInfo, cfg, get, who: str) -> None:
    """Quantize the rank's float slice of `info.name` into `cell`: a linear in row blocks
    (io/quantized.quantize_rows: bounded quantizer temporaries; ranks.row_blocks: read in blocks
    where the split allows), an expert stack one expert at a time (ranks.expert_slices: the float
    transient is one expert's slice)."""
    shape = (*cell.qweight.shape[:-1], cell.in_features)
    if len(shape) == 2:
        quantize_rows(cell, row_blocks(info, cfg, get, shape, who))
        return
    q, s, z = empty_arrays(cell)
    for j, arr in enumerate(expert_slices(info, cfg, get, shape[0])):
        q[j], s[j], z[j] = quantize(checked(arr, (1, *shape[1:]), info, who)[0], cell.bits, cell.group_size)
    fill_cell(cell, q, s, z)
