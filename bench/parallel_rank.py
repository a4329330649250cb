"""parallel/parallelize.py alone (no optimizer, no data pipeline; bench/parallel.py runs the
commands) on 2 processes vs one process, same run: compiled forward and
compiled forward + backward (LossGrad: lm + coef * aux, gradients before any sync).

    .venv/bin/python bench/parallel_rank.py [--model tiny|bench-mini] [--batch 8 --seq 128 --steps 5]
                                       [--layouts tp2,dp2ep2]

Both sides use the same 2 cores (OMP_NUM_THREADS=2 per process, as bench/common.py); each rank
of a layout takes its dp rank's rows of the global batch. Prints median seconds and the ratio
parallel / one process (the slowest rank); issue 17's target for a training step is <= 2x.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, REPO, bench_env, ensure_bench_folder, run_json  # noqa: E402

LAYOUTS = {"tp2": ["--tp", "2"], "dp2ep2": ["--dp", "2", "--ep", "2"], "dp2": ["--dp", "2"]}


def tiny_folder() -> Path:
    out = CACHE / "tiny-parallel"
    if not (out / "model.safetensors").is_file():
        code = ("from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM\n"
                "from qwen3moe.layers.dtypes import set_init_seed\n"
                "set_init_seed(0)\n"
                f"Qwen3MoeForCausalLM(Qwen3MoeConfig.from_preset('tiny')).save_pretrained({str(out)!r})\n")
        subprocess.run([sys.executable, "-c", code], check=True, env=bench_env())
    return out


def run_parallel(folder: Path, layout: list[str], batch: int, seq: int, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "qwen3moe.cli", "launch", "--nproc", "2", "--log_dir", f"{tmp}/logs",
               "--timeout", "900", "--", "dist-parallel", "--model", str(folder), "--mode", "forward",
               "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--out", tmp, *layout]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=bench_env(), cwd=tmp)
        if proc.returncode != 0:
            sys.exit(f"bench: parallel run {layout} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(line.split("RESULT ", 1)[1]) for log in sorted(Path(tmp, "logs").glob("worker_*.log"))
                for line in log.read_text().splitlines() if line.startswith("RESULT ")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "bench-mini"], default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layouts", default="tp2,dp2ep2")
    a = ap.parse_args()
    folder = tiny_folder() if a.model == "tiny" else ensure_bench_folder()
    one = run_json(sys.executable, str(REPO / "bench" / "_parallel_single.py"),
                   [str(folder), str(a.batch), str(a.seq), str(a.steps)])
    print(f"{a.model} {a.batch}x{a.seq}, median of {a.steps} compiled calls (s); ratio = slowest rank / one process")
    print(f"  one process  forward {one['forward_s']:.4f}  fwd+bwd {one['grad_s']:.4f}")
    for name in a.layouts.split(","):
        res = run_parallel(folder, LAYOUTS[name], a.batch, a.seq, a.steps)
        fwd = max(r["forward_s"] for r in res)
        line = f"  {name:<11}  forward {fwd:.4f} ({fwd / one['forward_s']:.2f}x)"
        for key, what in (("grad_s", "fwd+bwd"), ("vgrad_s", "fwd+bwd vocab-split")):
            if all(r.get(key) for r in res):
                g = max(r[key] for r in res)
                line += f"  {what} {g:.4f} ({g / one['grad_s']:.2f}x)"
        print(line)


if __name__ == "__main__":
    main()
