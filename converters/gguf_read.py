"""The strict GGUF reader (llama.cpp files): the header, metadata and tensor table parsed with explicit bounds and
checked (spec section 15.1) before anything of the data is read; the data read lazily, de-quantized where asked.
A module of its own because validation (neuroada_format.base), the name map (gguf_names), the runtime's grids and
the merge backend (gguf_merge) all read GGUF files through it, and it needs none of them.

Why a reader of our own: gguf-py's GGUFReader builds Python objects for every metadata element and
trusts counts and offsets, so a hostile file can make it allocate without bound or hang. This reader
walks the header with explicit bounds (every count is checked against the bytes left before anything is
read), decodes only the few keys the merge needs and keeps the rest as raw bytes, which the output
carries over unchanged. gguf-py supplies the tables: type sizes, the per-architecture name map and the
block codecs (`gguf.quants`), which are what transformers' GGUF loader decodes with too.
"""
from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.safe_io import open_regular

from .tensor_map import FileId, check_same_file, file_id, read_tensor, rows_at

try:
    import gguf
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, quants as gquants
except ImportError as exc:  # pragma: no cover - the registry turns this into a usage error
    raise ImportError("GGUF bases need the gguf package: pip install 'neuroada-format[gguf]'",
                      name=exc.name) from exc

RULE = "1.6"  # a base can be opened; for GGUF files spec section 15.1 says what that checks
MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4
MAX_NAME = 1024            # llama.cpp allows 64; anything longer than this is not a tensor name
MAX_KEY = 65535
MAX_ARRAY_DEPTH = 2        # arrays of arrays occur; deeper nesting does not
MAX_SCALAR_STRING = 1 << 20  # decoded string values (architecture, names); arrays of strings are only walked

FLOAT_TYPES = {QT.F32: "F32", QT.F16: "F16", QT.BF16: "BF16"}

# value type -> (struct code, size); 8 = string, 9 = array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9

# Linear weights of one output row that llama.cpp stores 1-D: Qwen2-MoE's shared-expert gate, nn.Linear(hidden, 1),
# is blk.N.ffn_gate_inp_shexp.weight [hidden] (transformers' GGUF loader reads it back as [1, hidden]). Seen as
# [1, n] (TensorInfo.shape); the file keeps its 1-D layout.
ONE_ROW = ("ffn_gate_inp_shexp",)


@dataclass
class TensorInfo:
    name: str
    type: QT
    ne: tuple[int, ...]     # GGUF order: ne[0] is the fastest-varying (d_in for a linear weight)
    offset: int             # relative to the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy (row-major) shape: [d_out, d_in] for a linear weight ([1, n] for the 1-D ones of ONE_ROW)."""
        if len(self.ne) == 1 and self.name.endswith(".weight") and self.name.split(".")[-2] in ONE_ROW:
            return 1, self.ne[0]
        return tuple(reversed(self.ne))


@dataclass
class GGUFFile:
    """A parsed GGUF file: header fields, tensor table, and where everything lies. Data is read lazily."""
    path: str
    version: int
    size: int
    kv: dict                       # key -> decoded scalar/string, or ("array", type, count)
    infos_start: int               # byte where the tensor table begins (after the key/value pairs)
    infos_end: int
    alignment: int
    data_start: int
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    file_id: FileId | None = None  # the file the header was read from (check_same_file when it is reopened)

    def err(self, msg: str, tensor: str | None = None) -> NeuroAdaError:
        return NeuroAdaError(msg, path=self.path, tensor=tensor, rule=RULE)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, read into memory (positional reads: a file truncated meanwhile is an error, never a
        SIGBUS from a map)."""
        t = self.tensors[name]
        return read_tensor(self.path, "U8", self.data_start + t.offset, (t.nbytes,), expected=self.file_id)

    def reopen(self):
        """The file again, for reading its data: refused when another file is under its name now."""
        f = open_regular(self.path, rule=RULE)  # never blocks on a FIFO swapped in since the parse
        try:
            check_same_file(f.fileno(), self.file_id, self.path)
        except BaseException:
            f.close()
            raise
        return f

    def blocks(self, name: str) -> np.ndarray:
        """The tensor's bytes as [n_blocks, type_size] (one row per block; floats: one element per block)."""
        t = self.tensors[name]
        _, type_size = GGML_QUANT_SIZES[t.type]
        return self.raw(name).reshape(-1, type_size)

    def decode(self, name: str) -> np.ndarray:
        """The tensor's values in numpy shape: F32/F16/BF16 as stored, other types de-quantized to f32."""
        t = self.tensors[name]
        raw = self.raw(name)
        if t.type in FLOAT_TYPES:
            return raw.view(_numpy_dtype(t.type)).reshape(t.shape)
        if not decodable(t.type):
            raise undecodable(t, self.path)
        with _quiet():  # a NaN/Inf block scale decodes to NaN/Inf: refused where a merge re-encodes the block
            return gquants.dequantize(np.asarray(raw), t.type).reshape(t.shape)

    def values_at(self, name: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """f32 values at (rows[i, j], cols[i, j]) of a 2-D tensor, decoding only the blocks that hold them:
        a probe of d_out * k values should not de-quantize d_out * d_in (a 7B model's targets: ~26 GB of f32)."""
        t = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[t.type]
        wanted = rows * (t.shape[1] // block) + cols // block
        unique, where = np.unique(wanted, return_inverse=True)
        raw = rows_at(self.path, self.data_start + t.offset, type_size, unique, expected=self.file_id).reshape(-1)
        if t.type in FLOAT_TYPES:  # one element per block
            return raw.view(_numpy_dtype(t.type))[where.reshape(wanted.shape)].astype(np.float32)
        if not decodable(t.type):
            raise undecodable(t, self.path)
        with _quiet():
            # flat: given [n, type_size] rows, gguf-py decodes them in many small groups (5x slower here)
            decoded = gquants.dequantize(raw, t.type).reshape(len(unique), block)
        return decoded[where.reshape(wanted.shape), cols % block].astype(np.float32, copy=False)


@functools.cache
def decodable(t: QT) -> bool:
    """Whether a tensor of this type has binary32 values here (spec section 15.2): the float types and the block
    types gguf-py decodes. The others (I8 to I64, F64, ggml's internal Q8_1 and Q8_K, types newer than the installed
    gguf-py's decoders) are sized, checked and carried over like any tensor, but no target can be read from one: rule
    4.2 for that target, as an unknown safetensors dtype is, not 1.6 for the whole base, which did open."""
    if t in FLOAT_TYPES:
        return True
    try:
        with _quiet():
            gquants.dequantize(np.zeros(GGML_QUANT_SIZES[t][1], np.uint8), t)  # one block of zeros
    except NotImplementedError:
        return False
    return True


def undecodable(t: TensorInfo, path: str) -> NeuroAdaError:
    return NeuroAdaError(f"GGUF tensor type {t.type.name} has no binary32 decoding (spec section 15.2), so a target "
                         f"cannot be read from it", path=path, tensor=t.name, rule="4.2")


def _quiet():
    """numpy's floating-point warnings off, for decoding blocks: gguf-py decodes a NaN or Inf block scale (a
    damaged or hostile file) into NaN/Inf values with an 'invalid value encountered in multiply' RuntimeWarning,
    which leaked as a stray line next to the real message. Non-finite base values are valid to read (spec section
    8.1 merges a float base's NaN into a NaN); a merge that must re-encode them refuses them (`_refuse_nonfinite`)."""
    return np.errstate(invalid="ignore", over="ignore", divide="ignore")


def _numpy_dtype(t: QT) -> np.dtype:
    from neuroada_format.dtypes import NUMPY_DTYPES
    return NUMPY_DTYPES[FLOAT_TYPES[t]]


class _Cursor:
    """Bounded little-endian reads of the file's header: every read checks it fits in the file before reading.
    The bytes come through positional reads of a window of the file (never a map: a file truncated while its
    header is parsed is an error naming it, not a SIGBUS)."""

    WINDOW = 1 << 20

    def __init__(self, fd: int, size: int, path: str):
        self.fd, self.size, self.path, self.pos = fd, size, path, 0
        self.start, self.window = 0, b""

    def fail(self, msg: str, tensor=None):
        raise NeuroAdaError(msg, path=self.path, tensor=tensor, rule=RULE)

    def need(self, n: int, what: str):
        if n < 0 or n > self.size - self.pos:
            self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, the file has {self.size}")

    def at(self, pos: int, n: int) -> tuple[bytes, int]:
        """The window holding bytes [pos, pos + n) of the file (read now unless it holds them already), and pos's
        place in it. Callers checked the range is within the file's size when opened."""
        if pos < self.start or pos + n > self.start + len(self.window):
            want = min(max(n, self.WINDOW), self.size - pos)
            parts, got = [], 0
            while got < want:
                part = os.pread(self.fd, want - got, pos + got)
                if not part:
                    self.fail(f"truncated while read: the file ended at byte {pos + got} (it was {self.size} bytes "
                              "when opened; changed by another program?)")
                parts.append(part)
                got += len(part)
            self.start, self.window = pos, b"".join(parts)
        return self.window, pos - self.start

    def scalar(self, code: str, size: int, what: str):
        self.need(size, what)
        v = struct.unpack_from(code, *self.at(self.pos, size))[0]
        self.pos += size
        return v

    def u32(self, what):
        return self.scalar("<I", 4, what)

    def u64(self, what):
        return self.scalar("<Q", 8, what)

    def string(self, what: str, cap: int, decode: bool = True):
        n = self.u64(f"{what} length")
        if n > cap:
            self.fail(f"{what} is {n} bytes long (limit {cap})")
        self.need(n, what)
        start = self.pos
        self.pos += n
        if not decode:
            return None
        window, at = self.at(start, n)
        try:
            return window[at:at + n].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def _skip_strings(self, count: int, key: str) -> None:
        """Walk `count` length-prefixed strings (a vocabulary: ~50k of them), checking each fits."""
        pos, size, unpack = self.pos, self.size, struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                break
            pos += 8 + unpack(*self.at(pos, 8))[0]
            if pos > size:
                break
        else:
            self.pos = pos
            return
        self.fail(f"truncated: array {key!r} runs past the end of the file")

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            code, size = _SCALARS[vtype]
            return self.scalar(code, size, f"value of {key!r}")
        if vtype == _STRING:
            return self.string(f"string value of {key!r}", self.size)
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                self.fail(f"metadata {key!r}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
            etype = self.u32(f"array type of {key!r}")
            count = self.u64(f"array length of {key!r}")
            if etype in _SCALARS:
                size = _SCALARS[etype][1]
                self.need(count * size, f"array {key!r} of {count} elements")  # lying counts stop here
                self.pos += count * size
            elif etype in (_STRING, _ARRAY):
                least = 8 if etype == _STRING else 12  # every element takes at least this many bytes
                self.need(count * least, f"array {key!r} of {count} elements")
                if etype == _STRING:
                    self._skip_strings(count, key)
                else:
                    for _ in range(count):
                        self.value(_ARRAY, key, depth + 1)
            else:
                self.fail(f"metadata {key!r}: unknown array element type {etype}")
            return ("array", etype, count)
        self.fail(f"metadata {key!r}: unknown value type {vtype}")


def read_gguf(path) -> GGUFFile:
    """Parse and check a GGUF file's header and tensor table (rule 1.7); nothing of the data is read."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise NeuroAdaUsageError("a GGUF base is one file, not a folder", path=path, rule="1.1")
    with open_regular(path, rule="1.1") as f:  # a FIFO or device is refused, never opened in a way that blocks
        size = os.fstat(f.fileno()).st_size  # of what was opened, not of what the path names now
        if size < 24:
            raise NeuroAdaError(f"truncated: {size} bytes is shorter than a GGUF header", path=path, rule=RULE)
        parsed = _parse(_Cursor(f.fileno(), size, path), path, size)
        parsed.file_id = file_id(f.fileno())
    return parsed


def _parse(c: _Cursor, path: str, size: int) -> GGUFFile:
    window, at = c.at(0, 4)
    if window[at:at + 4] != MAGIC:
        c.fail("not a GGUF file (no 'GGUF' magic)")
    c.pos = 4
    version = c.u32("version")
    if version not in VERSIONS:
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        hint = " (a big-endian file: not supported)" if swapped in VERSIONS else ""
        c.fail(f"GGUF version {version} is not one of {VERSIONS}{hint}")
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata count")
    # each key/value pair takes at least 8+1+4+1 bytes, each tensor entry at least 8+1+4+8+4+8
    if n_kv * 14 > size - c.pos:
        c.fail(f"claims {n_kv} metadata pairs, more than {size} bytes can hold")
    if n_tensors * 33 > size - c.pos:
        c.fail(f"claims {n_tensors} tensors, more than {size} bytes can hold")
    kv = {}
    for _ in range(n_kv):
        key = c.string("metadata key", MAX_KEY)
        if key in kv:
            c.fail(f"metadata key {key!r} appears twice")
        vtype = c.u32(f"type of {key!r}")
        value = c.value(vtype, key)
        kv[key] = None if vtype == _STRING and len(value) > MAX_SCALAR_STRING else value
    infos_start = c.pos
    alignment = kv.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
            or alignment & (alignment - 1) or alignment > (1 << 20):
        c.fail(f"general.alignment {alignment!r} is not a power of two up to 2^20")
    tensors: dict[str, TensorInfo] = {}
    for i in range(n_tensors):
        name = c.string(f"name of tensor {i}", MAX_NAME)
        if name in tensors:
            c.fail("tensor name appears twice", name)
        n_dims = c.u32("dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f"{n_dims} dimensions (1 to {MAX_DIMS} allowed)", name)
        ne = tuple(c.u64("dimension") for _ in range(n_dims))
        raw_type = c.u32("tensor type")
        offset = c.u64("tensor offset")
        try:
            t = QT(raw_type)
        except ValueError:
            c.fail(f"unknown tensor type {raw_type}", name)
        if t not in GGML_QUANT_SIZES:
            c.fail(f"tensor type {t.name} has no known block size", name)
        block, type_size = GGML_QUANT_SIZES[t]
        if any(d == 0 for d in ne) or math.prod(ne) >= 1 << 62:
            c.fail(f"dimensions {list(ne)} are empty or too large", name)
        if ne[0] % block:
            c.fail(f"first dimension {ne[0]} is not a multiple of the {t.name} block size {block}", name)
        if offset % alignment:
            c.fail(f"data offset {offset} is not a multiple of the alignment {alignment}", name)
        tensors[name] = TensorInfo(name, t, ne, offset, math.prod(ne) // block * type_size)
    infos_end = c.pos
    data_start = -(-infos_end // alignment) * alignment
    data_size = size - data_start
    end = 0
    for t in sorted(tensors.values(), key=lambda t: t.offset):
        if t.offset < end:
            c.fail(f"data at offset {t.offset} overlaps the previous tensor's (ends at {end})", t.name)
        end = t.offset + t.nbytes
        if data_start + end > size:
            c.fail(f"data [{t.offset}, {end}) runs past the end of the file ({max(data_size, 0)} data bytes): "
                   f"truncated or a lying offset", t.name)
    return GGUFFile(path, version, size, kv, infos_start, infos_end, alignment, data_start, tensors)
