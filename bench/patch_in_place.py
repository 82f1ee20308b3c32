"""Time converters.tensor_map.patch_values (the in-place merge's and revert's write) on a ~200 MB BF16 tensor,
against the same write through a shared memory map, as the patch made it before it moved to pread/pwrite (so that
a file cut by another process meanwhile is our error, not SIGBUS): the price of that move.

Usage: python bench/patch_in_place.py [FOLDER] [--no-write]   (default: a temporary folder). Patterns: k entries
per row of an [8192, 12800] BF16 tensor (210 MB) at offset 4096 of a file, k=20 (every page touched) and k=1 (one
entry per 25.6 KB row: a page in six), and 4096 entries in all (a handful of rows' worth). The two ways alternate,
median of 7 each, page cache warm. Writes the "## Converters: in-place patch" section of bench/RESULTS.md.
"""
from __future__ import annotations

import mmap
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from results_md import replace_section, table  # bench/ is sys.path[0] when run as a script

from neuroada_format.converters.tensor_map import patch_values

ROWS, COLS, OFFSET = 8192, 12800, 4096


def positions(k: int, rng) -> np.ndarray:
    cols = np.sort(np.argsort(rng.random((ROWS, COLS), dtype=np.float32), axis=1)[:, :k], axis=1) if k < 64 else None
    return (np.arange(ROWS, dtype=np.int64)[:, None] * COLS + cols).reshape(-1)


def mapped_patch(path: str, pos: np.ndarray, values: np.ndarray) -> None:
    """The write as the in-place patch made it before (up to 076df6f): a shared map of the tensor, faulted in at once
    (MADV_POPULATE_WRITE) where nearly every page is dirtied, values assigned, pages left to the kernel to write."""
    nbytes = ROWS * COLS * 2
    start = OFFSET - OFFSET % mmap.ALLOCATIONGRANULARITY
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), OFFSET - start + nbytes, offset=start, access=mmap.ACCESS_WRITE)
    if pos.size >= nbytes // mmap.PAGESIZE and hasattr(mm, "madvise"):
        try:
            mm.madvise(23)  # MADV_POPULATE_WRITE (Linux >= 5.14)
        except OSError:
            pass
    view = np.frombuffer(mm, dtype=np.float16, count=ROWS * COLS, offset=OFFSET - start)
    view[pos] = values
    del view
    mm.close()


def main(folder: str) -> str:
    path = os.path.join(folder, "patch_bench.bin")
    with open(path, "wb") as f:
        f.truncate(OFFSET + ROWS * COLS * 2)
    with open(path, "r+b") as f:  # real blocks, not a sparse file
        block = os.urandom(1 << 20)
        for pos in range(0, OFFSET + ROWS * COLS * 2, 1 << 20):
            f.write(block)
        f.truncate(OFFSET + ROWS * COLS * 2)
    rng = np.random.default_rng(0)
    cases = {"k=20": positions(20, rng), "k=1": positions(1, rng),
             "4096 entries": np.sort(rng.choice(ROWS * COLS, 4096, replace=False)).astype(np.int64)}
    size = os.path.getsize(path)
    print(f"file {size / 1e6:.0f} MB")
    rows = [["pattern", "values", "pwrite (ours), ms", "memory map (before), ms", "ratio"]]
    for name, pos in cases.items():
        values = rng.integers(0, 1 << 16, pos.size, dtype=np.uint16).view(np.float16)  # any 2-byte values
        times = {"ours": [], "map": []}
        for _ in range(7):
            for way in times:
                t0 = time.perf_counter()
                if way == "ours":
                    patch_values(path, "F16", OFFSET, ROWS * COLS, pos, values)
                else:
                    mapped_patch(path, pos, values)
                times[way].append(time.perf_counter() - t0)
        ours, mapped = (statistics.median(times[w]) * 1e3 for w in ("ours", "map"))
        rows.append([name, f"{pos.size:,}", f"{ours:.1f}", f"{mapped:.1f}", f"{ours / mapped:.2f}x"])
    os.remove(path)
    text = table(rows)
    print(text)
    return (f"`python bench/patch_in_place.py` ({time.strftime('%Y-%m-%d')}; one process; the two ways alternate, median "
            f"of 7 each, page cache warm; a {size / 1e6:.0f} MB file, {os.cpu_count()} CPUs). The map's faults are "
            f"cheaper than a pwrite per group of values, but a file cut by another process while mapped kills the "
            f"interpreter with SIGBUS, no message; the whole in-place merge is `bench/merge.py`'s `--in-place` "
            f"row.\n\n{text}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--no-write"]
    if args:
        body = main(args[0])
    else:
        with tempfile.TemporaryDirectory() as d:
            body = main(d)
    if "--no-write" not in sys.argv:
        replace_section("## Converters: in-place patch", body)
