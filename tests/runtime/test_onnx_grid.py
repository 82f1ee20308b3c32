"""Training through an ONNX Runtime MatMulNBits model's grid (runtime/quant_grid.py): the adapter merges into the
4- or 8-bit file exactly.

The tiny Llama of tests/converters/test_onnx_nbits.py (tests/onnx_nbits_models.py: dynamo export, onnxruntime's
MatMulNBitsQuantizer, lm_head kept in float), as the quantizer writes it (no scopes: weights placed by the float values
they round from) and with the exporter scopes put back on the MatMulNBits nodes, which ONNX Runtime 1.32's quantizer
drops (placed by scope): `load_quantized_weights` copies the de-quantized weights into a fresh model, NeuroAda
is attached, `train_on_grid` registers each block's grid, a few AdamW steps train it, `save_pretrained` writes the
adapter and `neuroada-merge --base int4.onnx` merges it. The merged file must decode to the runtime's merged weights
(every touched block packed on its own scale and zero point) and onnxruntime's logits on it must be the runtime's.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")
nbq = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
ort = pytest.importorskip("onnxruntime")
from onnxruntime.quantization.calibrate import CalibrationDataReader  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format import NeuroAdaError, NeuroAdaUsageError  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402
from neuroada_format.runtime import (  # noqa: E402
    NeuroAdaConfig,
    attach,
    grid_types,
    load_quantized_weights,
    merge,
    to_adapter,
    train_on_grid,
    unmerge,
)
from neuroada_format.runtime.guards import CONFIGS_ATTR, layers # noqa: E402
from neuroada_format.runtime.quant_grid import QuantGrid  # noqa: E402

from tiny_hf import tiny_llama  # noqa: E402
from onnx_nbits_models import (  # noqa: E402, F401  (tests/onnx_nbits_models.py)
    LLAMA, PADDED, PADDED_VARIANTS, VARIANTS, LogitsOnly, decode, inits, llama_fixture, llama_model, nbits_node,
    padded_fixture, quantize, quantized_fixture, retention, run, save, with_scopes, with_weights)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = {"k": 4, "target_modules": [*PROJECTIONS, "lm_head"]}  # the head: an F32 initializer, plain
VID = {"ids": lambda v: f"{v[0]}bit-b{v[1]}-{'sym' if v[2] else 'asym'}"}


@pytest.fixture(scope="module")
def scoped(llama, quantized):
    """Per variant: the quantized model with its MatMulNBits nodes' exporter scopes put back (found by scope)."""
    return {v: save(with_scopes(proto, llama["proto"]), llama["folder"] / f"scoped{v[0]}_{v[1]}_{v[2]}.onnx")
            for v, (_, proto, _) in quantized.items()}


def batch(seed=0):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def train(model, steps=6, lr=1e-2):
    """AdamW steps; returns the summed |gradient| each adapted layer's deltas got (straight through the grid)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    grads = dict.fromkeys(layers(model), 0.0)
    model.train()
    for s in range(steps):
        model(**batch(s % 2)).loss.backward()
        for n, layer in layers(model).items():
            grads[n] += float(layer.neuroada_val["default"].grad.abs().sum())
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return grads


def loaded(path, **config):
    model = llama_model()
    load_quantized_weights(model, path)
    return attach(model, NeuroAdaConfig(**{**CONFIG, **config}))


def merged_json(base, adapter, out, capsys):
    capsys.readouterr()
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(adapter), "--out", os.fspath(out),
                      "--json"]) == 0
    said = capsys.readouterr()
    return json.loads(said.out)["details"], said.err


def runtime_merged(model):
    """{target key: the runtime's merged canonical weight} (merged in the model, then unmerged)."""
    merge(model)
    try:
        return {n + ".weight": layer.weight.detach().numpy().copy() for n, layer in layers(model).items()}
    finally:
        unmerge(model)


def merged_on_grid(model, base, tmp_path, capsys):
    """Save the model's adapter and merge it into `base` with neuroada-merge: every touched block already on its
    grid (none re-encoded), no warning. Returns (the merge's details, the runtime's merged weights, the merged
    file's initializers, its path)."""
    model.save_pretrained(tmp_path / "out")
    out = tmp_path / "merged.onnx"
    details, err = merged_json(base, tmp_path / "out", out, capsys)
    assert details["blocks_reencoded"] == 0 and details["blocks_on_grid"] > 0 and "warning" not in err
    return details, runtime_merged(model), inits(out), out


def runs_as_the_runtime(model, out, ids):
    """onnxruntime's logits of the merged file `out`, checked to be the runtime's merged model's (1e-4 of the
    largest logit)."""
    with torch.no_grad():
        merge(model)
        logits = model(input_ids=torch.from_numpy(ids)).logits.numpy()
        unmerge(model)
    l_v = run(out, ids)
    assert np.abs(l_v - logits).max() <= 1e-4 * np.abs(logits).max()
    return l_v


def reference(llama, weights, out):
    """The float export holding `weights` ({target: [d_out, d_in]}): onnxruntime's logits of the runtime's merge."""
    return with_weights(llama["path"], {llama["where"][k]: w.T for k, w in weights.items()}, out)


# -- 1: the loop, end to end -----------------------------------------------------------------------
# measured (6 AdamW steps at lr 1e-2, k=4 on the 7 projections and the head; retention as test_onnx_nbits defines
# it): with the grid 1.000 in every variant; the same training without it 4-bit b32 sym 0.63 / asym 0.66, b128 0.36 /
# 0.46, 8-bit b32 sym 0.98, b128 asym 0.97
@pytest.mark.parametrize("source", ["scopes_restored", "names_dropped"])
@pytest.mark.parametrize("variant", VARIANTS, **VID)
def test_trained_on_the_grid_merges_into_the_file_exactly(llama, quantized, scoped, variant, source, tmp_path, capsys):
    """"names_dropped" is the file as ONNX Runtime's quantizer writes a dynamo export (val_N weights, no scopes): each
    weight is placed by the float values it rounds from, where the scoped file's are placed by scope."""
    bits, block, sym = variant
    path, proto, decoded = quantized[variant]
    source_path = scoped[variant] if source == "scopes_restored" else path
    model = llama_model()
    got = load_quantized_weights(model, source_path)
    assert set(got) == set(decoded)                                         # every MatMulNBits weight
    assert got == load_quantized_weights(llama_model(), scoped[variant])    # ... where its scope puts it
    for key, w in decoded.items():                                          # ... bit for bit as decoded
        assert np.array_equal(model.get_submodule(key.removesuffix(".weight")).weight.detach().numpy(), w), key
    attach(model, NeuroAdaConfig(**CONFIG))
    types = train_on_grid(model, source_path)
    assert types == {**dict.fromkeys(decoded, f"MatMulNBits{bits}"), "lm_head.weight": "F32"}
    assert set(grid_types(model)) == {k.removesuffix(".weight") for k in decoded}
    grads = train(model)
    assert all(g > 0 for g in grads.values())                               # gradients reach every layer's deltas
    snapped = {n: layer.delta("default").detach() for n, layer in layers(model).items()}
    assert sum(int((v != 0).sum()) for n, v in snapped.items() if n != "lm_head") > 1000  # levels moved
    for name, layer in layers(model).items():                               # w0 + delta is on the block grid
        if name in grid_types(model):
            grid = layer.neuroada_grid["default"]
            w = layer.neuroada_w0["default"] + snapped[name]
            assert torch.equal(grid.levels(w, layer.neuroada_idx["default"])[1], w), name
    details, want, new, out = merged_on_grid(model, path, tmp_path, capsys)  # the unscoped file: found by probe
    assert details["note"].startswith("MatMulNBits targets exact")
    for key in decoded:                                                     # the file decodes to the runtime merge
        got_w = decode(new, nbits_node(proto, llama["where"][key] + f"_Q{bits}"))
        assert np.array_equal(got_w, want[key]), key
    head = np.ascontiguousarray(new[llama["where"]["lm_head.weight"]].T)
    assert head.tobytes() == want["lm_head.weight"].tobytes()
    ids = llama["ids"]
    l_v = runs_as_the_runtime(model, out, ids)                               # onnxruntime computes the runtime's model
    l_base, l_rt = run(path, ids), run(reference(llama, want, tmp_path / "rt.onnx"), ids)
    r_grid = retention(l_v, l_rt, l_base)

    # the same training without the grid loses part of the adapter in the merge
    plain = loaded(source_path)
    train(plain)
    plain.save_pretrained(tmp_path / "plain")
    merged_json(path, tmp_path / "plain", tmp_path / "plain.onnx", capsys)
    r_plain = retention(run(tmp_path / "plain.onnx", ids),
                        run(reference(llama, runtime_merged(plain), tmp_path / "rt_plain.onnx"), ids), l_base)
    print(f"retention {variant}: grid {r_grid:.4f}, plain {r_plain:.3f}")
    assert r_grid > 0.9999 and r_plain < (0.995 if bits == 8 else 0.9), (r_grid, r_plain)



@pytest.mark.parametrize("variant", PADDED_VARIANTS, **VID)
def test_a_padded_last_block_trains_and_merges_exactly(padded, variant, tmp_path, capsys):
    """K = 80 and 176 in blocks of 32, 64 and 128 (ONNX Runtime pads each row's last block, as for SmolLM2's 576 in
    blocks of 128; such weights were refused): placed by value, trained through the grid, merged exactly, the padding
    past K never trained and every byte of it kept; onnxruntime computes the runtime's merged model."""
    bits, block, sym = variant
    path, proto, decoded = padded["quantized"][variant]
    model = llama_model(PADDED)
    assert set(load_quantized_weights(model, path)) == set(decoded)
    for key, w in decoded.items():
        assert np.array_equal(model.get_submodule(key.removesuffix(".weight")).weight.detach().numpy(), w), key
    attach(model, NeuroAdaConfig(**CONFIG))
    assert set(train_on_grid(model, path).values()) == {f"MatMulNBits{bits}", "F32"}
    train(model)
    last = {}
    for name, layer in layers(model).items():
        K = layer.d_in
        if name != "lm_head" and K % block:
            in_last = layer.neuroada_idx["default"] >= K // block * block
            last[name] = int((layer.delta("default").detach()[in_last] != 0).sum())
    assert sum(last.values()) > 0, last                                  # levels moved in padded last blocks
    _, want, new, out = merged_on_grid(model, path, tmp_path, capsys)
    old = inits(path)
    for key, w in decoded.items():
        node = nbits_node(proto, padded["where"][key] + f"_Q{bits}")
        assert np.array_equal(decode(new, node), want[key]), key
        K = w.shape[1]
        pad_old, pad_new = decode(old, node, padding=True)[:, K:], decode(new, node, padding=True)[:, K:]
        assert pad_old.tobytes() == pad_new.tobytes(), key               # the padding: untouched
    runs_as_the_runtime(model, out, padded["ids"])



def load_refused(model, path, match: str, rule: str) -> None:
    """load_quantized_weights(model, path) refused under `rule`, its message matching `match`, the model unchanged."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NeuroAdaError, match=match) as exc:
        load_quantized_weights(model, path)
    assert exc.value.rule == rule
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def gptq_or_hqq(llama, config):
    """The fixture's float export quantized by MatMulNBitsQuantizer with `config` (GPTQ: a calibration reader of four
    random batches; its writer quantizes the head too and names B `<weight>_Q4G32`)."""
    logging.disable(logging.WARNING)
    try:
        q = nbq.MatMulNBitsQuantizer(copy.deepcopy(llama["proto"]), block_size=32, algo_config=config,
                                     nodes_to_exclude=[llama["head_node"]])
        with contextlib.redirect_stdout(io.StringIO()):  # (GPTQ prints a progress bar)
            q.process()
        return q.model.model
    finally:
        logging.disable(logging.NOTSET)


class Batches(CalibrationDataReader):
    def __init__(self, name):
        rng = np.random.default_rng(0)
        self.batches = iter([{name: rng.integers(0, 96, (2, 8)).astype(np.int64)} for _ in range(4)])

    def get_next(self):
        return next(self.batches, None)


def test_gptq_files_load_by_scope_and_merge_exactly_and_by_value_are_refused(llama, tmp_path, capsys):
    """ONNX Runtime's GPTQ writer names B `<weight>_Q4G32`: such weights were invisible (`the model holds no MatMulNBits
    weight`). Now found; GPTQ moves values off their nearest level, so placing them by value is refused (rule 4.3,
    nothing copied) and with the exporter scopes put back they are placed by scope, trained through and merged exactly."""
    name = ort.InferenceSession(llama["path"], providers=["CPUExecutionProvider"]).get_inputs()[0].name
    proto = gptq_or_hqq(llama, nbq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Batches(name), perchannel=False))
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 15 and all(n.input[1].endswith("_Q4G32") for n in nodes)
    path = save(proto, tmp_path / "gptq.onnx")
    model = llama_model()
    load_refused(model, path, "match no layer.*GPTQ.*metadata_props", "4.3")
    scoped = save(with_scopes(proto, llama["proto"]), tmp_path / "gptq_scoped.onnx")
    placed = load_quantized_weights(model, scoped)
    assert len(placed) == 15 and all(placed[k] == llama["where"][k] for k in llama["names"])
    tensors = inits(scoped)
    for n in nodes:
        key = next(k for k in llama["names"] if llama["where"][k] + "_Q4G32" == n.input[1])
        assert np.array_equal(model.get_submodule(key.removesuffix(".weight")).weight.detach().numpy(),
                              decode(tensors, n)), key
    attach(model, NeuroAdaConfig(**CONFIG))
    assert set(train_on_grid(model, scoped).values()) == {"MatMulNBits4"}
    train(model)
    _, want, new, out = merged_on_grid(model, scoped, tmp_path, capsys)
    for n in nodes:
        key = next(k for k in llama["names"] if llama["where"][k] + "_Q4G32" == n.input[1])
        assert np.array_equal(decode(new, n), want[key]), key
    runs_as_the_runtime(model, out, llama["ids"])


def test_hqq_files_load_by_value_and_scope_train_on_the_grid_and_merge_exactly(llama, tmp_path, capsys):
    """ONNX Runtime's HQQ quantizer stores float zero points (its optimiser moves them off the integers); loading,
    training on and merging into such a file were refused (rule 4.2). Its value fl32(fl32(code * scale) - fl32(scale
    * zero point)) is an affine grid, fl32(scale * code) + m (the one GGUF's Q4_1 trains on), and HQQ rounds each
    weight to its nearest code: placed by value where the quantizer dropped the names, by scope where they are kept,
    trained through the grid, merged exactly (no block re-encoded, every scale and zero point byte kept), and
    onnxruntime computes the runtime's merged model."""
    proto = gptq_or_hqq(llama, nbq.HQQWeightOnlyQuantConfig(block_size=32, bits=4))
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    plain = save(proto, tmp_path / "hqq_plain.onnx")
    tensors = inits(plain)
    zps = tensors[nodes[0].input[3]]
    assert len(nodes) == 14 and zps.dtype == np.float32 and (zps != np.round(zps)).any()
    scoped = save(with_scopes(proto, llama["proto"]), tmp_path / "hqq.onnx")
    by_value, by_scope = llama_model(), llama_model()
    placed = load_quantized_weights(by_value, plain)
    assert placed == load_quantized_weights(by_scope, scoped) and len(placed) == 14
    for n in nodes:
        key = next(k for k in llama["names"] if llama["where"][k] + "_Q4" == n.input[1])
        for model in (by_value, by_scope):
            assert np.array_equal(model.get_submodule(key.removesuffix(".weight")).weight.detach().numpy(),
                                  decode(tensors, n)), key
    attach(by_value, NeuroAdaConfig(**CONFIG))
    assert set(train_on_grid(by_value, plain).values()) == {"MatMulNBits4", "F32"}
    train(by_value)
    details, want, new, out = merged_on_grid(by_value, plain, tmp_path, capsys)
    assert details["note"].startswith("MatMulNBits targets exact")
    changed = 0
    for n in nodes:
        key = next(k for k in llama["names"] if llama["where"][k] + "_Q4" == n.input[1])
        got = decode(new, n)
        assert np.array_equal(got, want[key]), key
        changed += int((got != decode(tensors, n)).sum())
        for i in n.input[2:4]:
            assert new[i].tobytes() == tensors[i].tobytes(), i
    assert changed > 100  # (levels moved)
    runs_as_the_runtime(by_value, out, llama["ids"])


def gemms_as_matmuls(proto):
    """GPT-2's Conv1D layers export as Gemm(x, W [in, out]), which ONNX Runtime's MatMulNBitsQuantizer does not
    quantize (it leaves them F32); as MatMul (then Add for a bias), as other exporters write them, it does. A copy of
    `proto` rewritten so."""
    proto = copy.deepcopy(proto)
    nodes = []
    for n in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type != "Gemm" or attrs.get("transA", 0) or attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0 \
                or (len(n.input) > 2 and attrs.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        bias = len(n.input) > 2 and n.input[2]
        mm = onnx.helper.make_node("MatMul", list(n.input[:2]), [n.output[0] + "_mm" if bias else n.output[0]],
                                   name=n.name + "_mm")
        mm.metadata_props.extend(n.metadata_props)
        nodes.append(mm)
        if bias:
            nodes.append(onnx.helper.make_node("Add", [mm.output[0], n.input[2]], list(n.output), name=n.name + "_add"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def test_a_file_mixing_round_to_nearest_and_hqq_nodes_trains_on_each_grid_and_merges_exactly(llama, tmp_path, capsys):
    """One file, two zero point kinds: layer 0's nodes quantized round to nearest (packed uint8 zero points), the
    others by HQQ (float ones), as a file re-quantized in parts is. Each layer trains on its own node's grid and the
    merge re-encodes no block; onnxruntime computes the runtime's merged model."""
    nodes = [n for n in llama["proto"].graph.node if n.op_type == "MatMul"]
    layer1 = [n.name for n in nodes if not any("layers.0." in p.value for p in n.metadata_props)]
    proto = quantize(quantize(llama["proto"], 4, 32, False, exclude=layer1), 4, 32, False,
                     exclude=[llama["head_node"]], hqq=True)
    path = save(proto, tmp_path / "mixed.onnx")
    tensors = inits(path)
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 14 and {tensors[n.input[3]].dtype for n in nbits} == {np.dtype(np.uint8),
                                                                             np.dtype(np.float32)}
    model = llama_model()
    assert len(load_quantized_weights(model, path)) == 14
    attach(model, NeuroAdaConfig(**CONFIG))
    assert set(train_on_grid(model, path).values()) == {"MatMulNBits4", "F32"}
    train(model)
    _, want, new, out = merged_on_grid(model, path, tmp_path, capsys)
    for n in nbits:
        key = next(k for k in llama["names"] if llama["where"][k] + "_Q4" == n.input[1])
        assert np.array_equal(decode(new, n), want[key]), key
    runs_as_the_runtime(model, out, llama["ids"])


def test_gpt2_conv1d_weights_load_transposed_train_and_merge_exactly(tmp_path, capsys):
    """GPT-2 (Conv1D: weights stored [d_in, d_out], transposed to nn.Linear's) exported by dynamo, its Conv1D Gemms as
    MatMuls, quantized 4-bit by ONNX Runtime: every MatMulNBits weight (the 8 Conv1D ones, by name, and the head, by
    value) is placed in its layer, transposed back for Conv1D; trained through the grid the merge is exact and onnxruntime computes it. Its
    head is tied to the embedding, which the file keeps in float: loading into the tied head is refused (it changed the
    embedding too, so the model computed with quantized embeddings the file does not have), untied it loads."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=96, n_positions=32)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    path = os.fspath(tmp_path / "gpt2.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(gpt2), (torch.randint(0, 96, (2, 8)),), path, dynamo=True, verbose=False,
                          external_data=True)
    proto = quantize(gemms_as_matmuls(onnx.load(path)), 4, 32, False)
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 9
    base = save(proto, tmp_path / "gpt2_q4.onnx")

    def fresh():
        m = transformers.GPT2LMHeadModel(config).eval()
        m.load_state_dict(gpt2.state_dict())
        return m
    tied = fresh()
    before = {k: v.clone() for k, v in tied.state_dict().items()}
    with pytest.raises(NeuroAdaUsageError, match="lm_head.weight is tied to transformer.wte.weight.*untie"):
        load_quantized_weights(tied, base)
    assert all(torch.equal(v, tied.state_dict()[k]) for k, v in before.items())
    model = fresh()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    placed = load_quantized_weights(model, base)
    conv1d = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                    "mlp.c_proj")]
    assert set(placed) == {n + ".weight" for n in [*conv1d, "lm_head"]}
    tensors = inits(base)
    by_b = {n.input[1]: n for n in nodes}
    for key, init in placed.items():
        w = model.get_parameter(key).detach().numpy()
        want = decode(tensors, by_b[init + "_Q4"])
        assert np.array_equal(w.T if key.removesuffix(".weight") in conv1d else w, want), key
    assert torch.equal(model.transformer.wte.weight, gpt2.transformer.wte.weight)  # the embedding: the file's float
    # (the head is left out: its name finds the embedding's float table `lm_head.weight`, which a merge refuses as
    # tied, rule 4.1, while the head's MatMulNBits weight is a transposed copy, val_N)
    attach(model, NeuroAdaConfig(k=4, target_modules=["c_attn", "c_proj", "c_fc"]))
    assert set(train_on_grid(model, base).values()) == {"MatMulNBits4"}
    train(model)
    _, want, new, out = merged_on_grid(model, base, tmp_path, capsys)
    for key in want:  # (the runtime's merged Conv1D weights as stored, [d_in, d_out])
        assert np.array_equal(decode(new, by_b[placed[key] + "_Q4"]), want[key].T), key
    runs_as_the_runtime(model, out, np.random.default_rng(1).integers(0, 96, (2, 8)))


def test_fp16_model_scales(tmp_path, capsys):
    """An f16 export: F16 scales (the grid's values fl32(f16 scale * level), exact in f32). Its head is an F16
    initializer, which no merge takes an adapter of the f32 model's for (rule 4.2: a float initializer's dtype is the
    adapter's base dtype): targeting it is refused before anything changes. The runtime model is f32 holding the f16
    checkpoint's values."""
    half = llama_model().half()
    path = os.fspath(tmp_path / "f16.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(half), (torch.randint(0, 96, (2, 8)),), path, dynamo=True, verbose=False,
                          external_data=True)
    float_proto = onnx.load(path)
    head = next(n for n in float_proto.graph.node if n.op_type == "MatMul"
                and any("lm_head" in p.value for p in n.metadata_props))
    proto = quantize(float_proto, 4, 32, False, exclude=[head.name])
    proto = with_scopes(proto, float_proto)
    base = save(proto, tmp_path / "q4.onnx")
    tensors = inits(base)
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert {tensors[n.input[2]].dtype for n in nodes} == {np.dtype("f2")} and len(nodes) == 14
    model = llama_model().half().float()
    assert len(load_quantized_weights(model, base)) == 14
    with_head = attach(copy.deepcopy(model), NeuroAdaConfig(**CONFIG))
    with pytest.raises(NeuroAdaError, match="is F16.*leave this layer out") as exc:
        train_on_grid(with_head, base)
    assert exc.value.rule == "4.2" and exc.value.tensor == "lm_head.weight" and grid_types(with_head) == {}
    attach(model, NeuroAdaConfig(k=4, target_modules=PROJECTIONS))
    assert set(train_on_grid(model, base).values()) == {"MatMulNBits4"}
    train(model)
    model.save_pretrained(tmp_path / "out")
    out = tmp_path / "merged.onnx"
    details, _ = merged_json(base, tmp_path / "out", out, capsys)
    assert details["blocks_reencoded"] == 0 and details["blocks_on_grid"] > 0
    want = runtime_merged(model)
    new = inits(out)
    for n in nodes:
        key = next(k for k in want if f"'m.{k.removesuffix('.weight')}'" in _scope(n))
        assert np.array_equal(decode(new, n), want[key]), key
    ids = np.random.default_rng(1).integers(0, 96, (2, 8))
    with torch.no_grad():
        merge(model)
        logits = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = run(out, ids).astype(np.float32)
    assert np.abs(got - logits).max() <= 2e-2 * np.abs(logits).max()      # f16 activations in onnxruntime


def _scope(node) -> str:
    return next(p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes")


# -- 2: what a snap may and may not do ---------------------------------------------------------------
def test_a_level_no_f32_delta_reaches_is_not_taken():
    """With an f32 scale, w0 = fl(d * 3) and the level-1 value fl(d) can have no f32 delta with w0 + delta == fl(d):
    their difference needs one bit more than its binade holds, and adding either neighbour rounds to another value.
    Taking that level anyway made the merged value miss the grid (the block re-encoded, not exact); the snap moves
    toward w0's level instead."""
    d = np.float32(np.nextafter(np.float32(0.01), np.float32(1)))
    while True:  # the first scale above 0.01 where level 1 is unreachable from level 3
        w0, v = np.float32(d * np.float32(3)), np.float32(d * np.float32(1))
        if w0 + np.float32(v - w0) != v:
            break
        d = np.nextafter(d, np.float32(1))
    grid = QuantGrid(np.full((1, 1), d), np.zeros((1, 1), np.float32), np.full((1, 1), -8), np.full((1, 1), 7), 32,
                     "MatMulNBits4")
    idx = torch.tensor([[0]])
    w0_t = torch.tensor([[float(w0)]])
    naive = torch.tensor([[float(v - w0)]])
    assert w0_t + naive != torch.tensor([[float(v)]])                       # the nearest level cannot be reached
    delta = grid.snap(torch.tensor([[float(v - w0)]]), idx, w0_t)
    w = w0_t + delta
    assert torch.equal(grid.levels(w, idx)[1], w)                           # on the grid ...
    assert float(w) == float(np.float32(d * np.float32(2)))                 # ... at the next level toward w0 (2)


# -- 3: trainer checkpoints ----------------------------------------------------------------------------
def test_trainer_resumes_as_for_gguf(llama, quantized, scoped, tmp_path):
    """transformers.Trainer unchanged: checkpoints keep the unsnapped deltas; a run resumed from one (model rebuilt,
    weights loaded and the grid registered again) ends where an unbroken one does, and merges exactly."""
    variant = (4, 32, False)
    base = scoped[variant]
    data = [batch(i) for i in range(4)]
    data = [{"input_ids": d["input_ids"][j], "labels": d["labels"][j]} for d in data for j in range(2)]

    def run_trainer(model, out_dir, resume=None):
        args = transformers.TrainingArguments(
            output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
            save_strategy="steps", save_steps=2, logging_strategy="no", use_cpu=True, seed=0, data_seed=0,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    model = loaded(base)
    train_on_grid(model, base)
    trainer = run_trainer(model, tmp_path / "run")
    again = loaded(base)
    train_on_grid(again, base)
    run_trainer(again, tmp_path / "resumed", resume=str(tmp_path / "run" / "checkpoint-2"))
    for (n, a), b in zip(layers(model).items(), layers(again).values()):
        assert torch.equal(a.neuroada_val["default"], b.neuroada_val["default"]), n
    trainer.save_model(str(tmp_path / "final"))
    adapter = naf.load(tmp_path / "final" / "neuroada_model.safetensors")
    for name, layer in layers(model).items():
        np.testing.assert_array_equal(np.asarray(adapter.targets[name + ".weight"].values),
                                      layer.delta("default").detach().numpy())
    path, proto, decoded = quantized[variant]
    out = tmp_path / "merged.onnx"
    assert merge_run(["--base", path, "--adapter", os.fspath(tmp_path / "final"), "--out", os.fspath(out)]) == 0
    want = runtime_merged(model)
    new = inits(out)
    for key in decoded:
        assert np.array_equal(decode(new, nbits_node(proto, llama["where"][key] + "_Q4")), want[key]), key


# -- 4: refusals ---------------------------------------------------------------------------------------
def test_wrong_base_merged_layers_and_non_f32_deltas_are_refused_and_nothing_changes(llama, quantized, scoped,
                                                                                    tmp_path):
    base = scoped[(4, 32, True)]
    model = loaded(base)
    train(model, steps=2)
    before = copy.deepcopy(model)

    def unchanged():
        assert grid_types(model) == {} and getattr(model, CONFIGS_ATTR)["default"].save_dtype == "BF16"
        x = batch()["input_ids"]
        assert torch.equal(model(input_ids=x).logits, before(input_ids=x).logits)

    # 4.3: the model holds the full-precision weights, not the file's (found by scope, values differ)
    fp = attach(llama_model(), NeuroAdaConfig(**CONFIG))
    with pytest.raises(NeuroAdaError, match="not this model's base") as exc:
        train_on_grid(fp, base)
    assert exc.value.rule == "4.3" and exc.value.path == base and "MatMulNBits weight" in str(exc.value)
    # 4.1: another quantization of the model, without scopes: no name says where, and no probe matches
    other = quantized[(8, 32, True)][0]
    with pytest.raises(NeuroAdaError, match="probe hash") as exc:
        train_on_grid(model, other)
    assert exc.value.rule == "4.1"
    unchanged()
    # 4.2: a weight of the target's name and another shape
    wide = transformers.LlamaConfig(**{**llama_model().config.to_dict(), "intermediate_size": 384})
    wider = attach(transformers.LlamaForCausalLM(wide).eval(), NeuroAdaConfig(**CONFIG))
    with pytest.raises(NeuroAdaError) as exc:
        train_on_grid(wider, _named(tmp_path, llama, quantized))
    assert exc.value.rule == "4.2"
    # not a model at all
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(NeuroAdaError, match="not a readable ONNX model"):
        train_on_grid(model, tmp_path / "junk.onnx")
    with pytest.raises(NeuroAdaUsageError):
        train_on_grid(model, tmp_path / "missing.onnx")
    merge(model)
    with pytest.raises(NeuroAdaUsageError, match="merged"):
        train_on_grid(model, base)
    unmerge(model)
    bf = loaded(base, delta_dtype="bfloat16")
    with pytest.raises(NeuroAdaUsageError, match="float32"):
        train_on_grid(bf, base)
    assert grid_types(bf) == {}
    unchanged()


def _named(tmp_path, llama, quantized):
    """The 4-bit b32 file with every MatMulNBits weight renamed to its target's name (found by name)."""
    path, proto, decoded = quantized[(4, 32, True)]
    proto = copy.deepcopy(proto)
    rename = {llama["where"][k] + "_Q4": k + "_Q4" for k in decoded}
    for t in proto.graph.initializer:
        t.name = rename.get(t.name, t.name)
    for n in proto.graph.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
    return save(proto, tmp_path / "named.onnx")


def test_load_quantized_weights_refuses_what_it_cannot_place(llama, quantized, scoped, tmp_path):
    """A dynamo export quantized by onnxruntime keeps neither names nor scopes, and a model holding another checkpoint
    (another seed) has no layer whose float weights its values round from: refused, saying so, nothing copied; so are
    an attached model, a bf16 model and a GGUF file."""
    path = quantized[(4, 32, True)][0]
    model = tiny_llama(seed=1, **LLAMA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NeuroAdaError, match="match no layer of the model by name.*none of the 4 layers of its shape "
                                            "holds float weights it rounds to nearest from.*checkpoint") as exc:
        load_quantized_weights(model, path)
    assert exc.value.rule == "4.3" and exc.value.path == path and exc.value.tensor.startswith("val_")
    bf = llama_model().to(torch.bfloat16)
    with pytest.raises(NeuroAdaUsageError, match="float32"):
        load_quantized_weights(bf, scoped[(4, 32, True)])
    attached = attach(llama_model(), NeuroAdaConfig(k=2))
    with pytest.raises(NeuroAdaUsageError, match="before attach"):
        load_quantized_weights(attached, scoped[(4, 32, True)])
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(NeuroAdaUsageError, match="gguf_file"):
        load_quantized_weights(model, tmp_path / "m.gguf")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # found by name, too (the weights renamed after their targets)
    named = llama_model()
    assert set(load_quantized_weights(named, _named(tmp_path, llama, quantized))) == set(quantized[(4, 32, True)][2])


def test_an_empty_file_is_refused_by_name(tmp_path, capsys):
    """An empty file (a download that failed) parses as an empty protobuf message: load_quantized_weights returned {}
    having copied nothing, train_on_grid and neuroada-merge blamed a target not found in it."""
    empty = tmp_path / "model_int4.onnx"
    empty.write_bytes(b"")
    model = llama_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: load_quantized_weights(model, empty),
                 lambda: train_on_grid(attach(llama_model(), NeuroAdaConfig(**CONFIG)), empty)):
        with pytest.raises(NeuroAdaError, match="not a readable ONNX model: it holds no graph") as exc:
            call()
        assert exc.value.path == os.fspath(empty) and exc.value.rule == "1.1"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    adapter = tmp_path / "a.safetensors"
    naf.save(to_adapter(attach(llama_model(), NeuroAdaConfig(k=1, target_modules=["q_proj"]))), adapter)
    capsys.readouterr()
    assert merge_run(["--base", os.fspath(empty), "--adapter", os.fspath(adapter),
                      "--out", os.fspath(tmp_path / "o.onnx")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no graph" in err and not (tmp_path / "o.onnx").exists()


def test_a_file_without_matmulnbits_weights_is_refused(llama):
    """The float export passed for the quantized one: load_quantized_weights returned {}, the model kept its float
    weights and train_on_grid then took them as the base without a grid."""
    model = llama_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NeuroAdaUsageError, match="holds no MatMulNBits weight") as exc:
        load_quantized_weights(model, llama["path"])
    assert exc.value.path == llama["path"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_tied_head_does_not_hide_why_the_weights_were_not_found(tmp_path):
    """A tied model and a dynamo export quantized by onnxruntime (scopes dropped): the head resolved to the float
    embedding table and was refused as tied, and that refusal was raised, advising to serve an adapter unmerged,
    where no MatMulNBits weight had found its layer for another reason (which this call's own message says)."""
    import onnx

    tied = {**LLAMA, "tie_word_embeddings": True}
    model = tiny_llama(seed=0, **tied)
    path = os.fspath(tmp_path / "tied.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(model), (torch.randint(0, 96, (2, 8)),), path, dynamo=True, verbose=False)
    quantized = save(quantize(onnx.load(path), 4, 32, True), tmp_path / "tied_int4.onnx")
    fresh = tiny_llama(seed=1, **tied)  # (not the exported checkpoint: its values place no weight either)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(NeuroAdaError, match="match no layer of the model") as exc:
        load_quantized_weights(fresh, quantized)
    assert "embedding table" not in str(exc.value)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_a_value_off_its_nearest_level_places_no_weight(llama, quantized):
    """The file's own checkpoint, but one value moved to the next level on its float value's side (as a quantizer
    that compensates errors, GPTQ, moves them): within a step of the float value but not half a step, so that weight
    rounds from no layer and is refused (4.3), not placed on the closest one."""
    key = "model.layers.1.mlp.up_proj.weight"
    path, proto, decoded = quantized[(4, 32, False)]
    proto = copy.deepcopy(proto)
    node = nbits_node(proto, llama["where"][key] + "_Q4")
    b = next(t for t in proto.graph.initializer if t.name == node.input[1])
    codes = onnx.numpy_helper.to_array(b).copy()
    low = int(codes.flat[5] & 15)                                           # row 0, column 10 (block 0: scale > 0)
    up = llama["state"][key][0, 10] > decoded[key][0, 10]
    assert 0 < low < 15
    codes.flat[5] = (codes.flat[5] & 0xF0) | (low + 1 if up else low - 1)
    b.CopyFrom(onnx.numpy_helper.from_array(codes, b.name))
    moved = save(proto, llama["folder"] / "moved.onnx")
    model = llama_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NeuroAdaError, match="1 of the file's 14 MatMulNBits weights.*GPTQ") as exc:
        load_quantized_weights(model, moved)
    assert exc.value.rule == "4.3" and exc.value.tensor == node.input[1].removesuffix("_Q4")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_two_identical_layers_are_refused_as_ambiguous(tmp_path):
    """Layers 0 and 1 with the same up_proj weights: their two MatMulNBits weights each round from both layers, and
    which is which is not guessed (4.1, nothing copied)."""
    import onnx

    model = llama_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.copy_(model.model.layers[0].mlp.up_proj.weight)
    path = os.fspath(tmp_path / "twins.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(model), (torch.randint(0, 96, (2, 8)),), path, dynamo=True, verbose=False)
    quantized = save(quantize(onnx.load(path), 4, 32, True), tmp_path / "twins_int4.onnx")
    fresh = copy.deepcopy(model)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(NeuroAdaError, match="rounds from layers model.layers.0.mlp.up_proj, "
                                            "model.layers.1.mlp.up_proj alike") as exc:
        load_quantized_weights(fresh, quantized)
    assert exc.value.rule == "4.1"
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
