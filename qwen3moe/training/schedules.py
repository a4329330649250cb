"""Learning-rate schedules as pure functions of the step (0-based: step 0 is the first update).

warmup (all schedules): lr(s) = peak * (s + 1) / warmup for s < warmup   (never 0 at step 0)
constant:  lr(s) = peak after warmup
linear:    lr(s) = min_lr + (peak - min_lr) * (1 - p),   p = (s - warmup) / (total - warmup) in [0, 1]
cosine:    lr(s) = min_lr + (peak - min_lr) * (1 + cos(pi * p)) / 2
Because they depend only on (step, config), resuming a run needs just the step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Schedule:
    kind: str = "cosine"          # constant | linear | cosine
    peak_lr: float = 1e-3
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule kind must be constant, linear or cosine, got {self.kind!r}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError("warmup_steps must be >= 0 and total_steps >= 1")
        if not (self.peak_lr >= 0 and self.min_lr >= 0):  # also refuses NaN
            raise ValueError(f"peak_lr and min_lr must be >= 0, got {self.peak_lr} and {self.min_lr}")

    def __call__(self, step: int) -> float:
        return lr_at(step, **asdict(self))

    def to_dict(self) -> dict:
        return asdict(self)


def warmup_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def decay_progress(step: int, warmup_steps: int, total_steps: int) -> float:
    span = max(1, total_steps - warmup_steps)
    return min(1.0, max(0.0, (step - warmup_steps) / span))


def lr_at(step: int, kind: str = "cosine", peak_lr: float = 1e-3, warmup_steps: int = 0,
          total_steps: int = 1, min_lr: float = 0.0) -> float:
    if step < warmup_steps:
        return peak_lr * warmup_factor(step, warmup_steps)
    if kind == "constant":
        return peak_lr
    p = decay_progress(step, warmup_steps, total_steps)
    if kind == "linear":
        return min_lr + (peak_lr - min_lr) * (1.0 - p)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def constant_with_warmup(peak_lr: float, warmup_steps: int) -> Schedule:
    return Schedule("constant", peak_lr, warmup_steps, max(1, warmup_steps))


def linear_with_warmup(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Schedule:
    return Schedule("linear", peak_lr, warmup_steps, total_steps, min_lr)


def cosine_with_warmup(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Schedule:
    return Schedule("cosine", peak_lr, warmup_steps, total_steps, min_lr)
