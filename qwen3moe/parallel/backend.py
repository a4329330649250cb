"""The one switch between the collectives backends of the process-per-rank layer.

    QWEN3MOE_COLLECTIVES = auto (default) | shm | mccl

    mccl  MindSpore's collectives (MCCL on CPU: AllReduce on any group; AllGather on the world
          group only; no ReduceScatter / AlltoAll, emulated with AllReduce of zero-padded buffers)
    shm   shared-memory kernels between the ranks of one host (shm.py): all four ops native;
          on a job spanning several hosts, or without the kernels, a one-line CollectivesError
    auto  shm when every rank is on one host and every rank has the kernels, else mccl

`get()` decides once per process, after init(), collectively (every rank calls it at the same
point: process.ProcessCollectives does, first thing). Every collective of the parallel layer
inside a graph is a Cell made here: `all_reduce`, `all_gather` (axis 0), `reduce_scatter` (axis
0), `all_to_all` (equal blocks of axis 0), on a communication group known by name (`register`,
called where the groups are created; None or the world group's name: every rank). Each call
returns a new Cell: one Cell per call site (shm keys its data by call site). `host_sum` is the
one collective called from the host loop between graphs (generation's rows-done count), one
call site too: `.sum(x)` of a small float32 NumPy array, or `.start(x)` -> a function that
returns the sum (shm: x published at once, the wait in the function).
"""
from __future__ import annotations

import functools
import os

import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.parallel.shm import CollectivesError

ENV = "QWEN3MOE_COLLECTIVES"
CHOICES = ("auto", "shm", "mccl")
_GROUPS: dict[str, list[int]] = {}


def choice() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise CollectivesError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def register(name: str, ranks) -> None:
    """The global ranks of communication group `name` (created with create_group)."""
    _GROUPS[name] = sorted(int(r) for r in ranks)


def ranks_of(name: str | None) -> list[int]:
    from mindspore.communication import GlobalComm, get_group_size

    if name is None or name == GlobalComm.WORLD_COMM_GROUP:
        return list(range(get_group_size()))
    if name not in _GROUPS:
        raise CollectivesError(f"communication group {name!r} was not registered (backend.register)")
    return _GROUPS[name]


@functools.lru_cache(maxsize=1)
def get():
    """This process's backend object (module docstring); needs mindspore.communication.init()."""
    from qwen3moe.parallel import shm

    want = choice()
    if want != "mccl" and shm.setup(require=want == "shm"):
        return ShmBackend()
    return MCCLBackend()


class _Zeroed(nn.Cell):
    """AllGather as an AllReduce of a zero buffer holding this rank's block (MCCL on sub-groups)."""

    def __init__(self, name: str | None, size: int, pos: int) -> None:
        super().__init__()
        self.ar, self.size, self.pos = ops.AllReduce(group=_name(name)), size, pos

    def construct(self, x):
        buf = ops.zeros((self.size,) + x.shape, x.dtype)
        buf = ops.tensor_scatter_update(buf, Tensor([[self.pos]], ms.int32), x.expand_dims(0))
        return self.ar(buf).reshape((self.size * x.shape[0],) + x.shape[1:])


class _SumOwn(nn.Cell):
    def __init__(self, name: str | None, size: int, pos: int) -> None:
        super().__init__()
        self.ar, self.size, self.pos = ops.AllReduce(group=_name(name)), size, pos

    def construct(self, x):
        return ops.split(self.ar(x), x.shape[0] // self.size, 0)[self.pos]


class _AllToAllByGather(nn.Cell):
    """Equal-split all-to-all from a gather: block `pos` of every member's x, in member order."""

    def __init__(self, gather: nn.Cell, size: int, pos: int) -> None:
        super().__init__()
        self.gather, self.size, self.pos = gather, size, pos

    def construct(self, x):
        b = x.shape[0] // self.size
        full = self.gather(x)  # [size * size * b, ...]: member j's x at rows j*size*b ..
        return ops.concat([full[(j * self.size + self.pos) * b:(j * self.size + self.pos + 1) * b]
                           for j in range(self.size)], 0)


def _name(name: str | None) -> str:
    from mindspore.communication import GlobalComm

    return GlobalComm.WORLD_COMM_GROUP if name is None else name


class MCCLBackend:
    """MindSpore's collectives; native AllGather / ReduceScatter off CPU, emulated on CPU."""

    kind = "mccl"

    def __init__(self) -> None:
        self.native = ms.get_context("device_target") != "CPU"

    def _pos(self, name):
        from mindspore.communication import get_rank

        ranks = ranks_of(name)
        return len(ranks), ranks.index(get_rank())

    def all_reduce(self, name: str | None, site: str = "") -> nn.Cell:
        return ops.AllReduce(group=_name(name))

    def all_gather(self, name: str | None, site: str = "") -> nn.Cell:
        if self.native:
            return ops.AllGather(group=_name(name))
        return _Zeroed(name, *self._pos(name))

    def reduce_scatter(self, name: str | None, site: str = "") -> nn.Cell:
        if self.native:
            return ops.ReduceScatter(group=_name(name))
        return _SumOwn(name, *self._pos(name))

    def all_to_all(self, name: str | None, site: str = "") -> nn.Cell:
        return _AllToAllByGather(self.all_gather(name, site), *self._pos(name))

    def host_sum(self, name: str | None, site: str = ""):
        return _CompiledSum(self.all_reduce(name, site))


class _CompiledSum(nn.Cell):
    """A one-op compiled graph of an all-reduce (eagerly, PyNative, it took 5-10 ms a call), as
    host_sum's interface: `sum(x)`, and `start(x)` -> a function returning the sum (computed at
    once: MindSpore's collectives have no split phase here)."""

    def __init__(self, ar: nn.Cell) -> None:
        super().__init__()
        self.ar = ar

    @ms.jit
    def construct(self, x):
        return self.ar(x)

    def sum(self, x):
        return self(Tensor(x, ms.float32)).asnumpy()

    def start(self, x):
        out = self.sum(x)
        return lambda: out


class ShmBackend:
    """Shared-memory kernels (shm.py), one Cell per call site."""

    kind = "shm"

    def _group(self, name):
        from qwen3moe.parallel import shm

        return shm.Group(ranks_of(name))

    def all_reduce(self, name: str | None, site: str = "") -> nn.Cell:
        from qwen3moe.parallel import shm

        return shm.AllReduce(self._group(name), f"{_name(name)} {site}".strip())

    def all_gather(self, name: str | None, site: str = "") -> nn.Cell:
        from qwen3moe.parallel import shm

        return shm.AllGather(self._group(name), f"{_name(name)} {site}".strip())

    def reduce_scatter(self, name: str | None, site: str = "") -> nn.Cell:
        from qwen3moe.parallel import shm

        return shm.ReduceScatter(self._group(name), f"{_name(name)} {site}".strip())

    def all_to_all(self, name: str | None, site: str = "") -> nn.Cell:
        from qwen3moe.parallel import shm

        return shm.AllToAll(self._group(name), f"{_name(name)} {site}".strip())

    def host_sum(self, name: str | None, site: str = ""):
        from qwen3moe.parallel import shm

        return shm.HostAllReduce(self._group(name), f"{_name(name)} {site}".strip())
