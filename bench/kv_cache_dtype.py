"""Decode after a long prompt with a float32 vs 16-bit KV cache (GenerationConfig.kv_cache_dtype).

    PYTHONPATH=. OMP_WAIT_POLICY=PASSIVE python bench/kv_cache_dtype.py --lengths 4096,8192 \
        --dtypes float32,bfloat16 [--repeats 2] [--runs 2] [--new 32] [--llama]

Each (length, cache dtype) runs in a fresh process, the dtypes alternating, `--repeats` times:
load /work/data/synth-2l (int4 g128), one untimed generate of a random `length`-token prompt with
`--new` new tokens (compiles the prefill-chunk and decode graphs; prefill_chunk_size default),
then `--runs` timed ones (batch 1, greedy, ignore_eos). Prints prefill tok/s, decode tok/s
(decode steps / decode wall seconds, host sampling included; and per CPU second of the process,
all threads: steadier than wall time on a shared machine), the process's peak RSS (ru_maxrss,
KiB / 1e6 as "GB"), the engine's cache bytes and the 1-min load. --llama runs llama-bench
tg`new` at depths `lengths` on the Q4_K_M GGUF (2 threads; f16 cache, its default) in the same
run and prints our decode / llama.cpp ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import time

from common import worker_result
from long_prompt import GGUF, LLAMA_BENCH, _cpu_s


def worker(folder: str, length: int, kv: str, new: int, runs: int) -> dict:
    import mindspore as ms
    import numpy as np

    ms.set_device("CPU")
    import qwen3moe
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.generation.engine import cache_bytes
    from qwen3moe.generation.generate import GenerationRun, resolve_config

    qwen3moe.decode_runtime()
    model = Qwen3MoeForCausalLM.from_pretrained(folder, quantization="int4", group_size=128)
    ids = np.random.default_rng(0).integers(0, 151643, (1, length))
    cfg = resolve_config(model, max_new_tokens=new, ignore_eos=True, do_sample=False, kv_cache_dtype=kv,
                         prompt_cache=False)
    prefill, decode, decode_cpu = [], [], []
    for i in range(runs + 1):  # the first compiles
        run = GenerationRun(model, ids, None, cfg)
        steps = run.steps()
        next(steps)  # the prefill and the first token
        c0 = _cpu_s()
        for _ in steps:
            pass
        if i:
            prefill.append(length / run.stats.prefill_s)
            decode.append(run.stats.decode_steps / run.stats.decode_s)
            decode_cpu.append(run.stats.decode_steps / (_cpu_s() - c0))
    return {"length": length, "kv": kv, "prefill_tok_s": prefill, "decode_tok_s": decode,
            "decode_cpu_tok_s": decode_cpu,
            "cache_bytes": cache_bytes(model, 1, run.engine.slots, kv),
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def llama_tg(depths: list[int], new: int) -> dict[int, float]:
    """llama-bench decode tok/s (tg`new`) after `depth` prompt tokens, 2 threads, 2 repetitions."""
    out = subprocess.run([LLAMA_BENCH, "-m", GGUF, "-t", "2", "-p", "0", "-n", str(new),
                          "-d", ",".join(map(str, depths)), "-r", "2", "-o", "json"],
                         capture_output=True, text=True, timeout=3600, check=True)
    return {int(r["n_depth"]): float(r["avg_ts"]) for r in json.loads(out.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="/work/data/synth-2l")
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--llama", action="store_true", help="llama-bench tg at the same depths in the same run")
    ap.add_argument("--worker", nargs=2, metavar=("LENGTH", "DTYPE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        res = worker(a.folder, int(a.worker[0]), a.worker[1], a.new, a.runs)
        print("RESULT " + json.dumps(res), flush=True)
        return
    lengths, dtypes = [int(x) for x in a.lengths.split(",")], a.dtypes.split(",")
    anchor = llama_tg(lengths, a.new) if a.llama else {}
    print(f"load {os.getloadavg()[0]:.2f}; llama.cpp tg{a.new} tok/s by depth {anchor}", flush=True)
    print("length kv        prefill tok/s   decode tok/s   decode tok/CPU-s  cache MB  peak GB  load1  decode/llama")
    for length in lengths:
        for rep in range(a.repeats):
            for kv in (dtypes if rep % 2 == 0 else dtypes[::-1]):  # alternate the order
                t0 = time.time()
                r, why = worker_result(__file__, ["--folder", a.folder, "--new", str(a.new), "--runs", str(a.runs),
                                                  "--worker", str(length), kv])
                if r is None:
                    print(f"{length:6d} {kv:9s} {why}")
                    continue
                best = max(r["decode_tok_s"])
                ratio = f"{best / anchor[length]:.2f}x" if length in anchor else "-"
                pre = " ".join(f"{x:.0f}" for x in r["prefill_tok_s"])
                dec = " ".join(f"{x:.1f}" for x in r["decode_tok_s"])
                cpu = " ".join(f"{x:.1f}" for x in r["decode_cpu_tok_s"])
                mem = f"{r['cache_bytes'] / 1e6:8.1f} {r['peak_gb']:8.2f}"
                print(f"{length:6d} {kv:9s} {pre:15s} {dec:14s} {cpu:17s} {mem}  "
                      f"{os.getloadavg()[0]:5.2f}  {ratio}   ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
