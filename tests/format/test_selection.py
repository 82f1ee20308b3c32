"""Selection rules against a brute-force per-row sort with the spec's tie-break (lower column first)."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neuroada_format as naf

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A few bf16 values so that ties are the rule rather than the exception; NaN and inf included.
TIE_POOL = np.array([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 0.25, np.inf, -np.inf, np.nan, 1e-40], np.float32)


def brute_force(weight, k, rule="magnitude"):
    """Per row: sort columns by (NaN last, |w| descending or ascending, column), keep k, ascend."""
    out = []
    for row in np.asarray(weight, dtype=np.float32):
        def key(c):
            a = abs(float(row[c]))
            if math.isnan(a):
                return (1, 0.0, c)
            return (0, -a if rule == "magnitude" else a, c)
        out.append(sorted(sorted(range(len(row)), key=key)[:k]))
    return np.array(out, dtype=np.int64).reshape(len(out), k)


@st.composite
def weights(draw):
    d_out, d_in = draw(st.integers(1, 12)), draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    kind = draw(st.sampled_from(("ties", "ties", "normal", "constant")))
    dtype = draw(st.sampled_from((ml_dtypes.bfloat16, np.float16, np.float32)))
    if kind == "ties":
        pool = TIE_POOL[: draw(st.integers(2, len(TIE_POOL)))]
        w = rng.choice(pool, size=(d_out, d_in))
    elif kind == "constant":
        w = np.full((d_out, d_in), draw(st.sampled_from((0.0, 1.0, np.nan))), np.float32)
    else:
        w = rng.standard_normal((d_out, d_in))
    return w.astype(dtype), draw(st.integers(1, d_in))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@PROPERTY
@given(case=weights(), rule=st.sampled_from(("magnitude", "reverse")))
def test_select_indices_equals_brute_force(case, rule):
    weight, k = case
    got = naf.select_indices(weight, k, rule)
    assert got.dtype == np.int64 and got.shape == (weight.shape[0], k)
    assert np.array_equal(got, brute_force(weight, k, rule))


def test_heavy_ties_take_lower_columns():
    w = np.ones((3, 10), ml_dtypes.bfloat16)
    w[1, 7] = 2
    w[2, :] = np.nan
    w[2, 9] = -0.0
    got = naf.select_indices(w, 3)
    assert got.tolist() == [[0, 1, 2], [0, 1, 7], [0, 1, 9]]


def test_topk_columns_general_scores_and_chunking(monkeypatch):
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 4, size=(50, 33)).astype(np.float64)
    monkeypatch.setattr("neuroada_format.selection.ROW_CHUNK_ENTRIES", 33 * 7)  # several row chunks
    got = naf.topk_columns(scores, 6)
    want = np.array([sorted(sorted(range(33), key=lambda c: (-row[c], c))[:6]) for row in scores])
    assert np.array_equal(got, want)


def test_random_rule_is_reproducible_and_seeded():
    w = np.zeros((8, 30), np.float32)
    a = naf.select_indices(w, 5, "random", seed=7)
    assert np.array_equal(a, naf.select_indices(w, 5, "random", seed=7))
    assert not np.array_equal(a, naf.select_indices(w, 5, "random", seed=8))
    assert np.all(np.diff(a, axis=1) > 0)
    scores = np.random.default_rng(7).random((8, 30))
    assert np.array_equal(a, brute_force(scores, 5))  # PCG64(seed).random scores, top-k
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.select_indices(w, 5, "random")
    assert info.value.rule == "2.2"


def test_gradient_rule_uses_absolute_scores():
    w = np.zeros((2, 5), np.float32)
    g = np.array([[0.1, -3.0, 0.2, 2.0, 0.0], [1, 1, 1, 1, 1]], np.float32)
    assert naf.select_indices(w, 2, "gradient", scores=g).tolist() == [[1, 3], [0, 1]]
    for bad in (None, np.zeros((2, 4))):
        with pytest.raises(naf.NeuroAdaError) as info:
            naf.select_indices(w, 2, "gradient", scores=bad)
        assert info.value.rule == "2.2"


@pytest.mark.parametrize("k", [0, -1, 6])
def test_k_outside_one_to_d_in_is_refused(k):
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.select_indices(np.ones((2, 5), np.float32), k)
    assert info.value.rule == "3.4"


def test_unknown_rule_is_refused():
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.select_indices(np.ones((2, 5), np.float32), 1, "largest")
    assert info.value.rule == "2.2" and "magnitude" in str(info.value)


@pytest.mark.parametrize("rule", ["magnitude", "reverse"])
def test_magnitude_scores_are_made_a_chunk_at_a_time(rule):
    """A bf16 weight of 64 MB (rule 4.4 re-derives the selection of every target): the scores are |W| of one
    row chunk at a time, never an f32 copy of the whole tensor (twice the weight) and its f64 widening."""
    import tracemalloc
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8192, 4096), dtype=np.float32).astype(ml_dtypes.bfloat16)
    tracemalloc.start()
    try:
        got = naf.select_indices(weight, 2, rule)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.75 * weight.nbytes, (peak, weight.nbytes)  # one chunk's temporaries: 37 MB (was 268 MB)
    rows = np.r_[0:3, 8189:8192]
    assert np.array_equal(got[rows], brute_force(weight[rows], 2, rule))


def test_int32_keys_rank_as_binary64_does():
    """Scores of 32 bits or fewer are ranked as int32 keys (2x faster than binary64 here); the same scores widened to
    binary64 take the other path: both must give the same columns, with NaN, -Inf, signed zeros, subnormals and
    ties in every row."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0],
                        np.float32)
    for trial in range(1500):
        d_out, d_in = int(rng.integers(1, 6)), int(rng.integers(1, 40))
        k = int(rng.integers(1, d_in + 1))
        x = [rng.standard_normal((d_out, d_in)).astype(np.float32), rng.choice(specials, (d_out, d_in)),
             rng.integers(-3, 4, (d_out, d_in)).astype(np.float32)][trial % 3]
        for arr in (x, np.abs(x), x.astype(ml_dtypes.bfloat16)):
            assert np.array_equal(naf.topk_columns(arr, k), naf.topk_columns(arr.astype(np.float64), k)), (arr, k)
