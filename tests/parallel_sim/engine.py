"""Parallel forward of one pipeline stage over per-rank streams (see collectives.py).

Megatron's placement: vocab-parallel embedding (masked local lookup, reduce over tp);
attention and dense MLP column -> row with copy/reduce around them; MoE with the tokens split
over tp (sequence-parallel MoE input), dispatched to the expert-parallel group by all-gather
(the all-to-all fallback), local experts, reduce-scatter back, all-gather over tp; lm_head
column-parallel and a vocab-parallel cross-entropy (max, sum-exp and target logit reduced
over tp: the full-vocab logits are never gathered for the loss).
Sequence parallel (mesh.sp, Megatron SP): the residual stream, the norms and the MoE input
stay split over the tp group by tokens ([t, H] per rank, T zero-padded to a multiple of tp);
an all-gather (backward: reduce-scatter) precedes each column-parallel block and a
reduce-scatter (backward: all-gather) replaces the all-reduce after each row-parallel one.
The norms then see only the rank's tokens, so their weight gradients are partial over tp
(summed over the stage, ranks.py).
Shapes: B batch, S seq, T = B*S tokens, t = T/tp, H hidden, V vocab, v = V/tp, E experts,
e = E/ep local experts, K top-k, G ep-group size, Tp = T rounded up to a multiple of tp.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

from qwen3moe.router import dispatch
from qwen3moe.router.losses import router_stats

sg = ops.stop_gradient


def _pad(x_TH: Tensor, tp: int) -> Tensor:
    """Zero rows up to a multiple of tp (they stay zero through norms, MLPs and experts)."""
    pad = -x_TH.shape[0] % tp
    return ops.concat([x_TH, ops.zeros((pad, x_TH.shape[1]), x_TH.dtype)]) if pad else x_TH


def sp_gather(coll, xs: dict, B: int, S: int) -> dict:
    """Own token rows [t, H] -> all rows [B, S, H] for a column-parallel block (each rank
    computes something different on them, so the backward is a reduce-scatter)."""
    full = coll.gather_rs("tp", xs, 0)
    return {n: x[:B * S].reshape(B, S, -1) for n, x in full.items()}


def sp_reduce_scatter(coll, part: dict, tp: int) -> dict:
    """Partial outputs of a row-parallel block [B, S, H] or [T, H] -> own rows of their sum."""
    return coll.reduce_scatter("tp", {n: _pad(x.reshape(-1, x.shape[-1]), tp) for n, x in part.items()}, 0)


def embed(cells, coll, ids: dict, vocab: int, tp: int, sp: bool = False) -> dict:
    """Vocab-parallel embedding: each tp rank looks up the ids in its row block, zero elsewhere."""
    v = vocab // tp
    part = {}
    for n, cell in cells.items():
        lo = (n % tp) * v
        local = ids[n] - lo
        inside = ((local >= 0) & (local < v)).astype(ms.float32)
        rows = ops.gather(cell.embed, ops.clip_by_value(local, 0, v - 1), 0)
        part[n] = rows * inside.expand_dims(-1)
    return sp_reduce_scatter(coll, part, tp) if sp else coll.reduce("tp", part)


def _batch_shape(inp: dict) -> tuple[int, int]:
    return tuple(next(iter(inp.values())).input_ids.shape)


def attention(cells, coll, j: int, xs: dict, rope, mesh) -> dict:
    a = {n: c.layers[j].input_layernorm(xs[n]) for n, c in cells.items()}
    a = sp_gather(coll, a, *_batch_shape(rope)) if mesh.sp else coll.copy("tp", a)
    part = {n: c.layers[j].self_attn(a[n], rope[n].cos, rope[n].sin, rope[n].bias) for n, c in cells.items()}
    return sp_reduce_scatter(coll, part, mesh.tp) if mesh.sp else coll.reduce("tp", part)


def dense_mlp(cells, coll, j: int, z: dict, mesh) -> dict:
    if mesh.sp:
        z = coll.gather_rs("tp", z, 0)                               # [Tp, H]
        return coll.reduce_scatter("tp", {n: c.layers[j].mlp(z[n]) for n, c in cells.items()}, 0)
    z = coll.copy("tp", z)
    return coll.reduce("tp", {n: c.layers[j].mlp(z[n]) for n, c in cells.items()})


def moe(cells, coll, j: int, z: dict, masks: dict, mesh) -> tuple[dict, dict]:
    """z: [T, H] per rank (replicated over tp), or with mesh.sp the rank's own rows [t, H].
    Returns (y, same layout as z; router statistics (counts_E, probsum_E) of the rank's tokens)."""
    T = masks[next(iter(masks))].shape[0]
    pad = -T % mesh.tp  # zero rows with mask 0: routed to zero output, not counted
    if pad:
        masks = {n: ops.concat([masks[n], ops.zeros((pad,), masks[n].dtype)]) for n in cells}
    mask = {n: ops.split(masks[n], masks[n].shape[0] // mesh.tp)[n % mesh.tp] for n in cells}
    if mesh.sp:
        return _moe_rows(cells, coll, j, z, mask, mesh)
    zs = coll.scatter("tp", {n: _pad(x, mesh.tp) for n, x in z.items()}, 0)  # [t, H]
    ys, stats = _moe_rows(cells, coll, j, zs, mask, mesh)
    y = coll.gather("tp", ys, 0)
    return ({n: v[:T] for n, v in y.items()} if pad else y), stats


def _moe_rows(cells, coll, j: int, zs: dict, mask: dict, mesh) -> tuple[dict, dict]:
    """Experts for each rank's own token rows [t, H] -> its rows of the MoE output [t, H]."""
    routed = {n: c.layers[j].gate(zs[n]) for n, c in cells.items()}
    stats = {n: router_stats(routed[n][1], routed[n][3], mask[n])[:2] for n in cells}
    xg = coll.gather_rs("ep", zs, 0)                                 # [G*t, H]
    wg = coll.gather_rs("ep", {n: r[2] for n, r in routed.items()}, 0)
    ig = coll.gather_rs("ep", {n: r[3].astype(ms.float32) for n, r in routed.items()}, 0)
    G = mesh.ep * mesh.expert_tp
    part = {}
    for n, c in cells.items():
        ex = c.layers[j].experts
        e = ex.num_experts
        lo = ((n % G) // mesh.expert_tp) * e
        idx = sg(ig[n]).astype(ms.int32)
        mine = ((idx >= lo) & (idx < lo + e)).astype(wg[n].dtype)
        local = ops.clip_by_value(idx - lo, 0, e - 1).astype(ms.int32)
        A = idx.shape[0] * idx.shape[1]
        b = dispatch.choose_block_size(A, e)
        nb = dispatch.num_blocks(A, e, b)
        slot, src, expert_nb, _ = dispatch.dispatch_indices(local, e, b, nb)
        y = ex.blocks(dispatch.permute(xg[n], src), expert_nb)
        part[n] = dispatch.unpermute(y, slot, wg[n] * mine)
    return coll.reduce_scatter("ep", part, 0), stats                 # [t, H]


def layer(cells, coll, j: int, xs: dict, rope, masks, mesh):
    """One decoder layer."""
    h = attention(cells, coll, j, xs, rope, mesh)
    h = {n: xs[n] + h[n] for n in xs}
    H = next(iter(h.values())).shape[-1]
    z = {n: c.layers[j].post_attention_layernorm(h[n]).reshape(-1, H) for n, c in cells.items()}
    if next(iter(cells.values())).layers[j].is_sparse:
        y, stats = moe(cells, coll, j, z, masks, mesh)
    else:
        y, stats = dense_mlp(cells, coll, j, z, mesh), None
    return {n: h[n] + y[n].reshape(h[n].shape) for n in h}, stats


def head_logits(cells, coll, xs: dict, mesh=None, inp: dict | None = None) -> dict:
    """Final norm + column-parallel lm_head: local logits [T, v] per rank (with mesh.sp the
    normed own rows are all-gathered first; `inp` gives B, S)."""
    x = {n: c.norm(xs[n]) for n, c in cells.items()}
    if mesh is not None and mesh.sp:
        B, S = _batch_shape(inp)
        x = sp_gather(coll, x, B, S)
    else:
        x = coll.copy("tp", x)
    return {n: ops.matmul(v.reshape(-1, v.shape[-1]), cells[n].lm_head.T) for n, v in x.items()}


def vocab_parallel_ce(coll, logits: dict, labels: dict, tp: int) -> dict:
    """Per-token cross-entropy [T] (0 where label == -100) from vocab-split logits."""
    local_max = {n: sg(lg.max(-1, keepdims=True)) for n, lg in logits.items()}
    m = {n: sg(g.max(-1, keepdims=True)) for n, g in coll.gather("tp", local_max, 1).items()}
    sumexp = coll.reduce("tp", {n: ops.exp(lg - m[n]).sum(-1) for n, lg in logits.items()})
    picked = {}
    for n, lg in logits.items():
        v = lg.shape[1]
        local = labels[n] - (n % tp) * v
        inside = ((local >= 0) & (local < v)).astype(ms.float32)
        col = ops.clip_by_value(local, 0, v - 1).astype(ms.int32).reshape(-1, 1)
        picked[n] = ops.gather_elements(lg, 1, col).reshape(-1) * inside
    picked = coll.reduce("tp", picked)
    out = {}
    for n in logits:
        valid = (labels[n] != -100).astype(ms.float32)
        out[n] = (ops.log(sumexp[n]) + m[n].reshape(-1) - picked[n]) * valid
    return out


def stage_forward(cells, coll, xs_or_ids: dict, rope: dict, masks: dict, mesh, cfg):
    """Run one stage. Stage 0 takes token ids. Returns (hidden streams, per-rank router stats
    summed over this stage's sparse layers (counts_E, probsum_E) or None, sparse layer count)."""
    first = next(iter(cells.values()))
    xs = embed(cells, coll, xs_or_ids, cfg.vocab_size, mesh.tp, mesh.sp) if first.first else xs_or_ids
    acc, L = None, 0
    for j in range(len(first.layers)):
        xs, stats = layer(cells, coll, j, xs, rope, masks, mesh)
        if stats is not None:
            L += 1
            acc = stats if acc is None else {n: (acc[n][0] + stats[n][0], acc[n][1] + stats[n][1]) for n in acc}
    return xs, acc, L
