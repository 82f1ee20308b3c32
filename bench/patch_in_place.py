"""Time converters.tensor_map.patch_values (the in-place merge's and revert's write) on a ~200 MB BF16 tensor.

Usage: python bench/patch_in_place.py [FOLDER]   (default: a temporary folder). Patterns: k entries per row of an
[8192, 12800] BF16 tensor (210 MB) at offset 4096 of a file, k=20 (every page touched) and k=1 (one entry per
25.6 KB row: a page in six), and 4096 entries in all (a handful of rows' worth). Median of 5, page cache warm.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import numpy as np

from neuroada_format.converters.tensor_map import patch_values

ROWS, COLS, OFFSET = 8192, 12800, 4096


def positions(k: int, rng) -> np.ndarray:
    cols = np.sort(np.argsort(rng.random((ROWS, COLS), dtype=np.float32), axis=1)[:, :k], axis=1) if k < 64 else None
    return (np.arange(ROWS, dtype=np.int64)[:, None] * COLS + cols).reshape(-1)


def main(folder: str) -> None:
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
    print(f"file {os.path.getsize(path) / 1e6:.0f} MB")
    for name, pos in cases.items():
        values = rng.integers(0, 1 << 16, pos.size, dtype=np.uint16).view(np.float16)  # any 2-byte values
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            patch_values(path, "F16", OFFSET, ROWS * COLS, pos, values)
            times.append(time.perf_counter() - t0)
        print(f"{name:>13}: {pos.size:>7} values, median {statistics.median(times) * 1e3:8.1f} ms "
              f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
    os.remove(path)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as d:
            main(d)
