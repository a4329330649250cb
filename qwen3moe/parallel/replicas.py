"""Pure data parallelism (tp = pp = ep = 1, no ZeRO-1): every rank runs the compiled single-device
`TrainStep` on its rows of each micro-batch, and the gradient buffers are averaged over the ranks
inside a compiled graph (one AllReduce per buffer) before the finiteness check, clipping and
AdamW, so the replicas stay identical. Why not parallel/trainer.py's per-rank engine: it runs in
PyNative and recomputes each stage's forward in its backward, far slower (bench/RESULTS.md,
"Parallel pretraining").

Same result as one process on the global batch (tests/test_dist_parallel.py checks the loss
curve, lm_loss and aux against TrainStep), with dp ranks, micro-batch m of M, n_r / N the
valid labels of rank r / of the whole micro-batch, gradients averaged (sum / dp):
  LM loss   rank r weights its micro-batch mean by dp * n_r / N (times 1 / M): the average of
            the rank gradients is the gradient of sum(CE) / N.
  aux "hf" / "megatron" (per micro-batch): TrainStep's linear "global" form with the counts C_e
            and token count of micro-batch m summed over the ranks (one host AllReduce of E + 1
            numbers, from a forward-only pass), w_e = dp * E * C_e / N^2 / M, on HF's scale
            (megatron: coefficient / K).
  aux "global": C, N pooled over micro-batches and ranks (TrainStep's stats_reducer, aux.py).
  aux "seq", z-loss: means over sequences / tokens; every rank has the same number of rows, so
            the mean over ranks is the global mean.
Checkpoints are the single-process training checkpoints (`output_dir/checkpoint`, written by
rank 0; every rank resumes from them), exportable with `qwen3moe export`.
Shapes: B global rows of a micro-batch, b = B / dp rows per rank, E experts.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.router.losses import switch_aux_weights
from qwen3moe.training.step import TrainStep, as_batch, expert_load
from qwen3moe.training.sync import fetch

_ROWS = ("input_ids", "labels", "attention_mask", "position_ids")


class _AverageBuffers(nn.Cell):
    """Compiled: every gradient buffer <- AllReduce-sum over the world group / dp, as one flat
    message (per-buffer AllReduces cost one collective latency each)."""

    def __init__(self, graph, dp: int) -> None:
        super().__init__(auto_prefix=False)
        self.graph, self.inv = graph, 1.0 / dp
        self.all_reduce = ops.AllReduce()
        self.sizes = [int(np.prod(a.shape)) for a in graph.acc]

    @ms.jit
    def construct(self, tick):
        flat = self.all_reduce(ops.concat([a.reshape(-1) for a in self.graph.acc])) * self.inv
        parts = ops.split(flat, self.sizes)
        for a, p in zip(self.graph.acc, parts):
            ops.assign(a, p.reshape(a.shape))
        return tick


def valid_labels(labels_BS: np.ndarray) -> float:
    """Labels the LM loss counts (the model shifts: position t predicts labels[t + 1])."""
    return float((np.asarray(labels_BS)[:, 1:] != -100).sum())


def rank_rows(batch, rank: int, dp: int) -> dict:
    """Rank `rank`'s rows [rank * b, (rank + 1) * b) of a global micro-batch."""
    b = as_batch(batch)
    B = np.asarray(b["input_ids"]).shape[0]
    if B % dp:
        raise ValueError(f"runner_config.batch_size {B} is not divisible by data_parallel {dp}")
    r0, r1 = rank * B // dp, (rank + 1) * B // dp
    return {k: np.asarray(v)[r0:r1] for k, v in b.items() if k in _ROWS}


class ReplicaTrainStep(TrainStep):
    """TrainStep for one data-parallel rank: called with the GLOBAL batch (or micro-batch list),
    it trains on its rows and reports the metrics of the global batch (module docstring).
    `all_reduce(np.ndarray) -> np.ndarray` sums over the ranks (host side)."""

    def __init__(self, *args, rank: int, dp: int, all_reduce, aux_kind: str, log_every: int = 0,
                 log=lambda s: None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rank, self.dp, self.host_all_reduce, self.aux_kind = rank, dp, all_reduce, aux_kind
        self.skip_nonfinite, self.log_every, self.log = True, log_every, log
        self._average = _AverageBuffers(self.graph, dp)
        self._label_counts: list[tuple[float, float]] = []

    def _micro_weights(self, prepped, S):
        m = len(prepped)
        lm_ws = [S / m * self.dp * n / max(N, 1.0) for n, N in self._label_counts]
        if self.aux_kind == "global":
            return lm_ws, [self._global_weights(prepped, S)] * m
        if self.aux_kind not in ("hf", "megatron"):  # none / seq: TrainStep's own terms
            return lm_ws, [Tensor(np.zeros(self.E, np.float32))] * m
        aux_ws = []
        for args in prepped:  # forward-only counts of this micro-batch, summed over the ranks
            c, n = self._forward_counts(args)
            tot = self.host_all_reduce(np.concatenate([c, [n]]))
            C, N = tot[:-1], max(float(tot[-1]), 1.0)
            aux_ws.append(Tensor((S / m * self.dp * switch_aux_weights(C, N)).astype(np.float32)))
        return lm_ws, aux_ws

    def _after_backward(self, metrics: dict) -> dict:
        # wait for the in-graph AllReduce before the host one: left running, it overlapped the
        # host collective and a step took 0.25 s instead of 0.06-0.08 s (tiny preset, DP=2)
        fetch(self._average(Tensor(0.0, ms.float32)))
        counts = np.asarray(metrics["counts"], np.float64)
        local = np.concatenate([[metrics["loss"], metrics["lm_part"], metrics["aux_part"], metrics["aux"],
                                 metrics["z"]], counts.ravel()])
        tot = self.host_all_reduce(local)
        loss, lm, aux_part, aux_local, z = tot[:5] / self.dp
        aux = aux_part if self.aux_kind in ("hf", "megatron", "global") else aux_local
        return {**metrics, "loss": loss, "lm_loss": lm, "aux": aux, "aux_megatron": aux / self.K, "z": z,
                "tokens": metrics["tokens"] * self.dp, **expert_load(tot[5:].reshape(counts.shape))}

    def __call__(self, batch) -> dict:
        micro = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        self._label_counts = []
        mine = []
        for b in micro:
            rows = rank_rows(b, self.rank, self.dp)
            self._label_counts.append((valid_labels(rows["labels"]), valid_labels(as_batch(b)["labels"])))
            mine.append(rows)
        m = super().__call__(mine if isinstance(batch, (list, tuple)) else mine[0])
        if self.log_every and (m["step"] % self.log_every == 0):
            self.log(f"rank {self.rank} step {m['step']} loss {m['loss']:.6f} grad_norm {m['grad_norm']:.4f} "
                     f"lr {m['lr']:.3e}")
        return m


def supports(cfg, mesh) -> bool:
    """Pure dp without ZeRO-1 (and without pipeline micro-batches, whose per-micro-batch aux the
    engine defines): this module's compiled path; anything else: parallel/trainer.py."""
    zero1 = bool(cfg.parallel.get("enable_parallel_optimizer", False))
    return (mesh.dp > 1 and mesh.tp == mesh.pp == mesh.ep == 1 and not mesh.sp and not zero1
            and mesh.micro_batch_num == 1)


def train(cfg, rank: int, dp: int, log=lambda s: None) -> int:
    """`pretrain --use_parallel` for a pure data-parallel layout (see `supports`); `log` gets
    this rank's loss lines (and rank 0's metrics, checkpoints and plots)."""
    from qwen3moe.parallel.aux import dp_stats_reducer
    from qwen3moe.parallel.comm import MindSporeComm, aggregate_peak
    from qwen3moe.training.metrics import MetricsLogger, train_flops_per_token
    from qwen3moe.training.recipe import (build_data, build_model, requested_samples, step_arguments,
                                          total_steps, trainer_config)
    from qwen3moe.training.task_config import TaskConfigError
    from qwen3moe.training.trainer import Trainer

    if cfg.runner_config.batch_size % dp:
        raise TaskConfigError(f"runner_config.batch_size {cfg.runner_config.batch_size} is not divisible by "
                       f"parallel_config.data_parallel {dp} (each replica takes batch_size / dp rows)")
    comm = MindSporeComm(initialise=False)  # parallel/pretrain.py ran init()
    host_sum = lambda x: comm.all_reduce(Tensor(np.asarray(x, np.float32))).asnumpy().astype(np.float64)  # noqa: E731
    ms.set_seed(cfg.seed)
    model = build_model(cfg)
    data, samples = build_data(cfg, requested_samples(cfg))
    steps = total_steps(cfg, samples)
    mt = cfg.moe_training()
    kind = mt["aux_mode"] if mt["aux_coef"] else "none"
    K = model.config.num_experts_per_tok
    coef = mt["aux_coef"] / (K if kind == "megatron" else 1)  # the linear form is on HF's scale
    tc = trainer_config(cfg, model, steps)
    step = ReplicaTrainStep(model, aux_coef=coef, z_coef=mt["z_coef"], aux_mode="seq" if kind == "seq" else "global",
                            rank=rank, dp=dp, all_reduce=host_sum, aux_kind=kind, log_every=tc.log_interval, log=log,
                            stats_reducer=dp_stats_reducer(comm) if kind == "global" else None,
                            **step_arguments(cfg, model, steps))
    seq = cfg.train_dataset.data_loader.config.seq_length
    peak = aggregate_peak(cfg.runner_config.mfu_probe_size)  # a collective: every rank
    metrics = MetricsLogger(cfg.output_dir, train_flops_per_token(model.config, seq), peak) if rank == 0 else None
    if rank:  # replicas are identical: rank 0 alone writes checkpoints, plots and metrics
        tc = dataclasses.replace(tc, save_interval=0, save_at_end=False, plot_dir=None)
    trainer = Trainer(step, data, tc, log=log if rank == 0 else (lambda s: None), metrics=metrics)
    t0 = time.perf_counter()
    trainer.fit()
    log(f"rank {rank}: done, {len(trainer.history)} steps on {dp} data-parallel replicas in "
        f"{time.perf_counter() - t0:.1f}s")
    return 0
