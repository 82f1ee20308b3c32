"""Bases (single file, HF folder, sharded folder, arrays) and the rules 4.1-4.5 checked against them."""
from __future__ import annotations

import hashlib
import importlib
import json
import os

import ml_dtypes
import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format.base import Checkpoint, open_base

hashing = importlib.import_module("neuroada_format.hashing")
UP = "model.layers.0.mlp.up_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
FORMS = ("file", "folder", "sharded", "arrays")


def materialise(form, arrays, tmp_path, craft):
    """The same base in one of the four forms the validator accepts."""
    if form == "arrays":
        return dict(arrays)
    if form == "sharded":
        return craft.base(tmp_path / "sharded", arrays, shards=3)
    folder = craft.base(tmp_path / "folder", arrays)
    return os.path.join(folder, "model.safetensors") if form == "file" else folder


def error_rules(report):
    return sorted((p["rule"], p["tensor"]) for p in report.errors)


@pytest.mark.parametrize("form", FORMS)
def test_valid_against_every_form(form, small_model, tmp_path, craft):
    arrays, adapter = small_model
    base = materialise(form, arrays, tmp_path, craft)
    report = naf.validate(adapter, base=base, check_selection=True)
    assert report.ok and report.problems == []
    if form == "arrays":
        assert report.checked_base == "<memory>"
    else:  # a folder with one model.safetensors is reported as that file
        single = os.path.join(base, "model.safetensors")
        assert report.checked_base == (single if form == "folder" else os.fspath(base))
    path = tmp_path / "a.safetensors"
    naf.save(adapter, path)
    assert naf.validate(path, base=base).ok


@pytest.mark.parametrize("form", FORMS)
def test_4_1_missing_key(form, small_model, tmp_path, craft):
    arrays, adapter = small_model
    del arrays[UP]
    report = naf.validate(adapter, base=materialise(form, arrays, tmp_path, craft))
    assert error_rules(report) == [("4.1", UP)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("change", ["shape", "transposed", "int8"])
def test_4_2_shape_or_dtype_mismatch(form, change, small_model, tmp_path, craft):
    arrays, adapter = small_model
    w = arrays[UP]
    arrays[UP] = {"shape": w[:-1], "transposed": np.ascontiguousarray(w.T),
                  "int8": w.astype(np.float32).astype(np.int8)}[change]
    report = naf.validate(adapter, base=materialise(form, arrays, tmp_path, craft))
    assert error_rules(report) == [("4.2", UP)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_4_6_same_values_in_another_dtype_belong_to_the_base(form, dtype, small_model, tmp_path, craft):
    """Spec 1.1: identity is on values. The bf16 values upcast (f32) or re-typed exactly (f16) are the
    same base: valid, with warning 4.6; values that change in the cast fail the probe (4.3)."""
    arrays, adapter = small_model
    w = arrays[UP]
    arrays[UP] = w.astype(dtype)
    assert np.array_equal(arrays[UP].astype(np.float32), w.astype(np.float32))
    report = naf.validate(adapter, base=materialise(form, arrays, tmp_path, craft))
    assert error_rules(report) == [] and ("4.6", UP) in [(p["rule"], p["tensor"]) for p in report.problems]
    arrays[UP] = (w.astype(np.float32) * np.float32(1 + 2 ** -12)).astype(np.float32)
    report = naf.validate(adapter, base=materialise(form, arrays, tmp_path, craft))
    assert error_rules(report) == [("4.3", UP)]


def test_4_3_says_when_the_adapter_was_made_on_these_weights_rounded(small_model, tmp_path, craft):
    """An adapter trained on a BF16 load of an F32 checkpoint fails the probe against that checkpoint (spec 14), and
    "different base or revision" sent users looking for another checkpoint: the message says what happened."""
    arrays, adapter = small_model
    w = arrays[UP].astype(np.float32)
    arrays[UP] = w * np.float32(1 + 2 ** -12)  # F32 values that round to the adapter's BF16 ones
    assert np.array_equal(arrays[UP].astype(ml_dtypes.bfloat16).astype(np.float32), w)
    report = naf.validate(adapter, base=materialise("file", arrays, tmp_path, craft))
    assert error_rules(report) == [("4.3", UP)]
    assert "made on these weights rounded to BF16" in report.errors[0]["message"]
    arrays[UP] = w * np.float32(1 + 2 ** -6)  # values of another base: no such hint
    report = naf.validate(adapter, base=materialise("file", arrays, tmp_path / "other", craft))
    assert error_rules(report) == [("4.3", UP)] and "rounded" not in report.errors[0]["message"]


@pytest.mark.parametrize("form", FORMS)
def test_4_3_probe_catches_a_changed_probed_value_only(form, small_model, tmp_path, craft):
    arrays, adapter = small_model
    t = adapter.targets[UP]
    row, col = 7, int(t.indices[7, 1])
    unprobed = next(c for c in range(t.d_in) if c not in set(int(x) for x in t.indices[7]))

    changed = dict(arrays)
    w = arrays[UP].copy()
    w[row, unprobed] = ml_dtypes.bfloat16(123.0)
    changed[UP] = w
    assert naf.validate(adapter, base=materialise(form, changed, tmp_path / "a", craft)).ok

    w = arrays[UP].copy()  # the smallest change there is: one ulp of one probed value
    w.view(np.uint16)[row, col] ^= 1
    changed[UP] = w
    report = naf.validate(adapter, base=materialise(form, changed, tmp_path / "b", craft))
    assert error_rules(report) == [("4.3", UP)]
    assert "probe hash differs" in report.errors[0]["message"]


@pytest.mark.parametrize("form", FORMS)
def test_4_4_selection_check_reads_rows_when_asked(form, small_model, tmp_path, craft, rng):
    arrays, adapter = small_model
    t = adapter.targets[UP]
    idx = np.array(t.indices)
    idx[3] = craft.indices(rng, 1, t.d_in, t.k)[0]
    while np.array_equal(idx[3], t.indices[3]):
        idx[3] = craft.indices(rng, 1, t.d_in, t.k)[0]
    adapter.targets[UP] = naf.Target.from_weight(UP, arrays[UP], idx, t.values)
    base = materialise(form, arrays, tmp_path, craft)
    assert naf.validate(adapter, base=base).ok  # probe matches: the positions are just not top-k
    report = naf.validate(adapter, base=base, check_selection=True)
    assert error_rules(report) == [("4.4", UP)]
    assert "(first: 3)" in report.errors[0]["message"]
    adapter.selection = {"rule": "random", "tie_break": "lower-column", "seed": 1}
    assert naf.validate(adapter, base=base, check_selection=True).ok  # random picks are not re-derivable


def test_4_4_reverse_rule(small_model):
    arrays, adapter = small_model
    w = arrays[UP]
    idx = naf.select_indices(w, 3, "reverse")
    t = naf.Target.from_weight(UP, w, idx)
    a = naf.Adapter({UP: t}, selection={"rule": "reverse", "tie_break": "lower-column"})
    assert naf.validate(a, base=arrays, check_selection=True).ok
    a.selection = {"rule": "magnitude", "tie_break": "lower-column"}
    assert error_rules(naf.validate(a, base=arrays, check_selection=True)) == [("4.4", UP)]


@pytest.mark.parametrize("form", FORMS)
def test_4_5_structure_hash_mismatch_is_a_warning(form, small_model, tmp_path, craft):
    arrays, adapter = small_model
    arrays["lm_head.weight"] = arrays["model.embed_tokens.weight"].copy()
    report = naf.validate(adapter, base=materialise(form, arrays, tmp_path, craft))
    assert report.ok
    assert [(p["rule"], p["severity"]) for p in report.problems] == [("4.5", "warning")]
    adapter.structure_hash = None  # no recorded hash, nothing to compare
    assert naf.validate(adapter, base=materialise(form, arrays, tmp_path / "again", craft)).problems == []


def test_in_out_layout_against_a_conv1d_style_base(rng, craft, tmp_path):
    w = craft.weight(rng, (24, 10), "F16")  # stored [d_in, d_out]
    _, t = craft.target(rng, "h.0.attn.c_attn.weight", (10, 24), 4, layout="in_out", weight=w)
    adapter = naf.Adapter({t.name: t})
    base = craft.base(tmp_path / "gpt2", {t.name: w})
    assert naf.validate(adapter, base=base, check_selection=True).ok
    report = naf.validate(adapter, base={t.name: np.ascontiguousarray(w.T)})
    assert error_rules(report) == [("4.2", t.name)]


def test_several_problems_against_one_base(small_model):
    arrays, adapter = small_model
    del arrays[Q]
    arrays[UP] = arrays[UP][:-1]
    w = arrays["model.layers.0.mlp.down_proj.weight"].copy()
    t = adapter.targets["model.layers.0.mlp.down_proj.weight"]
    w[0, int(t.indices[0, 0])] += ml_dtypes.bfloat16(1.0)
    arrays["model.layers.0.mlp.down_proj.weight"] = w
    report = naf.validate(adapter, base=arrays)
    assert error_rules(report) == [("4.1", Q), ("4.2", UP), ("4.3", "model.layers.0.mlp.down_proj.weight")]


def test_a_content_error_stops_the_base_tier(small_model):
    """Spec section 7: a tier runs only when the tiers before it found no error."""
    arrays, adapter = small_model
    del arrays[Q]
    assert error_rules(naf.validate(adapter, base=arrays)) == [("4.1", Q)]
    t = adapter.targets[UP]
    val = np.array(t.values)
    val[0, 0] = np.nan
    adapter.targets[UP] = naf.Target(UP, t.indices, val, t.shape, t.layout, t.dtype, t.probe)
    report = naf.validate(adapter, base=arrays)
    assert error_rules(report) == [("3.7", UP)] and report.checked_base is None


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_out_of_range_indices_with_a_base_are_reported_not_raised(layout, rng, craft):
    w, t = craft.target(rng, "w", (8, 16), 3, layout=layout)
    idx = np.array(t.indices)
    idx[-1, -1] = 16
    adapter = naf.Adapter({"w": naf.Target("w", idx, t.values, t.shape, layout, t.dtype, t.probe)})
    report = naf.validate(adapter, base={"w": w})
    assert ("3.5", "w") in error_rules(report)


# -- opening bases ------------------------------------------------------------------------------------
def test_checkpoint_api_matches_array_base(small_model, tmp_path, craft):
    arrays, _ = small_model
    ck = open_base(craft.base(tmp_path / "s", arrays, shards=2))
    ab = naf.ArrayBase(arrays)
    assert isinstance(ck, Checkpoint) and set(ck.keys()) == set(ab.keys()) == set(arrays)
    assert len(ck.files) == 2 and ck.index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    for name, a in arrays.items():
        assert name in ck and name in ab and "nope" not in ck and "nope" not in ab
        assert ck.info(name) == ab.info(name) == ("BF16", a.shape)
        assert np.array_equal(ck.array(name).view(np.uint16), a.view(np.uint16))
        assert name in ck.file_of(name).tensors
    assert ck.structure_hash() == ab.structure_hash()
    assert open_base(ck) is ck and open_base(ab) is ab
    assert isinstance(open_base(arrays), naf.ArrayBase)


def test_folder_with_one_differently_named_file(small_model, tmp_path, craft):
    arrays, adapter = small_model
    folder = craft.base(tmp_path / "m", arrays, single_name="pytorch_model.safetensors")
    assert naf.validate(adapter, base=folder).ok


def _index(folder, weight_map):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        f.write(weight_map if isinstance(weight_map, str) else json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("case", [
    "dotdot", "absolute", "subfolder", "backslash", "empty", "not_string", "missing_shard", "key_not_in_shard",
    "not_json", "duplicate_keys", "no_weight_map", "weight_map_list", "not_utf8", "deep",
])
def test_hostile_index_json(case, small_model, tmp_path, craft):
    arrays, adapter = small_model
    folder = craft.base(tmp_path / "m", arrays, shards=2)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        wm = json.load(f)["weight_map"]
    secret = tmp_path / "outside.safetensors"
    craft.base(tmp_path / "o", {UP: arrays[UP]})
    os.replace(tmp_path / "o" / "model.safetensors", secret)
    text = None
    if case == "dotdot":
        wm[UP] = "../outside.safetensors"
    elif case == "absolute":
        wm[UP] = os.fspath(secret)
    elif case == "subfolder":
        wm[UP] = "sub/model.safetensors"
    elif case == "backslash":
        wm[UP] = "..\\outside.safetensors"
    elif case == "empty":
        wm[UP] = ""
    elif case == "not_string":
        wm[UP] = 3
    elif case == "missing_shard":
        wm[UP] = "model-00009-of-00009.safetensors"
    elif case == "key_not_in_shard":
        wm["model.layers.99.mlp.up_proj.weight"] = wm[UP]
    elif case == "not_json":
        text = "{weight_map: }"
    elif case == "duplicate_keys":
        text = '{"weight_map": {}, "weight_map": {}}'
    elif case == "no_weight_map":
        text = '{"metadata": {}}'
    elif case == "weight_map_list":
        text = '{"weight_map": []}'
    elif case == "not_utf8":
        text = None
        with open(os.path.join(folder, "model.safetensors.index.json"), "wb") as f:
            f.write(b'{"weight_map": {"\xff": "x"}}')
    elif case == "deep":
        text = "[" * 100_000
    if case != "not_utf8":
        _index(folder, text if text is not None else wm)
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.validate(adapter, base=folder)
    expected = "1.1" if case == "missing_shard" else "1.6"
    assert info.value.rule == expected, info.value
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)


def test_hf_cache_snapshot_with_shards_linking_outside_the_folder_opens(small_model, tmp_path, craft):
    """The Hugging Face cache links snapshots/<rev>/<shard> to ../../blobs/<sha>: a legitimate base."""
    arrays, adapter = small_model
    blobs = craft.base(tmp_path / "blobs", arrays)
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    os.symlink(os.path.relpath(os.path.join(blobs, "model.safetensors"), snapshot),
               snapshot / "model-00001-of-00001.safetensors")
    _index(os.fspath(snapshot), {name: "model-00001-of-00001.safetensors" for name in arrays})
    assert naf.validate(adapter, base=snapshot).ok


def test_base_may_hold_dtypes_this_reader_does_not_know(small_model, tmp_path, craft):
    """A base tensor of a future dtype is listed, not read; targeting it is a 4.2 mismatch."""
    arrays, adapter = small_model
    header, data = craft.entries({name: (craft_dtype_name(a), a.shape, a.tobytes()) for name, a in arrays.items()})
    header["model.future.weight"] = {"dtype": "F4", "shape": [4, 4], "data_offsets": [len(data), len(data) + 8]}
    header["model.future6.weight"] = {"dtype": "F6_E2M3", "shape": [4, 4],  # a name with an underscore too
                                      "data_offsets": [len(data) + 8, len(data) + 20]}
    path = tmp_path / "model.safetensors"
    path.write_bytes(craft.raw({"__metadata__": {"format": "pt"}, **header}, data + b"\0" * 20))
    assert naf.validate(adapter, base=path).ok
    assert open_base(path).info("model.future.weight") == ("F4", (4, 4))
    assert open_base(path).info("model.future6.weight") == ("F6_E2M3", (4, 4))
    future = naf.Target("model.future.weight", np.tile(np.array([0, 1], np.int16), (4, 1)),
                        np.zeros((4, 2), ml_dtypes.bfloat16), (4, 4), probe="sha256:" + "0" * 64)
    report = naf.validate(naf.Adapter({future.name: future}), base=path)
    assert error_rules(report) == [("4.2", "model.future.weight")]


def craft_dtype_name(a):
    from neuroada_format.dtypes import dtype_name

    return dtype_name(a.dtype)


@pytest.mark.parametrize("case, rule", [
    ("missing", "1.1"), ("empty_folder", "1.6"), ("two_files", "1.6"), ("onnx", "1.1"), ("ONNX", "1.1"),
    ("corrupt", "1.1"),
    ("not_safetensors", "1.2"), ("lone_surrogate_name", "1.2"),
])
def test_bases_that_cannot_be_opened_raise(case, rule, small_model, tmp_path, craft):
    arrays, adapter = small_model
    if case == "missing":
        base = tmp_path / "nope"
    elif case == "empty_folder":
        base = tmp_path / "empty"
        base.mkdir()
    elif case == "two_files":
        base = craft.base(tmp_path / "two", arrays, single_name="a.safetensors")
        craft.base(base, arrays, single_name="b.safetensors")
    elif case in ("onnx", "ONNX"):  # read as ONNX in any letter case (SPEC 2.6), as the merge reads it: no graph, 1.1
        base = tmp_path / f"model.{case}"
        base.write_bytes(b"\x08\x07")
    elif case == "corrupt":
        base = tmp_path / "model.safetensors"
        base.write_bytes(b"\x00" * 5)
    elif case == "lone_surrogate_name":  # valid JSON, but a name that is no text (it could not be hashed)
        base = tmp_path / "model.safetensors"
        base.write_bytes(craft.raw('{"w\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4))
    else:
        base = tmp_path / "model.safetensors"
        base.write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00nope")
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.validate(adapter, base=base)
    assert info.value.rule == rule, info.value


# -- the identity hashes ------------------------------------------------------------------------------
def test_probe_hash_definition(rng, monkeypatch):
    w = rng.standard_normal((30, 12)).astype(ml_dtypes.bfloat16)
    idx = np.sort(np.argsort(rng.random((30, 12)), axis=1)[:, :4], axis=1)
    gathered = np.array([[np.float32(w[r, c]) for c in idx[r]] for r in range(30)], dtype="<f4")
    want = "sha256:" + hashlib.sha256(gathered.tobytes()).hexdigest()
    assert naf.probe_hash(w, idx) == want
    assert naf.probe_hash(np.ascontiguousarray(w.T), idx, "in_out") == want
    monkeypatch.setattr(hashing, "ROW_CHUNK_ENTRIES", 8)  # two rows per chunk
    assert naf.probe_hash(w, idx) == want
    assert naf.probe_hash(np.ascontiguousarray(w.T), idx, "in_out") == want


def test_structure_hash_definition():
    entries = [("b", "F16", (2, 3)), ("a", "BF16", (4,)), ("c", "F32", ())]
    text = "a\tBF16\t4\nb\tF16\t2,3\nc\tF32\t\n"
    want = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    assert naf.structure_hash(entries) == want == naf.structure_hash(reversed(entries))
    assert naf.structure_hash([("a", "BF16", (4,))]) != naf.structure_hash([("a", "BF16", (4, 1))])


def test_a_name_with_tab_or_lf_has_no_structure_hash(small_model):
    """One tensor named "a<TAB>F32<TAB>1<LF>b" makes the very lines of two tensors a and b: the hash would be
    theirs. Such a base has none, so an adapter recording a's and b's hash gets warning 4.5 against it."""
    honest = [("a", "F32", (1,)), ("b", "F32", (2,))]
    forged = [("a\tF32\t1\nb", "F32", (2,))]
    assert naf.structure_hash(honest) is not None
    assert naf.structure_hash(forged) is None and naf.structure_hash([("x\ty", "F32", (1,))]) is None
    base, adapter = small_model
    f32 = np.float32
    adapter.structure_hash = naf.ArrayBase({**base, "x": np.zeros(1, f32), "y": np.zeros(2, f32)}).structure_hash()
    report = naf.validate(adapter, {**base, "x\tF32\t1\ny": np.zeros(2, f32)})  # before: the same hash
    assert report.ok and [p["rule"] for p in report.problems] == ["4.5"]
