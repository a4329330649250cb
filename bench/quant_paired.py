"""Paired decode-b1 A/B for bench/quant.py --paired: our fp32 and one other mode loaded in ONE
process, alternating batch-1 greedy decodes (quant.decode_tps, the unpaired measurement's own),
ratio per round.

Why: this machine streams memory at ~50-55 or ~70-80 GB/s, switching over seconds (bench/RESULTS.md
"Streaming rate"), and decode b1 is bandwidth-bound, so a ratio between two processes mostly tells
which window each fell into. Two decodes back to back (~2-5 s) mostly share a window; the order
alternates per round (fp32 first on even rounds, the mode first on odd: ABBA) so a drift within a
round does not favour one side; the median of the per-round ratios drops the rounds where a
switch fell between the two.

Memory: one worker holds fp32 and the mode at once (peak RSS ~12 GB at synth-2l geometry: fp32's
load peak, ~9.3 GB, plus the mode loaded after it), so a worker starts only when /proc/meminfo
MemAvailable >= PAIRED_MEM_GIB, else a skip line says why.

    python bench/quant_paired.py --worker bf16 --folder /work/data/synth-2l --pairs 8  (prints JSON)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant import MODES, TARGET_VS_FP32, bench_env, decode_tps, verdict  # noqa: E402

BASE = "fp32"
PAIRED_MEM_GIB = 16  # a worker's ~12 GB peak RSS plus headroom for the rest of the (shared) machine


def round_order(i: int, mode: str) -> tuple[str, str]:
    """Round i's decode order: fp32 first on even rounds, `mode` first on odd ones (ABBA)."""
    return (BASE, mode) if i % 2 == 0 else (mode, BASE)


def run_pairs(decode: Callable[[str, int], float], mode: str, pairs: int,
              load: Callable[[], float] = lambda: os.getloadavg()[0]) -> list[dict]:
    """`pairs` rounds of decode(name, seed) -> tokens/s for fp32 and `mode` in round_order; both
    decode the same prompt (seed 100 + round, as quant.measure's reps). Per round: both rates, the
    first side, the 1-min load after it."""
    rounds = []
    for i in range(pairs):
        order = round_order(i, mode)
        rates = {name: decode(name, 100 + i) for name in order}
        rounds.append({BASE: rates[BASE], mode: rates[mode], "first": order[0], "load": load()})
    return rounds


def summarize(mode: str, rounds: list[dict]) -> dict:
    """Per-round ratios mode/fp32, their median, the median tokens/s of each side, the verdict
    against TARGET_VS_FP32 (None without a target)."""
    ratios = [r[mode] / r[BASE] for r in rounds]
    med = statistics.median(ratios)
    tgt = TARGET_VS_FP32.get(mode)
    return {"ratios": ratios, "median": med, BASE: statistics.median(r[BASE] for r in rounds),
            mode: statistics.median(r[mode] for r in rounds), "target": tgt,
            "met": None if tgt is None else med >= tgt}


def paired_lines(mode: str, result: dict) -> list[str]:
    """The report lines of one worker's result (its JSON, or {"failed"/"skipped": why})."""
    head = f"{mode} vs our fp32, paired in one process"
    if "skipped" in result or "failed" in result:
        return [f"{head}: {'SKIPPED' if 'skipped' in result else 'FAILED'}: "
                f"{result.get('skipped') or result['failed']}"]
    rounds = result["rounds"]
    s = summarize(mode, rounds)
    lines = [f"  {mode} paired round {i + 1} ({r['first']} first): fp32 {r[BASE]:.1f} tok/s, {mode} "
             f"{r[mode]:.1f} tok/s, ratio {q:.2f}, 1-min load {r['load']:.1f}"
             for i, (r, q) in enumerate(zip(rounds, s["ratios"]))]
    tgt = f" (target >= {s['target']}x: {verdict(s['met'])})" if s["target"] is not None else ""
    # the weight bytes a b1 token reads, fp32 over the mode: the ratio at equal streaming rates
    # and no fixed per-step time, i.e. the ceiling of the paired ratio
    ceiling = f"; weight bytes a token, fp32 / {mode}: {result['bytes_ratio']:.2f}x" if "bytes_ratio" in result else ""
    lines.append(f"{head} ({len(rounds)} rounds, ABBA): decode_b1 ratios "
                 f"{' '.join(f'{q:.2f}' for q in s['ratios'])} median {s['median']:.2f}x (fp32 "
                 f"{s[BASE]:.1f} tok/s, {mode} {s[mode]:.1f} tok/s medians){tgt}{ceiling}; 1-min load "
                 f"{result['load_before']:.1f} before, peak RSS {result['peak_rss_mb']:.0f} MB, RSS "
                 f"{result['rss_mb']:.0f} MB of which {result['huge_mb']:.0f} MB on huge pages")
    return lines


def mem_available_gib(meminfo: str | None = None) -> float:
    """MemAvailable from /proc/meminfo (or the given text) in GiB."""
    text = meminfo if meminfo is not None else Path("/proc/meminfo").read_text()
    kib = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("MemAvailable:"))
    return kib / 2**20


def skip_reason(avail_gib: float) -> str | None:
    if avail_gib >= PAIRED_MEM_GIB:
        return None
    return (f"MemAvailable {avail_gib:.1f} GiB < {PAIRED_MEM_GIB} GiB needed (fp32 + the mode in one "
            "process, ~12 GB peak RSS, plus headroom); not started")


# ----------------------------------------------------------------------------- worker and driver
def worker(folder: str, mode: str, pairs: int) -> dict:
    from common import generation_runtime

    generation_runtime()  # as `qwen3moe generate`: MindSpore's graph pipeline off
    from qwen3moe import Qwen3MoeForCausalLM

    from common import load_kwargs

    load_before = os.getloadavg()[0]
    models = {m: Qwen3MoeForCausalLM.from_pretrained(folder, **load_kwargs(MODES[m])) for m in (BASE, mode)}
    for model in models.values():
        decode_tps(model, 1, 100)  # warm-up: compiles
    rounds = run_pairs(lambda name, seed: decode_tps(models[name], 1, seed), mode, pairs)
    from decode_profile import token_bytes  # imports quant, which imports this module lazily

    bytes_ratio = token_bytes(models[BASE]) / token_bytes(models[mode])
    # decode streams the weights: on 4 KB pages (a failed collapse, e.g. fragmented memory) it is
    # slower, so say how much of the RSS is on huge pages
    kib = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/self/smaps_rollup").read_text()
           .splitlines()[1:] if line.split()[-1] == "kB"}
    return {"rounds": rounds, "load_before": load_before, "bytes_ratio": bytes_ratio, "rss_mb": kib["Rss"] / 1024,
            "huge_mb": kib["AnonHugePages"] / 1024,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_paired(folder: str, modes: list[str], pairs: int) -> list[str]:
    """One worker process per mode, one at a time, each only with enough MemAvailable."""
    lines = []
    for mode in modes:
        why = skip_reason(mem_available_gib())
        if why:
            result = {"skipped": why}
        else:
            proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--folder", folder,
                                   "--pairs", str(pairs)], capture_output=True, text=True, env=bench_env())
            if proc.returncode != 0:  # e.g. killed by the OOM killer (-9): reported, the run goes on
                tail = proc.stderr.strip().splitlines()[-1:] or [""]
                result = {"failed": f"worker exit {proc.returncode} {tail[0][:200]}"}
            else:
                result = json.loads(proc.stdout.strip().splitlines()[-1])
        lines += paired_lines(mode, result)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True, choices=sorted(set(MODES) - {BASE}))
    ap.add_argument("--folder", required=True)
    ap.add_argument("--pairs", type=int, required=True)
    a = ap.parse_args()
    print(json.dumps(worker(a.folder, a.worker, a.pairs)))


if __name__ == "__main__":
    main()
