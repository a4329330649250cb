"""Kernel libraries and process exit: MindSpore dlcloses a kernel library when its last graph is
freed (at interpreter exit too) while the decode pool's detached helper threads (csrc/decode_pool.h)
still run the code of the library that created the pool. bf16 generation (quant_ops builds the
pool after decode_layer is loaded) then segfaulted after the results were written. The libraries
are linked -z nodelete (kernels/build.py), so a dlclose never unmaps them.

Shapes: none (process level).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from qwen3moe.kernels import build

# (library, another library loaded before it): decode_layer then quant_ops is the order of a bf16
# decode, where the pool's unique symbol binds to decode_layer, so nothing pins quant_ops; linear
# does not include the pool at all
CASES = [("quant_ops", "decode_layer"), ("decode_layer", "quant_ops"), ("linear", "decode_layer")]

PROBE = """
import ctypes, os, sys
import numpy  # loads the OpenBLAS (and its libgfortran) the libraries link against
libdl = ctypes.CDLL(None)
libdl.dlopen.restype = ctypes.c_void_p
libdl.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
libdl.dlclose.argtypes = [ctypes.c_void_p]
first, path = (a.encode() for a in sys.argv[1:])
assert libdl.dlopen(first, os.RTLD_NOW | os.RTLD_LOCAL), first
h = libdl.dlopen(path, os.RTLD_NOW | os.RTLD_LOCAL)
assert h, path
assert libdl.dlclose(h) == 0
print("mapped" if libdl.dlopen(path, os.RTLD_NOW | os.RTLD_NOLOAD) else "unmapped")
"""


@pytest.mark.parametrize("name, first", CASES)
def test_kernel_library_stays_mapped_after_dlclose(name, first):
    path, first_path = build.kernel_library(name), build.kernel_library(first)
    if path is None or first_path is None:
        pytest.skip("kernels not buildable here")
    # a fresh interpreter: the only reference to the library is this probe's own dlopen
    proc = subprocess.run([sys.executable, "-c", PROBE, first_path, path], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert proc.stdout.strip() == "mapped", f"{path} was unloaded by its last dlclose (not linked -z nodelete)"

