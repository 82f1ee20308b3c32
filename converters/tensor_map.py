"""How merges read a base's tensors and how in-place merges and reverts patch them; and the check that a base
file reopened by name is still the one whose header was read.

Reads and patches are positional (pread, pwrite), never through a map: a file truncated by another program while
it is read or patched gives an error naming it, where a map would kill the process with SIGBUS and no message.
Patches write back only the spans that hold changed values, after the disk blocks were reserved (durable.reserve).
"""
from __future__ import annotations

import errno
import math
import os

import numpy as np

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.dtypes import NUMPY_DTYPES
from neuroada_format.safe_io import open_regular, pread_into

FileId = tuple[int, int]  # (st_dev, st_ino): which file a path named when its header was read


def file_id(path_or_fd) -> FileId:
    st = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    return st.st_dev, st.st_ino


def check_same_file(fd: int, expected: FileId | None, path: str) -> None:
    """A merge reads a base's headers first and its files again later, by name: a file replaced meanwhile (a
    re-download renamed into place, a `latest` link repointed to another snapshot) would be copied or patched at
    the offsets of the old header, or mixed with the old files into an output that is neither model."""
    if expected is not None and file_id(fd) != expected:
        raise NeuroAdaUsageError("was replaced while the merge was reading the base (another file under its name, or a "
                                 "link on its path repointed): the output would mix two versions, so nothing was "
                                 "written; run again once the base stays put", path=path)


def shrank(fd: int) -> BaseException:
    """The error for a base file that got shorter while it was read (it names the file, not the output)."""
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return OSError(errno.EIO, "a base file shrank while the merge was reading it (changed by another program?)")
    return NeuroAdaUsageError("shrank while the merge was reading it (changed by another program?); nothing was "
                              "written: run again once it stays put", path=name)


IO_CHUNK = 1 << 20  # one read call (larger calls were erratic here)
READ_BLOCK = 4 << 20  # bytes of a tensor gathered from at a time


def read_exactly(fd: int, view: memoryview, pos: int) -> None:
    """Fill `view` from byte `pos` of `fd`; a file that ends first (shrank since its header was read) is an
    error naming it."""
    got = 0
    while got < len(view):
        n = pread_into(fd, view[got:got + IO_CHUNK], pos + got)
        if n == 0:
            raise shrank(fd)
        got += n


def read_tensor(path: str, dtype: str, offset: int, shape, *, expected: FileId | None = None) -> np.ndarray:
    """One tensor of a file, read into memory (a GGUF tensor's blocks are decoded whole anyway)."""
    dt = NUMPY_DTYPES[dtype]
    out = np.empty(math.prod(shape) * dt.itemsize, np.uint8)
    with open_regular(path, rule=None) as f:
        check_same_file(f.fileno(), expected, path)
        read_exactly(f.fileno(), memoryview(out), offset)
    return out.view(dt).reshape(shape)


def rows_at(path: str, offset: int, row_bytes: int, rows: np.ndarray, *, expected: FileId | None = None) -> np.ndarray:
    """Rows `rows` (sorted) of the table of `row_bytes`-byte rows at `offset` (a tensor's elements, or a GGUF
    tensor's blocks) as a [len(rows), row_bytes] uint8 array, gathered a few MB of the file at a time: a probe of
    d_out * k values, or a revert, holds what it reads, never the whole tensor."""
    rows = np.asarray(rows, dtype=np.int64)
    row = np.dtype((np.void, row_bytes))  # one item per row: a gather moves rows whole, not byte by byte (3x)
    out = np.empty(rows.size, row)
    if rows.size:
        span = min(max(1, READ_BLOCK // max(row_bytes, 1)), int(rows[-1]) - int(rows[0]) + 1)  # rows a read covers
        buffer = np.empty(span, row)
        with open_regular(path, rule=None) as f:
            check_same_file(f.fileno(), expected, path)
            lo = 0
            while lo < rows.size:
                first = int(rows[lo])
                hi = int(np.searchsorted(rows, first + span))
                covered = int(rows[hi - 1]) - first + 1
                read_exactly(f.fileno(), memoryview(buffer.view(np.uint8))[:covered * row_bytes],
                             offset + first * row_bytes)
                out[lo:hi] = buffer[rows[lo:hi] - first]
                lo = hi
    return out.view(np.uint8).reshape(rows.size, row_bytes)


WRITE_CHUNK = 64 << 10  # one write call: on this VM's ext4 (Linux 6.18) writing a file in 1 MiB pwrites took
#                         1.5-3.5x as long as in 64 KiB ones, 4 MiB ones 3-7x as long as sendfile


def write_exactly(fd: int, view: memoryview, pos: int) -> None:
    """Write `view` at byte `pos` of `fd` (positional writes of WRITE_CHUNK bytes)."""
    put = 0
    while put < len(view):
        put += os.pwrite(fd, view[put:put + WRITE_CHUNK], pos + put)


def values_at(path: str, dtype: str, offset: int, positions: np.ndarray, *,
              expected: FileId | None = None) -> np.ndarray:
    """The values at sorted flat `positions` of the tensor at `offset` (`rows_at` of one-element rows)."""
    dt = NUMPY_DTYPES[dtype]
    return rows_at(path, offset, dt.itemsize, positions, expected=expected).view(dt).reshape(-1)


PATCH_GAP = 64 << 10  # bytes between two patched values past which they are read and written back apart


def patch_values(path: str, dtype: str, offset: int, count: int, positions: np.ndarray, values: np.ndarray, *,
                 expected: FileId | None = None) -> None:
    """Write `values` at sorted flat `positions` of the tensor at `offset` in `path`: the spans holding them read,
    patched and written back with positional I/O, a few MB at a time (values within PATCH_GAP share a span).

    Not through a map, as before: a file truncated by another program meanwhile (a download restarting, `cp` over
    it) made the next touch of a mapped page a SIGBUS, which killed the interpreter with no message and left a
    partly patched base. Here a read comes up short, or the file's size is seen changed after a write (a write past
    a new end grows the file again), and either is an error naming the file."""
    dt = NUMPY_DTYPES[dtype]
    positions = np.asarray(positions, dtype=np.int64)
    values = np.ascontiguousarray(values, dtype=dt).reshape(-1).view(np.dtype((np.void, dt.itemsize)))  # moved as bits
    if positions.size == 0:
        return
    if int(positions[0]) < 0 or int(positions[-1]) >= count:
        raise ValueError(f"positions outside the tensor's {count} elements")
    with open(path, "r+b") as f:
        fd = f.fileno()
        check_same_file(fd, expected, path)
        size = os.fstat(fd).st_size
        if size < offset + count * dt.itemsize:
            raise shrank(fd)
        _patch(path, fd, size, dt.itemsize, offset, positions, values)


def cut_while_patched(path: str) -> NeuroAdaError:
    """A file cut short by another program while it was patched: some values may be written, and no revert can
    restore what the cut removed."""
    return NeuroAdaError("was cut short (truncated by another program?) while it was being patched in place: it is "
                         "damaged whatever this run does now; restore it from where it came from", path=path)


def _patch(path: str, fd: int, size: int, itemsize: int, offset: int, positions: np.ndarray,
           values: np.ndarray) -> None:
    span, gap = max(1, READ_BLOCK // itemsize), max(1, PATCH_GAP // itemsize)
    buffer = np.empty(min(span, int(positions[-1]) - int(positions[0]) + 1), values.dtype)  # (no more than spanned)
    ends = np.append(np.flatnonzero(np.diff(positions) > gap) + 1, positions.size)  # runs of close values
    lo = 0
    for end in ends.tolist():
        while lo < end:  # a run, a span of at most READ_BLOCK bytes at a time
            first = int(positions[lo])
            hi = min(end, int(np.searchsorted(positions, first + span, side="left")))
            view = buffer[:int(positions[hi - 1]) - first + 1]
            raw = memoryview(view.view(np.uint8))
            at = offset + first * itemsize
            try:
                read_exactly(fd, raw, at)
            except NeuroAdaUsageError:  # (shrank: the file now ends before the span)
                raise cut_while_patched(path) from None
            view[positions[lo:hi] - first] = values[lo:hi]
            try:
                write_exactly(fd, raw, at)
            except OSError as exc:  # (pwrite names no file: a file-size limit or I/O error said of the file patched)
                raise OSError(exc.errno, exc.strerror or str(exc), exc.filename or path) from exc
            if os.fstat(fd).st_size != size:  # (a write past a new end grew the file again: the next read is not short)
                raise cut_while_patched(path)
            lo = hi
