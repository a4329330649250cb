"""Point-to-point messages between the pipeline stages of one rank's pipeline (pipeline_generate.py;
pipeline_step.py's training with `both_ways`: activations forward, gradients back).

Two transports with one interface (`send(x, stage)`, `recv(shape, stage) -> float32 ndarray`,
`settle(keep)`, `close()`):
  - `MsLink`: MindSpore's isend / recv (process.py's patch); works across hosts, but on CPU
    (MCCL over TCP) each message costs ~25 ms of latency, more than a decode step;
  - `FifoLink`: one named pipe per directed pair of stages on this host (kernel-buffered, a
    blocking read wakes on the write: tens of microseconds). Used when every process runs on
    this host (the scheduler address is a loopback one, as `qwen3moe launch` starts them).
Messages are float32 arrays whose shape the receiver knows (the stages run the same schedule);
each carries its byte count, checked on receipt. Order per channel is the send order.
"""
from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import numpy as np

from qwen3moe.parallel.mesh import MeshError

_F_SETPIPE_SZ = 1031  # linux/fcntl.h: a pipe buffer large enough for a decode step's hidden states
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _host(x) -> np.ndarray:
    return np.ascontiguousarray(x.asnumpy() if hasattr(x, "asnumpy") else x, np.float32)


class MsLink:
    """MindSpore isend / recv to the stages of `ranks` (this rank's pipeline, by stage)."""

    def __init__(self, ranks: list[int]) -> None:
        self.ranks, self.pending = ranks, []

    def send(self, x, stage: int) -> None:
        from mindspore import Tensor, mint

        t = Tensor(_host(x))
        self.pending.append((mint.distributed.isend(t, dst=self.ranks[stage]), t))

    def recv(self, shape: tuple, stage: int) -> np.ndarray:
        import mindspore as ms
        from mindspore import mint, ops

        buf = ops.zeros(shape, ms.float32)
        mint.distributed.recv(buf, src=self.ranks[stage])
        return buf.asnumpy()

    def settle(self, keep: int = 0) -> None:
        """Wait for all but the `keep` latest sends (waiting for the current round's would hold
        a stage until the other has received them, undoing the overlap)."""
        n = max(len(self.pending) - keep, 0)
        done, self.pending = self.pending[:n], self.pending[n:]
        for handle, _ in done:
            if handle is not None:
                handle.wait()

    def close(self) -> None:
        self.settle()


class FifoLink:
    """Named pipes between this rank and the other stages of its pipeline (same host)."""

    def __init__(self, ranks: list[int], me: int, folder: Path, barrier, both_ways: bool = False) -> None:
        pp, s = len(ranks), ranks.index(me)
        neighbours = [t for t in (s - 1, s + 1) if 0 <= t < pp]
        if both_ways:  # training: hidden states s -> s + 1, their gradients s + 1 -> s
            ins, outs = neighbours, neighbours
        else:  # generation: hidden states s -> s + 1, tokens last -> every other stage
            ins = ([s - 1] if s > 0 else []) + ([pp - 1] if s < pp - 1 else [])
            outs = [s + 1] if s < pp - 1 else list(range(pp - 1))
        folder.mkdir(parents=True, exist_ok=True)
        path = lambda a, b: folder / f"{ranks[a]}-{ranks[b]}"  # noqa: E731  (src rank - dst rank)
        for p in [path(a, s) for a in ins] + [path(s, b) for b in outs]:
            try:
                os.mkfifo(p, 0o600)
            except FileExistsError:
                pass
        # every process opens its read ends (non-blocking: no writer needed) before its write
        # ends, so no open waits on one that waits on it
        self.rd = {a: os.open(path(a, s), os.O_RDONLY | os.O_NONBLOCK) for a in ins}
        self.wr = {b: os.open(path(s, b), os.O_WRONLY) for b in outs}
        for fd in self.rd.values():
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        for fd in self.wr.values():
            try:
                fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)
            except OSError:  # above /proc/sys/fs/pipe-max-size: the default buffer still works
                pass
        # a read before the writer opened its end would see end-of-file: wait until every stage
        # holds all its ends, then the names can go (a failed run leaves none behind)
        barrier()
        for p in [path(a, s) for a in ins]:
            p.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:  # another stage's names are still there: it removes the folder
            pass

    def send(self, x, stage: int) -> None:
        data = _host(x).tobytes()
        view = memoryview(struct.pack("<q", len(data)) + data)
        while view:
            view = view[os.write(self.wr[stage], view):]

    def recv(self, shape: tuple, stage: int) -> np.ndarray:
        want = int(np.prod(shape)) * 4
        got = struct.unpack("<q", self._read(self.rd[stage], 8))[0]
        if got != want:
            raise MeshError(f"pipeline message from stage {stage}: {got} bytes where {shape} float32 "
                            f"({want} bytes) was expected (the stages' schedules differ)")
        return np.frombuffer(self._read(self.rd[stage], want), np.float32).reshape(shape)

    @staticmethod
    def _read(fd: int, n: int) -> bytes:
        parts, left = [], n
        while left:
            chunk = os.read(fd, left)
            if not chunk:
                raise MeshError("pipeline message: the other stage closed its end (it failed; see its log)")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def settle(self, keep: int = 0) -> None:
        """Writes are complete when `send` returns."""

    def close(self) -> None:
        for fd in (*self.rd.values(), *self.wr.values()):
            os.close(fd)
        self.rd, self.wr = {}, {}


def stage_link(coll, rank: int, both_ways: bool = False):
    """The fastest transport for this rank's pipeline: FifoLink when every process runs on this
    host (QWEN3MOE_P2P=mccl forces MsLink), else MsLink. `both_ways`: channels to both
    neighbouring stages (training) instead of generation's ring."""
    host, port = os.environ.get("MS_SCHED_HOST", ""), os.environ.get("MS_SCHED_PORT", "")
    if os.environ.get("QWEN3MOE_P2P", "") != "mccl" and host in _LOOPBACK and port:
        from mindspore import Tensor

        folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"qwen3moe-p2p-{port}"
        return FifoLink(coll.pp_ranks, rank, folder, lambda: coll.pp_sum(Tensor(np.zeros(1, np.float32))).asnumpy(),
                        both_ways)
    return MsLink(coll.pp_ranks)
