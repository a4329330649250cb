"""The full 48-layer Qwen3-30B-A3B on this machine: synthetic bf16 folder -> int4 g128 -> reload.

    OMP_WAIT_POLICY=PASSIVE nice -n 5 python bench/big.py [--work /work/data/big] [--reps 3] [--no-results]

Steps, each in its own subprocess (peak RSS per step; never the fp32 or bf16 model in RAM):
  1+2. quantize while the bf16 folder is being written. The 48-layer bf16 folder (61 GB) and its
     int4 folder (16.6 GB) do not fit on the disk together, so `tools/make_synthetic_hf.py
     --stream --max_ahead N` (a producer process) writes the bf16 shards in order, each renamed
     into place when complete, at most N complete shards ahead; the quantize worker runs
     io.gptq.quantize_folder (what `qwen3moe quantize --bits 4 --group_size 128` calls) on a
     StreamedSource that opens each shard once it is renamed into place (never a half-written
     file) and deletes it after its last tensor was read. bf16 on disk <= (N + 1) shards.
  2. reload WORK/int4 (from_pretrained, the GPTQ-layout folder: no re-quantizing), then decode
     b1/b8 and last prefill 1x512 tokens/s (bench/quant.py's measure(), every run with its load),
     peak RSS of the reload and of each phase (decode_b1/decode_b8/prefill_rss_gib: VmHWM, reset
     after each phase) and of the whole step
Targets (issue 14): RSS <= 20 GiB in every step, decode b1 >= 10 / b8 >= 20 tok/s, prefill
>= 20 tok/s, quantize <= 15 min, reload <= 2 min.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
GB = 1e9
SHARD_BYTES = 5 * GB
INT4_BYTES = 16.6 * GB  # experts+attention int4 g128 incl. fp16 scales/qzeros, embed bf16, lm_head int8
MARGIN = 3 * GB
TARGETS = {"peak_rss_gib": ("<=", 20), "decode_b1_tps": (">=", 10), "decode_b8_tps": (">=", 20),
           "prefill_tps": (">=", 20), "quantize_s": ("<=", 900), "reload_s": ("<=", 120)}


def env() -> dict[str, str]:
    from common import bench_env

    return dict(bench_env(), OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))


class _Shard:
    """One bf16 shard of a streamed folder: opened when renamed into place, deleted after the
    last of its tensors was read (reads come from quantize_folder's worker threads)."""

    def __init__(self, path: str, tag: str, owner: "StreamedSource") -> None:
        self.path, self.tag, self.owner = path, tag, owner
        self.shapes: dict[str, tuple] = {}
        self.left: set[str] = set()
        self.file = None
        self.lock = threading.Lock()

    def shape(self, name: str) -> tuple:
        return self.shapes[name]

    def dtype(self, name: str) -> str:
        return self.tag

    def _open(self):
        from qwen3moe.io.safetensors_io import CheckpointError, SafetensorsFile

        t0 = time.perf_counter()
        while not os.path.exists(self.path):
            rc = self.owner.producer.poll() if self.owner.producer else 0
            if rc is not None:
                raise CheckpointError(f"{self.path}: the bf16 writer exited (code {rc}) without writing it")
            time.sleep(0.1)
        self.owner.waited_s += time.perf_counter() - t0
        f = SafetensorsFile(self.path)
        for name, shape in self.shapes.items():
            if tuple(f.shape(name)) != shape or f.dtype(name) != self.tag:
                raise CheckpointError(f"{self.path}: tensor {name!r} is {f.dtype(name)} {f.shape(name)}, "
                                      f"expected {self.tag} {list(shape)}")
        return f

    def _use(self, how: str, name: str, *args):
        with self.lock:
            if self.file is None:
                self.file = self._open()
            f = self.file
        arr = getattr(f, how)(name, *args)
        with self.lock:
            self.left.discard(name)
            if not self.left:
                f.close()
                os.unlink(self.path)
        return arr

    def read(self, name, rows=None):
        return self._use("read", name, rows)

    def read_slice(self, name, index):
        return self._use("read_slice", name, index)

    def read_raw(self, name):
        return self._use("read_raw", name)


class StreamedSource:
    """CheckpointSource over a folder `make_synthetic_hf.py --stream` is still writing: the
    index (written first) names each tensor's shard, shapes come from the generator's spec."""

    def __init__(self, directory: str, producer: subprocess.Popen | None = None) -> None:
        import make_synthetic_hf as syn

        self.directory, self.producer, self.waited_s = directory, producer, 0.0
        self.scales: dict = {}  # no FP8 block scales in a synthetic bf16 folder
        cfg = json.loads(Path(directory, "config.json").read_text())
        weight_map = json.loads(Path(directory, "model.safetensors.index.json").read_text())["weight_map"]
        tag = syn.DTYPES[cfg["torch_dtype"]][0]
        shards: dict[str, _Shard] = {}
        self.where: dict[str, _Shard] = {}
        for name, shape, _ in syn.tensor_specs(cfg):  # the writer's order = the index's
            fname = weight_map[name]
            sh = shards.setdefault(fname, _Shard(os.path.join(directory, fname), tag, self))
            sh.shapes[name] = tuple(shape)
            sh.left.add(name)
            self.where[name] = sh

    def read(self, name, rows=None):
        return self.where[name].read(name, rows)

    def read_slice(self, name, index):
        return self.where[name].read_slice(name, index)

    def shape(self, name):
        return self.where[name].shape(name)

    def dtype(self, name):
        return self.where[name].dtype(name)

    def file_of(self, name):
        return self.where[name].path


def _folder_bytes(*dirs: Path) -> int:
    total = 0
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                try:
                    total += os.stat(os.path.join(root, f)).st_size
                except FileNotFoundError:
                    pass  # deleted or renamed while we looked
    return total


def quantize_streamed(work: Path, layers: int | None, max_ahead: int, shard_size: int) -> dict:
    """Producer (bf16 writer) + quantize_folder on a StreamedSource; peak disk sampled each second."""
    from qwen3moe.io.gptq import quantize_folder
    from qwen3moe.layers.quant import QuantizationConfig

    bf16, int4 = work / "bf16-stream", work / "int4"
    shutil.rmtree(bf16, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "tools" / "make_synthetic_hf.py"), "--preset",
           "qwen3-30b-a3b", "--dtype", "bfloat16", "--out", str(bf16), "--shard_size", str(shard_size),
           "--stream", "--max_ahead", str(max_ahead)] + (["--layers", str(layers)] if layers else [])
    t0 = time.perf_counter()
    producer = subprocess.Popen(cmd, stdout=sys.stderr, env=env())
    used0, peak = shutil.disk_usage(work).used, {"ours": 0, "fs": 0}
    done = threading.Event()

    def sample():
        while not done.wait(1.0):
            peak["ours"] = max(peak["ours"], _folder_bytes(bf16, *work.glob(".int4.tmp*")))
            peak["fs"] = max(peak["fs"], shutil.disk_usage(work).used - used0)

    threading.Thread(target=sample, daemon=True).start()
    try:
        while not any(bf16.glob("model*.safetensors")) and not any(bf16.glob(".model*.partial")):
            if producer.poll() is not None:
                raise SystemExit(f"bench/big.py: {' '.join(cmd)} failed (exit {producer.returncode})")
            time.sleep(0.2)  # side files (config, index, tokenizer) come before the first shard
        src = StreamedSource(str(bf16), producer)
        cpu0, t1 = os.times(), time.perf_counter()
        quantize_folder(str(bf16), str(int4), QuantizationConfig(4, 128), "5GB", source=src)
        out = {"quantize_s": time.perf_counter() - t1, "quantize_wait_s": src.waited_s}
        cpu = os.times()
        out["quantize_cpu_s"] = cpu.user + cpu.system - cpu0.user - cpu0.system
        if producer.wait() != 0:
            raise SystemExit(f"bench/big.py: {' '.join(cmd)} failed (exit {producer.returncode})")
        out["producer_s"] = time.perf_counter() - t0
    finally:
        done.set()
        if producer.poll() is None:
            producer.kill()
    shutil.rmtree(bf16)
    out.update(peak_disk_ours_gb=peak["ours"] / GB, peak_disk_fs_delta_gb=peak["fs"] / GB,
               producer_rss_gib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)
    return out


class _Printed(list):
    """Each run printed as it completes: kept in the log if the worker is killed (OOM) later."""

    def append(self, run) -> None:
        print(f"run {run[0]} = {run[1]:.2f} tok/s (1-min load {run[2]:.1f})", file=sys.stderr, flush=True)
        super().append(run)


def peak_rss_gib() -> float:
    """This process's peak RSS since start or the last reset_peak_rss (VmHWM)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 2**20


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def worker(step: str, work: Path, reps: int, layers: int | None, max_ahead: int, shard_size: int,
           activations: str = "float32") -> dict:
    if step == "quantize":
        out = quantize_streamed(work, layers, max_ahead, shard_size)
    else:
        from common import generation_runtime

        generation_runtime()  # as `qwen3moe generate`: MindSpore's graph pipeline off
        from qwen3moe import Qwen3MoeForCausalLM

        from quant import measure

        t0 = time.perf_counter()
        # bf16 embedding / norms / router as stored (fp32 would add 0.6 GB to a ~16 GiB model)
        # --activations int8: the opt-in int8-activation kernels (from_pretrained(q, activations="int8"))
        extra = {} if activations == "float32" else {"activations": activations}
        model = Qwen3MoeForCausalLM.from_pretrained(str(work / "int4"), dtype="bfloat16", **extra)
        out = {"reload_s": time.perf_counter() - t0, "reload_load": os.getloadavg()[0],
               "reload_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        print(f"reloaded in {out['reload_s']:.1f} s, RSS {out['reload_rss_gib']:.2f} GiB", file=sys.stderr)
        runs = _Printed()
        reset_peak_rss()

        def phase_done(key: str) -> None:  # the peak of each phase on its own (VmHWM reset after it)
            out[f"{key}_rss_gib"] = peak_rss_gib()
            print(f"{key}: peak RSS {out[f'{key}_rss_gib']:.2f} GiB", file=sys.stderr, flush=True)
            reset_peak_rss()

        out.update(measure(model, reps, runs, prefill_last=True, phase_done=phase_done))
        out["runs"] = list(runs)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def run_worker(step: str, a: argparse.Namespace) -> dict:
    """One step in its own process (its own peak RSS); its progress goes to our stderr."""
    cmd = [sys.executable, __file__, "--worker", step, "--work", a.work, "--reps", str(a.reps),
           "--max-ahead", str(a.max_ahead), "--shard-size", str(a.shard_size), "--activations", a.activations]
    proc = subprocess.run(cmd + (["--layers", str(a.layers)] if a.layers else []), stdout=subprocess.PIPE,
                          text=True, env=env())
    if proc.returncode != 0:
        sys.exit(f"bench/big.py worker {step} failed (exit {proc.returncode}); its stderr is above")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    Path(a.work, f"{step}-{stamp}.json").write_text(json.dumps(res, indent=1))  # kept if a later step fails
    print(f"{step}: {json.dumps(res)}", file=sys.stderr)
    return res


def pipeline(a: argparse.Namespace) -> dict:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    if not (work / "int4").is_dir():
        need = (a.max_ahead + 1) * a.shard_size + INT4_BYTES * (a.layers or 48) / 48 + MARGIN
        free = shutil.disk_usage(work).free
        if free < need:
            sys.exit(f"bench/big.py: {work} has {free / GB:.0f} GB free; streaming needs ~{need / GB:.0f} GB "
                     f"({a.max_ahead} + 1 bf16 shards + the int4 folder + {MARGIN / GB:.0f} GB)")
        load = os.getloadavg()[0]
        r = run_worker("quantize", a)
        res.update(r, quantize_load_start=load, quantize_load_end=os.getloadavg()[0],
                   quantize_rss_gib=r.pop("peak_rss_gib"))
    r = run_worker("reload", a)
    res.update(r, reload_peak_rss_gib=r.pop("peak_rss_gib"))
    res["peak_rss_gib"] = max(v for k, v in res.items() if k.endswith("rss_gib"))
    res["int4_folder_gb"] = sum(f.stat().st_size for f in (work / "int4").iterdir()) / GB
    return res


def report(res: dict) -> list[str]:
    lines = [f"{k} = {v:.2f}" for k, v in res.items() if k != "runs"]
    lines += [f"run {k} = {v:.2f} tok/s (1-min load {load:.1f})" for k, v, load in res.get("runs", [])]
    for key, (op, target) in TARGETS.items():
        if key in res:
            ok = res[key] <= target if op == "<=" else res[key] >= target
            lines.append(f"target {key} {op} {target}: {res[key]:.2f} {'met' if ok else 'MISSED'}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/work/data/big")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a smoke test of the pipeline)")
    ap.add_argument("--shard-size", type=int, default=int(SHARD_BYTES))
    ap.add_argument("--max-ahead", type=int, default=3, help="complete bf16 shards the writer may keep ahead")
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument("--worker", choices=("quantize", "reload"))
    ap.add_argument("--activations", choices=("float32", "int8"), default="float32",
                    help="reload: the int4 folder's activations (int8: the opt-in int8-activation mode)")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, Path(a.work), a.reps, a.layers, a.max_ahead, a.shard_size, a.activations)))
        return
    load0 = os.getloadavg()[0]
    res = pipeline(a)
    lines = report(res) + [f"1-min load at start/end: {load0:.1f}/{os.getloadavg()[0]:.1f} (2 cores)"]
    print("\n".join(lines))
    if not a.no_results:
        cmd = "OMP_WAIT_POLICY=PASSIVE nice -n 5 python bench/big.py " + " ".join(sys.argv[1:])
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(f"\n## Qwen3-30B-A3B, {a.layers or 48} layers, int4 g128 (bench/big.py)\n\n{stamp}, "
                     f"`{cmd.strip()}`\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
