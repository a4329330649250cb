"""The process-per-rank backend of collectives.py: MindSpore collectives under msrun.

Same interface as SimCollectives (streams hold this process's one rank). What each device
has: AllReduce-sum works on any group everywhere; on CPU (MCCL) AllGather only on the world
group and ReduceScatter / AlltoAll not at all (MINDSPORE_CPU.md section 6). So on CPU every
gather is an AllReduce of a zero buffer holding this rank's block (R6), and reduce-scatter is
AllReduce + own slice; on Ascend/GPU the native AllGather / ReduceScatter are used. Each
collective is a Cell with Megatron's backward (R5). Pipeline stages exchange activations with
`mint.distributed` isend/irecv (after R4's fix of their default group on CPU).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.parallel.collectives import stage_groups


class _Group(nn.Cell):
    def __init__(self, name: str, ranks: list[int], me: int, native: bool) -> None:
        super().__init__()
        self.name, self.size, self.pos = name, len(ranks), ranks.index(me)
        self.ar = ops.AllReduce(group=name)
        self.ag = ops.AllGather(group=name) if native else None
        self.rs = ops.ReduceScatter(group=name) if native else None

    def gather(self, x: Tensor, axis: int) -> Tensor:
        if self.ag is not None and axis == 0:
            return self.ag(x)
        buf = ops.zeros((self.size,) + x.shape, x.dtype)
        buf = ops.tensor_scatter_update(buf, Tensor([[self.pos]], ms.int32), x.expand_dims(0))
        buf = self.ar(buf)
        return ops.concat([buf[i] for i in range(self.size)], axis)

    def own(self, x: Tensor, axis: int) -> Tensor:
        return ops.split(x, x.shape[axis] // self.size, axis)[self.pos]

    def reduce_own(self, x: Tensor, axis: int) -> Tensor:
        if self.rs is not None and axis == 0:
            return self.rs(x)
        return self.own(self.ar(x), axis)


class _Op(nn.Cell):
    """One collective with an explicit backward (MindSpore's own bprops need ReduceScatter)."""

    def __init__(self, g: _Group, fwd: str, bwd: str, axis: int = 0) -> None:
        super().__init__()
        self.g, self.fwd, self.bwd, self.axis = g, fwd, bwd, axis

    def _do(self, kind: str, x):
        if kind == "sum":
            return self.g.ar(x)
        if kind == "gather":
            return self.g.gather(x, self.axis)
        if kind == "own":
            return self.g.own(x, self.axis)
        if kind == "sum_own":
            return self.g.reduce_own(x, self.axis)
        return x

    def construct(self, x):
        return self._do(self.fwd, x)

    def bprop(self, x, out, dout):
        return (self._do(self.bwd, dout),)


RULES = {"reduce": ("sum", "id"), "copy": ("id", "sum"), "gather": ("gather", "own"),
         "scatter": ("own", "gather"), "gather_rs": ("gather", "sum_own"), "reduce_scatter": ("sum_own", "gather")}


class ProcessCollectives:
    def __init__(self, mesh, rank: int) -> None:
        from mindspore.communication import GlobalComm, create_group

        self.mesh, self.rank = mesh, rank
        c = mesh.coords(rank)
        self.stage, self.local = c["pp"], rank % (mesh.dp * mesh.tp)
        self.native = ms.get_context("device_target") != "CPU"
        self.groups: dict[str, _Group | None] = {}
        for kind in ("tp", "dp", "ep", "edp", "stage"):
            self.add_group(kind)
        pp_ranks = [mesh.rank_of(c["tp"], c["dp"], s) for s in range(mesh.pp)]
        self.pp_ranks = pp_ranks
        self.pp_group = None
        if mesh.pp > 1:
            name = GlobalComm.WORLD_COMM_GROUP if mesh.pp == mesh.world_size else "pp_" + "_".join(map(str, pp_ranks))
            if name != GlobalComm.WORLD_COMM_GROUP:
                create_group(name, pp_ranks)
            self.pp_group = _Group(name, pp_ranks, rank, self.native)
            _patch_p2p_defaults()
        self.ops: dict = {}
        self.calls: dict[str, int] = {}
        self.pending: list = []

    def add_group(self, kind: str) -> None:
        """Create this rank's group of one kind (every rank calls it, in the same order)."""
        from mindspore.communication import GlobalComm, create_group

        mesh = self.mesh
        local = next(g for g in stage_groups(kind, mesh.dp, mesh.tp, mesh.ep * mesh.expert_tp) if self.local in g)
        ranks = [self.stage * mesh.dp * mesh.tp + n for n in local]
        if len(ranks) == 1:
            self.groups[kind] = None
            return
        if len(ranks) == mesh.world_size:
            name = GlobalComm.WORLD_COMM_GROUP
        else:
            name = f"{kind}_" + "_".join(map(str, ranks))
            create_group(name, ranks)
        self.groups[kind] = _Group(name, ranks, self.rank, self.native)

    def _call(self, name: str, kind: str, xs: dict, axis: int = 0) -> dict:
        g = self.groups[kind]
        self.calls[name] = self.calls.get(name, 0) + 1
        if g is None:
            return xs
        key = (name, kind, axis)
        if key not in self.ops:
            self.ops[key] = _Op(g, *RULES[name], axis)
        return {n: self.ops[key](x) for n, x in xs.items()}

    def reduce(self, kind, xs): return self._call("reduce", kind, xs)
    def copy(self, kind, xs): return self._call("copy", kind, xs)
    def gather(self, kind, xs, axis=0): return self._call("gather", kind, xs, axis)
    def scatter(self, kind, xs, axis=0): return self._call("scatter", kind, xs, axis)
    def gather_rs(self, kind, xs, axis=0): return self._call("gather_rs", kind, xs, axis)
    def reduce_scatter(self, kind, xs, axis=0): return self._call("reduce_scatter", kind, xs, axis)

    def sum_nograd(self, kind, xs):
        g = self.groups[kind]
        return xs if g is None else {n: g.ar(ops.stop_gradient(x)) for n, x in xs.items()}

    # ---- pipeline -----------------------------------------------------------------------
    def send(self, x: Tensor, stage: int) -> None:
        from mindspore import mint

        self.pending.append(mint.distributed.isend(x.copy(), dst=self.pp_ranks[stage]))

    def recv(self, shape, stage: int) -> Tensor:
        from mindspore import mint

        buf = ops.zeros(shape, ms.float32)
        mint.distributed.recv(buf, src=self.pp_ranks[stage])
        return buf

    def finish(self) -> None:
        for h in self.pending:
            if h is not None:
                h.wait()
        self.pending = []

    def pp_sum(self, x: Tensor) -> Tensor:
        return x if self.pp_group is None else self.pp_group.ar(x)


def _patch_p2p_defaults() -> None:
    """R4: mint.distributed binds 'hccl_world_group' as its default group at import time."""
    import mindspore.mint.distributed.distributed as dd
    from mindspore.communication import GlobalComm

    w = GlobalComm.WORLD_COMM_GROUP
    dd.get_cache_group_rank.__defaults__ = (w,)
    dd.get_cache_group_size.__defaults__ = (w,)
