"""Global-batch load-balancing loss across data-parallel ranks (Qwen3 recipe).

The global aux is E * sum_e (C_e / N) * (S_e / N) with C (top-k counts), S (router probability
mass) and N (counted tokens) summed over every micro-batch of the step AND every dp rank. The
counts are not differentiated, so it is linear in S:
    aux_global = sum_r switch_aux_loss(C, s_r, N)        (s_r: rank r's own probability mass)
Each rank therefore needs only the reduced C and N (E + 1 numbers, one all-reduce) and keeps
its own differentiable term; `router/losses.py` stays a set of pure functions of statistics.
With gradients averaged over dp ranks (dp.allreduce_grads, TrainStep-per-rank), a rank's term
is scaled by dp so the mean of the rank gradients is the gradient of aux_global.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import mindspore as ms
from mindspore import Tensor

from qwen3moe.router.losses import switch_aux_loss


def dp_stats_reducer(comm) -> Callable[[np.ndarray, float], tuple[np.ndarray, float, int]]:
    """For `TrainStep(aux_mode="global", stats_reducer=...)` under a real one-rank-per-process
    backend (comm.MindSporeComm): (C_E, N) of this rank -> (C_E, N) summed over the dp ranks,
    and dp (AllReduce is SUM on every backend; counts travel as fp32: exact below 2^24, relative
    rounding 6e-8 above)."""
    def reduce(c_E: np.ndarray, n: float) -> tuple[np.ndarray, float, int]:
        packed = Tensor(np.concatenate([c_E, [n]]).astype(np.float32))
        out = comm.all_reduce(packed).asnumpy().astype(np.float64)
        return out[:-1], float(out[-1]), int(comm.size)
    return reduce
