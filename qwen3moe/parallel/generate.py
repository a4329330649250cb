"""Generation with the model sharded over the processes started by `qwen3moe launch`
(`qwen3moe generate --use_parallel True --parallel_config.model_parallel N ...`).

pp = 1 (tp, ep, dp and their products): each rank builds its model (parallelize.py: the model's
own classes with the tp / ep plan, its shards read online, stored in --dtype, with --quantize
each rank's float slices quantized as they are read, from a GPTQ folder each rank's slice of
the stored quantized tensors; with tp = ep = 1 the whole model, loaded as one process loads it)
and runs the ordinary generation engine on it: compiled KV-cached step (the fused decode
kernels on the rank's slices, int8 activations with --activations int8, a 16-bit cache of the
rank's kv heads with --kv_cache_dtype), batches with left padding, per-row EOS and stop
strings, sampling, streaming. Every rank encodes the whole batch (the same padded
length everywhere); the dp ranks take equal shares of its rows (generate.RowSplit: the
last share padded with dummy rows). Every rank runs the same steps with the same shapes, as the
collectives inside the model need:
  - the tp ranks of a dp rank hold the same logits (the lm_head's are gathered over tp) and run
    the same sampler with the same seed, so they pick the same tokens and stop together;
  - the dp ranks stop when all rows are done: a sum of the unfinished-row counts after each
    step (RowSplit.start_done, answered after the next decode step, which is dropped when all
    were done), and their sampler draws for the whole batch and keeps its rows' draws, so the
    tokens equal one process generating the batch.
The results come out on rank 0 (world AllGather of each rank's JSON), streamed text too.
pp > 1 (pipeline_generate.py): the same engine (its fused step where the kernels apply) over each
rank's stage of the parallelized model (--dtype / --quantize / --kv_cache_dtype as above),
micro-batches of rows overlapped across the stages; the last stage samples and sends the
tokens back; stage 0 of each dp rank holds the results.
`generate` returns the results in prompt order on the one rank that reports them, None elsewhere.
"""
from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
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


def check_request(req: GenerateRequest, mesh: Mesh, world_size: int | None = None) -> None:
    """Refused before any process does work: a layout the model or the launch cannot take
    (config.json is read, no weights), and what the sharded paths cannot do. world_size: the
    process count (default: the one the launcher announced)."""
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.mesh import launched_world_size
    from qwen3moe.parallel.parallelize import check_layout
    from qwen3moe.parallel.pipeline_generate import layout_mesh

    cfg = Qwen3MoeConfig.from_pretrained(req.check()[0])
    size = launched_world_size() if world_size is None else world_size
    layout_mesh(mesh).validate(num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                               num_kv_heads=cfg.num_key_value_heads, num_experts=cfg.num_experts or 0,
                               world_size=size if size > 1 else None)
    if cfg.vocab_size % mesh.tp:
        raise MeshError(f"tp={mesh.tp} must divide vocab_size={cfg.vocab_size} (vocab-parallel embedding)")
    if mesh.tp == mesh.pp == mesh.ep == 1:
        return
    _check_weights(req, cfg, mesh)
    if mesh.sp:  # the compiled decode step calls the layers' modules on whole [B, S, H] rows
        raise GenerationError("sequence parallel (sp) is a training layout; generate without it (same shards)")
    if mesh.pp > 1:
        rows = -(-req.predict_batch_size // mesh.dp)
        if mesh.micro_batch_num > rows:
            raise MeshError(f"--parallel_config.micro_batch_num={mesh.micro_batch_num}: more decode micro-batches "
                            f"than the {rows} rows of a dp rank (predict_batch_size={req.predict_batch_size}, "
                            f"dp={mesh.dp})")
    check_layout(cfg, layout_mesh(mesh))


def _check_weights(req: GenerateRequest, cfg, mesh: Mesh) -> None:
    """What the sharded builds load (parallelize.py's rank models, also the pipeline stages):
    float folders, quantized while read (int8 activations where every rank's slices hold whole
    activation blocks); GPTQ folders, each rank its slice of the stored tensors."""
    from qwen3moe.io.gptq import gptq_config
    from qwen3moe.parallel.pipeline_generate import layout_mesh
    from qwen3moe.parallel.quantized import check_act8_layout, check_gptq_layout, check_quantized_layout

    if req.quantize is None and req.group_size is not None:
        raise GenerationError("--group_size needs --quantize int8/int4")
    spec = gptq_config(cfg, req.pretrained_model_dir)
    qc = req.quantization()
    if spec is not None and qc is not None:
        raise GenerationError(f"--pretrained_model_dir {req.pretrained_model_dir}: already quantized "
                              f"({spec.label}); generate without --quantize")
    options = {k: v for k, v in req.folder_options().items() if k != "group_size"}
    if spec is not None and options:
        raise GenerationError(f"--{next(iter(options))} with a GPTQ folder is not supported under --use_parallel "
                              "(the ranks load it with an int8 lm_head and float32 activations)")
    if spec is None and qc is None:
        if options:
            raise GenerationError(f"--{next(iter(options))} needs --quantize int8/int4")
        return
    layout = layout_mesh(mesh)
    if spec is not None:
        _refused("", check_gptq_layout, cfg, layout, spec, req.pretrained_model_dir)
        return
    if qc.int8_activations:
        _refused("--activations int8: ", qc.check_runnable)
        _refused("--activations int8: ", check_act8_layout, cfg, layout, qc)
    _refused("--group_size: ", check_quantized_layout, cfg, layout, qc)


def _refused(what: str, check, *args) -> None:
    """check(*args), its QuantizationError as the GenerationError `what` + its message."""
    from qwen3moe.layers.quant import QuantizationError

    try:
        check(*args)
    except QuantizationError as exc:
        raise GenerationError(f"{what}{exc}") from None


def generate(req: GenerateRequest, mesh: Mesh, on_text: Callable[[str], None] | None = None) -> ParallelGeneration:
    """Join the launched processes and generate the request's prompts on `mesh`; with
    req.stream, rank 0 passes the text pieces to `on_text`."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    from qwen3moe.generation.runtime import decode_runtime

    check_request(req, mesh)  # one-line errors (req.check() among them) before init() and loading
    if not os.environ.get("MS_ROLE"):  # msrun sets it; without it init() has no cluster to join
        raise MeshError("--use_parallel needs the workers started by msrun: "
                        f"qwen3moe launch --nproc {mesh.world_size} -- generate ... --use_parallel True")
    ms.set_device("CPU")
    decode_runtime()  # before MindSpore's first op
    init()
    rank, size = get_rank(), get_group_size()
    if mesh.world_size != size:
        raise MeshError(f"--parallel_config gives dp*tp*pp = {mesh.world_size} but {size} processes run "
                        f"(qwen3moe launch --nproc {mesh.world_size} -- generate ...)")
    if mesh.pp > 1:
        from qwen3moe.parallel.pipeline_generate import pipeline_batches

        return report(pipeline_batches(req, mesh, rank, on_text), req, mesh, rank)
    return report(engine_batches(req, mesh, rank, on_text), req, mesh, rank)


def engine_batches(req: GenerateRequest, mesh: Mesh, rank: int, on_text: Callable[[str], None] | None = None):
    """pp = 1: the generation engine on this rank's model (module docstring); (results of this
    rank's rows, decode steps, decode seconds) per batch."""
    from qwen3moe.generation.batch import generate_batches, load, read_prompts
    from qwen3moe.generation.generate import RowSplit
    from qwen3moe.parallel.pipeline_generate import step_label

    build = None if mesh.tp == mesh.ep == 1 else lambda folder: rank_model(folder, mesh, rank, req)
    tok, model, cfg = load(req, build)
    prompts = read_prompts(req.predict_data)
    split = RowSplit(mesh.dp, mesh.coords(rank)["dp"], all_done, start_done) if mesh.dp > 1 else None
    for results, st in generate_batches(model, tok, cfg, prompts, req, on_text if rank == 0 else None, split):
        yield results, st.decode_steps, st.decode_s, step_label(model.__dict__.get("_decode_engines", {}).values())


def report(per_batch, req: GenerateRequest, mesh: Mesh, rank: int) -> ParallelGeneration:
    """Run the batches; the results of every dp rank's first stage, tp rank 0, merged on rank 0."""
    batches, steps, decode_s, step, t0 = [], 0, 0.0, "no step", time.perf_counter()
    for results, st, sec, step in per_batch:
        batches.append(results)
        steps, decode_s = steps + st, decode_s + sec
    wall = time.perf_counter() - t0
    parts = [json.loads(p) for p in gather_texts(json.dumps(batches, ensure_ascii=False), mesh.world_size)]
    if rank:
        return ParallelGeneration(None, "")
    # batch by batch, the rows of dp rank 0, 1, ... (their first stage's tp rank 0 holds them)
    merged = [r for i in range(len(batches)) for d in range(mesh.dp) for r in parts[mesh.rank_of(0, d)][i]]
    rate = req.predict_batch_size * steps / max(decode_s, 1e-9)
    pp = f" pp{mesh.pp} x {mesh.micro_batch_num} micro-batches" if mesh.pp > 1 else ""
    return ParallelGeneration(merged, f"{len(merged)} prompts on {mesh.world_size} processes (dp{mesh.dp} "
                                      f"tp{mesh.tp} ep{mesh.ep}{pp}) in {wall:.2f} s; decode {rate:.1f} tok/s "
                                      f"({step})")


def rank_model(folder, mesh: Mesh, rank: int, req: GenerateRequest):
    """This rank's parallelized model (lm_head logits gathered over tp), its shards loaded in
    the request's dtype and quantization."""
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.parallelize import parallelize

    cfg = Qwen3MoeConfig.from_pretrained(folder)
    model = parallelize(cfg, mesh, rank, weights=folder, gather_logits=True, param_dtype=req.param_dtype(cfg),
                        quantization=req.quantization()).model
    model.source_dir = str(folder)  # generation_config.json and the tokenizer are read from it
    return model


def all_done(mine: bool) -> bool:
    """Whether every rank's rows are finished: a world all-reduce of the unfinished counts."""
    return float(_world_sum().sum(np.array([0.0 if mine else 1.0], np.float32))[0]) == 0.0


def start_done(mine: bool) -> Callable[[], bool]:
    """all_done in two halves (RowSplit.start_done): this rank's count sent now, the answer later."""
    finish = _world_sum().start(np.array([0.0 if mine else 1.0], np.float32))
    return lambda: float(finish()[0]) == 0.0


@functools.lru_cache(maxsize=1)
def _world_sum():
    """One world sum from the host for every step (backend.host_sum: shared memory without a
    graph, else a compiled all-reduce), built at the first call, which every rank reaches at
    the same point (the call site's tag)."""
    from qwen3moe.parallel import backend

    return backend.get().host_sum(None, "rows done")


def gather_texts(text: str, size: int) -> list[str]:
    """Every rank's `text`, in rank order, on every rank (world AllGather of the UTF-8 bytes, as
    int32 and padded to the longest: MCCL on CPU gathers on the world group only)."""
    from mindspore import Tensor, ops

    data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    gather = ops.AllGather()
    lens = gather(Tensor(np.array([data.size], np.int32))).asnumpy()
    longest = max(int(lens.max()), 1)
    padded = np.zeros(longest, np.int32)
    padded[:data.size] = data
    rows = gather(Tensor(padded)).asnumpy().reshape(size, longest)
    return [bytes(rows[r, :lens[r]].astype(np.uint8)).decode("utf-8") for r in range(size)]
