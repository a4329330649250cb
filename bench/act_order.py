"""Act-order GPTQ folders on the C++ kernels: a GPTQ folder against its act-order twin, one run.

    python tools/make_act_order_twin.py /work/data/synth-2l-q4 /work/data/synth-2l-q4ao
    OMP_WAIT_POLICY=PASSIVE python bench/act_order.py --plain /work/data/synth-2l-q4 \
        --act-order /work/data/synth-2l-q4ao [--reps 3] [--rounds 2]

The twin holds the same tensors with every projection's columns shuffled and `desc_act: true`
(GPTQ's act-order layout). One process sorts its columns by group at load and gathers the
activations to match (docs/quantization.md "Act-order folders"), so it should run as fast as
the plain folder: the ratios twin / plain of load time, prefill 1x512, decode b1 / b8 and peak
RSS are printed (bench/quant.py's worker, mode "stored"; each folder in --rounds processes,
interleaved; medians over the processes).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant import fmt, median_process, run_ours  # noqa: E402

KEYS = ("load_s", "prefill_tps", "decode_b1_tps", "decode_b8_tps", "peak_rss_mb")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plain", default="/work/data/synth-2l-q4")
    ap.add_argument("--act-order", default="/work/data/synth-2l-q4ao")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"plain": [], "act-order": []}
    with tempfile.TemporaryDirectory() as tmp:  # the workers' logits (different models: unused)
        for i in range(args.rounds):
            for name, folder in (("plain", args.plain), ("act-order", args.act_order)):
                r = run_ours(folder, "stored", args.reps, os.path.join(tmp, f"{name}-{i}.npy"))
                runs[name].append(r)
                print(f"round {i + 1}: {fmt(name, r)} (1-min load {r['load']:.1f})", flush=True)
    med = {name: median_process(rs) for name, rs in runs.items()}
    for name, r in med.items():
        print(f"median   {fmt(name, r)}")
    if all("failed" not in r for r in med.values()):
        print("act-order / plain: " + ", ".join(f"{k} {med['act-order'][k] / med['plain'][k]:.2f}x" for k in KEYS))
    print(f"1-min load at the end: {os.getloadavg()[0]:.1f} (2 cores)")


if __name__ == "__main__":
    main()
