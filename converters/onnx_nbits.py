"""ONNX Runtime's weight-only quantized linear layers (`com.microsoft` MatMulNBits): reading a node's weight,
decoding only the blocks a merge needs, and re-encoding the blocks that hold a merged value (spec/SPEC.md 15.4).

A MatMulNBits node computes A @ W^T with W [N, K] = [d_out, d_in] (the canonical view, layout `out_in`) stored
block-wise along K: B uint8 [N, n_blocks, block_size * bits / 8] holds the codes, low bits first (4-bit: value 2j
in the low nibble of byte j, value 2j + 1 in the high one), `scales` [N * n_blocks] (float, the type of A) one
scale per block, and the optional `zero_points` uint8 [N, ceil(n_blocks * bits / 8)] one zero point per block,
packed as B is. A value decodes as (code - zero_point) * scale, with zero point 2^(bits - 1) when the input is
absent (ONNX Runtime's contrib operator documentation; checked against onnxruntime's kernel in the tests). Here a
value is that formula in binary32: fl32(f32(scale) * (code - zero_point)), the integer difference exact.

ONNX Runtime's HQQ quantizer writes `zero_points` as floats instead, the scales' type, one per block, unpacked
([N * n_blocks]); onnxruntime's CPU kernel then computes fl32(fl32(code * scale) - fl32(scale * zero_point)) (two
products rounded apart, not the integer form's one rounding: checked bit for bit against its output), and it
refuses 8-bit blocks with float zero points, so those are refused here too. That value is fl32(d * q) + m with
d = scale, m = -fl32(scale * zero point), q = code in [0, 2^bits - 1]: the affine grid of GGUF's Q4_1.

ONNX Runtime's quantizer (MatMulNBitsQuantizer) names B `<initializer>_Q<bits>` (its GPTQ writer
`<initializer>_Q<bits>G<block_size>`), after the [K, N] initializer of the MatMul it replaced; the graph's weight keeps
that name here (`NBits.name`), so the resolution of converters/onnx_resolve.py finds it as it found the float
initializer: by name, by the node's exporter scope or legacy node name when the graph still has them, and otherwise by
the probe hash over the decoded values.

Merging re-encodes, as the GGUF merge does for Q4_0 / Q8_0 (block_fit.fit_grid, the same search), only the blocks
that hold a touched value: a block whose merged values all decode exactly from its own scale and zero point with
codes in range keeps them and changes only those codes (exact); any other gets the least-error (scale, zero point)
among the original, ONNX Runtime's round-to-nearest one, the original moved to hold the largest touched change
exactly and a few around them, then least-squares refinements of the scale, touched values weighted 100 to 1.
Every other block, scale and zero point keeps its bytes; scales are rounded to their stored type. A block with a
float zero point is exact on its own grid when each changed value is some code's value there; otherwise it is
re-fitted the same way over (scale, zero point) together (least squares of the affine grid, the zero point a float
of the scales' type), touched values weighted 100 to 1 as above, the original among the candidates, so a block is
never re-encoded worse than its own grid. (Measured on SmolLM2 quantized by HQQ, 4-bit blocks of 128, the float-trained
k=20 adapter of bench/onnx_retention.py: weighted 100 to 1 the merge kept 16.7% of its logit change and 89.1% task
accuracy; weighted alike 8.5% and 25.0%, every block kept on its own grid 4.8% and 23.4%. On random deltas in a
tiny model equal weights did better, but the trained adapter is what merges.)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import AttributeProto, TensorProto

from neuroada_format import NeuroAdaError
from neuroada_format.dtypes import round_to

from .block_fit import fit_grid, grid_eval, to_f16

OP = "MatMulNBits"
DOMAIN = "com.microsoft"
BITS = (4, 8)                                   # what is merged; 2-bit (and 3, 5-7) blocks are refused
ATTRIBUTES = {"K", "N", "bits", "block_size", "accuracy_level"}  # accuracy_level changes how A is computed, not W
INPUTS = ("A", "B", "scales", "zero_points", "g_idx", "bias")
RULE = "4.2"                                    # the weight cannot be merged as this file stores it
TOUCHED_WEIGHT = 100.0                          # as the GGUF merge's default (gguf_merge.GGUFBackend)
U8 = TensorProto.UINT8
FLOAT_ZP = {TensorProto.FLOAT: "F32", TensorProto.FLOAT16: "F16", TensorProto.BFLOAT16: "BF16"}  # HQQ's zero points
B_NAME = re.compile(r"(.+)_Q\d+(?:G\d+)?", re.DOTALL)  # `<weight>_Q4`, `<weight>_Q4G32` (GPTQ's): the weight


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


@dataclass
class NBits:
    """One MatMulNBits node's weight: where its parts are and how they are laid out."""
    node: object
    name: str                   # the weight's name in the graph: B's without `_Q<bits>` / `_Q<bits>G<block>`
    b: str
    scales: str
    zero_points: str | None
    bits: int
    block: int
    K: int
    N: int
    problem: str | None = None  # why it cannot be merged (refused when a target resolves to it)
    float_zp: bool = False      # zero points stored as floats of the scales' type (HQQ), not packed uint8

    @property
    def n_blocks(self) -> int:
        return -(-self.K // self.block)

    @property
    def padded_k(self) -> int:
        """K rounded up to whole blocks: ONNX Runtime's quantizer pads a K that is not a multiple of block_size and
        stores the last block whole; its kernel reads only the first K values of a row."""
        return self.n_blocks * self.block

    @property
    def blob(self) -> int:
        return self.block * self.bits // 8

    @property
    def zp_row(self) -> int:
        return -(-self.n_blocks * self.bits // 8)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def to_dict(self) -> dict:
        out = {"op": OP, "B": self.b, "scales": self.scales, "zero_points": self.zero_points, "bits": self.bits,
               "block_size": self.block}
        if self.float_zp:
            out["float_zero_points"] = True
        return out


def find(model) -> dict[str, NBits]:
    """Every MatMulNBits node of the main graph whose B is an initializer, by its weight's name; each one's
    `problem` says why it cannot be merged, if it cannot (decided here, refused only where a target lands)."""
    out: dict[str, NBits] = {}
    for node in model.nodes:
        if node.op_type != OP or len(node.input) < 3 or node.input[1] not in model.initializers:
            continue
        bits, block = _attr(node, "bits", 4), _attr(node, "block_size", 0)
        K, N = _attr(node, "K", 0), _attr(node, "N", 0)
        b = node.input[1]
        # (any `_Q<digits>`: a `bits` attribute of the wrong type must not hide the weight from its name, where its
        # refusal says what is wrong; B named otherwise is the weight's name, and since an initializer's name is the
        # initializer, a weight no target can reach)
        stem = B_NAME.fullmatch(b)
        name = stem.group(1) if stem else b
        if name in out and out[name].name != out[name].b != b:  # `W_Q4` and `W_Q8`: W would be whichever came first
            first = out[name]
            first.problem = (f"MatMulNBits nodes {first.node.name or '(unnamed)'} and {node.name or '(unnamed)'} both "
                             f"name their weight {name!r} (B {first.b!r} and {b!r}): which one a target of that name "
                             f"means is not known")
        if name in model.initializers or name in out:  # a float initializer keeps its name; never two weights in one
            name = b
        zp = node.input[3] if len(node.input) > 3 and node.input[3] else None
        nb = NBits(node, name, b, node.input[2], zp, bits, block, K, N)
        nb.float_zp = zp is not None and zp in model.initializers and model.initializers[zp].data_type in FLOAT_ZP
        nb.problem = _problem(model, nb)
        out[name] = nb
    return out


def _problem(model, nb: NBits) -> str | None:
    """What makes a MatMulNBits weight one this merge does not write, or None."""
    node, where = nb.node, f"MatMulNBits node {nb.node.name or '(unnamed)'}"
    if node.domain != DOMAIN:
        return f"{where} is in domain {node.domain!r}, not {DOMAIN!r}"
    unknown = sorted({a.name for a in node.attribute} - ATTRIBUTES)
    if unknown:
        return f"{where} has attribute(s) {', '.join(unknown)}, whose effect on the stored weight is not known here"
    names = [a.name for a in node.attribute]  # (`_attr` reads the integer field: a FLOAT K would read as K=0)
    for a in node.attribute:
        if a.type != AttributeProto.INT:
            return f"{where}: attribute {a.name} is {AttributeProto.AttributeType.Name(a.type)}, not INT"
        if names.count(a.name) > 1:  # onnx.checker and onnxruntime refuse the node; `_attr` would read the first
            return f"{where}: attribute {a.name} is given {names.count(a.name)} times"
    if nb.bits not in BITS:
        return f"{where} stores {nb.bits}-bit codes; merges write 4- and 8-bit MatMulNBits weights only"
    if nb.block < 16 or nb.block & (nb.block - 1):
        return f"{where} has block_size {nb.block}, not a power of two of at least 16"
    if nb.K <= 0 or nb.N <= 0:
        return f"{where} has K={nb.K}, N={nb.N}: both must be positive"
    if len(node.input) > 4 and node.input[4]:
        return f"{where} has a g_idx input (act-order / group indices), which reorders the blocks"
    if len(node.input) > 6:
        return f"{where} has {len(node.input)} inputs; the operator defines 6"
    if len(node.input) > 5 and node.input[5] in model.initializers and model.shape(node.input[5]) != (nb.N,):
        return f"{where} has a bias of shape {list(model.shape(node.input[5]))}, not [N] = [{nb.N}]"
    want = {nb.b: (U8, (nb.N, nb.n_blocks, nb.blob)), nb.scales: (None, nb.N * nb.n_blocks)}
    kind = {nb.b: "B", nb.scales: "scales"}
    if nb.zero_points:
        want[nb.zero_points] = (None, nb.N * nb.n_blocks) if nb.float_zp else (U8, nb.N * nb.zp_row)
        kind[nb.zero_points] = "zero_points"
    for name, (dtype, shape) in want.items():
        if name not in model.initializers:
            return f"{where}: input {name!r} is computed, not an initializer"
        t = model.initializers[name]
        if name == nb.scales and model.dtype(name) is None:
            return f"{where}: scales {name!r} are not F32, F16 or BF16"
        if name == nb.zero_points and t.data_type != U8 and not nb.float_zp:
            return (f"{where}: zero points {name!r} are {TensorProto.DataType.Name(t.data_type)}, neither packed "
                    f"uint8 nor floats of the scales' type")
        if name == nb.zero_points and nb.float_zp:
            if t.data_type != model.initializers[nb.scales].data_type:
                return (f"{where}: float zero points {name!r} are {FLOAT_ZP[t.data_type]}, the scales "
                        f"{model.dtype(nb.scales) or 'another type'}: ONNX Runtime reads float zero points as the "
                        f"scales' type")
            if nb.bits != 4:
                return (f"{where}: {nb.bits}-bit blocks with float zero points {name!r}, which onnxruntime's CPU "
                        f"kernel refuses to run; merges write float zero points with 4-bit blocks only")
        if dtype is not None and t.data_type != dtype:
            return f"{where}: {name!r} is not uint8"
        got = model.shape(name)
        if (got != shape) if isinstance(shape, tuple) else (math.prod(got) != shape):
            return f"{where}: {name!r} has shape {list(got)}, expected {list(shape) if isinstance(shape, tuple) else shape} values"
        readers = model.consumers.get(name, []) + model.inner_consumers.get(name, [])
        # (the node itself too, at another input: with K = block_size the scales are N values, a bias's shape)
        others = [(n, i) for n, i in readers if n is not node or i != INPUTS.index(kind[name])]
        if others and others[0][0] is node:
            i = others[0][1]
            return (f"{where}: {name!r} is also its input {i} ({INPUTS[i] if i < len(INPUTS) else 'extra'}); merging "
                    f"would change that input too")
        if others:
            return (f"{where}: {name!r} also feeds {others[0][0].op_type} ({others[0][0].name or 'unnamed'}); merging "
                    f"would change that node's input too")
    return None


def refuse(model, nb: NBits, target: str) -> None:
    if nb.problem:
        raise NeuroAdaError(nb.problem, path=model.path, tensor=target, rule=RULE)


# -- decoding ------------------------------------------------------------------------------------------
def _codes(blobs: np.ndarray, bits: int) -> np.ndarray:
    """[n, blob] bytes -> [n, block] codes (uint8), low bits first."""
    if bits == 8:
        return blobs
    return np.stack([blobs & np.uint8(15), blobs >> np.uint8(4)], axis=-1).reshape(blobs.shape[0], -1)


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return codes.astype(np.uint8)
    c = codes.astype(np.uint8).reshape(codes.shape[0], -1, 2)
    return c[:, :, 0] | (c[:, :, 1] << np.uint8(4))


class Weight:
    """A MatMulNBits weight's stored parts (read-only arrays) and block-wise decoding."""

    def __init__(self, model, nb: NBits):
        self.nb = nb
        self.blobs = np.asarray(model.stored(nb.b)).reshape(nb.N * nb.n_blocks, nb.blob)
        self.scales = np.asarray(model.stored(nb.scales)).reshape(-1)
        self.zp_bytes = self.zp_float = None
        if nb.float_zp:
            self.zp_float = np.asarray(model.stored(nb.zero_points)).reshape(-1)
        elif nb.zero_points is not None:
            self.zp_bytes = np.asarray(model.stored(nb.zero_points)).reshape(nb.N, nb.zp_row)

    def zero_points(self, ids: np.ndarray) -> np.ndarray:
        """The zero points of blocks `ids` (flat: row * n_blocks + block): integers, or f32 where they are floats."""
        nb = self.nb
        if self.zp_float is not None:
            return self.zp_float[ids].astype(np.float32)
        if self.zp_bytes is None:
            return np.full(ids.shape, 1 << (nb.bits - 1), np.int32)
        row, blk = np.divmod(ids, nb.n_blocks)
        if nb.bits == 8:
            return self.zp_bytes[row, blk].astype(np.int32)
        byte = self.zp_bytes[row, blk // 2]
        return np.where(blk % 2 == 0, byte & 15, byte >> 4).astype(np.int32)

    def scale_f32(self, ids: np.ndarray) -> np.ndarray:
        return self.scales[ids].astype(np.float32)

    def minimum(self, ids: np.ndarray) -> np.ndarray:
        """Float zero points only: m = -fl32(scale * zero point) of blocks `ids` (a value: fl32(code * scale) + m)."""
        with np.errstate(invalid="ignore", over="ignore"):
            return -(self.scale_f32(ids) * self.zero_points(ids))

    def _values(self, codes: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """f32 values of `codes` (uint8, shaped as ids or [len(ids), n]) in blocks `ids`, as onnxruntime decodes
        them."""
        extra = (slice(None),) + (None,) * (codes.ndim - ids.ndim)
        scale = self.scale_f32(ids)[extra]
        with np.errstate(invalid="ignore", over="ignore"):
            if self.zp_float is not None:  # fl32(fl32(code * scale) - fl32(scale * zero point))
                return codes.astype(np.float32) * scale + self.minimum(ids)[extra]
            return (codes.astype(np.float32) - self.zero_points(ids)[extra].astype(np.float32)) * scale

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Blocks `ids` as f32 values [len(ids), block]: fl32(f32(scale) * (code - zero point)) (float zero points:
        fl32(fl32(code * scale) - fl32(scale * zero point)))."""
        return self._values(_codes(self.blobs[ids], self.nb.bits), ids)

    def values_at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """f32 values at (rows[i, j], cols[i, j]), each decoded by itself as `decode` decodes it (the probe hash).
        Not whole blocks: a probe runs against every weight of the target's shape (60 per target in SmolLM2), and k
        columns of a row reach most of its blocks, so decoding blocks cost a merge 30-45 s on 2 cores."""
        nb = self.nb
        rows, cols = np.broadcast_arrays(np.asarray(rows, np.int64), np.asarray(cols, np.int64))
        ids, pos = rows * nb.n_blocks + cols // nb.block, cols % nb.block
        if nb.bits == 8:
            codes = self.blobs[ids, pos]
        else:
            byte = self.blobs[ids, pos // 2]
            codes = np.where(pos % 2 == 0, byte & np.uint8(15), byte >> np.uint8(4))
        return self._values(codes, ids)

    def grid(self):
        """The weight's grid, for training through it (runtime/quant_grid.py), as gguf_encode.block_grid gives a GGUF
        tensor's: (d, m, lo, hi, block), d and m [N, n_blocks] f32, lo and hi [N, n_blocks] integers. Row r, column c
        holds fl32(d * q) + m for an integer q in [lo, hi] of its block, q = code - zero point: the zero point shifts
        the level range and m is 0, since ONNX Runtime's value rounds once, fl32(scale * (code - zero point)), and
        a minimum m = -zero point * scale would round twice. Float zero points (HQQ) are that affine grid exactly:
        m = -fl32(scale * zero point), q = code in [0, 2^bits - 1], as onnxruntime computes them."""
        nb = self.nb
        ids = np.arange(nb.N * nb.n_blocks)
        d = self.scale_f32(ids).reshape(nb.N, nb.n_blocks)
        if self.zp_float is not None:
            zero = np.zeros(d.shape, np.int32)
            return d, self.minimum(ids).reshape(d.shape), zero, zero + nb.qmax, nb.block
        zp = self.zero_points(ids).reshape(nb.N, nb.n_blocks)
        return d, np.zeros_like(d), -zp, nb.qmax - zp, nb.block

    def rounds_from(self, ids: np.ndarray, values: np.ndarray, decoded: np.ndarray | None = None) -> np.ndarray:
        """Per block of `ids`, whether each decoded value is the block's level nearest to the float value at its place
        (`values` [..., len(ids), block], any leading axes): what a round-to-nearest quantizer (ONNX Runtime's default,
        RTN) stores for the weights it was given, so a layer whose weights pass it in every block is the one the
        block came from. A value beyond the block's end levels rounds to that end (the quantizer clamps); elsewhere
        the decoded value must lie within half a step, |scale| / 2, of the float value, plus what f32 arithmetic and a
        scale rounded to the stored dtype can move it: (qmax + 1) scale-dtype epsilons of |scale| and four f32 units
        in the last place of the value. `decoded`: the blocks' decoded values, where the caller has them already."""
        nb = self.nb
        got = self.decode(ids) if decoded is None else decoded
        scale = self.scale_f32(ids)[:, None]
        ends = np.stack([self._values(np.full(ids.shape, c, np.uint8), ids)[:, None] for c in (0, nb.qmax)])
        v = np.clip(np.asarray(values, np.float32), ends.min(0), ends.max(0))
        eps = max(float(ml_dtypes.finfo(self.scales.dtype).eps), 2.0 ** -22)
        slack = np.abs(scale) * (0.5 + (nb.qmax + 1) * eps) + 4 * np.spacing(np.abs(v))
        if self.zp_float is not None:  # (two products rounded apart, each up to qmax + |zero point| steps large)
            far = np.abs(scale) * (nb.qmax + np.abs(self.zero_points(ids)[:, None]))
            slack = slack + 4 * np.spacing(far.astype(np.float32))
        with np.errstate(invalid="ignore", over="ignore"):
            return ((np.abs(got - v) <= slack) | ~self.real(ids)).all(-1)  # (a last block's padding: not the weight's)

    def real(self, ids: np.ndarray) -> np.ndarray:
        """[len(ids), block]: which values of blocks `ids` are the weight's (False: a last block's padding past K)."""
        nb = self.nb
        return (ids % nb.n_blocks * nb.block)[:, None] + np.arange(nb.block) < nb.K

    def blocks(self, values: np.ndarray) -> np.ndarray:
        """[..., N, K] values as [..., N * n_blocks, block], a last block's padding 0."""
        nb = self.nb
        pad = [(0, 0)] * (values.ndim - 1) + [(0, nb.padded_k - nb.K)]
        full = np.pad(values, pad) if nb.padded_k != nb.K else values
        return full.reshape(*values.shape[:-2], nb.N * nb.n_blocks, nb.block)

    def unblocked(self, blocks: np.ndarray) -> np.ndarray:
        """All [N * n_blocks, block] blocks as [N, K] values: `blocks`' inverse, a last block's padding dropped."""
        nb = self.nb
        return blocks.reshape(nb.N, nb.padded_k)[:, :nb.K]

    def decode_all(self) -> np.ndarray:
        return self.unblocked(self.decode(np.arange(self.blobs.shape[0])))

    def decode_touched(self, deltas) -> tuple[np.ndarray, np.ndarray]:
        """[N, K] values decoded only in the blocks that hold a delta's column (NaN elsewhere: no merge reads them),
        and those blocks' ids."""
        nb = self.nb
        held = np.zeros((nb.N, nb.n_blocks), bool)
        for d in deltas:
            held[np.arange(nb.N)[:, None], np.asarray(d.indices, np.int64) // nb.block] = True
        ids = np.flatnonzero(held)
        out = np.full((nb.N * nb.n_blocks, nb.block), np.nan, np.float32)
        out[ids] = self.decode(ids)
        return self.unblocked(out), ids


# -- encoding ------------------------------------------------------------------------------------------
def _rounder(dtype: np.dtype):
    """A fitted scale rounded to its stored type (as f32 values; an overflow becomes +-Inf, refused later)."""
    if dtype == np.float32:
        return lambda x: np.asarray(x, np.float32)
    if dtype == np.float16:
        return to_f16
    return lambda x: round_to(x, "BF16").astype(np.float32)


@dataclass
class Patch:
    """The bytes a merge writes into one MatMulNBits weight: per stored tensor, (flat positions, new values)."""
    ids: np.ndarray            # blocks rewritten
    on_grid: int               # of them, packed exactly on their original scale and zero point
    tensors: dict              # initializer -> (positions, values)


def reencode(w: Weight, values: np.ndarray, mp, *, where: tuple[str, str],
             touched_weight: float = TOUCHED_WEIGHT) -> Patch:
    """The blocks holding a merged value of `mp` (a MergePlan over `values`, the [N, K] decoded weight), re-encoded.
    where: (file, target) for errors."""
    nb = w.nb
    block = nb.block
    row, c = np.divmod(mp.positions, nb.K)
    which = row * nb.n_blocks + c // block
    ids = np.unique(which)
    before = w.blocks(values)[ids]  # (a last block's padding past K: 0, weighed 0 and written as code zero point)
    if not np.isfinite(before).all():
        bad = int(ids[~np.isfinite(before).all(axis=1)][0])
        raise NeuroAdaError(f"block {bad % nb.n_blocks} of row {bad // nb.n_blocks} decodes to NaN or Inf (its scale "
                            f"{'or zero point ' if nb.float_zp else ''}is not finite) and the merge touches it; the "
                            f"base file is damaged",
                            path=where[0], tensor=where[1], rule="1.6")
    at, col = np.searchsorted(ids, which), c % block
    merged = np.asarray(mp.merged, np.float32)
    d0, z0 = w.scale_f32(ids), w.zero_points(ids).astype(np.float32)
    codes = _codes(w.blobs[ids], nb.bits).astype(np.int32)
    scales, zps = d0.copy(), z0.copy()
    # on the original grid: every changed value is d0 * (code - z0) for a code in range
    if nb.float_zp:
        new_code, exact = _on_float_grid(w, ids[at], merged)
    else:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            lv = np.rint(merged / np.where(d0[at] == 0, np.float32(1), d0[at]))
        lv[~np.isfinite(lv)] = 0
        lv = np.clip(lv, -z0[at], np.float32(nb.qmax) - z0[at])
        exact, new_code = d0[at] * lv == merged, lv + z0[at]
    exact |= merged == before[at, col]
    on = np.ones(ids.size, bool)
    on[at[~exact]] = False
    keep = on[at]
    chg = keep & (merged != before[at, col])  # (an unchanged value keeps its code, whatever its level)
    codes[at[chg], col[chg]] = new_code[chg].astype(np.int32)
    rest = np.flatnonzero(~on)
    if rest.size:
        target = before[rest].copy()
        mask = np.zeros(target.shape, bool)
        sel = ~keep
        pos = np.searchsorted(rest, at[sel])
        target[pos, col[sel]] = merged[sel]
        mask[pos, col[sel]] = True
        _refuse_unencodable(nb, target, w.scales.dtype, touched_weight, where)
        real = w.real(ids[rest])
        search = _search_float if nb.float_zp else _search
        d, z, q = search(nb, target, before[rest], mask, real, d0[rest], z0[rest], _rounder(w.scales.dtype),
                         touched_weight)
        if not (np.isfinite(d).all() and np.isfinite(z).all()):
            raise NeuroAdaError(f"merged values reach {float(np.abs(target).max()):.4g}, beyond what a {nb.bits}-bit "
                                f"block with {w.scales.dtype} scales can encode; merge with a smaller scale",
                                path=where[0], tensor=where[1], rule=RULE)
        scales[rest], zps[rest] = d, z
        if nb.float_zp:  # q: the codes; padding: the code nearest the value 0
            codes[rest] = np.where(real, q, np.clip(np.rint(z), 0, nb.qmax)[:, None].astype(np.int32))
        else:
            codes[rest] = np.where(real, q, 0) + z[:, None].astype(np.int32)  # (padding: level 0, the value 0)
    tensors = {}
    blob_pos = (ids[:, None] * nb.blob + np.arange(nb.blob)).reshape(-1)
    tensors[nb.b] = (blob_pos, _pack_codes(codes, nb.bits).reshape(-1))
    if rest.size:
        moved = rest[(scales[rest].view(np.uint32) != d0[rest].view(np.uint32)) |
                     (zps[rest].view(np.uint32) != z0[rest].view(np.uint32))]
        sid = ids[moved]
        tensors[nb.scales] = (sid, scales[moved].astype(w.scales.dtype))
        if nb.float_zp and moved.size:
            tensors[nb.zero_points] = (sid, zps[moved].astype(w.zp_float.dtype))
        elif nb.zero_points is not None and moved.size:
            tensors[nb.zero_points] = _zp_patch(w, sid, zps[moved].astype(np.int32))
    return Patch(ids, int(on.sum()), tensors)


def _on_float_grid(w: Weight, ids: np.ndarray, merged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per merged value of block ids[i] (float zero points): its nearest code and whether that code's value there is
    exactly merged[i] (codes [n], exact [n]). (A neighbour of the nearest code never was, in 8 million random values
    with zero points up to 10^7.)"""
    d, m = w.scale_f32(ids), w.minimum(ids)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        code = np.rint((merged - m) / np.where(d == 0, np.float32(1), d))
        code[~np.isfinite(code)] = 0
        code = np.clip(code, 0, w.nb.qmax)
        return code, code * d + m == merged


def _value_limit(nb: NBits, scale_dtype, touched_weight: float) -> float:
    """The largest |value| a re-encoded block is sure to hold. ONNX Runtime's round-to-nearest grid for values up to
    L has a scale of at most L / reach (reach: 2^(bits - 1) levels each side for a symmetric block, half the code
    range with zero points), which must be finite in the scales' type, and its error in the search (binary32:
    at most block * touched_weight * scale^2) must be too: where every grid's error overflows to Inf, none is
    better than another and the block was written with scale 0, its untouched values decoding to 0 as well."""
    reach = (1 << (nb.bits - 1)) if nb.zero_points is None else nb.qmax / 2
    scale_max = float(ml_dtypes.finfo(scale_dtype).max)
    return reach * min(scale_max, math.sqrt(float(np.finfo(np.float32).max) / (4 * touched_weight * nb.block)))


def _refuse_unencodable(nb: NBits, target: np.ndarray, scale_dtype, touched_weight: float, where) -> None:
    """Blocks to re-encode holding a value beyond `_value_limit` are refused (rule 4.2), before any search."""
    limit = _value_limit(nb, scale_dtype, touched_weight)
    with np.errstate(invalid="ignore"):
        big = np.abs(target)
    if not (big <= limit).all():  # (NaN and Inf too)
        raise NeuroAdaError(f"merged values reach {float(np.nanmax(big)):.4g}, beyond what a {nb.bits}-bit block with "
                            f"{np.dtype(scale_dtype).name} scales can encode (|value| up to {limit:.4g}); merge with a "
                            f"smaller scale", path=where[0], tensor=where[1], rule=RULE)


def _zp_patch(w: Weight, ids: np.ndarray, zps: np.ndarray):
    """(positions, bytes) of the packed zero points with blocks `ids` set to `zps` (the other half of a byte kept)."""
    nb = w.nb
    row, blk = np.divmod(ids, nb.n_blocks)
    if nb.bits == 8:
        return row * nb.zp_row + blk, zps.astype(np.uint8)
    pos = row * nb.zp_row + blk // 2
    flat = w.zp_bytes.reshape(-1)
    new = {int(p): int(flat[p]) for p in np.unique(pos)}
    for p, b, z in zip(pos.tolist(), blk.tolist(), zps.tolist()):
        new[p] = (new[p] & 0xF0) | z if b % 2 == 0 else (new[p] & 0x0F) | (z << 4)
    keys = np.array(sorted(new), np.int64)
    return keys, np.array([new[k] for k in keys.tolist()], np.uint8)


def _search(nb: NBits, target, before, touched, real, d0, z0, to_scale, touched_weight):
    """Per block of target [B, block]: (scale [B] as stored, zero point [B], levels [B, block] = code - zero point).
    real: the values that are the weight's (not a last block's padding, which weighs nothing)."""
    B = target.shape[0]
    qmax, half = nb.qmax, 1 << (nb.bits - 1)
    sym = nb.zero_points is None
    w = np.where(touched, np.float32(touched_weight), np.where(real, np.float32(1), np.float32(0)))
    cands = []

    def cand(d, z):
        z = np.asarray(z, np.float32)
        cands.append((to_scale(d), np.zeros(B, np.float32), -z, qmax - z))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cand(d0, z0)  # the original
        if sym:
            peak = np.take_along_axis(target, np.abs(target).argmax(axis=1)[:, None], axis=1)[:, 0]
            cand(peak / -half, np.full(B, half))                     # the largest magnitude on level -half
            cand(np.abs(target).max(axis=1) / (half - 1), np.full(B, half))  # ... on +-(half - 1)
            naive_d, naive_z = to_scale(peak / -half), np.full(B, half, np.float32)
        else:  # ONNX Runtime's round to nearest: [min, max] with 0 in it, on [0, qmax]
            lo, hi = np.minimum(target.min(axis=1), 0), np.maximum(target.max(axis=1), 0)
            naive_d = to_scale((hi - lo) / qmax)
            naive_z = np.clip(np.rint(-lo / np.where(naive_d == 0, 1, naive_d)), 0, qmax).astype(np.float32)
            cand(naive_d, naive_z)
        # the original moved just enough to hold each block's largest touched change exactly
        j = np.argmax(np.where(touched, np.abs(target - before), -1), axis=1)
        xt = target[np.arange(B), j]
        q = np.clip(np.rint(xt / np.where(d0 == 0, 1, d0)), -z0, np.float32(qmax) - z0)
        q = np.where(q == 0, np.where(z0 < qmax, 1, -1), q)
        cand(np.where(d0 != 0, xt / q, d0), z0)
        for f in (0.98, 1.02):
            cand(naive_d * f, naive_z)
            cand(d0 * f, z0)
    d, _, q, lo, _ = fit_grid(target, w, cands, 0, 0, False, to_scale)
    return d, -lo, q.T.astype(np.int32)


def _search_float(nb: NBits, target, before, touched, real, d0, z0, to_scale, touched_weight):
    """`_search` for blocks with float zero points: (scale [B], zero point [B], codes [B, block]), both as stored. The
    grid is affine, fl32(d * code) + m with m = -fl32(d * z), so the same search fits (d, m): among the original, the
    round-to-nearest one over the block's [min, max] (HQQ's starting point) and those scaled by 0.98 / 1.02 about the
    block's middle, the original with its zero point moved to hold the largest touched change exactly and the original
    scaled by 0.98 / 1.02; then least squares of (d, m). The result's zero point is -m / d rounded to the stored type;
    its grid is evaluated as onnxruntime decodes it and kept only where its error is below the original's."""
    B, qmax = target.shape[0], nb.qmax
    w = np.where(touched, np.float32(touched_weight), np.where(real, np.float32(1), np.float32(0)))
    cands = []

    def cand(d, z):
        d, z = to_scale(d), to_scale(z)
        with np.errstate(invalid="ignore", over="ignore"):
            cands.append((d, -(d * z)))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cand(d0, z0)  # the original
        lo = np.where(real, target, np.inf).min(axis=1)
        hi = np.where(real, target, -np.inf).max(axis=1)
        mid = (lo + hi) / 2
        naive_d = (hi - lo) / np.float32(qmax)
        naive_d = np.where(naive_d > 0, naive_d, np.abs(d0))
        for f in (1.0, 0.98, 1.02):
            dn = to_scale(naive_d * np.float32(f))
            cand(dn, np.float32(qmax / 2) - mid / dn)
        j = np.argmax(np.where(touched, np.abs(target - before), -1), axis=1)
        xt = target[np.arange(B), j]
        safe = np.where(d0 == 0, np.float32(1), d0)
        c = np.clip(np.rint(xt / safe + z0), 0, qmax)
        cand(d0, np.where(d0 != 0, c - xt / safe, z0))
        for f in (0.98, 1.02):
            cand(d0 * np.float32(f), z0)
    d, m, _, _, _ = fit_grid(target, w, cands, 0, qmax, True, to_scale)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z = to_scale(np.where(d != 0, -m / np.where(d == 0, np.float32(1), d), z0))
        m = -(d * z)  # (as onnxruntime decodes: its own product, rounded)
    x, wt = np.ascontiguousarray(target.T), np.ascontiguousarray(w.T)
    q, err = grid_eval(x, wt, d, m, 0, qmax)
    q0, err0 = grid_eval(x, wt, d0, cands[0][1], 0, qmax)
    better = (err < err0) & np.isfinite(z) & np.isfinite(d)
    return (np.where(better, d, d0), np.where(better, z, z0),
            np.where(better[None, :], q, q0).T.astype(np.int32))

