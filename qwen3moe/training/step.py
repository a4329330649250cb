"""One compiled training step: forward + backward + (accumulate) + clip + AdamW.

Loss per micro-batch i of M (M = len(micro_batches)):
    loss_i = lm_i / M + aux_coef * aux_i + z_coef * z_i / M
with the load-balancing term chosen by `aux_mode` (statistics c, s, n: router/losses.py,
pooled over all sparse layers as HF does, i.e. summed over layers with n counted L times):
  "hf"        aux_i = switch(c_i, s_i, n_i) / M = E * sum_e (c_e/n)(s_e/n) / M.  The HF
              transformers value; the reference fixtures use it with coef 1e-3.
  "megatron"  aux_i = switch(...) / (K * M): f normalised to sum to 1 (Megatron / MindSpore
              Transformers). HF = K x Megatron, so coef_megatron = K * coef_hf is the same loss.
  "global"    aux over the global batch (Qwen3 recipe): c, n accumulated over all M
              micro-batches before the product. Because c is not differentiated (top-k counts),
              aux_global = E * sum_e (C_e/N)(S_e/N) = sum_i sum_e w_e s_ie with w_e = E C_e / N^2,
              so each micro-batch contributes the linear term sum_e w_e s_ie, exactly. C and N
              come from a forward-only pass over the micro-batches first (one extra forward).
              With M = 1 it equals "hf". Under data parallelism `stats_reducer` (parallel/aux.py
              dp_stats_reducer) sums C and N over the dp ranks too, and scales w by dp because
              rank gradients are averaged: the mean gradient is that of the dp-global aux.
  "seq"       aux_i = seq_aux(c_bi, s_bi, n_bi) / (K * M): Megatron `seq_aux_loss` (DeepSeek-V2
              sequence-level balance): the Megatron-normalised switch loss per sequence b, with
              statistics pooled over layers, averaged over the micro-batch's sequences
              (router/losses.py). One sequence per micro-batch: equals "megatron".
z-loss (ST-MoE): mean over sparse layers of mean_t logsumexp(router logits_t)^2.
The LM term's weight (1 / M here) is a graph input per micro-batch: data-parallel replicas
(parallel/step.py) weight rank r's micro-batch mean by n_r / (N M) instead (gradients summed over ranks).
Gradients are summed over micro-batches (= grad of the mean loss), then clipped by global norm
(torch clip_grad_norm_ semantics) and applied by the optimizer.
Host-side input prep (`prepare_inputs`) stays outside the graph; forward+backward is one
compiled Cell, the clip+update another (both compiled once per input shape).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from qwen3moe.models.inputs import prepare_inputs
from qwen3moe.kernels import gradnorm as gradnorm_kernel
from qwen3moe.router.losses import (router_seq_stats, seq_aux_loss, switch_aux_loss, switch_aux_weights,
                                    z_loss)
from qwen3moe.router.topk import route
from qwen3moe.training.optimizer import clip_by_global_norm, global_norm as composite_global_norm
from qwen3moe.training.precision import DynamicLossScale
from qwen3moe.training.sync import fetch

AUX_MODES = ("hf", "megatron", "global", "seq")
_TICK = Tensor(0.0, ms.float32)


def global_norm(grads):
    """C++ sum of squares for fp32 gradients (kernels/gradnorm.py), the composite norm otherwise."""
    return gradnorm_kernel.global_norm(grads, composite_global_norm)


class _LossCell(nn.Cell):
    """Scalar micro-batch loss (first output) plus metrics (not differentiated)."""

    def __init__(self, model: nn.Cell, aux_coef: float, z_coef: float, aux_mode: str,
                 reduce_counts: nn.Cell | None = None, cross_entropy: nn.Cell | None = None) -> None:
        super().__init__(auto_prefix=False)
        self.net, self.reduce_counts, self.cross_entropy = model, reduce_counts, cross_entropy
        self.aux_coef, self.z_coef, self.aux_mode = float(aux_coef), float(z_coef), aux_mode
        self.E, self.K = model.config.num_experts, model.config.num_experts_per_tok

    def construct(self, ids, cos, sin, bias, mask, labels, inv_m, aux_w, lm_w):
        if self.cross_entropy is None:
            _, _, lm, _, router_logits, _, stats = self.net.construct(ids, cos, sin, bias, mask, labels,
                                                                      0, True, False)
        else:  # the model's logits are a vocab block (tensor parallel): its own loss is not the loss
            logits, _, _, _, router_logits, _, stats = self.net.construct(ids, cos, sin, bias, mask, None,
                                                                          0, True, False)
            valid = (labels != -100).astype(ms.float32)
            ce = self.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels)
            lm = (ce * valid).sum() / ops.maximum(valid.sum(), Tensor(1.0, ms.float32))
        zero = Tensor(0.0, ms.float32)
        if len(stats) == 3:  # at least one sparse layer
            counts_LE, probsum_LE, n = stats
            L = counts_LE.shape[0]
            c_E, s_E = counts_LE.sum(0), probsum_LE.sum(0)
            aux_hf = switch_aux_loss(c_E, s_E, n * L)
        else:
            counts_LE, s_E, aux_hf = ops.zeros((1, self.E), ms.float32), ops.zeros(self.E, ms.float32), zero
        if self.aux_mode == "global" and self.reduce_counts is not None:  # w_e = aux_w_e * C_e (summed)
            aux_term = (aux_w * self.reduce_counts(counts_LE.sum(0)) * s_E).sum()
        elif self.aux_mode == "global":
            aux_term = (aux_w * s_E).sum()
        elif self.aux_mode == "seq":
            aux_term = self.seq_aux(router_logits, mask, ids.shape[0]) / self.K * inv_m
        elif self.aux_mode == "megatron":
            aux_term = aux_hf / self.K * inv_m
        else:
            aux_term = aux_hf * inv_m
        z = zero
        for lg in router_logits:
            z = z + z_loss(lg, mask)
        z = z / max(len(router_logits), 1)
        loss = lm * lm_w + self.aux_coef * aux_term + self.z_coef * z * inv_m
        return loss, lm, aux_hf, z, counts_LE, aux_term


    def seq_aux(self, router_logits, mask, batch: int) -> Tensor:
        """HF-scale sequence-level aux pooled over sparse layers; the router's own softmax/top-k
        (`route`) on its logits reproduces its probabilities and choices exactly."""
        c_BE, s_BE, n_B = None, None, None
        for lg in router_logits:
            probs_TE, _, idx_TK = route(lg, self.K, False)
            c, p, n = router_seq_stats(probs_TE, idx_TK, mask, batch)
            c_BE, s_BE, n_B = (c, p, n) if c_BE is None else (c_BE + c, s_BE + p, n_B + n)
        if c_BE is None:
            return Tensor(0.0, ms.float32)
        return seq_aux_loss(c_BE, s_BE, n_B)


class _TrainGraph(nn.Cell):
    """Compiled forward+backward, gradient accumulation in fp32 buffers, clip and update.

    `first` / `last` are compile-time flags (at most four graphs): not first -> add the
    buffered sum; not last -> store the sum and stop; last -> clip, update, clear the buffers.
    Gradients never leave the graph: a graph output fed back as another graph's input made
    MindSpore 2.10 recompile the consumer on every call.
    """

    def __init__(self, loss_cell: _LossCell, optimizer: nn.Cell, clip: float | None) -> None:
        super().__init__(auto_prefix=False)
        self.loss_cell, self.optimizer, self.clip = loss_cell, optimizer, clip
        weights = optimizer.parameters
        self.acc = ParameterTuple([Parameter(ops.zeros(p.shape, ms.float32), name=f"grad_acc.{p.name}",
                                             requires_grad=False) for p in weights])
        self.grad_fn = ms.value_and_grad(loss_cell, None, weights, has_aux=True)

    @ms.jit
    def construct(self, ids, cos, sin, bias, mask, labels, inv_m, aux_w, lm_w, first: bool, last: bool):
        (loss, lm, aux, z, counts, aux_term), grads = self.grad_fn(ids, cos, sin, bias, mask, labels, inv_m,
                                                                   aux_w, lm_w)
        if not first:
            grads = tuple(g.astype(ms.float32) + a for g, a in zip(grads, self.acc))
        norm = Tensor(0.0, ms.float32)
        if last:
            norm = self.clip_and_update(grads)
            if not first:
                self.clear(after=norm)
        else:
            for i in range(len(self.acc)):
                ops.assign(self.acc[i], grads[i].astype(ms.float32))
        return loss, lm, aux, z, counts, norm, aux_term

    def clip_and_update(self, grads) -> Tensor:
        norm = global_norm(grads)
        if self.clip is not None:
            grads = clip_by_global_norm(grads, self.clip, norm)
        self.optimizer.update(grads)
        return norm

    def clear(self, after: Tensor | None = None) -> None:
        """Zero the buffers; `after` (a value computed from them) orders the zeroing after every
        read: without it the graph may zero a buffer before an op that reads it runs (seen as
        a drift of the guarded step once the apply graph scaled the buffers)."""
        for a in self.acc:
            zeros = ops.zeros_like(a) if after is None else ops.depend(ops.zeros_like(a), after)
            ops.assign(a, zeros)


# The buffer graphs take a tensor input (`tick`, or the inverse loss scale for the update).
# The lr reaches them through AdamW.set_lr's compiled assign: a host-side Parameter.set_data
# was not seen by the guarded update graph (it kept step 1's lr; tests/test_train_step.py).
class _AccumulatedNorm(nn.Cell):
    """Compiled: global norm of the accumulation buffers (checked before an update is applied)."""

    def __init__(self, graph: _TrainGraph) -> None:
        super().__init__(auto_prefix=False)
        self.graph = graph

    @ms.jit
    def construct(self, tick):
        return global_norm(tuple(self.graph.acc))


class _ClearAccumulated(nn.Cell):
    """Compiled: zero the accumulation buffers (a skipped step drops its gradients)."""

    def __init__(self, graph: _TrainGraph) -> None:
        super().__init__(auto_prefix=False)
        self.graph = graph

    @ms.jit
    def construct(self, tick):
        self.graph.clear()
        return tick


class _ApplyAccumulated(nn.Cell):
    """Compiled: clip + update from the accumulation buffers times `inv_scale` (1 / loss scale),
    then clear them."""

    def __init__(self, graph: _TrainGraph) -> None:
        super().__init__(auto_prefix=False)
        self.graph = graph

    @ms.jit
    def construct(self, inv_scale):
        norm = self.graph.clip_and_update(tuple(a * inv_scale for a in self.graph.acc))
        self.graph.clear(after=norm)
        return norm


def as_batch(batch) -> dict:
    """A batch is token ids [B,S] (labels = ids) or a dict with input_ids and optional
    labels / attention_mask / position_ids (numpy arrays or lists)."""
    if isinstance(batch, dict):
        b = dict(batch)
        b.setdefault("labels", b["input_ids"])
        return b
    return {"input_ids": batch, "labels": batch}


class TrainStep:
    """`TrainStep(model, optimizer, aux_coef=1e-3, z_coef=0.0, clip=1.0, aux_mode="hf",
    schedule=None)`; `metrics = step(batch)` or `step([micro_batch, ...])` (accumulation).

    `schedule(step) -> lr` (0-based, see schedules.py) sets the optimizer's lr before each
    update. Metrics (python floats / numpy): loss, lm_loss, aux (HF value, mean over
    micro-batches), aux_megatron (= aux / K), z, grad_norm (before clipping), lr,
    expert_load_max (per layer: max_e share_e / mean_e share_e, 1 = perfect balance),
    tokens, step_time_s, expert_share ([L, E] token shares).

    `stats_reducer` (aux_mode "global" under data parallelism): (C_E, N) -> summed over dp ranks
    and dp; see parallel/aux.py.

    `reduce_counts` (a Cell: this rank's router counts -> summed over the ranks, in the graph)
    makes "global" aux weights `aux_w * C` (parallel/step.py); `cross_entropy(logits_Tv,
    labels_T) -> [T]` replaces the model's own loss when its logits are a vocab block.

    `loss_scale` (training/precision.py, for fp16 compute): the loss is scaled by S, gradients
    unscaled before clip + update, overflowing steps skipped (implies skip_nonfinite) and S
    adjusted; metrics gain `loss_scale` (the S used by the step).

    `skip_nonfinite=True` checks the loss and the gradient norm before applying the update:
    a non-finite step changes no parameter or moment and reports `skipped: True` (the data
    position and schedule still advance). It costs one extra compiled norm pass per step.
    """

    def __init__(self, model: nn.Cell, optimizer: nn.Cell, aux_coef: float = 1e-3, z_coef: float = 0.0,
                 clip: float | None = 1.0, aux_mode: str = "hf",
                 schedule: Callable[[int], float] | None = None, skip_nonfinite: bool = False,
                 stats_reducer: Callable[[np.ndarray, float], tuple[np.ndarray, float, int]] | None = None,
                 loss_scale: DynamicLossScale | None = None, reduce_counts: nn.Cell | None = None,
                 cross_entropy: nn.Cell | None = None) -> None:
        if aux_mode not in AUX_MODES:
            raise ValueError(f"aux_mode must be one of {AUX_MODES}, got {aux_mode!r}")
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.aux_mode, self.aux_coef = aux_mode, float(aux_coef)
        self.graph = _TrainGraph(_LossCell(model, aux_coef, z_coef, aux_mode, reduce_counts,
                                           cross_entropy), optimizer, clip)
        self.apply_graph = _ApplyAccumulated(self.graph)
        self.skip_nonfinite, self.stats_reducer = skip_nonfinite or loss_scale is not None, stats_reducer
        self.loss_scale = loss_scale
        self._norm_graph: _AccumulatedNorm | None = None
        self._clear_graph: _ClearAccumulated | None = None
        self.E, self.K = model.config.num_experts, model.config.num_experts_per_tok
        self.steps_done = 0

    def _prep(self, batch) -> tuple:
        b = as_batch(batch)
        t = prepare_inputs(self.model.config, b["input_ids"], b.get("attention_mask"),
                           b.get("position_ids"), b["labels"])
        return t.input_ids, t.cos, t.sin, t.bias, t.token_mask, t.labels

    def _global_weights(self, prepped: list[tuple], scale: float = 1.0) -> Tensor:
        """scale * w_e, w_e = E * C_e / N^2 from a forward-only pass (C, N pooled over layers and micro-batches)."""
        if self.aux_mode != "global":
            return Tensor(np.zeros(self.E, np.float32))
        C, N = np.zeros(self.E, np.float64), 0.0
        for args in prepped:
            c, n = self._forward_counts(args)
            C, N = C + c, N + n
        dp = 1
        if self.stats_reducer is not None:
            C, N, dp = self.stats_reducer(C, N)
        return Tensor((scale * dp * switch_aux_weights(C, N)).astype(np.float32))

    def _forward_counts(self, args: tuple) -> tuple[np.ndarray, float]:
        """(C_E, N) of one micro-batch from a forward-only pass: top-k counts pooled over the
        sparse layers, and the token count counted once per layer (HF's pooling)."""
        stats = self.model.graph_runner()(*args, 0, True, False)[-1]
        counts_LE, n = fetch(stats[0], stats[2])
        return counts_LE.sum(0), float(n) * counts_LE.shape[0]

    def _micro_weights(self, prepped: list[tuple], S: float) -> tuple[list[float], list[Tensor]]:
        """Per micro-batch: the LM-loss weight (S / M: the mean over micro-batches) and the
        "global"-mode aux weights. The per-rank parallel step (parallel/step.py) overrides it."""
        aux_w = self._global_weights(prepped, S)
        return [S / len(prepped)] * len(prepped), [aux_w] * len(prepped)

    def _run(self, batch, update: bool) -> dict:
        micro = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        prepped = [self._prep(b) for b in micro]
        m = len(prepped)
        S = self._scale()  # the loss scale enters through the per-term weights (no recompile)
        inv_m = Tensor(S / m, ms.float32)
        lm_ws, aux_ws = self._micro_weights(prepped, S)
        sums, counts, tokens, norm, parts = np.zeros(4), 0.0, 0, 0.0, np.zeros(2)
        for i, args in enumerate(prepped):
            out = fetch(*self.graph(*args, inv_m, aux_ws[i], Tensor(lm_ws[i], ms.float32), i == 0,
                                    update and i == m - 1))
            sums += [float(v) for v in out[:4]]
            parts += [float(out[1]) * lm_ws[i] / S, float(out[6]) / S]
            counts, norm = counts + out[4], float(out[5])
            tokens += int(args[0].shape[0] * args[0].shape[1])
        # lm_part / aux_part: the LM and aux terms as they enter the loss (weights applied)
        return {"loss": sums[0] / S, "lm_loss": sums[1] / m, "aux": sums[2] / m,
                "aux_megatron": sums[2] / m / self.K, "z": sums[3] / m, "grad_norm": norm,
                "tokens": tokens, "lm_part": parts[0], "aux_part": parts[1], "counts": counts,
                **expert_load(counts)}

    def gradients(self, batch) -> tuple[dict, list[np.ndarray]]:
        """Forward+backward only: (metrics, summed grads as numpy, aligned with
        optimizer.parameters). The sum stays buffered: `apply()` then updates with it."""
        metrics = self._run(batch, update=False)
        # copy: asnumpy() can alias the buffer, which apply() clears
        return metrics, [a.asnumpy().copy() for a in self.graph.acc]

    def _scale(self) -> float:
        return 1.0 if self.loss_scale is None else float(self.loss_scale.scale)

    def apply(self) -> float:
        """Clip + update from the buffered gradients (after `gradients`); returns the grad norm."""
        return float(fetch(self.apply_graph(Tensor(1.0 / self._scale(), ms.float32)))[0])

    def _guarded(self, batch) -> dict:
        """Forward+backward into the buffers; update only when loss and grad norm are finite."""
        if self._norm_graph is None:
            self._norm_graph, self._clear_graph = _AccumulatedNorm(self.graph), _ClearAccumulated(self.graph)
        metrics = self._run(batch, update=False)
        scale = self._scale()
        norm = float(fetch(self._norm_graph(_TICK))[0]) / scale
        finite = bool(np.isfinite(metrics["loss"]) and np.isfinite(norm))
        if finite:
            self.apply()
        else:
            self._clear_graph(_TICK)
        metrics.update(grad_norm=norm, skipped=not finite)
        if self.loss_scale is not None:
            self.loss_scale.update(finite)
            metrics.update(loss_scale=scale)
        return metrics

    def __call__(self, batch) -> dict:
        """One optimizer step over a batch or a list of micro-batches; returns metrics."""
        t0 = time.perf_counter()
        if self.schedule is not None:
            self.optimizer.set_lr(self.schedule(self.steps_done))
        metrics = self._guarded(batch) if self.skip_nonfinite else self._run(batch, update=True)
        self.steps_done += 1
        metrics.update(step=self.steps_done, lr=self.optimizer.get_lr(),
                       step_time_s=time.perf_counter() - t0)
        return metrics


def expert_load(counts_LE: np.ndarray) -> dict:
    """Per-layer token share of the busiest expert relative to the mean share (1 = balanced)."""
    counts_LE = np.asarray(counts_LE, np.float64)
    share = counts_LE / np.maximum(counts_LE.sum(-1, keepdims=True), 1.0)
    mean = share.mean(-1)
    return {"expert_load_max": (share.max(-1) / np.maximum(mean, 1e-12)).tolist(),
            "expert_share_max": share.max(-1).tolist(), "expert_share": share}
