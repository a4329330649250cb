"""`qwen3moe generate --use_parallel True --parallel_config.model_parallel N ...` under
`qwen3moe launch`: greedy generation with the model sharded over the processes (online-sharded
loading, TP / EP / DP / PP as configured). Decoding runs stage to stage with each stage's KV
cache of its own layers and heads (decode.py), in PyNative: meant for correctness and models
too large for one process more than for speed. The last pipeline stage's first rank writes
the results. Pure data parallelism (only data_parallel > 1) instead runs the compiled
single-process generation on each rank's share of the prompts (replicas.generate)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

PARALLEL_KEYS = {"data_parallel": "dp", "model_parallel": "tp", "pipeline_stage": "pp",
                 "expert_parallel": "ep", "micro_batch_num": "micro_batch_num"}


def add_arguments(p) -> None:
    def _bool(text: str) -> bool:
        return str(text).strip().lower() in ("1", "true", "yes", "y", "on")

    p.add_argument("--use_parallel", type=_bool, default=False, help="shard over the launched processes")
    for key in PARALLEL_KEYS:
        p.add_argument(f"--parallel_config.{key}", dest=f"parallel_{key}", type=int, default=1)


def run(args) -> int:
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    from qwen3moe.cli import CliError
    from qwen3moe.commands.generate import _check_args, read_prompts
    from qwen3moe.io.atomic import atomic_write_text
    from qwen3moe.io.tokenizer import Tokenizer
    from qwen3moe.parallel.mesh import Mesh, MeshError
    from qwen3moe.parallel.process import ProcessCollectives
    from qwen3moe.parallel.trainer import ParallelLM

    folder = _check_args(args)
    mesh = Mesh(**{v: getattr(args, f"parallel_{k}") for k, v in PARALLEL_KEYS.items()})
    pure_dp = mesh.tp == mesh.pp == mesh.ep == 1
    if args.do_sample and not pure_dp:
        raise CliError("--use_parallel generation with model parallelism is greedy only: drop --do_sample")
    if args.predict_batch_size != 1 and not pure_dp:
        raise CliError("--use_parallel generation with model parallelism runs one prompt at a time: "
                       "use --predict_batch_size 1")
    if not os.environ.get("MS_ROLE"):  # msrun sets it; without it init() has no cluster to join
        raise CliError("--use_parallel needs the workers started by msrun: "
                       f"qwen3moe launch --nproc {mesh.world_size} -- generate ... --use_parallel True")
    ms.set_device("CPU")
    init()
    rank, size = get_rank(), get_group_size()
    if mesh.world_size != size:
        raise CliError(f"--parallel_config gives dp*tp*pp = {mesh.world_size} but {size} processes run "
                       f"(qwen3moe launch --nproc {mesh.world_size} -- generate ...)")
    if pure_dp:  # replicas: the compiled single-process generation on every rank's share of prompts
        from qwen3moe.parallel.replicas import generate

        return generate(args, rank, mesh.dp)
    try:
        pl = ParallelLM.from_pretrained(folder, mesh, train=False, coll=ProcessCollectives(mesh, rank), rank=rank)
    except MeshError as exc:
        raise CliError(str(exc)) from None
    tok = Tokenizer.from_pretrained(folder)
    eos = pl.cfg.eos_token_id if isinstance(pl.cfg.eos_token_id, list) else [pl.cfg.eos_token_id]
    lines = []
    for prompt in read_prompts(args.predict_data):
        ids = np.asarray([tok.encode(prompt)], np.int64)
        out = greedy_until(pl, ids, args.max_new_tokens or 32, [] if args.ignore_eos else eos)
        new = out[0, ids.shape[1]:]
        lines.append(json.dumps({"prompt": prompt, "completion": tok.decode(new, skip_special_tokens=True),
                                 "completion_tokens": int(new.size)}, ensure_ascii=False))
    if rank == mesh.rank_of(0, 0, mesh.pp - 1):
        for line in lines:
            print(line, flush=True)
        atomic_write_text(args.output, "".join(line + "\n" for line in lines))
        print(f"generate: {len(lines)} prompts on {size} processes "
              f"(dp{mesh.dp} tp{mesh.tp} pp{mesh.pp} ep{mesh.ep}); results in {args.output}", file=sys.stderr)
    return 0


def greedy_until(pl, ids: np.ndarray, max_new: int, eos: list) -> np.ndarray:
    """Greedy tokens, stage to stage with a KV cache per stage (decode.py)."""
    from qwen3moe.parallel.decode import greedy_cached

    return greedy_cached(pl, ids, max_new, eos)
