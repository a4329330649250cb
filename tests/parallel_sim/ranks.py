"""The simulation's per-rank shard cells (test harness): one Cell per (pipeline stage,
stage-local rank) holding exactly the slices `qwen3moe.parallel.plans` assigns, built from the
unmodified layer classes with per-rank sizes, for the engine's own forward (engine.py).
ShardInfo, shard_info and load_shard are the library's (qwen3moe.parallel.ranks), so these
shards are parallelize.py's (tests/test_parallelize.py checks it parameter by parameter).
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import initializer

from qwen3moe.layers.attention import Qwen3MoeAttention
from qwen3moe.layers.dtypes import skip_init
from qwen3moe.layers.experts import Qwen3MoeExperts
from qwen3moe.layers.mlp import Qwen3MoeMLP
from qwen3moe.layers.norm import RMSNorm
from qwen3moe.parallel.mesh import Mesh
from qwen3moe.parallel.ranks import ShardInfo, load_shard, release_freed_heap, shard_info
from qwen3moe.router.topk import TopKRouter


class RankLayer(nn.Cell):
    def __init__(self, cfg, sparse: bool, mesh: Mesh) -> None:
        super().__init__()
        c, tp = cfg, mesh.tp
        self.is_sparse = sparse
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Qwen3MoeAttention(c.hidden_size, c.num_attention_heads // tp,
                                           mesh.kv_heads_per_rank(c.num_key_value_heads), c.head_dim,
                                           c.rms_norm_eps, c.attention_bias)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if sparse:
            self.gate = TopKRouter(c.hidden_size, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob)
            self.experts = Qwen3MoeExperts(c.num_experts // mesh.ep, c.hidden_size,
                                           c.moe_intermediate_size // mesh.expert_tp)
        else:
            self.mlp = Qwen3MoeMLP(c.hidden_size, c.intermediate_size // tp)


class RankStage(nn.Cell):
    """What one rank of one pipeline stage holds. `load(stage, prefix, cell)`, when given, fills
    each layer's shards as soon as it is built, so the zero buffers it is created with are
    freed (and reused by the next layer) instead of all being alive at once: a rank's peak
    memory while loading stays near its shard."""

    def __init__(self, cfg, mesh: Mesh, layers: range, first: bool, last: bool, load=None) -> None:
        super().__init__()
        V, H = cfg.vocab_size, cfg.hidden_size
        self.layer_ids = list(layers)
        self.first, self.last = first, last
        built = []
        with skip_init():
            for j, i in enumerate(layers):
                built.append(RankLayer(cfg, cfg.is_sparse_layer(i), mesh))
                if load is not None:
                    load(self, f"layers.{j}.", built[-1])
            self.layers = nn.CellList(built)
            if last:
                self.norm = RMSNorm(H, cfg.rms_norm_eps)
        if first:
            self.embed = _vocab_param("embed", (V // mesh.tp, H), lazy=load is not None)
        if last:
            self.lm_head = _vocab_param("lm_head", (V // mesh.tp, H), lazy=load is not None)


def _vocab_param(name: str, shape: tuple, lazy: bool) -> Parameter:
    """The largest shards: with a loader they get no buffer of their own before the load
    (MindSpore's deferred initialisation), so a load never holds two copies."""
    if not lazy:
        return Parameter(Tensor(np.zeros(shape, np.float32)), name=name)
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        return Parameter(initializer("zeros", shape, ms.float32), name=name)


def hf_name(local: str, stage: RankStage) -> str:
    if local == "embed":
        return "model.embed_tokens.weight"
    if local == "lm_head":
        return "lm_head.weight"
    if local.startswith("norm."):
        return "model." + local
    _, j, rest = local.split(".", 2)
    i = stage.layer_ids[int(j)]
    rest = rest.replace("gate.", "mlp.gate.", 1).replace("experts.", "mlp.experts.", 1)
    return f"model.layers.{i}.{rest}"


def build_stage(cfg, mesh: Mesh, s: int, n: int, layers: range, get) -> tuple[RankStage, list]:
    """Rank n of stage s with its shards loaded; `get(hf_name)` returns the full array, or `get`
    has `read_shard(info, cfg)` returning just the slice (checkpoint.ShardReader).
    Returns (cell, [(Parameter, ShardInfo)])."""
    infos: dict[int, ShardInfo] = {}

    def load(stage: RankStage, prefix: str, sub: nn.Cell) -> None:
        for name, p in sub.parameters_and_names():
            infos[id(p)] = _load_one(cfg, mesh, s, n, stage, prefix + name, p, get)
        release_freed_heap()

    cell = RankStage(cfg, mesh, layers, s == 0, s == mesh.pp - 1, load)
    entries = []
    for local, p in cell.parameters_and_names():
        info = infos.get(id(p)) or _load_one(cfg, mesh, s, n, cell, local, p, get)
        p.name = f"s{s}.r{n}.{info.name}"  # unique across ranks simulated in one process (set
        entries.append((p, info))           # here: adding a layer to the CellList renames it)
    return cell, entries


def _load_one(cfg, mesh: Mesh, s: int, n: int, stage: RankStage, local: str, p: Parameter, get) -> ShardInfo:
    hf = hf_name(local, stage)
    info = shard_info(local, hf, mesh, n, cfg.num_key_value_heads)
    load_shard(p, info, cfg, get, f"rank {n} of stage {s}")
    return info
