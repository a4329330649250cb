"""GPTDataset / blending == megatron-core 0.16.1 (goldens from tools/make_gpt_golden.py):
same length, index arrays and every sample, for several epochs, a 0.3/0.7 blend, a split and
reset_position_ids + eod_mask_loss + attention mask with pad == eod."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import FIXTURES
from qwen3moe.io.gpt_dataset import build_gpt_dataset, sample_index

GOLD = FIXTURES / "megatron_gpt"
META = json.loads((GOLD / "gpt_golden.json").read_text())
REF = np.load(GOLD / "gpt_golden.npz")


def build(name: str, tmp_path):
    c = META["cases"][name]
    prefixes, weights = c["blend"]
    paths = [str(GOLD / p) for p in prefixes]
    data_path = paths if weights is None else [x for w, p in zip(weights, paths) for x in (str(w), p)]
    return build_gpt_dataset(data_path, c["seq"], c["n"], seed=1234, split=c.get("split", "1,0,0"),
                             eod_mask_loss=c.get("eod_mask_loss", False),
                             reset_position_ids=c.get("reset_position_ids", False),
                             reset_attention_mask=c.get("reset_attention_mask", False),
                             create_attention_mask=c.get("create_attention_mask", False),
                             pad_id=c.get("pad", -1), eod_id=META["eod"], cache_dir=str(tmp_path))


@pytest.mark.parametrize("name", sorted(META["cases"]))
def test_samples_identical_to_megatron(name, tmp_path):
    ds = build(name, tmp_path)
    assert len(ds) == META["cases"][name]["len"]
    inner = ds.datasets[0] if hasattr(ds, "datasets") else ds
    for k in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(np.asarray(getattr(inner, k)), REF[f"{name}.{k}"], err_msg=k)
    if f"{name}.dataset_index" in REF:
        np.testing.assert_array_equal(ds.dataset_index, REF[f"{name}.dataset_index"])
        np.testing.assert_array_equal(ds.dataset_sample_index, REF[f"{name}.dataset_sample_index"])
    items = [ds[i] for i in range(len(ds))]
    for ours, theirs in (("input_ids", "tokens"), ("labels", "labels"), ("loss_mask", "loss_mask"),
                         ("position_ids", "position_ids")):
        np.testing.assert_array_equal(np.stack([it[ours] for it in items]), REF[f"{name}.{theirs}"], err_msg=ours)
    if f"{name}.attention_mask" in REF:
        np.testing.assert_array_equal(np.stack([it["attention_mask"] for it in items]), REF[f"{name}.attention_mask"])


def test_index_cache_is_reused(tmp_path):
    a = build("single", tmp_path)
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert len(cached) == 3
    b = build("single", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == cached
    np.testing.assert_array_equal(a[5]["input_ids"], b[5]["input_ids"])


def test_sample_index_scales_to_a_billion_tokens():
    """The vectorised builder on 1B tokens' worth of sizes (250k documents x 4000 tokens)."""
    import time

    sizes = np.full(250_000, 4000, np.int32)
    doc = np.random.RandomState(0).permutation(250_000).astype(np.int32)
    t0 = time.perf_counter()
    idx = sample_index(sizes, doc, 4096, (250_000 * 4000 - 1) // 4096)
    assert time.perf_counter() - t0 < 30 and idx.shape == ((250_000 * 4000 - 1) // 4096 + 1, 2)
