"""`qwen3moe generate`: batched text generation from a HF folder (flag names follow MindSpore
Transformers' run_mindformer: --pretrained_model_dir, --predict_data, --predict_batch_size).

Shapes: B batch (prompts per call), S padded prompt length.
stdout and --output get one JSON line per prompt; throughput and peak memory go to stderr
(with --stream the text pieces also go to stderr, so stdout stays JSON lines).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from qwen3moe.io.atomic import atomic_write_text


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text from prompts with a HF model folder")
    p.add_argument("--pretrained_model_dir", required=True, help="HF folder (config.json, weights, tokenizer)")
    p.add_argument("--predict_data", required=True, help="a prompt, or a .txt file with one prompt per line")
    p.add_argument("--predict_batch_size", type=int, default=1, help="prompts per generate call")
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--min_new_tokens", type=int, default=None)
    p.add_argument("--do_sample", type=_bool, nargs="?", const=True, default=None)
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"):
        p.add_argument(f"--{name}", type=float, default=None)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop_strings", nargs="+", default=None, help="stop a row at any of these strings")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template (user turn)")
    p.add_argument("--enable_thinking", type=_bool, nargs="?", const=True, default=True,
                   help="with --chat: Qwen3 thinking mode (false pre-fills an empty think block)")
    p.add_argument("--stream", action="store_true", help="print text pieces to stderr as they are generated")
    p.add_argument("--ignore_eos", action="store_true", help="always generate max_new_tokens tokens")
    p.add_argument("--output", default="text_generation_result.txt", help="JSON-lines result file")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"),
                   help="weights in memory (auto: the folder's torch_dtype); math is fp32 either way")
    p.add_argument("--quantize", default=None, choices=("int8", "int4"),
                   help="quantize the projections while loading (int8 per channel, int4 group-wise)")
    p.add_argument("--group_size", type=int, default=None, help="int4 group size: 32, 64 or 128 (default 128)")
    from qwen3moe.parallel.generate import add_arguments as add_parallel_arguments

    add_parallel_arguments(p)  # --use_parallel True --parallel_config.model_parallel N ... (under launch)
    p.set_defaults(func=run)


def read_prompts(data: str) -> list[str]:
    from qwen3moe.cli import CliError

    if data.endswith(".txt"):
        path = Path(data)
        if not path.is_file():
            raise CliError(f"--predict_data {data}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"--predict_data {data}: unreadable ({type(exc).__name__})") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise CliError(f"--predict_data {data}: no prompts (the file has no non-empty line)")
        return prompts
    if not data.strip():
        raise CliError("--predict_data is empty: give a prompt or a .txt file")
    return [data]


def _check_args(args: argparse.Namespace) -> Path:
    from qwen3moe.cli import CliError

    folder = Path(args.pretrained_model_dir)
    if not (folder / "config.json").is_file():
        raise CliError(f"--pretrained_model_dir {folder}: not a model folder (no config.json)")
    if args.predict_batch_size < 1:
        raise CliError(f"--predict_batch_size must be >= 1, got {args.predict_batch_size}")
    if args.stream and args.predict_batch_size != 1:
        raise CliError("--stream needs --predict_batch_size 1")
    return folder


def _load(folder: Path, args: argparse.Namespace):
    from qwen3moe.cli import CliError
    from qwen3moe.generation.generate import resolve_config
    from qwen3moe.io.tokenizer import Tokenizer
    from qwen3moe.models.qwen3_moe import Qwen3MoeForCausalLM

    try:
        tok = Tokenizer.from_pretrained(folder)
        model = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=None if args.dtype == "auto" else args.dtype,
                                                    quantization=args.quantize, group_size=args.group_size)
        cfg = resolve_config(model, None, args.ignore_eos, **{
            k: getattr(args, k) for k in ("max_new_tokens", "min_new_tokens", "do_sample", "temperature",
                                          "top_k", "top_p", "min_p", "repetition_penalty",
                                          "presence_penalty", "seed", "stop_strings")})
    except (ValueError, OSError) as exc:
        raise CliError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return tok, model, cfg


def _encode(tok: Any, prompts: list[str], args: argparse.Namespace, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask [B, S] (decoder-only batches pad on the left)."""
    from qwen3moe.cli import CliError

    if args.chat:
        rows = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                        tokenize=True, enable_thinking=args.enable_thinking) for p in prompts]
    else:
        rows = [tok.encode(p) for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise CliError("a prompt encodes to no tokens")
    S = max(len(r) for r in rows)
    ids = np.full((len(rows), S), pad, np.int64)
    mask = np.zeros((len(rows), S), np.int64)
    for b, r in enumerate(rows):
        ids[b, S - len(r):], mask[b, S - len(r):] = r, 1
    return ids, mask


def _run_batch(model: Any, tok: Any, cfg: Any, prompts: list[str], args: argparse.Namespace) -> tuple[list[dict], Any]:
    from qwen3moe.generation.generate import GenerationRun
    from qwen3moe.generation.streaming import StopStringStream

    # a short last batch is filled with copies so it reuses the compiled (B, ...) graphs
    filled = prompts + [prompts[-1]] * (args.predict_batch_size - len(prompts))
    ids, mask = _encode(tok, filled, args, cfg.effective_pad_token_id or 0)
    run = GenerationRun(model, ids, mask, cfg, tok)
    stream = StopStringStream(tok, cfg.stop_strings, skip_special_tokens=True) if args.stream else None
    for nxt_B in run.steps():
        if stream is not None:
            sys.stderr.write(stream.push(int(nxt_B[0])))
            sys.stderr.flush()
    if stream is not None:
        sys.stderr.write(stream.flush() + "\n")
    out, S, st = run.output(), ids.shape[1], run.stats
    seconds = st.prefill_s + st.decode_s
    results = []
    for b, prompt in enumerate(prompts):
        new = out[b, S:S + st.new_tokens[b]]
        results.append({"prompt": prompt, "completion": tok.decode(new, skip_special_tokens=True),
                        "prompt_tokens": int(mask[b].sum()), "completion_tokens": int(st.new_tokens[b]),
                        "tokens_per_s": round(st.new_tokens[b] / seconds, 3) if seconds else None})
    return results, st


def check_output(path: str) -> None:
    """--output must be writable: checked before the model loads, not after all the work."""
    from qwen3moe.cli import CliError
    from qwen3moe.io.atomic import OutputError, check_output_file

    try:
        check_output_file(path)
    except OutputError as exc:
        raise CliError(f"--output {exc}") from None


def _print_line(line: str) -> None:
    """A closed stdout (`| head -1`) stops the printing, not the run: --output is still written."""
    from qwen3moe.cli import quiet_broken_stdout

    try:
        print(line, flush=True)
    except BrokenPipeError:
        quiet_broken_stdout()


def run(args: argparse.Namespace) -> int:
    check_output(args.output)
    if getattr(args, "use_parallel", False):
        from qwen3moe.cli import CliError
        from qwen3moe.parallel.generate import run as run_parallel

        model_parallel = any(getattr(args, f"parallel_{k}", 1) not in (None, 1)
                             for k in ("model_parallel", "pipeline_stage", "expert_parallel"))
        if model_parallel and (args.quantize or args.dtype != "float32"):
            raise CliError("--quantize / --dtype apply to single-process and pure data-parallel generation only")

        return run_parallel(args)
    folder = _check_args(args)
    prompts = read_prompts(args.predict_data)
    tok, model, cfg = _load(folder, args)
    lines, prefill_tok, prefill_s, decode_tok, decode_s, compiles = [], 0, 0.0, 0, 0.0, 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), args.predict_batch_size):
        batch = prompts[i:i + args.predict_batch_size]
        results, st = _run_batch(model, tok, cfg, batch, args)
        for r in results:
            line = json.dumps(r, ensure_ascii=False)
            _print_line(line)
            lines.append(line)
        prefill_tok, prefill_s = prefill_tok + st.prompt_tokens, prefill_s + st.prefill_s
        decode_tok, decode_s = decode_tok + args.predict_batch_size * st.decode_steps, decode_s + st.decode_s
        compiles = st.compiles
    atomic_write_text(args.output, "".join(line + "\n" for line in lines))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f"generate: {len(prompts)} prompts in {time.perf_counter() - t0:.2f} s; "
          f"prefill {prefill_tok / max(prefill_s, 1e-9):.1f} tok/s, decode {decode_tok / max(decode_s, 1e-9):.1f} tok/s "
          f"(first calls include graph compiles: {compiles}); peak RSS {peak_mib:.0f} MiB; "
          f"results in {args.output}", file=sys.stderr)
    return 0
