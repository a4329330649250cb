"""The full 48-layer Qwen3-30B-A3B on this machine: synthetic bf16 folder -> int4 g128 -> reload.

    OMP_WAIT_POLICY=PASSIVE python bench/big.py [--work /work/data/big] [--reps 2] [--no-results]

Steps, each in its own subprocess (peak RSS per step; never the fp32 or bf16 model in RAM):
  1. tools/make_synthetic_hf.py --preset qwen3-30b-a3b --dtype bfloat16 (~61 GB, skipped if present)
  2. quantize: `qwen3moe quantize --bits 4 --group_size 128` from the bf16 folder to WORK/int4,
     under /usr/bin/time (wall time, peak RSS)
  3. reload WORK/int4 (from_pretrained, the GPTQ-layout folder: no re-quantizing), then prefill
     1x512 and decode b1/b8 tokens/s (bench/quant.py's measure()), peak RSS
Disk: bf16 (61 GB) + int4 (~16.6 GB) must fit at once for step 2. When they do not
(--delete-bf16 auto), step 2 runs the same quantizer (io.gptq.quantize_folder, what the command
calls) in a worker that deletes each bf16 shard as soon as its last tensor has been read
(the synthetic folder's index lists tensors in shard order, which is the order the quantizer
reads them), so the disk holds at most one bf16 shard beyond what is left to quantize.
Targets (issue 14): RSS <= 20 GiB in every
step, decode b1 >= 10 / b8 >= 20 tok/s, prefill >= 20 tok/s, quantize <= 15 min, reload <= 2 min.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
BF16_BYTES = 61.1 * GB
INT4_BYTES = 16.6 * GB  # experts+attention int4 g128 incl. fp16 scales/qzeros, embed bf16, lm_head int8
MARGIN = 3 * GB
TARGETS = {"peak_rss_gib": ("<=", 20), "decode_b1_tps": (">=", 10), "decode_b8_tps": (">=", 20),
           "prefill_tps": (">=", 20), "quantize_s": ("<=", 900), "reload_s": ("<=", 120)}


def env() -> dict[str, str]:
    from common import bench_env

    return dict(bench_env(), OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of a command; its output goes to our stderr."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", tf.name, *cmd], env=env(),
                              stdout=sys.stderr)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"bench/big.py: {' '.join(cmd)} failed (exit {proc.returncode})")
        return wall, int(tf.read().split()[-1]) / 2**20


def quantize_deleting_source(src: str, dst: str) -> float:
    """quantize_folder(src -> dst, int4 g128), unlinking each source shard after its last read."""
    from qwen3moe.io import hf_checkpoint
    from qwen3moe.io.gptq import quantize_folder
    from qwen3moe.layers.quant import QuantizationConfig

    weight_map = json.loads(Path(src, "model.safetensors.index.json").read_text())["weight_map"]
    left: dict[str, int] = {}
    for fname in weight_map.values():
        left[fname] = left.get(fname, 0) + 1
    cls = hf_checkpoint.CheckpointSource
    plain = {"read": cls.read, "read_slice": cls.read_slice}

    def consumed(self, name):
        fname = weight_map[name]
        left[fname] -= 1
        if left[fname] == 0:
            self.where[name].close()
            os.unlink(os.path.join(src, fname))

    def read(self, name, *args):
        arr = plain["read"](self, name, *args)
        consumed(self, name)
        return arr

    def read_slice(self, name, *args):
        arr = plain["read_slice"](self, name, *args)
        consumed(self, name)
        return arr

    cls.read, cls.read_slice = read, read_slice
    t0 = time.perf_counter()
    try:
        quantize_folder(src, dst, QuantizationConfig(4, 128), "5GB")
    finally:
        cls.read, cls.read_slice = plain["read"], plain["read_slice"]
    return time.perf_counter() - t0


def worker(step: str, src: str, dst: str, reps: int) -> dict:
    import mindspore as ms

    ms.set_device("CPU")
    from qwen3moe import Qwen3MoeForCausalLM

    from quant import measure

    out: dict = {}
    if step == "quantize-deleting":
        out["quantize_s"] = quantize_deleting_source(src, dst)
    else:
        t0 = time.perf_counter()
        model = Qwen3MoeForCausalLM.from_pretrained(src)
        out["reload_s"] = time.perf_counter() - t0
        out["reload_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out.update(measure(model, reps))
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def run_worker(step: str, src: Path, dst: Path, reps: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", step, "--src", str(src), "--dst", str(dst),
                           "--reps", str(reps)], capture_output=True, text=True, env=env())
    if proc.returncode != 0:
        sys.exit(f"bench/big.py worker {step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def pipeline(work: Path, reps: int, delete_bf16: str, layers: int | None,
             shard_size: int) -> tuple[dict, list[str]]:
    work.mkdir(parents=True, exist_ok=True)
    bf16, int4 = work / "bf16", work / "int4"
    res, notes = {}, []
    if not (bf16 / "model.safetensors.index.json").is_file() and not int4.is_dir():
        need = BF16_BYTES * (layers or 48) / 48
        if free_bytes(work) < need + MARGIN:
            sys.exit(f"bench/big.py: {work} has {free_bytes(work) / GB:.0f} GB free; the bf16 folder "
                     f"needs {need / GB:.0f} GB")
        res["make_bf16_s"], res["make_bf16_rss_gib"] = timed(
            [sys.executable, str(REPO / "tools" / "make_synthetic_hf.py"), "--preset", "qwen3-30b-a3b",
             "--dtype", "bfloat16", "--out", str(bf16), "--shard_size", str(shard_size)]
            + (["--layers", str(layers)] if layers else []))
    if not int4.is_dir():
        both_fit = free_bytes(work) >= INT4_BYTES * (layers or 48) / 48 + MARGIN
        if delete_bf16 == "yes" or (delete_bf16 == "auto" and not both_fit):
            why = "--delete-bf16 yes" if both_fit else (
                f"{free_bytes(work) / GB:.0f} GB free beside the bf16 folder, int4 needs "
                f"~{INT4_BYTES * (layers or 48) / 48 / GB:.0f} GB")
            notes.append(f"quantize_folder deleting each bf16 shard once read ({why})")
            r = run_worker("quantize-deleting", bf16, int4, reps)
            res.update(quantize_s=r["quantize_s"], quantize_rss_gib=r["peak_rss_gib"])
        else:
            res["quantize_s"], res["quantize_rss_gib"] = timed(
                [sys.executable, "-m", "qwen3moe.cli", "quantize", "--pretrained_model_dir", str(bf16),
                 "--output", str(int4), "--bits", "4", "--group_size", "128"])
    r = run_worker("reload", int4, int4, reps)
    res.update(r, reload_peak_rss_gib=r.pop("peak_rss_gib"))
    res["peak_rss_gib"] = max(v for k, v in res.items() if k.endswith("rss_gib"))
    res["int4_folder_gb"] = sum(f.stat().st_size for f in int4.iterdir()) / GB
    return res, notes


def report(res: dict, notes: list[str]) -> list[str]:
    lines = [f"{k} = {v:.2f}" for k, v in res.items()]
    for key, (op, target) in TARGETS.items():
        if key in res:
            ok = res[key] <= target if op == "<=" else res[key] >= target
            lines.append(f"target {key} {op} {target}: {res[key]:.2f} {'met' if ok else 'MISSED'}")
    return lines + notes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/work/data/big")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--delete-bf16", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a smoke test of the pipeline)")
    ap.add_argument("--shard-size", type=int, default=5_000_000_000)
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument("--worker", choices=("quantize-deleting", "reload"))
    ap.add_argument("--src")
    ap.add_argument("--dst")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.src, a.dst, a.reps)))
        return
    load0 = os.getloadavg()[0]
    res, notes = pipeline(Path(a.work), a.reps, a.delete_bf16, a.layers, a.shard_size)
    lines = report(res, notes) + [f"1-min load at start/end: {load0:.1f}/{os.getloadavg()[0]:.1f} (2 cores)"]
    print("\n".join(lines))
    if not a.no_results:
        cmd = "OMP_WAIT_POLICY=PASSIVE python bench/big.py " + " ".join(sys.argv[1:])
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(f"\n## Qwen3-30B-A3B, 48 layers, int4 g128 (bench/big.py)\n\n{stamp}, `{cmd.strip()}`"
                     "\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
