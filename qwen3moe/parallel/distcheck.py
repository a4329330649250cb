"""`qwen3moe dist-parallel`: a sharded load (peak RSS) or (mode forward) the parallelize.py
model's compiled forward and gradients on real processes (one rank per process, run under
`qwen3moe launch`): `run` returns each rank's result (the command prints it as a
`RESULT {json}` line) and writes the rank's arrays, so a test compares them with a
single-process run it computes itself. Training on real processes is `pretrain --use_parallel`
(compiled.py). The command (commands/launch.py) maps its flags to `run`'s parameters."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def data(vocab: int, batch: int, seq: int) -> np.ndarray:
    """The fixed token batch both sides use."""
    return np.random.default_rng(0).integers(0, vocab, (batch, seq))


def run(model: str, mode: str, *, dp: int = 1, tp: int = 1, pp: int = 1, ep: int = 1, sp: bool = False,
        micro_batch_num: int = 1, batch: int = 2, seq: int = 8, steps: int = 3, out: str = ".") -> dict:
    """This rank's result for `mode` on the model folder `model` sharded as dp x tp x pp (ep
    folded, sp over tp): load (parallelize.py's sharded load: peak RSS growth, bytes read and
    held) or forward (parallelize.py's model: `forward`; `steps` timed calls).
    The layout is checked against config.json and the launched world size before any collective."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.parallel.mesh import Mesh, MeshError, launched_world_size
    from qwen3moe.parallel.process import ProcessCollectives

    mesh = Mesh(dp=dp, tp=tp, pp=pp, ep=ep, sp=sp, micro_batch_num=micro_batch_num)
    c = Qwen3MoeConfig.from_pretrained(model)
    launched = launched_world_size()
    mesh.validate(num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                  num_kv_heads=c.num_key_value_heads, num_experts=c.num_experts or 0,
                  world_size=launched if launched > 1 else None)
    ms.set_device("CPU")
    init()
    rank, size = get_rank(), get_group_size()
    if mesh.world_size != size:
        raise MeshError(f"dp*tp*pp = {mesh.world_size} but {size} processes were launched")
    coll = ProcessCollectives(mesh, rank)
    from qwen3moe.parallel import backend

    if mode == "forward":
        return {"rank": rank, "size": size, "collectives": backend.get().kind, **forward(model, mesh, rank, coll, batch, seq, steps, out_dir=out)}
    if mode != "load":
        raise MeshError(f"mode {mode!r}: expected load or forward")
    from qwen3moe.parallel.parallelize import parallelize

    rss_before = _reset_peak_rss()  # peak RSS growth while loading vs the bytes this rank holds
    rm = parallelize(c, mesh, rank, model, coll=coll)
    peak_rss = _status_kib("VmHWM") * 1024
    held = sum(p.nbytes for p, _ in rm.entries)
    return {"rank": rank, "size": size, "bytes_read": rm.bytes_read, "collectives": backend.get().kind,
            "rss_before": rss_before, "peak_rss": peak_rss, "held_bytes": held}


def _status_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> int:
    """Current RSS in bytes, after resetting the peak (VmHWM) to it (Linux clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def forward(model: str, mesh, rank: int, coll, batch: int, seq: int, steps: int, out_dir: str) -> dict:
    """parallelize.py's compiled per-rank model on this dp rank's rows: logits (gathered over
    tp), loss and aux, and the compiled gradient of loss = lm_loss + coef * aux per parameter
    (before any gradient sync), also with vocab-split logits when tp > 1; written to
    <out>/forward_rank<r>.npz. Times: median seconds of `steps` calls after the compiling one."""
    from qwen3moe.models.config import Qwen3MoeConfig
    from qwen3moe.models.inputs import prepare_inputs
    from qwen3moe.parallel.parallelize import parallelize

    cfg = Qwen3MoeConfig.from_pretrained(model)
    rm = parallelize(cfg, mesh, rank, model, coll=coll)
    ids = data(cfg.vocab_size, batch, seq)
    b = batch // mesh.dp
    dp_rank = mesh.coords(rank)["dp"]
    rows = ids[dp_rank * b:(dp_rank + 1) * b]
    out, times = timed(lambda: rm.forward(rows, labels=rows, output_router_logits=True), steps)
    result = {"forward_s": times, "layers": list(rm.layers), "bytes_read": rm.bytes_read}
    last = mesh.coords(rank)["pp"] == mesh.pp - 1
    arrays = {"logits": out.logits.asnumpy(), "lm_loss": out.lm_loss.asnumpy()} if last else {}
    t = prepare_inputs(cfg, rows, labels=rows)
    if mesh.pp == 1:  # the loss, aux, router logits, hidden states and gradients of the whole model
        arrays.update(loss=out.loss.asnumpy(), aux=out.aux_loss.asnumpy(),
                      router_logits=np.stack([x.asnumpy() for x in out.router_logits]),
                      hidden=np.stack([x.asnumpy() for x in rm.model(rows, output_hidden_states=True).hidden_states]))
        result["grad_s"] = _grads(rm, t, "grad", arrays, steps)
    if mesh.pp > 1:
        result["grad_s"] = _pipeline_grads(rm, t, rows, arrays)
    if mesh.tp > 1 and mesh.pp == 1:  # vocab-split logits and the vocab-parallel cross-entropy
        rm = parallelize(cfg, mesh, rank, model, coll=coll, gather_logits=False)
        out = rm.model(rows, labels=rows, output_router_logits=True)
        arrays.update(vlogits=out.logits.asnumpy(), vloss=out.loss.asnumpy())
        result["vgrad_s"] = _grads(rm, t, "vgrad", arrays, steps)
    np.savez(Path(out_dir) / f"forward_rank{rank}.npz", **arrays)
    return result


def _pipeline_grads(rm, t, rows: np.ndarray, arrays: dict) -> float:
    """One pipeline backward (pp stages, dp = 1) of lm_loss + coef * pooled aux through
    StageGrad: router counts go forward with the activations (summed), the aux weights and
    the input gradients come back; gradients saved under "grad|..."; returns seconds."""
    import time

    import mindspore as ms
    from mindspore import Tensor

    from qwen3moe.parallel.objectives import StageGrad

    cfg, m, coll = rm.model.config, rm.mesh, rm.coll
    s, E = m.coords(rm.rank)["pp"], cfg.num_experts
    first, last = s == 0, s == m.pp - 1
    out = rm.forward(rows, labels=rows, output_router_logits=True)
    x = t.input_ids if first else rm.stage_input
    zero_h = ms.ops.zeros(tuple(x.shape[:2]) + (cfg.hidden_size,), ms.float32)
    lm_w = Tensor(1.0 / max(float((t.labels.asnumpy() != -100).sum()), 1.0), ms.float32)
    grad_fn = StageGrad(rm.model, first, last)
    args = (t.cos, t.sin, t.bias, t.token_mask, t.labels)
    grad_fn(x, *args, zero_h, lm_w, ms.ops.zeros((E,), ms.float32))[0].asnumpy()  # compile before any wait
    t0 = time.perf_counter()
    out = rm.forward(rows, labels=rows, output_router_logits=True)
    x = t.input_ids if first else rm.stage_input
    counts = out.router_stats[0].sum(0) if out.router_stats else ms.ops.zeros((E,), ms.float32)
    if not first:
        counts = counts + coll.recv((E,), s - 1)
    if not last:  # counts forward; the aux weights and the output gradient come back
        coll.send(counts, s + 1)
        coll.finish()
        aux_w, dout = coll.recv((E,), s + 1), coll.recv(tuple(zero_h.shape), s + 1)
    else:
        n, L = float(t.token_mask.asnumpy().sum()), sum(map(cfg.is_sparse_layer, range(cfg.num_hidden_layers)))
        aux_w, dout = counts * (cfg.router_aux_loss_coef * E / (n * L) ** 2), zero_h
    if not first:
        coll.send(aux_w, s - 1)
    dx, grads = grad_fn(x, *args, dout, lm_w, aux_w)
    if not first:
        coll.send(dx, s - 1)
        coll.finish()
    _sync(grads)
    for (_, i), g in zip(rm.entries, grads):
        arrays[f"grad|{i.name}|{i.style}|{i.tp_rank}|{i.tp_size}|{i.ep_rank}|{i.ep_size}|{i.sync}"] = g.asnumpy()
    return time.perf_counter() - t0


def timed(fn, steps: int):
    """(last result, median seconds of `steps` calls after a first, compiling one)."""
    import time

    out, times = fn(), []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = fn()
        _sync(out)
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times)) if times else None


def _sync(out) -> None:
    """asnumpy() of one output: the graph has run."""
    t = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    if t is not None:
        t.asnumpy()


def _grads(rm, t, tag: str, arrays: dict, steps: int) -> float:
    from qwen3moe.parallel.objectives import LossGrad

    fn = LossGrad(rm.model)
    (_, grads), median = timed(lambda: fn(t.input_ids, t.cos, t.sin, t.bias, t.token_mask, t.labels), steps)
    for (_, i), g in zip(rm.entries, grads):
        arrays[f"{tag}|{i.name}|{i.style}|{i.tp_rank}|{i.tp_size}|{i.ep_rank}|{i.ep_size}|{i.sync}"] = g.asnumpy()
    return median
