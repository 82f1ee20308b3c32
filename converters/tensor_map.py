"""One tensor of a file as a memory map: how in-place merges and reverts patch a base, and how merges
read the values they work out from; and the check that a base file reopened by name is still the one
whose header was read.

Only what a merge changes is touched: the map covers one tensor, and a patch writes the given
positions through it (the kernel writes the pages back). Read-only maps can never write the file.
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

_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux >= 5.14; older kernels just fault lazily


def map_tensor(path: str, dtype: str, offset: int, shape, *, writable: bool = False,
               populate: bool | None = None, expected: FileId | None = None) -> np.ndarray:
    """One tensor of a file as an array over its own shared map, unmapped when the array is dropped.

    populate (default: when writable): fault the whole map in with one madvise instead of one fault
    per 4 KiB page. Writes need it: an in-place merge touches nearly every page of a target and write
    faults come one page at a time (patching a 1 GB file got ~3x faster here). Reads do not: the kernel
    maps 16 pages per read fault, which beat populating. A populated writable map dirties every
    page, so in-place patches populate only where they likely touch every page anyway (see
    `worth_populating`).
    """
    dt = NUMPY_DTYPES[dtype]
    count = math.prod(shape)
    if count == 0:
        return np.empty(shape, dtype=dt)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "r+b" if writable else "rb") as f:
        check_same_file(f.fileno(), expected, path)
        mm = mmap.mmap(f.fileno(), offset - start + count * dt.itemsize, offset=start,
                       access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    if (writable if populate is None else populate) and hasattr(mm, "madvise") and sys.platform.startswith("linux"):
        try:
            mm.madvise(_MADV_POPULATE_WRITE if writable else _MADV_POPULATE_READ)
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
    region = map_tensor(path, dtype, offset, (count,), writable=True,
                        populate=worth_populating(positions.size, count * values.itemsize), expected=expected)
    region[np.asarray(positions, dtype=np.int64)] = values
    del region  # unmaps
