"""Per-layer expert load of a checkpoint on a text: which experts the router picks.

    python examples/inspect_experts.py --model DIR --text "Some text" [--png load.png]

Prints, per MoE layer, the token share of the busiest expert vs the uniform share k/E and the
HF aux loss; --png writes a layer x expert heatmap.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from qwen3moe import Qwen3MoeForCausalLM, Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", default="The quick brown fox jumps over the lazy dog. " * 4)
    ap.add_argument("--png", default=None, help="write a layer x expert heatmap")
    args = ap.parse_args()

    model = Qwen3MoeForCausalLM.from_pretrained(args.model)
    ids = np.array([Tokenizer.from_pretrained(args.model).encode(args.text)])
    t0 = time.perf_counter()
    out = model(ids, output_router_logits=True)
    dt = time.perf_counter() - t0
    counts, _, n_tok = (t.asnumpy() for t in out.router_stats)  # [L_moe, E], [L_moe, E], scalar
    share = counts / counts.sum(1, keepdims=True)  # fraction of the layer's (token, slot) picks
    E, k = counts.shape[1], model.config.num_experts_per_tok
    print(f"{int(n_tok)} tokens, {E} experts, top-{k}; uniform share {1 / E:.3f}")
    for layer, row in enumerate(share):
        top = np.argsort(-row)[:3]
        print(f"moe layer {layer:2d}: max share {row.max():.3f} ({row.max() * E:.1f}x uniform); "
              f"busiest experts {top.tolist()}")
    print(f"aux loss (HF, pooled) = {float(out.aux_loss.asnumpy()):.4f} (k = {k} when balanced)")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.imshow(share, aspect="auto", cmap="viridis")
        plt.xlabel("expert"), plt.ylabel("MoE layer"), plt.colorbar(label="token share")
        plt.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"[forward {len(ids[0]) / dt:.1f} tok/s (includes compile); peak RSS {peak:.0f} MiB]")


if __name__ == "__main__":
    main()
