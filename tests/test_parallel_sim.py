"""Tensor / expert (/ sequence) parallel forward on simulated ranks (`ParallelLM`, inference
layout: KV heads replicated when tp > K, as on the MQA fixture) == the single-device model.

fp32 tolerance 1e-4 on logits: sharding changes only the summation order of the row-parallel
reductions (partial sums across ranks), like the fp32 noise of the HF parity tests.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import HF_FIXTURES


@pytest.fixture(scope="module")
def models():
    from qwen3moe import Qwen3MoeForCausalLM

    out = {}
    for name in ("tiny-fp32-gqa", "tiny-mqa-dense"):
        m = Qwen3MoeForCausalLM.from_pretrained(HF_FIXTURES / name)
        ids = np.load(HF_FIXTURES / name / "ref_outputs.npz")["input_ids"]
        ids = np.concatenate([ids, ids[:, ::-1]])  # 4 rows: ep=4 over tp=1 folds into dp=4
        out[name] = (m, ids, m(ids).logits.asnumpy())
    return out


SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", ["tiny-fp32-gqa", "tiny-mqa-dense"])
@pytest.mark.parametrize("tp, ep, sp", [(1, 1, False), (2, 1, False), (4, 1, False), (1, 2, False),
                                        pytest.param(1, 4, False, marks=SLOW), (2, 2, False),
                                        pytest.param(2, 4, False, marks=SLOW), pytest.param(4, 2, False, marks=SLOW),
                                        (2, 1, True), (4, 2, True)])
def test_tp_ep_logits_equal_single_device(models, name, tp, ep, sp):
    from qwen3moe.parallel.mesh import Mesh
    from parallel_sim.trainer import ParallelLM

    model, ids, want = models[name]
    mesh = Mesh(dp=max(1, ep // tp), tp=tp, ep=ep, sp=sp)  # experts fold into the dp*tp ranks
    got = ParallelLM.from_model(model, mesh, train=False).logits(ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_plans_cover_every_parameter_and_shard_exactly():
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.parallel.plans import TP_PLAN, shard_array, style_of

    model = Qwen3MoeForCausalLM(Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=2, mlp_only_layers=[0]))
    for p in model.get_parameters():
        arr = p.asnumpy()
        style = style_of(p.name, TP_PLAN)
        parts = [shard_array(arr, style, r, 2) for r in range(2)]
        if style == "replicate":
            assert all(np.array_equal(x, arr) for x in parts)
        else:
            assert sum(x.size for x in parts) == arr.size, p.name
    with pytest.raises(ValueError, match="not divisible"):
        shard_array(np.zeros((3, 4)), "column", 0, 2)


