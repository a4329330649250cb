"""Kernel build: the GEMM backend choice (oneDNN dnnl_sgemm when MindSpore ships libdnnl, numpy's
OpenBLAS otherwise or with QWEN3MOE_GEMM=openblas), and both backends giving the same fused-MoE
forward and gradients (float32 GEMMs that differ only in blocking and summation order: rtol 1e-5
plus atol 1e-5 x the array's largest magnitude, for elements that cancel to near zero). The default build is
checked against a float64 NumPy reference by tests/test_moe_kernel.py; this ties the other to it.
Shapes: T tokens, K top-k, E experts, H hidden, I expert ffn (I = 40: 16-wide AVX-512 blocks plus
a scalar tail in the SwiGLU loops).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen3moe.kernels import build, moe

pytestmark = pytest.mark.skipif(not moe.available(), reason="fused MoE kernel not buildable here")

CASE = """
import json, sys
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from qwen3moe.kernels import moe
ms.set_device("CPU")
r = np.random.default_rng(7)
T, K, E, H, I = 37, 4, 8, 48, 40
x = r.standard_normal((T, H)).astype(np.float32)
idx = np.stack([r.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
w = r.random((T, K)).astype(np.float32)
gu = (r.standard_normal((E, 2 * I, H)) * 0.3).astype(np.float32)
dn = (r.standard_normal((E, H, I)) * 0.3).astype(np.float32)
dy = r.standard_normal((T, H)).astype(np.float32)
class L(nn.Cell):
    def construct(self, x, idx, w, gu, dn, dy):
        return (moe.moe_experts(x, idx, w, gu, dn) * dy).sum()
y = moe.moe_experts(Tensor(x), Tensor(idx), Tensor(w), Tensor(gu), Tensor(dn)).asnumpy()
_, g = ms.value_and_grad(L(), grad_position=(0, 2, 3, 4))(*(Tensor(a) for a in (x, idx, w, gu, dn, dy)))
np.savez(sys.argv[1], y=y, dx=g[0].asnumpy(), dw=g[1].asnumpy(), dgu=g[2].asnumpy(), ddn=g[3].asnumpy())
from qwen3moe.kernels.build import kernel_library
print(json.dumps({"lib": kernel_library("moe_fused")}))
"""


def _run(tmp_path: Path, gemm: str) -> tuple[dict, str]:
    out = tmp_path / f"{gemm}.npz"
    env = dict(os.environ, QWEN3MOE_GEMM=gemm)
    proc = subprocess.run([sys.executable, "-c", CASE, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(np.load(out)), json.loads(proc.stdout.strip().splitlines()[-1])["lib"]


def test_openblas_flag_drops_dnnl(monkeypatch):
    monkeypatch.setenv("QWEN3MOE_GEMM", "openblas")
    assert "-DQWEN3MOE_DNNL" not in build._link_flags()
    monkeypatch.delenv("QWEN3MOE_GEMM")
    if build._dnnl_library():
        assert "-DQWEN3MOE_DNNL" in build._link_flags()


def test_both_gemm_backends_agree(tmp_path):
    (a, lib_a), (b, lib_b) = _run(tmp_path, "dnnl"), _run(tmp_path, "openblas")
    assert lib_a and lib_b
    if build._dnnl_library():
        assert lib_a != lib_b  # two differently built libraries (the flags are in the cache key)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5 * np.abs(b[k]).max(), err_msg=k)


def test_cache_key_includes_cpu_features(tmp_path, monkeypatch):
    """A shared kernel cache never hands -march=native code built on another CPU to this one."""
    monkeypatch.setenv("QWEN3MOE_KERNEL_CACHE", str(tmp_path))
    paths = []
    try:
        for flags in ("flags : fpu avx2", "flags : fpu avx2 avx512f"):
            monkeypatch.setattr(build, "_cpu_flags", lambda f=flags: f)
            build.kernel_library.cache_clear()
            paths.append(build.kernel_library("sumsq"))
    finally:
        build.kernel_library.cache_clear()
    assert all(paths) and paths[0] != paths[1]
    assert sorted(p.name for p in tmp_path.glob("sumsq-*.so")) == sorted(Path(p).name for p in paths)


def test_cached_library_mode_follows_the_umask_and_failed_builds_leave_nothing(tmp_path, monkeypatch):
    """The cached .so gets 0666 & ~umask like every other file we write (was mkstemp's 0600, which the
    linker turned into 0711: unreadable to the group sharing the cache); a failed build leaves no temp."""
    import stat

    monkeypatch.setenv("QWEN3MOE_KERNEL_CACHE", str(tmp_path))
    old = os.umask(0o027)
    try:
        build.kernel_library.cache_clear()
        lib = build.kernel_library("sumsq")
        build.kernel_library.cache_clear()
        monkeypatch.setenv("CXX", "false")  # a compiler that always fails
        assert build.kernel_library("rmsnorm") is None
    finally:
        os.umask(old)
        build.kernel_library.cache_clear()
    assert stat.S_IMODE(os.stat(lib).st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == [Path(lib).name]
