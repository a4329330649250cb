"""Issue-17 targets: parallel training and generation under `qwen3moe launch --nproc 2`, each
against one process measured in the same run on the same cores.

    .venv/bin/python bench/parallel.py [--only train|generate] [--layouts tp2,ep2,...] [--reps 1] [--quick]
                                       [--collectives mccl,shm]

Training: `qwen3moe pretrain` with examples/configs/pretrain_tiny_cpu.yaml (tiny preset) on the
tests/fixtures Megatron prefix (.bin/.idx, reset_position_ids and eod_mask_loss true), global
batch 8 x 128 tokens, as one process and as `launch --nproc 2 -- pretrain --use_parallel True`
per layout. Step time = median `step_time_s` of metrics.jsonl over the steps after `--warmup`
(default 30 steps, 5 warm-up: compile and start-up stay out). Every layout run is paired with a
single-process run next to it (single first on odd reps, the layout first on even ones, so a
drift of the shared machine's load does not favour one side); its ratio is against that run.
Target: parallel <= 2x the single-process step, judged on the median of the per-rep ratios.
Generation: `qwen3moe generate` on tests/fixtures/hf/tiny-fp32-gqa, B distinct prompts run as
1 + `--gen-batches` batches of the same B prompts (later batches reuse the first one's compiled
graphs), greedy and seeded sampling, `--ignore_eos`. Tokens identical = every completion (text
and token count) equals the single-process command's. Rate = median over the later batches of
tokens / seconds of the batch, from the results' `tokens_per_s` (prefill + decode, no compile;
the prompts are a few tokens against N new ones). When the parallel command reports no
per-result rate, the rate is a two-launch estimate: (N - 1) new tokens per prompt / (wall time
with N - wall time with 1 new token).
Target: identical tokens and rate >= 0.5x one process. An option the code refuses is printed
as "refused: <its one-line error>".
Nothing is written to bench/RESULTS.md: copy the printed table there with the command and load.
Shapes: B prompts per batch, N new tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO  # noqa: E402

YAML = REPO / "examples" / "configs" / "pretrain_tiny_cpu.yaml"
MEGATRON = REPO / "tests" / "fixtures" / "megatron_gpt" / "golden_a_text_document"
GEN_MODEL = REPO / "tests" / "fixtures" / "hf" / "tiny-fp32-gqa"
PROMPTS = ["hello world", "the quick brown fox jumps", "once upon a time", "in the beginning was"]
SAMPLING = ["--do_sample", "true", "--seed", "1234", "--temperature", "0.8", "--top_k", "20", "--top_p", "0.9"]

LAUNCHER = "\n--- qwen3moe launch stderr ---\n"
PC = "--parallel_config."
TRAIN_LAYOUTS = {  # name -> pretrain flags (2 processes); dp2 (replicas) is extra, not an issue-17 target
    "tp2": [PC + "model_parallel", "2"],
    "ep2": [PC + "data_parallel", "2", PC + "expert_parallel", "2"],
    "pp2": [PC + "pipeline_stage", "2", PC + "micro_batch_num", "2"],
    "tp2sp": [PC + "model_parallel", "2", PC + "use_seq_parallel", "True"],
    "zero1": [PC + "data_parallel", "2", "--parallel.enable_parallel_optimizer", "True"],
    "dp2": [PC + "data_parallel", "2"],
}
DEFAULT_TRAIN = ["tp2", "ep2", "pp2", "tp2sp", "zero1"]
GEN_LAYOUTS = {"tp2": [PC + "model_parallel", "2"],
               "dp2ep2": [PC + "data_parallel", "2", PC + "expert_parallel", "2"],
               "pp2": [PC + "pipeline_stage", "2"],  # 2 decode micro-batches overlapped (1 at B=1)
               "pp2-m1": [PC + "pipeline_stage", "2", PC + "micro_batch_num", "1"]}  # stages one after another


def env() -> dict[str, str]:
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    return dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO), PATH=path)


def cli(args: list[str], cwd: Path, timeout: int) -> tuple[int, str, float]:
    """Run `qwen3moe <args>`: (exit code, stderr, wall seconds); a timeout is exit code 124."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "qwen3moe.cli", *args], cwd=cwd, env=env(),
                           capture_output=True, text=True, timeout=timeout)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, err = 124, (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
    return rc, err, time.perf_counter() - t0


def launched(args: list[str], work: Path, timeout: int) -> tuple[int, str, float]:
    """`qwen3moe launch --nproc 2 -- args` with its worker logs in work/logs (stderr + logs returned)."""
    logs = work / "logs"
    rc, err, wall = cli(["launch", "--nproc", "2", "--log_dir", str(logs), "--timeout", str(timeout - 20),
                         "--", *args], work, timeout)
    text = "".join(p.read_text(errors="replace") for p in sorted(logs.glob("worker_*.log")))
    return rc, text + LAUNCHER + err, wall  # msrun's own traceback (any failing worker) comes last


def error_line(text: str) -> str:
    """The command's one-line error (`qwen3moe <cmd>: error: ...`), else the last line that says
    error; from the workers' logs when they have any."""
    own = text.split(LAUNCHER, 1)[0]
    lines = [ln.strip() for ln in (own if own.strip() else text).splitlines() if ln.strip()]
    for ln in lines:
        if ": error: " in ln and ln.startswith("qwen3moe "):
            return ln.split(": error: ", 1)[1]
    hits = [ln for ln in lines if "Error" in ln or "error" in ln] or lines or ["(no output)"]
    return hits[-1][:240]


def _one_line_error(text: str) -> bool:
    """The command refused (its one-line error, no traceback in the workers' or its own output)."""
    own = text.split(LAUNCHER, 1)[0]
    return any(ln.startswith("qwen3moe ") and ": error: " in ln for ln in own.splitlines()) and "Traceback" not in own


# ----------------------------------------------------------------------------- training
def train_args(out: Path, yaml: Path, steps: int) -> list[str]:
    dc = "--train_dataset.data_loader.config."
    return ["pretrain", "--config", str(yaml), f"{dc}data_path=['{MEGATRON}']", f"{dc}seq_length", "128",
            f"{dc}pad", "null", f"{dc}eod", "1023", f"{dc}reset_position_ids", "True", f"{dc}eod_mask_loss", "True",
            "--runner_config.batch_size", "8", "--runner_config.train_steps", str(steps),
            "--output_dir", str(out)]


def step_times(out: Path, warmup: int) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [float(r["step_time_s"]) for r in recs if int(r["step"]) > warmup]


def train_one(name: str, root: Path, yaml: Path, a) -> dict:
    """Median step time of one run (name 'single' or a layout), or {'error': line}."""
    work = root / f"train-{name}-{time.monotonic_ns()}"
    work.mkdir()
    args = train_args(work / "out", yaml, a.steps)
    if name == "single":
        rc, err, wall = cli(args, work, a.timeout)
    else:
        rc, err, wall = launched(args + ["--use_parallel", "True", *TRAIN_LAYOUTS[name]], work, a.timeout)
    if rc != 0:
        return {"error": f"exit {rc}: {error_line(err)}", "wall": wall}
    times = step_times(work / "out", a.warmup)
    if not times:
        return {"error": f"no step after the {a.warmup} warm-up steps in metrics.jsonl", "wall": wall}
    return {"median": statistics.median(times), "times": times, "wall": wall}


def bench_train(root: Path, a) -> None:
    yaml = root / "pretrain.yaml"  # every step logged (metrics.jsonl rows), no checkpoint until the end
    yaml.write_text(YAML.read_text().replace("per_print_times: 2", "per_print_times: 1")
                    .replace("save_checkpoint_steps: 4", "save_checkpoint_steps: 0"))
    print(f"training: tiny preset, Megatron {MEGATRON.name} (reset_position_ids, eod_mask_loss), 8 x 128 "
          f"tokens a step, {a.steps} steps, median step time after {a.warmup} warm-up steps; each layout run "
          f"next to its own single-process run (order alternating over the {a.reps} rep(s))", flush=True)
    ratios: dict[str, list[float]] = {}
    for rep in range(a.reps):
        for name, coll in [(n, c) for n in a.layouts for c in a.collectives]:
            label = _label(name, coll, a)
            pair = {}
            for which in (("single", label) if rep % 2 == 0 else (label, "single")):
                with collectives(coll if which == label else None):
                    pair[which] = train_one("single" if which == "single" else name, root, yaml, a)
                _print_train(rep, which, pair[which], pair.get("single") if which == label else None)
            if which == "single":  # the layout ran first: its ratio once its single has run
                _print_ratio(rep, label, pair[label], pair["single"])
            r, s = pair[label], pair["single"]
            if "median" in r and "median" in s:
                ratios.setdefault(label, []).append(r["median"] / s["median"])
    _print_medians(ratios, a.reps)


def _print_train(rep: int, name: str, r: dict, single: dict | None) -> None:
    head = f"  [{rep + 1}] {name:10s}"
    if "error" in r:
        print(f"{head} failed: {r['error']}  (wall {r['wall']:.0f} s)", flush=True)
        return
    ratio = f"  ratio {r['median'] / single['median']:6.2f}x" if single and "median" in single else ""
    steps = ", ".join(f"{t:.3f}" for t in r["times"])
    print(f"{head} step {r['median']:8.4f} s{ratio}  [steps {steps}; wall {r['wall']:.0f} s]", flush=True)


def _print_ratio(rep: int, label: str, r: dict, single: dict) -> None:
    if "median" in r and "median" in single:
        print(f"  [{rep + 1}] {label:10s} ratio {r['median'] / single['median']:6.2f}x (its single: "
              f"{single['median']:.4f} s)", flush=True)


def _print_medians(ratios: dict[str, list[float]], reps: int) -> None:
    """The verdict per layout: the median of its per-rep ratios (each against the single run
    next to it), so one run disturbed by the shared machine does not decide it."""
    print(f"  verdict (median ratio over {reps} rep(s); target <= 2x):")
    for label, rs in ratios.items():
        med = statistics.median(rs)
        print(f"    {label:10s} ratio {med:6.2f}x  {'met' if med <= 2 else 'NOT met'}  "
              f"(reps: {', '.join(f'{x:.2f}' for x in rs)})", flush=True)


# ----------------------------------------------------------------------------- generation
def gen_args(prompts: Path, B: int, N: int, sample: bool, out: Path) -> list[str]:
    return ["generate", "--pretrained_model_dir", str(GEN_MODEL), "--predict_data", str(prompts),
            "--predict_batch_size", str(B), "--max_new_tokens", str(N), "--ignore_eos",
            *(SAMPLING if sample else ["--do_sample", "false"]), "--output", str(out)]


def gen_one(layout: str | None, B: int, sample: bool, root: Path, a) -> dict:
    """{'results': [...], 'rate': tok/s, 'how': ...} or {'refused'|'error': line}."""
    work = root / f"gen-{layout or 'single'}-b{B}-{'sample' if sample else 'greedy'}-{time.monotonic_ns()}"
    work.mkdir()
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:B] * (1 + a.gen_batches)) + "\n")  # batches of the same B prompts

    def run(N: int, out: Path):
        args = gen_args(prompts, B, N, sample, out)
        if layout is None:
            return cli(args, work, a.timeout)
        return launched(args + ["--use_parallel", "True", *GEN_LAYOUTS[layout]], work, a.timeout)

    rc, err, wall = run(a.new_tokens, work / "out.jsonl")
    if rc != 0:  # a one-line error of the command is a refusal; anything else a failure
        msg = error_line(err)
        return {"refused": msg} if _one_line_error(err) else {"error": f"exit {rc}: {msg}"}
    results = [json.loads(line) for line in (work / "out.jsonl").read_text().splitlines() if line.strip()]
    later = [results[i:i + B] for i in range(B, len(results), B)]
    if all(r.get("tokens_per_s") for r in results[B:]):  # the command's own per-batch rate
        rates = [sum(r["completion_tokens"] for r in bt) * bt[0]["tokens_per_s"] / bt[0]["completion_tokens"]
                 for bt in later]
        return {"results": results, "rate": statistics.median(rates),
                "how": f"median of batches 2-{len(later) + 1}: {', '.join(f'{x:.0f}' for x in rates)}"}
    rc1, err1, wall1 = run(1, work / "one.jsonl")  # no rate reported: two-launch estimate
    if rc1 != 0:
        return {"results": results, "rate": None, "how": f"N=1 run failed: {error_line(err1)}"}
    return {"results": results, "rate": len(results) * (a.new_tokens - 1) / max(wall - wall1, 1e-9),
            "how": f"two-launch estimate ({wall:.1f} s - {wall1:.1f} s)"}


def same_tokens(got: list[dict], want: list[dict]) -> bool:
    key = lambda r: (r["prompt"], r["completion"], r["completion_tokens"])  # noqa: E731
    return [key(r) for r in got] == [key(r) for r in want]


def bench_generate(root: Path, a) -> None:
    print(f"generation: {GEN_MODEL.name}, {a.new_tokens} new tokens, ignore_eos; tokens/s: median over batches "
          f"2-{a.gen_batches + 1} of the same B prompts (no compile)", flush=True)
    for rep in range(a.reps):
        for B in a.batches:
            for sample in a.modes:
                mode = "sample" if sample else "greedy"
                single = gen_one(None, B, sample, root, a)
                if "results" not in single:
                    print(f"  [{rep + 1}] single  B={B} {mode:6s} failed: {single.get('error') or single['refused']}")
                    continue
                print(f"  [{rep + 1}] single  B={B} {mode:6s} {single['rate']:8.1f} tok/s ({single['how']})",
                      flush=True)
                for layout in a.gen_layouts:
                    for coll in a.collectives:
                        with collectives(coll):
                            r = gen_one(layout, B, sample, root, a)
                        _print_gen(rep, _label(layout, coll, a), B, mode, r, single)


def _print_gen(rep: int, layout: str, B: int, mode: str, r: dict, single: dict) -> None:
    head = f"  [{rep + 1}] {layout:11s} B={B} {mode:6s}"
    if "refused" in r or "error" in r:
        print(f"{head} {'refused' if 'refused' in r else 'failed'}: {r.get('refused') or r['error']}", flush=True)
        return
    same = "yes" if same_tokens(r["results"], single["results"]) else "NO"
    if r["rate"] is None:
        print(f"{head} tokens identical: {same}; rate unknown ({r['how']})", flush=True)
        return
    ratio = r["rate"] / single["rate"]
    print(f"{head} tokens identical: {same}; {r['rate']:8.1f} tok/s, ratio {ratio:.2f}x "
          f"{'met' if ratio >= 0.5 and same == 'yes' else 'NOT met'} (target >= 0.5x, identical) [{r['how']}]",
          flush=True)


@contextlib.contextmanager
def collectives(kind: str | None):
    """QWEN3MOE_COLLECTIVES for the commands started inside (None: the environment's)."""
    saved = os.environ.get("QWEN3MOE_COLLECTIVES")
    if kind is not None:
        os.environ["QWEN3MOE_COLLECTIVES"] = kind
    try:
        yield
    finally:
        os.environ.pop("QWEN3MOE_COLLECTIVES", None)
        if saved is not None:
            os.environ["QWEN3MOE_COLLECTIVES"] = saved


def _label(layout: str, coll: str | None, a) -> str:
    return layout if coll is None or len(a.collectives) == 1 else f"{layout}/{coll}"


# ----------------------------------------------------------------------------- main
def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("train", "generate"), default=None)
    ap.add_argument("--layouts", default=",".join(DEFAULT_TRAIN),
                    help=f"training layouts, comma-separated, of {', '.join(TRAIN_LAYOUTS)}")
    ap.add_argument("--gen-layouts", default=",".join(GEN_LAYOUTS), help=f"of {', '.join(GEN_LAYOUTS)}")
    ap.add_argument("--reps", type=int, default=1,
                    help="repeat every measurement; training: each layout next to its own single run, the "
                         "verdict from the median ratio over the reps")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 30; --quick 3)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="steps left out of the median (default 5; --quick 1): compile and start-up")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 32; --quick 16)")
    ap.add_argument("--gen-batches", type=int, default=None,
                    help="timed batches after the first (compiling) one (default 3; --quick 1)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per command")
    ap.add_argument("--quick", action="store_true",
                    help="3 steps (1 warm-up), 16 tokens, 1 timed batch, greedy batch 1 only")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    ap.add_argument("--collectives", default=None,
                    help="run each layout with each QWEN3MOE_COLLECTIVES value, comma-separated, e.g. mccl,shm "
                         "(default: the environment's)")
    a = ap.parse_args(argv)
    a.collectives = [x for x in a.collectives.split(",") if x] if a.collectives else [None]
    for c in a.collectives:
        if c not in (None, "auto", "shm", "mccl"):
            ap.error(f"--collectives: unknown backend {c!r}; expected auto, shm or mccl")
    a.steps = a.steps or (3 if a.quick else 30)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 5)
    a.new_tokens = a.new_tokens or (16 if a.quick else 32)
    a.gen_batches = a.gen_batches or (1 if a.quick else 3)
    a.layouts = [x for x in a.layouts.split(",") if x]
    a.gen_layouts = [x for x in a.gen_layouts.split(",") if x]
    for name in a.layouts:
        if name not in TRAIN_LAYOUTS:
            ap.error(f"--layouts: unknown layout {name!r}; expected some of {', '.join(TRAIN_LAYOUTS)}")
    for name in a.gen_layouts:
        if name not in GEN_LAYOUTS:
            ap.error(f"--gen-layouts: unknown layout {name!r}; expected some of {', '.join(GEN_LAYOUTS)}")
    if a.warmup >= a.steps:
        ap.error(f"--warmup {a.warmup} must be below --steps {a.steps}")
    a.batches, a.modes = ([1], [False]) if a.quick else ([1, 4], [False, True])
    return a


def main(argv=None) -> None:
    a = parse(argv)
    root = Path(tempfile.mkdtemp(prefix="qwen3moe-bench-parallel-"))
    t0, load0 = time.time(), os.getloadavg()
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"bench/parallel.py: 2 processes vs 1 on {os.cpu_count()} cores (OMP_NUM_THREADS {threads}); "
          f"load {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; code {_commit()}", flush=True)
    try:
        if a.only in (None, "train"):
            bench_train(root, a)
        if a.only in (None, "generate"):
            bench_generate(root, a)
    finally:
        load1 = os.getloadavg()
        print(f"total {time.time() - t0:.0f} s; load at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
        if a.keep:
            print(f"run folders: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    main()
