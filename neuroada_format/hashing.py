"""The two identity hashes of the spec: the probe hash (per target) and the structure hash (per base).

The probe hash lets a validator prove an adapter belongs to a base by reading only the d_out*k base
values at the adapter's own positions; the structure hash is a cheap whole-checkpoint fingerprint.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .errors import NeuroAdaError
from .layout import canonical_view, check_layout, flat_positions

ROW_CHUNK_ENTRIES = 1 << 22  # hash in chunks so a huge target never needs one big f32 copy


class ProbeHash:
    """The probe hash fed piece by piece, in canonical order, by readers that stream a weight."""

    def __init__(self):
        self._sha = hashlib.sha256()

    def update(self, values: np.ndarray) -> None:
        self._sha.update(np.ascontiguousarray(values, dtype="<f4"))

    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()


def probe_hash_from_values(values: np.ndarray) -> str:
    """The probe hash from the probed base values themselves ([d_out, k] in canonical order).

    A runtime that kept the original values at the adapter's positions (w0) hashes them directly.
    """
    h = ProbeHash()
    h.update(values)
    return h.digest()


def probe_hash(weight: np.ndarray, indices: np.ndarray, layout: str = "out_in") -> str:
    """sha256 of f32(W[r, idx[r, j]]) in canonical (row-major over [d_out, k]) order, little-endian.

    Reads only the probed entries, never a copy of the weight: a flat `take` where the stored weight
    is contiguous (a memory map: about twice as fast), row/column indexing otherwise.

    The indices must be integers in [0, d_in) (rules 3.2, 3.5), [d_out, k] (3.4): a flat take would
    otherwise hash the next row's value for column d_in, and wrap a negative column, without an error.
    """
    stored = np.asarray(weight)
    check_layout(layout)
    if stored.ndim != 2:
        raise NeuroAdaError(f"weight has {stored.ndim} dimensions, expected 2", rule="4.2")
    canon = canonical_view(stored, layout)
    indices = np.asarray(indices)
    if indices.dtype.kind not in "iu":
        raise NeuroAdaError(f"indices are {indices.dtype}, not integers", rule="3.2")
    if indices.ndim != 2 or indices.shape[0] != canon.shape[0]:
        raise NeuroAdaError(f"indices of shape {list(indices.shape)} do not fit a weight with d_out="
                            f"{canon.shape[0]}", rule="3.4")
    d_in = canon.shape[1]
    flat = stored.reshape(-1) if stored.flags.c_contiguous else None
    d_out, k = indices.shape
    h = ProbeHash()
    rows_per_chunk = max(1, ROW_CHUNK_ENTRIES // max(k, 1))
    for start in range(0, d_out, rows_per_chunk):
        idx = np.asarray(indices[start:start + rows_per_chunk], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= d_in):
            raise NeuroAdaError(f"index out of range [0, {d_in})", rule="3.5")
        if flat is not None:
            probed = flat.take(flat_positions(idx, canon.shape, layout, first_row=start))
        else:
            rows = np.arange(start, start + idx.shape[0], dtype=np.int64)[:, None]
            probed = canon[rows, idx]
        h.update(probed)
    return h.digest()


def structure_hash(entries) -> str | None:
    """sha256 over sorted "name<TAB>DTYPE<TAB>d0,d1,...<LF>" lines for (name, dtype, shape) entries; None
    when a name holds a TAB or LF, whose lines could spell another base's (spec 6.2: such a base has none)."""
    lines = []
    for name, dtype, shape in entries:
        if "\t" in name or "\n" in name:
            return None
        lines.append(f"{name}\t{dtype}\t{','.join(str(int(d)) for d in shape)}\n")
    lines.sort()
    return "sha256:" + hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
