"""`qwen3moe launch --nproc N [...] -- <sub-command ...>`: multi-process run through msrun
(commands/msrun.py), and `qwen3moe dist-check` / `dist-parallel`: self-tests to run under it."""
from __future__ import annotations

import argparse
import json

from qwen3moe.cli import CliError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="run a qwen3moe sub-command on N processes via msrun")
    p.add_argument("--nproc", type=int, required=True, help="worker processes on this node")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node_rank", type=int, default=0)
    p.add_argument("--master_addr", default="127.0.0.1")
    p.add_argument("--master_port", type=int, default=None, help="default: a free port")
    p.add_argument("--log_dir", default="msrun_logs")
    p.add_argument("--timeout", type=int, default=300, help="seconds before the job is stopped")
    # dest is not "command": that is cli.py's sub-command name (its error prefix)
    p.add_argument("worker_command", metavar="command", nargs=argparse.REMAINDER,
                   help="-- then the sub-command and its flags")
    p.set_defaults(func=run)
    c = sub.add_parser("dist-check", help="data-parallel gradient all-reduce self-test (under launch)")
    c.add_argument("--model", required=True, help="HF folder")
    c.set_defaults(func=dist_check)
    d = sub.add_parser("dist-parallel", help="TP/EP/PP/DP training, loading or forward on real processes (under launch)")
    add_dist_parallel_arguments(d)
    d.set_defaults(func=dist_parallel)


def add_dist_parallel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF folder")
    p.add_argument("--mode", choices=["load", "forward"], required=True)
    for name in ("dp", "tp", "pp", "ep"):
        p.add_argument(f"--{name}", type=int, default=1)
    p.add_argument("--sp", action="store_true", help="sequence parallel over the tp group")
    p.add_argument("--micro_batch_num", type=int, default=1)
    p.add_argument("--batch", type=int, default=2, help="global batch")
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed forward calls")
    p.add_argument("--out", default=".", help="folder for forward_rank<r>.npz")


def dist_parallel(args: argparse.Namespace) -> int:
    from qwen3moe.parallel import distcheck

    result = distcheck.run(args.model, args.mode, dp=args.dp, tp=args.tp, pp=args.pp, ep=args.ep, sp=args.sp,
                           micro_batch_num=args.micro_batch_num, batch=args.batch, seq=args.seq,
                           steps=args.steps, out=args.out)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    from qwen3moe.commands.msrun import launch

    cmd = args.worker_command[1:] if args.worker_command[:1] == ["--"] else args.worker_command
    if not cmd:
        raise CliError("nothing to launch: give -- <sub-command> [flags], e.g. -- dist-check --model DIR")
    if args.nproc < 1:
        raise CliError(f"--nproc must be >= 1, got {args.nproc}")
    check_command(cmd, args.nproc * args.nnodes)
    return launch(args.nproc, cmd, timeout_s=args.timeout, nnodes=args.nnodes, node_rank=args.node_rank,
                  master_addr=args.master_addr, master_port=args.master_port, log_dir=args.log_dir)


def check_command(cmd: list[str], world_size: int) -> None:
    """The sub-command's own checks for `world_size` processes (its `preflight(args, world_size)`,
    when it has one), so a bad flag or layout is one line before any worker starts. argparse
    errors exit here with the sub-command's usage, as they would in every worker."""
    import sys

    from qwen3moe.cli import build_parser

    args = build_parser().parse_args(cmd)
    if not getattr(args, "func", None):
        raise CliError(f"nothing to launch: {' '.join(cmd)!r} names no sub-command")
    if args.command == "launch":
        raise CliError("launch inside launch: give the sub-command to run on the workers")
    check = getattr(sys.modules[args.func.__module__], "preflight", None)
    if check is not None:
        check(args, world_size)


def dist_check(args: argparse.Namespace) -> int:
    """Each rank takes its half of a fixed batch; the all-reduced mean gradient must equal the
    single-process full-batch gradient (LM loss: a mean over equal token counts per rank)."""
    import numpy as np
    import mindspore as ms

    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.parallel.comm import MindSporeComm

    ms.set_device("CPU")
    comm = MindSporeComm()
    model = Qwen3MoeForCausalLM.from_pretrained(args.model)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2 * comm.size, 12))
    params = model.trainable_params()
    grad_fn = ms.value_and_grad(lambda x: model(x, labels=x).loss, None, params)
    shard = ids[comm.rank::comm.size]
    _, grads = grad_fn(ms.Tensor(shard))
    mean = [comm.all_reduce(g) / comm.size for g in grads]
    _, full = grad_fn(ms.Tensor(ids))
    diff = max(float(np.abs(a.asnumpy() - b.asnumpy()).max()) for a, b in zip(mean, full))
    print("RESULT " + json.dumps({"rank": comm.rank, "size": comm.size, "max_abs_diff": diff}), flush=True)
    return 0 if diff < 1e-5 else 1
