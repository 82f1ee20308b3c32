"""Canonical positions: rows are output neurons, columns are input features, whatever the storage.

nn.Linear stores W as [out, in] ("out_in"); GPT-2's Conv1D stores it as [in, out] ("in_out").
Indices in an adapter always refer to the canonical [out, in] view; these helpers translate.
"""
from __future__ import annotations

import numpy as np

from .errors import NeuroAdaUsageError

LAYOUTS = ("out_in", "in_out")


def check_layout(layout, *, tensor: str | None = None) -> str:
    """`layout` when it is one of LAYOUTS. Every helper here used to read any other string as in_out, so a
    typo ("out-in") silently transposed a merge or a probe; an unknown layout is a usage error instead."""
    if layout not in LAYOUTS:  # (== against str constants: False for every non-str value)
        raise NeuroAdaUsageError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)} (spec section 4.1)",
                                 tensor=tensor)
    return layout


def canonical_shape(stored_shape, layout: str) -> tuple[int, int]:
    a, b = stored_shape
    return (a, b) if check_layout(layout) == "out_in" else (b, a)


def stored_shape(shape, layout: str) -> tuple[int, int]:
    d_out, d_in = shape
    return (d_out, d_in) if check_layout(layout) == "out_in" else (d_in, d_out)


def flat_positions(indices: np.ndarray, shape, layout: str, first_row: int = 0) -> np.ndarray:
    """Element offsets (int64) into the stored weight of every adapter entry, in canonical order.

    `indices` may be a block of rows starting at canonical row `first_row`.
    """
    d_out, d_in = shape
    rows = np.arange(first_row, first_row + indices.shape[0], dtype=np.int64)[:, None]
    cols = indices.astype(np.int64, copy=False)
    if check_layout(layout) == "out_in":
        return (rows * d_in + cols).reshape(-1)
    return (cols * d_out + rows).reshape(-1)


def canonical_view(weight: np.ndarray, layout: str) -> np.ndarray:
    """The [out, in] view of a stored weight (a transpose view for in_out; no copy)."""
    return weight if check_layout(layout) == "out_in" else weight.T
