"""Each local rank of a launched job on its own block of this host's cores.

Why: a rank's step is a chain of hand-offs between its threads (Python, MindSpore's
frontend_queue / actor / kernel threads) and, at every collective, a futex wake of the peer
rank's thread. Linux tends to wake a thread on the waker's core, so with two ranks on two cores
both ranks' busy threads often share one core for many steps until the load balancer moves them
apart: the parallel training step was bimodal (windows of steps 3-5x slower than the rest) while
the other core idled. With each rank's threads confined to a disjoint block of cores, the ranks
never queue behind each other (bench/RESULTS.md, "Training step on real processes: ranks bound to cores").

`bind_local_rank()` (each worker, after mindspore.communication.init()): the cores this process
may run on (sched_getaffinity) are cut into `QWEN3MOE_LOCAL_WORKERS` consecutive blocks (the
launcher exports its --nproc; msrun's DEVICE_ID is the local rank) and every thread of the
process, those MindSpore has started included, is restricted to block DEVICE_ID; threads started
later inherit it. `QWEN3MOE_BIND_CORES`: "auto" (default: bind when launched by `qwen3moe launch`
with at least one core per local rank) or "off".
"""
from __future__ import annotations

import os

from qwen3moe.errors import Qwen3MoeError

ENV, LOCAL_WORKERS_ENV, CHOICES = "QWEN3MOE_BIND_CORES", "QWEN3MOE_LOCAL_WORKERS", ("auto", "off")


class BindError(Qwen3MoeError, ValueError):
    """A QWEN3MOE_BIND_CORES / QWEN3MOE_LOCAL_WORKERS value that cannot take effect."""


def core_block(cores: list[int], local_rank: int, local_workers: int) -> list[int]:
    """Block `local_rank` of `local_workers` consecutive, disjoint, near-equal blocks of `cores`
    (sorted); [] when there are fewer cores than workers (no disjoint blocks to give)."""
    cores = sorted(cores)
    if not 0 <= local_rank < local_workers or len(cores) < local_workers:
        return []
    n = len(cores)
    return cores[local_rank * n // local_workers:(local_rank + 1) * n // local_workers]


def bind_threads(cores: list[int]) -> None:
    """Restrict every thread of this process to `cores` (Linux schedules threads: a process's
    affinity call covers only the calling thread and the threads it starts afterwards)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # the thread has exited meanwhile
            pass


def bind_local_rank() -> list[int]:
    """Bind this worker as the module docstring says; returns its cores ([] when not bound)."""
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in CHOICES:
        raise BindError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(CHOICES)}")
    workers, local = os.environ.get(LOCAL_WORKERS_ENV), os.environ.get("DEVICE_ID")
    if mode == "off" or workers is None or local is None or not hasattr(os, "sched_setaffinity"):
        return []
    try:
        n, r = int(workers), int(local)
    except ValueError:
        raise BindError(f"{LOCAL_WORKERS_ENV}={workers!r} / DEVICE_ID={local!r}: expected integers") from None
    block = core_block(list(os.sched_getaffinity(0)), r, n)
    if block:
        bind_threads(block)
    return block
