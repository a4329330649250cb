"""Process CPU time of one 1x512 prefill on the 2-layer real-geometry folder, per quantized mode
(the machine is shared: CPU seconds move far less with the load than wall time).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python bench/prefill_cpu.py MODE [REPS] [--folder F]

MODE: int8 | int4 (weight-only, g128 for int4) | int8-a8 | int4-a8 (the opt-in int8 activations).
One process per mode (run the modes alternately for an A/B); a warm-up prefill compiles the graph,
then each of REPS prefills prints wall ms, tokens/s and the process CPU ms (all threads), with the
1-min load average.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PREFILL_LEN = 512


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("int8", "int4", "int8-a8", "int4-a8"))
    ap.add_argument("reps", type=int, nargs="?", default=3)
    ap.add_argument("--folder", default="/work/data/synth-2l")
    a = ap.parse_args()
    import mindspore as ms

    ms.set_device("CPU")
    from qwen3moe import QuantizationConfig, Qwen3MoeForCausalLM
    from qwen3moe.generation.generate import GenerationRun, resolve_config

    bits = 8 if a.mode.startswith("int8") else 4
    qc = QuantizationConfig(bits, -1 if bits == 8 else 128,
                            activations="int8" if a.mode.endswith("-a8") else "float32")
    model = Qwen3MoeForCausalLM.from_pretrained(a.folder, quantization=qc)
    cfg = resolve_config(model, max_new_tokens=1, ignore_eos=True, do_sample=False, prompt_cache=False)

    def run(seed: int) -> tuple[float, float]:
        ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (1, PREFILL_LEN))
        r = GenerationRun(model, ids, None, cfg)
        c0 = time.process_time()
        r.run()
        return r.stats.prefill_s, time.process_time() - c0

    run(0)
    for i in range(a.reps):
        wall, cpu = run(i + 1)
        print(f"{a.mode}: prefill wall {wall * 1e3:7.1f} ms ({PREFILL_LEN / wall:6.1f} tok/s)  cpu {cpu * 1e3:7.1f} ms  "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{a.mode}: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
