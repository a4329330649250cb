"""Parameter creation and dtype helpers shared by the layers.

Random init follows HF `_init_weights` (normal(0, initializer_range); norms start at 1).
`init_std=None` means ones (RMSNorm weights); 0.0 means zeros. A process-wide numpy Generator
keeps initialisation reproducible via `set_init_seed`.

bf16 weights that the model gathers rows of (embeddings, stacked experts; `gathered=True`) are
held as uint16 Parameters carrying the bf16 bit pattern: MindSpore 2.10 has no CPU Gather for
bf16 and no in-graph bitcast, but it gathers uint16. `widen` turns either form into fp32 exactly
(bits through a 65536-entry lookup table: one gather, measured as fast as bf16 astype).
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops
from mindspore.common.initializer import Zero

_RNG = np.random.default_rng(0)
_SKIP_INIT = False
_LAZY_F32 = False


BF16_BITS = ms.uint16
# float32 value of every bf16 bit pattern (bf16 is the top half of an f32)
_BF16_TABLE = Tensor((np.arange(65536, dtype=np.uint32) << 16).view(np.float32))


def widen(w: Tensor, dtype=ms.float32) -> Tensor:
    """A stored weight in the compute dtype: bf16 bits (uint16) exactly via the lookup table,
    other dtypes by a cast (none if already `dtype`). Resolved at trace time."""
    if w.dtype == BF16_BITS:
        w = ops.gather(_BF16_TABLE, w.astype(ms.int32), 0)
    return w if w.dtype == dtype else w.astype(dtype)


def bf16_bits(arr: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 bf16 bit pattern (round to nearest even, as MindSpore's cast)."""
    return Tensor(np.ascontiguousarray(arr, dtype=np.float32)).astype(ms.bfloat16).asnumpy().view(np.uint16)


def set_init_seed(seed: int) -> None:
    global _RNG
    _RNG = np.random.default_rng(seed)


class skip_init:
    """Context manager: parameters are created as zeros (weights will be loaded anyway).
    lazy=True: float32 ones too get no buffer until their values are set (the other dtypes
    always do), for a caller that replaces every parameter (parallel/parallelize.py's sharded
    load: the whole rank model's zero buffers plus the loaded shards would be ~2x the shard)."""

    def __init__(self, lazy: bool = False) -> None:
        self.lazy = lazy

    def __enter__(self):
        global _SKIP_INIT, _LAZY_F32
        self._prev, _SKIP_INIT = (_SKIP_INIT, _LAZY_F32), True
        _LAZY_F32 = self.lazy

    def __exit__(self, *exc):
        global _SKIP_INIT, _LAZY_F32
        _SKIP_INIT, _LAZY_F32 = self._prev


def to_ms_dtype(name) -> ms.dtype:
    if isinstance(name, ms.dtype.Type):
        return name
    table = {"float32": ms.float32, "fp32": ms.float32, "bfloat16": ms.bfloat16, "bf16": ms.bfloat16,
             "float16": ms.float16, "fp16": ms.float16}
    key = str(name).replace("torch.", "").replace("mindspore.", "").lower()
    if key not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[key]


def init_param(shape: tuple, init_std: float | None, name: str, param_dtype=None,
               gathered: bool = False) -> Parameter:
    dtype = to_ms_dtype(param_dtype or "float32")
    if _SKIP_INIT and (dtype != ms.float32 or _LAZY_F32):  # weights will be loaded: lazy zeros, no float32 transient
        store = BF16_BITS if gathered and dtype == ms.bfloat16 else dtype
        return Parameter(Tensor(shape=shape, dtype=store, init=Zero()), name=name)
    if _SKIP_INIT or init_std == 0.0:
        arr = np.zeros(shape, np.float32)
    elif init_std is None:
        arr = np.ones(shape, np.float32)
    else:
        arr = (_RNG.standard_normal(shape, dtype=np.float32) * np.float32(init_std))
    if gathered and dtype == ms.bfloat16:
        return Parameter(Tensor(bf16_bits(arr)), name=name)
    return Parameter(Tensor(arr).astype(dtype) if dtype != ms.float32 else Tensor(arr), name=name)


def write_param(p: Parameter, arr: np.ndarray) -> None:
    """Overwrite a Parameter's values in place, so graphs compiled before still see them.

    Why not `set_data`: in MindSpore 2.10 it swaps the Parameter's tensor, and a graph that already
    ran keeps reading and writing the old buffer (the host then sees values the graph never used,
    and the graph's updates vanish). On CPU `asnumpy()` of a float32 Parameter is a view of its
    buffer, so copying into it is seen by every graph; if it is not a view here (other dtype or
    device), `set_data` is the fallback, which is right for graphs not compiled yet.
    """
    arr = np.asarray(arr, dtype=np.float32).reshape(tuple(p.shape))
    if p.dtype == ms.float32:
        view = p.asnumpy()
        if view.flags.writeable and view.shape == arr.shape:
            np.copyto(view, arr)
            again = p.asnumpy()
            if np.shares_memory(view, again) or np.array_equal(again, arr):
                return
    if p.dtype == BF16_BITS:
        p.set_data(Tensor(bf16_bits(arr)))
        return
    t = Tensor(np.ascontiguousarray(arr))
    p.set_data(t if p.dtype == ms.float32 else t.astype(p.dtype))
