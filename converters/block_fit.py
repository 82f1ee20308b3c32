"""Fitting blocks of values to grids `d * q (+ m)` with integer levels q in [lo, hi]: the least-error search that
re-encodes a touched block, shared by every block format a merge writes (GGUF's Q4_0 / Q4_1 / Q8_0 and K-quants in
gguf_encode and gguf_kquants, ONNX Runtime's MatMulNBits blocks in onnx_nbits). Plain numpy: no format package."""
from __future__ import annotations

import numpy as np


def to_f16(x) -> np.ndarray:
    """f32 values rounded to the nearest f16 (an overflow becomes +-Inf, without a warning): a stored scale."""
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def column_sums(a: np.ndarray) -> np.ndarray:
    """a [n, ...] summed over its first axis, bit for bit as numpy sums n contiguous values (8 <= n <= 128, n a
    multiple of 8: eight running sums, a tree of them, added to 0), so that .sum over rows of 16 or 32 values can be
    done down the columns of their transpose: long operations instead of one short reduction per row (numpy's row
    sums of 32 values were a quarter of the time of each candidate grid's evaluation)."""
    r = a[0:8].copy()
    for i in range(8, a.shape[0], 8):
        r += a[i:i + 8]
    s = (r[0] + r[1]) + (r[2] + r[3])
    s += (r[4] + r[5]) + (r[6] + r[7])
    s += np.float32(0)  # numpy's sum starts at +0: a sum of -0s is +0
    return s


def weighted_line_fit(w: np.ndarray, q: np.ndarray, x: np.ndarray, affine: bool, sw=None, sx=None):
    """Weighted least squares of x ~ scale * q + offset per column of [k, n] (offset 0 unless affine), for levels q
    already chosen: (scale [n], offset [n], ok [n]); columns with a singular system are not ok (their values are
    meaningless). The refinement step of both block searches (gguf_encode's and the K-quants' below). sw, sx: the
    sums of w and w * x per column, when the caller has them (they do not depend on the levels)."""
    wq = w * q
    t = wq * q
    sq, sqq = column_sums(wq), column_sums(t)
    sqx = column_sums(np.multiply(wq, x, out=t))
    if sw is None:
        sw, sx = column_sums(w), column_sums(w * x)
    with np.errstate(divide="ignore", invalid="ignore"):
        if affine:
            det = sw * sqq - sq * sq
            scale = (sw * sqx - sq * sx) / det
            return scale, (sx - scale * sq) / sw, det != 0
        return sqx / sqq, np.zeros(len(sw), np.float32), sqq != 0


def grid_levels(x, d, m, lo, hi, out=None):
    """The levels of blocks x [n, B] (one block per column) on grids d [B] / m [B] (None: no minimum, as for Q4_0 /
    Q8_0, whose m = +0 changes no level): np.clip(np.rint((x - m) * inv), lo, hi), into `out` if given."""
    # (a subnormal d's inverse overflows, and 0 * Inf is NaN: such levels give a NaN error, which `grid_eval` makes
    # Inf, so the grid is never chosen; numpy's warnings about them would reach the CLI as `warning:` lines)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(d == 0, 0, 1 / d).astype(np.float32)
        q = np.multiply(x, inv, out=out) if m is None else np.subtract(x, m, out=out)
        if m is not None:
            q *= inv
    np.rint(q, out=q)
    return np.clip(q, lo, hi, out=q)


def grid_eval(x, w, d, m, lo, hi, out=(None, None)):
    """Levels (`grid_levels`) and weighted squared error of blocks x [n, B] under grids d / m. out: two arrays shaped
    as x for the levels and a scratch, reused across calls (fresh ones of a few hundred KiB cost more page faults
    than the arithmetic on them)."""
    # the same f32 operations as (w * (d * q + m - x) ** 2).sum over a block, in place and down the columns (with
    # m = +0 left out: it turns a -0 into +0, which squares the same): this runs ~10 times per block and was, with
    # its temporaries, most of a Q4_1 merge's time
    q = grid_levels(x, d, m, lo, hi, out[0])
    with np.errstate(invalid="ignore", over="ignore"):  # (an Inf scale, e.g. one rounded to F16: its error is Inf)
        dec = np.multiply(d, q, out=out[1])
        if m is not None:
            dec += m
        dec -= x
        np.square(dec, out=dec)
        dec *= w
        err = column_sums(dec)
    err[~np.isfinite(err)] = np.inf
    return q, err


def fit_grid(target: np.ndarray, w: np.ndarray, cands, lo, hi, affine: bool, to_scale):
    """The block search's core, for every block format whose values are `d * q (+ m)` with integer levels q in
    [lo, hi] (GGUF's Q4_0 / Q4_1 / Q8_0 here, ONNX Runtime's MatMulNBits blocks in onnx_nbits): per block of target
    [B, n] (weights w [B, n]), the candidate grid with the least weighted squared error, then up to three rounds of
    least squares for (d, m) with the levels fixed, re-levelled, kept where the error drops. cands: (d, m) pairs of
    [B] arrays already rounded as stored (m ignored unless affine), or (d, m, lo, hi) with a candidate's own level
    range (scalars or [B]: a block format with integer zero points); to_scale rounds a fitted scale or minimum as the
    format stores it (to_f16 for F16). Returns (d, m, q [n, B] levels, lo, hi) with lo, hi the chosen ranges."""
    x, wt = np.ascontiguousarray(target.T), np.ascontiguousarray(w.T)  # one block per column (`grid_eval`)
    B = target.shape[0]
    best_err = np.full(B, np.inf, np.float32)
    best_d = np.zeros(B, np.float32)
    best_m = np.zeros(B, np.float32)
    own = any(len(c) == 4 for c in cands)  # per-candidate level ranges: kept per block
    best_lo = np.full(B, lo, np.float32) if own else lo
    best_hi = np.full(B, hi, np.float32) if own else hi
    scratch = (np.empty_like(x), np.empty_like(x))

    def consider(d, m, clo, chi):
        """Keep each block's grid (d, m, range) where its error is less than the best so far."""
        _, err = grid_eval(x, wt, d, m if affine else None, clo, chi, scratch)
        better = err < best_err
        for best, new in ((best_err, err), (best_d, d), (best_m, m)):
            np.copyto(best, new, where=better)
        if own:
            np.copyto(best_lo, clo, where=better)
            np.copyto(best_hi, chi, where=better)
    for c in cands:
        consider(c[0], c[1], *(c[2:] if len(c) == 4 else (lo, hi)))
    best_q = grid_levels(x, best_d, best_m if affine else None, best_lo, best_hi)  # (once: cheaper than keeping each)
    # least squares for (d, m) with the levels fixed, then re-level; only blocks whose grid moved in the round
    # before: the others would fit the same grid from the same levels, and it is no better than itself
    sw, sx = column_sums(wt), column_sums(wt * x)
    rows = np.arange(B)
    for r in range(3):
        x_, w_, q_ = (x, wt, best_q) if r == 0 else (x[:, rows], wt[:, rows], best_q[:, rows])
        lo_, hi_ = (best_lo[rows], best_hi[rows]) if own else (lo, hi)
        d, m, ok = weighted_line_fit(w_, q_, x_, affine, sw[rows], sx[rows])
        bd, bm = best_d[rows], best_m[rows]
        d = to_scale(np.where(ok, d, bd))
        m = to_scale(np.where(ok, m, bm)) if affine else m
        if r > 0:  # (in the first round nearly every grid changes: all are evaluated, without copies)
            new = np.flatnonzero((d.view(np.uint32) != bd.view(np.uint32)) | (m.view(np.uint32) != bm.view(np.uint32)))
            d, m, rows, x_, w_ = d[new], m[new], rows[new], x_[:, new], w_[:, new]
            if own:
                lo_, hi_ = lo_[new], hi_[new]
        q, err = grid_eval(x_, w_, d, m if affine else None, lo_, hi_, scratch if r == 0 else (None, None))
        better = err < best_err[rows]
        rows = rows[better]
        best_q[:, rows], best_err[rows], best_d[rows], best_m[rows] = q[:, better], err[better], d[better], m[better]
    return best_d, best_m, best_q, best_lo, best_hi
