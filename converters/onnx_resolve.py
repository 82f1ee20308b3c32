"""Which initializer of an exported ONNX graph holds each adapter target, and whether it holds it as the adapter
expects (rule 4.2, `stored_mismatch`). A module of its own because both merge backends (onnx_merge,
onnx_folder_merge), validation against an ONNX base (`open_onnx_base`) and the runtime's grids
(runtime/quant_grid.py) find targets through it, all the same way.

Finding a target's weight in an exported graph is the hard part: the dynamo exporter renames most
Linear weights to `val_N` and stores them transposed for MatMul. So each target is looked for by
(1) initializer name, (2) the exporter's `pkg.torch.onnx.name_scopes` node metadata, (3) legacy
`/model/layers.0/.../MatMul` node names, and only when none of those says anything, (4) by matching the
adapter's probe hash against candidate initializers. Every stage that fires must agree on one weight.

Tied weights are refused: a target whose weight is also an embedding table (an initializer that a Gather reads, such
as a tied head's) would change the embeddings too, which the adapter was never trained with (the runtime serves such
an adapter unmerged, and a tied safetensors checkpoint has no head tensor to merge into). An export that gave the
head its own copy of the table (the TorchScript exporter folds the transpose into a new initializer that no Gather
reads) is merged into that copy: the head gets the deltas and the embeddings do not, which is what the runtime
serves. Initializers that evidence points to and that are exact copies of each other (in canonical orientation) are
one weight, and all copies get the merge.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np

from neuroada_format import Adapter, ArrayBase, NeuroAdaError, Target, probe_hash
from neuroada_format.hashing import probe_hash_from_values
from neuroada_format.layout import canonical_view, stored_shape

from . import onnx_nbits
from .onnx_read import FLOAT_TYPES, QUANT_OPS, QUANTIZED_TYPES, OnnxModel, _type_name

SCOPES_KEY = "pkg.torch.onnx.name_scopes"

WEIGHT_OPS = {"MatMul", "Gemm", "Gather"}


class NotFound(NeuroAdaError):
    """No initializer of the model holds the target (rule 4.1), or only one whose name lacks the target's leading
    part and whose shape differs (rule 4.2): what a folder of models reads as "not in this file"."""


@dataclass(frozen=True)
class Resolution:
    """Where a target lives in the graph: initializer, its stored orientation, and the evidence used."""
    initializer: str
    layout: str                  # as stored in ONNX: "out_in" ([d_out, d_in]) or "in_out"
    how: str                     # "name" | "scope" | "node-name" | "probe"
    copies: tuple = ()           # ((initializer, layout, how), ...) exact copies that get the merge too
    dropped: str = ""            # the target's leading part the graph's name lacked ("model.decoder."), if any

    def initializers(self):
        return [(self.initializer, self.layout)] + [(n, lay) for n, lay, _ in self.copies]

    def to_dict(self) -> dict:
        d = {"initializer": self.initializer, "layout": self.layout, "how": self.how}
        if self.copies:
            d["copies"] = [{"initializer": n, "layout": lay, "how": h} for n, lay, h in self.copies]
        if self.dropped:
            d["dropped_prefix"] = self.dropped
        return d


def _suffix_match(a: str, b: str) -> bool:
    """Equal, or one is the other with a dotted prefix (a wrapper module's name)."""
    return a == b or a.endswith("." + b) or ("." in a and b.endswith("." + a))


def _dropped(graph_name: str, target: str) -> str:
    """The leading part of `target` that a matching graph name lacks ("model.decoder." for "layers.0.fc1"): such a
    name says less than the target, since a model's parts name their layers alike (an encoder-only export's
    "layers.0.fc1" is also the decoder's)."""
    return target[: len(target) - len(graph_name)] if target.endswith("." + graph_name) else ""


def _module_of(target: str) -> str | None:
    return target[: -len(".weight")] if target.endswith(".weight") else None


def _scope_module(node) -> str | None:
    for p in node.metadata_props:
        if p.key == SCOPES_KEY:
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            if isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str):
                return scopes[-2]   # the innermost module; the last entry names the op
    return None


def _legacy_module(node) -> str | None:
    parts = node.name.strip("/").split("/") if node.name.startswith("/") else []
    return ".".join(parts[:-1]) if len(parts) >= 2 else None


def _layout_for_shape(shape, canon, preferred: str) -> str | None:
    """The stored orientation a [d_out, d_in] target can have given an initializer's shape."""
    fits = [lay for lay in ("out_in", "in_out") if tuple(shape) == stored_shape(canon, lay)]
    if not fits:
        return None
    return preferred if preferred in fits else fits[0]


class _Resolver:
    def __init__(self, model: OnnxModel):
        self.m = model
        nbits_nodes = {id(nb.node) for nb in model.nbits.values()}
        self.quant_nodes = [n for n in model.nodes if n.op_type in QUANT_OPS and id(n) not in nbits_nodes]
        self.scoped = []    # (module path, node)
        self.legacy = []
        for n in model.nodes:
            if n.op_type in WEIGHT_OPS or n.op_type in QUANT_OPS:
                s = _scope_module(n)
                if s:
                    self.scoped.append((s, n))
                lg = _legacy_module(n)
                if lg:
                    self.legacy.append((lg, n))

    def _error(self, msg, target, rule="4.1"):
        return NeuroAdaError(msg, path=self.m.path, tensor=target, rule=rule)

    def _quantized(self, target, node):
        return self._error(f"the target's weight feeds quantized operator {node.op_type} ({node.name or 'unnamed'}); "
                           f"NeuroAda merges need F32, F16 or BF16 weights: merge into the float model, then "
                           f"quantize", target, rule="4.2")

    def _graph_layout(self, name: str) -> str | None:
        """The orientation the graph uses an initializer in (MatMul/Gemm first, then Gather)."""
        if name in self.m.nbits:
            return "out_in"
        seen = {}
        for n, _ in self._consumers_through_transpose(name):
            used, layout = self.m.usage(n)
            if used == name and layout:     # the initializer is this node's weight, not its activation
                seen.setdefault(n.op_type == "Gather", set()).add(layout)
        for key in (False, True):
            if len(seen.get(key, ())) == 1:
                return next(iter(seen[key]))
        return None

    def _consumers_through_transpose(self, name: str):
        """The nodes reading an initializer, directly or through a Transpose, subgraphs' included: a merged decoder's
        weights are read only inside its If branches, and a square one's orientation is then known from them alone."""
        readers = self.m.consumers.get(name, []) + self.m.inner_consumers.get(name, [])
        for n, i in readers:
            if n.op_type == "Transpose":
                for out in n.output:
                    yield from self.m.consumers.get(out, []) + self.m.inner_consumers.get(out, [])
            else:
                yield n, i

    def _check_float(self, name: str, target: str):
        """Refuse integer/FP8 weights and float weights that feed a quantizer, naming the reason; a MatMulNBits
        weight is refused where it is not one this merge writes (onnx_nbits)."""
        nb = self.m.quantized(name)
        if nb is not None:
            onnx_nbits.refuse(self.m, nb, target)
            return
        t = self.m.initializers[name]
        if t.data_type in FLOAT_TYPES:
            for n, _ in self._consumers_through_transpose(name):
                if n.op_type in QUANT_OPS:
                    raise self._quantized(target, n)
            return
        if t.data_type in QUANTIZED_TYPES:
            raise self._error(f"initializer {name!r} is {_type_name(t.data_type)} (a quantized model); NeuroAda "
                              f"merges need F32, F16 or BF16 weights: merge into the float model, then quantize",
                              target, rule="4.2")
        raise self._error(f"initializer {name!r} is {_type_name(t.data_type)}, not F32, F16 or BF16",
                          target, rule="4.2")

    def _from_nodes(self, pairs, module, target, canon, how):
        found = {}
        for path, node in pairs:
            if not _suffix_match(path, module):
                continue
            name, layout = self.m.usage(node)
            if isinstance(name, tuple):
                raise self._quantized(target, name[1])
            if name is None or layout is None or self.m.shape(name) != stored_shape(canon, layout):
                continue
            if node.op_type == "Gather" and self.m.dtype(name) is None:
                continue                    # an integer lookup table, not a weight
            self._check_float(name, target)
            found.setdefault(name, (layout, how, _dropped(path, module)))
        return found

    def _same_weight(self, a: str, la: str, b: str, lb: str) -> bool:
        if self.m.dtype(a) != self.m.dtype(b):
            return False
        return np.array_equal(canonical_view(self.m.array(a), la), canonical_view(self.m.array(b), lb))

    def resolve(self, target: str, t, *, probe: bool = True) -> Resolution:
        """probe=False stops after the name, scope and node-name stages (NotFound when none says anything): for a
        caller holding no values to probe with yet (runtime/quant_grid.load_quantized_weights)."""
        canon = tuple(t.shape)
        evidence: dict[str, tuple[str, str]] = {}
        # (1) names
        names = [n for n in [*self.m.initializers, *self.m.nbits] if _suffix_match(n, target)]
        exact = [n for n in names if n == target]
        names = exact or names
        if len(names) > 1:
            raise self._error(f"ambiguous: initializers {', '.join(sorted(names))} all match the name", target)
        if names:
            name = names[0]
            self._check_float(name, target)
            layout = self._graph_layout(name) or _layout_for_shape(self.m.shape(name), canon, t.layout)
            if layout is None or self.m.shape(name) != stored_shape(canon, layout):
                # (NotFound where the name lacks the target's leading part: it may be another part's layer, as in
                # an encoder exported alone; one file's merge reports it all the same)
                raise (NotFound if _dropped(name, target) else NeuroAdaError)(
                    f"initializer {name!r} has shape {list(self.m.shape(name))}, the adapter expects [d_out, d_in] "
                    f"= {list(canon)} in either orientation", path=self.m.path, tensor=target, rule="4.2")
            evidence[name] = (layout, "name", _dropped(name, target))
        # (2) exporter scope metadata, (3) legacy node names
        module = _module_of(target)
        if module:
            for pairs, how in ((self.scoped, "scope"), (self.legacy, "node-name")):
                for name, v in self._from_nodes(pairs, module, target, canon, how).items():
                    evidence.setdefault(name, v)
        if evidence:
            items = list(evidence.items())
            first, (layout, how, dropped) = items[0]
            copies = []
            for name, (lay, h, _) in items[1:]:
                if not self._same_weight(first, layout, name, lay):
                    raise self._error(f"ambiguous: {how} points to {first!r}, {h} to {name!r}, and they differ",
                                      target)
                copies.append((name, lay, h))
            res = Resolution(first, layout, how, tuple(copies), dropped)
        elif probe:
            res = self._probe(target, t, canon)
        else:
            raise NotFound("no initializer found by name, exporter scope or node name", path=self.m.path,
                           tensor=target, rule="4.1")
        self._refuse_tied(res, target)
        return res

    def _probe(self, target, t, canon) -> Resolution:
        """Last resort: the initializers whose values at the adapter's positions hash to its probe."""
        idx = np.asarray(t.indices)
        hits = []
        for name, init in self.m.initializers.items():
            if init.data_type not in FLOAT_TYPES or len(init.dims) != 2 or self.m.dtype(name) != t.dtype:
                continue
            for layout in ("out_in", "in_out"):
                if self.m.shape(name) == stored_shape(canon, layout):
                    if probe_hash(self.m.array(name), idx, layout) == t.probe:
                        hits.append((name, layout))
        for name, nb in self.m.nbits.items():  # decoded only where the probe reads (blocks holding its columns)
            if not self.m.quantized(name) or nb.problem or (nb.N, nb.K) != canon:
                continue
            values = self.m.nbits_weight(name).values_at(np.arange(canon[0])[:, None], idx)
            if probe_hash_from_values(values) == t.probe:
                hits.append((name, "out_in"))
        if len(hits) > 1:
            listed = ", ".join(f"{n} ({lay})" for n, lay in hits)
            raise self._error(f"ambiguous: {len(hits)} initializers match the adapter's probe hash: {listed}",
                              target)
        if not hits:
            hint = ""
            if self.quant_nodes:
                ops = sorted({n.op_type for n in self.quant_nodes})
                hint = (f"; the model contains quantized operators ({', '.join(ops)}): NeuroAda merges need the "
                        f"float model")
            if self.m.nbits and not hint:
                hint = (f"; the model's {len(self.m.nbits)} MatMulNBits weights are matched by name, exporter scope or "
                        f"node name, else by the probe hash over their decoded values, which an adapter made on the "
                        f"full-precision checkpoint does not match: make it on the de-quantized weights, or merge "
                        f"into the float model and quantize")
            raise NotFound(f"no initializer found by name, exporter scope, node name or probe hash (shape "
                           f"{list(canon)}, {t.dtype}){hint}", path=self.m.path, tensor=target, rule="4.1")
        return Resolution(hits[0][0], hits[0][1], "probe")

    def _refuse_tied(self, res: Resolution, target: str) -> None:
        """A linear's weight that a Gather also reads is an embedding table tied to it (see the module docstring)."""
        for name, _ in res.initializers():
            readers = self.m.consumers.get(name, []) + self.m.inner_consumers.get(name, [])
            if any(n.op_type == "Gather" for n, _ in readers):
                raise self._error(f"initializer {name!r} is also an embedding table (a Gather reads it: tied "
                                  f"weights); merging would change the embeddings too, which the adapter was not "
                                  f"trained with. Serve this adapter unmerged (the runtime adds it to the head)",
                                  target)


def resolve_targets(model_path, adapter: Adapter, *, _model: OnnxModel | None = None) -> dict[str, Resolution]:
    """Map every target of `adapter` to the initializer(s) holding it; raises on a missing or ambiguous one. A model
    this call opens (no `_model`) it also closes: the probe stage maps external data."""
    model = _model or OnnxModel(model_path)
    try:
        found, refused = _resolve_each(model, adapter, first_only=True)
    finally:
        if _model is None:
            model.close()
    if refused:
        raise refused[min(refused)]  # the first target in code point order, as the merge has always refused
    return found


def _resolve_each(model: OnnxModel, adapter: Adapter, *, first_only: bool = False
                  ) -> tuple[dict[str, Resolution], dict[str, NeuroAdaError]]:
    """Every target resolved, in code point order, and the refusal of each that is not: the one resolution a merge
    (which stops at the first refusal) and a validation (which reports them all) share. A target that lands on an
    initializer an earlier target holds is refused (rule 4.1) and owns nothing. first_only stops at the first refusal
    (a merge reads no further values)."""
    resolver = _Resolver(model)
    out: dict[str, Resolution] = {}
    refused: dict[str, NeuroAdaError] = {}
    owner: dict[str, str] = {}
    for target in sorted(adapter.targets):
        if refused and first_only:
            break
        try:
            res = resolver.resolve(target, adapter.targets[target])
        except NeuroAdaError as exc:
            refused[target] = exc
            continue
        shared = next((name for name, _ in res.initializers() if name in owner), None)
        if shared is not None:
            if res.dropped or out[owner[shared]].dropped:
                refused[target] = NeuroAdaError(
                    f"targets {owner[shared]!r} and {target!r} both resolve to initializer {shared!r}, found by names "
                    f"that lack their leading parts: this file holds one part of the model (an encoder- or "
                    f"decoder-only export?), whose layers are named as the other part's; merge an adapter of that "
                    f"part's targets only", path=model.path, tensor=target, rule="4.1")
            else:
                refused[target] = NeuroAdaError(
                    f"targets {owner[shared]!r} and {target!r} both resolve to initializer {shared!r} (tied weights); "
                    f"keep one of them in the adapter", path=model.path, tensor=target, rule="4.1")
            continue
        for name, _ in res.initializers():
            owner[name] = target
        out[target] = res
    return out, refused


def resolve_by_name(model: OnnxModel, targets) -> tuple[dict[str, Resolution], dict[str, NeuroAdaError]]:
    """Targets (name, shape, layout: an Adapter's, or the runtime's stand-ins) resolved by the name, exporter scope and
    node-name stages alone, for a caller with no values to probe yet (the runtime copying MatMulNBits weights into its
    layers). Returns ({target: Resolution}, {target: the refusal}); a target nothing names is in neither."""
    resolver = _Resolver(model)
    found, refused = {}, {}
    for t in targets:
        try:
            found[t.name] = resolver.resolve(t.name, t, probe=False)
        except NotFound:
            continue
        except NeuroAdaError as exc:
            refused[t.name] = exc
    return found, refused


class OnnxBase(ArrayBase):
    """An ONNX model seen as a base (the neuroada_format.base interface) for one adapter, keyed by its target names:
    what `neuroada validate --base model.onnx` checks against (`open_onnx_base`).

    Targets are found as a merge finds them (`_resolve_each`), and `refusal` says, per target, what the merge's
    resolve step would refuse (a target nothing holds, a tied or quantized weight: the resolver's rule and words; an
    initializer of another dtype or shape: `stored_mismatch`'s rule 4.2, since an ONNX merge refuses a dtype the
    adapter was not made on where a safetensors merge only warns). Arrays are presented in the adapter's layout
    (a transpose view where ONNX stores the other orientation); a MatMulNBits weight is its binary32 decoding
    (spec 15.4), and `probed` decodes only the blocks the probe reads. It subclasses ArrayBase only because
    open_base() passes through nothing else; an ONNX graph has no safetensors structure hash, so `structure_hash`
    is absent (validate then skips rule 4.5, as the merge does).
    """

    def __init__(self, model: OnnxModel, adapter: Adapter, resolutions: dict[str, Resolution],
                 refused: dict[str, NeuroAdaError] | None = None):
        super().__init__({}, model.path)
        self.model = model
        self.path = model.path
        self.resolutions = resolutions
        self.refused = refused or {}
        self.unresolved = {t: exc.detail for t, exc in self.refused.items()}
        self._targets = dict(adapter.targets)

    def __contains__(self, name: str) -> bool:
        return name in self.resolutions

    def keys(self):
        return self.resolutions.keys()

    def close(self) -> None:
        self.model.close()

    def refusal(self, name: str) -> NeuroAdaError | None:
        """What the merge's resolve step refuses for target `name` (a rule 4.x error), or None."""
        if name in self.refused:
            return self.refused[name]
        r, t = self.resolutions.get(name), self._targets.get(name)
        if r is None or t is None:
            return None
        for init, layout in r.initializers():
            problem = stored_mismatch(self.model, init, layout, t)
            if problem:
                return NeuroAdaError(problem, path=self.path, tensor=name, rule="4.2")
        return None

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        r = self.resolutions[name]
        dtype = self.model.dtype(r.initializer) or _type_name(self.model.initializers[r.initializer].data_type)
        shape = self.model.shape(r.initializer)
        return dtype, (shape if r.layout == self._targets[name].layout else shape[::-1])

    def array(self, name: str) -> np.ndarray:
        r = self.resolutions[name]
        arr = self.model.array(r.initializer)
        return arr if r.layout == self._targets[name].layout else arr.T

    def probed(self, name: str, indices: np.ndarray) -> np.ndarray:
        """The values at canonical (row, column) positions, [d_out, k]: a MatMulNBits weight decodes only the blocks
        holding them, a float initializer is read in its stored orientation (no transposed copy)."""
        r = self.resolutions[name]
        idx = np.asarray(indices, dtype=np.int64)
        rows = np.broadcast_to(np.arange(idx.shape[0], dtype=np.int64)[:, None], idx.shape)
        if self.model.quantized(r.initializer):
            return self.model.nbits_weight(r.initializer).values_at(rows, idx)
        stored = self.model.array(r.initializer)
        return (stored[rows, idx] if r.layout == "out_in" else stored[idx, rows]).astype(np.float32)

    @property
    def structure_hash(self):
        raise AttributeError("an ONNX model has no safetensors structure hash")


def open_onnx_base(path, adapter: Adapter, *, strict: bool = False) -> OnnxBase:
    """A base view of an ONNX model for `adapter`. A target the merge would refuse is left out, its refusal kept
    (`refusal`; validate reports it under the refusal's rule), unless strict, which raises the first."""
    model = OnnxModel(path)
    try:
        resolutions, refused = _resolve_each(model, adapter, first_only=strict)
        if strict and refused:
            raise refused[min(refused)]
    except BaseException:  # no view is returned to close it: the maps the probe stage opened go now
        model.close()
        raise
    return OnnxBase(model, adapter, resolutions, refused)


def stored_mismatch(model: OnnxModel, name: str, layout: str, t: Target) -> str | None:
    """Rule 4.2 for one initializer holding target `t` in `layout`: what differs (dtype or stored shape), or None."""
    want = stored_shape(t.shape, layout)
    if model.quantized(name):  # binary32 decoded values: the probe decides (14)
        if model.shape(name) != want:
            return (f"MatMulNBits weight {name!r} is [N, K] = {list(model.shape(name))}, the adapter expects "
                    f"{list(want)}")
        return None
    if model.dtype(name) != t.dtype or model.shape(name) != want:
        return (f"initializer {name!r} is {model.dtype(name)}{list(model.shape(name))} ({layout}), the adapter "
                f"expects {t.dtype}{list(want)}")
    return None
