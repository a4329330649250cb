"""Long-prompt prefill: tok/s and peak RSS per (prompt length, prefill_chunk_size), one process each.

    PYTHONPATH=. OMP_WAIT_POLICY=PASSIVE python bench/long_prompt.py --lengths 512,4096 --chunks 0,2048 \
        [--folder /work/data/synth-2l] [--quantize int4] [--runs 2] [--llama]

Each configuration runs in a fresh process (peak RSS = ru_maxrss of that process alone): load the
model (int4 g128 by default), one untimed prefill of the same shape (compiles the chunk graphs),
then `--runs` timed ones (batch 1); prefill tok/s = prompt tokens / prefill wall seconds, and per
CPU second (all threads; on 2 cores ~half the wall rate when the machine is otherwise idle).
Peak RSS (ru_maxrss, KiB / 1e6 as "GB"): of the load, and of the prefills (the mark reset after
the load; the loaded weights included).
chunk 0 = one prefill step (no chunking). --llama runs llama-bench on the folder's Q4_K_M GGUF
in the same run (pp512 / pp4096, 2 threads) and prints our / llama.cpp ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import time

from common import worker_result

LLAMA_BENCH = "/work/data/llamacpp/build/bin/llama-bench"
GGUF = "/work/data/gguf/synth-2l-Q4_K_M.gguf"


def worker(folder: str, quantize: str, length: int, chunk: int, runs: int) -> dict:
    import mindspore as ms
    import numpy as np

    ms.set_device("CPU")
    import qwen3moe
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.generation.generate import GenerationRun, resolve_config

    qwen3moe.decode_runtime()
    quant = None if quantize == "none" else quantize
    model = Qwen3MoeForCausalLM.from_pretrained(folder, quantization=quant,
                                                group_size=128 if quant == "int4" else None)
    loaded_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    ids = np.random.default_rng(0).integers(0, 151643, (1, length))
    cfg = resolve_config(model, max_new_tokens=4, ignore_eos=True, do_sample=False, prompt_cache=False,
                         prefill_chunk_size=chunk)
    _reset_peak()
    walls, cpus = [], []
    for i in range(runs + 1):  # the first compiles
        run = GenerationRun(model, ids, None, cfg)
        c0, t0 = _cpu_s(), time.perf_counter()
        run._prefill()  # the prefill alone (GenerationRun.steps starts with it)
        if i:
            walls.append(time.perf_counter() - t0)
            cpus.append(_cpu_s() - c0)
    return {"length": length, "chunk": chunk, "tok_s": [length / t for t in walls],
            "cpu_tok_s": [length / c for c in cpus], "loaded_gb": loaded_gb,
            "prefill_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def _reset_peak() -> None:
    """Reset the peak-RSS mark (VmHWM = ru_maxrss; clear_refs 5) after the load, whose transient
    peak would otherwise hide a smaller prefill's."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def _cpu_s() -> float:
    """CPU seconds of this process (all threads): the prefill's work, less sensitive than wall time
    to other processes sharing the 2 cores."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def llama(lengths: list[int]) -> dict[int, float]:
    """llama-bench prompt-processing tok/s per length (2 threads, 2 repetitions)."""
    out = subprocess.run([LLAMA_BENCH, "-m", GGUF, "-t", "2", "-p", ",".join(map(str, lengths)), "-n", "0",
                          "-r", "2", "-o", "json"], capture_output=True, text=True, timeout=1800, check=True)
    return {int(r["n_prompt"]): float(r["avg_ts"]) for r in json.loads(out.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="/work/data/synth-2l")
    ap.add_argument("--quantize", default="int4", choices=("int4", "int8", "none"))
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--chunks", default="0,512,1024,2048,4096")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--llama", action="store_true", help="llama-bench pp512/pp4096 anchor in the same run")
    ap.add_argument("--worker", nargs=2, type=int, metavar=("LENGTH", "CHUNK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.folder, a.quantize, *a.worker, a.runs)), flush=True)
        return
    lengths, chunks = [int(x) for x in a.lengths.split(",")], [int(x) for x in a.chunks.split(",")]
    anchor = llama([n for n in (512, 4096) if n in lengths]) if a.llama else {}
    print(f"load {os.getloadavg()[0]:.2f}; llama.cpp pp tok/s {anchor}", flush=True)
    print("length chunk  prefill tok/s (runs)     best  tok/CPU-s (runs)   prefill peak  load peak  load1  ours/llama")
    for length in lengths:
        for chunk in chunks:
            if chunk and chunk >= length:
                continue  # no chunking at this length: the chunk-0 row
            t0 = time.time()
            r, why = worker_result(__file__, ["--folder", a.folder, "--quantize", a.quantize, "--runs", str(a.runs),
                                              "--worker", str(length), str(chunk)])
            if r is None:
                print(f"{length:6d} {chunk:5d}  {why}")
                continue
            best = max(r["tok_s"])
            ratio = f"{best / anchor[length]:.2f}x" if length in anchor else "-"
            runs = " ".join(f"{x:.0f}" for x in r["tok_s"])
            cpu = " ".join(f"{x:.0f}" for x in r["cpu_tok_s"])
            peaks = f"{r['prefill_peak_gb']:12.2f}  {r['loaded_gb']:9.2f}"
            print(f"{length:6d} {chunk:5d}  {runs:21s} {best:6.0f}  {cpu:17s} {peaks}  "
                  f"{os.getloadavg()[0]:5.2f}  {ratio}   ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
