"""Build-on-first-use of the optional CPU kernels (C++ calling MindSpore's bundled oneDNN sgemm,
or numpy's bundled OpenBLAS where MindSpore ships no libdnnl or QWEN3MOE_GEMM=openblas).

The shared object is cached under $QWEN3MOE_KERNEL_CACHE (default ~/.cache/qwen3moe) keyed by a
hash of the source, flags and BLAS path, so a fresh machine compiles once (~3 s with g++).
Anything missing (no compiler, no 64-bit OpenBLAS in numpy.libs, not x86-64 Linux) returns None
and callers keep the portable composite MindSpore path. QWEN3MOE_KERNELS=0 disables kernels.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
# Per-kernel extra flags. adamw: without -fno-math-errno GCC keeps std::sqrt a libm call that may
# set errno, which stops the update loop from vectorising (bench/RESULTS.md); sqrt is correctly
# rounded either way, so results are unchanged.
# -ffp-contract=off keeps torch's float32 rounding (no FMA), also pinned in the source.
EXTRA_FLAGS = {"adamw": ["-fno-math-errno", "-ffp-contract=off"]}
# MindSpore dlcloses a kernel library when the last graph using it is freed (at interpreter exit
# too), but the decode pool's detached helper threads (csrc/decode_pool.h) keep running the code
# of the library that created the pool, and the pool is shared by every library that includes it.
# Unmapping that code under a parked helper was the exit-time SIGSEGV; -z nodelete keeps every
# kernel library mapped until the process ends.
NODELETE = ["-Wl,-z,nodelete"]


def _dnnl_library() -> str | None:
    """MindSpore's bundled oneDNN (its CPU MatMul backend), unless QWEN3MOE_GEMM=openblas."""
    if os.environ.get("QWEN3MOE_GEMM", "dnnl") == "openblas":
        return None
    import importlib.util

    spec = importlib.util.find_spec("mindspore")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(glob.glob(str(Path(spec.submodule_search_locations[0]) / "lib" / "libdnnl.so.*")))
    return found[0] if found else None


def _link_flags() -> list[str]:
    """-D / -l flags for the GEMM library: oneDNN's dnnl_sgemm when present, else OpenBLAS."""
    blas = Path(_blas_library())
    flags = [f"-L{blas.parent}", f"-l:{blas.name}", f"-Wl,-rpath,{blas.parent}"]
    dnnl = _dnnl_library()
    if dnnl:
        d = Path(dnnl)
        flags = ["-DQWEN3MOE_DNNL", f"-L{d.parent}", f"-l:{d.name}", f"-Wl,-rpath,{d.parent}", *flags]
    return flags


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> str:
    """The CPU's feature flags: -march=native code from a shared cache (a home folder mounted on
    several machines) must not be loaded on a CPU without, say, AVX-512 (SIGILL)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _blas_library() -> str | None:
    import numpy

    libs = Path(numpy.__file__).resolve().parent.parent / "numpy.libs"
    found = sorted(glob.glob(str(libs / "libopenblas64_*.so")))
    return found[0] if found else None


@functools.lru_cache(maxsize=None)
def kernel_library(name: str) -> str | None:
    """Path of the compiled kernel library, or None when kernels are unavailable here."""
    if os.environ.get("QWEN3MOE_KERNELS", "1") in ("0", "false", "off"):
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    blas = _blas_library()
    if not cxx or not blas:
        return None
    src = CSRC / f"{name}.cc"
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", *NODELETE,
             *EXTRA_FLAGS.get(name, [])]
    headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))  # sources #include them
    link = _link_flags()
    key = hashlib.sha256(src.read_bytes() + headers + " ".join(flags + link + [cxx, _cpu_flags()]).encode()
                         ).hexdigest()[:16]
    cache = Path(os.environ.get("QWEN3MOE_KERNEL_CACHE", Path.home() / ".cache" / "qwen3moe"))
    out = cache / f"{name}-{key}.so"
    if out.is_file():
        return str(out)
    from qwen3moe.io.atomic import atomic_file  # stdlib only: temp + rename, 0666 & ~umask

    try:
        with atomic_file(out) as tmp:
            proc = subprocess.run([cxx, *flags, str(src), "-o", tmp, *link], capture_output=True, text=True)
            if proc.returncode != 0:
                raise _BuildFailed(proc.stderr[-500:])
    except _BuildFailed as e:
        warnings.warn(f"qwen3moe: kernel build failed, using the composite path: {e}", RuntimeWarning,
                      stacklevel=2)
        return None
    return str(out)


class _BuildFailed(RuntimeError):
    """The compiler failed; atomic_file removes its temp on the way out."""
