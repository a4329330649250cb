"""Generation through pipeline stages (pp > 1) on the generation engine, micro-batches overlapped.

Each rank holds its stage of the parallelized model (parallelize.py: its layer range, the
embedding on the first stage, final norm + lm_head on the last, the tp / ep plan inside) and runs
the generation engine's compiled cached step over those layers (`StageEngine`: the engine's
KV-cache Parameters, in the request's kv_cache_dtype, and host bookkeeping; a stage before the
last returns the hidden states of every position instead of logits). Where the kernels apply,
every stage's step is the plan's fused step (parallel/fused_step.py, as with pp = 1, over the
stage's layers), so a 16-bit KV cache works on every stage; else the composite step. The batch's
rows are cut into M micro-batches per dp rank (generate.RowSplit over dp*M shares: dummy rows
pad the last, each share keeps its rows' draws of the batch's random stream), each a
`GenerationRun` with its own engine and cache. Step t of
micro-batch m:
    stage 0        receives (m, t-1)'s tokens from the last stage, runs its layers, sends [b, S, H]
    middle stage   receives (m, t-1)'s tokens (for the stop flag), then the hidden states; runs, sends
    last stage     receives the hidden states, runs -> logits, samples with the same seed as one
                   process, all-reduces the done flags over dp, sends tokens + stop flag to every
                   other stage of its pipeline
The messages (p2p.py: named pipes on one host, else MindSpore isend / recv) are sent without
waiting for the receiver and received blocking, in one fixed order per channel ((m, t) by step,
then micro-batch), so while the last stage works on micro-batch m, stage 0 already runs m + 1:
the stages overlap across micro-batches (M = 1: one after another). A micro-batch stops when
all its rows over the dp ranks are finished (every dp rank runs the same graphs in the same
order, as the collectives inside them need). Stage 0 records the tokens too: it streams on
rank 0 and reports the results. Non-finite logits: the last stage sends -1 for the broken rows
before raising, so every stage raises the single-process one-line error instead of waiting.
Shapes: B batch, b rows of a micro-batch, S positions this step, H hidden, V vocab.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
from mindspore import Tensor

from qwen3moe.generation.engine import PROMPT_BUCKET, SLOT_BUCKET, DecodeEngine, check_cache_fits, round_up
from qwen3moe.generation.generate import GenerationRun, RowSplit, check_finite
from qwen3moe.parallel import backend
from qwen3moe.parallel.mesh import Mesh
from qwen3moe.parallel.p2p import stage_link


class StageEngine(DecodeEngine):
    """The generation engine's cached step over this stage's layers: the first stage embeds
    token ids, the others receive the previous stage's hidden states [b, S, H]; the last
    returns logits [b, V], the others send every position's hidden states on."""

    def __init__(self, model, batch: int, slots: int, link, stage: int, pp: int,
                 kv_cache_dtype: str = "float32") -> None:
        super().__init__(model, batch, slots, hidden_out=stage < pp - 1, kv_cache_dtype=kv_cache_dtype)
        self.link, self.stage, self.pp = link, stage, pp

    def _feed(self, ids_BS: np.ndarray) -> Tensor:
        if self.stage == 0:
            return super()._feed(ids_BS)
        return Tensor(self.link.recv(ids_BS.shape + (self.config.hidden_size,), self.stage - 1))

    def _emit(self, out: Tensor) -> np.ndarray | None:
        if self.stage == self.pp - 1:
            return out.asnumpy()
        self.link.send(out, self.stage + 1)
        return None


def stage_engines(link, stage: int, pp: int, micro_batch: int) -> Callable:
    """GenerationRun's `engine` factory for micro-batch `micro_batch`: a StageEngine per
    (micro-batch, B, T), kept on the model so later batches reuse its compiled graphs."""
    def make(model, batch: int, prompt_len: int, max_new_tokens: int, kv_cache_dtype: str = "float32"):
        P = round_up(prompt_len, PROMPT_BUCKET)
        T = round_up(P + max_new_tokens, SLOT_BUCKET)
        cache: dict = model.__dict__.setdefault("_stage_engines", {})
        key = (micro_batch, batch, T, kv_cache_dtype)
        if key not in cache:
            check_cache_fits(model, batch, T, max_new_tokens, kv_cache_dtype)
            for old in [k for k in cache if k[0] == micro_batch]:  # one engine (cache) per micro-batch
                del cache[old]
            cache[key] = StageEngine(model, batch, T, link, stage, pp, kv_cache_dtype)
        return cache[key], P
    return make


def step_label(engines) -> str:
    """The parallel summary's step (also pp = 1, generate.engine_batches): fused or composite,
    and the KV cache's dtype where it is 16-bit."""
    engines = list(engines)
    label = "fused step" if any(e.fused for e in engines) else "composite step"
    return label + "".join(f", {d} KV cache" for d in sorted({e.kv_cache_dtype for e in engines} - {"float32"}))


def micro_batch_runs(model, ids: np.ndarray, mask: np.ndarray, cfg, tok, mesh: Mesh, rank: int,
                     link, all_done: Callable[[bool], bool]) -> list[GenerationRun]:
    """This rank's M micro-batches of a batch [B, S]: RowSplit shares d*M .. d*M + M-1 of dp*M."""
    c, M = mesh.coords(rank), mesh.micro_batch_num
    return [GenerationRun(model, ids, mask, cfg, tok, split=RowSplit(mesh.dp * M, c["dp"] * M + m, all_done),
                          engine=stage_engines(link, c["pp"], mesh.pp, m)) for m in range(M)]


def run_pipeline(runs: list[GenerationRun], link, stage: int, pp: int,
                 on_token: Callable[[int], None] | None = None) -> int:
    """Generate every micro-batch to its end through the stages (module docstring); `on_token`
    gets row 0 of micro-batch 0's tokens on stage 0 (streaming). Returns the most decode steps
    a micro-batch ran."""
    last = stage == pp - 1
    active, t0, step = list(range(len(runs))), time.perf_counter(), 0
    prefill_s = 0.0
    while active:
        for m in list(active):
            run = runs[m]
            if step > 0 and not last:
                nxt, stop = _receive_tokens(run, link, pp, step - 1)
                if m == 0 and on_token is not None:
                    on_token(int(nxt[0]))
                if stop:
                    active.remove(m)
                    continue
            out = run._prefill() if step == 0 else run.engine.decode(run.history[:, -1])
            if last and _sample_and_send(run, out, link, pp, step):
                active.remove(m)
        link.settle(keep=len(runs) * max(pp - 1, 1))
        if step == 0:
            prefill_s = time.perf_counter() - t0
        step += 1
    link.settle()
    decode_s = time.perf_counter() - t0 - prefill_s
    for run in runs:  # tokens after the prefill's first one: one decode step each
        run.stats.prefill_s, run.stats.decode_s = prefill_s, decode_s
        run.stats.decode_steps = run.history.shape[1] - run.ids.shape[1] - 1
    return max(run.stats.decode_steps for run in runs)


def _sample_and_send(run: GenerationRun, logits_bV: np.ndarray, link, pp: int, step: int) -> bool:
    """Last stage: pick the step's tokens, decide the stop (over dp), send both to the other
    stages; broken rows go out as -1 before the error is raised here."""
    bad = ~np.isfinite(logits_bV.max(axis=1))
    if bad.any():
        _send_tokens(link, pp, np.where(bad, -1, 0), True)
        check_finite(logits_bV, step)
    nxt = run.pick(logits_bV, step)
    stop = run.stopped(step)
    _send_tokens(link, pp, nxt, stop)
    return stop


def _send_tokens(link, pp: int, nxt_b: np.ndarray, stop: bool) -> None:
    msg = np.append(nxt_b.astype(np.float32), np.float32(stop))  # ids < 2^24: exact in fp32
    for s in range(pp - 1):
        link.send(msg, s)


def _receive_tokens(run: GenerationRun, link, pp: int, step: int) -> tuple[np.ndarray, bool]:
    msg = link.recv((run.ids.shape[0] + 1,), pp - 1)
    nxt = np.rint(msg[:-1]).astype(np.int64)
    if (nxt < 0).any():  # the last stage's logits were not finite: its error, here too
        check_finite(np.where(nxt < 0, np.nan, 0.0)[:, None], step)
    return run.record(nxt), bool(msg[-1])


def all_done_over(group) -> Callable[[bool], bool]:
    """RowSplit.all_done over a process group (None: this rank alone): a host sum of the
    unfinished counts (backend.host_sum; every member builds it at the same point)."""
    if group is None:
        return lambda mine: mine
    total = backend.get().host_sum(group.name, "rows done")
    return lambda mine: float(total.sum(np.array([0.0 if mine else 1.0], np.float32))[0]) == 0.0


def layout_mesh(mesh: Mesh) -> Mesh:
    """The mesh parallelize checks: decoding needs no pipeline fill, so M < pp (M = 1: stages
    one after another) is a valid generation layout that the training rule M >= pp refuses."""
    return replace(mesh, micro_batch_num=max(mesh.micro_batch_num, mesh.pp))


def default_micro_batches(mesh: Mesh, batch: int) -> int:
    """pp micro-batches per dp rank (one per stage in flight), at most its rows."""
    return max(1, min(mesh.pp, -(-batch // mesh.dp))) if mesh.pp > 1 else 1


def pipeline_batches(req, mesh: Mesh, rank: int, on_text: Callable[[str], None] | None = None):
    """(results of this rank's rows, decode steps, decode seconds) per batch of the request on this
    rank's stage; stage 0 holds the results (and rank 0 streams), the other stages empty lists."""
    from qwen3moe.generation.batch import load, read_prompts
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.parallelize import parallelize

    held = {}

    def build(folder):
        cfg = Qwen3MoeConfig.from_pretrained(folder)
        held["rm"] = rm = parallelize(cfg, layout_mesh(mesh), rank, weights=folder, gather_logits=True,
                                      param_dtype=req.param_dtype(cfg), quantization=req.quantization())
        rm.model.source_dir = str(folder)  # generation_config.json and the tokenizer are read from it
        return rm.model

    tok, model, cfg = load(req, build)
    rm = held["rm"]
    link, done = stage_link(rm.coll, rank), all_done_over(rm.coll.groups.get("dp"))
    prompts = read_prompts(req.predict_data)
    try:
        yield from _batches(req, model, tok, cfg, prompts, mesh, rank, link, done, on_text)
    finally:
        link.close()


def _batches(req, model, tok, cfg, prompts: list[str], mesh: Mesh, rank: int, link, done, on_text):
    from qwen3moe.generation.batch import filled_batch, row_results
    from qwen3moe.generation.streaming import StopStringStream

    stage = mesh.coords(rank)["pp"]
    for i in range(0, len(prompts), req.predict_batch_size):
        chunk = prompts[i:i + req.predict_batch_size]
        ids, mask = filled_batch(tok, cfg, chunk, req)
        runs = micro_batch_runs(model, ids, mask, cfg, tok, mesh, rank, link, done)
        stream = StopStringStream(tok, cfg.stop_strings, skip_special_tokens=True) \
            if req.stream and on_text is not None and rank == 0 else None
        steps = run_pipeline(runs, link, stage, mesh.pp, None if stream is None else
                             lambda t: on_text(stream.push(t)))
        if stream is not None:
            on_text(stream.flush() + "\n")
        rows = [r for run in runs for r in row_results(run, chunk, tok)] if stage == 0 else []
        yield rows, steps, runs[0].stats.decode_s, step_label(run.engine for run in runs)
