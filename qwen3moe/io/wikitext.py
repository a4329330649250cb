"""WikiText-103 raw token files -> one JSON line per article.

Format of wiki.*.tokens: an article starts at a top-level heading line " = Title = " (exactly one
'=' on each side); subsections are " = = Sub = = " and deeper; paragraphs are lines of
space-separated tokens where the original tokeniser split numbers and hyphens as " @-@ ", " @,@ ",
" @.@ " and put spaces before punctuation. `detokenize` undoes those artefacts.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator

from qwen3moe.errors import Qwen3MoeError
from qwen3moe.io.atomic import atomic_file

TOP_HEADING = re.compile(r"^ = (?!=)(.*?) = $")
_AT = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")]
_PUNCT = re.compile(r" ([.,;:!?%)\]}])")
_OPEN = re.compile(r"([(\[{]) ")
_CONTRACTION = re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d)\b")


def detokenize(text: str) -> str:
    """Undo WikiText tokenisation artefacts (a readable approximation of the original text)."""
    for a, b in _AT:
        text = text.replace(a, b)
    text = _PUNCT.sub(r"\1", text)
    text = _OPEN.sub(r"\1", text)
    text = _CONTRACTION.sub(r"\1", text)
    text = re.sub(r'" ([^"]*?) "', r'"\1"', text)  # quotes hug their content
    return text


def articles(lines: Iterable[str], undo_artifacts: bool = True) -> Iterator[dict]:
    """Yield {"title", "text"} per article; the text keeps subsection headings and paragraphs."""
    title, body = None, []
    for raw in lines:
        line = raw.rstrip("\n")
        m = TOP_HEADING.match(line)
        if m:
            if title is not None:
                yield _article(title, body, undo_artifacts)
            title, body = m.group(1).strip(), []
        elif title is not None and line.strip():
            body.append(line.strip())
    if title is not None:
        yield _article(title, body, undo_artifacts)


def _article(title: str, body: list[str], undo: bool) -> dict:
    fix = detokenize if undo else (lambda s: s)
    paragraphs = []
    for line in body:
        sub = re.match(r"^(=(?: =)+) (.*?) (=(?: =)+)$", line)
        paragraphs.append(fix(sub.group(2)) if sub else fix(line))
    return {"title": fix(title), "text": "\n\n".join([fix(title)] + paragraphs)}


class WikitextError(Qwen3MoeError, ValueError):
    """Bad input or output path: one line naming the file (and line)."""


def read_lines(path: str) -> Iterator[str]:
    """Lines of a UTF-8 file; invalid UTF-8 is an error naming the line, not a traceback."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise WikitextError(f"{path}: line {lineno} is not valid UTF-8 ({exc.reason} at byte "
                                    f"{exc.start} of the line)") from None


def convert(input_path: str, output_path: str, undo_artifacts: bool = True) -> int:
    """Write the jsonl atomically; returns the number of articles. On any error (no article,
    bad input, same file as the input) the output is left as it was."""
    if not os.path.exists(input_path) or os.path.isdir(input_path):  # a pipe (/dev/stdin) is fine
        raise WikitextError(f"{input_path}: {'is a folder' if os.path.isdir(input_path) else 'not found'}")
    if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        raise WikitextError(f"--output {output_path} is the same file as --input {input_path}")
    n = 0
    with atomic_file(output_path) as tmp, open(tmp, "w", encoding="utf-8") as dst:
        for art in articles(read_lines(input_path), undo_artifacts):
            dst.write(json.dumps(art, ensure_ascii=False) + "\n")
            n += 1
        if n == 0:
            raise WikitextError(f"{input_path}: no ' = Title = ' article headings found (is this a WikiText file?)")
    return n
