"""Compiled training step of one rank of a sharded model: `ParallelTrainStep`, TrainStep's
interface (training/step.py) for any per-rank model whose forward holds collectives (tensor /
expert parallel, or none: pure data parallelism).

Per step, with no forward recompute (each a compiled graph):
  1. TrainStep's forward + backward (`ms.value_and_grad`) per micro-batch of this rank's rows,
     gradients accumulated in fp32 buffers;
  2. each buffer summed over its parameter's sync group (ranks.ShardInfo.sync: "dp", "stage",
     "edp", "kv<r>"; groups from process.ProcessCollectives), one flat AllReduce per bucket
     (at most `bucket_elems` values; kinds whose groups are the same ranks share buckets;
     buckets chained so every rank issues them in one order); the global gradient norm over
     the distinct shards (`owns_shard`: one replica of each counted) and the step's metrics,
     summed over the world in one more AllReduce (none when every buffer is summed over the
     world: each rank then holds the whole gradient, and the metrics ride in its last bucket);
  3. clipping by that norm (torch clip_grad_norm_), the schedule's lr (an input of this graph)
     and torch-exact AdamW (`RankAdamW`): whole parameters, or with ZeRO-1 this rank's chunk of
     each sync group's flattened parameters, the updated chunks all-gathered (backend.py).
A step whose loss or norm is not finite changes nothing (all ranks see the same global values).

Loss of rank r for micro-batch i of M (parallel/README.md, "Loss and gradient"), rows split by
data-parallel rank (`rank_rows`), gradients SUMMED over the sync groups:
    lm_i * n_r / N_i / M  +  coef * sum_e C_e s_re * E / (N_i L)^2 / M   (+ seq aux / z: / R)
lm_i the mean CE over the rank's n_r valid labels (N_i: of the global micro-batch); s_r the
rank's own router probability mass; C the top-k counts of the global micro-batch, summed
inside the forward graph over the ranks that route distinct tokens (`counts_group`, not
differentiated) and N_i counted on the host; L sparse layers. Summed over ranks this is one
process's lm_loss + coef * aux (HF pooling; Megatron's "aux_loss" is coef / K on it). "global"
aux over M > 1 micro-batches pools C over them first: a forward-only pass (TrainStep's
stats_reducer). Sequence-level aux and the z-loss are means over the R ranks' sequences /
tokens: weighted 1 / R (tp = 1 only: with tp the ranks' routed tokens are not whole sequences).
Shapes: B rows of a global micro-batch, b = B / dp rows per rank, E experts, L sparse layers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from qwen3moe.parallel import backend
from qwen3moe.training.optimizer import AdamW, clip_coefficient
from qwen3moe.training.step import TrainStep, as_batch, expert_load, global_norm
from qwen3moe.training.sync import fetch

_ROWS = ("input_ids", "labels", "attention_mask", "position_ids")
SYNC_ORDER = ("dp", "stage", "edp")  # then the kv<r> groups, sorted: one order on every rank


@dataclass(frozen=True)
class SyncGroup:
    kind: str          # "dp", "stage", "edp", "kv<r>" (ranks.py)
    name: str | None   # communication group name; None when the group is this rank alone
    size: int
    pos: int           # this rank's index in the group


def sync_groups(coll, kinds) -> dict[str, SyncGroup]:
    """The SyncGroup of each kind from a process.ProcessCollectives (kv<r> groups are added)."""
    out = {}
    for kind in kinds:
        if kind not in coll.groups:
            coll.add_group(kind)
        g = coll.groups[kind]
        out[kind] = SyncGroup(kind, None, 1, 0) if g is None else SyncGroup(kind, g.name, g.size, g.pos)
    return out


def sync_order(kinds) -> list[str]:
    kinds = set(kinds)
    return [k for k in SYNC_ORDER if k in kinds] + sorted(kinds - set(SYNC_ORDER))


def owns_shard(info, n: int, mesh) -> bool:
    """Whether stage-local rank n counts this shard in the global gradient norm: exactly one
    holder of each distinct shard does (dp replica 0; tp rank 0 of a tp-replicated weight; the
    first of a kv head's r replicas)."""
    if info.sync == "stage":
        return n == 0
    if info.sync == "edp":
        return n // (mesh.ep * mesh.expert_tp) == 0
    if info.sync.startswith("kv"):
        return n // mesh.tp == 0 and (n % mesh.tp) % int(info.sync[2:]) == 0
    return n // mesh.tp == 0 and (info.style != "replicate" or n % mesh.tp == 0)


def valid_labels(labels_BS: np.ndarray) -> float:
    """Labels the LM loss counts (the model shifts: position t predicts labels[t + 1])."""
    return float((np.asarray(labels_BS)[:, 1:] != -100).sum())


def rank_rows(batch, rank: int, dp: int) -> dict:
    """Data-parallel rank `rank`'s rows [rank * b, (rank + 1) * b) of a global micro-batch."""
    b = as_batch(batch)
    B = np.asarray(b["input_ids"]).shape[0]
    if B % dp:
        raise ValueError(f"runner_config.batch_size {B} is not divisible by data_parallel {dp}")
    r0, r1 = rank * B // dp, (rank + 1) * B // dp
    return {k: np.asarray(v)[r0:r1] for k, v in b.items() if k in _ROWS}


def _tokens(batch) -> float:
    """Tokens the router statistics count (the attention mask's ones; all without one)."""
    b = as_batch(batch)
    mask = b.get("attention_mask")
    return float(np.asarray(b["input_ids"]).size if mask is None else np.asarray(mask).sum())


def cut_buckets(sizes: list[int], cap: int) -> list[list[int]]:
    """Consecutive index runs of at most `cap` elements (a larger item alone)."""
    out, cur, used = [], [], 0
    for k, size in enumerate(sizes):
        if cur and used + size > cap:
            out.append(cur)
            cur, used = [], 0
        cur.append(k)
        used += size
    return out + ([cur] if cur else [])


class SumNoGrad(nn.Cell):
    """AllReduce-sum of a statistic (router counts) inside a forward graph, not differentiated
    (ops.AllReduce's own backward would be another AllReduce); group None: this rank alone."""

    def __init__(self, group: str | None) -> None:
        super().__init__(auto_prefix=False)
        self.all_reduce = backend.get().all_reduce(group, "router counts") if group is not None else None

    def construct(self, x):
        if self.all_reduce is None:
            return ops.stop_gradient(x)
        return self.all_reduce(ops.stop_gradient(x))

    def bprop(self, x, out, dout):
        return (ops.zeros_like(x),)


class _Zero1Chunk(nn.Cell):
    """ZeRO-1 for one sync group: this member's chunk [pos*c, (pos+1)*c) of the group's flattened
    parameters (zero-padded to size*c) with its own AdamW moments; after the step every member's
    chunk is gathered into all parameters (backend.py all_gather: on MCCL an AllReduce of
    zero-padded buffers, CPU has no sub-group AllGather)."""

    def __init__(self, params: list, idx: tuple, group: SyncGroup, adamw: dict) -> None:
        super().__init__(auto_prefix=False)
        sel = [params[i] for i in idx]
        self.idx, self.shapes = idx, tuple(p.shape for p in sel)
        self.sizes = tuple(int(np.prod(p.shape)) for p in sel)
        P, G = sum(self.sizes), group.size
        self.P, self.G, self.pos, self.c = P, G, group.pos, -(-P // G)
        flat = np.zeros(G * self.c, np.float32)
        flat[:P] = np.concatenate([p.asnumpy().ravel() for p in sel])
        self.chunk = Parameter(Tensor(flat[self.pos * self.c:(self.pos + 1) * self.c]), name=f"zero1.{group.kind}")
        self.opt = AdamW([self.chunk], **adamw)
        # the composite update (ops.assign): the chunk is read back after it in this graph, and a
        # read after the in-place kernel saw the old values (the parameters never moved)
        self.opt.fused = None
        self.opt.step.name, self.opt.learning_rate.name = f"adamw.step.{group.kind}", f"adamw.lr.{group.kind}"
        self.gather = backend.get().all_gather(group.name, f"zero1 {group.kind} chunks")

    def update(self, grads, params, after, inv_scale=None, coef=None, lr=None):
        """`grads` unscaled: this chunk's slice is scaled (`scaled`) after the flattening, the
        same values as scaling every gradient first, in two ops instead of two per parameter."""
        g = ops.concat([grads[i].reshape(-1) for i in self.idx])
        if self.G * self.c > self.P:
            g = ops.concat([g, ops.zeros(self.G * self.c - self.P, ms.float32)])
        c, k = self.c, self.pos
        t = self.opt.update((ops.depend(scaled(g[k * c:(k + 1) * c], inv_scale, coef), after),), lr)
        full = self.gather(ops.depend(self.chunk, t))
        parts = ops.split(full[:self.P], self.sizes)
        for j in range(len(self.idx)):
            ops.assign(params[self.idx[j]], parts[j].reshape(self.shapes[j]))
        return full


def scaled(g, inv_scale=None, coef=None):
    """(g * inv_scale) * coef, as TrainStep's apply scales and clip_by_global_norm clips."""
    if inv_scale is not None:
        g = g * inv_scale
    return g if coef is None else g * coef.astype(g.dtype)


class RankAdamW(nn.Cell):
    """TrainStep's optimizer for one rank: torch-exact AdamW (training/optimizer.py) over the
    parameters it steps whole, and with `zero1` a `_Zero1Chunk` per sync group of size > 1.
    `parameters` are all of the rank's parameters (what TrainStep differentiates)."""

    def __init__(self, params: list, syncs: list[str], groups: dict[str, SyncGroup], zero1: bool = False,
                 rank: int = 0, **adamw) -> None:
        super().__init__(auto_prefix=False)
        self.parameters, self.rank = ParameterTuple(params), rank
        sharded = [k for k in sync_order(syncs) if zero1 and groups[k].size > 1]
        if sharded and adamw.get("no_decay"):
            raise ValueError("ZeRO-1 flattens parameters: no_decay patterns are not supported, use a "
                             "uniform weight_decay")
        self.whole_idx = tuple(i for i, s in enumerate(syncs) if s not in sharded)
        self.whole = AdamW([params[i] for i in self.whole_idx], **adamw) if self.whole_idx else None
        self.chunks = nn.CellList([_Zero1Chunk(params, tuple(i for i, s in enumerate(syncs) if s == k), groups[k],
                                               adamw) for k in sharded])

    def adamws(self) -> list[AdamW]:
        return ([self.whole] if self.whole is not None else []) + [c.opt for c in self.chunks]

    def set_lr(self, lr: float) -> None:
        """Host copies only: the step's update graph gets the lr as an input (`lr_input`), one
        graph call a step less than a compiled assign per AdamW."""
        for o in self.adamws():
            o.set_lr(lr, compiled=False)

    def lr_input(self) -> Tensor:
        return Tensor(self.get_lr(), ms.float32)

    def get_lr(self) -> float:
        return self.adamws()[0].get_lr()

    def update(self, grads, inv_scale=None, coef=None, lr=None):
        """AdamW with the gradients `scaled(grads[i], inv_scale, coef)` (None: as given) and the
        learning rate `lr` (a graph input from `lr_input`; None: as the AdamWs hold it)."""
        after = ops.depend(Tensor(0.0, ms.float32), grads)
        if self.whole is not None:  # `after` also waits for every read of `grads` (clearing follows)
            mine = tuple(scaled(grads[i], inv_scale, coef) for i in self.whole_idx)
            after = ops.depend(self.whole.update(mine, lr), mine)
        for chunk in self.chunks:
            after = chunk.update(grads, self.parameters, after, inv_scale, coef, lr)
        return after

    # single-process checkpoints (pure data parallelism without ZeRO-1: one AdamW)
    def state_arrays(self) -> dict:
        return self._only().state_arrays()

    def load_state_arrays(self, arrays: dict) -> None:
        self._only().load_state_arrays(arrays)

    def _only(self) -> AdamW:
        if self.chunks or self.whole is None:
            raise ValueError("RankAdamW with ZeRO-1 chunks is saved per rank (parallel/train_state.py)")
        return self.whole


class _SyncAndNorm(nn.Cell):
    """Compiled: every accumulation buffer <- its sum over the sync group (bucketed, chained
    AllReduces, in place); then [sum of squares of the owned shards, metrics...] summed over the
    world in one AllReduce. Input: this rank's metrics vector (host values).

    `replicated` (every buffer is in a bucket over the whole world, e.g. pure data parallelism):
    after the sums every rank holds the same global gradient, so each computes the norm from all
    of it (the owners' sum of squares, exactly) and the metrics ride in the last bucket: one
    collective less."""

    def __init__(self, acc, buckets: list[tuple[str, tuple]], owned: tuple, replicated: bool = False) -> None:
        super().__init__(auto_prefix=False)
        self.acc, self.owned, self.replicated = acc, owned, replicated
        self.buckets = tuple(idx for _, idx in buckets)
        self.reducers = nn.CellList([_AllReduce(name) for name, _ in buckets])
        in_bucket = {i for _, idx in buckets for i in idx}
        self.alone = tuple(i for i in range(len(acc)) if i not in in_bucket and owned[i])
        self.world = None if replicated else backend.get().all_reduce(None, "norm and metrics")

    @ms.jit
    def construct(self, metrics):
        prev = metrics
        mine = tuple(self.acc[i] for i in self.alone)
        last = len(self.buckets) - 1
        for b in range(len(self.buckets)):
            idx = self.buckets[b]
            sizes = tuple(int(np.prod(self.acc[i].shape)) for i in idx)
            flat = ops.depend(ops.concat([self.acc[i].reshape(-1) for i in idx]), prev)
            if self.replicated and b == last:
                flat, sizes = ops.concat([flat, metrics]), sizes + (metrics.shape[0],)
            flat = self.reducers[b](flat)
            parts = ops.split(flat, sizes)
            for j in range(len(idx)):
                part = parts[j].reshape(self.acc[idx[j]].shape)
                ops.assign(self.acc[idx[j]], part)
                if self.owned[idx[j]] or self.replicated:
                    mine = mine + (part,)
            prev = flat
            if self.replicated and b == last:
                metrics = parts[-1]
        sq = global_norm(mine) ** 2 if mine else Tensor(0.0, ms.float32)
        if self.replicated:
            return ops.concat([sq.reshape(1), metrics])
        return self.world(ops.concat([sq.reshape(1), ops.depend(metrics, prev)]))


def sync_buckets(syncs: list[str], groups: dict[str, SyncGroup], acc, bucket_elems: int):
    """(buckets [(group name, buffer indices)], replicated) for _SyncAndNorm: the buffers of the
    sync kinds whose groups are the same ranks share buckets (e.g. dp and stage on a dp2 x ep2
    world), in sync_order's order of first appearance, so every rank builds the same ones;
    replicated: every buffer is summed over the whole world."""
    by_group: dict[str, list[int]] = {}
    for kind in sync_order(syncs):
        g = groups[kind]
        idx = [i for i, s in enumerate(syncs) if s == kind]
        if g.size > 1 and idx:
            by_group.setdefault(g.name, []).extend(idx)
    buckets = []
    for name, idx in by_group.items():
        sizes = [int(np.prod(acc[i].shape)) for i in idx]
        buckets += [(name, tuple(idx[j] for j in chunk)) for chunk in cut_buckets(sizes, bucket_elems)]
    world = backend.ranks_of(None)
    replicated = bool(buckets) and sum(len(idx) for _, idx in buckets) == len(acc) and \
        all(backend.ranks_of(name) == world for name in by_group)
    return buckets, replicated


class _AllReduce(nn.Cell):
    def __init__(self, group: str) -> None:
        super().__init__(auto_prefix=False)
        self.op = backend.get().all_reduce(group, "gradient bucket")

    def construct(self, x):
        return self.op(x)


class _ApplyGlobal(nn.Cell):
    """Compiled: clip the (synced) buffers times `inv_scale` by the global `norm`, update with
    learning rate `lr`, clear."""

    def __init__(self, graph, optimizer: RankAdamW, clip: float | None) -> None:
        super().__init__(auto_prefix=False)
        self.graph, self.optimizer, self.clip = graph, optimizer, clip

    @ms.jit
    def construct(self, inv_scale, norm, lr):
        coef = clip_coefficient(self.clip, norm) if self.clip is not None else None
        done = self.optimizer.update(tuple(self.graph.acc), inv_scale, coef, lr)
        self.graph.clear(after=done)
        return norm


class ParallelTrainStep(TrainStep):
    """`ParallelTrainStep(model, optimizer, syncs=..., owned=..., groups=..., dp=, dp_rank=, ...)`:
    called with the GLOBAL batch (or its list of micro-batches) like TrainStep, trains this rank
    on its rows and returns the global batch's metrics (module docstring).

    `model`: this rank's cell (Qwen3MoeForCausalLM's construct contract; `cross_entropy` when its
    logits are a vocab block, see TrainStep); `optimizer`: RankAdamW
    over its parameters; `syncs[i]` / `owned[i]`: sync group kind / norm ownership of parameter i;
    `groups`: SyncGroup per kind; `counts_group`: the communication group over which router
    counts are summed (the ranks routing distinct tokens; None: this rank alone); `owner`:
    whether this rank's metrics count in the global ones (one rank of each tp group: the others
    hold the same loss and router statistics);
    `R`: ranks whose sequence / z statistics are averaged; `aux_kind`: none / hf / megatron /
    global / seq (megatron: pass coef / K as aux_coef, the linear form is on HF's scale)."""

    def __init__(self, model, optimizer: RankAdamW, *, syncs: list[str], owned: list[bool],
                 groups: dict[str, SyncGroup], dp: int, dp_rank: int, counts_group: str | None,
                 aux_kind: str, rank: int = 0, owner: bool = True, R: int | None = None, accum: int = 1,
                 bucket_elems: int = 1 << 24, log_every: int = 0, log: Callable[[str], None] = lambda s: None,
                 aux_coef: float = 0.0, z_coef: float = 0.0, **kwargs) -> None:
        self.in_graph_counts = aux_kind in ("hf", "megatron") or (aux_kind == "global" and accum == 1)
        reduce = SumNoGrad(counts_group) if self.in_graph_counts else None
        super().__init__(model, optimizer, aux_coef=aux_coef if aux_kind != "none" else 0.0, z_coef=z_coef,
                         aux_mode="seq" if aux_kind == "seq" else "global", skip_nonfinite=True,
                         reduce_counts=reduce, **kwargs)
        self.dp, self.dp_rank, self.aux_kind, self.owner, self.rank = dp, dp_rank, aux_kind, owner, rank
        self.R = R or dp
        self.log_every, self.log = log_every, log
        self.groups = groups
        buckets, replicated = sync_buckets(syncs, groups, self.graph.acc, bucket_elems)
        self._sync = _SyncAndNorm(self.graph.acc, buckets, tuple(bool(o) for o in owned), replicated)
        self._apply = _ApplyGlobal(self.graph, optimizer, self.graph.clip)
        self._clear = None
        self._counts = []
        self.pl = None  # compiled.RankShards: what the sharded checkpointer saves

    # ---- loss weights ----------------------------------------------------------------------
    def _micro_weights(self, prepped, S):
        m = len(prepped)
        lm_ws = [S / m * n / max(N, 1.0) for n, N, _ in self._counts]
        if self.aux_kind == "none" or self.aux_kind == "seq":
            return lm_ws, [Tensor(np.zeros(self.E, np.float32))] * m
        if self.in_graph_counts:  # w_e = E / (N L)^2 / M; the graph multiplies by the summed C_e
            L = self._sparse_layers()
            return lm_ws, [Tensor(np.full(self.E, S / m * self.E / max(T * L, 1.0) ** 2, np.float32))
                           for _, _, T in self._counts]
        return lm_ws, [self._global_weights(prepped, S)] * m  # "global" over micro-batches: pre-pass

    def _sparse_layers(self) -> int:
        c = self.model.config
        return sum(bool(c.is_sparse_layer(i)) for i in range(c.num_hidden_layers))

    # ---- the step ----------------------------------------------------------------------------
    def _guarded(self, batch) -> dict:
        metrics = self._run(batch, update=False)
        scale = self._scale()
        tot = self._reduce(metrics)
        norm = float(np.sqrt(max(tot[0], 0.0))) / scale
        finite = bool(np.isfinite(metrics["loss"]) and np.isfinite(norm))
        # wait for the update here, on fetch's idle-priority helper: otherwise the next graph call
        # waits for it inside MindSpore (Pipeline::WaitAll, a spin loop on the main thread) and
        # takes the core the update and the peer ranks need
        if finite:
            fetch(self._apply(Tensor(1.0 / scale, ms.float32), Tensor(norm, ms.float32), self.optimizer.lr_input()))
        else:
            fetch(self._clear_buffers())
        metrics.update(grad_norm=norm, skipped=not finite)
        if self.loss_scale is not None:
            self.loss_scale.update(finite)
            metrics.update(loss_scale=scale)
        return metrics

    def _reduce(self, metrics: dict) -> np.ndarray:
        """Gradient sync + the norm's sum of squares + global metrics (one compiled graph);
        updates `metrics` to the global batch's values; returns the reduced vector."""
        counts = np.asarray(metrics["counts"], np.float64)
        o = 1.0 if self.owner else 0.0  # the other tp ranks hold the same values
        local = o * np.concatenate([[metrics["lm_part"], metrics["loss"] - metrics["lm_part"], metrics["aux_part"],
                                     metrics["aux"] / self.R, metrics["z"] / self.R, metrics["tokens"]],
                                    counts.ravel()]).astype(np.float32)
        tot = fetch(self._sync(Tensor(local)))[0].astype(np.float64)
        lm, rest, aux_part, aux_local, z, tokens = tot[1:7]
        aux = aux_part if self.aux_kind in ("hf", "megatron", "global") else aux_local
        metrics.update(loss=lm + rest, lm_loss=lm, aux=aux, aux_megatron=aux / self.K, z=z, tokens=int(tokens),
                       **expert_load(tot[7:].reshape(counts.shape)))
        return tot

    def _clear_buffers(self) -> Tensor:
        from qwen3moe.training.step import _ClearAccumulated, _TICK

        if self._clear is None:
            self._clear = _ClearAccumulated(self.graph)
        return self._clear(_TICK)

    def __call__(self, batch) -> dict:
        micro = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        self._counts, mine = [], []
        for b in micro:
            rows = rank_rows(b, self.dp_rank, self.dp)
            self._counts.append((valid_labels(rows["labels"]), valid_labels(as_batch(b)["labels"]), _tokens(b)))
            mine.append(rows)
        m = super().__call__(mine if isinstance(batch, (list, tuple)) else mine[0])
        if self.log_every and (m["step"] % self.log_every == 0):
            self.log(f"rank {self.rank} step {m['step']} loss {m['loss']:.6f} grad_norm {m['grad_norm']:.4f} "
                     f"lr {m['lr']:.3e}")
        return m
