"""Token dispatchers of the parallel MoE block (Megatron-Core's `token_dispatcher` design).

A dispatcher moves a rank's routed tokens to the experts it holds and their outputs back:
    dispatch(x_TH, w_TK, idx_TK) -> (x_RH, w_RK, idx_RK)   rows for the local experts, with
                                                          local expert indices in [0, e)
    combine(y_RH, T) -> y_TH                              the block's complete output [T, H]
    rows(x_TH) -> x_RH, rows_for(T) -> R, expert_lo      the rows alone (the fused decode step routes
                                                          them itself, kernels/decode.py), their count,
                                                          and the first local expert's global index
In between, the block's own `combine` (models/qwen3_moe.py: fused C++ kernel or composite
blocks) runs the local experts. Assignments to experts held elsewhere keep an in-range local
index but a zero weight, so they add nothing (forward and gradient) and shapes stay static.

    TPExpertsDispatcher   ep = 1: every rank holds all E experts with their ffn dim split over
                          the tp group (etp = tp); all T tokens stay, the partial outputs are
                          summed over tp (g: all-reduce forward, identity backward). tp = 1: local.
    AllGatherDispatcher   ep > 1 (etp = 1): each tp rank keeps its own T/tp rows, the rows,
                          weights and indices are all-gathered over the ep group (backward:
                          reduce-scatter), the local experts run on all of them, the outputs are
                          reduce-scattered back (backward: all-gather) and gathered over tp.
                          On MCCL (AllReduce only on CPU sub-groups) every gather is an
                          AllReduce of a zero-padded buffer (backend.py).
    AllToAllDispatcher    ep > 1 (etp = 1), Megatron-Core's alltoall dispatcher with equal
                          splits (static shapes): each tp rank's own T/tp rows are sent to every ep
                          member with the weights and local indices of that member's experts
                          (zero weight elsewhere) by one all-to-all, the local experts run, the
                          outputs go back by a second all-to-all (backward of each: all-to-all)
                          and each row sums its members' contributions in member order; then
                          gathered over tp. Equal to AllGatherDispatcher (the same rows meet the
                          same experts; the same additions in the same order). The shared-memory
                          backend has a native all-to-all; on MCCL it is a gather (backend.py).

The input x_TH reaches the dispatcher through the block's copy (f) over tp, so the partial
gradients of each tp rank's rows and experts are summed there.
Shapes: T tokens of a rank (replicated over tp), t = Tp / tp own rows (Tp: T rounded up to a
multiple of tp, zero rows), G ep group size, R = G*t gathered rows, E experts, e = E/ep local.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.parallel import backend
from qwen3moe.parallel.process import RULES, _Group, _Op


class _Identity(nn.Cell):
    def construct(self, x):
        return x


def collective(group: _Group | None, rule: str, axis: int = 0) -> nn.Cell:
    """A collective Cell with Megatron's backward (process.RULES), or identity for a 1-rank group.
    An all-gather whose backward is the reduce-scatter ("gather_rs") and the reduce-scatter
    ("reduce_scatter") along axis 0 are the backend's own cells, whose backward is exactly
    that: wrapped in `_Op` they made MindSpore 2.10 fail to differentiate a compiled graph under
    PyNative `mindspore.vjp` (the pipeline's stage forward; "The pointer[func_graph->get_return()]
    is null"), while value_and_grad inside the graph took both."""
    if group is None:
        return _Identity()
    if axis == 0 and rule in ("gather_rs", "reduce_scatter"):
        be = backend.get()
        make = be.all_gather if rule == "gather_rs" else be.reduce_scatter
        return make(group.name, rule)
    return _Op(group, *RULES[rule], axis)


class TPExpertsDispatcher(nn.Cell):
    """ep = 1: local experts (ffn split over tp), partial outputs summed over tp."""

    def __init__(self, tp_group: _Group | None) -> None:
        super().__init__()
        self.reduce = collective(tp_group, "reduce")
        self.expert_lo = 0

    def rows(self, x_TH: Tensor) -> Tensor:
        return x_TH

    def rows_for(self, T: int) -> int:
        return T

    def dispatch(self, x_TH: Tensor, w_TK: Tensor, idx_TK: Tensor):
        return x_TH, w_TK, idx_TK

    def combine(self, y_TH: Tensor, T: int) -> Tensor:
        return self.reduce(y_TH)


class AllGatherDispatcher(nn.Cell):
    """ep > 1: own rows gathered over the ep group, local experts, reduce-scatter, gather over tp.

    tp_pos / tp: this rank's position in its tp group; expert_lo / local_experts: the block of
    experts it holds (experts expert_lo .. expert_lo + local_experts - 1)."""

    def __init__(self, tp_group: _Group | None, ep_group: _Group, tp: int, tp_pos: int,
                 expert_lo: int, local_experts: int) -> None:
        super().__init__()
        self.tp, self.tp_pos = tp, tp_pos
        self.expert_lo, self.e = expert_lo, local_experts
        self.ep_size = 1 if ep_group is None else ep_group.size
        self.gather_ep = collective(ep_group, "gather_rs")      # bwd: sum over ep + own rows
        self.scatter_ep = collective(ep_group, "reduce_scatter")  # bwd: gather over ep
        self.gather_tp = collective(tp_group, "gather")          # bwd: own rows

    def _own(self, x):
        pad = -x.shape[0] % self.tp
        if pad:
            x = ops.concat([x, ops.zeros((pad,) + x.shape[1:], x.dtype)])
        t = x.shape[0] // self.tp
        return x[self.tp_pos * t:(self.tp_pos + 1) * t]

    def rows(self, x_TH: Tensor) -> Tensor:
        return self.gather_ep(self._own(x_TH))

    def rows_for(self, T: int) -> int:
        return self.ep_size * -(-T // self.tp)

    def dispatch(self, x_TH: Tensor, w_TK: Tensor, idx_TK: Tensor):
        H, K = x_TH.shape[1], w_TK.shape[1]
        # one collective for rows, weights and indices; the indices travel as fp32 (MCCL
        # reduces float only; exact below 2^24) and carry no gradient
        idx_TK = ops.stop_gradient(idx_TK).astype(x_TH.dtype)
        packed = self.gather_ep(self._own(ops.concat([x_TH, w_TK.astype(x_TH.dtype), idx_TK], 1)))
        x_RH, w_RK = packed[:, :H], packed[:, H:H + K].astype(w_TK.dtype)
        idx_RK = ops.stop_gradient(packed[:, H + K:]).astype(ms.int32) - self.expert_lo
        mine = (idx_RK >= 0) & (idx_RK < self.e)
        local_RK = ops.select(mine, idx_RK, ops.zeros_like(idx_RK))
        return x_RH, w_RK * mine.astype(w_RK.dtype), local_RK

    def combine(self, y_RH: Tensor, T: int) -> Tensor:
        return self.gather_tp(self.scatter_ep(y_RH))[:T]


class AllToAllDispatcher(AllGatherDispatcher):
    """ep > 1: own rows to every ep member with that member's expert weights (all-to-all), local
    experts, outputs back (all-to-all), contributions summed, gathered over tp."""

    def __init__(self, tp_group: _Group | None, ep_group: _Group, tp: int, tp_pos: int,
                 expert_lo: int, local_experts: int) -> None:
        super().__init__(tp_group, ep_group, tp, tp_pos, expert_lo, local_experts)
        self.G = 1 if ep_group is None else ep_group.size
        self.send = collective(ep_group, "all_to_all")
        self.back = collective(ep_group, "all_to_all")

    def dispatch(self, x_TH: Tensor, w_TK: Tensor, idx_TK: Tensor):
        H, K = x_TH.shape[1], w_TK.shape[1]
        x_tH, w_tK = self._own(x_TH), self._own(w_TK.astype(x_TH.dtype))
        idx_tK = self._own(ops.stop_gradient(idx_TK).astype(ms.int32))
        blocks = ()
        for j in range(self.G):  # block j: what member j (experts j*e .. j*e + e - 1) receives
            local = idx_tK - j * self.e
            mine = (local >= 0) & (local < self.e)
            local = ops.select(mine, local, ops.zeros_like(local)).astype(x_TH.dtype)
            blocks = blocks + (ops.concat([x_tH, w_tK * mine.astype(x_TH.dtype), local], 1),)
        packed = self.send(ops.concat(blocks, 0))  # [G*t, H+2K]: member j's rows for my experts
        idx_RK = ops.stop_gradient(packed[:, H + K:]).astype(ms.int32)
        return packed[:, :H], packed[:, H:H + K].astype(w_TK.dtype), idx_RK

    def combine(self, y_RH: Tensor, T: int) -> Tensor:
        parts = self.back(y_RH)  # block j: member j's outputs for my rows
        t = parts.shape[0] // self.G
        y_tH = parts[:t]
        for j in range(1, self.G):  # member order, as the reduce-scatter adds
            y_tH = y_tH + parts[j * t:(j + 1) * t]
        return self.gather_tp(y_tH)[:T]


def ep_dispatcher(kind: str, tp_group, ep_group, tp: int, tp_pos: int, expert_lo: int, local_experts: int):
    """The ep > 1 dispatcher named by parallelize's `dispatcher=` ("allgather" / "alltoall")."""
    cls = AllToAllDispatcher if kind == "alltoall" else AllGatherDispatcher
    return cls(tp_group, ep_group, tp, tp_pos, expert_lo, local_experts)
