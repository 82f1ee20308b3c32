"""Regenerate the NeuroAda conformance vectors (spec/SPEC.md section 12).

    python spec/make_vectors.py              # rewrites spec/vectors/
    python spec/make_vectors.py --out DIR    # writes elsewhere (the tests compare the bytes)

Every file is written byte by byte here (struct + json), not through the safetensors library, so
that a malformed vector is exactly as malformed as intended and a regeneration is byte-identical
whatever library versions are installed. Pseudo-random numbers come from a splitmix64 stream
written out below for the same reason. The reference implementation (neuroada_format) is used only
for what the vectors are meant to pin down: probe and structure hashes, selections and merges.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys

import ml_dtypes
import numpy as np

import neuroada_format as naf
from neuroada_format.hashing import structure_hash
from neuroada_format.merge import merge_weight
from neuroada_format.selection import select_indices

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "vectors")
SUBDIRS = ("bases", "valid", "invalid", "merge")

DT = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
      "F64": np.dtype("<f8"), "I16": np.dtype("<i2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"),
      "I8": np.dtype("i1")}


# -- deterministic numbers ---------------------------------------------------------------------------
class SplitMix64:
    """A tiny, fully specified PRNG so the vectors never depend on numpy's stream policy."""
    MASK = (1 << 64) - 1

    def __init__(self, seed: int):
        self.state = seed & self.MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self.MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.MASK
        return z ^ (z >> 31)

    def uniform(self, n: int, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
        return np.array([lo + (hi - lo) * ((self.next() >> 11) * 2.0 ** -53) for _ in range(n)])


def randn(shape, dtype: str, seed: int, scale: float = 1.0) -> np.ndarray:
    n = int(np.prod(shape))
    return (SplitMix64(seed).uniform(n) * scale).astype(np.float32).astype(DT[dtype]).reshape(shape)


# -- raw safetensors writing -------------------------------------------------------------------------
def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def raw_file(header, data: bytes = b"", *, length: int | None = None, pad: bool = True) -> bytes:
    """u64 LE header length + header bytes (padded with spaces to 8) + data, with no checks at all."""
    if isinstance(header, (dict, list)):
        header = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    if isinstance(header, str):
        header = header.encode("utf-8")
    if pad:
        header += b" " * (-(8 + len(header)) % 8)
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def container(tensors, metadata: dict | None = None, *, pad: bool = True, header_order=None) -> bytes:
    """A well-formed safetensors file: tensors = [(name, array)], data in the order given."""
    header, chunks, pos = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    entries = {}
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        raw = arr.tobytes()
        entries[name] = {"dtype": naf.dtypes.dtype_name(arr.dtype), "shape": list(arr.shape),
                         "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    for name in (header_order or [n for n, _ in tensors]):
        header[name] = entries[name]
    return raw_file(header, b"".join(chunks), pad=pad)


# -- raw ONNX writing (spec section 15.4) ---------------------------------------------------------------
# A protobuf ModelProto written field by field (varints and length-delimited fields, ascending field numbers), so the
# bytes never depend on the onnx package's serializer.
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(field: int, value) -> bytes:
    """One protobuf field: an int as a varint, bytes or str length-delimited."""
    if isinstance(value, int):
        return _varint(field << 3) + _varint(value)
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw


ONNX_TYPES = {np.dtype("<f4"): 1, np.dtype(np.uint8): 2, np.dtype("<f2"): 10}


def onnx_tensor(name: str, arr: np.ndarray) -> bytes:
    """TensorProto: dims (1), data_type (2), name (8), raw_data (9, little-endian)."""
    arr = np.ascontiguousarray(arr)
    return (b"".join(_pb(1, int(d)) for d in arr.shape) + _pb(2, ONNX_TYPES[arr.dtype]) + _pb(8, name)
            + _pb(9, arr.tobytes()))


def _value_info(name: str, elem: int, shape) -> bytes:
    dims = b"".join(_pb(1, _pb(1, int(d))) for d in shape)                    # TensorShapeProto.dim.dim_value
    return _pb(1, name) + _pb(2, _pb(1, _pb(1, elem) + _pb(2, dims)))          # ValueInfoProto.type.tensor_type


def onnx_node(op: str, inputs, outputs, name: str, attrs=(), domain: str = "") -> bytes:
    """NodeProto: input (1), output (2), name (3), op_type (4), attribute (5: INT, or INTS from a list), domain (7)."""
    def attr(a, v):
        if isinstance(v, list):                                              # AttributeProto ints (8), type INTS
            return _pb(5, _pb(1, a) + b"".join(_pb(8, int(x)) for x in v) + _pb(20, 7))
        return _pb(5, _pb(1, a) + _pb(3, v) + _pb(20, 2))                     # AttributeProto i (3), type INT
    return (b"".join(_pb(1, n) for n in inputs) + b"".join(_pb(2, n) for n in outputs) + _pb(3, name) + _pb(4, op)
            + b"".join(attr(a, v) for a, v in attrs) + (_pb(7, domain) if domain else b""))


def onnx_model(nodes, initializers, inputs, outputs) -> bytes:
    """A ModelProto (IR 10, opsets "" 17 and com.microsoft 1) of graph "g": nodes (NodeProto bytes), initializers
    [(name, array)], inputs and outputs [(name, element type, shape)]."""
    graph = (b"".join(_pb(1, n) for n in nodes) + _pb(2, "g")
             + b"".join(_pb(5, onnx_tensor(n, a)) for n, a in initializers)
             + b"".join(_pb(11, _value_info(*v)) for v in inputs) + b"".join(_pb(12, _value_info(*v)) for v in outputs))
    opsets = _pb(8, _pb(1, "") + _pb(2, 17)) + _pb(8, _pb(1, "com.microsoft") + _pb(2, 1))
    return _pb(1, 10) + _pb(7, graph) + opsets


def matmulnbits_node(weight: str, x: str, y: str, name: str, *, K: int, N: int, bits: int, block: int):
    """A MatMulNBits node Y = X W^T with B named `<weight>_Q<bits>` as ONNX Runtime's quantizer names it, and the
    names of its B, scales and zero points."""
    names = [f"{weight}_Q{bits}", f"{weight}_scales", f"{weight}_zero_points"]
    node = onnx_node("MatMulNBits", [x, *names], [y], name,
                     [("K", K), ("N", N), ("bits", bits), ("block_size", block)], domain="com.microsoft")
    return node, names


def matmulnbits_model(weight: str, B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, *, K: int, N: int,
                      bits: int, block: int) -> bytes:
    """A model of one MatMulNBits node (matmulnbits_node) and its B, scales and zero points."""
    node, names = matmulnbits_node(weight, "A", "Y", "q_proj", K=K, N=N, bits=bits, block=block)
    elem = ONNX_TYPES[scales.dtype]
    return onnx_model([node], list(zip(names, (B, scales, zero_points))), [("A", elem, (3, K))],
                      [("Y", elem, (3, N))])


def hqq_vector(tmp: str):
    """A MatMulNBits weight with float zero points (ONNX Runtime's HQQ layout: 4-bit, K = 64 in blocks of 32, f32
    scales and zero points, one per block, unpacked), an adapter whose merged values are each some code's value on its
    block's own grid (so the merge changes codes only, section 15.4), and the merged model, merged by the reference.
    Returns (base bytes, [(target, ...)], expected bytes)."""
    K, N, block = 64, 4, 32
    nb = K // block
    rng = SplitMix64(1504)
    codes = np.array([rng.next() % 16 for _ in range(N * K)], np.uint8).reshape(N, nb, block)
    scales = (0.005 + 0.02 * (rng.uniform(N * nb, 0.0, 1.0))).astype(np.float32)
    zps = (15.0 * rng.uniform(N * nb, 0.0, 1.0)).astype(np.float32)
    B = codes[..., 0::2] | (codes[..., 1::2] << 4)
    s32, z32 = scales.reshape(N, nb, 1), zps.reshape(N, nb, 1)
    W = (codes.astype(np.float32) * s32 - s32 * z32).reshape(N, K)     # fl32(fl32(code * s) - fl32(s * z))
    idx = select_indices(W, 3)
    rows = np.arange(N)[:, None]
    want = np.array([[(rng.next() % 16) for _ in range(3)] for _ in range(N)], np.float32)
    s_at, m_at = scales.reshape(N, nb)[rows, idx // block], -(scales * zps).reshape(N, nb)[rows, idx // block]
    target_values = want * s_at + m_at
    base_values = np.take_along_axis(W, idx, 1)
    vals = (target_values - base_values).astype(np.float32)
    reach = base_values + vals == target_values
    vals[~reach] = 0                                                 # (a value no f32 delta reaches: unchanged)
    assert reach.sum() >= 10
    base = Base({DOWN: W})
    t = target(base, DOWN, 3, indices=idx, value_dtype="F32", values=vals)
    model = matmulnbits_model(DOWN, B.reshape(N, nb, block // 2), scales, zps, K=K, N=N, bits=4, block=block)
    from neuroada_format.converters.onnx_merge import merge_onnx  # (needs onnx: only for this vector)
    from neuroada_format.converters.onnx_read import OnnxModel
    with open(os.path.join(tmp, "base.onnx"), "wb") as f:
        f.write(model)
    out = os.path.join(tmp, "merged.onnx")
    summary = merge_onnx(os.path.join(tmp, "base.onnx"), [(naf.Adapter({DOWN: t}, base_name="v"), 1.0)], out)
    assert summary.details["blocks_reencoded"] == 0 and summary.details["blocks_on_grid"] > 0, summary.details
    merged = OnnxModel(out)
    try:
        new_B, new_s, new_z = (np.array(merged.stored(n)) for n in (f"{DOWN}_Q4", f"{DOWN}_scales",
                                                                     f"{DOWN}_zero_points"))
    finally:
        merged.close()
    assert new_s.tobytes() == scales.tobytes() and new_z.tobytes() == zps.tobytes() and new_B.tobytes() != B.tobytes()
    one_rounding = ((codes.astype(np.float32) - z32) * s32).reshape(N, K)  # (the integer form's decoding)
    assert (np.take_along_axis(one_rounding, idx, 1) != base_values).any()
    expected = matmulnbits_model(DOWN, new_B.reshape(N, nb, block // 2), scales, zps, K=K, N=N, bits=4, block=block)
    return model, [t], expected


ONNX_F32, ONNX_I64 = 1, 7


def onnx_linear_base():
    """An ONNX base for validation (section 2.6, case 3): float initializers the way exporters store linear weights
    (a MatMul's [d_in, d_out]; a Gemm's [d_out, d_in] with transB = 1; [d_out, d_in] through a Transpose, named with a
    leading part `model.` that the key k.weight lacks; one under a
    name no target has, `val_3`, found by the probe; a square MatMul weight, whose orientation only the graph
    tells; an embedding table that a Gather and the tied head's Gemm both
    read) and a MatMulNBits weight with UINT8 zero points (section 15.4: 4 bits, K = 32 in blocks of 16). Returns
    (model bytes, {name: the canonical [d_out, d_in] binary32 values})."""
    d_in, d_out, vocab = 6, 4, 5
    q, o, k, up = (randn((d_out, d_in), "F32", seed) for seed in (1701, 1702, 1703, 1704))
    sq = randn((d_out, d_out), "F32", 1707)
    embed = randn((vocab, d_in), "F32", 1705)
    K, N, block = 32, 4, 16
    nb = K // block
    rng = SplitMix64(1706)
    codes = np.array([rng.next() % 16 for _ in range(N * K)], np.uint8).reshape(N, nb, block)
    zps = np.array([rng.next() % 16 for _ in range(N * nb)], np.uint8).reshape(N, nb)
    scales = (0.01 + 0.05 * rng.uniform(N * nb, 0.0, 1.0)).astype(np.float32).reshape(N, nb)
    B = (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(N, nb, block // 2)
    packed_zps = (zps[:, 0::2] | (zps[:, 1::2] << 4)).reshape(N)          # ceil(nb * 4 / 8) = 1 byte per row
    down = ((codes.astype(np.float32) - zps[..., None].astype(np.float32)) * scales[..., None]).reshape(N, K)
    nbits_node, nbits_names = matmulnbits_node("down.weight", "X2", "Y_down", "down", K=K, N=N, bits=4, block=block)
    nodes = [onnx_node("MatMul", ["X", "q.weight"], ["Y_q"], "q"),
             onnx_node("Gemm", ["X", "o.weight"], ["Y_o"], "o", [("transB", 1)]),
             onnx_node("Transpose", ["model.k.weight"], ["k_t"], "k_transpose", [("perm", [1, 0])]),
             onnx_node("MatMul", ["X", "k_t"], ["Y_k"], "k"),
             onnx_node("MatMul", ["X", "val_3"], ["Y_up"], "up"),
             onnx_node("MatMul", ["Y_q", "s.weight"], ["Y_s"], "s"),
             onnx_node("Gather", ["embed.weight", "ids"], ["Y_embed"], "embed", [("axis", 0)]),
             onnx_node("Gemm", ["X", "embed.weight"], ["Y_head"], "head", [("transB", 1)]),
             nbits_node]
    inits = [("q.weight", q.T), ("o.weight", o), ("model.k.weight", k), ("val_3", up.T), ("s.weight", sq.T),
             ("embed.weight", embed),
             *zip(nbits_names, (B, scales.reshape(-1), packed_zps))]
    inputs = [("X", ONNX_F32, (3, d_in)), ("ids", ONNX_I64, (3,)), ("X2", ONNX_F32, (3, K))]
    outputs = [(y, ONNX_F32, (3, n)) for y, n in (("Y_q", d_out), ("Y_o", d_out), ("Y_k", d_out), ("Y_up", d_out),
                                                   ("Y_s", d_out), ("Y_head", vocab), ("Y_down", N))]
    outputs.insert(6, ("Y_embed", ONNX_F32, (3, d_in)))
    canon = {"q.weight": q, "o.weight": o, "k.weight": k, "up": up, "s.weight": sq, "embed.weight": embed,
             "down.weight": down}
    return onnx_model(nodes, inits, inputs, outputs), canon


# -- raw GGUF writing (spec section 15) -----------------------------------------------------------------
GGUF_F32, GGUF_F16, GGUF_Q4_1 = 0, 1, 3
GGUF_Q4_K, GGUF_Q5_K, GGUF_Q6_K = 12, 13, 14
GGUF_Q2_K = 10
GGUF_U32, GGUF_STR = 4, 8
GGUF_U8, GGUF_ARRAY = 0, 9
GGUF_Q8_K, GGUF_I32 = 15, 26  # types without a binary32 decoding (section 15.2)
GGUF_REMOVED_Q4_2 = 4         # a type number ggml has removed: no GGML type
GGUF_KV_U16, GGUF_KV_I32 = 2, 5  # metadata value types of the split keys (section 15.1)


def gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def gguf_array(element_type: int, elements) -> bytes:
    """A GGUF array value without its own type field: element type, count, then the elements as given (bytes
    each; an element of an array of arrays is itself such a value)."""
    return struct.pack("<IQ", element_type, len(elements)) + b"".join(elements)


def gguf_file(kv, tensors, alignment: int = 32) -> bytes:
    """A little-endian GGUF v3 file: kv = [(key, type, value)], tensors = [(name, type, ne, raw bytes)]; a value
    given as bytes is written as it is (arrays: `gguf_array`)."""
    string = gguf_string
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for key, vtype, value in kv:
        out += string(key) + struct.pack("<I", vtype)
        if isinstance(value, bytes):
            out += value
        else:
            out += string(value) if vtype == GGUF_STR else struct.pack("<I", value)
    offset, data = 0, bytearray()
    for name, ttype, ne, raw in tensors:
        out += string(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", ttype, offset)
        data += raw + b"\0" * (-len(raw) % alignment)
        offset = len(data)
    out += b"\0" * (-len(out) % alignment)
    return bytes(out + data)


def q4_1(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Rows of 32 f32 values as Q4_1 blocks (f16 scale d, f16 minimum m, 16 bytes of 4-bit levels, low
    nibbles first) and the values they decode to: fl32(fl32(d) * q) + fl32(m), per spec section 15.2."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = ((blocks.max(1) - blocks.min(1)) / 15).astype(np.float16)
    m = blocks.min(1).astype(np.float16)
    d32, m32 = d.astype(np.float32)[:, None], m.astype(np.float32)[:, None]
    q = np.clip(np.rint((blocks - m32) / d32), 0, 15).astype(np.uint8)
    nib = q[:, :16] | (q[:, 16:] << np.uint8(4))
    raw = b"".join(d[i].tobytes() + m[i].tobytes() + nib[i].tobytes() for i in range(len(blocks)))
    return raw, ((d32 * q.astype(np.float32)) + m32).reshape(x.shape)


def k_superblocks(kind: str, rows: int, seed: int) -> tuple[bytes, np.ndarray]:
    """`rows` random Q4_K / Q5_K / Q6_K super-blocks (any levels and sub-block scales, small f16 super-scales) and
    the 256 values each decodes to, written out from spec section 15.2's text, one value at a time."""
    rng = np.random.default_rng(seed)
    size = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[kind]
    raw = rng.integers(0, 256, (rows, size), dtype=np.uint8)
    supers = (np.abs(rng.standard_normal((rows, 2))) * 0.004).astype(np.float16)
    out = np.zeros((rows, 256), np.float32)
    for r in range(rows):
        b = raw[r]
        if kind == "Q6_K":
            b[208:210] = np.frombuffer(supers[r, 0].tobytes(), np.uint8)
            d = np.float32(supers[r, 0])
            sc = b[192:208].view(np.int8)
            for v in range(256):
                c, l = divmod(v, 32)
                half = c // 4
                low = (int(b[64 * half + 32 * (c % 2) + l]) >> (4 * ((c // 2) % 2))) & 15
                high = (int(b[128 + 32 * half + l]) >> (2 * (c % 4))) & 3
                out[r, v] = np.float32(d * np.float32(sc[v // 16])) * np.float32((low | high << 4) - 32)
            continue
        b[0:4] = np.frombuffer(supers[r].tobytes(), np.uint8)
        d, dmin = np.float32(supers[r, 0]), np.float32(supers[r, 1])
        a, m_, c = b[4:8].astype(int), b[8:12].astype(int), b[12:16].astype(int)
        sc = [a[j] & 63 for j in range(4)] + [(c[j] & 15) | (a[j] >> 6) << 4 for j in range(4)]
        mn = [m_[j] & 63 for j in range(4)] + [(c[j] >> 4) | (m_[j] >> 6) << 4 for j in range(4)]
        qs = b[-128:]
        for v in range(256):
            g, rest = divmod(v, 64)
            h, l = divmod(rest, 32)
            n = (int(qs[32 * g + l]) >> (4 * h)) & 15
            if kind == "Q5_K":
                n |= ((int(b[16 + l]) >> (2 * g + h)) & 1) << 4
            s_ = v // 32
            D, N = np.float32(d * np.float32(sc[s_])), np.float32(dmin * np.float32(mn[s_]))
            out[r, v] = np.float32(D * np.float32(n)) - N
    return raw.tobytes(), out


def q2_k_superblocks(rows: int, seed: int, negative_d: bool = False) -> tuple[bytes, np.ndarray]:
    """`rows` random Q2_K super-blocks (any levels, sub-block scales and minimums, small f16 d and dmin; with
    negative_d a negative d and every odd sub-block's minimum 0, so that its zero levels decode to -0.0) and the 256
    values each decodes to, written out from spec section 15.2's text, one value at a time."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, 84), dtype=np.uint8)
    supers = (np.abs(rng.standard_normal((rows, 2))) * 0.004).astype(np.float16)
    if negative_d:
        supers[:, 0] = -supers[:, 0]
        raw[:, 1:16:2] &= 15  # scales[s] for odd s: the minimum (high nibble) 0
    out = np.zeros((rows, 256), np.float32)
    for r in range(rows):
        b = raw[r]
        b[80:84] = np.frombuffer(supers[r].tobytes(), np.uint8)
        d, dmin = np.float32(supers[r, 0]), np.float32(supers[r, 1])
        for v in range(256):
            half, rest = divmod(v, 128)
            j, l = divmod(rest, 32)
            n = (int(b[16 + 32 * half + l]) >> (2 * j)) & 3
            s_ = v // 16
            D, M = np.float32(d * np.float32(b[s_] & 15)), np.float32(dmin * np.float32(b[s_] >> 4))
            out[r, v] = np.float32(D * np.float32(n)) - M
    return raw.tobytes(), out


def rope_perm(rows: int, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: GGUF row i holds Hugging Face row perm[i] (spec section 15.2)."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


# -- adapters ----------------------------------------------------------------------------------------
class Base:
    """A tiny base checkpoint: ordered name -> array (stored layout)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = dict(arrays)

    def structure(self) -> str:
        return structure_hash((n, naf.dtypes.dtype_name(a.dtype), a.shape) for n, a in self.arrays.items())

    def file(self) -> bytes:
        return container(list(self.arrays.items()))


def target(base: Base, name: str, k: int, *, layout="out_in", rule="magnitude", value_dtype="BF16",
           seed=0, indices=None, values=None, index_dtype=None) -> naf.Target:
    w = base.arrays[name]
    canon = w if layout == "out_in" else w.T
    if indices is None:
        indices = select_indices(canon, k, rule, seed=seed)
    indices = np.asarray(indices)
    if values is None:
        values = randn(indices.shape, value_dtype, 1000 + seed, scale=0.01)
    idt = index_dtype or naf.dtypes.index_dtype_for(canon.shape[1])
    t = naf.Target.from_weight(name, w, indices, values.astype(DT[value_dtype]), layout=layout)
    t.indices = indices.astype(DT[idt])
    return t


def entry(t: naf.Target) -> dict:
    return {"shape": list(t.shape), "layout": t.layout, "dtype": t.dtype, "k": int(t.indices.shape[1]),
            "probe": t.probe}


def document(targets, base: Base | None, *, rule="magnitude", seed=None, version="1.0",
             base_name="neuroada-vectors/base", revision="v1") -> dict:
    selection = {"rule": rule, "tie_break": "lower-column"}
    if seed is not None:
        selection["seed"] = seed
    return {
        "format": "neuroada", "version": version,
        "base": {"name": base_name, "revision": revision,
                 "structure_hash": base.structure() if base is not None else None},
        "selection": selection,
        "merge": {"rule": "add-f32-round-once"},
        "targets": {t.name: entry(t) for t in targets},
        "created_by": "spec/make_vectors.py",
    }


def tensors_of(targets, values_first: bool = False):
    out = []
    for t in sorted(targets, key=lambda t: t.name):
        pair = [("indices/" + t.name, t.indices), ("values/" + t.name, t.values)]
        out.extend(pair[::-1] if values_first else pair)
    return out


def adapter_file(targets, doc: dict, *, extra_meta: dict | None = None, pad=True, values_first=False,
                 tensors=None) -> bytes:
    meta = {"neuroada": dumps(doc)}
    if extra_meta:
        meta.update(extra_meta)
    return container(tensors if tensors is not None else tensors_of(targets, values_first), meta, pad=pad)


# -- the vectors -------------------------------------------------------------------------------------
Q = "model.layers.0.self_attn.q_proj.weight"
O = "model.layers.0.self_attn.o_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
CATTN = "transformer.h.0.attn.c_attn.weight"
SLASH = "enc/values/dense.weight"        # a key with '/' and even 'values/' inside it
UNICODE = "décodeur.0.proj.weight"
NORM = "model.norm.weight"


def main_base() -> Base:
    q = randn((8, 16), "BF16", 1)
    q[0, :] = np.array([0.5, -0.5, 0.25, 0.5, -0.5, 0.125, 0.5, -0.25,
                        0.0625, -0.5, 0.5, 0.25, -0.125, 0.5, 0.0, -0.0], dtype=np.float32).astype(DT["BF16"])
    q[1, 3] = np.float32("nan")     # NaN ranks lowest under magnitude selection
    q[2, 7] = -0.0
    return Base({
        Q: q,
        O: randn((4, 10), "F32", 2),
        DOWN: randn((6, 12), "F16", 3),
        CATTN: randn((12, 6), "BF16", 4),      # GPT-2 Conv1D: stored [in=12, out=6]
        SLASH: randn((4, 8), "BF16", 5),
        UNICODE: randn((3, 5), "BF16", 6),
        NORM: randn((16,), "BF16", 7),
    })


def build() -> dict:
    files: dict[str, bytes] = {}
    vectors: list[dict] = []
    merges: list[dict] = []

    def put(rel: str, data: bytes) -> str:
        assert rel not in files, rel
        files[rel] = data
        return rel

    def vec(name, rel, desc, *, valid, errors=(), warnings=(), base=None, check_selection=False,
            base_unreadable=False):
        v = {"name": name, "file": rel}
        if base is not None:
            v["base"] = base
        if check_selection:
            v["check_selection"] = True
        expected = {"valid": valid, "errors": sorted(set(errors)), "warnings": sorted(set(warnings))}
        if base_unreadable:
            expected["base_unreadable"] = True
        v["expected"] = expected
        v["description"] = desc
        vectors.append(v)

    # ---- bases -------------------------------------------------------------------------------------
    base = main_base()
    B = put("bases/base.safetensors", base.file())

    wide = Base({"wide.weight": randn((2, 40000), "BF16", 8)})
    BW = put("bases/wide.safetensors", wide.file())

    tiny = Base({"w": np.array([[0.5, -1.0, 0.25, 0.0, 0.125, 2.0, -0.0625, 0.75],
                                [-3.0, 0.5, 0.25, 1.5, -0.5, 0.0, 2.5, 0.125]], np.float32).astype(DT["BF16"])})
    BT = put("bases/tiny.safetensors", tiny.file())

    # ---- valid adapters ----------------------------------------------------------------------------
    def valid(name, targets, desc, *, doc=None, base_rel=B, base_obj=base, check_selection=True,
              warnings=(), **kw):
        doc = doc or document(targets, base_obj)
        rel = put(f"valid/{name}.safetensors", adapter_file(targets, doc, **kw))
        vec(name, rel, desc, valid=True, warnings=warnings, base=base_rel, check_selection=check_selection)
        return rel, targets, doc

    mag = [target(base, Q, 4, seed=1)]
    valid("magnitude_bf16", mag, "BF16 values, I16 indices, k=4, magnitude selection (the base row 0 has "
          "ties broken to the lower column, row 1 a NaN that ranks lowest)")
    valid("f16_values", [target(base, DOWN, 3, value_dtype="F16", seed=2)],
          "F16 values on an F16 base, k=3")
    valid("f32_values", [target(base, O, 2, value_dtype="F32", seed=3)], "F32 values on an F32 base, k=2")
    valid("k1", [target(base, Q, 1, seed=4)], "k=1 (one delta per output row)")
    valid("in_out_layout", [target(base, CATTN, 2, layout="in_out", seed=5)],
          "GPT-2 Conv1D target stored [in, out]: indices refer to the canonical [out, in] view")
    multi = [target(base, Q, 3, seed=6), target(base, O, 2, value_dtype="F32", seed=7),
             target(base, DOWN, 2, value_dtype="F16", seed=8), target(base, CATTN, 3, layout="in_out", seed=9),
             target(base, SLASH, 2, seed=10), target(base, UNICODE, 5, seed=11)]
    multi_rel, _, _ = valid("multi_target", multi, "six targets, mixed value dtypes and layouts, a key with '/' "
                            "and 'values/' inside it, a non-ASCII key, k = d_in on one target")
    valid("reverse", [target(base, Q, 3, rule="reverse", seed=12)],
          "reverse selection (smallest |W|), checked against the base", doc=document(
              [target(base, Q, 3, rule="reverse", seed=12)], base, rule="reverse"))
    rnd = [target(base, O, 3, rule="random", seed=1234)]
    valid("random_seeded", rnd, "random selection with a recorded seed (not checkable: 4.4 applies to "
          "magnitude/reverse only)", doc=document(rnd, base, rule="random", seed=1234))

    # delta selection: rows with fewer than k meaningful entries are padded with +0.0 at the lowest
    # unused columns, rows staying strictly increasing.
    pad_idx = np.array([[0, 1, 5], [2, 3, 4], [0, 6, 7], [0, 1, 2]])
    pad_val = np.array([[0.0, 0.0, 0.03125], [0.5, -0.25, 0.125], [0.0, -0.0078125, 0.015625],
                        [0.0, 0.0, 0.0]], np.float32).astype(DT["BF16"])
    pad = [target(base, SLASH, 3, indices=pad_idx, values=pad_val)]
    valid("delta_padded", pad, "selection 'delta' with rows padded by +0.0 values at the lowest unused "
          "columns (row 3 has no meaningful entry at all)", doc=document(pad, base, rule="delta"))

    newer = [target(base, Q, 2, seed=13), target(base, CATTN, 1, layout="in_out", seed=14)]
    doc17 = document(newer, base, version="1.7")
    doc17["training"] = {"steps": 1000, "optimizer": {"name": "adamw", "lr": 0.0007}}
    doc17["base"]["config_sha256"] = "0" * 64
    doc17["selection"]["budget_fraction"] = 0.00327
    doc17["merge"]["note"] = "a 1.7 writer may add fields here too"
    doc17["targets"][Q]["quantization"] = None
    doc17["targets"][CATTN]["group"] = "attention"
    valid("minor_1_7_unknown_fields", newer, "version 1.7 with unknown fields at every level: a 1.0 reader "
          "MUST accept it and ignore them", doc=doc17)

    renamed = [target(base, Q, 2, seed=61)]
    doc12 = document(renamed, base, version="1.2")
    doc12["targets"][Q]["module"] = "model.text_model.layers.0.self_attn.q_proj"
    valid("module_1_2", renamed, "version 1.2: a target records the module of the framework's model that holds the "
          "tensor the checkpoint calls by its key (section 4.6); the key alone decides the base tensor", doc=doc12)

    anon = [target(base, DOWN, 1, value_dtype="BF16", seed=15)]
    anon_doc = document(anon, None, base_name=None, revision=None)
    valid("no_base_identity", anon, "base name, revision and structure_hash all null (no 4.5 check "
          "possible); validated against a base with an extra tensor: still no warning",
          doc=anon_doc, base_rel="bases/extra_tensor.safetensors")
    valid("unaligned_values_first", [target(base, O, 1, value_dtype="F32", seed=16)],
          "header not padded (data starts at an offset that is not a multiple of 8) and values stored "
          "before indices: readers MUST accept both", pad=False, values_first=True)
    valid("foreign_metadata_keys", [target(base, Q, 2, seed=17)],
          "__metadata__ carries other string keys besides 'neuroada' (e.g. format=pt); they are ignored",
          extra_meta={"format": "pt", "note": "written by another tool"})
    wide_t = [target(wide, "wide.weight", 3, seed=18)]
    valid("i32_wide", wide_t, "d_in=40000 > 32768: I32 indices are required", doc=document(wide_t, wide),
          base_rel=BW, base_obj=wide)
    i32 = [target(base, Q, 2, seed=19, index_dtype="I32")]
    valid("i32_where_i16_fits", i32, "I32 indices although d_in=16 fits I16: valid, with a 3.2 warning",
          warnings=["3.2"])

    # the same multi-target adapter against a sharded Hugging Face style base folder
    names = list(base.arrays)
    shard1 = Base({n: base.arrays[n] for n in names[:3]})
    shard2 = Base({n: base.arrays[n] for n in names[3:]})
    put("bases/sharded/model-00001-of-00002.safetensors", shard1.file())
    put("bases/sharded/model-00002-of-00002.safetensors", shard2.file())
    index = {"metadata": {"total_size": sum(a.nbytes for a in base.arrays.values())},
             "weight_map": {n: ("model-00001-of-00002.safetensors" if n in shard1.arrays else
                                "model-00002-of-00002.safetensors") for n in sorted(names)}}
    put("bases/sharded/model.safetensors.index.json", (json.dumps(index, indent=2, ensure_ascii=False)
                                                        + "\n").encode("utf-8"))
    vec("multi_target_sharded_base", multi_rel, "the multi-target adapter against the same base split "
        "into two shards with a model.safetensors.index.json", valid=True, base="bases/sharded",
        check_selection=True)

    # ---- base mismatches (4.x) ---------------------------------------------------------------------
    mag_t = mag[0]
    r0, c0 = 5, int(mag_t.indices[5, 2])
    changed_arrays = dict(base.arrays)
    q2 = base.arrays[Q].copy()
    q2[r0, c0] = (q2[r0, c0].astype(np.float32) + np.float32(0.0078125)).astype(DT["BF16"])
    changed_arrays[Q] = q2
    put("bases/changed_value.safetensors", Base(changed_arrays).file())
    vec("base_changed_value", "valid/magnitude_bf16.safetensors",
        f"one base value at a probed position (row {r0}, column {c0}) differs: probe hash mismatch",
        valid=False, errors=["4.3"], base="bases/changed_value.safetensors")
    put("bases/missing_key.safetensors", Base({n: a for n, a in base.arrays.items() if n != Q}).file())
    vec("base_missing_key", "valid/magnitude_bf16.safetensors", "the base has no tensor named like the "
        "target (4.1); its structure differs too (4.5)", valid=False, errors=["4.1"], warnings=["4.5"],
        base="bases/missing_key.safetensors")
    put("bases/wrong_shape.safetensors",
        Base({**base.arrays, Q: randn((8, 17), "BF16", 1)}).file())
    vec("base_wrong_shape", "valid/magnitude_bf16.safetensors", "the base tensor is [8, 17], the "
        "adapter expects [8, 16] (4.2); structure differs (4.5)", valid=False, errors=["4.2"],
        warnings=["4.5"], base="bases/wrong_shape.safetensors")
    # -- spec 1.1 (section 14): identity on values, not encoding --------------------------------------
    upcast = Base({**base.arrays, Q: base.arrays[Q].astype(np.float32)})
    UP = put("bases/upcast_f32.safetensors", upcast.file())
    vec("base_upcast_same_values", "valid/magnitude_bf16.safetensors", "1.1: the base tensor is the F32 upcast "
        "of the BF16 values the adapter was made on: the same base (warning 4.6, not error 4.2); structure "
        "differs (4.5)", valid=True, warnings=["4.5", "4.6"], base=UP)
    made_on_upcast = [target(upcast, Q, 4, value_dtype="F32", seed=21)]
    valid("made_on_f32_upcast", made_on_upcast, "1.1: made on the F32 upcast copy (dtype F32, F32 values)",
          base_rel=UP, base_obj=upcast)
    vec("made_on_f32_upcast_vs_bf16", "valid/made_on_f32_upcast.safetensors", "1.1: the adapter made on the F32 "
        "upcast belongs to the BF16 checkpoint it was upcast from (warning 4.6); structure differs (4.5)",
        valid=True, warnings=["4.5", "4.6"], base=B, check_selection=True)
    fine = Base({**base.arrays, Q: (base.arrays[Q].astype(np.float32) * np.float32(1 + 2 ** -12))})
    FINE = put("bases/fine_f32.safetensors", fine.file())
    made_on_fine = [target(fine, Q, 4, value_dtype="F32", seed=22)]
    valid("made_on_f32_fine", made_on_fine, "1.1: made on F32 values that BF16 cannot hold", base_rel=FINE,
          base_obj=fine)
    vec("made_on_f32_fine_vs_bf16_rounding", "valid/made_on_f32_fine.safetensors", "1.1: against the BF16 "
        "rounding of the F32 values it was made on: different values, so not the same base (4.3); dtype "
        "differs (4.6), structure differs (4.5)", valid=False, errors=["4.3"], warnings=["4.5", "4.6"], base=B)
    identity_merges = [
        ("coarser_bf16_base", B, "valid/made_on_f32_upcast.safetensors", "1.1: an adapter made on F32 values "
         "merged into the BF16 checkpoint holding them: rule M rounds once to BF16 (not the F32 merge)"),
        ("finer_f32_base", UP, "valid/magnitude_bf16.safetensors", "1.1: a BF16-made adapter merged into the "
         "F32 upcast: rule M in F32, the exact F32 sums"),
    ]
    put("bases/extra_tensor.safetensors",
        Base({**base.arrays, "lm_head.weight": randn((5, 16), "BF16", 20)}).file())
    vec("base_extra_tensor", "valid/magnitude_bf16.safetensors", "the base has one more tensor: the "
        "targets match, only the structure hash differs (warning 4.5)", valid=True, warnings=["4.5"],
        base="bases/extra_tensor.safetensors")
    not_top = select_indices(base.arrays[Q], 4, "magnitude")
    not_top[2] = [0, 1, 2, 3]
    bad_sel = [target(base, Q, 4, indices=not_top, seed=21)]
    rel = put("invalid/magnitude_not_topk.safetensors", adapter_file(bad_sel, document(bad_sel, base)))
    vec("magnitude_not_topk", rel, "declares magnitude selection but row 2 holds columns 0-3, not the "
        "row's top-4 |W|: rule 4.4 when selection is checked", valid=False, errors=["4.4"], base=B,
        check_selection=True)
    vec("magnitude_not_topk_unchecked", rel, "the same file without the selection check: valid (the "
        "probe hash matches the positions actually used)", valid=True, base=B)
    not_bottom = select_indices(base.arrays[Q], 3, "reverse")
    not_bottom[4] = select_indices(base.arrays[Q], 3, "magnitude")[4]
    bad_rev = [target(base, Q, 3, indices=not_bottom, seed=23)]
    rel = put("invalid/reverse_not_bottomk.safetensors", adapter_file(bad_rev, document(bad_rev, base, rule="reverse")))
    vec("reverse_not_bottomk", rel, "declares reverse selection but row 4 holds the row's top-3 |W| instead of "
        "its bottom-3: rule 4.4 when selection is checked", valid=False, errors=["4.4"], base=B, check_selection=True)
    vec("base_wrong_shape_other_dtype", "valid/made_on_f32_upcast.safetensors", "an adapter made on F32 values "
        "against a BF16 base tensor of the wrong shape: 4.2 only, no dtype warning 4.6 (a 4.2 failure stops "
        "the target's later checks); structure differs (4.5)", valid=False, errors=["4.2"], warnings=["4.5"],
        base="bases/wrong_shape.safetensors")

    # bases whose checkpoint index is hostile or broken (1.6): validate raises when opening the base
    def bad_index(folder, index_obj, desc, raw_text=None):
        put(f"bases/{folder}/model-00001-of-00001.safetensors", base.file())
        text = raw_text if raw_text is not None else json.dumps(index_obj, indent=2) + "\n"
        put(f"bases/{folder}/model.safetensors.index.json", text.encode("utf-8"))
        vec(f"base_{folder}", "valid/magnitude_bf16.safetensors", desc, valid=False, errors=["1.6"],
            base=f"bases/{folder}", base_unreadable=True)

    bad_index("index_escapes_folder", {"weight_map": {n: "../base.safetensors" for n in names}},
              "the index names a shard outside its folder ('../base.safetensors')")
    bad_index("index_absolute_path", {"weight_map": {n: "/etc/passwd" for n in names}},
              "the index names a shard by absolute path")
    bad_index("index_key_not_in_shard", {"weight_map": {**{n: "model-00001-of-00001.safetensors"
                                                          for n in names}, "ghost.weight":
                                                       "model-00001-of-00001.safetensors"}},
              "the index lists a tensor its shard lacks")
    bad_index("index_not_json", None, "the index file is not JSON", raw_text='{"weight_map": {')

    # which file of a base folder is read (rule 1.6): the index first, then model.safetensors, then the one
    # .safetensors file whose name does not start with '.'; model.safetensors beside an index of other files is 1.6
    put("bases/index_and_single/model.safetensors", Base(changed_arrays).file())
    put("bases/index_and_single/model-00001-of-00001.safetensors", base.file())
    put("bases/index_and_single/model.safetensors.index.json", (json.dumps(
        {"weight_map": {n: "model-00001-of-00001.safetensors" for n in sorted(names)}}, indent=2) + "\n").encode())
    vec("base_folder_index_and_single", "valid/magnitude_bf16.safetensors", "a base folder with both an index of "
        "other shards and model.safetensors (holding a changed value): two sets of weights, and loaders disagree on "
        "which is the model, so the base cannot be opened", valid=False, errors=["1.6"],
        base="bases/index_and_single", base_unreadable=True)
    put("bases/index_of_single/model.safetensors", base.file())
    put("bases/index_of_single/model.safetensors.index.json", (json.dumps(
        {"weight_map": {n: "model.safetensors" for n in sorted(names)}}, indent=2) + "\n").encode())
    vec("base_folder_index_of_single", "valid/magnitude_bf16.safetensors", "a base folder whose index names "
        "model.safetensors alone: one set of weights, read through the index", valid=True,
        base="bases/index_of_single")
    # an adapter given as the base (rule 1.6): the adapter file itself, and a PEFT adapter folder
    vec("base_is_an_adapter", "valid/magnitude_bf16.safetensors", "the base is an adapter file (its metadata holds "
        "the neuroada key): base and adapter given the other way round", valid=False, errors=["1.6"],
        base="valid/magnitude_bf16.safetensors", base_unreadable=True)
    put("bases/peft_adapter/adapter_model.safetensors", base.file())
    put("bases/peft_adapter/adapter_config.json", b'{"peft_type": "LORA"}\n')
    vec("base_folder_peft_adapter", "valid/magnitude_bf16.safetensors", "a base folder whose one .safetensors file "
        "is adapter_model.safetensors beside adapter_config.json: a PEFT adapter folder, not a base", valid=False,
        errors=["1.6"], base="bases/peft_adapter", base_unreadable=True)
    put("bases/dot_file/weights.safetensors", base.file())
    put("bases/dot_file/._weights.safetensors", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\0" * 16)
    vec("base_folder_dot_file", "valid/magnitude_bf16.safetensors", "a base folder without index or "
        "model.safetensors, holding weights.safetensors and a macOS '._weights.safetensors' companion: names "
        "starting with '.' are not counted, so the one .safetensors file is the base", valid=True,
        base="bases/dot_file")
    # every safetensors file of a base is checked for being an adapter, a shard of an index included
    put("bases/shard_is_adapter/model.safetensors", files["valid/magnitude_bf16.safetensors"])
    put("bases/shard_is_adapter/model.safetensors.index.json", (json.dumps(
        {"weight_map": {"indices/" + Q: "model.safetensors", "values/" + Q: "model.safetensors"}}, indent=2)
        + "\n").encode())
    vec("base_shard_is_an_adapter", "valid/magnitude_bf16.safetensors", "a base folder whose index names one "
        "file, which is an adapter (its metadata holds the neuroada key): the same rule as an adapter given as "
        "the base file", valid=False, errors=["1.6"], base="bases/shard_is_adapter", base_unreadable=True)

    # a dtype the reader does not know, written as safetensors writes dtype names (section 2.2): tolerated on a
    # tensor that is no target (its offsets checked, not its length), rule 4.2 on a target
    def retyped(arrays: dict, name: str, dtype: str) -> bytes:
        raw = Base(arrays).file()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        header[name]["dtype"] = dtype
        return raw_file(header, raw[8 + n:])

    vec("base_unknown_dtype_untargeted", "valid/magnitude_bf16.safetensors", "the base holds one more tensor, of "
        "dtype F6_E2M3, which this reader need not know: tolerated (it is no target); the structure differs "
        "(4.5)", valid=True, warnings=["4.5"], base=put("bases/unknown_dtype_untargeted.safetensors", retyped(
            {**base.arrays, "extra.weight": np.zeros((4, 6), np.uint8)}, "extra.weight", "F6_E2M3")))
    vec("base_unknown_dtype_target", "valid/magnitude_bf16.safetensors", "the target's base tensor has dtype "
        "F6_E2M3 (its bytes left as they were): the base opens, and the target's values cannot be read as "
        "binary32 (4.2); the structure differs (4.5)", valid=False, errors=["4.2"], warnings=["4.5"],
        base=put("bases/unknown_dtype_target.safetensors", retyped(base.arrays, Q, "F6_E2M3")))
    vec("base_truncated", "valid/magnitude_bf16.safetensors", "the base file ends 64 bytes before its last "
        "tensor's data (an interrupted download): the base cannot be opened, and the container rule it breaks "
        "(1.4) is reported", valid=False, errors=["1.4"], base=put("bases/truncated.safetensors", base.file()[:-64]),
        base_unreadable=True)

    # ---- invalid adapters, one rule each -----------------------------------------------------------
    tiny_t = [target(tiny, "w", 2, seed=22)]
    tiny_doc = document(tiny_t, tiny)
    rel_min = put("valid/minimal.safetensors", adapter_file(tiny_t, tiny_doc))
    vec("minimal", rel_min, "the smallest useful adapter: one BF16 [2, 8] target, k=2; the invalid "
        "vectors below are mutations of it", valid=True, base=BT, check_selection=True)
    idx0 = tiny_t[0].indices
    val0 = tiny_t[0].values

    def invalid(name, data: bytes, rule: str, desc: str, *, base_rel=None, more=()):
        rel = put(f"invalid/{name}.safetensors", data)
        vec(name, rel, desc, valid=False, errors=[rule, *more], base=base_rel)

    def with_doc(mutate, tensors=None, meta_extra=None):
        doc = json.loads(json.dumps(tiny_doc))
        mutate(doc)
        meta = {"neuroada": dumps(doc), **(meta_extra or {})}
        return container(tensors if tensors is not None else tensors_of(tiny_t), meta)

    def with_tensors(tensors, mutate=lambda d: None):
        return with_doc(mutate, tensors)

    minimal_bytes = files[rel_min]
    ih = ("indices/w", idx0)
    vh = ("values/w", val0)

    # 1.1 container framing
    invalid("1.1_short_file", b"\x10\x00\x00\x00\x00", "1.1", "5 bytes: shorter than the 8-byte length")
    invalid("1.1_header_length_bomb", struct.pack("<Q", 2 ** 64 - 1) + b"{}", "1.1",
            "header length 2^64-1: MUST be refused before allocating anything")
    invalid("1.1_header_over_cap", struct.pack("<Q", 100_000_001) + b"{}" + b" " * 6, "1.1",
            "header length 100,000,001 exceeds the 100,000,000 cap")
    invalid("1.1_header_past_eof", minimal_bytes[:40], "1.1",
            "truncated inside the header: the declared header length runs past the end of the file")
    invalid("1.1_zero_header_length", struct.pack("<Q", 0), "1.1", "header length 0")

    # 1.2 header JSON
    invalid("1.2_not_json", raw_file(b"{not json}"), "1.2", "the header is not JSON")
    invalid("1.2_not_utf8", raw_file(b'{"\xff\xfe":1}'), "1.2", "the header is not UTF-8")
    invalid("1.2_not_object", raw_file(b"[]"), "1.2", "the header is a JSON array, not an object")
    hdr = json.loads(minimal_bytes[8:8 + struct.unpack("<Q", minimal_bytes[:8])[0]])
    ib = np.ascontiguousarray(idx0).tobytes()
    vb = np.ascontiguousarray(val0).tobytes()
    data = ib + vb
    dup_text = ('{"__metadata__":' + json.dumps(hdr["__metadata__"], ensure_ascii=False) +
                ',"indices/w":' + json.dumps(hdr["indices/w"]) +
                ',"values/w":' + json.dumps(hdr["values/w"]) +
                ',"indices/w":' + json.dumps(hdr["indices/w"]) + '}')
    invalid("1.2_duplicate_keys", raw_file(dup_text, data), "1.2",
            "the header names 'indices/w' twice (parsers disagree on which wins, so it is refused)")
    nan_text = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False).replace('"shape":[2,2]', '"shape":[2,NaN]', 1)
    assert "NaN" in nan_text
    invalid("1.2_nan_constant", raw_file(nan_text, data), "1.2",
            "the header uses the non-standard JSON constant NaN")
    sur_text = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False).replace('"values/w"', '"values/w\\ud800"', 1)
    invalid("1.2_lone_surrogate", raw_file(sur_text, data), "1.2",
            "a tensor name holding the escape \\ud800 alone: valid JSON syntax, but no Unicode text "
            "(there is no UTF-8 form to hash or write back)")
    hdr_text = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False)

    def hdr_replace(old, new):
        assert hdr_text.count(old) == 1, old
        return raw_file(hdr_text.replace(old, new), data)

    # the JSON limits of section 11.1, where a reader without them would report another rule (1.3)
    invalid("1.2_depth_65", raw_file(hdr_text[:-1] + ',"z":' + "[" * 64 + "]" * 64 + "}", data), "1.2",
            "the header nests 65 levels deep (the header object, then 64 arrays), one more than the limit")
    invalid("1.2_number_overflow", hdr_replace('"BF16","shape":[2,2]', '"BF16","shape":[2,1e999]'), "1.2",
            "a shape holding 1e999, a number that overflows binary64 to infinity")
    invalid("1.2_infinity_constant", hdr_replace('"data_offsets":[8,16]', '"data_offsets":[8,Infinity]'), "1.2",
            "the header uses the non-standard JSON constant Infinity")
    vec("header_json_whitespace", put("valid/header_json_whitespace.safetensors",
                                      raw_file("\n\t " + hdr_text + "\r\n\t", data)),
        "the header JSON is preceded and followed by JSON whitespace (LF, tab, space; CR, LF, tab, then the "
        "space padding): readers MUST accept any JSON whitespace around the object", valid=True, base=BT)

    def header_variant(mutate, payload=data):
        h = json.loads(json.dumps(hdr))
        mutate(h)
        return raw_file(h, payload)

    # 1.3 tensor entries
    invalid("1.3_unknown_dtype", header_variant(lambda h: h["values/w"].update(dtype="Q4_0")), "1.3",
            "a tensor dtype safetensors does not define")
    invalid("1.3_extra_entry_field", header_variant(lambda h: h["values/w"].update(align=8)), "1.3",
            "a tensor entry with a field besides dtype, shape, data_offsets")
    invalid("1.3_negative_dim", header_variant(lambda h: h["values/w"].update(shape=[-2, -2])), "1.3",
            "a negative dimension")
    invalid("1.3_float_dim", header_variant(lambda h: h["values/w"].update(shape=[2.0, 2])), "1.3",
            "a non-integer dimension (2.0)")
    invalid("1.3_offsets_not_pair", header_variant(lambda h: h["values/w"].update(data_offsets=[8])),
            "1.3", "data_offsets with one number")
    invalid("1.3_byte_count_of_8600_digits",
            header_variant(lambda h: h["values/w"].update(shape=[10 ** 4299, 10 ** 4299])), "1.3",
            "dimensions of 4300 digits (the most an integer may have): the byte count, 8600 digits, is "
            "not what data_offsets span; a reader must not fail on it otherwise (Python refuses to print it)")
    invalid("1.3_byte_count_mismatch", header_variant(lambda h: h["values/w"].update(shape=[2, 3])), "1.3",
            "shape [2, 3] of BF16 needs 12 bytes but data_offsets span 8")

    # 1.4 data section tiling
    invalid("1.4_overlap", header_variant(lambda h: h["values/w"].update(data_offsets=[4, 12]),
                                          ib + vb[:4]), "1.4", "two tensors share bytes")
    invalid("1.4_gap", header_variant(lambda h: h["values/w"].update(data_offsets=[12, 20]),
                                      ib + b"\0" * 4 + vb), "1.4", "four unused bytes between two tensors")
    invalid("1.4_trailing_bytes", minimal_bytes + b"\0" * 8, "1.4", "eight bytes after the last tensor")
    invalid("1.4_truncated_data", minimal_bytes[:-3], "1.4", "the file ends three bytes early")

    # 1.5 __metadata__
    invalid("1.5_metadata_nested_object", header_variant(
        lambda h: h.update(__metadata__={"neuroada": json.loads(h["__metadata__"]["neuroada"])})), "1.5",
        "__metadata__ maps 'neuroada' to a JSON object instead of a string")

    # 2.1 / 2.2 / 2.3 metadata document
    invalid("2.1_no_metadata", container([ih, vh]), "2.1", "no __metadata__ at all")
    invalid("2.1_no_neuroada_key", container([ih, vh], {"format": "pt"}), "2.1",
            "__metadata__ without a 'neuroada' entry (e.g. a PEFT file)")
    invalid("2.2_metadata_not_json", container([ih, vh], {"neuroada": "{'format': 'neuroada'}"}), "2.2",
            "the 'neuroada' string is not JSON")
    invalid("2.2_metadata_duplicate_key", container([ih, vh], {"neuroada": dumps(tiny_doc)[:-1] +
                                                              ',"version":"1.0"}'}), "2.2",
            "the metadata document repeats the key 'version'")

    def set_path(path, value):
        def mutate(doc):
            obj = doc
            for key in path[:-1]:
                obj = obj[key]
            if value is DELETE:
                del obj[path[-1]]
            else:
                obj[path[-1]] = value
        return mutate

    schema_cases = [
        ("2.2_wrong_format", ["format"], "peft", "format is 'peft'"),
        ("2.2_missing_targets", ["targets"], DELETE, "no targets field"),
        ("2.2_empty_targets", ["targets"], {}, "targets is an empty object"),
        ("2.2_missing_probe", ["targets", "w", "probe"], DELETE, "a target without its probe hash"),
        ("2.2_k_zero", ["targets", "w", "k"], 0, "k = 0"),
        ("2.2_bad_layout", ["targets", "w", "layout"], "col_major", "layout 'col_major'"),
        ("2.2_bad_base_dtype", ["targets", "w", "dtype"], "F64", "a base dtype outside F32/F16/BF16"),
        ("2.2_shape_three_dims", ["targets", "w", "shape"], [2, 8, 1], "a target shape with three numbers"),
        ("2.2_probe_uppercase", ["targets", "w", "probe"], tiny_t[0].probe.upper().replace("SHA", "sha"),
         "a probe hash in upper-case hex"),
        ("2.2_bad_tie_break", ["selection", "tie_break"], "higher-column", "tie_break 'higher-column'"),
        ("2.2_unknown_selection_rule", ["selection", "rule"], "fisher", "selection rule 'fisher' (1.x "
         "enumerations are closed: a newer minor records new rules as 'custom')"),
        ("2.2_bad_merge_rule", ["merge", "rule"], "add-bf16", "merge rule 'add-bf16'"),
        ("2.2_missing_base_revision", ["base", "revision"], DELETE, "base without its revision field "
         "(null is allowed, absence is not)"),
        ("2.2_seed_string", ["selection", "seed"], "42", "a seed given as a string"),
        ("2.3_newer_major", ["version"], "2.0", "version 2.0: a 1.x reader MUST refuse it with a clear message"),
        ("2.3_older_major", ["version"], "0.9", "version 0.9: not a major this reader knows"),
        ("2.3_major_of_4301_digits", ["version"], "2" * 4301 + ".0", "a major version of 4301 digits (more "
         "than an integer may have elsewhere): a newer major, compared as text"),
        ("2.3_no_minor", ["version"], "1", "version '1' is not MAJOR.MINOR"),
        ("2.3_leading_zero", ["version"], "1.07", "version '1.07' (leading zero)"),
        ("2.3_final_newline", ["version"], "1.0\n", "version '1.0' and a newline (a regex whose '$' "
         "matches before a final newline, as Python's does, would let it through)"),
        ("2.2_probe_final_newline", ["targets", "w", "probe"], tiny_t[0].probe + "\n",
         "a probe hash and a newline (the schema's patterns are ECMA-262 regexes: '$' ends the text)"),
    ]
    for name, path, value, desc in schema_cases:
        invalid(name, with_doc(set_path(path, value)), name.split("_")[0], desc)

    def newer_major(doc):
        doc["version"] = "2.0"
        doc["targets"] = [{"key": "w", "encoding": "bitmap"}]    # whatever 2.0 may do, 1.x must not guess
    invalid("2.3_newer_major_new_layout", with_doc(newer_major), "2.3",
            "version 2.0 whose targets no longer follow the 1.x schema: refused as 2.3, not as 2.2")
    invalid("2.2_module_not_a_string", with_doc(set_path(["targets", "w", "module"], 7)), "2.2",
            "a target's module (defined since 1.2, section 4.6) is the number 7, not a string")
    invalid("2.2_module_empty", with_doc(set_path(["targets", "w", "module"], "")), "2.2",
            "a target's module is the empty string (1 to 1024 characters)")
    invalid("2.3_missing_version", with_doc(set_path(["version"], DELETE)), "2.3",
            "no version member: 2.3 (the version is checked before the schema), not 2.2")
    invalid("2.3_version_number", with_doc(set_path(["version"], 1.0)), "2.3",
            "version given as the JSON number 1.0, not the string \"1.0\": 2.3, not 2.2")

    # the document's own JSON: integers without fraction or exponent, the limits of section 11.1
    tiny_text = dumps(tiny_doc)

    def doc_text(old, new):
        assert tiny_text.count(old) == 1, old
        return container(tensors_of(tiny_t), {"neuroada": tiny_text.replace(old, new)})

    invalid("2.2_k_float", doc_text('"k":2', '"k":2.0'), "2.2",
            "k written 2.0: JSON Schema's 'integer' accepts it, the spec does not (integers have no fraction)")
    invalid("2.2_shape_exponent", doc_text('"shape":[2,8]', '"shape":[2,8e0]'), "2.2",
            "a target shape written [2, 8e0] (an exponent: not an integer literal)")
    invalid("2.2_seed_float", doc_text('"rule":"magnitude"', '"rule":"random","seed":1234.0'), "2.2",
            "random selection with the seed written 1234.0")
    deep = '"x":' + "[" * 63 + "]" * 63
    vec("document_depth_64", put("valid/document_depth_64.safetensors", doc_text('"created_by"', deep + ',"created_by"')),
        "an unknown member nests the document exactly 64 levels deep (the document object, then 63 arrays): "
        "the limit itself is allowed", valid=True, base=BT)
    invalid("2.2_depth_65", doc_text('"created_by"', '"x":[' + deep[4:] + '],"created_by"'), "2.2",
            "an unknown member nests the document 65 levels deep, one more than the limit")
    vec("document_long_integer", put("valid/document_long_integer.safetensors",
                                     doc_text('"created_by"', '"x":1' + "0" * 400 + ',"created_by"')),
        "an unknown member holds a 401-digit integer literal (10^400): integers are not converted to binary64, "
        "so it does not overflow; only numbers with a fraction or exponent can (1e999)", valid=True, base=BT)
    invalid("2.2_integer_4301_digits", doc_text('"created_by"', '"x":' + "9" * 4301 + ',"created_by"'), "2.2",
            "an unknown member holds an integer literal of 4301 digits, over the 4300-digit limit")

    # 3.1 tensor names
    invalid("3.1_unknown_tensor", with_tensors([ih, vh, ("lora_A.weight", np.zeros((1, 2), np.float32))]),
            "3.1", "a tensor without the indices/ or values/ prefix")
    invalid("3.1_undeclared_target", with_tensors([ih, vh, ("indices/v", idx0), ("values/v", val0)]),
            "3.1", "tensors for a target the metadata does not declare")
    invalid("3.1_missing_values", with_tensors([ih]), "3.1", "a declared target without its values tensor")
    # 3.2 index dtype
    invalid("3.2_index_i64", with_tensors([("indices/w", idx0.astype("<i8")), vh]), "3.2", "I64 indices")
    invalid("3.2_index_f32", with_tensors([("indices/w", idx0.astype("<f4")), vh]), "3.2", "F32 indices")
    big_idx = np.array([[7, 40001]]).astype("<i2")

    def wide_doc(doc):
        doc["targets"]["w"].update(shape=[1, 40002], k=2)
    invalid("3.2_i16_for_wide_d_in", with_doc(wide_doc, [("indices/w", big_idx),
                                                         ("values/w", val0[:1])]), "3.2",
            "I16 indices with d_in=40002 > 32768 (the stored 40001 would wrap to -25535)")
    # 3.3 value dtype
    invalid("3.3_values_f64", with_tensors([ih, ("values/w", val0.astype(np.float32).astype("<f8"))]),
            "3.3", "F64 values")
    invalid("3.3_values_i8", with_tensors([ih, ("values/w", np.ones((2, 2), "i1"))]), "3.3", "I8 values")
    # which checks stop which (section 7): 3.2, 3.3 and 3.4 are independent; container errors stop the rest
    invalid("3.2_3.3_3.4_one_target", with_tensors([("indices/w", idx0.astype("<i8")),
                                                    ("values/w", val0.astype(np.float32).astype("<f8")[:, :1])]),
            "3.2", "one target with I64 indices, F64 values and a [2, 1] values tensor: all three rules are "
            "reported (none of 3.2, 3.3, 3.4 stops the others)", more=("3.3", "3.4"))

    def bad_entry_and_document(h):
        h["indices/w"]["align"] = 8
        h["__metadata__"]["neuroada"] = h["__metadata__"]["neuroada"].replace('"format":"neuroada"', '"format":"x"')
    invalid("1.3_stops_metadata_checks", header_variant(bad_entry_and_document), "1.3",
            "a tensor entry with an extra field (1.3) and a document whose format is 'x': only 1.3 is reported, "
            "since the metadata (2.x) is checked only when the container (1.1-1.5) has no error")
    # 3.4 shapes and k
    invalid("3.4_k_exceeds_d_in", with_doc(lambda d: d["targets"]["w"].update(shape=[2, 1]),
                                           [ih, vh]), "3.4", "k=2 but the metadata says d_in=1")
    invalid("3.4_indices_shape", with_tensors([("indices/w", idx0[:, :1]), vh]), "3.4",
            "indices [2, 1] where the metadata says k=2")
    invalid("3.4_d_out_mismatch", with_doc(lambda d: d["targets"]["w"].update(shape=[3, 8]), [ih, vh]),
            "3.4", "tensors have 2 rows, the metadata says d_out=3")
    invalid("3.4_values_1d", with_tensors([ih, ("values/w", val0.reshape(-1))]), "3.4",
            "a one-dimensional values tensor")

    # 3.5 - 3.7 content (structure is fine: `load` succeeds, `validate` reports)
    def content(name, idx, vals, rule, desc):
        invalid(name, with_tensors([("indices/w", np.asarray(idx, "<i2")), ("values/w", vals)]), rule, desc)

    content("3.5_index_out_of_range", [[1, 8], [0, 6]], val0, "3.5", "index 8 with d_in=8")
    content("3.5_negative_index", [[-1, 5], [0, 6]], val0, "3.5", "index -1 (rows are still increasing)")
    content("3.6_duplicate_index", [[5, 5], [0, 6]], val0, "3.6", "the same column twice in a row")
    content("3.6_unsorted", [[5, 1], [0, 6]], val0, "3.6", "a row in decreasing order")
    # I32 columns at the int32 extremes: the order check is on the integers, a difference computed in int32
    # overflows (2^31-1 then -2^31 would pass as increasing, -1 then 2^31-1 fail)
    for name, row, errors, desc in (
            ("3.6_i32_extremes_decreasing", [2147483647, -2147483648], ["3.5", "3.6"],
             "I32 row [2^31-1, -2^31]: out of range (3.5) and decreasing (3.6)"),
            ("3.5_i32_extremes_increasing", [-1, 2147483647], ["3.5"],
             "I32 row [-1, 2^31-1]: out of range (3.5) but increasing (no 3.6)")):
        rel = put(f"invalid/{name}.safetensors",
                  with_tensors([("indices/w", np.array([row, [0, 6]], "<i4")), vh]))
        vec(name, rel, desc + "; I32 where I16 suffices is warning 3.2", valid=False, errors=errors,
            warnings=["3.2"])
    nan_v = val0.copy()
    nan_v[1, 0] = np.float32("nan")
    content("3.7_nan_bf16", idx0, nan_v, "3.7", "a NaN BF16 value")
    inf_v = val0.astype(np.float32).astype("<f2")
    inf_v[0, 1] = np.inf
    content("3.7_inf_f16", idx0, inf_v, "3.7", "+Inf as an F16 value")
    ninf = val0.astype(np.float32)
    ninf[1, 1] = -np.inf
    content("3.7_neg_inf_f32", idx0, ninf, "3.7", "-Inf as an F32 value")

    # ---- GGUF bases (spec section 15): names, the rope row order, Q4_1 decoding -----------------------
    gq_raw, gq = q4_1(randn((8, 32), "F32", 31, scale=0.1))      # GGUF row order
    gk_raw, gk = q4_1(randn((4, 32), "F32", 32, scale=0.1))
    g_down = randn((8, 32), "F16", 33, scale=0.1)
    gguf_bytes = gguf_file(
        [("general.architecture", GGUF_STR, "llama"), ("general.alignment", GGUF_U32, 32),
         ("llama.block_count", GGUF_U32, 1), ("llama.attention.head_count", GGUF_U32, 2),
         ("llama.attention.head_count_kv", GGUF_U32, 1)],
        [("blk.0.attn_q.weight", GGUF_Q4_1, (32, 8), gq_raw), ("blk.0.attn_k.weight", GGUF_Q4_1, (32, 4), gk_raw),
         ("blk.0.ffn_down.weight", GGUF_F16, (32, 8), g_down.tobytes()),
         ("output_norm.weight", GGUF_F32, (32,), np.ones(32, np.float32).tobytes())])
    GG = put("bases/tiny_llama.gguf", gguf_bytes)
    QH, KH, DH = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                  "model.layers.0.mlp.down_proj.weight")
    hf = Base({QH: gq[np.argsort(rope_perm(8, 2))], KH: gk[np.argsort(rope_perm(4, 1))], DH: g_down})
    gguf_targets = [target(hf, QH, 3, value_dtype="F32", seed=41), target(hf, KH, 2, value_dtype="F32", seed=42),
                    target(hf, DH, 2, value_dtype="BF16", seed=43)]
    valid("gguf_llama_q4_1", gguf_targets, "1.1: a GGUF base (section 15): Hugging Face names mapped to blk.0.*, "
          "attn_q/attn_k rows in llama.cpp's rope order, Q4_1 decoded to F32, an F16 tensor as is",
          doc=document(gguf_targets, None), base_rel=GG, base_obj=None)
    unpermuted = Base({QH: gq})  # rows as the file stores them: the adapter misses the rope permutation
    bad = [target(unpermuted, QH, 3, value_dtype="F32", seed=41)]
    rel = put("invalid/gguf_rows_not_permuted.safetensors", adapter_file(bad, document(bad, None)))
    vec("gguf_rows_not_permuted", rel, "made on attn_q's rows in file order, not Hugging Face order: the "
        "probed values differ (4.3)", valid=False, errors=["4.3"], base=GG)
    up = Base({DH: g_down.astype(np.float32)})
    upt = [target(up, DH, 2, value_dtype="F32", seed=44)]
    rel = put("valid/gguf_made_on_f32_copy.safetensors", adapter_file(upt, document(upt, None)))
    vec("gguf_made_on_f32_copy", rel, "1.1: made on an F32 copy of the file's F16 tensor: the same values "
        "(warning 4.6)", valid=True, warnings=["4.6"], base=GG)
    down_by_gguf_name = Base({"blk.0.ffn_down.weight": g_down})
    twice = [target(hf, DH, 2, value_dtype="BF16", seed=43),
             target(down_by_gguf_name, "blk.0.ffn_down.weight", 2, value_dtype="BF16", seed=45)]
    rel = put("invalid/gguf_one_tensor_twice.safetensors", adapter_file(twice, document(twice, None)))
    vec("gguf_one_tensor_twice", rel, "two targets naming one GGUF tensor (blk.0.ffn_down.weight by its own name "
        "and by its Hugging Face key): 4.1, since a merge would add both", valid=False, errors=["4.1"], base=GG)
    GN = put("bases/no_architecture.gguf", gguf_file(
        [("general.alignment", GGUF_U32, 32)], [("blk.0.ffn_down.weight", GGUF_F16, (32, 8), g_down.tobytes())]))
    own = [twice[1]]
    rel = put("valid/gguf_own_names.safetensors", adapter_file(own, document(own, None)))
    vec("gguf_no_architecture_own_names", rel, "1.1: a GGUF base without general.architecture; a target named "
        "by the file's own tensor name needs no name table", valid=True, base=GN)
    vec("gguf_no_architecture_hf_names", "valid/gguf_llama_q4_1.safetensors", "the same base and Hugging Face "
        "keys: without general.architecture there is no table to map them (4.1 for each)", valid=False,
        errors=["4.1"], base=GN)
    # other architectures: no rope permutation (gemma2), fused projections kept fused (phi3)
    g2q_raw, g2q = q4_1(randn((8, 32), "F32", 34, scale=0.1))      # Hugging Face row order: stored as is
    G2 = put("bases/tiny_gemma2.gguf", gguf_file(
        [("general.architecture", GGUF_STR, "gemma2"), ("general.alignment", GGUF_U32, 32),
         ("gemma2.block_count", GGUF_U32, 1), ("gemma2.attention.head_count", GGUF_U32, 2),
         ("gemma2.attention.head_count_kv", GGUF_U32, 1)],
        [("blk.0.attn_q.weight", GGUF_Q4_1, (32, 8), g2q_raw)]))
    g2 = [target(Base({QH: g2q}), QH, 3, value_dtype="F32", seed=46)]
    rel = put("valid/gguf_gemma2_rows_as_stored.safetensors", adapter_file(g2, document(g2, None)))
    vec("gguf_gemma2_rows_as_stored", rel, "1.1: a gemma2 GGUF base: attn_q holds the Hugging Face rows as they "
        "are (the rope permutation is llama's only)", valid=True, base=G2)
    g2p = [target(Base({QH: g2q[rope_perm(8, 2)]}), QH, 3, value_dtype="F32", seed=46)]
    rel = put("invalid/gguf_gemma2_rows_permuted.safetensors", adapter_file(g2p, document(g2p, None)))
    vec("gguf_gemma2_rows_permuted", rel, "made as if the gemma2 file's attn_q rows were in llama's rope order: "
        "the probed values differ (4.3)", valid=False, errors=["4.3"], base=G2)
    qkv = randn((16, 32), "F16", 35, scale=0.1)                      # q (8), k (4), v (4) rows stacked
    gu_raw, gu = q4_1(randn((16, 32), "F32", 36, scale=0.1))       # gate (8), up (8) rows stacked
    P3 = put("bases/tiny_phi3.gguf", gguf_file(
        [("general.architecture", GGUF_STR, "phi3"), ("general.alignment", GGUF_U32, 32),
         ("phi3.block_count", GGUF_U32, 1), ("phi3.attention.head_count", GGUF_U32, 2),
         ("phi3.attention.head_count_kv", GGUF_U32, 1)],
        [("blk.0.attn_qkv.weight", GGUF_F16, (32, 16), qkv.tobytes()),
         ("blk.0.ffn_up.weight", GGUF_Q4_1, (32, 16), gu_raw)]))
    QKV, GU = "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"
    fused = Base({QKV: qkv, GU: gu})
    p3 = [target(fused, QKV, 2, value_dtype="BF16", seed=47), target(fused, GU, 3, value_dtype="F32", seed=48)]
    rel = put("valid/gguf_phi3_fused.safetensors", adapter_file(p3, document(p3, None)))
    vec("gguf_phi3_fused", rel, "1.1: a phi3 GGUF base: qkv_proj and gate_up_proj map to the fused attn_qkv and "
        "ffn_up, rows as stored", valid=True, base=P3)
    vec("gguf_phi3_split_keys", "valid/gguf_llama_q4_1.safetensors", "q_proj/k_proj/down_proj keys on the phi3 "
        "file: no attn_q, attn_k or ffn_down tensor there (4.1 for each)", valid=False, errors=["4.1"], base=P3)
    # K-quants (Q4_K_M / Q5_K_M files): super-blocks of 256, decoded per the spec's table, one row each
    kraw = {kind: k_superblocks(kind, 4, seed) for kind, seed in (("Q4_K", 37), ("Q5_K", 38), ("Q6_K", 39))}
    GK = put("bases/tiny_kquants.gguf", gguf_file(
        [("general.architecture", GGUF_STR, "llama"), ("general.alignment", GGUF_U32, 32),
         ("llama.block_count", GGUF_U32, 3)],
        [(f"blk.{i}.ffn_down.weight", code, (256, 4), kraw[kind][0])
         for i, (kind, code) in enumerate((("Q4_K", GGUF_Q4_K), ("Q5_K", GGUF_Q5_K), ("Q6_K", GGUF_Q6_K)))]))
    KD = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]
    kbase = Base({KD[i]: kraw[kind][1] for i, kind in enumerate(("Q4_K", "Q5_K", "Q6_K"))})
    kt = [target(kbase, n, 3, value_dtype="F32", seed=50 + i) for i, n in enumerate(KD)]
    rel = put("valid/gguf_kquants.safetensors", adapter_file(kt, document(kt, None)))
    vec("gguf_kquants", rel, "1.1: Q4_K, Q5_K and Q6_K tensors decoded as section 15.2's table says (probe hashes "
        "over the decoded super-blocks)", valid=True, base=GK)
    shifted = Base({n: a + np.float32(1e-3) for n, a in kbase.arrays.items()})
    kb = [target(shifted, n, 3, value_dtype="F32", seed=50 + i) for i, n in enumerate(KD)]
    rel = put("invalid/gguf_kquants_wrong_values.safetensors", adapter_file(kb, document(kb, None)))
    vec("gguf_kquants_wrong_values", rel, "made on values 0.001 off the decoded Q4_K/Q5_K/Q6_K ones (4.3)",
        valid=False, errors=["4.3"], base=GK)
    kr = [target(kbase, n, 3, rule="reverse", value_dtype="F32", seed=50 + i) for i, n in enumerate(KD)]
    rel = put("valid/gguf_kquants_zero_levels.safetensors", adapter_file(kr, document(kr, None, rule="reverse")))
    vec("gguf_kquants_zero_levels", rel, "reverse selection probes the zero levels: a Q6_K zero level under a "
        "negative sub-block scale decodes to -0.0 (D_s x n, no minimum added), a Q4_K/Q5_K one to the sign of "
        "D_s x n - dmin x mn (section 15.2); the probe hash tells -0.0 from +0.0", valid=True, base=GK,
        check_selection=True)
    # Q2_K (since 1.7; llama.cpp's Q2_K files): layer 0 positive d, layer 1 negative d with minimums of 0 (-0.0 zeros)
    q2raw = [q2_k_superblocks(4, 57), q2_k_superblocks(4, 58, negative_d=True)]
    G2K = put("bases/tiny_q2_k.gguf", gguf_file(
        [("general.architecture", GGUF_STR, "llama"), ("general.alignment", GGUF_U32, 32),
         ("llama.block_count", GGUF_U32, 2)],
        [(f"blk.{i}.ffn_down.weight", GGUF_Q2_K, (256, 4), q2raw[i][0]) for i in range(2)]))
    q2base = Base({KD[i]: q2raw[i][1] for i in range(2)})
    q2t = [target(q2base, n, 3, value_dtype="F32", seed=60 + i) for i, n in enumerate(KD[:2])]
    rel = put("valid/gguf_q2_k.safetensors", adapter_file(q2t, document(q2t, None)))
    vec("gguf_q2_k", rel, "1.1: Q2_K tensors decoded as section 15.2's table says (d x sc x q - dmin x mn; probe "
        "hashes over the decoded super-blocks)", valid=True, base=G2K)
    q2s = Base({n: a + np.float32(1e-3) for n, a in q2base.arrays.items()})
    q2b = [target(q2s, n, 3, value_dtype="F32", seed=60 + i) for i, n in enumerate(KD[:2])]
    rel = put("invalid/gguf_q2_k_wrong_values.safetensors", adapter_file(q2b, document(q2b, None)))
    vec("gguf_q2_k_wrong_values", rel, "made on values 0.001 off the decoded Q2_K ones (4.3)", valid=False,
        errors=["4.3"], base=G2K)
    q2r = [target(q2base, n, 3, rule="reverse", value_dtype="F32", seed=60 + i) for i, n in enumerate(KD[:2])]
    rel = put("valid/gguf_q2_k_zero_levels.safetensors", adapter_file(q2r, document(q2r, None, rule="reverse")))
    vec("gguf_q2_k_zero_levels", rel, "reverse selection probes the zero levels: under a negative d a Q2_K zero level "
        "with a minimum of 0 decodes to -0.0 (D_s x 0 = -0.0, minus +0.0), with any other minimum to -(dmin x mn) "
        "(section 15.2); the probe hash tells -0.0 from +0.0", valid=True, base=G2K, check_selection=True)
    GF = put("bases/tiny_falcon.gguf", gguf_file(
        [("general.architecture", GGUF_STR, "falcon"), ("general.alignment", GGUF_U32, 32),
         ("falcon.block_count", GGUF_U32, 1)],
        [("blk.0.ffn_down.weight", GGUF_F16, (32, 8), g_down.tobytes())]))
    vec("gguf_unmapped_architecture", "valid/gguf_llama_q4_1.safetensors", "Hugging Face q_proj/k_proj keys on a "
        "falcon GGUF, which has no attn_q or attn_k tensor (4.1 for each; down_proj maps, section 15.2)",
        valid=False, errors=["4.1"], base=GF)
    vec("gguf_unmapped_architecture_own_names", "valid/gguf_own_names.safetensors", "1.1: the falcon file's own "
        "tensor name needs no mapping", valid=True, base=GF)
    vec("gguf_truncated_base", "valid/gguf_llama_q4_1.safetensors", "the GGUF base ends inside its header "
        "(200 of its bytes): it cannot be opened (1.6)", valid=False, errors=["1.6"],
        base=put("bases/truncated.gguf", gguf_bytes[:200]), base_unreadable=True)
    # an architecture outside section 15.2's list is refused even for a key gguf-py's table would map
    down_only = [twice[0]]
    rel = put("valid/gguf_hf_down_proj.safetensors", adapter_file(down_only, document(down_only, None)))
    vec("gguf_falcon_maps_down_proj", rel, "1.4: falcon is mapped: the table maps model.layers.0.mlp.down_proj "
        "to blk.0.ffn_down (section 15.2)", valid=True, base=GF)
    GX = put("bases/tiny_gptneox.gguf", gguf_file(
        [("general.architecture", GGUF_STR, "gptneox"), ("general.alignment", GGUF_U32, 32),
         ("gptneox.block_count", GGUF_U32, 1)],
        [("blk.0.ffn_down.weight", GGUF_F16, (32, 8), g_down.tobytes())]))
    vec("gguf_unmapped_architecture_one_key", rel, "the same key on a gptneox GGUF holding the same ffn_down: "
        "an architecture outside section 15.2's list is refused, not guessed (4.1)", valid=False, errors=["4.1"],
        base=GX)
    # 1.5: the rope permutation's heads must be llama.cpp's head size; for attn_k that size is still
    # embedding_length / head_count (the query heads), times head_count_kv heads
    llama_kv = [("general.architecture", GGUF_STR, "llama"), ("general.alignment", GGUF_U32, 32),
                ("llama.block_count", GGUF_U32, 1), ("llama.attention.head_count", GGUF_U32, 2),
                ("llama.attention.head_count_kv", GGUF_U32, 1)]
    llama_tensors = [("blk.0.attn_q.weight", GGUF_Q4_1, (32, 8), gq_raw),
                     ("blk.0.attn_k.weight", GGUF_Q4_1, (32, 4), gk_raw),
                     ("blk.0.ffn_down.weight", GGUF_F16, (32, 8), g_down.tobytes()),
                     ("output_norm.weight", GGUF_F32, (32,), np.ones(32, np.float32).tobytes())]
    vec("gguf_head_size_from_embedding_length", "valid/gguf_llama_q4_1.safetensors", "1.5: embedding_length 8 "
        "over head_count 2 gives heads of 4 rows: attn_q is 2 of them, attn_k head_count_kv = 1 of them (the "
        "divisor is the query heads' count for attn_k too)", valid=True, check_selection=True,
        base=put("bases/tiny_llama_embedding_length.gguf",
                 gguf_file(llama_kv + [("llama.embedding_length", GGUF_U32, 8)], llama_tensors)))
    vec("gguf_head_count_contradicts_rows", "valid/gguf_llama_q4_1.safetensors", "1.5: key_length 2 says "
        "attn_q has 2 x 2 rows and attn_k 1 x 2, but they have 8 and 4: the file contradicts itself (4.2 for "
        "both rope-permuted targets; down_proj is checked as usual)", valid=False, errors=["4.2"],
        base=put("bases/tiny_llama_key_length.gguf",
                 gguf_file(llama_kv + [("llama.attention.key_length", GGUF_U32, 2)], llama_tensors)))
    # 1.6 text: what earlier text left open. A type without a binary32 decoding is 4.2 for a target on it (the base
    # opens: its tensor is sized by its type), and an unknown type number is 1.6 (the layout cannot be checked)
    w_int = randn((8, 32), "F32", 60, scale=100).astype(np.int32)
    w_gate = randn((8, 32), "F32", 61, scale=0.1)
    q8k_raw = bytes((7 * i) % 256 for i in range(2 * 292))       # 2 rows of one Q8_K super-block (never decoded)
    GI = put("bases/tiny_llama_int_types.gguf", gguf_file(
        llama_kv, [("blk.0.ffn_down.weight", GGUF_I32, (32, 8), w_int.tobytes()),
                   ("blk.0.ffn_up.weight", GGUF_Q8_K, (256, 2), q8k_raw),
                   ("blk.0.ffn_gate.weight", GGUF_F32, (32, 8), w_gate.tobytes())]))
    UPK, GATE = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    nodec = [target(Base({DH: w_int.astype(np.float32)}), DH, 2, value_dtype="F32", seed=60),
             target(Base({UPK: np.zeros((2, 256), np.float32)}), UPK, 2, value_dtype="F32", seed=62),
             target(Base({GATE: w_gate}), GATE, 2, value_dtype="F32", seed=61)]
    rel = put("invalid/gguf_type_without_decoding.safetensors", adapter_file(nodec, document(nodec, None)))
    vec("gguf_type_without_decoding", rel, "targets on an I32 and a Q8_K tensor, types with no binary32 decoding "
        "(section 15.2): 4.2 for each (the base opens; no 4.6), and the F32 gate_proj target is checked as usual",
        valid=False, errors=["4.2"], base=GI)
    vec("gguf_unknown_type_number", "valid/gguf_hf_down_proj.safetensors", "an untargeted tensor of type 4, a "
        "number ggml has removed (section 15.1): its size is unknown, so the base cannot be opened (1.6)",
        valid=False, errors=["1.6"], base_unreadable=True, base=put("bases/unknown_type_number.gguf", gguf_file(
            llama_kv, [("blk.0.ffn_down.weight", GGUF_F16, (32, 8), g_down.tobytes()),
                       ("blk.0.ffn_gate.weight", GGUF_REMOVED_Q4_2, (32, 8), bytes(8 * 18))])))
    # two keys naming one tensor: the later key in code point order is 4.1 and nothing else; the earlier is checked
    W2 = "layers.0.feed_forward.w2.weight"   # Meta's alias of ffn_down; sorts before model.layers...
    off = g_down + np.float16(0.5)           # values the adapter was not made on: 4.3 where checked
    for name, first, second, errors, desc in (
            ("gguf_one_tensor_twice_later_refused", g_down, off, ["4.1"], "the later key (model.layers.0.mlp."
             "down_proj.weight), whose probe is wrong, is 4.1 and is not checked further; the earlier alias layers.0."
             "feed_forward.w2.weight is valid"),
            ("gguf_one_tensor_twice_earlier_checked", off, g_down, ["4.1", "4.3"], "the earlier key (the alias "
             "layers.0.feed_forward.w2.weight) is checked as usual and its probe is wrong (4.3); the later "
             "model.layers.0.mlp.down_proj.weight is 4.1")):
        pair = [target(Base({W2: first}), W2, 2, value_dtype="F32", seed=63),
                target(Base({DH: second}), DH, 2, value_dtype="F32", seed=64)]
        rel = put(f"invalid/{name}.safetensors", adapter_file(pair, document(pair, None)))
        vec(name, rel, "two keys naming one GGUF tensor (section 15.2): " + desc, valid=False, errors=errors, base=GG)
    # 1-D tensors: only a one-row linear weight (ffn_gate_inp_shexp) is a [1, n] matrix; a norm weight, or a
    # flat tensor of d_out * d_in values, keeps its one dimension and no target's stored shape equals it
    gate_row, norm_w = randn((1, 32), "F32", 65, scale=0.1), randn((32,), "F32", 66)
    flat = randn((8, 32), "F32", 67, scale=0.1)
    GQ = put("bases/tiny_qwen2moe_1d.gguf", gguf_file(
        [("general.architecture", GGUF_STR, "qwen2moe"), ("general.alignment", GGUF_U32, 32),
         ("qwen2moe.block_count", GGUF_U32, 1)],
        [("blk.0.ffn_gate_inp_shexp.weight", GGUF_F32, (32,), gate_row.tobytes()),
         ("blk.0.ffn_down_shexp.weight", GGUF_F32, (256,), flat.tobytes()),
         ("output_norm.weight", GGUF_F32, (32,), norm_w.tobytes())]))
    SHG, SHD, MN = ("model.layers.0.mlp.shared_expert_gate.weight", "model.layers.0.mlp.shared_expert.down_proj.weight",
                    "model.norm.weight")
    row = [target(Base({SHG: gate_row}), SHG, 3, value_dtype="F32", seed=65)]
    rel = put("valid/gguf_one_row_weight.safetensors", adapter_file(row, document(row, None)))
    vec("gguf_one_row_weight", rel, "1.3: qwen2moe's shared_expert_gate, [1, 32] in the checkpoint, stored 1-D as "
        "blk.0.ffn_gate_inp_shexp.weight (ne = [32]): read as the [1, 32] matrix (section 15.2)", valid=True,
        base=GQ, check_selection=True)
    for name, key, w, seed, desc in (
            ("gguf_one_dimensional_norm", MN, norm_w.reshape(1, 32), 66, "a [1, 32] target on the 1-D norm weight "
             "output_norm.weight (model.norm.weight), made on its values: a norm weight is no one-row linear weight"),
            ("gguf_one_dimensional_flat", SHD, flat, 67, "an [8, 32] target on blk.0.ffn_down_shexp.weight, stored "
             "1-D with its 256 values, made on them: the values are never reshaped")):
        one_d = [target(Base({key: w}), key, 2, value_dtype="F32", seed=seed)]
        rel = put(f"invalid/{name}.safetensors", adapter_file(one_d, document(one_d, None)))
        vec(name, rel, desc + "; a 1-D tensor other than a one-row linear weight has the shape [ne0] (section "
            "15.2), which no target's stored shape equals (4.2)", valid=False, errors=["4.2"], base=GQ)
    # metadata arrays of arrays (section 15.1): each inner array carries its own type and count
    nested = gguf_array(GGUF_ARRAY, [gguf_array(GGUF_U8, [b"\x01", b"\x02", b"\x03"]),
                                     gguf_array(GGUF_STR, [gguf_string("ab"), gguf_string("")]),
                                     gguf_array(GGUF_ARRAY, [])])
    down_only_tensors = [("blk.0.ffn_down.weight", GGUF_F16, (32, 8), g_down.tobytes())]
    vec("gguf_metadata_array_of_arrays", "valid/gguf_hf_down_proj.safetensors", "the base's first metadata value is "
        "an array of 3 arrays (3 U8, 2 strings, and an empty array declared to hold arrays): skipped by each inner "
        "array's own type and count (12 + 3, 12 + 18 and 12 bytes), so the keys and tensor table after it read as "
        "usual", valid=True, base=put("bases/metadata_array_of_arrays.gguf", gguf_file(
            [("x.nested", GGUF_ARRAY, nested)] + llama_kv, down_only_tensors)))
    three = gguf_array(GGUF_ARRAY, [gguf_array(GGUF_ARRAY, [gguf_array(GGUF_U8, [b"\x01"])])])
    vec("gguf_metadata_arrays_three_deep", "valid/gguf_hf_down_proj.safetensors", "an array of arrays of arrays: "
        "nested more than two deep (section 15.1), the base cannot be opened (1.6)", valid=False, errors=["1.6"],
        base_unreadable=True, base=put("bases/metadata_arrays_three_deep.gguf", gguf_file(
            [("x.nested", GGUF_ARRAY, three)] + llama_kv, down_only_tensors)))
    past_end = gguf_array(GGUF_ARRAY, [struct.pack("<IQ", GGUF_U32, 1 << 40)])
    vec("gguf_metadata_nested_array_past_end", "valid/gguf_hf_down_proj.safetensors", "an array of one array whose "
        "own count (2^40 U32 values) runs past the end of the file (section 15.1): 1.6", valid=False,
        errors=["1.6"], base_unreadable=True, base=put("bases/metadata_nested_array_past_end.gguf", gguf_file(
            [("x.nested", GGUF_ARRAY, past_end)] + llama_kv, down_only_tensors)))

    # ---- split GGUF sets (section 15.1, since 1.6): the first shard names the set; its siblings are found by
    # llama.cpp's name PREFIX-0000i-of-0000N.gguf and checked to belong together (split.no, split.count,
    # split.tensors.count as gguf-split writes them: uint16, uint16, int32). Each set has its own PREFIX.
    def split_kv(no, count, total):
        return [("split.no", GGUF_KV_U16, struct.pack("<H", no)), ("split.count", GGUF_KV_U16, struct.pack("<H", count)),
                ("split.tensors.count", GGUF_KV_I32, struct.pack("<i", total))]

    def put_set(prefix, shards, named=None):
        """Shards [(kv, tensors, alignment)] as bases/split/PREFIX-0000i-of-0000N.gguf (N: len(shards), or `named`);
        None leaves a shard out. Returns the first shard's path."""
        n = named or len(shards)
        rels = [put(f"bases/split/{prefix}-{i + 1:05d}-of-{n:05d}.gguf", gguf_file(kv, ts, alignment))
                for i, (kv, ts, alignment) in enumerate(shards) if (kv, ts, alignment) != (None, None, None)]
        return rels[0]

    Q1, K1, D1, N1 = llama_tensors
    # the first shard aligns its data to 64 bytes; the others have no general.alignment (32): each shard is read with
    # its own, and output_norm's offset (96) is no multiple of the first shard's 64
    head = [kv for kv in llama_kv if kv[0] != "general.alignment"] + [("general.alignment", GGUF_U32, 64)]

    def llama_set(total=4, second=(1, 3), third=(2, 3), third_tensors=(D1,), totals=None):
        totals = totals or (total, total, total)
        return [(head + split_kv(0, 3, totals[0]), [Q1], 64),
                (split_kv(*second, totals[1]), [K1, N1], 32),
                (split_kv(*third, totals[2]), list(third_tensors), 32)]
    SP = put_set("llama", llama_set())
    vec("gguf_split_set", "valid/gguf_llama_q4_1.safetensors", "1.6: a split GGUF set of 3 shards given by its first "
        "(section 15.1): q_proj's attn_q is in shard 1, k_proj's attn_k in shard 2 and down_proj's ffn_down in shard "
        "3, mapped by the first shard's metadata (the others carry only the split keys); shard 1 is aligned to 64 "
        "bytes, the others to the default 32, each read with its own", valid=True, check_selection=True, base=SP)
    other_meta = llama_set()
    other_meta[1] = ([("general.architecture", GGUF_STR, "gemma2")] + other_meta[1][0], *other_meta[1][1:])
    vec("gguf_split_metadata_of_first_shard", "valid/gguf_llama_q4_1.safetensors", "shard 2 of the set also says "
        "general.architecture gemma2 (no rope permutation): the set's metadata is the first shard's alone (section "
        "15.1), so attn_q and attn_k keep llama's row order and the probes match", valid=True,
        base=put_set("other_meta", other_meta))
    unreadable = dict(valid=False, errors=["1.6"], base_unreadable=True)
    split_cases = [
        ("gguf_split_later_shard", SP.replace("-00001-of-", "-00002-of-"), "shard 2 of the valid set given as the "
         "base: a later shard is no base by itself (llama.cpp too is given the first)"),
        ("gguf_split_missing_shard", put_set("missing", llama_set()[:2] + [(None, None, None)]), "shards 1 and 2 of "
         "3: missing-00003-of-00003.gguf does not exist"),
        ("gguf_split_foreign_count", put_set("foreign_count", llama_set(second=(1, 2))), "shard 2's split.count is 2 "
         "(a shard of another set), the first's 3"),
        ("gguf_split_foreign_tensors_count", put_set("foreign_total", llama_set(totals=(4, 5, 4))), "shard 2's "
         "split.tensors.count is 5 (another set's), the first's 4"),
        ("gguf_split_wrong_number", put_set("wrong_no", llama_set(third=(1, 3))), "the file named as shard 3 has "
         "split.no 1, not 2"),
        ("gguf_split_tensor_in_two_shards", put_set("twice", llama_set(total=5, third_tensors=(D1, Q1))),
         "blk.0.attn_q.weight is in shards 1 and 3 (split.tensors.count 5 counts both entries): no tensor name is in "
         "two shards"),
        ("gguf_split_tensor_total", put_set("too_few", llama_set(total=5)), "the shards hold 4 tensors in all, "
         "split.tensors.count says 5"),
        ("gguf_split_first_shard_renamed", put("bases/split/renamed.gguf", gguf_file(*llama_set()[0][:2], 64)),
         "llama-00001-of-00003.gguf renamed: a first shard (split.count 3) not named PREFIX-00001-of-00003.gguf, so "
         "its siblings cannot be found"),
        ("gguf_split_count_not_in_name", put_set("count_in_name", [llama_set()[0]], named=2), "a first shard with "
         "split.count 3 named count_in_name-00001-of-00002.gguf: the name's N is not split.count (shards 2 and 3 of 3 "
         "lie beside it, named -0000i-of-00003, but a first shard's own name must say 3)"),
        ("gguf_split_no_past_count", put_set("no_past_count", [(head + split_kv(2, 2, 4), llama_tensors, 64)],
                                             named=2), "split.no 2 with split.count 2: not 0 <= split.no < split.count"),
        ("gguf_split_count_not_integer", put("bases/split/count_string.gguf", gguf_file(
            head + [("split.count", GGUF_STR, "1")], llama_tensors, 64)), "split.count is the string \"1\": a "
         "file with a split key is a shard unless split.count is the integer 1, and a shard's split.count and "
         "split.no are integers"),
        ("gguf_split_no_without_count", put("bases/split/no_without_count.gguf", gguf_file(
            head + split_kv(0, 1, 4)[:1], llama_tensors, 64)), "split.no without split.count: a file with a split key "
         "is a shard unless split.count is the integer 1"),
    ]
    for i, (kv, ts, alignment) in enumerate(llama_set()[1:], 2):
        put(f"bases/split/count_in_name-{i:05d}-of-00003.gguf", gguf_file(kv, ts, alignment))
    for name, base_rel, desc in split_cases:
        vec(name, "valid/gguf_llama_q4_1.safetensors", "the adapter of gguf_split_set against a base that cannot be "
            f"opened (section 15.1, 1.6): {desc}", base=base_rel, **unreadable)
    vec("gguf_split_count_one", "valid/gguf_llama_q4_1.safetensors", "a file whose split.count is 1 and which has no "
        "split.no is a whole file (section 15.1: split.no is read only for a set of two or more), opened as usual",
        valid=True, check_selection=True, base=put("bases/split/count_one.gguf", gguf_file(
            head + split_kv(0, 1, 4)[1:], llama_tensors, 64)))

    # ---- merge vectors -----------------------------------------------------------------------------
    mb = merge_base()
    MB = put("bases/merge_base.safetensors", mb.file())
    adapters = merge_adapters(mb)
    for label, (targets, rule) in adapters.items():
        rel = put(f"merge/adapter_{label}.safetensors", adapter_file(targets, document(targets, mb, rule=rule)))
        vec(f"merge_adapter_{label}", rel, f"merge input adapter {label}", valid=True, base=MB)
    plans = [
        ("one_adapter", [("a", 1.0)], "adapter a at scale 1: ties to even, -0.0 + +0.0 = +0.0, F16 overflow"),
        ("two_scaled", [("a", 0.5), ("b", -1.25)], "a at 0.5 then b at -1.25 over shared and own positions"),
        ("order_ab", [("a", 1.0), ("b", 1.0)], "a then b: on the F32 target the f32 accumulation order "
         "decides the result"),
        ("order_ba", [("b", 1.0), ("a", 1.0)], "b then a: differs from order_ab on the F32 target only"),
    ]
    for name, plan, desc in plans:
        merged = {}
        for tname, w in mb.arrays.items():
            deltas = [(next(t for t in adapters[a][0] if t.name == tname), s) for a, s in plan
                      if any(t.name == tname for t in adapters[a][0])]
            layout = next((t.layout for t, _ in deltas), "out_in")
            with np.errstate(over="ignore"):    # the F16 overflow to +Inf is one of the cases shown
                merged[tname] = merge_weight(w, deltas, layout) if deltas else w
        rel = put(f"merge/{name}_expected.safetensors", container(list(merged.items())))
        merges.append({"name": name, "base": MB,
                       "adapters": [{"file": f"merge/adapter_{a}.safetensors", "scale": s} for a, s in plan],
                       "expected": rel, "description": desc})

    # subnormals (a flush-to-zero merger fails), NaN and -0.0 kept at untouched positions (a dense merger
    # fails), a scale that binary32 cannot hold (a merger multiplying by the binary64 scale fails)
    sb = special_base()
    SB = put("bases/merge_special.safetensors", sb.file())
    special = special_adapters(sb)
    special_plans = [
        ("subnormals", "subnormal", 0.5, "adapter subnormal at scale 0.5: subnormal base values, terms and "
         "results in BF16, F32 and F16 (ties to even among subnormals; a flush-to-zero or denormals-are-zero "
         "merger differs), and NaN payloads (signalling ones included) and -0.0 kept at untouched positions "
         "of the touched tensors"),
        ("scale_not_binary32", "scaled", 0.1, "adapter scaled at scale 0.1, which binary32 cannot hold: the "
         "scale is the nearest binary64 to 0.1, rounded to binary32 (0x3DCCCCCD) before it multiplies; "
         "multiplying by the binary64 scale, fusing the multiply-add or accumulating in binary64 gives "
         "other F32 results"),
    ]
    for label, targets in special.items():
        rel = put(f"merge/adapter_{label}.safetensors", adapter_file(targets, document(targets, sb, rule="custom")))
        vec(f"merge_adapter_{label}", rel, f"merge input adapter {label}", valid=True, base=SB)
    for name, label, scale, desc in special_plans:
        targets = {t.name: t for t in special[label]}
        merged = {n: (merge_weight(w, [(targets[n], scale)]) if n in targets else w) for n, w in sb.arrays.items()}
        check_special(name, merged)
        rel = put(f"merge/{name}_expected.safetensors", container(list(merged.items())))
        merges.append({"name": name, "base": SB,
                       "adapters": [{"file": f"merge/adapter_{label}.safetensors", "scale": scale}],
                       "expected": rel, "description": desc})

    bases_by_rel = {B: base, UP: upcast}
    adapters_by_rel = {"valid/made_on_f32_upcast.safetensors": made_on_upcast,
                       "valid/magnitude_bf16.safetensors": mag}
    for name, base_rel, adapter_rel, desc in identity_merges:
        b = bases_by_rel[base_rel]
        targets = {t.name: t for t in adapters_by_rel[adapter_rel]}
        merged = {n: (merge_weight(w, [(targets[n], 1.0)]) if n in targets else w) for n, w in b.arrays.items()}
        rel = put(f"merge/{name}_expected.safetensors", container(list(merged.items())))
        merges.append({"name": name, "base": base_rel, "adapters": [{"file": adapter_rel, "scale": 1.0}],
                       "expected": rel, "description": desc})

    # 1.7: float zero points (ONNX Runtime's HQQ quantizer), section 15.4
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        hqq_base, hqq_targets, hqq_expected = hqq_vector(tmp)
    HQ = put("bases/matmulnbits_float_zero_points.onnx", hqq_base)
    hq_adapter = put("merge/adapter_float_zero_points.safetensors",
                     adapter_file(hqq_targets, document(hqq_targets, None, base_name="neuroada-vectors/hqq")))
    vec("merge_adapter_float_zero_points", hq_adapter, "merge input adapter float_zero_points (its base is an ONNX "
        "model: validated alone)", valid=True)
    merges.append({"name": "float_zero_points", "base": HQ, "adapters": [{"file": hq_adapter, "scale": 1.0}],
                   "expected": put("merge/float_zero_points_expected.onnx", hqq_expected),
                   "description": "1.7: a MatMulNBits weight with float zero points (section 15.4): values "
                   "fl32(fl32(code * scale) - fl32(scale * zero point)); the adapter puts each merged value on a code "
                   "of its block's own grid, so the merge rewrites codes only (B), scales and zero points byte for "
                   "byte; decoding as fl32((code - zero point) * scale) gives other values (the probe fails, and "
                   "the merged values miss the grid)"})

    # 1.7: validation against ONNX bases (section 2.6, case 3): targets found by name (with the orientation the
    # graph uses), by the probe, on a MatMulNBits weight; and the refusals
    vec("onnx_matmulnbits_float_zero_points", hq_adapter, "1.7: the merge input adapter float_zero_points validated "
        "against its ONNX base: a MatMulNBits weight with float zero points, read as section 15.4's "
        "fl32(fl32(code * scale) - fl32(scale * zero point))", valid=True, base=HQ, check_selection=True)
    onnx_model_bytes, onnx_canon = onnx_linear_base()
    OX = put("bases/onnx_linear.onnx", onnx_model_bytes)
    ocanon = Base(onnx_canon)

    def onnx_vec(name, targets, desc, *, errors=(), check_selection=True):
        doc = document(targets, None, base_name="neuroada-vectors/onnx-linear")
        rel = put(f"{'invalid' if errors else 'valid'}/{name}.safetensors", adapter_file(targets, doc))
        vec(name, rel, desc, valid=not errors, errors=errors, base=OX, check_selection=check_selection)

    def renamed(t: naf.Target, name: str) -> naf.Target:
        t.name = name
        return t

    other = Base({n: randn(a.shape, "F32", 1800 + i) for i, (n, a) in enumerate(onnx_canon.items())})
    onnx_vec("onnx_float_initializers",
             [target(Base({"q.weight": onnx_canon["q.weight"].T}), "q.weight", 2, layout="in_out", seed=70),
              target(ocanon, "o.weight", 3, value_dtype="F32", seed=71), target(ocanon, "k.weight", 2, seed=72),
              target(Base({"model.mlp.up.weight": onnx_canon["up"]}), "model.mlp.up.weight", 2, seed=73)],
             "1.7: float initializers of an ONNX base found by name, in the orientation the graph uses them: "
             "q.weight is a MatMul's [d_in, d_out] (the adapter's layout in_out), o.weight a Gemm's with transB = 1 "
             "[d_out, d_in], k.weight (the initializer model.k.weight: its name is the key with a leading part) "
             "[d_out, d_in] read through a Transpose; model.mlp.up.weight is on no "
             "initializer's name and is found by its probe hash in val_3 (a MatMul's [d_in, d_out])")
    onnx_vec("onnx_square_matmul_weight", [target(ocanon, "s.weight", 2, seed=84)],
             "1.7: a square [4, 4] initializer that a MatMul reads is [d_in, d_out] (in_out) whatever the adapter's "
             "layout (out_in here): read as [d_out, d_in], the probe fails")
    onnx_vec("onnx_4.2_matmul_weight_as_out_in",
             [target(Base({"q.weight": np.ascontiguousarray(onnx_canon["q.weight"].T)}), "q.weight", 2, seed=85)],
             "1.7: the adapter was made on q.weight's stored [6, 4] values as if they were [d_out, d_in]; a MatMul "
             "reads them as [d_in, d_out], so the graph's [d_out, d_in] is [4, 6]: rule 4.2 (the graph's use decides "
             "the orientation, not the stored shape)", errors=["4.2"], check_selection=False)
    onnx_vec("onnx_name_with_leading_part", [renamed(target(ocanon, "q.weight", 2, seed=74), "model.q.weight")],
             "1.7: the key model.q.weight finds the initializer q.weight by name (the key is the name with a leading "
             "part ending in '.'), a MatMul's [d_in, d_out], with an out_in adapter")
    onnx_vec("onnx_4.3_found_by_name_with_leading_part",
             [target(other, "k.weight", 2, seed=86), renamed(target(other, "q.weight", 2, seed=87), "model.q.weight")],
             "1.7: the key k.weight finds the initializer model.k.weight by name, and the key model.q.weight the "
             "initializer q.weight; the adapter was made on other values: rule 4.3 for both (a reader matching "
             "names exactly finds neither, by name or probe: 4.1)", errors=["4.3"], check_selection=False)
    onnx_vec("onnx_matmulnbits_uint8_zero_points", [target(ocanon, "down.weight", 3, value_dtype="F32", seed=75)],
             "1.7: a MatMulNBits weight (4 bits, K = 32 in blocks of 16, UINT8 zero points packed two per byte) "
             "found by its name (B's name without _Q4), values fl32(scale * (code - zero point)), dtype F32")
    onnx_vec("onnx_4.1_no_initializer", [renamed(target(other, "q.weight", 2, seed=76), "missing.weight")],
             "1.7: no initializer's name is the key's and no float initializer or MatMulNBits weight has the "
             "adapter's probe hash: rule 4.1", errors=["4.1"], check_selection=False)
    onnx_vec("onnx_4.1_tied_embedding", [target(ocanon, "embed.weight", 2, seed=77)],
             "1.7: the target's initializer is read by a Gemm (the head) and by a Gather (the embeddings): tied "
             "weights, rule 4.1", errors=["4.1"])
    onnx_vec("onnx_4.1_two_targets_one_initializer",
             [target(ocanon, "q.weight", 2, seed=78),
              renamed(target(ocanon, "q.weight", 3, seed=79), "model.q.weight")],
             "1.7: the keys model.q.weight and q.weight both find the initializer q.weight by name: the later in code "
             "point order (q.weight) is rule 4.1, the earlier checked as usual", errors=["4.1"])
    onnx_vec("onnx_4.2_wrong_shape", [target(Base({"q.weight": randn((4, 5), "F32", 1810)}), "q.weight", 2, seed=80)],
             "1.7: the initializer named by the key is a MatMul's [6, 4] = [d_in, d_out] for [d_out, d_in] = [4, 6], "
             "the adapter's target is [4, 5]: rule 4.2", errors=["4.2"], check_selection=False)
    onnx_vec("onnx_4.2_other_dtype",
             [target(Base({"q.weight": onnx_canon["q.weight"].astype(DT["F16"])}), "q.weight", 2, seed=81)],
             "1.7: the adapter was made on F16 values, the initializer is F32: rule 4.2 on an ONNX base (an ONNX "
             "merge writes the adapter's dtype only), where a safetensors base gives warning 4.6",
             errors=["4.2"], check_selection=False)
    onnx_vec("onnx_4.3_other_values", [target(other, "q.weight", 2, seed=82)],
             "1.7: found by name, but the adapter was made on another model's values: rule 4.3", errors=["4.3"],
             check_selection=False)
    onnx_vec("onnx_4.3_matmulnbits_other_values", [target(other, "down.weight", 3, value_dtype="F32", seed=83)],
             "1.7: a MatMulNBits weight found by name, the adapter made on other values: rule 4.3", errors=["4.3"],
             check_selection=False)

    manifest = {
        "format": "neuroada-conformance-vectors",
        "spec_version": naf.SPEC_VERSION,
        "generator": "spec/make_vectors.py",
        "vectors": vectors,
        "merges": merges,
    }
    files["manifest.json"] = (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    return files


DELETE = object()


def bits(values, dtype: str, shape) -> np.ndarray:
    """An array of `dtype` from its bit patterns (so NaN payloads and subnormals are exactly what is written)."""
    raw = np.array(values, np.uint32 if dtype == "F32" else np.uint16)
    return raw.view(DT[dtype]).reshape(shape)


def special_base() -> Base:
    """Touched positions hold subnormals and near-ties; untouched ones NaNs (signalling too) and -0.0."""
    return Base({
        "s.bf16.weight": bits([0x0040, 0x0001, 0x7FA1, 0x8000,
                               0x0080, 0x3F80, 0xFFC3, 0x0100], "BF16", (2, 4)),
        "s.f32.weight": bits([0x00400000, 0x00000001, 0x7FA00001, 0x80000000,
                              0x00800000, 0x3F800000, 0xFF800000, 0x00000003], "F32", (2, 4)),
        "s.f16.weight": bits([0x0001, 0x0400, 0x7C01,
                              0x0003, 0x8000, 0x7E05], "F16", (2, 3)),
        "s.scale.weight": bits([0xBD6812D0, 0xB9DA7E9A, 0x3F800000, 0x40000000,
                                0xBD36B064, 0xBE052042, 0x3F000000, 0xC0000000], "F32", (2, 4)),
    })


def special_adapters(sb: Base) -> dict:
    """F32 values (subnormal ones included: they are finite) on the special base."""
    def t(name, idx, value_bits):
        return target(sb, name, len(idx[0]), indices=idx, value_dtype="F32", values=bits(value_bits, "F32", (2, 2)))
    subnormal = [
        # x 0.5: 2^-127 + 2^-128; 2^-133 + 2^-134 (a BF16 tie: even 0x0002); 2^-126 - 2^-127; 2^-125 - (2^-125 - 2^-133)
        t("s.bf16.weight", [[0, 1], [0, 3]], [0x00400000, 0x00010000, 0x80800000, 0x817F0000]),
        # x 0.5: 2^-127 + 2^-128; 2^-149 + fl32(1.5 * 2^-149) = 2^-149 + 2^-148 (a subnormal product tie); 2^-126 - 2^-127;
        # 3 * 2^-149 - 2^-149
        t("s.f32.weight", [[0, 1], [0, 3]], [0x00400000, 0x00000003, 0x80800000, 0x80000002]),
        # x 0.5: 2^-24 + 2^-25 (an F16 subnormal tie: even 0x0002); 2^-14 - 2^-15 (subnormal); 3 * 2^-24 + 2^-25
        # (tie: even 0x0004); -0.0 + 2^-25 (half the least F16 subnormal: a tie, to even +0.0)
        t("s.f16.weight", [[0, 1], [0, 1]], [0x33800000, 0xB8800000, 0x33800000, 0x33800000]),
    ]
    scaled = [t("s.scale.weight", [[0, 1], [0, 1]], [0x3F476AF3, 0xBE1921BC, 0x3F73F2DF, 0x3F71EA6C])]
    return {"subnormal": subnormal, "scaled": scaled}


def check_special(name: str, merged: dict) -> None:
    """The bits the special merges are meant to produce (so a change of the generator cannot lose a case)."""
    def u(n):
        a = merged[n]
        return a.view(np.uint32 if a.dtype == DT["F32"] else np.uint16).reshape(-1).tolist()
    if name == "subnormals":
        assert u("s.bf16.weight") == [0x0060, 0x0002, 0x7FA1, 0x8000, 0x0040, 0x3F80, 0xFFC3, 0x0001]
        assert u("s.f32.weight") == [0x00600000, 0x00000003, 0x7FA00001, 0x80000000,
                                     0x00400000, 0x3F800000, 0xFF800000, 0x00000002]
        assert u("s.f16.weight") == [0x0002, 0x0200, 0x7C01, 0x0004, 0x0000, 0x7E05]
    else:
        assert u("s.scale.weight") == [0x3CADFD6C, 0xBC7BD6BC, 0x3F800000, 0x40000000,
                                       0x3D4FA102, 0xBD11705A, 0x3F000000, 0xC0000000]
        s64, s32 = 0.1, np.float32(0.1)
        w = merged["s.scale.weight"]   # each wrong reading of the rule changes some result
        base = special_base().arrays["s.scale.weight"]
        vals = bits([0x3F476AF3, 0xBE1921BC, 0x3F73F2DF, 0x3F71EA6C], "F32", (2, 2))
        for wrong in (lambda b, v: np.float32(b + np.float32(s64 * np.float64(v))),
                      lambda b, v: np.float32(np.float64(b) + np.float64(s32) * np.float64(v)),
                      lambda b, v: np.float32(np.float64(b) + s64 * np.float64(v))):
            assert any(wrong(base[r, c], vals[r, c]) != w[r, c] for r in range(2) for c in range(2))


def merge_base() -> Base:
    bf = np.array([[1.0, -0.0, 1.0, 0.5, 2.0, -1.0, 0.25, 3.0],
                   [1.0, 1.0, -2.0, 0.0, 1.5, -0.75, 8.0, 0.125],
                   [0.0078125, -1.0, 1.0, 100.0, -3.0, 0.5, 1.0, -0.5],
                   [4.0, 0.3, -0.3, 1.0, 0.0, -0.0, 0.1, 0.2]], np.float32).astype(DT["BF16"])
    f16_stored = np.array([[1.0, 60000.0, 0.5], [-2.0, 0.25, 1.0], [0.0, 1.0, -1.0],
                           [3.0, -0.5, 2.0], [1.0, 1.0, 1.0], [-65504.0, 0.125, 0.0]], np.float32).astype("<f2")
    f32 = np.array([[1.0, 2.0, -1.0, 0.5], [1.0, 0.25, 3.0, -4.0]], np.float32)
    return Base({"m.bf16.weight": bf, "m.f16_in_out.weight": f16_stored, "m.f32.weight": f32,
                 "m.untouched.weight": np.array([1.0, 2.0, 3.0], np.float32).astype(DT["BF16"])})


def merge_adapters(mb: Base) -> dict:
    bf = lambda x: np.array(x, np.float32).astype(DT["BF16"])  # noqa: E731
    a = [
        target(mb, "m.bf16.weight", 2, indices=[[0, 1], [0, 1], [2, 3], [5, 7]],
               values=bf([[2 ** -8, 0.0], [2 ** -7, 0.5], [0.01, 0.5], [0.0, 0.015625]])),
        target(mb, "m.f16_in_out.weight", 1, layout="in_out", value_dtype="F16", indices=[[1], [0], [5]],
               values=np.array([[0.0004883], [8000.0], [-1.0]], np.float32).astype("<f2")),
        target(mb, "m.f32.weight", 1, value_dtype="F32", indices=[[0], [1]],
               values=np.array([[2.0 ** -24], [1e-8]], np.float32)),
    ]
    b = [
        target(mb, "m.bf16.weight", 1, value_dtype="F32", indices=[[0], [4], [3], [6]],
               values=np.array([[2.0 ** -8], [0.001], [0.75], [-0.1]], np.float32)),
        target(mb, "m.f32.weight", 2, value_dtype="F32", indices=[[0, 3], [1, 2]],
               values=np.array([[2.0 ** -23, 0.5], [-1e-8, 1.0]], np.float32)),
    ]
    return {"a": (a, "custom"), "b": (b, "delta")}


def write(files: dict[str, bytes], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for sub in SUBDIRS:
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    for rel, data in sorted(files.items()):
        path = os.path.join(out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: spec/vectors next to this script)")
    args = ap.parse_args(argv)
    files = build()
    write(files, args.out)
    total = sum(len(d) for d in files.values())
    digest = hashlib.sha256(b"".join(k.encode() + b"\0" + v for k, v in sorted(files.items()))).hexdigest()
    print(f"wrote {len(files)} files, {total:,} bytes, to {args.out} (content sha256 {digest[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
