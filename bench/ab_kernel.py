"""Same-process A/B of one optional kernel module: prefill forward and a train step on bench-mini,
kernel on vs off (its `available()` patched to False while the "off" model is built), alternating.

Shapes: 4 x 256 tokens (prefill and train step). Reports best wall and process CPU time per side,
and the max |logit| difference and first-step loss of both sides (they must agree).
Usage: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/ab_kernel.py [forward|train] [rounds] [module]
(module: a qwen3moe.kernels module name whose available() the model reads at build time, or
"package.module:FLAG" for a module-level boolean the model reads at build time).
"""
from __future__ import annotations

import importlib
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402

FOLDER = "/tmp/qwen3moe-bench/bench-mini"


def _build(kernel_on: bool, module: str, train: bool):
    import mindspore as ms
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.training import AdamW
    from qwen3moe.training.step import TrainStep

    path, _, attr = module.partition(":")  # "name" -> kernels.name.available(); "mod.path:FLAG"
    mod = importlib.import_module(path if attr else f"qwen3moe.kernels.{path}")
    attr = attr or "available"
    saved = getattr(mod, attr)
    if not kernel_on:
        setattr(mod, attr, (lambda: False) if attr == "available" else False)
    try:
        model = Qwen3MoeForCausalLM.from_pretrained(FOLDER, dtype="float32")
    finally:
        setattr(mod, attr, saved)
    if not train:
        return model
    ms.set_seed(0)
    opt = AdamW(model.trainable_params(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    return TrainStep(model, opt, aux_coef=1e-3, clip=None)


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main(kind: str = "forward", rounds: int = 6, module: str = "linear") -> None:
    import mindspore as ms

    ms.set_device("CPU")
    train = kind == "train"
    ids = np.random.default_rng(0).integers(0, 8192, (4, 256))
    sides = {"on": _build(True, module, train), "off": _build(False, module, train)}
    if train:
        run = {k: (lambda s=s: float(s(ids)["loss"])) for k, s in sides.items()}
    else:
        run = {k: (lambda m=m: m(ids).logits.asnumpy()) for k, m in sides.items()}
    first = {k: _timed(f) for k, f in run.items()}  # compile
    if train:
        print(f"first-step loss on {first['on'][0]:.6f} off {first['off'][0]:.6f}")
    else:
        print(f"max |logit diff| {np.abs(first['on'][0] - first['off'][0]).max():.2e}")
    res = {k: [] for k in run}
    for i in range(rounds):
        for k in (("on", "off") if i % 2 == 0 else ("off", "on")):
            res[k].append(_timed(run[k])[1:])
    for k, v in res.items():
        print(f"{module} {k:3s}: best wall {min(x[0] for x in v) * 1e3:7.1f} ms  median "
              f"{np.median([x[0] for x in v]) * 1e3:7.1f}  best cpu {min(x[1] for x in v) * 1e3:7.1f} ms")
    bw = {k: min(x[0] for x in v) for k, v in res.items()}
    bc = {k: min(x[1] for x in v) for k, v in res.items()}
    print(f"speedup on vs off: wall {bw['off'] / bw['on']:.3f}x  cpu {bc['off'] / bc['on']:.3f}x")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["forward"]), *([int(sys.argv[2])] if len(sys.argv) > 2 else []),
         *(sys.argv[3:4]))
