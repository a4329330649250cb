"""Latency of the collectives inside a compiled graph, 2 real processes under `qwen3moe launch`:
MCCL (parallel/backend.py MCCLBackend: AllReduce / AllGather native, reduce_scatter and
all_to_all emulated with AllReduce) against the shared-memory backend (parallel/shm.py) when
its kernels are built, world group, per message size, with the ratio shm / MCCL.

    .venv/bin/python bench/collectives.py [--reps 20] [--max-mib 16] [--ops all_reduce,all_gather,...]

Each size is one ms.jit graph holding one collective of a float32 message of that many bytes;
time = median wall time of `reps` calls after 3 warm-up calls (each call ends with the output's
asnumpy, which waits for the graph). The slowest rank's median is reported. Also printed per rank:
its OS threads, MindSpore's runtime_num_threads and OpenMP's thread count (oversubscription of the
2 cores by 2 ranks). Nothing is written to bench/RESULTS.md: copy the table with the command and load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = [4 << (2 * i) for i in range(13)]  # 4 B, 16 B, 64 B, ... 16 MiB (x4 steps)


def _threads() -> dict:
    import ctypes

    import mindspore as ms

    try:
        omp = ctypes.CDLL("libgomp.so.1").omp_get_max_threads()
    except OSError:
        omp = None
    return {"os_threads": len(os.listdir("/proc/self/task")), "runtime_num_threads":
            ms.get_context("runtime_num_threads"), "omp_max_threads": omp,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _ops(kind: str, kinds: list[str]):
    """name -> Cell factory on the world group (parallel/backend.py; MCCL on CPU has AllReduce and
    AllGather natively, reduce_scatter / all_to_all are its AllReduce-based emulations)."""
    from qwen3moe.parallel import backend

    be = backend.MCCLBackend() if kind == "mccl" else backend.ShmBackend()
    return {k: (lambda k=k: getattr(be, k)(None, "bench")) for k in kinds}


def _compiled(op):
    import mindspore as ms

    @ms.jit
    def call(x):
        return op(x)

    return call


def worker(a) -> None:
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor
    from mindspore.communication import get_group_size, get_rank, init

    ms.set_device("CPU")
    init()
    rank, world = get_rank(), get_group_size()

    from qwen3moe.parallel import shm

    backends = ["mccl"] + (["shm"] if shm.setup() else [])
    out = {"rank": rank, "threads": _threads(), "times": {}, "checks": {}}
    for backend in backends:
        for kind, make in _ops(backend, a.ops.split(",")).items():
            for size in [s for s in SIZES if s <= a.max_mib << 20]:
                n = max(size // 4, world)
                n -= n % world
                x = Tensor(np.full(n, rank + 1, np.float32))
                g = _compiled(make())
                for _ in range(3):
                    y = g(x).asnumpy()
                out["checks"][f"{backend}/{kind}/{size}"] = float(y.astype(np.float64).sum())
                ts = []
                for _ in range(a.reps):
                    t0 = time.perf_counter()
                    g(x).asnumpy()
                    ts.append(time.perf_counter() - t0)
                out["times"][f"{backend}/{kind}/{size}"] = statistics.median(ts)
    out["threads_after"] = _threads()["os_threads"]
    print("RESULT " + json.dumps(out), flush=True)


def _fmt(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB" if size >= 1 << 10 else f"{size} B"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank-worker", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--max-mib", type=int, default=16)
    ap.add_argument("--ops", default="all_reduce,all_gather,reduce_scatter,all_to_all")
    a = ap.parse_args()
    if a.rank_worker:
        worker(a)
        return
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("PYTHONPATH", str(REPO))
    from qwen3moe.commands.msrun import launch

    with tempfile.TemporaryDirectory() as tmp:
        rc = launch(2, ["--rank-worker", "--reps", str(a.reps), "--max-mib", str(a.max_mib), "--ops", a.ops],
                    timeout_s=1200, script=Path(__file__).resolve(), log_dir=f"{tmp}/logs")
        res = [json.loads(line.split("RESULT ", 1)[1]) for log in sorted(Path(tmp, "logs").glob("worker_*.log"))
               for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    if rc != 0 or len(res) != 2:
        sys.exit(f"bench: the 2-process run failed (exit {rc})")
    load = os.getloadavg()[0]
    for r in res:
        print(f"rank {r['rank']}: {r['threads']} (after the runs: {r['threads_after']} OS threads)")
    print(f"median ms per call, slowest of 2 ranks (1-min load {load:.1f}); ratio = shm / MCCL")
    keys = res[0]["times"].keys()
    rows = sorted({tuple(k.split("/")[1:]) for k in keys}, key=lambda t: (t[0], int(t[1])))
    print(f"  {'op':<15}{'bytes':>9}{'MCCL ms':>10}{'shm ms':>10}{'ratio':>8}")
    for kind, size in rows:
        t = {b: max(r["times"].get(f"{b}/{kind}/{size}", float("nan")) for r in res) for b in ("mccl", "shm")}
        ratio = t["shm"] / t["mccl"] if t["mccl"] == t["mccl"] else float("nan")
        print(f"  {kind:<15}{_fmt(int(size)):>9}{t['mccl'] * 1e3:>10.3f}{t['shm'] * 1e3:>10.3f}{ratio:>8.3f}")


if __name__ == "__main__":
    main()
