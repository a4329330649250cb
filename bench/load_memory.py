"""Peak RSS of a load, a 1xP prefill, 8 decode steps and a 1xP forward, against the weights' size.

    OMP_WAIT_POLICY=PASSIVE python bench/load_memory.py --folder /work/data/synth-1l \
        [--dtype bfloat16] [--quantization int8] [--prompt 64]

Prints VmHWM (peak RSS) and VmRSS after each stage, and peak RSS / the folder's safetensors
bytes (the reference: a bf16 load of a bf16 folder should hold about that plus buffers).
Run one configuration per process: VmHWM never goes down.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def status() -> tuple[float, float]:
    """(VmHWM, VmRSS) of this process in MB."""
    got = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(("VmHWM", "VmRSS")):
                got[line[:5]] = int(line.split()[1]) / 1024
    return got["VmHWM"], got["VmRSS"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/work/data/synth-1l")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--prompt", type=int, default=64)
    a = ap.parse_args()
    import mindspore as ms

    ms.set_device("CPU")
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.generation.generate import GenerationRun, resolve_config

    weights_mb = sum(f.stat().st_size for f in Path(a.folder).glob("*.safetensors")) / 2**20
    t0 = time.perf_counter()

    def report(stage: str) -> None:
        hwm, rss = status()
        print(f"{stage:14s} peak RSS {hwm:7.0f} MB ({hwm / weights_mb:4.2f}x weights)  RSS now {rss:7.0f} MB  "
              f"t {time.perf_counter() - t0:6.1f} s", flush=True)

    print(f"{a.folder}: {weights_mb:.0f} MB of safetensors, dtype {a.dtype}, quantization {a.quantization}")
    model = Qwen3MoeForCausalLM.from_pretrained(a.folder, dtype=a.dtype, quantization=a.quantization)
    report("load")
    ids = np.random.default_rng(0).integers(0, 151643, (1, a.prompt))

    def generate(new: int) -> None:
        GenerationRun(model, ids, None, resolve_config(model, max_new_tokens=new, ignore_eos=True,
                                                       do_sample=False, prompt_cache=False)).run()

    generate(1)
    report(f"prefill 1x{a.prompt}")
    generate(9)
    report("+8 decode")
    model(ids).logits.asnumpy()
    report(f"forward 1x{a.prompt}")


if __name__ == "__main__":
    main()
