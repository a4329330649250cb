"""`qwen3moe launch`: run a qwen3moe sub-command on N worker processes through MindSpore's msrun.

msrun starts a scheduler plus the workers and runs `python <script> <args>` in each, with the
first `python` on PATH, so the current interpreter's bin folder is put first. Each worker's
output goes to <log_dir>/worker_<i>.log; when a worker fails, the tail of its log is printed.
A free port is picked when none is given (two jobs on one machine must not share a port).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

CLI = Path(__file__).resolve().parent.parent / "cli.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun_command(nproc: int, args: list[str], nnodes: int = 1, node_rank: int = 0,
                  master_addr: str = "127.0.0.1", master_port: int | None = None, log_dir: str = "msrun_logs",
                  timeout_s: int = 120) -> list[str]:
    msrun = shutil.which("msrun", path=_path()) or "msrun"
    return [msrun, f"--worker_num={nproc * nnodes}", f"--local_worker_num={nproc}",
            f"--master_addr={master_addr}", f"--master_port={master_port or free_port()}",
            f"--node_rank={node_rank}", "--join=True", f"--log_dir={log_dir}",
            f"--cluster_time_out={timeout_s}", str(CLI), *args]


def _path() -> str:
    return os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


def launch(nproc: int, args: list[str], timeout_s: int = 300, **kw) -> int:
    """Run and wait; returns msrun's exit code (non-zero when any worker failed)."""
    log_dir = kw.setdefault("log_dir", "msrun_logs")
    cmd = msrun_command(nproc, args, timeout_s=min(timeout_s, 120), **kw)
    env = dict(os.environ, PATH=_path(), GLOG_v=os.environ.get("GLOG_v", "3"))
    try:
        rc = subprocess.run(cmd, env=env, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        print(f"qwen3moe launch: workers still running after {timeout_s} s, stopped", file=sys.stderr)
        rc = 124
    if rc != 0:
        for log in sorted(Path(log_dir).glob("worker_*.log")):
            tail = log.read_text(errors="replace").splitlines()[-8:]
            print(f"--- {log} (last lines) ---\n" + "\n".join(tail), file=sys.stderr)
    return rc
