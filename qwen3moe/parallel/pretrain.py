"""`qwen3moe pretrain --use_parallel True --parallel_config.* ...` under `qwen3moe launch`: the
layout checked against the model and the launched processes, then every layout (dp, tp with or
without sequence parallel, ep, pp, any micro_batch_num, ZeRO-1 with
`parallel.enable_parallel_optimizer`) trains on the compiled per-rank step (`compiled.train`:
step.ParallelTrainStep / pipeline_step.PipelineTrainStep driven by training/trainer.Trainer;
checkpoints, resume and metrics there). Each worker's threads are bound to its own cores first
(cores.py).
"""
from __future__ import annotations

import os
from collections.abc import Callable

from qwen3moe.parallel.mesh import Mesh, MeshError

Log = Callable[[str], None]


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

    if not os.environ.get("MS_ROLE"):  # msrun sets it; without it init() has no cluster to join
        raise MeshError("use_parallel with world size > 1 needs the workers started by msrun: "
                        "qwen3moe launch --nproc N -- pretrain --config ... --use_parallel True")
    ms.set_device("CPU")
    ms.set_seed(cfg.seed)
    init()
    rank, size = get_rank(), get_group_size()
    mesh = check_request(cfg, size)
    from qwen3moe.parallel import compiled, cores

    bound = cores.bind_local_rank()  # before the model's graphs: every thread they start inherits it
    if bound:
        log(f"rank {rank}: threads bound to cores {','.join(map(str, bound))} ({cores.ENV}=off to leave them unbound)")

    return compiled.train(cfg, mesh, rank, log)
