"""Test harness (not used by any command): a model sharded over a dp x tp x pp (x ep) mesh with
every rank simulated in one process (`SimCollectives`): forward, loss, gradients through a 1F1B
pipeline (the dp all-reduce and AdamW, optionally ZeRO-1, in dp.py). Why it has its own forward
instead of parallelize.py's rank models: tests/parallel_sim/__init__.py.

Loss (what each rank back-propagates; summed over ranks it is the global-batch objective):
    sum over its tokens of CE / N_global                      (N_global: valid labels, all dp ranks)
  + coef / M * E * sum_e C_e * s_e / (n * L)^2               (its own router probability mass s;
                                                              C, n, L: counts, tokens and sparse
                                                              layers of the global micro-batch)
so the gradient is HF's (lm_loss + coef * aux) for micro_batch_num = 1, and with M micro-batches
that of the mean over micro-batches of the global-micro-batch aux (Megatron's accumulation).
Shapes: B global batch, b = B / (dp*M) rows per rank and micro-batch, S seq, V vocab, E experts.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import ParameterTuple, Tensor, ops

from qwen3moe.models.inputs import prepare_inputs
from qwen3moe.parallel.mesh import Mesh, MeshError, stage_groups
from qwen3moe.parallel.ranks import assemble, stage_layers
from qwen3moe.router.losses import switch_aux_weights

from parallel_sim import engine
from parallel_sim.collectives import SimCollectives
from parallel_sim.ranks import build_stage
from parallel_sim.schedule import run_schedule


class ParallelLM:
    def __init__(self, cfg, mesh: Mesh, get, offset: list[int] | None = None, train: bool = True) -> None:
        """`get(hf_name)` -> full array (or a checkpoint.ShardReader); every rank here."""
        mesh.validate(num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                      num_kv_heads=cfg.num_key_value_heads, num_experts=cfg.num_experts or 0)
        if mesh.ep > 1 and mesh.expert_tp != 1:
            raise MeshError(f"etp={mesh.expert_tp} with ep={mesh.ep}: experts are split either over ep "
                            "ranks or (ep=1) over the tp ranks' ffn dim")
        if cfg.vocab_size % mesh.tp:
            raise MeshError(f"tp={mesh.tp} must divide vocab_size={cfg.vocab_size} (vocab-parallel embedding)")
        if cfg.tie_word_embeddings and mesh.pp > 1:
            raise MeshError("tie_word_embeddings with pp > 1 is not supported (embedding and lm_head "
                            "live on different stages)")
        self.cfg, self.mesh = cfg, mesh
        self.stage_ranges = stage_layers(cfg.num_hidden_layers, mesh.pp, offset)
        self.coll = SimCollectives(mesh.dp, mesh.tp, mesh.ep * mesh.expert_tp)
        self.cells, self.entries = [], []
        for s, layers in enumerate(self.stage_ranges):
            built = {n: build_stage(cfg, mesh, s, n, layers, get) for n in range(mesh.dp * mesh.tp)}
            self.cells.append({n: c for n, (c, _) in built.items()})
            self.entries.append({n: e for n, (_, e) in built.items()})
        if cfg.tie_word_embeddings:  # pp == 1: one Parameter serves both, as in the model
            for n, c in self.cells[0].items():
                c.lm_head = c.embed
                self.entries[0][n] = [(p, i) for p, i in self.entries[0][n] if i.name != "lm_head.weight"]
        self.sparse_layers = sum(cfg.is_sparse_layer(i) for i in range(cfg.num_hidden_layers))
        self.events: list = []

    @classmethod
    def from_model(cls, model, mesh: Mesh, **kw) -> "ParallelLM":
        full = {p.name: p.asnumpy().astype(np.float32) for p in model.get_parameters()}
        return cls(model.config, mesh, full.__getitem__, **kw)

    @classmethod
    def from_pretrained(cls, path, mesh: Mesh, **kw) -> "ParallelLM":
        """Online sharding: each rank reads only its slices of the HF safetensors."""
        from qwen3moe.models.config import Qwen3MoeConfig
        from qwen3moe.parallel.checkpoint import ShardReader

        reader = ShardReader(path)
        pl = cls(Qwen3MoeConfig.from_pretrained(path), mesh, reader, **kw)
        pl.bytes_read = reader.bytes_read
        return pl

    # ---- inputs --------------------------------------------------------------------------
    def split_batch(self, ids: np.ndarray, labels: np.ndarray | None = None,
                    position_ids: np.ndarray | None = None):
        """Per micro-batch m: {n: inputs of stage-local rank n} (dp rank n // tp gets its rows).
        position_ids (e.g. reset after each EOD): the RoPE positions of each row, else 0..S-1."""
        m, B = self.mesh, ids.shape[0]
        M = m.micro_batch_num
        if B % (m.dp * M):
            raise MeshError(f"global batch {B} must be divisible by dp*micro_batch_num = {m.dp}*{M}")
        b = B // (m.dp * M)
        out = []
        for mb in range(M):
            per = {}
            for n in range(m.dp * m.tp):
                rows = slice((n // m.tp) * B // m.dp + mb * b, (n // m.tp) * B // m.dp + (mb + 1) * b)
                per[n] = prepare_inputs(self.cfg, ids[rows], labels=None if labels is None else labels[rows],
                                        position_ids=None if position_ids is None else position_ids[rows])
            out.append(per)
        return out

    # ---- forward ---------------------------------------------------------------------------
    def _run_stage(self, s: int, inp, xs):
        cells = self.cells[s]
        src = {n: inp[n].input_ids for n in cells} if s == 0 else xs
        masks = {n: inp[n].token_mask for n in cells}
        return engine.stage_forward(cells, self.coll, src, inp, masks, self.mesh, self.cfg)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Full-vocab logits [B, S, V] (gathered over tp, as generation needs)."""
        outs = []
        for inp in self.split_batch(ids):
            xs = None
            for s in range(self.mesh.pp):
                xs, _, _ = self._run_stage(s, inp, xs)
            local = engine.head_logits(self.cells[-1], self.coll, xs, self.mesh, inp)
            full = self.coll.gather("tp", local, 1)
            full = self.coll.gather("dp", {n: x.reshape(1, *x.shape) for n, x in full.items()}, 0)
            x = next(iter(full.values())).asnumpy()  # [dp, b*S, V]
            outs += [x[i].reshape(-1, ids.shape[1], self.cfg.vocab_size) for i in range(self.mesh.dp)]
        M = self.mesh.micro_batch_num
        return np.concatenate([outs[mb * self.mesh.dp + i] for i in range(self.mesh.dp) for mb in range(M)])

    # ---- training --------------------------------------------------------------------------
    def _params(self, s: int) -> list:
        return [p for n in sorted(self.entries[s]) for p, _ in self.entries[s][n]]

    def loss_and_grads(self, ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray | None = None,
                       groups: int = 1):
        """One global batch through the 1F1B pipeline. Returns (loss reported on every stage,
        {Parameter name: accumulated gradient (numpy)}), before the data-parallel all-reduce.
        `self.last_aux` is then the aux-loss part of that loss (coefficient applied).
        groups > 1: the batch's rows are that many gradient-accumulation micro-batches (equal,
        contiguous) and the LM term is the mean of their token means, as TrainStep's; else one
        token mean over the batch."""
        mbs = self.split_batch(ids, labels, position_ids)
        M, pp = len(mbs), self.mesh.pp
        n_valid = sum(float((t.labels.asnumpy() != -100).sum()) for per in mbs for n, t in per.items()
                      if n % self.mesh.tp == 0)
        st = _State(mbs, n_valid)
        if groups > 1:
            st.weights = self._group_weights(mbs, labels, groups)
        grads = {p.name: np.zeros(p.shape, np.float32) for s in range(pp) for p in self._params(s)}
        do = lambda s, op, m: (self._fwd if op == "F" else self._bwd)(st, s, m, grads)  # noqa: E731
        self.events = run_schedule(pp, M, do)
        loss, self.last_aux = sum(st.loss.values()), float(sum(st.aux.values()))
        return {s: loss for s in range(pp)}, grads  # last stage's loss, broadcast over the pp group

    def _fwd(self, st, s, m, grads) -> None:
        xs, stats, _ = self._run_stage(s, st.mbs[m], st.act.get((s - 1, m)))
        if stats is not None:
            c, ps = (next(iter(self.coll.sum_nograd("stage", {n: v[i] for n, v in stats.items()}).values())).asnumpy()
                     for i in (0, 1))
            st.counts[m] = st.counts.get(m, 0) + c
            st.probsum[m] = st.probsum.get(m, 0) + ps
        st.act[(s, m)] = {n: ops.stop_gradient(x) for n, x in xs.items()}
        if s < self.mesh.pp - 1:
            return
        local = engine.head_logits(self.cells[s], self.coll, xs, self.mesh, st.mbs[m])
        ce = engine.vocab_parallel_ce(self.coll, local, {n: t.labels for n, t in st.mbs[m].items()}, self.mesh.tp)
        total = self.coll.sum_nograd("dp", {n: _lm_sum(st, m, n, ce[n]) for n in ce})
        st.aux[m] = self._aux_value(st, m)
        st.loss[m] = float(next(iter(total.values())).asnumpy()) / (1.0 if st.weights else st.n_valid) + st.aux[m]

    def _group_weights(self, mbs, labels: np.ndarray, groups: int) -> dict:
        """{(micro-batch, rank): per-token LM weight [b*S]}: 1 / (groups * N_g), N_g the valid
        labels of the accumulation group g its row belongs to (the model shifts: labels[:, 1:])."""
        m, (B, S) = self.mesh, labels.shape
        if B % groups:
            raise MeshError(f"global batch {B} must be divisible by the {groups} accumulation micro-batches")
        n_g = (np.asarray(labels)[:, 1:] != -100).sum(1).reshape(groups, -1).sum(1)
        w_r = np.repeat(1.0 / (groups * np.maximum(n_g, 1)), B // groups)
        b = B // (m.dp * len(mbs))
        out = {}
        for mb, per in enumerate(mbs):
            for n in per:  # split_batch's rows of rank n
                lo = (n // m.tp) * B // m.dp + mb * b
                out[(mb, n)] = Tensor(np.repeat(w_r[lo:lo + b], S).astype(np.float32))
        return out

    def _aux_value(self, st, m) -> float:
        if not self.sparse_layers or st.probsum.get(m) is None:
            return 0.0
        w = switch_aux_weights(st.counts[m], self._ntok(st, m) * self.sparse_layers)
        return self.cfg.router_aux_loss_coef / len(st.mbs) * float(w @ np.asarray(st.probsum[m], np.float64))

    def _ntok(self, st, m) -> float:
        return sum(float(t.token_mask.asnumpy().sum()) for n, t in st.mbs[m].items() if n % self.mesh.tp == 0)

    def _bwd(self, st, s, m, grads) -> None:
        cells, inp, last = self.cells[s], st.mbs[m], s == self.mesh.pp - 1
        order = sorted(cells)
        params = ParameterTuple(self._params(s))
        dout = st.dout.pop((s, m), None)
        # the aux loss's gradient weights on this stage's router probability mass (router/losses.py)
        W = Tensor((self.cfg.router_aux_loss_coef / len(st.mbs) * switch_aux_weights(
            st.counts[m], self._ntok(st, m) * self.sparse_layers)).astype(np.float32)) if self.sparse_layers else None

        def objective(*x_in):
            xs, stats, _ = self._run_stage(s, inp, dict(zip(order, x_in)) if s else None)
            J = 0.0
            if stats is not None:
                J = J + sum((W * stats[n][1]).sum() for n in order)
            if last:
                local = engine.head_logits(cells, self.coll, xs, self.mesh, inp)
                ce = engine.vocab_parallel_ce(self.coll, local, {n: t.labels for n, t in inp.items()}, self.mesh.tp)
                return J + (sum(_lm_sum(st, m, n, ce[n]) for n in order) / (1.0 if st.weights else st.n_valid))
            return J + sum((xs[n] * dout[n]).sum() for n in order)

        x_in = [st.act[(s - 1, m)][n] for n in order] if s else []
        if s:
            gx, gw = ms.grad(objective, grad_position=tuple(range(len(order))), weights=params)(*x_in)
            st.dout[(s - 1, m)] = dict(zip(order, gx if isinstance(gx, tuple) else (gx,)))
        else:
            gw = ms.grad(objective, grad_position=None, weights=params)()
        for p, g in zip(params, gw):
            grads[p.name] += g.asnumpy()
        st.act.pop((s - 1, m), None)
        if last:
            st.act.pop((s, m), None)

    # ---- full views -------------------------------------------------------------------------
    def full_params(self) -> dict[str, np.ndarray]:
        return self._assemble({p.name: p.asnumpy() for s in range(self.mesh.pp) for p in self._params(s)})

    def full_grads(self, grads: dict) -> dict[str, np.ndarray]:
        return self._assemble(grads)

    def _assemble(self, values: dict) -> dict[str, np.ndarray]:
        """HF tensors from dp replica 0 (router / replicated weights from tp rank 0)."""
        items = [(info, values[p.name]) for s in range(self.mesh.pp)
                 for n in range(self.mesh.tp * self.mesh.dp) for p, info in self.entries[s][n]]
        out = assemble(items)
        if self.cfg.tie_word_embeddings:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out


def _lm_sum(st, m: int, n: int, ce):
    """Rank n's summed CE of micro-batch m, times its tokens' weights when set (else divided by
    N afterwards)."""
    return (ce * st.weights[(m, n)]).sum() if st.weights else ce.sum()


class _State:
    def __init__(self, mbs, n_valid: float) -> None:
        self.mbs, self.n_valid = mbs, n_valid
        self.weights: dict = {}
        self.act: dict = {}
        self.dout: dict = {}
        self.counts: dict = {}
        self.probsum: dict = {}
        self.loss: dict = {}
        self.aux: dict = {}


__all__ = ["ParallelLM", "stage_groups"]
