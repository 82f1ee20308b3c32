"""K-quant GGUF tensors (Q2_K, Q4_K, Q5_K, Q6_K: llama.cpp's Q2_K, Q4_K_M / Q5_K_M files) kept in their type by a merge.

gguf-py decodes these types but cannot encode them, so converters/gguf_kquants.py reads and writes their
super-blocks itself. Checked here against gguf-py's decoder (the reference every reader shares, transformers'
GGUF loader included): the byte layouts both ways, the encoder's error, a merge that keeps every untouched
super-block byte for byte and re-encodes the touched ones closer to the merged values, deltas on the sub-block
grids merged exactly, and a Q4_K_M-like file (Q4_K and Q6_K tensors) merged without any option.
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

from test_gguf import TARGETS, hf_arrays, make_adapter, write_gguf  # noqa: E402
from test_gguf_grid_merge import snapped_adapter, touched_blocks  # noqa: E402

K = [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q2_K]
# relative error of a fresh encoding of Gaussian weights: llama.cpp's own quantizers reach about 7% / 3.5% / 1.8%
# on such data, so ours must be in that range (a wrong level or scale layout would be far off); Q2_K's 2-bit levels:
# llama.cpp's quantize_row_q2_K_ref 30% on the tiny Llama's down_proj (test_llama_cpp_types), ours 26%
FRESH_ERROR = {QT.Q4_K: 0.08, QT.Q5_K: 0.04, QT.Q6_K: 0.02, QT.Q2_K: 0.3}
# where a super-block keeps its f16 d (and dmin, after it)
SCALES_AT = {QT.Q4_K: slice(0, 4), QT.Q5_K: slice(0, 4), QT.Q6_K: slice(208, 210), QT.Q2_K: slice(80, 84)}


def random_superblocks(t, n, seed):
    """Valid super-blocks of any content: random bytes with finite f16 super-scales."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (n, GGML_QUANT_SIZES[t][1]), dtype=np.uint8)
    scales = (np.abs(rng.standard_normal((n, 2))) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 4)
    at = SCALES_AT[t]
    b[:, at] = scales[:, :at.stop - at.start]
    return b


@pytest.mark.parametrize("t", K, ids=lambda t: t.name)
def test_layouts_round_trip_and_decode_as_gguf_py(t):
    b = random_superblocks(t, 300, seed=1)
    u = kq.unpack(t, b)
    spec = kq.K_TYPES[t]
    assert u.q.min() >= spec.lo and u.q.max() <= spec.hi and u.q.min() == spec.lo and u.q.max() == spec.hi
    assert np.array_equal(kq.pack(t, u), b)
    np.testing.assert_array_equal(kq.decode(t, u), quants.dequantize(b.reshape(-1), t).reshape(300, 256))
    D, N = u.grid()  # the grid form decodes the same: one rounding, fl32(D * q + N)
    q = u.q.reshape(300, -1, spec.sub).astype(np.float32)
    np.testing.assert_array_equal((D[..., None] * q + N[..., None]).reshape(300, 256), kq.decode(t, u))


def test_q2_k_edge_superblocks_decode_as_gguf_py():
    """Q2_K's f16 d and dmin each set to 0, -0, +-65504, the smallest subnormal, the smallest normal, +-Inf and NaN
    (every pair), under random, all-lowest and all-highest scales, minimums and levels, and all-zero and all-one
    bytes: our values are gguf-py's bit for bit (Inf * 0 -> NaN, -0 products and sums included), in the grid form
    (D * q + N, N = -(dmin * mn)) too, and the bytes round-trip."""
    from test_gguf_iquants import gguf_py, ours, same_bits  # (they import this module: not at its top)
    t = QT.Q2_K
    ds = np.array([0.0, -0.0, 65504, -65504, 2 ** -24, -(2 ** -24), 2 ** -14, np.inf, -np.inf, np.nan], np.float16)
    pairs = np.stack(np.meshgrid(ds, ds, indexing="ij"), axis=-1).reshape(-1, 2)  # [100, (d, dmin)]
    b = random_superblocks(t, len(pairs), seed=4)
    b[:, 80:84] = pairs.view(np.uint8).reshape(-1, 4)
    low, high = b.copy(), b.copy()
    low[:, :80], high[:, :80] = 0, 255  # sc = mn = 0, levels 0; sc = mn = 15, levels 3
    b = np.concatenate([np.zeros((1, 84), np.uint8), np.full((1, 84), 255, np.uint8), b, low, high])
    u = kq.unpack(t, b)
    assert np.array_equal(kq.pack(t, u), b)
    same_bits(ours(t, b), gguf_py(t, b))
    with np.errstate(invalid="ignore", over="ignore"):
        D, N = u.grid()
        grid = (D[..., None] * u.q.reshape(len(b), 16, 16).astype(np.float32) + N[..., None]).reshape(len(b), 256)
    same_bits(grid, gguf_py(t, b))


@pytest.mark.parametrize("t", K, ids=lambda t: t.name)
def test_fresh_encoding_error_is_that_of_the_type(t):
    x = (np.random.default_rng(2).standard_normal((200, 256)) * 0.02).astype(np.float32)
    enc = kq.encode(t, x, None, None)
    assert enc.shape == (200, GGML_QUANT_SIZES[t][1])
    dec = quants.dequantize(enc.reshape(-1), t).reshape(x.shape)
    err = np.linalg.norm(dec - x) / np.linalg.norm(x)
    assert FRESH_ERROR[t] / 2 < err < FRESH_ERROR[t], err
    assert np.array_equal(kq.encode(t, dec, enc, None), enc)  # values already held: the same bytes


@pytest.mark.parametrize("t", K, ids=lambda t: t.name)
def test_touched_superblocks_keep_the_delta_and_untouched_subblocks_their_bytes(t):
    """Two deltas of a typical size per super-block: the re-encoded block holds most of them (weighted 100, as the
    merge weighs them), and sub-blocks without a change decode exactly as before."""
    rng = np.random.default_rng(3)
    base = kq.encode(t, (rng.standard_normal((300, 256)) * 0.02).astype(np.float32), None, None)
    before = quants.dequantize(base.reshape(-1), t).reshape(300, 256)
    target, mask = before.copy(), np.zeros(before.shape, bool)
    for i in range(300):
        c = rng.choice(256, 2, replace=False)
        target[i, c] += (rng.standard_normal(2) * 0.005).astype(np.float32)
        mask[i, c] = True
    out = kq.encode(t, target, base, mask, touched_weight=100.0, decoded=before)
    after = quants.dequantize(out.reshape(-1), t).reshape(300, 256)
    kept = 1 - np.linalg.norm((after - target)[mask]) / np.linalg.norm((target - before)[mask])
    assert kept > (0.8 if t == QT.Q2_K else 0.85), kept  # Q2_K: 4 levels per sub-block of 16, 0.83 kept
    sub = kq.K_TYPES[t].sub
    changed_sub = np.repeat(mask.reshape(300, -1, sub).any(-1), sub, axis=1)
    fresh = np.array([not np.array_equal(kq.unpack(t, out[i:i + 1]).d, kq.unpack(t, base[i:i + 1]).d)
                      for i in range(300)])
    same_scales = ~fresh[:, None] & ~changed_sub
    np.testing.assert_array_equal(after[same_scales], before[same_scales])
    assert fresh.mean() < 0.2  # the original super-scales reach typical deltas


def test_q2_k_kept_scales_refit_with_the_best_of_all_256_pairs():
    """Under a touched super-block's kept d and dmin, a changed Q2_K sub-block gets the (sc, mn) of least weighted
    squared error of all 16 x 16 (spec section 15.3), not only of those near a least-squares fit (0.81 of the deltas
    kept instead of 0.83)."""
    t = QT.Q2_K
    rng = np.random.default_rng(7)
    base = kq.encode(t, (rng.standard_normal((200, 256)) * 0.02).astype(np.float32), None, None)
    before = quants.dequantize(base.reshape(-1), t).reshape(200, 256)
    target, mask = before.copy(), np.zeros(before.shape, bool)
    col = rng.integers(0, 256, 200)
    mask[np.arange(200), col] = True
    target[mask] += (rng.standard_normal(200) * 0.005).astype(np.float32)
    w = np.where(mask, np.float32(100), np.float32(1))
    out = kq.encode(t, target, base, mask, touched_weight=100.0, decoded=before)
    a, b = kq.unpack(t, base), kq.unpack(t, out)
    kept = (a.d == b.d) & (a.dmin == b.dmin)
    assert kept.mean() > 0.8
    rows, s = np.flatnonzero(kept), col[kept] // 16
    x, ws = target.reshape(200, 16, 16)[rows, s], w.reshape(200, 16, 16)[rows, s]
    pairs = np.array([(i, j) for i in range(16) for j in range(16)], np.float32)
    D = a.d[rows, None] * pairs[None, :, 0]   # [r, 256]
    N = -(a.dmin[rows, None] * pairs[None, :, 1])
    q = np.clip(np.rint((x[:, None] - N[..., None]) / np.where(D == 0, 1, D)[..., None]), 0, 3)
    best = (ws[:, None] * (D[..., None] * q + N[..., None] - x[:, None]) ** 2).sum(-1).min(1)
    got = (ws * (quants.dequantize(out[rows].reshape(-1), t).reshape(-1, 16, 16)[np.arange(len(rows)), s] - x) ** 2
           ).sum(-1)
    np.testing.assert_allclose(got, best, rtol=1e-5, atol=1e-12)


def kquant_file(tmp_path, types, seed=0, rest=QT.Q8_0):
    """The tiny Llama with some projections in the given types (K and IQ4 types encoded by us from its f32 values,
    gguf-py's by gguf-py), the other projections in `rest`."""
    arrays = hf_arrays(seed)
    raw = {n: kq.encode(t, arrays[n].reshape(-1, GGML_QUANT_SIZES[t][0]), None, None) for n, t in types.items()
           if t in kq.K_TYPES}
    raw = {n: b.reshape(arrays[n].shape[0], -1) for n, b in raw.items()}
    return write_gguf(tmp_path / "base.gguf", arrays, rest, types=types, raw=raw)


# the projections whose rows hold whole super-blocks: down_proj [64, 256]; the other tensors stay Q8_0. The share of
# the deltas (0.01 on weights of about 0.04) a merge keeps: Q4_K/Q6_K most; Q2_K's steps are about three times the
# deltas (kept 0.47 and 0.52)
FILES = {"Q4_K_M": ({"model.layers.0.mlp.down_proj.weight": QT.Q4_K, "model.layers.1.mlp.down_proj.weight": QT.Q6_K},
                    0.5),
         "Q2_K": ({"model.layers.0.mlp.down_proj.weight": QT.Q2_K, "model.layers.1.mlp.down_proj.weight": QT.Q2_K},
                  0.4)}


@pytest.mark.parametrize("kind", FILES)
def test_a_kquant_file_merges_without_options(tmp_path, kind):
    """Q4_K and Q6_K (a Q4_K_M-like file), or Q2_K, tensors keep their types: same size, metadata and tensor table,
    untouched super-blocks byte for byte, touched ones re-encoded to hold most of the deltas (before: refused, asking
    for --option requant; Q2_K until 1.7)."""
    types, retained = FILES[kind]
    path = kquant_file(tmp_path, types)
    view = gn.open_gguf_base(path)
    adapter = make_adapter(view, k=4, scale=0.01, targets=list(types) + TARGETS[:2])
    out = tmp_path / "merged.gguf"
    assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(_saved(adapter, tmp_path)),
                      "--out", os.fspath(out)]) == 0
    src, dst = gr.read_gguf(path), gr.read_gguf(out)
    raw_src, raw_dst = path.read_bytes(), out.read_bytes()
    assert len(raw_src) == len(raw_dst) and raw_src[:src.data_start] == raw_dst[:dst.data_start]
    holds = touched_blocks(view, adapter)
    merged = gn.open_gguf_base(out)
    for n, t in types.items():
        g = view.resolve(n).gguf_name
        assert dst.tensors[g].type == t
        a, b = src.blocks(g), dst.blocks(g)
        assert np.array_equal(a[~holds[g]], b[~holds[g]]), n
        want = naf.merge_weight(view.array(n), [adapter.targets[n]])
        touched = np.zeros(want.shape, bool)
        touched[np.arange(want.shape[0])[:, None], adapter.targets[n].indices] = True
        weight = np.where(touched, 100.0, 1.0)  # the merge's default touched_weight: what its encoder minimizes
        assert (weight * (merged.array(n) - want) ** 2).sum() < 0.5 * (weight * (view.array(n) - want) ** 2).sum()
        kept = 1 - np.linalg.norm((merged.array(n) - want)[touched]) / np.linalg.norm((view.array(n) - want)[touched])
        assert kept > retained, (n, kept)
    assert naf.validate(adapter, view).ok


def _saved(adapter, tmp_path):
    p = tmp_path / "adapter.safetensors"
    naf.save(adapter, p)
    return p


@pytest.mark.parametrize("t", K, ids=lambda t: t.name)
def test_deltas_on_the_subblock_grids_merge_exactly(tmp_path, t):
    """Deltas trained through the grid (`block_grid` per sub-block, as train_on_grid snaps): every touched super-block
    is packed on its own scales, the merged file decodes to the rule-M values bit for bit, nothing re-encoded."""
    down, up = "model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"
    path = kquant_file(tmp_path, {down: t})
    view = gn.open_gguf_base(path)
    d, m, lo, hi, sub = ge.block_grid(view, down)
    assert (lo, hi, sub) == (kq.K_TYPES[t].lo, kq.K_TYPES[t].hi, kq.K_TYPES[t].sub) and d.shape == (64, 256 // sub)
    adapter = snapped_adapter(view, k=5, targets=[down, up])
    s = gm.merge_gguf(path, [adapter], tmp_path / "m.gguf")
    assert s.details["blocks_reencoded"] == 0 and s.details["blocks_on_grid"] > 0 and not s.warnings
    merged = gn.open_gguf_base(tmp_path / "m.gguf")
    for n in (down, up):
        want = naf.merge_weight(view.array(n), [adapter.targets[n]])
        np.testing.assert_array_equal(merged.array(n), want, err_msg=n)
    # the super-scales and sub-block scales are the base's: only levels moved
    a, b = kq.unpack(t, gr.read_gguf(path).blocks("blk.1.ffn_down.weight")), \
        kq.unpack(t, gr.read_gguf(tmp_path / "m.gguf").blocks("blk.1.ffn_down.weight"))
    assert np.array_equal(a.d, b.d) and np.array_equal(a.sc, b.sc) and np.array_equal(a.mn, b.mn)
    assert not np.array_equal(a.q, b.q)


def test_transformers_reads_a_merged_kquant_file_as_our_view(tmp_path):
    """An independent reader: transformers' GGUF loader de-quantizes the merged Q4_K/Q6_K tensors to our values."""
    transformers = pytest.importorskip("transformers")
    down, up = "model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"
    path = kquant_file(tmp_path, {down: QT.Q6_K})
    view = gn.open_gguf_base(path)
    adapter = make_adapter(view, k=4, scale=0.01, targets=[down, up])
    out = tmp_path / "m" / "merged.gguf"
    out.parent.mkdir()
    gm.merge_gguf(path, [adapter], out)
    sd = transformers.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).state_dict()
    merged = gn.open_gguf_base(out)
    for n in (down, up):
        np.testing.assert_array_equal(sd[n].numpy(), merged.array(n), err_msg=n)


@pytest.mark.parametrize("t", K, ids=lambda t: t.name)
def test_touched_tensors_retyped_into_a_kquant(tmp_path, t):
    """--option target_type=Q4_K (or Q5_K, Q6_K): each touched tensor encoded afresh in that type (the others keep
    theirs), decoding near the rule-M values with the type's usual error; the file is laid out anew."""
    down = "model.layers.1.mlp.down_proj.weight"
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.F16)
    view = gn.open_gguf_base(path)
    adapter = make_adapter(view, k=4, targets=[down])
    s = gm.merge_gguf(path, [adapter], tmp_path / "m.gguf", target_type=t.name)
    assert s.details["retyped"] == {"blk.1.ffn_down.weight": t.name}
    dst = gr.read_gguf(tmp_path / "m.gguf")
    assert dst.tensors["blk.1.ffn_down.weight"].type == t and dst.tensors["blk.0.ffn_down.weight"].type == QT.F16
    want = naf.merge_weight(view.array(down), [adapter.targets[down]])
    err = np.linalg.norm(gn.open_gguf_base(tmp_path / "m.gguf").array(down) - want) / np.linalg.norm(want)
    assert err < FRESH_ERROR[t], err


@pytest.mark.parametrize("t", [QT.Q4_K, QT.Q5_K, QT.Q2_K], ids=lambda t: t.name)
def test_a_negative_value_past_the_minimums_reach_is_refused(tmp_path, t, capsys):
    """Q4_K/Q5_K hold a negative value only through dmin * mn (at most 65504 * 63; Q2_K's 4-bit mn: 65504 * 15) with
    llama.cpp's positive d, but
    the limit let values down to -65504 * 63 * 15 through: the fresh encoder's dmin overflowed to Inf, the block decoded
    far off, numpy's 'invalid value encountered in multiply' reached the CLI as a warning line, exit 0. Past the reach:
    refused naming the file and tensor; within it: merged near the value, no numpy line."""
    down = "model.layers.1.mlp.down_proj.weight"
    path = kquant_file(tmp_path, {down: t})
    view = gn.open_gguf_base(path)
    W = view.array(down)
    idx = naf.select_indices(W, 2)
    reach = 65504.0 * kq.K_TYPES[t].sc_hi  # the largest minimum integer: the scales' range
    for value, code in ((-1.5 * reach, 1), (-0.9 * reach, 0)):
        vals = np.zeros(idx.shape, np.float32)
        vals[0, 0] = value - W[0, idx[0, 0]]
        adapter = naf.Adapter({down: naf.Target.from_weight(down, W, idx, vals)}, base_name="tiny-llama")
        out = tmp_path / f"m{code}.gguf"
        assert merge_run(["--base", os.fspath(path), "--adapter", os.fspath(_saved(adapter, tmp_path)),
                          "--out", os.fspath(out)]) == code
        err = capsys.readouterr().err
        assert "encountered" not in err, err
        if code:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and f"beyond what a {t.name} block can encode" in lines[0], err
            assert os.fspath(path) in lines[0] and "blk.1.ffn_down.weight" in lines[0] and not out.exists()
        else:
            merged = gn.open_gguf_base(out).array(down)
            assert np.isfinite(merged).all()
            assert abs(merged[0, idx[0, 0]] - value) < 0.05 * reach


def _pinned_reencodes():
    """sha256 prefixes of seeded re-encodes of every K-quant and IQ4 type: a fresh encoding of Gaussian weights, then
    its super-blocks holding k=20 deltas per row (a tenth of them large, past the kept scales' reach) re-encoded at
    touched weights 100 and 7."""
    import hashlib
    out = {}
    for t in kq.K_TYPES:
        rng = np.random.default_rng(int(t))
        block = GGML_QUANT_SIZES[t][0]
        x = (rng.standard_normal((16, 2048)) * 0.03).astype(np.float32)
        x[0, :300] = 0
        original = kq.encode(t, x.reshape(-1, block), None, None)
        before = quants.dequantize(original.reshape(-1), t).reshape(x.shape)
        idx = np.sort(rng.choice(x.shape[1], size=(16, 20)), axis=1)
        target = before.copy()
        scale = np.where(rng.random(idx.shape) < 0.1, 0.2, 0.01)
        target[np.arange(16)[:, None], idx] += (rng.standard_normal(idx.shape) * scale).astype(np.float32)
        mask = np.zeros(x.shape, bool)
        mask[np.arange(16)[:, None], idx] = True
        tb, mb, db = (a.reshape(-1, block) for a in (target, mask, before))
        ids = np.flatnonzero(mb.any(1))
        parts = [original] + [ge.encode_blocks(t, tb[ids], original[ids], mb[ids], touched_weight=tw, decoded=db[ids])
                              for tw in (100.0, 7.0)]
        out[t.name] = hashlib.sha256(b"".join(p.tobytes() for p in parts)).hexdigest()[:16]
    return out


# the bytes of the encoders before their searches were vectorized anew and split between threads (1.7): the same
PINNED_REENCODES = {"Q4_K": "16b678ba84d0e027", "Q5_K": "a1cb8b0db14ecda3", "Q6_K": "af4d9d118becc638",
                    "Q3_K": "46a73115224673af", "Q2_K": "286b923a098056a2", "IQ4_XS": "8845d18374ffc84e",
                    "IQ4_NL": "b941aafab2e3076c"}


def test_reencoded_bytes_are_those_of_the_encoder_before():
    """Speeding the encoders up changed no byte: seeded encodes of every type hash as they did before."""
    assert _pinned_reencodes() == PINNED_REENCODES


def test_all_scales_search_breaks_an_exact_tie_as_before():
    """A Q3_K sub-block whose scales 11 and -11 give the same error bit for bit but for the order of the 16 additions:
    alone in its chunk of the search (1024 sub-blocks for Q3_K's 64 scales) its errors were summed in order (numpy's
    layout of a [16, C, 1] temporary) and 11 won; in a chunk of several, pairwise (a sub-block-contiguous layout) and
    -11 won. Both stay so, whatever the new search's chunks and threads."""
    bits = [3163363328, 3163363328, 2147483648, 2147483648, 1015879680, 1028891648, 1024268288, 1015879680,
            3176375296, 3163363328, 2147483648, 3171751936, 3148562364, 3163363328, 2147483648, 2147483648]
    x = np.array(bits, np.uint32).view(np.float32)
    w = np.ones(16, np.float32)
    w[12] = 100
    d = np.float32(-7.176399e-04)
    for m in (1, 2, 5, 1025, 2049, 3000):
        want = np.full(m, -11)
        if m % 1024 == 1:  # the last chunk holds one sub-block
            want[-1] = 11
        X, W = np.repeat(x[None], m, 0), np.repeat(w[None], m, 0)
        sc, _ = kq._fit_all_scales(QT.Q3_K, X, W, np.full(m, d), np.zeros(m, np.float32), np.full(m, 24),
                                   np.zeros(m, np.int64))
        np.testing.assert_array_equal(sc, want)


@pytest.mark.parametrize("t", [t for t in kq.K_TYPES if kq.batch_values(t, 1) > 1] or [QT.Q4_K], ids=lambda t: t.name)
def test_types_merged_in_wider_batches_encode_each_superblock_on_its_own(t):
    """The merge re-encodes Q4_K / Q5_K / Q6_K / IQ4_NL in 4x larger batches, split between two threads: that keeps
    the bytes only because a super-block's encoding does not depend on the others in its batch. A batch of 600
    touched super-blocks (split in the encoder) gives the bytes of batches of 1, 7 and 64 (not split)."""
    block = GGML_QUANT_SIZES[t][0]
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((600, block)) * 0.03).astype(np.float32)
    original = kq.encode(t, x, None, None)
    before = quants.dequantize(original.reshape(-1), t).reshape(x.shape)
    mask = rng.random(x.shape) < 0.02
    mask[:, 0] |= ~mask.any(1)
    target = np.where(mask, before + (rng.standard_normal(x.shape) * 0.05).astype(np.float32), before)
    whole = kq.encode(t, target, original, mask, 100.0, before)
    for size in (1, 7, 64):
        parts = [kq._encode(t, target[i:i + size], original[i:i + size], mask[i:i + size], 100.0, before[i:i + size])
                 for i in range(0, len(x), size)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_the_second_thread_keeps_the_callers_errstate_and_its_errors():
    """A search split between two threads behaves as one call: the half on the pool's thread runs under the caller's
    numpy errstate (a context variable, which a new thread would not have), and its exceptions reach the caller."""
    seen = []

    def work(lo, hi):
        seen.append(np.geterr()["over"])
        if lo > 0:
            raise ValueError("second half")
    with np.errstate(over="raise"):
        with pytest.raises(ValueError, match="second half"):
            kq._split(work, 1000, kq._SPLIT_VALUES)
    assert seen == ["raise", "raise"] or kq._THREADS < 2
