"""Merge NeuroAda adapters into ONNX models, inline or with external data, with the reference arithmetic. The models
are read by onnx_read, and the initializer holding each target is found by onnx_resolve.

Limits: targets are main-graph initializers in F32/F16/BF16, or ONNX Runtime MatMulNBits weights (4/8-bit blocks,
onnx_nbits: the touched blocks re-encoded, spec 15.4; other quantized graphs are refused: merge the float model,
then quantize); two targets of one adapter that land on one tensor (both names of a tied
weight) are refused. An in-place merge patches external data only (an inline initializer would mean
rewriting the whole .onnx: merge into a copy), after writing the revert journal that `neuroada-merge
--revert` undoes it with, bit for bit, even after a crash mid-way (converters/journal.py).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import numpy as np
from onnx import numpy_helper

from neuroada_format import Adapter, MergePlan, NeuroAdaError, NeuroAdaUsageError, Target, plan_merge, validate
from neuroada_format.durable import (OutputClaim, derived_mode, fsync_path, publish_together, remove,
                                     remove_stale_siblings, reserve, temp_sibling)
from neuroada_format.merge import Delta
from neuroada_format.validate import probe_mismatch

from . import onnx_nbits
from .backend import Backend, MergeSummary, Resolved, Written, claiming_output, described, merge, pause_for_tests
from .journal import JournalEntry, claim_path, default_path, patching, position_dtype, write_journal
from .onnx_read import FLOAT_TYPES, STORED_TYPES, OnnxModel
from .onnx_resolve import Resolution, resolve_targets, stored_mismatch
from .tensor_map import patch_values


@dataclass
class _Plan:
    """Per initializer: its stored layout, the deltas merged into it and where each came from."""
    entries: dict          # initializer -> {"layout", "deltas", "sources"}
    resolutions: dict      # target -> Resolution.to_dict() + {"adapters": [i, ...]}
    patches: dict | None = None   # initializer -> (positions, merged values), filled by plan()
    originals: dict | None = None  # in place: initializer -> the values the merge replaces (for the journal)
    adapters: list | None = None   # what the journal records of the adapters (backend.described)
    touched: int = 0
    blocks: dict = field(default_factory=dict)  # MatMulNBits weight -> (touched blocks, packed on their grid)


class OnnxBackend(Backend):
    """ONNX models, inline or with external data (see the module docstring for how targets are found)."""

    format = "onnx"
    supports_in_place = True

    def open(self, path: str) -> OnnxModel:
        return OnnxModel(path)

    def inputs(self, view: OnnxModel) -> list[str]:
        return [view.path] + sorted({ext.file for _, ext in view.external_tensors})

    def companions(self, view: OnnxModel, out: str) -> list[str]:
        return list(_data_names(view, out).values())

    def claim_output(self, view: OnnxModel, out: str):
        """The .onnx and its data files are two renames (see `_commit`): hold OUT's lock for the whole write."""
        return claiming_output(view, out)

    def resolve(self, view: OnnxModel, adapters, *, verify: bool) -> Resolved:
        """Every target resolved and validated against the model (names, shapes, dtypes: rule 4.2, with or
        without verify, as for safetensors) before any value is read; verify adds only the probe hashes (plan)."""
        entries: dict[str, dict] = {}
        resolutions = {}
        for ai, (adapter, scale) in enumerate(adapters):
            found = resolve_targets(view.path, adapter, _model=view)
            _verify(view, adapter, found, adapter.path or f"adapter #{ai}")
            partial = sorted((t, r) for t, r in found.items() if r.dropped)
            if partial and not verify:
                target, r = partial[0]
                raise NeuroAdaUsageError(f"{len(partial)} target(s) were found only by names that lack their leading "
                                         f"part (e.g. {target!r} as {r.initializer!r}, without {r.dropped!r}): names "
                                         f"alone cannot tell which part of a model a file holds (an encoder-only "
                                         f"export names its layers as the decoder's), so the values must be checked: "
                                         f"merge without --no-verify", path=adapter.path or f"adapter #{ai}")
            for target, res in found.items():
                t = adapter.targets[target]
                info = res.to_dict()
                if view.quantized(res.initializer):
                    info["matmulnbits"] = view.quantized(res.initializer).to_dict()
                resolutions.setdefault(target, {**info, "adapters": []})["adapters"].append(ai)
                for name, layout in res.initializers():
                    entry = entries.setdefault(name, {"layout": layout, "deltas": [], "sources": []})
                    entry["deltas"].append(Delta(t.indices, t.values, scale))
                    entry["sources"].append((adapter.path or f"adapter #{ai}", t))
        return Resolved(_Plan(entries, resolutions, adapters=described(adapters)), len(resolutions))

    def plan(self, view: OnnxModel, resolved: Resolved, *, verify: bool, in_place: bool) -> _Plan:
        """The merged values, computed from the (read-only) base; one read also gives the probe hashes."""
        plan: _Plan = resolved.data
        plan.patches = {}
        if in_place:  # disk blocks first: a full disk fails here, cleanly, never as a SIGBUS from a map
            for name in plan.entries:
                if name in view.external:
                    ext = view.external[name]
                    reserve(ext.file, ext.offset, ext.nbytes)
        quantized = sorted(n for n in plan.entries if view.quantized(n))
        if quantized and in_place:
            raise NeuroAdaUsageError(f"{quantized[0]!r} is a MatMulNBits weight, whose merge rewrites blocks, scales "
                                     f"and zero points: merge into a copy (--out)", path=view.path)
        for name in sorted(plan.entries):
            entry = plan.entries[name]
            if name in quantized:
                self._plan_nbits(view, plan, name, entry, verify)
                continue
            merge_plan = plan_merge(view.array(name), entry["deltas"], entry["layout"], checked=True)  # resolve ran 3.x
            if verify:
                _probe_check(name, merge_plan, entry["sources"], plan.resolutions)
            plan.patches[name] = (merge_plan.positions, merge_plan.merged)
            if in_place:
                plan.originals = plan.originals or {}
                plan.originals[name] = merge_plan.originals
            plan.touched += int(merge_plan.positions.size)
        _refuse_shared_bytes(view, plan.patches)
        if in_place:
            _check_patchable(view, plan.patches)
        return plan

    @staticmethod
    def _plan_nbits(view: OnnxModel, plan: _Plan, name: str, entry: dict, verify: bool) -> None:
        """A MatMulNBits weight: rule M on its decoded values (only the blocks holding a delta's column are decoded),
        the probe hashes from those values, and the touched blocks re-encoded (onnx_nbits.reencode)."""
        weight = view.nbits_weight(name)
        values, _ = weight.decode_touched(entry["deltas"])
        merge_plan = plan_merge(values, entry["deltas"], "out_in", checked=True)
        if verify:
            _probe_check(name, merge_plan, entry["sources"], plan.resolutions)
        target = entry["sources"][0][1].name
        patch = onnx_nbits.reencode(weight, values, merge_plan, where=(view.path, target))
        for tensor, (positions, new) in patch.tensors.items():
            plan.patches[tensor] = (np.asarray(positions, np.int64), new)
        plan.touched += int(merge_plan.positions.size)
        plan.blocks[name] = (int(patch.ids.size), patch.on_grid)

    def write(self, view: OnnxModel, plan: _Plan, out: str, *, overwrite: bool, durable: bool,
              progress: bool) -> Written:
        claim = getattr(view, "claim", None) or OutputClaim(out, None)
        files, written, stale = _write_copy(view, plan.patches, out, overwrite, durable, claim)
        details, warnings = self._details(view, plan), []
        if plan.blocks:
            total, on = sum(b for b, _ in plan.blocks.values()), sum(o for _, o in plan.blocks.values())
            off = total - on
            details.update(blocks_on_grid=on, blocks_reencoded=off)
            if off:
                worst = max(plan.blocks, key=lambda n: plan.blocks[n][0] - plan.blocks[n][1])
                warnings.append(f"{off:,} of {total:,} touched blocks in {sum(b > o for b, o in plan.blocks.values())} "
                                f"of {len(plan.blocks)} MatMulNBits weights (most in {worst}) were re-encoded: their "
                                f"merged values are off the block's grid, so they are not exact (spec section 15.4); "
                                f"{on:,} were packed exactly on their original scale and zero point")
                details["note"] = f"MatMulNBits targets: {off:,} of {total:,} touched blocks re-encoded, not exact"
            else:
                details["note"] = f"MatMulNBits targets exact: all {on:,} touched blocks packed on their original grid"
        return Written(plan.touched, files, written, removed_stale=claim.removed + stale, details=details,
                       warnings=warnings)

    def write_in_place(self, view: OnnxModel, plan: _Plan, *, journal, durable: bool, progress: bool) -> Written:
        journal, files = _write_in_place(view, plan, journal, durable)
        itemsize = {n: FLOAT_TYPES[view.initializers[n].data_type][1].itemsize for n in plan.patches}
        return Written(plan.touched, files, sum(p.size * itemsize[n] for n, (p, _) in plan.patches.items()),
                       journal=journal,
                       details={**self._details(view, plan), "journal_bytes": os.path.getsize(journal)})

    @staticmethod
    def _details(view: OnnxModel, plan: _Plan) -> dict:
        return {"external_data": bool(view.external_tensors), "initializers": len(plan.patches),
                "resolutions": plan.resolutions}


BACKEND = OnnxBackend()


def merge_onnx(base: str, adapters, out: str | None, *, verify: bool = True, in_place: bool = False,
               progress: bool = False, durable: bool = False, overwrite: bool = False, journal=None) -> MergeSummary:
    """Merge `adapters` [(Adapter, scale), ...] into the ONNX model `base`, writing `out`.

    Values follow the spec's merge rule exactly (neuroada_format.plan_merge: f32 sum over adapters
    in order, one rounding to the initializer's dtype). Nothing is written before every target is
    resolved and validated against the model (shapes and dtypes always; verify=False skips only the
    probe hashes, which read the model's values). Out of place,
    the model and its external data files are written beside `out` under temporary names and put in
    place by rename (see `_commit`); an existing `out` or data file is replaced only with overwrite.
    in_place patches the base's external data files at the tensors' offsets, after writing a revert
    journal (`journal` in the summary; a crash mid-way leaves some tensors merged, which the revert
    undoes); inline initializers are refused in place.
    durable: fsync what is written before it is renamed into place (survives a power cut; the
    renames alone already survive a killed process).
    """
    if in_place:
        if out is not None and os.path.abspath(out) != os.path.abspath(base):
            raise NeuroAdaUsageError("in_place merges write the base itself; give no separate output", path=base)
        out = None
    return merge(base, adapters, out, in_place=in_place, verify=verify, overwrite=overwrite, progress=progress,
                 durable=durable, format="onnx", journal=journal)


def _verify(model: OnnxModel, adapter: Adapter, resolutions: dict[str, Resolution], label: str) -> None:
    """validate()'s rules 1-3 on the adapter, then 4.2 against each resolved initializer as stored: always, as
    merging an adapter made for another dtype or shape writes garbage (--no-verify skips only rule 4.3).

    The probe hashes (4.3) are checked by `_probe_check` from the values the merge reads anyway, in the
    initializer's own orientation (a transposed view would make probe_hash copy the whole tensor).
    """
    validate(adapter, strict=True, path=label)
    for target, res in sorted(resolutions.items()):
        t = adapter.targets[target]
        for name, layout in res.initializers():
            problem = stored_mismatch(model, name, layout, t)
            if problem:
                raise NeuroAdaError(problem, path=label, tensor=target, rule="4.2")


def _probe_check(name: str, plan: MergePlan, sources: list[tuple[str, Target]], resolutions: dict) -> None:
    """Rule 4.3 for every adapter merged into initializer `name`, from its merge plan's originals."""
    for i, (label, t) in enumerate(sources):
        if probe_mismatch(t, plan.originals_of(i)):
            dropped = resolutions.get(t.name, {}).get("dropped_prefix")
            why = (f"found by a name without {dropped!r}: does this file hold another part of the model, e.g. an "
                   f"encoder-only export for a decoder adapter?" if dropped else
                   "different base or revision, or already merged")
            raise NeuroAdaError(f"probe hash differs at initializer {name!r}: the model's values at the "
                                f"adapter's positions are not the ones it was made for ({why})", path=label,
                                tensor=t.name, rule="4.3")


def _patch_external(model: OnnxModel, path: str, name: str, positions, values) -> None:
    """Patch initializer `name` inside data file `path` (the base's, or a copy) at its offset."""
    ext = model.external[name]
    patch_values(path, STORED_TYPES[model.initializers[name].data_type][0], ext.offset,
                 int(np.prod(model.shape(name))), positions, values)


def _set_inline(tensor, values_dtype, positions, values) -> None:
    """Patch an inline initializer, storing it as raw little-endian bytes (typed fields are cleared)."""
    shape = tuple(int(d) for d in tensor.dims)
    if tensor.HasField("raw_data"):
        arr = np.frombuffer(tensor.raw_data, dtype=values_dtype).copy()
    else:
        arr = numpy_helper.to_array(tensor).astype(values_dtype).reshape(-1)
    arr[positions] = values
    for f in ("float_data", "int32_data", "double_data", "int64_data", "uint64_data"):
        tensor.ClearField(f)
    tensor.raw_data = arr.reshape(shape).tobytes()


def _refuse_shared_bytes(model: OnnxModel, patches) -> None:
    """Two external tensors whose bytes overlap are one storage: merging an initializer would change the other
    (a Constant, a subgraph's tensor, another initializer, whose own merge, worked out from the original bytes,
    would then overwrite it). Refused where a patched initializer is involved, unless both are the very same
    range given the very same merge."""
    patched = {id(model.initializers[n]): n for n in patches if n in model.external}
    spans = sorted(((os.path.realpath(e.file), e.offset, e.offset + e.nbytes, t.name or "(unnamed)"), id(t))
                   for t, e in model.external_tensors if e.nbytes)
    open_spans: list = []  # earlier spans of the current file that may still reach the next one
    for (f, a, b, name), key in spans:
        open_spans = [o for o in open_spans if o[0] == f and o[2] > a]
        for _, a0, b0, name0, key0 in open_spans:
            if key0 not in patched and key not in patched:
                continue
            same = ((a0, b0) == (a, b) and key0 in patched and key in patched
                    and all(np.array_equal(x, y) for x, y in zip(patches[patched[key0]], patches[patched[key]])))
            if not same:
                raise NeuroAdaError(f"{name0!r} and {name!r} share bytes of {os.path.basename(f)} ([{a0}, {b0}) and "
                                    f"[{a}, {b})): merging one would change the other", path=model.path,
                                    tensor=patched.get(key0) or patched.get(key), rule="4.2")
        open_spans.append((f, a, b, name, key))


def _check_patchable(model: OnnxModel, patches) -> None:
    """In place: only external data, in files nobody else shares (no symlinks, no other hard links).

    An inline initializer lives inside the serialised model, which a merge would rewrite as a whole: no
    offsets for a revert journal to restore, and merging into a copy (--out) costs the same."""
    inline = sorted(n for n in patches if n not in model.external)
    if inline:
        raise NeuroAdaUsageError(f"initializer {inline[0]!r} is stored inside the .onnx file, which an in-place merge "
                                 "would rewrite whole, with no revert journal: merge into a copy (--out), which "
                                 "costs the same, or save the model with external data", path=model.path)
    files = {model.external[n].file for n in patches}
    for f in sorted(files):
        if os.path.samefile(f, model.path):  # the journal checks the .onnx is unchanged on revert: it must be
            raise NeuroAdaUsageError("the external data lives in the .onnx file itself, which a revert journal needs "
                                     "unchanged: merge into a copy (--out)", path=model.path)
        if os.stat(f).st_nlink > 1:
            raise NeuroAdaUsageError("file has other hard links; patching it in place would change them too",
                                     path=f)


def _write_in_place(model: OnnxModel, plan: _Plan, journal, durable: bool) -> tuple[str, int]:
    """Write the revert journal (always fsynced; the .onnx is each data file's layout file), then patch the
    external data at the tensors' offsets. Returns (journal, files patched)."""
    root, name = os.path.split(model.path)
    journal = claim_path(journal, default_path(root, name))
    entries = []
    for tensor, (positions, values) in sorted(plan.patches.items()):
        ext = model.external[tensor]
        count = int(np.prod(model.shape(tensor)))
        entries.append(JournalEntry(tensor, os.path.relpath(ext.file, root),
                                    FLOAT_TYPES[model.initializers[tensor].data_type][0], ext.offset, count,
                                    positions.astype(position_dtype(count)), plan.originals[tensor], values))
    files = sorted({e.file for e in entries})
    write_journal(journal, root, files, entries, lambda e: (e.positions, e.original, e.merged),
                  adapters=plan.adapters, layouts=dict.fromkeys(files, name))
    pause_for_tests()
    with patching(model.path, journal):
        for e in entries:
            patch_values(os.path.join(root, e.file), e.dtype, e.offset, e.count, e.positions, e.merged)
            pause_for_tests()
        if durable:
            for f in files:
                fsync_path(os.path.join(root, f))
    return journal, len(files)


def _is_text(name: str) -> bool:
    """False for a name holding bytes that are no UTF-8 (os.fsdecode keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _data_names(model: OnnxModel, out: str) -> dict[str, str]:
    """Base data file -> the path its copy gets beside `out` (`<out>.data`, or `<out>.<i>.data`)."""
    external_files = sorted({ext.file for _, ext in model.external_tensors})
    folder, stem = os.path.split(os.path.abspath(out))
    if external_files and not _is_text(stem):  # the .onnx names its data file in a protobuf string: UTF-8 only
        raise NeuroAdaUsageError("the output's name is not UTF-8 text, and a model with external data records its "
                                 "data file's name (<name>.data) in the .onnx, where only UTF-8 text fits; choose "
                                 "a UTF-8 output name", path=os.path.abspath(out))
    if len(external_files) == 1:
        return {external_files[0]: os.path.join(folder, f"{stem}.data")}
    return {f: os.path.join(folder, f"{stem}.{i}.data") for i, f in enumerate(external_files)}


def _write_copy(model: OnnxModel, patches, out: str, overwrite: bool, durable: bool,
                claim: OutputClaim) -> tuple[int, int, list]:
    """Copy the model and its data files beside `out`, patched; returns (files, bytes, stale removed)."""
    new_names = _data_names(model, out)
    stale = [p for final in [out, *new_names.values()] for p in remove_stale_siblings(final)]
    temps: list[str] = []

    def temp(final):
        tmp = temp_sibling(final)
        temps.append(tmp)
        return tmp

    try:
        data_temps = {}
        for f, final in new_names.items():
            tmp = temp(final)
            shutil.copyfile(f, tmp)
            os.chmod(tmp, derived_mode(os.stat(f).st_mode))
            data_temps[f] = tmp
        for name, (positions, values) in patches.items():
            if name in model.external:
                _patch_external(model, data_temps[model.external[name].file], name, positions, values)
            else:
                _set_inline(model.initializers[name], values.dtype, positions, values)
        for tensor, ext in model.external_tensors:
            for e in tensor.external_data:
                if e.key == "location":
                    e.value = os.path.basename(new_names[ext.file])
        if durable:
            for tmp in data_temps.values():
                fsync_path(tmp)
        onnx_tmp = temp(out)
        with open(onnx_tmp, "wb") as f:
            f.write(model.proto.SerializeToString())
        os.chmod(onnx_tmp, derived_mode(os.stat(model.path).st_mode))
        if durable:
            fsync_path(onnx_tmp)
        written = sum(os.path.getsize(t) for t in temps)
        _commit(out, onnx_tmp, {new_names[f]: tmp for f, tmp in data_temps.items()}, overwrite, durable, claim)
        temps.clear()
    finally:
        for tmp in temps:
            if os.path.lexists(tmp):
                remove(tmp)
    return len(new_names) + 1, written, stale


def _commit(out: str, onnx_tmp: str, data: dict[str, str], overwrite: bool, durable: bool,
            claim: OutputClaim) -> None:
    """Put a model and its data files in place so `out` never names a graph with someone else's data: the data
    files first, the .onnx last, recorded in `out`'s output lock (`durable.publish_together`)."""
    publish_together(out, onnx_tmp, data, overwrite=overwrite, durable=durable, claim=claim)
