"""neuroada-merge into a whole ONNX export folder, laid out as Hugging Face Optimum exports encoder-decoder models
(encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx beside config and tokenizer files).

Tiny T5 and BART models are built from configs, given an adapter over every encoder and decoder linear by the
runtime, and exported with the TorchScript exporter (what Optimum uses): the encoder as the bare stack (its names
lack the leading `encoder.`, so they are the decoder's names too), the decoders through wrappers. The merged
folder is run in onnxruntime and compared with the runtime's merge_and_unload.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format.converters import onnx_folder_merge  # noqa: E402
from neuroada_format.converters.backend import base_format, merge  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402
from neuroada_format.runtime import NeuroAdaConfig, attach, merge_and_unload, save_adapter  # noqa: E402

from test_onnx_hostile_initializers import tree  # noqa: E402  (every file of a folder with its digest)

BATCH, SRC, TGT, PAST = 2, 5, 3, 4   # static shapes: the exports are traced at these
NAMES = {  # each file's input names (the exporter drops those a graph does not use)
    "encoder_model.onnx": lambda n: ["input_ids", "attention_mask"],
    "decoder_model.onnx": lambda n: ["input_ids", "encoder_hidden_states", "encoder_attention_mask"],
    "decoder_with_past_model.onnx": lambda n: ["input_ids", "encoder_hidden_states", "encoder_attention_mask",
                                               *(f"past_{i}" for i in range(n))],
}


class Decoder(torch.nn.Module):
    """decoder_model.onnx: decoder ids + encoder states -> logits (no cache)."""

    def __init__(self, model):
        super().__init__()
        self.decoder = model.get_decoder()
        self.lm_head = model.lm_head
        self.bias = getattr(model, "final_logits_bias", None)

    def logits(self, hidden):
        out = self.lm_head(hidden)
        return out if self.bias is None else out + self.bias

    def forward(self, ids, hidden, mask):
        out = self.decoder(input_ids=ids, encoder_hidden_states=hidden, encoder_attention_mask=mask, use_cache=False)
        return self.logits(out.last_hidden_state)


class DecoderWithPast(Decoder):
    """decoder_with_past_model.onnx: one new token, the self-attention cache and the cross-attention keys and values
    as inputs (as in Optimum, the cross-attention k/v projections are then not in the graph)."""

    def forward(self, ids, hidden, mask, *past):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        layers = len(past) // 4
        cache = EncoderDecoderCache(DynamicCache([(past[4 * i], past[4 * i + 1]) for i in range(layers)]),
                                    DynamicCache([(past[4 * i + 2], past[4 * i + 3]) for i in range(layers)]))
        for i in range(layers):
            cache.is_updated[i] = True
        out = self.decoder(input_ids=ids, encoder_hidden_states=hidden, encoder_attention_mask=mask,
                           past_key_values=cache, use_cache=True)
        return self.logits(out.last_hidden_state)


def _inputs(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    heads = cfg.num_attention_heads
    d_kv = cfg.d_kv if hasattr(cfg, "d_kv") else cfg.d_model // heads
    layers = cfg.num_decoder_layers if hasattr(cfg, "num_decoder_layers") else cfg.decoder_layers
    ids = torch.randint(3, cfg.vocab_size, (BATCH, SRC), generator=g)
    mask = torch.ones(BATCH, SRC, dtype=torch.long)
    dids = torch.randint(3, cfg.vocab_size, (BATCH, TGT), generator=g)
    one = torch.randint(3, cfg.vocab_size, (BATCH, 1), generator=g)
    past = []
    for _ in range(layers):
        past += [torch.randn(BATCH, heads, PAST, d_kv, generator=g) for _ in range(2)]
        past += [torch.randn(BATCH, heads, SRC, d_kv, generator=g) for _ in range(2)]
    return ids, mask, dids, one, past


def _export(module, args, path, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(args), os.fspath(path), dynamo=False, input_names=names)


def _export_encoder(encoder, args, path, names):
    """The encoder stack itself as the exported module, as Optimum exports model.get_encoder(): its node names
    (/block.0/layer.0/SelfAttention/q/MatMul) lack the leading "encoder.", so they are the decoder's names too.
    Its class is swapped for the export only, for a forward that returns a plain tensor."""
    stack = type(encoder)

    class Plain(stack):
        def forward(self, input_ids, attention_mask):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    encoder.__class__ = Plain
    try:
        _export(encoder, args, path, names)
    finally:
        encoder.__class__ = stack


def _run_all(folder, model, cfg, seed=7):
    """Every model of an export folder in onnxruntime, and the same computations in PyTorch with `model`."""
    ids, mask, dids, one, past = _inputs(cfg, seed)
    with torch.no_grad():
        hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        want = {"encoder_model.onnx": hidden.numpy(),
                "decoder_model.onnx": Decoder(model)(dids, hidden, mask).numpy(),
                "decoder_with_past_model.onnx": DecoderWithPast(model)(one, hidden, mask, *past).numpy()}
    args = {"encoder_model.onnx": (ids, mask), "decoder_model.onnx": (dids, hidden, mask),
            "decoder_with_past_model.onnx": (one, hidden, mask, *past)}
    got = {}
    for name, names in NAMES.items():
        sess = ort.InferenceSession(os.fspath(folder / name), providers=["CPUExecutionProvider"])
        feeds = dict(zip(names(len(past)), (a.numpy() for a in args[name])))
        got[name] = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
    return got, want


def _build(kind, folder):
    torch.manual_seed(0)
    if kind == "t5":
        cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                    num_heads=4, decoder_start_token_id=0)
        model = transformers.T5ForConditionalGeneration(cfg).eval()
    else:
        cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, max_position_embeddings=32)
        model = transformers.BartForConditionalGeneration(cfg).eval()
    folder.mkdir()
    ids, mask, dids, one, past = _inputs(cfg, 1)
    with torch.no_grad():
        hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    for name, module, args in (("encoder_model.onnx", model.get_encoder(), (ids, mask)),
                               ("decoder_model.onnx", Decoder(model), (dids, hidden, mask)),
                               ("decoder_with_past_model.onnx", DecoderWithPast(model), (one, hidden, mask, *past))):
        (_export if isinstance(module, Decoder) else _export_encoder)(module, args, folder / name,
                                                                      NAMES[name](len(past)))
    cfg.to_json_file(folder / "config.json")
    (folder / "generation_config.json").write_text(json.dumps({"decoder_start_token_id": 0}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}))

    student = copy.deepcopy(model)
    attach(student, NeuroAdaConfig(k=3, target_modules="all-linear", save_dtype="F32"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:   # the deltas: nonzero, ~ the weights' scale / 10
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapter = save_adapter(student, folder.parent / f"{kind}-adapter.safetensors")
    merged = merge_and_unload(student).eval()
    return model, merged, cfg, folder, adapter


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {kind: _build(kind, root / kind) for kind in ("t5", "bart")}


def _cli(capsys, *args):
    code = merge_run([os.fspath(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_an_export_folder_is_merged_whole_and_matches_merge_and_unload(exports, kind, tmp_path, capsys):
    base, merged, cfg, folder, adapter = exports[kind]
    before = tree(folder)
    assert base_format(folder) == "onnx-folder"
    code, out, err = _cli(capsys, "--base", folder, "--adapter", adapter, "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["format"] == "onnx-folder" and summary["targets"] == len(naf.load(adapter).targets)
    assert tree(folder) == before                                    # the input is only read
    after = tree(tmp_path / "merged")
    assert sorted(after) == sorted(before)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert after[name] == before[name]                                   # carried as they are
    assert sorted(os.listdir(tmp_path)) == ["merged"]                        # no temporary sibling left

    where = summary["details"]["targets"]
    encoder = [t for t in where if t.startswith(("encoder.", "model.encoder."))]
    decoder = [t for t in where if t.startswith(("decoder.", "model.decoder."))]
    assert encoder and decoder and len(encoder) + len(decoder) == len(where)
    assert all(where[t] == ["encoder_model.onnx"] for t in encoder)
    cross_kv = [t for t in decoder if any(p in t for p in ("EncDecAttention.k.", "EncDecAttention.v.",
                                                           "encoder_attn.k_proj", "encoder_attn.v_proj"))]
    assert cross_kv and all(where[t] == ["decoder_model.onnx"] for t in cross_kv)  # not in the with-past graph
    assert all(where[t] == ["decoder_model.onnx", "decoder_with_past_model.onnx"] for t in decoder
               if t not in cross_kv)                                         # merged into both decoder files

    got, want = _run_all(tmp_path / "merged", merged, cfg)
    base_out, _ = _run_all(folder, base, cfg)
    for name in want:
        scale = float(np.abs(want[name]).max())
        assert float(np.abs(got[name] - want[name]).max()) <= 2e-6 * scale, name
        assert float(np.abs(base_out[name] - want[name]).max()) > 1e-3 * scale, name  # the merge moved it


def _make_unrelated(path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), os.fspath(path))


def test_an_unrelated_model_in_the_folder_is_copied_unchanged(exports, tmp_path, capsys):
    _, _, _, folder, adapter = exports["t5"]
    work = tmp_path / "export"
    shutil.copytree(folder, work)
    _make_unrelated(work / "postprocess.onnx")
    code, out, err = _cli(capsys, "--base", work, "--adapter", adapter, "--out", tmp_path / "o", "--json")
    assert code == 0, err
    assert json.loads(out)["details"]["models"]["postprocess.onnx"]["initializers"] == 0
    assert (tmp_path / "o" / "postprocess.onnx").read_bytes() == (work / "postprocess.onnx").read_bytes()


def test_a_target_in_no_model_is_refused_naming_it_and_nothing_is_written(exports, tmp_path, capsys):
    _, _, _, folder, adapter = exports["bart"]
    work = tmp_path / "encoder-only"
    shutil.copytree(folder, work)
    os.remove(work / "decoder_model.onnx")
    os.remove(work / "decoder_with_past_model.onnx")
    before = tree(work)
    code, out, err = _cli(capsys, "--base", work, "--adapter", adapter, "--out", tmp_path / "o")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "rule 4.1" in err and "model.decoder." in err and "found in none of the folder's 1 ONNX models" in err
    assert os.fspath(work) in err
    assert not (tmp_path / "o").exists() and tree(work) == before
    assert sorted(os.listdir(tmp_path)) == ["encoder-only"]


def test_a_decoder_from_another_base_is_refused_by_its_probe_hashes(exports, tmp_path, capsys):
    """The decoder files of another model (same shapes, other values) hold the targets' full names: rule 4.3,
    naming the file, never a silent skip."""
    _, _, _, folder, adapter = exports["t5"]
    work = tmp_path / "mixed"
    shutil.copytree(folder, work)
    # same names and shapes, other values: the T5 decoder file with its weights scaled
    model = onnx.load(os.fspath(work / "decoder_model.onnx"))
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.dims) == 2:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 2, t.name))
    onnx.save_model(model, os.fspath(work / "decoder_model.onnx"))
    code, _, err = _cli(capsys, "--base", work, "--adapter", adapter, "--out", tmp_path / "o")
    assert code == 1 and err.count("\n") == 1, err
    assert "rule 4.3" in err and "decoder_model.onnx" in err
    assert not (tmp_path / "o").exists()


def test_outputs_aliasing_the_input_are_refused(exports, tmp_path, capsys):
    _, _, _, folder, adapter = exports["t5"]
    work = tmp_path / "export"
    shutil.copytree(folder, work)
    before = tree(work)
    for out, words in ((work / "merged", "lies inside the input"), (work, "is the input"),
                       (tmp_path, "would contain the input")):
        code, _, err = _cli(capsys, "--base", work, "--adapter", adapter, "--out", out, "--overwrite")
        assert code == 2 and err.count("\n") == 1 and words in err, (out, err)
    assert tree(work) == before and sorted(os.listdir(tmp_path)) == ["export"]


def test_a_failure_before_publishing_leaves_no_output_and_the_input_intact(exports, tmp_path, monkeypatch):
    _, _, _, folder, adapter = exports["t5"]
    before = tree(folder)
    calls = []

    def failing_publish(tmp, out, **kw):
        calls.append(sorted(os.listdir(tmp)))   # every file was written, merged, under the temporary sibling
        raise OSError(28, "No space left on device", tmp)

    monkeypatch.setattr(onnx_folder_merge, "publish", failing_publish)
    with pytest.raises(OSError, match="No space left"):
        merge(folder, [(adapter, 1.0)], tmp_path / "o")
    assert calls and "decoder_with_past_model.onnx" in calls[0]
    assert os.listdir(tmp_path) == [] and tree(folder) == before


def test_overwrite_replaces_an_earlier_output_and_folder_kinds_are_unambiguous(exports, tmp_path, capsys):
    _, _, _, folder, adapter = exports["t5"]
    out = tmp_path / "o"
    assert _cli(capsys, "--base", folder, "--adapter", adapter, "--out", out)[0] == 0
    first = tree(out)
    code, _, err = _cli(capsys, "--base", folder, "--adapter", adapter, "--out", out)
    assert code == 2 and "--overwrite" in err
    code, _, err = _cli(capsys, "--base", folder, "--adapter", adapter, "--out", out, "--overwrite")
    assert code == 0, err
    assert tree(out) == first

    code, _, err = _cli(capsys, "--base", folder, "--adapter", adapter, "--in-place")
    assert code == 2 and err.count("\n") == 1 and "merged into a copy (--out FOLDER), not in place" in err, err
    code, _, err = _cli(capsys, "--base", folder, "--adapter", adapter, "--out", tmp_path / "nv", "--no-verify")
    assert code == 2 and err.count("\n") == 1 and "merge without --no-verify" in err, err

    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    (mixed / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # never read
    code, _, err = _cli(capsys, "--base", mixed, "--adapter", adapter, "--out", tmp_path / "m2")
    assert code == 2 and err.count("\n") == 1, err
    assert "holds both safetensors weights (model.safetensors) and ONNX models (decoder_model.onnx)" in err
    assert not (tmp_path / "m2").exists() and not (tmp_path / "nv").exists()


def _merged_decoder(decoder_path, out):
    """decoder_model_merged.onnx as Optimum lays it out: one If node on `use_cache_branch` whose two branches read
    the initializers of the main graph (here both branches are the no-cache decoder, enough for the layout: the
    weights live in the main graph and only nodes inside subgraphs use them)."""
    model = onnx.load(os.fspath(decoder_path))
    g = model.graph
    outputs = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in g.output]

    def branch(name):
        return helper.make_graph(copy.deepcopy(list(g.node)), name, [], copy.deepcopy(list(g.output)))

    node = helper.make_node("If", ["use_cache_branch"], [f"{o.name}_merged" for o in g.output],
                            then_branch=branch("with_past"), else_branch=branch("without_past"))
    flag = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    merged = helper.make_graph([node], "merged", [*g.input, flag],
                               [helper.make_tensor_value_info(f"{o.name}_merged", TensorProto.FLOAT, None)
                                for o in outputs], list(g.initializer))
    onnx.save_model(helper.make_model(merged, opset_imports=list(model.opset_import)), os.fspath(out))


def test_a_merged_decoder_whose_branches_share_the_initializers(exports, tmp_path, capsys):
    base, merged, cfg, folder, adapter = exports["t5"]
    work = tmp_path / "export"
    shutil.copytree(folder, work)
    for name in ("decoder_model.onnx", "decoder_with_past_model.onnx"):
        os.remove(work / name)
    _merged_decoder(folder / "decoder_model.onnx", work / "decoder_model_merged.onnx")
    code, out, err = _cli(capsys, "--base", work, "--adapter", adapter, "--out", tmp_path / "o", "--json")
    assert code == 0, err
    where = json.loads(out)["details"]["targets"]
    assert sorted({m for models in where.values() for m in models}) == ["decoder_model_merged.onnx",
                                                                         "encoder_model.onnx"]
    ids, mask, dids, _, _ = _inputs(cfg, 7)
    with torch.no_grad():
        hidden = merged.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        want = Decoder(merged)(dids, hidden, mask).numpy()
    sess = ort.InferenceSession(os.fspath(tmp_path / "o" / "decoder_model_merged.onnx"),
                                providers=["CPUExecutionProvider"])
    feeds = {"input_ids": dids.numpy(), "encoder_hidden_states": hidden.numpy(),
             "encoder_attention_mask": mask.numpy()}
    for flag in (True, False):
        got = sess.run(None, {**{i.name: feeds[i.name] for i in sess.get_inputs() if i.name in feeds},
                              "use_cache_branch": np.array([flag])})[0]
        assert float(np.abs(got - want).max()) <= 2e-6 * float(np.abs(want).max())


def test_a_target_found_twice_inside_one_model_is_refused_naming_the_file(tmp_path, capsys):
    """Two initializers with the target's values, and nothing else to tell them apart: ambiguous (rule 4.1), an
    error naming the model and the target, never a pick."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 6)).astype(np.float32)   # [d_out, d_in]; MatMul stores [in, out]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["x", "b"],
                                                                                             ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 8]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(np.ascontiguousarray(w.T), n) for n in ("a", "b")])
    folder = tmp_path / "export"
    folder.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                    os.fspath(folder / "decoder_model.onnx"))
    _make_unrelated(folder / "encoder_model.onnx")
    key = "model.decoder.layers.0.fc1.weight"
    idx = naf.select_indices(w, 2)
    naf.save(naf.Adapter({key: naf.Target.from_weight(key, w, idx, np.full(idx.shape, 0.1, np.float32))}),
             tmp_path / "a.safetensors")
    code, _, err = _cli(capsys, "--base", folder, "--adapter", tmp_path / "a.safetensors", "--out", tmp_path / "o")
    assert code == 1 and err.count("\n") == 1, err
    assert f"{folder / 'decoder_model.onnx'}: {key}: rule 4.1: ambiguous: 2 initializers match" in err
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "export"]


def test_models_with_external_data_are_patched_in_the_copy_only(exports, tmp_path, capsys):
    """Large exports keep their weights in data files beside the .onnx (decoder_model.onnx_data): the copy's data
    file is merged, the .onnx copied as it is, the input's data file untouched."""
    _, merged, cfg, folder, adapter = exports["bart"]
    work = tmp_path / "export"
    shutil.copytree(folder, work)
    for name in ("decoder_model.onnx", "encoder_model.onnx"):
        model = onnx.load(os.fspath(work / name))
        onnx.save_model(model, os.fspath(work / name), save_as_external_data=True, location=f"{name}_data",
                        size_threshold=0)
    before = tree(work)
    code, out, err = _cli(capsys, "--base", work, "--adapter", adapter, "--out", tmp_path / "o")
    assert code == 0, err
    after = tree(tmp_path / "o")
    assert sorted(after) == sorted(before) and tree(work) == before
    for name in ("decoder_model.onnx", "encoder_model.onnx"):
        assert after[name] == before[name] and after[f"{name}_data"] != before[f"{name}_data"]
    got, want = _run_all(tmp_path / "o", merged, cfg)
    for name in want:
        assert float(np.abs(got[name] - want[name]).max()) <= 2e-6 * float(np.abs(want[name]).max()), name


def _external(name, array, location, dims):
    t = numpy_helper.from_array(np.zeros(0, np.float32), name)
    t.ClearField("raw_data")
    t.dims[:] = dims
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(array.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


@pytest.mark.parametrize("table", ["float", "int32 without a length"])
def test_a_data_file_another_model_reads_differently_is_refused(tmp_path, capsys, table):
    """Two models of the folder read one data file: merging the weight in the one would change the other's tensor
    (which holds no target), so the merge is refused before anything is written. Also when the other model's tensor
    is an INT32 table whose external data gives no `length` (it is optional: the dims say how much is read)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 6)).astype(np.float32)   # [d_out, d_in]; MatMul reads it as [in, out]
    folder = tmp_path / "export"
    folder.mkdir()
    np.ascontiguousarray(w.T).tofile(folder / "shared.data")
    a = helper.make_graph([helper.make_node("MatMul", ["x", "fc1.weight"], ["y"])], "a",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                          [_external("fc1.weight", w, "shared.data", [6, 8])])
    other = _external("c", w, "shared.data", [48])
    kind = TensorProto.FLOAT
    if table != "float":
        other.data_type = kind = TensorProto.INT32
        del other.external_data[2]   # ("length", ...)
    b = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "b",
                          [helper.make_tensor_value_info("x", kind, [48])],
                          [helper.make_tensor_value_info("y", kind, [48])], [other])
    for name, g in (("decoder_model.onnx", a), ("other.onnx", b)):
        onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), os.fspath(folder / name))
    idx = naf.select_indices(w, 2)
    naf.save(naf.Adapter({"fc1.weight": naf.Target.from_weight("fc1.weight", w, idx,
                                                                np.full(idx.shape, 0.1, np.float32))}),
             tmp_path / "a.safetensors")
    code, _, err = _cli(capsys, "--base", folder, "--adapter", tmp_path / "a.safetensors", "--out", tmp_path / "o")
    assert code == 1 and err.count("\n") == 1, err
    assert "other.onnx reads bytes of 'shared.data'" in err and "rule 4.2" in err
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "export"]


def test_a_merge_killed_mid_way_leaves_no_output_and_the_next_one_cleans_up(exports, tmp_path):
    """SIGKILL while the copy is being written (the test-only slowdown makes each write step sleep): no OUT, the
    input as it was, and the next merge to OUT removes the dead run's temporary sibling."""
    import signal
    import subprocess
    import sys
    import time

    from neuroada_format.converters.backend import SLOWDOWN_ENV

    _, _, _, folder, adapter = exports["t5"]
    before = tree(folder)
    out = tmp_path / "o"
    argv = [sys.executable, "-c", "from neuroada_format.converters.merge_cli import main; main()",
            "--base", os.fspath(folder), "--adapter", os.fspath(adapter), "--out", os.fspath(out)]
    child = subprocess.Popen(argv, env={**os.environ, SLOWDOWN_ENV: "0.5"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not any(n.startswith("o.tmp-") for n in os.listdir(tmp_path)):   # the copy has begun
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = os.listdir(tmp_path)
    assert not out.exists() and len(left) == 1 and left[0].startswith("o.tmp-")
    assert tree(folder) == before
    assert merge_run([*argv[3:]]) == 0
    assert os.listdir(tmp_path) == ["o"] and tree(out)["config.json"] == before["config.json"]


def _single_matmul(path, name, w_in_out):
    """A model of one MatMul whose weight `name` is stored [in, out]."""
    i, o = w_in_out.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", name], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, i])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, o])],
                              [numpy_helper.from_array(w_in_out, name)])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), os.fspath(path))


def test_a_shorter_name_of_another_shape_in_another_model_is_another_part(tmp_path, capsys):
    """The encoder (exported alone: `layers.0.fc1.weight`) and the decoder have layers of one name and other
    sizes: the encoder's is another part's layer, as one whose values differ would be, not a rule-4.2 error that
    stops the merge of the decoder."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "export"
    folder.mkdir()
    _single_matmul(folder / "encoder_model.onnx", "layers.0.fc1.weight", rng.standard_normal((6, 8), np.float32))
    w = rng.standard_normal((10, 12)).astype(np.float32)   # [d_out, d_in]
    key = "model.decoder.layers.0.fc1.weight"
    _single_matmul(folder / "decoder_model.onnx", key, np.ascontiguousarray(w.T))
    idx = naf.select_indices(w, 2)
    naf.save(naf.Adapter({key: naf.Target.from_weight(key, w, idx, np.full(idx.shape, 0.1, np.float32))}),
             tmp_path / "a.safetensors")
    before = tree(folder)
    code, out, err = _cli(capsys, "--base", folder, "--adapter", tmp_path / "a.safetensors", "--out", tmp_path / "o",
                          "--json")
    assert code == 0, err
    assert json.loads(out)["details"]["targets"] == {key: ["decoder_model.onnx"]}
    assert (tmp_path / "o" / "encoder_model.onnx").read_bytes() == (folder / "encoder_model.onnx").read_bytes()
    got = numpy_helper.to_array(onnx.load(os.fspath(tmp_path / "o" / "decoder_model.onnx")).graph.initializer[0])
    want = w.copy()
    np.put_along_axis(want, idx, want[np.arange(10)[:, None], idx] + np.float32(0.1), axis=1)
    assert np.array_equal(got, want.T) and tree(folder) == before

    os.remove(folder / "decoder_model.onnx")   # ... and where no model holds it, the error says what was seen
    code, _, err = _cli(capsys, "--base", folder, "--adapter", tmp_path / "a.safetensors", "--out", tmp_path / "o2")
    assert code == 1 and err.count("\n") == 1 and "rule 4.1" in err and "encoder_model.onnx has a weight" in err, err


def test_a_model_below_the_top_of_the_folder_is_refused_not_copied_unmerged(exports, tmp_path, capsys):
    """Only the models at the folder's top are merged; one in a subfolder (an `onnx/` copy of the export, a variant)
    would come out as the base's, inside an output said to be merged: refused, naming it, before anything is
    written (the subfolder can be merged on its own)."""
    _, _, _, folder, adapter = exports["t5"]
    work = tmp_path / "export"
    shutil.copytree(folder, work)
    (work / "onnx").mkdir()
    shutil.copy(work / "decoder_model.onnx", work / "onnx" / "decoder_model.onnx")
    before = tree(work)
    code, _, err = _cli(capsys, "--base", work, "--adapter", adapter, "--out", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert os.fspath(work) in err and os.path.join("onnx", "decoder_model.onnx") in err and "unmerged" in err
    assert tree(work) == before and sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.parametrize("transpose", [False, True])
def test_a_merged_decoder_whose_branches_read_a_square_weight_by_its_name(tmp_path, capsys, transpose):
    """decoder_model_merged.onnx with its weights under their checkpoint names and only the If branches reading them:
    a square weight fits both orientations, so the one the branches' MatMul reads it in (as stored [in, out], or
    through a Transpose from [out, in]) decides, as it does for a graph without branches; guessed, the stored
    [in, out] weight was refused as another base's (rule 4.3). The merged model computes the merged weight."""
    rng = np.random.default_rng(4)
    key = "model.decoder.layers.0.self_attn.q_proj.weight"
    w = rng.standard_normal((8, 8)).astype(np.float32)   # [d_out, d_in]

    def branch(name):
        nodes = [helper.make_node("MatMul", ["x", f"{name}_wt" if transpose else key], [f"y_{name}"])]
        if transpose:
            nodes.insert(0, helper.make_node("Transpose", [key], [f"{name}_wt"], perm=[1, 0]))
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT,
                                                                                 [1, 8])])

    graph = helper.make_graph([helper.make_node("If", ["use_cache_branch"], ["y"], then_branch=branch("with_past"),
                                                else_branch=branch("without_past"))], "merged",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                               helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(np.ascontiguousarray(w if transpose else w.T), key)])
    folder = tmp_path / "export"
    folder.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                    os.fspath(folder / "decoder_model_merged.onnx"))
    idx = naf.select_indices(w, 2)
    naf.save(naf.Adapter({key: naf.Target.from_weight(key, w, idx, np.full(idx.shape, 0.5, np.float32))}),
             tmp_path / "a.safetensors")
    code, _, err = _cli(capsys, "--base", folder, "--adapter", tmp_path / "a.safetensors", "--out", tmp_path / "o")
    assert code == 0, err
    want = w.copy()
    np.put_along_axis(want, idx, np.take_along_axis(want, idx, axis=1) + np.float32(0.5), axis=1)
    x = rng.standard_normal((1, 8)).astype(np.float32)
    sess = ort.InferenceSession(os.fspath(tmp_path / "o" / "decoder_model_merged.onnx"),
                                providers=["CPUExecutionProvider"])
    for flag in (True, False):
        got = sess.run(None, {"x": x, "use_cache_branch": np.array([flag])})[0]
        np.testing.assert_allclose(got, x @ want.T, rtol=1e-5, atol=1e-5)
