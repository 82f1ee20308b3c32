"""Every rule of the spec checked, every problem reported (rules 1.x-4.x; see spec/SPEC.md §7).

Content checks run over row chunks so a 27M-entry adapter is checked in well under a second and no
check allocates more than a chunk; base checks read only the base values at the adapter's positions
(plus whole rows for the optional selection check).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from .adapter import Adapter, Target, read
from .base import absent_target, open_base
from .container import Problems
from .dtypes import BASE_DTYPES, I16_MAX_D_IN, INDEX_DTYPES, NUMPY_DTYPES, VALUE_DTYPES, dtype_name, nonfinite_mask
from .errors import NeuroAdaError
from .hashing import probe_hash, probe_hash_from_values
from .layout import canonical_view, stored_shape
from .metadata import METADATA_KEY, parse_document
from .selection import select_indices

CHUNK_ENTRIES = 1 << 21
PROBE_MISMATCH = ("probe hash differs: the base values at the adapter's positions are not the ones it was "
                  "made for (different base or revision)")


def probe_mismatch(target: Target, probed: np.ndarray) -> bool:
    """Rule 4.3 from base values already read at the target's positions (canonical order)."""
    return probe_hash_from_values(probed) != target.probe


@dataclass
class Report:
    """The outcome of a validation: `ok` unless some problem has severity "error"."""
    path: str | None
    problems: list[dict] = field(default_factory=list)
    checked_base: str | None = None

    @property
    def ok(self) -> bool:
        return not any(p["severity"] == "error" for p in self.problems)

    @property
    def errors(self) -> list[dict]:
        return [p for p in self.problems if p["severity"] == "error"]

    def raise_if_invalid(self) -> None:
        if not self.ok:
            first = self.errors[0]
            more = len(self.errors) - 1
            msg = first["message"] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
            raise NeuroAdaError(msg, path=self.path, tensor=first["tensor"], rule=first["rule"])

    def to_dict(self) -> dict:
        return {"path": self.path, "valid": self.ok, "base": self.checked_base, "problems": self.problems}


def validate(adapter, base=None, *, strict: bool = False, check_selection: bool = False,
             path: str | None = None, probes: bool = True) -> Report:
    """Check an adapter (object or file path), optionally against a base; strict=True raises on errors.

    A file that breaks a rule (a truncated or garbled one included) is reported, not raised (unless strict).
    A path that names no readable file (missing, a folder, a FIFO) raises NeuroAdaUsageError rule 1.1, as
    `load` does (spec 2.6/11.4: a usage error, not a defect of an adapter). A base that cannot be
    opened raises NeuroAdaError: that is an I/O problem of the caller, not a defect of the adapter.
    probes=False leaves rule 4.3 to a caller that reads the probed values anyway (a merge gathers
    them once for both, see `probe_mismatch`).
    """
    if isinstance(adapter, Adapter):
        path = path or adapter.path
        p = Problems(path, strict=False)
        _check_in_memory(adapter, p)
    else:
        path = os.fspath(adapter)
        p = Problems(path, strict=False)
        adapter = read(path, p)
    report = Report(path, p.items)
    # the tiers of spec section 7: structure, content, base; each runs only when the ones before found no error
    if adapter is not None and not p.has_errors:
        for _, t in sorted(adapter.targets.items()):
            _check_content(t, p)
        if base is not None and not p.has_errors:
            b = open_base(base, adapter)
            report.checked_base = getattr(b, "path", None)
            try:
                _check_against_base(adapter, b, p, check_selection, probes=probes)
            finally:  # what this call opened it closes (an ONNX view's maps), not a base the caller gave open
                if b is not base and callable(getattr(b, "close", None)):
                    b.close()
    if strict:
        report.raise_if_invalid()
    return report


def _check_in_memory(adapter: Adapter, p: Problems) -> None:
    """Structure rules for an adapter built in memory, mirroring what `read` checks in a file."""
    for name, t in adapter.targets.items():
        for label, arr in (("indices", t.indices), ("values", t.values)):
            if np.ndim(arr) != 2:
                p.error("3.4", f"{label} have {np.ndim(arr)} dimensions, expected 2 ([d_out, k])", tensor=name)
    if p.has_errors:
        return
    doc = adapter.document()
    try:
        text = json.dumps(doc)
    except (TypeError, ValueError, RecursionError) as exc:
        p.error("2.2", f"metadata is not JSON-serialisable: {exc}")
        return
    if parse_document({METADATA_KEY: text}, p) is None:
        return
    for name, t in adapter.targets.items():
        try:
            idt, vdt = dtype_name(t.indices.dtype), dtype_name(t.values.dtype)
        except KeyError as exc:
            p.error("3.2", str(exc), tensor=name)
            continue
        if idt not in INDEX_DTYPES:
            p.error("3.2", f"index dtype {idt} is not I16 or I32", tensor=name)
        elif idt == "I16" and t.d_in > I16_MAX_D_IN:
            p.error("3.2", f"d_in={t.d_in} needs I32 indices", tensor=name)
        elif idt == "I32" and t.d_in <= I16_MAX_D_IN:  # as `read` warns of the file this would write
            p.warning("3.2", f"I32 indices where I16 suffices (d_in={t.d_in}); files are larger than needed",
                      tensor=name)
        if vdt not in VALUE_DTYPES:
            p.error("3.3", f"value dtype {vdt} is not BF16, F16 or F32", tensor=name)
        for label, arr in (("indices", t.indices), ("values", t.values)):
            if arr.ndim != 2 or arr.shape[0] != t.d_out:
                p.error("3.4", f"{label} shape {list(arr.shape)} is not [d_out={t.d_out}, k]", tensor=name)
        if t.indices.shape != t.values.shape:
            p.error("3.4", f"indices {list(t.indices.shape)} and values {list(t.values.shape)} differ",
                    tensor=name)
        elif t.indices.ndim == 2 and t.k > t.d_in:
            p.error("3.4", f"k={t.k} exceeds d_in={t.d_in}", tensor=name)


def _check_content(t: Target, p: Problems) -> None:
    """Rules 3.5-3.7: index range, strictly increasing rows, finite values."""
    d_out, k = t.indices.shape
    rows = max(1, CHUNK_ENTRIES // max(k, 1))
    bad_range = bad_order = bad_value = None
    for start in range(0, d_out, rows):
        idx = t.indices[start:start + rows]
        if bad_range is None:
            out = (idx < 0) | (idx >= t.d_in)
            if out.any():
                r, j = np.argwhere(out)[0]
                bad_range = (start + r, j, int(idx[r, j]))
        if bad_order is None and k > 1:
            steps = np.diff(idx.astype(np.int64), axis=1) <= 0
            if steps.any():
                r, j = np.argwhere(steps)[0]
                bad_order = (start + r, j, int(idx[r, j]), int(idx[r, j + 1]))
        if bad_value is None:
            nf = nonfinite_mask(t.values[start:start + rows])
            if nf.any():
                r, j = np.argwhere(nf)[0]
                bad_value = (start + r, j, float(t.values[start + r, j]))
        if bad_range and bad_order and bad_value:
            break
    if bad_range:
        r, j, v = bad_range
        p.error("3.5", f"index {v} at row {r}, slot {j} is outside [0, d_in={t.d_in})", tensor=t.name)
    if bad_order:
        r, j, a, b = bad_order
        kind = "duplicated" if a == b else "not increasing"
        p.error("3.6", f"row {r} indices are {kind} at slots {j},{j + 1} ({a}, {b})", tensor=t.name)
    if bad_value:
        r, j, v = bad_value
        p.error("3.7", f"value {v} at row {r}, slot {j} is not finite", tensor=t.name)


def _check_against_base(adapter: Adapter, base, p: Problems, check_selection: bool, probes: bool = True) -> None:
    """Rules 4.1-4.5: the adapter belongs to this base (its indices are known to be in range).

    What the base says of one target (a GGUF base: an architecture without a name table, heads that do not
    split the rows) is reported against that target, as every other base rule is, not raised.

    Targets go in code point order of their keys (spec section 7). Where two keys name one base tensor (a GGUF
    name and the key mapped to it, two aliases), the later one is rule 4.1 and gets no other check: a merge would
    add both deltas to one tensor, and which one a reader blames must not depend on its dictionary order."""
    storage_name = getattr(base, "storage_name", None)  # a base where several keys name one tensor (GGUF)
    stored_as: dict[str, str] = {}
    for name, t in sorted(adapter.targets.items()):
        try:
            if storage_name is not None and name in base:
                stored = storage_name(name)
                if stored in stored_as:
                    p.error("4.1", f"names the same base tensor {stored!r} as target {stored_as[stored]!r}",
                            tensor=name)
                    continue
                stored_as[stored] = name
            _check_target_against_base(name, t, adapter, base, p, check_selection, probes)
        except NeuroAdaError as exc:
            if not (exc.rule or "").startswith("4."):
                raise  # the base file itself is unreadable: the caller's I/O problem, as open_base says
            where = f" (base tensor {exc.tensor})" if exc.tensor not in (None, name) else ""
            p.error(exc.rule, exc.detail + where, tensor=name)
    if adapter.structure_hash is not None and hasattr(base, "structure_hash"):
        actual = base.structure_hash()
        if actual != adapter.structure_hash:
            matched = "; the targets themselves matched" if not p.has_errors else ""
            p.warning("4.5", f"base structure hash differs (other tensors, names, dtypes or shapes){matched}")


def _rounded_hint(weight, t: Target, dtype: str) -> str:
    """Rule 4.3's message where the adapter was made on these very values rounded to its narrower dtype (a model
    loaded with torch_dtype=bfloat16 from an F32 checkpoint): "different base or revision" sent users looking for
    another checkpoint. Worked out on the error path only, from the probed entries."""
    if dtype != "F32" or t.dtype not in ("BF16", "F16"):
        return ""
    canon = canonical_view(np.asarray(weight), t.layout)
    idx = np.asarray(t.indices)
    values = canon[np.arange(idx.shape[0])[:, None], idx].astype(np.float32)
    with np.errstate(over="ignore"):
        rounded = values.astype(NUMPY_DTYPES[t.dtype]).astype(np.float32)
    if probe_hash_from_values(rounded) != t.probe:
        return ""
    return (f"; it was made on these weights rounded to {t.dtype} (the model loaded or cast to {t.dtype}): merge it "
            f"into a {t.dtype} copy of the base, or train on the {dtype} weights")


def _check_target_against_base(name: str, t: Target, adapter: Adapter, base, p: Problems, check_selection: bool,
                               probes: bool) -> None:
    refusal = getattr(base, "refusal", None)  # a base that finds targets itself (ONNX) says why it refuses one
    refused = refusal(name) if refusal is not None else None
    if refused is not None:
        raise refused  # reported under its rule by _check_against_base
    if name not in base:
        p.error("4.1", absent_target(base, name), tensor=name)
        return
    dtype, shape = base.info(name)
    want = stored_shape(t.shape, t.layout)
    if tuple(shape) != want:
        p.error("4.2", f"base tensor is {dtype}{list(shape)}, adapter expects {t.dtype}{list(want)} "
                       f"({t.layout})", tensor=name)
        return
    if dtype not in BASE_DTYPES:
        p.error("4.2", f"base dtype {dtype} cannot be read exactly as binary32 (F32, F16, BF16 or a GGUF type with "
                       f"a decoding)", tensor=name)
        return
    if dtype != t.dtype:  # spec 1.1: identity is on values (the probe hash decides), not encoding
        p.warning("4.6", f"base tensor is {dtype}, the adapter was made on {t.dtype} values; a merge "
                         f"rounds to {dtype}", tensor=name)
    if not (probes or check_selection):
        return
    if probes and not check_selection and t.layout == "out_in" and hasattr(base, "probed"):  # a base that decodes (GGUF): the probes only
        if probe_hash_from_values(base.probed(name, t.indices)) != t.probe:
            p.error("4.3", PROBE_MISMATCH, tensor=name)
        return
    weight = base.array(name)
    if probes and probe_hash(weight, np.asarray(t.indices), t.layout) != t.probe:
        p.error("4.3", PROBE_MISMATCH + _rounded_hint(weight, t, dtype), tensor=name)
        return
    rule = adapter.selection.get("rule")
    if check_selection and rule in ("magnitude", "reverse"):
        expected = select_indices(canonical_view(weight, t.layout), t.k, rule)
        rows = np.nonzero((expected != np.asarray(t.indices)).any(axis=1))[0]
        if rows.size:
            p.error("4.4", f"{rows.size} rows (first: {rows[0]}) are not the base's {rule} top-{t.k} "
                           f"under the lower-column tie-break", tensor=name)
