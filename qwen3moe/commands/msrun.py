"""The msrun launcher behind `qwen3moe launch` (commands/launch.py): run a qwen3moe sub-command
on N worker processes through MindSpore's msrun. Part of the command layer: it starts cli.py in
every worker and reports on stderr.

msrun starts a scheduler plus the workers and runs `python <script> <args>` in each, with the
first `python` on PATH, so the current interpreter's bin folder is put first. Each worker's
output goes to <log_dir>/worker_<i>.log; when a worker fails, the tail of its log is printed
(only logs written by this run, never ones left over from an earlier run in the same folder).
A free port is picked when none is given (two jobs on one machine must not share a port); a
given --master_port that is already bound is refused at once, before msrun starts.

The job's console is msrun's (every worker log tailed) without msrun's start-up lines and
MindSpore's INFO / WARNING lines; msrun's stderr (its traceback when a worker fails) goes to
<log_dir>/msrun_stderr.log. When workers fail with the CLI's one-line errors, those lines are
printed once each.

Stopping: msrun runs in its own session, and each worker msrun starts calls setsid, so neither
a terminal's Ctrl-C nor killing msrun's process group reaches them. Every process of the job
inherits a unique JOB_ENV marker in its environment; on --timeout, SIGTERM or SIGINT the launcher
signals msrun's group and every process carrying the marker (found by a /proc scan), SIGTERM
first and SIGKILL after a grace period, and returns 124 / 143 / 130.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from qwen3moe.errors import Qwen3MoeError
from qwen3moe.parallel.cores import LOCAL_WORKERS_ENV

CLI = Path(__file__).resolve().parent.parent / "cli.py"
JOB_ENV = "QWEN3MOE_LAUNCH_JOB"
TIMEOUT_RC = 124
GRACE_S = 5.0
MSRUN_STDERR = "msrun_stderr.log"
# msrun's start-up lines and MindSpore's glog lines below ERROR: not for the user's console
NOISE = re.compile(r"(Start (scheduler|worker) process|\[(DEBUG|INFO|WARNING)\] [A-Z_]+\(\d+,)")
ERROR_LINE = re.compile(r"qwen3moe [\w-]+: error: ")


class LaunchError(Qwen3MoeError, ValueError):
    """A launch that cannot start (e.g. the master port is taken): one line naming the flag."""


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(addr: str, port: int) -> None:
    """Refuse a master port that is already bound here (msrun would fail only after minutes)."""
    if not 0 < port < 65536:
        raise LaunchError(f"--master_port {port}: expected a port number in 1..65535")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is no conflict
        try:
            s.bind((addr, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LaunchError(f"--master_port {port}: port in use") from None
            # another host's address (multi-node, node_rank > 0): nothing to check here


def msrun_command(nproc: int, args: list[str], nnodes: int = 1, node_rank: int = 0,
                  master_addr: str = "127.0.0.1", master_port: int | None = None, log_dir: str = "msrun_logs",
                  timeout_s: int = 120, script: str | os.PathLike = CLI) -> list[str]:
    msrun = shutil.which("msrun", path=_path()) or "msrun"
    return [msrun, f"--worker_num={nproc * nnodes}", f"--local_worker_num={nproc}",
            f"--master_addr={master_addr}", f"--master_port={master_port or free_port()}",
            f"--node_rank={node_rank}", "--join=True", f"--log_dir={log_dir}",
            f"--cluster_time_out={timeout_s}", str(script), *args]


def _path() -> str:
    return os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


def job_pids(marker: str) -> list[int]:
    """Live processes (not zombies) whose environment carries JOB_ENV=marker."""
    needle = f"{JOB_ENV}={marker}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle not in fh.read() + b"\0":
                    continue
            with open(f"/proc/{entry}/stat", "rb") as fh:
                if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
        except OSError:  # gone, or not ours
            continue
        found.append(int(entry))
    return found


def stop_job(proc: subprocess.Popen, marker: str, grace_s: float = GRACE_S) -> None:
    """SIGTERM msrun's process group and every process of the job, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in job_pids(marker):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not job_pids(marker):
                return
            time.sleep(0.1)
    proc.wait()


def job_env(nproc: int, marker: str) -> dict[str, str]:
    """msrun's environment: PATH, the job's marker, and the local worker count (each worker binds
    its threads to its share of this host's cores: parallel/cores.py)."""
    return dict(os.environ, PATH=_path(), GLOG_v=os.environ.get("GLOG_v", "3"),
                **{JOB_ENV: marker, LOCAL_WORKERS_ENV: str(nproc)})


def launch(nproc: int, args: list[str], timeout_s: int = 300, script: str | os.PathLike = CLI, **kw) -> int:
    """Run and wait; returns msrun's exit code (non-zero when any worker failed), 124 on timeout,
    128 + signal number on SIGTERM / SIGINT. Raises LaunchError when a given port is taken."""
    log_dir = kw.setdefault("log_dir", "msrun_logs")
    if kw.get("master_port") is not None and kw.get("node_rank", 0) == 0:
        check_port(kw.get("master_addr", "127.0.0.1"), kw["master_port"])
    cmd = msrun_command(nproc, args, timeout_s=min(timeout_s, 120), script=script, **kw)
    marker = uuid.uuid4().hex
    env = job_env(nproc, marker)
    started = time.time()
    os.makedirs(log_dir, exist_ok=True)
    with _signals_raise(), open(os.path.join(log_dir, MSRUN_STDERR), "w") as err:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=err)
        relay = threading.Thread(target=_relay, args=(proc.stdout, sys.stdout), daemon=True)
        relay.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"qwen3moe launch: workers still running after {timeout_s} s: stopping the job", file=sys.stderr)
            stop_job(proc, marker)
            rc = TIMEOUT_RC
        except _Interrupted as sig:
            print(f"qwen3moe launch: {signal.Signals(sig.signum).name}: stopping the job", file=sys.stderr)
            stop_job(proc, marker)
            rc = 128 + sig.signum
    relay.join(timeout=GRACE_S)
    if rc != 0:
        _report_failure(this_run_logs(log_dir, started), os.path.join(log_dir, MSRUN_STDERR))
    return rc


def _relay(src, dst) -> None:
    """msrun's console (the tailed worker logs) without its own and MindSpore's chatter; the
    workers' one-line errors are reported once, after the job (_report_failure)."""
    for raw in iter(src.readline, b""):
        line = raw.decode(errors="replace")
        if not NOISE.match(line) and not ERROR_LINE.match(line):
            dst.write(line)
            dst.flush()


def _report_failure(logs: list[Path], msrun_err: str) -> None:
    """The workers' one-line errors, each once; when a worker failed otherwise (a crash, a
    traceback), the last lines of every worker log of this run. msrun's own traceback ("job
    exited with exception") stays in its stderr file."""
    texts = [log.read_text(errors="replace").splitlines() for log in logs]
    errors: dict[str, list[str]] = {}  # error line -> the logs that end with it
    for log, lines in zip(logs, texts):
        for line in lines:
            if ERROR_LINE.match(line):
                errors.setdefault(line, []).append(log.name)
    if errors and not any("Traceback (most recent call last)" in line for lines in texts for line in lines):
        for line, names in errors.items():
            print(f"{line} [{', '.join(names)}]", file=sys.stderr)
        return
    for log, lines in zip(logs, texts):
        tail = [line for line in lines if not NOISE.match(line)][-8:]
        print(f"--- {log} (last lines) ---\n" + "\n".join(tail), file=sys.stderr)
    print(f"(msrun's own output: {msrun_err})", file=sys.stderr)


def this_run_logs(log_dir: str, since: float) -> list[Path]:
    """Worker logs written since `since` (older ones belong to an earlier run)."""
    return [p for p in sorted(Path(log_dir).glob("worker_*.log")) if p.stat().st_mtime >= since - 1.0]


class _signals_raise:
    """While active (main thread only), SIGTERM and SIGINT raise _Interrupted in the waiting code."""

    def __enter__(self):
        self.saved, self.raised = {}, False
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.saved[sig] = signal.signal(sig, self._raise)
        return self

    def _raise(self, signum, frame):
        if not self.raised:  # a second signal must not interrupt the stopping itself
            self.raised = True
            raise _Interrupted(signum)

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        return False
