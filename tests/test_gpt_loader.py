"""GPTBatches: dp shards stack to the single-process batch exactly, resume by sample offset."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import FIXTURES
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
        assert whole.tokens(i).shape == (4, 17)
        # Megatron's sampler: rank r takes the contiguous rows [r*B, (r+1)*B) of the global batch
        np.testing.assert_array_equal(np.concatenate([s.batch(i)["input_ids"] for s in shards]),
                                      whole.batch(i)["input_ids"])
    resumed = GPTBatches(ds, 4, start_sample=whole.position(2))
    np.testing.assert_array_equal(resumed.tokens(0), whole.tokens(3))
    item = ds[int(whole.sample_ids(1)[0])]
    np.testing.assert_array_equal(whole.tokens(1)[0, :-1], item["input_ids"])
    np.testing.assert_array_equal(whole.tokens(1)[0, 1:], item["labels"])


def test_batch_honours_the_loss_mask_in_the_lm_loss(tmp_path):
    """eod_mask_loss: the dataset masks predictions made at EOD inputs; GPTBatches turns them
    into -100 labels, and TrainStep's lm_loss equals a NumPy masked cross-entropy over the
    model's logits (sum over loss_mask = 1 positions / their count; 1e-5: fp32 CE of ~7)."""
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed
    from qwen3moe.training import AdamW
    from qwen3moe.training.step import TrainStep

    eod = 1023
    ds = build_gpt_dataset(str(FIXTURES / "megatron_gpt" / "golden_a_text_document"), 16, 64,
                           eod_mask_loss=True, eod_id=eod, cache_dir=str(tmp_path))
    data = GPTBatches(ds, 4)
    i = next(j for j in range(8) if sum((it["loss_mask"] == 0).sum() for it in data.items(j)) > 0)
    b, items = data.batch(i), data.items(i)
    mask_BS = np.stack([it["loss_mask"] for it in items])
    np.testing.assert_array_equal(b["labels"][:, 1:] == -100, mask_BS == 0)
    np.testing.assert_array_equal(b["input_ids"], data.tokens(i))
    assert (b["input_ids"][:, :-1][mask_BS == 0] == eod).all()

    set_init_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=1))
    step = TrainStep(model, AdamW(model.trainable_params()), aux_coef=0.0, clip=None)
    lm = step.gradients(b)[0]["lm_loss"]
    logits = model(b["input_ids"]).logits.asnumpy().astype(np.float64)[:, :-1]
    target = np.stack([it["labels"] for it in items])
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, target[..., None], -1)[..., 0]
    assert lm == pytest.approx((nll * mask_BS).sum() / mask_BS.sum(), abs=1e-5)
    assert abs(lm - nll.mean()) > 1e-4  # the mask changes the value (the test can fail)
