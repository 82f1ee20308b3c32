"""K-quant super-blocks (Q4_K, Q5_K, Q6_K): their levels and scales, and the re-encoding of touched ones.

Why our own: gguf-py decodes K-quants but cannot encode them, and llama.cpp's most used 4- and 5-bit files
(Q4_K_M, Q5_K_M) are made of them. A merge keeps every untouched super-block byte for byte and rewrites only
those holding a merged value, as for the simple block types (gguf_merge).

A super-block holds 256 values in sub-blocks of `sub` values. Sub-block s decodes value i as
``fl32(D_s * q_i + N_s)``, with ``D_s = d * sc_s`` and ``N_s = -(dmin * mn_s)``: d and dmin are f16, sc_s and mn_s
small integers (6 bits for Q4_K/Q5_K; Q6_K has a signed 8-bit sc_s and no minimum), q_i a level in [lo, hi]. Both
products are exact in f32 and so is ``D_s * q_i``, so the one rounding is the sum: the formula of gguf-py's
decoder, which makes (D_s, N_s) a grid like Q4_1's (d, m) one, per sub-block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from .block_fit import column_sums, to_f16, weighted_line_fit  # noqa: F401 (kq.* names of gguf_merge)

QK_K = 256


@dataclass(frozen=True)
class KSpec:
    sub: int        # values per sub-block
    lo: int         # levels [lo, hi]
    hi: int
    sc_lo: int      # sub-block scale integers [sc_lo, sc_hi]
    sc_hi: int
    affine: bool    # has dmin and per sub-block minimums (0..63)


K_TYPES = {QT.Q4_K: KSpec(32, 0, 15, 0, 63, True), QT.Q5_K: KSpec(32, 0, 31, 0, 63, True),
           QT.Q6_K: KSpec(16, -32, 31, -128, 127, False)}


@dataclass
class Unpacked:
    """Super-blocks as numbers: d, dmin [n] (f16 values in f32), sc, mn [n, S] (ints), q [n, 256] (levels)."""
    d: np.ndarray
    dmin: np.ndarray
    sc: np.ndarray
    mn: np.ndarray
    q: np.ndarray

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(D, N) [n, S] f32: sub-block s decodes level q as fl32(D * q + N)."""
        D = (self.d[:, None] * self.sc.astype(np.float32)).astype(np.float32)
        N = -(self.dmin[:, None] * self.mn.astype(np.float32)).astype(np.float32)
        return D, N


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32).astype(np.float16)).view(np.uint8).reshape(len(x), 2)


def _scales_4k(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of Q4_K/Q5_K: eight 6-bit scales and eight 6-bit minimums."""
    s = scales.reshape(-1, 3, 4)
    a, b, c = s[:, 0].astype(np.int64), s[:, 1].astype(np.int64), s[:, 2].astype(np.int64)
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


def _pack_scales_4k(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    sc, mn = sc.astype(np.int64), mn.astype(np.int64)
    a = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return np.concatenate([a, b, c], axis=1).astype(np.uint8)


def unpack(t: QT, blocks: np.ndarray) -> Unpacked:
    """Super-block bytes [n, type_size] as numbers (the layouts of gguf-py's K-quant decoders)."""
    b = np.ascontiguousarray(blocks, dtype=np.uint8)
    n = b.shape[0]
    if t == QT.Q6_K:
        ql, qh = b[:, :128], b[:, 128:192]
        sc = b[:, 192:208].view(np.int8).astype(np.int64)
        d = b[:, 208:210].copy().view(np.float16).astype(np.float32).reshape(n)
        low = ((ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15).reshape(n, 8, 32)
        high = ((qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(n, 8, 32)
        q = (low | (high << np.uint8(4))).reshape(n, QK_K).astype(np.int64) - 32  # 6 bits: exact in uint8
        return Unpacked(d, np.zeros(n, np.float32), sc, np.zeros_like(sc), q)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(n)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(n)
    sc, mn = _scales_4k(b[:, 4:16])
    qs = b[:, -128:]
    q = ((qs.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15).reshape(n, QK_K)
    if t == QT.Q5_K:
        qh = b[:, 16:48]
        high = ((qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(n, QK_K)
        q |= high << np.uint8(4)  # 5 bits: exact in uint8
    return Unpacked(d, dmin, sc, mn, q.astype(np.int64))


def pack(t: QT, u: Unpacked) -> np.ndarray:
    """The bytes [n, type_size] of super-blocks given as numbers (levels and integers in range)."""
    n = u.q.shape[0]
    if t == QT.Q6_K:
        q = (u.q + 32).astype(np.uint8).reshape(n, 8, 32)
        low, high = q & 15, q >> 4
        ql = (low.reshape(n, 2, 2, 64)[:, :, 0] | (low.reshape(n, 2, 2, 64)[:, :, 1] << 4)).reshape(n, 128)
        h = high.reshape(n, 2, 4, 32)
        qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(n, 64)
        sc = u.sc.astype(np.int8).view(np.uint8)
        return np.concatenate([ql, qh, sc, _f16_bytes(u.d)], axis=1)
    q = u.q.astype(np.uint8)
    low = (q & 15).reshape(n, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    parts = [_f16_bytes(u.d), _f16_bytes(u.dmin), _pack_scales_4k(u.sc, u.mn)]
    if t == QT.Q5_K:
        bits = (q >> 4).reshape(n, 8, 32)
        qh = np.zeros((n, 32), np.uint8)
        for i in range(8):
            qh |= bits[:, i] << np.uint8(i)
        parts.append(qh)
    return np.concatenate(parts + [qs], axis=1)


def decode(t: QT, u: Unpacked) -> np.ndarray:
    """Values [n, 256] f32, as gguf-py decodes the packed bytes."""
    spec = K_TYPES[t]
    D, N = u.grid()
    q = u.q.astype(np.float32).reshape(u.q.shape[0], -1, spec.sub)
    return (D[:, :, None] * q + N[:, :, None]).reshape(u.q.shape[0], QK_K)


def levels(t: QT, D: np.ndarray, N: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The nearest level of each value x [n, S, sub] on its sub-block's grid (D, N [n, S])."""
    return _levels(t, D[..., None], N[..., None], x)


def _levels(t: QT, D: np.ndarray, N: np.ndarray, x: np.ndarray, out=None) -> np.ndarray:
    """`levels` for D, N and x in any layout that broadcasts (into `out`, shaped as the result, if given)."""
    spec = K_TYPES[t]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # in place: the search's hot loop
        q = np.subtract(x, N, out=out)
        q /= np.where(D == 0, np.float32(1), D)
        np.rint(q, out=q)
    finite = np.isfinite(q)
    if not finite.all():
        q[~finite] = spec.lo
    return np.clip(q, spec.lo, spec.hi, out=q)


# -- re-encoding touched super-blocks -----------------------------------------------------------------------
def _fit_subblocks(t: QT, x: np.ndarray, w: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray,
                   mn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For sub-blocks x, w [m, sub] under fixed d, dmin [m]: the integers (sc, mn) [m] with the least weighted squared
    error among the given ones and those around weighted least-squares fits (two rounds)."""
    spec = K_TYPES[t]
    m = x.shape[0]
    # one sub-block per column: every step below is a long operation, and the sums over a sub-block are
    # column_sums (numpy's per-row sums of 16 or 32 values and its broadcasts over them were most of the time)
    x, w = np.ascontiguousarray(x.T), np.ascontiguousarray(w.T)
    scratch = np.empty((2, x.size * (9 if spec.affine else 3)), np.float32)  # reused: fresh ones cost page faults

    def err_of(cols, sc_c, mn_c):  # sub-blocks `cols`, [C, c] candidates -> errors [C, c], levels [sub, C, c]
        D = (d[cols] * sc_c).astype(np.float32)
        N = -(dmin[cols] * mn_c).astype(np.float32)
        xc = x[:, None, cols]
        shape = (x.shape[0],) + D.shape
        q = _levels(t, D, N, xc, scratch[0, :math.prod(shape)].reshape(shape))  # valid until the next call
        # w * (D * q + N - x) ** 2 in place: the same f32 operations without [sub, C, c] temporaries
        dec = np.multiply(D, q, out=scratch[1, :math.prod(shape)].reshape(shape))
        with np.errstate(over="ignore", invalid="ignore"):
            dec += N
            dec -= xc
            np.square(dec, out=dec)
            dec *= w[:, None, cols]
            e = column_sums(dec)
        e[~np.isfinite(e)] = np.inf
        return e, q

    best_sc, best_mn = sc.astype(np.float32), mn.astype(np.float32)
    every = slice(None)  # (all sub-blocks: views, not copies)
    best_err, q = err_of(every, best_sc[None], best_mn[None])
    best_err, q = best_err[0], q[:, 0].copy()
    steps = np.array([-1, 0, 1], np.float32)
    cols = every  # sub-blocks whose best moved: a sub-block that did not would fit the same candidates again
    for _ in range(2):
        size = m if cols is every else cols.size
        if not size:
            break
        # weighted least squares for x ~ A q - B with the current levels, as integers around A / d and B / dmin
        dc, dminc, bsc, bmn = d[cols], dmin[cols], best_sc[cols], best_mn[cols]
        A, offset, ok = weighted_line_fit(w[:, cols], q[:, cols], x[:, cols], spec.affine)
        with np.errstate(divide="ignore", invalid="ignore"):
            A = np.where(ok, A, bsc * dc)
            if spec.affine:
                B = np.where(ok, -offset, bmn * dminc)
                mn0 = np.rint(np.where(dminc != 0, B / dminc, bmn))
            else:
                mn0 = np.zeros(size, np.float32)
            sc0 = np.rint(np.where(dc != 0, A / dc, bsc))
        sc0 = np.nan_to_num(sc0, nan=0.0, posinf=spec.sc_hi, neginf=spec.sc_lo)
        mn0 = np.nan_to_num(mn0, nan=0.0, posinf=63, neginf=0)
        sc_c = np.clip(sc0[None, None, :] + steps[:, None, None], spec.sc_lo, spec.sc_hi)
        if spec.affine:
            mn_c = np.clip(mn0[None, None, :] + steps[None, :, None], 0, 63)
        else:
            mn_c = np.zeros((1, 1, size), np.float32)
        sc_c, mn_c = np.broadcast_arrays(sc_c, mn_c)
        sc_c, mn_c = sc_c.reshape(-1, size), mn_c.reshape(-1, size)
        e, qc = err_of(cols, sc_c, mn_c)
        j = np.argmin(e, axis=0)
        at = np.arange(size)
        better = e[j, at] < best_err[cols]
        moved, jm = (at if cols is every else cols)[better], j[better]
        best_err[moved] = e[jm, at[better]]
        best_sc[moved], best_mn[moved] = sc_c[jm, at[better]], mn_c[jm, at[better]]
        q[:, moved] = qc[:, jm, at[better]]
        cols = moved
    return best_sc.astype(np.int64), best_mn.astype(np.int64)


def _fresh_super_scales(t: QT, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A new (d, dmin) for super-blocks x [n, S, sub] and starting integers (sc, mn) [n, S]: each sub-block's range
    (min/max, the minimum clamped to <= 0 as llama.cpp does) expressed on f16 super-scales."""
    spec = K_TYPES[t]
    levels_n = spec.hi - spec.lo
    if spec.affine:
        lo_v = np.minimum(x.min(-1), 0)
        scale = (x.max(-1) - lo_v) / levels_n
        minv = -lo_v
        d = to_f16(scale.max(-1) / spec.sc_hi)
        dmin = to_f16(minv.max(-1) / 63)
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.rint(np.where(d[:, None] != 0, scale / d[:, None], 0))
            mn = np.rint(np.where(dmin[:, None] != 0, minv / dmin[:, None], 0))
        return d, dmin, np.clip(sc, spec.sc_lo, spec.sc_hi), np.clip(mn, 0, 63)
    amax_i = np.abs(x).argmax(-1)
    peak = np.take_along_axis(x, amax_i[..., None], -1)[..., 0]
    scale = peak / -32  # the largest value takes level -32, the widest side, as llama.cpp's Q6_K does
    d = to_f16(np.abs(scale).max(-1) / 127)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.rint(np.where(d[:, None] != 0, scale / d[:, None], 0))
    return d, np.zeros_like(d), np.clip(sc, spec.sc_lo, spec.sc_hi), np.zeros_like(sc)


def encode(t: QT, target: np.ndarray, original: np.ndarray | None, touched: np.ndarray | None,
           touched_weight: float = 1.0, decoded: np.ndarray | None = None) -> np.ndarray:
    """Super-blocks [B, 256] f32 as type t's bytes [B, type_size], choosing per super-block the one of two encodings
    with the least weighted squared error against `target` (`touched` values weigh touched_weight):

    * the original's d and dmin kept, and new integer scales only for the sub-blocks whose values changed (the
      others keep their bytes' values exactly);
    * a fresh encoding of the whole super-block (new d and dmin), for changes beyond what the original scales reach.

    Without `original` (a tensor re-typed into t) only the fresh one."""
    spec = K_TYPES[t]
    target = np.ascontiguousarray(target, np.float32)
    B = target.shape[0]
    S = QK_K // spec.sub
    w = np.ones_like(target) if touched is None else np.where(touched, np.float32(touched_weight), np.float32(1))
    x = target.reshape(B, S, spec.sub)
    ws = w.reshape(B, S, spec.sub)

    def refit(u: Unpacked, which: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        """Refit the sub-blocks `which` [r, S] of u (super-blocks `rows` of the target, None: all, without copies)
        in place; their weighted errors [r]."""
        xr, wr, tr = (x, w, target) if rows is None else (x[rows], w[rows], target[rows])
        b, s = np.nonzero(which)
        if b.size:
            sc, mn = _fit_subblocks(t, xr[b, s], wr.reshape(xr.shape)[b, s], u.d[b], u.dmin[b], u.sc[b, s],
                                    u.mn[b, s])
            u.sc[b, s], u.mn[b, s] = sc, mn
        D, N = u.grid()
        u.q = levels(t, D, N, xr).reshape(len(tr), QK_K).astype(np.int64)
        with np.errstate(over="ignore", invalid="ignore"):
            e = (wr * (decode(t, u) - tr) ** 2).sum(1)
        e[~np.isfinite(e)] = np.inf
        return e

    def fresh(rows: np.ndarray | None) -> tuple[Unpacked, np.ndarray]:
        d, dmin, sc, mn = _fresh_super_scales(t, x if rows is None else x[rows])
        u = Unpacked(d, dmin, sc.astype(np.int64), mn.astype(np.int64), np.zeros((len(d), QK_K), np.int64))
        return u, refit(u, np.ones((len(d), S), bool), rows)

    if original is None:
        return pack(t, fresh(None)[0])
    kept = unpack(t, original)
    before = decode(t, kept) if decoded is None else np.asarray(decoded, np.float32)
    changed = (before != target).reshape(B, S, spec.sub).any(-1)
    q_before = kept.q.copy()
    err_kept = refit(kept, changed, None)
    same = np.repeat(~changed, spec.sub, axis=1)  # unchanged sub-blocks keep their exact levels
    kept.q[same] = q_before[same]
    out = pack(t, kept)
    # a fresh encoding only where a changed value ended more than half a level from its target under the kept
    # scales: what the original d and dmin cannot reach (the costly search runs for few super-blocks)
    D, _ = kept.grid()
    miss = np.abs(decode(t, kept) - target).reshape(B, S, spec.sub) > 0.5 * np.abs(D)[..., None]
    rows = np.nonzero((miss & (ws > 1 if touched is not None else True)).any((1, 2)) & changed.any(1))[0]
    if rows.size:
        u, err_fresh = fresh(rows)
        better = err_fresh < err_kept[rows]
        if better.any():
            r = rows[better]
            out[r] = pack(t, Unpacked(u.d[better], u.dmin[better], u.sc[better], u.mn[better], u.q[better]))
    return out


def on_grid(t: QT, original: np.ndarray, decoded: np.ndarray, blk: np.ndarray, col: np.ndarray,
            values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which super-blocks' merged values all lie on their sub-blocks' original grids, and those packed on them with
    only the changed levels rewritten (gguf_merge.on_original_grid's contract, for K-quants)."""
    spec = K_TYPES[t]
    values = np.asarray(values, np.float32)
    u = unpack(t, original)
    D, N = u.grid()
    s = col // spec.sub
    Dv, Nv = D[blk, s], N[blk, s]
    q = levels(t, Dv[:, None], Nv[:, None], values[:, None, None])[:, 0, 0]
    dec = (Dv * q + Nv).astype(np.float32)
    same = values == decoded[blk, col]
    kept = same | (dec == values)
    on = np.ones(len(original), bool)
    on[blk[~kept]] = False
    on[on] = ~np.isnan(decoded[on]).any(axis=1)
    out = np.array(original)
    write = ~same & on[blk]
    if write.any():
        u.q[blk[write], col[write]] = q[write].astype(np.int64)
        rows = np.unique(blk[write])
        out[rows] = pack(t, Unpacked(u.d[rows], u.dmin[rows], u.sc[rows], u.mn[rows], u.q[rows]))
    return on, out


def grid_of(t: QT, blocks: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """(D, N, lo, hi, sub) of a tensor's super-blocks, D and N [rows, cols / sub]: value c of row r can be
    D[r, c // sub] * q + N[r, c // sub] for integer q in [lo, hi] (gguf_merge.block_grid's contract)."""
    spec = K_TYPES[t]
    D, N = unpack(t, blocks).grid()
    return D.reshape(rows, -1), N.reshape(rows, -1), spec.lo, spec.hi, spec.sub
