"""Hostile ONNX bases through the real `neuroada-merge`: initializer names or external data entries that are not
valid UTF-8 (protobuf hands those back as bytes), and inline initializers whose data does not fill their dims.
Each must end in one rule-1.6 line naming the file and the initializer (exit 1), not an internal error, and leave
the base and the output folder as they were.

The models are built by hand (small MatMul chains, as in test_onnx_merge.py's hand-built graphs), so this file
needs neither torch nor an exporter.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format.converters.onnx_read import OnnxModel  # noqa: E402

MERGE = os.path.join(os.path.dirname(sys.executable), "neuroada-merge")
BF16 = np.dtype(ml_dtypes.bfloat16)


# -- builders --------------------------------------------------------------------------------------
def weights():
    rng = np.random.default_rng(0)
    return {"fc1.weight": rng.standard_normal((16, 24)).astype(np.float32),    # [in, out], as MatMul takes it
            "fc2.weight": rng.standard_normal((24, 8)).astype(np.float32)}


def scoped(node, module):
    p = node.metadata_props.add()
    parts = module.split(".")
    p.key = "pkg.torch.onnx.name_scopes"
    p.value = repr([""] + [".".join(parts[:i + 1]) for i in range(len(parts))] + ["linear"])
    return node


def build(folder, ws, *, external: bool, edit=None) -> str:
    """fc1 -> fc2 MatMul chain in `folder`/m.onnx (data in m.onnx.data when external); `edit(name, tensor)` may
    change each initializer before the model is written."""
    os.makedirs(folder, exist_ok=True)
    inits, offset = [], 0
    for name, w in ws.items():
        t = numpy_helper.from_array(w, name)
        if external:
            raw = t.raw_data
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            with open(os.path.join(folder, "m.onnx.data"), "ab") as f:
                f.write(raw)
            for k, v in (("location", "m.onnx.data"), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(raw)
        if edit:
            edit(name, t)
        inits.append(t)
    nodes = [scoped(helper.make_node("MatMul", ["x", "fc1.weight"], ["h"], name="fc1_matmul"), "fc1"),
             scoped(helper.make_node("MatMul", ["h", "fc2.weight"], ["y"], name="fc2_matmul"), "fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    path = os.path.join(folder, "m.onnx")
    with open(path, "wb") as f:
        f.write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString())
    return path


def replace_bytes(path, old: bytes, new: bytes) -> None:
    """Swap text in the serialised model for bytes of the same length (protobuf lengths stay right), which is
    how a string that is not valid UTF-8 gets into a file: onnx.helper only takes str."""
    assert len(old) == len(new)
    with open(path, "rb") as f:
        data = f.read()
    assert old in data
    with open(path, "wb") as f:
        f.write(data.replace(old, new))


def adapter_file(path, ws) -> str:
    rng = np.random.default_rng(1)
    targets = {}
    for name, w in ws.items():
        idx = naf.select_indices(w.T, 2)
        vals = (rng.standard_normal(idx.shape) * 0.01).astype(BF16)
        targets[name] = naf.Target.from_weight(name, w, idx, vals, layout="in_out")
    naf.save(naf.Adapter(targets), path)
    return os.fspath(path)


def tree(folder) -> dict:
    """Every file under `folder` with a digest of its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def merge(base, adapter, out, *extra):
    return subprocess.run([MERGE, "--base", base, "--adapter", adapter, "--out", out, *extra],
                          capture_output=True, text=True, timeout=120)


# -- the hostile cases -----------------------------------------------------------------------------
def _name_not_utf8(folder, ws):
    path = build(folder, ws, external=True)
    replace_bytes(path, b"fc1.weight", b"fc1.weigh\xff")   # the initializer and the MatMul input naming it
    return path, "fc1.weigh\\xff", "initializer name b'fc1.weigh\\xff' is not valid UTF-8"


def _name_not_utf8_inline(folder, ws):
    path = build(folder, ws, external=False)
    replace_bytes(path, b"fc1.weight", b"fc1.weigh\xff")
    return path, "fc1.weigh\\xff", "initializer name b'fc1.weigh\\xff' is not valid UTF-8"


def _location_not_utf8(folder, ws):
    path = build(folder, ws, external=True)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:   # only fc1's location: fc2 still names the real file
        f.write(data.replace(b"m.onnx.data", b"m.onnx\xffdata", 1))
    return path, "fc1.weight", "external data location b'm.onnx\\xffdata' is not valid UTF-8"


def _location_key_not_utf8(folder, ws):
    path = build(folder, ws, external=True)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data.replace(b"location", b"locat\xffon", 1))
    return path, "fc1.weight", "external data key b'locat\\xffon' is not valid UTF-8"


def _inline_empty(folder, ws):
    def edit(name, t):
        if name == "fc1.weight":
            t.raw_data = b""
    return build(folder, ws, external=False, edit=edit), "fc1.weight", \
        "inline data holds 0 bytes, its dims [16, 24] need 1536 bytes"


def _inline_short(folder, ws):
    def edit(name, t):
        if name == "fc1.weight":
            t.raw_data = t.raw_data[:-8]
    return build(folder, ws, external=False, edit=edit), "fc1.weight", \
        "inline data holds 1528 bytes, its dims [16, 24] need 1536 bytes"


def _typed_short(folder, ws):
    def edit(name, t):
        if name == "fc1.weight":
            t.ClearField("raw_data")
            t.float_data.extend(ws[name].reshape(-1)[:-1].tolist())
    return build(folder, ws, external=False, edit=edit), "fc1.weight", \
        "inline data holds 383 values, its dims [16, 24] need 384 values"


def _location_flipped(folder, ws):
    """One flipped byte turns data_location EXTERNAL into DEFAULT: the entries stay, the data is not inline."""
    def edit(name, t):
        if name == "fc1.weight":
            t.data_location = TensorProto.DEFAULT
    return build(folder, ws, external=True, edit=edit), "fc1.weight", \
        "inline data holds 0 values, its dims [16, 24] need 384 values; it has external data entries, but " \
        "data_location is not EXTERNAL"


def _node_name_not_utf8(folder, ws):
    path = build(folder, ws, external=True)
    replace_bytes(path, b"fc1_matmul", b"fc1_matmu\xff")
    return path, None, "node name b'fc1_matmu\\xff' is not valid UTF-8"


CASES = {f.__name__[1:]: f for f in (_name_not_utf8, _name_not_utf8_inline, _location_not_utf8,
                                     _location_key_not_utf8, _inline_empty, _inline_short, _typed_short,
                                     _location_flipped, _node_name_not_utf8)}


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_base_is_one_rule_error_and_writes_nothing(tmp_path, case, verify):
    ws = weights()
    path, tensor, detail = CASES[case](os.fspath(tmp_path / "base"), ws)
    adapter = adapter_file(tmp_path / "a.safetensors", ws)
    (tmp_path / "out").mkdir()
    out = os.fspath(tmp_path / "out" / "m.onnx")
    before = tree(tmp_path / "base")
    r = merge(path, adapter, out, *([] if verify else ["--no-verify"]))
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and r.stdout == "", r.stderr
    prefix = f"error: {path}: " + (f"{tensor}: " if tensor else "") + "rule 1.6: "
    assert r.stderr.startswith(prefix), r.stderr
    assert detail in r.stderr, r.stderr
    assert "internal error" not in r.stderr
    assert os.listdir(tmp_path / "out") == []     # no output, no data file, no temporary or lock left
    assert tree(tmp_path / "base") == before


# -- the same builders still merge when nothing is wrong -------------------------------------------
@pytest.mark.parametrize("external", [True, False], ids=["external", "inline"])
def test_a_valid_model_still_merges(tmp_path, external):
    ws = weights()
    path = build(os.fspath(tmp_path / "base"), ws, external=external)
    adapter = adapter_file(tmp_path / "a.safetensors", ws)
    before = tree(tmp_path / "base")
    out = os.fspath(tmp_path / "out.onnx")
    r = merge(path, adapter, out)
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "base") == before
    ad = naf.load(adapter)
    merged = OnnxModel(out)
    for name, w in ws.items():
        want = naf.merge_weight(w, [ad.targets[name]], layout="in_out")   # the reference rule
        np.testing.assert_array_equal(merged.array(name), want)
        assert not np.array_equal(merged.array(name), w)
