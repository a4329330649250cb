"""Loaded weights on transparent huge pages (2 MB), whatever allocated them.

Why: a decode step streams every weight it reads once (batch 1 is memory-bound), and 4 KB pages
cost a TLB miss per 4 KB, each a two-level walk under a hypervisor. NumPy madvises its own large
arrays MADV_HUGEPAGE, so weights the loaders build in NumPy land on huge pages when the kernel's THP
mode is `madvise`; tensors MindSpore allocates itself (a `Tensor.view(bfloat16)` copy: the bf16
lm_head and embeddings) stay on 4 KB pages, and their rows stream slower (bench/RESULTS.md "Huge
pages"). After a load, `use_hugepages` madvises every large weight MADV_HUGEPAGE and asks the
kernel to collapse it now (MADV_COLLAPSE, Linux >= 6.1) rather than whenever khugepaged gets to it.

Best effort by design: nothing here changes a value, and a kernel without THP or MADV_COLLAPSE
(or THP mode `never`) just keeps 4 KB pages, so failures are not errors.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

HUGE = 2 << 20  # x86-64 THP size
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
MIN_BYTES = 2 * HUGE  # smaller buffers may not hold a whole aligned 2 MB page


def _libc():
    lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.madvise.restype = ctypes.c_int
    return lib


def aligned_span(ptr: int, nbytes: int) -> tuple[int, int]:
    """The whole 2 MB pages inside [ptr, ptr + nbytes): (start, length), length 0 if none. Only
    these can become huge pages without touching memory outside the buffer."""
    start = (ptr + HUGE - 1) // HUGE * HUGE
    end = (ptr + nbytes) // HUGE * HUGE
    return start, max(0, end - start)


def advise(ptr: int, nbytes: int, collapse: bool = True) -> bool:
    """madvise the buffer's aligned span MADV_HUGEPAGE (and MADV_COLLAPSE). True if the kernel
    accepted the collapse (or, collapse=False, the advice)."""
    if not sys.platform.startswith("linux"):
        return False
    start, length = aligned_span(ptr, nbytes)
    if length == 0:
        return False
    lib = _libc()
    if lib.madvise(start, length, MADV_HUGEPAGE) != 0:
        return False
    return not collapse or lib.madvise(start, length, MADV_COLLAPSE) == 0


def use_hugepages(model) -> int:
    """Advise and collapse every Parameter of at least MIN_BYTES of `model` (after its load, before
    generation). Returns the bytes whose collapse the kernel accepted."""
    done = 0
    for p in model.get_parameters():
        nbytes = int(p.size) * p.itemsize
        if nbytes >= MIN_BYTES and advise(p.data_ptr(), nbytes):
            done += nbytes
    return done
