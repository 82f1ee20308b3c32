"""How merges read a base's tensors and how in-place merges and reverts patch them; and the check that a base
file reopened by name is still the one whose header was read.

Reads are positional (pread), never through a map: a file truncated by another program while it is read gives
an error naming it, where a map would kill the process with SIGBUS and no message. Patches go through a map of
one tensor (only what a merge changes is touched; the kernel writes the pages back), after the disk blocks were
reserved (durable.reserve).
"""
from __future__ import annotations

import errno
import math
import mmap
import os
import sys

import numpy as np

from neuroada_format import NeuroAdaUsageError
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


def values_at(path: str, dtype: str, offset: int, positions: np.ndarray, *,
              expected: FileId | None = None) -> np.ndarray:
    """The values at sorted flat `positions` of the tensor at `offset` (`rows_at` of one-element rows)."""
    dt = NUMPY_DTYPES[dtype]
    return rows_at(path, offset, dt.itemsize, positions, expected=expected).view(dt).reshape(-1)


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels just fault lazily


def map_tensor(path: str, dtype: str, offset: int, shape, *, populate: bool = True,
               expected: FileId | None = None) -> np.ndarray:
    """One tensor of a file as a writable array over its own shared map, unmapped when the array is dropped.

    populate: fault the whole map in with one madvise instead of one fault per 4 KiB page: an in-place merge
    touches nearly every page of a target and write faults come one page at a time (patching a 1 GB file got
    ~3x faster here). A populated map dirties every page, so patches populate only where they likely touch
    every page anyway (see `worth_populating`).
    """
    dt = NUMPY_DTYPES[dtype]
    count = math.prod(shape)
    if count == 0:
        return np.empty(shape, dtype=dt)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "r+b") as f:
        check_same_file(f.fileno(), expected, path)
        if os.fstat(f.fileno()).st_size < offset + count * dt.itemsize:  # a map past the end is a SIGBUS on use
            raise shrank(f.fileno())
        mm = mmap.mmap(f.fileno(), offset - start + count * dt.itemsize, offset=start, access=mmap.ACCESS_WRITE)
    if populate and hasattr(mm, "madvise") and sys.platform.startswith("linux"):
        try:
            mm.madvise(_MADV_POPULATE_WRITE)
        except OSError:
            pass
    return np.frombuffer(mm, dtype=dt, count=count, offset=offset - start).reshape(shape)


def worth_populating(values: int, nbytes: int) -> bool:
    """Whether patching `values` spread over every row of a tensor likely dirties all of its pages."""
    return values >= nbytes // mmap.PAGESIZE


def patch_values(path: str, dtype: str, offset: int, count: int, positions: np.ndarray, values: np.ndarray, *,
                 expected: FileId | None = None) -> None:
    """Write `values` at flat `positions` of the tensor at `offset` in `path`, through a map of it
    (populated first where the patch likely dirties every page); the kernel writes the pages back."""
    region = map_tensor(path, dtype, offset, (count,), populate=worth_populating(positions.size, count * values.itemsize),
                        expected=expected)
    region[np.asarray(positions, dtype=np.int64)] = values
    del region  # unmaps
