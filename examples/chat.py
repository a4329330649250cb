"""Multi-turn chat with the Qwen3 chat template and the thinking switch.

    python examples/chat.py --model DIR --turns "Hi!" "Tell me more." [--thinking]

Each turn re-renders the whole conversation with the folder's chat template (as HF does),
streams the assistant reply and appends it to the history (qwen3moe.ChatSession). The prompt
cache keeps the conversation's tokens between turns, so a turn prefills only its new ones: the
line after each reply says how many came from the cache. Without --thinking the template
closes an empty <think></think> block (enable_thinking=False).
"""
from __future__ import annotations

import argparse
import resource
import time

from qwen3moe import ChatSession, Qwen3MoeForCausalLM, Tokenizer, decode_runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--turns", nargs="+", default=["Hello! Who are you?", "Say that again, shorter."])
    ap.add_argument("--thinking", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    decode_runtime()  # before MindSpore's first op: the runtime `qwen3moe generate` uses
    model = Qwen3MoeForCausalLM.from_pretrained(args.model)
    chat = ChatSession(model, Tokenizer.from_pretrained(args.model), enable_thinking=args.thinking,
                       options={"max_new_tokens": args.max_new_tokens, "do_sample": False})
    produced, t0 = 0, time.perf_counter()
    for user in args.turns:
        print(f"user: {user}\nassistant: ", end="", flush=True)
        for piece in chat.send(user):
            print(piece, end="", flush=True)
        st = chat.stats
        produced += sum(st.new_tokens)
        print(f"\n  [prompt {st.prompt_tokens} tokens, {st.cached_tokens} from the prompt cache; "
              f"first token after {st.prefill_s:.2f} s]")
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"[{len(args.turns)} turns, {produced} tokens in {dt:.2f}s = {produced / dt:.1f} tok/s; "
          f"peak RSS {peak:.0f} MiB]")


if __name__ == "__main__":
    main()
