"""Mixed precision for training: fp32 master weights, fp16 compute, dynamic loss scaling.

Master weights, gradients buffers and AdamW moments stay fp32 (training/optimizer.py). With
compute "float16" each decoder layer runs in fp16 (`Cell.to_float`: its inputs are cast, the
layers cast their fp32 weights to the activation dtype); RMSNorm statistics, router softmax,
attention softmax and the cross-entropy still run in fp32 (the layers widen explicitly). The
fused MoE C++ kernel reads fp32 buffers only, so fp16 layers take the composite MoE path; the
attention kernel falls back by itself. "bfloat16" compute is refused on CPU: MindSpore 2.10 has
no CPU bf16 MatMul / Reduce kernels (shared/MINDSPORE_CPU.md, AMP).

Dynamic loss scaling (fp16 only; fp32 needs none): the loss is multiplied by S before backward,
the fp32 gradient sum is divided by S before clipping and the update. A step whose gradients
are not finite is skipped (no parameter or moment changes) and S is divided by `factor`; after
`window` consecutive finite steps S is multiplied by `factor` (torch GradScaler /
MindSpore DynamicLossScaleUpdateCell semantics).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mindspore as ms

from qwen3moe.errors import Qwen3MoeError

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


class PrecisionError(Qwen3MoeError, ValueError):
    """Bad compute dtype / loss-scale setting: one line naming the key."""


def check_compute_dtype(dtype: str, key: str = "compute_dtype") -> str:
    """Normalised dtype name; bfloat16 on a CPU device is an error naming `key`."""
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(str(dtype).lower(), str(dtype).lower())
    if name not in COMPUTE_DTYPES:
        raise PrecisionError(f"{key}: expected one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    if name == "bfloat16" and ms.get_context("device_target") == "CPU":
        raise PrecisionError(f"{key}: bfloat16 compute has no CPU MatMul kernels in MindSpore 2.10; "
                             "use float16 (fp32 master weights + dynamic loss scaling) or float32")
    return name


def set_compute_dtype(model: Any, dtype: str, key: str = "compute_dtype") -> str:
    """Run the decoder layers of `model` (Qwen3MoeForCausalLM) in `dtype`; call before the first
    compiled step. Embedding, final norm, lm_head and the loss stay fp32."""
    name = check_compute_dtype(dtype, key)
    if name == "float16":
        for layer in model.model.layers:
            layer.to_float(ms.float16)
            if layer.is_sparse:  # the fused MoE kernel is fp32-only: composite grouped path
                layer.mlp.use_kernel = False
    return name


@dataclass
class DynamicLossScale:
    """S, updated after every step from whether its gradients were finite."""
    scale: float = 2.0 ** 16
    factor: float = 2.0
    window: int = 1000
    min_scale: float = 1.0
    good_steps: int = 0

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale, self.good_steps = max(self.scale / self.factor, self.min_scale), 0
            return
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale, self.good_steps = self.scale * self.factor, 0

    @classmethod
    def from_scale_sense(cls, value: Any, key: str = "runner_wrapper.scale_sense") -> "DynamicLossScale":
        """A number > 1: the initial scale; 1 (the default): 2^16; a MindSpore Transformers
        DynamicLossScaleUpdateCell mapping: loss_scale_value / scale_factor / scale_window."""
        if isinstance(value, dict):
            known = {"type", "loss_scale_value", "scale_factor", "scale_window"}
            extra = sorted(set(value) - known)
            if extra:
                raise PrecisionError(f"{key}.{extra[0]}: unknown key; expected {', '.join(sorted(known))}")
            return cls(float(value.get("loss_scale_value", 2.0 ** 16)), float(value.get("scale_factor", 2.0)),
                       int(value.get("scale_window", 1000)))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1:
            return cls(float(value) if value > 1 else 2.0 ** 16)
        raise PrecisionError(f"{key}: expected a number >= 1 or a DynamicLossScaleUpdateCell mapping, got {value!r}")
