"""`make demo` / `python -m qwen3moe.demo`: pretrain the `tiny` Qwen3-MoE on CPU, then generate.

1. Corpus: English docstrings harvested at run time from the Python standard library
   (`inspect.getdoc` over modules, classes, functions, methods), written as jsonl and
   preprocessed into Megatron .bin/.idx (qwen3moe preprocess, tiny BPE tokenizer in
   qwen3moe/assets/tiny-tokenizer, EOD appended), read back in Megatron GPTDataset order.
2. Pretrain with the compiled TrainStep (AdamW, cosine schedule with warmup, clipping,
   HF aux loss 1e-3), one log line per interval.
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
import shutil
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


def build_model(tok, seed: int):
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed

    set_init_seed(seed)
    cfg = Qwen3MoeConfig.from_preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                     bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    return Qwen3MoeForCausalLM(cfg)


def training_data(prefix: str, args):
    """Batches in Megatron GPTDataset sample order (seq_len + 1 tokens per sample, one-token overlap)."""
    from qwen3moe.io.gpt_dataset import build_gpt_dataset
    from qwen3moe.io.gpt_loader import GPTBatches

    ds = build_gpt_dataset(prefix, args.seq_len - 1, args.steps * args.batch, seed=args.seed)
    return GPTBatches(ds, args.batch)


def train(model, data, args) -> list[dict]:
    from qwen3moe.training import AdamW, DEFAULT_NO_DECAY, cosine_with_warmup
    from qwen3moe.training.step import TrainStep
    from qwen3moe.training.trainer import Trainer, TrainerConfig

    opt = AdamW(model.trainable_params(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                no_decay=DEFAULT_NO_DECAY)
    sched = cosine_with_warmup(args.lr, warmup_steps=max(1, args.steps // 20), total_steps=args.steps,
                               min_lr=args.lr / 10)
    step = TrainStep(model, opt, aux_coef=1e-3, z_coef=0.0, clip=1.0, schedule=sched)
    cfg = TrainerConfig(total_steps=args.steps, log_interval=max(1, args.steps // 20),
                        time_budget_s=args.budget_s)
    return Trainer(step, data, cfg, log=lambda s: print(s, flush=True)).fit()


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

    from qwen3moe.io.tokenizer import Tokenizer

    args = parse_args(argv)
    t0 = time.perf_counter()
    ms.set_device("CPU")
    ms.set_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_pretrained(ASSETS)
    prefix = build_megatron_corpus(tok, out)
    model = build_model(tok, args.seed)
    print(f"model: tiny preset, {model.num_parameters():,} parameters "
          f"({model.num_parameters(active=True):,} active), batch {args.batch} x {args.seq_len}")
    data = training_data(prefix, args)
    history = train(model, data, args)
    # the step-1 batch again with the trained weights: logged step 1 was this batch before any update
    final = batch_lm_loss(model, data.batch(0))
    ckpt = out / "checkpoint"
    model.save_pretrained(ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy2(ASSETS / f, ckpt / f)
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
