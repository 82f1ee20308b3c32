"""A strict, memory-mapped reader of the safetensors container (spec rules 1.x).

We parse the header ourselves instead of going through `safetensors.safe_open` because we need
(a) zero-copy numpy views over a single memory map, so a large adapter or base opens in milliseconds,
and (b) every defect reported as a numbered rule with the file and tensor named. Writing goes through
the safetensors library (see adapter.save).
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass

import numpy as np

from .dtypes import NUMPY_DTYPES
from .errors import NeuroAdaError, NeuroAdaUsageError
from .jsonparse import strict_json  # noqa: F401  (re-exported: the one parser, see jsonparse)
from .safe_io import open_regular

HEADER_CAP = 100_000_000  # same cap as the reference safetensors reader
TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}
# a dtype a newer safetensors may add (F6_E2M3, F4...): tolerated on a base's non-target tensors if it looks like one
_DTYPE_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,31}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset of the first byte, relative to the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class Problems:
    """Collects rule violations; in strict mode the first one raises.

    The same checking code serves `load` (fail fast) and `validate` (report everything).
    """

    def __init__(self, path: str | None, strict: bool):
        self.path = path
        self.strict = strict
        self.items: list[dict] = []

    def error(self, rule: str, message: str, tensor: str | None = None) -> None:
        if self.strict:
            raise NeuroAdaError(message, path=self.path, tensor=tensor, rule=rule)
        self.items.append({"rule": rule, "severity": "error", "tensor": tensor, "message": message})

    def warning(self, rule: str, message: str, tensor: str | None = None) -> None:
        self.items.append({"rule": rule, "severity": "warning", "tensor": tensor, "message": message})

    @property
    def has_errors(self) -> bool:
        return any(p["severity"] == "error" for p in self.items)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _byte_count(shape, itemsize: int, stored: int) -> int:
    """prod(shape) * itemsize, or any number > stored as soon as the product passes it: a header may hold
    thousands of 4300-digit dimensions, whose full product would take hours to compute."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > stored:
            return n
    return n


def _shown(x, digits: int = 40):
    """x for a message; integers too long to print (Python refuses over 4300 digits) by their size."""
    if isinstance(x, list):
        return "[" + ", ".join(str(_shown(d, digits)) for d in x[:8]) + (", ..." if len(x) > 8 else "") + "]"
    if isinstance(x, int) and x.bit_length() > digits * 3.33:
        return f"<an integer of about {int(x.bit_length() * 0.30103)} digits>"
    return x


class SafetensorsFile:
    """One safetensors file: header parsed and checked, tensors available as read-only numpy views."""

    def __init__(self, path, problems: Problems | None = None, *, unknown_dtypes: bool = False):
        self.path = os.fspath(path)
        self.unknown_dtypes = unknown_dtypes  # bases may hold dtypes newer than ours; adapters may not
        p = problems if problems is not None else Problems(self.path, strict=True)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] | None = None
        self._mmap = None
        self.valid = False
        with open_regular(self.path, rule="1.1") as f:  # regular files only: a FIFO never blocks us
            try:
                self.file_size = os.fstat(f.fileno()).st_size
                self._parse(f, p)
                if self.valid and self.file_size > 0:
                    self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise NeuroAdaUsageError(f"cannot read file: {exc.strerror or exc}", path=self.path,
                                         rule="1.1") from None

    # -- parsing -------------------------------------------------------------------------------------
    def _parse(self, f, p: Problems) -> None:
        if self.file_size < 8:
            p.error("1.1", f"file is {self.file_size} bytes, shorter than the 8-byte header length")
            return
        (n,) = struct.unpack("<Q", f.read(8))
        if n < 2 or n > HEADER_CAP or 8 + n > self.file_size:
            p.error("1.1", f"header length {n} is not within [2, min({HEADER_CAP}, file size - 8 = "
                           f"{self.file_size - 8})]")
            return
        raw = f.read(n)
        if len(raw) != n:  # the file shrank since fstat
            p.error("1.1", f"file ended after {8 + len(raw)} bytes, inside the {n}-byte header")
            return
        try:
            header = strict_json(raw.decode("utf-8"))
        except UnicodeDecodeError:
            p.error("1.2", "header is not valid UTF-8")
            return
        except ValueError as exc:
            p.error("1.2", f"header is not valid JSON: {exc}")
            return
        if not isinstance(header, dict):
            p.error("1.2", "header JSON is not an object")
            return
        self.data_start = 8 + n
        data_size = self.file_size - self.data_start
        meta = header.pop("__metadata__", None)
        ok = True
        if meta is not None:
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                p.error("1.5", "__metadata__ must map strings to strings")
                ok = False
            else:
                self.metadata = meta
        for name, entry in header.items():
            info = self._check_entry(name, entry, p)
            if info is None:
                ok = False
            else:
                self.tensors[name] = info
        if not ok:
            return
        # Rule 1.4: the byte ranges tile the data section exactly, in some order.
        position = 0
        for info in sorted(self.tensors.values(), key=lambda t: (t.begin, t.end)):
            if info.begin != position:
                kind = "overlaps the previous tensor" if info.begin < position else "leaves a gap"
                p.error("1.4", f"data_offsets [{info.begin}, {info.end}] {kind} (expected begin "
                               f"{position})", tensor=info.name)
                return
            position = info.end
        if position != data_size:
            p.error("1.4", f"tensors cover {position} bytes but the data section is {data_size} bytes")
            return
        self.valid = True

    def _check_entry(self, name: str, entry, p: Problems) -> TensorInfo | None:
        if not isinstance(entry, dict) or set(entry) != TENSOR_FIELDS:
            p.error("1.3", "entry must have exactly the fields dtype, shape, data_offsets", tensor=name)
            return None
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):  # (a list or object is not even hashable)
            p.error("1.3", f"dtype {dtype!r:.80} is not a string", tensor=name)
            return None
        known = dtype in NUMPY_DTYPES
        if not known and not (self.unknown_dtypes and _DTYPE_NAME.fullmatch(dtype)):
            p.error("1.3", f"unknown dtype {dtype!r:.80}", tensor=name)
            return None
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            p.error("1.3", f"shape {shape!r:.80} is not a list of non-negative integers", tensor=name)
            return None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            p.error("1.3", f"data_offsets {offsets!r:.80} is not [begin, end] with 0 <= begin <= end",
                    tensor=name)
            return None
        stored = offsets[1] - offsets[0]
        expected = _byte_count(shape, NUMPY_DTYPES[dtype].itemsize, stored) if known else stored
        if stored != expected:
            needs = "more" if expected > stored else _shown(expected)
            p.error("1.3", f"{_shown(stored)} bytes stored but shape {_shown(shape)} of {dtype} needs {needs}",
                    tensor=name)
            return None
        return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])

    # -- access --------------------------------------------------------------------------------------
    def array(self, name: str) -> np.ndarray:
        """A read-only, zero-copy view of one tensor."""
        info = self.tensors[name]
        if info.dtype not in NUMPY_DTYPES:
            raise NeuroAdaError(f"dtype {info.dtype} cannot be read by this version", path=self.path,
                                tensor=name, rule="1.3")
        dtype = NUMPY_DTYPES[info.dtype]
        count = math.prod(info.shape)
        if count == 0:
            return np.empty(info.shape, dtype=dtype)
        arr = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=self.data_start + info.begin)
        return arr.reshape(info.shape)

    def raw(self, name: str) -> np.ndarray:
        """A read-only, zero-copy view of one tensor's stored bytes (flat uint8), whatever its dtype."""
        info = self.tensors[name]
        if info.end == info.begin:
            return np.empty(0, dtype=np.uint8)
        return np.frombuffer(self._mmap, dtype=np.uint8, count=info.end - info.begin,
                             offset=self.data_start + info.begin)

    def absolute_offset(self, name: str) -> int:
        """Byte offset of a tensor's data from the start of the file (for in-place patching)."""
        return self.data_start + self.tensors[name].begin
