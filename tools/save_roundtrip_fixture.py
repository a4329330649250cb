"""Step 1 of the transformers round-trip check (run with the project venv):

    .venv/bin/python tools/save_roundtrip_fixture.py        # writes tests/fixtures/hf/roundtrip-bf16
    .venv-ref/bin/python tools/roundtrip_hf.py        # step 2: transformers loads it

Our save_pretrained of tiny-fp32-gqa in bf16, sharded; step 2 records transformers' logits on it.
"""
from pathlib import Path

from qwen3moe import Qwen3MoeForCausalLM

HF = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"
SAVE_KW = dict(dtype="bfloat16", max_shard_size="60KB")

if __name__ == "__main__":
    Qwen3MoeForCausalLM.from_pretrained(HF / "tiny-fp32-gqa").save_pretrained(HF / "roundtrip-bf16", **SAVE_KW)
