"""`qwen3moe quantize --pretrained_model_dir D --output Q --bits 4 [--group_size 128]`.

Writes a GPTQ-format HF folder (config.json quantization_config, tokenizer files, safetensors
shards with qweight/qzeros/scales/g_idx per projection): round-to-nearest symmetric weight-only
quantization of the expert, attention and dense-MLP projections, everything else copied. Streams
tensor by tensor (peak memory: one source tensor plus its quantized form) into a temporary
folder renamed into place when complete. `Qwen3MoeForCausalLM.from_pretrained(Q)` reloads it.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("quantize", help="float (or FP8) HF folder -> int8/int4 GPTQ-format folder")
    p.add_argument("--pretrained_model_dir", required=True, help="HF folder (bf16/fp32/fp16 weights, or an FP8 release: dequantized while read)")
    p.add_argument("--output", required=True, help="folder to write (replaced atomically if it exists)")
    p.add_argument("--bits", type=int, default=4, help="4 or 8")
    p.add_argument("--group_size", type=int, default=None,
                   help="32, 64, 128 or -1 (per output channel); default 128 for 4 bits, -1 for 8")
    p.add_argument("--max_shard_size", default="5GB", help="largest shard, e.g. 5GB")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qwen3moe.cli import CliError
    from qwen3moe.io.gptq import quantize_folder
    from qwen3moe.layers.quant import QuantizationConfig

    src = Path(args.pretrained_model_dir)
    if not (src / "config.json").is_file():
        raise CliError(f"--pretrained_model_dir {src}: not a model folder (no config.json)")
    if Path(args.output).resolve() == src.resolve():
        raise CliError("--output must differ from --pretrained_model_dir")
    t0 = time.perf_counter()
    try:
        group = args.group_size if args.group_size is not None else (128 if args.bits == 4 else -1)
        qc = QuantizationConfig(args.bits, group)
        stats = quantize_folder(str(src), args.output, qc, args.max_shard_size)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"quantize: {stats['quantized']} projections to {qc.bits}-bit (group_size {qc.group_size}), "
          f"{stats['tensors']} tensors, {stats['bytes'] / 2**30:.2f} GiB in {args.output}; "
          f"{time.perf_counter() - t0:.1f} s, peak RSS {peak_mib:.0f} MiB", file=sys.stderr)
    return 0
