"""Multi-turn chat with the Qwen3 chat template and the thinking switch.

    python examples/chat.py --model DIR --turns "Hi!" "Tell me more." [--thinking]

Each turn re-renders the whole conversation with the folder's chat template (as HF does),
generates the assistant reply with streaming, and appends it to the history. Without
--thinking the template closes an empty <think></think> block (enable_thinking=False).
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from qwen3moe import Qwen3MoeForCausalLM, Tokenizer, decode_runtime
from qwen3moe.generation.generate import stream_generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--turns", nargs="+", default=["Hello! Who are you?", "Say that again, shorter."])
    ap.add_argument("--thinking", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    decode_runtime()  # before MindSpore's first op: the runtime `qwen3moe generate` uses
    model = Qwen3MoeForCausalLM.from_pretrained(args.model)
    tok = Tokenizer.from_pretrained(args.model)
    history: list[dict] = []
    produced, t0 = 0, time.perf_counter()
    for user in args.turns:
        history.append({"role": "user", "content": user})
        prompt = tok.apply_chat_template(history, add_generation_prompt=True, enable_thinking=args.thinking)
        ids = np.array([tok.encode(prompt)])
        print(f"user: {user}\nassistant: ", end="", flush=True)
        pieces = []
        for piece in stream_generate(model, ids, tokenizer=tok, max_new_tokens=args.max_new_tokens,
                                     do_sample=False):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        reply = "".join(pieces)
        produced += len(tok.encode(reply))
        history.append({"role": "assistant", "content": reply})
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"[{len(args.turns)} turns, ~{produced} tokens in {dt:.2f}s = {produced / dt:.1f} tok/s; "
          f"peak RSS {peak:.0f} MiB]")


if __name__ == "__main__":
    main()
