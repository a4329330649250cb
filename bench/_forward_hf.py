"""Worker: HF transformers prefill timing on the same folder (reference venv only)."""
import json
import resource
import sys
import time

import numpy as np
import torch


def run(folder: str, impl: str, ids: torch.Tensor, reps: int) -> dict:
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, experts_implementation=impl, **kwargs)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.eval()
    with torch.inference_mode():
        model(ids)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
    return {"best_s": min(times), "median_s": float(np.median(times))}


def main(folder: str, batch: int, seq: int, reps: int) -> None:
    torch.set_num_threads(2)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 8192, (batch, seq)))
    out = {}
    for impl in ("eager", "grouped_mm"):
        try:
            out[impl] = run(folder, impl, ids, reps)
        except Exception as exc:  # an implementation missing in this transformers build
            out[impl] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    a = torch.randn(2048, 2048)
    a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    out["matmul_flops"] = 5 * 2 * 2048**3 / (time.perf_counter() - t0)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
