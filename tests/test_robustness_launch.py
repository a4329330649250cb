"""Issue 15 part B, `qwen3moe launch`: a taken --master_port is refused at once; --timeout,
SIGTERM and SIGINT stop the whole job (msrun, scheduler, setsid'd workers) with 124 / 143 / 130
and leave no process behind; stale worker logs of an earlier run are never printed; errors
carry the program name. Workers here are a sleeping script: real msrun, no model, little CPU."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import REPO, cli_error

pytestmark = [pytest.mark.dist]


def _env() -> dict:
    return dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO),
                PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")


def _procs_running(needle: str) -> list[str]:
    """Live (non-zombie) processes whose command line contains `needle`: the /proc scan."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            state = open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmd and state != b"Z" and int(pid) != os.getpid():
            out.append(f"{pid} {cmd}")
    return out


def _start(tmp_path, script_body: str, timeout_s: int):
    """Run commands.msrun.launch(2 workers of `script_body`) in a child interpreter."""
    script = tmp_path / "worker_script.py"
    script.write_text(script_body)
    logs = str(tmp_path / "logs")
    code = ("import sys; from qwen3moe.commands.msrun import launch; "
            f"sys.exit(launch(2, [], timeout_s={timeout_s}, script={str(script)!r}, log_dir={logs!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, str(script)


# each process of the job (msrun's scheduler and 2 workers) leaves a started_<pid> file, then sleeps
SLEEPER = "import os, time\nopen(f'started_{os.getpid()}', 'w').close()\ntime.sleep(600)\n"


def _wait_for_workers(script: str, n: int = 3, within_s: float = 60.0) -> None:
    """msrun's scheduler plus 2 workers all run the script."""
    deadline = time.monotonic() + within_s
    while len(_procs_running(script)) < n:
        assert time.monotonic() < deadline, f"workers did not start: {_procs_running(script)}"
        time.sleep(0.2)


def test_master_port_in_use_is_refused_at_once():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "qwen3moe.cli", "launch", "--nproc", "2", "--master_port",
                               str(port), "--", "dist-check", "--model", "x"], env=_env(), capture_output=True,
                              text=True, timeout=120)
        took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"qwen3moe launch: error: --master_port {port}: port in use"
    assert took < 5.0, took


def test_error_prefix_is_the_program_name_not_the_argument_list(capsys):
    err = cli_error(["launch", "--nproc", "0", "--", "dist-check", "--model", "x"], capsys)
    assert err.startswith("qwen3moe launch: error: --nproc must be >= 1"), err


def test_timeout_stops_every_process_of_the_job(tmp_path):
    proc, script = _start(tmp_path, SLEEPER, timeout_s=8)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 124, err[-2000:]
    assert "after 8 s" in err
    assert len(list(tmp_path.glob("started_*"))) == 3  # the job was running when the timeout hit
    assert _procs_running(script) == []


@pytest.mark.parametrize("sig, rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_stop_every_process_of_the_job(tmp_path, sig, rc):
    proc, script = _start(tmp_path, SLEEPER, timeout_s=300)
    try:
        _wait_for_workers(script)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == rc, err[-2000:]
    assert _procs_running(script) == []


def test_logs_left_over_from_an_earlier_run_are_not_printed(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    stale = logs / "worker_5.log"
    stale.write_text("STALE LINE FROM AN EARLIER RUN\n")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    proc, _ = _start(tmp_path, "import sys\nprint('THIS RUN FAILED', flush=True)\nsys.exit(3)\n", timeout_s=120)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "THIS RUN FAILED" in err and "STALE LINE" not in err, err[-2000:]


@pytest.mark.parametrize("cmd, words", [
    (["generate", "--use_parallel", "True", "--parallel_config.model_parallel", "4"], "world size 2 != dp*tp*pp"),
    (["generate", "--parallel_config.model_parallel", "2"], "needs --use_parallel True"),
    (["generate", "--use_parallel", "True", "--parallel_config.model_parallel", "2", "--pretrained_model_dir",
      "MISSING"], "MISSING"),
    (["pretrain", "--config", "YAML"], "needs use_parallel: True"),
    (["pretrain", "--config", "YAML", "--use_parallel", "True", "--parallel_config.pipeline_stage", "2"],
     "micro_batch_num=1 must be >= pp=2"),
], ids=["gen-world", "gen-no-parallel", "gen-missing-model", "pretrain-no-parallel", "pretrain-pp-mbn"])
def test_bad_worker_command_is_one_line_before_any_worker_starts(tmp_path, monkeypatch, capsys, cmd, words):
    """The sub-command's own checks run in the launcher for the launched world size (was: msrun
    started, every worker printed the error and msrun its own traceback; without use_parallel
    every process generated / trained the whole job into the same output)."""
    from helpers import HF_FIXTURES

    monkeypatch.chdir(tmp_path)
    yaml = str(REPO / "examples" / "configs" / "pretrain_tiny_cpu.yaml")
    cmd = [str(tmp_path / "missing") if c == "MISSING" else yaml if c == "YAML" else c for c in cmd]
    if cmd[0] == "generate":
        cmd += ["--predict_data", "hi"] + ([] if "--pretrained_model_dir" in cmd else
                                           ["--pretrained_model_dir", str(HF_FIXTURES / "tiny-fp32-gqa")])
    err = cli_error(["launch", "--nproc", "2", "--log_dir", str(tmp_path / "logs"), "--", *cmd], capsys)
    assert words.replace("MISSING", str(tmp_path / "missing")) in err, err
    assert not (tmp_path / "logs").exists()  # msrun never started


def test_worker_errors_are_reported_once_without_msruns_traceback(tmp_path):
    """Workers failing with the CLI's one-line error: that line once, naming the worker logs; no
    msrun traceback (kept in <log_dir>/msrun_stderr.log), no msrun start-up or MindSpore INFO lines."""
    # every process of the job (scheduler + 2 workers) prints the error, then waits until all have
    # (files failed_<pid>) before exiting: otherwise, on a loaded machine, msrun stopped worker 1
    # when worker 0 exited before worker 1 had printed (the line named worker_0.log only)
    body = ("import glob, os, sys, time\n"
            "print('[INFO] DISTRIBUTED(1,7f,python):2026 tcp_client.cc] Start] noise', flush=True)\n"
            "print('qwen3moe generate: error: --foo 3: expected 1 or 2', file=sys.stderr, flush=True)\n"
            "open(f'failed_{os.getpid()}', 'w').close()\n"
            "deadline = time.monotonic() + 60\n"
            "while len(glob.glob('failed_*')) < 3 and time.monotonic() < deadline:\n"
            "    time.sleep(0.05)\n"
            "sys.exit(2)\n")
    proc, _ = _start(tmp_path, body, timeout_s=120)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.strip().splitlines() == ["qwen3moe generate: error: --foo 3: expected 1 or 2 "
                                        "[worker_0.log, worker_1.log]"], err[-2000:]
    assert "[INFO]" not in out and "Start worker process" not in out, out[-2000:]
    assert "Traceback" in (tmp_path / "logs" / "msrun_stderr.log").read_text()
