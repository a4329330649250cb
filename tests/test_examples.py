"""Every examples/ script runs on the tiny reference folder and prints its throughput line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, reference_dir

pytestmark = pytest.mark.examples


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_generate_example_matches_hf_greedy_text():
    out = run_example("generate.py", "--model", str(reference_dir("tiny-a")), "--max-new-tokens", "12")
    # transformers 5.24 greedy continuation of this prompt (tiny-a ref_meta.json gen_decoded[0])
    assert out.startswith("Test\ufffd ne ExtendedContextCon beie dicheckie dicrue")
    assert "tok/s" in out and "peak RSS" in out


def test_chat_example_two_turns():
    out = run_example("chat.py", "--model", str(reference_dir("tiny-a")), "--max-new-tokens", "8")
    assert out.count("assistant: ") == 2 and "tok/s" in out


def test_inspect_experts_example(tmp_path):
    out = run_example("inspect_experts.py", "--model", str(reference_dir("tiny-a")))
    assert out.count("moe layer") == 4 and "aux loss" in out and "peak RSS" in out
