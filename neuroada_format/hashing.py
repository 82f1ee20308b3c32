"""The two identity hashes of the spec: the probe hash (per target) and the structure hash (per base).

The probe hash lets a validator prove an adapter belongs to a base by reading only the d_out*k base
values at the adapter's own positions; the structure hash is a cheap whole-checkpoint fingerprint.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .layout import flat_positions

ROW_CHUNK_ENTRIES = 1 << 22  # hash in chunks so a huge target never needs one big f32 copy


def probe_hash_from_values(values: np.ndarray) -> str:
    """The probe hash from the probed base values themselves ([d_out, k] in canonical order).

    A runtime that kept the original values at the adapter's positions (w0) hashes them directly.
    """
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(values, dtype="<f4").tobytes()).hexdigest()


def probe_hash(weight: np.ndarray, indices: np.ndarray, layout: str = "out_in") -> str:
    """sha256 of f32(W[r, idx[r, j]]) in canonical (row-major over [d_out, k]) order, little-endian."""
    stored = np.asarray(weight)
    d_out, k = indices.shape
    shape = (stored.shape[0], stored.shape[1]) if layout == "out_in" else (stored.shape[1], stored.shape[0])
    flat = stored.reshape(-1)
    h = hashlib.sha256()
    rows_per_chunk = max(1, ROW_CHUNK_ENTRIES // max(k, 1))
    for start in range(0, d_out, rows_per_chunk):
        idx = indices[start:start + rows_per_chunk]
        pos = flat_positions(idx, shape, layout)
        if layout == "out_in":
            pos = pos + start * shape[1]
        else:
            pos = pos + start
        h.update(np.asarray(flat[pos], dtype="<f4").tobytes())
    return "sha256:" + h.hexdigest()


def structure_hash(entries) -> str:
    """sha256 over sorted "name<TAB>DTYPE<TAB>d0,d1,...<LF>" lines for (name, dtype, shape) entries."""
    lines = sorted(f"{name}\t{dtype}\t{','.join(str(int(d)) for d in shape)}\n"
                   for name, dtype, shape in entries)
    return "sha256:" + hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
