"""List-per-group communicators: `SimComm` (every rank of a group in one process: used by
aux.py's global aux loss) and `MindSporeComm` (world-group AllReduce for `qwen3moe dist-check`,
commands/launch.py). The parallel engine's communicators are collectives.SimCollectives and
process.ProcessCollectives."""
from __future__ import annotations

from mindspore import Tensor, ops


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
    """The world group (msrun / HCCL / NCCL / MCCL on CPU): init on first use. AllReduce is
    SUM on every device (the only reduction MCCL has on CPU); callers divide for a mean."""

    def __init__(self, initialise: bool = True) -> None:
        from mindspore.communication import get_group_size, get_rank, init

        if initialise:  # False where the caller already ran init()
            init()
        self.rank, self.size = get_rank(), get_group_size()
        self._all_reduce = ops.AllReduce()

    def all_reduce(self, x: Tensor) -> Tensor:
        return self._all_reduce(x)


def aggregate_peak(probe_size: int) -> float:
    """Sum over ranks of each rank's matmul probe (run by all ranks at once, so ranks sharing a
    machine each measure their share): the peak that the job's total FLOP/s is a fraction of.
    A collective: every rank calls it."""
    import numpy as np

    from qwen3moe.training.metrics import measure_peak_flops

    own = measure_peak_flops(int(probe_size))
    return float(ops.AllReduce()(Tensor(np.float32(own))).asnumpy())
