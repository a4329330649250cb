"""Pretrain a small Qwen3-MoE on Megatron-format data with the public API.

    python examples/pretrain.py --data PREFIX_text_document [--steps 50] [--out out/pretrain]
    python examples/pretrain.py --jsonl docs.jsonl --tokenizer-dir DIR   # preprocess first

Describes the run as a task config (the shape of `qwen3moe pretrain`'s YAML) and lets
qwen3moe.training.recipe assemble it: the `tiny` preset (or --preset), samples in megatron-core
GPTDataset order, the compiled TrainStep (AdamW, cosine schedule, LM + 1e-3 aux loss). Prints
tokens/s and peak memory, and saves an HF folder.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from qwen3moe.io.preprocess import Options, preprocess
from qwen3moe.training import recipe
from qwen3moe.training.task_config import load_task_config


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

    cfg = load_task_config(None, extra={
        "model.preset": args.preset, "model.model_config": {"vocab_size": args.vocab_size,
                                                            "moe_router_load_balancing_type": "hf",
                                                            "moe_aux_loss_coeff": 1e-3},
        "runner_config.batch_size": args.batch, "runner_config.train_steps": args.steps,
        "optimizer.weight_decay": 0.1, "optimizer.no_decay_norms_and_biases": True,
        "lr_schedule.type": "cosine", "lr_schedule.learning_rate": args.lr,
        "lr_schedule.warmup_steps": max(1, args.steps // 10), "lr_schedule.min_lr": args.lr / 10,
        "train_dataset.data_loader.config.data_path": [prefix],
        "train_dataset.data_loader.config.seq_length": args.seq_len,
        "train_dataset.data_loader.config.eod": None, "train_dataset.data_loader.config.pad": None})
    run = recipe.assemble(cfg)
    model, data, step = run.model, run.data, run.step
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
