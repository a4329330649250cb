"""Logits processors and Sampler vs straightforward per-row references (HF transformers 5.x semantics)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qwen3moe.generation import sampling as S
from qwen3moe.generation.sampling import Sampler

SETTINGS = settings(max_examples=60, deadline=None)
finite = st.floats(-30, 30, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def logits_batches(draw, min_vocab: int = 2, max_vocab: int = 24, with_inf: bool = True) -> np.ndarray:
    b = draw(st.integers(1, 3))
    v = draw(st.integers(min_vocab, max_vocab))
    x = draw(hnp.arrays(np.float32, (b, v), elements=finite))
    if with_inf and draw(st.booleans()):  # some rows already filtered by an earlier processor
        mask = draw(hnp.arrays(np.bool_, (b, v)))
        mask[:, 0] = False  # keep at least one finite logit per row
        x[mask] = -np.inf
    return x


def ref_softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) if v != -math.inf else 0.0 for v in row]
    return [v / sum(e) for v in e]


# ----------------------------------------------------------------- references
def ref_repetition(x: np.ndarray, history: list[list[int]], penalty: float) -> np.ndarray:
    out = x.astype(np.float64).tolist()
    for b, row in enumerate(history):
        for v in set(row):
            out[b][v] = out[b][v] * penalty if out[b][v] < 0 else out[b][v] / penalty
    return np.array(out)


def ref_top_k(x: np.ndarray, k: int) -> np.ndarray:
    out = x.astype(np.float64).copy()
    for b in range(x.shape[0]):
        kth = sorted(x[b].tolist(), reverse=True)[min(k, x.shape[1]) - 1]
        out[b] = [v if v >= kth else -math.inf for v in x[b].tolist()]
    return out


def ref_top_p_keep(row: list[float], p: float) -> tuple[list[bool], list[float]]:
    """Keep the top tokens (by logit, then by higher id) until their mass reaches p; also return cums."""
    probs = ref_softmax(row)
    order = sorted(range(len(row)), key=lambda i: (row[i], i))  # ascending, like a stable sort
    keep, cums, c = [False] * len(row), [0.0] * len(row), 0.0
    for rank, i in enumerate(order):
        c += probs[i]
        cums[i] = c
        keep[i] = c > 1 - p or rank == len(row) - 1
    return keep, cums


def ref_min_p_keep(row: list[float], min_p: float) -> tuple[list[bool], list[float]]:
    probs = ref_softmax(row)
    best = max(range(len(row)), key=lambda i: (row[i], -i))
    return [probs[i] >= min_p * max(probs) or i == best for i in range(len(row))], probs


# ---------------------------------------------------------------- processors
@SETTINGS
@given(x=logits_batches(), penalty=st.floats(0.3, 3.0), data=st.data())
def test_repetition_penalty_matches_reference(x: np.ndarray, penalty: float, data) -> None:
    hist = [data.draw(st.lists(st.integers(0, x.shape[1] - 1), max_size=10)) for _ in range(x.shape[0])]
    width = max(len(h) for h in hist)
    padded = np.array([h + [-1] * (width - len(h)) for h in hist], dtype=np.int64).reshape(x.shape[0], width)
    counts = S.token_counts(padded, x.shape[1])
    got = S.apply_repetition_penalty(x, counts, penalty)
    np.testing.assert_allclose(got, ref_repetition(x, hist, penalty), rtol=1e-6)
    np.testing.assert_array_equal(got, S.apply_repetition_penalty(x, counts > 0, penalty))  # mask == counts
    assert got.dtype == np.float32 and not np.shares_memory(got, x)


@SETTINGS
@given(x=logits_batches(), penalty=st.floats(-2, 2), data=st.data())
def test_presence_penalty_matches_reference(x: np.ndarray, penalty: float, data) -> None:
    counts = data.draw(hnp.arrays(np.int64, x.shape, elements=st.integers(0, 3)))
    want = x.astype(np.float64).copy()
    for b, v in np.ndindex(*x.shape):
        if counts[b, v] > 0:
            want[b, v] -= penalty
    np.testing.assert_allclose(S.apply_presence_penalty(x, counts, penalty), want, rtol=1e-6, atol=1e-5)


@SETTINGS
@given(x=logits_batches(), t=st.floats(0.05, 5.0))
def test_temperature(x: np.ndarray, t: float) -> None:
    np.testing.assert_allclose(S.apply_temperature(x, t), x / np.float32(t), rtol=1e-6)


@SETTINGS
@given(x=logits_batches(), k=st.integers(1, 30))
def test_top_k_matches_reference(x: np.ndarray, k: int) -> None:
    got = S.apply_top_k(x, k)
    np.testing.assert_array_equal(got, ref_top_k(x, k).astype(np.float32))
    np.testing.assert_array_equal(S.apply_top_k(x, 0), x)  # 0 disables (HF skips the warper)


@SETTINGS
@given(v=st.integers(2, 30), k=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_top_k_keeps_exactly_k_without_ties(v: int, k: int, seed: int) -> None:
    x = np.random.default_rng(seed).permutation(v).astype(np.float32)[None] * 0.5  # distinct values
    got = S.apply_top_k(x, k)
    assert np.isfinite(got).sum() == min(k, v)
    assert np.isfinite(got[0, np.argsort(-x[0])[: min(k, v)]]).all()


@SETTINGS
@given(x=logits_batches(), p=st.floats(0.01, 1.0))
def test_top_p_matches_reference_and_keeps_mass(x: np.ndarray, p: float) -> None:
    got = S.apply_top_p(x, p)
    for b in range(x.shape[0]):
        row = x[b].astype(np.float64).tolist()
        keep, cums = ref_top_p_keep(row, p)
        kept = np.isfinite(got[b])
        for i in np.flatnonzero(kept != np.array(keep)):
            # float32 (HF) vs float64 (reference) may only disagree right at the cut-off
            assert abs(cums[i] - (1 - p)) < 1e-5, (i, cums[i], p)
        probs = np.array(ref_softmax(row))
        mass = probs[kept].sum()
        assert mass >= p - 1e-5 or kept.sum() == 1
        assert mass - probs[kept].min() < p + 1e-5  # minimal: dropping the smallest kept falls below p
        np.testing.assert_array_equal(got[b][kept], x[b][kept])


@SETTINGS
@given(x=logits_batches(), min_p=st.floats(0.0, 1.0))
def test_min_p_matches_reference(x: np.ndarray, min_p: float) -> None:
    got = S.apply_min_p(x, min_p)
    for b in range(x.shape[0]):
        keep, probs = ref_min_p_keep(x[b].astype(np.float64).tolist(), min_p)
        kept = np.isfinite(got[b])
        thr = min_p * max(probs)
        for i in np.flatnonzero(kept != np.array(keep)):
            assert abs(probs[i] - thr) < 1e-6 * max(1.0, thr)
        assert kept[int(np.argmax(x[b]))]
        assert all(probs[i] >= thr * (1 - 1e-5) for i in np.flatnonzero(kept) if i != int(np.argmax(x[b])))
    np.testing.assert_array_equal(S.apply_min_p(x, None), x)


def test_top_p_example_from_hf() -> None:
    # probs [0.1, 0.2, 0.3, 0.4]: top_p 0.7 keeps {0.4, 0.3} (cum 0.1, 0.3 <= 0.3 removed)
    x = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32))
    assert np.isfinite(S.apply_top_p(x, 0.7)).tolist() == [[False, False, True, True]]
    assert np.isfinite(S.apply_top_p(x, 0.05)).tolist() == [[False, False, False, True]]  # keep >= 1
    assert np.isfinite(S.apply_top_p(x, 1.0)).all()


def test_min_new_tokens_suppresses_eos() -> None:
    x = np.zeros((2, 5), np.float32)
    out = S.apply_min_new_tokens(x, [3, 4], new_tokens=1, min_new_tokens=2)
    assert np.isneginf(out[:, 3:]).all() and np.isfinite(out[:, :3]).all()
    np.testing.assert_array_equal(S.apply_min_new_tokens(x, [3, 4], 2, 2), x)


# ------------------------------------------------------------ greedy / sample
@SETTINGS
@given(x=logits_batches(with_inf=False), data=st.data())
def test_greedy_is_argmax_lowest_tie(x: np.ndarray, data) -> None:
    tie = data.draw(st.integers(0, x.shape[1] - 1))
    x = x.copy()
    x[:, tie] = x.max()  # force a tie at the maximum
    want = [min(i for i in range(x.shape[1]) if x[b, i] == x[b].max()) for b in range(x.shape[0])]
    assert S.greedy(x).tolist() == want
    assert Sampler(do_sample=False)(x).tolist() == want


def test_sample_frequencies_and_never_removed() -> None:
    probs = np.array([0.5, 0.0, 0.2, 0.3], np.float64)
    x = np.tile(np.log(np.where(probs > 0, probs, 1.0)).astype(np.float32), (40000, 1))
    x[:, 1] = -np.inf
    ids = S.sample(x, np.random.default_rng(0))
    freq = np.bincount(ids, minlength=4) / len(ids)
    np.testing.assert_allclose(freq, probs, atol=0.01)
    assert freq[1] == 0
    with pytest.raises(ValueError, match="no finite logit"):
        S.sample(np.full((1, 3), -np.inf, np.float32), np.random.default_rng(0))


@SETTINGS
@given(x=logits_batches(), seed=st.integers(0, 2**32 - 1))
def test_sample_only_finite_and_reproducible(x: np.ndarray, seed: int) -> None:
    a = S.sample(x, np.random.default_rng(seed))
    assert np.isfinite(x[np.arange(x.shape[0]), a]).all()
    assert (a == S.sample(x, np.random.default_rng(seed))).all()


# --------------------------------------------------------------------- Sampler
def _steps(sampler: Sampler, x: np.ndarray, steps: int = 5) -> list[list[int]]:
    hist = np.zeros((x.shape[0], 2), np.int64)
    out = []
    for _ in range(steps):
        nxt = sampler(x, hist, prompt_length=2)
        hist = np.concatenate([hist, nxt[:, None]], axis=1)
        out.append(nxt.tolist())
    return out


def test_sampler_seeded_reproducibility() -> None:
    x = np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32)
    kw = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.95, repetition_penalty=1.1,
              presence_penalty=0.5, seed=1234)
    assert _steps(Sampler(**kw), x) == _steps(Sampler(**kw), x)
    assert _steps(Sampler(**kw), x, 20) != _steps(Sampler(**{**kw, "seed": 99}), x, 20)


@SETTINGS
@given(x=logits_batches(min_vocab=4, with_inf=False), seed=st.integers(0, 1000), data=st.data())
def test_sampler_pipeline_order(x: np.ndarray, seed: int, data) -> None:
    """Sampler == rep -> presence(output only) -> temperature -> top-k -> top-p -> min-p -> sample."""
    v = x.shape[1]
    hist = data.draw(hnp.arrays(np.int64, (x.shape[0], 6), elements=st.integers(0, v - 1)))
    kw = dict(temperature=data.draw(st.floats(0.2, 2.0)), top_k=data.draw(st.integers(0, v)),
              top_p=data.draw(st.floats(0.1, 1.0)), min_p=data.draw(st.one_of(st.none(), st.floats(0, 0.5))),
              repetition_penalty=data.draw(st.floats(0.5, 2.0)), presence_penalty=data.draw(st.floats(-2, 2)))
    sampler = Sampler(do_sample=True, seed=seed, **kw)
    y = S.apply_repetition_penalty(x, S.token_counts(hist, v), kw["repetition_penalty"])
    y = S.apply_presence_penalty(y, S.token_counts(hist[:, 4:], v), kw["presence_penalty"])
    y = S.apply_temperature(y, kw["temperature"]) if kw["temperature"] != 1.0 else y
    y = S.apply_top_k(y, kw["top_k"])
    # HF only adds TopP when p < 1: at p == 1 it would still drop tokens whose float32 prob underflows to 0
    y = S.apply_top_p(y, kw["top_p"]) if kw["top_p"] < 1.0 else y
    y = S.apply_min_p(y, kw["min_p"])
    np.testing.assert_array_equal(sampler.process(x, hist, prompt_length=4), y)
    assert sampler(x, hist, prompt_length=4).tolist() == S.sample(y, np.random.default_rng(seed)).tolist()
    greedy = Sampler(do_sample=False, **kw)  # greedy: penalties apply, warpers do not (HF)
    y0 = S.apply_presence_penalty(S.apply_repetition_penalty(x, S.token_counts(hist, v), kw["repetition_penalty"]),
                                  S.token_counts(hist[:, 4:], v), kw["presence_penalty"])
    assert greedy(x, hist, prompt_length=4).tolist() == S.greedy(y0).tolist()


def test_sampler_top_k1_is_greedy_and_min_new_tokens() -> None:
    x = np.random.default_rng(3).normal(size=(4, 30)).astype(np.float32)
    assert Sampler(do_sample=True, top_k=1, seed=0)(x).tolist() == S.greedy(x).tolist()
    x[:, 7] = 100.0  # eos would win ...
    s = Sampler(do_sample=False, min_new_tokens=2, eos_token_id=[7])
    hist = np.zeros((4, 3), np.int64)
    assert 7 not in s(x, hist, prompt_length=2).tolist()  # ... but only 1 new token so far
    assert s(x, hist, prompt_length=1).tolist() == [7] * 4


def test_sampler_argument_errors() -> None:
    with pytest.raises(ValueError, match="temperature"):
        Sampler(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        Sampler(top_p=0.0)
    with pytest.raises(ValueError, match="needs history_ids"):
        Sampler(repetition_penalty=1.2)(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="vocab size"):
        S.token_counts(np.array([[5]]), 4)
