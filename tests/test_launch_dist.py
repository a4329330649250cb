"""Real multi-process runs through `qwen3moe launch` (msrun, MCCL on CPU), each in its own job
with a timeout: data-parallel gradient all-reduce == single-process full-batch gradient."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import HF_FIXTURES, REPO

pytestmark = [pytest.mark.dist]  # in make test: launching real processes is the basic promise


def launch(tmp_path, *cmd: str, timeout: int = 240) -> tuple[int, str, list[dict]]:
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO),
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "qwen3moe.cli", "launch", "--nproc", "2", "--log_dir",
                           str(tmp_path / "logs"), "--timeout", str(timeout - 30), "--", *cmd],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    results = []
    for log in sorted((tmp_path / "logs").glob("worker_*.log")):
        results += [json.loads(line.split("RESULT ", 1)[1]) for line in log.read_text().splitlines()
                    if line.startswith("RESULT ")]
    return proc.returncode, proc.stderr, results


def test_dp2_gradient_allreduce_equals_single_process(tmp_path):
    rc, err, results = launch(tmp_path, "dist-check", "--model", str(HF_FIXTURES / "tiny-fp32-gqa"))
    assert rc == 0, err[-2000:]
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["size"] == 2 for r in results)
    assert max(r["max_abs_diff"] for r in results) < 1e-5  # fp32 sums in a different order


def test_failing_worker_is_reported_not_hung(tmp_path):
    rc, err, _ = launch(tmp_path, "dist-check", "--model", str(tmp_path / "missing"), timeout=150)
    assert rc != 0 and "worker_" in err and "missing" in err
