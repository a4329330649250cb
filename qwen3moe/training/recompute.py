"""Activation recompute per decoder layer from `recompute_config.recompute`.

MindSpore Transformers semantics of the key:
    false        keep every activation (default)
    true         recompute every decoder layer in backward
    [n_0, ...]   one entry per pipeline stage: recompute the first n_s layers of stage s
                 (stages are parallel/ranks.stage_layers' contiguous ranges; a single-process
                 run is one stage, so a one-entry list [n] means the first n layers)
`Cell.recompute()` marks a layer so the compiled backward recomputes its forward from the layer
input instead of keeping the intermediate activations. It composes with the custom-bprop C++
kernels (attention, fused MoE): gradients are bit-identical (tests/test_train_step.py).

Measured limitation (MindSpore 2.10 CPU backend, docs/numerics.md): the CPU graph does not free
the dropped activations earlier, so peak RSS does not fall (tiny preset widened to H=256, 6
layers, 4x1024 tokens: 3.60 GB without, 3.79 GB with recompute; memory_optimize_level O1 the
same) and a step costs the extra forward. The switch is honoured for parity with Ascend configs.
"""
from __future__ import annotations

from typing import Any

from qwen3moe.errors import Qwen3MoeError


class RecomputeError(Qwen3MoeError, ValueError):
    """Bad `recompute_config.recompute` value: one line naming the key."""


def recompute_layers(spec: Any, num_layers: int, pipeline_stages: int = 1) -> list[int]:
    """Indices of the decoder layers to recompute for a `recompute_config.recompute` value."""
    key = "recompute_config.recompute"
    if spec is None or spec is False:
        return []
    if spec is True:
        return list(range(num_layers))
    if not isinstance(spec, (list, tuple)) or not all(isinstance(n, int) and not isinstance(n, bool)
                                                      and n >= 0 for n in spec):
        raise RecomputeError(f"{key}: expected true, false or a list of non-negative layer counts "
                             f"per pipeline stage, got {spec!r}")
    if len(spec) != pipeline_stages:
        raise RecomputeError(f"{key}: {len(spec)} entries for {pipeline_stages} pipeline stage(s) "
                             f"(parallel_config.pipeline_stage); give one layer count per stage")
    bounds = stage_bounds(num_layers, pipeline_stages)
    out = []
    for (lo, hi), n in zip(bounds, spec):
        if n > hi - lo:
            raise RecomputeError(f"{key}: {n} layers requested for a stage of {hi - lo} layers")
        out += list(range(lo, lo + n))
    return out


def stage_bounds(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) layer ranges per stage: L // stages each, the last stage taking the
    remainder (parallel/ranks.stage_layers without an explicit offset)."""
    base = num_layers // stages
    out = [(s * base, (s + 1) * base) for s in range(stages)]
    out[-1] = (out[-1][0], num_layers)
    return out


def apply_recompute(model: Any, spec: Any, pipeline_stages: int = 1) -> list[int]:
    """Mark the selected decoder layers of `model` (Qwen3MoeForCausalLM) for recompute; returns
    their indices. Call before the first train step (the graph compiles with the marks)."""
    layers = model.model.layers
    chosen = recompute_layers(spec, len(layers), pipeline_stages)
    for i in chosen:
        layers[i].recompute()
    return chosen
