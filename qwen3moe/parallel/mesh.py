"""Device mesh: dp x tp x pp degrees, expert parallelism folded into dp*tp, rank coordinates.

Rank order (Megatron's default "tp-dp-pp"): tp varies fastest, then dp, then pp, so a tensor-
parallel group is a run of consecutive ranks (one node, fastest links):
    rank = tp_rank + tp * (dp_rank + dp * pp_rank)
Expert parallelism folds into the dp*tp ranks of a pipeline stage (Megatron MoE "parallel
folding"): those n = dp*tp ranks are regrouped as etp x ep x edp (etp fastest): experts are split
over ep ranks, each expert's ffn dimension over etp ranks (default tp when ep == 1, as the seed's
model_parallel inference does), and replicated over edp (expert data parallel) groups.
"""
from __future__ import annotations

from dataclasses import dataclass

from qwen3moe.errors import Qwen3MoeError


class MeshError(Qwen3MoeError, ValueError):
    """An invalid parallel layout: one line naming the degree and the constraint."""


@dataclass(frozen=True)
class Mesh:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sp: bool = False
    micro_batch_num: int = 1
    etp: int | None = None  # expert tensor parallel; default tp when ep == 1 (Megatron), else 1

    @property
    def expert_tp(self) -> int:
        return self.etp if self.etp is not None else (self.tp if self.ep == 1 else 1)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def edp(self) -> int:
        """Expert data-parallel degree: replicas of each expert shard within a stage."""
        return self.dp * self.tp // (self.ep * self.expert_tp)

    def validate(self, *, num_layers: int, num_heads: int, num_kv_heads: int, num_experts: int,
                 world_size: int | None = None) -> None:
        for name in ("dp", "tp", "pp", "ep", "micro_batch_num"):
            if getattr(self, name) < 1:
                raise MeshError(f"{name} must be >= 1, got {getattr(self, name)}")
        if world_size is not None and world_size != self.world_size:
            raise MeshError(f"world size {world_size} != dp*tp*pp = {self.dp}*{self.tp}*{self.pp} "
                            f"= {self.world_size}")
        if num_heads % self.tp:
            raise MeshError(f"tp={self.tp} must divide num_attention_heads={num_heads}")
        if not (num_kv_heads % self.tp == 0 or self.tp % num_kv_heads == 0):
            raise MeshError(f"tp={self.tp} must divide num_key_value_heads={num_kv_heads} or be a "
                            f"multiple of it (then each KV head is replicated tp/{num_kv_heads} times)")
        if num_experts and num_experts % self.ep:
            raise MeshError(f"ep={self.ep} must divide num_experts={num_experts}")
        if (self.dp * self.tp) % (self.ep * self.expert_tp):
            raise MeshError(f"ep*etp={self.ep}*{self.expert_tp} must divide dp*tp={self.dp * self.tp} "
                            "(experts fold into the data- and tensor-parallel ranks of a pipeline stage)")
        if self.pp > num_layers:
            raise MeshError(f"pp={self.pp} must be <= num_hidden_layers={num_layers}")
        if self.pp > 1 and self.micro_batch_num < self.pp:
            raise MeshError(f"micro_batch_num={self.micro_batch_num} must be >= pp={self.pp} to fill "
                            "the pipeline")
        if self.sp and self.tp == 1:
            raise MeshError("sequence parallel (sp) needs tp > 1")

    def kv_heads_per_rank(self, num_kv_heads: int) -> int:
        """vLLM's rule: split KV heads when tp <= K, else replicate so each rank holds one."""
        return max(1, num_kv_heads // self.tp)

    # ---- coordinates and groups ---------------------------------------------------------
    def coords(self, rank: int) -> dict[str, int]:
        if not 0 <= rank < self.world_size:
            raise MeshError(f"rank {rank} outside [0, {self.world_size})")
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        local = rank % (self.tp * self.dp)  # index within the stage, for expert folding
        etp = self.expert_tp
        return {"tp": tp_rank, "dp": dp_rank, "pp": pp_rank, "etp": local % etp,
                "ep": (local // etp) % self.ep, "edp": local // (etp * self.ep)}

    def rank_of(self, tp: int = 0, dp: int = 0, pp: int = 0) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def groups(self, kind: str) -> list[list[int]]:
        """All groups of one kind ('tp', 'dp', 'pp', 'etp', 'ep', 'edp'); each rank is in exactly one."""
        out: dict[tuple, list[int]] = {}
        for r in range(self.world_size):
            c = self.coords(r)
            key = {"tp": (c["dp"], c["pp"]), "dp": (c["tp"], c["pp"]), "pp": (c["tp"], c["dp"]),
                   "etp": (c["pp"], c["ep"], c["edp"]), "ep": (c["pp"], c["etp"], c["edp"]),
                   "edp": (c["pp"], c["etp"], c["ep"])}[kind]
            out.setdefault(key, []).append(r)
        return list(out.values())


def launched_world_size() -> int:
    """The process count the launcher (msrun, torchrun-style env) announced; 1 outside a launch."""
    import os

    for var in ("WORLD_SIZE", "RANK_SIZE", "MS_WORKER_NUM"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def stage_groups(kind: str, dp: int, tp: int, ep_size: int) -> list[list[int]]:
    """Stage-local rank groups of one kind; ep_size = ep * etp."""
    n = dp * tp
    if kind == "tp":
        return [[i * tp + j for j in range(tp)] for i in range(dp)]
    if kind == "dp":
        return [[i * tp + j for i in range(dp)] for j in range(tp)]
    if kind == "ep":
        return [list(range(g, g + ep_size)) for g in range(0, n, ep_size)]
    if kind == "edp":
        return [list(range(k, n, ep_size)) for k in range(ep_size)]
    if kind == "stage":
        return [list(range(n))]
    if kind.startswith("kv") and kind[2:].isdigit():  # ranks sharing a replicated kv head (ranks.py)
        r = int(kind[2:])
        return [[m for m in range(n) if (m % tp) // r == h] for h in range(tp // r)]
    raise ValueError(f"unknown group kind {kind!r}")
