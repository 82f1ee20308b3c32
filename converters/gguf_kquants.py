"""K-quant super-blocks (Q2_K to Q6_K): their levels and scales, and the re-encoding of touched ones.

Why our own: gguf-py decodes K-quants but cannot encode them, and llama.cpp's most used 4- and 5-bit files
(Q4_K_M, Q5_K_M) are made of them. A merge keeps every untouched super-block byte for byte and rewrites only
those holding a merged value, as for the simple block types (gguf_encode).

A super-block holds 256 values in sub-blocks of `sub` values. Sub-block s decodes value i as
``fl32(D_s * q_i + N_s)``, with ``D_s = d * sc_s`` and ``N_s = -(dmin * mn_s)``: d and dmin are f16, sc_s and mn_s
small integers (6 bits for Q4_K/Q5_K; Q6_K has a signed 8-bit sc_s and no minimum), q_i a level in [lo, hi]. Both
products are exact in f32 and so is ``D_s * q_i``, so the one rounding is the sum: the formula of gguf-py's
decoder, which makes (D_s, N_s) a grid like Q4_1's (d, m) one, per sub-block. Q2_K (llama.cpp's Q2_K files, and
the Q2_K tensors of its Q3_K_S/M ones) is the same with 16 sub-blocks of 16 values, 4-bit sc_s and mn_s and
levels 0..3: gguf-py writes its value as ``d * sc_s * q_i - dmin * mn_s``, the same bits as the sum above.

Q3_K (llama.cpp's Q3_K_M files mix it with Q4_K-Q6_K), IQ4_XS and IQ4_NL fit the same mould without minimums:
Q3_K has 16 sub-blocks of 16 with 6-bit scales used as sc - 32 and levels -4..3; IQ4_XS 8 sub-blocks of 32, the same
scales, and levels that are the entries of llama.cpp's fixed non-uniform table kvalues_iq4nl (IQ4_TABLE: each value
takes the nearest entry, not rint); IQ4_NL blocks of 32 values with one f16 d and that table (a "super-block" of
one sub-block whose scale is always 1, with a search of its own for d: `_encode_nl`). Every product is exact in f32.
"""

from __future__ import annotations

import contextvars
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from .block_fit import column_sums, to_f16, weighted_line_fit

QK_K = 256


@dataclass(frozen=True)
class KSpec:
    sub: int        # values per sub-block
    lo: int         # levels [lo, hi]
    hi: int
    sc_lo: int      # sub-block scale integers [sc_lo, sc_hi]
    sc_hi: int
    affine: bool    # has dmin and per sub-block minimums, integers in [0, sc_hi] as the scales (Q2_K 4 bits, else 6)
    size: int = QK_K  # values per (super-)block
    table: tuple | None = None  # non-uniform levels: q is one of these values (IQ4), not every integer in [lo, hi]


# llama.cpp's kvalues_iq4nl (gguf-py's IQ4_NL.kvalues): the levels of IQ4_NL and IQ4_XS, indexed by the 4-bit codes
IQ4_TABLE = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
K_TYPES = {QT.Q4_K: KSpec(32, 0, 15, 0, 63, True), QT.Q5_K: KSpec(32, 0, 31, 0, 63, True),
           QT.Q6_K: KSpec(16, -32, 31, -128, 127, False), QT.Q3_K: KSpec(16, -4, 3, -32, 31, False),
           QT.Q2_K: KSpec(16, 0, 3, 0, 15, True),
           QT.IQ4_XS: KSpec(32, -127, 113, -32, 31, False, table=IQ4_TABLE),
           QT.IQ4_NL: KSpec(32, -127, 113, 1, 1, False, size=32, table=IQ4_TABLE)}  # sc: none (always 1)
_TABLE = np.array(IQ4_TABLE, np.float32)
_MID = (_TABLE[1:] + _TABLE[:-1]) / 2  # half-integers, exact: a level value is never a midpoint
_HALF_GAP = {True: float(np.diff(_TABLE).max()) / 2, False: 0.5}  # the most a nearest level is away, in units of D
# The nearest table level of q is _TABLE[#(midpoints < q)] (searchsorted's answer). The midpoints are half-integers,
# so with c = ceil(2q) (exact in f32) that count is #(2 * midpoint < c): one lookup by c instead of a binary search
# per value (searchsorted was most of an IQ4_XS re-encode). |q| is clipped to 256 first, past every midpoint.
_CEIL2_SPAN = 512
_LEVEL_BY_CEIL2 = _TABLE[np.searchsorted(2 * _MID, np.arange(-_CEIL2_SPAN, _CEIL2_SPAN + 1, dtype=np.float32))]


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
    if t in _OTHER_UNPACK:
        return _OTHER_UNPACK[t](b, n)
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
    if t in _OTHER_PACK:
        return _OTHER_PACK[t](u, n)
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


# Q3_K: hmask [32] (bit k of byte l: the high bit of value 32k + l), qs [64] (value 128h + 32j + l: bits 2j of byte
# 32h + l), 12 bytes of sixteen 6-bit scales (low 4 bits: byte s % 8, nibble s // 8; high 2 bits: byte 8 + s % 4,
# bits 2 (s // 4)), f16 d. Value: d * (scale - 32) * (low bits - 4 + 4 * high bit): levels in [-4, 3].
def _unpack_q3k(b: np.ndarray, n: int) -> Unpacked:
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = b[:, 108:110].copy().view(np.float16).astype(np.float32).reshape(n)
    low = (scales[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16) & 15
    high = (scales[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16) & 3
    sc = (low | (high << np.uint8(4))).astype(np.int64) - 32
    ql = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)).reshape(n, QK_K) & 3
    qh = (hmask.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).reshape(n, QK_K) & 1
    q = ql.astype(np.int64) + 4 * qh.astype(np.int64) - 4
    return Unpacked(d, np.zeros(n, np.float32), sc, np.zeros_like(sc), q)


def _pack_q3k(u: Unpacked, n: int) -> np.ndarray:
    v = (u.q + 4).astype(np.uint8)
    ql = (v & 3).reshape(n, 2, 4, 32)
    qs = (ql[:, :, 0] | (ql[:, :, 1] << 2) | (ql[:, :, 2] << 4) | (ql[:, :, 3] << 6)).reshape(n, 64)
    hb = (v >> 2).reshape(n, 8, 32)
    hmask = np.zeros((n, 32), np.uint8)
    for k in range(8):
        hmask |= hb[:, k] << np.uint8(k)
    ls = (u.sc + 32).astype(np.uint8)
    lscales = (ls[:, :8] & 15) | ((ls[:, 8:] & 15) << 4)
    h = (ls >> 4).reshape(n, 4, 4)  # [n, s // 4, s % 4]
    hscales = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return np.concatenate([hmask, qs, lscales, hscales, _f16_bytes(u.d)], axis=1)


# Q2_K: scales [16] (byte s: sub-block s's scale in its low nibble, its minimum in the high one), qs [64] (value
# 128h + 32j + l: bits 2j of byte 32h + l, as Q3_K's low bits), f16 d, f16 dmin. Value: d * sc * q - dmin * mn, q 0..3.
def _unpack_q2k(b: np.ndarray, n: int) -> Unpacked:
    scales, qs = b[:, :16], b[:, 16:80]
    d = b[:, 80:82].copy().view(np.float16).astype(np.float32).reshape(n)
    dmin = b[:, 82:84].copy().view(np.float16).astype(np.float32).reshape(n)
    q = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)).reshape(n, QK_K) & 3
    return Unpacked(d, dmin, (scales & 15).astype(np.int64), (scales >> 4).astype(np.int64), q.astype(np.int64))


def _pack_q2k(u: Unpacked, n: int) -> np.ndarray:
    q = u.q.astype(np.uint8).reshape(n, 2, 4, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64)
    scales = (u.sc.astype(np.uint8) & 15) | (u.mn.astype(np.uint8) << 4)
    return np.concatenate([scales, qs, _f16_bytes(u.d), _f16_bytes(u.dmin)], axis=1)


def _codes(q: np.ndarray) -> np.ndarray:
    """IQ4 level values (entries of IQ4_TABLE) as their 4-bit codes."""
    return np.searchsorted(_TABLE, q.astype(np.float32)).astype(np.uint8)


def _nibbles_of(codes: np.ndarray, n: int, blocks: int) -> np.ndarray:
    """Blocks of 32 codes [n, blocks * 32] as gguf-py's 16 bytes each: value j in the low nibble of byte j, value
    16 + j in its high nibble."""
    c = codes.reshape(n, blocks, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << np.uint8(4))).reshape(n, blocks * 16)


def _codes_of(qs: np.ndarray, n: int, blocks: int) -> np.ndarray:
    c = (qs.reshape(n, blocks, 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15
    return c.reshape(n, blocks * 32)


# IQ4_NL: f16 d, 16 bytes of codes (`_nibbles_of`). Value: d * IQ4_TABLE[code]; as a one-sub-block "super-block"
# whose sub-block scale is always 1.
def _unpack_iq4nl(b: np.ndarray, n: int) -> Unpacked:
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(n)
    q = _TABLE[_codes_of(b[:, 2:18], n, 1)].astype(np.int64)
    return Unpacked(d, np.zeros(n, np.float32), np.ones((n, 1), np.int64), np.zeros((n, 1), np.int64), q)


def _pack_iq4nl(u: Unpacked, n: int) -> np.ndarray:
    return np.concatenate([_f16_bytes(u.d), _nibbles_of(_codes(u.q), n, 1)], axis=1)


# IQ4_XS: f16 d, scales_h (u16, little-endian: bits 2s, 2s + 1 the high bits of sub-block s's 6-bit scale), scales_l
# [4] (nibble s % 2 of byte s // 2: its low 4 bits), then 8 sub-blocks of 32 codes (`_nibbles_of`). Value:
# d * (scale - 32) * IQ4_TABLE[code].
def _unpack_iq4xs(b: np.ndarray, n: int) -> Unpacked:
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32).reshape(n)
    sh = b[:, 2:4].copy().view("<u2").astype(np.int64).reshape(n, 1)
    low = (b[:, 4:8].reshape(n, 4, 1) >> np.array([0, 4], np.uint8).reshape(1, 1, 2)).reshape(n, 8) & 15
    sc = (low.astype(np.int64) | (((sh >> (2 * np.arange(8))) & 3) << 4)) - 32
    q = _TABLE[_codes_of(b[:, 8:136], n, 8)].astype(np.int64)
    return Unpacked(d, np.zeros(n, np.float32), sc, np.zeros_like(sc), q)


def _pack_iq4xs(u: Unpacked, n: int) -> np.ndarray:
    ls = (u.sc + 32).astype(np.int64)
    sh = ((ls >> 4) << (2 * np.arange(8))).sum(1).astype("<u2").view(np.uint8).reshape(n, 2)
    low = (ls & 15).astype(np.uint8).reshape(n, 4, 2)
    sl = low[:, :, 0] | (low[:, :, 1] << np.uint8(4))
    return np.concatenate([_f16_bytes(u.d), sh, sl, _nibbles_of(_codes(u.q), n, 8)], axis=1)


_OTHER_UNPACK = {QT.Q3_K: _unpack_q3k, QT.IQ4_NL: _unpack_iq4nl, QT.IQ4_XS: _unpack_iq4xs, QT.Q2_K: _unpack_q2k}
_OTHER_PACK = {QT.Q3_K: _pack_q3k, QT.IQ4_NL: _pack_iq4nl, QT.IQ4_XS: _pack_iq4xs, QT.Q2_K: _pack_q2k}


def decode(t: QT, u: Unpacked) -> np.ndarray:
    """Values [n, 256] f32, as gguf-py decodes the packed bytes."""
    spec = K_TYPES[t]
    D, N = u.grid()
    q = u.q.astype(np.float32).reshape(u.q.shape[0], -1, spec.sub)
    return (D[:, :, None] * q + N[:, :, None]).reshape(u.q.shape[0], spec.size)


def levels(t: QT, D: np.ndarray, N: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The nearest level of each value x [n, S, sub] on its sub-block's grid (D, N [n, S])."""
    return _levels(t, D[..., None], N[..., None], x)


def _surely_finite(x: np.ndarray, N, D: np.ndarray, size: int) -> bool:
    """Whether every (x - N) / D is finite, from bounds on x, N and D alone: when x is broadcast over many
    candidate grids (the searches), a look at the inputs is a fraction of a pass over the levels."""
    if np.size(x) * 4 > size:
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        top = float(np.abs(x).max(initial=0)) + float(np.abs(N).max(initial=0))
        low = float(np.abs(D).min(initial=np.inf))
    return low > 0 and top / low < 1e37  # (NaN inputs fail the comparison; |x - N| <= top up to a rounding)


def _levels(t: QT, D: np.ndarray, N: np.ndarray, x: np.ndarray, out=None) -> np.ndarray:
    """`levels` for D, N and x in any layout that broadcasts (into `out`, shaped as the result, if given)."""
    spec = K_TYPES[t]
    Dn = np.where(D == 0, np.float32(1), D)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # in place: the search's hot loop
        q = np.subtract(x, N, out=out)
        q /= Dn
        if spec.table is None:
            np.rint(q, out=q)
    if not _surely_finite(x, N, Dn, q.size):
        finite = np.isfinite(q)
        if not finite.all():
            q[~finite] = spec.lo
    if spec.table is not None:  # the nearest of the table's values (beyond its ends: the end)
        np.clip(q, -_CEIL2_SPAN / 2, _CEIL2_SPAN / 2, out=q)
        q *= 2
        np.ceil(q, out=q)
        q += _CEIL2_SPAN
        return np.take(_LEVEL_BY_CEIL2, q.astype(np.intp), out=q)
    return np.clip(q, spec.lo, spec.hi, out=q)


# -- re-encoding touched super-blocks -----------------------------------------------------------------------
_CHUNK_VALUES = 1 << 19  # values per candidate evaluation of `_fit_all_scales`: 2 MiB per scratch array (less: more
                         # of the time goes to the steps around them: Q2_K 1.7x slower at 1 << 16)
_SPLIT_VALUES = 1 << 20  # values of candidate evaluations worth a second thread
_SPLIT_BLOCKS = 128  # super-blocks per thread, at least, for `encode`'s split (fewer: the overhead dominates)
_THREADS = min(2, os.cpu_count() or 1)
_NAME = "neuroada-kquant"  # the pool's threads: work inside one is never split again (no waiting on itself)
_POOL: ThreadPoolExecutor | None = None


def batch_values(t: QT, values: int) -> int:
    """How many values of a type-t tensor to re-encode at a time, given the merge's usual number: 4x for the K-quant
    types whose `encode` is split between threads (its halves pay only from a few thousand super-blocks: a Q4_K_M
    merge 1.4x faster, where one thread alone was 20% slower with such batches). Their bytes do not depend on the
    batch; those of the all-scales types (`_fit_all_scales`, its lone sub-block) may, so their batches stay."""
    return values * 4 if _THREADS >= 2 and t in K_TYPES and t not in _ALL_SCALES else values


def _split(work, n: int, cost: int) -> None:
    """work(lo, hi) over [0, n), split between two threads when there is enough of it (n items of `cost` values,
    at least two items each): the searches are large numpy operations, which release the GIL, and every item is
    independent, so the result is the same as one call's."""
    global _POOL
    half = n // 2
    if _THREADS < 2 or n * cost < _SPLIT_VALUES or half < 2 or threading.current_thread().name.startswith(_NAME):
        work(0, n)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(_THREADS, thread_name_prefix=_NAME)
    other = _POOL.submit(contextvars.copy_context().run, work, half, n)  # (numpy's errstate is a context variable)
    try:
        work(0, half)
    finally:
        error = other.exception()  # waits: the other half writes into the caller's arrays
    if error is not None:
        raise error


def _forget_pool() -> None:
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's pool threads: it starts its own
    os.register_at_fork(after_in_child=_forget_pool)


def _candidate_errors(t: QT, D: np.ndarray, N, x: np.ndarray, w: np.ndarray, scratch: np.ndarray,
                      in_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For candidate scales D and minimums N [C, c] of sub-blocks x, w [sub, 1, c]: each value on its nearest level
    q [sub, C, c], and the errors [C, c], w * (D * q + N - x) ** 2 summed over each sub-block (non-finite: inf).
    In place in `scratch` [2, >= sub * C * c] (no [sub, C, c] temporaries; q valid until it is reused), the same f32
    operations in the same order as the searches always did: summed pairwise as numpy summed their temporaries
    (`column_sums`), or in order where `in_order` (a lone sub-block, which they laid out the other way). A type
    without minimums adds none (its N is -0.0, which changes no value)."""
    shape = (x.shape[0],) + D.shape
    n = math.prod(shape)
    with np.errstate(over="ignore", invalid="ignore"):
        q = _levels(t, D, N, x, scratch[0, :n].reshape(shape))
        e = np.multiply(D, q, out=scratch[1, :n].reshape(shape))
        if K_TYPES[t].affine:
            e += N
        e -= x
        np.square(e, out=e)
        e *= w
        total = e.sum(0) if in_order else column_sums(e)
    total[~np.isfinite(total)] = np.inf
    return total, q


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
        return _candidate_errors(t, D, N, x[:, None, cols], w[:, None, cols], scratch)  # (q: until the next call)

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
        mn0 = np.nan_to_num(mn0, nan=0.0, posinf=spec.sc_hi, neginf=0)
        sc_c = np.clip(sc0[None, None, :] + steps[:, None, None], spec.sc_lo, spec.sc_hi)
        if spec.affine:
            mn_c = np.clip(mn0[None, None, :] + steps[None, :, None], 0, spec.sc_hi)
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


def _fit_all_scales(t: QT, x: np.ndarray, w: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray,
                    mn: np.ndarray, window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For sub-blocks x, w [m, sub] of a type with few sub-block integers (Q3_K, IQ4_XS: 64 scales and no minimum;
    Q2_K: 16 scales times 16 minimums) under fixed d, dmin [m]: the integers (sc, mn) [m] with the least weighted
    squared error of all of them (each value on its nearest level: for given integers that is each value's least
    error, so this is the best pair for d and dmin), the given ones where none is better; with `window`, of those
    within it of the given ones only (a fresh encoding's start is near its best: a fraction of the work). Chunked:
    every candidate is a [sub, C, chunk] evaluation."""
    spec = K_TYPES[t]
    steps = np.arange(spec.sc_lo, spec.sc_hi + 1) if window is None else np.arange(-window, window + 1)
    steps = steps.astype(np.float32)
    if spec.affine:  # every pair: minimums range over [0, sc_hi] as the scales do
        s_steps, m_steps = (a.reshape(-1, 1) for a in np.meshgrid(steps, steps, indexing="ij"))
    else:
        s_steps, m_steps = steps[:, None], np.zeros((len(steps), 1), np.float32)  # [C, 1]
    best_sc, best_mn = sc.astype(np.float32).copy(), mn.astype(np.float32).copy()
    m, sub = x.shape
    C = 1 + len(s_steps)
    chunk = max(2, _CHUNK_VALUES // (C * sub))  # [sub, C, chunk] evaluations, one candidate grid per column

    def search(lo: int, hi: int) -> None:
        """Sub-blocks lo:hi into best_sc / best_mn (threads: disjoint slices). Each candidate's error is
        w * (D * q + N - x) ** 2 in f32 (+ -0.0, the minimum of a type without one, changes no value), summed over
        its sub-block as numpy summed the search's temporaries before, which it laid out sub-block-contiguous
        (pairwise: `column_sums`), bit for bit: near-equal candidates are told apart by the last bit. Except a lone
        sub-block (hi = lo + 1): that one was laid out the other way, its values summed in order, as here."""
        scratch = np.empty((2, C * min(chunk + 1, hi - lo) * sub), np.float32)
        a = lo
        while a < hi:
            b = hi if hi - a <= chunk + 1 else a + chunk  # (no lone sub-block at the end of a range)
            part = slice(a, b)
            ds, dm, gs, gm = d[part], dmin[part], best_sc[part], best_mn[part]
            xs, ws = (np.ascontiguousarray(v[part].T)[:, None, :] for v in (x, w))  # [sub, 1, c]
            if window is None:
                cs, cm = (np.broadcast_to(c, (len(c), len(ds))) for c in (s_steps, m_steps))
            else:
                cs = np.clip(gs[None] + s_steps, spec.sc_lo, spec.sc_hi)
                cm = np.clip(gm[None] + m_steps, 0, spec.sc_hi) if spec.affine else np.broadcast_to(m_steps, cs.shape)
            cs, cm = np.concatenate([gs[None], cs], axis=0), np.concatenate([gm[None], cm], axis=0)  # [C, c]
            with np.errstate(over="ignore", invalid="ignore"):
                D = ds[None] * cs
                N = -(dm[None] * cm) if spec.affine else np.float32(-0.0)
            total, _ = _candidate_errors(t, D, N, xs, ws, scratch, in_order=b - a == 1)
            j = np.argmin(total, axis=0)  # the first of equal errors: the given integers (row 0) where they are as good
            at = np.arange(len(ds))
            best_sc[part], best_mn[part] = cs[j, at], cm[j, at]
            a = b

    # the search before this one took chunks of max(16, 2 ** 16 // candidates) sub-blocks: a last one of a single
    # sub-block is the lone case of `search`
    lone = m % max(16, 2 ** 16 // len(s_steps)) == 1
    _split(search, m - lone, C * sub)
    if lone:
        search(m - 1, m)
    return best_sc.astype(np.int64), best_mn.astype(np.int64)


_ALL_SCALES = (QT.Q3_K, QT.IQ4_XS, QT.Q2_K)  # few enough sub-block integers to try them all (`_fit_all_scales`)


def _peak(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude along the last axis, with its sign."""
    return np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]


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
        dmin = to_f16(minv.max(-1) / spec.sc_hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            sc = np.rint(np.where(d[:, None] != 0, scale / d[:, None], 0))
            mn = np.rint(np.where(dmin[:, None] != 0, minv / dmin[:, None], 0))
        return d, dmin, np.clip(sc, spec.sc_lo, spec.sc_hi), np.clip(mn, 0, spec.sc_hi)
    peak = _peak(x)
    scale = peak / spec.lo  # the largest value takes level lo, the widest side, as llama.cpp's Q6_K / Q3_K / IQ4 do
    if t == QT.Q6_K:
        d = to_f16(np.abs(scale).max(-1) / 127)
    else:  # llama.cpp's Q3_K / IQ4_XS: the sub-block scale of largest magnitude becomes sc_lo (-32)
        d = to_f16(_peak(scale) / spec.sc_lo)
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
    target = np.ascontiguousarray(target, np.float32)
    if t not in _ALL_SCALES and target.shape[0] >= 2 * _SPLIT_BLOCKS:  # (those split their own search)
        out = np.empty((target.shape[0], GGML_QUANT_SIZES[t][1]), np.uint8)

        def part(lo: int, hi: int) -> None:
            at = slice(lo, hi)
            out[at] = _encode(t, target[at], None if original is None else original[at],
                              None if touched is None else touched[at], touched_weight,
                              None if decoded is None else decoded[at])
        _split(part, target.shape[0], _SPLIT_VALUES)
        return out
    return _encode(t, target, original, touched, touched_weight, decoded)


def _encode(t: QT, target: np.ndarray, original: np.ndarray | None, touched: np.ndarray | None,
            touched_weight: float, decoded: np.ndarray | None) -> np.ndarray:
    """`encode` of one batch (each super-block is encoded on its own: a batch split in two gives the same bytes)."""
    spec = K_TYPES[t]
    if t == QT.IQ4_NL:  # one scale per block of 32, no sub-block scales to refit: its own search
        return _encode_nl(target, original, touched, touched_weight, decoded)
    B = target.shape[0]
    S = spec.size // spec.sub
    w = np.ones_like(target) if touched is None else np.where(touched, np.float32(touched_weight), np.float32(1))
    x = target.reshape(B, S, spec.sub)
    ws = w.reshape(B, S, spec.sub)

    def refit(u: Unpacked, which: np.ndarray, rows: np.ndarray | None, window: int | None = None) -> np.ndarray:
        """Refit the sub-blocks `which` [r, S] of u (super-blocks `rows` of the target, None: all, without copies)
        in place; their weighted errors [r]."""
        xr, wr, tr = (x, w, target) if rows is None else (x[rows], w[rows], target[rows])
        b, s = np.nonzero(which)
        if b.size and t in _ALL_SCALES:
            u.sc[b, s], u.mn[b, s] = _fit_all_scales(t, xr[b, s], wr.reshape(xr.shape)[b, s], u.d[b], u.dmin[b],
                                                     u.sc[b, s], u.mn[b, s], window)
        elif b.size:
            sc, mn = _fit_subblocks(t, xr[b, s], wr.reshape(xr.shape)[b, s], u.d[b], u.dmin[b], u.sc[b, s],
                                    u.mn[b, s])
            u.sc[b, s], u.mn[b, s] = sc, mn
        D, N = u.grid()
        u.q = levels(t, D, N, xr).reshape(len(tr), spec.size).astype(np.int64)
        with np.errstate(over="ignore", invalid="ignore"):
            e = (wr * (decode(t, u) - tr) ** 2).sum(1)
        e[~np.isfinite(e)] = np.inf
        return e

    def fresh(rows: np.ndarray | None) -> tuple[Unpacked, np.ndarray]:
        d, dmin, sc, mn = _fresh_super_scales(t, x if rows is None else x[rows])
        u = Unpacked(d, dmin, sc.astype(np.int64), mn.astype(np.int64), np.zeros((len(d), spec.size), np.int64))
        return u, refit(u, np.ones((len(d), S), bool), rows, window=4)

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
    half = np.float32(_HALF_GAP[spec.table is not None])  # half a level: of the widest gap, for a table
    miss = np.abs(decode(t, kept) - target).reshape(B, S, spec.sub) > half * np.abs(D)[..., None]
    rows = np.nonzero((miss & (ws > 1 if touched is not None else True)).any((1, 2)) & changed.any(1))[0]
    if rows.size:
        u, err_fresh = fresh(rows)
        better = err_fresh < err_kept[rows]
        if better.any():
            r = rows[better]
            out[r] = pack(t, Unpacked(u.d[better], u.dmin[better], u.sc[better], u.mn[better], u.q[better]))
    return out


def _encode_nl(target: np.ndarray, original: np.ndarray | None, touched: np.ndarray | None,
               touched_weight: float, decoded: np.ndarray | None) -> np.ndarray:
    """IQ4_NL blocks [B, 32] f32 as bytes [B, 18]: per block the f16 scale d with the least weighted squared error
    among the original one, llama.cpp's candidates (quantize_row_iq4_nl's: the value of largest magnitude on table
    level -127 + i, i in -7..7, and its first guess peak / 127), those putting the largest touched change on each
    table level, and up to three weighted least-squares refits of d
    with the levels fixed, each block's values on their nearest table levels. Blocks whose original bytes already
    decode to the target keep them."""
    t = QT.IQ4_NL
    B = target.shape[0]
    w = np.ones_like(target) if touched is None else np.where(touched, np.float32(touched_weight), np.float32(1))

    def err_of(d):  # -> levels [B, 32], errors [B]
        q = _levels(t, d[:, None], np.float32(-0.0), target)
        with np.errstate(over="ignore", invalid="ignore"):
            e = (w * (d[:, None] * q - target) ** 2).sum(1)
        e[~np.isfinite(e)] = np.inf
        return q, e

    peak = _peak(target)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cands = [to_f16(peak / np.float32(i - 127)) for i in range(-7, 8)] + [to_f16(peak / np.float32(127))]
    kept = None
    if original is not None:
        kept = unpack(t, original)
        cands.insert(0, kept.d)
        if touched is not None:  # the largest touched change exactly on each level (as near as an f16 d puts it)
            before = decode(t, kept) if decoded is None else np.asarray(decoded, np.float32)
            with np.errstate(invalid="ignore"):
                j = np.argmax(np.where(touched, np.abs(target - before), -1), axis=1)
            xt = target[np.arange(B), j]
            cands += [to_f16(xt / np.float32(v)) for v in IQ4_TABLE]
    best_d = np.zeros(B, np.float32)
    best_q = np.zeros(target.shape, np.float32)
    best_e = np.full(B, np.inf, np.float32)
    for r in range(len(cands) + 3):
        if r < len(cands):
            d = cands[r]
        else:  # x ~ d * q by weighted least squares with the best levels so far
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                den = (w * best_q * best_q).sum(1)
                d = to_f16(np.where(den > 0, (w * best_q * target).sum(1) / den, best_d))
        q, e = err_of(d)
        better = e < best_e
        best_d[better], best_q[better], best_e[better] = d[better], q[better], e[better]
    out = pack(t, Unpacked(best_d, np.zeros(B, np.float32), np.ones((B, 1), np.int64), np.zeros((B, 1), np.int64),
                           best_q.astype(np.int64)))
    if original is not None:
        before = decode(t, kept) if decoded is None else np.asarray(decoded, np.float32)
        held = (before == target).all(1)
        out[held] = np.asarray(original)[held]
    return out


def on_grid(t: QT, original: np.ndarray, decoded: np.ndarray, blk: np.ndarray, col: np.ndarray,
            values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which super-blocks' merged values all lie on their sub-blocks' original grids, and those packed on them with
    only the changed levels rewritten (gguf_encode.on_original_grid's contract, for K-quants)."""
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
    D[r, c // sub] * q + N[r, c // sub] for integer q in [lo, hi] (gguf_encode.block_grid's contract)."""
    spec = K_TYPES[t]
    D, N = unpack(t, blocks).grid()
    return D.reshape(rows, -1), N.reshape(rows, -1), spec.lo, spec.hi, spec.sub
