"""The spec's merge rule (rule M), the reference every other implementation must match bit for bit.

    W'[r, c] = round_to_base_dtype( f32(W[r, c]) + sum_a f32( f32(scale_a) * f32(val_a[r, j]) ) )

The sum runs over the adapters in the order given, in f32, and is rounded once (round-to-nearest-even).
Unmerge writes the kept originals back, so it is exact whatever the rounding did.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .adapter import Target
from .dtypes import NUMPY_DTYPES, dtype_name, native, nonfinite_mask
from .errors import NeuroAdaError, NeuroAdaUsageError
from .layout import LAYOUTS, check_layout, flat_positions, stored_shape


@dataclass
class Delta:
    """One adapter's contribution to one weight: canonical indices and values, and its scale."""
    indices: np.ndarray
    values: np.ndarray
    scale: float = 1.0


@dataclass
class Saved:
    """What unmerge needs: the flat positions touched and the original values there."""
    positions: np.ndarray
    originals: np.ndarray


def _with_source(item) -> tuple[Delta, Target | None]:
    """The Delta an item stands for, and the Target it came from (whose layout and shape then bind the merge)."""
    if isinstance(item, Delta):
        return item, None
    if isinstance(item, tuple) and len(item) == 2 and hasattr(item[0], "indices"):
        src = item[0] if isinstance(item[0], Target) else None
        return Delta(item[0].indices, item[0].values, float(item[1])), src
    if hasattr(item, "indices") and hasattr(item, "values"):
        return Delta(item.indices, item.values), item if isinstance(item, Target) else None
    if isinstance(item, tuple) and len(item) in (2, 3):
        return Delta(*item), None
    raise TypeError(f"cannot use {type(item).__name__} as a delta")


def _resolve(weight: np.ndarray, deltas: Sequence, layout: str | None) -> tuple[list, list, str]:
    """The deltas, their source targets (or None) and the layout to merge in.

    A Target records its layout and shape: merging it in the default layout used to transpose an in_out
    target into a square weight silently, and a weight of another shape took it whenever the indices fit.
    So layout=None means the targets' own layout (out_in for bare deltas); an explicit layout must be one
    of LAYOUTS and agree with every target's; a target's stored shape must be the weight's (rule 4.2)."""
    if layout is not None:
        check_layout(layout)
    pairs = [_with_source(d) for d in deltas]
    sources = [src for _, src in pairs]
    for src in sources:
        if src is not None and src.layout not in LAYOUTS:  # as save refuses such a target
            raise NeuroAdaError(f"layout {src.layout!r} is not one of {', '.join(LAYOUTS)}", tensor=src.name,
                                rule="2.2")
    recorded = {src.layout for src in sources if src is not None}
    if layout is None:
        if len(recorded) > 1:
            raise NeuroAdaUsageError(f"the targets disagree on the layout ({', '.join(sorted(recorded))}); merge "
                                     "them into the weight separately", tensor=_names(sources))
        layout = recorded.pop() if recorded else "out_in"
    for src in sources:
        if src is None:
            continue
        if src.layout != layout:
            raise NeuroAdaUsageError(f"layout={layout!r} was given, but the target records {src.layout!r}; "
                                     "leave layout out to use the target's", tensor=src.name)
        try:
            want = stored_shape(src.shape, src.layout)
        except (TypeError, ValueError):
            raise NeuroAdaError(f"shape {src.shape!r} is not [d_out, d_in]", tensor=src.name, rule="2.2") from None
        if tuple(weight.shape) != tuple(want):
            raise NeuroAdaError(f"weight is {list(weight.shape)}, the target expects {list(want)} ({src.layout}, "
                                f"canonical {list(src.shape)})", tensor=src.name, rule="4.2")
    return [d for d, _ in pairs], sources, layout


def _names(sources) -> str | None:
    names = [src.name for src in sources if src is not None]
    return ", ".join(names) or None


def _sorted_union(positions: list[np.ndarray]) -> np.ndarray:
    """Sorted distinct flat positions (sort + drop neighbours: much faster than np.unique here)."""
    if not positions:
        return np.empty(0, np.int64)
    if len(positions) == 1 and positions[0].size and (np.diff(positions[0]) > 0).all():
        return positions[0]  # one out_in adapter: row-major, strictly increasing already
    s = np.sort(np.concatenate(positions))
    keep = np.ones(s.size, dtype=bool)
    keep[1:] = s[1:] != s[:-1]
    return s[keep]


@dataclass
class MergePlan:
    """One weight's merge, worked out but not yet written: where, what was there, and what goes there.

    Keeping the originals lets one gather of the base serve the merge, the probe-hash check and an
    in-place merge's revert journal (merging a checkpoint read the base twice before).
    """
    positions: np.ndarray   # sorted distinct flat offsets into the stored weight (int64)
    originals: np.ndarray   # the weight's values there, in its dtype
    merged: np.ndarray      # the rule-M values there, in its dtype
    locations: list         # per delta: where its entries (canonical order) sit in `positions`

    def originals_of(self, i: int) -> np.ndarray:
        """Delta i's base values in canonical ([d_out, k] row-major) order: what its probe hash covers."""
        return self.originals[self.locations[i]]


def _check_delta(d: Delta, shape, content: bool, name: str | None = None) -> None:
    if np.shape(d.indices) != np.shape(d.values) or np.ndim(d.indices) != 2 or np.shape(d.indices)[0] != shape[0]:
        raise NeuroAdaError(f"delta of shape {np.shape(d.indices)} does not fit a weight with "
                            f"d_out={shape[0]}", tensor=name, rule="3.4")
    idx = np.asarray(d.indices)
    if idx.dtype.kind not in "iu":  # always (a dtype test is free): flat_positions would truncate 1.9 to column 1
        raise NeuroAdaError(f"indices are {idx.dtype}, not integers", tensor=name, rule="3.2")
    if not content:
        return
    if idx.size and (idx.min() < 0 or idx.max() >= shape[1]):
        raise NeuroAdaError(f"index out of range [0, {shape[1]})", tensor=name, rule="3.5")
    if idx.shape[1] > 1 and (np.diff(idx.astype(np.int64), axis=1) <= 0).any():
        raise NeuroAdaError("indices are not strictly increasing within a row", tensor=name, rule="3.6")
    if nonfinite_mask(np.asarray(d.values)).any():
        raise NeuroAdaError("delta values are not all finite", tensor=name, rule="3.7")


def plan_merge(weight: np.ndarray, deltas: Sequence, layout: str | None = None, *,
               checked: bool = False) -> MergePlan:
    """Rule M for one weight, reading each touched base value once.

    layout=None: the layout the Targets among `deltas` record (out_in for bare Deltas); an explicit layout
    must agree with them. A Target's stored shape must be the weight's (4.2).
    checked=True skips the content rules (3.5-3.7: index range and order, finite values) for callers
    that validated the adapters already; shapes and the index dtype are always checked.
    A big-endian weight is read in native order (the values are the same; only a copy is merged).
    """
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise NeuroAdaError(f"weight has {weight.ndim} dimensions, expected 2", rule="4.2")
    if not weight.dtype.isnative:
        weight = weight.astype(native(weight.dtype))
    try:
        base_dtype = dtype_name(weight.dtype)
    except KeyError:
        base_dtype = str(weight.dtype)
    if base_dtype not in ("F32", "F16", "BF16"):
        raise NeuroAdaError(f"cannot merge into a {base_dtype} weight (F32, F16, BF16 only)", rule="4.2")
    ds, sources, layout = _resolve(weight, deltas, layout)
    shape = weight.shape if layout == "out_in" else weight.shape[::-1]
    positions = []
    for d, src in zip(ds, sources):
        _check_delta(d, shape, content=not checked, name=None if src is None else src.name)
        if not np.isfinite(np.float32(d.scale)):
            raise NeuroAdaError(f"scale {d.scale} is not a finite f32")
        positions.append(flat_positions(np.asarray(d.indices), shape, layout))
    union = _sorted_union(positions)
    flat = weight.reshape(-1)
    originals = flat.take(union)  # one gather (take beats fancy indexing on a map by ~2x)
    acc = originals.astype(np.float32)
    locations = []
    for d, pos in zip(ds, positions):
        loc = slice(None) if pos is union else np.searchsorted(union, pos)
        with np.errstate(over="ignore", invalid="ignore"):  # Inf (or NaN: Inf - Inf) is counted below as overflow
            term = np.float32(d.scale) * np.asarray(d.values).reshape(-1).astype(np.float32)
            acc[loc] += term  # positions within one adapter are unique, so fancy += is exact
        locations.append(loc)
    with np.errstate(over="ignore"):
        merged = acc.astype(NUMPY_DTYPES[base_dtype])
    overflow = nonfinite_mask(merged) & ~nonfinite_mask(originals)
    if overflow.any():
        warnings.warn(MergeOverflowWarning(base_dtype, int(overflow.sum())), stacklevel=3)
    return MergePlan(union, originals, merged, locations)


class MergeOverflowWarning(RuntimeWarning):
    """Merged values beyond the base dtype's range (rounded to +-Inf by the rule); one per tensor or block,
    with the count kept as a number so a tool can report the total."""

    def __init__(self, dtype: str, positions: int):
        super().__init__(f"merge overflowed the {dtype} range at {positions} positions (the rule rounds them to "
                         "+-Inf; NaN where opposite overflows meet)")
        self.dtype, self.positions = dtype, positions

    def __reduce__(self):  # (args holds the message; rebuild from the fields)
        return type(self), (self.dtype, self.positions)


@contextlib.contextmanager
def overflow_unreported():
    """For a pass that only checks (probe hashes) and merges the same values again later: its overflow
    warning would be counted twice. Not thread-safe (warning filters are global): call it before workers start."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MergeOverflowWarning)
        yield


def merged_values(weight: np.ndarray, deltas: Sequence, layout: str | None = None):
    """Positions touched (sorted flat offsets) and the merged values there, in the weight's dtype."""
    plan = plan_merge(weight, deltas, layout)
    return plan.positions, plan.merged


def merge_weight(weight: np.ndarray, deltas: Sequence, layout: str | None = None) -> np.ndarray:
    """A merged copy of `weight` (the input is never modified), C-ordered and in native byte order.

    C order because the positions are row-major offsets: a Fortran-ordered copy (of W.T, say) has no flat
    view, and writing through reshape(-1) went to a temporary, returning the weight unmerged.
    layout: as in plan_merge (None: the targets' own).
    """
    weight = np.asarray(weight)
    positions, values = merged_values(weight, deltas, layout)
    out = np.array(weight, dtype=native(weight.dtype), order="C", copy=True)
    out.reshape(-1)[positions] = values
    return out


def merge_weight_(weight: np.ndarray, deltas: Sequence, layout: str | None = None) -> Saved:
    """Merge into `weight` in place; returns what `unmerge_weight_` needs to restore it exactly.

    The weight must be a numpy array with a flat view (C-contiguous) that can be written: checked before
    anything is computed, so a read-only map (a base's `array()`) is refused by rule 4.2, not by numpy."""
    if not isinstance(weight, np.ndarray):
        raise NeuroAdaUsageError(f"in-place merge needs a numpy array, not {type(weight).__name__}")
    flat = weight.reshape(-1)
    if not np.shares_memory(flat, weight) or not weight.flags.writeable:
        how = "read-only" if not weight.flags.writeable else "not contiguous"
        raise NeuroAdaError(f"in-place merge needs a contiguous, writable weight (this one is {how}); "
                            "merge_weight returns a merged copy", rule="4.2")
    plan = plan_merge(weight, deltas, layout)
    saved = Saved(plan.positions, plan.originals)
    flat[plan.positions] = plan.merged
    return saved


def unmerge_weight_(weight: np.ndarray, saved: Saved) -> None:
    """Write the original values back: bit-exact, whatever rounding the merge did."""
    weight.reshape(-1)[saved.positions] = saved.originals


def union_target(name, parts, d_out, d_in):
    """One target of sum_a w_a * A_a: the row-wise union of positions and the f32 sums, padded with +0.0
    at each row's lowest unused columns to the longest row (k is fixed per target): (indices, f32 values).

    parts: [(target with canonical [d_out, k_a] indices and values, weight)]. Each term is
    f32(f32(w) * f32(v)), summed in f32 in the given order, exactly as rule M forms it; rounding to a
    value dtype is the caller's (neuroada-pack --combine and the runtime's add_weighted_adapter share
    this, so both give the same adapter).
    """
    keys = [np.arange(d_out, dtype=np.int64)[:, None] * d_in + np.asarray(t.indices, dtype=np.int64)
            for t, _ in parts]
    union, inverse = np.unique(np.concatenate([x.reshape(-1) for x in keys]), return_inverse=True)
    acc = np.zeros(union.size, dtype=np.float32)
    offset = 0
    for (t, w), key in zip(parts, keys):
        n = key.size
        with np.errstate(over="ignore", invalid="ignore"):  # callers refuse a non-finite result, naming it
            acc[inverse[offset:offset + n]] += np.float32(w) * np.asarray(t.values).reshape(-1).astype(np.float32)
        offset += n
    return padded_rows(union, acc, d_out, d_in)


def padded_rows(positions, values, d_out, d_in):
    """[d_out, k] (indices, f32 values) from distinct flat positions r * d_in + c and their values:
    k is the longest row (at least 1); shorter rows get +0.0 at their lowest unused
    columns (spec 4.5). Used by union_target and by imports of flat sparse formats (PEFT)."""
    positions = np.asarray(positions, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32)
    rows, cols = positions // d_in, positions % d_in
    counts = np.bincount(rows, minlength=d_out)
    k = max(1, int(counts.max()) if counts.size else 1)
    # the k - count lowest unused columns of each row lie below 2k (or d_in): mark the used ones there
    width = min(2 * k, d_in)
    used = np.zeros((d_out, width), dtype=bool)
    low = cols < width
    used[rows[low], cols[low]] = True
    free = ~used
    pad = free & (np.cumsum(free, axis=1) <= (k - counts)[:, None])
    pad_rows, pad_cols = np.nonzero(pad)
    all_rows = np.concatenate([rows, pad_rows])
    all_cols = np.concatenate([cols, pad_cols])
    all_vals = np.concatenate([values, np.zeros(pad_rows.size, dtype=np.float32)])
    order = np.lexsort((all_cols, all_rows))
    return all_cols[order].reshape(d_out, k), all_vals[order].reshape(d_out, k)
