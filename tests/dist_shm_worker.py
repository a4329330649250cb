"""Worker of tests/test_shm_dist.py, one per process under msrun:

    python dist_shm_worker.py ops         every backend op in a compiled graph (world group and
                                          the sub-group of ranks with the same parity), shm and
                                          MCCL on the same inputs, values and jit gradients
    python dist_shm_worker.py mismatch    rank 1 builds one more call site first: both time out
    python dist_shm_worker.py dispatch M  parallelize dp2 x ep2 on model folder M with the
                                          all-gather and the all-to-all dispatcher: logits, loss
                                          and gradients of each
Prints `RESULT <json>` (numbers for the test to compare).
"""
from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from mindspore.communication import create_group, get_group_size, get_rank, init

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


class _Apply(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    @ms.jit
    def construct(self, x):
        return self.op(x)


class _Loss(nn.Cell):
    def __init__(self, op, w):
        super().__init__()
        self.op, self.w = op, Tensor(w)

    def construct(self, x):
        return (self.op(x) * self.w).sum()


def _x(rank: int, rows: int) -> np.ndarray:
    return np.random.default_rng(rank).standard_normal((rows, 3)).astype(np.float32)


def _w(rank: int, rows: int) -> np.ndarray:
    return np.random.default_rng(100 + rank).standard_normal((rows, 3)).astype(np.float32)


def _expected(op: str, ranks: list[int], pos: int, rows: int):
    """(value, gradient of sum(op(x) * w)) of this member, from every member's inputs (NumPy)."""
    n, xs = len(ranks), [_x(r, rows) for r in ranks]
    total = xs[0].copy()
    for x in xs[1:]:
        total += x
    b = rows // n
    out_rows = {"all_gather": rows * n, "reduce_scatter": b}.get(op, rows)
    ws = [_w(r, out_rows) for r in ranks]
    if op == "all_reduce":
        g = ws[0].copy()
        for w in ws[1:]:
            g += w
        return total, g
    if op == "all_gather":
        g = ws[0][pos * rows:(pos + 1) * rows].copy()
        for w in ws[1:]:
            g += w[pos * rows:(pos + 1) * rows]
        return np.concatenate(xs), g
    if op == "reduce_scatter":
        return total[pos * b:(pos + 1) * b], np.concatenate(ws)
    return (np.concatenate([x[pos * b:(pos + 1) * b] for x in xs]),
            np.concatenate([w[pos * b:(pos + 1) * b] for w in ws]))


def ops_mode() -> dict:
    from qwen3moe.parallel import backend

    rank, world = get_rank(), get_group_size()
    be, mccl = backend.get(), backend.MCCLBackend()
    parity = [r for r in range(world) if r % 2 == rank % 2]
    name = "parity_" + "_".join(map(str, parity))
    create_group(name, parity)
    backend.register(name, parity)
    out = {"rank": rank, "backend": be.kind, "errors": {}, "digests": {}}
    rows = 4 * world  # divisible by every group size
    for group in (None, name):
        ranks = backend.ranks_of(group)
        pos = ranks.index(rank)
        for op in OPS:
            value, grad = _expected(op, ranks, pos, rows)
            x = Tensor(_x(rank, rows))
            got = {b.kind: _Apply(getattr(b, op)(group, f"test {op}"))(x).asnumpy() for b in (be, mccl)}
            w = _w(rank, value.shape[0])
            dx = ms.jit(ms.grad(_Loss(getattr(be, op)(group, f"test grad {op}"), w)))(x).asnumpy()
            key = f"{group or 'world'}/{op}"
            out["errors"][key] = {"shm_vs_numpy": float(np.abs(got[be.kind] - value).max()),
                                  "mccl_vs_numpy": float(np.abs(got["mccl"] - value).max()),
                                  "shm_vs_mccl": float(np.abs(got[be.kind] - got["mccl"]).max()),
                                  "grad_vs_numpy": float(np.abs(dx - grad).max())}
            out["digests"][key] = hashlib.sha1(got[be.kind].tobytes()).hexdigest()
    return out


def mismatch_mode() -> dict:
    from qwen3moe.parallel import backend

    be = backend.get()
    if get_rank() == 1:
        be.all_reduce(None, "only on rank 1")  # shifts this rank's later tags by one
    y = _Apply(be.all_reduce(None, "the mismatched call"))(Tensor(np.ones(4, np.float32)))
    return {"rank": get_rank(), "unexpected": y.asnumpy().tolist()}


def dispatch_mode(folder: str) -> dict:
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.models.inputs import prepare_inputs
    from qwen3moe.parallel import backend
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.objectives import LossGrad
    from qwen3moe.parallel.parallelize import parallelize
    from qwen3moe.parallel.process import ProcessCollectives

    rank = get_rank()
    cfg, mesh = Qwen3MoeConfig.from_pretrained(folder), Mesh(dp=2, ep=2)
    coll = ProcessCollectives(mesh, rank)
    ids = np.random.default_rng(7 + rank).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    out = {"rank": rank, "backend": backend.get().kind}
    for kind in ("allgather", "alltoall"):
        rm = parallelize(cfg, mesh, rank, weights=folder, dispatcher=kind, coll=coll)
        logits = rm.model(Tensor(ids)).logits.asnumpy()
        t = prepare_inputs(cfg, Tensor(ids), labels=Tensor(ids))
        loss, grads = LossGrad(rm.model)(t.input_ids, t.cos, t.sin, t.bias, t.token_mask, t.labels)
        out[kind] = {"logits": logits.tolist(), "loss": float(loss.asnumpy()),
                     "grads": {p.name: g.asnumpy().ravel()[:64].tolist() + [float(np.abs(g.asnumpy()).sum())]
                               for (p, _), g in zip(rm.entries, grads)}}
    return out


def main() -> None:
    ms.set_device("CPU")
    init()
    mode = sys.argv[1]
    result = {"ops": ops_mode, "mismatch": mismatch_mode}.get(mode)
    res = result() if result else dispatch_mode(sys.argv[2])
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
