"""Weight-format benchmark on the 2-layer real-geometry folder: our fp32 / bf16 / int8 / int4 against
llama.cpp F32 / Q8_0 / Q4_K_M, in one run, 2 threads each.

    OMP_WAIT_POLICY=PASSIVE python bench/quant.py --folder /work/data/synth-2l \
        [--modes fp32,bf16,int8,int4] [--gguf-dir /work/data/gguf] [--reps 3] [--rounds 3]
        [--paired bf16,int8,int4 [--pairs 8]] [--no-results]

Per mode, each in its own subprocess (so peak RSS and thread pools don't mix):
  load time, prefill 1x512 tokens/s, decode tokens/s at batch 1 and batch 8 (16-token prompts,
  64 new tokens: 63 decode steps timed, ignore_eos, greedy), peak RSS, and the relative logits
  error ||l - l_fp32|| / ||l_fp32|| of a 1x64 forward against our fp32.
llama.cpp (reference tooling, tools/llamacpp/): llama-bench pp512 and tg64 (b1), and
llama-batched-bench -npp 16 -ntg 64 -npl 8 (S_TG, aggregate b8), peak RSS from /usr/bin/time.
Prints each of our modes against our fp32 and int8 vs Q8_0, int4 vs Q4_K_M (targets in issue 14).
Modes int8-a8 / int4-a8: the same weights with the opt-in int8 activations (prefill and decode
kernels; QuantizationConfig(activations="int8"), docs/quantization.md). Modes int8-h6 / int4-h6 /
int4-a8-h6: the opt-in 6-bit lm_head (QuantizationConfig(lm_head_bits=6)) instead of the int8 one.
Times are medians over --reps after a warm-up call. Our workers run with the runtime setting
`qwen3moe generate` uses (common.generation_runtime: MindSpore's graph pipeline off: less CPU a
token, the same wall time on a quiet machine); QWEN3MOE_GRAPH_PIPELINE=on measures MindSpore's default.

--rounds N runs every mode in N separate processes, interleaved (fp32, bf16, ... then again): how
fast a process streams memory changes over time on this machine (bench/RESULTS.md "Streaming
rate"), so one process per mode can compare a fast process with a slow one. Each process prints
its numbers and its lm_head op's weight GB/s (its streaming rate: the op alone in a compiled cell,
median of 20 calls); the ratios against our fp32 and llama.cpp come from the medians over processes.

--paired MODES (off by default; bench/quant_paired.py): the decode-b1 target against our fp32 measured
inside one process. The streaming rate switches between ~50-55 and ~70-80 GB/s over seconds and decode
b1 is bandwidth-bound, so even the medians over a few processes can compare windows rather than
formats. Per listed mode, one worker loads fp32 and the mode, warms both up, then runs --pairs rounds of
the same b1 decode (decode_tps, 63 steps) on both, back to back, in ABBA order; the ratio is taken per
round and its median is checked against the target. That worker holds both models (peak RSS ~12 GB):
it starts only with /proc/meminfo MemAvailable >= 16 GiB, else the report says it was skipped.
`--modes '' --llama ''` runs only the paired part.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

PREFILL_LEN = 512
PROMPT, NEW = 16, 64
DECODE_BATCHES = (1, 8)
LOGIT_PROBE = 64
# our mode -> from_pretrained keyword arguments
MODES = {
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "int8": dict(quantization="int8"),
    "int4": dict(quantization="int4", group_size=128),
    # the opt-in int8-activation kernels, prefill and decode (QuantizationConfig(activations="int8"))
    "int8-a8": dict(quantization="int8", activations="int8"),
    "int4-a8": dict(quantization="int4", group_size=128, activations="int8"),
    # the opt-in 6-bit lm_head (QuantizationConfig(lm_head_bits=6)) instead of int8
    "int8-h6": dict(quantization="int8", lm_head_bits=6),
    "int4-h6": dict(quantization="int4", group_size=128, lm_head_bits=6),
    "int4-a8-h6": dict(quantization="int4", group_size=128, activations="int8", lm_head_bits=6),
    "stored": dict(dtype="bfloat16"),  # a quantized (GPTQ) folder as stored: bench/act_order.py
    "stored-a8": dict(dtype="bfloat16", activations="int8"),  # the same with int8 activations
}
LLAMA_MODES = {"F32": "F32", "Q8_0": "Q8_0", "Q4_K_M": "Q4_K_M"}
PAIRS = (("int8", "Q8_0"), ("int4", "Q4_K_M"), ("int8-a8", "Q8_0"), ("int4-a8", "Q4_K_M"), ("int8-h6", "Q8_0"),
         ("int4-h6", "Q4_K_M"), ("int4-a8-h6", "Q4_K_M"), ("fp32", "F32"))
TARGET_VS_FP32 = {"bf16": 1.8, "int8": 3.0, "int4": 4.5, "int8-a8": 3.0, "int4-a8": 4.5, "int8-h6": 3.0, "int4-h6": 4.5,
                  "int4-a8-h6": 4.5}


def _ids(B: int, S: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 151643, (B, S))  # real (non-special) Qwen ids


def generate(model, B: int, S: int, new: int, seed: int):
    """One greedy GenerationRun (ignore_eos, `new` new tokens) of B prompts of S random ids, run;
    its .stats hold the prefill and decode times."""
    from qwen3moe.generation.generate import GenerationRun, resolve_config

    cfg = resolve_config(model, max_new_tokens=new, ignore_eos=True, do_sample=False, prompt_cache=False)
    r = GenerationRun(model, _ids(B, S, seed), None, cfg)
    r.run()
    return r


def decode_tps(model, B: int, seed: int) -> float:
    """Decode tokens/s of one run: B prompts of PROMPT ids, NEW new tokens (NEW - 1 decode steps
    timed). The first call at a batch size compiles (a warm-up)."""
    st = generate(model, B, PROMPT, NEW, seed).stats
    return B * st.decode_steps / st.decode_s


def measure(model, reps: int, runs: list | None = None, prefill_last: bool = False,
            phase_done: Callable[[str], None] | None = None) -> dict:
    """Prefill 1x512 and decode b1/b8 tokens/s of a loaded model: medians of `reps` after a warm-up.
    `runs` (optional) collects every run as (key, tokens/s, 1-min load average after it);
    prefill_last: decode first (a 512-token prefill needs the most memory); phase_done(key) is
    called after each phase (warm-up + reps), e.g. to read and reset the peak RSS."""

    def note(key: str, rate: float) -> float:
        if runs is not None:
            runs.append((key, rate, os.getloadavg()[0]))
        return rate

    def prefill():
        generate(model, 1, PREFILL_LEN, 1, 0)  # warm-up: compiles the 512 bucket
        out["prefill_tps"] = statistics.median(
            note("prefill_tps", PREFILL_LEN / generate(model, 1, PREFILL_LEN, 1, i).stats.prefill_s)
            for i in range(reps))
        if phase_done:
            phase_done("prefill")

    out = {}
    if not prefill_last:
        prefill()
    for B in DECODE_BATCHES:
        decode_tps(model, B, 100)  # warm-up
        out[f"decode_b{B}_tps"] = statistics.median(
            note(f"decode_b{B}_tps", decode_tps(model, B, 100 + i)) for i in range(reps))
        if phase_done:
            phase_done(f"decode_b{B}")
    if prefill_last:
        prefill()
    return out


# ----------------------------------------------------------------------------- our worker
def head_cell(cell):
    """The fused step's final norm + lm_head alone in a compiled cell (cell: the engine's
    FusedStepCell): x [1, 1, H] -> logits."""
    import mindspore as ms
    from mindspore import nn

    class Head(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.c = cell

        @ms.jit
        def construct(self, x):
            return self.c.head(x)

    return Head()


def lm_head_rate(model, reps: int = 20) -> dict:
    """This process's streaming rate: the lm_head op's weight bytes / its median wall time over
    `reps` calls after a warm-up (the largest part of a b1 decode step at 2 layers). Empty when
    the engine did not take the fused step (no kernels)."""
    from mindspore import Tensor

    r = generate(model, 1, PROMPT, 2, 5)
    if not r.engine.fused:
        return {}
    head = head_cell(r.engine.cell)
    x = Tensor(np.random.default_rng(1).standard_normal((1, 1, model.config.hidden_size)).astype(np.float32))
    nbytes = sum(int(p.size) * p.itemsize for p in model.get_parameters() if p.name.startswith("lm_head"))
    head(x).asnumpy()
    wall = []
    for _ in range(reps):
        t0 = time.perf_counter()
        head(x).asnumpy()
        wall.append(time.perf_counter() - t0)
    return {"lm_head_gbs": nbytes / statistics.median(wall) / 1e9}


def worker_ours(folder: str, mode: str, reps: int, logits_out: str) -> dict:
    from common import generation_runtime

    generation_runtime()  # as `qwen3moe generate`: MindSpore's graph pipeline off
    from qwen3moe import Qwen3MoeForCausalLM

    from common import load_kwargs

    t0 = time.perf_counter()
    model = Qwen3MoeForCausalLM.from_pretrained(folder, **load_kwargs(MODES[mode]))
    out: dict = {"load_s": time.perf_counter() - t0,
                 "load_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out.update(measure(model, reps))
    out.update(lm_head_rate(model))
    logits = model(_ids(1, LOGIT_PROBE, 7)).logits
    np.save(logits_out, np.asarray(logits.asnumpy(), np.float32))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ----------------------------------------------------------------------------- llama.cpp side
def _timed(cmd: list[str]) -> tuple[str, float]:
    """Run under /usr/bin/time; return stdout and the peak RSS in MB."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", tf.name, *cmd],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        return proc.stdout, int(tf.read().split()[-1]) / 1024


def llama_side(bin_dir: Path, gguf: Path, reps: int) -> dict:
    out, rss = {}, []
    text, r = _timed([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", "2", "-p", str(PREFILL_LEN),
                      "-n", str(NEW), "-r", str(reps), "-o", "json"])
    rss.append(r)
    for row in json.loads(text):
        key = "prefill_tps" if row["n_prompt"] else "decode_b1_tps"
        out[key] = row["avg_ts"]
    text, r = _timed([str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-t", "2", "-tb", "2",
                      "-c", str(8 * (PROMPT + NEW)), "-npp", str(PROMPT), "-ntg", str(NEW),
                      "-npl", "8", "--output-format", "jsonl"])
    rss.append(r)
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    out["decode_b8_tps"] = next(row["speed_tg"] for row in rows if row["pl"] == 8)
    out["peak_rss_mb"] = max(rss)
    return out


# ----------------------------------------------------------------------------- driver
def bench_env() -> dict[str, str]:
    from common import REPO, bench_env as base

    return dict(base(), OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))


def run_ours(folder: str, mode: str, reps: int, logits: str) -> dict:
    """One of our modes in its own process; its logits go to the file `logits`."""
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--folder", folder,
                           "--reps", str(reps), "--logits", logits],
                          capture_output=True, text=True, env=bench_env())
    if proc.returncode != 0:  # reported in the results (e.g. killed by the OOM killer: -9), run goes on
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"failed": f"worker exit {proc.returncode} {tail[0][:200]}", "load": load}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), load=load)


def median_process(runs: list[dict]) -> dict:
    """Per key, the median over the processes that did not fail (the first failure if all did)."""
    ok = [r for r in runs if "failed" not in r]
    if not ok:
        return runs[0]
    return {k: statistics.median(r[k] for r in ok) for k in ok[0] if all(k in r for r in ok)}


def fmt(name: str, r: dict) -> str:
    if "failed" in r:
        return f"{name:10s} FAILED: {r['failed']}"
    load = f", load {r['load_s']:5.1f} s" if "load_s" in r else ""
    err = f", logits rel err vs fp32 {r['rel_err']:.2e}" if "rel_err" in r else ""
    rate = f" | lm_head op {r['lm_head_gbs']:5.1f} GB/s" if "lm_head_gbs" in r else ""
    return (f"{name:10s} prefill 1x{PREFILL_LEN} {r['prefill_tps']:7.1f} tok/s | decode b1 "
            f"{r['decode_b1_tps']:6.1f} | b8 {r['decode_b8_tps']:6.1f} tok/s | peak RSS "
            f"{r['peak_rss_mb']:6.0f} MB{load}{err}{rate}")


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def ratios(ours: dict, llama: dict) -> list[str]:
    """Each mode against our fp32 (target on decode b1) and against its llama.cpp counterpart
    (target on every metric), from the given (median) results."""
    lines = []
    ours = {m: r for m, r in ours.items() if "failed" not in r}
    base = ours.get("fp32")
    keys = ("prefill_tps", "decode_b1_tps", "decode_b8_tps")
    for mode, r in ours.items():
        if base and mode != "fp32":
            rs = ", ".join(f"{k.removesuffix('_tps')} {r[k] / base[k]:.2f}x" for k in keys)
            tgt = TARGET_VS_FP32.get(mode)
            met = f" (target decode_b1 >= {tgt}x: {verdict(r['decode_b1_tps'] / base['decode_b1_tps'] >= tgt)})"
            lines.append(f"{mode} vs our fp32: {rs}{met if tgt else ''}")
    for mine, theirs in PAIRS:
        if mine in ours and theirs in llama and "failed" not in llama[theirs]:
            q = {k: ours[mine][k] / llama[theirs][k] for k in keys}
            rs = ", ".join(f"{k.removesuffix('_tps')} {v:.2f}x" for k, v in q.items())
            short = [k.removesuffix("_tps") for k, v in q.items() if v < 1.0]
            lines.append(f"{mine} vs llama.cpp {theirs}: {rs} (target >= 1.0x each: "
                         f"{verdict(not short)}{' for ' + ', '.join(short) if short else ''})")
    return lines


def run_rounds(folder: str, modes: list[str], reps: int, rounds: int) -> dict[str, list[dict]]:
    """Every mode in `rounds` processes, interleaved; each process's logits error against the
    first fp32 process."""
    procs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for mode in modes:
                path = os.path.join(tmp, f"{mode}-{i}.npy")
                procs[mode].append(dict(run_ours(folder, mode, reps, path), logits=path))
        ref = next((r["logits"] for r in procs.get("fp32", []) if "failed" not in r), None)
        ref = np.load(ref) if ref else None
        for r in (r for runs in procs.values() for r in runs):
            path = r.pop("logits")
            if ref is not None and "failed" not in r:
                r["rel_err"] = float(np.linalg.norm(np.load(path) - ref) / np.linalg.norm(ref))
    return procs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/work/data/synth-2l")
    ap.add_argument("--modes", default="fp32,bf16,int8,int4")
    ap.add_argument("--llama", default="F32,Q8_0,Q4_K_M", help="GGUF types to run ('' for none)")
    ap.add_argument("--gguf-dir", default="/work/data/gguf")
    ap.add_argument("--llama-bin", default="/work/data/llamacpp/build/bin")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="processes per mode, interleaved")
    ap.add_argument("--paired", default="", help="non-fp32 modes for the paired decode-b1 A/B ('' for none)")
    ap.add_argument("--pairs", type=int, default=8, help="rounds of the paired A/B")
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument("--worker", choices=sorted(MODES))
    ap.add_argument("--logits")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker_ours(a.folder, a.worker, a.reps, a.logits)))
        return
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        sys.exit(f"--modes: unknown {bad[0]!r}; choose from {sorted(MODES)}")
    paired = [m for m in a.paired.split(",") if m]
    bad = [m for m in paired if m not in MODES or m == "fp32"]
    if bad:
        sys.exit(f"--paired: {bad[0]!r} is not a non-fp32 mode; choose from {sorted(set(MODES) - {'fp32'})}")
    bad = [t for t in a.llama.split(",") if t and t not in LLAMA_MODES]
    if bad:
        sys.exit(f"--llama: unknown {bad[0]!r}; choose from {sorted(LLAMA_MODES)}")
    if a.rounds < 1 or a.reps < 1 or a.pairs < 1:
        sys.exit(f"--rounds, --reps and --pairs must be >= 1, got {a.rounds}, {a.reps} and {a.pairs}")
    procs = run_rounds(a.folder, modes, a.reps, a.rounds)
    loads = [f"{r['load']:.1f}" for i in range(a.rounds) for r in (procs[m][i] for m in modes)]
    llama: dict = {}
    stem = Path(a.folder).name
    for t in [t for t in a.llama.split(",") if t]:
        gguf = Path(a.gguf_dir) / f"{stem}-{LLAMA_MODES[t]}.gguf"
        if not gguf.is_file():
            llama[t] = {"failed": f"no {gguf} (see tools/llamacpp/README.md)"}
            continue
        loads.append(f"{os.getloadavg()[0]:.1f}")
        llama[t] = llama_side(Path(a.llama_bin), gguf, a.reps)
    loads.append(f"{os.getloadavg()[0]:.1f}")
    ours = {m: median_process(runs) for m, runs in procs.items()}
    lines = []
    if a.rounds > 1:
        lines += [fmt(f"{m} #{i + 1}", r) + (f" | 1-min load {r['load']:.1f}" if "failed" not in r else "")
                  for i in range(a.rounds) for m, r in ((m, procs[m][i]) for m in modes)]
    lines += [fmt(m, r) for m, r in ours.items()] + [fmt(f"llama {t}", r) for t, r in llama.items()]
    lines += ratios(ours, llama)
    if modes or llama:
        lines.append(f"per process: median of {a.reps} after a warm-up; "
                     + (f"per mode: median over its {a.rounds} processes (run interleaved); " if a.rounds > 1 else "")
                     + f"1-min load before each process and at the end: {', '.join(loads)} (2 cores)")
    if paired:
        from quant_paired import run_paired  # imports this module: not at the top

        lines += run_paired(a.folder, paired, a.pairs)
    print("\n".join(lines))
    if not a.no_results:
        from common import REPO

        cmd = "OMP_WAIT_POLICY=PASSIVE python bench/quant.py " + shlex.join(sys.argv[1:])
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(f"\n## Weight formats (bench/quant.py)\n\n{stamp}, {a.folder}, 2 threads, "
                     f"`{cmd.strip()}`\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
