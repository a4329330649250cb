"""generation/runtime.decode_runtime: MindSpore's graph pipeline off for the process, its
notices on stderr, and the environment variable not left for child processes.

Shapes: none (process level). The pipeline is observed through the CPU time of MindSpore's
`frontend_queue` thread (/proc/self/task/*/stat, clock ticks) over a few hundred calls of a
small compiled graph: with the pipeline on, that thread launches every graph (tens of ticks for
600 calls here); with it off, the calling thread does (0).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO

_SCRIPT = r"""
import glob, json, os, sys
import numpy as np
import mindspore as ms
ms.set_device("CPU")
if sys.argv[1] == "runtime":
    from qwen3moe import decode_runtime
    decode_runtime()
from mindspore import Tensor, nn

class C(nn.Cell):
    @ms.jit
    def construct(self, x):
        for _ in range(20):
            x = x * 1.0001 + 0.5
        return x

def queue_ticks():
    n = 0
    for t in glob.glob("/proc/self/task/*"):
        with open(t + "/comm") as fh:
            if fh.read().strip() != "frontend_queue":
                continue
        with open(t + "/stat") as fh:
            st = fh.read().rsplit(")", 1)[1].split()
        n += int(st[11]) + int(st[12])
    return n

c, x = C(), Tensor(np.ones((256, 256), np.float32))
for _ in range(10):
    c(x).asnumpy()
t0 = queue_ticks()
for _ in range(600):
    c(x).asnumpy()
print(json.dumps({"queue_ticks": queue_ticks() - t0, "env": os.environ.get("MS_DEV_RUNTIME_CONF")}))
"""


def _run(tmp_path, mode: str, **env_extra: str) -> tuple[dict, subprocess.CompletedProcess]:
    script = tmp_path / "probe.py"  # MindSpore compiles a graph from its source file, not from -c
    script.write_text(_SCRIPT, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("MS_DEV_RUNTIME_CONF", "QWEN3MOE_GRAPH_PIPELINE")}
    env.update(GLOG_v="3", PYTHONPATH=str(REPO), **env_extra)
    proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout[:500]  # MindSpore's notices went to stderr
    return json.loads(lines[0]), proc


def test_decode_runtime_turns_the_pipeline_off_and_restores_the_environment(tmp_path):
    default, _ = _run(tmp_path, "default")
    assert default["queue_ticks"] > 0  # MindSpore's default: the queue thread launches the graphs
    out, proc = _run(tmp_path, "runtime")
    assert out["queue_ticks"] == 0
    assert out["env"] is None  # not inherited by child processes
    assert "graph_pipeline:False" in proc.stderr


def test_decode_runtime_keeps_the_users_value(tmp_path):
    out, proc = _run(tmp_path, "runtime", MS_DEV_RUNTIME_CONF="graph_pipeline:True")
    assert out["queue_ticks"] > 0 and out["env"] == "graph_pipeline:True"
    out, _ = _run(tmp_path, "runtime", MS_DEV_RUNTIME_CONF="memory_statistics:False")
    assert out["queue_ticks"] == 0 and out["env"] == "memory_statistics:False"
