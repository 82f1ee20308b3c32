"""Hostile files, written byte by byte: every one must give one NeuroAdaError with the right rule.

For each file, `load` raises NeuroAdaError naming the rule (content rules 3.5-3.7 are not load's job:
there `validate(strict=True)` raises instead), `validate` returns a report with that rule, nothing
else is ever raised, nothing hangs (SIGALRM guard) and Python-side allocation stays within a small
multiple of the file size (tracemalloc also sees numpy's buffers).
"""
from __future__ import annotations

import json
import os
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format.dtypes import NUMPY_DTYPES

from deadline import deadline  # tests/deadline.py

CONTENT_RULES = ("3.5", "3.6", "3.7")
ALLOC_SLACK = 2 << 20  # JSON parsing, jsonschema and exception objects, whatever the file size
D_OUT, D_IN, K = 4, 40, 3


def good_target(**overrides):
    idx = np.array([[0, 5, 39], [1, 2, 3], [10, 20, 30], [7, 8, 38]], np.int16)
    values = np.array([[0.5, -1, 2], [0, -0.0, 1e-3], [3, 4, 5], [-7, 8, 9]], np.float32)
    t = {"indices": idx, "values": values.astype(ml_dtypes.bfloat16), "shape": (D_OUT, D_IN),
         "layout": "out_in", "dtype": "BF16", "k": K, "probe": "sha256:" + "ab" * 32}
    t.update(overrides)
    return t


def good_doc():
    t = good_target()
    return {"format": "neuroada", "version": "1.0",
            "base": {"name": "m", "revision": None, "structure_hash": None},
            "selection": {"rule": "magnitude", "tie_break": "lower-column"},
            "merge": {"rule": "add-f32-round-once"},
            "targets": {"w": {"shape": list(t["shape"]), "layout": "out_in", "dtype": "BF16", "k": K,
                              "probe": t["probe"]}}}


def good_tensors():
    t = good_target()
    return {"indices/w": ("I16", t["indices"].shape, t["indices"].tobytes()),
            "values/w": ("BF16", t["values"].shape, t["values"].tobytes())}


def file_from(craft, tensors=None, doc=None, *, metadata=None, edit_header=None, header_len=None):
    """Pack a file from parts; edit_header(header) may change the header dict before it is written."""
    header, data = craft.entries(good_tensors() if tensors is None else tensors)
    if metadata is None:
        metadata = {"neuroada": json.dumps(good_doc() if doc is None else doc)}
    if metadata != "omit":
        header = {"__metadata__": metadata, **header}
    if edit_header is not None:
        edit_header(header)
    return craft.raw(header, data, header_len=header_len)


def with_doc(craft, change):
    doc = good_doc()
    change(doc)
    return file_from(craft, doc=doc)


def with_target(craft, **overrides):
    return craft.adapter({"w": good_target(**overrides)})


def assert_rejected(path, rule, size_hint=None):
    """The contract of this file, for one hostile file."""
    size = os.path.getsize(path) if size_hint is None else size_hint
    tracemalloc.start()
    try:
        with deadline():
            if rule in CONTENT_RULES:
                naf.load(path)
                with pytest.raises(naf.NeuroAdaError) as info:
                    naf.validate(path, strict=True)
            else:
                with pytest.raises(naf.NeuroAdaError) as info:
                    naf.load(path)
            report = naf.validate(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    err = info.value
    assert err.rule == rule, f"expected rule {rule}, got {err}"
    assert err.path == os.fspath(path) and os.fspath(path) in str(err) and "\n" not in str(err)
    assert not report.ok and rule in {p["rule"] for p in report.errors}, report.problems
    if rule not in CONTENT_RULES:
        assert report.errors[0]["rule"] == rule
    assert peak < 4 * size + ALLOC_SLACK, f"peak Python allocation {peak} bytes for a {size}-byte file"
    return err


@pytest.fixture(scope="module", autouse=True)
def _warm_schema():
    """Build the JSON-schema validator once so its allocation is not charged to the first case."""
    from neuroada_format.metadata import _validator

    _validator()


def test_the_seed_file_is_valid(craft, raw_file):
    path = raw_file(file_from(craft))
    assert naf.validate(path).ok and naf.load(path).targets["w"].k == K
    assert naf.validate(raw_file(with_target(craft))).ok


# -- container: rules 1.x -----------------------------------------------------------------------------
def test_truncated_at_many_points(craft, raw_file):
    data = file_from(craft)
    (n,) = struct.unpack("<Q", data[:8])
    cuts = sorted(set(range(0, 17)) | set(range(17, len(data), 5)) | {8 + n - 1, 8 + n, 8 + n + 1, len(data) - 1})
    for cut in cuts:
        rule = "1.1" if cut < 8 + n else "1.4"
        assert_rejected(raw_file(data[:cut]), rule)


@pytest.mark.parametrize("seed", range(12))
def test_random_bytes(seed, raw_file):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(16, 4000))
    data = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
    assert_rejected(raw_file(data), "1.1")
    plausible = struct.pack("<Q", max(2, size // 2)) + data  # a believable length over random bytes
    assert_rejected(raw_file(plausible), "1.2")


@pytest.mark.parametrize("length", [2 ** 64 - 1, 2 ** 63, 2 ** 40, 100_000_001, 0, 1, "file+1", "file-7"])
def test_header_length_bombs(length, craft, raw_file):
    data = file_from(craft)
    n = {"file+1": len(data) + 1, "file-7": len(data) - 7}.get(length, length)
    assert_rejected(raw_file(data[:0] + struct.pack("<Q", n) + data[8:]), "1.1")


@pytest.mark.parametrize("header", [
    b"{not json}   ", b"\xff\xfe{}    ", b'{"a": "\xc3\x28"}', b"[" * 100_000, b"{" * 50_000,
    b'["a", 1]', b'"just a string"', b"12345678", b"null    ", b"{}garbage", b'{"a": NaN}',
    b'{"a": 1, "a": 1}', b'{"\\ud800": 1}', b'{"a": "x\\uDFFFy"}',
])
def test_header_that_is_not_a_json_object(header, craft, raw_file):
    assert_rejected(raw_file(craft.raw(header)), "1.2")


def test_duplicate_tensor_names_in_header(craft, raw_file):
    data = file_from(craft)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    entry = json.dumps(header["values/w"])
    text = json.dumps(header)[:-1] + f', "values/w": {entry}}}'
    assert_rejected(raw_file(craft.raw(text, data[8 + n:])), "1.2")


def _offsets(name, begin, end):
    def edit(header):
        header[name]["data_offsets"] = [begin, end]
    return edit


@pytest.mark.parametrize("case", ["overlap", "gap", "trailing", "past_end", "short", "zero_then_overlap"])
def test_offsets_must_tile_the_data(case, craft, raw_file):
    # good layout: indices/w [0, 24), values/w [24, 48)
    if case == "overlap":
        data = file_from(craft, edit_header=_offsets("values/w", 20, 44))
    elif case == "gap":
        data = file_from(craft, edit_header=_offsets("values/w", 28, 52)) + b"\0" * 4
    elif case == "trailing":
        data = file_from(craft) + b"\0"
    elif case == "past_end":
        data = file_from(craft, edit_header=_offsets("values/w", 2 ** 62, 2 ** 62 + 24))
    elif case == "short":
        data = file_from(craft)[:-2]
    else:
        def edit(h):
            h["indices/w"]["data_offsets"] = [0, 24]
            h["values/w"]["data_offsets"] = [0, 24]
        data = file_from(craft, edit_header=edit)
    assert_rejected(raw_file(data), "1.4")


@pytest.mark.parametrize("entry", [
    {"dtype": "F128", "shape": [4, 3], "data_offsets": [24, 48]},
    {"dtype": "bf16", "shape": [4, 3], "data_offsets": [24, 48]},
    {"dtype": None, "shape": [4, 3], "data_offsets": [24, 48]},
    {"dtype": "BF16", "shape": [4, -3], "data_offsets": [24, 48]},
    {"dtype": "BF16", "shape": [4.0, 3], "data_offsets": [24, 48]},
    {"dtype": "BF16", "shape": [True, 3], "data_offsets": [24, 48]},
    {"dtype": "BF16", "shape": "4x3", "data_offsets": [24, 48]},
    {"dtype": "BF16", "shape": [4, 3], "data_offsets": [48, 24]},
    {"dtype": "BF16", "shape": [4, 3], "data_offsets": [24]},
    {"dtype": "BF16", "shape": [4, 3], "data_offsets": [24, 48, 60]},
    {"dtype": "BF16", "shape": [4, 3], "data_offsets": [24.0, 48]},
    {"dtype": "BF16", "shape": [4, 3], "data_offsets": [-24, 48]},
    {"dtype": "BF16", "shape": [4, 3], "data_offsets": "24-48"},
    {"dtype": "BF16", "shape": [4, 3]},
    {"dtype": "BF16", "shape": [4, 3], "data_offsets": [24, 48], "align": 8},
    {"dtype": "F32", "shape": [4, 3], "data_offsets": [24, 48]},            # dtype lie: 48 bytes needed
    {"dtype": "BF16", "shape": [4, 4], "data_offsets": [24, 48]},           # shape lie
    {"dtype": "BF16", "shape": [2 ** 20, 2 ** 20], "data_offsets": [24, 48]},  # 2**40 elements claimed
    {"dtype": "BF16", "shape": [2 ** 64, 2 ** 64], "data_offsets": [24, 48]},
    [1, 2, 3],
    "values",
])
def test_malformed_tensor_entries(entry, craft, raw_file):
    def edit(header):
        header["values/w"] = entry
    assert_rejected(raw_file(file_from(craft, edit_header=edit)), "1.3")


def test_length_lie_consistent_with_a_huge_shape(craft, raw_file):
    """Shape and offsets agree on 2**41 bytes that the file does not have: no allocation may follow."""
    def edit(header):
        header["values/w"] = {"dtype": "BF16", "shape": [2 ** 20, 2 ** 20], "data_offsets": [24, 24 + 2 ** 41]}
    err = assert_rejected(raw_file(file_from(craft, edit_header=edit)), "1.4")
    assert "data section" in str(err) or "gap" in str(err) or "overlap" in str(err)


@pytest.mark.parametrize("metadata", [["neuroada"], "neuroada", {"neuroada": {"format": "neuroada"}},
                                      {"neuroada": None}, {"neuroada": 1}, {"other": 1}])
def test_metadata_not_a_string_map(metadata, craft, raw_file):
    assert_rejected(raw_file(file_from(craft, metadata=metadata)), "1.5")


# -- metadata: rules 2.x ------------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", ["omit", {}, {"format": "pt"}, {"NeuroAda": "{}"}])
def test_missing_metadata(metadata, craft, raw_file):
    assert_rejected(raw_file(file_from(craft, metadata=metadata)), "2.1")


@pytest.mark.parametrize("text", ["", "{", "not json", "[1, 2]", '"a string"', "null", "[" * 100_000,
                                  '{"format": "neuroada", "format": "neuroada"}', '{"x": NaN}',
                                  json.dumps(good_doc())[:-1]])
def test_metadata_not_json(text, craft, raw_file):
    assert_rejected(raw_file(file_from(craft, metadata={"neuroada": text})), "2.2")


@pytest.mark.parametrize("version", ["2.0", "10.3", "1", "1.0.0", "v1.0", "01.0", "", None, 1.0, ["1", "0"]])
def test_version(version, craft, raw_file):
    assert_rejected(raw_file(with_doc(craft, lambda d: d.update(version=version))), "2.3")


def test_newer_major_version_says_upgrade(craft, raw_file):
    err = assert_rejected(raw_file(with_doc(craft, lambda d: d.update(version="2.0"))), "2.3")
    assert "upgrade" in str(err)


def test_a_major_version_too_long_for_int(craft, raw_file):
    """More than 4300 digits: Python's int() refuses it, so the reader must compare it as text."""
    err = assert_rejected(raw_file(with_doc(craft, lambda d: d.update(version="2" * 4301 + ".0"))), "2.3")
    assert "a newer major version" in str(err) and len(str(err)) < 400
    key = naf.metadata.version_key
    assert key("1." + "9" * 5000) > key("1.0") > key("0.99") and key("10.0") > key("9.9")


def _set_shape(shape, begin_end=(0, 1)):
    def edit(header):
        header["indices/w"] = {"dtype": "U8", "shape": shape, "data_offsets": list(begin_end)}
    return edit


def test_huge_dimensions_are_a_rule_not_a_crash(craft, raw_file):
    """A byte count longer than Python will print (10^4299 squared) is rule 1.3 with a readable message."""
    path = raw_file(file_from(craft, edit_header=_set_shape([10 ** 4299, 10 ** 4299])))
    err = assert_rejected(path, "1.3")
    assert "digits" in str(err) and len(str(err)) < 600


def test_many_huge_dimensions_are_refused_quickly(craft, raw_file):
    """1000 dimensions of 4300 digits (4 MB of header): the byte count stops once past what is stored, and
    the scan for over-long integers is linear (both were quadratic: minutes to hours)."""
    path = raw_file(file_from(craft, edit_header=_set_shape([int("9" * 4300)] * 1000)))
    assert_rejected(path, "1.3")


def test_many_schema_errors_cost_no_more_than_the_first_twenty(craft, raw_file):
    """20,000 targets with a bad layout: 20 are reported, and the rest are not collected (sorting every
    error once held ~3.5 KB a target, far past this file's memory bound)."""
    def peak_of(layout):
        doc = good_doc()
        entry = dict(doc["targets"]["w"], layout=layout)
        doc["targets"] = {f"t{i}": entry for i in range(20_000)}
        path = raw_file(file_from(craft, tensors={}, doc=doc))
        tracemalloc.start()
        try:
            with deadline():
                report = naf.validate(path)
            return tracemalloc.get_traced_memory()[1], report
        finally:
            tracemalloc.stop()

    valid_peak, _ = peak_of("out_in")       # schema-valid (then refused for its missing tensors)
    peak, report = peak_of("sideways")
    assert [p["rule"] for p in report.errors] == ["2.2"] * 20
    assert peak < 1.5 * valid_peak, (peak, valid_peak)


def _del(*keys):
    def change(doc):
        node = doc
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    change.__name__ = "del-" + ".".join(keys)
    return change


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(doc):
        node = doc
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    change.__name__ = "set-" + ".".join(keys) + "=" + json.dumps(value)[:20]
    return change


@pytest.mark.parametrize("change", [
    _del("format"), _del("base"), _del("selection"), _del("merge"), _del("targets"),
    _del("base", "structure_hash"), _del("selection", "tie_break"), _del("merge", "rule"),
    _del("targets", "w", "probe"), _del("targets", "w", "k"), _del("targets", "w", "shape"),
    _del("targets", "w", "layout"), _del("targets", "w", "dtype"),
    _set("format", "NeuroAda"), _set("base", "m"), _set("base", "name", 3), _set("base", "structure_hash", "abc"),
    _set("selection", "rule", "largest"), _set("selection", "tie_break", "higher-column"),
    _set("selection", "seed", "7"), _set("merge", "rule", "add-bf16"), _set("targets", []), _set("targets", {}),
    _set("targets", "w", "k", -1), _set("targets", "w", "k", 0), _set("targets", "w", "k", "3"),
    _set("targets", "w", "k", 3.5), _set("targets", "w", "k", True), _set("targets", "w", "k", 2 ** 31),
    _set("targets", "w", "shape", [4]), _set("targets", "w", "shape", [4, 40, 1]),
    _set("targets", "w", "shape", [0, 40]), _set("targets", "w", "shape", "4x40"),
    _set("targets", "w", "shape", [4, -40]), _set("targets", "w", "layout", "row"),
    _set("targets", "w", "dtype", "I8"), _set("targets", "w", "probe", "sha256:XYZ"),
    _set("targets", "w", "probe", "md5:" + "0" * 32), _set("targets", "w", "probe", "sha256:" + "A" * 64),
    _set("targets", "w", "probe", None), _set("targets", "w", []),
], ids=lambda c: f"{c.__name__}")
def test_metadata_schema_violations(change, craft, raw_file):
    assert_rejected(raw_file(with_doc(craft, change)), "2.2")


@pytest.mark.parametrize("change", [_set("targets", "w", "k", 3.0), _set("targets", "w", "shape", [4.0, 40.0]),
                                    _set("selection", "seed", 7.0)], ids=["k", "shape", "seed"])
def test_integral_floats_are_not_integers(change, craft, raw_file):
    assert_rejected(raw_file(with_doc(craft, change)), "2.2")


def test_lone_surrogate_in_a_tensor_name(craft, raw_file):
    """Valid JSON syntax, but no Unicode text: it could not be hashed or written back (safetensors refuses it)."""
    data = file_from(craft)
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8:8 + n].decode().replace('"values/w"', '"values/w\\ud800"')
    assert_rejected(raw_file(craft.raw(text, data[8 + n:])), "1.2")


@pytest.mark.parametrize("where", ["version", "probe", "structure_hash"])
def test_a_final_newline_does_not_slip_past_a_pattern(where, craft, raw_file):
    """The schema's regexes are ECMA-262 ones, whose "$" ends the text; Python's also matches before a final newline."""
    change = {"version": _set("version", "1.0\n"), "probe": _set("targets", "w", "probe", "sha256:" + "ab" * 32 + "\n"),
              "structure_hash": _set("base", "structure_hash", "sha256:" + "ab" * 32 + "\n")}[where]
    assert_rejected(raw_file(with_doc(craft, change)), "2.3" if where == "version" else "2.2")


def test_lone_surrogate_in_the_metadata(craft, raw_file):
    assert_rejected(raw_file(with_doc(craft, _set("base", "name", "m\ud800"))), "2.2")


def test_metadata_target_name_too_long(craft, raw_file):
    name = "x" * 1025
    t = good_target()
    data = craft.adapter({name: t})
    assert_rejected(raw_file(data), "2.2")


# -- tensors against the metadata: rules 3.1-3.4 --------------------------------------------------------
def test_unknown_tensor(craft, raw_file):
    extra = {"lora_A/w": ("F32", (1,), b"\0" * 4)}
    assert_rejected(raw_file(craft.adapter({"w": good_target()}, extra_tensors=extra)), "3.1")
    extra = {"indices/v": ("I16", (4, 3), b"\0" * 24)}
    assert_rejected(raw_file(craft.adapter({"w": good_target()}, extra_tensors=extra)), "3.1")


@pytest.mark.parametrize("drop", ["indices/w", "values/w"])
def test_missing_tensor(drop, craft, raw_file):
    tensors = good_tensors()
    del tensors[drop]
    assert_rejected(raw_file(file_from(craft, tensors)), "3.1")


def test_declared_target_without_any_tensor(craft, raw_file):
    doc = good_doc()
    doc["targets"]["v"] = dict(doc["targets"]["w"])
    assert_rejected(raw_file(file_from(craft, doc=doc)), "3.1")


@pytest.mark.parametrize("dtype", ["F32", "I64", "U16", "I8", "BF16", "BOOL"])
def test_wrong_index_dtype(dtype, craft, raw_file):
    idx = good_target()["indices"].astype(NUMPY_DTYPES[dtype])
    assert_rejected(raw_file(with_target(craft, indices=idx, index_dtype=dtype)), "3.2")


def test_i16_indices_for_more_than_32768_columns(craft, raw_file):
    assert_rejected(raw_file(with_target(craft, shape=(D_OUT, 40_000))), "3.2")


@pytest.mark.parametrize("dtype", ["F64", "I16", "F8_E4M3", "U8"])
def test_wrong_value_dtype(dtype, craft, raw_file):
    values = good_target()["values"].astype(np.float32).astype(NUMPY_DTYPES[dtype])
    assert_rejected(raw_file(with_target(craft, values=values, value_dtype=dtype)), "3.3")


@pytest.mark.parametrize("case", ["k_too_big_in_meta", "tensor_wider", "tensor_rows", "three_d", "one_d",
                                  "k_exceeds_d_in", "huge_d_out", "transposed"])
def test_shape_lies(case, craft, raw_file):
    t = good_target()
    if case == "k_too_big_in_meta":
        data = with_target(craft, k=K + 1)
    elif case == "tensor_wider":
        data = with_target(craft, indices=np.zeros((D_OUT, K + 1), np.int16), k=K)
    elif case == "tensor_rows":
        data = with_target(craft, indices=t["indices"][:-1], values=t["values"][:-1], k=K)
    elif case == "three_d":
        data = with_target(craft, index_shape=(D_OUT, K, 1))
    elif case == "one_d":
        data = with_target(craft, value_shape=(D_OUT * K,))
    elif case == "k_exceeds_d_in":
        data = with_target(craft, shape=(D_OUT, 2))
    elif case == "huge_d_out":  # 2**31-1 rows claimed: compared, never allocated
        data = with_target(craft, shape=(2 ** 31 - 1, D_IN))
    else:
        data = with_target(craft, index_shape=(K, D_OUT), value_shape=(K, D_OUT))
    assert_rejected(raw_file(data), "3.4")


# -- content: rules 3.5-3.7 (validate's job) --------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "signalling_nan", "negative_nan"])
def test_non_finite_values(dtype, bad, craft, raw_file):
    dt = craft.dtypes[dtype]
    values = good_target()["values"].astype(np.float32).astype(dt)
    if bad == "signalling_nan":
        values.view({2: np.uint16, 4: np.uint32}[dt.itemsize])[2, 1] = {"BF16": 0x7F81, "F16": 0x7C01,
                                                                        "F32": 0x7F800001}[dtype]
    elif bad == "negative_nan":
        values.view({2: np.uint16, 4: np.uint32}[dt.itemsize])[2, 1] = {"BF16": 0xFFC0, "F16": 0xFE00,
                                                                        "F32": 0xFFC00000}[dtype]
    else:
        values[2, 1] = bad
    err = assert_rejected(raw_file(with_target(craft, values=values)), "3.7")
    assert "row 2, slot 1" in str(err)


@pytest.mark.parametrize("index_dtype", ["I16", "I32"])
@pytest.mark.parametrize("case, rule", [
    ("negative", "3.5"), ("min_int", "3.5"), ("equal_d_in", "3.5"), ("max_int", "3.5"),
    ("duplicate", "3.6"), ("unsorted", "3.6"), ("descending", "3.6"),
])
def test_bad_indices(index_dtype, case, rule, craft, raw_file):
    idx = good_target()["indices"].astype(craft.dtypes[index_dtype])
    info = np.iinfo(idx.dtype)
    row = {"negative": 1, "min_int": 1, "equal_d_in": 3, "max_int": 3}.get(case, 2)
    if case == "negative":
        idx[1, 0] = -1
    elif case == "min_int":
        idx[1, 0] = info.min
    elif case == "equal_d_in":
        idx[3, 2] = D_IN
    elif case == "max_int":
        idx[3, 2] = info.max
    elif case == "duplicate":
        idx[2, 1] = idx[2, 0]
    elif case == "unsorted":
        idx[2, [1, 2]] = idx[2, [2, 1]]
    else:
        idx[2] = idx[2][::-1]
    err = assert_rejected(raw_file(with_target(craft, indices=idx)), rule)
    assert f"row {row}" in str(err)


@pytest.mark.parametrize("pair, rules", [
    ((2**31 - 1, -2**31), {"3.5", "3.6"}),  # a decrease whose difference overflows int32
    ((-2**31, 2**31 - 1), {"3.5"}),         # an increase whose difference overflows int32
    ((-1, 2**31 - 1), {"3.5"}),
])
def test_order_check_does_not_overflow_at_the_int32_extremes(pair, rules, craft, raw_file):
    t = good_target()
    idx = t["indices"][:, 1:].astype(craft.dtypes["I32"])  # k=2, so the row is exactly the pair
    idx[2] = pair
    path = raw_file(with_target(craft, indices=idx, values=t["values"][:, 1:], k=2))
    assert {p["rule"] for p in naf.validate(path).errors} == rules


def test_out_of_range_hides_nothing_else(craft, raw_file):
    """An out-of-range index that also breaks the order is reported under both rules."""
    idx = good_target()["indices"].copy()
    idx[0, 1] = -5  # [0, -5, 39]: negative and not increasing
    path = raw_file(with_target(craft, indices=idx))
    assert {p["rule"] for p in naf.validate(path).errors} == {"3.5", "3.6"}


# -- sanity: the harness itself notices a wrong expectation ------------------------------------------------
def test_harness_rejects_a_wrong_rule(craft, raw_file):
    path = raw_file(file_from(craft) + b"\0")
    with pytest.raises(AssertionError):
        assert_rejected(path, "1.2")
