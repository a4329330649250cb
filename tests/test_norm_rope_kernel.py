"""Fused q/k RMSNorm + RoPE + transpose C++ op (kernels/norm_rope.py) vs a float64 NumPy reference
(forward and hand-derived backward) and vs the composite layers (RMSNorm, transpose, apply_rope),
including the attention layer's projections with the fused and the composite path.

Tolerances: O(1) inputs, float32 sums over D <= 128: rtol 1e-5 / atol 1e-5 of the terms' scale on
y and dx; dw sums over up to 2048 rows (double-accumulated in the kernel): rtol 1e-5 / atol 1e-4.
swap_axes12 is a copy: compared exactly with NumPy's transpose (forward and gradient), and checked
to release its input inside a compiled graph, which a graph Transpose does not (the per-layer
memory of the 48-layer prefill).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.kernels import norm_rope as nrk
from qwen3moe.layers.attention import Qwen3MoeAttention
from qwen3moe.layers.rope import apply_rope

from helpers import REPO

pytestmark = pytest.mark.skipif(not nrk.available(), reason="norm+rope kernel not buildable here")
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _case(seed, B, S, H, D):
    r = np.random.default_rng(seed)
    x = r.standard_normal((B, S, H, D)) * 10.0 ** r.uniform(-2, 1, (B, S, H, 1))
    w = r.standard_normal(D)
    ang = r.uniform(0, 50, (B, S, D // 2))
    ang = np.concatenate([ang, ang], -1)
    dy = r.standard_normal((B, H, S, D))
    f = lambda a: a.astype(np.float32)
    return f(x), f(w), f(np.cos(ang)), f(np.sin(ang)), f(dy)


def _reference(x, w, cos, sin, dy, eps):
    x, w, cos, sin, dy = (a.astype(np.float64) for a in (x, w, cos, sin, dy))
    D = x.shape[-1]
    h = D // 2
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    xh = x * r
    z = (w * xh).transpose(0, 2, 1, 3)                          # [B,H,S,D]
    c, s = cos[:, None], sin[:, None]
    rot = lambda a: np.concatenate([-a[..., h:], a[..., :h]], -1)
    y = z * c + rot(z) * s
    dz = dy * c + np.concatenate([dy[..., h:] * s[..., h:], -dy[..., :h] * s[..., :h]], -1)
    dz = dz.transpose(0, 2, 1, 3)                               # [B,S,H,D]
    gw = dz * w
    dx = r * (gw - xh * (gw * xh).mean(-1, keepdims=True))
    dw = (dz * xh).reshape(-1, D).sum(0)
    return y, dx, dw, r


class _Fused(nn.Cell):
    def construct(self, x, w, eps, cos, sin, dy):
        return (nrk.norm_rope(x, w, eps, cos, sin) * dy).sum()


class _Composite(nn.Cell):
    """layers/norm.py's composite formula (weight as an input) + transpose + layers/rope.py."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def construct(self, x, w, cos, sin, dy):
        z = w * (x * ops.rsqrt(ops.mean(x * x, -1, keep_dims=True) + self.eps))
        z = z.transpose(0, 2, 1, 3)
        return (apply_rope(z, cos.expand_dims(1), sin.expand_dims(1)) * dy).sum()


@SETTINGS
@given(seed=st.integers(0, 10_000), B=st.integers(1, 2), S=st.integers(1, 9), H=st.integers(1, 4),
       D=st.sampled_from([2, 8, 64]), eps=st.sampled_from([1e-6, 1e-2]))
def test_kernel_equals_numpy_forward_and_grads(seed, B, S, H, D, eps):
    x, w, cos, sin, dy = _case(seed, B, S, H, D)
    args = [Tensor(a) for a in (x, w)] + [Tensor([eps], ms.float32)] + [Tensor(a) for a in (cos, sin, dy)]
    y = nrk.norm_rope(*args[:5]).asnumpy()
    dx, dw = ms.grad(_Fused(), grad_position=(0, 1))(*args)
    ry, rdx, rdw, r = _reference(x, w, cos, sin, dy, eps)
    np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    np.testing.assert_allclose(dx.asnumpy(), rdx, rtol=1e-5, atol=1e-5 * (np.abs(w).max() * r.max()))
    np.testing.assert_allclose(dw.asnumpy(), rdw, rtol=1e-5, atol=1e-4)


def test_kernel_equals_composite_compiled():
    x, w, cos, sin, dy = _case(3, 2, 64, 8, 64)
    eps = 1e-6
    t = [Tensor(a) for a in (x, w, cos, sin, dy)]
    fused = ms.jit(ms.grad(_Fused(), grad_position=(0, 1)))(t[0], t[1], Tensor([eps], ms.float32), *t[2:])
    comp = ms.jit(ms.grad(_Composite(eps), grad_position=(0, 1)))(*t)
    for a, b in zip(fused, comp):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-5 * np.abs(b.asnumpy()).max())


def test_attention_projections_fused_equal_composite():
    r = np.random.default_rng(4)
    attn = Qwen3MoeAttention(64, 4, 2, 16)
    for p in attn.trainable_params():
        p.set_data(Tensor(r.standard_normal(p.shape).astype(np.float32) * 0.3))
    assert attn.use_norm_rope
    x = Tensor(r.standard_normal((2, 5, 64)).astype(np.float32))
    ang = np.concatenate([r.uniform(0, 9, (2, 5, 8))] * 2, -1)
    cos, sin = Tensor(np.cos(ang).astype(np.float32)), Tensor(np.sin(ang).astype(np.float32))
    fused = [a.asnumpy() for a in attn.project_qkv(x, cos, sin)]
    attn.use_norm_rope = False
    comp = [a.asnumpy() for a in attn.project_qkv(x, cos, sin)]
    for a, b in zip(fused, comp):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


class _Swapped(nn.Cell):
    def construct(self, x, dy):
        return (nrk.swap_axes12(x) * dy).sum()


@SETTINGS
@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), A=st.integers(1, 9), C=st.integers(1, 9),
       D=st.sampled_from([1, 3, 128]))
def test_swap_axes12_equals_numpy_transpose_and_its_gradient(seed, B, A, C, D):
    r = np.random.default_rng(seed)
    x = r.standard_normal((B, A, C, D)).astype(np.float32)
    dy = r.standard_normal((B, C, A, D)).astype(np.float32)
    np.testing.assert_array_equal(nrk.swap_axes12(Tensor(x)).asnumpy(), x.transpose(0, 2, 1, 3))
    dx = ms.grad(_Swapped())(Tensor(x), Tensor(dy))
    np.testing.assert_array_equal(dx.asnumpy(), dy.transpose(0, 2, 1, 3))


_GRAPH_MEMORY = """
import numpy as np, mindspore as ms
from mindspore import Tensor, nn
from qwen3moe.layers.attention import swap_axes12
def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
class Net(nn.Cell):
    @ms.jit
    def construct(self, x):
        for _ in range(24):
            x = swap_axes12(swap_axes12(x) * 1.01) + 1.0
        return x[0, 0, 0]
x = Tensor(np.ones((1, 512, 16, 128), np.float32))  # 4 MiB, as a layer's q at 512 tokens
net = Net()
r0 = rss_mb()
net(x).asnumpy()
print(rss_mb() - r0)
"""


def test_swap_axes12_releases_its_input_inside_a_compiled_graph(tmp_path):
    """24 layer-like steps over a 4 MiB activation: with a graph Transpose in place of the kernel
    the run grew RSS by ~424 MiB (every step's buffers held to the end of the graph, measured);
    with swap_axes12 by ~30 MiB (a few buffers reused). A fresh process, so no earlier test's
    free pool memory can hide a leak; bound 120 MiB."""
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO))
    script = tmp_path / "graph_memory.py"  # MindSpore compiles only code it can read from a file
    script.write_text(_GRAPH_MEMORY)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew_mb = float(proc.stdout.strip().splitlines()[-1])
    assert grew_mb < 120, f"a 24-step graph of swaps grew RSS by {grew_mb:.0f} MiB"
