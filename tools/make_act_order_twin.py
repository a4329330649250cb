"""An act-order twin of a GPTQ int4 folder, for speed runs (bench/act_order.py): the same
geometry and tensor sizes, every projection's input columns shuffled by a random permutation
with `g_idx` following them and `desc_act: true`, the projections of one input (q/k/v, an
expert's gate/up) sharing their map as GPTQ's own maps do. A different model (the columns no
longer meet their inputs), so only its speed and memory mean anything.

    python tools/make_act_order_twin.py SRC_GPTQ_INT4_FOLDER OUT_FOLDER [--seed 0]

Streams: the folder is copied, then each qweight / g_idx is rewritten in place through a
memmap (same shapes, so the safetensors headers stay); peak RSS ~ one projection. Needs a
4-bit GPTQ folder with a g_idx per projection (what `qwen3moe quantize` writes).
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
from pathlib import Path

import numpy as np

SHIFTS = (np.arange(8, dtype=np.uint32) * 4)[None, :, None]  # 8 nibbles of a word, low first


def shuffle_file(path: Path, rng: np.random.Generator, maps: dict) -> None:
    """Every `<prefix>.qweight` [I / 8, O] int32 of one shard: rows of inputs permuted, g_idx too."""
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    base = 8 + n
    mm = np.memmap(path, np.uint8, "r+")
    for key, meta in header.items():
        if not key.endswith(".qweight"):
            continue
        prefix = key[:-len(".qweight")]
        a, b = meta["data_offsets"]
        words = mm[base + a:base + b].view(np.uint32).reshape(meta["shape"])
        values = ((words[:, None, :] >> SHIFTS) & 15).reshape(-1, words.shape[1])  # [I, O]
        I = values.shape[0]
        same_input = prefix.replace("up_proj", "gate_proj").replace("k_proj", "q_proj").replace("v_proj", "q_proj")
        perm = maps.setdefault(same_input, rng.permutation(I))
        words[:] = (values[perm].reshape(I // 8, 8, -1) << SHIFTS).sum(1, dtype=np.uint32)
        ga, gb = header[f"{prefix}.g_idx"]["data_offsets"]
        g_idx = mm[base + ga:base + gb].view(np.int32)
        g_idx[:] = g_idx[perm]
    mm.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)
    cfg = json.loads((src / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != "gptq" or qc.get("bits") != 4 or qc.get("desc_act"):
        raise SystemExit(f"{src}: expected a 4-bit GPTQ folder without desc_act, got {qc}")
    if out.exists():
        raise SystemExit(f"{out}: exists")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.copytree(src, tmp)
    cfg["quantization_config"]["desc_act"] = True
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    rng, maps = np.random.default_rng(args.seed), {}
    for f in sorted(tmp.glob("*.safetensors")):
        shuffle_file(f, rng, maps)
    tmp.rename(out)


if __name__ == "__main__":
    main()
