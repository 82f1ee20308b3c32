"""The in-memory Python API on hostile or mistaken input: wrong results are refused, and every refusal is a
NeuroAdaError (or NeuroAdaUsageError) naming the rule and the tensor or path, never a raw numpy/KeyError.

One test (or a few) per defect of the format-core audit: Fortran-ordered weights, layouts and shapes of
targets, the version a new file records, big-endian / complex / non-array bases, read-only weights,
non-integer and out-of-range indices, and the messages for old majors, long keys and odd save paths.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format.hashing import probe_hash
from neuroada_format.layout import canonical_shape, canonical_view, flat_positions, stored_shape

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"
BF16 = ml_dtypes.bfloat16
IDX = np.array([[1, 3], [0, 5]])


@pytest.fixture
def w():
    return np.arange(16, dtype=np.float32).reshape(2, 8)


@pytest.fixture
def target(w):
    return naf.Target.from_weight("w", w, IDX, np.ones((2, 2), np.float32))


def file_document(path) -> dict:
    """The metadata document as written in the file's header (not as load interprets it)."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(json.loads(raw[8:8 + n])["__metadata__"]["neuroada"])


# -- 1. merge_weight on a Fortran-ordered weight ------------------------------------------------------------
def test_merge_weight_merges_a_fortran_ordered_weight(w, target):
    want = naf.merge_weight(w, [target])
    assert not np.array_equal(want, w)
    got = naf.merge_weight(np.asfortranarray(w), [target])
    assert np.array_equal(got, want) and got.flags.c_contiguous


def test_merge_weight_merges_a_transposed_view_for_in_out(w):
    stored = np.ascontiguousarray(w.T)                       # Conv1D [d_in, d_out]
    t = naf.Target.from_weight("c_attn", stored, IDX, np.ones((2, 2), np.float32), layout="in_out")
    want = naf.merge_weight(stored, [t])
    got = naf.merge_weight(w.T, [t])                          # the same values as an F-ordered view
    assert np.array_equal(got, want) and not np.array_equal(got, w.T)
    assert got[1, 0] == w.T[1, 0] + 1 and got[3, 0] == w.T[3, 0] + 1  # canonical (0,1), (0,3)


# -- 2. the target's layout and shape bind the merge; unknown layouts are refused ---------------------------
def test_default_layout_is_the_targets_own(rng):
    stored = rng.standard_normal((4, 4)).astype(np.float32)  # square in_out weight (GPT-2 attn.c_proj)
    t = naf.Target.from_weight("h.0.attn.c_proj.weight", stored, np.full((4, 1), 1), np.ones((4, 1), np.float32),
                               layout="in_out")
    merged = naf.merge_weight(stored, [t])                  # the package docstring's usage
    assert np.argwhere(merged != stored).tolist() == [[1, 0], [1, 1], [1, 2], [1, 3]]
    assert np.array_equal(merged, naf.merge_weight(stored, [t], "in_out"))
    assert np.array_equal(merged, naf.merge_weight(stored, [(t, 1.0)]))
    positions, _ = naf.merged_values(stored, [t])
    assert positions.tolist() == [4, 5, 6, 7]


def test_bare_deltas_still_default_to_out_in(w):
    d = naf.Delta(IDX, np.ones((2, 2), np.float32))
    assert np.argwhere(naf.merge_weight(w, [d]) != w).tolist() == [[0, 1], [0, 3], [1, 0], [1, 5]]


@pytest.mark.parametrize("call", [
    lambda w, d: naf.merge_weight(w, [d], "out-in"),
    lambda w, d: naf.merge_weight_(w.copy(), [d], "inout"),
    lambda w, d: naf.merged_values(w, [d], "OUT_IN"),
    lambda w, d: naf.plan_merge(w, [d], "in-out", checked=True),
    lambda w, d: probe_hash(w, IDX, "out-in"),
    lambda w, d: flat_positions(IDX, (2, 8), "out-in"),
    lambda w, d: canonical_view(w, "out-in"),
    lambda w, d: stored_shape((2, 8), "out-in"),
    lambda w, d: canonical_shape((2, 8), "out-in"),
])
def test_an_unknown_layout_is_a_usage_error(w, call):
    with pytest.raises(naf.NeuroAdaUsageError, match="is not one of out_in, in_out") as info:
        call(w, naf.Delta(IDX, np.ones((2, 2), np.float32)))
    assert info.value.rule is None  # an argument, not a file: no rule of section 7


def test_an_explicit_layout_contradicting_the_target_is_refused(w, target):
    before = w.copy()
    for call in (lambda: naf.merge_weight(w.T, [target], "in_out"), lambda: naf.merge_weight_(w, [target], "in_out")):
        with pytest.raises(naf.NeuroAdaUsageError, match="records 'out_in'") as info:
            call()
        assert info.value.tensor == "w" and "w:" in str(info.value)
    assert np.array_equal(w, before)


def test_targets_disagreeing_on_layout_are_refused(rng):
    sq = rng.standard_normal((4, 4)).astype(np.float32)
    a = naf.Target.from_weight("a", sq, np.full((4, 1), 1), layout="out_in")
    b = naf.Target.from_weight("b", sq, np.full((4, 1), 2), layout="in_out")
    with pytest.raises(naf.NeuroAdaUsageError, match="disagree on the layout") as info:
        naf.merge_weight(sq, [a, b])
    assert info.value.tensor == "a, b"


def test_a_weight_of_another_shape_than_the_target_records_is_refused(w):
    t16 = naf.Target("wide", np.array([[0, 1], [2, 3]], np.int16), np.ones((2, 2), BF16), (2, 16))
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.merge_weight(np.zeros((2, 8), np.float32), [t16])
    assert info.value.rule == "4.2" and info.value.tensor == "wide" and "[2, 16]" in str(info.value)
    tio = naf.Target("tall", np.array([[0], [1]], np.int16), np.ones((2, 1), BF16), (2, 8), layout="in_out")
    with pytest.raises(naf.NeuroAdaError) as info:  # in_out stores [d_in, d_out] = [8, 2]
        naf.merge_weight(np.zeros((2, 8), np.float32), [tio])
    assert info.value.rule == "4.2" and info.value.tensor == "tall"
    assert naf.merge_weight(np.zeros((8, 2), np.float32), [tio]).sum() == 2


def test_a_target_recording_an_unknown_layout_is_refused(w, target):
    target.layout = "inout"
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.merge_weight(w, [target])
    assert info.value.rule == "2.2" and info.value.tensor == "w" and "'inout'" in str(info.value)


# -- 3. a new file records the lowest version that holds its fields -----------------------------------------
def test_a_new_adapter_with_module_is_saved_as_1_2(tmp_path, w):
    t = naf.Target.from_weight("model.language_model.layers.0.q.weight", w.astype(BF16), IDX)
    plain = tmp_path / "plain.safetensors"
    naf.save(naf.Adapter({t.name: t}), plain)
    assert file_document(plain)["version"] == "1.0"          # no module: byte for byte what 1.0 writers wrote
    t.extra["module"] = "model.layers.0.q"
    a = naf.Adapter({t.name: t})
    assert a.written_version() == "1.2" == naf.version_for(a.targets.values())
    path = tmp_path / "module.safetensors"
    naf.save(a, path)
    doc = file_document(path)
    assert doc["version"] == "1.2" and doc["targets"][t.name]["module"] == "model.layers.0.q"
    assert naf.load(path).version == "1.2"


@pytest.mark.parametrize("name, version", [("module_1_2", "1.2"), ("minor_1_7_unknown_fields", "1.7"),
                                           ("minimal", "1.0")])
def test_a_document_that_was_read_keeps_its_version(tmp_path, name, version):
    a = naf.load(VECTORS / "valid" / f"{name}.safetensors")
    assert a.version == version
    out = tmp_path / "again.safetensors"
    naf.save(a, out)
    assert file_document(out)["version"] == version


def test_an_invalid_version_is_kept_for_validation_to_report(target):
    a = naf.Adapter({"w": target})
    target.extra["module"] = "m"
    for bad in ("2.0", "0.9", "1"):
        a.version = bad
        assert a.written_version() == bad
        assert [p["rule"] for p in naf.validate(a).errors] == ["2.3"]


# -- 4. hostile in-memory bases and weights -----------------------------------------------------------------
def test_a_big_endian_base_validates_and_merges(w, target):
    be = w.astype(">f4")
    a = naf.Adapter({"w": target}, structure_hash=naf.structure_hash([("w", "F32", (2, 8))]))
    report = naf.validate(a, base={"w": be})
    assert report.ok and report.problems == []              # F32 values, same probe, same structure hash
    merged = naf.merge_weight(be, [target])
    assert merged.dtype == np.dtype("<f4") and np.array_equal(merged, naf.merge_weight(w, [target]))
    inplace = be.copy()
    saved = naf.merge_weight_(inplace, [target])
    assert inplace.dtype == np.dtype(">f4") and np.array_equal(inplace, merged)
    naf.unmerge_weight_(inplace, saved)
    assert np.array_equal(inplace, be)
    assert naf.Target.from_weight("w", be, IDX).probe == naf.Target.from_weight("w", w, IDX).probe


def test_a_complex_non_target_tensor_does_not_stop_the_structure_hash(w, target):
    freqs = np.zeros(4, np.complex64)
    sh = naf.structure_hash([("w", "F32", (2, 8)), ("rope.freqs", "C64", (4,))])  # safetensors' name for it
    report = naf.validate(naf.Adapter({"w": target}, structure_hash=sh), base={"w": w, "rope.freqs": freqs})
    assert report.ok and report.problems == []
    other = naf.validate(naf.Adapter({"w": target}, structure_hash="sha256:" + "0" * 64),
                         base={"w": w, "rope.freqs": np.zeros(4, np.complex128)})
    assert [p["rule"] for p in other.problems] == ["4.5"]   # a warning, not a KeyError


def test_a_complex_target_tensor_is_a_4_2_error(target):
    report = naf.validate(naf.Adapter({"w": target}), base={"w": np.zeros((2, 8), np.complex64)})
    assert [(p["rule"], p["tensor"]) for p in report.errors] == [("4.2", "w")]
    assert "C64" in report.errors[0]["message"]


def test_a_dict_base_holding_a_list_is_a_usage_error(w, target):
    with pytest.raises(naf.NeuroAdaUsageError) as info:
        naf.validate(naf.Adapter({"w": target}), base={"w": w.tolist()})
    assert info.value.rule == "1.6" and info.value.tensor == "w" and "list" in str(info.value)
    with pytest.raises(naf.NeuroAdaUsageError) as info:   # a non-target list, reached by the structure hash
        naf.validate(naf.Adapter({"w": target}, structure_hash="sha256:" + "0" * 64),
                     base={"w": w, "extra": [1, 2]})
    assert info.value.rule == "1.6" and info.value.tensor == "extra"


def test_in_place_merge_into_a_read_only_weight_is_refused(tmp_path, w, target):
    ro = w.copy()
    ro.setflags(write=False)
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.merge_weight_(ro, [target])
    assert info.value.rule == "4.2" and "read-only" in str(info.value)
    from safetensors.numpy import save_file
    save_file({"w": w}, os.fspath(tmp_path / "model.safetensors"))
    mapped = naf.open_base(tmp_path).array("w")              # a base's array is a read-only map
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.merge_weight_(mapped, [target])
    assert info.value.rule == "4.2" and "read-only" in str(info.value)
    assert np.array_equal(mapped, w)
    with pytest.raises(naf.NeuroAdaUsageError, match="numpy array, not list"):
        naf.merge_weight_(w.tolist(), [target])


def test_from_weight_refuses_a_1d_weight_and_an_unknown_layout(w):
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.Target.from_weight("flat", w.reshape(-1), IDX)
    assert info.value.rule == "4.2" and info.value.tensor == "flat" and "1 dimensions" in str(info.value)
    with pytest.raises(naf.NeuroAdaUsageError) as info:
        naf.Target.from_weight("typo", w, IDX, layout="inout")
    assert info.value.tensor == "typo" and "'inout'" in str(info.value)
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.Target.from_weight("cplx", w.astype(np.complex64), IDX)
    assert info.value.rule == "4.2" and info.value.tensor == "cplx"


def test_save_writes_big_endian_arrays_little_endian(tmp_path, w, target):
    target.values = target.values.astype(">f4")
    target.indices = target.indices.astype(">i2")
    path = tmp_path / "be.safetensors"
    naf.save(naf.Adapter({"w": target}), path)
    back = naf.load(path).targets["w"]
    assert back.value_dtype == "F32" and back.index_dtype == "I16"
    assert np.array_equal(back.values, np.ones((2, 2))) and np.array_equal(back.indices, IDX)


# -- 5. non-integer and out-of-range indices ----------------------------------------------------------------
def test_float_indices_are_refused_by_merge(w):
    d = naf.Delta(np.array([[1.9, 3.7], [0.2, 5.5]]), np.ones((2, 2), np.float32))
    for call in (lambda: naf.merge_weight(w, [d]), lambda: naf.plan_merge(w, [d], checked=True)):
        with pytest.raises(naf.NeuroAdaError) as info:
            call()
        assert info.value.rule == "3.2" and "float64" in str(info.value)


def test_float_indices_of_a_target_are_refused_naming_it(w, target):
    target.indices = target.indices.astype(np.float32)
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.merge_weight(w, [target])
    assert info.value.rule == "3.2" and info.value.tensor == "w"


@pytest.mark.parametrize("cols, rule", [([[1, 9], [0, 5]], "3.5"), ([[-1, 3], [0, 5]], "3.5"),
                                        ([[1, 8], [0, 5]], "3.5"), ([[1.0, 3.0], [0.0, 5.0]], "3.2"),
                                        ([[1, 3]], "3.4")])
def test_from_weight_refuses_bad_indices_before_hashing(w, cols, rule):
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.Target.from_weight("q_proj", w, np.array(cols))
    assert info.value.rule == rule and info.value.tensor == "q_proj" and "q_proj" in str(info.value)


@pytest.mark.parametrize("cols, rule", [([[1, 9], [0, 5]], "3.5"), ([[-1, 3], [0, 5]], "3.5"),
                                        ([[1.5, 3], [0, 5]], "3.2")])
def test_probe_hash_refuses_bad_indices(w, cols, rule):
    for stored, layout in ((w, "out_in"), (np.ascontiguousarray(w.T), "in_out"), (w.T, "in_out")):
        with pytest.raises(naf.NeuroAdaError) as info:
            probe_hash(stored, np.array(cols), layout)
        assert info.value.rule == rule


def test_save_refuses_float_indices(tmp_path, target):
    target.indices = np.array([[1.9, 3.7], [0.2, 5.5]])
    path = tmp_path / "f.safetensors"
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.save(naf.Adapter({"w": target}), path)
    assert info.value.rule == "3.2" and info.value.tensor == "w" and os.fspath(path) in str(info.value)
    assert not path.exists()


# -- 6. messages --------------------------------------------------------------------------------------------
def test_an_older_major_is_not_told_to_upgrade():
    path = VECTORS / "invalid" / "2.3_older_major.safetensors"
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.load(path)
    msg = str(info.value)
    assert info.value.rule == "2.3" and os.fspath(path) in msg
    assert "older major version" in msg and "not supported" in msg and "upgrade" not in msg


def test_an_over_long_target_key_gives_a_short_message_naming_it(tmp_path):
    from safetensors.numpy import save as serialize

    entry = {"shape": [2, 8], "layout": "out_in", "dtype": "BF16", "k": 2, "probe": "sha256:" + "0" * 64}
    long_key = "x" * 200_000
    doc = {"format": "neuroada", "version": "1.0", "base": {"name": None, "revision": None, "structure_hash": None},
           "selection": {"rule": "magnitude", "tie_break": "lower-column"}, "merge": {"rule": "add-f32-round-once"},
           "targets": {"w": entry, long_key: entry}}
    tensors = {"indices/w": IDX.astype(np.int16), "values/w": np.ones((2, 2), np.float32)}
    path = tmp_path / "long.safetensors"
    path.write_bytes(serialize(tensors, metadata={"neuroada": json.dumps(doc)}))
    with pytest.raises(naf.NeuroAdaError) as info:
        naf.load(path)
    msg = str(info.value)
    assert info.value.rule == "2.2" and len(msg) < 1000 and os.fspath(path) in msg
    assert info.value.tensor.startswith("xxxx") and "200,000 characters" in info.value.tensor
    assert "too long" in msg
    problems = naf.validate(path).problems
    assert [p["rule"] for p in problems] == ["2.2"] and len(problems[0]["message"]) < 1000


@pytest.mark.parametrize("where, says", [("", "empty"), ("adir", "is a folder"), ("adir/", "is a folder"),
                                         ("newdir/", "ends in a separator"),
                                         ("no/such/x.safetensors", "parent folder does not exist"),
                                         ("afile/x.safetensors", "parent folder does not exist")])
def test_save_onto_an_unusable_path_is_a_usage_error_naming_it(tmp_path, monkeypatch, target, where, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_bytes(b"x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(naf.NeuroAdaUsageError, match=says) as info:
        naf.save(naf.Adapter({"w": target}), where)
    assert (where or "''") in str(info.value) and info.value.path == (where or "''")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


# -- 7. validate's docstring says what a missing path does ---------------------------------------------------
def test_validate_raises_a_usage_error_for_a_missing_path_as_documented(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(naf.NeuroAdaUsageError) as info:
        naf.validate(missing)
    assert info.value.rule == "1.1" and os.fspath(missing) in str(info.value)
    assert "NeuroAdaUsageError rule 1.1" in " ".join(naf.validate.__doc__.split())
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert [p["rule"] for p in naf.validate(empty).errors] == ["1.1"]  # a file that breaks a rule: reported


def test_a_base_folder_with_several_candidate_files_names_them(tmp_path):
    """Rule 1.6 was right but the message said only that model.safetensors and the index were missing, not that
    two other files were there and the reader would not guess between them."""
    from safetensors.numpy import save_file

    for name in ("a.safetensors", "b.safetensors"):
        save_file({"w": np.zeros((2, 2), np.float32)}, str(tmp_path / name))
    with pytest.raises(naf.NeuroAdaError, match=r"2 other \.safetensors files \(a\.safetensors, b\.safetensors\)"
                       r": name the file") as e:
        naf.open_base(tmp_path)
    assert e.value.rule == "1.6"
    assert naf.open_base(tmp_path / "a.safetensors")  # naming one works
