"""`MindSporeComm` (world-group AllReduce for `qwen3moe dist-check`, commands/launch.py, and the
global aux's counts, aux.dp_stats_reducer) and `aggregate_peak`. The compiled rank models'
collectives are backend.py's cells over process.ProcessCollectives' groups."""
from __future__ import annotations

from mindspore import Tensor, ops


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
