"""Merging into ONNX Runtime MatMulNBits weights (converters/onnx_nbits.py) on real models: a tiny Llama exported by
the dynamo exporter and quantized in-process by onnxruntime's MatMulNBitsQuantizer (round to nearest, symmetric and
asymmetric, 4 and 8 bits, blocks of 32 and 128), run in onnxruntime.

The reference for what a merged file holds is decoded here independently, from ONNX Runtime's contrib operator
documentation: (code - zero_point) * scale, codes low bits first, zero point 2^(bits - 1) when absent.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import warnings

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")
nbq = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402
from neuroada_format.converters.onnx_merge import merge_onnx  # noqa: E402
from neuroada_format.converters.onnx_read import OnnxModel  # noqa: E402

from onnx_nbits_models import (  # noqa: E402, F401  (tests/onnx_nbits_models.py, shared with tests/runtime/test_onnx_grid.py)
    HQQ_VARIANTS, PADDED, PADDED_VARIANTS, VARIANTS, decode, exported, hqq_fixture, inits, llama_fixture, llama_model,
    nbits_node, ort_weight, padded_fixture, quantize, quantized_fixture, retention, run, save, with_scopes, with_weights)


# -- helpers ---------------------------------------------------------------------------------------
def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def adapter_on(weights: dict, k=4, seed=0, rel=0.05, snap=None, last_column=False):
    """An adapter over {target: [d_out, d_in] f32 values} (the de-quantized weights), deltas ~ rel * std; snap:
    {target: (scale [N, n_blocks], zp, bits[, block])} snaps each delta so the merged value lies on its block's grid
    (block: where K is not n_blocks of them); last_column: every row's last delta at the last column (K - 1)."""
    rng = np.random.default_rng(seed)
    targets = {}
    for name, w in weights.items():
        idx = naf.select_indices(w, k)
        if last_column:
            idx = np.where((idx == w.shape[1] - 1).any(1, keepdims=True), idx,
                           np.concatenate([idx[:, :-1], np.full_like(idx[:, :1], w.shape[1] - 1)], 1))
            idx.sort(axis=1)
        vals = (rng.standard_normal(idx.shape) * rel * w.std()).astype(np.float32)
        if snap and name in snap:
            scale, zp, bits, *given = snap[name]
            block = given[0] if given else w.shape[1] // scale.shape[1]
            s = scale[np.arange(w.shape[0])[:, None], idx // block]
            z = zp[np.arange(w.shape[0])[:, None], idx // block]
            base = np.take_along_axis(w, idx, 1)
            lv = np.clip(np.rint((base + vals) / s), -z, (1 << bits) - 1 - z)
            vals = (lv * s - base).astype(np.float32)  # exact: both on the grid
            vals[(base + vals) != lv * s] = 0  # (never happens in practice; keeps the claim exact)
        targets[name] = naf.Target.from_weight(name, w, idx, vals, value_dtype="F32")
    return naf.Adapter(targets, base_name="tiny")


def merged_reference(llama, decoded, adapter, out):
    """The full-precision model of the adapter merged in f32 into the de-quantized weights (rule M)."""
    ws = {llama["where"][n]: naf.merge_weight(w, [(adapter.targets[n], 1.0)]).T for n, w in decoded.items()}
    return with_weights(llama["path"], ws, out)


# -- 1 and 2: what the file holds, and what it keeps ---------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}bit-b{v[1]}-{'sym' if v[2] else 'asym'}")
def test_merged_file_holds_the_encoded_blocks_and_keeps_every_other_byte(llama, quantized, variant, tmp_path):
    bits, block, sym = variant
    path, proto, decoded = quantized[variant]
    adapter = adapter_on(decoded)
    before = digest(path)
    out = os.fspath(tmp_path / "merged.onnx")
    summary = merge_onnx(path, [(adapter, 1.0)], out)
    assert digest(path) == before  # the input is never modified
    assert summary.details["blocks_reencoded"] + summary.details["blocks_on_grid"] > 0
    res = summary.details["resolutions"]
    assert {res[n]["how"] for n in decoded} == {"probe"}  # dynamo names and no scope left: the decoded probe
    assert all(res[n]["matmulnbits"]["bits"] == bits for n in decoded)
    old, new = inits(path), inits(out)
    assert set(old) == set(new)
    ws = {}
    for n, w in decoded.items():
        node = nbits_node(proto, llama["where"][n] + f"_Q{bits}")
        got = decode(new, node)
        ws[llama["where"][n]] = got.T
        # the blocks that hold no touched column keep their bytes; so do their scales and zero points
        N, K = w.shape
        held = np.zeros((N, K // block), bool)
        held[np.arange(N)[:, None], np.asarray(adapter.targets[n].indices) // block] = True
        b_old, b_new = old[node.input[1]].reshape(N, K // block, -1), new[node.input[1]].reshape(N, K // block, -1)
        assert (b_old[~held] == b_new[~held]).all()
        s_old, s_new = old[node.input[2]].reshape(N, -1), new[node.input[2]].reshape(N, -1)
        assert s_new.dtype == s_old.dtype and s_old[~held].tobytes() == s_new[~held].tobytes()
        if not sym:
            z_old, z_new = old[node.input[3]], new[node.input[3]]
            if bits == 4:
                z_old = np.stack([z_old & 15, z_old >> 4], -1).reshape(N, -1)[:, :K // block]
                z_new = np.stack([z_new & 15, z_new >> 4], -1).reshape(N, -1)[:, :K // block]
            assert (z_old.reshape(N, -1)[~held] == z_new.reshape(N, -1)[~held]).all()
        else:
            assert len(node.input) == 3
        assert np.array_equal(got.reshape(N, -1, block)[~held], w.reshape(N, -1, block)[~held])
        # merged values land near their targets: within a step of the block's new grid
        t = adapter.targets[n]
        want = naf.merge_weight(w, [(t, 1.0)])
        step = np.abs(new[node.input[2]].reshape(N, -1).astype(np.float32)).repeat(block, 1)
        assert (np.abs(got - want) <= step * 0.5 + 1e-6).mean() > 0.95
    for name in set(old) - {x for n in decoded for x in nbits_node(proto, llama["where"][n] + f"_Q{bits}").input}:
        assert old[name].tobytes() == new[name].tobytes(), name
    # onnxruntime runs the merged file and computes with exactly those values (the float model of them, to rounding)
    ref = with_weights(llama["path"], ws, tmp_path / "decoded.onnx")
    got, want = run(out, llama["ids"]), run(ref, llama["ids"])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


# -- 3: retention ----------------------------------------------------------------------------------
# measured (random k=4 deltas of about one weight std, seed 0): 4-bit b32 0.627 sym / 0.630 asym, b128 0.335 / 0.413;
# 8-bit b32 sym 0.971, b128 asym 0.961. A 4-bit re-encoding moves a block's untouched values by up to half a step.
FLOORS = {(4, 32): 0.5, (4, 128): 0.25, (8, 32): 0.95, (8, 128): 0.95}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}bit-b{v[1]}-{'sym' if v[2] else 'asym'}")
def test_retention_of_the_adapters_change(llama, quantized, variant, tmp_path):
    """As bench/gguf_retention.py defines it: 1 - ||l_v - l_rt|| / ||l_rt - l_base||, with l_rt the adapter merged in
    f32 into the de-quantized weights, l_v the merged quantized file, l_base the quantized base (all in onnxruntime)."""
    path, _, decoded = quantized[variant]
    adapter = adapter_on(decoded, k=4, rel=1.0)
    out = os.fspath(tmp_path / "merged.onnx")
    merge_onnx(path, [(adapter, 1.0)], out)
    ids = llama["ids"]
    r = retention(run(out, ids), run(merged_reference(llama, decoded, adapter, tmp_path / "rt.onnx"), ids),
                  run(path, ids))
    print(f"retention {variant}: {r:.3f}")
    assert r > FLOORS[variant[:2]], r


def test_deltas_on_the_grid_merge_exactly(llama, quantized, tmp_path):
    """Deltas snapped to each block's grid (training through the quantizer) change codes only: exact."""
    for variant in [(4, 32, False), (8, 128, False), (4, 128, True)]:
        bits, block, sym = variant
        path, proto, decoded = quantized[variant]
        tensors = inits(path)
        snap = {}
        for n, w in decoded.items():
            node = nbits_node(proto, llama["where"][n] + f"_Q{bits}")
            N, K = w.shape
            scale = tensors[node.input[2]].reshape(N, -1).astype(np.float32)
            if sym:
                zp = np.full(scale.shape, 1 << (bits - 1))
            else:
                Z = tensors[node.input[3]]
                zp = (np.stack([Z & 15, Z >> 4], -1).reshape(N, -1) if bits == 4 else Z.reshape(N, -1))[:, :K // block]
            snap[n] = (scale, zp.astype(np.float32), bits)
        adapter = adapter_on(decoded, rel=0.5, snap=snap)
        out = os.fspath(tmp_path / f"m{bits}{block}.onnx")
        summary = merge_onnx(path, [(adapter, 1.0)], out)
        assert summary.details["blocks_reencoded"] == 0 and "exact" in summary.details["note"]
        new = inits(out)
        for n, w in decoded.items():
            got = decode(new, nbits_node(proto, llama["where"][n] + f"_Q{bits}"))
            assert np.array_equal(got, naf.merge_weight(w, [(adapter.targets[n], 1.0)])), n
        old = inits(path)
        for n in decoded:
            node = nbits_node(proto, llama["where"][n] + f"_Q{bits}")
            for i in node.input[2:]:
                assert old[i].tobytes() == new[i].tobytes()  # scales and zero points untouched


# -- 5: a mix of quantized and float targets, fp16 scales ---------------------------------------------
def test_quantized_and_float_targets_in_one_adapter(llama, quantized, tmp_path):
    path, proto, decoded = quantized[(4, 32, False)]
    head = llama["state"]["lm_head.weight"]
    weights = {**{n: decoded[n] for n in list(decoded)[:3]}, "lm_head.weight": head}
    adapter = adapter_on(weights)
    out = os.fspath(tmp_path / "mixed.onnx")
    summary = merge_onnx(path, [(adapter, 1.0)], out)
    res = summary.details["resolutions"]
    assert "matmulnbits" not in res["lm_head.weight"] and res["lm_head.weight"]["how"] == "scope"
    stored = np.array(OnnxModel(out).array(res["lm_head.weight"]["initializer"]))
    assert stored.tobytes() == np.ascontiguousarray(naf.merge_weight(head, [(adapter.targets["lm_head.weight"], 1.0)]).T).tobytes()
    assert summary.details["blocks_on_grid"] + summary.details["blocks_reencoded"] > 0
    run(out, llama["ids"])


def _f16_model(tmp_path):
    """Two f16 linears exported to ONNX (float weights, to be quantized by the test), and an input for them."""
    torch.manual_seed(3)
    seq = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval().half()
    x = torch.randn(2, 5, 128, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(seq, (x,), os.fspath(tmp_path / "f16.onnx"), dynamo=True, external_data=False)
    return onnx.load(os.fspath(tmp_path / "f16.onnx")), x


def test_fp16_model_keeps_fp16_scales(tmp_path):
    float_proto, x = _f16_model(tmp_path)
    for sym in (True, False):
        proto = quantize(float_proto, 4, 32, sym)
        path = save(proto, tmp_path / f"q{sym}.onnx")
        tensors = inits(path)
        nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
        assert all(tensors[n.input[2]].dtype == np.float16 for n in nodes)
        decoded = {f"{i}.weight": decode(tensors, n) for i, n in zip((0, 2), nodes)}
        adapter = adapter_on(decoded, rel=0.3)
        out = os.fspath(tmp_path / f"m{sym}.onnx")
        merge_onnx(path, [(adapter, 1.0)], out)
        new = inits(out)
        for n, name in zip(nodes, decoded):
            assert new[n.input[2]].dtype == np.float16
            got = decode(new, n)
            assert np.abs(got - naf.merge_weight(decoded[name], [(adapter.targets[name], 1.0)])).max() < 0.1
        # onnxruntime computes with the decoded values: a float copy of the graph with them, to fp16 rounding
        ref = copy.deepcopy(float_proto)
        for t in ref.graph.initializer:
            for n, name in zip(nodes, decoded):
                if n.input[1] == t.name + "_Q4":
                    t.CopyFrom(numpy_helper.from_array(decode(new, n).T.astype(np.float16), t.name))
        got, want = run(out, x.numpy()).astype(np.float32), run(ref.SerializeToString(), x.numpy()).astype(np.float32)
        assert np.abs(got - want).max() <= 5e-3 * np.abs(want).max()



# -- a K that fills no whole number of blocks (ONNX Runtime pads the last one) ---------------------------
@pytest.mark.parametrize("variant", PADDED_VARIANTS, ids=lambda v: f"{v[0]}bit-b{v[1]}-{'sym' if v[2] else 'asym'}")
def test_a_padded_last_block_is_merged_and_its_padding_never_holds_a_value(padded, variant, tmp_path):
    """K = 80 and 176 (blocks of 32, 64, 128 as ONNX Runtime's quantizer writes them, the last block padded): these
    were refused (`K must be a positive multiple of block_size`). Now read, merged and run in onnxruntime: the padding
    past K is never a merged value and never weighs in a re-encoding; a re-encoded block writes it as its zero point
    (value 0), a block packed on its grid keeps its bytes."""
    bits, block, sym = variant
    path, proto, decoded = padded["quantized"][variant]
    assert {w.shape[1] % block for w in decoded.values()} - {0}           # the export's weights pad their last block
    adapter = adapter_on(decoded, rel=1.0, last_column=True)  # (every row's last, padded block touched)
    out = os.fspath(tmp_path / "merged.onnx")
    summary = merge_onnx(path, [(adapter, 1.0)], out)
    assert summary.details["blocks_reencoded"] > 0
    old, new = inits(path), inits(out)
    ws = {}
    for n, w in decoded.items():
        node = nbits_node(proto, padded["where"][n] + f"_Q{bits}")
        N, K = w.shape
        nb = -(-K // block)
        got = decode(new, node)
        ws[padded["where"][n]] = got.T
        want = naf.merge_weight(w, [(adapter.targets[n], 1.0)])
        step = np.abs(new[node.input[2]].reshape(N, -1).astype(np.float32)).repeat(block, 1)[:, :K]
        assert (np.abs(got - want) <= step * 0.5 + 1e-6).mean() > 0.95, n
        if K % block == 0:
            continue
        full_old, full_new = decode(old, node, padding=True), decode(new, node, padding=True)
        assert not (full_old[:, K:] == 0).any()  # (ONNX Runtime writes code 0 there: not the value 0)
        pad = slice((K % block) * bits // 8, None)
        kept = (old[node.input[1]].reshape(N, nb, -1)[:, -1, pad] == new[node.input[1]].reshape(N, nb, -1)[:, -1, pad])
        kept = kept.all(axis=1)
        zero = (full_new[:, K:] == 0).all(axis=1)
        assert (kept | zero).all() and (zero & ~kept).any(), n  # every padding kept or, re-encoded, 0 (some are)
        moved = (new[node.input[2]].reshape(N, nb) != old[node.input[2]].reshape(N, nb))[:, -1]
        assert zero[moved].all(), n                              # a block with a new scale: its padding is 0
    ref = with_weights(padded["path"], ws, tmp_path / "decoded.onnx")
    got, want = run(out, padded["ids"]), run(ref, padded["ids"])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("variant", PADDED_VARIANTS, ids=lambda v: f"{v[0]}bit-b{v[1]}-{'sym' if v[2] else 'asym'}")
def test_deltas_on_a_padded_blocks_grid_merge_exactly(padded, variant, tmp_path):
    """Snapped deltas in the last, padded block change its codes only: exact, every padding byte kept."""
    bits, block, sym = variant
    path, proto, decoded = padded["quantized"][variant]
    tensors = inits(path)
    snap = {}
    for n, w in decoded.items():
        node = nbits_node(proto, padded["where"][n] + f"_Q{bits}")
        N, nb = w.shape[0], -(-w.shape[1] // block)
        scale = tensors[node.input[2]].reshape(N, nb).astype(np.float32)
        if sym:
            zp = np.full((N, nb), 1 << (bits - 1))
        else:
            Z = tensors[node.input[3]]
            zp = (np.stack([Z & 15, Z >> 4], -1).reshape(N, -1) if bits == 4 else Z.reshape(N, -1))[:, :nb]
        snap[n] = (scale, zp, bits, block)
    adapter = adapter_on(decoded, rel=1.0, snap=snap, last_column=True)
    out = os.fspath(tmp_path / "merged.onnx")
    summary = merge_onnx(path, [(adapter, 1.0)], out)
    assert summary.details["blocks_reencoded"] == 0
    old, new = inits(path), inits(out)
    for n, w in decoded.items():
        node = nbits_node(proto, padded["where"][n] + f"_Q{bits}")
        assert np.array_equal(decode(new, node), naf.merge_weight(w, [(adapter.targets[n], 1.0)])), n
        full_old, full_new = decode(old, node, padding=True), decode(new, node, padding=True)
        assert full_old[:, w.shape[1]:].tobytes() == full_new[:, w.shape[1]:].tobytes()
        if w.shape[1] % block:  # (the padded last blocks hold moved levels)
            last = slice((w.shape[1] // block) * block, w.shape[1])
            assert (full_old[:, last] != full_new[:, last]).any(), n


# -- 4: refusals -------------------------------------------------------------------------------------
def named_model(tmp_path, bits=4, block=32, sym=False, K=64, N=32, seed=0, name="model.layers.0.q_proj.weight"):
    """MatMul(x, W [K, N]) with W named as the checkpoint's key, quantized: the name stage finds `<name>_Q<bits>`."""
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", name], ["y"], name="/model/layers.0/q_proj/MatMul")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])],
                          [numpy_helper.from_array(W, name)])
    float_proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    proto = quantize(float_proto, bits, block, sym)
    return proto, W


def cli_error(capsys, argv):
    code = merge_run(argv)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    return code, err


def test_names_resolve_and_an_adapter_of_the_float_checkpoint_fails_the_probe(tmp_path, capsys):
    proto, W = named_model(tmp_path)
    path = save(proto, tmp_path / "q.onnx")
    tensors = inits(path)
    decoded = decode(tensors, proto.graph.node[0])
    good = adapter_on({"model.layers.0.q_proj.weight": decoded})
    summary = merge_onnx(path, [(good, 1.0)], os.fspath(tmp_path / "ok.onnx"))
    assert summary.details["resolutions"]["model.layers.0.q_proj.weight"]["how"] == "name"
    # made on the full-precision weights: found by name, refused by the probe hash over the decoded values (4.3)
    fp = adapter_on({"model.layers.0.q_proj.weight": np.ascontiguousarray(W.T)})
    naf.save(fp, os.fspath(tmp_path / "fp.safetensors"))
    code, err = cli_error(capsys, ["--base", path, "--adapter", os.fspath(tmp_path / "fp.safetensors"), "--out",
                                   os.fspath(tmp_path / "o.onnx")])
    assert code == 1 and "rule 4.3" in err and "probe hash" in err
    assert not os.path.exists(tmp_path / "o.onnx")
    # --no-verify merges it (the probe is the only check that reads values)
    assert merge_run(["--base", path, "--adapter", os.fspath(tmp_path / "fp.safetensors"), "--out",
                      os.fspath(tmp_path / "o.onnx"), "--no-verify"]) == 0


@pytest.mark.parametrize("which", ["llama", "padded"])
def test_the_probe_decodes_only_the_values_it_reads(llama, quantized, padded, which, monkeypatch):
    """The probe hash (values_at) runs against every weight of a target's shape, so it decodes each value it reads by
    itself, bit for bit as the operator's formula, never the blocks around it: decoding blocks made a merge into
    SmolLM2's int8 file found by probe hash (210 targets, 60 candidates each) take 56 s against 11 s for the same file
    with its scopes (bench/onnx_retention.py)."""
    from neuroada_format.converters.onnx_nbits import Weight
    fixture = llama if which == "llama" else padded
    variants = quantized if which == "llama" else padded["quantized"]
    monkeypatch.setattr(Weight, "decode", lambda self, ids: pytest.fail("values_at decoded whole blocks"))
    rng = np.random.default_rng(0)
    for (bits, block, sym), (path, proto, decoded) in variants.items():
        model = OnnxModel(path)
        try:
            for n, w in decoded.items():
                idx = rng.integers(0, w.shape[1], (w.shape[0], 5))
                idx[:, -1] = w.shape[1] - 1  # (the last column: in a padded file, the last block's)
                got = model.nbits_weight(fixture["where"][n]).values_at(np.arange(w.shape[0])[:, None], idx)
                want = np.take_along_axis(w, idx, 1)
                assert got.dtype == np.float32 and got.shape == idx.shape, n
                assert got.tobytes() == want.tobytes(), (bits, block, sym, n)
        finally:
            model.close()


def test_scope_metadata_kept_by_a_tool_resolves_the_node(llama, quantized, tmp_path):
    """A quantizer that keeps the MatMul's exporter scope (ORT 1.32's drops it) lets the scope stage find the node."""
    path, proto, decoded = quantized[(4, 32, False)]
    scoped = save(with_scopes(proto, llama["proto"]), tmp_path / "scoped.onnx")
    adapter = adapter_on({n: decoded[n] for n in list(decoded)[:2]})
    summary = merge_onnx(scoped, [(adapter, 1.0)], os.fspath(tmp_path / "o.onnx"))
    assert {r["how"] for r in summary.details["resolutions"].values()} == {"scope"}


def test_unsupported_weights_are_refused_with_one_line(tmp_path, capsys):
    target = "model.layers.0.q_proj.weight"
    cases = {}
    proto, _ = named_model(tmp_path, bits=2)
    cases["2bit"] = (proto, "2-bit codes")
    proto, _ = named_model(tmp_path)
    p = copy.deepcopy(proto)
    p.graph.node[0].input.extend(["g_idx"])
    p.graph.initializer.append(numpy_helper.from_array(np.zeros(64, np.int32), "g_idx"))
    cases["g_idx"] = (p, "g_idx")
    p = copy.deepcopy(proto)
    p.graph.node[0].attribute.append(helper.make_attribute("weight_prepacked", 1))
    cases["attr"] = (p, "weight_prepacked")
    p = copy.deepcopy(proto)  # the weight also feeds another node
    p.graph.node.append(helper.make_node("Identity", [f"{target}_Q4"], ["raw"]))
    p.graph.output.append(helper.make_tensor_value_info("raw", TensorProto.UINT8, None))
    cases["shared"] = (p, "also feeds Identity")
    p = copy.deepcopy(proto)
    p.graph.node[0].input.extend(["", "bias"])
    p.graph.initializer.append(numpy_helper.from_array(np.zeros(7, np.float32), "bias"))
    cases["bias"] = (p, "bias of shape")
    qdq = nbq.MatMulNBitsQuantizer(copy.deepcopy(named_model(tmp_path, sym=True)[0]), bits=4, block_size=32)
    for name, (p, words) in cases.items():
        path = save(p, tmp_path / f"{name}.onnx")
        decoded = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
        a = adapter_on({target: decoded})
        naf.save(a, os.fspath(tmp_path / "a.safetensors"))
        before = digest(path)
        code, err = cli_error(capsys, ["--base", path, "--adapter", os.fspath(tmp_path / "a.safetensors"), "--out",
                                       os.fspath(tmp_path / "o.onnx")])
        assert code == 1 and words in err and "rule 4.2" in err and target in err and path in err, (name, err)
        assert digest(path) == before and not os.path.exists(tmp_path / "o.onnx")
    del qdq


def test_other_quantized_formats_are_still_refused(tmp_path, capsys):
    """The quantizer's QDQ output (DequantizeLinear of an INT4 weight, then MatMul) is not merged into."""
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((64, 32)) * 0.1).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "model.q.weight"], ["y"], name="/model/q/MatMul")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 32])],
                          [numpy_helper.from_array(W, "model.q.weight")])
    float_proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    logging.disable(logging.WARNING)
    q = nbq.MatMulNBitsQuantizer(float_proto, bits=4, block_size=32, is_symmetric=True,
                                 quant_format=nbq.QuantFormat.QDQ)
    q.process()
    logging.disable(logging.NOTSET)
    path = save(q.model.model, tmp_path / "qdq.onnx")
    assert any(n.op_type == "DequantizeLinear" for n in q.model.model.graph.node)
    a = adapter_on({"model.q.weight": np.ascontiguousarray(W.T)})
    naf.save(a, os.fspath(tmp_path / "a.safetensors"))
    code, err = cli_error(capsys, ["--base", path, "--adapter", os.fspath(tmp_path / "a.safetensors"), "--out",
                                   os.fspath(tmp_path / "o.onnx")])
    assert code == 1 and ("quantized" in err or "DequantizeLinear" in err), err


def test_in_place_is_refused_for_matmulnbits(llama, quantized, tmp_path):
    path, _, decoded = quantized[(4, 32, True)]
    adapter = adapter_on({n: decoded[n] for n in list(decoded)[:1]})
    with pytest.raises(naf.NeuroAdaUsageError, match="merge into a copy"):
        merge_onnx(path, [(adapter, 1.0)], None, in_place=True)


# -- hostile and corrupt MatMulNBits bases ---------------------------------------------------------------
WEIGHT = "model.layers.0.q_proj.weight"


def nbits_base(folder, *, bits=4, block=32, K=64, N=32, sym=False, scale_dtype=np.float32, seed=0, edit=None,
               float_zp=False):
    """A hand-built MatMulNBits node (codes, scales and zero points drawn at random, B named `<WEIGHT>_Q<bits>`) and
    its [N, K] decoded weight; edit(proto) may change the model before it is saved. float_zp: zero points as HQQ
    writes them, floats of the scales' type in [0, 2^bits - 1], one per block."""
    rng = np.random.default_rng(seed)
    nb = K // block
    codes = rng.integers(0, 1 << bits, (N, nb, block)).astype(np.uint8)
    B = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else codes
    scales = (rng.random((N, nb)) * 0.02 + 0.005).astype(scale_dtype)
    tensors = [numpy_helper.from_array(B, f"{WEIGHT}_Q{bits}"),
               numpy_helper.from_array(scales.reshape(-1), f"{WEIGHT}_scales")]
    inputs = ["A", f"{WEIGHT}_Q{bits}", f"{WEIGHT}_scales"]
    zp = np.full((N, nb), 1 << (bits - 1))
    if float_zp:
        zpf = (rng.random((N, nb)) * ((1 << bits) - 1)).astype(scale_dtype)
        tensors.append(numpy_helper.from_array(zpf.reshape(-1), f"{WEIGHT}_zero_points"))
        inputs.append(f"{WEIGHT}_zero_points")
        zp = zpf
    elif not sym:
        zp = rng.integers(0, 1 << bits, (N, nb))
        packed = zp if bits == 8 else np.pad(zp, ((0, 0), (0, nb % 2)))
        packed = packed if bits == 8 else packed[:, 0::2] | (packed[:, 1::2] << 4)
        tensors.append(numpy_helper.from_array(packed.astype(np.uint8).reshape(-1), f"{WEIGHT}_zero_points"))
        inputs.append(f"{WEIGHT}_zero_points")
    s32 = scales.astype(np.float32)[:, :, None]
    W = ((codes.astype(np.float32) - zp[:, :, None].astype(np.float32)) * s32 if not float_zp else
         codes.astype(np.float32) * s32 - s32 * zp[:, :, None].astype(np.float32))
    elem = TensorProto.FLOAT16 if scale_dtype == np.float16 else TensorProto.FLOAT
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", name="q_proj", K=K, N=N, bits=bits,
                            block_size=block)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", elem, [3, K])],
                          [helper.make_tensor_value_info("Y", elem, [3, N])], tensors)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    if edit:
        edit(proto)
    return save(proto, os.path.join(folder, "base.onnx")), W.reshape(N, K)


def merge_refused(capsys, folder, path, adapter, *extra):
    """The CLI's one line and exit code for merging `adapter` into `path`; the base is unchanged, nothing written."""
    naf.save(adapter, os.path.join(folder, "a.safetensors"))
    before, out = digest(path), os.path.join(folder, "o.onnx")
    code, err = cli_error(capsys, ["--base", path, "--adapter", os.path.join(folder, "a.safetensors"), "--out", out,
                                   *extra])
    assert "internal error" not in err and digest(path) == before and not os.path.exists(out), err
    return code, err


@pytest.mark.parametrize("scale_dtype, sym, size", [(np.float16, False, 1e6), (np.float16, True, 1e6),
                                                    (np.float16, False, 1e20), ("bfloat16", True, 1e30),
                                                    (np.float32, False, 1e20), (np.float32, True, 1e25)])
def test_merged_values_no_block_can_hold_are_refused(tmp_path, capsys, scale_dtype, sym, size):
    """Values beyond what the scales' type can scale, or so large that the search's binary32 squared errors overflow
    for every grid, were written as blocks of scale 0 (the merged and untouched values all decoding to 0), exit 0."""
    dtype = np.dtype(ml_dtypes.bfloat16) if scale_dtype == "bfloat16" else np.dtype(scale_dtype)
    path, W = nbits_base(tmp_path, sym=sym, scale_dtype=dtype)
    idx = naf.select_indices(W, 4)
    vals = (np.random.default_rng(1).standard_normal(idx.shape) * size).astype(np.float32)
    adapter = naf.Adapter({WEIGHT: naf.Target.from_weight(WEIGHT, W, idx, vals, value_dtype="F32")}, base_name="t")
    code, err = merge_refused(capsys, tmp_path, path, adapter)
    assert code == 1 and "beyond what a 4-bit block" in err and "rule 4.2" in err and WEIGHT in err, err


@pytest.mark.parametrize("q8_first", [False, True])
def test_two_nodes_claiming_one_weight_name_are_refused(tmp_path, capsys, q8_first):
    """`W_Q4` and `W_Q8` both strip to W: the first node in the graph took the name, so which weight an adapter for W
    landed on depended on node order (with --no-verify, an adapter made on the Q4 weight was merged into the Q8 one).
    A target of that name is refused now, whatever the order, naming both."""
    os.makedirs(tmp_path / "q8")
    other, _ = nbits_base(tmp_path / "q8", bits=8, seed=1)

    def add_q8(proto):
        q8 = onnx.load(other)
        for t in q8.graph.initializer:
            t.name = t.name if t.name.endswith("_Q8") else t.name + "_8"
            proto.graph.initializer.append(t)
        node = q8.graph.node[0]
        node.input[2:] = [i + "_8" for i in node.input[2:]]
        node.name, node.output[0] = "q_proj_8", "Y8"
        proto.graph.node.insert(0 if q8_first else 1, node)
        proto.graph.output.append(helper.make_tensor_value_info("Y8", TensorProto.FLOAT, [3, 32]))
    path, W = nbits_base(tmp_path, edit=add_q8)
    idx = naf.select_indices(W, 4)
    vals = (np.random.default_rng(2).standard_normal(idx.shape) * 0.01).astype(np.float32)
    adapter = naf.Adapter({WEIGHT: naf.Target.from_weight(WEIGHT, W, idx, vals, value_dtype="F32")}, base_name="t")
    for extra in ([], ["--no-verify"]):
        code, err = merge_refused(capsys, tmp_path, path, adapter, *extra)
        assert code == 1 and "both name their weight" in err and f"{WEIGHT}_Q8" in err and "rule 4.2" in err, err


@pytest.mark.parametrize("attribute, why", [(helper.make_attribute("K", 64.0), "K is FLOAT, not INT"),
                                            (helper.make_attribute("N", "32"), "N is STRING, not INT"),
                                            (helper.make_attribute("block_size", [32]), "block_size is INTS, not INT"),
                                            (helper.make_attribute("accuracy_level", 4.0), "accuracy_level is FLOAT"),
                                            (helper.make_attribute("bits", 4.0), "bits is FLOAT"),
                                            (helper.make_attribute("K", 128), "K is given 2 times")],
                         ids=["K-float", "N-string", "block_size-ints", "accuracy_level-float", "bits-float", "K-twice"])
def test_attributes_of_another_type_or_given_twice_are_refused(tmp_path, capsys, attribute, why):
    """A FLOAT, STRING or INTS attribute was read as its (unset) integer field, 0: refused as "K=0" or "block_size 0",
    which the file does not say; an attribute given twice was read as its first copy and the merge written (exit 0),
    while onnx.checker and onnxruntime refuse such a node."""
    def edit(proto):
        node = proto.graph.node[0]
        kept = [a for a in node.attribute if a.name != attribute.name or why.endswith("2 times")]
        del node.attribute[:]
        node.attribute.extend([*kept, attribute])
    path, W = nbits_base(tmp_path, edit=edit)
    adapter = naf.Adapter({WEIGHT: naf.Target.from_weight(WEIGHT, W, naf.select_indices(W, 4),
                                                           np.full((32, 4), 0.01, np.float32), value_dtype="F32")},
                          base_name="t")
    code, err = merge_refused(capsys, tmp_path, path, adapter)
    assert code == 1 and why in err and "rule 4.2" in err and WEIGHT in err, err


@pytest.mark.parametrize("scale_dtype, edit_scales, size", [(np.float16, None, 1e5),
                                                            (np.float32, lambda s: np.full_like(s, 1e-42), 0.1)],
                         ids=["f16-large-deltas", "f32-subnormal-scales"])
def test_no_numpy_warnings_reach_the_cli(tmp_path, capsys, scale_dtype, edit_scales, size):
    """Candidate grids whose scale overflows (an F16 scale rounded to Inf) or whose inverse does (a subnormal F32
    scale) are discarded by the search, as meant, but numpy's RuntimeWarnings about them were printed by the CLI as
    `warning: invalid value encountered in multiply` / `overflow encountered in divide` lines."""
    def edit(proto):
        t = proto.graph.initializer[1]
        t.CopyFrom(numpy_helper.from_array(edit_scales(numpy_helper.to_array(t)), t.name))
    path, W = nbits_base(tmp_path, scale_dtype=scale_dtype, edit=edit if edit_scales else None)
    W = decode(inits(path), onnx.load(path).graph.node[0])
    idx = naf.select_indices(W, 4)
    vals = np.full(idx.shape, size, np.float32)
    naf.save(naf.Adapter({WEIGHT: naf.Target.from_weight(WEIGHT, W, idx, vals, value_dtype="F32")}, base_name="t"),
             os.fspath(tmp_path / "a.safetensors"))
    out = os.fspath(tmp_path / "o.onnx")
    assert merge_run(["--base", path, "--adapter", os.fspath(tmp_path / "a.safetensors"), "--out", out]) == 0
    err = capsys.readouterr().err
    assert "encountered" not in err and err.count("warning:") == 1, err
    assert np.isfinite(numpy_helper.to_array(onnx.load(out).graph.initializer[1]).astype(np.float32)).all()


def test_scales_the_node_also_reads_as_its_bias_are_refused(tmp_path, capsys):
    """With one block per row (K = block_size) the scales are N values, the bias's shape: a node whose bias input is its
    own scales tensor passed every check (only other nodes' reads were refused) and the re-encoding rewrote the bias
    with the scales, exit 0."""
    def edit(proto):
        proto.graph.node[0].input.extend(["", f"{WEIGHT}_scales"])
    path, W = nbits_base(tmp_path, K=32, edit=edit)
    idx = naf.select_indices(W, 4)
    adapter = naf.Adapter({WEIGHT: naf.Target.from_weight(WEIGHT, W, idx, np.full(idx.shape, 0.05, np.float32),
                                                           value_dtype="F32")}, base_name="t")
    code, err = merge_refused(capsys, tmp_path, path, adapter)
    assert code == 1 and "also its input 5 (bias)" in err and "rule 4.2" in err and WEIGHT in err, err


# -- float zero points (ONNX Runtime's HQQ quantizer) -------------------------------------------------------
def hqq_snap(tensors, node, block):
    """(scale, minimum, block) per block of an HQQ node as `adapter_on`'s snap wants them: an affine grid, level =
    code, value fl32(code * scale) + m with m = -fl32(scale * zero point)."""
    N = nbits_node_n(node)
    scale = tensors[node.input[2]].reshape(N, -1).astype(np.float32)
    return scale, -(scale * tensors[node.input[3]].reshape(N, -1).astype(np.float32)), block


def nbits_node_n(node):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == "N")


def adapter_on_affine(weights, snap, seed=0, rel=0.5, k=4):
    """An adapter whose merged values are codes' values on each block's affine grid (float zero points): exact."""
    rng = np.random.default_rng(seed)
    targets = {}
    for name, w in weights.items():
        scale, m, block = snap[name]
        idx = naf.select_indices(w, k)
        r = np.arange(w.shape[0])[:, None]
        s, mm = scale[r, idx // block], m[r, idx // block]
        base = np.take_along_axis(w, idx, 1)
        code = np.clip(np.rint((base + rng.standard_normal(idx.shape).astype(np.float32) * rel * w.std() - mm) / s),
                       0, 15)
        vals = (code * s + mm - base).astype(np.float32)
        vals[(base + vals) != code * s + mm] = 0  # (a value no f32 delta reaches from base: left unchanged)
        targets[name] = naf.Target.from_weight(name, w, idx, vals, value_dtype="F32")
    return naf.Adapter(targets, base_name="tiny")


@pytest.mark.parametrize("variant", HQQ_VARIANTS, ids=lambda v: f"hqq-b{v[1]}")
def test_float_zero_points_decode_as_onnxruntime_computes(llama, hqq, variant):
    """HQQ's float zero points were refused (rule 4.2). onnxruntime's CPU kernel decodes them as fl32(fl32(code *
    scale) - fl32(scale * zero point)), not as fl32((code - zero point) * scale) (which differs at 69-74% of
    them): the reader's values are onnxruntime's, bit for bit, for every weight of the file."""
    path, proto, decoded = hqq[variant]
    tensors = inits(path)
    model = OnnxModel(path)
    try:
        for n, w in decoded.items():
            node = nbits_node(proto, llama["where"][n] + "_Q4")
            zp, scales = tensors[node.input[3]], tensors[node.input[2]]
            assert zp.dtype == np.float32 and zp.size == scales.size
            truth = ort_weight(tensors, node)
            assert model.nbits_weight(llama["where"][n]).decode_all().tobytes() == truth.tobytes(), n
            assert w.tobytes() == truth.tobytes(), n  # (the tests' own decoding too)
            assert model.nbits[llama["where"][n]].to_dict()["float_zero_points"] is True
            N, K = w.shape
            B = tensors[node.input[1]]
            codes = np.stack([B & 15, B >> 4], -1).reshape(N, -1, variant[1]).astype(np.float32)
            one_rounding = ((codes - zp.reshape(N, -1, 1)) * scales.reshape(N, -1, 1)).reshape(N, K)
            assert (one_rounding != truth).mean() > 0.5, n  # (the integer form's decoding is not onnxruntime's)
    finally:
        model.close()


@pytest.mark.parametrize("variant", HQQ_VARIANTS, ids=lambda v: f"hqq-b{v[1]}")
def test_float_zero_point_merge_keeps_untouched_bytes_and_runs_in_onnxruntime(llama, hqq, variant, tmp_path):
    """A merge into an HQQ file re-encodes only the touched blocks (scale and float zero point re-fitted together,
    touched values weighted 100 to 1); every other block, scale and zero point keeps its bytes; onnxruntime runs the merged file and
    computes with the values read back, which are close to the float merge (retention of the adapter's change above
    the floor measured)."""
    bits, block, _ = variant
    path, proto, decoded = hqq[variant]
    adapter = adapter_on(decoded, k=4, rel=1.0)
    before = digest(path)
    out = os.fspath(tmp_path / "merged.onnx")
    summary = merge_onnx(path, [(adapter, 1.0)], out)
    assert digest(path) == before and summary.details["blocks_reencoded"] > 0
    assert all(r["matmulnbits"]["float_zero_points"] for r in summary.details["resolutions"].values())
    old, new = inits(path), inits(out)
    ws, moved = {}, 0
    for n, w in decoded.items():
        node = nbits_node(proto, llama["where"][n] + f"_Q{bits}")
        N, K = w.shape
        got = decode(new, node)
        assert got.tobytes() == ort_weight(new, node).tobytes(), n
        ws[llama["where"][n]] = got.T
        held = np.zeros((N, K // block), bool)
        held[np.arange(N)[:, None], np.asarray(adapter.targets[n].indices) // block] = True
        for i in node.input[1:4]:
            o, x = old[i].reshape(N, K // block, -1), new[i].reshape(N, K // block, -1)
            assert o.dtype == x.dtype and o[~held].tobytes() == x[~held].tobytes(), (n, i)
        moved += int((old[node.input[3]] != new[node.input[3]]).sum())
    assert moved > 0  # (zero points re-fitted)
    for name in set(old) - {x for n in decoded for x in nbits_node(proto, llama["where"][n] + "_Q4").input}:
        assert old[name].tobytes() == new[name].tobytes(), name
    ids = llama["ids"]
    got, want = run(out, ids), run(with_weights(llama["path"], ws, tmp_path / "decoded.onnx"), ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    r = retention(got, run(merged_reference(llama, decoded, adapter, tmp_path / "rt.onnx"), ids), run(path, ids))
    print(f"retention hqq b{block}: {r:.3f}")
    assert r > HQQ_FLOORS[block], r


# measured (this test's k=4 deltas of one weight std, seed 0): b32 0.628, b128 0.368 (random deltas: every value
# weighted alike kept 0.698 and 0.488 here, but a trained adapter on SmolLM2 far less, spec 15.4)
HQQ_FLOORS = {32: 0.6, 128: 0.33}


def test_float_zero_point_deltas_on_the_grid_merge_exactly(llama, hqq, tmp_path):
    """Deltas that put each merged value on a code of its block's own grid change codes only: exact, every scale and
    zero point byte kept (what training through the grid gives, tests/runtime/test_onnx_grid.py)."""
    for variant in HQQ_VARIANTS:
        path, proto, decoded = hqq[variant]
        tensors = inits(path)
        snap = {n: hqq_snap(tensors, nbits_node(proto, llama["where"][n] + "_Q4"), variant[1]) for n in decoded}
        adapter = adapter_on_affine(decoded, snap)
        out = os.fspath(tmp_path / f"m{variant[1]}.onnx")
        summary = merge_onnx(path, [(adapter, 1.0)], out)
        assert summary.details["blocks_reencoded"] == 0 and summary.details["blocks_on_grid"] > 0
        new = inits(out)
        changed = 0
        for n, w in decoded.items():
            node = nbits_node(proto, llama["where"][n] + "_Q4")
            want = naf.merge_weight(w, [(adapter.targets[n], 1.0)])
            assert np.array_equal(decode(new, node), want), n
            changed += int((want != w).sum())
            for i in node.input[2:4]:
                assert tensors[i].tobytes() == new[i].tobytes()
        assert changed > 1000


def test_a_padded_float_zero_point_block_is_merged(tmp_path):
    """K = 80 and 176 in blocks of 32 (HQQ pads each row's last block): merged, decoded as onnxruntime computes, run."""
    fixture = exported(llama_model(PADDED), tmp_path)
    proto = quantize(fixture["proto"], 4, 32, False, exclude=[fixture["head_node"]], hqq=True)
    path = save(proto, tmp_path / "hqq.onnx")
    tensors = inits(path)
    decoded = {n: decode(tensors, nbits_node(proto, fixture["where"][n] + "_Q4")) for n in fixture["names"][:-1]}
    adapter = adapter_on(decoded, rel=1.0, last_column=True)
    out = os.fspath(tmp_path / "merged.onnx")
    assert merge_onnx(path, [(adapter, 1.0)], out).details["blocks_reencoded"] > 0
    new, ws = inits(out), {}
    for n, w in decoded.items():
        node = nbits_node(proto, fixture["where"][n] + "_Q4")
        got = decode(new, node)
        assert got.tobytes() == ort_weight(new, node).tobytes(), n
        want = naf.merge_weight(w, [(adapter.targets[n], 1.0)])
        step = np.abs(new[node.input[2]].reshape(w.shape[0], -1).astype(np.float32)).repeat(32, 1)[:, :w.shape[1]]
        assert (np.abs(got - want) <= step + 1e-6).mean() > 0.95, n
        ws[fixture["where"][n]] = got.T
    got, want = run(out, fixture["ids"]), run(with_weights(fixture["path"], ws, tmp_path / "d.onnx"), fixture["ids"])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_f16_float_zero_points(tmp_path):
    """An f16 model's HQQ file: f16 scales and f16 zero points, decoded in f32 as onnxruntime does (its f16 output is
    that value rounded), merged with both kept f16."""
    f16, x = _f16_model(tmp_path)
    proto = quantize(f16, 4, 32, False, hqq=True)
    path = save(proto, tmp_path / "q.onnx")
    tensors = inits(path)
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert all(tensors[n.input[3]].dtype == np.float16 for n in nodes)
    decoded = {f"{i}.weight": decode(tensors, n) for i, n in zip((0, 2), nodes)}
    model = OnnxModel(path)
    try:
        for n, name in zip(nodes, decoded):
            w = model.nbits_weight(n.input[1].removesuffix("_Q4")).decode_all()
            assert w.tobytes() == decoded[name].tobytes()
            assert w.astype(np.float16).tobytes() == ort_weight(tensors, n).tobytes()
    finally:
        model.close()
    adapter = adapter_on(decoded, rel=0.3)
    out = os.fspath(tmp_path / "m.onnx")
    merge_onnx(path, [(adapter, 1.0)], out)
    new = inits(out)
    for n, name in zip(nodes, decoded):
        assert new[n.input[2]].dtype == new[n.input[3]].dtype == np.float16
        got = decode(new, n)
        assert got.astype(np.float16).tobytes() == ort_weight(new, n).tobytes()
        assert np.abs(got - naf.merge_weight(decoded[name], [(adapter.targets[name], 1.0)])).max() < 0.1
    run(out, x.numpy())


def _zp_edit(fn):
    def edit(proto):
        t = next(t for t in proto.graph.initializer if t.name.endswith("_zero_points"))
        t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t)), t.name))
    return edit


@pytest.mark.parametrize("edit, words, rule", [
    (_zp_edit(lambda z: z[:-1]), "has shape [63], expected 64 values", "4.2"),
    (_zp_edit(lambda z: np.concatenate([z, z])), "has shape [128], expected 64 values", "4.2"),
    (_zp_edit(lambda z: z.astype(np.float16)), "float zero points", "4.2"),
    (_zp_edit(lambda z: z.astype(np.int32)), "INT32, neither packed uint8 nor floats", "4.2"),
    (_zp_edit(lambda z: np.where(np.arange(z.size) % 2 == 0, np.nan, z).astype(z.dtype)), "zero point is not finite",
     "1.6"),
    (_zp_edit(lambda z: np.where(np.arange(z.size) % 2 == 0, np.inf, z).astype(z.dtype)), "zero point is not finite",
     "1.6"),
], ids=["short", "long", "f16-zp-f32-scales", "int32", "nan", "inf"])
def test_hostile_float_zero_points_are_refused(tmp_path, capsys, edit, words, rule):
    """Float zero points of the wrong size or type are refused (rule 4.2, naming the tensor and why); a NaN or Inf
    zero point makes its block decode to NaN or Inf: a merge touching it is
    refused as a damaged base (rule 1.6, as for a non-finite scale). Nothing is written, the base is unchanged."""
    path, W = nbits_base(tmp_path, float_zp=True, edit=edit)
    idx = naf.select_indices(W, 4)
    vals = (np.random.default_rng(1).standard_normal(idx.shape) * 0.05).astype(np.float32)
    adapter = naf.Adapter({WEIGHT: naf.Target.from_weight(WEIGHT, np.nan_to_num(W), idx, vals, value_dtype="F32")},
                          base_name="t")
    code, err = merge_refused(capsys, tmp_path, path, adapter, "--no-verify")
    assert code == 1 and words in err and f"rule {rule}" in err and WEIGHT in err, err


def test_eight_bit_float_zero_points_are_refused(tmp_path, capsys):
    """onnxruntime's CPU kernel refuses 8-bit blocks with float zero points (HQQ writes them with bits=8): refused."""
    path, W = nbits_base(tmp_path, bits=8, float_zp=True)
    with pytest.raises(Exception, match="8-bit weights with floating-point zero points"):
        run(path, np.zeros((3, 64), np.float32))
    adapter = naf.Adapter({WEIGHT: naf.Target.from_weight(WEIGHT, W, naf.select_indices(W, 4),
                                                           np.full((32, 4), 0.01, np.float32), value_dtype="F32")},
                          base_name="t")
    code, err = merge_refused(capsys, tmp_path, path, adapter)
    assert code == 1 and "8-bit blocks with float zero points" in err and "rule 4.2" in err, err


def test_hand_built_float_zero_points_decode_and_merge(tmp_path):
    """A hand-built node with random float zero points: decoded as onnxruntime computes, merged, run."""
    path, W = nbits_base(tmp_path, float_zp=True)
    tensors = inits(path)
    node = onnx.load(path).graph.node[0]
    assert W.tobytes() == ort_weight(tensors, node).tobytes()
    idx = naf.select_indices(W, 4)
    vals = (np.random.default_rng(1).standard_normal(idx.shape) * 0.05).astype(np.float32)
    adapter = naf.Adapter({WEIGHT: naf.Target.from_weight(WEIGHT, W, idx, vals, value_dtype="F32")}, base_name="t")
    out = os.fspath(tmp_path / "m.onnx")
    merge_onnx(path, [(adapter, 1.0)], out)
    new = inits(out)
    assert decode(new, node).tobytes() == ort_weight(new, node).tobytes()


def test_a_re_fitted_float_zero_point_block_holds_its_touched_value(tmp_path):
    """The re-fit weighs a touched value 100 to 1 (spec 15.4: on SmolLM2 the trained adapter kept 16.7% of its change
    so, 8.5% with every value weighed alike): a delta of half the block's span, pushing each row's largest value past
    its block's range, lands within 0.5% of itself (weighed alike, up to 7% off: the fit favoured the block's 31 other
    values)."""
    path, W = nbits_base(tmp_path, float_zp=True)
    idx = naf.select_indices(W, 1)
    blocks = W.reshape(32, 2, 32)
    span = (blocks.max(-1) - blocks.min(-1))[np.arange(32)[:, None], idx // 32]
    vals = (np.sign(np.take_along_axis(W, idx, 1)) * span * 0.5).astype(np.float32)
    adapter = naf.Adapter({WEIGHT: naf.Target.from_weight(WEIGHT, W, idx, vals, value_dtype="F32")}, base_name="t")
    out = os.fspath(tmp_path / "m.onnx")
    assert merge_onnx(path, [(adapter, 1.0)], out).details["blocks_reencoded"] == 32
    got = decode(inits(out), onnx.load(path).graph.node[0])
    want = naf.merge_weight(W, [(adapter.targets[WEIGHT], 1.0)])
    off = np.abs(np.take_along_axis(got - want, idx, 1)) / np.abs(vals)
    assert off.max() < 0.005, off.max()
