"""Quantisation-aware re-encoding of touched GGUF blocks: the types a merge can write (`qtype`), merged values packed
on their block's original grid where they lie on it (`on_original_grid`: exact, no search), the least-error search
for the other blocks (`encode_blocks`), and each block's grid in Hugging Face row order, for training through it
(`block_grid`). A module of its own because the merge backend and the runtime's grids (runtime/quant_grid.py) both
use it; K-quants and IQ4 come in through gguf_kquants, which keeps these functions' contracts.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, quants as gquants

from neuroada_format import NeuroAdaUsageError

from . import gguf_kquants as kq
from .block_fit import fit_grid, to_f16  # the block search, shared with onnx_nbits
from .gguf_names import GGUFBase
from .gguf_read import FLOAT_TYPES, _quiet

BLOCK_TYPES = (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)  # gguf-py encodes and decodes these
QUANT_TYPES = BLOCK_TYPES + tuple(kq.K_TYPES)    # block types we encode: gguf-py's, and K-quants (ours)
ENCODABLE = tuple(FLOAT_TYPES) + QUANT_TYPES    # types a touched tensor keeps, or is re-typed into


def qtype(name) -> QT:
    """A GGML type from its name (`--option requant=Q8_0`), refused clearly when unknown or not encodable."""
    try:
        t = name if isinstance(name, QT) else QT[str(name).upper()]
    except KeyError:
        raise NeuroAdaUsageError(f"unknown GGUF tensor type {name!r}; encodable: "
                                 f"{', '.join(x.name for x in ENCODABLE)}") from None
    if t not in ENCODABLE:
        raise NeuroAdaUsageError(f"{t.name} can be decoded but not encoded here; encodable: "
                                 f"{', '.join(x.name for x in ENCODABLE)}")
    return t


# Blocks whose layout we write ourselves, so the scale/min can be chosen: (levels low, high, affine?).
_GRID = {QT.Q4_1: (0, 15, True), QT.Q4_0: (-8, 7, False), QT.Q8_0: (-128, 127, False)}


def _decode(blocks: np.ndarray, t: QT) -> np.ndarray:
    """gguf-py's decoding of [n, type_size] block bytes, as one 1-D call (2-D input is decoded row by row)."""
    with _quiet():
        return gquants.dequantize(np.ascontiguousarray(blocks).reshape(-1), t)


def _pack(t: QT, d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Block bytes for Q4_1 / Q4_0 / Q8_0 from f16-exact scales, mins and integer levels."""
    n = q.shape[0]
    parts = [d.astype(np.float16).view(np.uint8).reshape(n, 2)]
    if t == QT.Q4_1:
        parts.append(m.astype(np.float16).view(np.uint8).reshape(n, 2))
    return np.concatenate(parts + [_level_bytes(t, q)], axis=1)


def _head(t: QT) -> int:
    """Bytes of a Q4_1 / Q4_0 / Q8_0 block before its levels: the f16 scale (and Q4_1's f16 minimum)."""
    return 4 if t == QT.Q4_1 else 2


def _nibbles(t: QT, q: np.ndarray) -> np.ndarray:
    """Q4_0 / Q4_1 integer levels (in [lo, hi]) as the unsigned 4-bit values the block stores."""
    return (q - (-8 if t == QT.Q4_0 else 0)).astype(np.uint8)


def _level_bytes(t: QT, q: np.ndarray) -> np.ndarray:
    """The level part of Q4_1 / Q4_0 / Q8_0 blocks from integer levels q [B, block] (in [lo, hi])."""
    if t == QT.Q8_0:
        return q.astype(np.int8).view(np.uint8)
    stored = _nibbles(t, q).reshape(q.shape[0], 2, -1)
    return stored[:, 0, :] | (stored[:, 1, :] << np.uint8(4))


def on_original_grid(t: QT, original: np.ndarray, decoded: np.ndarray, blk: np.ndarray, col: np.ndarray,
                     values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which blocks' merged values all lie on their original grid, and those blocks packed on it.

    original: the blocks' bytes [B, type_size]; decoded: their values [B, block]; the merged values
    `values` go to block `blk`, position `col` (distinct pairs; every other value stays). A block is on
    its grid when every value takes an integer level in [lo, hi] that its own scale and minimum decode,
    by the formula of gguf-py's decoder (the reader's: d * q (+ m) in f32), to exactly that value: bit
    for bit but for the sign of a zero, which a Q4_0/Q8_0 zero level takes from its scale. Such a block
    keeps its bytes but for the levels of the values that changed: exact, and no search. Only the
    merged values are looked at (the others keep their levels, so they decode as before), which is a
    small part of the blocks' values. Q5_0/Q5_1 have no grid here: for them a block is on its grid only
    when no value changed. Returns (on [B] bool, bytes [B, type_size]: the blocks packed on their grid
    where `on`, elsewhere left as they were).
    """
    if t in kq.K_TYPES:
        return kq.on_grid(t, original, decoded, blk, col, values)
    values = np.asarray(values, np.float32)
    on = np.ones(len(original), bool)
    out = np.array(original)
    same = values == decoded[blk, col]  # unchanged: keeps its level
    kept = same  # values that decode exactly from the block's own grid
    if t in _GRID:
        lo, hi, affine = _GRID[t]
        d = np.ascontiguousarray(out[:, :2]).view(np.float16).reshape(-1).astype(np.float32)[blk]
        m = np.ascontiguousarray(out[:, 2:4]).view(np.float16).reshape(-1).astype(np.float32)[blk] if affine else None
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            q = values - m if affine else values.copy()
            q /= np.where(d == 0, np.float32(1), d)  # as the runtime's grid (QuantGrid) rounds
        np.rint(q, out=q)
        q[~np.isfinite(q)] = lo  # NaN/inf values: never on a grid (checked below)
        np.clip(q, lo, hi, out=q)
        dec = d * q
        if affine:
            dec += m
        kept = kept | (dec == values)
    on[blk[~kept]] = False
    on[on] = ~np.isnan(decoded[on]).any(axis=1)  # a NaN never decodes to itself (== is false)
    if t not in _GRID:
        return on, out
    head = _head(t)
    changed = ~same & on[blk]  # levels to write: the changed values of the blocks on their grid
    b, c, q = blk[changed], col[changed], q[changed]
    if t == QT.Q8_0:
        out[b, head + c] = q.astype(np.int8).view(np.uint8)
        return on, out
    stored = _nibbles(t, q)
    half = decoded.shape[1] // 2  # value j sits in byte j % half: the low nibble for j < half, else the high
    low = c < half
    bl, byl = b[low], head + c[low]
    out[bl, byl] = (out[bl, byl] & np.uint8(0xF0)) | stored[low]
    bh, byh = b[~low], head + c[~low] - half  # after the low nibbles: a byte may hold two changed values
    out[bh, byh] = (out[bh, byh] & np.uint8(0x0F)) | (stored[~low] << np.uint8(4))
    return on, out


def _naive_grid(t: QT, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The f16 scale and minimum [B] that gguf-py's quantizer gives blocks target [B, 32] of Q4_1 / Q4_0 / Q8_0, by
    its own f32 steps, without the levels it would also pack (a tenth of the search's time): Q4_1 (max - min) / 15
    and min, Q4_0 the value of largest magnitude / -8, Q8_0 the largest magnitude / 127. Checked byte for byte
    against gguf-py's blocks in the tests."""
    if t == QT.Q4_1:
        top, low = target.max(axis=-1), target.min(axis=-1)
        return to_f16((top - low) / 15), to_f16(low)
    if t == QT.Q4_0:
        peak = np.take_along_axis(target, abs(target).argmax(axis=-1)[:, None], axis=-1)[:, 0]
        return to_f16(peak / -8), np.zeros(len(target), np.float32)
    return to_f16(abs(target).max(axis=1) / 127), np.zeros(len(target), np.float32)


def encode_blocks(t: QT, target: np.ndarray, original: np.ndarray | None = None, touched: np.ndarray | None = None,
                  *, method: str = "search", touched_weight: float = 1.0,
                  decoded: np.ndarray | None = None) -> np.ndarray:
    """Encode f32 blocks [B, block_size] as type t; returns [B, type_size] bytes.

    method "naive": gguf-py's reference quantiser (min/max scaling). "search" (Q4_1, Q4_0, Q8_0): per
    block the scale/min with the least weighted squared error against `target` among the naive one, the
    block's original one (`original` bytes; it keeps untouched values exact) and that one moved to hold
    the largest touched change exactly, a grid around them and least-squares refinements; `touched`
    [B, n] marks the values that carry a delta, weighted by touched_weight (a lost delta costs more
    than noise on untouched values: on SmolLM2 Q4_1, weights 1 / 10 / 100 / 1000 kept 14% / 56% / 78% /
    74% of the adapter's logit change, bench/gguf_retention.py). Other types always use the naive quantiser.
    `decoded`: the original blocks' values [B, n] when the caller has decoded them already (the merge has).
    """
    target = np.ascontiguousarray(target, dtype=np.float32)
    if t in kq.K_TYPES:  # no gguf-py encoder: ours, which keeps the original scales where they reach
        return kq.encode(t, target, original, touched, touched_weight, decoded)
    if original is not None:  # blocks whose original encoding already holds the target stay as they are
        original = np.asarray(original)
        if decoded is None:
            decoded = _decode(original, t).reshape(target.shape)
        held = (decoded == target).all(axis=1)
        if held.any():
            out = original.copy()
            if not held.all():
                rest = ~held
                out[rest] = encode_blocks(t, target[rest], original[rest],
                                          None if touched is None else touched[rest], method=method,
                                          touched_weight=touched_weight, decoded=decoded[rest])
            return out
    if method == "naive" or t not in _GRID:
        return gquants.quantize(target.reshape(-1), t).reshape(target.shape[0], -1)  # 1-D: one call, not one per row
    lo, hi, affine = _GRID[t]
    w = np.ones_like(target) if touched is None else np.where(touched, np.float32(touched_weight), np.float32(1))
    B = target.shape[0]
    cands = []  # (d, m) pairs, f16-exact

    def from_bytes(b):
        d = b[:, :2].copy().view(np.float16).astype(np.float32).reshape(B)
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(B) if affine else np.zeros(B, np.float32)
        return d, m
    cands.append(_naive_grid(t, target))
    if original is not None:
        cands.append(from_bytes(np.asarray(original)))
    if original is not None and touched is not None:
        # the original grid moved just enough to put each block's largest touched change exactly on it:
        # by the minimum (scale kept; Q4_0 / Q8_0 have none, so that is the original grid again) or by the scale
        od, om = cands[1]
        before = decoded
        j = np.argmax(np.where(touched, np.abs(target - before), -1), axis=1)
        xt = target[np.arange(B), j]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.rint((xt - om) / od), lo, hi)
            if affine:
                cands.append((od, to_f16(xt - od * q)))
            q1 = np.where(q == 0, 1 if hi > 0 else -1, q)
            cands.append((to_f16(np.where(od != 0, (xt - om) / q1, od)), om))
    d0, m0 = cands[0]
    for f in (0.98, 1.02):
        cands.append((to_f16(d0 * f), m0))
        if affine:
            for g in (-0.25, 0.25):
                cands.append((to_f16(d0 * f), to_f16(m0 + g * d0)))
    best_d, best_m, best_q, _, _ = fit_grid(target, w, cands, lo, hi, affine, to_f16)
    return _pack(t, best_d, best_m, best_q.T)


def block_grid(view: GGUFBase, name: str):
    """The quantisation grid of a Q4_1 / Q4_0 / Q8_0 / K-quant (Q2_K to Q6_K) target in canonical (Hugging Face) row
    order: (d, m, lo, hi, block) with d, m [d_out, d_in / block] f32, so the representable values of row r,
    column c are `d[r, c // block] * q + m[r, c // block]` for integer q in [lo, hi]. For training
    through the quantizer: deltas that land on this grid survive a merge into the file exactly.
    """
    m_ = view.resolve(name)
    info = view.file.tensors[m_.gguf_name]
    if info.type in kq.K_TYPES and kq.K_TYPES[info.type].table is not None:
        raise NeuroAdaUsageError(f"{info.type.name} has no grid here: its levels are a non-uniform table, not the "
                                 f"integers of a range (Q4_1, Q4_0, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K have one)",
                                 path=view.path, tensor=name)
    if info.type in kq.K_TYPES:  # a grid per sub-block (16 or 32 values) of each super-block
        d, m, lo, hi, block = kq.grid_of(info.type, np.asarray(view.file.blocks(m_.gguf_name)), info.shape[0])
    elif info.type in _GRID:
        lo, hi, affine = _GRID[info.type]
        b = np.asarray(view.file.blocks(m_.gguf_name))
        d = b[:, :2].copy().view(np.float16).astype(np.float32).reshape(info.shape[0], -1)
        m = (b[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(info.shape[0], -1) if affine
             else np.zeros_like(d))
        block = GGML_QUANT_SIZES[info.type][0]
    else:
        raise NeuroAdaUsageError(f"{info.type.name} has no grid here (Q4_1, Q4_0, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)",
                                 path=view.path, tensor=name)
    if m_.inverse is not None:
        d, m = d[m_.inverse], m[m_.inverse]
    return d, m, lo, hi, block
