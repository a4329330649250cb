"""`qwen3moe preprocess`: jsonl -> Megatron .bin/.idx (see qwen3moe/io/preprocess.py)."""
from __future__ import annotations

import argparse
import sys

from qwen3moe.cli import CliError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="tokenize a jsonl corpus into Megatron .bin/.idx")
    p.add_argument("--input", required=True, help="jsonl file, one document per line")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.{bin,idx}")
    p.add_argument("--tokenizer-dir", required=True, help="folder with tokenizer.json")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    p.add_argument("--eod-token", default=None, help="default <|endoftext|>, else the eos token")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--dtype", choices=("auto", "uint16", "int32"), default="auto")
    p.add_argument("--log-interval", type=int, default=1000)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from qwen3moe.io.preprocess import Options, PreprocessError, preprocess

    if args.workers < 1:
        raise CliError(f"--workers must be >= 1, got {args.workers}")
    opts = Options(args.input, args.output_prefix, args.tokenizer_dir, tuple(args.json_keys), args.append_eod,
                   args.eod_token, args.workers, args.dtype, args.log_interval)
    bar = tqdm(unit="doc", file=sys.stderr, disable=not sys.stderr.isatty(), mininterval=0.5)
    state = {"docs": 0, "tokens": 0, "tps": 0.0}

    def progress(docs: int, tokens: int, dps: float, tps: float) -> None:
        bar.update(docs - state["docs"])
        bar.set_postfix(tokens=tokens, tok_s=f"{tps:,.0f}")
        state.update(docs=docs, tokens=tokens, tps=tps)

    try:
        prefixes = preprocess(opts, progress)
    except PreprocessError as exc:
        raise CliError(str(exc)) from None
    finally:
        bar.close()
    for key, prefix in prefixes.items():
        print(f"{key}: {prefix}.bin/.idx ({state['docs']} documents, {state['tokens']} tokens, "
              f"{state['tps']:,.0f} tokens/s)")
    return 0
