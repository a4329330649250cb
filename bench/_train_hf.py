"""Worker: HF transformers train step (loss with router aux 1e-3, torch.optim.AdamW)."""
import json
import resource
import sys
import time

import numpy as np
import torch


def run(folder: str, impl: str, ids: torch.Tensor, steps: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa",
                                                 experts_implementation=impl)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def one():
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    one()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    return {"best_s": min(times), "median_s": float(np.median(times))}


def main(folder: str, batch: int, seq: int, steps: int) -> None:
    torch.set_num_threads(2)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 8192, (batch, seq)))
    out = {}
    for impl in ("eager", "grouped_mm"):
        try:
            out[impl] = run(folder, impl, ids, steps)
        except Exception as exc:
            out[impl] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
