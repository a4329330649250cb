"""GPTBatches: dp sharding covers the single-process batch exactly, resume by sample offset."""
from __future__ import annotations

import numpy as np

from conftest import FIXTURES
from qwen3moe.io.gpt_dataset import build_gpt_dataset
from qwen3moe.io.gpt_loader import GPTBatches


def test_dp_shards_union_and_resume(tmp_path):
    ds = build_gpt_dataset(str(FIXTURES / "megatron_gpt" / "golden_a_text_document"), 16, 64,
                           cache_dir=str(tmp_path))
    whole = GPTBatches(ds, 4)
    shards = [GPTBatches(ds, 2, dp_rank=r, dp_size=2) for r in range(2)]
    for i in range(5):
        got = np.sort(np.concatenate([s.sample_ids(i) for s in shards]))
        np.testing.assert_array_equal(got, np.sort(whole.sample_ids(i)))
        assert whole.batch(i).shape == (4, 17)
    resumed = GPTBatches(ds, 4, start_sample=whole.position(2))
    np.testing.assert_array_equal(resumed.batch(0), whole.batch(3))
    item = ds[int(whole.sample_ids(1)[0])]
    np.testing.assert_array_equal(whole.batch(1)[0, :-1], item["input_ids"])
    np.testing.assert_array_equal(whole.batch(1)[0, 1:], item["labels"])
