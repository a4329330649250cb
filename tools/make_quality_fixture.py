"""Train the quantization-quality fixture with the demo pipeline and write it plus held-out text.

    python tools/make_quality_fixture.py [--steps 600] [--out tests/fixtures/quality]

The demo's corpus (stdlib docstrings -> Megatron .bin/.idx, tiny BPE tokenizer), its model
builder's tokenizer wiring and its training loop (qwen3moe.demo.train: AdamW, cosine schedule,
TrainStep), on a geometry every int4 group size divides: hidden 128, attention 4 x 32 = 128,
expert ffn 128, 8 experts top-2, 3 layers (the demo's tiny preset has ffn 32, which g64/g128
cannot divide). Saved in bfloat16 (~3 MB): quantization starts from bf16 weights as it does for
the hub's releases, and fp32 compute of those weights is the reference.

Held-out text: docstrings of standard-library modules that are NOT in the demo corpus' module
list (qwen3moe.demo.STDLIB_MODULES), minus any docstring that also occurs in the training
corpus, written as heldout.txt.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwen3moe import demo  # noqa: E402

HELDOUT_MODULES = ("graphlib zoneinfo netrc getopt cmd code codeop pstats filecmp linecache "
                   "binascii bz2 doctest runpy sysconfig tomllib stringprep symtable tabnanny "
                   "webbrowser wsgiref.util concurrent.futures").split()
GEOMETRY = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                moe_intermediate_size=128, intermediate_size=256, num_experts=8,
                num_experts_per_tok=2, num_hidden_layers=3, max_window_layers=3,
                max_position_embeddings=512)


def heldout_docs(train_docs: set[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for name in HELDOUT_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        for obj in demo._walk(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40 and doc not in train_docs and doc not in out:
                out.append(doc)
                total += len(doc)
                if total >= max_chars:
                    return out
    return out


def main(argv=None) -> None:
    import mindspore as ms

    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.io.tokenizer import Tokenizer
    from qwen3moe.layers.dtypes import set_init_seed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "quality"))
    ap.add_argument("--heldout-chars", type=int, default=40_000)
    ap.add_argument("--work", default=None, help="corpus/cache folder (default: a temp folder)")
    a = ap.parse_args(argv)
    args = demo.parse_args(["--steps", str(a.steps), "--budget-s", "3600"])
    ms.set_device("CPU")
    ms.set_seed(args.seed)
    tok = Tokenizer.from_pretrained(demo.ASSETS)
    work = Path(a.work or tempfile.mkdtemp(prefix="quality-fixture-"))
    prefix = demo.build_megatron_corpus(tok, work)
    set_init_seed(args.seed)
    cfg = Qwen3MoeConfig.from_preset("tiny", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                     bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                                     **GEOMETRY)
    model = Qwen3MoeForCausalLM(cfg)
    history = demo.train(model, prefix, args)
    out = Path(a.out)
    ckpt = out / "model"
    model.save_pretrained(ckpt, dtype="bfloat16")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy2(demo.ASSETS / f, ckpt / f)
    train_docs = set(demo.harvest_docstrings())
    docs = heldout_docs(train_docs, a.heldout_chars)
    (out / "heldout.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    print(f"trained {len(history)} steps, lm loss {history[0]['lm_loss']:.3f} -> "
          f"{history[-1]['lm_loss']:.3f}; wrote {ckpt} and {out / 'heldout.txt'} "
          f"({len(docs)} docstrings, {sum(map(len, docs)):,} chars)")


if __name__ == "__main__":
    main()
