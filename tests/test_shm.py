"""The shared-memory collectives' protocol (kernels/csrc/shm_comm.cc through parallel/shm.py's
ctypes entry), between forked plain processes, no MindSpore communication: every op == NumPy on
the same inputs, bit-identical on every rank (sums in member order), messages larger than a slot
(chunked), a sub-group, and the failure paths (a rank that does not arrive, a call site reached
with another size, a rank that exits) give a one-line error naming the op, call site and rank
within the timeout instead of a hang. ~3 s. The MindSpore kernels and backward rules under
`qwen3moe launch`: tests/test_shm_dist.py (slow)."""
from __future__ import annotations

import multiprocessing as mp
import os
import re

import numpy as np
import pytest

from qwen3moe.parallel import backend, shm

pytestmark = pytest.mark.skipif(not shm.available(), reason="no C++ compiler: shared-memory kernels not built")
SIZES = [0, 1, 7, 1000, (1 << 20) + 5]  # elements per rank block; the last: messages > the 4 MiB slot


def _inputs(rank: int, n: int, world: int) -> np.ndarray:
    return np.random.default_rng(1000 * n + rank).standard_normal(n * world).astype(np.float32)


def _worker(fn, rank, world, name, q):
    try:
        shm.open_segment(name, world, rank, create=False)
        q.put((rank, fn(rank, world)))
    except Exception as e:  # noqa: BLE001 - the parent asserts on the message
        q.put((rank, e))


def _run(fn, world: int, timeout: float = 60.0, env: dict | None = None, results: int | None = None) -> dict:
    """fn(rank, world) in `world` forked processes sharing one segment: {rank: result or exception}
    of the first `results` (default: all) ranks to report."""
    name = f"/qwen3moe-test-{os.getpid()}-{np.random.randint(1 << 30)}"
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        shm.open_segment(name, world, 0, create=True)  # the parent creates; children attach
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(fn, r, world, name, q)) for r in range(world)]
        for p in procs:
            p.start()
        out = dict(q.get(timeout=timeout) for _ in range(results or world))
        for p in procs:
            p.join(timeout)
        return out
    finally:
        shm.unlink(name)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _all_ops(rank, world):
    g = shm.Group(range(world), rank)
    res = {}
    for n in SIZES:
        x = _inputs(rank, n, world)
        res[n] = [shm.run(op, g, t, x) for t, op in enumerate(shm.OPS, start=1)]
    return res


@pytest.mark.parametrize("world", [2, 3])
def test_ops_equal_numpy_and_identical_on_every_rank(world):
    got = _run(_all_ops, world)
    assert not any(isinstance(v, Exception) for v in got.values()), got
    for n in SIZES:
        xs = [_inputs(r, n, world) for r in range(world)]
        total = xs[0].copy()
        for x in xs[1:]:  # member order, as every rank adds
            total += x
        for r in range(world):
            ar, ag, rs, a2a = got[r][n]
            np.testing.assert_array_equal(ar, total)  # bit-identical: the same additions everywhere
            np.testing.assert_array_equal(ag, np.concatenate(xs))
            np.testing.assert_array_equal(rs, np.split(total, world)[r] if n else total)
            np.testing.assert_array_equal(a2a, np.concatenate([np.split(x, world)[r] for x in xs])
                                          if n else total)


def _subgroups(rank, world):
    """World 4: pairs {0, 2} and {1, 3} (a dp-like group) at the same time as {0, 1} / {2, 3}."""
    a = shm.Group([rank % 2, rank % 2 + 2], rank)
    b = shm.Group([rank // 2 * 2, rank // 2 * 2 + 1], rank)
    x = np.full(5, rank + 1, np.float32)
    return shm.run("all_reduce", a, 1, x), shm.run("all_gather", b, 1, x)


def test_subgroups():
    got = _run(_subgroups, 4)
    assert not any(isinstance(v, Exception) for v in got.values()), got
    for r in range(4):
        np.testing.assert_array_equal(got[r][0], np.full(5, (r % 2 + 1) + (r % 2 + 3), np.float32))
        lo = r // 2 * 2
        np.testing.assert_array_equal(got[r][1], np.repeat([lo + 1, lo + 2], 5).astype(np.float32))


def _split_phase(rank, world):
    """HostAllReduce.start: 3 calls of one call site, each with another op run while it is in
    flight (as generation runs a decode step between a rows-done count's two halves)."""
    g = shm.Group(range(world), rank)
    done = shm.HostAllReduce(g, "rows done")
    out = []
    for k in range(3):
        finish = done.start(np.array([rank + k, 1.0], np.float32))
        between = shm.run("all_gather", g, 100 + k, np.full(2, rank * 10 + k, np.float32))
        out.append((finish(), between))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_host_all_reduce_in_two_halves(world):
    got = _run(_split_phase, world)
    assert not any(isinstance(v, Exception) for v in got.values()), got
    for r in range(world):
        for k, (total, between) in enumerate(got[r]):
            np.testing.assert_array_equal(total, [sum(range(world)) + world * k, world])
            np.testing.assert_array_equal(between, np.repeat([q * 10 + k for q in range(world)], 2))


def _other_site(rank, world):
    return shm.run("all_reduce", shm.Group(range(world), rank), 7 if rank == 0 else 8, np.ones(3, np.float32))


def _other_size(rank, world):
    return shm.run("all_gather", shm.Group(range(world), rank), 9, np.ones(3 + rank, np.float32))


def _exits(rank, world):
    if rank == 1:
        os._exit(0)
    return shm.run("all_reduce", shm.Group(range(world), rank), 10, np.ones(3, np.float32))


def test_failures_are_one_line_errors_not_hangs():
    env = {shm.TIMEOUT_ENV: "2"}
    got = _run(_other_site, 2, env=env)
    assert all(isinstance(e, shm.CollectivesError) for e in got.values()), got
    msg = str(got[0])
    assert "\n" not in msg and re.search(r"all_reduce at call site 'tag 7' \(rank 0\): rank 1 did not arrive "
                                         r"within 2 s", msg), msg
    got = _run(_other_size, 2, env=env)
    assert any("sent" in str(e) and "bytes" in str(e) for e in got.values()), got
    got = _run(_exits, 2, env={shm.TIMEOUT_ENV: "60"}, results=1)
    assert isinstance(got[0], shm.CollectivesError) and "rank 1 did not arrive (its process exited)" in str(got[0]), got


def test_bad_settings_are_one_line_errors(monkeypatch):
    monkeypatch.setenv(backend.ENV, "nccl")
    with pytest.raises(shm.CollectivesError, match="QWEN3MOE_COLLECTIVES='nccl': expected one of auto, shm, mccl"):
        backend.choice()
    monkeypatch.setenv(shm.TIMEOUT_ENV, "0")
    with pytest.raises(shm.CollectivesError, match="QWEN3MOE_SHM_TIMEOUT='0'"):
        shm.timeout_s()
    monkeypatch.setenv(shm.SLOT_ENV, "x")
    with pytest.raises(shm.CollectivesError, match="QWEN3MOE_SHM_SLOT_MIB='x'"):
        shm.slot_bytes()
