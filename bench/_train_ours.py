"""Worker: qwen3moe compiled train step (lm + 1e-3 aux, AdamW) on the bench folder."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before MindSpore loads libgomp (see qwen3moe/__init__.py)
import json
import resource
import sys
import time

import numpy as np


def main(folder: str, batch: int, seq: int, steps: int) -> None:
    import mindspore as ms

    ms.set_device("CPU")
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.training import AdamW
    from qwen3moe.training.step import TrainStep

    model = Qwen3MoeForCausalLM.from_pretrained(folder)
    opt = AdamW(model.trainable_params(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    step = TrainStep(model, opt, aux_coef=1e-3, clip=None)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq))
    t0 = time.perf_counter()
    step(ids)
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        m = step(ids)
        times.append(time.perf_counter() - t0)
        losses.append(float(m["loss"]))
    print(json.dumps({"best_s": min(times), "median_s": float(np.median(times)), "compile_s": compile_s,
                      "losses": losses, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
