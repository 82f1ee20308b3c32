"""GGUF merges of deltas on the blocks' original grids: exact, packed with each block's own scale and
minimum, no block search; and the count of such blocks against re-encoded ones in the summary and the
warning (converters/gguf_encode.py, `on_original_grid`).

The grid-snapped adapters here are made from `block_grid` the way the runtime's QuantGrid snaps (the
training path itself, `train_on_grid`, is tests/runtime/test_quant_grid.py's). Off-grid blocks must get
exactly what the least-error encoder (`encode_blocks`) gives them, which is what the merge wrote before.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, quants  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format.converters import gguf_encode as ge  # noqa: E402
from neuroada_format.converters import gguf_merge as gm  # noqa: E402
from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.converters import gguf_read as gr  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402

from test_gguf import HIDDEN, TARGETS, hf_arrays, make_adapter, write_gguf  # noqa: E402
from test_gguf_stream import whole_tensor_reference  # noqa: E402  (the encoder on every touched block)

GRID_TYPES = [QT.Q4_1, QT.Q4_0, QT.Q8_0]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(gm, "BLOCK_VALUES", 200)  # tensors merged a few rows at a time: counts add up over chunks


def snapped_adapter(view, k=4, seed=8, targets=TARGETS) -> naf.Adapter:
    """Deltas that move each selected value 1-2 levels along its block's grid (w0 + delta on the grid),
    computed as the runtime's QuantGrid computes them (q * d + m - w0, f32)."""
    rng = np.random.default_rng(seed)
    out = {}
    for n in targets:
        w = view.array(n)
        idx = naf.select_indices(w, k)
        d, m, lo, hi, block = ge.block_grid(view, n)
        rows = np.arange(idx.shape[0])[:, None]
        dd, mm = d[rows, idx // block], m[rows, idx // block]
        w0 = w[rows, idx]
        q0 = np.rint((w0 - mm) / np.where(dd == 0, 1, dd))
        step = rng.choice([-2, -1, 1, 2], idx.shape)
        q = np.where((q0 + step < lo) | (q0 + step > hi), q0 - step, q0 + step).astype(np.float32)
        out[n] = naf.Target.from_weight(n, w, idx, (q * dd + mm - w0).astype(np.float32), value_dtype="F32")
    return naf.Adapter(out, base_name="tiny-llama")


def touched_blocks(view, adapter) -> dict[str, np.ndarray]:
    """GGUF tensor -> bool per block: holds a selected value of the adapter."""
    out = {}
    for n, t in adapter.targets.items():
        m = view.resolve(n)
        info = view.file.tensors[m.gguf_name]
        idx = np.asarray(t.indices) if m.perm is None else np.asarray(t.indices)[m.perm]
        block = GGML_QUANT_SIZES[info.type][0]
        holds = np.zeros(info.nbytes // GGML_QUANT_SIZES[info.type][1], bool)
        holds[(np.arange(idx.shape[0])[:, None] * (info.ne[0] // block) + idx // block).reshape(-1)] = True
        out[m.gguf_name] = holds
    return out


# -- the grid test itself ---------------------------------------------------------------------------------
def levels(qt, blocks) -> np.ndarray:
    """The integer levels [B, 32] of Q4_1 / Q4_0 / Q8_0 blocks, read off their bytes (llama.cpp's layout:
    value j in the low nibble of byte j for j < 16, in the high nibble of byte j - 16 after that)."""
    head = 4 if qt == QT.Q4_1 else 2
    body = blocks[:, head:]
    if qt == QT.Q8_0:
        return body.copy().view(np.int8).astype(np.float32)
    q = np.concatenate([body & 15, body >> 4], axis=1).astype(np.float32)
    return q - 8 if qt == QT.Q4_0 else q


def at(target, mask):
    """(block, column, value) of the masked entries: what the merge hands `on_original_grid`."""
    b, c = np.nonzero(mask)
    return b, c, target[b, c]


@pytest.mark.parametrize("qt", GRID_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("given", ["changed", "every"])
def test_on_original_grid_agrees_with_the_reader(qt, given):
    """Blocks moved along their own grid are found on it and packed so that gguf-py decodes them to the
    target bit for bit with the original scale/minimum bytes; blocks off it (a value between levels, past
    the last level, a NaN) are not; a block with no change keeps its bytes, even with a zero scale.
    given: the merge hands over its touched values, changed or not; either way the answer is the same."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 32)) * 0.05).astype(np.float32)
    x[5] = 0.0                                           # an all-zero block: scale 0, every level decodes to m
    x[6, :16] = 0.0
    orig = quants.quantize(x, qt)
    orig[50, :2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # a NaN scale: every value NaN
    dec = quants.dequantize(orig, qt).astype(np.float32).reshape(64, 32)
    lo, hi, affine = ge._GRID[qt]
    head = 4 if affine else 2
    d = orig[:, :2].copy().view(np.float16).astype(np.float32)
    m = orig[:, 2:4].copy().view(np.float16).astype(np.float32) if affine else np.float32(0)
    q = levels(qt, orig)
    np.testing.assert_array_equal(d * q + m, dec)        # the levels as gguf-py decodes them (NaN too)
    moved = np.clip(q + rng.integers(-3, 4, q.shape) * (rng.random(q.shape) < 0.3), lo, hi)
    target = (d * moved + m).astype(np.float32)
    target[:8] = dec[:8]                                  # no change at all (5: zero scale)
    target[40, [2, 18]] = d[40, 0] * np.float32([lo, hi]) + (m[40, 0] if affine else 0)  # both nibbles of a byte
    off = np.zeros(64, bool)
    off[[10, 20, 30, 50]] = True
    target[50] = dec[50]
    target[10, 3] += d[10, 0] * 0.5 + 1e-3               # between two levels
    target[20, 7] = np.nan
    target[30, 0] = d[30, 0] * (hi + 2) + (m[30, 0] if affine else 0)  # past the last level
    mask = np.ones_like(target, bool) if given == "every" else target != dec
    on, packed = ge.on_original_grid(qt, orig, dec, *at(target, mask))
    np.testing.assert_array_equal(on, ~off)
    np.testing.assert_array_equal(ge._decode(packed[on], qt).reshape(-1, 32), target[on])  # the reader's values
    assert np.array_equal(packed[:, :head], orig[:, :head])                              # scale/minimum bytes kept
    assert np.array_equal(packed[:8], orig[:8])                                          # unchanged: same bytes
    keep = (target == dec)[on]                                                           # unchanged values: same level
    assert np.array_equal(levels(qt, packed[on])[keep], q[on][keep])


def test_a_zero_level_keeps_its_sign_from_the_scale():
    """Q4_0 decodes level 0 as d * 0: -0.0 under a negative scale (gguf-py's quantizer makes one when the
    block's largest magnitude is positive). A merged +0.0 there is the same value, so the block is on its
    grid (the merged file reads back -0.0, equal to the runtime's 0.0)."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 1.0
    x[0, 1] = -0.5
    orig = quants.quantize(x, QT.Q4_0)
    assert orig[:, :2].copy().view(np.float16)[0, 0] < 0
    dec = quants.dequantize(orig, QT.Q4_0).reshape(1, 32)
    target = dec.copy()
    target[0, 1] = 0.0
    on, packed = ge.on_original_grid(QT.Q4_0, orig, dec, np.array([0]), np.array([1]), np.float32([0.0]))
    back = ge._decode(packed, QT.Q4_0).reshape(target.shape)
    assert on.all() and np.array_equal(back, target) and np.signbit(back[0, 1])


def test_blocks_without_a_grid_are_on_it_only_unchanged():
    """Q5_1 (no grid here): a block whose values did not change is kept, any change goes to the encoder."""
    x = (np.random.default_rng(2).standard_normal((4, 32)) * 0.05).astype(np.float32)
    orig = quants.quantize(x, QT.Q5_1)
    dec = quants.dequantize(orig, QT.Q5_1).reshape(4, 32)
    target = dec.copy()
    target[1, 4] += 0.01
    on, packed = ge.on_original_grid(QT.Q5_1, orig, dec, *at(target, np.ones_like(target, bool)))
    assert on.tolist() == [True, False, True, True] and np.array_equal(packed[on], orig[on])


# -- merges --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qt", GRID_TYPES, ids=lambda t: t.name)
def test_snapped_adapter_merges_exactly_and_is_counted(tmp_path, small_chunks, qt):
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), qt)
    view = gn.open_gguf_base(path)
    adapter = snapped_adapter(view)
    out = tmp_path / "m.gguf"
    s = gm.merge_gguf(path, [adapter], out)
    holds = touched_blocks(view, adapter)
    n_touched = sum(int(h.sum()) for h in holds.values())
    assert s.details["blocks_on_grid"] == n_touched and s.details["blocks_reencoded"] == 0
    assert s.details["units_rewritten"] == n_touched
    assert not any("not exact" in w or "re-encoded" in w for w in s.warnings), s.warnings
    assert "exact" in s.details["note"] and f"{n_touched:,}" in s.details["note"]
    mv = gn.open_gguf_base(out)
    for n, t in adapter.targets.items():
        np.testing.assert_array_equal(mv.array(n), naf.merge_weight(view.array(n), [t]), err_msg=n)
    src, dst = gr.read_gguf(path), gr.read_gguf(out)
    head = 4 if qt == QT.Q4_1 else 2
    for g in src.tensors:
        a, b = np.asarray(src.blocks(g)), np.asarray(dst.blocks(g))
        h = holds.get(g, np.zeros(a.shape[0], bool))
        assert np.array_equal(a[~h], b[~h]), g                        # untouched blocks byte-identical
        if h.any():
            assert np.array_equal(a[:, :head], b[:, :head]), g        # scales (and minima) kept
            assert not np.array_equal(a[h], b[h]), g                  # only the levels changed


def test_off_grid_adapter_keeps_the_encoder_and_warns(tmp_path, small_chunks):
    """Random deltas: every touched block is re-encoded by the least-error encoder exactly as before
    (the whole-tensor reference calls it on every touched block), and the warning says so, with counts."""
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.Q4_1)
    view = gn.open_gguf_base(path)
    adapter = make_adapter(view, k=5, seed=3)
    out = tmp_path / "m.gguf"
    s = gm.merge_gguf(path, [adapter], out)
    assert out.read_bytes() == whole_tensor_reference(path, [(adapter, 1.0)])
    n_touched = sum(int(h.sum()) for h in touched_blocks(view, adapter).values())
    assert s.details["blocks_on_grid"] == 0 and s.details["blocks_reencoded"] == n_touched
    (w,) = [w for w in s.warnings if "not exact" in w]
    assert f"{n_touched:,} of {n_touched:,} touched blocks" in w and f"in {len(TARGETS)} of {len(TARGETS)}" in w
    # the advice, followed literally, keeps every value exact (it said F16, which rounds the de-quantized values)
    advice = re.search(r"--option target_type=(\w+) keeps every value exact", w).group(1)
    exact = tmp_path / "exact.gguf"
    gm.merge_gguf(path, [adapter], exact, target_type=advice)
    for name, t in adapter.targets.items():
        want = naf.merge_weight(view.array(name), [t])
        assert np.array_equal(gn.open_gguf_base(exact).array(name), want), name
    naive = tmp_path / "naive.gguf"
    gm.merge_gguf(path, [adapter], naive, encoder="naive")
    assert naive.read_bytes() == whole_tensor_reference(path, [(adapter, 1.0)], encoder="naive")


def test_one_off_grid_value_re_encodes_one_block(tmp_path, small_chunks):
    """An on-grid adapter with one value nudged off its grid: that block alone goes to the encoder (its
    bytes what the encoder gives it), every other touched block is packed on its grid; warned, counted."""
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.Q4_1)
    view = gn.open_gguf_base(path)
    adapter = snapped_adapter(view)
    name = TARGETS[3]                                                  # down_proj: no row permutation
    t = adapter.targets[name]
    vals = np.array(t.values)
    vals[2, 1] += np.float32(1e-3)
    targets = dict(adapter.targets)
    targets[name] = naf.Target.from_weight(name, view.array(name), np.asarray(t.indices), vals, value_dtype="F32")
    nudged = naf.Adapter(targets, base_name="tiny-llama")
    out = tmp_path / "m.gguf"
    s = gm.merge_gguf(path, [nudged], out)
    n_touched = sum(int(h.sum()) for h in touched_blocks(view, nudged).values())
    assert s.details["blocks_reencoded"] == 1 and s.details["blocks_on_grid"] == n_touched - 1
    (w,) = [w for w in s.warnings if "not exact" in w]
    assert f"1 of {n_touched:,} touched blocks in 1 of {len(TARGETS)}" in w and "blk.1.ffn_down.weight" in w
    # the nudged block: the encoder's output for it; everything else as the exact merge of the snapped adapter
    exact = tmp_path / "exact.gguf"
    gm.merge_gguf(path, [adapter], exact)
    g = view.resolve(name).gguf_name
    col = int(np.asarray(t.indices)[2, 1])
    block, _ = GGML_QUANT_SIZES[QT.Q4_1]
    bid = 2 * (view.file.tensors[g].ne[0] // block) + col // block
    merged = naf.merge_weight(view.array(name), [targets[name]]).reshape(-1, block)
    mask = np.zeros((1, block), bool)
    for c in np.asarray(t.indices)[2]:
        if c // block == col // block:
            mask[0, c % block] = True
    want = ge.encode_blocks(QT.Q4_1, merged[bid:bid + 1], np.asarray(view.file.blocks(g))[bid:bid + 1], mask,
                            touched_weight=100.0)
    got, ref = gr.read_gguf(out), gr.read_gguf(exact)
    assert np.array_equal(np.asarray(got.blocks(g))[bid:bid + 1], want)
    for name2 in got.tensors:
        a, b = np.asarray(got.blocks(name2)), np.asarray(ref.blocks(name2))
        if name2 == g:
            a, b = np.delete(a, bid, axis=0), np.delete(b, bid, axis=0)
        assert np.array_equal(a, b), name2


def test_kept_tensors_are_counted_when_others_change_type(tmp_path):
    """A merge that lays the file out anew (an IQ2_XS tensor re-encoded as Q8_0 with requant) packs the
    kept Q4_1 tensors' blocks on their grid too; the retyped tensor is warned about, the kept ones are not."""
    rng = np.random.default_rng(5)
    down = "model.layers.1.mlp.down_proj.weight"
    blocks = rng.integers(0, 256, size=(HIDDEN, 74), dtype=np.uint8)  # IQ2_XS: its f16 d is the first 2 bytes
    blocks[:, 0:2] = np.frombuffer(np.float16([0.002]).tobytes(), np.uint8)
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.Q4_1, types={down: QT.IQ2_XS}, raw={down: blocks})
    view = gn.open_gguf_base(path)
    kept = [n for n in TARGETS if n != down]
    adapter = naf.Adapter({**snapped_adapter(view, targets=kept).targets,
                           **make_adapter(view, targets=[down]).targets}, base_name="tiny-llama")
    s = gm.merge_gguf(path, [adapter], tmp_path / "m.gguf", requant="Q8_0")
    assert s.details["retyped"] == {"blk.1.ffn_down.weight": "Q8_0"}
    n_kept = sum(int(h.sum()) for g, h in touched_blocks(view, adapter).items() if g != "blk.1.ffn_down.weight")
    assert s.details["blocks_on_grid"] == n_kept and s.details["blocks_reencoded"] == 0
    assert len(s.warnings) == 1 and "Q8_0" in s.warnings[0] and "re-encoded into a block type" in s.warnings[0]
    mv = gn.open_gguf_base(tmp_path / "m.gguf")
    for n in kept:
        np.testing.assert_array_equal(mv.array(n), naf.merge_weight(view.array(n), [adapter.targets[n]]))


def test_cli_says_exact_or_warns(tmp_path, capsys):
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.Q4_1)
    view = gn.open_gguf_base(path)
    naf.save(snapped_adapter(view), tmp_path / "on.safetensors")
    naf.save(make_adapter(view), tmp_path / "off.safetensors")
    capsys.readouterr()
    assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(tmp_path / "on.safetensors"),
                      "--out", os.fspath(tmp_path / "on.gguf")]) == 0
    cap = capsys.readouterr()
    assert "warning" not in cap.err and "Q4_1 targets exact: all" in cap.out
    assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(tmp_path / "off.safetensors"),
                      "--out", os.fspath(tmp_path / "off.gguf")]) == 0
    cap = capsys.readouterr()
    assert cap.err.count("warning:") == 1 and "not exact" in cap.err and "re-encoded, not exact" in cap.out
