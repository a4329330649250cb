"""`make demo` / `python -m qwen3moe.demo`: pretrain the `tiny` Qwen3-MoE on CPU, then generate.

1. Corpus: English docstrings harvested at run time from the Python standard library
   (`inspect.getdoc` over modules, classes, functions, methods), written as jsonl and
   preprocessed into Megatron .bin/.idx (qwen3moe preprocess, tiny BPE tokenizer in
   qwen3moe/assets/tiny-tokenizer, EOD appended), read back in Megatron GPTDataset order.
2. Pretrain: the run is a task config assembled by qwen3moe/training/recipe.py as `qwen3moe
   pretrain` does (compiled TrainStep, AdamW, cosine schedule with warmup, clipping, HF aux
   loss 1e-3), one log line per interval.
3. Save an HF folder to output/demo/checkpoint/, the loss curve (loss.png), greedy
   continuations to text_generation_result.txt, and print the loss drop from the first-10-step
   mean to the last-10-step mean.
Options: --steps N (or env QWEN3MOE_DEMO_STEPS), --out DIR, --batch, --seq-len, --budget-s.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent / "assets" / "tiny-tokenizer"
STDLIB_MODULES = (
    "abc argparse array ast asyncio base64 bisect builtins calendar cmath codecs collections "
    "colorsys configparser contextlib copy csv dataclasses datetime decimal difflib dis email "
    "enum fileinput fnmatch fractions functools gettext glob gzip hashlib heapq hmac html http "
    "imaplib inspect io ipaddress itertools json locale logging lzma mailbox math mimetypes "
    "multiprocessing numbers operator optparse os pathlib pickle pickletools platform plistlib "
    "poplib pprint queue quopri random re reprlib sched secrets selectors shelve shlex shutil "
    "smtplib socket sqlite3 ssl statistics string struct subprocess tarfile tempfile textwrap "
    "threading timeit tokenize trace traceback types typing unittest urllib uuid warnings wave "
    "weakref xml zipfile zlib").split()
PROMPTS = ("Return the", "This module provides", "If the argument is", "Create a new")


def harvest_docstrings(max_chars: int = 3_000_000) -> list[str]:
    """Docstrings of stdlib modules and their public classes, functions and methods (deduplicated)."""
    docs, seen, total = [], set(), 0
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # optional modules (e.g. sqlite3, ssl) may be missing
            continue
        for obj in _walk(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
                total += len(doc)
                if total >= max_chars:
                    return docs
    return docs


def _walk(mod):
    yield mod
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj):
            yield obj
            yield from (v for k, v in sorted(vars(obj).items())
                        if not k.startswith("_") and (inspect.isroutine(v) or isinstance(v, property)))
        elif inspect.isroutine(obj):
            yield obj


def build_megatron_corpus(tok, out: Path) -> str:
    """Docstrings -> jsonl -> Megatron .bin/.idx with EOD (qwen3moe preprocess, cached); the prefix."""
    import json

    from qwen3moe.io.preprocess import Options, preprocess

    data = out / "data"
    prefix = data / "stdlib_docs_text_document"
    if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
        data.mkdir(parents=True, exist_ok=True)
        docs = harvest_docstrings()
        jsonl = data / "stdlib_docs.jsonl"
        jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        preprocess(Options(str(jsonl), str(data / "stdlib_docs"), str(ASSETS), append_eod=True,
                           eod_token=tok.eos_token))
        print(f"corpus: {len(docs):,} stdlib docstrings, {sum(map(len, docs)):,} chars -> {prefix}.bin/.idx")
    return str(prefix)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=int(os.environ.get("QWEN3MOE_DEMO_STEPS", 600)))
    p.add_argument("--out", default=os.environ.get("QWEN3MOE_DEMO_OUT", "output/demo"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--budget-s", type=float, default=420.0, help="stop training after this many seconds")
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def task_config(tok, prefix: str, args):
    """The demo's run as a task config, assembled by qwen3moe/training/recipe.py like `qwen3moe
    pretrain`: tiny preset, AdamW (decay off for norms and biases), cosine schedule with warmup,
    clipping at 1.0, HF aux loss 1e-3, GPTDataset samples of seq_len - 1 (+1) tokens."""
    from qwen3moe.training.task_config import load_task_config

    return load_task_config(None, extra={
        "seed": args.seed, "output_dir": args.out, "model.preset": "tiny",
        "model.model_config": {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                               "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
                               "moe_aux_loss_coeff": 1e-3, "moe_router_load_balancing_type": "hf"},
        "runner_config.batch_size": args.batch, "runner_config.train_steps": args.steps,
        "runner_config.time_budget_s": args.budget_s, "runner_config.log_interval": max(1, args.steps // 20),
        "optimizer.weight_decay": 0.1, "optimizer.no_decay_norms_and_biases": True,
        "lr_schedule.type": "CosineWithWarmUpLR", "lr_schedule.learning_rate": args.lr,
        "lr_schedule.warmup_steps": max(1, args.steps // 20), "lr_schedule.min_lr": args.lr / 10,
        "train_dataset.data_loader.config.data_path": [prefix],
        "train_dataset.data_loader.config.seq_length": args.seq_len - 1,  # rows of seq_len tokens
        "train_dataset.data_loader.config.seed": args.seed,
        "train_dataset.data_loader.config.eod": None, "train_dataset.data_loader.config.pad": None})


def train(run) -> list[dict]:
    """Fit the assembled run; one log line per interval, no training checkpoints (the demo
    saves an HF folder at the end)."""
    from qwen3moe.training.trainer import Trainer, TrainerConfig

    r = run.cfg.runner_config
    cfg = TrainerConfig(total_steps=run.steps, log_interval=r.log_interval, time_budget_s=r.time_budget_s)
    return Trainer(run.step, run.data, cfg, log=lambda s: print(s, flush=True)).fit()


def batch_lm_loss(model, batch: dict) -> float:
    """Mean next-token cross-entropy of `model` on one training batch (the logged `lm` value)."""
    return float(model(batch["input_ids"], labels=batch["labels"]).lm_loss.asnumpy())


def write_loss_curve(history: list[dict], out: Path) -> Path:
    """The LM loss per logged step as loss.png (matplotlib imported here: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [m["lm_loss"] for m in history], label="lm loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    path = out / "loss.png"
    fig.savefig(path, dpi=100)
    return path


def greedy_continue(model, tok, prompt: str, new_tokens: int) -> str:
    ids = np.asarray([tok.encode(prompt)], dtype=np.int64)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, ignore_eos=False)
    new = np.asarray(out)[0, ids.shape[1]:]
    return tok.decode([int(t) for t in new if t != tok.pad_token_id], skip_special_tokens=True)


def main(argv=None) -> int:
    import mindspore as ms

    from qwen3moe.io.hf_checkpoint import copy_tokenizer_files
    from qwen3moe.io.tokenizer import Tokenizer
    from qwen3moe.training import recipe

    args = parse_args(argv)
    t0 = time.perf_counter()
    ms.set_device("CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_pretrained(ASSETS)
    prefix = build_megatron_corpus(tok, out)
    run = recipe.assemble(task_config(tok, prefix, args))
    model = run.model
    print(f"model: tiny preset, {model.num_parameters():,} parameters "
          f"({model.num_parameters(active=True):,} active), batch {args.batch} x {args.seq_len}")
    history = train(run)
    # the step-1 batch again with the trained weights: logged step 1 was this batch before any update
    final = batch_lm_loss(model, run.data.batch(0))
    ckpt = out / "checkpoint"
    model.save_pretrained(ckpt)
    copy_tokenizer_files(ASSETS, ckpt)
    curve = write_loss_curve(history, out)
    lines = [f"### {p!r}\n{p}{greedy_continue(model, tok, p, args.new_tokens)}\n" for p in PROMPTS]
    (out / "text_generation_result.txt").write_text("\n".join(lines))
    print("".join(lines))
    return report(history, final, ckpt, curve, out, time.perf_counter() - t0)


def report(history: list[dict], final: float, ckpt: Path, curve: Path, out: Path, wall: float) -> int:
    n = min(10, len(history) // 2)
    first = float(np.mean([m["lm_loss"] for m in history[:n]]))
    last = float(np.mean([m["lm_loss"] for m in history[-n:]]))
    drop = (first - last) / first
    step_s = np.median([m["step_time_s"] for m in history[1:]]) if len(history) > 1 else float("nan")
    print(f"saved HF folder {ckpt}; loss curve {curve}")
    print(f"generations in {out / 'text_generation_result.txt'}")
    print(f"steps {len(history)}, median step {step_s * 1000:.0f} ms, wall {wall:.0f} s")
    print(f"loss drop: first-{n}-step mean {first:.4f} -> last-{n}-step mean {last:.4f} = {drop:.1%}")
    print(f"step-1 batch: lm loss {history[0]['lm_loss']:.6f} at step 1 -> {final:.6f} after training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
