"""The strict safetensors reader on files written by the safetensors library, and the error type."""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import neuroada_format as naf
from neuroada_format.container import HEADER_CAP, Problems, SafetensorsFile, TensorInfo, strict_json
from neuroada_format.dtypes import NUMPY_DTYPES


def every_dtype(rng):
    arrays = {}
    for name, dt in NUMPY_DTYPES.items():
        if name == "BOOL":
            arrays[name] = rng.random((3, 5)) > 0.5
        elif dt.kind in "iu":
            arrays[name] = rng.integers(0, 100, size=(3, 5)).astype(dt)
        else:
            arrays[name] = rng.standard_normal((3, 5)).astype(np.float32).astype(dt)
    arrays["scalar"] = np.array(2.5, np.float32)
    arrays["empty"] = np.zeros((0, 7), ml_dtypes.bfloat16)
    arrays["three_d"] = rng.standard_normal((2, 3, 4)).astype(np.float16)
    return arrays


def test_reads_every_dtype_the_reference_writer_writes(tmp_path, rng):
    arrays = every_dtype(rng)
    path = tmp_path / "all.safetensors"
    save_file(arrays, path, metadata={"format": "pt", "note": "é"})
    st = SafetensorsFile(path)
    assert st.valid and st.metadata == {"format": "pt", "note": "é"}
    assert set(st.tensors) == set(arrays)
    for name, a in arrays.items():
        got = st.array(name)
        assert got.dtype == a.dtype and got.shape == a.shape
        assert got.tobytes() == a.tobytes()
        info = st.tensors[name]
        assert info.nbytes == a.nbytes and info.shape == a.shape
        with open(path, "rb") as f:
            f.seek(st.absolute_offset(name))
            assert f.read(info.nbytes) == a.tobytes()


def test_arrays_are_zero_copy_read_only_views(tmp_path, rng):
    path = tmp_path / "x.safetensors"
    save_file({"w": rng.standard_normal((64, 64)).astype(np.float32)}, path)
    st = SafetensorsFile(path)
    a = st.array("w")
    assert not a.flags.writeable and not a.flags.owndata and a.base is not None


def test_file_without_metadata_or_tensors(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, path)
    st = SafetensorsFile(path)
    assert st.valid and st.tensors == {} and st.metadata is None


def test_tensor_info_is_frozen():
    info = TensorInfo("w", "F32", (2, 2), 0, 16)
    assert info.nbytes == 16
    with pytest.raises(AttributeError):
        info.begin = 3


def test_problems_collect_or_raise():
    collect = Problems("f.safetensors", strict=False)
    collect.warning("3.2", "just saying", tensor="t")
    assert not collect.has_errors
    collect.error("1.4", "gap", tensor="t")
    assert collect.has_errors and [p["rule"] for p in collect.items] == ["3.2", "1.4"]
    with pytest.raises(naf.NeuroAdaError) as info:
        Problems("f.safetensors", strict=True).error("1.4", "gap", tensor="t")
    assert (info.value.path, info.value.tensor, info.value.rule, info.value.detail) == \
        ("f.safetensors", "t", "1.4", "gap")


def test_non_strict_reader_reports_instead_of_raising(tmp_path, craft):
    header, data = craft.entries({"a": ("F32", (2,), b"\0" * 8), "b": ("F32", (2,), b"\0" * 8)})
    header["b"]["data_offsets"] = [4, 12]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(craft.raw(header, data))
    p = Problems(os.fspath(path), strict=False)
    st = SafetensorsFile(path, p)
    assert not st.valid and [x["rule"] for x in p.items] == ["1.4"]
    with pytest.raises(naf.NeuroAdaError) as info:
        SafetensorsFile(path)
    assert info.value.rule == "1.4" and info.value.tensor == "b"


def test_header_may_be_unpadded_and_tensors_in_any_order(tmp_path, craft):
    header, data = craft.entries({"a": ("U8", (3,), b"abc"), "b": ("U8", (2,), b"de")})
    header["a"]["data_offsets"], header["b"]["data_offsets"] = [2, 5], [0, 2]
    path = tmp_path / "x.safetensors"
    path.write_bytes(craft.raw(header, b"deabc", pad=False))
    st = SafetensorsFile(path)
    assert st.array("a").tobytes() == b"abc" and st.array("b").tobytes() == b"de"


def test_header_cap_is_the_reference_readers():
    assert HEADER_CAP == 100_000_000


def test_strict_json():
    assert strict_json('{"a": [1, 2.5, null, "x"]}') == {"a": [1, 2.5, None, "x"]}
    for bad in ('{"a": 1, "a": 1}', '{"a": NaN}', '{"a": Infinity}', '[-Infinity]', '{"a": {"b": 1, "b": 2}}'):
        with pytest.raises(ValueError):
            strict_json(bad)


def test_error_message_is_one_line_with_file_tensor_and_rule():
    err = naf.NeuroAdaError("two\nlines", path="/x/a.safetensors", tensor="values/w", rule="3.7")
    assert str(err) == "/x/a.safetensors: values/w: rule 3.7: two\\nlines"  # escaped (errors.printable)
    assert str(naf.NeuroAdaError("plain")) == "plain"
    assert isinstance(err, Exception) and err.detail == "two\nlines"
    assert naf.NeuroAdaError("m", path=os.path.join("a", "b")).path == os.path.join("a", "b")


def test_unreadable_path_is_rule_1_1(tmp_path):
    for path in (tmp_path / "missing.safetensors", tmp_path):
        with pytest.raises(naf.NeuroAdaError) as info:
            SafetensorsFile(path)
        assert info.value.rule == "1.1" and str(path) in str(info.value)


def test_a_pickle_or_other_file_in_place_of_safetensors_is_named(tmp_path):
    """torch.save output (PEFT's adapter_model.bin, a state_dict saved by hand) passed where a safetensors file goes
    was refused only as "header length 578712552184433488 is not within [2, ...]", which does not say why; a damaged
    safetensors file (its header still starts with "{") is not called anything else."""
    import pickle
    import zipfile

    with zipfile.ZipFile(tmp_path / "zipped.bin", "w") as z:  # torch.save's format: a zip holding a pickle
        z.writestr("archive/data.pkl", pickle.dumps({"w": [1.0]}))
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"w": [1.0] * 100}, protocol=2))
    np.save(tmp_path / "array.npy", np.zeros(64, np.float32))
    (tmp_path / "damaged.safetensors").write_bytes(struct.pack("<Q", 10**6) + b'{"__metadata__": {}}')
    for name, kind in [("zipped.bin", "a zip archive as torch.save writes (a pickle, which is never read)"),
                       ("legacy.pt", "a pickle"), ("array.npy", "a numpy .npy file"), ("damaged.safetensors", None)]:
        with pytest.raises(naf.NeuroAdaError) as info:
            naf.load(tmp_path / name)
        assert info.value.rule == "1.1" and str(tmp_path / name) in str(info.value)
        assert "header length" in str(info.value)
        if kind:
            assert f"; not a safetensors file: this is {kind}" in str(info.value)
        else:
            assert "this is" not in str(info.value)


def test_metadata_written_by_safetensors_is_exactly_what_we_parse(tmp_path, small_model):
    _, adapter = small_model
    path = tmp_path / "a.safetensors"
    naf.save(adapter, path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert n % 8 == 0  # the reference writer pads to 8 bytes
    assert header["__metadata__"] == SafetensorsFile(path).metadata
