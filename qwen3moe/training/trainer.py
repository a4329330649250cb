"""A small pretraining loop: deterministic token windows -> TrainStep -> logs -> checkpoints.

Data position = number of batches consumed. Batch i is a pure function of (seed, i), so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qwen3moe.errors import Qwen3MoeError
from qwen3moe.training.checkpoint import (latest_checkpoint, load_training_checkpoint, remove_leftovers,
                                          save_training_checkpoint)
from qwen3moe.training.metrics import MetricsLogger, format_record, is_finite_step, write_plots
from qwen3moe.training.step import TrainStep
from qwen3moe.training.task_config import TaskConfigError


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
    resume: bool = True             # load the latest checkpoint under checkpoint_dir if present
    resume_from: str | None = None  # or this checkpoint (a step folder or a root)
    nan_abort_after: int = 10       # abort after this many consecutive non-finite steps
    plot_dir: str | None = None     # loss.png / expert_load.png at each checkpoint and the end
    save_at_end: bool = False       # also checkpoint the final step
    progress: bool | None = None    # tqdm bar; None = when stderr is a TTY
    checkpoint_extra: dict = field(default_factory=dict)  # stored in trainer_state.json
    resume_override: tuple[str, ...] = ()  # "model" / "data": resume although these differ


class TrainingAborted(Qwen3MoeError, RuntimeError):
    """Too many consecutive non-finite steps."""


class ResumeMismatchError(TaskConfigError):
    """The checkpoint to resume was trained with another model config or data geometry."""


# checkpoint_extra entries compared on resume: (override name, key, YAML prefix of its fields)
RESUME_CHECKS = (("model", "model_config", "model.model_config."), ("data", "data", ""))


def check_resume(saved: dict, current: dict, override: tuple[str, ...], path: str) -> None:
    """Refuse a checkpoint whose model config or data geometry (trainer_state extra) differs from
    this run's: loading it would silently drop weights, or skip and repeat samples."""
    current = json.loads(json.dumps(current))  # the saved side went through JSON too
    for kind, key, prefix in RESUME_CHECKS:
        old, new = saved.get(key), current.get(key)
        if kind in override or not isinstance(old, dict) or not isinstance(new, dict):
            continue  # overridden, or not recorded (checkpoints written before this check)
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diff:
            k = diff[0]
            more = f" (and {len(diff) - 1} more: {', '.join(diff[1:4])})" if len(diff) > 1 else ""
            raise ResumeMismatchError(
                f"resume from {path}: {prefix}{k} is {old.get(k)!r} in the checkpoint but {new.get(k)!r} in "
                f"this run{more}; use the checkpoint's value, or set resume_override: [{kind}] "
                f"(--resume_override {kind}) to continue anyway")


@dataclass
class Trainer:
    step_fn: TrainStep
    data: TokenWindows
    config: TrainerConfig
    log: Callable[[str], None] = lambda text: None  # the caller decides where lines go
    history: list[dict] = field(default_factory=list)
    metrics: MetricsLogger | None = None
    skipped_total: int = 0
    skipped_run: int = 0
    # how the step's state is saved and resumed when it is not step_fn.model / .optimizer in one
    # process (parallel/train_state.ShardedCheckpointer): .resume(trainer) -> start step,
    # .save(trainer, step) -> path
    checkpointer: Any = None

    def resume(self) -> int:
        """Load the latest checkpoint (resume_from, else checkpoint_dir) if any; returns the start step."""
        if self.checkpointer is not None:
            return self.checkpointer.resume(self)
        c = self.config
        if c.checkpoint_dir:
            remove_leftovers(c.checkpoint_dir)  # killed saves' temp folders, even with nothing to resume (one listdir)
        src = c.resume_from or (c.checkpoint_dir if c.resume else None)
        if not src or (not c.resume_from and latest_checkpoint(src) is None):
            return 0
        st = load_training_checkpoint(src, self.step_fn.model, self.step_fn.optimizer,
                                      check=lambda state, path: check_resume(
                                          state.get("extra") or {}, c.checkpoint_extra, c.resume_override, path))
        self.step_fn.steps_done = st["step"]
        self.skipped_total = int((st.get("extra") or {}).get("skipped_total", 0))
        self.log(f"resumed from {st['path']} at step {st['step']}")
        return st["step"]

    def fit(self) -> list[dict]:
        c, t_start = self.config, time.perf_counter()
        start = self.resume()
        if start and self.metrics is not None:
            self.metrics.resume_at(start)
        bar = _progress(c, start)
        say = self.log if bar is None else _around_bar(bar, self.log)
        window: list[dict] = []
        try:
            for i in range(start, c.total_steps):
                m = self.step_fn(self.data.batch(i))
                self.history.append(m)
                window.append(m)
                self._count_nonfinite(m, say)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4f}")
                if (i + 1) % c.log_interval == 0 or i + 1 == c.total_steps:
                    say(self._log_line(m, window))
                    window = []
                if c.save_interval and c.checkpoint_dir and (i + 1) % c.save_interval == 0:
                    self.save(i + 1)
                if c.time_budget_s and time.perf_counter() - t_start > c.time_budget_s:
                    say(f"time budget {c.time_budget_s:.0f}s reached: stopping after step {i + 1}")
                    break
        finally:
            if bar is not None:
                bar.close()
        self._finish(say)
        return self.history

    def _count_nonfinite(self, m: dict, say: Callable[[str], None]) -> None:
        if is_finite_step(m):
            self.skipped_run = 0
            return
        self.skipped_total += 1
        self.skipped_run += 1
        say(f"step {m['step']}: non-finite loss {m['loss']} / grad norm {m['grad_norm']}: "
            f"{'update skipped' if m.get('skipped') else 'NOT skipped (skip_nonfinite off)'} "
            f"({self.skipped_run} in a row, {self.skipped_total} in total)")
        if self.config.nan_abort_after and self.skipped_run >= self.config.nan_abort_after:
            raise TrainingAborted(f"aborting: {self.skipped_run} consecutive steps with non-finite loss or "
                                  f"gradients (last at step {m['step']}); lower the learning rate or check the data")

    def _log_line(self, m: dict, window: list[dict]) -> str:
        if self.metrics is None:
            return format_metrics(m, window, self.config.total_steps)
        return format_record(self.metrics.record(m, window, self.skipped_total), self.config.total_steps)

    def save(self, step: int) -> str:
        c = self.config
        if self.checkpointer is not None:
            path = self.checkpointer.save(self, step)
        else:
            path = save_training_checkpoint(c.checkpoint_dir, step, self.step_fn.model, self.step_fn.optimizer,
                                            schedule=_schedule_dict(self.step_fn), data_position=step,
                                            keep_last=c.keep_last,
                                            extra={**c.checkpoint_extra, "skipped_total": self.skipped_total})
        if c.plot_dir and self.history:
            write_plots(self.history, c.plot_dir)
        return path

    def _finish(self, say: Callable[[str], None]) -> None:
        c = self.config
        if self.history and c.save_at_end and c.checkpoint_dir:
            last = int(self.history[-1]["step"])
            if not c.save_interval or last % c.save_interval:
                say(f"saved {self.save(last)}")
        if c.plot_dir and self.history:
            say("plots: " + ", ".join(write_plots(self.history, c.plot_dir)))
        if self.skipped_total:
            say(f"non-finite steps skipped: {self.skipped_total}")
        if self.metrics is not None:
            self.metrics.close()


def _around_bar(bar, log: Callable[[str], None]) -> Callable[[str], None]:
    """Log through `log` with the progress bar cleared first and redrawn after."""
    def say(text: str) -> None:
        with bar.external_write_mode(file=sys.stderr):
            log(text)
    return say


def _progress(c: TrainerConfig, start: int):
    """A tqdm bar on stderr when interactive (or forced); None otherwise."""
    show = sys.stderr.isatty() if c.progress is None else c.progress
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=c.total_steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)


def _schedule_dict(step_fn: TrainStep) -> dict | None:
    s = step_fn.schedule
    return s.to_dict() if hasattr(s, "to_dict") else None


def format_metrics(m: dict, window: list[dict], total: int) -> str:
    """One log line; tokens/s over the logging window (compile time included in the first)."""
    tps = sum(w["tokens"] for w in window) / max(sum(w["step_time_s"] for w in window), 1e-9)
    load = max(m["expert_load_max"]) if m["expert_load_max"] else float("nan")
    return (f"step {m['step']:>5}/{total} | loss {m['loss']:.4f} | lm {m['lm_loss']:.4f} | "
            f"aux {_fmt(m['aux'], '.4f')} | z {m['z']:.3f} | grad_norm {m['grad_norm']:.3f} | "
            f"lr {m['lr']:.2e} | {tps:,.0f} tok/s | max expert load {load:.2f}x")


def _fmt(v, spec: str) -> str:
    """A metric that may be unknown (None: e.g. the aux value of a run without aux loss)."""
    return "n/a" if v is None else format(v, spec)
