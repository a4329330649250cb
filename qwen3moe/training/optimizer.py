"""AdamW with torch.optim.AdamW semantics, compiled, plus weight-decay exclusion and clipping.

For each parameter p with gradient g at step t (t counts from 1), lr, betas (b1, b2), eps, wd:
    p <- p * (1 - lr * wd)                       (decoupled weight decay, before the moment update)
    m <- b1 * m + (1 - b1) * g
    v <- b2 * v + (1 - b2) * g^2
    p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
which is torch's order of operations (`denom = v.sqrt() / sqrt(bc2) + eps`), so the first
step moves every coordinate by ~lr * sign(g).

`nn.AdamWeightDecay` is not this (no bias correction), and in-place Tensor methods do nothing
on CPU, hence a Cell whose update runs under `ms.jit` and writes with `ops.assign`.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from qwen3moe.io.safetensors_io import CheckpointError
from qwen3moe.layers.dtypes import write_param

# name patterns usually excluded from weight decay: norm weights and biases
DEFAULT_NO_DECAY: tuple[str, ...] = ("*norm.weight", "*.bias")


def decay_mask(names: Sequence[str], no_decay: Sequence[str] = DEFAULT_NO_DECAY) -> list[bool]:
    """True where a parameter gets weight decay (its name matches none of the fnmatch patterns)."""
    return [not any(fnmatch.fnmatchcase(n, pat) for pat in no_decay) for n in names]


class AdamW(nn.Cell):
    """`AdamW(params, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, no_decay=())`; call `opt(grads)`.

    `weight_decay` applies to every given parameter except those whose name matches a pattern
    in `no_decay` (empty by default = torch semantics; pass DEFAULT_NO_DECAY to skip norms and
    biases). `lr` lives in a Parameter so a schedule can change it without recompiling
    (`set_lr`). State: `exp_avg.*`, `exp_avg_sq.*` (fp32) and `step` (fp32 scalar).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, no_decay: Sequence[str] = ()) -> None:
        super().__init__(auto_prefix=False)
        params = list(params)
        if not params:
            raise ValueError("AdamW got an empty parameter list")
        if len(betas) != 2 or not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not (lr >= 0 and eps > 0 and weight_decay >= 0):  # also refuses NaN
            raise ValueError(f"AdamW needs lr >= 0, eps > 0 and weight_decay >= 0, got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        self.parameters = ParameterTuple(params)
        self.param_names = [p.name for p in params]
        self.b1, self.b2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self.weight_decay = float(weight_decay)
        # per-parameter decay is a compile-time constant tuple
        self.wd = tuple(self.weight_decay if d else 0.0 for d in decay_mask(self.param_names, no_decay))
        self.exp_avg = self._zeros_like("exp_avg", params)
        self.exp_avg_sq = self._zeros_like("exp_avg_sq", params)
        self.step = Parameter(Tensor(0.0, ms.float32), name="adamw.step", requires_grad=False)
        self.learning_rate = Parameter(Tensor(float(lr), ms.float32), name="adamw.lr", requires_grad=False)
        self._lr = float(np.float32(lr))  # host copy: get_lr without waiting for a running graph
        from qwen3moe.kernels import adamw as adamw_kernel  # fused in-place C++ update when built

        self.fused = adamw_kernel.fused_update if adamw_kernel.usable_for(params) else None

    @staticmethod
    def _zeros_like(prefix: str, params) -> ParameterTuple:
        return ParameterTuple([Parameter(ops.zeros(p.shape, ms.float32), name=f"{prefix}.{p.name}",
                                         requires_grad=False) for p in params])

    def set_lr(self, lr: float, compiled: bool = True) -> None:
        """Written by a compiled assign: a host-side `set_data` after compilation was not seen by
        every compiled graph in MindSpore 2.10 (the guarded TrainStep's update kept the first lr).
        `compiled=False`: the host copy only, for a caller that passes every update its lr as a
        graph input (`update(grads, lr)`: parallel/step.py), which saves a graph call a step."""
        self._lr = float(np.float32(lr))
        if not compiled:
            return
        if "_lr_setter" not in self.__dict__:  # plain attribute: not a registered sub-cell
            self.__dict__["_lr_setter"] = _ScalarAssign(self.learning_rate)
        self.__dict__["_lr_setter"](Tensor(float(lr), ms.float32))

    def get_lr(self) -> float:
        """The lr the next update uses (float32). The host copy: reading the Parameter would wait
        for the step's update graph (asnumpy() busy-waits: training/sync.py), for a value that
        only set_lr writes."""
        return self._lr

    @ms.jit
    def construct(self, grads):
        return self.update(grads)

    def update(self, grads, lr=None):
        """The update itself (graph-traceable; `construct` compiles it, TrainStep inlines it).
        `lr`: a float32 scalar graph input, written to `learning_rate` and used (set_lr's
        compiled=False); None: `learning_rate` as set_lr wrote it."""
        if lr is None:
            lr = self.learning_rate
        else:
            ops.assign(self.learning_rate, lr)
        if self.fused is not None:  # same formula, one in-place pass (qwen3moe/kernels/adamw.py)
            t = self.step + 1.0
            bc1 = 1.0 - ops.pow(Tensor(self.b1, ms.float32), t)
            bc2_sqrt = ops.sqrt(1.0 - ops.pow(Tensor(self.b2, ms.float32), t))
            return self.fused(self, grads, lr, lr / bc1, bc2_sqrt, t)
        ops.assign_add(self.step, Tensor(1.0, ms.float32))
        t = self.step
        bc1 = 1.0 - ops.pow(Tensor(self.b1, ms.float32), t)
        bc2_sqrt = ops.sqrt(1.0 - ops.pow(Tensor(self.b2, ms.float32), t))
        step_size = lr / bc1
        for i in range(len(self.parameters)):
            p, m, v = self.parameters[i], self.exp_avg[i], self.exp_avg_sq[i]
            g = grads[i].astype(ms.float32)
            p32 = p.astype(ms.float32)
            if self.wd[i] != 0.0:
                p32 = p32 * (1.0 - lr * self.wd[i])
            m_new = self.b1 * m + (1.0 - self.b1) * g
            v_new = self.b2 * v + (1.0 - self.b2) * g * g
            p32 = p32 - step_size * m_new / (ops.sqrt(v_new) / bc2_sqrt + self.eps)
            ops.assign(m, m_new)
            ops.assign(v, v_new)
            ops.assign(p, p32.astype(p.dtype))
        return t

    def state_arrays(self) -> dict[str, "object"]:
        """Moments and step as numpy arrays, keyed by Parameter name (for checkpoints)."""
        out = {q.name: q.asnumpy() for q in list(self.exp_avg) + list(self.exp_avg_sq)}
        out[self.step.name] = self.step.asnumpy()
        return out

    def load_state_arrays(self, arrays: dict) -> None:
        for q in list(self.exp_avg) + list(self.exp_avg_sq) + [self.step]:
            if q.name not in arrays:
                raise CheckpointError(f"optimizer state {q.name!r} missing from the checkpoint")
            write_param(q, arrays[q.name])  # in place: the compiled update keeps its buffers


class _ScalarAssign(nn.Cell):
    """Compiled `ops.assign(param, value)`."""

    def __init__(self, param: Parameter) -> None:
        super().__init__(auto_prefix=False)
        self.param = param

    @ms.jit
    def construct(self, value):
        ops.assign(self.param, value)
        return value


def global_norm(grads) -> Tensor:
    """sqrt(sum_i ||g_i||^2) in fp32 (graph-traceable)."""
    total = Tensor(0.0, ms.float32)
    for g in grads:
        g32 = g.astype(ms.float32)
        total = total + (g32 * g32).sum()
    return ops.sqrt(total)


def clip_coefficient(max_norm: float, norm: Tensor) -> Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6))."""
    return ops.minimum(max_norm / (norm + 1e-6), Tensor(1.0, ms.float32))


def clip_by_global_norm(grads, max_norm: float, norm: Tensor):
    """torch.nn.utils.clip_grad_norm_: scale by `clip_coefficient`."""
    coef = clip_coefficient(max_norm, norm)
    return tuple(g * coef.astype(g.dtype) for g in grads)
