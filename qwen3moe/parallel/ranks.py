"""Per-rank shards of a model: one Cell per (pipeline stage, stage-local rank) holding exactly
the slices `plans.py` assigns, built from the unmodified layer classes with per-rank sizes.

Each shard Parameter remembers its HF name, its split (style over tp or etp, expert block over
ep) and the group over which its gradient is summed:
    "dp"    dense weights replicated across data-parallel ranks
    "stage" replicated over tp too but with partial gradients there: the router (each tp rank
            routes its own 1/tp of the tokens: sequence-parallel MoE input, as Megatron requires
            for MoE with tp > 1) and q/k norm (each tp rank normalises its own heads); with
            sequence parallel also the layer and final norms (each tp rank's own tokens)
    "edp"   expert shards, replicated over the expert-data-parallel group
    "kv<r>" k/v projections when tp > K: each kv head replicated over r = tp/K tp ranks (vLLM),
            each with the gradient of its own q heads only: summed over those ranks and dp
Shapes: V vocab, H hidden, E experts, I expert ffn, F dense ffn, N/K query/kv heads, D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import initializer

from qwen3moe.io.hf_checkpoint import ROW_BLOCK_ELEMENTS, bf16_bits, store_param
from qwen3moe.layers.attention import Qwen3MoeAttention
from qwen3moe.layers.dtypes import BF16_BITS, skip_init
from qwen3moe.layers.experts import Qwen3MoeExperts
from qwen3moe.layers.mlp import Qwen3MoeMLP
from qwen3moe.layers.norm import RMSNorm
from qwen3moe.parallel.mesh import Mesh, MeshError
from qwen3moe.parallel.plans import TP_PLAN, shard_array, style_of
from qwen3moe.router.topk import TopKRouter


@dataclass(frozen=True)
class ShardInfo:
    name: str          # HF parameter name
    style: str         # split style over tp (or etp for experts); "replicate" when whole
    tp_rank: int
    tp_size: int
    ep_rank: int = 0   # expert block (experts only)
    ep_size: int = 1
    sync: str = "dp"   # gradient sum group (see module docstring)


def stage_layers(num_layers: int, pp: int, offset: list[int] | None = None) -> list[range]:
    """Contiguous layer ranges per stage: L // pp each plus offset[s] (MindSpore Transformers'
    `offset`; the remainder must be placed explicitly, so the counts sum to L)."""
    base = num_layers // pp
    offset = list(offset) if offset is not None else [0] * (pp - 1) + [num_layers - base * pp]
    if len(offset) != pp:
        raise MeshError(f"pipeline offset needs {pp} entries (one per stage), got {offset}")
    counts = [base + o for o in offset]
    if sum(counts) != num_layers or min(counts) < 1:
        raise MeshError(f"pipeline offset {offset} gives stage sizes {counts}; they must be >= 1 and "
                        f"sum to num_hidden_layers={num_layers}")
    starts = np.cumsum([0] + counts)
    return [range(int(starts[s]), int(starts[s + 1])) for s in range(pp)]


def shard_info(local: str, hf: str, mesh: Mesh, n: int, K: int) -> ShardInfo:
    tp_j = n % mesh.tp
    if K < mesh.tp and (".k_proj." in local or ".v_proj." in local):
        # vLLM: each kv head replicated r = tp/K times; the rank holds block j // r of K, and its
        # gradient is partial (its own q heads only): summed over the ranks sharing the head
        r = mesh.tp // K
        return ShardInfo(hf, style_of(hf, TP_PLAN), tp_j // r, K, sync=f"kv{r}")
    if ".experts." in local:
        g = n % (mesh.ep * mesh.expert_tp)
        return ShardInfo(hf, style_of(hf, TP_PLAN), g % mesh.expert_tp, mesh.expert_tp,
                         g // mesh.expert_tp, mesh.ep, "edp")
    # router: each tp rank routes its own tokens; q/k norm: each tp rank normalises its own heads;
    # sequence parallel: each tp rank applies the layer / final norms to its own tokens only
    partial = ".gate." in local or "_norm." in local or \
        (mesh.sp and ("layernorm." in local or local.startswith("norm.")))
    sync = "stage" if partial else "dp"
    return ShardInfo(hf, style_of(hf, TP_PLAN), tp_j, mesh.tp, sync=sync)


def slice_for(info: ShardInfo, full: np.ndarray) -> np.ndarray:
    """The rank's slice of an HF tensor (experts: ep block, then the etp style)."""
    arr = full
    if info.ep_size > 1:
        arr = shard_array(arr, "expert", info.ep_rank, info.ep_size)
    return shard_array(arr, info.style, info.tp_rank, info.tp_size)


def release_freed_heap() -> None:
    """glibc keeps the freed zero buffers and read temporaries of a layer mapped (its dynamic
    mmap threshold moves them to the heap); returning them after each layer keeps a rank's
    peak memory while loading near its shard. A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC = None


def read_slice(info: ShardInfo, cfg, get) -> np.ndarray:
    """The rank's slice of info.name as a fresh float32 array: `get(hf_name)` -> full array
    (sliced here), or `get.read_shard(info, cfg)` -> the slice only (checkpoint.ShardReader)."""
    if hasattr(get, "read_shard"):  # a fresh array per call: the Parameter may own it
        return np.ascontiguousarray(get.read_shard(info, cfg), np.float32)
    # a view of the caller's full array: copy, replicas must not share memory
    return np.array(slice_for(info, get(info.name)), np.float32, order="C", copy=True)


def checked(arr: np.ndarray, want: tuple, info: ShardInfo, who: str) -> np.ndarray:
    if tuple(arr.shape) != tuple(want):
        raise ValueError(f"{info.name}: shard of shape {list(arr.shape)} for {who}, expected {list(want)}")
    return arr


def expert_slices(info: ShardInfo, cfg, get, count: int):
    """The rank's slice of an expert stack one expert at a time ([1, ...] float32 each): expert
    lo + j of the whole E is the "expert" split of E ways at that index, so the reader opens
    only that expert (a whole [E/ep, 2I, H] float32 stack would be the load's peak)."""
    lo = info.ep_rank * (cfg.num_experts // info.ep_size)
    for j in range(count):
        yield read_slice(replace(info, ep_rank=lo + j, ep_size=cfg.num_experts), cfg, get)


def row_blocks(info: ShardInfo, cfg, get, shape: tuple, who: str):
    """A 2-D slice's rows in blocks of at most ROW_BLOCK_ELEMENTS float32 values: (first row,
    block) pairs. A dim-0 split ("vocab" / "column": the embedding, lm_head, q/k/v) of block b of
    k within rank t of T is the same split at position t*k + b of T*k, so the reader preads
    only that block (the float32 transient of a [V/tp, H] slice is one block). Other styles, or
    rows with no such divisor: the whole slice in one read."""
    rows, cols = shape
    k = next((k for k in range(1, min(rows, 4096) + 1) if rows % k == 0 and rows // k * cols <= ROW_BLOCK_ELEMENTS),
             1) if info.style in ("vocab", "column") else 1
    if k == 1:
        yield 0, checked(read_slice(info, cfg, get), shape, info, who)
        return
    n = rows // k
    for b in range(k):
        part = replace(info, tp_rank=info.tp_rank * k + b, tp_size=info.tp_size * k)
        yield b * n, checked(read_slice(part, cfg, get), (n, cols), info, who)


def load_shard(p: Parameter, info: ShardInfo, cfg, get, who: str) -> None:
    """Fill p with the rank's slice of info.name (read_slice), in p's storage dtype (float32 as
    read; bf16 / bf16 bits rounded from float32 slices, an expert stack one expert at a time)."""
    shape = tuple(p.shape)
    if p.dtype in (BF16_BITS, ms.bfloat16):
        if ".experts." in info.name and len(shape) == 3:
            bits = np.empty(shape, np.uint16)
            for j, arr in enumerate(expert_slices(info, cfg, get, shape[0])):
                bits[j] = bf16_bits(checked(arr, (1, *shape[1:]), info, who)[0])
        elif len(shape) == 2:
            bits = np.empty(shape, np.uint16)
            for r0, arr in row_blocks(info, cfg, get, shape, who):
                bits[r0:r0 + arr.shape[0]] = bf16_bits(arr)
        else:
            bits = bf16_bits(checked(read_slice(info, cfg, get), shape, info, who))
        t = Tensor.from_numpy(bits)
        p.set_data(t if p.dtype == BF16_BITS else t.view(ms.bfloat16))
        return
    arr = checked(read_slice(info, cfg, get), shape, info, who)
    if p.dtype == ms.float32:
        p.set_data(Tensor.from_numpy(arr))  # no second copy: peak RSS of a load ~ the shard
    else:
        store_param(p, arr)


def unsplit(parts: list[np.ndarray], style: str) -> np.ndarray:
    """Inverse of shard_array over ranks 0..len(parts)-1."""
    if len(parts) == 1 or style == "replicate":
        return parts[0]
    if style == "gate_up":
        h = parts[0].shape[1] // 2
        return np.concatenate([np.concatenate([p[:, :h] for p in parts], 1),
                               np.concatenate([p[:, h:] for p in parts], 1)], 1)
    axis = {"column": 0, "vocab": 0, "expert": 0, "row": 1, "expert_row": 2}[style]
    return np.concatenate(parts, axis)


def assemble(items: list[tuple[ShardInfo, np.ndarray]]) -> dict[str, np.ndarray]:
    """Full HF tensors from shards of one replica (one array per distinct shard position)."""
    by_name: dict[str, dict[tuple[int, int], np.ndarray]] = {}
    styles = {}
    for info, arr in items:
        by_name.setdefault(info.name, {}).setdefault((info.ep_rank, info.tp_rank), arr)
        styles[info.name] = (info.style, info.tp_size, info.ep_size)
    out = {}
    for name, parts in by_name.items():
        style, tps, eps = styles[name]
        blocks = [unsplit([parts[(e, t)] for t in range(tps)], style) for e in range(eps)]
        out[name] = unsplit(blocks, "expert")
    return out
