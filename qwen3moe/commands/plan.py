"""`qwen3moe plan`: ranked parallel layouts with memory per device and traffic per step."""
from __future__ import annotations

import argparse
import re

from qwen3moe.cli import CliError


def parse_bytes(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", text, re.I)
    if not m:
        raise CliError(f"--device-memory: expected a size like 64GB, got {text!r}")
    unit = (m.group(2) or "B").upper().rstrip("B").replace("I", "") or "B"
    return float(m.group(1)) * {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory and communication per device for parallel layouts")
    p.add_argument("--preset", help="qwen3-30b-a3b, qwen3-235b-a22b, ... (or --config-dir)")
    p.add_argument("--config-dir", help="HF folder whose config.json to plan for")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--device-memory", default="64GB")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--micro-batch-num", type=int, default=16)
    p.add_argument("--no-recompute", action="store_true")
    p.add_argument("--zero1", action="store_true", help="shard optimizer state over dp")
    p.add_argument("--batch", type=int, default=1, help="inference batch for the KV cache")
    p.add_argument("--top", type=int, default=10)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qwen3moe.models.config import ConfigError, Qwen3MoeConfig
    from qwen3moe.parallel.planner import GiB, plan

    if not args.preset and not args.config_dir:
        raise CliError("give --preset NAME or --config-dir DIR")
    if args.devices < 1:
        raise CliError(f"--devices must be >= 1, got {args.devices}")
    try:
        cfg = (Qwen3MoeConfig.from_pretrained(args.config_dir) if args.config_dir
               else Qwen3MoeConfig.from_preset(args.preset))
    except (ConfigError, ValueError) as exc:
        raise CliError(str(exc)) from None
    mem = parse_bytes(args.device_memory)
    ests = plan(cfg, args.devices, mem, args.seq_length, preset=(args.preset or "").lower(), mode=args.mode,
                mbs=args.micro_batch_size, micro_batch_num=args.micro_batch_num,
                recompute=not args.no_recompute, zero1=args.zero1, infer_batch=args.batch)
    if not ests:
        raise CliError(f"no valid (dp, tp, pp, ep) layout for {args.devices} devices")
    print(f"{args.mode} {args.preset or args.config_dir}: {cfg.num_parameters():,} params, {args.devices} devices "
          f"x {mem / GiB:.0f} GiB, seq {args.seq_length}")
    print(f"{'dp':>3} {'tp':>3} {'pp':>3} {'ep':>3} | {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} "
          f"{'kv':>8} {'total':>8} GiB | {'comm/step':>10} {'bubble':>6}  fits")
    shown = ests[: args.top] + [e for e in ests[args.top:] if e.seed]  # always show the seed's layout
    for e in shown:
        m = e.mesh
        fits = "yes" if e.total <= 0.9 * mem else "no"
        print(f"{m.dp:>3} {m.tp:>3} {m.pp:>3} {m.ep:>3} | {e.weights / GiB:8.1f} {e.grads / GiB:8.1f} "
              f"{e.optimizer / GiB:8.1f} {e.activations / GiB:8.1f} {e.kv_cache / GiB:8.1f} {e.total / GiB:8.1f}     "
              f"| {e.comm_bytes / GiB:8.1f}GB {e.bubble:6.2f}  {fits}{'  (seed layout)' if e.seed else ''}")
    return 0
