"""Issue 15 part A, process hygiene: MindSpore dumps stay out of the user's folder, a closed
stdout pipe and Ctrl-C end a command cleanly. Real subprocesses, each a few seconds."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from helpers import HF_FIXTURES, REPO

_FAILING_COMPILE = """
import numpy as np
import qwen3moe
import mindspore as ms
from mindspore import Tensor, ops

ms.set_device("CPU")
try:
    ms.jit(lambda x: ops.matmul(x, Tensor(np.ones((3, 5), np.float32))))(Tensor(np.ones((2, 4), np.float32)))
except Exception as exc:
    print("compile failed as intended:", type(exc).__name__)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MS_OM_PATH"}
    return dict(env, GLOG_v="3", PYTHONPATH=str(REPO), **extra)


def test_compile_failure_dump_stays_out_of_cwd(tmp_path):
    cwd, cache = tmp_path / "work", tmp_path / "cache"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-c", _FAILING_COMPILE], cwd=cwd, capture_output=True, text=True,
                          env=_env(XDG_CACHE_HOME=str(cache)), timeout=300)
    assert "compile failed as intended" in proc.stdout, proc.stderr[-2000:]
    assert os.listdir(cwd) == []
    assert (cache / "qwen3moe" / "mindspore" / "rank_0" / "om" / "analyze_fail.ir").is_file()


def test_generate_into_closed_pipe_still_writes_output(tmp_path):
    prompts, out = tmp_path / "p.txt", tmp_path / "res.txt"
    prompts.write_text("hello\nthe cat\nsay\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "qwen3moe.cli", "generate", "--pretrained_model_dir",
           str(HF_FIXTURES / "tiny-fp32-gqa"), "--predict_data", str(prompts), "--max_new_tokens", "2",
           "--ignore_eos", "--output", str(out)]
    head = subprocess.Popen(["head", "-1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc = subprocess.Popen(cmd, stdout=head.stdin, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    head.stdin.close()  # only `head` holds the pipe now: it exits after one line
    _, err = proc.communicate(timeout=300)
    first = head.stdout.read().decode()
    head.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]
    assert first.startswith('{"prompt": "hello"') and len(out.read_text().splitlines()) == 3


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    fifo = tmp_path / "never_written.tokens"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # a writer that never writes: the command's read blocks
    proc = subprocess.Popen([sys.executable, "-m", "qwen3moe.cli", "wikitext-to-jsonl", "--input", str(fifo),
                             "--output", str(tmp_path / "out.jsonl")], stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _blocked_on_fifo(proc.pid):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    os.close(writer)
    assert proc.returncode == 130, err
    assert err.strip() == "qwen3moe wikitext-to-jsonl: interrupted"
    assert sorted(os.listdir(tmp_path)) == ["never_written.tokens"]


def _blocked_on_fifo(pid: int) -> bool:
    """The process has opened the FIFO (it is inside the command, not still importing)."""
    try:
        return any("never_written" in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False
