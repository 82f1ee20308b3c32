"""A strict reader of the safetensors container (spec rules 1.x).

We parse the header ourselves instead of going through `safetensors.safe_open` because we need
(a) lazy access, so a large adapter or base opens in milliseconds (only the header is read; a tensor's
bytes are read when it is asked for, and no others), and (b) every defect reported as a numbered rule
with the file and tensor named. Writing goes through the safetensors library (see adapter.save).

Tensor bytes are read with positional reads on the descriptor the header was parsed from, never
through a memory map: a file truncated in place while we read it (`cp` over it, a download restarting)
turns into a short read and one NeuroAdaError (rule 1.4, the file named), where touching a mapped
page past the new end killed the process with SIGBUS and no message at all.
"""
from __future__ import annotations

import math
import os
import re
import struct
import threading
from dataclasses import dataclass

import numpy as np

from .dtypes import NUMPY_DTYPES
from .errors import NeuroAdaError, NeuroAdaUsageError
from .jsonparse import strict_json  # noqa: F401  (re-exported: the one parser, see jsonparse)
from .safe_io import open_regular, pread_into

HEADER_CAP = 100_000_000  # same cap as the reference safetensors reader
# what a file given in place of a safetensors one usually is, by its first bytes: its impossible header length said
# only "not within [2, ...]", and users of torch.save / PEFT's adapter_model.bin could not tell why
_OTHER_FORMATS = ((b"PK\x03\x04", "a zip archive as torch.save writes (a pickle, which is never read)"),
                  (b"\x80", "a pickle (pickle.dump, torch.save's legacy format), which is never read"),
                  (b"\x93NUMPY", "a numpy .npy file"), (b"GGUF", "a GGUF file"))
READ_CHUNK = 1 << 30  # bytes per read call: Linux returns at most 0x7ffff000 per call, macOS refuses > INT_MAX
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
    """One safetensors file: header parsed and checked, tensors read on demand as read-only numpy arrays.

    A valid file keeps the descriptor its header was read from open (as the memory map it replaces kept
    one) until `close()`, `with` or garbage collection: tensors are read from that same file, even if the
    path is renamed over meanwhile.
    """

    _file = None  # the open reader (valid files only); a class default so close() works on a half-built one

    def __init__(self, path, problems: Problems | None = None, *, unknown_dtypes: bool = False):
        self.path = os.fspath(path)
        self.unknown_dtypes = unknown_dtypes  # bases may hold dtypes newer than ours; adapters may not
        p = problems if problems is not None else Problems(self.path, strict=True)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] | None = None
        self.valid = False
        self._seek_lock = None  # only where the platform has no pread (Windows): seek + readinto under it
        f = open_regular(self.path, rule="1.1")  # regular files only: a FIFO never blocks us
        try:
            try:
                st = os.fstat(f.fileno())
                self.file_size = st.st_size
                self.file_id = (st.st_dev, st.st_ino)  # the file the header came from (merges check reopens)
                self._parse(f, p)
            except OSError as exc:
                raise NeuroAdaUsageError(f"cannot read file: {exc.strerror or exc}", path=self.path,
                                         rule="1.1") from None
        except BaseException:
            f.close()
            raise
        if self.valid and self.file_size > 0:
            self._file = f
            if not hasattr(os, "pread"):
                self._seek_lock = threading.Lock()
        else:
            f.close()

    def close(self) -> None:
        """Close the file; reading a tensor afterwards raises ValueError. Idempotent."""
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing sensible to report
            pass

    # -- parsing -------------------------------------------------------------------------------------
    def _parse(self, f, p: Problems) -> None:
        if self.file_size < 8:
            p.error("1.1", f"file is {self.file_size} bytes, shorter than the 8-byte header length")
            return
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > HEADER_CAP or 8 + n > self.file_size:
            # (a safetensors header, even a damaged one, starts with "{": such a file is not called anything else)
            kind = None if f.read(1) == b"{" else next((what for magic, what in _OTHER_FORMATS
                                                        if head.startswith(magic)), None)
            hint = f"; not a safetensors file: this is {kind}" if kind else ""
            p.error("1.1", f"header length {n} is not within [2, min({HEADER_CAP}, file size - 8 = "
                           f"{self.file_size - 8})]{hint}")
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
        """One tensor as a fresh, read-only numpy array of its dtype (little-endian, as stored) and shape.

        Read-only as the memory-map views it replaces were, so an in-place merge still refuses it
        (merge_weight_). Reads this tensor's bytes only; a file that shrank meanwhile is rule 1.4."""
        info = self.tensors[name]
        if info.dtype not in NUMPY_DTYPES:
            raise NeuroAdaError(f"dtype {info.dtype} cannot be read by this version", path=self.path,
                                tensor=name, rule="1.3")
        dtype = NUMPY_DTYPES[info.dtype]
        count = math.prod(info.shape)
        if count == 0:
            return np.empty(info.shape, dtype=dtype)
        return self._read(info).view(dtype).reshape(info.shape)

    def raw(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """One tensor's stored bytes (or bytes [start, stop) of them, to compare a large one a piece at a time) as a
        fresh, read-only flat uint8 array, whatever its dtype."""
        info = self.tensors[name]
        stop = info.nbytes if stop is None else min(stop, info.nbytes)
        if stop <= start:
            return np.empty(0, dtype=np.uint8)
        return self._read(info, start, stop)[...]  # a view, as before: .base is the buffer

    def _read(self, info: TensorInfo, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Bytes [lo, hi) of `info` (all of them by default), read into a new buffer (returned read-only), checked
        to be all there."""
        f = self._file
        if f is None:
            raise ValueError(f"{self.path}: the file is closed")
        hi = info.nbytes if hi is None else hi
        buf = np.empty(hi - lo, dtype=np.uint8)
        view = memoryview(buf)
        start = self.data_start + info.begin + lo
        got = 0
        try:
            while got < hi - lo:
                n = self._read_at(f, view[got:got + READ_CHUNK], start + got)
                if n == 0:
                    break
                got += n
            now = os.fstat(f.fileno()).st_size if got < hi - lo else None
        except OSError as exc:  # EIO from a failing disk, ESTALE on NFS: the file cannot be read (as in __init__)
            raise NeuroAdaUsageError(f"cannot read file: {exc.strerror or exc}", path=self.path, tensor=info.name,
                                     rule="1.1") from None
        finally:
            view.release()
        if now is not None:
            raise NeuroAdaError(f"the file ended at byte {start + got} while this tensor was read (its bytes are "
                                f"{self.data_start + info.begin} to {self.data_start + info.end}; the file is now "
                                f"{now} bytes, was "
                                f"{self.file_size} when opened): it was truncated or rewritten while being read",
                                path=self.path, tensor=info.name, rule="1.4")
        buf.flags.writeable = False
        return buf

    def _read_at(self, f, view: memoryview, pos: int) -> int:
        """One positional read into `view`; the number of bytes read (0 at the end of the file)."""
        if hasattr(os, "pread"):
            return pread_into(f.fileno(), view, pos)
        with self._seek_lock:  # no pread: the shared file position needs the lock
            f.seek(pos)
            return f.readinto(view) or 0

    def absolute_offset(self, name: str) -> int:
        """Byte offset of a tensor's data from the start of the file (for in-place patching)."""
        return self.data_start + self.tensors[name].begin
