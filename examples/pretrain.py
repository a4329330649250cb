"""Pretrain a small Qwen3-MoE on Megatron-format data with the public API.

    python examples/pretrain.py --data PREFIX_text_document [--steps 50] [--out out/pretrain]
    python examples/pretrain.py --jsonl docs.jsonl --tokenizer-dir DIR   # preprocess first

Builds the `tiny` preset (or --preset), reads samples in megatron-core GPTDataset order, trains
with the compiled TrainStep (AdamW, cosine schedule, LM + 1e-3 aux loss), prints tokens/s and
peak memory, and saves an HF folder.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
from qwen3moe.io.gpt_dataset import build_gpt_dataset
from qwen3moe.io.gpt_loader import GPTBatches
from qwen3moe.io.preprocess import Options, preprocess
from qwen3moe.training import AdamW, DEFAULT_NO_DECAY, cosine_with_warmup
from qwen3moe.training.step import TrainStep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="Megatron prefix (without .bin/.idx)")
    ap.add_argument("--jsonl", help="or a jsonl corpus to preprocess first")
    ap.add_argument("--tokenizer-dir", help="tokenizer folder for --jsonl")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="output/pretrain")
    args = ap.parse_args()
    out = Path(args.out)
    prefix = args.data
    if prefix is None:
        if not (args.jsonl and args.tokenizer_dir):
            ap.error("give --data PREFIX, or --jsonl FILE with --tokenizer-dir DIR")
        prefix = preprocess(Options(args.jsonl, str(out / "data" / "corpus"), args.tokenizer_dir,
                                    append_eod=True))["text"]

    cfg = Qwen3MoeConfig.from_preset(args.preset, vocab_size=args.vocab_size)
    model = Qwen3MoeForCausalLM(cfg)
    data = GPTBatches(build_gpt_dataset(prefix, args.seq_len, args.steps * args.batch), args.batch)
    opt = AdamW(model.trainable_params(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                no_decay=DEFAULT_NO_DECAY)
    step = TrainStep(model, opt, aux_coef=1e-3, clip=1.0,
                     schedule=cosine_with_warmup(args.lr, warmup_steps=max(1, args.steps // 10),
                                                 total_steps=args.steps, min_lr=args.lr / 10))
    t0, tokens = time.perf_counter(), 0
    for i in range(args.steps):
        batch = data.batch(i)
        m = step(batch)
        tokens += batch["input_ids"].size
        if i % max(1, args.steps // 10) == 0 or i == args.steps - 1:
            print(f"step {i + 1:4d}/{args.steps} loss {m['loss']:.4f} aux {m['aux']:.3f} "
                  f"lr {m['lr']:.2e}")
    dt = time.perf_counter() - t0
    model.save_pretrained(out / "checkpoint")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"[{tokens / dt:.0f} tokens/s over {args.steps} steps (first includes compile); "
          f"peak RSS {peak:.0f} MiB; saved {out / 'checkpoint'}]")


if __name__ == "__main__":
    main()
