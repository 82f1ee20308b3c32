"""Merge adapters into a whole ONNX export folder: the several models Hugging Face Optimum writes for an
encoder-decoder model (`encoder_model.onnx`, `decoder_model.onnx`, `decoder_with_past_model.onnx` or
`decoder_model_merged.onnx`) beside its config.json, generation_config.json and tokenizer files.

Each file holds one part of the model, often under names that lack the part's leading `encoder.` /
`decoder.` (an encoder exported alone calls its layers `block.0...`, as the decoder does), so a name says
too little here. A target is therefore looked for in every model of the folder (`*.onnx` at its top) with
the single-file resolver (converters/onnx_resolve.py: name, exporter scope, node name, probe hash), and every
weight it finds is checked against the adapter's probe hash:

- found, and its values at the adapter's positions hash to the probe: the target is in this file and is
  merged into it (a decoder weight is in decoder_model.onnx and decoder_with_past_model.onnx: both get it);
- found by a name lacking the target's leading part, and the probe differs: that name is the other part's
  layer, so the target is not in this file;
- found by its full name (or a longer one) and the probe differs: another base, or one already merged (rule
  4.3), an error, as for one file;
- found by nothing: not in this file. Ambiguities inside one file are errors, as for one file.

A target found in no file is an error (rule 4.1), and so is --no-verify: without the values, nothing tells
the parts apart. Models in which no target is found (an unrelated .onnx) are copied unchanged; a model in a
subfolder is refused, as it would be copied unmerged.

Nothing is written before every file is resolved, verified and its merge worked out; the output is a new
folder built under a temporary sibling and published with one rename (so no output lock is needed), with
every other file of the export (config, tokenizer, external data of untouched models) copied as it is, so
the output loads as the input does. The input is only read. In place is refused: the small exports Optimum
writes keep their initializers inside the .onnx, which an in-place merge cannot patch with a revert journal.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from neuroada_format import NeuroAdaError, NeuroAdaUsageError, probe_hash, validate
from neuroada_format.durable import (copy_folder_modes, derived_mode, fsync_path, publish, remove,
                                     remove_stale_siblings, temp_sibling)
from neuroada_format.merge import Delta

from .backend import Backend, Resolved, Written, described, pause_for_tests
from .onnx_merge import BACKEND as ONNX_BACKEND, _Plan, _patch_external, _set_inline
from .onnx_read import OnnxModel
from .onnx_resolve import NotFound, Resolution, _Resolver, stored_mismatch
from .safetensors_merge import _tree


class ExportFolder:
    """A folder of ONNX models read without their weights: every file the copy carries (`files`, relative), and
    the models at its top (`models`: relative name -> OnnxModel)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.fspath(path))
        self.dirs, self.files = _tree(self.path)  # refuses FIFOs, links to folders, ... before any work
        names = sorted(f for f in self.files if os.sep not in f and f.lower().endswith(".onnx")
                       and not f.startswith("."))
        if not names:
            raise NeuroAdaError("no .onnx model at the top of the folder", path=self.path, rule="1.6")
        # a model below the top is not merged: copied, it would keep the base's weights in an output said to be merged
        nested = [f for f in self.files if os.sep in f and f.lower().endswith(".onnx")
                  and not os.path.basename(f).startswith(".")]
        if nested:
            raise NeuroAdaUsageError(f"holds an ONNX model below its top ({nested[0]}), which merging the models at "
                                     f"its top would copy unmerged: merge that folder on its own, or move the model "
                                     f"out", path=self.path)
        self.models: dict[str, OnnxModel] = {}
        try:
            for name in names:
                self.models[name] = OnnxModel(os.path.join(self.path, name))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for m in self.models.values():
            m.close()


@dataclass
class _FolderPlan:
    parts: dict                                   # model name -> _Plan (models with something to merge)
    found: dict                                   # target -> [model names], in folder order
    adapters: list
    touched: int = 0
    rewrite: list = field(default_factory=list)   # models whose inline initializers change (re-serialised)


def _find(model: OnnxModel, resolver: _Resolver, target: str, t, near: dict) -> Resolution | None:
    """The target's weight(s) in this model, verified; None where this model does not hold the target (a weight
    found by a shorter name whose shape, dtype or values differ is noted in `near`, for the error if no model holds
    it)."""
    try:
        res = resolver.resolve(target, t)
    except NotFound as exc:
        if exc.rule == "4.2":  # a shorter name of another shape: another part's layer
            near.setdefault(target, model.path)
        return None
    idx = np.asarray(t.indices)
    for name, layout in res.initializers():
        problem = stored_mismatch(model, name, layout, t)
        if problem:
            if res.dropped:  # a name without the leading part, naming another part's layer: not in this file
                near.setdefault(target, model.path)
                return None
            raise NeuroAdaError(problem, path=model.path, tensor=target, rule="4.2")
        if probe_hash(model.array(name), idx, layout) != t.probe:
            if res.dropped:
                near.setdefault(target, model.path)
                return None
            raise NeuroAdaError(f"probe hash differs at initializer {name!r} (found by {res.how}): the model's values "
                                f"at the adapter's positions are not the ones it was made for (different base or "
                                f"revision, or already merged)", path=model.path, tensor=target, rule="4.3")
    return res


def _resolve_file(model: OnnxModel, resolver: _Resolver, adapter, near: dict) -> dict[str, Resolution]:
    """Every target of `adapter` this model holds; two targets on one weight are refused (rule 4.1)."""
    out: dict[str, Resolution] = {}
    owner: dict[str, str] = {}
    for target in sorted(adapter.targets):
        res = _find(model, resolver, target, adapter.targets[target], near)
        if res is None:
            continue
        for name, _ in res.initializers():
            if name in owner:
                raise NeuroAdaError(f"targets {owner[name]!r} and {target!r} both resolve to initializer {name!r}, "
                                    f"and its values match both probe hashes; keep one of them in the adapter",
                                    path=model.path, tensor=target, rule="4.1")
            owner[name] = target
        out[target] = res
    return out


def _refuse_shared_data(view: ExportFolder, plans: dict) -> None:
    """A data file two models read: a range one model's merge changes must be merged the same way by every other
    model that reads bytes of it (else that model would see another part's merge), and it must be one of the
    files the copy carries."""
    ranges: dict[str, list] = {}   # data file -> [(model, start, end, tensor)]
    for rel, model in view.models.items():
        for tensor, ext in model.external_tensors:
            ranges.setdefault(os.path.realpath(ext.file), []).append((rel, ext.offset, ext.offset + ext.nbytes,
                                                                      tensor.name))
    carried = {os.path.realpath(os.path.join(view.path, f)) for f in view.files}
    for rel, plan in plans.items():
        model = view.models[rel]
        for name, patch in plan.patches.items():
            if name not in model.external:
                continue
            ext = model.external[name]
            file = os.path.realpath(ext.file)
            if file not in carried:
                raise NeuroAdaUsageError(f"the external data file {ext.location!r} is not one the copy carries",
                                         path=model.path)
            a, b = ext.offset, ext.offset + ext.nbytes
            for other, a0, b0, name0 in ranges.get(file, ()):
                if other == rel or b0 <= a or a0 >= b:
                    continue
                theirs = plans.get(other)
                same = (a0, b0) == (a, b) and theirs is not None and name0 in theirs.patches and all(
                    np.array_equal(x, y) for x, y in zip(theirs.patches[name0], patch))
                if not same:
                    raise NeuroAdaError(f"{other} reads bytes of {ext.location!r} that this model's merge of "
                                        f"{name!r} changes, and does not merge them alike: merging one model would "
                                        f"change the other", path=model.path, tensor=name, rule="4.2")


class OnnxFolderBackend(Backend):
    """A folder of ONNX models (see the module docstring)."""

    format = "onnx-folder"
    supports_in_place = False
    no_in_place = ("an ONNX export folder is merged into a copy (--out FOLDER), not in place: a revert journal covers "
                   "one model's external data, and exports keep small models' weights inside the .onnx files")

    def open(self, path: str) -> ExportFolder:
        return ExportFolder(path)

    def inputs(self, view: ExportFolder) -> list[str]:
        return [view.path] + [os.path.join(view.path, f) for f in view.files]

    def output_kind(self, view: ExportFolder) -> str:
        return "folder"

    def base_path(self, view: ExportFolder) -> str:
        return view.path

    def resolve(self, view: ExportFolder, adapters, *, verify: bool) -> Resolved:
        if not verify:
            raise NeuroAdaUsageError("the models of an export folder hold parts whose layers are named alike, which "
                                     "only the values tell apart: merge without --no-verify", path=view.path)
        resolvers = {rel: _Resolver(m) for rel, m in view.models.items()}
        entries: dict[str, dict] = {rel: {} for rel in view.models}
        resolutions: dict[str, dict] = {rel: {} for rel in view.models}
        found: dict[str, list] = {}
        for ai, (adapter, scale) in enumerate(adapters):
            label = adapter.path or f"adapter #{ai}"
            validate(adapter, strict=True, path=label)
            hits: dict[str, list] = {}
            near: dict[str, str] = {}
            for rel, model in view.models.items():
                for target, res in _resolve_file(model, resolvers[rel], adapter, near).items():
                    hits.setdefault(target, []).append(rel)
                    t = adapter.targets[target]
                    info = resolutions[rel].setdefault(target, {**res.to_dict(), "adapters": []})
                    info["adapters"].append(ai)
                    for name, layout in res.initializers():
                        entry = entries[rel].setdefault(name, {"layout": layout, "deltas": [], "sources": []})
                        entry["deltas"].append(Delta(t.indices, t.values, scale))
                        entry["sources"].append((label, t))
            missing = sorted(set(adapter.targets) - set(hits))
            if missing:
                t = adapter.targets[missing[0]]
                hint = ""
                if missing[0] in near:
                    hint = (f"; {os.path.basename(near[missing[0]])} has a weight of a name without the target's "
                            f"leading part whose shape, dtype or values differ from the adapter's (another part's "
                            f"layer, or a base of another revision or already merged?)")
                raise NeuroAdaError(f"found in none of the folder's {len(view.models)} ONNX models "
                                    f"({', '.join(view.models)}) by name, exporter scope, node name or probe hash "
                                    f"(shape {list(t.shape)}, {t.dtype}); {len(missing)} target(s) missing in all"
                                    f"{hint}", path=view.path, tensor=missing[0], rule="4.1")
            for target, rels in hits.items():
                found.setdefault(target, [])
                found[target] += [r for r in rels if r not in found[target]]
        parts = {rel: _Plan(entries[rel], resolutions[rel], adapters=described(adapters))
                 for rel in view.models if entries[rel]}
        return Resolved(_FolderPlan(parts, found, described(adapters)), len(found))

    def plan(self, view: ExportFolder, resolved: Resolved, *, verify: bool, in_place: bool) -> _FolderPlan:
        """Each model's merge worked out by the single-file backend (plan_merge, probes, shared bytes)."""
        plan: _FolderPlan = resolved.data
        for rel, part in plan.parts.items():
            model = view.models[rel]
            ONNX_BACKEND.plan(model, Resolved(part, len(part.resolutions)), verify=verify, in_place=False)
            plan.touched += part.touched
            if any(name not in model.external for name in part.patches):
                plan.rewrite.append(rel)
        _refuse_shared_data(view, plan.parts)
        return plan

    def write(self, view: ExportFolder, plan: _FolderPlan, out: str, *, overwrite: bool, durable: bool,
              progress: bool) -> Written:
        stale = remove_stale_siblings(out)
        tmp = temp_sibling(out)
        written = 0
        try:
            os.mkdir(tmp, 0o700)
            for d in view.dirs:
                os.makedirs(os.path.join(tmp, d), exist_ok=True)
            for rel in view.files:
                src, dst = os.path.join(view.path, rel), os.path.join(tmp, rel)
                shutil.copyfile(src, dst)
                os.chmod(dst, derived_mode(os.stat(src).st_mode))
                pause_for_tests()
            for rel, part in plan.parts.items():
                model = view.models[rel]
                for name, (positions, values) in part.patches.items():
                    if name in model.external:  # the copy of its data file, at the same place in the folder
                        data = os.path.join(tmp, os.path.relpath(os.path.realpath(model.external[name].file),
                                                                 os.path.realpath(view.path)))
                        _patch_external(model, data, name, positions, values)
                    else:
                        _set_inline(model.initializers[name], values.dtype, positions, values)
                if rel in plan.rewrite:
                    with open(os.path.join(tmp, rel), "wb") as f:
                        f.write(model.proto.SerializeToString())
                pause_for_tests()
            for rel in view.files:
                written += os.path.getsize(os.path.join(tmp, rel))
                if durable:
                    fsync_path(os.path.join(tmp, rel))
            copy_folder_modes(tmp, view.path, view.dirs, durable=durable)  # (as a safetensors folder copy does)
            pause_for_tests()
            publish(tmp, out, overwrite=overwrite, durable=durable)
        except BaseException:
            if os.path.lexists(tmp):
                remove(tmp)
            raise
        return Written(plan.touched, len(view.files), written, removed_stale=stale, details=self._details(view, plan))

    @staticmethod
    def _details(view: ExportFolder, plan: _FolderPlan) -> dict:
        return {"models": {rel: {"initializers": len(plan.parts[rel].patches) if rel in plan.parts else 0,
                                 "resolutions": plan.parts[rel].resolutions if rel in plan.parts else {}}
                           for rel in view.models},
                "targets": plan.found,
                "note": "merged into " + ", ".join(f"{rel} ({len(plan.parts[rel].patches)})" for rel in plan.parts)}


BACKEND = OnnxFolderBackend()
