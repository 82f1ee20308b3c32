"""The merge rule against a plain per-entry f32 loop, exact unmerge, and the dtype/layout helpers."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neuroada_format as naf
from neuroada_format.dtypes import NUMPY_DTYPES, dtype_name, index_dtype_for, nonfinite_mask, round_to
from neuroada_format.layout import canonical_shape, canonical_view, flat_positions, stored_shape

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOAT_DTYPES = ("BF16", "F16", "F32")


def reference_merge(weight, deltas, layout):
    """The spec's rule written out entry by entry: f32 scalars, adapters in order, one rounding at the end."""
    out = weight.copy()
    d_out, d_in = canonical_shape(weight.shape, layout)
    for r in range(d_out):
        touched = sorted({int(c) for d in deltas for c in d.indices[r]})
        for c in touched:
            pos = (r, c) if layout == "out_in" else (c, r)
            acc = np.float32(weight[pos])
            for d in deltas:
                for j in range(d.indices.shape[1]):
                    if int(d.indices[r, j]) == c:
                        term = np.float32(np.float32(d.scale) * np.float32(d.values[r, j]))
                        acc = np.float32(acc + term)
            out[pos] = np.array(acc, dtype=np.float32).astype(weight.dtype)  # ml_dtypes/numpy: RNE
    return out


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


@st.composite
def merge_cases(draw):
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    d_out, d_in = draw(st.integers(1, 10)), draw(st.integers(1, 24))
    layout = draw(st.sampled_from(("out_in", "in_out")))
    base_dtype = draw(st.sampled_from(FLOAT_DTYPES))
    # Large values make rounding bite (and may overflow f16 to inf: the rule still defines the bits).
    magnitude = draw(st.sampled_from((1e-3, 1.0, 300.0, 60000.0)))
    stored = (d_out, d_in) if layout == "out_in" else (d_in, d_out)
    weight = (rng.standard_normal(stored) * magnitude).astype(NUMPY_DTYPES[base_dtype])
    deltas = []
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.integers(1, d_in))
        idx = np.sort(np.argsort(rng.random((d_out, d_in)), axis=1)[:, :k], axis=1)
        vdt = draw(st.sampled_from(FLOAT_DTYPES))
        vmag = draw(st.sampled_from((1e-4, 1e-2, 1.0, 100.0)))
        values = (rng.standard_normal((d_out, k)) * vmag).astype(NUMPY_DTYPES[vdt])
        scale = draw(st.one_of(st.sampled_from((1.0, -1.0, 0.5, 0.3, 0.0, 2.0)),
                               st.floats(-8, 8, allow_nan=False, allow_infinity=False)))
        deltas.append(naf.Delta(idx.astype(NUMPY_DTYPES[index_dtype_for(d_in)]), values, scale))
    return weight, deltas, layout


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:merge overflowed:RuntimeWarning")
@PROPERTY
@given(case=merge_cases())
def test_merge_equals_the_per_entry_f32_loop(case):
    weight, deltas, layout = case
    before = weight.copy()
    merged = naf.merge_weight(weight, deltas, layout)
    assert np.array_equal(bits(weight), bits(before))  # merge_weight never touches its input
    want = reference_merge(weight, deltas, layout)
    assert merged.dtype == weight.dtype
    assert np.array_equal(bits(merged), bits(want))
    positions, values = naf.merged_values(weight, deltas, layout)
    assert np.all(np.diff(positions) > 0)
    assert np.array_equal(bits(values), bits(want.reshape(-1)[positions]))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:merge overflowed:RuntimeWarning")
@PROPERTY
@given(case=merge_cases(), specials=st.booleans())
def test_merge_in_place_then_unmerge_restores_every_bit(case, specials):
    weight, deltas, layout = case
    if specials:  # NaN payloads, -0.0, inf, subnormals: unmerge writes originals back, so all survive
        flat = weight.reshape(-1)
        pool = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-40, 5.96e-8], np.float32).astype(weight.dtype)
        flat[: min(flat.size, pool.size)] = pool[: min(flat.size, pool.size)]
    original = weight.copy()
    saved = naf.merge_weight_(weight, deltas, layout)
    assert np.array_equal(bits(weight), bits(naf.merge_weight(original, deltas, layout)))
    naf.unmerge_weight_(weight, saved)
    assert np.array_equal(bits(weight), bits(original))


def test_one_rounding_not_one_per_adapter():
    """bf16 1.0 plus two f32 halves of the bf16 ulp: rounded once it moves, rounded twice it would not."""
    w = np.ones((1, 2), ml_dtypes.bfloat16)
    half_ulp = np.float32(2.0 ** -8)  # bf16 has 8 significant bits: ulp(1) = 2**-7
    d = naf.Delta(np.array([[0]], np.int16), np.array([[half_ulp]], np.float32))
    once = naf.merge_weight(w, [d, d])
    twice = naf.merge_weight(naf.merge_weight(w, [d]), [d])
    assert float(once[0, 0]) == 1.0 + 2.0 ** -7
    assert float(twice[0, 0]) == 1.0
    assert float(once[0, 1]) == 1.0


def test_order_of_adapters_is_the_order_given():
    """f32 addition is not associative; the rule fixes the order (base first, then adapters in turn)."""
    w = np.array([[1.0]], np.float32)
    big = naf.Delta(np.array([[0]], np.int16), np.array([[1e8]], np.float32))
    neg = naf.Delta(np.array([[0]], np.int16), np.array([[-1e8]], np.float32))
    assert naf.merge_weight(w, [big, neg])[0, 0] == np.float32(np.float32(1.0 + 1e8) - 1e8)
    assert naf.merge_weight(w, [big, neg], "in_out")[0, 0] == naf.merge_weight(w, [big, neg])[0, 0]


def test_delta_forms_are_equivalent(rng, craft, tmp_path):
    weight, t = craft.target(rng, shape=(6, 20), k=4, layout="in_out", value_dtype="F16")
    adapter = naf.Adapter({t.name: t})
    naf.save(adapter, tmp_path / "a.safetensors")
    loaded = naf.load(tmp_path / "a.safetensors").targets[t.name]  # read-only memory-mapped arrays
    want = naf.merge_weight(weight, [naf.Delta(t.indices, t.values, 0.5)], "in_out")
    for form in ((loaded, 0.5), (t.indices, t.values, 0.5), naf.Delta(loaded.indices, loaded.values, 0.5)):
        assert np.array_equal(bits(naf.merge_weight(weight, [form], "in_out")), bits(want))
    assert np.array_equal(bits(naf.merge_weight(weight, [loaded], "in_out")),
                          bits(naf.merge_weight(weight, [(t.indices, t.values)], "in_out")))


def test_merge_with_no_deltas_is_identity(rng):
    w = rng.standard_normal((3, 4)).astype(np.float32)
    positions, values = naf.merged_values(w, [])
    assert positions.size == 0 and values.size == 0
    assert np.array_equal(naf.merge_weight(w, []), w)


@pytest.mark.parametrize("weight, delta, rule", [
    (np.zeros(4, np.float32), (np.zeros((1, 1), np.int16), np.zeros((1, 1), np.float32)), "4.2"),
    (np.zeros((2, 4), np.int32), (np.zeros((2, 1), np.int16), np.zeros((2, 1), np.float32)), "4.2"),
    (np.zeros((2, 4), np.float64), (np.zeros((2, 1), np.int16), np.zeros((2, 1), np.float32)), "4.2"),
    (np.zeros((2, 4), np.float32), (np.zeros((3, 1), np.int16), np.zeros((3, 1), np.float32)), "3.4"),
    (np.zeros((2, 4), np.float32), (np.zeros((2, 2), np.int16), np.zeros((2, 1), np.float32)), "3.4"),
    (np.zeros((2, 4), np.float32), (np.full((2, 1), 4, np.int16), np.zeros((2, 1), np.float32)), "3.5"),
    (np.zeros((2, 4), np.float32), (np.full((2, 1), -1, np.int16), np.zeros((2, 1), np.float32)), "3.5"),
])
def test_merge_rejects_misfits(weight, delta, rule):
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.merge_weight(weight, [delta])
    assert info.value.rule == rule


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("defect, rule", [("unsorted", "3.6"), ("duplicate", "3.6"), ("nan", "3.7"),
                                          ("inf", "3.7"), ("inf_scale", None), ("nan_scale", None)])
def test_merge_rejects_deltas_that_break_content_rules(defect, rule):
    w = np.zeros((2, 6), ml_dtypes.bfloat16)
    idx = np.array([[0, 3], [1, 5]], np.int16)
    val = np.ones((2, 2), ml_dtypes.bfloat16)
    scale = 1.0
    if defect == "unsorted":
        idx[1] = [5, 1]
    elif defect == "duplicate":
        idx[0] = [3, 3]
    elif defect == "nan":
        val[1, 1] = np.nan
    elif defect == "inf":
        val[0, 0] = -np.inf
    elif defect == "inf_scale":
        scale = 1e39  # finite in f64, inf in f32
    else:
        scale = float("nan")
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.merge_weight(w, [naf.Delta(idx, val, scale)])
    if rule:
        assert info.value.rule == rule
    assert not w.any()


def test_merge_overflow_warns_and_rounds_to_inf():
    w = np.full((1, 2), 65504, np.float16)
    d = naf.Delta(np.array([[1]], np.int16), np.array([[32.0]], np.float32))
    with pytest.warns(RuntimeWarning, match="overflowed"):
        merged = naf.merge_weight(w, [d])
    assert merged[0, 0] == 65504 and np.isposinf(merged[0, 1])


def test_merge_rejects_things_that_are_not_deltas():
    with pytest.raises(TypeError):
        naf.merge_weight(np.zeros((2, 2), np.float32), [42])


def test_in_place_merge_needs_a_contiguous_weight(rng):
    w = rng.standard_normal((4, 6)).astype(np.float32)
    view = w[:, :3]  # rows 6 apart, 3 wide: no flat view exists
    before = w.copy()
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.merge_weight_(view, [(np.zeros((4, 1), np.int16), np.ones((4, 1), np.float32))])
    assert info.value.rule == "4.2"
    assert np.array_equal(w, before)


# -- dtypes -------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_round_to_bf16_is_round_to_nearest_even_on_the_bits(rng):
    u = rng.integers(0, 2 ** 32, size=200_000, dtype=np.uint64).astype(np.uint32)
    u = np.concatenate([u, np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x80000000], np.uint32)])
    f = u.view(np.float32)
    finite = np.isfinite(f)
    want = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    got = round_to(f, "BF16").view(np.uint16)
    assert np.array_equal(got[finite], want[finite])
    assert np.isnan(round_to(f[~finite & np.isnan(f)], "BF16").astype(np.float32)).all()


@pytest.mark.parametrize("name", ["BF16", "F16"])
def test_nonfinite_mask_on_every_16_bit_pattern(name):
    values = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(NUMPY_DTYPES[name])
    assert np.array_equal(nonfinite_mask(values), ~np.isfinite(values.astype(np.float32)))


def test_nonfinite_mask_f32():
    v = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-45], np.float32)
    assert nonfinite_mask(v).tolist() == [False, False, True, True, True, False, False]


def test_dtype_names_round_trip():
    for name, dt in NUMPY_DTYPES.items():
        assert dtype_name(dt) == name
    with pytest.raises(KeyError):
        dtype_name(np.complex64)
    assert (index_dtype_for(1), index_dtype_for(32768), index_dtype_for(32769)) == ("I16", "I16", "I32")


# -- layout -------------------------------------------------------------------------------------------
def test_layout_helpers(rng):
    w = rng.standard_normal((5, 3)).astype(np.float32)  # stored in_out: d_in=5, d_out=3
    assert canonical_shape(w.shape, "in_out") == (3, 5) and stored_shape((3, 5), "in_out") == (5, 3)
    assert canonical_shape(w.shape, "out_in") == (5, 3) and stored_shape((5, 3), "out_in") == (5, 3)
    canon = canonical_view(w, "in_out")
    assert canon.shape == (3, 5) and np.shares_memory(canon, w)
    idx = np.array([[0, 4], [1, 2], [3, 4]])
    for layout, stored in (("in_out", w), ("out_in", np.ascontiguousarray(w.T))):
        pos = flat_positions(idx, (3, 5), layout)
        assert pos.dtype == np.int64
        want = [stored.reshape(-1)[p] for p in pos]
        assert want == [canonical_view(stored, layout)[r, c] for r in range(3) for c in idx[r]]
