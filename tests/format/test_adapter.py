"""Adapter objects and files: save/load round trips (property-based), exact size, atomic writes."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neuroada_format as naf
from neuroada_format import adapter as adapter_mod
from neuroada_format.container import SafetensorsFile

VALUE_DTYPES = ("BF16", "F16", "F32")
BASE_DTYPES = ("BF16", "F16", "F32")
NAME_CHARS = st.sampled_from(list("abcxyz0189._/-") + ["é", "ß", "字"])
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def finite_random_values(rng, shape, dtype_name, dtypes):
    """Random bit patterns (so subnormals, -0.0 and extremes appear), with non-finite ones replaced."""
    dt = dtypes[dtype_name]
    bits = rng.integers(0, 2 ** (8 * dt.itemsize), size=shape, dtype=np.uint64)
    arr = bits.astype({2: np.uint16, 4: np.uint32}[dt.itemsize]).view(dt)
    bad = ~np.isfinite(arr.astype(np.float32))
    arr[bad] = dt.type(1.5)
    return arr


@st.composite
def adapter_specs(draw):
    names = draw(st.lists(st.text(NAME_CHARS, min_size=1, max_size=12), min_size=1, max_size=4, unique=True))
    specs = []
    for name in names:
        wide = draw(st.integers(0, 9)) == 0  # sometimes past 32768 columns, which forces I32 indices
        d_in = draw(st.integers(32769, 33000)) if wide else draw(st.integers(1, 70))
        d_out = draw(st.integers(1, 3 if wide else 24))
        specs.append({
            "name": name, "d_out": d_out, "d_in": d_in, "k": draw(st.integers(1, min(d_in, 9))),
            "value_dtype": draw(st.sampled_from(VALUE_DTYPES)), "base_dtype": draw(st.sampled_from(BASE_DTYPES)),
            "layout": draw(st.sampled_from(("out_in", "in_out"))),
        })
    return {"targets": specs, "force_i32": draw(st.booleans()), "seed": draw(st.integers(0, 2 ** 32 - 1)),
            "revision": draw(st.one_of(st.none(), st.text(max_size=8)))}


def build(spec, craft):
    rng = np.random.default_rng(spec["seed"])
    targets = {}
    for t in spec["targets"]:
        stored = (t["d_out"], t["d_in"]) if t["layout"] == "out_in" else (t["d_in"], t["d_out"])
        weight = craft.weight(rng, stored, t["base_dtype"])
        idx = craft.indices(rng, t["d_out"], t["d_in"], t["k"])
        values = finite_random_values(rng, (t["d_out"], t["k"]), t["value_dtype"], craft.dtypes)
        targets[t["name"]] = naf.Target.from_weight(t["name"], weight, idx, values, layout=t["layout"],
                                                    value_dtype=t["value_dtype"])
    return naf.Adapter(targets, base_name="prop-model", base_revision=spec["revision"],
                       selection={"rule": "random", "tie_break": "lower-column", "seed": spec["seed"]})


def header_length(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


@PROPERTY
@given(spec=adapter_specs())
def test_save_load_is_bit_identical_and_size_is_exact(spec, craft, tmp_path_factory):
    adapter = build(spec, craft)
    path = os.fspath(tmp_path_factory.mktemp("rt") / "a.safetensors")
    naf.save(adapter, path, index_dtype="I32" if spec["force_i32"] else None)
    loaded = naf.load(path)
    expected_size = 8 + header_length(path)
    for name, t in adapter.targets.items():
        got = loaded.targets[name]
        want_idx = "I32" if spec["force_i32"] or t.d_in > 32768 else "I16"
        assert got.index_dtype == want_idx
        assert got.value_dtype == t.value_dtype
        assert np.array_equal(got.indices.astype(np.int64), t.indices.astype(np.int64))
        assert got.values.tobytes() == np.ascontiguousarray(t.values).tobytes()
        assert (got.shape, got.layout, got.dtype, got.probe) == (t.shape, t.layout, t.dtype, t.probe)
        expected_size += t.d_out * t.k * (got.indices.itemsize + got.values.itemsize)
    assert os.path.getsize(path) == expected_size
    assert loaded.document() == adapter.document()
    meta = SafetensorsFile(path).metadata["neuroada"]  # the canonical dump of the document
    assert meta == json.dumps(adapter.document(), sort_keys=True, separators=(",", ":"))
    assert naf.validate(path).ok


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@PROPERTY
@given(spec=adapter_specs(), value_dtype=st.sampled_from(VALUE_DTYPES))
def test_save_converts_value_dtype_with_round_to_nearest_even(spec, value_dtype, craft, tmp_path_factory):
    adapter = build(spec, craft)
    path = os.fspath(tmp_path_factory.mktemp("conv") / "a.safetensors")
    naf.save(adapter, path, value_dtype=value_dtype, check=False)
    report = naf.validate(path)
    loaded = naf.load(path)
    for name, t in adapter.targets.items():
        want = np.asarray(t.values).astype(np.float32).astype(craft.dtypes[value_dtype])
        got = loaded.targets[name].values
        assert got.dtype == craft.dtypes[value_dtype]
        assert got.tobytes() == want.tobytes()
        if not np.isfinite(want.astype(np.float32)).all():
            # f32 -> f16/bf16 may overflow to inf: the validator must then say so
            assert any(p["rule"] == "3.7" for p in report.errors)


def test_target_properties_and_entry(rng, craft):
    weight, t = craft.target(rng, shape=(12, 40), k=5, layout="in_out", base_dtype="F16", value_dtype="F32")
    assert weight.shape == (40, 12)
    assert (t.d_out, t.d_in, t.k) == (12, 40, 5)
    assert (t.index_dtype, t.value_dtype, t.dtype) == ("I16", "F32", "F16")
    assert t.entry() == {"shape": [12, 40], "layout": "in_out", "dtype": "F16", "k": 5, "probe": t.probe}
    assert t.probe == naf.probe_hash(weight, t.indices, "in_out")
    zero = naf.Target.from_weight("w", weight, t.indices, layout="in_out", value_dtype="F16")
    assert zero.values.dtype == craft.dtypes["F16"] and not zero.values.any()


def test_from_weight_picks_i32_only_past_32768_columns(rng):
    for d_in, want in ((32768, np.int16), (32769, np.int32)):
        w = np.zeros((2, d_in), np.float32)
        t = naf.Target.from_weight("w", w, np.array([[0, d_in - 1], [1, 2]]))
        assert t.indices.dtype == want


def test_document_keeps_unknown_minor_fields_and_repr(tmp_path, small_model):
    _, adapter = small_model
    adapter.extra = {"created_by": "tests", "x-future": {"a": [1, 2]}}
    path = tmp_path / "a.safetensors"
    naf.save(adapter, path)
    loaded = naf.load(path)
    assert loaded.extra == {"created_by": "tests", "x-future": {"a": [1, 2]}}
    assert loaded.document() == adapter.document()
    assert loaded.nbytes == adapter.nbytes == sum(t.indices.nbytes + t.values.nbytes
                                                  for t in adapter.targets.values())
    assert "3 targets" in repr(loaded) and "tiny-llama" in repr(loaded)
    assert loaded.path == os.fspath(path)


def test_unknown_fields_at_every_level_survive_a_re_save(tmp_path, small_model):
    """A 1.x reader keeps what a later 1.y writer added: top level, base, merge and target entries."""
    _, adapter = small_model
    adapter.version = "1.3"
    adapter.extra = {"created_by": "t", "base": {"url": "hf://x"}, "merge": {"note": [1]}}
    name = next(iter(adapter.targets))
    adapter.targets[name].extra = {"sparsity": 0.5}
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    naf.save(adapter, first)
    loaded = naf.load(first)
    doc = loaded.document()
    assert doc["version"] == "1.3" and doc["created_by"] == "t"
    assert doc["base"]["url"] == "hf://x" and doc["base"]["name"] == "tiny-llama"
    assert doc["merge"] == {"note": [1], "rule": "add-f32-round-once"}
    assert doc["targets"][name]["sparsity"] == 0.5
    naf.save(loaded, second)
    assert naf.load(second).document() == doc == adapter.document()


def test_loaded_arrays_are_read_only_views(tmp_path, small_model):
    _, adapter = small_model
    path = tmp_path / "a.safetensors"
    naf.save(adapter, path)
    t = next(iter(naf.load(path).targets.values()))
    assert not t.values.flags.writeable and not t.indices.flags.writeable
    with pytest.raises(ValueError):
        t.values[0, 0] = 1


def test_load_accepts_pathlike_and_str(tmp_path, small_model):
    _, adapter = small_model
    path = tmp_path / "a.safetensors"
    naf.save(adapter, path)
    assert naf.load(path).document() == naf.load(os.fspath(path)).document()


# -- save refuses bad adapters and never leaves a partial file ---------------------------------------
def _listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("defect, rule", [
    ("nan", "3.7"), ("inf", "3.7"), ("negative", "3.5"), ("too_big", "3.5"), ("unsorted", "3.6"),
    ("duplicate", "3.6"), ("bad_layout", "2.2"), ("i16_for_wide", "3.2"), ("bad_value_dtype", "3.3"),
    ("bad_index_dtype", "3.2"), ("k_mismatch", "3.4"), ("no_targets", "2.2"),
])
def test_save_refuses_invalid_adapter_without_writing(tmp_path, small_model, defect, rule):
    _, adapter = small_model
    name = "model.layers.0.mlp.up_proj.weight"
    t = adapter.targets[name]
    idx, val = np.array(t.indices), np.array(t.values)
    kwargs = {}
    if defect == "nan":
        val[3, 1] = np.nan
    elif defect == "inf":
        val[0, 0] = -np.inf
    elif defect == "negative":
        idx[2, 0] = -1
    elif defect == "too_big":
        idx[2, -1] = t.d_in
    elif defect == "unsorted":
        idx[1] = idx[1][::-1]
    elif defect == "duplicate":
        idx[1, 1] = idx[1, 0]
    elif defect == "bad_layout":
        t.layout = "row_major"
    elif defect == "i16_for_wide":
        t.shape = (t.d_out, 40000)
        kwargs["index_dtype"] = "I16"
    elif defect == "bad_value_dtype":
        kwargs["value_dtype"] = "F64"
    elif defect == "bad_index_dtype":
        kwargs["index_dtype"] = "I8"
    elif defect == "k_mismatch":
        val = val[:, :2]
    elif defect == "no_targets":
        adapter.targets = {}
    if adapter.targets:
        adapter.targets[name] = naf.Target(name, idx, val, t.shape, t.layout, t.dtype, t.probe)
    dest = tmp_path / "out.safetensors"
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.save(adapter, dest, **kwargs)
    assert info.value.rule == rule, info.value
    assert _listing(tmp_path) == []


def test_save_error_names_file_tensor_and_rule(tmp_path, small_model):
    _, adapter = small_model
    name = "model.layers.0.self_attn.q_proj.weight"
    t = adapter.targets[name]
    val = np.array(t.values)
    val[0, 0] = np.nan
    adapter.targets[name] = naf.Target(name, t.indices, val, t.shape, t.layout, t.dtype, t.probe)
    dest = os.fspath(tmp_path / "out.safetensors")
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.save(adapter, dest)
    err = info.value
    assert (err.path, err.tensor, err.rule) == (dest, name, "3.7")
    assert dest in str(err) and name in str(err) and "rule 3.7" in str(err) and "\n" not in str(err)


def test_save_is_atomic_when_rename_fails(tmp_path, small_model, monkeypatch):
    _, adapter = small_model
    dest = tmp_path / "a.safetensors"
    dest.write_bytes(b"previous content")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter_mod.os, "replace", broken_replace)
    with pytest.raises(OSError):
        naf.save(adapter, dest)
    assert dest.read_bytes() == b"previous content"
    assert _listing(tmp_path) == ["a.safetensors"]


def test_save_is_atomic_when_the_writer_dies_mid_write(tmp_path, small_model, monkeypatch):
    """A crash while the temp file is half written (simulated by an exception) leaves nothing behind."""
    _, adapter = small_model
    dest = tmp_path / "a.safetensors"
    naf.save(adapter, dest)
    before = dest.read_bytes()
    from neuroada_format import durable

    def dying_write_bytes(path, data, **kw):  # the durable path save uses, killed half way through its write
        def half_write(tmp):
            with open(tmp, "wb") as f:
                f.write(data[:len(data) // 2])
            raise KeyboardInterrupt

        durable.write_file(path, half_write, **kw)

    monkeypatch.setattr(adapter_mod, "write_bytes", dying_write_bytes)
    other = naf.Adapter(dict(list(adapter.targets.items())[:1]), base_name="other")
    with pytest.raises(KeyboardInterrupt):
        naf.save(other, dest)
    assert dest.read_bytes() == before
    assert _listing(tmp_path) == ["a.safetensors"]


def test_save_replaces_existing_file_and_writes_beside_it(tmp_path, small_model, monkeypatch):
    _, adapter = small_model
    dest = tmp_path / "a.safetensors"
    dest.write_bytes(b"old")
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.dirname(os.path.abspath(src)), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(adapter_mod.os, "replace", spy)
    naf.save(adapter, dest)
    assert seen == [(os.fspath(tmp_path), os.fspath(dest))]
    assert naf.load(dest).document() == adapter.document()
    assert _listing(tmp_path) == ["a.safetensors"]


def test_atomic_write_helper_cleans_up(tmp_path):
    dest = tmp_path / "x.bin"

    def fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        naf.atomic_write(os.fspath(dest), fail)
    assert _listing(tmp_path) == []
    naf.atomic_write(os.fspath(dest), lambda tmp: open(tmp, "wb").write(b"done"))
    assert dest.read_bytes() == b"done" and _listing(tmp_path) == ["x.bin"]


def test_from_weight_rounds_given_values_to_value_dtype_only_when_asked():
    """value_dtype applied only to the zeros of an empty target, so F32 deltas passed with value_dtype="BF16" were
    silently saved as F32 (twice the bytes, and not what was asked)."""
    import ml_dtypes

    w = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    idx = naf.select_indices(w, 2)
    vals = np.array([[1 + 2**-9, -3.0], [2**-130, 65504.0], [0.1, -0.0], [1e-3, 7.0]], dtype=np.float32)
    kept = naf.Target.from_weight("w", w, idx, vals)
    assert kept.value_dtype == "F32" and np.array_equal(kept.values, vals)
    rounded = naf.Target.from_weight("w", w, idx, vals, value_dtype="BF16")
    assert rounded.value_dtype == "BF16"
    assert np.array_equal(rounded.values.view(np.uint16), vals.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert naf.Target.from_weight("w", w, idx, value_dtype="F16").values.dtype == np.float16
    with pytest.raises(naf.NeuroAdaUsageError, match="value_dtype"):
        naf.Target.from_weight("w", w, idx, vals, value_dtype="F64")
