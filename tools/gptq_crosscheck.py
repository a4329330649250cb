"""Cross-check our GPTQ folders against AutoGPTQ's own code (reference tooling, not the library).

Run in a scratch venv holding torch + transformers + auto_gptq (no GPU needed: only the
pure-torch path of `auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py` is used, loaded from its
file so the package's CUDA-oriented __init__ is not imported):

    python tools/gptq_crosscheck.py FOLDER REF.npz
REF.npz holds our library's dequantized weights per projection prefix (written by
`python tools/gptq_crosscheck.py --dump FOLDER REF.npz` in the project venv). For each prefix:
1. AutoGPTQ's forward on the identity gives its dequantized W^T: compared bit for bit with ours;
2. AutoGPTQ's `pack` of our dequantized W with our scales / zero points gives qweight and qzeros:
   compared bit for bit with the tensors we wrote.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys

import numpy as np


def dump(folder: str, out: str) -> None:
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.io.quantized import quantized_cells
    from qwen3moe.layers.quant import dequantize

    cells = quantized_cells(Qwen3MoeForCausalLM.from_pretrained(folder))
    ref = {}
    for name, c in cells.items():
        if name == "lm_head.weight":
            continue
        w = dequantize(c.qweight.asnumpy(), c.scales.asnumpy(), c.qzeros.asnumpy(), c.bits)
        if w.ndim == 2:
            ref[name[:-len(".weight")]] = w
            continue
        projs = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
        base = name.rsplit(".", 1)[0]
        for j in range(w.shape[0]):
            for r, part in enumerate(np.split(w[j], len(projs))):
                ref[f"{base}.{j}.{projs[r]}"] = part
    np.savez(out, **ref)


def check(folder: str, ref_path: str) -> int:
    import torch
    from safetensors import safe_open

    spec = importlib.util.find_spec("auto_gptq")
    path = os.path.join(spec.submodule_search_locations[0], "nn_modules", "qlinear", "qlinear_cuda_old.py")
    mod_spec = importlib.util.spec_from_file_location("qlinear_cuda_old", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    qc = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    bits, g = qc["bits"], qc["group_size"]
    t = {}
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        with safe_open(f, framework="pt") as fh:  # only the GPTQ tensors (numpy has no bf16)
            t.update({k: fh.get_tensor(k).numpy() for k in fh.keys()
                      if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")})
    ref = np.load(ref_path)
    bad = 0
    for prefix in sorted(ref.files):
        W = ref[prefix]
        O, I = W.shape
        ql = mod.QuantLinear(bits, g, I, O, False, weight_dtype=torch.float32)
        ql.qweight = torch.from_numpy(t[f"{prefix}.qweight"])
        ql.qzeros = torch.from_numpy(t[f"{prefix}.qzeros"])
        ql.scales = torch.from_numpy(t[f"{prefix}.scales"].astype(np.float32))
        ql.g_idx = torch.from_numpy(t[f"{prefix}.g_idx"])
        with torch.no_grad():
            theirs = ql(torch.eye(I, dtype=torch.float32)).numpy().T
        same_deq = np.array_equal(theirs, W)
        lin = torch.nn.Linear(I, O, bias=False)
        lin.weight.data = torch.from_numpy(W.copy())
        gg = I if g == -1 else g
        scales = torch.from_numpy(t[f"{prefix}.scales"].astype(np.float32).T.copy())  # [O, G]
        zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int32)
        packer = mod.QuantLinear(bits, gg, I, O, False, weight_dtype=torch.float32)
        packer.pack(lin, scales, zeros, torch.arange(I, dtype=torch.int32) // gg)
        same_pack = (np.array_equal(packer.qweight.numpy(), t[f"{prefix}.qweight"])
                     and np.array_equal(packer.qzeros.numpy(), t[f"{prefix}.qzeros"]))
        bad += not (same_deq and same_pack)
        if not (same_deq and same_pack) or prefix == sorted(ref.files)[0]:
            print(f"{prefix}: dequant equal {same_deq} (max diff {np.abs(theirs - W).max():.3g}), "
                  f"pack equal {same_pack}")
    print(f"{len(ref.files)} projections, {bad} mismatches (bits {bits}, group_size {g})")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "--dump":
        dump(sys.argv[2], sys.argv[3])
        sys.exit(0)
    sys.exit(check(sys.argv[1], sys.argv[2]))
