"""Training metrics: throughput, TFLOP/s and MFU, peak memory, expert load, JSONL/CSV logs, plots.

FLOPs per token (training = forward + backward = 3x forward, forward = 2 FLOPs per multiply-add):
    6 * (active parameters - input embedding)  +  6 * L * S * Hq * D
The second term is attention's QK^T and PV (2 matmuls of S x D per head and token, x 3 for
backward, halved because causal attention reads only the past); the embedding lookup is no
matmul. MFU = achieved FLOP/s / peak FLOP/s, with the peak *measured* at start-up by a
compiled fp32 matmul probe (best of 5), so it is a fraction of what this machine can do.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import resource
import time
from typing import Any

import numpy as np
from mindspore import ops

CSV_FIELDS = ("step", "loss", "lm_loss", "aux", "aux_megatron", "z", "grad_norm", "lr", "tokens_per_s",
              "tflops", "mfu", "peak_rss_mib", "expert_load_max", "expert_load_mean", "skipped_total",
              "step_time_s")


def measure_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a compiled fp32 n x n x n matmul, best of `repeats` (after one warm-up call)."""
    import mindspore as ms
    from mindspore import Tensor

    if n <= 0:
        return float("nan")
    rng = np.random.default_rng(0)
    a = Tensor(rng.standard_normal((n, n), np.float32))
    b = Tensor(rng.standard_normal((n, n), np.float32))
    mm = ms.jit(_matmul)
    mm(a, b).asnumpy()  # compile + warm caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).asnumpy()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def _matmul(x, y):
    return ops.matmul(x, y)


def train_flops_per_token(cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token from active parameters plus causal attention (module docstring)."""
    active = cfg.num_parameters(active=True) - cfg.vocab_size * cfg.hidden_size
    attn = 6 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim
    return 6.0 * active + attn


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def expert_share_matrix(counts_LE: Any) -> np.ndarray:
    """[L, E] token share of each expert per layer (rows sum to 1; zeros for no tokens)."""
    c = np.asarray(counts_LE, np.float64)
    return c / np.maximum(c.sum(-1, keepdims=True), 1.0)


def is_finite_step(m: dict) -> bool:
    """False when the step reported a non-finite loss or gradient norm, or was skipped."""
    if m.get("skipped"):
        return False
    return all(math.isfinite(float(m.get(k, 0.0))) for k in ("loss", "grad_norm"))


class MetricsLogger:
    """Per-interval records -> `<out>/metrics.jsonl` and `<out>/metrics.csv`. A resumed run
    appends after `resume_at(step)` dropped the rows of later steps (it trains them again), so
    each step has one row, as in an uninterrupted run."""

    def __init__(self, out_dir: str, flops_per_token: float = float("nan"),
                 peak_flops: float = float("nan")) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.flops_per_token, self.peak_flops = out_dir, flops_per_token, peak_flops
        self.jsonl_path = os.path.join(out_dir, "metrics.jsonl")
        self.csv_path = os.path.join(out_dir, "metrics.csv")
        new_csv = not os.path.isfile(self.csv_path)
        self._csv_fh = open(self.csv_path, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_fh, CSV_FIELDS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        self.records: list[dict] = []

    def record(self, m: dict, window: list[dict], skipped_total: int) -> dict:
        """Summarise the last step plus window throughput into one record; write it."""
        secs = max(sum(w["step_time_s"] for w in window), 1e-9)
        tps = sum(w["tokens"] for w in window) / secs
        flops = tps * self.flops_per_token
        load = list(m.get("expert_load_max") or [])
        rec = {k: _num(m.get(k)) for k in ("step", "loss", "lm_loss", "aux", "aux_megatron", "z",
                                           "grad_norm", "lr", "step_time_s")}
        rec.update(tokens_per_s=tps, tflops=flops / 1e12, mfu=flops / self.peak_flops if self.peak_flops > 0 else None,
                   peak_rss_mib=peak_rss_mib(), expert_load_max=max(load) if load else None,
                   expert_load_mean=float(np.mean(load)) if load else None, skipped_total=skipped_total,
                   expert_load_per_layer=load, skipped=bool(m.get("skipped", False)))
        if m.get("expert_share") is not None:
            rec["expert_share"] = np.asarray(m["expert_share"]).round(5).tolist()
        self.records.append(rec)
        with open(self.jsonl_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        self._csv.writerow({k: ("" if rec.get(k) is None else rec[k]) for k in CSV_FIELDS})
        self._csv_fh.flush()
        return rec

    def resume_at(self, step: int) -> None:
        """Drop rows of steps after `step` (and a line cut short by a kill), atomically."""
        from qwen3moe.io.atomic import atomic_write_text

        if os.path.isfile(self.jsonl_path):
            with open(self.jsonl_path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
            atomic_write_text(self.jsonl_path, "".join(f"{line}\n" for line in lines if _row_step(line) <= step))
        self._csv_fh.close()
        with open(self.csv_path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if _float(r.get("step")) <= step]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.csv_path, buf.getvalue())
        self._csv_fh = open(self.csv_path, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_fh, CSV_FIELDS, extrasaction="ignore")

    def close(self) -> None:
        self._csv_fh.close()


def _row_step(line: str) -> float:
    """A JSONL row's step; +inf (dropped) for a line a kill cut short."""
    try:
        return _float(json.loads(line).get("step"))
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.inf


def _num(v: Any) -> Any:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf


def format_record(rec: dict, total: int) -> str:
    """One human-readable log line from a MetricsLogger record."""
    def f(k: str, spec: str) -> str:
        v = rec.get(k)
        return format(v, spec) if isinstance(v, (int, float)) else str(v)
    mfu = f"{rec['mfu']:.1%}" if isinstance(rec.get("mfu"), float) else "n/a"
    load = (f"{rec['expert_load_max']:.2f}x/{rec['expert_load_mean']:.2f}x"
            if rec.get("expert_load_max") is not None else "n/a")
    return (f"step {int(rec['step']):>5}/{total} | loss {f('loss', '.4f')} | aux {f('aux', '.4f')} | "
            f"z {f('z', '.3f')} | grad_norm {f('grad_norm', '.3f')} | lr {f('lr', '.2e')} | "
            f"{rec['tokens_per_s']:,.0f} tok/s | {rec['tflops']:.3f} TFLOP/s | MFU {mfu} | "
            f"peak RSS {rec['peak_rss_mib']:.0f} MiB | expert load max/mean {load} | "
            f"skipped {rec['skipped_total']}")


def write_plots(history: list[dict], out_dir: str) -> list[str]:
    """loss.png (loss vs step) and expert_load.png (layer x expert share heatmap, last window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    pts = [(m["step"], m["lm_loss"]) for m in history if math.isfinite(float(m.get("lm_loss", float("nan"))))]
    fig, ax = plt.subplots(figsize=(7, 4))
    if pts:
        ax.plot(*zip(*pts), label="lm loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    paths.append(os.path.join(out_dir, "loss.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    shares = [m["expert_share"] for m in history[-10:] if m.get("expert_share") is not None]
    if shares:
        mat = np.mean([np.asarray(s) for s in shares], axis=0)
        fig, ax = plt.subplots(figsize=(min(12, 3 + 0.15 * mat.shape[1]), 1.5 + 0.3 * mat.shape[0]))
        im = ax.imshow(mat * mat.shape[1], aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("sparse layer")
        ax.set_title("token share x E (1 = balanced), last steps")
        fig.colorbar(im, ax=ax)
        paths.append(os.path.join(out_dir, "expert_load.png"))
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths
