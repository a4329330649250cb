"""Write an FP8 folder in the layout of Qwen's `*-FP8` releases from an HF folder, with torch, plus
torch's own dequantization of it as the reference our NumPy reader is tested against.

    /work/data/refvenv/bin/python tools/make_fp8_fixture.py --src tests/fixtures/hf/roundtrip-bf16 \
        --out tests/fixtures/hf/tiny-fp8 --layers 2 --block 16 24

Runs in the reference venv (torch 2.13 cpu, safetensors); imports nothing from qwen3moe, so
the encoding, the e4m3 decoding and the dequantization here are independent of the library's.
Layout (what Qwen/Qwen3-30B-A3B-FP8 ships): config.json with
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                          "weight_block_size": [bm, bn]}
every attention / expert / dense-MLP projection `<module>.weight` as F8_E4M3 [O, I] with
`<module>.weight_scale_inv` [ceil(O / bm), ceil(I / bn)] (BF16 like Qwen's; --scale_dtype
float32 as DeepSeek-V3's), everything else (embeddings, lm_head, norms, router) BF16; 2 shards
and model.safetensors.index.json. Encoding per block: scale = amax / 448 (1 for an all-zero
block) rounded to the scale dtype, code = float8_e4m3fn(clamp(w / scale, +-448)) (torch's cast:
round to nearest even). Blocks need not divide the shapes: the fixture uses a non-square block
that leaves partial blocks in both dims, which Qwen's 128 x 128 on 64-wide tensors would not.

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
from safetensors.torch import load_file, save_file

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


def read_folder(src: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def convert(tensors: dict, layers: int | None, bm: int, bn: int, scale_dtype: torch.dtype):
    out, ref = {}, {}
    for name, t in tensors.items():
        m = LAYER.match(name)
        if layers is not None and m and int(m.group(1)) >= layers:
            continue
        if not PROJECTION.search(name):
            out[name] = t.to(torch.bfloat16)
            continue
        q, s = encode(t, bm, bn, scale_dtype)
        out[name], out[name + "_scale_inv"] = q, s
        ref[name] = dequantize(q, s, bm, bn)
    return out, ref


def write_shards(out_dir: Path, tensors: dict) -> None:
    names = list(tensors)
    half = len(names) // 2
    weight_map, total = {}, 0
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        total += sum(tensors[n].numel() * tensors[n].element_size() for n in part)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, type=Path, help="HF folder (per-expert layout)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    ap.add_argument("--block", type=int, nargs=2, default=[128, 128], metavar=("ROWS", "COLS"))
    ap.add_argument("--scale_dtype", choices=("bfloat16", "float32"), default="bfloat16")
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
    out, ref = convert(read_folder(args.src), args.layers, bm, bn, getattr(torch, args.scale_dtype))
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    write_shards(args.out, out)
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in SIDE_FILES:
        if (args.src / f).is_file():
            shutil.copy2(args.src / f, args.out / f)
    record = {"versions": {"torch": torch.__version__, "safetensors": safetensors.__version__},
              "tensors": {n: {"f32": sha(v), "bf16": sha(v.to(torch.bfloat16))} for n, v in sorted(ref.items())}}
    (args.out / "fp8_reference.json").write_text(json.dumps(record, indent=1) + "\n")
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    np.savez_compressed(args.out / "fp8_reference.npz", e4m3_codes=codes.numpy(),
                        **{n: ref[n].numpy() for n in args.record})
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out}: {len(ref)} F8 tensors (block [{bm}, {bn}], {args.scale_dtype} scales), "
          f"{len(out) - 2 * len(ref)} others, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
