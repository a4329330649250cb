"""`qwen3moe wikitext-to-jsonl`: WikiText-103 tokens file -> one JSON line per article."""
from __future__ import annotations

import argparse

from qwen3moe.cli import CliError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("wikitext-to-jsonl", help="convert wiki.*.tokens into article-per-line jsonl")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--keep-artifacts", action="store_true",
                   help="keep WikiText's ' @-@ ' style tokenisation instead of undoing it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qwen3moe.io.atomic import OutputError
    from qwen3moe.io.wikitext import WikitextError, convert

    try:
        n = convert(args.input, args.output, undo_artifacts=not args.keep_artifacts)
    except (WikitextError, OutputError) as exc:
        raise CliError(str(exc)) from None
    print(f"{n} articles -> {args.output}")
    return 0
