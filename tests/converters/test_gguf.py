"""GGUF bases: tiny generated Llama-shaped files of every supported type, merged and read back.

The files are written with gguf-py's GGUFWriter the way llama.cpp's converter writes them (q/k rows
permuted for rope), so the mapping and the permutation are checked against an independent reader:
transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`). Hostile files are built by editing
the bytes of a valid one.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import struct
import time

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT, quants  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format import NeuroAdaError, NeuroAdaUsageError  # noqa: E402
from neuroada_format.converters import gguf_encode as ge  # noqa: E402
from neuroada_format.converters import gguf_merge as gm  # noqa: E402
from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.converters import gguf_read as gr  # noqa: E402
from neuroada_format.converters.backend import SLOWDOWN_ENV  # noqa: E402
from neuroada_format.errors import exit_code  # noqa: E402

from deadline import deadline  # noqa: E402  (tests/deadline.py)
from races import fifo_after_check  # noqa: E402  (tests/races.py)

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 256, 2, 4, 2, 64
TARGETS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
           "model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight",
           "model.layers.0.mlp.up_proj.weight"]


def hf_arrays(seed=0) -> dict[str, np.ndarray]:
    """A tiny Llama state dict (Hugging Face names, f32, [out, in])."""
    rng = np.random.default_rng(seed)
    a = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN)) * 0.05,
         "model.norm.weight": 1 + rng.standard_normal(HIDDEN) * 0.01}
    hd = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        a[p + "input_layernorm.weight"] = 1 + rng.standard_normal(HIDDEN) * 0.01
        a[p + "post_attention_layernorm.weight"] = 1 + rng.standard_normal(HIDDEN) * 0.01
        for name, shape in (("self_attn.q_proj", (HIDDEN, HIDDEN)), ("self_attn.k_proj", (KV_HEADS * hd, HIDDEN)),
                            ("self_attn.v_proj", (KV_HEADS * hd, HIDDEN)), ("self_attn.o_proj", (HIDDEN, HIDDEN)),
                            ("mlp.gate_proj", (INTER, HIDDEN)), ("mlp.up_proj", (INTER, HIDDEN)),
                            ("mlp.down_proj", (HIDDEN, INTER))):
            a[p + name + ".weight"] = rng.standard_normal(shape) * 0.05
    return {k: v.astype(np.float32) for k, v in a.items()}


def llama_cpp_permute(w, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, written out independently of gguf_names."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tiny_hparams(w, *, inter=INTER, rope_base=10000.0, kv_heads=KV_HEADS, context=64, hidden=HIDDEN):
    """The tiny test models' hyper-parameters and a placeholder tokenizer (tokens t0, t1, ...) on a GGUFWriter."""
    w.add_block_count(LAYERS)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(HEADS)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(rope_base)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([1] * VOCAB)


def write_gguf(path, arrays, matrix_type=QT.Q4_1, *, types: dict | None = None, raw: dict | None = None,
               split_max_tensors: int = 0):
    """A llama-arch GGUF of the arrays: 2-D projections as matrix_type (or types[name]), the rest F32.
    split_max_tensors > 0: a split set as llama.cpp's gguf-split writes it (gguf-py's writer lays shards out the same
    way: PATH-00001-of-0000N.gguf with the metadata in the first, split.* keys in each); returns the first shard."""
    import ml_dtypes
    tmap = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, LAYERS)
    w = gguf.GGUFWriter(os.fspath(path), "llama", split_max_tensors=split_max_tensors)
    # the sizes the arrays have (another test's tiny Llama may be narrower than ours): llama.cpp, and our merge,
    # refuse a file whose q/k rows are not head_count heads of embedding_length / head_count values
    embed = arrays.get("model.embed_tokens.weight")
    gate = arrays.get("model.layers.0.mlp.gate_proj.weight")
    add_tiny_hparams(w, hidden=HIDDEN if embed is None else embed.shape[1], inter=INTER if gate is None else gate.shape[0])
    for k, a in arrays.items():
        g = tmap.get_name(k, try_suffixes=(".weight",))
        if "q_proj" in k:
            a = llama_cpp_permute(a, HEADS, HEADS)
        elif "k_proj" in k:
            a = llama_cpp_permute(a, HEADS, KV_HEADS)
        t = (types or {}).get(k, matrix_type if a.ndim == 2 and "embed" not in k else QT.F32)
        if raw and k in raw:
            data = raw[k]
            w.add_tensor(g, data, raw_shape=data.shape, raw_dtype=t)
        elif t == QT.F32:
            w.add_tensor(g, a)
        elif t == QT.F16:
            w.add_tensor(g, a.astype(np.float16))
        elif t == QT.BF16:
            q = a.astype(ml_dtypes.bfloat16).view(np.uint8).reshape(a.shape[0], -1)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=QT.BF16)
        else:
            q = quants.quantize(a, t)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        return type(path)(w.format_shard_names(w.path)[0])
    return path


def make_adapter(base, k=4, seed=1, value_dtype="F32", targets=TARGETS, scale=0.02) -> naf.Adapter:
    """A magnitude-selected adapter made against the base's values (as the view presents them)."""
    rng = np.random.default_rng(seed)
    out = {}
    for n in targets:
        W = base.array(n)
        idx = naf.select_indices(W, k)
        vals = (rng.standard_normal(idx.shape) * scale).astype(np.float32)
        out[n] = naf.Target.from_weight(n, W, idx, vals, value_dtype=value_dtype)
    return naf.Adapter(out, base_name="tiny-llama")


@pytest.fixture
def tiny(tmp_path):
    def build(matrix_type=QT.Q4_1, **kw):
        path = write_gguf(tmp_path / f"base-{matrix_type.name}.gguf", hf_arrays(), matrix_type, **kw)
        return path, gn.open_gguf_base(path)
    return build


def merged_view(path):
    return gn.open_gguf_base(path)


ALL_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]


# -- reading ------------------------------------------------------------------------------------------
def test_view_matches_transformers_loader(tiny, tmp_path):
    """Our de-quantized, un-permuted view equals what transformers' GGUF loader builds, bit for bit."""
    transformers = pytest.importorskip("transformers")
    path, view = tiny(QT.Q4_1)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    sd = model.state_dict()
    for name in TARGETS + ["model.layers.0.self_attn.k_proj.weight", "model.norm.weight"]:
        np.testing.assert_array_equal(view.array(name), sd[name].numpy(), err_msg=name)
    assert view.encoding(TARGETS[0]) == "Q4_1" and view.info(TARGETS[0]) == ("F32", (HIDDEN, HIDDEN))


def test_rope_permutation_matches_transformers_reverse():
    """Our perm and transformers' _reverse_permute_weights are inverse to each other."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    w = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    for n_head, n_kv in ((4, 4), (8, 2)):
        permuted = llama_cpp_permute(w, n_head, n_kv)
        perm = gn.rope_permutation(32, n_kv)
        np.testing.assert_array_equal(permuted, w[perm])
        back = LlamaTensorProcessor()._reverse_permute_weights(permuted, n_head, n_kv)
        np.testing.assert_array_equal(back, w)


# -- merging: every type --------------------------------------------------------------------------------
@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda t: t.name)
def test_merge_keeps_type_untouched_bytes_and_metadata(tiny, tmp_path, qt):
    path, view = tiny(qt)
    adapter = make_adapter(view)
    naf.validate(adapter, view, strict=True)
    out = tmp_path / "merged.gguf"
    summary = gm.merge_gguf(path, [adapter], out)
    assert summary.format == "gguf" and summary.targets == len(TARGETS)
    src, dst = gr.read_gguf(path), gr.read_gguf(out)
    raw_src, raw_dst = path.read_bytes(), out.read_bytes()
    assert len(raw_src) == len(raw_dst)
    assert raw_src[:src.data_start] == raw_dst[:dst.data_start]  # metadata, tokenizer, tensor table
    touched_gguf = {merged_view(out).resolve(n).gguf_name for n in TARGETS}
    for name, info in src.tensors.items():
        a, b = src.blocks(name), dst.blocks(name)
        if name not in touched_gguf:
            assert np.array_equal(a, b), name
            continue
        # every block without a touched value is byte-identical
        hf = next(n for n in TARGETS if view.resolve(n).gguf_name == name)
        m = view.resolve(hf)
        t = adapter.targets[hf]
        idx = np.asarray(t.indices) if m.perm is None else np.asarray(t.indices)[m.perm]
        pos = (np.arange(idx.shape[0])[:, None] * info.ne[0] + idx).reshape(-1)
        block = gguf.GGML_QUANT_SIZES[qt][0]
        touched = np.zeros(a.shape[0], bool)
        touched[pos // block] = True
        assert np.array_equal(a[~touched], b[~touched]), name
        if qt in gr.FLOAT_TYPES:  # rule M, bit for bit
            want = naf.merge_weight(view.array(hf), [t])
            got = merged_view(out).array(hf)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=name)
        else:  # re-encoded touched blocks: closer to the rule-M values than the base was
            want = naf.merge_weight(view.array(hf), [t])
            got = merged_view(out).array(hf)
            assert np.linalg.norm(got - want) < np.linalg.norm(view.array(hf) - want), name


def test_merged_file_through_transformers_is_exact_for_float_targets(tiny, tmp_path):
    """q/k permutation end to end: transformers reads our F32-target merge as the runtime merge, exactly."""
    transformers = pytest.importorskip("transformers")
    path, view = tiny(QT.Q4_1)
    adapter = make_adapter(view, k=6)
    out = tmp_path / "m" / "merged.gguf"
    out.parent.mkdir()
    gm.merge_gguf(path, [(adapter, 1.0)], out, target_type="F32")
    sd = transformers.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).state_dict()
    for name, t in adapter.targets.items():
        np.testing.assert_array_equal(sd[name].numpy(), naf.merge_weight(view.array(name), [t]), err_msg=name)
    # untouched tensors: as before
    np.testing.assert_array_equal(sd["model.layers.0.self_attn.o_proj.weight"].numpy(),
                                  view.array("model.layers.0.self_attn.o_proj.weight"))


def test_two_adapters_and_scales_follow_rule_m(tiny, tmp_path):
    path, view = tiny(QT.F16)
    a, b = make_adapter(view, seed=1), make_adapter(view, seed=2, k=3, value_dtype="BF16")
    out = tmp_path / "m.gguf"
    gm.merge_gguf(path, [(a, 0.5), (b, -1.0)], out)
    for name in TARGETS:
        want = naf.merge_weight(view.array(name), [(a.targets[name], 0.5), (b.targets[name], -1.0)])
        np.testing.assert_array_equal(merged_view(out).array(name).view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("target_type", ["F16", "BF16", "Q8_0", "Q4_1"])
def test_target_type_retypes_touched_tensors_only(tiny, tmp_path, target_type):
    path, view = tiny(QT.Q4_1)
    adapter = make_adapter(view)
    out = tmp_path / "m.gguf"
    s = gm.merge_gguf(path, [adapter], out, target_type=target_type)
    src, dst = gr.read_gguf(path), gr.read_gguf(out)
    assert src.kv.keys() == dst.kv.keys() and src.alignment == dst.alignment
    with open(path, "rb") as f:
        head = f.read(src.infos_start)
    assert out.read_bytes()[:src.infos_start] == head  # key/value section verbatim
    retyped = set(s.details["retyped"]) if target_type != "Q4_1" else set()
    for name, info in src.tensors.items():
        if name in retyped:
            assert dst.tensors[name].type.name == target_type
        else:
            assert dst.tensors[name].type == info.type
            if name not in {view.resolve(n).gguf_name for n in TARGETS}:
                assert np.array_equal(src.blocks(name), dst.blocks(name))
    mv = merged_view(out)
    for name, t in adapter.targets.items():
        want = naf.merge_weight(view.array(name), [t])
        tol = {"F16": 0.01, "BF16": 0.1, "Q8_0": 0.1, "Q4_1": 1.0}[target_type]  # whole-tensor rounding; 4 bits: below the delta
        err = np.linalg.norm(mv.array(name).astype(np.float32) - want) / np.linalg.norm(want - view.array(name))
        assert err < tol, (name, err)


@pytest.mark.parametrize("target_type", ["F32", "F16"])
def test_retyping_holds_one_tensor_at_a_time(tmp_path, target_type):
    """A merge that re-types its targets made every target's new bytes before writing the first: a 7B file re-typed
    to F16 needed about 13 GB. They are made as each is written now: peak memory is that of the largest target."""
    import tracemalloc

    rng = np.random.default_rng(4)
    arrays = {f"model.layers.{i}.mlp.up_proj.weight": (rng.standard_normal((128, 1024)) * 0.05).astype(np.float32)
              for i in range(24)}
    w = gguf.GGUFWriter(os.fspath(tmp_path / "m.gguf"), "llama")
    w.add_block_count(24)
    for name, a in arrays.items():
        i = name.split(".")[2]
        w.add_tensor(f"blk.{i}.ffn_up.weight", quants.quantize(a, QT.Q4_0), raw_dtype=QT.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    view = gn.open_gguf_base(tmp_path / "m.gguf")
    targets = {}
    for name in arrays:
        base = view.array(name)
        idx = naf.select_indices(base, 3)
        targets[name] = naf.Target.from_weight(name, base, idx, np.full(idx.shape, 0.01, np.float32))
    adapter = naf.Adapter(targets)
    new_bytes = 24 * 128 * 1024 * (4 if target_type == "F32" else 2)
    tracemalloc.start()
    try:
        s = gm.merge_gguf(tmp_path / "m.gguf", [adapter], tmp_path / "out.gguf", target_type=target_type)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(s.details["retyped"]) == 24
    assert peak < 0.6 * new_bytes, (peak, new_bytes)  # one tensor's decode and bytes, and gguf-py's 1 MB name table
    merged = gn.open_gguf_base(tmp_path / "out.gguf")
    for name, t in targets.items():
        want = naf.merge_weight(view.array(name), [t])
        got = merged.array(name)
        assert np.array_equal(got, want if target_type == "F32" else want.astype(np.float16).astype(np.float32))


def test_search_encoder_beats_naive_on_touched_blocks(tiny, tmp_path):
    """The default search (touched values weighted 100x) keeps the deltas better than gguf-py's
    quantizer and disturbs the rest of each block less."""
    path, view = tiny(QT.Q4_1)
    adapter = make_adapter(view, k=8, scale=0.01)
    errs = {}
    for enc in ("naive", "search"):
        out = tmp_path / f"{enc}.gguf"
        gm.merge_gguf(path, [adapter], out, encoder=enc)
        mv = merged_view(out)
        touched = total = 0.0
        for n, t in adapter.targets.items():
            want = naf.merge_weight(view.array(n), [t])
            diff = np.square(mv.array(n) - want)
            total += diff.sum()
            touched += np.take_along_axis(diff, np.asarray(t.indices, np.int64), axis=1).sum()
        errs[enc] = (touched, total)
    assert errs["search"][0] < 0.8 * errs["naive"][0], errs
    assert errs["search"][1] < errs["naive"][1], errs


@pytest.mark.parametrize("qt", [QT.Q4_1, QT.Q4_0, QT.Q8_0], ids=lambda t: t.name)
def test_deltas_on_the_grid_merge_exactly_and_keep_every_block(tiny, tmp_path, qt):
    """Deltas trained through the quantizer (w0 + delta on the block's grid) survive exactly: the merged
    file decodes to the runtime merge, bit for bit, and every block keeps its scale and minimum."""
    path, view = tiny(qt)
    rng = np.random.default_rng(8)
    targets = {}
    for n in TARGETS:
        w = view.array(n)
        idx = naf.select_indices(w, 4)
        d, m, lo, hi, block = ge.block_grid(view, n)
        rows = np.arange(idx.shape[0])[:, None]
        dd, mm = d[rows, idx // block], m[rows, idx // block]
        w0 = w[rows, idx]
        q = np.clip(np.rint((w0 - mm) / np.where(dd == 0, 1, dd)) + rng.integers(-2, 3, idx.shape), lo, hi)
        vals = ((dd * q.astype(np.float32) + mm) - w0).astype(np.float32)
        t = naf.Target.from_weight(n, w, idx, vals, value_dtype="F32")
        assert np.array_equal(naf.merge_weight(w, [t])[rows, idx], (dd * q.astype(np.float32) + mm))
        targets[n] = t
    adapter = naf.Adapter(targets)
    out = tmp_path / "m.gguf"
    gm.merge_gguf(path, [adapter], out)
    mv = merged_view(out)
    for n, t in targets.items():
        np.testing.assert_array_equal(mv.array(n), naf.merge_weight(view.array(n), [t]), err_msg=n)
    src, dst = gr.read_gguf(path), gr.read_gguf(out)
    head = 4 if qt == QT.Q4_1 else 2  # every block keeps its scale (and minimum): only levels changed
    assert all(np.array_equal(np.asarray(src.blocks(g))[:, :head], np.asarray(dst.blocks(g))[:, :head])
               for g in src.tensors)


@pytest.mark.parametrize("qt", [QT.Q4_1, QT.Q4_0, QT.Q8_0], ids=lambda t: t.name)
def test_packing_round_trips_through_gguf_dequantize(qt):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((50, 32)) * 0.05).astype(np.float32)
    orig = quants.quantize(x, qt)
    target = x.copy()
    target[:, ::7] += 0.01
    mask = np.zeros_like(x, bool)
    mask[:, ::7] = True
    packed = ge.encode_blocks(qt, target, orig, mask)
    assert packed.shape == orig.shape and packed.dtype == np.uint8
    dec = quants.dequantize(packed, qt)
    naive = quants.dequantize(quants.quantize(target, qt), qt)
    assert np.square(dec - target).sum() <= np.square(naive - target).sum() * (1 + 1e-6)


def test_decode_only_type_needs_requant(tiny, tmp_path):
    """IQ2_XS can be read (gguf-py decodes it) but not written: refused without --requant, re-encoded with it."""
    rng = np.random.default_rng(5)
    down = "model.layers.1.mlp.down_proj.weight"  # [64, 256]: one IQ2_XS super-block per row
    blocks = rng.integers(0, 256, size=(HIDDEN, 74), dtype=np.uint8)  # IQ2_XS: its f16 d is the first 2 bytes
    blocks[:, 0:2] = np.frombuffer(np.float16([0.002]).tobytes(), np.uint8)
    path, view = tiny(QT.Q4_1, types={down: QT.IQ2_XS}, raw={down: blocks})
    assert view.encoding(down) == "IQ2_XS"
    adapter = make_adapter(view, targets=[down, TARGETS[0]])
    with pytest.raises(NeuroAdaUsageError, match="IQ2_XS.*requant=") as exc:
        gm.merge_gguf(path, [adapter], tmp_path / "no.gguf")
    assert exc.value.tensor == "blk.1.ffn_down.weight" and exit_code(exc.value) == 2
    assert not (tmp_path / "no.gguf").exists()
    s = gm.merge_gguf(path, [adapter], tmp_path / "q8.gguf", requant="Q8_0")
    assert s.details["retyped"] == {"blk.1.ffn_down.weight": "Q8_0"}
    dst = gr.read_gguf(tmp_path / "q8.gguf")
    assert dst.tensors["blk.0.attn_q.weight"].type == QT.Q4_1  # encodable: kept
    full = view.array(down).copy()
    t = adapter.targets[down]
    full = naf.merge_weight(full, [t])
    naive = quants.dequantize(quants.quantize(full, QT.Q8_0), QT.Q8_0)
    got = merged_view(tmp_path / "q8.gguf").array(down)
    assert np.square(got - full).sum() <= np.square(naive - full).sum()  # the search encoder
    gm.merge_gguf(path, [adapter], tmp_path / "q8n.gguf", requant="Q8_0", encoder="naive")
    np.testing.assert_array_equal(merged_view(tmp_path / "q8n.gguf").array(down), naive)  # gguf-py's own


# -- identity ---------------------------------------------------------------------------------------------
def test_adapter_from_the_dequantized_copy_validates_against_the_gguf(tiny, tmp_path):
    """Base identity on values: an adapter made on the f32 de-quantized copy belongs to the Q4_1 file."""
    path, view = tiny(QT.Q4_1)
    copy = {n: view.array(n) for n in TARGETS}
    adapter = make_adapter(naf.ArrayBase(copy))
    assert naf.validate(adapter, view).ok
    other_path = write_gguf(tmp_path / "other.gguf", hf_arrays(seed=9), QT.Q4_1)
    report = naf.validate(adapter, gn.open_gguf_base(other_path))
    assert {p["rule"] for p in report.errors} == {"4.3"}
    with pytest.raises(NeuroAdaError, match="probe hash") as exc:
        gm.merge_gguf(other_path, [adapter], tmp_path / "x.gguf")
    assert exc.value.rule == "4.3" and not (tmp_path / "x.gguf").exists()


def test_unmapped_target_and_shape_are_refused(tiny, tmp_path):
    import dataclasses
    path, view = tiny(QT.F16)
    ghost = make_adapter(view)
    t = ghost.targets.pop(TARGETS[0])
    ghost.targets["model.layers.9.self_attn.q_proj.weight"] = dataclasses.replace(
        t, name="model.layers.9.self_attn.q_proj.weight")
    with pytest.raises(NeuroAdaError) as exc:
        gm.merge_gguf(path, [ghost], tmp_path / "x.gguf")
    assert exc.value.rule == "4.1" and exit_code(exc.value) == 1
    wide = make_adapter(view)
    t = wide.targets[TARGETS[0]]
    wide.targets[TARGETS[0]] = dataclasses.replace(t, shape=(t.shape[0], t.shape[1] * 2))
    with pytest.raises(NeuroAdaError) as exc:
        gm.merge_gguf(path, [wide], tmp_path / "x.gguf")
    assert exc.value.rule == "4.2" and not (tmp_path / "x.gguf").exists()


# -- hostile files -----------------------------------------------------------------------------------------
def _mutate(src, dst, fn):
    data = bytearray(src.read_bytes())
    fn(data)
    dst.write_bytes(bytes(data))
    return dst


def _tensor_info_offset(path, name):
    """Where the tensor table entry of `name` starts (its name length field)."""
    data = path.read_bytes()
    enc = name.encode()
    at = data.find(struct.pack("<Q", len(enc)) + enc)
    assert at > 0
    return at, len(enc)


def _kv_offset(path, key):
    data = path.read_bytes()
    enc = key.encode()
    at = data.find(struct.pack("<Q", len(enc)) + enc)
    assert at > 0
    return at + 8 + len(enc)  # the value type field


@pytest.fixture
def valid_file(tiny):
    path, _ = tiny(QT.Q4_1)
    return path


def _hostile_cases(path: "os.PathLike"):
    size = os.path.getsize(path)
    f = gr.read_gguf(path)
    q_at, q_len = _tensor_info_offset(path, "blk.0.attn_q.weight")
    q_type = q_at + 8 + q_len + 4 + 8 * 2
    q_off = q_type + 4
    tok = _kv_offset(path, "tokenizer.ggml.tokens")
    arch = _kv_offset(path, "llama.block_count")
    yield "truncated header", lambda d: d.__delitem__(slice(20, None)), "truncated"
    yield "truncated in metadata", lambda d: d.__delitem__(slice(f.infos_start - 10, None)), "truncated"
    yield "truncated in tensor table", lambda d: d.__delitem__(slice(f.infos_end - 3, None)), "truncated"
    yield "truncated data", lambda d: d.__delitem__(slice(size - 100, None)), "past the end"
    yield "bad magic", lambda d: d.__setitem__(slice(0, 4), b"GGML"), "magic"
    yield "version 1", lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 1)), "version"
    yield "big endian", lambda d: d.__setitem__(slice(4, 8), struct.pack(">I", 3)), "big-endian"
    yield "lying tensor count", lambda d: d.__setitem__(slice(8, 16), struct.pack("<Q", 1 << 60)), "tensors"
    yield "lying metadata count", lambda d: d.__setitem__(slice(16, 24), struct.pack("<Q", 1 << 58)), "metadata pairs"
    yield "one tensor too many", lambda d: d.__setitem__(slice(8, 16), struct.pack("<Q", len(f.tensors) + 1)), ""
    yield "huge metadata array", lambda d: d.__setitem__(slice(tok + 8, tok + 16), struct.pack("<Q", 1 << 62)), "array"
    yield "unknown value type", lambda d: d.__setitem__(slice(arch, arch + 4), struct.pack("<I", 99)), "unknown value type"
    yield "unknown tensor type", lambda d: d.__setitem__(slice(q_type, q_type + 4), struct.pack("<I", 250)), "unknown tensor type"
    yield "lying offset", lambda d: d.__setitem__(slice(q_off, q_off + 8), struct.pack("<Q", 1 << 40)), "past the end"
    yield "misaligned offset", lambda d: d.__setitem__(slice(q_off, q_off + 8), struct.pack("<Q", 8)), "alignment"
    yield "overlapping offset", lambda d: d.__setitem__(slice(q_off, q_off + 8), struct.pack("<Q", 0)), "overlaps"
    yield "too many dims", lambda d: d.__setitem__(slice(q_at + 8 + q_len, q_at + 12 + q_len), struct.pack("<I", 9)), "dimensions"
    yield "huge dim", lambda d: d.__setitem__(slice(q_at + 12 + q_len, q_at + 20 + q_len), struct.pack("<Q", 1 << 63)), ""
    yield "huge key length", lambda d: d.__setitem__(slice(24, 32), struct.pack("<Q", 1 << 40)), "long"


def test_hostile_files_are_refused_quickly(valid_file, tmp_path):
    names = []
    for i, (label, fn, match) in enumerate(_hostile_cases(valid_file)):
        bad = _mutate(valid_file, tmp_path / f"bad{i}.gguf", fn)
        started = time.perf_counter()
        with pytest.raises(NeuroAdaError) as exc:
            gn.open_gguf_base(bad)
        assert time.perf_counter() - started < 2.0, label
        err = exc.value
        assert type(err) is NeuroAdaError and exit_code(err) == 1, label
        assert err.rule == "1.6" and str(bad) in str(err), (label, str(err))
        assert match.lower() in str(err).lower(), (label, str(err))
        names.append(label)
    assert len(names) >= 18


def test_a_huge_block_count_costs_only_the_blocks_the_file_names(valid_file, tmp_path):
    """gguf-py's name table is built for every block the count claims (2 s and 90 MB a thousand): a 4-byte
    block_count of 99,999 kept validate, merge and pack busy for minutes and gigabytes. The table now covers the
    blocks the file's tensors name; a bool count is refused like any other non-integer."""
    at = _kv_offset(valid_file, "llama.block_count")
    assert struct.unpack_from("<I", valid_file.read_bytes(), at)[0] == 4  # a UINT32 value
    huge = _mutate(valid_file, tmp_path / "huge.gguf", lambda d: d.__setitem__(slice(at + 4, at + 8),
                                                                                 struct.pack("<I", 99_999)))
    adapter = make_adapter(gn.open_gguf_base(valid_file), k=2)
    started = time.perf_counter()
    assert naf.validate(adapter, gn.open_gguf_base(huge)).ok
    assert time.perf_counter() - started < 10
    end = gr.read_gguf(valid_file).infos_end

    def to_bool(d):  # type BOOL (7) and its one byte in place of UINT32 and its four; 3 bytes at the header's end
        d[at:at + 8] = struct.pack("<I?", 7, True)  # keep the data where it was
        d[end - 3:end - 3] = bytes(3)

    as_bool = _mutate(valid_file, tmp_path / "bool.gguf", to_bool)
    with pytest.raises(NeuroAdaError, match="block_count is missing or not a small integer"):
        naf.validate(adapter, gn.open_gguf_base(as_bool))


def test_the_name_table_covers_the_named_blocks_as_gguf_py_would():
    """One tensor named blk.99998.x in a 1 KB file made the capped table as costly as the count itself: the table
    is built for the block numbers the file names, entry for entry what gguf-py's TensorNameMap builds."""
    for arch in gn.ARCHS:
        enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
        assert gn.name_table(enum, range(3)).mapping == gguf.TensorNameMap(enum, 3).mapping, arch
    started = time.perf_counter()
    table = gn.name_table(gguf.MODEL_ARCH.LLAMA, [99_998])
    assert time.perf_counter() - started < 1.0
    assert table.get_name("model.layers.99998.self_attn.q_proj.weight", try_suffixes=(".weight",)) == \
        "blk.99998.attn_q.weight"
    assert table.get_name("model.layers.0.self_attn.q_proj.weight", try_suffixes=(".weight",)) is None


def test_random_truncations_and_byte_flips_never_crash(valid_file, tmp_path):
    """Every prefix length class and random header corruption: our error or a valid parse, nothing else."""
    data = valid_file.read_bytes()
    f = gr.read_gguf(valid_file)
    rng = np.random.default_rng(11)
    bad = tmp_path / "fuzz.gguf"
    cuts = list(range(0, 64)) + list(rng.integers(0, len(data), 60))
    for cut in cuts:
        bad.write_bytes(data[:int(cut)])
        with pytest.raises(NeuroAdaError):
            gr.read_gguf(bad)
    for _ in range(150):
        d = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            d[int(rng.integers(0, f.data_start))] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(d))
        try:
            gr.read_gguf(bad)
        except NeuroAdaError:
            pass


def test_missing_base_is_a_usage_error(tmp_path):
    with pytest.raises(NeuroAdaUsageError) as exc:
        gn.open_gguf_base(tmp_path / "nope.gguf")
    assert exit_code(exc.value) == 2


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_fifo_or_folder_named_gguf_is_refused_without_blocking(tmp_path, valid_file):
    """Spec 11.4: a base is checked before it is opened and the opened descriptor again, and nothing is opened
    in a way that can block; a path swapped for a FIFO after the check is refused, not waited on."""
    fifo = tmp_path / "x.gguf"
    os.mkfifo(fifo)
    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    for path in (fifo, folder):
        with deadline(), pytest.raises(NeuroAdaUsageError) as exc:
            gn.open_gguf_base(path)
        assert exc.value.rule == "1.1" and exit_code(exc.value) == 2
    swapped = tmp_path / "swapped.gguf"
    shutil.copyfile(valid_file, swapped)
    with fifo_after_check(), deadline(), pytest.raises(NeuroAdaUsageError, match="FIFO"):
        gr.read_gguf(swapped)


def test_output_rules(tiny, tmp_path):
    path, view = tiny(QT.Q8_0)
    adapter = make_adapter(view)
    out = tmp_path / "m.gguf"
    gm.merge_gguf(path, [adapter], out)
    with pytest.raises(NeuroAdaUsageError, match="exists"):
        gm.merge_gguf(path, [adapter], out)
    with pytest.raises(NeuroAdaUsageError):
        gm.merge_gguf(path, [adapter], path, overwrite=True)  # never over its own input
    before = path.read_bytes()
    gm.merge_gguf(path, [adapter], out, overwrite=True)
    assert path.read_bytes() == before
    with pytest.raises(NeuroAdaUsageError, match="IQ2_XS.*not encoded"):
        gm.merge_gguf(path, [adapter], tmp_path / "k.gguf", target_type="IQ2_XS")
    with pytest.raises(NeuroAdaUsageError, match="rows of 64 values do not split into Q4_K blocks"):
        gm.merge_gguf(path, [adapter], tmp_path / "k.gguf", target_type="Q4_K")


# -- kill -9 --------------------------------------------------------------------------------------------------
def _child(base, adapter, out, target_type):
    os.environ[SLOWDOWN_ENV] = "0.05"
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    gm.merge_gguf(base, [adapter], out, target_type=target_type)
    os._exit(0)


@pytest.mark.skipif(os.name != "posix" or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs fork and SIGKILL")
@pytest.mark.parametrize("target_type", [None, "F16"])
def test_kill_during_merge_leaves_no_partial_output(tiny, tmp_path, target_type):
    path, view = tiny(QT.Q4_1)
    adapter_path = tmp_path / "a.safetensors"
    naf.save(make_adapter(view), adapter_path)
    out = tmp_path / "out.gguf"
    before = path.read_bytes()
    rng = np.random.default_rng(2)
    killed_any = False
    for _ in range(4):
        child = multiprocessing.get_context("fork").Process(
            target=_child, args=(path, adapter_path, out, target_type))
        child.start()
        child.join(float(rng.uniform(0.05, 0.2)))
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            child.join()
            killed_any = True
            assert not out.exists()
        else:
            assert child.exitcode == 0
            out.unlink()
        assert path.read_bytes() == before
    assert killed_any
    gm.merge_gguf(path, [adapter_path], out, target_type=target_type)  # cleans the dead siblings
    assert out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith("out.gguf.tmp-")]


# -- the command lines ----------------------------------------------------------------------------------------
def test_cli_merge_and_validate_against_a_gguf(tiny, tmp_path):
    from click.testing import CliRunner

    from neuroada_format.cli import main as neuroada
    from neuroada_format.converters.merge_cli import run as merge_run
    path, view = tiny(QT.Q4_1)
    copy = naf.ArrayBase({n: view.array(n) for n in TARGETS})
    adapter = tmp_path / "a.safetensors"
    naf.save(make_adapter(copy), adapter)
    res = CliRunner().invoke(neuroada, ["validate", os.fspath(adapter), "--base", os.fspath(path), "--json"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "m.gguf"
    assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(adapter), "--out", os.fspath(out),
                      "--json"]) == 0
    assert gr.read_gguf(out).tensors.keys() == gr.read_gguf(path).tensors.keys()
    assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(adapter), "--out", os.fspath(out)]) == 2
    other = write_gguf(tmp_path / "other.gguf", hf_arrays(seed=4), QT.Q4_1)
    res = CliRunner().invoke(neuroada, ["validate", os.fspath(adapter), "--base", os.fspath(other)])
    assert res.exit_code == 1 and "4.3" in res.output
    assert merge_run(["--base", os.fspath(other), "--adapter", os.fspath(adapter), "--out",
                      os.fspath(tmp_path / "x.gguf")]) == 1
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:100])
    res = CliRunner().invoke(neuroada, ["validate", os.fspath(adapter), "--base", os.fspath(bad)])
    assert res.exit_code == 1 and "rule 1.6" in res.output and "Traceback" not in res.output
    assert merge_run(["--base", os.fspath(bad), "--adapter", os.fspath(adapter), "--out",
                      os.fspath(tmp_path / "y.gguf")]) == 1
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_cli_options_reach_the_gguf_backend(tiny, tmp_path):
    """--option KEY=VALUE configures the registered GGUF backend (no module state changes)."""
    from neuroada_format.converters.merge_cli import run as merge_run
    path, view = tiny(QT.Q4_1)
    copy = naf.ArrayBase({n: view.array(n) for n in TARGETS})
    adapter = tmp_path / "a.safetensors"
    naf.save(make_adapter(copy), adapter)
    out = tmp_path / "f16.gguf"
    assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(adapter), "--out", os.fspath(out),
                      "--option", "target_type=F16"]) == 0
    assert {gr.read_gguf(out).tensors[g].type.name for g in (view.resolve(n).gguf_name for n in TARGETS)} == {"F16"}
    api = tmp_path / "api.gguf"
    gm.merge_gguf(path, [adapter], api, target_type="F16")
    assert api.read_bytes() == out.read_bytes()
    assert gm.BACKEND.target_type is None                       # the registered backend is unchanged
    bads = [["--option", "colour=blue"], ["--option", "target_type=IQ2_XS"], ["--option", "target_type=Q4_K"]]
    bads += [["--option", f"touched_weight={w}"] for w in ("abc", "nan", "inf", "-inf", "1e400", "-5", "0", "")]
    for bad in bads:
        assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(adapter), "--out",
                          os.fspath(tmp_path / "x.gguf"), *bad]) == 2, bad
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(NeuroAdaUsageError, match="touched_weight must be a number > 0 and at most 1e\\+06, got 'nan'"):
        gm.merge_gguf(path, [adapter], tmp_path / "x.gguf", touched_weight="nan")


def test_touched_weight_error_is_one_line(tiny, tmp_path, capsys):
    """A bad --option touched_weight is a usage error in one line, not an internal error."""
    from neuroada_format.converters.merge_cli import run as merge_run
    path, view = tiny(QT.Q4_1)
    adapter = tmp_path / "a.safetensors"
    naf.save(make_adapter(naf.ArrayBase({n: view.array(n) for n in TARGETS})), adapter)
    capsys.readouterr()
    assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(adapter), "--out",
                      os.fspath(tmp_path / "x.gguf"), "--option", "touched_weight=abc"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --option touched_weight must be a number > 0 and at most 1e+06, got 'abc'\n", err


def test_a_touched_weight_that_overflows_the_search_is_refused(tmp_path, capsys):
    """touched_weight=1e20 passed as 'a finite number > 0', then overflowed the encoders' f32 error sums: numpy's
    'overflow encountered in multiply' lines on stderr, exit 0 (Q4_1 and the K-quants alike). Past 1e6 the untouched
    values weigh nothing the sums can resolve, so the option stops there, and every value up to it merges quietly."""
    from test_gguf_kquants import kquant_file
    from neuroada_format.converters.merge_cli import run as merge_run

    types = {"model.layers.1.mlp.down_proj.weight": QT.Q4_K, "model.layers.0.mlp.down_proj.weight": QT.Q6_K,
             "model.layers.0.self_attn.v_proj.weight": QT.IQ4_NL}
    path = kquant_file(tmp_path, types)  # its other projections Q8_0
    adapter = tmp_path / "a.safetensors"
    naf.save(make_adapter(gn.open_gguf_base(path), k=2, scale=0.01, targets=list(types) + TARGETS[:1]), adapter)
    args = ["--base", os.fspath(path), "--adapter", os.fspath(adapter), "--out", os.fspath(tmp_path / "m.gguf")]
    for weight in ("1e20", "1.000001e6"):
        assert merge_run(args + ["--option", f"touched_weight={weight}"]) == 2
        assert capsys.readouterr().err == (f"error: --option touched_weight must be a number > 0 and at most 1e+06, "
                                           f"got '{weight}'\n")
        assert not (tmp_path / "m.gguf").exists()
    assert merge_run(args + ["--option", "touched_weight=1e6"]) == 0
    err = capsys.readouterr().err
    assert "encountered" not in err and len(err.strip().splitlines()) == 1, err  # the one 're-encoded' warning


def test_requant_that_changes_nothing_is_said(tiny, tmp_path, capsys):
    """requant only names the type for tensors that cannot be re-encoded here: on a Q4_1 base it has no effect,
    and the merge says so instead of ignoring the option silently."""
    path, view = tiny(QT.Q4_1)
    adapter = tmp_path / "a.safetensors"
    naf.save(make_adapter(naf.ArrayBase({n: view.array(n) for n in TARGETS})), adapter)
    said = gm.merge_gguf(path, [adapter], tmp_path / "r.gguf", requant="F32").warnings
    assert any("requant=F32 applies only to tensor types that cannot be re-encoded here" in w for w in said), said
    assert not any("requant" in w for w in gm.merge_gguf(path, [adapter], tmp_path / "plain.gguf").warnings)
    assert (tmp_path / "r.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()


def test_pack_against_a_gguf_base(tiny, tmp_path):
    """neuroada-pack --base model.gguf: the base's tensors carry their Hugging Face names, so a fine-tuned
    checkpoint pairs with them; the adapter extracted belongs to the GGUF (validated, merged)."""
    from neuroada_format.converters.pack import extract
    path, view = tiny(QT.Q4_1)
    assert set(TARGETS) <= set(view.keys()) and "model.embed_tokens.weight" in view.keys()
    rng = np.random.default_rng(6)
    tuned = {}
    for n in TARGETS:
        w = np.array(view.array(n), dtype=np.float32)
        w[:, :5] += rng.standard_normal((w.shape[0], 5)).astype(np.float32) * 0.01
        tuned[n] = w
    adapter, report = extract(path, tuned, k=5, targets=TARGETS, value_dtype="F32")
    assert sorted(adapter.targets) == sorted(TARGETS)
    assert naf.validate(adapter, path).ok
    out = tmp_path / "m.gguf"
    gm.merge_gguf(path, [adapter], out, target_type="F32")
    for n in TARGETS:
        np.testing.assert_allclose(merged_view(out).array(n), tuned[n], atol=1e-6)


@pytest.mark.parametrize("qt", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1], ids=lambda t: t.name)
def test_merged_values_a_block_cannot_hold_are_refused(tiny, tmp_path, qt, capsys):
    """A block's scale (and minimum) are F16: past them the encoder wrote all-zero or NaN blocks, untouched
    values included, with exit 0 and numpy's overflow messages leaking as warning lines."""
    from neuroada_format.converters.merge_cli import run as merge_run

    path, view = tiny(qt)
    adapter = tmp_path / "a.safetensors"
    naf.save(make_adapter(view, targets=TARGETS[:1], scale=1.0), adapter)
    limit = gm.BLOCK_VALUE_MAX[qt]
    out = tmp_path / "m.gguf"
    assert merge_run(["--base", os.fspath(path), "--adapter", f"{adapter}:{limit:g}", "--out", os.fspath(out)]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"beyond what a {qt.name} block can encode" in lines[0], err
    assert os.fspath(path) in lines[0] and "attn_q" in lines[0] and "target_type" in lines[0]
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("m.gguf.tmp-")]
    # a scale that stays in range merges, every value finite
    assert merge_run(["--base", os.fspath(path), "--adapter", f"{adapter}:100", "--out", os.fspath(out)]) == 0
    assert "overflow" not in capsys.readouterr().err
    merged = gn.open_gguf_base(out).array(TARGETS[0])
    assert np.isfinite(merged).all()


def test_heads_that_do_not_split_the_rows_name_the_file_and_tensor(tmp_path):
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.F32)
    data = bytearray(path.read_bytes())
    at = _kv_offset(path, "llama.attention.head_count") + 4  # past the value's type
    data[at:at + 4] = struct.pack("<I", 5)  # 5 heads: the rows do not split
    path.write_bytes(bytes(data))
    with pytest.raises(NeuroAdaError) as exc:
        gn.open_gguf_base(path).resolve(TARGETS[0])
    assert exc.value.path == os.fspath(path) and exc.value.tensor == "blk.0.attn_q.weight" and exc.value.rule == "4.2"


@pytest.mark.parametrize("qt", [QT.Q8_0, QT.Q4_1, QT.Q4_K, QT.Q3_K, QT.IQ4_XS, QT.IQ4_NL], ids=lambda t: t.name)
def test_values_a_retyped_block_cannot_hold_are_refused(tmp_path, qt, capsys):
    """--option target_type=<block type> encoded every block afresh without the limit a kept type is held to: merged
    values past it wrote all-zero blocks (untouched values lost) or NaN ones, exit 0, numpy's 'invalid value' as a
    warning line. A touched value past it blames the scale; an untouched base value past it, the base."""
    from neuroada_format.converters.merge_cli import run as merge_run

    down = "model.layers.1.mlp.down_proj.weight"  # rows of 256: whole blocks of every type
    arrays = hf_arrays()
    adapter = make_adapter(naf.ArrayBase(arrays), targets=[down], scale=1.0)
    naf.save(adapter, tmp_path / "a.safetensors")
    path = write_gguf(tmp_path / "base.gguf", arrays, QT.F32)
    limit = gm.BLOCK_VALUE_MAX[qt]
    out = tmp_path / "m.gguf"
    args = ["--base", os.fspath(path), "--out", os.fspath(out), "--option", f"target_type={qt.name}"]
    assert merge_run(args + ["--adapter", f"{tmp_path / 'a.safetensors'}:{2 * limit / 0.05:g}"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"beyond what a {qt.name} block can encode" in lines[0], lines
    assert os.fspath(path) in lines[0] and "blk.1.ffn_down.weight" in lines[0] and "target_type=F32" in lines[0]
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("m.gguf.tmp-")]

    row = np.asarray(adapter.targets[down].indices)[0]
    arrays[down] = arrays[down].copy()
    arrays[down][0, next(c for c in range(256) if c not in row)] = 2 * limit  # F32 holds it; no adapter position
    path = write_gguf(tmp_path / "base.gguf", arrays, QT.F32)
    assert merge_run(args + ["--adapter", os.fspath(tmp_path / "a.safetensors")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "1 values of the base that the adapter does not touch" in lines[0], lines
    assert f"beyond what a {qt.name} block can encode" in lines[0] and "blk.1.ffn_down.weight" in lines[0]
    assert not out.exists()
    assert merge_run(args[:4] + ["--adapter", os.fspath(tmp_path / "a.safetensors"), "--option",
                                 "target_type=F32"]) == 0  # the way out the message names
    np.testing.assert_array_equal(gn.open_gguf_base(out).array(down),
                                  naf.merge_weight(arrays[down], [adapter.targets[down]]))


@pytest.mark.parametrize("key, value", [("llama.attention.head_count_kv", 1), ("llama.embedding_length", 96)])
def test_heads_that_contradict_the_rows_are_refused_without_verify_too(tmp_path, capsys, key, value):
    """attn_k's 32 rows are 2 heads of 64 / 4: a file saying 1 key head (or heads of 96 / 4) still split the rows into
    rope halves, so the permutation was made for the wrong heads. The probe hash then blamed the adapter ('different
    base or revision'), and with --no-verify the deltas went to other rows, exit 0. llama.cpp refuses to load such a
    file; the merge refuses it too, naming the file, the tensor and what contradicts it."""
    from neuroada_format.converters.merge_cli import run as merge_run

    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.F32)
    naf.save(make_adapter(gn.open_gguf_base(path), targets=TARGETS[:2]), tmp_path / "a.safetensors")
    data = bytearray(path.read_bytes())
    at = _kv_offset(path, key) + 4  # past the value's type (UINT32)
    data[at:at + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(data))
    for verify in ([], ["--no-verify"]):
        out = tmp_path / "m.gguf"
        assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(tmp_path / "a.safetensors"), "--out",
                          os.fspath(out), *verify]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "rule 4.2" in lines[0] and "(llama.cpp refuses to load it)" in lines[0], lines
        tensor = "blk.1.attn_k.weight" if "kv" in key else "blk.0.attn_q.weight"
        assert f"(base tensor {tensor})" in lines[0] and not out.exists(), lines
    with pytest.raises(NeuroAdaError) as exc:  # the base's own words name the file
        gn.open_gguf_base(path).resolve(TARGETS[1] if "kv" in key else TARGETS[0])
    assert exc.value.path == os.fspath(path) and exc.value.tensor == tensor and exc.value.rule == "4.2"


@pytest.mark.parametrize("target_type, scale", [("F16", "1e6"), ("F32", "3e38")])
def test_retyped_targets_report_overflow_as_a_float_base_does(tiny, tmp_path, capsys, target_type, scale):
    """Re-typing to F16 wrote +-Inf with only numpy's 'overflow encountered in cast' (no file, no count), and a
    huge scale let 'overflow encountered in multiply' through next to the proper warning."""
    from neuroada_format.converters.merge_cli import run as merge_run

    path, view = tiny(QT.Q8_0)
    adapter = tmp_path / "a.safetensors"
    naf.save(make_adapter(view, targets=TARGETS[:1], scale=1.0), adapter)
    out = tmp_path / "m.gguf"
    assert merge_run(["--base", os.fspath(path), "--adapter", f"{adapter}:{scale}", "--out", os.fspath(out),
                      "--option", f"target_type={target_type}"]) == 0
    err = capsys.readouterr().err
    assert "encountered" not in err, err
    merged = gn.open_gguf_base(out).array(TARGETS[0])
    n = int((~np.isfinite(np.asarray(merged, np.float32))).sum())
    assert n > 0 and f"merge overflowed the {target_type} range at {n} positions" in err, err


def test_retyping_refuses_base_values_the_target_type_cannot_hold(tmp_path, capsys):
    """An untouched base value beyond F16 became Inf with exit 0 and no word: the adapter did not do it."""
    from neuroada_format.converters.merge_cli import run as merge_run

    name = "model.layers.0.mlp.up_proj.weight"
    arrays = hf_arrays()
    adapter = make_adapter(naf.ArrayBase(arrays), targets=[name], scale=1.0)
    row = np.asarray(adapter.targets[name].indices)[0]
    free = next(c for c in range(arrays[name].shape[1]) if c not in row)
    arrays[name] = arrays[name].copy()
    arrays[name][0, free] = 1e6  # in range for F32, not for F16; not an adapter position
    path = write_gguf(tmp_path / "base.gguf", arrays, QT.F32)
    naf.save(adapter, tmp_path / "a.safetensors")
    out = tmp_path / "m.gguf"
    assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(tmp_path / "a.safetensors"), "--out",
                      os.fspath(out), "--option", "target_type=F16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 values of the base that the adapter does not touch lie beyond the F16 range" in err[0]
    assert "blk.0.ffn_up.weight" in err[0] and not out.exists()


def test_rope_order_aliases_are_not_permuted(tiny):
    """gguf-py maps `q_proj_no_perm` (a checkpoint already in rope order) and Meta's `attention.wq` to attn_q too;
    llama.cpp's converter permutes only the keys ending in q_proj/k_proj, so only those are un-permuted here
    (a permuted alias would have put each delta on another head's row)."""
    _, view = tiny()
    assert view.resolve("model.layers.0.self_attn.q_proj.weight").perm is not None
    assert view.resolve("model.layers.1.self_attn.k_proj.weight").perm is not None
    for alias in ("model.layers.0.self_attn.q_proj_no_perm.weight", "model.layers.1.self_attn.k_proj_no_perm.weight",
                  "layers.0.attention.wq.weight"):
        m = view.resolve(alias)
        assert m is not None and m.gguf_name.split(".")[2] in ("attn_q", "attn_k") and m.perm is None, alias


# -- what a GGUF base says of one target ------------------------------------------------------------------
def _rename_key(path, key, new_key):
    """The same file with one metadata key renamed in place (same length)."""
    assert len(key) == len(new_key)
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<Q", len(key)) + key.encode())
    assert at > 0
    data[at + 8:at + 8 + len(key)] = new_key.encode()
    path.write_bytes(bytes(data))
    return path


def test_base_errors_of_one_target_are_reported_against_it(tiny, tmp_path):
    """Heads that do not split the rows (4.2) and an architecture without a name table (4.1) concern the
    targets that need them: validate reports them against those targets and goes on with the rest."""
    path, view = tiny(QT.F32)
    adapter = make_adapter(view)
    data = bytearray(path.read_bytes())
    at = _kv_offset(path, "llama.attention.head_count") + 4
    data[at:at + 4] = struct.pack("<I", 5)
    bad_heads = tmp_path / "heads.gguf"
    bad_heads.write_bytes(bytes(data))
    report = naf.validate(adapter, gn.open_gguf_base(bad_heads))
    by_target = {p["tensor"]: p for p in report.errors}
    # q_proj's 64 rows do not split into 5 heads; k_proj's split into its 2 key heads, but not of 64 / 5 values
    assert set(by_target) == {TARGETS[0], TARGETS[1]}  # the rest pass
    assert by_target[TARGETS[0]]["rule"] == "4.2" and "blk.0.attn_q.weight" in by_target[TARGETS[0]]["message"]
    assert by_target[TARGETS[1]]["rule"] == "4.2" and "blk.1.attn_k.weight" in by_target[TARGETS[1]]["message"]

    shutil.copy(path, tmp_path / "no-arch.gguf")
    no_arch = _rename_key(tmp_path / "no-arch.gguf", "general.architecture", "general.architectur_")
    view = gn.open_gguf_base(no_arch)  # opens: the file's own tensor names need no architecture
    report = naf.validate(adapter, view)
    assert {p["rule"] for p in report.errors} == {"4.1"} and len(report.errors) == len(TARGETS)
    assert "general.architecture" in report.errors[0]["message"]
    by_gguf_name = make_adapter(view, targets=["blk.0.attn_v.weight", "blk.1.ffn_down.weight"])
    assert naf.validate(by_gguf_name, view).ok
    gm.merge_gguf(no_arch, [by_gguf_name], tmp_path / "merged.gguf")
    merged = gn.open_gguf_base(tmp_path / "merged.gguf")
    assert not np.array_equal(merged.array("blk.0.attn_v.weight"), view.array("blk.0.attn_v.weight"))


def test_two_targets_naming_one_gguf_tensor_are_refused(tiny, tmp_path):
    """A Hugging Face key and the GGUF name it maps to are one tensor: merging both would add two deltas."""
    path, view = tiny(QT.F16)
    hf = make_adapter(view, targets=["model.layers.0.self_attn.v_proj.weight"])
    alias = make_adapter(view, targets=["blk.0.attn_v.weight"], seed=2)
    both = naf.Adapter({**hf.targets, **alias.targets}, base_name="tiny-llama")
    report = naf.validate(both, view)
    assert [(p["rule"], p["tensor"]) for p in report.errors] == [("4.1", "model.layers.0.self_attn.v_proj.weight")]
    assert "blk.0.attn_v.weight" in report.errors[0]["message"]
    with pytest.raises(NeuroAdaError) as exc:
        gm.merge_gguf(path, [both], tmp_path / "x.gguf")
    assert exc.value.rule == "4.1" and not (tmp_path / "x.gguf").exists()
    gm.merge_gguf(path, [hf, alias], tmp_path / "two.gguf")  # two adapters on one tensor add, as rule M says


def test_the_later_of_two_keys_naming_one_tensor_gets_4_1_and_nothing_else(tiny):
    """Spec 7/15.2: targets go in code point order; the later key naming a tensor already named is 4.1 and is not
    checked further (its wrong probe is not reported), the earlier one is checked as usual, whichever is wrong."""
    import dataclasses
    path, view = tiny(QT.F16)
    first, later = "blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"
    good = {**make_adapter(view, targets=[first]).targets, **make_adapter(view, targets=[later], seed=2).targets}
    for wrong, want in ((later, [("4.1", later)]), (first, [("4.3", first), ("4.1", later)])):
        targets = dict(good)
        targets[wrong] = dataclasses.replace(good[wrong], probe="sha256:" + "0" * 64)
        report = naf.validate(naf.Adapter(targets, base_name="tiny-llama"), view)
        assert [(p["rule"], p["tensor"]) for p in report.problems] == want


def test_a_target_on_a_type_without_decoding_is_4_2(tiny, tmp_path):
    """Spec 15.2: a GGUF tensor of a type with no binary32 decoding (I32 here) opens with the base; a target on it is
    4.2 (no 4.6 beside it) and the others are checked as usual. It was rule 1.6 raised for the whole base, and a merge
    asked for --option requant, as if the tensor could be read."""
    from click.testing import CliRunner

    from neuroada_format.cli import main as neuroada
    down = "model.layers.1.mlp.down_proj.weight"
    ints = np.arange(HIDDEN * INTER, dtype=np.int32).reshape(HIDDEN, INTER)
    path, view = tiny(QT.Q4_1, types={down: QT.I32}, raw={down: ints.view(np.uint8)})
    assert view.encoding(down) == "I32" and view.info(down) == ("I32", (HIDDEN, INTER))
    copy = naf.ArrayBase({down: ints.astype(np.float32), TARGETS[0]: view.array(TARGETS[0])})
    adapter = make_adapter(copy, targets=[down, TARGETS[0]], value_dtype="BF16")
    report = naf.validate(adapter, view)
    assert [(p["rule"], p["severity"], p["tensor"]) for p in report.problems] == [("4.2", "error", down)]
    assert "I32" in report.problems[0]["message"]
    for requant in (None, "Q8_0"):
        with pytest.raises(NeuroAdaError) as exc:
            gm.merge_gguf(path, [adapter], tmp_path / "x.gguf", requant=requant)
        assert exc.value.rule == "4.2" and exc.value.tensor == down and exit_code(exc.value) == 1
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(NeuroAdaError) as exc:  # read directly: the same rule, naming the GGUF tensor
        view.array(down)
    assert exc.value.rule == "4.2" and exc.value.tensor == "blk.1.ffn_down.weight"
    saved = tmp_path / "a.safetensors"
    naf.save(adapter, saved)
    res = CliRunner().invoke(neuroada, ["validate", os.fspath(saved), "--base", os.fspath(path)])
    assert res.exit_code == 1 and "rule 4.2" in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("qt", ALL_TYPES + [QT.Q4_K])
def test_probed_values_decode_only_their_blocks(tiny, qt):
    """The probe reads the adapter's positions (q_proj's rows un-permuted) and equals the whole decoding there;
    Q4_K (256-value super-blocks) stands for the types gguf-py cannot write."""
    down = "model.layers.1.mlp.down_proj.weight"  # [64, 256]: one Q4_K super-block per row
    if qt == QT.Q4_K:
        blocks = np.random.default_rng(5).integers(0, 256, size=(HIDDEN, 144), dtype=np.uint8)
        blocks[:, 0:4] = np.frombuffer(np.float16([0.002, 0.001]).tobytes(), np.uint8)
        _, view = tiny(QT.Q8_0, types={down: QT.Q4_K}, raw={down: blocks})
    else:
        _, view = tiny(qt)
    adapter = make_adapter(view, k=5)
    for name, t in adapter.targets.items():
        rows = np.arange(t.d_out)[:, None]
        assert np.array_equal(view.probed(name, t.indices), view.array(name)[rows, t.indices]), name
    assert naf.validate(adapter, view).ok


def test_validating_against_a_large_quantized_tensor_decodes_only_the_probes(tmp_path):
    """A 4096 x 4096 Q8_0 tensor (64 MB of f32 once decoded): validate reads the d_out * k probed values."""
    import tracemalloc
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 4096), dtype=np.float32)
    writer = gguf.GGUFWriter(os.fspath(tmp_path / "big.gguf"), "llama")
    q = quants.quantize(w, QT.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", q, raw_shape=q.shape, raw_dtype=QT.Q8_0)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    view = gn.open_gguf_base(tmp_path / "big.gguf")
    adapter = make_adapter(view, k=1, targets=["blk.0.ffn_up.weight"])
    tracemalloc.start()
    try:
        report = naf.validate(adapter, view)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.ok and peak < 8 << 20, peak
    wrong = naf.Adapter({n: naf.Target(n, t.indices, t.values, t.shape, t.layout, t.dtype, "sha256:" + "0" * 64)
                         for n, t in adapter.targets.items()})
    assert [p["rule"] for p in naf.validate(wrong, view).errors] == ["4.3"]
