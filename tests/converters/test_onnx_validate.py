"""`neuroada validate ADAPTER --base model.onnx` (and `neuroada_format.validate(adapter, base="model.onnx")`) on real
dynamo exports, ONNX Runtime's MatMulNBits quantizations of them and hand-built graphs: the problems reported are the
ones neuroada-merge refuses for that base, found by the merge's own resolution (converters/onnx_resolve.py)."""
from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")

from click.testing import CliRunner  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format.cli import main  # noqa: E402
from neuroada_format.converters.onnx_merge import merge_onnx  # noqa: E402

from onnx_nbits_models import llama_fixture, quantized_variants  # noqa: E402, F401  (tests/onnx_nbits_models.py)

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def rtn(llama):
    """4-bit blocks of 32 with uint8 zero points (round to nearest), the head kept in float."""
    return quantized_variants(llama, [(4, 32, False)])[(4, 32, False)]


@pytest.fixture(scope="module")
def hqq(llama):
    """4-bit blocks of 32 with float zero points (ONNX Runtime's HQQ)."""
    return quantized_variants(llama, [(4, 32, False)], hqq=True)[(4, 32, False)]


def adapter_on(weights: dict, k=3, seed=0, value_dtype="F32") -> naf.Adapter:
    rng = np.random.default_rng(seed)
    targets = {}
    for name, w in weights.items():
        idx = naf.select_indices(w, k)
        vals = (rng.standard_normal(idx.shape) * 0.01).astype(naf.dtypes.NUMPY_DTYPES[value_dtype])
        targets[name] = naf.Target.from_weight(name, w, idx, vals, value_dtype=value_dtype)
    return naf.Adapter(targets, base_name="tiny")


def saved(adapter, path) -> str:
    naf.save(adapter, os.fspath(path))
    return os.fspath(path)


def run(*args):
    result = CliRunner().invoke(main, ["validate", *map(os.fspath, args)])
    assert "Traceback" not in result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def merge_refusal(base, adapter, tmp_path):
    """The merge's verdict on the same adapter and base: (rule, tensor) of its refusal, nothing written."""
    out = tmp_path / "never.onnx"
    with pytest.raises(naf.NeuroAdaError) as err:
        merge_onnx(base, [(adapter, 1.0)], os.fspath(out))
    assert not out.exists()
    return err.value.rule, err.value.tensor


def test_a_float_export_validates_as_the_merge_accepts_it(llama, tmp_path):
    """The dynamo export (external data, val_N initializers stored [in, out], found by exporter scope) and an untied
    head: valid, exit 0, on the command line and through the API, with and without --check-selection."""
    state = llama["state"]
    adapter = adapter_on({n: state[n] for n in llama["names"]})
    path = saved(adapter, tmp_path / "a.safetensors")
    r = run(path, "--base", llama["path"])
    assert r.exit_code == 0 and r.stdout == f"valid: {path} against {llama['path']}\n" and r.stderr == ""
    assert run(path, "--base", llama["path"], "--check-selection").exit_code == 0
    report = naf.validate(path, base=llama["path"], check_selection=True)
    assert report.ok and report.problems == [] and report.checked_base == llama["path"]
    merge_onnx(llama["path"], [(adapter, 1.0)], os.fspath(tmp_path / "m.onnx"))  # which the merge takes


def test_another_base_is_rule_4_3_in_one_line_and_json(llama, tmp_path):
    """Values of another model (one weight nudged by one ulp at the probed positions): the merge refuses it under rule
    4.3, and so does validate, once per target, in one line; --json carries the same problem."""
    state = llama["state"]
    nudged = state[UP].copy()
    idx = naf.select_indices(nudged, 3)
    rows = np.arange(nudged.shape[0])
    nudged[rows, idx[:, 0]] = np.nextafter(nudged[rows, idx[:, 0]], np.float32(np.inf))
    adapter = adapter_on({Q: state[Q], UP: nudged})
    assert merge_refusal(llama["path"], adapter, tmp_path) == ("4.3", UP)
    path = saved(adapter, tmp_path / "other.safetensors")
    r = run(path, "--base", llama["path"])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith(f"error: {path}: {UP}: rule 4.3: probe hash differs") and r.stderr.count("\n") == 1
    j = run(path, "--base", llama["path"], "--json")
    assert j.exit_code == 1
    doc = json.loads(j.stdout)
    assert doc["valid"] is False and doc["base"] == llama["path"]
    assert [(p["rule"], p["tensor"], p["severity"]) for p in doc["problems"]] == [("4.3", UP, "error")]


@pytest.mark.parametrize("which", ["rtn", "hqq"])
def test_matmulnbits_models_validate_on_their_decoded_values(which, llama, request, tmp_path):
    """A MatMulNBits weight is its binary32 decoding (spec 15.4): an adapter made on the decoded values is valid
    (the --check-selection top-k recomputed from them), one made on the float checkpoint is not (the probe finds no
    weight: rule 4.1, as the merge says), uint8 and float zero points alike."""
    path, _, decoded = request.getfixturevalue(which)
    on_grid = adapter_on({n: decoded[n] for n in (Q, UP)})
    good = saved(on_grid, tmp_path / "grid.safetensors")
    assert run(good, "--base", path, "--check-selection").exit_code == 0
    assert naf.validate(good, base=path, check_selection=True).ok
    merge_onnx(path, [(on_grid, 1.0)], os.fspath(tmp_path / "m.onnx"))
    float_made = adapter_on({n: llama["state"][n] for n in (Q, UP)})
    assert merge_refusal(path, float_made, tmp_path) == ("4.1", Q)
    report = naf.validate(float_made, base=path)
    assert [(p["rule"], p["tensor"]) for p in report.errors] == [("4.1", Q), ("4.1", UP)]
    assert "MatMulNBits weights are matched by name" in report.errors[0]["message"]
    # --check-selection on the decoded values: indices that are not their top-k are rule 4.4
    t = on_grid.targets[UP]
    reverse = naf.select_indices(decoded[UP], t.k, "reverse")
    off = naf.Adapter({UP: naf.Target.from_weight(UP, decoded[UP], reverse, t.values, value_dtype="F32")})
    assert [p["rule"] for p in naf.validate(off, base=path, check_selection=True).errors] == ["4.4"]


def graph(path, weights: dict, nodes, inputs) -> str:
    """A hand-built model: weights {name: array} as inline initializers, inputs [(name, elem type, shape)]."""
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in weights.items()])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), os.fspath(path))
    return os.fspath(path)


def test_the_merges_refusals_are_validates_problems(tmp_path):
    """Per target, what the merge refuses, validate reports under the same rule, every one at once: a wrong shape
    found by name (4.2), a dtype the adapter was not made on (4.2: an ONNX merge refuses it where a safetensors merge
    warns 4.6), a tied head (4.1: a Gather reads its initializer), a key nothing holds (4.1)."""
    rng = np.random.default_rng(0)
    fc = rng.standard_normal((8, 6)).astype(np.float32)        # [in, out], MatMul
    gemm = rng.standard_normal((4, 6)).astype(np.float16)      # [out, in], Gemm transB=1
    table = rng.standard_normal((6, 6)).astype(np.float32)     # embeddings, also the head's weight (tied)
    nodes = [helper.make_node("MatMul", ["x", "enc.fc.weight"], ["h"]),
             helper.make_node("Cast", ["h"], ["h16"], to=TensorProto.FLOAT16),
             helper.make_node("Gemm", ["h16", "enc.out.weight"], ["o16"], transB=1),
             helper.make_node("Gather", ["emb", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "emb"], ["logits"]),
             helper.make_node("Cast", ["o16"], ["o"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["o", "o"], ["y"])]
    path = graph(tmp_path / "g.onnx", {"enc.fc.weight": fc, "enc.out.weight": gemm, "emb": table}, nodes,
                 [("x", TensorProto.FLOAT, [2, 8]), ("ids", TensorProto.INT64, [2])])
    good = adapter_on({"enc.fc.weight": fc.T.copy()})
    assert naf.validate(good, base=path).ok
    cases = {
        "enc.fc.weight": (adapter_on({"enc.fc.weight": rng.standard_normal((5, 8)).astype(np.float32)}), "4.2",
                          "has shape [8, 6], the adapter expects"),
        "enc.out.weight": (adapter_on({"enc.out.weight": gemm.astype(np.float32)}), "4.2",
                           "'enc.out.weight' is F16[4, 6] (out_in), the adapter expects F32[4, 6]"),
        "lm_head.weight": (adapter_on({"lm_head.weight": table.T.copy()}), "4.1", "is also an embedding table"),
        "model.other.weight": (adapter_on({"model.other.weight": rng.standard_normal((3, 5)).astype(np.float32)}),
                               "4.1", "no initializer found by name, exporter scope, node name or probe hash"),
    }
    for target, (adapter, rule, words) in cases.items():
        assert merge_refusal(path, adapter, tmp_path) == (rule, target)
        report = naf.validate(adapter, base=path)
        assert [(p["rule"], p["tensor"]) for p in report.errors] == [(rule, target)], report.problems
        assert words in report.errors[0]["message"]
    everything = naf.Adapter({n: a.targets[n] for n, (a, _, _) in cases.items()})
    file = saved(everything, tmp_path / "all.safetensors")
    r = run(file, "--base", path)
    lines = r.stderr.splitlines()
    assert r.exit_code == 1 and r.stdout == "" and len(lines) == 4
    assert [line.split(": rule ")[1][:3] for line in lines] == ["4.2", "4.2", "4.1", "4.1"]
    assert [line.split(": ")[2] for line in lines] == sorted(cases)


def test_two_keys_on_one_initializer_are_rule_4_1(tmp_path):
    """Two targets that land on one initializer (a name and a probe finding the same weight): the merge refuses the
    later one, and so does validate, naming the earlier."""
    w = np.random.default_rng(2).standard_normal((8, 6)).astype(np.float32)
    path = graph(tmp_path / "g.onnx", {"enc.fc.weight": w}, [helper.make_node("MatMul", ["x", "enc.fc.weight"], ["y"])],
                 [("x", TensorProto.FLOAT, [2, 8])])
    adapter = adapter_on({"enc.fc.weight": w.T.copy(), "other.fc.weight": w.T.copy()})
    assert merge_refusal(path, adapter, tmp_path) == ("4.1", "other.fc.weight")
    report = naf.validate(adapter, base=path)
    assert [(p["rule"], p["tensor"]) for p in report.errors] == [("4.1", "other.fc.weight")]
    assert "both resolve to initializer 'enc.fc.weight'" in report.errors[0]["message"]


def test_a_corrupt_onnx_base_is_one_line_as_the_merge_says_it(tmp_path):
    """Not a model: one line naming the file and rule 1.1, exit 1 (a base whose content breaks a rule, as a truncated
    safetensors base, and as neuroada-merge exits for the same file), never a traceback; a missing .onnx is exit 2."""
    w = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    file = saved(adapter_on({"x.weight": w}), tmp_path / "a.safetensors")
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"not read")
    r = run(file, "--base", bad)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == (f"error: {bad}: rule 1.1: not a readable ONNX model: Error parsing message with type "
                        f"'onnx.ModelProto': Wire format was corrupt\n")
    with pytest.raises(naf.NeuroAdaError, match="rule 1.1: not a readable ONNX model"):
        naf.validate(file, base=bad)
    missing = run(file, "--base", tmp_path / "gone.onnx")
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1 and "rule 1.1" in missing.stderr


def test_pack_refuses_an_onnx_base_clearly(tmp_path):
    """neuroada-pack reads bases by tensor name (extract walks them, combine reads new positions' probes), which an
    ONNX graph does not give without an adapter to resolve: a usage error naming the commands that read it."""
    from neuroada_format.converters.pack import combine

    w = np.random.default_rng(4).standard_normal((4, 8)).astype(np.float32)
    path = graph(tmp_path / "g.onnx", {"x.weight": w.T.copy()}, [helper.make_node("MatMul", ["x", "x.weight"], ["y"])],
                 [("x", TensorProto.FLOAT, [2, 8])])
    a = adapter_on({"x.weight": w})
    with pytest.raises(naf.NeuroAdaUsageError, match="neuroada validate and neuroada-merge read it"):
        combine([(a, 0.5), (a, 0.5)], path)
    assert naf.validate(a, base=path).ok


def test_an_onnx_view_that_is_not_returned_is_closed(tmp_path, monkeypatch):
    """open_onnx_base(strict=True) refusing a target, and resolve_targets given a path, open a model no caller can
    close (the probe stage maps external data): they close it themselves; a caller's own model stays open."""
    from neuroada_format.converters.onnx_read import OnnxModel
    from neuroada_format.converters.onnx_resolve import open_onnx_base, resolve_targets

    closed = []
    real_close = OnnxModel.close
    monkeypatch.setattr(OnnxModel, "close", lambda self: (closed.append(self), real_close(self))[1])
    w = np.random.default_rng(5).standard_normal((8, 6)).astype(np.float32)
    path = graph(tmp_path / "g.onnx", {"enc.fc.weight": w}, [helper.make_node("MatMul", ["x", "enc.fc.weight"], ["y"])],
                 [("x", TensorProto.FLOAT, [2, 8])])
    missing = adapter_on({"other.weight": np.ones((3, 5), np.float32)})
    with pytest.raises(naf.NeuroAdaError, match="rule 4.1"):
        open_onnx_base(path, missing, strict=True)
    assert len(closed) == 1
    with pytest.raises(naf.NeuroAdaError, match="rule 4.1"):
        resolve_targets(path, missing)
    good = adapter_on({"enc.fc.weight": w.T.copy()})
    assert resolve_targets(path, good)["enc.fc.weight"].how == "name"
    assert len(closed) == 3
    mine = OnnxModel(path)
    resolve_targets(path, good, _model=mine)
    view = open_onnx_base(path, good, strict=True)
    assert len(closed) == 3 and view.refusal("enc.fc.weight") is None
    view.close()
    assert closed[-1] is view.model
