"""A small pretraining loop: deterministic token windows -> TrainStep -> logs -> checkpoints.

Data position = number of batches consumed. Batch i is a pure function of (seed, i), so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from qwen3moe.training.checkpoint import (latest_checkpoint, load_training_checkpoint,
                                          save_training_checkpoint)
from qwen3moe.training.step import TrainStep


class TokenWindows:
    """Random windows of `seq_len` tokens from one token array (labels = inputs; the model
    shifts). Batch i draws `batch_size` start offsets from numpy PCG64 seeded by (seed, i).

    TODO: read Megatron .bin/.idx via qwen3moe.io.indexed_dataset / gpt_dataset once present.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 1234) -> None:
        if tokens.ndim != 1 or len(tokens) <= seq_len:
            raise ValueError(f"need a 1-D token array longer than seq_len={seq_len}, got {tokens.shape}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed

    def batch(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, i])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, self.batch_size)
        return np.stack([self.tokens[s:s + self.seq_len] for s in starts]).astype(np.int64)


@dataclass
class TrainerConfig:
    total_steps: int = 100
    log_interval: int = 10
    save_interval: int = 0          # 0 = no training checkpoints
    checkpoint_dir: str | None = None
    keep_last: int = 2
    time_budget_s: float | None = None  # stop early (and say so) when exceeded


@dataclass
class Trainer:
    step_fn: TrainStep
    data: TokenWindows
    config: TrainerConfig
    log: Callable[[str], None] = print
    history: list[dict] = field(default_factory=list)

    def resume(self) -> int:
        """Load the latest checkpoint under checkpoint_dir if any; returns the step to start at."""
        d = self.config.checkpoint_dir
        if not d or latest_checkpoint(d) is None:
            return 0
        st = load_training_checkpoint(d, self.step_fn.model, self.step_fn.optimizer)
        self.step_fn.steps_done = st["step"]
        self.log(f"resumed from {st['path']} at step {st['step']}")
        return st["step"]

    def fit(self) -> list[dict]:
        c, t_start = self.config, time.perf_counter()
        start = self.resume()
        window = []
        for i in range(start, c.total_steps):
            m = self.step_fn(self.data.batch(i))
            self.history.append(m)
            window.append(m)
            if (i + 1) % c.log_interval == 0 or i + 1 == c.total_steps:
                self.log(format_metrics(m, window, c.total_steps))
                window = []
            if c.save_interval and c.checkpoint_dir and (i + 1) % c.save_interval == 0:
                save_training_checkpoint(c.checkpoint_dir, i + 1, self.step_fn.model, self.step_fn.optimizer,
                                         schedule=_schedule_dict(self.step_fn), data_position=i + 1,
                                         keep_last=c.keep_last)
            if c.time_budget_s and time.perf_counter() - t_start > c.time_budget_s:
                self.log(f"time budget {c.time_budget_s:.0f}s reached: stopping after step {i + 1}")
                break
        return self.history


def _schedule_dict(step_fn: TrainStep) -> dict | None:
    s = step_fn.schedule
    return s.to_dict() if hasattr(s, "to_dict") else None


def format_metrics(m: dict, window: list[dict], total: int) -> str:
    """One log line; tokens/s over the logging window (compile time included in the first)."""
    tps = sum(w["tokens"] for w in window) / max(sum(w["step_time_s"] for w in window), 1e-9)
    load = max(m["expert_load_max"]) if m["expert_load_max"] else float("nan")
    return (f"step {m['step']:>5}/{total} | loss {m['loss']:.4f} | lm {m['lm_loss']:.4f} | "
            f"aux {m['aux']:.4f} | z {m['z']:.3f} | grad_norm {m['grad_norm']:.3f} | "
            f"lr {m['lr']:.2e} | {tps:,.0f} tok/s | max expert load {load:.2f}x")
