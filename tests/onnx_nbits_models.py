"""The tiny Llama of the MatMulNBits tests (tests/converters/test_onnx_nbits.py, tests/runtime/test_onnx_grid.py):
exported by the dynamo exporter, quantized in-process by onnxruntime's MatMulNBitsQuantizer, decoded by the operator's
documented formula, run in onnxruntime. Import `llama_fixture` and `quantized_fixture` (`hqq_fixture`: HQQ's float zero
points) into a test module to use the fixtures `llama` and `quantized` (`hqq`)."""
from __future__ import annotations

import copy
import logging
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import matmul_nbits_quantizer as nbq

import neuroada_format as naf
from neuroada_format.converters.onnx_resolve import resolve_targets
from tiny_hf import tiny_llama

LLAMA = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64, "tie_word_embeddings": False}
# hidden 80 and intermediate 176: K = 80 and 176 fill no whole number of 32-, 64- or 128-value blocks, so ONNX Runtime's
# quantizer pads each weight's last block (as for SmolLM2's hidden size 576 in blocks of 128)
PADDED = {**LLAMA, "hidden_size": 80, "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 2}
PADDED_VARIANTS = [(4, 32, True), (4, 64, False), (8, 128, False)]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = [(4, 32, True), (4, 32, False), (4, 128, True), (4, 128, False), (8, 32, True), (8, 128, False)]
HQQ_VARIANTS = [(4, 32, False), (4, 128, False)]  # (HQQ writes zero points always; onnxruntime runs 4-bit ones only)


# -- helpers ---------------------------------------------------------------------------------------
def quantize(model_proto, bits, block, symmetric, exclude=(), hqq=False):
    """ONNX Runtime's MatMulNBitsQuantizer: round to nearest (uint8 zero points unless symmetric), or with hqq=True
    its HQQ algorithm (4-bit, float zero points of the scales' type; `symmetric` ignored)."""
    logging.disable(logging.WARNING)
    try:
        config = nbq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits) if hqq else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (HQQ: torch's warning about a read-only numpy array)
            q = nbq.MatMulNBitsQuantizer(copy.deepcopy(model_proto), bits=bits, block_size=block,
                                         is_symmetric=symmetric, nodes_to_exclude=list(exclude), algo_config=config)
            q.process()
        return q.model.model
    finally:
        logging.disable(logging.NOTSET)


def save(proto, path):
    onnx.save(proto, os.fspath(path))
    return os.fspath(path)


def inits(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(os.fspath(path)).graph.initializer}


def nbits_node(proto, b_name):
    return next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.input[1] == b_name)


def decode(tensors, node, padding=False):
    """The [N, K] f32 weight a MatMulNBits node holds, by the operator's documented formula (padding: [N, n_blocks *
    block], a last block's padding past K included, which the operator never reads). Float zero points (HQQ's): as
    onnxruntime's CPU kernel computes them, fl32(fl32(code * scale) - fl32(scale * zero point)) (`ort_weight`)."""
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    bits, block, K, N = a["bits"], a["block_size"], a["K"], a["N"]
    nb = -(-K // block)
    B = tensors[node.input[1]]
    codes = (np.stack([B & 15, B >> 4], -1) if bits == 4 else B).reshape(N, nb, block).astype(np.float32)
    scale = tensors[node.input[2]].reshape(N, nb).astype(np.float32)
    if len(node.input) > 3 and node.input[3] and tensors[node.input[3]].dtype != np.uint8:
        zp = tensors[node.input[3]].reshape(N, nb).astype(np.float32)
        values = (codes * scale[:, :, None] - (scale * zp)[:, :, None]).reshape(N, -1)
        return values if padding else values[:, :K]
    if len(node.input) > 3 and node.input[3]:
        Z = tensors[node.input[3]]
        zp = (np.stack([Z & 15, Z >> 4], -1).reshape(N, -1) if bits == 4 else Z.reshape(N, -1))[:, :nb]
    else:
        zp = np.full((N, nb), 1 << (bits - 1))
    values = ((codes - zp[:, :, None].astype(np.float32)) * scale[:, :, None]).reshape(N, -1)
    return values if padding else values[:, :K]


def ort_weight(tensors, node):
    """The [N, K] weight onnxruntime computes with for a MatMulNBits node: the node run alone (its B, scales and zero
    points) on the K x K identity, in the scales' type. Ground truth for `decode` (each output is one product by 1.0
    plus zeros: exact)."""
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    K, N = a["K"], a["N"]
    scales = tensors[node.input[2]]
    elem = helper.np_dtype_to_tensor_dtype(scales.dtype)
    parts = [i for i in node.input[1:4] if i]
    g = helper.make_graph([helper.make_node("MatMulNBits", ["A", *parts], ["Y"], domain="com.microsoft", **a)], "w",
                          [helper.make_tensor_value_info("A", elem, [K, K])],
                          [helper.make_tensor_value_info("Y", elem, [K, N])],
                          [numpy_helper.from_array(tensors[i], i) for i in parts])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return np.ascontiguousarray(run(proto.SerializeToString(), np.eye(K, dtype=scales.dtype)).T)


def with_weights(float_path, weights, out):
    """The float export with initializers replaced ({name: [K, N] array}): the full-precision model of those values."""
    proto = onnx.load(os.fspath(float_path))
    for t in proto.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weights[t.name]).astype(np.float32), t.name))
    return save(proto, out)


def run(path, ids):
    sess = ort.InferenceSession(path if isinstance(path, bytes) else os.fspath(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: ids})[0]


# -- the model -------------------------------------------------------------------------------------
class LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids):
        return self.m(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module", name="llama")
def llama_fixture(tmp_path_factory):
    """A tiny untied Llama (K = 128 or 256: blocks of 32 and 128 both fit), its dynamo export (external data, val_N
    names) and, per target, the float initializer the existing resolution finds for it."""
    return exported(llama_model(), tmp_path_factory.mktemp("nbits"))


@pytest.fixture(scope="module", name="padded")
def padded_fixture(tmp_path_factory):
    """As `llama`, with PADDED's sizes (K = 80 and 176: ONNX Runtime pads the last block), and per PADDED_VARIANTS
    the quantized model and its decoded weights, as `quantized` has them."""
    out = exported(llama_model(PADDED), tmp_path_factory.mktemp("padded"))
    out["quantized"] = quantized_variants(out, PADDED_VARIANTS)
    return out


def exported(model, folder):
    path = os.fspath(folder / "llama.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(model), (torch.randint(0, 96, (2, 8)),), path, dynamo=True, verbose=False,
                          external_data=True)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    names = [f"model.layers.{i}.{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}"
             f".weight" for i in range(2) for p in PROJ] + ["lm_head.weight"]
    probe = naf.Adapter({n: naf.Target.from_weight(n, state[n], naf.select_indices(state[n], 2),
                                                   np.zeros((state[n].shape[0], 2), np.float32), value_dtype="F32")
                         for n in names}, base_name="tiny")
    where = {n: r.initializer for n, r in resolve_targets(path, probe).items()}
    proto = onnx.load(path)
    head_node = next(n.name for n in proto.graph.node if n.op_type == "MatMul" and where["lm_head.weight"] in n.input)
    ids = np.random.default_rng(1).integers(0, 96, (2, 8))
    return {"path": path, "proto": proto, "state": state, "names": names, "where": where, "head_node": head_node,
            "folder": folder, "ids": ids}


def llama_model(sizes=LLAMA):
    """A fresh copy of the fixture's model (tests/tiny_hf.py's Llama with LLAMA's sizes, or `sizes`), full precision."""
    return tiny_llama(seed=0, **sizes)


@pytest.fixture(scope="module", name="quantized")
def quantized_fixture(llama):
    """Per variant: the quantized model (lm_head kept in float, as such exports often do) and the decoded weights."""
    return quantized_variants(llama, VARIANTS)


@pytest.fixture(scope="module", name="hqq")
def hqq_fixture(llama):
    """As `quantized`, by ONNX Runtime's HQQ quantizer (4-bit, float zero points), per HQQ_VARIANTS."""
    return quantized_variants(llama, HQQ_VARIANTS, hqq=True)


def quantized_variants(llama, variants, hqq=False):
    out = {}
    for bits, block, sym in variants:
        proto = quantize(llama["proto"], bits, block, sym, exclude=[llama["head_node"]], hqq=hqq)
        path = save(proto, llama["folder"] / f"{'hqq' if hqq else 'q'}{bits}_{block}_{'s' if sym else 'a'}.onnx")
        tensors = inits(path)
        decoded = {}
        for n in llama["names"][:-1]:
            node = nbits_node(proto, llama["where"][n] + f"_Q{bits}")
            decoded[n] = decode(tensors, node)
        out[(bits, block, sym)] = (path, proto, decoded)
    return out


def with_scopes(proto, float_proto):
    """A copy of quantized `proto` whose MatMulNBits nodes carry the exporter scope of the MatMul each replaced (which
    ONNX Runtime 1.32's quantizer drops), as a tool that keeps node metadata writes it: found by scope again."""
    float_nodes = {n.input[1]: n for n in float_proto.graph.node if n.op_type == "MatMul"}
    proto = copy.deepcopy(proto)
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":
            src = float_nodes[n.input[1].rpartition("_Q")[0]]
            n.metadata_props.extend(src.metadata_props)
    return proto


def retention(l_v, l_rt, l_base) -> float:
    return 1.0 - float(np.linalg.norm(l_v - l_rt) / np.linalg.norm(l_rt - l_base))
