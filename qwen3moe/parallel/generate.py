"""Generation with the model sharded over the processes started by `qwen3moe launch`
(`qwen3moe generate --use_parallel True --parallel_config.model_parallel N ...`): greedy
generation with online-sharded loading, TP / EP / DP / PP as configured. Decoding runs stage to
stage with each stage's KV cache of its own layers and heads (decode.py), in PyNative: meant
for correctness and models too large for one process more than for speed. Pure data
parallelism (only data_parallel > 1) instead runs the compiled single-process generation on
each rank's share of the prompts (replicas.generate).
`generate` returns the results in prompt order on the one rank that reports them (the last
pipeline stage's first rank; rank 0 for replicas), None on the others.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from qwen3moe.generation.batch import GenerateRequest
from qwen3moe.generation.errors import GenerationError
from qwen3moe.parallel.mesh import Mesh, MeshError


@dataclass
class ParallelGeneration:
    """This rank's share of the outcome: `results` on the reporting rank, else None."""
    results: list[dict] | None
    summary: str


def check_request(req: GenerateRequest, mesh: Mesh) -> None:
    """Refused before any process does work: a layout the model or the launch cannot take
    (config.json is read, no weights), and what the sharded (non-replica) path cannot do."""
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.mesh import launched_world_size

    cfg = Qwen3MoeConfig.from_pretrained(req.check())
    size = launched_world_size()
    mesh.validate(num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                  num_kv_heads=cfg.num_key_value_heads, num_experts=cfg.num_experts or 0,
                  world_size=size if size > 1 else None)
    if cfg.vocab_size % mesh.tp:
        raise MeshError(f"tp={mesh.tp} must divide vocab_size={cfg.vocab_size} (vocab-parallel embedding)")
    if mesh.tp == mesh.pp == mesh.ep == 1:
        return
    if req.quantize or req.dtype != "float32":
        raise GenerationError("--quantize / --dtype apply to single-process and pure data-parallel generation only")
    if req.options.get("do_sample"):
        raise GenerationError("--use_parallel generation with model parallelism is greedy only: drop --do_sample")
    if req.predict_batch_size != 1:
        raise GenerationError("--use_parallel generation with model parallelism runs one prompt at a time: "
                              "use --predict_batch_size 1")


def generate(req: GenerateRequest, mesh: Mesh) -> ParallelGeneration:
    """Join the launched processes and generate the request's prompts on `mesh`."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    from qwen3moe.generation.batch import read_prompts
    from qwen3moe.io.tokenizer import Tokenizer
    from qwen3moe.parallel.process import ProcessCollectives
    from qwen3moe.parallel.trainer import ParallelLM

    folder = req.check()
    check_request(req, mesh)  # one-line errors before init() and loading
    if not os.environ.get("MS_ROLE"):  # msrun sets it; without it init() has no cluster to join
        raise MeshError("--use_parallel needs the workers started by msrun: "
                        f"qwen3moe launch --nproc {mesh.world_size} -- generate ... --use_parallel True")
    ms.set_device("CPU")
    init()
    rank, size = get_rank(), get_group_size()
    if mesh.world_size != size:
        raise MeshError(f"--parallel_config gives dp*tp*pp = {mesh.world_size} but {size} processes run "
                        f"(qwen3moe launch --nproc {mesh.world_size} -- generate ...)")
    if mesh.tp == mesh.pp == mesh.ep == 1:  # replicas: compiled single-process generation per rank
        from qwen3moe.parallel.replicas import generate as generate_replicas

        results = generate_replicas(req, rank, mesh.dp)
        return ParallelGeneration(results, f"{len(results or [])} prompts on {mesh.dp} data-parallel replicas")
    pl = ParallelLM.from_pretrained(folder, mesh, train=False, coll=ProcessCollectives(mesh, rank), rank=rank)
    tok = Tokenizer.from_pretrained(folder)
    eos = pl.cfg.eos_token_id if isinstance(pl.cfg.eos_token_id, list) else [pl.cfg.eos_token_id]
    results = []
    rows = mesh.dp * mesh.micro_batch_num  # every dp rank and micro-batch needs a row: the prompt repeated
    for prompt in read_prompts(req.predict_data):
        ids = np.repeat(np.asarray([tok.encode(prompt)], np.int64), rows, axis=0)
        out = greedy_until(pl, ids, req.options.get("max_new_tokens") or 32, [] if req.ignore_eos else eos)
        new = out[0, ids.shape[1]:]
        results.append({"prompt": prompt, "completion": tok.decode(new, skip_special_tokens=True),
                        "completion_tokens": int(new.size)})
    mine = rank == mesh.rank_of(0, 0, mesh.pp - 1)
    return ParallelGeneration(results if mine else None, f"{len(results)} prompts on {size} processes "
                              f"(dp{mesh.dp} tp{mesh.tp} pp{mesh.pp} ep{mesh.ep})")


def greedy_until(pl, ids: np.ndarray, max_new: int, eos: list) -> np.ndarray:
    """Greedy tokens, stage to stage with a KV cache per stage (decode.py)."""
    from qwen3moe.parallel.decode import greedy_cached

    return greedy_cached(pl, ids, max_new, eos)
