"""Build adapters from other things: extract one from a dense fine-tune, combine several, repack one.

extract: per target row, keep the k entries of D = W_ft - W_base with the largest |D| (rule "delta",
the best k-sparse approximation of D in the Frobenius norm) or at the base's top-k |W| (rule
"magnitude", NeuroAda's own positions, so a validator can re-derive them). Tensors are streamed one
at a time in row chunks, so neither checkpoint is ever loaded whole.

combine: one adapter equal to sum_a w_a * A_a. Per row the union of positions; values summed in f32 in
the given order, each term f32(f32(w) * f32(v)) exactly as the merge rule forms it, rounded once to
the value dtype. Rows shorter than the longest union are padded with +0.0 at their lowest unused
columns, because k is fixed per target. The probe must be recomputed at the new positions, which
needs the base.

repack: change value/index dtypes and bring an older 1.x file to the current minor version (unknown
fields of the document are carried over unchanged).
"""
from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable

import numpy as np

import neuroada_format.metadata as _metadata
from neuroada_format import Adapter, NeuroAdaError, NeuroAdaUsageError, Target, open_base, topk_columns, validate
from neuroada_format.base import ArrayBase, Checkpoint, absent_target
from neuroada_format.dtypes import (BASE_DTYPES, INDEX_DTYPES, NUMPY_DTYPES, VALUE_DTYPES, common_value_dtype,
                                    index_dtype_for, nonfinite_mask)
from neuroada_format.jsonparse import read_json
from neuroada_format.layout import canonical_view
from neuroada_format.merge import union_target
from neuroada_format.selection import select_indices

from .progress import bar

CREATED_BY = "neuroada-pack"
CHUNK_ENTRIES = 1 << 22       # rows are processed in chunks of about this many entries
COMPARE_BYTES = 64 << 20      # bytes of a tensor outside the targets compared at a time
SHOWN_NAMES = 3               # names a warning lists before "..."

# What "the linear weights" means by default: 2-D float tensors named *.weight, minus embeddings,
# output heads and norms. A head or an embedding is rarely what a sparse adapter should touch and is
# often tied; pass --targets to include them.
DEFAULT_EXCLUDE = re.compile(r"(^|\.)([^.]*embed[^.]*|wte|wpe|shared|lm_head|[^.]*norm[^.]*|ln_[^.]*)(\.|$)")
# transformers' Conv1D (GPT-2 family) stores [in, out]; these are the module names that use it there.
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
CONV1D_NAMES = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)\.weight$")


# -- target selection ------------------------------------------------------------------------------
def default_target(name: str) -> bool:
    return name.endswith(".weight") and not DEFAULT_EXCLUDE.search(name)


def _name_filter(targets) -> Callable[[str], bool]:
    if targets is None:
        return default_target
    if callable(targets):
        return targets
    if isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as exc:
            raise NeuroAdaUsageError(f"--targets {targets!r} is not a regular expression: {exc}") from None
        return lambda name: rx.search(name) is not None
    wanted = set(targets)
    return lambda name: name in wanted


def _model_type(base) -> str | None:
    arch = getattr(base, "arch", None)  # a GGUF base names its architecture itself (llama.cpp's gpt2 is GPT-2's)
    if isinstance(arch, str):
        return arch
    folder = getattr(base, "path", None)
    if not folder:
        return None
    if not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    config = os.path.join(folder, "config.json")
    if not os.path.exists(config):
        return None
    try:  # the core's one JSON reader: regular files only, bounded depth and size
        doc = read_json(config, rule=None, what="config.json")
    except NeuroAdaError:  # unreadable or refused: no model type, as if absent (layout falls back to out_in)
        return None
    kind = doc.get("model_type") if isinstance(doc, dict) else None
    return kind if isinstance(kind, str) else None


def layout_rule(layout_in_out, base) -> Callable[[str], str]:
    """name -> "in_out" | "out_in". "auto": Conv1D names in a GPT-2-family folder (config.json model_type) or GGUF;
    "none": all out_in; otherwise a regex (re.search) naming the in_out tensors."""
    if layout_in_out in (None, "none", ""):
        return lambda name: "out_in"
    if layout_in_out == "auto":
        if _model_type(base) in CONV1D_MODEL_TYPES:
            return lambda name: "in_out" if CONV1D_NAMES.search(name) else "out_in"
        return lambda name: "out_in"
    try:
        rx = re.compile(layout_in_out)
    except re.error as exc:
        raise NeuroAdaUsageError(f"--layout-in-out {layout_in_out!r} is not a regular expression: {exc}") from None
    return lambda name: "in_out" if rx.search(name) else "out_in"


def _check_value_dtype(value_dtype):
    if value_dtype not in VALUE_DTYPES:
        raise NeuroAdaError(f"value dtype {value_dtype!r} is not one of {', '.join(VALUE_DTYPES)}", rule="3.3")


# -- extract ---------------------------------------------------------------------------------------
class ExtractWarning(UserWarning):
    """A change in the fine-tune that the extracted adapter does not carry (the CLI prints it as one line)."""


def _listed(names) -> str:
    return ", ".join(names[:SHOWN_NAMES]) + (" ..." if len(names) > SHOWN_NAMES else "")


def _stored_bytes(ckpt, name: str, start: int, stop: int) -> np.ndarray:
    """Bytes [start, stop) of one tensor as stored, flat: read from the file for a safetensors checkpoint, the
    array's own bytes for an in-memory one."""
    if isinstance(ckpt, Checkpoint):
        return ckpt.file_of(name).raw(name, start, stop)
    return np.ascontiguousarray(ckpt.array(name)).reshape(-1).view(np.uint8)[start:stop]


def _differs(b, f, name: str) -> bool:
    """Whether the fine-tune stores `name` otherwise than the base (or the base lacks it): dtype, shape, then
    the bytes, COMPARE_BYTES at a time, so a large embedding is never held in memory."""
    if name not in b or tuple(b.info(name)) != tuple(f.info(name)):
        return True
    nbytes = f.file_of(name).tensors[name].nbytes if isinstance(f, Checkpoint) else np.asarray(f.array(name)).nbytes
    return any(not np.array_equal(_stored_bytes(b, name, i, i + COMPARE_BYTES),
                                  _stored_bytes(f, name, i, i + COMPARE_BYTES))
               for i in range(0, nbytes, COMPARE_BYTES))


def _rows_per_chunk(d_in: int) -> int:
    return max(1, CHUNK_ENTRIES // max(d_in, 1))


def _extract_target(name, w0, w1, layout, k, positions, vdt, where=None):
    """Indices, f32 values and error sums of one target, streamed over row chunks."""
    c0, c1 = canonical_view(w0, layout), canonical_view(w1, layout)
    d_out, d_in = c0.shape
    idx = np.empty((d_out, k), dtype=np.int64)
    vals = np.empty((d_out, k), dtype=np.float32)
    total = rest = stored = 0.0
    for start in range(0, d_out, _rows_per_chunk(d_in)):
        stop = min(d_out, start + _rows_per_chunk(d_in))
        base_rows = np.asarray(c0[start:stop], dtype=np.float32)
        delta = np.asarray(c1[start:stop], dtype=np.float32) - base_rows
        if nonfinite_mask(delta).any():
            raise NeuroAdaError("fine-tuned minus base has non-finite entries", path=where, tensor=name, rule="3.7")
        if positions == "delta":
            sel = topk_columns(np.abs(delta), k)
        else:
            sel = select_indices(base_rows, k, "magnitude")
        v = np.take_along_axis(delta, sel, axis=1) + np.float32(0.0)  # -0.0 -> +0.0: padding is all-zero bits (4.5)
        idx[start:stop], vals[start:stop] = sel, v
        d64 = delta.astype(np.float64)
        total += float(np.square(d64).sum())
        np.put_along_axis(d64, sel, 0.0, axis=1)
        r = float(np.square(d64).sum())
        rest += r
        with np.errstate(over="ignore"):  # a value beyond vdt's range is refused by extract, not warned about here
            rounded = v.astype(NUMPY_DTYPES[vdt]).astype(np.float64)
        stored += r + float(np.square(v.astype(np.float64) - rounded).sum())
    return idx, vals, total, rest, stored


def _renamed_in_finetune(b, f) -> dict[str, str]:
    """Base key -> the fine-tune's key for the same tensor, where a GGUF base lists it under another name: a Gemma 3
    multimodal checkpoint's `language_model.model.layers.N...` is the text GGUF's `blk.N...`, which `keys()` names
    `model.layers.N...` (spec 15.2)."""
    if not hasattr(b, "storage_name"):
        return {}
    base_keys = set(b.keys())
    by_storage = {b.storage_name(k): k for k in base_keys}
    out = {}
    for k in f.keys():
        if k not in base_keys and k in b:
            key = by_storage.get(b.storage_name(k))
            if key is not None and key not in f:
                out[key] = k
    return out


def extract(base, finetuned, k: int, positions: str = "delta", targets=None, *, layout_in_out="auto",
            value_dtype: str = "BF16", base_name: str | None = None, base_revision: str | None = None,
            progress: bool = False) -> tuple[Adapter, dict]:
    """The adapter that best approximates finetuned - base with k entries per row, and a report.

    targets: None (the linear weights, see DEFAULT_EXCLUDE), a regex (re.search) or a name list.
    Tensors whose delta is exactly zero are left out (listed under "unchanged").
    What the adapter cannot carry is warned about (ExtractWarning) and listed: "changed_outside_targets", the
    tensors that are no targets but differ from the base or exist only in the fine-tune (a fine-tuned lm_head or
    norm), and "dtype_changed", the targets whose dtype differs ({name: {"base", "finetuned"}}: the adapter is
    made for the base's dtype). Both compare safetensors or in-memory checkpoints only: a GGUF base's values are
    de-quantized, so every tensor would differ ("changed_outside_targets" is then None).
    report["targets"][T]["rel_error"] = ||D - D_k||_F / ||D||_F with D_k the kept entries in f32;
    "rel_error_stored" also counts rounding the kept values to value_dtype.
    """
    if positions not in ("delta", "magnitude"):
        raise NeuroAdaError(f"positions must be 'delta' or 'magnitude', not {positions!r}", rule="2.2")
    _check_value_dtype(value_dtype)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise NeuroAdaError(f"k={k} must be a positive integer", rule="3.4")
    b, f = open_base(base), open_base(finetuned)
    wanted = _name_filter(targets)
    layout_of = layout_rule(layout_in_out, b)
    chosen, skipped = [], {"not_in_finetuned": [], "not_float_2d": []}
    comparable = all(isinstance(c, (Checkpoint, ArrayBase)) for c in (b, f))
    dtype_changed = {}
    renamed = _renamed_in_finetune(b, f)
    for name in sorted(b.keys()):
        fname = name if name in f else renamed.get(name)
        if not (wanted(name) or (fname is not None and wanted(fname))):
            continue
        dtype, shape = b.info(name)
        if len(shape) != 2 or dtype not in BASE_DTYPES:
            if targets is not None:
                skipped["not_float_2d"].append(name)
            continue
        if fname is None:
            skipped["not_in_finetuned"].append(name)
            continue
        fdtype, fshape = f.info(fname)
        if tuple(fshape) != tuple(shape):
            raise NeuroAdaError(f"shape {list(fshape)} in the fine-tune, {list(shape)} in the base",
                                path=getattr(f, "path", None), tensor=name, rule="4.2")
        if fdtype not in BASE_DTYPES:
            raise NeuroAdaError(f"fine-tuned tensor is {fdtype}, not F32, F16 or BF16", path=getattr(f, "path", None),
                                tensor=name, rule="4.2")
        if comparable and fdtype != dtype:
            dtype_changed[name] = {"base": dtype, "finetuned": fdtype}
        chosen.append((name, fname))
    if not chosen:
        raise NeuroAdaError("no tensor of the base matches the target filter (2-D F32/F16/BF16 tensors present "
                            "in both checkpoints)", path=getattr(b, "path", None))
    out_targets, report_targets, unchanged = {}, {}, []
    sums = [0.0, 0.0, 0.0]
    with bar(len(chosen), "extract", enabled=progress, unit="tensor") as pbar:
        for base_key, name in chosen:  # the target is keyed as the fine-tune's checkpoint names the tensor
            w0, w1 = b.array(base_key), f.array(name)
            layout = layout_of(name)
            d_in = w0.shape[1] if layout == "out_in" else w0.shape[0]
            if k > d_in:
                raise NeuroAdaError(f"k={k} exceeds d_in={d_in}", path=getattr(b, "path", None), tensor=name,
                                    rule="3.4")
            idx, vals, total, rest, stored = _extract_target(name, w0, w1, layout, k, positions, value_dtype,
                                                             getattr(f, "path", None))
            pbar.update(1)
            if total == 0.0:
                unchanged.append(name)
                continue
            with np.errstate(over="ignore"):
                values = vals.astype(NUMPY_DTYPES[value_dtype])
            if nonfinite_mask(values).any():  # the input's fault: name the fine-tune, not the output being written
                raise NeuroAdaError(f"a fine-tuned minus base value overflows {value_dtype}; use a wider --value-dtype",
                                    path=getattr(f, "path", None), tensor=name, rule="3.7")
            out_targets[name] = Target.from_weight(name, w0, idx, values, layout=layout, value_dtype=value_dtype)
            for i, x in enumerate((total, rest, stored)):
                sums[i] += x
            report_targets[name] = {"shape": list(out_targets[name].shape), "layout": layout, "k": int(k),
                                    "delta_norm": math.sqrt(total), "rel_error": math.sqrt(rest / total),
                                    "rel_error_stored": math.sqrt(stored / total)}
    if not out_targets:
        raise NeuroAdaError(f"the fine-tune equals the base on all {len(chosen)} selected tensors: nothing to "
                            f"extract", path=getattr(f, "path", None))
    # what the adapter leaves behind, said rather than lost without a word: one tensor at a time
    targets_set = {name for _, name in chosen}
    outside = ([name for name in sorted(f.keys()) if name not in targets_set and _differs(b, f, name)]
               if comparable else None)
    # tensors the base lacks altogether (a fine-tune with added layers, another architecture) are said apart: "differ
    # from the base" hid that 7 of 9 such tensors were linear weights the filter would have targeted
    known = set(renamed.values())
    only = [name for name in outside or () if name not in b and name not in known]
    differing = [name for name in outside or () if name not in only]
    if differing:
        one = len(differing) == 1
        warnings.warn(ExtractWarning(f"{len(differing)} tensor{'' if one else 's'} outside the targets "
                                     f"differ{'s' if one else ''} from the base and {'is' if one else 'are'} not in "
                                     f"the adapter: {_listed(differing)}"), stacklevel=2)
    if only:
        one = len(only) == 1
        warnings.warn(ExtractWarning(f"{len(only)} tensor{'' if one else 's'} of the fine-tune {'is' if one else 'are'} "
                                     f"not in the base at all (added layers, or another architecture?) and not in "
                                     f"the adapter: {_listed(only)}"), stacklevel=2)
    if dtype_changed:
        shown = [f"{n} ({d['base']} in the base, {d['finetuned']} in the fine-tune)" for n, d in dtype_changed.items()]
        one = len(dtype_changed) == 1
        warnings.warn(ExtractWarning(f"{len(dtype_changed)} target{'' if one else 's'} {'has' if one else 'have'} "
                                     f"another dtype in the fine-tune than in the base; the adapter is made for the "
                                     f"base's dtype: {_listed(shown)}"),
                      stacklevel=2)
    adapter = Adapter(out_targets, base_name=base_name, base_revision=base_revision,
                      structure_hash=b.structure_hash() if hasattr(b, "structure_hash") else None,
                      selection={"rule": positions, "tie_break": "lower-column"},
                      extra={"created_by": f"{CREATED_BY} extract (positions={positions}, k={k})"})
    report = {
        "positions": positions, "k": int(k), "value_dtype": value_dtype,
        "targets": report_targets,
        "rel_error": math.sqrt(sums[1] / sums[0]), "rel_error_stored": math.sqrt(sums[2] / sums[0]),
        "entries": int(sum(t.indices.size for t in out_targets.values())),
        "unchanged": unchanged, **skipped,
        "changed_outside_targets": outside, "only_in_finetuned": only if comparable else None,
        "dtype_changed": dtype_changed,
    }
    return adapter, report


# -- combine ---------------------------------------------------------------------------------------
def combine(adapters_with_weights, base, *, value_dtype: str | None = None, verify: bool = True,
            base_name: str | None = None) -> Adapter:
    """sum_a w_a * A_a as one adapter (see the module docstring for the exact arithmetic).

    Every input is validated against `base` (verify=False skips that when the caller already did),
    a structure hash that differs from the base's is a warning (the probes decide, as in validate), and
    the result records the base's; a target must have the same shape,
    layout and base dtype in every input. value_dtype None keeps the inputs' common value dtype (F32
    if they differ).
    """
    pairs = [(a, 1.0) if isinstance(a, Adapter) else (a[0], float(a[1])) for a in adapters_with_weights]
    if not pairs:
        raise NeuroAdaError("nothing to combine")
    b = open_base(base)
    hashes = {a.structure_hash for a, _ in pairs if a.structure_hash is not None}
    if len(hashes) > 1 and not verify:  # unchecked, nothing else says they belong to one base
        raise NeuroAdaError("the adapters declare different base structure hashes: they were made for different "
                            "bases", rule="4.5")
    for i, (a, w) in enumerate(pairs):
        if not math.isfinite(w):
            raise NeuroAdaError(f"weight {w} is not finite", path=a.path)
        if verify:  # the probe hashes decide (rules 4.1-4.3); a structure hash that differs is a warning (4.5),
            # as in validate and merge: e.g. an adapter made on an F32 copy of this BF16 checkpoint (spec 14)
            report = validate(a, base=b, path=a.path or f"adapter #{i}")
            report.raise_if_invalid()
            for p in report.problems:
                if p["rule"] == "4.5":
                    warnings.warn(f"{file_label(a.path) if a.path else f'adapter #{i}'}: rule 4.5: {p['message']}",
                                  RuntimeWarning, stacklevel=2)
    vdt = value_dtype or common_value_dtype(t.value_dtype for a, _ in pairs for t in a.targets.values())
    _check_value_dtype(vdt)
    names = sorted({n for a, _ in pairs for n in a.targets})
    owner = {id(t): a.path for a, _ in pairs for t in a.targets.values()}  # the file an error names
    targets = {}
    for name in names:
        parts = [(a.targets[name], w) for a, w in pairs if name in a.targets]
        first = parts[0][0]
        for t, _ in parts[1:]:
            if (t.shape, t.layout, t.dtype) != (first.shape, first.layout, first.dtype):
                raise NeuroAdaError(f"target is {t.dtype}{list(t.shape)} {t.layout} in one adapter and "
                                    f"{first.dtype}{list(first.shape)} {first.layout} in another",
                                    path=owner[id(t)], tensor=name, rule="4.2")
        if name not in b:
            raise NeuroAdaError(absent_target(b, name), path=owner[id(first)], tensor=name, rule="4.1")
        idx, vals = union_target(name, parts, *first.shape)
        with np.errstate(over="ignore"):
            values = vals.astype(NUMPY_DTYPES[vdt])
        if nonfinite_mask(values).any():
            raise NeuroAdaError(f"the weighted sum of {len(parts)} adapters' values overflows {vdt}; use a wider value "
                                f"dtype", path=owner[id(first)], tensor=name, rule="3.7")
        targets[name] = Target.from_weight(name, b.array(name), idx, values, layout=first.layout,
                                           value_dtype=vdt)
        modules = {t.extra["module"] for t, _ in parts if isinstance(t.extra.get("module"), str)}
        if len(modules) > 1:
            raise NeuroAdaError(f"the adapters record different modules for this tensor ({', '.join(sorted(modules))}"
                                f"): made for different models", path=owner[id(first)], tensor=name, rule="4.1")
        if modules:  # spec 4.6: the model's name for a renamed checkpoint key rides along
            targets[name].extra = {"module": modules.pop()}
    lead = pairs[0][0]
    return Adapter(targets, version=_metadata.version_for(targets.values()), base_name=base_name or lead.base_name, base_revision=lead.base_revision,
                   structure_hash=(b.structure_hash() if hasattr(b, "structure_hash") else
                                   hashes.pop() if len(hashes) == 1 else None),
                   selection={"rule": "union", "tie_break": "lower-column"},
                   extra={"created_by": f"{CREATED_BY} combine",
                          "description": "weighted sum of " + ", ".join(
                              f"{file_label(a.path) if a.path else 'adapter'} x {w:g}" for a, w in pairs)})


def file_label(path) -> str:
    """A path's last component as metadata text: a name holding bytes that are not UTF-8 (Python keeps them as
    lone surrogates) gets U+FFFD for them, since metadata must be valid Unicode (rule 2.2)."""
    return os.fsencode(os.path.basename(os.path.normpath(os.fspath(path)))).decode("utf-8", "replace")


# -- repack ----------------------------------------------------------------------------------------
def repack(adapter: Adapter, value_dtype: str | None = None, index_dtype: str | None = None) -> Adapter:
    """A copy with converted dtypes (values rounded to nearest even) at the current spec minor version.

    A file of a newer 1.x minor keeps its version: its unknown fields are carried verbatim and may mean
    something this library cannot re-check, so claiming the older version would be wrong.
    """
    if value_dtype is not None:
        _check_value_dtype(value_dtype)
    if index_dtype is not None and index_dtype not in INDEX_DTYPES:
        raise NeuroAdaError(f"index dtype {index_dtype!r} is not one of {', '.join(INDEX_DTYPES)}", rule="3.2")
    targets = {}
    for name, t in adapter.targets.items():
        idt = index_dtype or t.index_dtype
        if idt == "I16" and index_dtype_for(t.d_in) == "I32":
            raise NeuroAdaError(f"d_in={t.d_in} needs I32 indices", path=adapter.path, tensor=name, rule="3.2")
        vdt = value_dtype or t.value_dtype
        with np.errstate(over="ignore"):
            values = np.asarray(t.values).astype(NUMPY_DTYPES[vdt])
        if nonfinite_mask(values).any() and not nonfinite_mask(np.asarray(t.values)).any():
            raise NeuroAdaError(f"a value overflows {vdt}", path=adapter.path, tensor=name, rule="3.7")
        targets[name] = Target(name, np.asarray(t.indices).astype(NUMPY_DTYPES[idt]), values, t.shape, t.layout,
                               t.dtype, t.probe, dict(t.extra))  # unknown per-target fields carried verbatim
    version = adapter.version
    if _metadata.version_key(version) < _metadata.version_key(_metadata.VERSION):
        version = _metadata.VERSION
    return Adapter(targets, adapter.base_name, adapter.base_revision, adapter.structure_hash,
                   dict(adapter.selection), version, dict(adapter.extra), adapter.path)


