"""parallel/cores.py: the local ranks' disjoint core blocks, the binding of threads that already
run (MindSpore's start at init, before the binding), the env switch, and the launcher's export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3moe.commands.msrun import job_env
from qwen3moe.parallel import cores

needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity here")


def test_blocks_are_disjoint_and_cover_the_cores():
    for n_cores in range(1, 9):
        cpus = [3 * c + 1 for c in range(n_cores)]  # not 0..n-1: an affinity mask can be any set
        for workers in range(1, n_cores + 1):
            blocks = [cores.core_block(cpus[::-1], r, workers) for r in range(workers)]
            assert all(blocks), (n_cores, workers)
            assert sorted(c for b in blocks for c in b) == cpus  # disjoint, all of them, each once
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
            assert all(b == sorted(b) for b in blocks)


def test_no_block_without_one_core_per_worker_or_out_of_range():
    assert cores.core_block([0, 1], 0, 3) == []
    assert cores.core_block([0, 1], 2, 2) == []
    assert cores.core_block([0, 1], -1, 2) == []
    assert cores.core_block([0, 1], 1, 2) == [1]


_CHILD = """
import json, os, sys, threading
from qwen3moe.parallel import cores
ready, stop = threading.Event(), threading.Event()
def worker():
    ready.set(); stop.wait()
t = threading.Thread(target=worker); t.start(); ready.wait()
bound = cores.bind_local_rank()
late = {}
u = threading.Thread(target=lambda: late.update(cpus=sorted(os.sched_getaffinity(0)))); u.start(); u.join()
out = {"bound": bound, "main": sorted(os.sched_getaffinity(0)), "early": sorted(os.sched_getaffinity(t.native_id)),
       "late": late["cpus"]}
stop.set(); t.join()
print(json.dumps(out))
"""


def _child(**env) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in (cores.ENV, cores.LOCAL_WORKERS_ENV, "DEVICE_ID")}
    full["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)  # this checkout's qwen3moe
    p = subprocess.run([sys.executable, "-c", _CHILD], env=dict(full, **env), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@needs_affinity
def test_every_thread_is_bound_also_one_started_before():
    cpus = sorted(os.sched_getaffinity(0))
    workers = len(cpus)  # one core each: the last local rank gets the last core
    got = _child(**{cores.LOCAL_WORKERS_ENV: str(workers), "DEVICE_ID": str(workers - 1)})
    want = [cpus[-1]]
    assert got["bound"] == want
    assert got["main"] == want and got["early"] == want and got["late"] == want


@needs_affinity
def test_off_unlaunched_and_too_few_cores_leave_threads_unbound():
    cpus = sorted(os.sched_getaffinity(0))
    for env in ({cores.ENV: "off", cores.LOCAL_WORKERS_ENV: "1", "DEVICE_ID": "0"},
                {"DEVICE_ID": "0"},  # not started by qwen3moe launch
                {cores.LOCAL_WORKERS_ENV: str(len(cpus) + 1), "DEVICE_ID": "0"}):
        got = _child(**env)
        assert got["bound"] == [] and got["early"] == cpus and got["main"] == cpus, env


def test_bad_values_are_one_line_errors(monkeypatch):
    monkeypatch.setenv(cores.ENV, "yes")
    with pytest.raises(cores.BindError, match="QWEN3MOE_BIND_CORES='yes': expected one of auto, off"):
        cores.bind_local_rank()
    monkeypatch.setenv(cores.ENV, "auto")
    monkeypatch.setenv(cores.LOCAL_WORKERS_ENV, "two")
    monkeypatch.setenv("DEVICE_ID", "0")
    with pytest.raises(cores.BindError, match="QWEN3MOE_LOCAL_WORKERS='two'"):
        cores.bind_local_rank()


def test_the_launcher_exports_the_local_worker_count():
    env = job_env(3, "m")
    assert env[cores.LOCAL_WORKERS_ENV] == "3"
