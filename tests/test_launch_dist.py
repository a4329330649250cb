"""Real multi-process runs through `qwen3moe launch` (msrun, MCCL on CPU), each in its own job
with a timeout: data-parallel gradient all-reduce == single-process full-batch gradient."""
from __future__ import annotations

import pytest

from helpers import HF_FIXTURES, launch

pytestmark = [pytest.mark.dist]  # in make test: launching real processes is the basic promise


def test_dp2_gradient_allreduce_equals_single_process(tmp_path):
    rc, err, results = launch(tmp_path, "dist-check", "--model", str(HF_FIXTURES / "tiny-fp32-gqa"))
    assert rc == 0, err[-2000:]
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["size"] == 2 for r in results)
    assert max(r["max_abs_diff"] for r in results) < 1e-5  # fp32 sums in a different order


def test_failing_worker_is_reported_not_hung(tmp_path):
    rc, err, _ = launch(tmp_path, "dist-check", "--model", str(tmp_path / "missing"), timeout=150)
    assert rc != 0 and "worker_" in err and "missing" in err
