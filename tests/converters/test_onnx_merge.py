"""merge_onnx on real exports (dynamo exporter, run in onnxruntime) and on hand-built graphs for the
cases an exporter does not produce on demand (legacy names, quantized nodes, hostile data locations).

Each real model is exported once per module: exports dominate this file's run time.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from deadline import deadline  # noqa: E402  (tests/deadline.py)
import neuroada_format as naf  # noqa: E402
from neuroada_format import durable  # noqa: E402
from neuroada_format.converters.backend import MergeSummary  # noqa: E402
from neuroada_format.converters.journal import JOURNAL_PREFIX, revert  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402
from neuroada_format.converters.onnx_merge import merge_onnx  # noqa: E402
from neuroada_format.converters.onnx_read import OnnxModel  # noqa: E402
from neuroada_format.converters.onnx_resolve import open_onnx_base, resolve_targets  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


# -- helpers ---------------------------------------------------------------------------------------
class LogitsOnly(torch.nn.Module):
    """Export wrapper: plain tensors out (the HF cache object cannot be exported) and a module prefix
    ("m.") in every scope, as real export scripts have."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids):
        if hasattr(self.m, "lm_head"):
            return self.m(input_ids=ids, use_cache=False).logits
        out = self.m(input_ids=ids)
        return out.last_hidden_state + out.pooler_output[:, None, :]   # keeps the pooler in the graph


def export(module, args, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, os.fspath(path), dynamo=True, verbose=False, **kw)
    return os.fspath(path)


def numpy_state(model):
    return {k: v.detach().cpu().numpy() if v.dtype != torch.bfloat16 else
            v.detach().cpu().view(torch.uint16).numpy().view(BF16) for k, v in model.state_dict().items()}


def linear_names(state):
    return sorted(k for k, v in state.items() if v.ndim == 2 and k.endswith(".weight") and "embed" not in k)


def make_adapter(state, names, k=4, seed=0, value_dtype="BF16"):
    """An adapter over `names` with values ~ 0.05 * std of each weight (realistic, never all zero)."""
    rng = np.random.default_rng(seed)
    targets = {}
    for name in names:
        w = state[name]
        idx = naf.select_indices(w, k)
        std = float(np.asarray(w, np.float32).std())
        vals = (rng.standard_normal(idx.shape) * 0.05 * std).astype(naf.dtypes.NUMPY_DTYPES[value_dtype])
        targets[name] = naf.Target.from_weight(name, w, idx, vals, value_dtype=value_dtype)
    return naf.Adapter(targets, base_name="tiny")


def reference_state(state, adapters):
    """Each target's weight merged with the reference rule, in the given adapter order."""
    out = dict(state)
    names = sorted({n for a, _ in adapters for n in a.targets})
    for name in names:
        deltas = [(a.targets[name], s) for a, s in adapters if name in a.targets]
        out[name] = naf.merge_weight(state[name], deltas)
    return out


def torch_with(model, state):
    m = copy.deepcopy(model)
    m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    return m.eval()


def run_ort(path, *inputs):
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x for i, x in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)[0]


def close(actual, expected, rel=1e-4):
    scale = float(np.abs(expected).max())
    assert float(np.abs(actual - expected).max()) <= rel * scale, float(np.abs(actual - expected).max()) / scale


def initializer(path, name):
    """An initializer's stored array, external data included."""
    m = OnnxModel(path)
    return np.array(m.array(name))


def assert_initializers_match(out, summary, ref_state):
    """The merged initializers are byte-identical to the reference merge (transposed as stored)."""
    for target, info in summary.details["resolutions"].items():
        for name, layout in [(info["initializer"], info["layout"])] + [
                (c["initializer"], c["layout"]) for c in info.get("copies", [])]:
            got = initializer(out, name)
            want = ref_state[target] if layout == "out_in" else ref_state[target].T
            assert got.dtype == want.dtype and got.shape == want.shape, target
            assert got.tobytes() == np.ascontiguousarray(want).tobytes(), target


def digest(*paths):
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


# -- real models -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Tiny untied LlamaForCausalLM, dynamo export with its default options (external data, val_N names)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("llama")
    ids = torch.randint(0, 128, (2, 8))
    path = export(LogitsOnly(model), (ids,), folder / "llama.onnx", external_data=True)
    return model, numpy_state(model), path


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """Tiny BertModel exported inline: MatMul on transposed val_N weights plus a Gemm(transB=1) pooler."""
    torch.manual_seed(1)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    folder = tmp_path_factory.mktemp("bert")
    ids = torch.randint(0, 100, (2, 6))
    path = export(LogitsOnly(model), (ids,), folder / "bert.onnx", external_data=False)
    return model, numpy_state(model), path


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """Linear-ReLU-Linear on 2-D inputs (Gemm transB=1, original names) in F32, F16 and BF16."""
    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("mlp")
    out = {}
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        seq = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval().to(dt)
        name = str(dt).split(".")[-1]
        out[name] = (seq, numpy_state(seq), export(seq, (torch.randn(3, 16, dtype=dt),), folder / f"{name}.onnx",
                                                   external_data=False))
    return out


def test_llama_external_data_matches_torch(llama, tmp_path):
    model, state, path = llama
    data_files = [os.path.join(os.path.dirname(path), f) for f in os.listdir(os.path.dirname(path))]
    before = digest(*sorted(data_files))
    adapter = make_adapter(state, linear_names(state))
    out = tmp_path / "merged.onnx"
    summary = merge_onnx(path, [(adapter, 1.0)], os.fspath(out))

    assert summary.details["external_data"] and len(summary.details["resolutions"]) == 15 == summary.targets
    json.dumps(summary.to_dict())                                                       # JSON-able
    assert {t["how"] for t in summary.details["resolutions"].values()} == {"scope"}
    assert {t["layout"] for t in summary.details["resolutions"].values()} == {"in_out"}   # MatMul stores [in, out]
    assert summary.values_touched == sum(t.indices.size for t in adapter.targets.values())
    assert sorted(os.listdir(tmp_path)) == ["merged.onnx", "merged.onnx.data"]
    assert digest(*sorted(data_files)) == before                                # base untouched

    ref = reference_state(state, [(adapter, 1.0)])
    assert_initializers_match(out, summary, ref)
    ids = np.random.default_rng(3).integers(0, 128, (2, 8)).astype(np.int64)
    with torch.no_grad():
        want = LogitsOnly(torch_with(model, ref))(torch.from_numpy(ids)).numpy()
        base_logits = LogitsOnly(model)(torch.from_numpy(ids)).numpy()
    got = run_ort(out, ids)
    close(got, want)
    assert np.abs(want - base_logits).max() > 1e-4 * np.abs(want).max()       # the adapter did something


def test_bert_inline_two_adapters_match_torch(bert, tmp_path):
    model, state, path = bert
    names = linear_names(state)
    a = make_adapter(state, names, k=3, seed=1)
    b = make_adapter(state, names[::2], k=5, seed=2)
    pairs = [(a, 0.5), (b, -1.25)]
    out = tmp_path / "bert-merged.onnx"
    summary = merge_onnx(path, pairs, os.fspath(out))

    hows = {t: info["how"] for t, info in summary.details["resolutions"].items()}
    assert hows["pooler.dense.weight"] == "name"                      # Gemm(transB=1), original name
    assert summary.details["resolutions"]["pooler.dense.weight"]["layout"] == "out_in"
    assert hows["encoder.layer.0.attention.self.query.weight"] == "scope"
    assert not summary.details["external_data"] and os.listdir(tmp_path) == ["bert-merged.onnx"]

    ref = reference_state(state, pairs)
    assert_initializers_match(out, summary, ref)
    ids = np.random.default_rng(4).integers(0, 100, (2, 6)).astype(np.int64)
    with torch.no_grad():
        want = LogitsOnly(torch_with(model, ref))(torch.from_numpy(ids)).numpy()
    close(run_ort(out, ids), want)


def test_gemm_f32_inference_and_f16_bf16_weights(mlp, tmp_path):
    seq, state, path = mlp["float32"]
    adapter = make_adapter(state, ["0.weight", "2.weight"], k=3)
    out = tmp_path / "f32.onnx"
    summary = merge_onnx(path, [(adapter, 2.0)], os.fspath(out))
    assert {(t["how"], t["layout"]) for t in summary.details["resolutions"].values()} == {("name", "out_in")}
    ref = reference_state(state, [(adapter, 2.0)])
    assert_initializers_match(out, summary, ref)
    x = np.random.default_rng(5).standard_normal((3, 16)).astype(np.float32)
    with torch.no_grad():
        want = torch_with(seq, ref)(torch.from_numpy(x)).numpy()
    close(run_ort(out, x), want)

    for dtype, value_dtype in (("float16", "F32"), ("bfloat16", "BF16")):
        _, state, path = mlp[dtype]
        adapter = make_adapter(state, ["0.weight", "2.weight"], k=5, seed=7, value_dtype=value_dtype)
        out = tmp_path / f"{dtype}.onnx"
        summary = merge_onnx(path, [(adapter, 1.0)], os.fspath(out))
        ref = reference_state(state, [(adapter, 1.0)])
        assert_initializers_match(out, summary, ref)
        assert initializer(out, "0.weight").dtype == state["0.weight"].dtype
        onnx.checker.check_model(os.fspath(out))


def _copy_model(path, work):
    import shutil

    work.mkdir()
    for f in os.listdir(os.path.dirname(path)):
        shutil.copy(os.path.join(os.path.dirname(path), f), work / f)
    return os.fspath(work / os.path.basename(path))


def _folder_bytes(folder) -> dict:
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder)) if not f.startswith(JOURNAL_PREFIX)}


def test_in_place_external_data_writes_a_journal_and_reverts_bit_for_bit(llama, tmp_path):
    _, state, path = llama
    adapter = make_adapter(state, linear_names(state)[:4], k=2, seed=9)
    expected = merge_onnx(path, [(adapter, 1.0)], os.fspath(tmp_path / "copy.onnx"))
    target = _copy_model(path, tmp_path / "work")
    before = _folder_bytes(tmp_path / "work")
    summary = merge_onnx(target, [(adapter, 1.0)], None, in_place=True)
    assert summary.mode == "in-place" and summary.output == os.path.abspath(target)
    assert summary.journal and os.path.dirname(summary.journal) == os.fspath(tmp_path / "work")
    for info in expected.details["resolutions"].values():
        got = initializer(target, info["initializer"])
        assert got.tobytes() == initializer(tmp_path / "copy.onnx", info["initializer"]).tobytes()
    assert _folder_bytes(tmp_path / "work") != before
    with pytest.raises(naf.NeuroAdaError, match="probe"):   # merged already: the probe no longer fits
        merge_onnx(target, [(adapter, 1.0)], None, in_place=True)
    for _ in range(2):  # idempotent
        assert merge_run(["--revert", summary.journal]) == 0
        assert _folder_bytes(tmp_path / "work") == before


def test_in_place_revert_refuses_a_changed_model_file(llama, tmp_path):
    _, state, path = llama
    adapter = make_adapter(state, linear_names(state)[:2], k=2, seed=9)
    target = _copy_model(path, tmp_path / "work")
    summary = merge_onnx(target, [(adapter, 1.0)], None, in_place=True, journal=os.fspath(tmp_path / "j.safetensors"))
    merged = _folder_bytes(tmp_path / "work")
    with open(target, "ab") as f:  # another model now describes the data's layout
        f.write(b"\0")
    with pytest.raises(naf.NeuroAdaError, match="layout differs from the one journal .* recorded") as exc:
        revert(summary.journal)
    assert exc.value.path == target
    after = _folder_bytes(tmp_path / "work")
    assert {k: v for k, v in after.items() if not k.endswith(".onnx")} == \
        {k: v for k, v in merged.items() if not k.endswith(".onnx")}


def test_in_place_inline_model_is_refused_before_writing(bert, tmp_path):
    _, state, path = bert
    adapter = make_adapter(state, linear_names(state)[:4], k=2, seed=9)
    target = _copy_model(path, tmp_path / "work")
    before = _folder_bytes(tmp_path / "work")
    with pytest.raises(naf.NeuroAdaUsageError, match="inside the .onnx file.*--out"):
        merge_onnx(target, [(adapter, 1.0)], None, in_place=True)
    assert _folder_bytes(tmp_path / "work") == before and os.listdir(tmp_path / "work") == list(before)


def test_wrong_adapter_refused_before_writing(llama, tmp_path):
    model, state, path = llama
    other = {k: v + np.float32(0.01) for k, v in state.items()}
    adapter = make_adapter(other, linear_names(state))
    out = tmp_path / "never.onnx"
    with pytest.raises(naf.NeuroAdaError, match="rule 4.3.*probe"):
        merge_onnx(path, [(adapter, 1.0)], os.fspath(out))
    assert os.listdir(tmp_path) == []
    report = naf.validate(adapter, base=open_onnx_base(path, adapter))
    assert not report.ok and {p["rule"] for p in report.errors} == {"4.3"}
    good = make_adapter(state, linear_names(state))
    assert naf.validate(good, base=open_onnx_base(path, good)).ok


def test_output_may_not_overwrite_base(llama, tmp_path):
    _, state, path = llama
    adapter = make_adapter(state, linear_names(state)[:1])
    for overwrite in (False, True):
        with pytest.raises(naf.NeuroAdaUsageError, match="the output is the input"):
            merge_onnx(path, [(adapter, 1.0)], path, overwrite=overwrite)
        with pytest.raises(naf.NeuroAdaUsageError, match="the output is the input"):
            merge_onnx(path, [(adapter, 1.0)], path + ".data", overwrite=overwrite)
    # an existing output is replaced, together with its data file, only when asked (issue 13: merge_onnx
    # itself used to replace it silently)
    out = os.fspath(tmp_path / "m.onnx")
    merge_onnx(path, [(adapter, 1.0)], out)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    with pytest.raises(naf.NeuroAdaUsageError, match="already exists"):
        merge_onnx(path, [(adapter, 2.0)], out)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    merge_onnx(path, [(adapter, 2.0)], out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert isinstance(merge_onnx(path, [(adapter, 2.0)], out, overwrite=True), MergeSummary)
    assert (tmp_path / "m.onnx.data").read_bytes() != before["m.onnx.data"]
    # issue 13 item 11: `--out x.onnx` never replaces an unrelated x.onnx.data without overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.onnx.data").write_bytes(b"someone else's data")
    with pytest.raises(naf.NeuroAdaUsageError, match="already exists"):
        merge_onnx(path, [(adapter, 1.0)], os.fspath(other / "x.onnx"))
    assert os.listdir(other) == ["x.onnx.data"] and (other / "x.onnx.data").read_bytes() == b"someone else's data"


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """Tied embeddings: the optimiser keeps the table for Gather and a transposed copy for the head."""
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                   max_position_embeddings=32, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tied")
    path = export(LogitsOnly(model), (torch.randint(0, 64, (1, 5)),), folder / "tied.onnx", external_data=False)
    return model, numpy_state(model), path


def test_a_tied_head_is_refused_like_every_other_backend(tied, tmp_path):
    """The head's weight is the embedding table (a Gather reads it, a transposed copy feeds the head): merging
    would change the embeddings, which the adapter was not trained with. The runtime refuses that merge (it
    serves the head additively) and a tied safetensors checkpoint has no head tensor; so does ONNX, leaving no
    output, while the model's other linears still merge."""
    model, state, path = tied
    adapter = make_adapter(state, ["lm_head.weight", "model.layers.0.mlp.up_proj.weight"], k=3)
    for call in (lambda: resolve_targets(path, adapter),
                 lambda: merge_onnx(path, [(adapter, 1.0)], os.fspath(tmp_path / "tied-merged.onnx"))):
        with pytest.raises(naf.NeuroAdaError, match="embedding table") as err:
            call()
        assert err.value.tensor == "lm_head.weight" and err.value.rule == "4.1"
    assert not (tmp_path / "tied-merged.onnx").exists()
    both = make_adapter(state, ["lm_head.weight", "model.embed_tokens.weight"], k=2)
    with pytest.raises(naf.NeuroAdaError, match="embedding table"):
        merge_onnx(path, [(both, 1.0)], os.fspath(tmp_path / "x.onnx"))
    body = make_adapter(state, ["model.layers.0.mlp.up_proj.weight"], k=3)
    out = tmp_path / "body.onnx"
    summary = merge_onnx(path, [(body, 1.0)], os.fspath(out))
    ref = reference_state(state, [(body, 1.0)])
    assert_initializers_match(out, summary, ref)
    ids = np.array([[1, 5, 9, 33, 63]], dtype=np.int64)
    with torch.no_grad():
        want = LogitsOnly(torch_with(model, ref))(torch.from_numpy(ids)).numpy()
    close(run_ort(out, ids), want)



def test_a_tied_head_inside_if_branches_is_refused_too(tied, tmp_path):
    """Optimum's decoder_model_merged.onnx keeps the whole decoder in the two branches of one If, which read the main
    graph's initializers: the Gather that makes the head's weight an embedding table is inside them."""
    model, state, path = tied
    g = onnx.load(os.fspath(path)).graph

    def branch(name):
        return helper.make_graph(copy.deepcopy(list(g.node)), name, [], copy.deepcopy(list(g.output)))

    flag = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    node = helper.make_node("If", ["use_cache_branch"], ["logits_merged"], then_branch=branch("a"),
                            else_branch=branch("b"))
    graph = helper.make_graph([node], "merged", [*g.input, flag],
                              [helper.make_tensor_value_info("logits_merged", TensorProto.FLOAT, None)],
                              list(g.initializer))
    merged = tmp_path / "decoder_model_merged.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=list(onnx.load(os.fspath(path)).opset_import)),
                    os.fspath(merged))
    adapter = make_adapter(state, ["lm_head.weight", "model.layers.0.mlp.up_proj.weight"], k=3)
    with pytest.raises(naf.NeuroAdaError, match="embedding table") as err:
        merge_onnx(merged, [(adapter, 1.0)], os.fspath(tmp_path / "out.onnx"))
    assert err.value.tensor == "lm_head.weight" and not (tmp_path / "out.onnx").exists()
    body = make_adapter(state, ["model.layers.0.mlp.up_proj.weight"], k=3)  # the other linears still merge
    merge_onnx(merged, [(body, 1.0)], os.fspath(tmp_path / "body.onnx"))


# -- hand-built graphs -----------------------------------------------------------------------------
def graph_model(path, weights: dict, nodes, inputs=("x",), external=None, dtype=TensorProto.FLOAT):
    """A MatMul-chain model; weights {name: array}; external: {name: location} stores those outside."""
    inits = []
    folder = os.path.dirname(path)
    for name, arr in weights.items():
        t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        if external and name in external:
            loc = external[name]
            raw = t.raw_data
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            full = os.path.join(folder, loc) if not os.path.isabs(loc) else loc
            if os.path.isfile(full):
                offset = os.path.getsize(full)
                with open(full, "ab") as f:
                    f.write(raw)
            else:
                offset = 0
                if not os.path.lexists(full):
                    with open(full, "wb") as f:
                        f.write(raw)
            for k, v in (("location", loc), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
        inits.append(t)
    d_in = next(iter(weights.values())).shape[0]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(i, dtype, ["n", d_in]) for i in inputs],
        [helper.make_tensor_value_info(nodes[-1].output[0], dtype, None)], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    with open(path, "wb") as f:
        f.write(m.SerializeToString())
    return os.fspath(path)


def scoped(node, module):
    p = node.metadata_props.add()
    parts = module.split(".")
    scopes = [""] + [".".join(parts[:i + 1]) for i in range(len(parts))] + ["linear"]
    p.key, p.value = "pkg.torch.onnx.name_scopes", repr(scopes)
    return node


def adapter_for(name, stored, layout, k=2, seed=0):
    rng = np.random.default_rng(seed)
    canon = stored if layout == "out_in" else stored.T
    idx = naf.select_indices(canon, k)
    vals = (rng.standard_normal(idx.shape) * 0.01).astype(BF16)
    return naf.Adapter({name: naf.Target.from_weight(name, stored, idx, vals, layout=layout)})


def test_legacy_node_names_and_probe_fallback(tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 6)).astype(np.float32)          # [in, out] for MatMul
    w2 = rng.standard_normal((6, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "onnx::MatMul_12"], ["h"], name="/model/layers.0/q_proj/MatMul"),
             helper.make_node("MatMul", ["h", "W0"], ["y"], name="mm")]
    path = graph_model(tmp_path / "legacy.onnx", {"onnx::MatMul_12": w1, "W0": w2}, nodes)
    a = adapter_for("model.layers.0.q_proj.weight", w1.T.copy(), "out_in")   # PyTorch [out, in]
    b = adapter_for("encoder.fc.weight", w2.T.copy(), "out_in", seed=1)
    ra = resolve_targets(path, a)["model.layers.0.q_proj.weight"]
    rb = resolve_targets(path, b)["encoder.fc.weight"]
    assert (ra.initializer, ra.layout, ra.how) == ("onnx::MatMul_12", "in_out", "node-name")
    assert (rb.initializer, rb.layout, rb.how) == ("W0", "in_out", "probe")
    out = tmp_path / "out.onnx"
    merge_onnx(path, [(a, 1.0), (b, 1.0)], os.fspath(out))
    w1m = naf.merge_weight(w1.T.copy(), [a.targets["model.layers.0.q_proj.weight"]]).T
    w2m = naf.merge_weight(w2.T.copy(), [b.targets["encoder.fc.weight"]]).T
    x = rng.standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, x), x @ w1m @ w2m, rtol=1e-5, atol=1e-5)


def test_ambiguous_and_missing_targets_refused(tmp_path):
    rng = np.random.default_rng(1)
    wa, wb = (rng.standard_normal((8, 4)).astype(np.float32) for _ in range(2))
    nodes = [scoped(helper.make_node("MatMul", ["x", "a.lin.weight"], ["h"], name="m1"), "a.lin"),
             scoped(helper.make_node("MatMul", ["x", "b.lin.weight"], ["y"], name="m2"), "b.lin")]
    path = graph_model(tmp_path / "amb.onnx", {"a.lin.weight": wa, "b.lin.weight": wb}, nodes)
    amb = adapter_for("lin.weight", wa, "in_out")
    with pytest.raises(naf.NeuroAdaError, match=r"lin\.weight.*ambiguous.*a\.lin\.weight, b\.lin\.weight"):
        merge_onnx(path, [(amb, 1.0)], os.fspath(tmp_path / "o.onnx"))
    ok = adapter_for("b.lin.weight", wb, "in_out")
    assert resolve_targets(path, ok)["b.lin.weight"].how == "name"
    missing = adapter_for("model.other.weight", rng.standard_normal((5, 3)).astype(np.float32), "out_in")
    with pytest.raises(naf.NeuroAdaError, match=r"model\.other\.weight: rule 4\.1: no initializer found"):
        merge_onnx(path, [(missing, 1.0)], os.fspath(tmp_path / "o.onnx"), verify=False)
    # the probe stage refuses two initializers holding the same values
    same = graph_model(tmp_path / "same.onnx", {"p": wa, "q": wa.copy()},
                       [helper.make_node("MatMul", ["x", "p"], ["h"]), helper.make_node("MatMul", ["x", "q"], ["y"])])
    with pytest.raises(naf.NeuroAdaError, match="ambiguous: 2 initializers match the adapter's probe"):
        resolve_targets(same, adapter_for("enc.fc.weight", wa, "in_out"))
    view = open_onnx_base(path, amb)
    assert "lin.weight" in view.unresolved
    report = naf.validate(amb, base=view)
    assert [p["rule"] for p in report.errors] == ["4.1"]
    assert os.listdir(tmp_path) == ["amb.onnx", "same.onnx"]


@pytest.mark.parametrize("location", ["../evil.data", "/ABS", "link.data", "fifo.data", "folder.data"])
def test_hostile_external_locations_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    outside = tmp_path / "evil.data"
    w = np.ones((4, 3), np.float32)
    outside.write_bytes(w.tobytes())
    if location == "/ABS":
        location = os.fspath(outside)
    if location == "link.data":
        os.symlink(outside, folder / "link.data")
    if location == "fifo.data":
        os.mkfifo(folder / location)
    if location == "folder.data":
        (folder / location).mkdir()
    path = os.fspath(folder / "m.onnx")
    nodes = [scoped(helper.make_node("MatMul", ["x", "fc.weight"], ["y"]), "fc")]
    inits = [numpy_helper.from_array(w, "fc.weight")]
    t = inits[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    with open(path, "wb") as f:
        f.write(helper.make_model(graph).SerializeToString())
    adapter = adapter_for("fc.weight", w, "in_out")
    if location in ("fifo.data", "folder.data"):  # a usage error (exit 2), as for every other special file
        with deadline(), pytest.raises(naf.NeuroAdaUsageError, match=r"rule 1\.6: .*not a regular file but a "
                                                                     r"(FIFO|directory)"):
            merge_onnx(path, [(adapter, 1.0)], os.fspath(tmp_path / "out.onnx"))
    else:
        with pytest.raises(naf.NeuroAdaError, match=r"rule 1\.6: external data location .* (absolute|'\.\.'|symbolic)"):
            merge_onnx(path, [(adapter, 1.0)], os.fspath(tmp_path / "out.onnx"))
    assert not (tmp_path / "out.onnx").exists()


def test_quantized_models_refused(tmp_path):
    rng = np.random.default_rng(2)
    q = rng.integers(-100, 100, (8, 4)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["model.q.weight", "scale"], ["wq"]),
             scoped(helper.make_node("MatMul", ["x", "wq"], ["y"]), "model.q")]
    path = graph_model(tmp_path / "dq.onnx", {"model.q.weight": q, "scale": np.float32(0.01)}, nodes)
    adapter = adapter_for("model.q.weight", q.astype(np.float32), "in_out")
    with pytest.raises(naf.NeuroAdaError, match="INT8 .*quantized"):
        merge_onnx(path, [(adapter, 1.0)], os.fspath(tmp_path / "o.onnx"))
    nbits = helper.make_node("MatMulNBits", ["x", "model.layers.0.q_proj.weight_Q4", "scales"], ["y"],
                             domain="com.microsoft", name="/model/layers.0/q_proj/MatMulNBits", K=8, N=4, bits=4,
                             block_size=32)
    # (K = 8 pads one block of 32, as ONNX Runtime's quantizer writes it; two blocks per row are not that layout)
    path = graph_model(tmp_path / "nbits.onnx", {"model.layers.0.q_proj.weight_Q4": np.zeros((4, 2, 16), np.uint8),
                                                 "scales": np.ones(8, np.float32)}, [nbits])
    adapter = adapter_for("model.layers.0.q_proj.weight", rng.standard_normal((4, 8)).astype(np.float32), "out_in")
    with pytest.raises(naf.NeuroAdaError,
                       match=r"rule 4.2: MatMulNBits node .*has shape \[4, 2, 16\], expected \[4, 1, 16\]"):
        merge_onnx(path, [(adapter, 1.0)], os.fspath(tmp_path / "o.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["dq.onnx", "nbits.onnx"]


def test_external_data_several_files_and_bf16(tmp_path):
    """Hand-written external data: two data files, BF16 bit patterns, tensors at non-zero offsets."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((8, 6)).astype(BF16)
    w2 = rng.standard_normal((6, 4)).astype(BF16)
    nodes = [scoped(helper.make_node("MatMul", ["x", "val_1"], ["h"]), "m.enc.fc1"),
             scoped(helper.make_node("MatMul", ["h", "val_2"], ["y"]), "m.enc.fc2")]
    pad = rng.standard_normal((3, 5)).astype(BF16)
    path = graph_model(tmp_path / "x.onnx", {"pad": pad, "val_1": w1, "val_2": w2}, nodes,
                       external={"pad": "a.bin", "val_1": "a.bin", "val_2": "b.bin"}, dtype=TensorProto.BFLOAT16)
    a = adapter_for("enc.fc1.weight", w1.T.copy(), "out_in")
    b = adapter_for("enc.fc2.weight", w2.T.copy(), "out_in")
    merged = naf.Adapter({**a.targets, **b.targets})
    outdir = tmp_path / "out"
    outdir.mkdir()
    summary = merge_onnx(path, [(merged, 0.75)], os.fspath(outdir / "y.onnx"))
    assert sorted(os.listdir(outdir)) == ["y.onnx", "y.onnx.0.data", "y.onnx.1.data"]
    ref = {"enc.fc1.weight": naf.merge_weight(w1.T.copy(), [(a.targets["enc.fc1.weight"], 0.75)]),
           "enc.fc2.weight": naf.merge_weight(w2.T.copy(), [(b.targets["enc.fc2.weight"], 0.75)])}
    assert_initializers_match(outdir / "y.onnx", summary, ref)
    assert initializer(outdir / "y.onnx", "pad").tobytes() == pad.tobytes()


def test_gemm_transb0_transpose_node_and_external_constant(tmp_path):
    """Gemm(transB=0) stores [in, out], a Transpose node in front of MatMul means [out, in] is stored;
    an external tensor inside a Constant node is carried to the output's data file too."""
    rng = np.random.default_rng(4)
    w_gemm = rng.standard_normal((6, 5)).astype(np.float32)     # [in, out]
    w_tr = rng.standard_normal((3, 5)).astype(np.float32)       # [out, in], transposed in the graph
    const = rng.standard_normal((1, 3)).astype(np.float32)
    folder = tmp_path / "m"
    folder.mkdir()
    ct = numpy_helper.from_array(const, "c")
    raw = ct.raw_data
    ct.ClearField("raw_data")
    ct.data_location = TensorProto.EXTERNAL
    (folder / "w.bin").write_bytes(raw)
    for k, v in (("location", "w.bin"), ("offset", "0"), ("length", str(len(raw)))):
        e = ct.external_data.add()
        e.key, e.value = k, v
    nodes = [helper.make_node("Gemm", ["x", "layers.0.fc.weight"], ["h"], transB=0),
             helper.make_node("Transpose", ["layers.1.fc.weight"], ["wt"], perm=[1, 0]),
             scoped(helper.make_node("MatMul", ["h", "wt"], ["z"]), "m.layers.1.fc"),
             helper.make_node("Constant", [], ["c"], value=ct),
             helper.make_node("Add", ["z", "c"], ["y"])]
    path = graph_model(folder / "g.onnx", {"layers.0.fc.weight": w_gemm, "layers.1.fc.weight": w_tr}, nodes,
                       external={"layers.1.fc.weight": "w.bin"})
    a = adapter_for("layers.0.fc.weight", w_gemm.T.copy(), "out_in")
    b = adapter_for("layers.1.fc.weight", w_tr, "out_in", seed=1)
    res = {**resolve_targets(path, a), **resolve_targets(path, b)}
    assert (res["layers.0.fc.weight"].layout, res["layers.0.fc.weight"].how) == ("in_out", "name")
    assert (res["layers.1.fc.weight"].layout, res["layers.1.fc.weight"].how) == ("out_in", "name")
    out = tmp_path / "o.onnx"
    merge_onnx(path, [(a, 1.0), (b, 3.0)], os.fspath(out))
    assert sorted(os.listdir(tmp_path)) == ["m", "o.onnx", "o.onnx.data"]
    w1 = naf.merge_weight(w_gemm.T.copy(), [a.targets["layers.0.fc.weight"]]).T
    w2 = naf.merge_weight(w_tr, [(b.targets["layers.1.fc.weight"], 3.0)])
    x = rng.standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, x), x @ w1 @ w2.T + const, rtol=1e-5, atol=1e-6)


# -- adapters trained by the runtime (the end-to-end bar) ------------------------------------
@pytest.mark.parametrize("which", ["llama", "bert"])
def test_runtime_trained_adapter_merged_into_onnx_matches_runtime(which, llama, bert, tmp_path):
    """Train deltas with the runtime, save, merge into the exported ONNX: onnxruntime == runtime merge."""
    from neuroada_format.runtime import NeuroAdaConfig, attach, load_adapter, merge, save_adapter

    model, state, path = {"llama": llama, "bert": bert}[which]
    vocab = model.config.vocab_size
    shape = (2, 8) if which == "llama" else (2, 6)   # the exports have static shapes
    student = copy.deepcopy(model)
    attach(student, NeuroAdaConfig(k=3, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(5))
    student.train()
    for _ in range(3):
        out = LogitsOnly(student)(ids)
        loss = out.float().pow(2).mean() if which == "bert" else torch.nn.functional.cross_entropy(
            out.reshape(-1, vocab), ids.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    file = save_adapter(student, tmp_path / "trained.safetensors")
    merged_path = tmp_path / "merged.onnx"
    merge_onnx(path, [(naf.load(file), 1.0)], os.fspath(merged_path))

    served = load_adapter(copy.deepcopy(model), file).eval()   # what users ship: the saved file
    merge(served)
    test_ids = np.random.default_rng(7).integers(0, vocab, shape).astype(np.int64)
    with torch.no_grad():
        want = LogitsOnly(served)(torch.from_numpy(test_ids)).numpy()
        base = LogitsOnly(model)(torch.from_numpy(test_ids)).numpy()
    close(run_ort(merged_path, test_ids), want)
    assert np.abs(want - base).max() > 1e-4 * np.abs(want).max()   # training moved the outputs


def test_duplicate_initializer_names_are_refused(tmp_path, capsys):
    """Issue 13 item 9: onnxruntime computes with the first copy; a merge must not patch the last one."""
    from neuroada_format.converters.merge_cli import run

    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    nodes = [scoped(helper.make_node("MatMul", ["x", "enc.fc.weight"], ["y"], name="m"), "enc.fc")]
    path = graph_model(tmp_path / "dup.onnx", {"enc.fc.weight": w}, nodes)
    model = onnx.load(path)
    copy_ = numpy_helper.from_array(w * 2, "enc.fc.weight")
    model.graph.initializer.append(copy_)
    onnx.save(model, path)
    a = adapter_for("enc.fc.weight", w, "in_out")
    with pytest.raises(naf.NeuroAdaError, match="rule 1.6.*two initializers"):
        merge_onnx(path, [(a, 1.0)], os.fspath(tmp_path / "out.onnx"))
    naf.save(a, tmp_path / "a.safetensors")
    code = run(["--base", path, "--adapter", os.fspath(tmp_path / "a.safetensors"), "--out",
                os.fspath(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "two initializers" in err
    assert not os.path.exists(tmp_path / "out.onnx")


def test_a_folder_where_the_data_file_goes_is_refused_before_any_work(llama, tmp_path):
    """The old output used to be deleted, then the rename of the data file failed (EISDIR) after the merge."""
    _, state, path = llama
    adapter = make_adapter(state, linear_names(state)[:2], k=2, seed=9)
    out = tmp_path / "o.onnx"
    merge_onnx(path, [(adapter, 1.0)], os.fspath(out))
    os.remove(tmp_path / "o.onnx.data")
    (tmp_path / "o.onnx.data").mkdir()
    before = out.read_bytes()
    with pytest.raises(naf.NeuroAdaUsageError, match="companion file .* is a folder"):
        merge_onnx(path, [(adapter, 1.0)], os.fspath(out), overwrite=True)
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["o.onnx", "o.onnx.data"]


def test_external_data_swapped_for_a_fifo_after_the_check_is_refused_not_waited_on(llama, tmp_path):
    from races import fifo_after_check

    _, state, path = llama
    target = _copy_model(path, tmp_path / "work")
    model = OnnxModel(target)
    name = next(n for n in model.external)
    with fifo_after_check(), deadline(), pytest.raises(naf.NeuroAdaUsageError, match="FIFO"):
        model.array(name)


def _external_model(folder, weights: dict, locations: dict) -> str:
    """A MatMul chain whose initializers are external at {name: (location, offset)}; the bytes are written by the
    caller. Returns the model path."""
    inits, nodes, prev = [], [], "x"
    for i, (name, w) in enumerate(weights.items()):
        t = numpy_helper.from_array(w, name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        location, offset = locations[name]
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(w.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        inits.append(t)
        nodes.append(scoped(helper.make_node("MatMul", [prev, name], [f"h{i}"]), name.rsplit(".", 1)[0]))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], initializer=inits)
    path = os.fspath(folder / "m.onnx")
    with open(path, "wb") as f:
        f.write(helper.make_model(graph).SerializeToString())
    return path


def test_initializers_sharing_external_bytes_are_refused(tmp_path):
    """Each merge was worked out from the shared original bytes, then both were written over each other: a wrong
    copy, and an in-place merge that its own journal could not revert."""
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    (tmp_path / "a.data").write_bytes(w.tobytes())
    path = _external_model(tmp_path, {"fc0.weight": w, "fc1.weight": w},
                           {"fc0.weight": ("a.data", 0), "fc1.weight": ("a.data", 0)})
    adapter = adapter_for("fc0.weight", w, "in_out")
    before = (tmp_path / "a.data").read_bytes()
    for kw in ({"out": os.fspath(tmp_path / "out.onnx")}, {"out": None, "in_place": True}):
        with pytest.raises(naf.NeuroAdaError, match="rule 4.2: 'fc0.weight' and 'fc1.weight' share bytes"):
            merge_onnx(path, [(adapter, 1.0)], **kw)
    assert (tmp_path / "a.data").read_bytes() == before and not (tmp_path / "out.onnx").exists()


def test_in_place_refuses_external_data_inside_the_model_file(tmp_path):
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    blob = numpy_helper.from_array(np.frombuffer(w.tobytes(), np.uint8).copy(), "blob")
    path = _external_model(tmp_path, {"fc0.weight": w}, {"fc0.weight": ("m.onnx", 10 ** 11)})
    model = onnx.load(path, load_external_data=False)
    model.graph.initializer.append(blob)
    data = model.SerializeToString()
    offset = data.find(w.tobytes())   # the same length of digits: the offset does not move the bytes
    model.graph.initializer[0].external_data[1].value = str(offset).zfill(12)
    data = model.SerializeToString()
    assert data.find(w.tobytes()) == offset
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(naf.NeuroAdaUsageError, match="lives in the .onnx file itself"):
        merge_onnx(path, [(adapter_for("fc0.weight", w, "in_out"), 1.0)], None, in_place=True)
    assert open(path, "rb").read() == data


def test_revert_names_a_missing_model_file_and_takes_its_new_name(llama, tmp_path):
    _, state, path = llama
    adapter = make_adapter(state, linear_names(state)[:2], k=2, seed=9)
    target = _copy_model(path, tmp_path / "work")
    before = _folder_bytes(tmp_path / "work")
    summary = merge_onnx(target, [(adapter, 1.0)], None, in_place=True, journal=os.fspath(tmp_path / "j.safetensors"))
    renamed = tmp_path / "work" / "renamed.onnx"
    os.rename(target, renamed)
    with pytest.raises(naf.NeuroAdaUsageError, match="no such file") as exc:
        revert(summary.journal)
    assert exc.value.path == target
    revert(summary.journal, base=renamed)
    os.rename(renamed, target)
    assert _folder_bytes(tmp_path / "work") == before


def test_shared_bytes_are_found_past_a_neighbour(tmp_path):
    """Only neighbours in offset order were compared: a long unmerged span reaching past a short one to the merged
    initializer was missed, and the merge changed it."""
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    big = np.zeros(256, np.float32)              # [0, 1024)
    mid = np.zeros(16, np.float32)               # [4, 68)
    (tmp_path / "a.data").write_bytes(np.concatenate([big]).tobytes())
    raw = bytearray((tmp_path / "a.data").read_bytes())
    raw[512:768] = w.tobytes()                   # fc0.weight at [512, 768), inside big
    (tmp_path / "a.data").write_bytes(bytes(raw))
    path = _external_model(tmp_path, {"fc0.weight": w}, {"fc0.weight": ("a.data", 512)})
    model = onnx.load(path, load_external_data=False)
    for name, arr, offset in (("big", big, 0), ("mid", mid, 4)):   # unused initializers, stored in the same file
        t = numpy_helper.from_array(arr, name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", "a.data"), ("offset", str(offset)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        model.graph.initializer.append(t)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    with pytest.raises(naf.NeuroAdaError, match="'big' and 'fc0.weight' share bytes"):
        merge_onnx(path, [(adapter_for("fc0.weight", w, "in_out"), 1.0)], os.fspath(tmp_path / "out.onnx"))
    assert not (tmp_path / "out.onnx").exists()


# -- publishing a model and its data (two renames) --------------------------------------------------
def _two_bases(tmp_path):
    """Two models of one 8x8 weight stored at different offsets of their data files, and an adapter for it."""
    w = np.random.default_rng(5).standard_normal((8, 8)).astype(np.float32)
    paths = []
    for name, pad in (("a", 0), ("b", 16)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "w.data").write_bytes(np.zeros(pad, np.float32).tobytes() + w.tobytes())
        paths.append(_external_model(folder, {"fc0.weight": w}, {"fc0.weight": ("w.data", pad * 4)}))
    return paths, adapter_for("fc0.weight", w, "in_out")


def test_two_overwriting_runs_never_pair_one_model_with_the_others_data(tmp_path, monkeypatch):
    """Audit: run B published its pair between run A's data rename and A's .onnx rename, leaving A's .onnx
    (offset 0) over B's data (weight at offset 64). Now OUT is locked for the whole write: B is refused."""
    from neuroada_format.converters import onnx_merge

    (base_a, base_b), adapter = _two_bases(tmp_path)
    (tmp_path / "ref").mkdir()
    merge_onnx(base_a, [(adapter, 1.0)], os.fspath(tmp_path / "ref" / "m.onnx"))
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    real, refused = durable.publish, []

    def other_run_between_the_renames(tmp, final, **kw):
        real(tmp, final, **kw)
        if final.endswith(".data") and not refused:
            try:
                merge_onnx(base_b, [(adapter, 2.0)], os.fspath(out), overwrite=True)
                refused.append(False)
            except naf.NeuroAdaUsageError as exc:
                refused.append("busy" in str(exc))

    monkeypatch.setattr(durable, "publish", other_run_between_the_renames)
    merge_onnx(base_a, [(adapter, 1.0)], os.fspath(out), overwrite=True)
    assert refused == [True]
    assert sorted(os.listdir(out.parent)) == ["m.onnx", "m.onnx.data"]
    assert digest(out, tmp_path / "out" / "m.onnx.data") == \
        digest(tmp_path / "ref" / "m.onnx", tmp_path / "ref" / "m.onnx.data")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_killed_between_its_renames_does_not_block_the_next(tmp_path, overwrite):
    """Audit: SIGKILL after the data file's rename, before the .onnx's, left m.onnx.data without m.onnx, and the
    rerun was refused ("already exists"). The lock file records the pending files, so the rerun removes them."""
    import signal

    from neuroada_format.converters import onnx_merge

    (base, _), adapter = _two_bases(tmp_path)
    naf.save(adapter, tmp_path / "ad.safetensors")
    (tmp_path / "ref").mkdir()
    merge_onnx(base, [(adapter, 1.0)], os.fspath(tmp_path / "ref" / "m.onnx"))
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    argv = ["--base", base, "--adapter", os.fspath(tmp_path / "ad.safetensors"), "--out", os.fspath(out)]
    if overwrite:  # an older merge that the killed run was replacing
        merge_onnx(base, [(adapter, 3.0)], os.fspath(out))
    pid = os.fork()
    if pid == 0:  # the child dies right after its data rename
        try:
            real = durable.publish

            def die_after_data(tmp, final, **kw):
                real(tmp, final, **kw)
                if final.endswith(".data"):
                    os.kill(os.getpid(), signal.SIGKILL)

            durable.publish = die_after_data
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            merge_run(argv + (["--overwrite"] if overwrite else []))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not out.exists() and (out.parent / "m.onnx.data").exists()
    assert merge_run(argv) == 0
    assert sorted(os.listdir(out.parent)) == ["m.onnx", "m.onnx.data"]
    assert digest(out, out.parent / "m.onnx.data") == digest(tmp_path / "ref" / "m.onnx", tmp_path / "ref" / "m.onnx.data")
    # a data file nobody recorded is still the user's: refused without --overwrite, as before
    os.remove(out)
    with pytest.raises(naf.NeuroAdaUsageError, match="already exists"):
        merge_onnx(base, [(adapter, 1.0)], os.fspath(out))


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_failing_between_its_renames_cleans_up_itself(tmp_path, monkeypatch, overwrite):
    """A failure (not a kill) between the data file's rename and the .onnx's (a full disk, EACCES, Ctrl-C) left
    OUT.onnx.data and the hidden lock file for a rerun to the same OUT to remove: a pipeline writing many outputs
    collected two files per failure. The failing run removes what it published; a user's own file stays."""
    from neuroada_format.converters import onnx_merge

    (base, _), adapter = _two_bases(tmp_path)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    (out.parent / "mine.txt").write_text("kept")
    if overwrite:
        merge_onnx(base, [(adapter, 3.0)], os.fspath(out))
    real = durable.publish

    def fail_after_data(tmp, final, **kw):
        real(tmp, final, **kw)
        if final.endswith(".data"):
            raise OSError(28, "No space left on device", final)

    monkeypatch.setattr(durable, "publish", fail_after_data)
    with pytest.raises(OSError):
        merge_onnx(base, [(adapter, 1.0)], os.fspath(out), overwrite=overwrite)
    assert sorted(os.listdir(out.parent)) == ["mine.txt"]  # no data file, no lock file, no temporaries
    monkeypatch.undo()
    merge_onnx(base, [(adapter, 1.0)], os.fspath(out))
    assert sorted(os.listdir(out.parent)) == ["m.onnx", "m.onnx.data", "mine.txt"]


def test_no_verify_skips_only_the_probe_hashes(tmp_path, capsys):
    """Audit: with --no-verify the ONNX backend skipped rule 4.2 as well, so a BF16 adapter was merged into an F32
    initializer (exit 0). As for safetensors, names, shapes and dtypes are always checked; --no-verify skips only
    the probe hashes (rule 4.3)."""
    w = np.random.default_rng(6).standard_normal((8, 8)).astype(np.float32)
    (tmp_path / "w.data").write_bytes(w.tobytes())
    path = _external_model(tmp_path, {"fc0.weight": w}, {"fc0.weight": ("w.data", 0)})
    naf.save(adapter_for("fc0.weight", w.astype(BF16), "in_out"), tmp_path / "bf16.safetensors")
    naf.save(adapter_for("fc0.weight", w + np.float32(0.5), "in_out"), tmp_path / "other.safetensors")
    out = os.fspath(tmp_path / "o.onnx")
    for extra in ([], ["--no-verify"]):
        assert merge_run(["--base", path, "--adapter", os.fspath(tmp_path / "bf16.safetensors"), "--out", out,
                          *extra]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "rule 4.2" in err and "F32[8, 8]" in err and "BF16[8, 8]" in err, err
        assert not os.path.exists(out)
    other = ["--base", path, "--adapter", os.fspath(tmp_path / "other.safetensors"), "--out", out]
    assert merge_run(other) == 1 and "rule 4.3" in capsys.readouterr().err
    assert merge_run(other + ["--no-verify"]) == 0 and os.path.exists(out)


def test_a_data_file_another_writer_put_in_place_is_never_taken_for_a_killed_runs(tmp_path, monkeypatch):
    """The lock file's record names the data files by inode: a file someone else created under that name while a
    run was failing (its rename refused: 'already exists') is theirs, and the next run refuses it, not removes it."""
    from neuroada_format.converters import onnx_merge

    (base, _), adapter = _two_bases(tmp_path)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    real = durable.publish

    def someone_else_first(tmp, final, **kw):
        if final.endswith(".data"):
            with open(final, "wb") as f:
                f.write(b"someone else's data")
        real(tmp, final, **kw)

    monkeypatch.setattr(durable, "publish", someone_else_first)
    with pytest.raises(naf.NeuroAdaUsageError, match="already exists"):
        merge_onnx(base, [(adapter, 1.0)], os.fspath(out))
    monkeypatch.setattr(durable, "publish", real)
    with pytest.raises(naf.NeuroAdaUsageError, match="already exists"):
        merge_onnx(base, [(adapter, 1.0)], os.fspath(out))
    assert (out.parent / "m.onnx.data").read_bytes() == b"someone else's data" and not out.exists()
    merge_onnx(base, [(adapter, 1.0)], os.fspath(out), overwrite=True)
    assert sorted(os.listdir(out.parent)) == ["m.onnx", "m.onnx.data"]


def test_a_data_file_name_too_long_is_refused_before_anything_is_written(tmp_path):
    """OUT may have a legal name whose external data file `<OUT>.data` does not fit in a path component (255 bytes).
    That was found only by the last rename, after the data was copied and patched, and the run left its output lock
    (with its publish record) behind. It is now refused by the overwrite rule, before the lock is kept or anything
    is written: the folder holds nothing new."""
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "onnx::MatMul_12"], ["y"], name="/model/layers.0/q_proj/MatMul")]
    path = graph_model(tmp_path / "m.onnx", {"onnx::MatMul_12": w}, nodes, external={"onnx::MatMul_12": "m.onnx.data"})
    naf.save(adapter_for("model.layers.0.q_proj.weight", w.T.copy(), "out_in"), tmp_path / "a.safetensors")
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / ("x" * 250 + ".onnx")  # 255 bytes: legal; its .data is not
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "neuroada-merge"), "--base", path, "--adapter",
                        os.fspath(tmp_path / "a.safetensors"), "--out", os.fspath(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert sorted(os.listdir(tmp_path)) == before  # no lock, no temporary
    assert r.stderr.startswith(f"error: {out}.data: ") and "more than a file name may have" in r.stderr, r.stderr
    # a name that fits is merged as usual, and leaves no lock either
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "neuroada-merge"), "--base", path, "--adapter",
                        os.fspath(tmp_path / "a.safetensors"), "--out", os.fspath(tmp_path / ("x" * 245 + ".onnx"))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(set(os.listdir(tmp_path)) - set(before)) == ["x" * 245 + ".onnx", "x" * 245 + ".onnx.data"]


def test_a_name_lacking_the_targets_leading_part_needs_the_values_checked(tmp_path):
    """An encoder-only export names its layers 'layers.0.fc1', as a decoder-only one does: a decoder adapter's
    'model.decoder.layers.0.fc1.weight' matched the encoder's weight by name. With --no-verify the decoder's deltas
    went into the encoder, exit 0; verified, the probe error blamed the base's revision. Now such a match needs the
    values checked, and the probe error says what was matched how."""
    from onnx import TensorProto, helper, numpy_helper

    from neuroada_format import NeuroAdaError, NeuroAdaUsageError
    from neuroada_format.converters.backend import merge

    rng = np.random.default_rng(3)
    encoder_w, decoder_w = (rng.standard_normal((8, 16)).astype(np.float32) for _ in range(2))  # [d_out, d_in]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "layers.0.fc1.weight"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(np.ascontiguousarray(encoder_w.T), "layers.0.fc1.weight")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "enc.onnx")
    key = "model.decoder.layers.0.fc1.weight"
    for made_on, name in ((decoder_w, "decoder"), (encoder_w, "same")):
        idx = naf.select_indices(made_on, 2)
        naf.save(naf.Adapter({key: naf.Target.from_weight(key, made_on, idx, np.full(idx.shape, 0.1, np.float32))}),
                 tmp_path / f"{name}.safetensors")
    with pytest.raises(NeuroAdaUsageError, match=r"without 'model\.decoder\.'.*merge without --no-verify"):
        merge(tmp_path / "enc.onnx", [(tmp_path / "decoder.safetensors", 1.0)], tmp_path / "o1.onnx", verify=False)
    with pytest.raises(NeuroAdaError, match=r"rule 4\.3: .*found by a name without 'model\.decoder\.'.*encoder-only"):
        merge(tmp_path / "enc.onnx", [(tmp_path / "decoder.safetensors", 1.0)], tmp_path / "o2.onnx")
    assert sorted(os.listdir(tmp_path)) == ["decoder.safetensors", "enc.onnx", "same.safetensors"]
    s = merge(tmp_path / "enc.onnx", [(tmp_path / "same.safetensors", 1.0)], tmp_path / "o3.onnx")  # values agree
    assert s.details["resolutions"][key]["dropped_prefix"] == "model.decoder."
