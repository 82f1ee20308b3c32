"""Adapters in memory (Target, Adapter) and on disk (load, save).

A file holds, per target T (the base tensor's key), two tensors "indices/T" and "values/T" of shape
[d_out, k], plus one JSON metadata document. `load` checks structure (rules 1.x-3.4) and maps the
arrays without reading them; `validate` checks content. `save` writes atomically.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field

import numpy as np

from .container import Problems, SafetensorsFile
from .durable import write_bytes, write_file
from .dtypes import (INDEX_DTYPES, I16_MAX_D_IN, NUMPY_DTYPES, VALUE_DTYPES, dtype_name, index_dtype_for,
                     native)
from .errors import NeuroAdaError, NeuroAdaUsageError
from .folder import STATE_MARKER, WEIGHTS_NAME
from .hashing import probe_hash
from .layout import LAYOUTS, canonical_view, check_layout
from .metadata import (_VERSION_RE, FORMAT_NAME, MERGE_RULE, METADATA_KEY, VERSION, parse_document, version_for,
                       version_key)

INDICES_PREFIX = "indices/"
VALUES_PREFIX = "values/"


@dataclass
class Target:
    """The deltas for one base tensor. `indices`/`values` are [d_out, k]; shape is canonical [d_out, d_in]."""
    name: str
    indices: np.ndarray
    values: np.ndarray
    shape: tuple[int, int]
    layout: str = "out_in"
    dtype: str = "BF16"          # the base tensor's dtype
    probe: str | None = None
    extra: dict = field(default_factory=dict)  # unknown entry fields of a newer minor, kept on re-save

    @property
    def d_out(self) -> int:
        return self.shape[0]

    @property
    def d_in(self) -> int:
        return self.shape[1]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @property
    def index_dtype(self) -> str:
        return dtype_name(self.indices.dtype)

    @property
    def value_dtype(self) -> str:
        return dtype_name(self.values.dtype)

    @classmethod
    def from_weight(cls, name: str, weight: np.ndarray, indices: np.ndarray, values=None, *,
                    layout: str = "out_in", value_dtype: str | None = None) -> "Target":
        """A target for a base weight (as stored), recording its shape, dtype and probe hash.

        ``values`` keep their dtype unless ``value_dtype`` (BF16, F16, F32) is given: then they are rounded to it
        as numpy's ``astype`` does (nearest, ties to even; float64 reaches BF16 through float32, as in ml_dtypes
        and torch, which can differ from one direct rounding by a step in rare near-ties), so F32 deltas can be
        saved as the format's usual BF16 without a separate cast.
        Without values, zeros of ``value_dtype`` (BF16 by default).

        The weight must be 2-D and the indices integers in [0, d_in), [d_out, k] (rules 4.2, 3.2, 3.5, 3.4),
        checked before hashing: a column past d_in used to hash the next row's value, a float was truncated,
        and a big-endian weight is read as its native twin (same values)."""
        check_layout(layout, tensor=name)
        weight = np.asarray(weight)
        if weight.ndim != 2:
            raise NeuroAdaError(f"weight has {weight.ndim} dimensions, expected 2", tensor=name, rule="4.2")
        if not weight.dtype.isnative:
            weight = weight.astype(native(weight.dtype))
        try:
            weight_dtype = dtype_name(weight.dtype)
        except KeyError:
            raise NeuroAdaError(f"weight dtype {weight.dtype} is not F32, F16 or BF16", tensor=name,
                                rule="4.2") from None
        canon = canonical_view(weight, layout)
        indices = _checked_indices(indices, canon.shape, name)
        indices = np.ascontiguousarray(indices, dtype=NUMPY_DTYPES[index_dtype_for(canon.shape[1])])
        if value_dtype is not None and value_dtype not in VALUE_DTYPES:
            raise NeuroAdaUsageError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {value_dtype!r}")
        if values is None:
            values = np.zeros(indices.shape, dtype=NUMPY_DTYPES[value_dtype or "BF16"])
        elif value_dtype is not None:
            values = np.asarray(values).astype(NUMPY_DTYPES[value_dtype])
        return cls(name, indices, np.ascontiguousarray(values), (int(canon.shape[0]), int(canon.shape[1])),
                   layout, weight_dtype, probe_hash(weight, indices, layout))

    def entry(self) -> dict:
        return {**self.extra, "shape": list(self.shape), "layout": self.layout, "dtype": self.dtype,
                "k": self.k, "probe": self.probe}


def _checked_indices(indices, shape, name: str) -> np.ndarray:
    """Indices for a weight of canonical `shape`: integers (3.2), [d_out, k] (3.4), in [0, d_in) (3.5)."""
    idx = np.asarray(indices)
    if idx.dtype.kind not in "iu":
        raise NeuroAdaError(f"indices are {idx.dtype}, not integers", tensor=name, rule="3.2")
    if idx.ndim != 2 or idx.shape[0] != shape[0]:
        raise NeuroAdaError(f"indices of shape {list(idx.shape)} are not [d_out={shape[0]}, k]", tensor=name,
                            rule="3.4")
    if idx.size and (idx.min() < 0 or idx.max() >= shape[1]):
        bad = idx[(idx < 0) | (idx >= shape[1])].flat[0]
        raise NeuroAdaError(f"index {int(bad)} is outside [0, d_in={shape[1]})", tensor=name, rule="3.5")
    return idx


@dataclass
class Adapter:
    """A set of targets plus the identity of the base they belong to and how they were chosen."""
    targets: dict[str, Target]
    base_name: str | None = None
    base_revision: str | None = None
    structure_hash: str | None = None
    selection: dict = field(default_factory=lambda: {"rule": "magnitude", "tie_break": "lower-column"})
    version: str = VERSION       # as read; a new one starts at 1.0 and `written_version` raises it as fields need
    # Unknown fields of a newer minor, kept on re-save: top-level keys, and "base"/"merge" sub-keys.
    extra: dict = field(default_factory=dict)
    path: str | None = None

    def written_version(self) -> str:
        """The version the document records: `version`, raised to the lowest that defines every field the
        targets use (spec 3.4: "1.2" once a target records `module`). A document that was read keeps its own
        (it can hold its fields); a new Adapter starts at "1.0", so saving one with `module` used to claim
        1.0. A version that is no 1.x MAJOR.MINOR is kept as is, for validation to report (rule 2.3)."""
        version = self.version
        if isinstance(version, str) and _VERSION_RE.fullmatch(version) and version.split(".")[0] == "1":
            needed = version_for(self.targets.values())
            if version_key(needed) > version_key(version):
                return needed
        return version

    def document(self) -> dict:
        doc = copy.deepcopy(self.extra)
        doc.update({
            "format": FORMAT_NAME,
            "version": self.written_version(),
            "base": {**doc.get("base", {}), "name": self.base_name, "revision": self.base_revision,
                     "structure_hash": self.structure_hash},
            "selection": dict(self.selection),
            "merge": {**doc.get("merge", {}), "rule": MERGE_RULE},
            "targets": {name: t.entry() for name, t in sorted(self.targets.items())},
        })
        return doc

    @property
    def nbytes(self) -> int:
        return sum(t.indices.nbytes + t.values.nbytes for t in self.targets.values())

    def __repr__(self) -> str:
        return (f"Adapter({len(self.targets)} targets, base={self.base_name!r}, "
                f"selection={self.selection.get('rule')!r}, path={self.path!r})")


# -- reading -----------------------------------------------------------------------------------------
def read(path, problems: Problems) -> Adapter | None:
    """Parse a file, reporting structural problems (rules 1.x, 2.x, 3.1-3.4) into `problems`."""
    path = os.fspath(path)
    st = SafetensorsFile(path, problems)
    if not st.valid:
        return None
    if STATE_MARKER in st.tensors and METADATA_KEY not in (st.metadata or {}):  # (given for the folder's adapter)
        problems.error("2.1", f"__metadata__ has no {METADATA_KEY!r} entry: this is the trainable state that "
                              f"save_pretrained (and each Trainer checkpoint) writes beside the adapter, not the adapter; "
                              f"give the folder, or its {WEIGHTS_NAME}")
        return None
    doc = parse_document(st.metadata, problems)
    if doc is None:
        return None
    declared = doc["targets"]
    tensors = set(st.tensors)
    for name in sorted(tensors):
        if name.startswith(INDICES_PREFIX):
            target = name[len(INDICES_PREFIX):]
        elif name.startswith(VALUES_PREFIX):
            target = name[len(VALUES_PREFIX):]
        else:
            problems.error("3.1", "tensor name must start with 'indices/' or 'values/'", tensor=name)
            continue
        if target not in declared:
            problems.error("3.1", "tensor belongs to no target declared in the metadata", tensor=name)
    targets = {}
    for name, entry in declared.items():
        t = _read_target(st, name, entry, problems)
        if t is not None:
            targets[name] = t
    if problems.has_errors:
        return None
    return from_document(doc, targets, path)


def from_document(doc: dict, targets: dict, path: str | None = None) -> Adapter:
    """The Adapter a checked metadata document describes, with its targets; unknown fields of a newer
    minor are kept for re-saving (also used by importers that carry a document, e.g. PEFT interop)."""
    known = {"format", "version", "selection", "targets"}
    extra = {k: v for k, v in doc.items() if k not in known}
    for section, managed in (("base", ("name", "revision", "structure_hash")), ("merge", ("rule",))):
        unknown = {k: v for k, v in doc[section].items() if k not in managed}
        if unknown:
            extra[section] = unknown
        else:
            extra.pop(section)
    return Adapter(
        targets=targets,
        base_name=doc["base"]["name"],
        base_revision=doc["base"]["revision"],
        structure_hash=doc["base"]["structure_hash"],
        selection=doc["selection"],
        version=doc["version"],
        extra=extra,
        path=path,
    )


def _read_target(st: SafetensorsFile, name: str, entry: dict, p: Problems) -> Target | None:
    iname, vname = INDICES_PREFIX + name, VALUES_PREFIX + name
    missing = [n for n in (iname, vname) if n not in st.tensors]
    if missing:
        p.error("3.1", f"declared target has no tensor {', '.join(missing)}", tensor=name)
        return None
    d_out, d_in = entry["shape"]
    k = entry["k"]
    ok = True
    idx_info, val_info = st.tensors[iname], st.tensors[vname]
    if idx_info.dtype not in INDEX_DTYPES:
        p.error("3.2", f"index dtype {idx_info.dtype} is not I16 or I32", tensor=iname)
        ok = False
    elif idx_info.dtype == "I16" and d_in > I16_MAX_D_IN:
        p.error("3.2", f"d_in={d_in} needs I32 indices (I16 holds columns up to 32767)", tensor=iname)
        ok = False
    elif idx_info.dtype == "I32" and d_in <= I16_MAX_D_IN:
        p.warning("3.2", f"I32 indices where I16 suffices (d_in={d_in}); files are larger than needed",
                  tensor=iname)
    if val_info.dtype not in VALUE_DTYPES:
        p.error("3.3", f"value dtype {val_info.dtype} is not BF16, F16 or F32", tensor=vname)
        ok = False
    if k > d_in:
        p.error("3.4", f"k={k} exceeds d_in={d_in}", tensor=name)
        ok = False
    for info in (idx_info, val_info):
        if info.shape != (d_out, k):
            p.error("3.4", f"shape {list(info.shape)} is not [d_out, k] = [{d_out}, {k}]", tensor=info.name)
            ok = False
    if not ok:
        return None
    known = ("shape", "layout", "dtype", "k", "probe")
    return Target(name, st.array(iname), st.array(vname), (d_out, d_in), entry["layout"],
                  entry["dtype"], entry["probe"], {k: v for k, v in entry.items() if k not in known})


def load(path) -> Adapter:
    """Open an adapter file lazily (arrays are read-only views of a memory map).

    Structure is checked (rules 1.x, 2.x, 3.1-3.4) and the first problem raises NeuroAdaError;
    call `validate` for the content rules (index range and order, finite values) and base checks.
    """
    path = os.fspath(path)
    adapter = read(path, Problems(path, strict=True))
    assert adapter is not None  # strict mode raised otherwise
    return adapter


# -- writing -----------------------------------------------------------------------------------------
def save(adapter: Adapter, path, *, value_dtype: str | None = None, index_dtype: str | None = None,
         check: bool = True, overwrite: bool = True) -> None:
    """Write an adapter atomically (temporary file in the same folder, then rename).

    overwrite=False never replaces a file that exists when the rename happens (one that another run
    wrote after the caller checked), so of two writers racing to one new path only one succeeds.

    value_dtype / index_dtype convert on the way out. None keeps what the arrays have when the spec
    allows it (I16/I32 indices; BF16/F16/F32 values); other integer indices get I16 where it fits.
    With check=True (the default) the adapter is validated first, so no invalid file is ever written.
    A path that cannot be written as a file (empty, a folder, a missing parent) is a NeuroAdaUsageError
    naming it, raised before any work, as a FIFO or an existing file with overwrite=False are.
    """
    path = os.fspath(path)
    _check_output_path(path)
    data = encode(adapter, value_dtype=value_dtype, index_dtype=index_dtype, check=check, path=path)
    # serialised in memory (an adapter is small) so that a write error, a full disk above all, is an
    # OSError naming the file rather than safetensors' own exception
    write_bytes(path, data, overwrite=overwrite, durable=True)


def encode(adapter: Adapter, *, value_dtype: str | None = None, index_dtype: str | None = None, check: bool = True,
           path=None) -> bytes:
    """The bytes of the file :func:`save` writes (same conversions and checks; ``path`` only names it in errors), for
    a writer that publishes several files together (the runtime's adapter folder)."""
    from safetensors.numpy import save as serialize

    from .validate import validate

    path = "<memory>" if path is None else os.fspath(path)
    if value_dtype is not None and value_dtype not in VALUE_DTYPES:
        raise NeuroAdaError(f"value dtype {value_dtype!r} is not one of {VALUE_DTYPES}", path=path, rule="3.3")
    if index_dtype is not None and index_dtype not in INDEX_DTYPES:
        raise NeuroAdaError(f"index dtype {index_dtype!r} is not one of {INDEX_DTYPES}", path=path, rule="3.2")
    targets = {}
    for name, t in adapter.targets.items():
        if t.layout not in LAYOUTS:
            raise NeuroAdaError(f"layout {t.layout!r} is not one of {LAYOUTS}", path=path, tensor=name,
                                rule="2.2")
        idx = np.asarray(t.indices)
        if idx.dtype.kind not in "iu":  # the cast below would truncate 1.9 to column 1
            raise NeuroAdaError(f"indices are {idx.dtype}, not integers", path=path, tensor=name, rule="3.2")
        idt = index_dtype or _kept_index_dtype(t)
        vdt = value_dtype or _value_dtype_name(t.values)
        if idx.size and (idx.min() < 0 or idx.max() >= t.d_in):
            raise NeuroAdaError(f"index out of range [0, {t.d_in})", path=path, tensor=name, rule="3.5")
        values = np.asarray(t.values)
        if vdt not in VALUE_DTYPES:
            raise NeuroAdaError(f"value dtype {vdt} is not one of {VALUE_DTYPES}", path=path, tensor=name,
                                rule="3.3")
        targets[name] = Target(name, np.ascontiguousarray(idx.astype(NUMPY_DTYPES[idt], copy=False)),
                               np.ascontiguousarray(values.astype(NUMPY_DTYPES[vdt], copy=False)),
                               t.shape, t.layout, t.dtype, t.probe, t.extra)
    out = Adapter(targets, adapter.base_name, adapter.base_revision, adapter.structure_hash,
                  adapter.selection, adapter.version, adapter.extra)
    if check:
        validate(out, strict=True, path=path)
    tensors = {}
    for name, t in targets.items():
        tensors[INDICES_PREFIX + name] = t.indices
        tensors[VALUES_PREFIX + name] = t.values
    meta = {METADATA_KEY: json.dumps(out.document(), sort_keys=True, separators=(",", ":"))}
    return serialize(tensors, metadata=meta)


def _value_dtype_name(values) -> str:
    """The safetensors name of the values' dtype, byte order aside (the cast on the way out writes
    little-endian); numpy's name for one safetensors has none (refused by rule 3.3 right after)."""
    dt = np.asarray(values).dtype
    try:
        return dtype_name(native(dt))
    except KeyError:
        return str(dt)


def _check_output_path(path) -> None:
    """Refuse, as a usage error naming the path, what the atomic write would only meet as a raw OSError
    after all the work: an empty path (the current folder), a folder, a name ending in a separator (which
    abspath would strip, writing a file where a folder was meant), a parent folder that does not exist."""
    shown = os.fsdecode(path)
    if not shown:
        raise NeuroAdaUsageError("the output path is empty (it would name the current folder)", path="''")
    if os.path.isdir(path):
        raise NeuroAdaUsageError("output exists and is a folder; an adapter is one file: name a file in it",
                                 path=shown)
    if shown.endswith(("/", os.sep)):
        raise NeuroAdaUsageError("the output names a folder (it ends in a separator); an adapter is one file",
                                 path=shown)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise NeuroAdaUsageError("the output's parent folder does not exist", path=shown)


def _kept_index_dtype(t: Target) -> str:
    dt = np.asarray(t.indices).dtype
    name = dtype_name(native(dt)) if dt.kind == "i" else None
    if name == "I32" or (name == "I16" and t.d_in <= I16_MAX_D_IN):
        return name
    return index_dtype_for(t.d_in)


def atomic_write(path: str, write) -> None:
    """Run write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`
    (neuroada_format.durable: the one durable-write path every writer shares)."""
    write_file(path, write, overwrite=True, durable=True)
