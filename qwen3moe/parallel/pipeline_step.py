"""Compiled pipeline-parallel training and pipeline micro-batches (micro_batch_num > 1):
`PipelineTrainStep`, ParallelTrainStep (step.py) over K micro-batches per step.

Micro-batches: the step gets G accumulation micro-batches (runner_config
gradient_accumulation_steps; one batch: G = 1) and the mesh's M = micro_batch_num; it runs
K = lcm(G, M) micro-batches, each accumulation micro-batch cut into K / G equal row blocks
(G = 1: Megatron's split of the batch into M; G = M: the accumulation micro-batches
themselves), each block split over the dp ranks (`step.rank_rows`).

Loss per micro-batch k of accumulation group g (what rank r back-propagates; summed over ranks it
is TrainStep's loss over the same G micro-batches when K = G):
    lm_k,r * n_k,r / (N_g G)   +   coef * E * sum_e C_k,e s_k,r,e / (T_k L)^2 / K
lm_k,r the mean CE of the rank's n_k,r valid labels, N_g the valid labels of group g (the mean of
per-group token means, TrainStep's LM loss), s the rank's own router probability mass, C_k and
T_k the top-k counts and tokens of the global micro-batch k pooled over all L sparse layers of
all stages (HF pooling; aux per micro-batch, Megatron's accumulation: equal to TrainStep's only
when the micro-batches are the accumulation micro-batches, K = G).

pp = 1: the inherited compiled step (value_and_grad, accumulation buffers) over the K
micro-batches with these weights. pp > 1, per micro-batch on stage s (`_Pipeline`):
  F  `mindspore.vjp` of the stage's compiled forward (`StageForward`, ms.jit): MindSpore keeps
     the forward's intermediates for the backward (no recompute, unless recompute_config marks
     layers); the output hidden states [b, S, H] are sent to stage s+1 with the router counts and
     probability mass so far [2E] (the last stage: its mean CE), over p2p.py's stage link (named
     pipes when every stage runs on this host, else MindSpore isend / recv);
  B  the vjp with cotangents (the gradient received from stage s+1 or the LM weight on the last
     stage, the aux weights of the micro-batch's global counts sent back with it); the input
     gradient goes to stage s-1, the parameter gradients are added to the step's fp32 buffers
     (`_Accumulate`, compiled);
in `lifo` order: every forward, then the backwards newest first (GPipe with the
backwards reversed; the same bubble as 1F1B, K micro-batches in flight instead of pp - s).
MindSpore 2.10's PyNative autograd keeps pending vjp forwards on a stack: a backward of any but
the newest fails with "Can not find top cell for backward, please check your network whether set
grad or inputs of your network whether be inplace modified" (1F1B runs the oldest first). Then
the gradient sync / norm / clip / RankAdamW (ZeRO-1) of ParallelTrainStep. Every stage reports
its share of the metrics (the LM terms and tokens on the last stage, the aux on every stage),
summed over the world there.
Shapes: b rows of a rank's micro-batch, S seq, H hidden, E experts, L sparse layers.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops

from qwen3moe.models.inputs import prepare_inputs
from qwen3moe.parallel.p2p import stage_link
from qwen3moe.parallel.parallelize import stage_input_shape
from qwen3moe.parallel.step import ParallelTrainStep, SumNoGrad, valid_labels
from qwen3moe.training.step import as_batch, expert_load
from qwen3moe.training.sync import fetch


def lifo(pp: int, micro_batches: int, stage: int) -> list[tuple[str, int]]:
    """GPipe's order with the backwards reversed: every forward, then B(M-1) .. B(0) (the same
    bubble as 1F1B, M micro-batches in flight; each backward is that of the newest pending
    forward, what MindSpore's PyNative autograd allows: module docstring)."""
    return [("F", m) for m in range(micro_batches)] + [("B", m) for m in reversed(range(micro_batches))]


def micro_batches(batch, M: int, dp: int) -> tuple[list[dict], list[int], int]:
    """(K micro-batches, accumulation group of each, G) for a batch or a list of G accumulation
    micro-batches (module docstring)."""
    groups = [as_batch(b) for b in (batch if isinstance(batch, (list, tuple)) else [batch])]
    G = len(groups)
    K = G * M // math.gcd(G, M)
    r = K // G
    out, group = [], []
    for g, b in enumerate(groups):
        B = np.asarray(b["input_ids"]).shape[0]
        if B % (r * dp):
            raise ValueError(f"runner_config.batch_size {B} is not divisible by {r} pipeline micro-batches "
                             f"x data_parallel {dp} (micro_batch_num {M}, gradient_accumulation_steps {G})")
        for i in range(r):
            out.append({k: np.asarray(v)[i * B // r:(i + 1) * B // r] for k, v in b.items()})
            group.append(g)
    return out, group, G


def check_pipeline_losses(mesh, aux_kind: str, z_coef: float) -> None:
    """Router losses the pipeline (pp > 1) computes: the switch aux per micro-batch (hf, aux_loss,
    none). "global" pools counts over all micro-batches before the backwards (a forward-only
    pre-pass through the pipeline: not implemented), "seq" needs per-sequence counts
    of every stage's layers, the z-loss a mean over them: refused in one line."""
    from qwen3moe.training.task_config import TaskConfigError

    if mesh.pp == 1:
        return
    key = "model.model_config"
    if aux_kind in ("global", "seq"):
        raise TaskConfigError(f"{key}.moe_router_load_balancing_type: {aux_kind!r} aux loss is not implemented with "
                              "pipeline_stage > 1; use aux_loss, hf or none")
    if z_coef:
        raise TaskConfigError(f"{key}.moe_z_loss_coeff: the router z-loss is not implemented with pipeline_stage > 1 "
                              f"(got {z_coef}); set it to 0")


class PipelineTrainStep(ParallelTrainStep):
    """ParallelTrainStep over K = lcm(G, micro_batch_num) micro-batches (module docstring);
    pp > 1 runs the pipeline of compiled stage graphs. Extra arguments: `mesh`, `coll`
    (process.ProcessCollectives), `stage_layers` (this stage's global layer ids)."""

    def __init__(self, model, optimizer, *, mesh, coll, stage_layers, **kwargs) -> None:
        super().__init__(model, optimizer, **kwargs)
        self.mesh, self._group_labels = mesh, []
        self.pipe = _Pipeline(self, coll, stage_layers) if mesh.pp > 1 else None

    def __call__(self, batch) -> dict:
        micro, group, G = micro_batches(batch, self.mesh.micro_batch_num, self.dp)
        N = [0.0] * G
        for b, g in zip(micro, group):
            N[g] += valid_labels(b["labels"])
        self._group_labels = [(N[g], G) for g in group]
        return super().__call__(micro)

    def _micro_weights(self, prepped, S):
        lm_ws, aux_ws = super()._micro_weights(prepped, S)
        return self._lm_weights(S), aux_ws

    def _lm_weights(self, S: float) -> list[float]:
        """S * n_k,r / (N_g G) per micro-batch: the weight of the rank's mean CE."""
        return [S * n / max(N, 1.0) / G for (n, _, _), (N, G) in zip(self._counts, self._group_labels)]

    def _run(self, batch, update: bool) -> dict:
        if self.pipe is None:
            return super()._run(batch, update)
        return self.pipe.run(batch, self._scale())


class StageForward(nn.Cell):
    """Compiled forward of this rank's pipeline stage: (out, s_E, stats_2E, counts_LE) with
    out = the stage's output hidden states [b, S, H] (the mean CE of the rank's valid labels on
    the last stage), s_E its router probability mass summed over its sparse layers
    (differentiated: the aux gradient enters as its cotangent), stats_2E = [counts_E, s_E]
    summed over the ranks routing distinct tokens (`counts_group`, not differentiated) and
    counts_LE the rank's per-layer counts (metrics)."""

    def __init__(self, model: nn.Cell, last: bool, counts_group: str | None, sparse: bool) -> None:
        super().__init__(auto_prefix=False)
        self.net, self.last, self.sparse = model, last, sparse
        self.E = model.config.num_experts or 1
        self.sum_stats = SumNoGrad(counts_group)

    @ms.jit
    def construct(self, x, cos_BSD, sin_BSD, bias_B1SS, mask_T, labels_T):
        logits, _, lm, _, _, _, stats = self.net.construct(x, cos_BSD, sin_BSD, bias_B1SS, mask_T,
                                                           labels_T if self.last else None, 0, True, False)
        out = lm if self.last else logits
        if self.sparse:
            s_E = stats[1].sum(0)
            both = self.sum_stats(ops.concat([stats[0].sum(0), s_E]))
            return out, s_E, both, ops.stop_gradient(stats[0])
        zeros = ops.zeros(self.E, ms.float32)
        return out, zeros, ops.zeros(2 * self.E, ms.float32), ops.zeros((1, self.E), ms.float32)


class _Accumulate(nn.Cell):
    """Compiled: acc[i] += grads[i] (the step's fp32 buffers; cleared by its update)."""

    def __init__(self, acc) -> None:
        super().__init__(auto_prefix=False)
        self.acc = acc

    @ms.jit
    def construct(self, grads):
        for i in range(len(self.acc)):
            ops.assign(self.acc[i], self.acc[i] + grads[i].astype(ms.float32))
        return grads[0].sum()


class _Pipeline:
    """One step's pipeline schedule on this rank's stage (module docstring)."""

    def __init__(self, step: PipelineTrainStep, coll, stage_layers) -> None:
        mesh, cfg = step.mesh, step.model.config
        self.step, self.cfg = step, cfg
        self.pp, self.s = mesh.pp, coll.stage
        self.last = self.s == mesh.pp - 1
        self.E = cfg.num_experts or 1
        sparse_ids = [i for i in range(cfg.num_hidden_layers) if cfg.is_sparse_layer(i)]
        self.L = len(sparse_ids)
        mine = [i for i in stage_layers if cfg.is_sparse_layer(i)]
        self.rows = [sparse_ids.index(i) for i in mine]  # this stage's rows of the [L, E] counts
        self.fwd = StageForward(step.model, self.last, step.groups["dp"].name, bool(mine))
        self.params = ParameterTuple(list(step.optimizer.parameters))
        self.acc = _Accumulate(step.graph.acc)
        self.link = stage_link(coll, coll.rank, both_ways=True)

    def run(self, micro: list[dict], S: float) -> dict:
        st = self.step
        K = len(micro)
        lm_w = st._lm_weights(S)
        inputs = [prepare_inputs(self.cfg, b["input_ids"], b.get("attention_mask"), b.get("position_ids"),
                                 b["labels"]) for b in micro]
        self.pending, self.cum, self.lm, self.s_loc = {}, {}, {}, {}
        self.counts = np.zeros((max(self.L, 1), self.E))
        aux = [None] * K
        for op, k in lifo(self.pp, K, self.s):
            if op == "F":
                self._forward(k, inputs[k])
            else:
                aux[k] = self._backward(k, inputs[k], lm_w[k], S / K)
        self.link.settle()
        return self._metrics(micro, inputs, lm_w, aux, S)

    def _forward(self, k: int, t) -> None:
        x = t.input_ids
        cum = np.zeros(2 * self.E, np.float32)
        if self.s > 0:
            x = Tensor(self.link.recv(self._hidden_shape(t), self.s - 1))
            cum = self.link.recv((2 * self.E,), self.s - 1)
        (out, s_E, both, counts), fn = ms.vjp(lambda *a: self.fwd(*a), x, t.cos, t.sin, t.bias, t.token_mask,
                                              t.labels, weights=self.params)
        both, counts = fetch(both, counts)
        self.cum[k] = cum + both
        if self.rows:
            self.counts[self.rows] += counts
        self.pending[k] = fn
        self.s_loc[k] = s_E
        if self.last:
            self.lm[k] = out
        else:
            self.link.send(fetch(out)[0], self.s + 1)
            self.link.send(self.cum[k], self.s + 1)

    def _backward(self, k: int, t, lm_w: float, aux_scale: float):
        """Returns the micro-batch's aux weights w_E (E * C_e / (T L)^2 * aux_scale)."""
        st = self.step
        if self.last:
            dout, C = Tensor(lm_w, ms.float32), self.cum[k][:self.E]
        else:
            dout = Tensor(self.link.recv(self._hidden_shape(t), self.s + 1))
            C = self.link.recv((self.E,), self.s + 1)
        T = st._counts[k][2]
        w = aux_scale * self.E * C / max(T * self.L, 1.0) ** 2
        sens_aux = Tensor((st.aux_coef * w).astype(np.float32))
        fn = self.pending.pop(k)
        gx, gw = fn(dout, sens_aux, ops.zeros(2 * self.E, ms.float32), ops.zeros(self.counts_shape, ms.float32))
        # every wait for a graph through fetch (training/sync.py): the link's asnumpy(), or the
        # next graph call waiting for the accumulation inside MindSpore, spin on this thread
        if self.s > 0:
            self.link.send(fetch(gx[0])[0], self.s - 1)
            self.link.send(C, self.s - 1)
        fetch(self.acc(ms.mutable(tuple(gw))))
        return w

    def _hidden_shape(self, t) -> tuple:
        B, S = t.input_ids.shape[:2]
        return stage_input_shape(self.step.mesh, self.cfg, B, S)

    @property
    def counts_shape(self) -> tuple:
        return (len(self.rows), self.E) if self.rows else (1, self.E)

    def _metrics(self, micro, inputs, lm_w, aux, S: float) -> dict:
        """This rank's share of the step's metrics (ParallelTrainStep._reduce sums them)."""
        st = self.step
        s_loc = fetch(*[self.s_loc[k] for k in range(len(micro))])
        aux_part = sum(float(np.dot(w, s)) for w, s in zip(aux, s_loc)) / S
        lm_part, tokens = 0.0, 0
        if self.last:
            lms = fetch(*[self.lm[k] for k in range(len(micro))])
            lm_part = sum(float(v) * w for v, w in zip(lms, lm_w)) / S
            tokens = sum(int(np.prod(t.input_ids.shape[:2])) for t in inputs)
        self.lm, self.s_loc = {}, {}
        return {"loss": lm_part + st.aux_coef * aux_part, "lm_loss": lm_part, "aux": aux_part, "z": 0.0,
                "tokens": tokens, "lm_part": lm_part, "aux_part": aux_part, "counts": self.counts,
                "grad_norm": 0.0, **expert_load(self.counts)}
