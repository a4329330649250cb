"""Every README.md / docs/*.md code block marked `<!-- runnable ... -->` runs from the repo root.

Marked blocks must use only committed fixtures, so the docs fail CI when they rot. A block marked
`<!-- runnable slow -->` runs with the slow tests (`make test-slow`); one marked
`<!-- runnable expect -->` must be followed by a ```text block: its stdout must equal that text.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

BLOCK = re.compile(r"<!-- runnable([^>]*)-->\s*\n```(\w+)\n(.*?)```(?:\s*\n```text\n(.*?)```)?", re.S)


def runnable_blocks():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for i, (flags, lang, code, expected) in enumerate(BLOCK.findall(doc.read_text())):
            if re.search(r"\bexpect\b", flags) and not expected:
                raise AssertionError(f"{doc.name}: block {i} is marked expect but has no ```text block after it")
            marks = [pytest.mark.slow] if re.search(r"\bslow\b", flags) else []
            yield pytest.param(lang, code, expected if re.search(r"\bexpect\b", flags) else None,
                               id=f"{doc.name}-{i}-{lang}", marks=marks)


@pytest.mark.parametrize("lang, code, expected", list(runnable_blocks()))
def test_doc_block_runs(lang, code, expected, tmp_path):
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO),
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}")
    if lang == "python":
        cmd = [sys.executable, "-c", code]
    elif lang in ("bash", "sh"):
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        pytest.fail(f"unsupported runnable block language {lang!r}")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if expected is not None:
        assert proc.stdout.strip() == expected.strip(), "documented output differs from the real output"


def test_there_are_runnable_blocks():
    blocks = list(runnable_blocks())
    assert len(blocks) >= 2
    assert any(p.values[2] is not None for p in blocks), "no block checks its documented output"
