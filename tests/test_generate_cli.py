"""`qwen3moe generate` on tiny-a: JSON lines on stdout and in --output, throughput on stderr, errors exit 2.

Shapes: none (CLI level).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, cli_error, reference_dir


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "qwen3moe.cli", "generate", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_generate_prompt_file_batched(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\n\nthe cat sat\nsay\n", encoding="utf-8")
    out = tmp_path / "res.txt"
    proc = _cli("--pretrained_model_dir", str(reference_dir("tiny-a")), "--predict_data", str(prompts),
                "--predict_batch_size", "2", "--max_new_tokens", "4", "--ignore_eos", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [r["prompt"] for r in lines] == ["hello world", "the cat sat", "say"]
    assert all(r["completion_tokens"] == 4 and r["prompt_tokens"] > 0 and r["tokens_per_s"] > 0 for r in lines)
    assert [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()] == lines
    assert "prefill" in proc.stderr and "decode" in proc.stderr and "peak RSS" in proc.stderr
    # generation/runtime.py: MindSpore's graph pipeline off, and its notice of that on stderr:
    # stdout holds the JSON lines only
    assert "graph_pipeline:False" in proc.stderr
    assert all(x.startswith("{") for x in proc.stdout.splitlines()), proc.stdout[:500]


def test_generate_chat_stream_sampling(tmp_path):
    out = tmp_path / "res.txt"
    proc = _cli("--pretrained_model_dir", str(reference_dir("tiny-a")), "--predict_data", "Hi there",
                "--chat", "--enable_thinking", "false", "--stream", "--do_sample", "--temperature", "0.7",
                "--top_k", "20", "--seed", "3", "--max_new_tokens", "3", "--ignore_eos", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert line["prompt"] == "Hi there" and line["completion_tokens"] == 3
    assert line["completion"] in proc.stderr  # streamed text == final text


@pytest.mark.parametrize("extra, message", [
    (["--predict_data", "x", "--pretrained_model_dir", "/nonexistent/model"], "not a model folder"),
    (["--predict_data", "EMPTY", "--pretrained_model_dir", "TINY"], "no prompts"),
    (["--predict_data", "missing.txt", "--pretrained_model_dir", "TINY"], "no such file"),
    (["--predict_data", "x", "--pretrained_model_dir", "TINY", "--predict_batch_size", "0"], "predict_batch_size"),
    (["--predict_data", "x", "--pretrained_model_dir", "TINY", "--top_p", "2"], "top_p"),
])
def test_errors_are_one_line_exit_2(tmp_path, capsys, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    subst = {"EMPTY": str(empty), "TINY": str(reference_dir("tiny-a")), "missing.txt": str(tmp_path / "m.txt")}
    argv = ["generate", *[subst.get(a, a) for a in extra], "--output", str(tmp_path / "o.txt")]
    assert message in cli_error(argv, capsys)


def test_bad_flag_subprocess_exit_2():
    proc = _cli("--pretrained_model_dir", "/nonexistent", "--predict_data", "x", "--max_new_tokens", "many")
    assert proc.returncode == 2 and "max_new_tokens" in proc.stderr
