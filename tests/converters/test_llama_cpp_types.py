"""llama.cpp runs our merges of every kept block type: the file it reads is the file we meant to write.

test_llama_cpp.py proves one Q4_1 file; the other kept types (Q8_0, Q4_0, Q5_0, Q5_1 by gguf-py's layouts; Q2_K, Q3_K,
Q4_K, Q5_K, Q6_K, IQ4_XS, IQ4_NL by converters/gguf_kquants.py's own packing) were checked only through gguf-py's
decoder, which would agree with a packing mistake copied from it. Here the tiny Llama of test_gguf has every projection
whose rows hold whole blocks of the type in that type (the 256-value super-block types: the two down_proj, rows of 256),
the rest F32, so that each file's only quantized matmuls are the type's. An adapter on those projections is merged with
`neuroada-merge` keeping the type; llama.cpp's logits on the merged file must be our decoded view's (the weights every
test of the merge checks, loaded into transformers' Llama) up to llama.cpp's own noise, and llama.cpp must see the
adapter's change. Then deltas on the blocks' own grid (train_on_grid's snapping), which merge exactly, and a Q2_K file
made by llama.cpp's own quantizer (its blocks, not ours) read, re-encoded and merged.

Skipped when `llama_cpp` cannot be imported (see test_llama_cpp.py).
"""
from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding is not installed (optional)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format.converters import gguf_kquants as kq  # noqa: E402
from neuroada_format.converters import gguf_merge as gm  # noqa: E402
from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.converters import gguf_read as gr  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402

from test_gguf import hf_arrays, make_adapter, write_gguf  # noqa: E402
from test_gguf_grid_merge import snapped_adapter  # noqa: E402
from test_gguf_iquants import table_snapped_adapter  # noqa: E402
from test_gguf_kquants import _saved, kquant_file  # noqa: E402
from test_llama_cpp import cpp_logits, norm, torch_logits  # noqa: E402

KEPT = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS,
        QT.IQ4_NL]


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """f(path) -> logits of our decoded view of a tiny-Llama GGUF, run by transformers' Llama (built once, by its GGUF
    loader, from an F32 file of the same model: the config; the weights are then the view's)."""
    tmp = tmp_path_factory.mktemp("reader")
    write_gguf(tmp / "f32.gguf", hf_arrays(), QT.F32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file="f32.gguf", dtype=torch.float32).eval()
    tied = {"lm_head.weight"}  # the tiny file has no output tensor: the head is token_embd

    def run(path):
        view = gn.open_gguf_base(path)
        sd = {k: torch.from_numpy(np.ascontiguousarray(view.array(k), np.float32))
              for k in model.state_dict() if k not in tied}
        model.load_state_dict(sd, strict=False)
        return torch_logits(model)
    return run


def typed_file(tmp_path, t):
    """(path, targets): every projection whose rows hold whole blocks of t in t, the rest F32."""
    block = GGML_QUANT_SIZES[t][0]
    types = {n: t for n, a in hf_arrays().items() if a.ndim == 2 and "embed" not in n and a.shape[1] % block == 0}
    return kquant_file(tmp_path, types, rest=QT.F32), sorted(types)


# llama.cpp rounds the activations to 8 bits for every quantized matmul (Q8_0, or Q8_K for the super-block types), so
# it computes a file's logits as the de-quantized f32 model does within about 1% of their norm (measured 0.91% to
# 1.05% on these files, merged or not; the largest single difference 0.8% to 1.4% of the largest logit)
NOISE = 0.02


@pytest.mark.parametrize("t", KEPT, ids=lambda t: t.name)
def test_kept_type_merge_runs_in_llama_cpp_as_the_file_decodes(t, tmp_path, reader):
    base, targets = typed_file(tmp_path, t)
    view = gn.open_gguf_base(base)
    adapter = make_adapter(view, k=4, scale=0.05, targets=targets)
    out = tmp_path / "merged.gguf"
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(_saved(adapter, tmp_path)),
                      "--out", os.fspath(out)]) == 0
    merged = gr.read_gguf(out)
    assert {merged.tensors[view.resolve(n).gguf_name].type for n in targets} == {t}  # kept

    r_base, r_merged = reader(base), reader(out)
    lc_base, lc = cpp_logits(base), cpp_logits(out)
    change = r_merged - r_base
    # the file holds a change (0.08-0.10 of the base logits' norm on the two down_proj, 0.42-0.48 on all 14)
    assert norm(change) > 0.05 * norm(r_base)
    assert norm(lc_base - r_base) < NOISE * norm(r_base)  # the comparison's own noise, on the unmerged file
    assert norm(lc - r_merged) < NOISE * norm(r_merged), (t.name, norm(lc - r_merged) / norm(r_merged))
    assert np.abs(lc - r_merged).max() < 2 * NOISE * np.abs(r_merged).max()
    # llama.cpp sees the change the file holds: its own base-to-merged change is the decoded one up to its noise,
    # which mostly cancels between the two runs (measured 3% of the change on 14 tensors, 9-11% on 2)
    assert norm((lc - lc_base) - change) < 0.2 * norm(change), (t.name, norm((lc - lc_base) - change) / norm(change))
    assert np.mean(lc.argmax(1) == r_merged.argmax(1)) >= 0.9  # measured 98-100%


# Deltas one or two levels along a Q8_0, Q5_K or Q6_K grid move the logits by about as much as llama.cpp's 8-bit
# activations do (1.3-2.3% of their norm against 1%), so those exact merges are left to test_gguf_grid_merge.py and
# test_gguf_kquants.py; on the coarser grids the change is 5-25% and llama.cpp must see it
GRID = [QT.Q4_0, QT.Q4_1, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.IQ4_XS, QT.IQ4_NL]


@pytest.mark.parametrize("t", GRID, ids=lambda t: t.name)
def test_exact_grid_merge_runs_in_llama_cpp_as_the_runtime_merge(t, tmp_path, reader):
    """Deltas trained on the file's grid (as train_on_grid snaps them; IQ4: onto the table levels of each block's
    scale) merge without re-encoding any block: the file decodes to the runtime's rule-M weights bit for bit, and
    llama.cpp computes that model."""
    base, targets = typed_file(tmp_path, t)
    view = gn.open_gguf_base(base)
    if t in (QT.IQ4_XS, QT.IQ4_NL):  # (its helper takes targets stored in checkpoint row order: no q/k)
        adapter = table_snapped_adapter(view, [n for n in targets if view.resolve(n).inverse is None])
    else:
        adapter = snapped_adapter(view, k=4, targets=targets)
    out = tmp_path / "merged.gguf"
    s = gm.merge_gguf(base, [adapter], out)
    assert s.details["blocks_reencoded"] == 0 and s.details["blocks_on_grid"] > 0
    merged = gn.open_gguf_base(out)
    for n, target in adapter.targets.items():
        np.testing.assert_array_equal(merged.array(n), naf.merge_weight(view.array(n), [target]), err_msg=n)
    r_base, r_merged = reader(base), reader(out)  # r_merged: the runtime's merged model, exactly
    lc_base, lc = cpp_logits(base), cpp_logits(out)
    change = r_merged - r_base
    assert norm(change) > 0.04 * norm(r_base)  # measured 0.05-0.25
    assert norm(lc - r_merged) < NOISE * norm(r_merged)
    assert norm((lc - lc_base) - change) < 0.3 * norm(change), (t.name, norm((lc - lc_base) - change) / norm(change))


def llama_cpp_quantized(tmp_path, ftype):
    """The tiny Llama as llama.cpp's own quantizer writes it (llama_model_quantize from an F32 file, `pure`: every
    matrix in the one type, or in its fallback Q4_0 where rows of 64 values hold no super-block)."""
    f32 = write_gguf(tmp_path / "f32.gguf", hf_arrays(), QT.F32)
    out = tmp_path / "llama-cpp.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = ftype, 1, True
    assert llama_cpp.llama_model_quantize(os.fspath(f32).encode(), os.fspath(out).encode(), ctypes.byref(params)) == 0
    return out


def test_a_q2_k_file_llama_cpp_made_reads_re_encodes_and_merges(tmp_path, reader):
    """llama.cpp's Q2_K blocks (quantize_row_q2_K_ref, not our encoder): unpacked and packed back byte for byte and
    decoded as gguf-py does; our fresh encoding of the same f32 values is no worse than llama.cpp's (measured 0.26
    against 0.30 of the values' norm); a merge keeps Q2_K and llama.cpp runs the merged file as it decodes."""
    path = llama_cpp_quantized(tmp_path, 10)  # LLAMA_FTYPE_MOSTLY_Q2_K
    src = gr.read_gguf(path)
    downs = [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]
    view = gn.open_gguf_base(path)
    arrays = hf_arrays()
    for n in downs:
        g = view.resolve(n).gguf_name
        assert src.tensors[g].type == QT.Q2_K
        blocks = np.asarray(src.blocks(g)).reshape(-1, 84)
        u = kq.unpack(QT.Q2_K, blocks)
        assert np.array_equal(kq.pack(QT.Q2_K, u), blocks) and len(np.unique(u.sc)) > 8 and len(np.unique(u.mn)) > 8
        np.testing.assert_array_equal(kq.decode(QT.Q2_K, u).reshape(view.array(n).shape), view.array(n))
        ours = kq.decode(QT.Q2_K, kq.unpack(QT.Q2_K, kq.encode(QT.Q2_K, arrays[n].reshape(-1, 256), None, None)))
        err_ours = norm(ours.reshape(arrays[n].shape) - arrays[n]) / norm(arrays[n])
        err_cpp = norm(view.array(n) - arrays[n]) / norm(arrays[n])
        assert err_ours <= err_cpp, (n, err_ours, err_cpp)
    adapter = make_adapter(view, k=4, scale=0.05, targets=downs)
    out = tmp_path / "merged.gguf"
    assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(_saved(adapter, tmp_path)),
                      "--out", os.fspath(out)]) == 0
    merged = gr.read_gguf(out)
    assert all(merged.tensors[view.resolve(n).gguf_name].type == QT.Q2_K for n in downs)
    r_base, r_merged = reader(path), reader(out)
    lc_base, lc = cpp_logits(path), cpp_logits(out)
    change = r_merged - r_base
    assert norm(change) > 0.05 * norm(r_base)
    assert norm(lc - r_merged) < NOISE * norm(r_merged), norm(lc - r_merged) / norm(r_merged)
    assert norm((lc - lc_base) - change) < 0.2 * norm(change), norm((lc - lc_base) - change) / norm(change)
