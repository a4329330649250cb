"""`qwen3moe pretrain --use_parallel True --parallel_config.* ...` under `qwen3moe launch`:
the task config's data, schedule and AdamW settings, the model sharded over the processes
(`ParallelLM`: TP / EP / PP with 1F1B / DP with bucketed all-reduce), global-norm clipping over
the unique shards, ZeRO-1 when `parallel.enable_parallel_optimizer` is true (as in MindSpore
Transformers' yaml), loss logged on every rank, metrics.jsonl / metrics.csv from rank 0, and
training checkpoints `<output_dir>/checkpoint_sharded/step_<N>` every
CheckpointMonitor.save_checkpoint_steps and at the end (`train_state.py`: per-rank shards +
optimizer state; `resume_training: True` with `load_checkpoint` continues bit-exactly; export
a step folder with `checkpoint.export_hf`). The loop is the single-process one,
training/trainer.Trainer, driving `ParallelTrainStep` (TrainStep's interface) with a
`ShardedCheckpointer`.
Router loss: the switch loss pooled over layers per global micro-batch (all dp ranks' tokens).
`moe_router_load_balancing_type` maps as in single-process `TrainStep`: "aux_loss" (Megatron
normalisation, HF value / K) uses coefficient coef / K on the HF-scale loss, "hf" coef, "none" 0;
with micro_batch_num = 1 and no gradient accumulation the loss equals `TrainStep`'s. "global"
(over all micro-batches), "seq" and a z-loss are refused with a one-line error.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np

from qwen3moe.parallel.mesh import Mesh, MeshError
from qwen3moe.parallel.train_state import SHARDED_DIR, ShardedCheckpointer, resume_path
from qwen3moe.training.task_config import TaskConfigError

Log = Callable[[str], None]


def build(cfg, mesh, rank: int, coll):
    from qwen3moe.parallel.trainer import ParallelLM
    from qwen3moe.training.recipe import build_model

    ck, aux = cfg.load_checkpoint, hf_aux_coef(cfg, mesh)
    resume = resume_path(cfg)
    if resume:  # full tensors from every rank file: re-shards to this layout
        from qwen3moe.parallel.checkpoint import load_sharded

        full = load_sharded(resume)
        pl = ParallelLM(cfg.model_config(), mesh, full.__getitem__, coll=coll, rank=rank)
        del full
    elif ck and os.path.isfile(os.path.join(ck, "config.json")):
        pl = ParallelLM.from_pretrained(ck, mesh, coll=coll, rank=rank)
    else:  # the same seeded initialisation as single-process pretrain, then sliced
        model = build_model(cfg)
        full = {p.name: p.asnumpy().astype(np.float32) for p in model.get_parameters()}
        pl = ParallelLM(model.config, mesh, full.__getitem__, coll=coll, rank=rank)
        del model, full
    pl.cfg.router_aux_loss_coef = aux
    return pl


def hf_aux_coef(cfg, mesh) -> float:
    """The coefficient on the HF-scale pooled switch loss that ParallelLM computes."""
    mt = cfg.moe_training()
    key = "model.model_config"
    if mt["z_coef"]:
        raise TaskConfigError(f"{key}.moe_z_loss_coeff: the router z-loss is not implemented with use_parallel "
                       f"(got {mt['z_coef']}); set it to 0 or train without --use_parallel")
    if mt["aux_mode"] == "seq" or (mt["aux_mode"] == "global" and mesh.micro_batch_num > 1):
        raise TaskConfigError(f"{key}.moe_router_load_balancing_type: {mt['aux_mode']!r} aux loss is not implemented "
                       f"with use_parallel{' and micro_batch_num > 1' if mt['aux_mode'] == 'global' else ''}; "
                       "use aux_loss, hf or none")
    return mt["aux_coef"] / cfg.model_config().num_experts_per_tok if mt["aux_mode"] == "megatron" else mt["aux_coef"]


def global_grad_norm(pl, grads: dict) -> float:
    """sqrt of the sum of squares over every distinct shard (one replica of each)."""
    from qwen3moe.parallel.step import owns_shard

    total = 0.0
    for per in pl.entries:
        for n, entries in per.items():
            for p, info in entries:
                if owns_shard(info, n, pl.mesh):
                    total += float(np.square(grads[p.name], dtype=np.float64).sum())
    if pl.real:
        from mindspore import Tensor, ops

        total = float(ops.AllReduce()(Tensor(np.float32(total))).asnumpy())
    return math.sqrt(total)


def mesh_of(cfg) -> Mesh:
    """The task config's parallel_config as a Mesh."""
    pc = cfg.parallel_config
    return Mesh(dp=pc.data_parallel, tp=pc.model_parallel, pp=pc.pipeline_stage, ep=pc.expert_parallel,
                sp=pc.use_seq_parallel, micro_batch_num=pc.micro_batch_num)


def check_request(cfg, world_size: int) -> Mesh:
    """The layout checked against the model and the process count, before any process does work
    (the launcher calls it before starting the workers, each worker again after init)."""
    from qwen3moe.training.recipe import model_config

    mc, mesh = model_config(cfg), mesh_of(cfg)
    mesh.validate(num_layers=mc.num_hidden_layers, num_heads=mc.num_attention_heads,
                  num_kv_heads=mc.num_key_value_heads, num_experts=mc.num_experts or 0, world_size=world_size)
    return mesh


def train(cfg, log: Log = lambda s: None) -> int:
    """Train on the launched processes; `log` gets this rank's log lines (every rank's loss
    lines, rank 0's metrics, checkpoints and notes)."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    from qwen3moe.parallel.process import ProcessCollectives
    from qwen3moe.training.recipe import build_data, build_schedule, requested_samples, total_steps

    if not os.environ.get("MS_ROLE"):  # msrun sets it; without it init() has no cluster to join
        raise MeshError("use_parallel with world size > 1 needs the workers started by msrun: "
                        "qwen3moe launch --nproc N -- pretrain --config ... --use_parallel True")
    ms.set_device("CPU")
    ms.set_seed(cfg.seed)
    init()
    rank, size = get_rank(), get_group_size()
    mesh = check_request(cfg, size)
    from qwen3moe.parallel import compiled

    if compiled.supports(cfg, mesh):  # compiled per-rank step (parallel/step.py)
        return compiled.train(cfg, mesh, rank, log)
    pl = build(cfg, mesh, rank, ProcessCollectives(mesh, rank))
    data, samples = build_data(cfg, requested_samples(cfg))
    steps = total_steps(cfg, samples)
    sched = build_schedule(cfg, steps)
    opt = build_optimizer(cfg, pl, sched(0), rank, log)
    fit(cfg, ParallelTrainStep(pl, opt, sched, cfg, rank, steps, log), data, steps, rank, log)
    log(f"rank {rank}: done, {steps} steps on {size} processes; shards in "
        f"{os.path.join(cfg.output_dir, SHARDED_DIR)}")
    return 0


def fit(cfg, step, data, steps: int, rank: int, log: Log) -> list[dict]:
    """The one training loop (training/trainer.Trainer) over the sharded step: logging intervals,
    checkpoints every save interval and at the end (sharded train state), resume, non-finite
    step accounting; rank 0 writes metrics.jsonl / metrics.csv and the plots."""
    from qwen3moe.parallel.comm import aggregate_peak
    from qwen3moe.training.metrics import MetricsLogger, train_flops_per_token
    from qwen3moe.training.trainer import Trainer, TrainerConfig

    ck = cfg.callback("CheckpointMonitor")
    seq = cfg.train_dataset.data_loader.config.seq_length
    peak = aggregate_peak(cfg.runner_config.mfu_probe_size)  # a collective: every rank
    metrics = MetricsLogger(cfg.output_dir, train_flops_per_token(step.pl.cfg, seq), peak) if rank == 0 else None
    # no time budget: ranks stopping at different steps would leave the others in a collective
    tc = TrainerConfig(total_steps=steps, log_interval=step.log_every,
                       save_interval=int(ck.get("save_checkpoint_steps", 0) or 0),
                       checkpoint_dir=os.path.join(cfg.output_dir, SHARDED_DIR),
                       keep_last=int(ck.get("keep_checkpoint_max", 2)), nan_abort_after=cfg.runner_config.nan_abort_after,
                       save_at_end=True, progress=False, plot_dir=cfg.output_dir if rank == 0 else None)
    trainer = Trainer(step, data, tc, log=log if rank == 0 else (lambda s: None), metrics=metrics,
                      checkpointer=ShardedCheckpointer(cfg, step, rank, log))
    return trainer.fit()


class ParallelTrainStep:
    """TrainStep's interface over the sharded model: called with a global batch (or its list of
    accumulation micro-batches) it runs the 1F1B pipeline (`ParallelLM.loss_and_grads`), the dp
    gradient all-reduce, global-norm clipping over the unique shards (torch clip_grad_norm_:
    scale by min(1, max / (norm + 1e-6))), the LR schedule and the sharded AdamW, and returns
    the step's metrics. Every rank logs its loss line every `log_every` steps."""

    def __init__(self, pl, optimizer, schedule, cfg, rank: int, total: int, log: Log) -> None:
        w = cfg.runner_wrapper
        self.pl, self.optimizer, self.schedule = pl, optimizer, schedule
        self.rank, self.total, self.log = rank, total, log
        self.clip = w.max_grad_norm if w.use_clip_grad else None
        loss_cb = cfg.callback("MFLossMonitor")
        self.log_every = max(1, int(loss_cb.get("per_print_times", cfg.runner_config.log_interval)))
        self.model, self.steps_done = None, 0  # the sharded state is saved by ShardedCheckpointer

    def __call__(self, batch) -> dict:
        import time

        from qwen3moe.parallel.dp import allreduce_grads

        t0, i = time.perf_counter(), self.steps_done
        ids, labels, pos = _global_batch(batch)
        groups = len(batch) if isinstance(batch, list) else 1  # accumulation: TrainStep's per-micro-batch means
        loss, grads = self.pl.loss_and_grads(ids, labels, pos, groups)
        allreduce_grads(self.pl, grads)
        norm = global_grad_norm(self.pl, grads)
        if self.clip is not None:
            coef = min(1.0, self.clip / (norm + 1e-6))
            grads = {k: g * np.float32(coef) for k, g in grads.items()}
        lr = self.schedule(i)
        for o in self.optimizer.optimizers():
            o.set_lr(lr)
        self.optimizer.step(grads)
        self.steps_done = i + 1
        value, aux_part = next(iter(loss.values())), self.pl.last_aux
        coef, K = self.pl.cfg.router_aux_loss_coef, self.pl.cfg.num_experts_per_tok
        aux = aux_part / coef if coef else None  # HF's aux value (the loss holds coef * aux)
        if (i + 1) % self.log_every == 0 or i + 1 == self.total:
            self.log(f"rank {self.rank} step {i + 1}/{self.total} loss {value:.6f} grad_norm {norm:.4f} "
                     f"lr {lr:.3e}")
        return {"step": i + 1, "loss": value, "lm_loss": value - aux_part, "aux": aux,
                "aux_megatron": None if aux is None else aux / K, "z": 0.0, "grad_norm": norm, "lr": lr,
                "tokens": int(ids.size), "step_time_s": time.perf_counter() - t0, "expert_load_max": [],
                "skipped": False}


def build_optimizer(cfg, pl, lr: float, rank: int, log: Log = lambda s: None):
    """ShardedAdamW from the optimizer section; ZeRO-1 with parallel.enable_parallel_optimizer."""
    from qwen3moe.parallel.dp import ShardedAdamW
    from qwen3moe.training.recipe import optimizer_arguments

    o = cfg.optimizer
    zero1 = bool(cfg.parallel.get("enable_parallel_optimizer", False)) and pl.mesh.dp > 1
    if zero1 and o.no_decay_norms_and_biases:
        raise TaskConfigError("parallel.enable_parallel_optimizer (ZeRO-1) needs a uniform weight decay: set "
                              "optimizer.no_decay_norms_and_biases to False")
    if rank == 0:
        log(f"optimizer: AdamW{' with ZeRO-1 (moments sharded over dp)' if zero1 else ''}")
    return ShardedAdamW(pl, zero1=zero1, lr=lr, **optimizer_arguments(cfg))


def _global_batch(batch):
    """A pretrain batch (or its list of accumulation micro-batches) as one global batch:
    (input_ids, labels, position_ids or None); position_ids come with reset_position_ids."""
    from qwen3moe.training.step import as_batch

    parts = [as_batch(b) for b in (batch if isinstance(batch, list) else [batch])]
    cat = lambda key: np.concatenate([np.asarray(b[key]) for b in parts])  # noqa: E731
    pos = cat("position_ids") if "position_ids" in parts[0] else None
    return cat("input_ids"), cat("labels"), pos
