"""Read compiled-graph results without a busy-waiting thread competing with the kernels.

MindSpore 2.10's `Tensor.asnumpy()` first waits for the runtime queues, and that wait is a spin
loop (runtime/pipeline/async_rqueue.cc `AsyncRQueue::Wait`: `while (!tasks_queue_.IsEmpty()) {}`).
While a training step runs, the Python thread that asked for its outputs therefore spins for the
whole step. On a 2-core machine that is one runnable thread too many, and the train step is
clearly faster once the waiting thread has SCHED_IDLE priority (bench/RESULTS.md, "Figures moved
from docstrings").

`fetch(*tensors)` does the waiting on one helper thread that lowers itself to SCHED_IDLE once
(it then only runs on otherwise idle cores) and returns the numpy arrays; the caller blocks on a
future (a lock, no spinning). The main thread keeps its normal priority, so every thread it
creates (MindSpore's queue workers are started lazily by the first launch) keeps it too.
Where SCHED_IDLE is unavailable (not Linux) the helper keeps normal priority: same cost as
calling asnumpy() directly. Caveat: on a machine saturated by other processes an idle-priority
thread is scheduled late, so noticing the end of a step can lag by a few scheduler ticks; that
is small against a training step, which is why only TrainStep uses this (not per-token decode).
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _lower_priority() -> None:
    """Runs on the helper thread: pid 0 = this thread (Linux schedules threads, not processes)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # no SCHED_IDLE here: the helper just waits at normal priority


@functools.lru_cache(maxsize=None)
def _waiter(pid: int) -> ThreadPoolExecutor:
    # keyed by pid: a forked child (data-loader workers, msrun) gets its own helper thread
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen3moe-fetch",
                              initializer=_lower_priority)


def _read(tensors) -> list[np.ndarray]:
    return [t.asnumpy() for t in tensors]


def fetch(*tensors) -> list[np.ndarray]:
    """[t.asnumpy() for t in tensors], waiting for the graph on the low-priority helper thread.
    Exceptions raised by the graph (MindSpore re-raises them at the sync) propagate here."""
    return _waiter(os.getpid()).submit(_read, tensors).result()


def policy_of_helper() -> int:
    """Scheduling policy of the helper thread (for tests): os.SCHED_IDLE where supported."""
    return _waiter(os.getpid()).submit(os.sched_getscheduler, 0).result()
