"""MindSpore runtime setting of the decode loop, for a process that generates: call
`decode_runtime()` after any set_device and before MindSpore runs its first op (it runs one;
commands/generate.py and parallel/generate.py do).

MindSpore 2.10 runs a jit graph called from Python through its graph pipeline: the call is
queued to a `frontend_queue` thread, which launches the graph's actors. The decode loop calls one
small step graph per token and needs its logits at once (the sampler reads them), so the
pipeline overlaps nothing and adds a busy thread and hand-offs to every token: on tiny-fp32-gqa
one process spent 1.0-1.5 ms of CPU a token with it and 0.6-0.75 ms without, a tp2 rank 2.5-4
ms with it and 1.0-1.2 ms without (bench/RESULTS.md, "Decode host loop and collectives").
`MS_DEV_RUNTIME_CONF="graph_pipeline:False"` launches the graph from the calling thread.
MindSpore reads the variable once, at its first op, and then prints it, and the jit level at its
first compile, on stdout, where `generate` writes its JSON lines: both are triggered here with
stdout pointed at stderr. A value the user gave for graph_pipeline is kept;
QWEN3MOE_GRAPH_PIPELINE=on leaves MindSpore's default (A/B benchmarks). Once MindSpore has read
it, the variable gets back its previous value (or goes away), so child processes do not inherit
it: a child's MindSpore would print its notices on the child's stdout.
"""
from __future__ import annotations

import ctypes
import os
import sys

ENV, KEY, SWITCH = "MS_DEV_RUNTIME_CONF", "graph_pipeline", "QWEN3MOE_GRAPH_PIPELINE"
_APPLIED: list[bool] = []


def decode_runtime() -> None:
    """Graph pipeline off for this process (module docstring); once per process."""
    keep = os.environ.get(SWITCH, "").strip().lower() in ("1", "on", "true")
    if _APPLIED or keep or os.environ.get("MS_ROLE") == "MS_SCHED":  # msrun's scheduler runs no graph,
        return  # and with the setting it aborted at exit ("terminate called without an active exception")
    _APPLIED.append(True)
    before = os.environ.get(ENV)
    conf = (before or "").strip().strip(",")
    if KEY not in conf:
        os.environ[ENV] = f"{conf},{KEY}:False" if conf else f"{KEY}:False"
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        _first_graph()
        ctypes.CDLL(None).fflush(None)  # MindSpore's lines out of the C buffers while they go to stderr
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def _first_graph() -> None:
    """MindSpore's first op and first compile (a one-op graph)."""
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor, nn

    class _Twice(nn.Cell):
        @ms.jit
        def construct(self, x):
            return x * 2

    _Twice()(Tensor(np.ones(1, np.float32))).asnumpy()
