"""Fused in-place AdamW update (one C++ pass per parameter) for fp32 parameters.

Shapes: any parameter shape; s_6 / c_2 are the per-step scalars described in csrc/adamw.cc.
The kernel writes p, m, v in place (ops.Custom aot on Parameters, tested in
tests/test_adamw_kernel.py over consecutive steps). Callers must order every update after all
gradients are computed (optimizer.py passes scalars that depend on the whole gradient tuple), so
no backward op can read a parameter after it was overwritten.
"""
from __future__ import annotations

import functools

import mindspore as ms
from mindspore import ops

from qwen3moe.kernels.build import kernel_library


@functools.lru_cache(maxsize=None)
def _op():
    lib = kernel_library("adamw")
    if lib is None:
        return None
    return ops.Custom(f"{lib}:AdamwFused", out_shape=lambda p, m, v, g, s, c: [1],
                      out_dtype=lambda p, m, v, g, s, c: ms.float32, func_type="aot")


def available() -> bool:
    return _op() is not None


def adamw_inplace(p, m, v, g, s_6, c_2):
    """Update p, m, v in place; returns a [1] token to chain with ops.depend."""
    return _op()(p, m, v, g, s_6, c_2)


def fused_update(opt, grads, lr, step_size, bc2_sqrt, t_next):
    """AdamW.update through the kernel: same float32 formula and operation order as the composite
    loop in training/optimizer.py. `t_next` is the new step count; it is written to opt.step only
    after every parameter update (a side-effecting assign keeps the in-place kernels alive)."""
    # every kernel waits for the whole gradient tuple: no backward op reads an updated parameter
    step_size = ops.depend(step_size, grads)
    consts = ms.Tensor([opt.b1, 1.0 - opt.b1, opt.b2], ms.float32)
    c_2 = ms.Tensor([1.0 - opt.b2, opt.eps], ms.float32)
    scalars = {}
    tokens = ()
    for i in range(len(opt.parameters)):
        wd = opt.wd[i]
        if wd not in scalars:
            decay = 1.0 - lr * wd if wd != 0.0 else ops.ones((), ms.float32)
            scalars[wd] = ops.concat((ops.stack((decay.reshape(()), step_size.reshape(()),
                                                 bc2_sqrt.reshape(()))), consts))
        g = grads[i].astype(ms.float32)
        tokens = tokens + (adamw_inplace(opt.parameters[i], opt.exp_avg[i], opt.exp_avg_sq[i], g,
                                         scalars[wd], c_2),)
    ops.assign(opt.step, ops.depend(t_next, tokens))
    return opt.step


def usable_for(params) -> bool:
    """The kernel updates fp32 parameters only (bf16 storage keeps the composite path)."""
    return available() and all(p.dtype == ms.float32 for p in params)
