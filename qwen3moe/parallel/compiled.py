"""`pretrain --use_parallel` on the compiled per-rank step (parallel/step.py ParallelTrainStep;
pipeline_step.PipelineTrainStep with pp > 1 or micro_batch_num > 1) for every layout: pure data
parallelism (the whole model per rank), tensor (with or without sequence parallel), expert and
pipeline parallelism and their products (this rank's model, or its pipeline stage, from
parallelize.py with the vocab-parallel cross-entropy), each with or without ZeRO-1.

Checkpoints: pure dp without ZeRO-1 writes single-process training checkpoints from rank 0
(`output_dir/checkpoint`, replicas are identical; every rank resumes from them, exportable with
`qwen3moe export`); otherwise ranks hold different state (shards, ZeRO-1 chunks): the sharded
train state (`output_dir/checkpoint_sharded`, train_state.py; weights re-shard, the optimizer
state resumes with the same layout).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable

from qwen3moe.training.task_config import TaskConfigError

Log = Callable[[str], None]


def zero1_enabled(cfg, mesh) -> bool:
    return bool(cfg.parallel.get("enable_parallel_optimizer", False)) and mesh.dp > 1


def sharded_state(cfg, mesh) -> bool:
    """Whether ranks hold different state (shards or ZeRO-1 chunks): sharded checkpoints."""
    return zero1_enabled(cfg, mesh) or mesh.tp * mesh.ep * mesh.pp > 1


@dataclasses.dataclass
class RankShards:
    """What the sharded checkpointer saves of this rank (checkpoint.save_sharded's view):
    entries[stage] = {stage-local rank: [(Parameter, ShardInfo)]}, only this rank's filled."""
    mesh: object
    cfg: object
    entries: list


def train(cfg, mesh, rank: int, log: Log = lambda s: None) -> int:
    """Train this rank; `log` gets its loss lines (and rank 0's metrics, checkpoints, plots)."""
    import mindspore as ms

    from qwen3moe.parallel.comm import aggregate_peak
    from qwen3moe.parallel.process import ProcessCollectives
    from qwen3moe.training.metrics import MetricsLogger, train_flops_per_token
    from qwen3moe.training.recipe import build_data, requested_samples, total_steps, trainer_config
    from qwen3moe.training.trainer import Trainer

    r = cfg.runner_config
    if r.batch_size % mesh.dp:
        raise TaskConfigError(f"runner_config.batch_size {r.batch_size} is not divisible by parallel_config."
                              f"data_parallel {mesh.dp} (each replica takes batch_size / dp rows)")
    cut = math.lcm(r.gradient_accumulation_steps, mesh.micro_batch_num) // r.gradient_accumulation_steps
    if r.batch_size % (cut * mesh.dp):
        raise TaskConfigError(f"runner_config.batch_size {r.batch_size} is not divisible by {cut} pipeline "
                              f"micro-batches x data_parallel {mesh.dp} (parallel_config.micro_batch_num "
                              f"{mesh.micro_batch_num}, gradient_accumulation_steps {r.gradient_accumulation_steps})")
    coll = ProcessCollectives(mesh, rank)
    from qwen3moe.parallel import backend

    log(f"rank {rank}: collectives {backend.get().kind} (QWEN3MOE_COLLECTIVES={backend.choice()})")
    ms.set_seed(cfg.seed)
    model, entries, ce, layers = _rank_model(cfg, mesh, rank, coll)
    data, samples = build_data(cfg, requested_samples(cfg))
    steps = total_steps(cfg, samples)
    step = build_step(cfg, mesh, rank, coll, model, entries, steps, log, cross_entropy=ce, stage_layers=layers)
    seq = cfg.train_dataset.data_loader.config.seq_length
    peak = aggregate_peak(r.mfu_probe_size)  # a collective: every rank
    metrics = MetricsLogger(cfg.output_dir, train_flops_per_token(model.config, seq), peak) if rank == 0 else None
    tc, checkpointer = trainer_config(cfg, model, steps), None
    if sharded_state(cfg, mesh):  # every rank saves its part
        from qwen3moe.parallel.train_state import SHARDED_DIR, ShardedCheckpointer

        tc = dataclasses.replace(tc, checkpoint_dir=os.path.join(cfg.output_dir, SHARDED_DIR), time_budget_s=None,
                                 plot_dir=tc.plot_dir if rank == 0 else None)
        checkpointer = ShardedCheckpointer(cfg, step, rank, log)
    elif rank:  # replicas are identical: rank 0 alone writes checkpoints, plots and metrics
        tc = dataclasses.replace(tc, save_interval=0, save_at_end=False, plot_dir=None)
    # no time budget across ranks: ranks stopping at different steps would hang a collective
    tc = dataclasses.replace(tc, time_budget_s=None)
    trainer = Trainer(step, data, tc, log=log if rank == 0 else (lambda s: None), metrics=metrics,
                      checkpointer=checkpointer)
    t0 = time.perf_counter()
    trainer.fit()
    log(f"rank {rank}: done, {len(trainer.history)} steps on {mesh.world_size} processes "
        f"({_layout(mesh)}, compiled) in {time.perf_counter() - t0:.1f}s")
    return 0


def _layout(mesh) -> str:
    from qwen3moe.parallel.train_state import layout

    return layout(mesh)


def _rank_model(cfg, mesh, rank: int, coll):
    """(this rank's model, its [(Parameter, ShardInfo)], the vocab-parallel cross-entropy or
    None, its global layer ids). Pure dp holds the whole model; tp / ep / pp the shards
    `parallelize` builds (recompute_config marks the stage's layers). Weights: the
    sharded checkpoint being resumed, else the HF folder in load_checkpoint (each rank reads its
    slices), else the seeded initialisation of one process, sliced."""
    from qwen3moe.parallel.ranks import ShardInfo
    from qwen3moe.parallel.train_state import resume_path
    from qwen3moe.training.recipe import build_model, model_config

    resume = resume_path(cfg) if sharded_state(cfg, mesh) else None
    if mesh.tp == mesh.ep == mesh.pp == 1:
        model = _from_sharded(cfg, resume) if resume else build_model(cfg)
        entries = [(p, ShardInfo(p.name, "replicate", 0, 1)) for p in model.trainable_params()]
        return model, entries, None, range(model.config.num_hidden_layers)
    from qwen3moe.parallel.checkpoint import load_sharded
    from qwen3moe.parallel.parallelize import VocabParallelCrossEntropy, parallelize

    ck = cfg.load_checkpoint
    if resume:
        weights = load_sharded(resume).__getitem__
    elif ck and os.path.isfile(os.path.join(ck, "config.json")):
        weights = ck
    else:
        whole = build_model(cfg)
        weights = {p.name: p.asnumpy().astype("float32") for p in whole.get_parameters()}.__getitem__
        del whole
    rm = parallelize(model_config(cfg), mesh, rank, weights, gather_logits=False, coll=coll)
    ce = VocabParallelCrossEntropy(coll.groups["tp"], rm.vocab_start) if mesh.tp > 1 else None
    _recompute(cfg, mesh, rm)
    return rm.model, rm.entries, ce, rm.layers


def _recompute(cfg, mesh, rm) -> None:
    """recompute_config.recompute on this rank's layers (global ids as one process counts them)."""
    from qwen3moe.training.recompute import recompute_layers

    chosen = set(recompute_layers(cfg.recompute_config.recompute, cfg.model_config().num_hidden_layers, mesh.pp))
    for j, i in enumerate(rm.layers):
        if i in chosen:
            rm.model.model.layers[j].recompute()


def _from_sharded(cfg, path: str):
    """The whole model from a sharded training checkpoint (every rank file assembled)."""
    from qwen3moe.layers.dtypes import set_init_seed, write_param
    from qwen3moe.models.qwen3_moe import Qwen3MoeForCausalLM
    from qwen3moe.parallel.checkpoint import load_sharded
    from qwen3moe.training.recipe import model_config

    set_init_seed(cfg.seed)
    model = Qwen3MoeForCausalLM(model_config(cfg))
    full = load_sharded(path)
    for p in model.trainable_params():
        write_param(p, full[p.name])
    return model


def build_step(cfg, mesh, rank: int, coll, model, entries: list, steps: int, log: Log = lambda s: None,
               cross_entropy=None, stage_layers=None):
    """ParallelTrainStep for this rank's model (pipeline_step.PipelineTrainStep with pp > 1 or
    micro_batch_num > 1): sync groups and norm ownership from the ShardInfos, the config's AdamW
    (ZeRO-1 with parallel.enable_parallel_optimizer), clipping, schedule, aux loss."""
    from qwen3moe.parallel.aux import dp_stats_reducer
    from qwen3moe.parallel.comm import MindSporeComm
    from qwen3moe.parallel.step import ParallelTrainStep, RankAdamW, owns_shard, sync_groups
    from qwen3moe.training.recipe import step_arguments, trainer_config

    info = {id(p): i for p, i in entries}
    params = model.trainable_params()
    n, c = rank % (mesh.dp * mesh.tp), mesh.coords(rank)
    syncs = [info[id(p)].sync for p in params]
    owned = [owns_shard(info[id(p)], n, mesh) for p in params]
    groups = sync_groups(coll, set(syncs) | {"dp"})
    zero1 = zero1_enabled(cfg, mesh)
    if zero1 and cfg.optimizer.no_decay_norms_and_biases:
        raise TaskConfigError("parallel.enable_parallel_optimizer (ZeRO-1) needs a uniform weight decay: set "
                              "optimizer.no_decay_norms_and_biases to False")
    if rank == 0:
        log(f"optimizer: AdamW{' with ZeRO-1 (moments sharded over dp)' if zero1 else ''}")
    mt = cfg.moe_training()
    kind = mt["aux_mode"] if mt["aux_coef"] else "none"
    if mesh.tp > 1 and (kind == "seq" or mt["z_coef"]):
        raise TaskConfigError("model.model_config: the sequence-level aux loss and the router z-loss are not "
                              "implemented with model_parallel > 1; use aux_loss, hf or global and "
                              "moe_z_loss_coeff 0")
    K = model.config.num_experts_per_tok
    accum = cfg.runner_config.gradient_accumulation_steps
    cls, extra = ParallelTrainStep, {}
    if mesh.pp > 1 or mesh.micro_batch_num > 1:
        from qwen3moe.parallel.pipeline_step import PipelineTrainStep, check_pipeline_losses

        check_pipeline_losses(mesh, kind, mt["z_coef"])
        cls, extra = PipelineTrainStep, dict(mesh=mesh, coll=coll, stage_layers=stage_layers)
        accum = math.lcm(accum, mesh.micro_batch_num)  # the micro-batches a step runs
    reducer = None
    if kind == "global" and accum > 1:  # C, N pooled over micro-batches and ranks by a pre-pass
        sums = dp_stats_reducer(MindSporeComm(initialise=False))
        reducer = lambda C, N: sums(C, N)[:2] + (1,)  # noqa: E731  (gradients are summed, not averaged)
    make_opt = lambda ps, **kw: RankAdamW(ps, syncs, groups, zero1, rank=rank, **kw)  # noqa: E731
    step = cls(model, syncs=syncs, owned=owned, groups=groups, dp=mesh.dp, dp_rank=c["dp"],
               counts_group=groups["dp"].name, aux_kind=kind, rank=rank, owner=c["tp"] == 0,
               R=mesh.dp, accum=accum, log_every=trainer_config(cfg, model, steps).log_interval,
               log=log, aux_coef=mt["aux_coef"] / (K if kind == "megatron" else 1),
               z_coef=mt["z_coef"], stats_reducer=reducer, cross_entropy=cross_entropy,
               **step_arguments(cfg, model, steps, make_optimizer=make_opt), **extra)
    step.pl = RankShards(mesh, model.config, [{n: entries} if s == c["pp"] else {} for s in range(mesh.pp)])
    return step
