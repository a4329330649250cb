"""World-group AllReduce for `qwen3moe dist-check` (commands/launch.py): the smallest real
msrun check. The parallel engine's communicators are collectives.SimCollectives (every rank
in one process) and process.ProcessCollectives (one rank per process)."""
from __future__ import annotations

from mindspore import Tensor, ops


class MindSporeComm:
    """The world group (msrun / HCCL / NCCL / MCCL on CPU): init on first use. AllReduce is
    SUM on every device (the only reduction MCCL has on CPU); callers divide for a mean."""

    def __init__(self) -> None:
        from mindspore.communication import get_group_size, get_rank, init

        init()
        self.rank, self.size = get_rank(), get_group_size()
        self._all_reduce = ops.AllReduce()

    def all_reduce(self, x: Tensor) -> Tensor:
        return self._all_reduce(x)
