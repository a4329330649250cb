"""TrainStep behaviour beyond HF parity: the non-finite guard, recompute, fp16 compute.

Model: the `tiny` preset with 2 layers (8 experts, top-2, untied embeddings) on CPU, fp32.
"""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from qwen3moe.training.precision import DynamicLossScale

LRS = (2.5e-3, 5e-3, 5e-3, 2.75e-3)  # the lr changes between steps (the bug needed that)


def tiny_model(seed: int = 0, **overrides):
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed

    set_init_seed(seed)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=2, **overrides))


def make_step(model, **kw):
    from qwen3moe.training import AdamW
    from qwen3moe.training.step import TrainStep

    opt = AdamW(model.trainable_params(), lr=5e-3, weight_decay=0.1)
    return TrainStep(model, opt, clip=1.0, aux_coef=1e-3, **kw)


def state(step) -> dict[str, np.ndarray]:
    """Parameters, both AdamW moments and the step counter, as numpy copies."""
    opt = step.optimizer
    out = {p.name: p.asnumpy().copy() for p in opt.parameters}
    out.update({k: np.array(v, copy=True) for k, v in opt.state_arrays().items()})
    return out


def batches(n: int, seed: int = 0, avoid: int | None = None) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, 1024, (4, 32))
        if avoid is not None:
            ids[ids == avoid] = avoid + 1
        out.append(ids)
    return out


def run(step, data, lrs=LRS) -> list[float]:
    losses = []
    for lr, ids in zip(lrs, data):
        step.optimizer.set_lr(lr)
        losses.append(step(ids)["loss"])
    return losses


def test_skip_nonfinite_does_not_change_finite_training():
    """Regression: with skip_nonfinite=True the update ran in an input-less compiled graph that
    never saw `set_lr`, so from the first lr change on the run drifted (loss 6.95391 vs 6.95256
    at step 3). Both settings run the same kernels in the same order, so they must agree to
    float32 rounding (observed: bit-identical); 1e-6 leaves room for a reordered reduction."""
    data = batches(len(LRS))
    plain, guarded = make_step(tiny_model()), make_step(tiny_model(), skip_nonfinite=True)
    lp, lg = run(plain, data), run(guarded, data)
    np.testing.assert_allclose(lg, lp, rtol=0, atol=1e-6)
    sp, sg = state(plain), state(guarded)
    for name in sp:
        np.testing.assert_allclose(sg[name], sp[name], rtol=0, atol=1e-6, err_msg=name)
    assert guarded.optimizer.get_lr() == pytest.approx(LRS[-1])


def test_nonfinite_step_is_skipped_and_leaves_state_untouched():
    """A batch whose loss and gradients are NaN (it reads a NaN embedding row) is skipped:
    parameters, moments and the AdamW step count stay bit-identical, the buffers are cleared,
    and the following steps equal a run that never saw the bad batch."""
    bad_token = 7
    good = batches(3, seed=3, avoid=bad_token)
    bad = good[0].copy()
    bad[0, 5] = bad_token
    models = [tiny_model(), tiny_model()]
    for m in models:
        emb = m.model.embed_tokens.weight
        w = emb.asnumpy().copy()
        w[bad_token] = np.nan
        emb.set_data(Tensor(w))
    guarded, ref = make_step(models[0], skip_nonfinite=True), make_step(models[1])
    run(guarded, good[:1], LRS[:1])
    run(ref, good[:1], LRS[:1])
    before = state(guarded)
    m = guarded(bad)
    assert m["skipped"] and not np.isfinite(m["grad_norm"])
    after = state(guarded)
    for name, arr in before.items():
        np.testing.assert_array_equal(after[name], arr, err_msg=name)
    assert all(float(np.abs(a.asnumpy()).sum()) == 0.0 for a in guarded.graph.acc)
    lg, lr_ = run(guarded, good[1:], LRS[1:3]), run(ref, good[1:], LRS[1:3])
    np.testing.assert_allclose(lg, lr_, rtol=0, atol=1e-6)
    sg, sr = state(guarded), state(ref)
    for name in sr:  # the NaN row itself stays NaN in both (assert_allclose: NaN == NaN)
        np.testing.assert_allclose(sg[name], sr[name], rtol=0, atol=1e-6, err_msg=name)


def test_recompute_layers_semantics_and_errors():
    from qwen3moe.training.recompute import RecomputeError, apply_recompute, recompute_layers

    assert recompute_layers(False, 6) == [] and recompute_layers(True, 3) == [0, 1, 2]
    assert recompute_layers([2], 6) == [0, 1]
    model = tiny_model()
    assert apply_recompute(model, [1]) == [0]  # Cell.recompute() marks only the chosen layer
    assert ["output_recompute" in l.get_flags() for l in model.model.layers] == [True, False]
    assert recompute_layers([1, 2], 5, pipeline_stages=2) == [0, 2, 3]  # stages [0,2) [2,5)
    for bad, stages, words in (("yes", 1, "expected true"), ([1, 1], 1, "2 entries"),
                               ([4], 1, "stage of 3"), ([-1], 1, "non-negative")):
        with pytest.raises(RecomputeError, match=words) as err:
            recompute_layers(bad, 3, stages)
        assert str(err.value).startswith("recompute_config.recompute") and "\n" not in str(err.value)


def test_recompute_gives_the_same_gradients():
    """Recomputed layers (custom-bprop attention and MoE kernels inside) replay the same fp32 ops
    in the same order, so gradients and loss are bit-identical (observed); atol 1e-7 allows for
    a differently fused reduction only. The second step checks the update path too."""
    from qwen3moe.training.recompute import apply_recompute

    data = batches(2, seed=5)
    plain, rc = make_step(tiny_model()), make_step(tiny_model())
    assert apply_recompute(rc.model, True) == [0, 1]
    assert all("output_recompute" in layer.get_flags() for layer in rc.model.model.layers)
    (mp, gp), (mr, gr) = plain.gradients(data[0]), rc.gradients(data[0])
    assert mr["loss"] == pytest.approx(mp["loss"], abs=1e-7)
    for a, b in zip(gp, gr):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-7)
    plain.apply(), rc.apply()
    assert rc(data[1])["loss"] == pytest.approx(plain(data[1])["loss"], abs=1e-6)


def test_seq_aux_mode_is_the_mean_of_per_sequence_megatron_losses():
    """aux_mode="seq": one sequence -> the "megatron" loss and gradients; two sequences ->
    lm + coef * mean over rows of each row's own Megatron aux (rows do not interact in the
    forward, so a row alone has the same router statistics). Losses 1e-6 (fp32 sums of ~7);
    gradients 1e-6 abs: the aux gradient flows through a different reduction graph (observed
    1.2e-7, one fp32 ulp of the O(1) entries)."""
    from qwen3moe.training import AdamW
    from qwen3moe.training.step import TrainStep

    model, coef = tiny_model(), 0.5
    opt = AdamW(model.trainable_params(), lr=1e-3)
    x = np.random.default_rng(4).integers(0, 1024, (2, 16))
    seq, meg = (TrainStep(model, opt, aux_coef=coef, aux_mode=mode) for mode in ("seq", "megatron"))
    seq_m, seq_g = seq.gradients(x[:1])
    meg_m, meg_g = meg.gradients(x[:1])
    assert seq_m["loss"] == pytest.approx(meg_m["loss"], abs=1e-6)
    for a, b in zip(meg_g, seq_g):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    # the same steps again (their compiled graphs reused; gradients() reports each batch's own metrics)
    rows = [meg.gradients(x[b:b + 1])[0]["aux_megatron"] for b in range(2)]
    both = seq.gradients(x)[0]
    assert both["loss"] - both["lm_loss"] == pytest.approx(coef * np.mean(rows), abs=1e-6)
    assert abs(both["aux_megatron"] - np.mean(rows)) > 1e-5  # batch value differs: test can fail


def run_precision(dtype: str, loss_scale=None, steps: int = 4):
    from qwen3moe.training import AdamW
    from qwen3moe.training.precision import set_compute_dtype
    from qwen3moe.training.step import TrainStep

    model = tiny_model()
    set_compute_dtype(model, dtype)
    # no clipping: clipping to a fixed norm would hide a missing unscale (so would AdamW alone)
    step = TrainStep(model, AdamW(model.trainable_params(), lr=1e-3), clip=None, loss_scale=loss_scale)
    return step, [step(ids) for ids in batches(steps, seed=9)]


def test_fp16_compute_tracks_fp32_with_fp32_master_weights():
    """fp16 decoder layers, fp32 master weights / moments, dynamic loss scale 2^16.
    Losses within 2e-3 of fp32 over 4 steps: fp16 rounds activations to 2^-11 relative and the
    loss of this model is ~ln(1024) with O(1e-2) logits (observed ~2e-4 over 6 steps); the
    grad norm within 2% (observed < 0.5%) and the second moments within 5% in norm — both
    would be off by the loss scale (2^16, 2^32) if the gradients were not unscaled, which
    the losses alone would not reveal (AdamW is nearly scale-invariant)."""
    s32, m32 = run_precision("float32")
    s16, m16 = run_precision("float16", DynamicLossScale())
    np.testing.assert_allclose([m["loss"] for m in m16], [m["loss"] for m in m32], rtol=0, atol=2e-3)
    assert [m["loss"] for m in m16] != [m["loss"] for m in m32]  # fp16 really ran
    assert not any(m["skipped"] for m in m16) and all(m["loss_scale"] == 2.0 ** 16 for m in m16)
    for a, b in zip(m16, m32):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)
    v16, v32 = (np.sqrt(sum(float((q.asnumpy() ** 2).sum()) for q in s.optimizer.exp_avg_sq)) for s in (s16, s32))
    assert v16 == pytest.approx(v32, rel=5e-2)
    assert all(p.dtype == s32.optimizer.parameters[0].dtype for p in s16.optimizer.parameters)  # fp32 masters


def test_loss_scale_backs_off_on_overflow_and_skips_the_step():
    """S = 2^40 overflows the fp16 backward: the step is skipped (parameters, moments, AdamW
    step bit-identical) and S halves; with a safe S updates apply and S doubles after
    `window` finite steps."""
    from qwen3moe.training import AdamW
    from qwen3moe.training.precision import set_compute_dtype
    from qwen3moe.training.step import TrainStep

    model = tiny_model()
    set_compute_dtype(model, "float16")
    ls = DynamicLossScale(2.0 ** 40, factor=2.0, window=2)
    step = TrainStep(model, AdamW(model.trainable_params(), lr=1e-3), clip=1.0, loss_scale=ls)
    data = batches(3, seed=10)
    before = state(step)
    m = step(data[0])
    assert m["skipped"] and m["loss_scale"] == 2.0 ** 40 and ls.scale == 2.0 ** 39
    assert np.isfinite(m["loss"])  # the loss itself is fine: only the scaled backward overflowed
    for name, arr in before.items():
        np.testing.assert_array_equal(state(step)[name], arr, err_msg=name)
    ls.scale = 2.0 ** 8
    m1, m2 = step(data[1]), step(data[2])
    assert not m1["skipped"] and not m2["skipped"] and ls.scale == 2.0 ** 9
    assert float(step.optimizer.step.asnumpy()) == 2.0


def test_bf16_compute_on_cpu_is_one_clear_error_and_scale_sense_parsing():
    from qwen3moe.training.precision import PrecisionError, check_compute_dtype, set_compute_dtype

    with pytest.raises(PrecisionError) as err:
        set_compute_dtype(tiny_model(), "bf16", key="runner_config.compute_dtype")
    msg = str(err.value)
    assert msg.startswith("runner_config.compute_dtype: bfloat16") and "float16" in msg and "\n" not in msg
    with pytest.raises(PrecisionError, match="runner_config.compute_dtype: expected one of"):
        check_compute_dtype("int8", "runner_config.compute_dtype")
    assert DynamicLossScale.from_scale_sense(1.0).scale == 2.0 ** 16
    d = DynamicLossScale.from_scale_sense({"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 4096,
                                           "scale_factor": 2, "scale_window": 50})
    assert (d.scale, d.factor, d.window) == (4096.0, 2.0, 50)
    with pytest.raises(PrecisionError, match="runner_wrapper.scale_sense.bogus: unknown key"):
        DynamicLossScale.from_scale_sense({"bogus": 1})
