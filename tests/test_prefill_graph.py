"""The compiled prefill step holds no Transpose: in a MindSpore 2.10 CPU graph a Transpose keeps
its input (and what is computed from its output) allocated until the graph ends, so one in each
decoder layer made a 48-layer prefill keep every layer's activations (+329 MB per layer at 512
tokens, bench/RESULTS.md "Generation memory at 48 layers"); tests/test_norm_rope_kernel.py checks
the replacement copy releases its buffers. Here: the fused engine's prefill graph of a bf16-stored
model (bf16 norm weights are what sent q/k through the composite norm + transpose + RoPE), read
from MindSpore's saved final kernel graph in a fresh process (save_graphs is process-wide).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qwen3moe.kernels import norm_rope as nrk
from helpers import HF_FIXTURES, REPO

pytestmark = pytest.mark.skipif(not nrk.available(), reason="kernels not buildable here")

_SCRIPT = """
import sys
import numpy as np
import mindspore as ms
ms.set_device("CPU")
ms.set_context(save_graphs=True, save_graphs_path=sys.argv[2])
from qwen3moe import Qwen3MoeForCausalLM
from qwen3moe.generation.engine import DecodeEngine
model = Qwen3MoeForCausalLM.from_pretrained(sys.argv[1], dtype="bfloat16")
engine = DecodeEngine(model, 1, 64)
assert engine.fused, "the fused step did not apply"
ids = np.arange(5, 21)[None]
engine.prefill(ids, np.ones_like(ids))
"""


def test_fused_prefill_graph_has_no_transpose(tmp_path):
    script, graphs = tmp_path / "prefill.py", tmp_path / "graphs"
    script.write_text(_SCRIPT)  # MindSpore compiles only code it can read from a file
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(script), str(HF_FIXTURES / "tiny-fused"), str(graphs)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    finals = sorted(graphs.glob("*final_graph*.ir"))
    assert finals, f"no final kernel graph saved in {graphs}: {sorted(p.name for p in graphs.iterdir())[:20]}"
    text = "".join(p.read_text() for p in finals)
    assert "Custom(" in text and "TopK(" in text, "the saved graph is not the prefill step"
    assert "Transpose" not in text, f"{text.count('Transpose')} Transpose mentions in the prefill graph"
