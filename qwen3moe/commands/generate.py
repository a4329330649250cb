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
from dataclasses import replace
from typing import Any

from qwen3moe.io.atomic import atomic_write_text


# --parallel_config.<key> -> Mesh field
PARALLEL_KEYS = {"data_parallel": "dp", "model_parallel": "tp", "pipeline_stage": "pp",
                 "expert_parallel": "ep", "micro_batch_num": "micro_batch_num"}


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
    p.add_argument("--prefill_chunk_size", type=int, default=None,
                   help="prefill prompts longer than this in chunks of at most this many tokens (a multiple of 16; "
                        "bounds the prefill's memory; default 1024, 0 = never chunk)")
    p.add_argument("--kv_cache_dtype", default=None,
                   help="KV cache storage: float32 (default), bfloat16 or float16 (half the cache memory; "
                        "fused kernels only)")
    p.add_argument("--prompt_cache", type=_bool, nargs="?", const=True, default=None,
                   help="batch 1: prefill a prompt only from where it differs from the tokens the cache holds "
                        "(the previous prompt and reply; default true)")
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
    p.add_argument("--activations", default="float32", choices=("float32", "int8"),
                   help="with --quantize (or a GPTQ folder): int8 = prefill and decode with int8 activations and integer dot products "
                        "(opt-in, docs/quantization.md); float32 = weight-only (default)")
    p.add_argument("--lm_head_bits", type=int, default=None, choices=(8, 6),
                   help="with --quantize (or a GPTQ folder): the lm_head per channel in 8 bits (default) or 6 "
                        "(opt-in, fewer bytes per decode step; docs/quantization.md)")
    # --use_parallel True --parallel_config.model_parallel N ... (under `qwen3moe launch`)
    p.add_argument("--use_parallel", type=_bool, default=False, help="shard over the launched processes")
    for key in PARALLEL_KEYS:  # micro_batch_num: decode micro-batches of the pipeline (default pp)
        p.add_argument(f"--parallel_config.{key}", dest=f"parallel_{key}", type=int,
                       default=None if key == "micro_batch_num" else 1)
    p.set_defaults(func=run)


def request(args: argparse.Namespace):
    """The library's GenerateRequest from the parsed flags."""
    from qwen3moe.generation.batch import OPTION_KEYS, GenerateRequest

    return GenerateRequest(args.pretrained_model_dir, args.predict_data, args.predict_batch_size, args.chat,
                           args.enable_thinking, args.stream, args.ignore_eos,
                           {k: getattr(args, k) for k in OPTION_KEYS}, args.dtype, args.quantize, args.group_size,
                           args.activations, args.lm_head_bits)


def run_parallel(args: argparse.Namespace, req) -> int:
    """Under `qwen3moe launch`: parallel/generate.py; the reporting rank prints and writes."""
    from qwen3moe.parallel.generate import generate

    out = generate(req, mesh_of(args, req), on_text=_stderr)
    if out.results is not None:
        lines = [json.dumps(r, ensure_ascii=False) for r in out.results]
        for line in lines:
            _print_line(line)
        atomic_write_text(args.output, "".join(line + "\n" for line in lines))
        print(f"generate: {out.summary}; results in {args.output}", file=sys.stderr)
    return 0


def mesh_of(args: argparse.Namespace, req):
    """The --parallel_config mesh; micro_batch_num (pipeline decode micro-batches) defaults to
    pp, at most the rows of a dp rank."""
    from qwen3moe.parallel.mesh import Mesh
    from qwen3moe.parallel.pipeline_generate import default_micro_batches

    mesh = Mesh(**{v: getattr(args, f"parallel_{k}") for k, v in PARALLEL_KEYS.items() if v != "micro_batch_num"})
    M = args.parallel_micro_batch_num
    return replace(mesh, micro_batch_num=default_micro_batches(mesh, req.predict_batch_size) if M is None else M)


def _stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


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


def preflight(args: argparse.Namespace, world_size: int) -> None:
    """`qwen3moe launch` checks the request before starting `world_size` workers."""
    from qwen3moe.cli import CliError
    from qwen3moe.parallel.generate import check_request

    if not getattr(args, "use_parallel", False):
        raise CliError(f"generate on {world_size} processes needs --use_parallel True (without it every "
                       f"process would generate every prompt and write {args.output})")
    check_output(args.output)
    req = request(args)
    check_request(req, mesh_of(args, req), world_size)


def run(args: argparse.Namespace) -> int:
    from qwen3moe.generation.batch import generate_batches, load, read_prompts
    from qwen3moe.generation.runtime import decode_runtime

    check_output(args.output)
    req = request(args)
    if getattr(args, "use_parallel", False):
        return run_parallel(args, req)
    decode_runtime()  # before MindSpore's first op (parallel/generate.py: after set_device)
    prompts = read_prompts(req.predict_data)
    tok, model, cfg = load(req)
    lines, prefill_tok, prefill_s, decode_tok, decode_s, compiles, cached = [], 0, 0.0, 0, 0.0, 0, 0
    t0 = time.perf_counter()
    for results, st in generate_batches(model, tok, cfg, prompts, req, on_text=_stderr):
        for r in results:
            line = json.dumps(r, ensure_ascii=False)
            _print_line(line)
            lines.append(line)
        # tokens the prefill ran (those the prompt cache held were not run again)
        prefill_tok, prefill_s = prefill_tok + st.prompt_tokens - st.cached_tokens, prefill_s + st.prefill_s
        cached += st.cached_tokens
        decode_tok, decode_s = decode_tok + args.predict_batch_size * st.decode_steps, decode_s + st.decode_s
        compiles = st.compiles
    atomic_write_text(args.output, "".join(line + "\n" for line in lines))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f"generate: {len(prompts)} prompts in {time.perf_counter() - t0:.2f} s; "
          f"prefill {prefill_tok / max(prefill_s, 1e-9):.1f} tok/s"
          + (f" ({cached} prompt tokens from the prompt cache)" if cached else "")
          + f", decode {decode_tok / max(decode_s, 1e-9):.1f} tok/s "
          f"(first calls include graph compiles: {compiles}); peak RSS {peak_mib:.0f} MiB; "
          f"results in {args.output}", file=sys.stderr)
    return 0
