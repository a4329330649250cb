"""Generate text from a Hugging Face Qwen3-MoE folder with the public API.

    python examples/generate.py --model path/to/hf-folder --prompt "The history of" [--chat]

Prints the completion, tokens/s and peak memory.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from qwen3moe import Qwen3MoeForCausalLM, Tokenizer, decode_runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face folder (config.json, safetensors, tokenizer)")
    ap.add_argument("--prompt", default="The history of the Python programming language")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    ap.add_argument("--sample", action="store_true", help="sample (generation_config.json defaults)")
    args = ap.parse_args()

    decode_runtime()  # before MindSpore's first op: the runtime `qwen3moe generate` uses
    model = Qwen3MoeForCausalLM.from_pretrained(args.model)
    tok = Tokenizer.from_pretrained(args.model)
    text = args.prompt
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       enable_thinking=False)
    ids = np.array([tok.encode(text)])
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample, seed=0)
    dt = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    print(tok.decode(new.tolist(), skip_special_tokens=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"[{len(new)} tokens in {dt:.2f}s = {len(new) / dt:.1f} tok/s (first call includes compile); "
          f"peak RSS {peak:.0f} MiB]")


if __name__ == "__main__":
    main()
