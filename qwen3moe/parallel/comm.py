"""Communicator interface, and the in-process simulated backend used by the tests.

A collective takes one tensor per rank of the group (rank order) and returns one per rank, so
the same parallel forward code runs every rank's shard in one process. Only the simulated
backend exists so far; the MindSpore backend (AllReduce / AllGather over msrun, emulated
all-to-all on CPU; see MINDSPORE_CPU.md R5/R6) is the next step of the parallel issue.
"""
from __future__ import annotations

from typing import Protocol

from mindspore import Tensor, ops


class Communicator(Protocol):
    size: int

    def all_reduce(self, xs: list[Tensor]) -> list[Tensor]: ...

    def all_gather(self, xs: list[Tensor], axis: int = 0) -> list[Tensor]: ...


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


class MindSporeComm:
    """The real backend on the world group (msrun / HCCL / NCCL / MCCL on CPU): init on first use.

    AllReduce is SUM on every device (the only reduction MCCL has on CPU); callers divide for a
    mean. Sub-groups, all-gather with custom bprop and emulated all-to-all come next (see
    MINDSPORE_CPU.md R5/R6).
    """

    def __init__(self) -> None:
        from mindspore.communication import get_group_size, get_rank, init

        init()
        self.rank, self.size = get_rank(), get_group_size()
        self._all_reduce = ops.AllReduce()

    def all_reduce(self, x: Tensor) -> Tensor:
        return self._all_reduce(x)
