"""Global-batch aux loss over simulated data-parallel ranks (test harness): `SimComm` (every
rank of a group in one process) and the per-rank terms whose sum is the global aux
(qwen3moe/parallel/aux.py's docstring; the real-process path is its dp_stats_reducer)."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

from qwen3moe.router.losses import switch_aux_loss


class SimComm:
    """Every rank of a group in one process: collectives are sums / concatenations of lists."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"group size must be >= 1, got {size}")
        self.size = size
        self.calls: dict[str, int] = {"all_reduce": 0, "all_gather": 0}

    def _check(self, xs: list[Tensor]) -> None:
        if len(xs) != self.size:
            raise ValueError(f"collective got {len(xs)} tensors for a group of {self.size}")

    def all_reduce(self, xs: list[Tensor]) -> list[Tensor]:
        self._check(xs)
        self.calls["all_reduce"] += 1
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        return [total] * self.size

    def all_gather(self, xs: list[Tensor], axis: int = 0) -> list[Tensor]:
        self._check(xs)
        self.calls["all_gather"] += 1
        return [ops.concat(tuple(xs), axis)] * self.size


def reduce_router_counts(comm, counts_E: list[Tensor], n_tokens: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(C_E, N) summed over the ranks of `comm` (SimComm: one entry per rank, rank order)."""
    c = comm.all_reduce([ms.ops.stop_gradient(x) for x in counts_E])[0]
    n = comm.all_reduce([ms.ops.stop_gradient(x) for x in n_tokens])[0]
    return c, n


def global_aux_terms(comm, stats: list[tuple[Tensor, Tensor, Tensor]]) -> list[Tensor]:
    """Per-rank differentiable terms switch_aux_loss(C, s_r, N); their sum is the global aux.

    `stats[r]` = rank r's (counts_E, probsum_E, n) pooled over its micro-batches and layers.
    """
    C, N = reduce_router_counts(comm, [s[0] for s in stats], [s[2] for s in stats])
    return [switch_aux_loss(C, s[1], N) for s in stats]
