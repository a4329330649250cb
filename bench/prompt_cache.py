"""Prompt caching: time to the first token of a conversation's second turn, cached vs fresh.

    PYTHONPATH=. OMP_WAIT_POLICY=PASSIVE python bench/prompt_cache.py --doc 2048 [--question 32] \
        [--reply 16] [--rounds 3] [--folder /work/data/synth-2l] [--quantize int4|none] [--dtype bfloat16]

One process: load the model (int4 g128 of a bf16 folder by default; `none` for a folder that is
already quantized or to keep its dtype; --dtype: the weights' storage, from_pretrained's dtype),
then `--rounds` rounds of
  turn 1   (fresh): a random `--doc`-token document + a `--question`-token question, `--reply` new
           tokens kept (max_new_tokens 128 sizes the engine: the turn stops early, as at an eos);
  turn 2 cached:    document + question + reply + another question, prompt_cache=True (the cache
           holds turn 1's tokens: only the reply's last token and the new question run);
  turn 2 fresh:     the same prompt with prompt_cache=False (every token prefilled).
Turn 1 runs again before each turn 2 (a fresh turn 2 overwrites the cache). Prints the prefill
wall seconds (time to the first token, sampling excluded) of both turn 2s per round and their
ratio. Rounds 1 and 2 compile graphs (round 2's cached turn runs on the engine the fresh turn 2 of
round 1 left, whose cache holds the longer prefix), later rounds are the steady state. Greedy,
batch 1.
"""
from __future__ import annotations

import argparse
import os
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="/work/data/synth-2l")
    ap.add_argument("--quantize", default="int4", choices=["int4", "int8", "none"])
    ap.add_argument("--doc", type=int, default=2048)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--reply", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv_cache_dtype", default="float32")
    ap.add_argument("--dtype", default="float32", help="from_pretrained dtype (bfloat16 for the 48-layer int4 folder)")
    args = ap.parse_args()

    import mindspore as ms
    import numpy as np

    ms.set_device("CPU")
    import qwen3moe
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.generation.generate import GenerationRun, resolve_config

    qwen3moe.decode_runtime()
    quant = None if args.quantize == "none" else args.quantize
    t0 = time.perf_counter()
    model = Qwen3MoeForCausalLM.from_pretrained(args.folder, quantization=quant, dtype=args.dtype,
                                                group_size=128 if quant == "int4" else None)
    print(f"loaded {args.folder} ({args.quantize}) in {time.perf_counter() - t0:.1f} s; "
          f"load1 {os.getloadavg()[0]:.2f}", flush=True)
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    turn1 = rng.integers(0, V, args.doc + args.question)
    cfg = resolve_config(model, ignore_eos=True, do_sample=False, kv_cache_dtype=args.kv_cache_dtype)

    def turn(ids, cache: bool, new: int, max_new: int):
        run = GenerationRun(model, ids[None], None, cfg.replace(prompt_cache=cache, max_new_tokens=max_new))
        reply = [int(t[0]) for _, t in zip(range(new), run.steps())]
        return run, reply

    print(f"{'round':>5} {'turn 2 tokens':>13} {'cached':>6} {'cached s':>9} {'fresh s':>8} {'fresh/cached':>12} "
          f"{'load1':>5}")
    for r in range(1, args.rounds + 1):
        _, reply = turn(turn1, cache=False, new=args.reply, max_new=128)
        turn2 = np.concatenate([turn1, reply, rng.integers(0, V, args.question)])
        cached, _ = turn(turn2, cache=True, new=1, max_new=16)
        fresh, _ = turn(turn2, cache=False, new=1, max_new=16)
        a, b = cached.stats.prefill_s, fresh.stats.prefill_s
        print(f"{r:>5} {len(turn2):>13} {cached.keep:>6} {a:>9.3f} {b:>8.3f} {b / a:>11.1f}x "
              f"{os.getloadavg()[0]:>5.2f}", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
