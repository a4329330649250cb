"""Every README.md / docs/*.md code block marked `<!-- runnable ... -->` runs from the repo root.

Marked blocks must use only committed fixtures, so the docs fail CI when they rot.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

BLOCK = re.compile(r"<!-- runnable[^>]*-->\s*\n```(\w+)\n(.*?)```", re.S)


def runnable_blocks():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for i, (lang, code) in enumerate(BLOCK.findall(doc.read_text())):
            yield pytest.param(lang, code, id=f"{doc.name}-{i}-{lang}")


@pytest.mark.parametrize("lang, code", list(runnable_blocks()))
def test_doc_block_runs(lang, code, tmp_path):
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


def test_there_are_runnable_blocks():
    assert len(list(runnable_blocks())) >= 2
