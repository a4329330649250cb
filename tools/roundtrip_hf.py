"""Step 2 of the transformers round-trip check (needs the `reference` extra):

    .venv/bin/python tools/save_roundtrip_fixture.py       # step 1: our save_pretrained writes the folder
    .venv-ref/bin/python tools/roundtrip_hf.py             # step 2: transformers 5.24 loads it

Records transformers' logits on the folder our library wrote, so tests can check that what we
save is what transformers reads (tests/test_parity_hf.py::test_transformers_loads_what_we_save).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import Qwen3MoeForCausalLM

HF = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"


def main() -> None:
    torch.set_num_threads(1)
    folder = HF / "roundtrip-bf16"
    ref = np.load(HF / "tiny-fp32-gqa" / "ref_outputs.npz")
    model = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                experts_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(ref["input_ids"])).logits.float().numpy()
    np.savez(folder / "hf_logits.npz", input_ids=ref["input_ids"], logits=logits)


if __name__ == "__main__":
    main()
