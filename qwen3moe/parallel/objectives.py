"""What a rank model differentiates (parallelize.py builds the model): the model's own loss with
respect to every parameter (`LossGrad`), and one pipeline stage's backward (`StageGrad`, the 1F1B
building block; also a whole-model step when pp = 1). Gradients come in `model.get_parameters()`
order, that of RankModel.entries, before any gradient sync. Shapes: B batch, S sequence, H hidden,
T = B * S tokens, E experts.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops


class _ModelLoss(nn.Cell):
    def __init__(self, model: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.net = model

    def construct(self, ids_BS, cos_BSD, sin_BSD, bias_B1SS, mask_T, labels_T):
        return self.net.construct(ids_BS, cos_BSD, sin_BSD, bias_B1SS, mask_T, labels_T, 0, True, False)[1]


class LossGrad(nn.Cell):
    """Compiled (loss, gradients) of the model's own loss (lm_loss + coef * aux of this rank's
    tokens) with respect to every parameter, in `model.get_parameters()`
    order (that of RankModel.entries), before any gradient sync. Inputs: models/inputs.prepare_inputs."""

    def __init__(self, model: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.grad_fn = ms.value_and_grad(_ModelLoss(model), None, ParameterTuple(list(model.get_parameters())))

    @ms.jit
    def construct(self, ids_BS, cos_BSD, sin_BSD, bias_B1SS, mask_T, labels_T):
        return self.grad_fn(ids_BS, cos_BSD, sin_BSD, bias_B1SS, mask_T, labels_T)


class _StageObjective(nn.Cell):
    """What one pipeline stage back-propagates (summed over stages: the global objective):
    last stage  lm_w * sum of its tokens' CE  + sum_e aux_w_e * s_e
    other       <its output hidden, dout>     + sum_e aux_w_e * s_e
    s_e: the router probability mass of the stage's own sparse layers (router/losses.py); the
    caller pools the counts over stages and passes aux_w_e = coef * E * C_e / (n L)^2 (HF's
    pooled aux: its gradient is exactly that weighting of s)."""

    def __init__(self, model: nn.Cell, last: bool) -> None:
        super().__init__(auto_prefix=False)
        self.net, self.last = model, last

    def construct(self, x, cos_BSD, sin_BSD, bias_B1SS, mask_T, labels_T, dout_BSH, lm_w, aux_w_E):
        if self.last:
            out = self.net.construct(x, cos_BSD, sin_BSD, bias_B1SS, mask_T, labels_T, 0, False, False)
            valid = (labels_T != -100).astype(ms.float32).sum()
            value, stats = out[2] * ops.maximum(valid, Tensor(1.0, ms.float32)) * lm_w, out[6]
        else:
            h, _, stats, _ = self.net.model(x, cos_BSD, sin_BSD, bias_B1SS, mask_T, False)
            value = (h * dout_BSH).sum()
        if len(stats) == 3:
            value = value + (stats[1].sum(0) * aux_w_E).sum()
        return value


class StageGrad(nn.Cell):
    """Compiled backward of one pipeline stage (a 1F1B building block; also a whole-model step
    when pp = 1): `(dx, grads, counts_E)` for inputs (x, cos, sin, bias, mask, labels,
    dout [B, S, H], lm_w, aux_w_E) as `_StageObjective`; dx = gradient w.r.t. the received
    hidden states (zeros on the first stage, whose input is token ids), grads in
    `model.get_parameters()` order. The stage's router counts come from its forward
    (`RankModel.forward(...).router_stats`)."""

    def __init__(self, model: nn.Cell, first: bool, last: bool) -> None:
        super().__init__(auto_prefix=False)
        self.objective, self.first = _StageObjective(model, last), first
        self.params = ParameterTuple(list(model.get_parameters()))
        self.grad_w = ops.GradOperation(get_by_list=True)
        self.grad_xw = ops.GradOperation(get_all=True, get_by_list=True)

    @ms.jit
    def construct(self, x, cos_BSD, sin_BSD, bias_B1SS, mask_T, labels_T, dout_BSH, lm_w, aux_w_E):
        args = (x, cos_BSD, sin_BSD, bias_B1SS, mask_T, labels_T, dout_BSH, lm_w, aux_w_E)
        if self.first:
            return ops.zeros_like(dout_BSH), self.grad_w(self.objective, self.params)(*args)
        dargs, grads = self.grad_xw(self.objective, self.params)(*args)
        return dargs[0], grads
