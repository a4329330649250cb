"""The shared-memory collectives as MindSpore ops in real processes under msrun
(tests/dist_shm_worker.py): every op inside a compiled graph == NumPy and == MCCL on the same
inputs, on the world group and on a sub-group (4 processes), with jit gradients; a call site
reached by one rank only is a one-line error on every rank within QWEN3MOE_SHM_TIMEOUT, not a
hang; the all-to-all dispatcher == the all-gather dispatcher (dp2 x ep2). The compiled per-rank
forward / gradients and `pretrain --use_parallel` equality tests (tests/test_parallelize.py,
tests/test_dist_parallel.py) run on the default backend, shm on this machine.
Each launch takes 40-120 s on 2 loaded cores: all `slow`."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest

from helpers import HF_FIXTURES, REPO

pytestmark = [pytest.mark.slow, pytest.mark.dist]
WORKER = REPO / "tests" / "dist_shm_worker.py"


def _launch(tmp_path, nproc: int, *args: str, env: dict | None = None, timeout: int = 400):
    from qwen3moe.commands.msrun import launch
    from qwen3moe.parallel import shm

    if not shm.available():
        pytest.skip("no C++ compiler: shared-memory kernels not built")
    saved = dict(os.environ)
    os.environ.update(dict(env or {}), GLOG_v="3", PYTHONPATH=str(REPO),
                      PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    os.environ.pop("QWEN3MOE_COLLECTIVES", None) if not (env or {}).get("QWEN3MOE_COLLECTIVES") else None
    try:
        t0 = time.monotonic()
        rc = launch(nproc, list(args), timeout_s=timeout, script=WORKER, log_dir=str(tmp_path / "logs"))
        wall = time.monotonic() - t0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    logs = {p.name: p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob("worker_*.log"))}
    results = [json.loads(line.split("RESULT ", 1)[1]) for text in logs.values() for line in text.splitlines()
               if line.startswith("RESULT ")]
    return rc, logs, results, wall


def test_ops_in_graphs_equal_numpy_and_mccl_with_gradients(tmp_path):
    """Tolerances: shm sums in member order, as the NumPy reference does: exact (0). MCCL's ring
    adds 4 ranks' values in another order: 1e-6 on values of magnitude ~2-4. Gradients: the
    backward collective (all_reduce <- all_reduce, all_gather <- reduce_scatter, all_to_all <-
    all_to_all) in member order: exact."""
    rc, logs, results, _ = _launch(tmp_path, 4, "ops")
    assert rc == 0, "\n".join(t[-2000:] for t in logs.values())
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]
    assert {r["backend"] for r in results} == {"shm"}
    for r in results:
        for key, e in r["errors"].items():
            assert e["shm_vs_numpy"] == 0.0, (r["rank"], key, e)
            assert e["grad_vs_numpy"] == 0.0, (r["rank"], key, e)
            assert e["mccl_vs_numpy"] <= 1e-6 and e["shm_vs_mccl"] <= 1e-6, (r["rank"], key, e)
    for key in ("world/all_reduce", "parity_0_2/all_reduce"):  # every member holds the same bits
        members = [r for r in results if key in r["digests"]]
        assert len({r["digests"][key] for r in members}) == 1, key


def test_call_site_mismatch_is_a_one_line_error_not_a_hang(tmp_path):
    rc, logs, results, wall = _launch(tmp_path, 2, "mismatch", env={"QWEN3MOE_SHM_TIMEOUT": "10"})
    assert rc != 0 and not results, results
    assert wall < 150, wall
    text = "\n".join(logs.values())
    lines = [ln for ln in text.splitlines() if ln.startswith("qwen3moe shm: error: shared-memory all_reduce at call site")]
    assert lines, text[-3000:]
    assert any("did not arrive within 10 s" in ln or "did not arrive (its process exited)" in ln for ln in lines), lines


def test_all_to_all_dispatcher_equals_all_gather_dispatcher(tmp_path):
    """Same rows meet the same experts and the contributions are added in member order: equal to
    1e-6 (logits, loss) and 1e-6 on gradients (the summed magnitudes are ~1e-1)."""
    rc, logs, results, _ = _launch(tmp_path, 2, "dispatch", str(HF_FIXTURES / "tiny-fp32-gqa"))
    assert rc == 0, "\n".join(t[-2000:] for t in logs.values())
    assert len(results) == 2 and {r["backend"] for r in results} == {"shm"}
    for r in results:
        ag, a2a = r["allgather"], r["alltoall"]
        np.testing.assert_allclose(a2a["logits"], ag["logits"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(a2a["loss"], ag["loss"], rtol=1e-6)
        assert a2a["grads"].keys() == ag["grads"].keys()
        for name in ag["grads"]:
            np.testing.assert_allclose(a2a["grads"][name], ag["grads"][name], rtol=1e-6, atol=1e-6, err_msg=name)
