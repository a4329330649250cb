"""Data parallelism: bucketed gradient all-reduce and AdamW, unsharded or ZeRO-1.

Gradients of a parameter's replicas are summed over its sync group (ranks.ShardInfo.sync):
the data-parallel group for dense weights, the whole stage for the router (each tp rank routed
its own tokens), the expert-data-parallel group for experts. Gradients are flattened into
buckets of at most `bucket_elems` fp32 values, one all-reduce per bucket (Megatron / DDP
buckets: fewer, larger messages), in a fixed parameter order so every rank builds the same
buckets. ZeRO-1: the flattened parameters of a sync group are cut into one chunk per member;
each member keeps AdamW moments for its chunk only, steps it, and the chunks are all-gathered
back (AdamW is elementwise, so this equals the unsharded step exactly).
Shapes: P flattened parameters of one sync class on one rank, c = ceil(P / group size).
"""
from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor

from qwen3moe.parallel.mesh import stage_groups
from qwen3moe.parallel.step import cut_buckets
from qwen3moe.training.optimizer import AdamW


def _by_rank(model, s: int, sync: str) -> dict[int, list]:
    return {n: [p for p, i in entries if i.sync == sync] for n, entries in model.entries[s].items()}


def _groups(model, sync: str):
    m = model.mesh
    return stage_groups(sync, m.dp, m.tp, m.ep * m.expert_tp)


def sync_classes(model) -> list[str]:
    """The gradient sync groups in use, in one order on every rank ("kv<r>" only when tp > K)."""
    found = {i.sync for per in model.entries for entries in per.values() for _, i in entries}
    found |= {f"kv{model.mesh.tp // model.cfg.num_key_value_heads}"} \
        if model.cfg.num_key_value_heads < model.mesh.tp else set()
    return [k for k in ("dp", "stage", "edp") if k in found] + sorted(found - {"dp", "stage", "edp"})


def allreduce_grads(model, grads: dict, bucket_elems: int = 1 << 20) -> int:
    """Sum every parameter's gradient over its sync group in place; returns the number of
    bucket all-reduces one rank issues."""
    m = model.mesh
    buckets = 0
    for s in range(m.pp):
        for sync in sync_classes(model):
            params = _by_rank(model, s, sync)
            if not params or len(_groups(model, sync)[0]) == 1 or not params[min(params)]:
                continue
            for chunk in cut_buckets([p.size for p in params[min(params)]], bucket_elems):
                flat = {n: Tensor(np.concatenate([grads[plist[k].name].ravel() for k in chunk]))
                        for n, plist in params.items()}
                total = model.coll.sum_nograd(sync, flat)
                model.coll.calls["bucket_all_reduce"] = model.coll.calls.get("bucket_all_reduce", 0) + 1
                for n, plist in params.items():
                    _scatter_back(total[n].asnumpy(), [[plist[k] for k in chunk]], grads)
                buckets += 1
    return buckets


def _scatter_back(flat: np.ndarray, per_rank: list[list], grads: dict) -> None:
    for plist in per_rank:
        off = 0
        for p in plist:
            grads[p.name] = flat[off:off + p.size].reshape(p.shape).copy()
            off += p.size


class ShardedAdamW:
    """AdamW over a ParallelLM: one optimizer per rank (`zero1=False`) or one per rank over its
    1/group chunk of each sync class (`zero1=True`; uniform weight decay only)."""

    def __init__(self, model, zero1: bool = False, **adamw) -> None:
        self.model, self.zero1, self.kw = model, zero1, adamw
        if zero1 and adamw.get("no_decay"):
            raise ValueError("ZeRO-1 flattens parameters: no_decay patterns are not supported, use a "
                             "uniform weight_decay")
        self.opts = {}
        for s in range(model.mesh.pp):
            for n, entries in model.entries[s].items():
                if not zero1:
                    self.opts[(s, n)] = AdamW([p for p, _ in entries], **adamw)
        self.chunks: dict = {}
        if zero1:
            self._build_chunks()

    def _build_chunks(self) -> None:
        """A chunk (and its AdamW) for each rank this process runs (all of them simulated)."""
        for s in range(self.model.mesh.pp):
            for sync in sync_classes(self.model):
                params = _by_rank(self.model, s, sync)
                for group in _groups(self.model, sync):
                    members = [n for n in group if n in params]
                    P = sum(p.size for p in params[members[0]]) if members else 0
                    if P == 0:
                        continue
                    c = -(-P // len(group))
                    for n in members:
                        k = group.index(n)
                        flat = _flat([p.asnumpy() for p in params[n]], len(group) * c)
                        chunk = Parameter(Tensor(flat[k * c:(k + 1) * c]), name=f"zero1.s{s}.{sync}.r{n}")
                        self.chunks[(s, sync, n)] = (group, k, c, chunk, AdamW([chunk], **self.kw))

    def step(self, grads: dict) -> None:
        if not self.zero1:
            for (s, n), opt in self.opts.items():
                opt(tuple(Tensor(grads[p.name]) for p in opt.parameters))
            return
        classes: dict = {}
        for (s, sync, n), (group, k, c, chunk, opt) in self.chunks.items():
            params = _by_rank(self.model, s, sync)
            g = _flat([grads[p.name] for p in params[n]], len(group) * c)
            opt((Tensor(g[k * c:(k + 1) * c]),))
            classes.setdefault((s, sync), {})[n] = Tensor(chunk.asnumpy())
        for (s, sync), mine in classes.items():  # all-gather the updated chunks into every member
            params = _by_rank(self.model, s, sync)
            full = self.model.coll.gather(sync, mine, 0)
            self.model.coll.calls["zero1_all_gather"] = self.model.coll.calls.get("zero1_all_gather", 0) + 1
            for n, flat in full.items():
                flat, off = flat.asnumpy(), 0
                for p in params[n]:
                    p.set_data(Tensor(flat[off:off + p.size].reshape(p.shape)))
                    off += p.size

    def optimizers(self) -> list:
        """The AdamW instances (to set the learning rate of a schedule)."""
        return list(self.opts.values()) + [c[4] for c in self.chunks.values()]

    def state_elems(self) -> dict[tuple, int]:
        """Optimizer-moment elements held per (stage, rank): ZeRO-1 divides them by the group size."""
        out: dict[tuple, int] = {}
        if self.zero1:
            for (s, _, n), (_, _, c, _, _) in self.chunks.items():
                out[(s, n)] = out.get((s, n), 0) + 2 * c
        else:
            for key, opt in self.opts.items():
                out[key] = sum(2 * p.size for p in opt.parameters)
        return out


def _flat(arrays: list[np.ndarray], size: int) -> np.ndarray:
    flat = np.concatenate([a.ravel() for a in arrays]).astype(np.float32)
    return np.pad(flat, (0, size - flat.size))
