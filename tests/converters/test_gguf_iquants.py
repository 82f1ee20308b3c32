"""IQ4_NL, IQ4_XS and Q3_K GGUF tensors (llama.cpp's IQ4_XS and Q3_K_M files) kept in their type by a merge.

gguf-py decodes these types but cannot encode them; converters/gguf_kquants.py reads and writes their blocks itself.
Checked against gguf-py's decoder (the reference every reader shares, transformers' GGUF loader included): the byte
layouts both ways and the decoded values bit for bit (random blocks and edge scales: zeros, -0, the largest,
subnormal, Inf and NaN f16 scales), the encoder's error, a merge that keeps every untouched block byte for byte and
re-encodes the touched ones to hold most of the deltas, deltas on the blocks' own levels merged exactly, and a tiny
Llama file with all three types merged without any option.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, quants  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format.converters import gguf_kquants as kq  # noqa: E402
from neuroada_format.converters import gguf_encode as ge  # noqa: E402
from neuroada_format.converters import gguf_merge as gm  # noqa: E402
from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.converters import gguf_read as gr  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402

from test_gguf import hf_arrays, make_adapter, write_gguf  # noqa: E402
from test_gguf_grid_merge import snapped_adapter, touched_blocks  # noqa: E402
from test_gguf_kquants import _saved, kquant_file  # noqa: E402

TYPES = [QT.IQ4_NL, QT.IQ4_XS, QT.Q3_K]
# where each type keeps its f16 d in a block
D_AT = {QT.IQ4_NL: slice(0, 2), QT.IQ4_XS: slice(0, 2), QT.Q3_K: slice(108, 110)}
# relative error of a fresh encoding of Gaussian weights (ours: about 7.5% / 7.6% / 14.6%): 4-bit and 3-bit levels
FRESH_ERROR = {QT.IQ4_NL: 0.085, QT.IQ4_XS: 0.085, QT.Q3_K: 0.16}
# the share of a tiny Llama adapter's change (deltas 0.01 on weights of 0.05) a merge keeps: ours IQ4_NL 0.71 / 0.72,
# IQ4_XS 0.65, Q3_K 0.67 (Q4_K 0.75, Q4_0 0.72 on the same kind of adapter)
FILE_RETENTION = {QT.IQ4_NL: 0.6, QT.IQ4_XS: 0.55, QT.Q3_K: 0.55}
DOWN, UP, V = "model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight", \
    "model.layers.0.self_attn.v_proj.weight"
# the tensors a type can hold in the tiny Llama: super-blocks of 256 need down_proj's rows [64, 256]; IQ4_NL's
# blocks of 32 fit every projection (v_proj and up_proj are not row-permuted: GGUF rows are the model's)
HOLDS = {QT.IQ4_NL: [V, UP], QT.IQ4_XS: [DOWN], QT.Q3_K: [DOWN]}


def random_blocks(t, n, seed):
    """Valid blocks of any content: random bytes with finite f16 scales d."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (n, GGML_QUANT_SIZES[t][1]), dtype=np.uint8)
    b[:, D_AT[t]] = (rng.standard_normal(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
    return b


def gguf_py(t, blocks):
    with np.errstate(invalid="ignore", over="ignore"):
        return quants.dequantize(np.ascontiguousarray(blocks).reshape(-1), t).reshape(len(blocks), -1)


def ours(t, blocks):
    with np.errstate(invalid="ignore", over="ignore"):
        return kq.decode(t, kq.unpack(t, blocks))


def same_bits(a, b):
    """Equal bit for bit (the sign of a zero included; NaN where the other has NaN)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    nan = np.isnan(a)
    assert np.array_equal(nan, np.isnan(b))
    assert np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_layouts_round_trip_and_decode_as_gguf_py(t):
    b = random_blocks(t, 400, seed=1)
    u = kq.unpack(t, b)
    spec = kq.K_TYPES[t]
    if spec.table is None:
        assert u.q.min() == spec.lo and u.q.max() == spec.hi
    else:
        assert set(np.unique(u.q)) == set(kq.IQ4_TABLE)
    assert u.sc.min() == spec.sc_lo and u.sc.max() == spec.sc_hi
    assert np.array_equal(kq.pack(t, u), b)
    same_bits(ours(t, b), gguf_py(t, b))
    D, N = u.grid()  # the grid form decodes the same: fl32(D * q + N), N = -0
    q = u.q.reshape(400, -1, spec.sub).astype(np.float32)
    same_bits((D[..., None] * q + N[..., None]).reshape(400, -1), ours(t, b))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_edge_blocks_decode_as_gguf_py(t):
    """Zero bytes, and every block's f16 d set to 0, -0, +-65504, the smallest subnormal, +-Inf and NaN, with random
    and extreme scales and levels: our values are gguf-py's bit for bit (Inf * 0 -> NaN, -0 products included)."""
    ds = np.array([0.0, -0.0, 65504, -65504, 2 ** -24, -(2 ** -24), 6.1e-5, np.inf, -np.inf, np.nan], np.float16)
    size = GGML_QUANT_SIZES[t][1]
    b = random_blocks(t, 2 * len(ds), seed=2)
    b[:, D_AT[t]] = np.tile(ds, 2).view(np.uint8).reshape(-1, 2)
    extreme = b.copy()  # every scale and level at its lowest: IQ4 codes 0 (level -127), Q3_K hmask and scales 0
    rest = np.ones(size, bool)
    rest[D_AT[t]] = False
    extreme[:, rest] = 0
    b = np.concatenate([np.zeros((1, size), np.uint8), np.full((1, size), 255, np.uint8), b, extreme])
    u = kq.unpack(t, b)
    assert np.array_equal(kq.pack(t, u), b)
    same_bits(ours(t, b), gguf_py(t, b))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_fresh_encoding_round_trips_through_gguf_py(t):
    n = 200 * 256 // GGML_QUANT_SIZES[t][0]
    x = (np.random.default_rng(3).standard_normal((n, GGML_QUANT_SIZES[t][0])) * 0.02).astype(np.float32)
    enc = kq.encode(t, x, None, None)
    assert enc.shape == (n, GGML_QUANT_SIZES[t][1]) and enc.dtype == np.uint8
    dec = gguf_py(t, enc)
    same_bits(dec, ours(t, enc))  # what we claim the bytes hold is what gguf-py reads
    err = np.linalg.norm(dec - x) / np.linalg.norm(x)
    assert FRESH_ERROR[t] * 0.7 < err < FRESH_ERROR[t], err
    assert np.array_equal(kq.encode(t, dec, enc, None), enc)  # values already held: the same bytes
    assert not gguf_py(t, kq.encode(t, np.zeros_like(x), None, None)).any()  # zeros encode to zeros


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_touched_blocks_keep_the_delta_and_untouched_subblocks_their_bytes(t):
    """Two deltas of a typical size per block of 256 values, weighted 100 as the merge weighs them: the re-encoded
    blocks hold most of them, and sub-blocks without a change decode exactly as before (kept scales)."""
    rng = np.random.default_rng(4)
    size = GGML_QUANT_SIZES[t][0]
    base = kq.encode(t, (rng.standard_normal((300, 256)) * 0.02).astype(np.float32).reshape(-1, size), None, None)
    before = gguf_py(t, base).reshape(300, 256)
    target, mask = before.copy(), np.zeros(before.shape, bool)
    for i in range(300):
        c = rng.choice(256, 2, replace=False)
        target[i, c] += (rng.standard_normal(2) * 0.005).astype(np.float32)
        mask[i, c] = True
    out = kq.encode(t, target.reshape(-1, size), base, mask.reshape(-1, size), touched_weight=100.0,
                    decoded=before.reshape(-1, size))
    after = gguf_py(t, out).reshape(300, 256)
    same_bits(after.reshape(-1, size), ours(t, out))
    kept = 1 - np.linalg.norm((after - target)[mask]) / np.linalg.norm((target - before)[mask])
    assert kept > 0.75, kept  # ours: IQ4_NL 0.92, IQ4_XS 0.90, Q3_K 0.83
    blocks_touched = mask.reshape(-1, size).any(1)
    assert np.array_equal(out[~blocks_touched], base[~blocks_touched])  # untouched blocks: byte for byte
    if t == QT.IQ4_NL:
        return
    sub = kq.K_TYPES[t].sub
    changed_sub = np.repeat(mask.reshape(300, -1, sub).any(-1), sub, axis=1)
    fresh = kq.unpack(t, out).d != kq.unpack(t, base).d
    same_scales = ~fresh[:, None] & ~changed_sub
    np.testing.assert_array_equal(after[same_scales], before[same_scales])
    assert fresh.mean() < 0.2  # the original super-scales reach typical deltas


def retention(view, merged, adapter, n):
    """The share of the adapter's change to n's touched values the merged file keeps (test_gguf_kquants' measure)."""
    want = naf.merge_weight(view.array(n), [adapter.targets[n]])
    touched = np.zeros(want.shape, bool)
    touched[np.arange(want.shape[0])[:, None], adapter.targets[n].indices] = True
    return 1 - np.linalg.norm((merged.array(n) - want)[touched]) / np.linalg.norm((view.array(n) - want)[touched])


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_a_file_merges_without_options_and_keeps_its_types(tmp_path, t):
    """Touched tensors keep their type: same size, metadata and tensor table, untouched blocks byte for byte, touched
    ones re-encoded to hold most of the deltas (before: refused, asking for --option requant)."""
    types = {n: t for n in HOLDS[t]}
    path = kquant_file(tmp_path, types)
    view = gn.open_gguf_base(path)
    adapter = make_adapter(view, k=4, scale=0.01, targets=list(types) + ["model.layers.0.self_attn.q_proj.weight"])
    out = tmp_path / "merged.gguf"
    assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(_saved(adapter, tmp_path)),
                      "--out", os.fspath(out)]) == 0
    src, dst = gr.read_gguf(path), gr.read_gguf(out)
    raw_src, raw_dst = path.read_bytes(), out.read_bytes()
    assert len(raw_src) == len(raw_dst) and raw_src[:src.data_start] == raw_dst[:dst.data_start]
    holds = touched_blocks(view, adapter)
    merged = gn.open_gguf_base(out)
    for n in types:
        g = view.resolve(n).gguf_name
        assert dst.tensors[g].type == t
        a, b = src.blocks(g), dst.blocks(g)
        assert np.array_equal(a[~holds[g]], b[~holds[g]]), n
        assert not np.array_equal(a[holds[g]], b[holds[g]]), n
        want = naf.merge_weight(view.array(n), [adapter.targets[n]])
        weight = np.where(want != view.array(n), 100.0, 1.0)  # the merge's default touched_weight
        assert (weight * (merged.array(n) - want) ** 2).sum() < 0.5 * (weight * (view.array(n) - want) ** 2).sum()
        kept = retention(view, merged, adapter, n)
        assert kept > FILE_RETENTION[t], (n, kept)
    assert naf.validate(adapter, view).ok


def table_snapped_adapter(view, targets, k=5, seed=8):
    """Deltas that move each selected value one level along its block's table levels (w0 + delta is D * a table
    value, exactly: neighbouring levels differ by at most 24, so the f32 difference and sum are exact)."""
    rng = np.random.default_rng(seed)
    table = np.array(kq.IQ4_TABLE, np.float32)
    out = {}
    for n in targets:
        m = view.resolve(n)
        assert m.inverse is None and not m.transposed
        info = view.file.tensors[m.gguf_name]
        u = kq.unpack(info.type, np.asarray(view.file.blocks(m.gguf_name)))
        sub = kq.K_TYPES[info.type].sub
        D = u.grid()[0].reshape(info.shape[0], -1)
        w = view.array(n)
        idx = naf.select_indices(w, k)
        rows = np.arange(idx.shape[0])[:, None]
        dd, w0 = D[rows, idx // sub], w[rows, idx]
        j = np.searchsorted(table, w0 / dd)
        assert np.array_equal(table[j] * dd, w0)  # the base's values are its levels
        step = rng.choice([-1, 1], idx.shape)
        j = np.where((j + step < 0) | (j + step > 15), j - step, j + step)
        out[n] = naf.Target.from_weight(n, w, idx, (table[j] * dd - w0).astype(np.float32), value_dtype="F32")
    return naf.Adapter(out, base_name="tiny-llama")


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_deltas_on_the_blocks_levels_merge_exactly(tmp_path, t):
    """Deltas onto the blocks' own levels (Q3_K: `block_grid` per sub-block, as train_on_grid snaps; IQ4: the table
    levels of each block's scale): every touched block is packed on its own scales, the merged file decodes to the
    rule-M values bit for bit, nothing re-encoded, only levels moved."""
    n = HOLDS[t][0]
    path = kquant_file(tmp_path, {n: t})
    view = gn.open_gguf_base(path)
    if t == QT.Q3_K:
        d, m, lo, hi, sub = ge.block_grid(view, n)
        assert (lo, hi, sub) == (-4, 3, 16) and d.shape == (64, 16)
        adapter = snapped_adapter(view, k=5, targets=[n])
    else:
        with pytest.raises(naf.NeuroAdaUsageError, match=f"{t.name} has no grid here: its levels are a non-uniform"):
            ge.block_grid(view, n)
        adapter = table_snapped_adapter(view, [n])
    s = gm.merge_gguf(path, [adapter], tmp_path / "m.gguf")
    assert s.details["blocks_reencoded"] == 0 and s.details["blocks_on_grid"] > 0 and not s.warnings
    merged = gn.open_gguf_base(tmp_path / "m.gguf")
    want = naf.merge_weight(view.array(n), [adapter.targets[n]])
    assert not np.array_equal(want, view.array(n))
    np.testing.assert_array_equal(merged.array(n), want)
    g = view.resolve(n).gguf_name
    a, b = kq.unpack(t, gr.read_gguf(path).blocks(g)), kq.unpack(t, gr.read_gguf(tmp_path / "m.gguf").blocks(g))
    assert np.array_equal(a.d, b.d) and np.array_equal(a.sc, b.sc)
    assert not np.array_equal(a.q, b.q)


def test_transformers_reads_a_merged_file_as_our_view(tmp_path):
    """An independent reader: transformers' GGUF loader de-quantizes the merged IQ4_NL / IQ4_XS / Q3_K tensors to our
    values."""
    transformers = pytest.importorskip("transformers")
    types = {V: QT.IQ4_NL, DOWN: QT.IQ4_XS, "model.layers.0.mlp.down_proj.weight": QT.Q3_K}
    path = kquant_file(tmp_path, types)
    view = gn.open_gguf_base(path)
    adapter = make_adapter(view, k=4, scale=0.01, targets=list(types))
    out = tmp_path / "m" / "merged.gguf"
    out.parent.mkdir()
    gm.merge_gguf(path, [adapter], out)
    assert {gr.read_gguf(out).tensors[view.resolve(n).gguf_name].type for n in types} == set(TYPES)
    sd = transformers.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).state_dict()
    merged = gn.open_gguf_base(out)
    for n in types:
        np.testing.assert_array_equal(sd[n].numpy(), merged.array(n), err_msg=n)
        assert not np.array_equal(merged.array(n), view.array(n))


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_touched_tensors_retyped_into_the_type(tmp_path, t):
    """--option target_type=IQ4_NL (or IQ4_XS, Q3_K): each touched tensor encoded afresh in that type (the others keep
    theirs), decoding near the rule-M values with the type's usual error; the file is laid out anew."""
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.F16)
    view = gn.open_gguf_base(path)
    adapter = make_adapter(view, k=4, targets=[DOWN])
    out = tmp_path / "m.gguf"
    assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(_saved(adapter, tmp_path)), "--out",
                      os.fspath(out), "--option", f"target_type={t.name}"]) == 0
    dst = gr.read_gguf(out)
    assert dst.tensors["blk.1.ffn_down.weight"].type == t and dst.tensors["blk.0.ffn_down.weight"].type == QT.F16
    want = naf.merge_weight(view.array(DOWN), [adapter.targets[DOWN]])
    err = np.linalg.norm(gn.open_gguf_base(out).array(DOWN) - want) / np.linalg.norm(want)
    assert err < FRESH_ERROR[t], err


def test_table_levels_are_the_nearest_entry_at_every_midpoint():
    """IQ4 levels come from a lookup by ceil(2q) (faster than a binary search per value): each is the nearest
    IQ4_TABLE entry, the lower one at an exact midpoint, on both sides of every midpoint (one f32 step away), at zeros
    of both signs, past the table's ends, and on random f32 bit patterns."""
    mids = ((kq._TABLE[1:] + kq._TABLE[:-1]) / 2).astype(np.float32)
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    q = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
                        np.float32([0.0, -0.0, 1e-30, -1e-30, 255.9, 256.0, 300.0, -300.0, 3e38, -3e38]),
                        np.linspace(-140, 130, 100_001, dtype=np.float32), bits[np.isfinite(bits)]])
    table = np.array(kq.IQ4_TABLE, np.float32)
    near = np.clip(q, -1e3, 1e3).astype(np.float64)  # (same nearest entry; huge values would tie in float64)
    want = table[np.abs(near[:, None] - table[None, :]).argmin(1)]  # first of equals: the lower
    for t in (QT.IQ4_XS, QT.IQ4_NL):
        np.testing.assert_array_equal(kq._levels(t, np.float32(1), np.float32(-0.0), q.copy()), want)
