"""Write an FP8 folder in the layout of Qwen's `*-FP8` releases from an HF folder, with torch, plus
torch's own dequantization of it as the reference our NumPy reader is tested against.

    /work/data/refvenv/bin/python tools/make_fp8_fixture.py --src tests/fixtures/hf/roundtrip-bf16 \
        --out tests/fixtures/hf/tiny-fp8 --layers 2 --block 16 24 --shard_size 220000
    /work/data/refvenv/bin/python tools/make_fp8_fixture.py --src /work/data/synth-2l \
        --out /work/data/synth-2l-fp8 --record     # real geometry, Qwen's [128, 128] (bench only)

Runs in the reference venv (torch 2.13 cpu, safetensors); imports nothing from qwen3moe, so
the encoding, the e4m3 decoding and the dequantization here are independent of the library's.
Layout (what Qwen/Qwen3-30B-A3B-FP8 ships): config.json with
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                          "weight_block_size": [bm, bn]}
every attention / expert / dense-MLP projection `<module>.weight` as F8_E4M3 [O, I] with
`<module>.weight_scale_inv` [ceil(O / bm), ceil(I / bn)] (BF16 like Qwen's; --scale_dtype
float32 as DeepSeek-V3's), everything else (embeddings, lm_head, norms, router) BF16; shards of
at most --shard_size bytes and model.safetensors.index.json. Streams tensor by tensor: memory is
one output shard. Encoding per block: scale = amax / 448 (1 for an all-zero block) rounded to the
scale dtype, code = float8_e4m3fn(clamp(w / scale, +-448)) (torch's cast: round to nearest
even). Blocks need not divide the shapes: the fixture uses a non-square block that leaves
partial blocks in both dims, which Qwen's 128 x 128 on 64-wide tensors would not.

Reference files written next to the weights (not read by any loader):
  fp8_reference.json  {tensor: {"f32": sha256, "bf16": sha256}} of torch's dequantization
                      q.float() * scale_inv.float() (block-expanded), as float32 bytes and
                      rounded .to(bfloat16) (what transformers' dequantize=True holds), for every
                      F8 tensor; plus the versions used.
  fp8_reference.npz   "e4m3_codes": torch's float32 value of each of the 256 codes;
                      the float32 dequantization of the --record tensors in full.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
PROJECTION = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.experts\.\d+\.(gate|up|down)_proj|mlp\.(gate|up|down)_proj)"
                        r"\.weight$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json")


def blocks_up(x: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """[SR, SC] per-block values -> [SR * bm, SC * bn] (each repeated over its block)."""
    return x.repeat_interleave(bm, 0).repeat_interleave(bn, 1)


def encode(w: torch.Tensor, bm: int, bn: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] -> (float8_e4m3fn codes [O, I], scale_inv [ceil(O/bm), ceil(I/bn)] in scale_dtype)."""
    O, I = w.shape
    SR, SC = -(-O // bm), -(-I // bn)
    padded = torch.zeros(SR * bm, SC * bn, dtype=torch.float32)
    padded[:O, :I] = w.float()
    amax = padded.reshape(SR, bm, SC, bn).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
    q = (padded / blocks_up(scale.float(), bm, bn)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q[:O, :I].contiguous(), scale


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    O, I = q.shape
    return q.float() * blocks_up(scale_inv.float(), bm, bn)[:O, :I]


def sha(t: torch.Tensor) -> str:
    raw = t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else t.dtype).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def source_tensors(src: Path, layers: int | None):
    """(name, tensor) of the folder, one at a time (a real-size folder is never held whole)."""
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for name in fh.keys():
                m = LAYER.match(name)
                if layers is None or not m or int(m.group(1)) < layers:
                    yield name, fh.get_tensor(name)


def converted(tensors, bm: int, bn: int, scale_dtype: torch.dtype, ref: dict, record: dict):
    """Output (name, tensor) pairs; the dequantization hashes go to ref, --record tensors to record."""
    for name, t in tensors:
        if not PROJECTION.search(name):
            yield name, t.to(torch.bfloat16)
            continue
        q, s = encode(t, bm, bn, scale_dtype)
        yield name, q
        yield name + "_scale_inv", s
        w = dequantize(q, s, bm, bn)
        ref[name] = {"f32": sha(w), "bf16": sha(w.to(torch.bfloat16))}
        if name in record:
            record[name] = w.numpy()


def write_shards(out_dir: Path, pairs, shard_size: int) -> int:
    """Shards of at most shard_size bytes (a tensor never straddles), then the index."""
    shards, current, size = [], {}, 0
    for name, t in pairs:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_size:
            shards.append(_save(out_dir, len(shards), current))
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(_save(out_dir, len(shards), current))
    n = len(shards)
    weight_map, total = {}, 0
    for i, (tmp, names, nbytes) in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tmp.rename(out_dir / fname)
        weight_map.update({k: fname for k in names})
        total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return n


def _save(out_dir: Path, i: int, tensors: dict) -> tuple[Path, list[str], int]:
    tmp = out_dir / f"shard-{i}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    return tmp, list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, type=Path, help="HF folder (per-expert layout)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    ap.add_argument("--block", type=int, nargs=2, default=[128, 128], metavar=("ROWS", "COLS"))
    ap.add_argument("--scale_dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--shard_size", type=int, default=5_000_000_000, help="bytes per shard (hub: 5 GB)")
    ap.add_argument("--record", nargs="*", default=["model.layers.0.self_attn.q_proj.weight",
                                                    "model.layers.1.mlp.experts.3.down_proj.weight"],
                    help="F8 tensors whose torch dequantization is stored in full")
    args = ap.parse_args()
    bm, bn = args.block
    cfg = json.loads((args.src / "config.json").read_text())
    if args.layers is not None:
        cfg.update(num_hidden_layers=args.layers, max_window_layers=min(cfg.get("max_window_layers", args.layers),
                                                                       args.layers))
        cfg["mlp_only_layers"] = [i for i in cfg.get("mlp_only_layers", []) if i < args.layers]
    cfg["torch_dtype"] = "bfloat16"
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [bm, bn]}
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    ref, record = {}, dict.fromkeys(args.record)
    n = write_shards(args.out, converted(source_tensors(args.src, args.layers), bm, bn,
                                         getattr(torch, args.scale_dtype), ref, record), args.shard_size)
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in SIDE_FILES:
        if (args.src / f).is_file():
            shutil.copy2(args.src / f, args.out / f)
    info = {"versions": {"torch": torch.__version__, "safetensors": safetensors.__version__},
            "tensors": dict(sorted(ref.items()))}
    (args.out / "fp8_reference.json").write_text(json.dumps(info, indent=1) + "\n")
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    np.savez_compressed(args.out / "fp8_reference.npz", e4m3_codes=codes.numpy(),
                        **{k: v for k, v in record.items() if v is not None})
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out}: {len(ref)} F8 tensors (block [{bm}, {bn}], {args.scale_dtype} scales) in {n} "
          f"shard(s), {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
