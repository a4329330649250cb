"""Worker: qwen3moe prefill timing on a folder (run by bench/forward.py)."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before MindSpore loads libgomp (see qwen3moe/__init__.py)
import json
import resource
import sys
import time

import numpy as np
from mindspore import ops


def main(folder: str, batch: int, seq: int, reps: int) -> None:
    import mindspore as ms
    from mindspore import Tensor, ops

    ms.set_device("CPU")
    from qwen3moe import Qwen3MoeForCausalLM

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    model = Qwen3MoeForCausalLM.from_pretrained(folder, dtype="float32")
    load_s = time.perf_counter() - t0
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq))
    t0 = time.perf_counter()
    model(ids).logits.asnumpy()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(ids).logits.asnumpy()
        times.append(time.perf_counter() - t0)
    a = Tensor(np.random.randn(2048, 2048).astype(np.float32))
    mm = ms.jit(lambda_mm)
    mm(a).asnumpy()
    t0 = time.perf_counter()
    for _ in range(5):
        mm(a).asnumpy()
    peak = 5 * 2 * 2048**3 / (time.perf_counter() - t0)
    print(json.dumps({"best_s": min(times), "median_s": float(np.median(times)), "compile_s": compile_s,
                      "load_s": load_s, "load_rss_mb": (load_rss - rss0) / 1024, "rss0_mb": rss0 / 1024,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "matmul_flops": peak}))


def lambda_mm(a):
    return ops.matmul(a, a)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
