"""Shared benchmark helpers: the bench-mini HF folder, subprocess runs, FLOP counts.

Both sides run in their own subprocess with 2 threads so RSS and thread pools don't mix.
The HF side needs a Python with torch 2.13 + transformers 5.24 (the `reference` extra):
QWEN3MOE_REF_PYTHON, else .venv-ref/bin/python.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "bench" / "configs" / "bench-mini"
CACHE = Path(os.environ.get("QWEN3MOE_BENCH_CACHE", "/tmp/qwen3moe-bench"))
THREADS = "2"


def ref_python() -> str:
    py = os.environ.get("QWEN3MOE_REF_PYTHON") or str(REPO / ".venv-ref" / "bin" / "python")
    if not Path(py).exists():
        sys.exit(f"bench: no reference python at {py} (pip install -e '.[reference]' into .venv-ref "
                 "or set QWEN3MOE_REF_PYTHON)")
    return py


def bench_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS, GLOG_v="3",
               PYTHONPATH=str(REPO))
    return env


def generation_runtime() -> str:
    """A worker that generates: set_device("CPU"), then the runtime `qwen3moe generate` runs
    (generation/runtime.decode_runtime: MindSpore's graph pipeline off, before its first op), so
    the bench measures what the CLI runs. QWEN3MOE_GRAPH_PIPELINE=on keeps MindSpore's default
    (A/B). Returns the setting, for the report."""
    import mindspore as ms

    from qwen3moe.generation.runtime import decode_runtime

    ms.set_device("CPU")
    decode_runtime()
    return os.environ.get("MS_DEV_RUNTIME_CONF", "MindSpore default (graph pipeline on)")


def ensure_bench_folder(seed: int = 0) -> Path:
    """bench-mini with random fp32 weights (init std as HF), written once."""
    out = CACHE / "bench-mini"
    if (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file():
        return out
    code = (
        "from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM\n"
        "from qwen3moe.layers.dtypes import set_init_seed\n"
        f"set_init_seed({seed})\n"
        f"m = Qwen3MoeForCausalLM(Qwen3MoeConfig.from_pretrained({str(CONFIG_DIR)!r}))\n"
        f"m.save_pretrained({str(out)!r}, dtype='float32', max_shard_size='10GB')\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=bench_env())
    for f in ("generation_config.json",):
        (out / f).write_bytes((CONFIG_DIR / f).read_bytes())
    return out


def run_json(python: str, script: str, args: list[str]) -> dict:
    """Run a worker script, return the JSON object on its last stdout line."""
    proc = subprocess.run([python, script, *args], capture_output=True, text=True, env=bench_env())
    if proc.returncode != 0:
        sys.exit(f"bench worker {Path(script).name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_result(script: str, args: list[str], timeout: int = 1800) -> tuple[dict | None, str]:
    """Run `python script args` in a fresh process (this interpreter), whose result is the JSON
    after "RESULT " on a stdout line: (result, "") or (None, why). A sweep's big configuration
    may fail (e.g. out of memory) without ending the sweep."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout)
    m = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    if m is None:
        return None, f"failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}"
    return json.loads(m.group(1)), ""


def forward_flops(cfg: dict, batch: int, seq: int) -> float:
    """Matmul FLOPs of one causal forward (2 per MAC): active projections + causal attention."""
    H, D, N, K = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E, k, I, V, L = (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
                     cfg["vocab_size"], cfg["num_hidden_layers"])
    per_tok_layer = 2 * (H * D * (2 * N + 2 * K) + H * E + k * 3 * H * I)
    attn_per_seq_layer = 2 * 2 * N * D * seq * (seq + 1) / 2  # QK^T and PV over the causal triangle
    tokens = batch * seq
    return L * (tokens * per_tok_layer + batch * attn_per_seq_layer) + tokens * 2 * H * V


def load_kwargs(mode: dict) -> dict:
    """A bench mode's from_pretrained keyword arguments: `activations` (with `quantization`, an
    optional `group_size` and `lm_head_bits`) becomes a QuantizationConfig, the rest passes through
    (`activations` alone: a GPTQ folder's, from_pretrained(q, activations=...))."""
    kw = dict(mode)
    if "activations" in kw and "quantization" in kw:
        from qwen3moe.layers.quant import QuantizationConfig

        kw["quantization"] = QuantizationConfig.from_name(kw.pop("quantization"), kw.pop("group_size", None),
                                                          kw.pop("activations"), kw.pop("lm_head_bits", 8))
    return kw
