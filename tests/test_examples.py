"""Every examples/ script runs on the tiny reference folder and prints its throughput line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO, reference_dir

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


def test_pretrain_example_on_megatron_data(tmp_path):
    from helpers import FIXTURES

    out = run_example("pretrain.py", "--data", str(FIXTURES / "megatron_gpt" / "golden_a_text_document"),
                      "--steps", "4", "--batch", "2", "--seq-len", "16", "--out", str(tmp_path))
    assert "step    4/4" in out and "tokens/s" in out and (tmp_path / "checkpoint" / "config.json").is_file()


def test_preprocess_wikitext_script(tmp_path):
    from helpers import FIXTURES

    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(REPO / "examples" / "preprocess_wikitext.sh"),
                           str(FIXTURES / "data" / "wiki.sample.tokens"),
                           str(REPO / "qwen3moe" / "assets" / "tiny-tokenizer"), str(tmp_path / "wiki")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from qwen3moe.io.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "wiki_text_document"))
    assert len(ds) == 2 and ds.num_tokens > 20
