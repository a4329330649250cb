"""Greedy generation through the pipeline with a KV cache per stage: stage s keeps the keys and
values of its own layers only (its rank's heads), runs just the new positions, and sends their
hidden states to stage s + 1 (prefill: the prompt, then one token per step); the last stage's
column-parallel lm_head logits of the last position are gathered over tp, and the argmax
reaches every rank (sum over dp of each rank's rows, then over the pp group).
Decoding uses the replicated (non sequence-parallel) layout; the weights are the same.
Shapes: B global batch, b rows per rank and micro-batch, s new positions, H hidden, V vocab.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from mindspore import Tensor, ops

from qwen3moe.generation.generate import check_finite
from qwen3moe.layers.attention import grouped_attention
from qwen3moe.parallel import engine


def cached_attention(cache: dict, key, pos: int):
    """engine.attention for positions pos.. given the cached keys / values before them."""
    def attn(cells, coll, j, xs, rope, mesh):
        a = coll.copy("tp", {n: c.layers[j].input_layernorm(xs[n]) for n, c in cells.items()})
        part = {}
        for n, c in cells.items():
            at, s = c.layers[j].self_attn, a[n].shape[1]
            q, k, v = at.project_qkv(a[n], rope[n].cos[:, pos:pos + s], rope[n].sin[:, pos:pos + s])
            slot = (key, n, c.layer_ids[j])  # a stage only ever fills its own layers' slots
            if slot in cache:
                k_old, v_old = cache[slot]
                k, v = ops.concat([k_old, k], 2), ops.concat([v_old, v], 2)
            cache[slot] = (k, v)
            bias = rope[n].bias[:, :, pos:pos + s, :pos + s]
            part[n] = at.output(grouped_attention(q, k, v, bias, at.scale))
        return coll.reduce("tp", part)
    return attn


def greedy_cached(pl, ids: np.ndarray, max_new: int, eos=(), cache: dict | None = None) -> np.ndarray:
    """ids [B, S0] (the same on every rank) -> [B, S0 + steps] greedy tokens; each micro-batch
    of each dp rank keeps its own cache in `cache` {(micro-batch, rank, layer): (k, v)}."""
    mesh = replace(pl.mesh, sp=False)
    cache = {} if cache is None else cache
    pos = 0
    for step in range(max_new):
        nxt = np.zeros(ids.shape[0], np.float32)
        for mb, per in enumerate(pl.split_batch(ids)):
            _step_micro_batch(pl, mesh, per, mb, pos, cache, nxt, ids.shape[0])
        nxt_t = Tensor(nxt)
        if pl.real:  # a process wrote its dp rank's rows (last stage) or none: sum them everywhere
            if pl.cells[-1]:
                nxt_t = next(iter(pl.coll.sum_nograd("dp", {n: nxt_t for n in pl.cells[-1]}).values()))
            nxt_t = pl.coll.pp_sum(nxt_t)
            pl.coll.finish()
        values = nxt_t.asnumpy()
        check_finite(values[:, None], step)  # on every rank: a NaN row reached all through the sums
        tokens = np.rint(values).astype(ids.dtype)
        pos = ids.shape[1]
        ids = np.concatenate([ids, tokens[:, None]], 1)
        if eos and all(int(t) in eos for t in tokens):
            break
    return ids


def _step_micro_batch(pl, mesh, per: dict, mb: int, pos: int, cache: dict, nxt: np.ndarray, B: int) -> None:
    """New positions of one micro-batch through this process's stages; the last stage writes
    the argmax of the rows its dp rank holds into nxt (zeros elsewhere)."""
    m, H = pl.mesh, pl.cfg.hidden_size
    b, S = next(iter(per.values())).input_ids.shape
    xs = None
    for s in range(m.pp):
        cells = pl.cells[s]
        if not cells:
            continue
        if s > 0 and pl.real:
            xs = {n: pl.coll.recv((b, S - pos, H), s - 1) for n in cells}
        src = {n: per[n].input_ids[:, pos:] for n in cells} if s == 0 else xs
        masks = {n: per[n].token_mask.reshape(b, S)[:, pos:].reshape(-1) for n in cells}
        xs, _, _ = engine.stage_forward(cells, pl.coll, src, per, masks, mesh, pl.cfg,
                                        attn=cached_attention(cache, mb, pos))
        if s < m.pp - 1 and pl.real:
            for x in xs.values():
                pl.coll.send(x, s + 1)
    if not pl.cells[-1]:
        return
    local = engine.head_logits(pl.cells[-1], pl.coll, xs, mesh)
    last = {n: v.reshape(b, S - pos, -1)[:, -1] for n, v in local.items()}
    full = pl.coll.gather("tp", last, 1)                                # [b, V]
    for n, v in full.items():  # every tp rank holds the same gathered logits
        lo = (n // m.tp) * B // m.dp + mb * b  # split_batch's rows of this dp rank
        logits = v.asnumpy()  # a row without a finite max: NaN, the single-process check's signal
        nxt[lo:lo + b] = np.where(np.isfinite(logits.max(-1)), logits.argmax(-1), np.nan)
