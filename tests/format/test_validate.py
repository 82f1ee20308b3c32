"""validate(): content rules 3.5-3.7, in-memory structure checks, reports, and the metadata module."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format.container import Problems
from neuroada_format.metadata import METADATA_KEY, parse_document, schema

UP = "model.layers.0.mlp.up_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
validate_mod = importlib.import_module("neuroada_format.validate")  # the package re-exports the function


def write_unchecked(adapter, path, craft):
    """Pack an adapter by hand: `save` refuses out-of-range indices even with check=False."""
    targets = {name: {"indices": np.asarray(t.indices), "values": np.asarray(t.values), "shape": t.shape,
                      "layout": t.layout, "dtype": t.dtype, "k": t.k, "probe": t.probe}
               for name, t in adapter.targets.items()}
    path.write_bytes(craft.adapter(targets))
    return path


def replace_target(adapter, name, indices=None, values=None, **fields):
    t = adapter.targets[name]
    adapter.targets[name] = naf.Target(name, t.indices if indices is None else indices,
                                       t.values if values is None else values,
                                       fields.get("shape", t.shape), fields.get("layout", t.layout),
                                       fields.get("dtype", t.dtype), fields.get("probe", t.probe))


def rules(report, severity="error"):
    return sorted((p["rule"], p["tensor"]) for p in report.problems if p["severity"] == severity)


def test_valid_adapter_file_and_object(tmp_path, small_model):
    _, adapter = small_model
    path = tmp_path / "a.safetensors"
    naf.save(adapter, path)
    for subject in (adapter, path, str(path), naf.load(path)):
        report = naf.validate(subject)
        assert report.ok and report.problems == [] and report.errors == []
    report = naf.validate(path)
    assert report.to_dict() == {"path": str(path), "valid": True, "base": None, "problems": []}
    report.raise_if_invalid()


@pytest.mark.parametrize("defect, rule", [
    ("negative", "3.5"), ("past_end", "3.5"), ("unsorted", "3.6"), ("duplicate", "3.6"),
    ("nan", "3.7"), ("inf", "3.7"), ("neg_inf", "3.7"),
])
@pytest.mark.parametrize("value_dtype", ["BF16", "F16", "F32"])
def test_content_rules_in_files(tmp_path, small_model, craft, defect, rule, value_dtype):
    _, adapter = small_model
    t = adapter.targets[UP]
    idx = np.array(t.indices)
    val = np.asarray(t.values).astype(craft.dtypes[value_dtype])
    row = 17
    if defect == "negative":
        idx[row, 0] = -3
    elif defect == "past_end":
        idx[row, -1] = t.d_in
    elif defect == "unsorted":
        idx[row, [0, 1]] = idx[row, [1, 0]]
    elif defect == "duplicate":
        idx[row, 2] = idx[row, 1]
    elif defect == "nan":
        val[row, 1] = np.nan
    elif defect == "inf":
        val[row, 1] = np.inf
    else:
        val[row, 1] = -np.inf
    replace_target(adapter, UP, idx, val)
    path = write_unchecked(adapter, tmp_path / "bad.safetensors", craft)
    naf.load(path)  # structure is fine: load does not read the arrays
    report = naf.validate(path)
    assert not report.ok
    assert rules(report) == [(rule, UP)]
    assert f"row {row}" in report.errors[0]["message"]
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.validate(path, strict=True)
    assert (info.value.rule, info.value.tensor, info.value.path) == (rule, UP, str(path))


def test_every_problem_is_reported_not_just_the_first(tmp_path, small_model, craft):
    _, adapter = small_model
    t = adapter.targets[UP]
    idx, val = np.array(t.indices), np.array(t.values)
    idx[0, 0], idx[5, 1], val[9, 2] = t.d_in + 5, idx[5, 0], np.nan
    replace_target(adapter, UP, idx, val)
    q = adapter.targets[Q]
    qv = np.array(q.values)
    qv[-1, -1] = np.inf
    replace_target(adapter, Q, values=qv)
    path = write_unchecked(adapter, tmp_path / "bad.safetensors", craft)
    report = naf.validate(path)
    assert rules(report) == sorted([("3.5", UP), ("3.6", UP), ("3.7", UP), ("3.7", Q)])
    with pytest.raises(naf.NeuroAdaError, match=r"\(and 3 more problems\)"):
        report.raise_if_invalid()
    assert json.loads(json.dumps(report.to_dict()))["valid"] is False


def test_content_checks_find_defects_in_later_chunks(monkeypatch, rng, craft):
    monkeypatch.setattr(validate_mod, "CHUNK_ENTRIES", 64)  # 16 rows of k=4 per chunk
    _, t = craft.target(rng, shape=(200, 50), k=4, select="random")
    idx, val = np.array(t.indices), np.array(t.values)
    idx[123, 3], val[190, 0] = 50, np.nan
    adapter = naf.Adapter({t.name: naf.Target(t.name, idx, val, t.shape, probe=t.probe)})
    report = naf.validate(adapter)
    messages = {p["rule"]: p["message"] for p in report.errors}
    assert "row 123, slot 3" in messages["3.5"] and "row 190, slot 0" in messages["3.7"]
    assert "3.6" not in messages


def test_k_equal_one_and_k_equal_d_in(rng, craft):
    for k in (1, 24):
        _, t = craft.target(rng, shape=(5, 24), k=k)
        assert naf.validate(naf.Adapter({t.name: t})).ok


def test_i32_where_i16_suffices_is_a_warning(tmp_path, small_model):
    _, adapter = small_model
    path = tmp_path / "a.safetensors"
    naf.save(adapter, path, index_dtype="I32")
    report = naf.validate(path)
    assert report.ok
    assert {p["rule"] for p in report.problems} == {"3.2"}
    assert all(p["severity"] == "warning" for p in report.problems)
    naf.load(path)  # warnings never stop a load
    name, t = next(iter(adapter.targets.items()))
    replace_target(adapter, name, indices=np.asarray(t.indices).astype(np.int32))
    report = naf.validate(adapter)  # the same warning before the file is written
    assert report.ok and [(p["rule"], p["severity"]) for p in report.problems] == [("3.2", "warning")]


# -- in-memory adapters get the same structure rules as files -------------------------------------------
@pytest.mark.parametrize("defect, rule", [
    ("float_indices", "3.2"), ("u8_indices", "3.2"), ("i64_indices", "3.2"), ("f64_values", "3.3"),
    ("i16_values", "3.3"), ("complex_values", "3.2"),
    ("one_d", "3.4"),
    ("rows", "3.4"),
    ("k_mismatch", "3.4"), ("k_past_d_in", "3.4"), ("bad_probe", "2.2"), ("bad_dtype", "2.2"),
    ("bad_selection", "2.2"), ("not_json", "2.2"), ("bad_version", "2.3"), ("newer_major", "2.3"),
])
def test_in_memory_structure_rules(small_model, defect, rule):
    _, adapter = small_model
    t = adapter.targets[UP]
    idx, val = np.array(t.indices), np.array(t.values)
    fields = {}
    if defect == "float_indices":
        idx = idx.astype(np.float32)
    elif defect == "u8_indices":
        idx = idx.astype(np.uint8)
    elif defect == "i64_indices":
        idx = idx.astype(np.int64)
    elif defect == "f64_values":
        val = val.astype(np.float64)
    elif defect == "i16_values":
        val = val.astype(np.int16)
    elif defect == "complex_values":
        val = val.astype(np.complex64)
    elif defect == "one_d":
        idx, val = idx.reshape(-1), val.reshape(-1)
    elif defect == "rows":
        idx, val = idx[:-1], val[:-1]
    elif defect == "k_mismatch":
        val = val[:, :1]
    elif defect == "k_past_d_in":
        fields["shape"] = (t.d_out, 2)
    elif defect == "bad_probe":
        fields["probe"] = "md5:abc"
    elif defect == "bad_dtype":
        fields["dtype"] = "F64"
    elif defect == "bad_selection":
        adapter.selection = {"rule": "magnitude", "tie_break": "higher-column"}
    elif defect == "not_json":
        adapter.extra = {"created_by": object()}
    elif defect == "bad_version":
        adapter.version = "1"
    elif defect == "newer_major":
        adapter.version = "2.0"
    replace_target(adapter, UP, idx, val, **fields)
    report = naf.validate(adapter)
    assert not report.ok
    assert rule in {p["rule"] for p in report.errors}, report.problems


# -- the metadata document ------------------------------------------------------------------------------
def _doc(**changes):
    doc = {"format": "neuroada", "version": "1.0",
           "base": {"name": "m", "revision": None, "structure_hash": None},
           "selection": {"rule": "magnitude", "tie_break": "lower-column"},
           "merge": {"rule": "add-f32-round-once"},
           "targets": {"w": {"shape": [4, 8], "layout": "out_in", "dtype": "BF16", "k": 2,
                             "probe": "sha256:" + "a" * 64}}}
    doc.update(changes)
    return doc


def _parse(doc):
    p = Problems("x.safetensors", strict=False)
    text = doc if isinstance(doc, str) else json.dumps(doc)
    return parse_document({METADATA_KEY: text}, p), p.items


def test_parse_document_accepts_a_later_minor_with_unknown_fields():
    doc, problems = _parse(_doc(version="1.12", created_by="me", future_field={"x": 1}))
    assert problems == [] and doc["future_field"] == {"x": 1}


@pytest.mark.parametrize("text, rule", [
    (None, "2.1"), ("[1, 2]", "2.2"), ("{bad json", "2.2"), ('{"a": NaN}', "2.2"),
    ('{"a": 1, "a": 2}', "2.2"), ("[" * 100_000, "2.2"),
    (json.dumps(_doc(format="lora")), "2.2"), (json.dumps(_doc(version="v1")), "2.3"),
    (json.dumps(_doc(version="01.0")), "2.3"), (json.dumps(_doc(version=1.0)), "2.3"),
    (json.dumps(_doc(version="3.0")), "2.3"), (json.dumps(_doc(version="0.9")), "2.3"),
    (json.dumps(_doc(targets={})), "2.2"), (json.dumps(_doc(merge={"rule": "add-bf16"})), "2.2"),
])
def test_parse_document_rejects(text, rule):
    p = Problems("x.safetensors", strict=False)
    meta = None if text is None else {METADATA_KEY: text}
    assert parse_document(meta, p) is None
    assert p.items and p.items[0]["rule"] == rule


def test_schema_errors_name_the_target():
    doc = _doc()
    doc["targets"]["w"]["k"] = -1
    doc["targets"]["v"] = {"shape": [4], "layout": "out_in", "dtype": "BF16", "k": 1, "probe": "x"}
    parsed, problems = _parse(doc)
    assert parsed is None
    assert {p["tensor"] for p in problems} == {"w", "v"}
    assert all(p["rule"] == "2.2" and p["message"].startswith("metadata targets/") for p in problems)


def test_newer_major_message_says_upgrade():
    _, problems = _parse(_doc(version="2.0"))
    assert "newer major version" in problems[0]["message"] and "upgrade" in problems[0]["message"]


def test_schema_ships_in_the_package():
    s = schema()
    assert s["properties"]["merge"]["properties"]["rule"]["const"] == "add-f32-round-once"
    assert set(s["$defs"]["target"]["required"]) == {"shape", "layout", "dtype", "k", "probe"}
