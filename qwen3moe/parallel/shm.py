"""Collectives between the processes of one host over POSIX shared memory: C++ kernels
(kernels/csrc/shm_comm.cc: protocol, determinism, timeouts) run as ops.Custom aot, so they sit
inside ms.jit graphs like MCCL's AllReduce, with backward rules.

    setup(require)          after mindspore.communication.init(), on every rank at the same point:
                            one MCCL AllReduce exchanges hostnames, kernel availability and a random
                            job token; rank 0 creates the segment /qwen3moe-<token> (O_EXCL), the
                            others attach after an MCCL barrier, and rank 0 unlinks the name once all
                            are attached (the mapping lives on; a crashed job leaves nothing in
                            /dev/shm). Returns False (MCCL stays) when the ranks are on several
                            hosts or a rank has no kernels; with require=True that is a
                            CollectivesError. Idempotent.
    Group(ranks)            a group of global ranks (all on this host); members in ascending order
    AllReduce(g, site)      sum of float32 x over g            bwd: AllReduce
    AllGather(g, site)      [n*d0, ...] members' x in order     bwd: ReduceScatter
    ReduceScatter(g, site)  sum over g, my block of axis 0     bwd: AllGather
    AllToAll(g, site)       block j of axis 0 to member j; out block j from member j
                                                                bwd: AllToAll
    HostAllReduce(g, site)  sum of a small float32 NumPy array, from Python (no graph); also in
                            two halves: start(x) publishes, the function it returns waits
Every op instance is one call site: it gets its own tag (a per-group counter, so every member
that builds the same ops in the same order agrees on it) and `site` names it in errors.
Shapes: n group size, d0 the first dimension (divisible by n for reduce_scatter / all_to_all).
"""
from __future__ import annotations

import ctypes
import functools
import os
import secrets
import socket
import zlib

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.errors import Qwen3MoeError
from qwen3moe.kernels.build import kernel_library

TIMEOUT_ENV, SLOT_ENV = "QWEN3MOE_SHM_TIMEOUT", "QWEN3MOE_SHM_SLOT_MIB"
OPS = {"all_reduce": 0, "all_gather": 1, "reduce_scatter": 2, "all_to_all": 3}
_STATE: dict = {}
_TAGS: dict[int, int] = {}


class CollectivesError(Qwen3MoeError, RuntimeError):
    """A collectives backend that cannot be used as requested, or a failed shared-memory op."""


@functools.lru_cache(maxsize=None)
def _lib():
    path = kernel_library("shm_comm")
    if path is None:
        return None
    lib = ctypes.CDLL(path)  # the same mapping MindSpore's Custom ops use (dlopen of one path)
    lib.qshm_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_int,
                              ctypes.c_double]
    lib.qshm_unlink.argtypes = [ctypes.c_char_p]
    lib.qshm_describe.argtypes = [ctypes.c_ulonglong, ctypes.c_uint, ctypes.c_char_p]
    lib.qshm_error.restype = ctypes.c_char_p
    lib.qshm_stats.argtypes = [ctypes.POINTER(ctypes.c_ulonglong)]
    lib.qshm_arrive.argtypes = [ctypes.c_ulonglong, ctypes.c_uint, ctypes.c_void_p, ctypes.c_longlong]
    lib.qshm_complete.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.qshm_run.argtypes = [ctypes.c_int, ctypes.c_ulonglong, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_longlong, ctypes.c_int, ctypes.c_int]
    return lib, path


def available() -> bool:
    return _lib() is not None


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "300")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise CollectivesError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def slot_bytes() -> int:
    raw = os.environ.get(SLOT_ENV, "4")
    if not raw.isdigit() or not 0 < int(raw) <= 1024:
        raise CollectivesError(f"{SLOT_ENV}={raw!r}: expected whole MiB in 1..1024")
    return int(raw) << 20


def _host_words() -> list[float]:
    """The hostname as two 24-bit words (exact in float32, MCCL reduces float only)."""
    h = zlib.crc32(socket.gethostname().encode()) | zlib.adler32(socket.gethostname().encode()) << 32
    return [float(h & 0xFFFFFF), float(h >> 24 & 0xFFFFFF)]


def _world_sum(v: np.ndarray) -> np.ndarray:
    return ops.AllReduce()(Tensor(v.astype(np.float32))).asnumpy()


def setup(require: bool = False) -> bool:
    """Join this job's segment (module docstring); True when the shared-memory ops are usable."""
    if "ok" in _STATE:
        if require and not _STATE["ok"]:
            raise CollectivesError(_STATE["why"])
        return _STATE["ok"]
    from mindspore.communication import get_group_size, get_rank

    rank, world = get_rank(), get_group_size()
    v = np.zeros(3 * world + 3)
    v[2 * rank:2 * rank + 2] = _host_words()
    v[2 * world + rank] = 1.0 if available() else 0.0
    if rank == 0:
        v[3 * world:] = [secrets.randbelow(1 << 24) for _ in range(3)]
    v = _world_sum(v)
    hosts = {tuple(v[2 * r:2 * r + 2]) for r in range(world)}
    why = None
    if len(hosts) > 1:
        why = f"shared-memory collectives need every rank on one host; this job runs on {len(hosts)} hosts"
    elif v[2 * world:3 * world].min() < 1:
        missing = [r for r in range(world) if v[2 * world + r] < 1]
        why = f"shared-memory collectives: no kernels on rank(s) {missing} (g++ and QWEN3MOE_KERNELS needed)"
    if why is None:
        name = "/qwen3moe-" + "-".join(f"{int(t):06x}" for t in v[3 * world:])
        why = _join(name.encode(), rank, world)
    _STATE.update(ok=why is None, why=why, rank=rank, world=world)
    if require and why is not None:
        raise CollectivesError(why)
    return why is None


def _join(name: bytes, rank: int, world: int) -> str | None:
    """Create (rank 0) / attach (others) with MCCL barriers between; None or every rank's error."""
    lib, _ = _lib()
    bad = np.zeros(world)
    if rank == 0:
        bad[0] = lib.qshm_open(name, world, rank, slot_bytes(), 1, timeout_s()) != 0
    if _world_sum(bad).any():
        return f"shared-memory collectives: rank 0 could not create {name.decode()}" + (
            f": {lib.qshm_error().decode()}" if rank == 0 else "")
    if rank != 0:
        bad[rank] = lib.qshm_open(name, world, rank, slot_bytes(), 0, timeout_s()) != 0
    failed = _world_sum(bad)
    if rank == 0:
        lib.qshm_unlink(name)  # every rank holds the mapping now
    if failed.any():
        return f"shared-memory collectives: rank(s) {list(np.nonzero(failed)[0])} could not attach {name.decode()}"
    return None


class Group:
    """Global ranks of a group (ascending), this rank's position and the member mask."""

    def __init__(self, ranks, me: int | None = None) -> None:
        self.ranks = sorted(int(r) for r in ranks)
        self.size = len(self.ranks)
        self.mask = sum(1 << r for r in self.ranks)
        self.pos = self.ranks.index(_STATE.get("rank", 0) if me is None else me)


def _new_tag(g: Group, site: str) -> int:
    """The tag of a new call site on g (tags count per group), its name registered for errors."""
    tag = _TAGS[g.mask] = _TAGS.get(g.mask, 0) + 1
    lib, _ = _lib()
    lib.qshm_describe(g.mask, tag, f"{site} #{tag}".encode())
    return tag


def _meta(g: Group, site: str) -> Tensor:
    """[mask, tag] of a new call site on g, the kernels' second input."""
    tag = _new_tag(g, site)
    return Tensor(np.array([g.mask], np.uint64).view(np.int64).tolist() + [tag], ms.int64)


def _custom(fn: str, shape):
    _, path = _lib()
    return ops.Custom(f"{path}:{fn}", out_shape=lambda x, m: shape(list(x)), out_dtype=lambda x, m: x,
                      func_type="aot")


class _Collective(nn.Cell):
    FN, BACK = "", None

    def __init__(self, g: Group, site: str, backward: bool = True) -> None:
        super().__init__()
        self.g = g
        self.op = _custom(self.FN, self.shape)
        self.meta = _meta(g, f"{type(self).__name__} {site}")
        self.back = globals()[self.BACK](g, site + " (backward)", False) if backward else None

    def shape(self, s: list) -> list:
        return s

    def construct(self, x):
        return self.op(x, self.meta)

    def bprop(self, x, out, dout):
        return (self.back(dout),)


class AllReduce(_Collective):
    FN, BACK = "ShmAllReduce", "AllReduce"


class AllGather(_Collective):
    FN, BACK = "ShmAllGather", "ReduceScatter"

    def shape(self, s):
        return [s[0] * self.g.size] + s[1:]


class ReduceScatter(_Collective):
    FN, BACK = "ShmReduceScatter", "AllGather"

    def shape(self, s):
        return [s[0] // self.g.size] + s[1:]


class AllToAll(_Collective):
    FN, BACK = "ShmAllToAll", "AllToAll"


class HostAllReduce:
    """A sum of a small float32 NumPy array over g called from Python, outside any graph (one
    call site): the ctypes call releases the GIL and sleeps on the futex like the kernels, where
    a one-op compiled graph costs a graph launch and asnumpy's busy wait on top of the exchange.
    `start(x)` publishes x and returns at once a function that waits for the sum: work between
    the two hides the wait (one start of a call site in flight at a time)."""

    def __init__(self, g: Group, site: str) -> None:
        self.g = g
        self.tag = _new_tag(g, f"HostAllReduce {site}")

    def sum(self, x: np.ndarray) -> np.ndarray:
        return run("all_reduce", self.g, self.tag, np.asarray(x, np.float32))

    def start(self, x: np.ndarray):
        lib, _ = _lib()
        x = np.ascontiguousarray(x, np.float32)
        h = lib.qshm_arrive(self.g.mask, self.tag, x.ctypes.data, x.size)
        if h < 0:
            raise CollectivesError(lib.qshm_error().decode())

        def finish() -> np.ndarray:
            out = np.empty_like(x)
            if lib.qshm_complete(h, out.ctypes.data) != 0:
                raise CollectivesError(lib.qshm_error().decode())
            return out
        return finish


def run(op: str, g: Group, tag: int, x: np.ndarray) -> np.ndarray:
    """One op on a NumPy array outside MindSpore (ctypes; tests and probes)."""
    lib, _ = _lib()
    x = np.ascontiguousarray(x)
    rows = {"all_gather": x.shape[0] * g.size, "reduce_scatter": x.shape[0] // g.size}.get(op, x.shape[0])
    out = np.empty((rows,) + x.shape[1:], x.dtype)
    rc = lib.qshm_run(OPS[op], g.mask, tag, x.ctypes.data, out.ctypes.data, x.size, x.itemsize,
                      int(x.dtype == np.float32))
    if rc != 0:
        raise CollectivesError(lib.qshm_error().decode())
    return out


def stats() -> dict[str, float]:
    """This process's counters since it started: ops run, futex sleeps while waiting for a peer,
    seconds waited (bench/parallel_decode.py)."""
    out = (ctypes.c_ulonglong * 3)()
    _lib()[0].qshm_stats(out)
    return {"ops": int(out[0]), "sleeps": int(out[1]), "wait_s": out[2] * 1e-9}


def open_segment(name: str, world: int, rank: int, create: bool) -> None:
    """Create / attach a segment without MCCL (tests of the protocol between plain processes)."""
    lib, _ = _lib()
    if lib.qshm_open(name.encode(), world, rank, slot_bytes(), int(create), timeout_s()) != 0:
        raise CollectivesError(lib.qshm_error().decode())
    _STATE.update(ok=True, why=None, rank=rank, world=world)


def unlink(name: str) -> None:
    _lib()[0].qshm_unlink(name.encode())
