"""Megatron's collectives with their conjugate backward rules, over the ranks of one stage.

Every parallel forward in this package is written per rank: a "stream" maps a stage-local rank
n (n = tp_rank + tp * dp_rank) to that rank's tensor. A collective takes the streams of the
ranks this process runs and returns theirs. Backward rules (what each rank computes when it
back-propagates its own copy of the loss, as Megatron's autograd functions do):

    reduce          fwd: sum over the group             bwd: identity          ("g")
    copy            fwd: identity                        bwd: sum over group    ("f")
    gather          fwd: concat (replicated result)      bwd: own slice
    scatter         fwd: own slice of a replicated x     bwd: concat
    gather_rs       fwd: concat (each rank computes      bwd: sum + own slice   (EP dispatch)
                         something different on it)
    reduce_scatter  fwd: sum + own slice                 bwd: concat            (EP combine)
    sum_nograd      fwd: sum, no gradient (statistics, gradient buckets)

`SimCollectives` runs every rank in one process: the backward rules come from stop-gradient
constructions (value unchanged, gradient routed), so ordinary autodiff of the sum of all
ranks' losses gives each rank exactly its Megatron gradient. Group kinds within a stage:
"tp" (same dp rank), "dp" (same tp rank), "ep" (the ep*etp consecutive ranks sharing an
expert-data-parallel index), "edp" (same expert shard), "stage" (all dp*tp ranks), "kv<r>" (the dp*r ranks holding one kv head replicated r times).
"""
from __future__ import annotations

from mindspore import Tensor, ops

from qwen3moe.parallel.mesh import stage_groups  # noqa: F401  (the group kinds)

sg = ops.stop_gradient


def _zero_with_grads(xs: list[Tensor]) -> Tensor:
    """Value 0, gradient 1 towards every x: routes one rank's gradient to all of them."""
    z = xs[0] - sg(xs[0])
    for x in xs[1:]:
        z = z + (x - sg(x))
    return z


def _split(x: Tensor, parts: int, axis: int) -> list[Tensor]:
    if x.shape[axis] % parts:
        raise ValueError(f"dim {axis} of shape {x.shape} is not divisible by {parts} ranks")
    return list(ops.split(x, x.shape[axis] // parts, axis))


class SimCollectives:
    """All ranks of a stage in one process; streams hold every rank of every group."""

    def __init__(self, dp: int, tp: int, ep_size: int) -> None:
        self.dp, self.tp, self.ep_size = dp, tp, ep_size
        self.calls: dict[str, int] = {}

    def _groups(self, kind: str, xs: dict[int, Tensor]):
        for g in stage_groups(kind, self.dp, self.tp, self.ep_size):
            yield g, [xs[n] for n in g]

    def _apply(self, name: str, kind: str, xs: dict[int, Tensor], fn) -> dict[int, Tensor]:
        self.calls[name] = self.calls.get(name, 0) + 1
        out: dict[int, Tensor] = {}
        for g, vals in self._groups(kind, xs):
            out.update(zip(g, vals if len(g) == 1 else fn(vals)))
        return out

    def reduce(self, kind, xs):
        def fn(v):
            total = sg(v[0])
            for x in v[1:]:
                total = total + sg(x)
            return [x + (total - sg(x)) for x in v]
        return self._apply("reduce", kind, xs, fn)

    def copy(self, kind, xs):
        return self._apply("copy", kind, xs, lambda v: [sg(x) + _zero_with_grads(v) for x in v])

    def gather(self, kind, xs, axis=0):
        def fn(v):
            return [ops.concat([x if i == r else sg(x) for i, x in enumerate(v)], axis) for r in range(len(v))]
        return self._apply("gather", kind, xs, fn)

    def scatter(self, kind, xs, axis=0):
        def fn(v):
            z = _zero_with_grads(v)
            return [_split(sg(x) + z, len(v), axis)[r] for r, x in enumerate(v)]
        return self._apply("scatter", kind, xs, fn)

    def gather_rs(self, kind, xs, axis=0):
        return self._apply("gather_rs", kind, xs, lambda v: [ops.concat(v, axis)] * len(v))

    def reduce_scatter(self, kind, xs, axis=0):
        def fn(v):
            total = v[0]
            for x in v[1:]:
                total = total + x
            return _split(total, len(v), axis)
        return self._apply("reduce_scatter", kind, xs, fn)

    def sum_nograd(self, kind, xs):
        def fn(v):
            total = sg(v[0])
            for x in v[1:]:
                total = total + sg(x)
            return [total] * len(v)
        return self._apply("sum_nograd", kind, xs, fn)
