"""One rank per process under msrun: `ProcessCollectives` holds this rank's communication groups
(tp, dp, ep, edp, stage, kv<r>: mesh.stage_groups) and its pipeline links. The collectives are
made by the backend of backend.py (QWEN3MOE_COLLECTIVES: shared memory between the ranks of one
host, or MindSpore's, whose CPU MCCL has AllReduce on any group, AllGather on the world group
only and no ReduceScatter / AlltoAll, emulated there with AllReduce, MINDSPORE_CPU.md section
6). Each collective is a Cell with Megatron's backward (R5) whose forward and backward are call
sites of their own. Pipeline stages exchange activations with `mint.distributed` isend/irecv
(after R4's fix of their default group on CPU).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.parallel import backend
from qwen3moe.parallel.mesh import stage_groups


class _Group(nn.Cell):
    """A communication group of this rank: name, size, position, and shared collectives (for
    callers outside graphs; a graph's call sites make their own, `_Op`)."""

    def __init__(self, name: str, ranks: list[int], me: int) -> None:
        super().__init__()
        self.name, self.size, self.pos = name, len(ranks), ranks.index(me)
        be = backend.get()
        self.ar = be.all_reduce(name, "shared sum")
        self.ag = be.all_gather(name, "shared gather")
        self.rs = be.reduce_scatter(name, "shared reduce-scatter")

    def gather(self, x: Tensor, axis: int) -> Tensor:
        return _along(self.ag(_first(x, axis)), axis, self.size)

    def own(self, x: Tensor, axis: int) -> Tensor:
        return ops.split(x, x.shape[axis] // self.size, axis)[self.pos]

    def reduce_own(self, x: Tensor, axis: int) -> Tensor:
        return _first(self.rs(_first(x, axis)), axis)


def _first(x: Tensor, axis: int) -> Tensor:
    """x with `axis` moved to the front (the backends gather / scatter along axis 0)."""
    return x if axis == 0 else ops.swapaxes(x, 0, axis)


def _along(y: Tensor, axis: int, size: int) -> Tensor:
    """An axis-0 gather of blocks [d, ...] (axis moved first) back to the concat along `axis`."""
    if axis == 0:
        return y
    d = y.shape[0] // size
    return ops.concat([ops.swapaxes(y[i * d:(i + 1) * d], 0, axis) for i in range(size)], axis)


class _Step(nn.Cell):
    """One direction of a collective at one call site: sum / gather / own / sum_own / id."""

    def __init__(self, g: _Group, kind: str, axis: int, site: str) -> None:
        super().__init__()
        self.kind, self.axis, self.size, self.pos = kind, axis, g.size, g.pos
        be = backend.get()
        make = {"sum": be.all_reduce, "gather": be.all_gather, "sum_own": be.reduce_scatter,
                "a2a": be.all_to_all}.get(kind)
        self.op = make(g.name, site) if make is not None else None

    def construct(self, x):
        if self.kind == "sum" or self.kind == "a2a":
            return self.op(x)
        if self.kind == "gather":
            return _along(self.op(_first(x, self.axis)), self.axis, self.size)
        if self.kind == "own":
            return ops.split(x, x.shape[self.axis] // self.size, self.axis)[self.pos]
        if self.kind == "sum_own":
            return _first(self.op(_first(x, self.axis)), self.axis)
        return x


class _Op(nn.Cell):
    """One collective with an explicit backward (MindSpore's own bprops need ReduceScatter);
    its forward and backward are call sites of their own."""

    def __init__(self, g: _Group, fwd: str, bwd: str, axis: int = 0) -> None:
        super().__init__()
        self.f = _Step(g, fwd, axis, f"{fwd}")
        self.b = _Step(g, bwd, axis, f"{bwd} (backward of {fwd})")

    def construct(self, x):
        return self.f(x)

    def bprop(self, x, out, dout):
        return (self.b(dout),)


RULES = {"reduce": ("sum", "id"), "copy": ("id", "sum"), "gather": ("gather", "own"),
         "scatter": ("own", "gather"), "gather_rs": ("gather", "sum_own"), "reduce_scatter": ("sum_own", "gather"),
         "all_to_all": ("a2a", "a2a")}


class ProcessCollectives:
    def __init__(self, mesh, rank: int) -> None:
        from mindspore.communication import GlobalComm, create_group

        self.mesh, self.rank = mesh, rank
        c = mesh.coords(rank)
        self.stage, self.local = c["pp"], rank % (mesh.dp * mesh.tp)
        backend.get()  # the backend is decided once, by every rank at this point
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
                backend.register(name, pp_ranks)
            self.pp_group = _Group(name, pp_ranks, rank)
            _patch_p2p_defaults()
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
            backend.register(name, ranks)
        self.groups[kind] = _Group(name, ranks, self.rank)

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
