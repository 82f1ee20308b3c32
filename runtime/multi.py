"""Serve many adapters on one base model.

* merged: ``set_adapter(model, "math")`` puts the base values back at the previous adapter's entries
  and writes ``round(w0 + val)`` at the new one's: O(touched entries), no dense work, no new tensors,
  so compiled graphs and CUDA graphs stay valid; ``set_adapter(model, None)`` (or ``"__base__"``)
  serves the plain base, bit for bit.
* mixed: ``with adapter_batch(model, ["math", "__base__", "cs"]): model.generate(...)`` gives every
  sequence its own adapter. Weights cannot hold several adapters at once, so inside the block the base
  weights are restored and each layer adds ``S_a(x)`` per sequence (``kernels.bgmv``); on exit the
  merged adapter comes back. For k=1 adapters in f32 on CPU the layer writes ``S_a(x)`` first and the
  GEMM accumulates onto it (``bgmv_linear_cpu``), which saves a pass over the output. Under torch.compile a
  layer runs the same ops on every sequence and selects by masks built at block entry (``bgmv_add_static`` /
  ``bgmv_linear_static``): no host reads, no shapes that depend on who uses which adapter, so the compiled
  graph serves every later block of the same shapes, with the eager gather and fused paths' bits (the kernel
  backend setting and the Triton kernel are for eager forwards).
* ``add_weighted_adapter(model, ["a", "b"], [0.7, 0.3], "combo")``: ``neuroada-pack --combine``'s rule
  in memory.

Layers being served are switched to ``ServingLayer`` (a NeuroAdaLayer subclass, same state) whose
forward reads no adapter names: NeuroAdaLayer.forward branches on ``active_adapters`` and
``merged_adapters``, which torch.compile guards on, so switching adapters would recompile.
"""

from __future__ import annotations

import contextlib
import math
import operator
import threading
from types import SimpleNamespace
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.dtypes import NUMPY_DTYPES, common_value_dtype, nonfinite_mask
from neuroada_format.errors import warn_caller

from . import kernels
from .config import NeuroAdaConfig
from .kernels.bgmv import (AdapterStack, InputsT, SeqMask, bgmv_add_, bgmv_add_static, bgmv_linear_cpu,
                           bgmv_linear_static, seq_groups)
from .kernels.cache import outside_inference, version
from .kernels.reference import rounded_values
from .layer import BASE_ADAPTER, SERVING_CACHES, NeuroAdaLayer, _conv1d_type, check_adapter_name, has_hooks
from .guards import (CONFIGS_ATTR, DISABLED_ATTR, MIXED_ATTR, MIXED_OWNER_ATTR, VALUE_TORCH, _refuse_in_batch,
                     _shared_weights, _unserve, layers, model_lock, name_list, serialized, takes_model, uninterrupted,
                     unwrapped)
from .merging import merged_back, refuse_unmergeable
from .model import park

__all__ = ["BASE_ADAPTER", "ServingLayer", "list_adapters", "delete_adapter", "set_adapter", "merged_adapter",
           "stop_serving", "adapter_batch", "disable_adapter", "add_weighted_adapter"]

_STACK_ATTR, _SAME_ATTR, _MERGED_ATTR = SERVING_CACHES  # in the layer's __dict__; copies and pickles drop them
FUSED = True  # False: mixed batches always add the delta to the base layer's output (tests, measurements)


class ServingLayer(NeuroAdaLayer):
    """A NeuroAdaLayer whose weights ``set_adapter`` / ``adapter_batch`` manage: forward = base layer
    (holding the merged adapter, if any), plus the per-sequence deltas inside ``adapter_batch``."""

    _neuroada_mixed = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mixed = self._neuroada_mixed
        if mixed is None:
            self.warn_if_training_merged()  # set_adapter serves merged: its deltas get no gradient
            return self.base_layer(x, *args, **kwargs)
        return mixed(self, x, args, kwargs)


# -- bookkeeping ------------------------------------------------------------------------------------------
@takes_model
def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on the model, in the order they were attached or loaded."""
    names = dict.fromkeys(getattr(model, CONFIGS_ATTR, None) or {})  # ordered, O(1) membership: O(layers x n)
    for layer in layers(model).values():
        names.update(dict.fromkeys(layer.neuroada_val.keys()))
    return list(names)


def _check_known(model: nn.Module, names, *, allow_base: bool) -> list[str]:
    known = list_adapters(model)
    have = set(known)
    for n in names:
        if allow_base and n in (None, BASE_ADAPTER):
            continue
        if n not in have:
            raise NeuroAdaError(f"no adapter named {n!r} (have: {', '.join(known) or 'none'})")
    return known


class _Storage:
    """Which storage a tensor holds, and where in it. ``model.to(dtype)`` swaps a parameter's storage without
    moving its version (``param.data = ...``), and a caching allocator (CUDA's) can give the new storage the
    address just freed, so an address proves nothing. The storage object is held instead: while a cache keeps
    it alive, no other storage can be that object."""

    __slots__ = ("storage", "where")

    def __init__(self, t: torch.Tensor):
        self.storage = t.untyped_storage()
        self.where = (self.storage._cdata, t.storage_offset())

    def __eq__(self, other) -> bool:
        return type(other) is _Storage and self.where == other.where

    __hash__ = None


def _state(t: torch.Tensor) -> tuple:
    """What a cache built from ``t`` depends on: the object, its version, its storage (see _Storage) and dtype."""
    return t, version(t), _Storage(t), t.dtype, t.device


def _same_state(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) and all(
        u is v or (not isinstance(u, torch.Tensor) and type(u) is type(v) and u == v) for u, v in zip(x, y))
        for x, y in zip(a, b))


def _keep_recent(cache: dict, key, value, kept: int) -> None:
    """``cache[key] = value`` as the most recently used entry, keeping the last ``kept`` (dicts keep insertion order)."""
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > kept:
        del cache[next(iter(cache))]


def _forget_caches(layer: NeuroAdaLayer) -> None:
    layer.__dict__.pop(_STACK_ATTR, None)
    layer.__dict__.pop(_SAME_ATTR, None)
    layer.__dict__.pop(_MERGED_ATTR, None)


@serialized
@uninterrupted()
def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere; where it was merged the weights return to the base bit for bit.

    Deleting the active adapter leaves the base served and says so: PEFT makes the first remaining adapter active
    instead, so a PEFT habit relying on that would otherwise serve the base without a word."""
    _refuse_in_batch(model, "delete_adapter")
    if not isinstance(adapter_name, str):  # a list was a bare TypeError (unhashable)
        raise NeuroAdaUsageError(f"delete_adapter takes one adapter name, not {type(adapter_name).__name__} "
                                 f"{adapter_name!r:.80}")
    _check_known(model, [adapter_name], allow_base=False)
    was_active = any(adapter_name in layer.active_adapters or adapter_name in layer.merged_adapters
                     for layer in layers(model).values())
    done = []
    try:  # the weights first (writes that can fail, e.g. out of memory: put back), then the bookkeeping
        for layer in layers(model).values():
            if adapter_name in layer.merged_adapters:
                before = list(layer.merged_adapters)
                layer.unmerge()
                done.append((layer, before))
                rest = [n for n in before if n != adapter_name]
                if rest:
                    layer.merge(rest)
    except BaseException:
        merged_back(done)
        raise
    for layer in layers(model).values():
        if adapter_name in layer.neuroada_val:
            layer.delete_adapter(adapter_name)
        _forget_caches(layer)
    configs = getattr(model, CONFIGS_ATTR, None)
    if configs:
        configs.pop(adapter_name, None)
    rest = list_adapters(model) if was_active else None
    if rest and not any(layer.active_adapters or layer.merged_adapters for layer in layers(model).values()):
        warn_caller(f"adapter {adapter_name!r} was active and is deleted: the base model is served now (PEFT would "
                    f"make {rest[0]!r} active); set_adapter(model, {rest[0]!r}) to serve it")


def _serve(layer: NeuroAdaLayer) -> None:
    if type(layer) is NeuroAdaLayer:
        layer.__class__ = ServingLayer
    elif not isinstance(layer, ServingLayer):
        raise TypeError(f"cannot serve a {type(layer).__name__} (a NeuroAdaLayer subclass) with set_adapter/"
                        "adapter_batch")


@serialized
@uninterrupted()
def stop_serving(model: nn.Module) -> None:
    """Give the layers back their own forward (e.g. to train); merged weights stay merged."""
    _refuse_in_batch(model, "stop_serving")
    for layer in layers(model).values():
        _unserve(layer)


# -- merged serving ---------------------------------------------------------------------------------------
SWITCH_KEPT = 2  # adapters per layer whose flat positions set_adapter keeps (toggling two reuses them)
SAME_KEPT = 8    # switches (ordered pairs) per layer whose "same positions?" answer is kept


def _same_positions(layer: NeuroAdaLayer, a: str, b: str) -> bool:
    """Whether two adapters touch the same entries (e.g. both magnitude top-k with one k); cached for the last
    SAME_KEPT switches (a server switching among n adapters would otherwise keep n^2 answers per layer, each with
    the state of two index tensors: 1.5 GiB for 100 adapters on a 7B model)."""
    layer.ordinary([a, b])
    ia, ib = layer.neuroada_idx[a], layer.neuroada_idx[b]
    key = [_state(ia), _state(ib)]
    cache = layer.__dict__.setdefault(_SAME_ATTR, {})
    hit = cache.get((a, b))
    if hit is None or not _same_state(hit[0], key):
        hit = (key, ia is ib or (ia.shape == ib.shape and bool(torch.equal(ia, ib))))
    _keep_recent(cache, (a, b), hit, SAME_KEPT)
    return hit[1]


def _positions(layer: NeuroAdaLayer, name: str) -> torch.Tensor:
    """The adapter's flat positions in the stored weight (the Overlay's flat order), kept for the last SWITCH_KEPT
    adapters served, not for all: 8 bytes per entry, twice what the adapter takes on disk."""
    layer.ordinary([name])
    key = [_state(layer.neuroada_idx[name])]
    cache = layer.__dict__.setdefault(_MERGED_ATTR, {})
    hit = cache.get(name)
    if hit is None or not _same_state(hit[0], key):
        layer.check_in_memory([name])
        with outside_inference():
            hit = (key, layer.pattern(name).positions())
    _keep_recent(cache, name, hit, SWITCH_KEPT)
    return hit[1]


def _merged_entries(layer: NeuroAdaLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat positions, merged values)`` of the adapter, so a switch is one write per weight (each extra
    mid-sized op cost a thread wake-up on a busy machine).

    The merged values are computed at every switch from val and w0 as they are now, never kept: an optimizer, an
    EMA or merging code that writes them through ``.data`` moves no version counter (``.data`` is a new tensor
    with its own), so values kept under a version key were served stale. The sum costs a fraction of the write it
    feeds (one Llama-7B decoder layer in BF16, k=20, same positions, 1 thread: 15.4 -> 16.9 ms a switch). What a
    layer serves is ``layer.delta``, snapped to the adapter's grid if there is one."""
    flat = _positions(layer, name)
    layer.check_in_memory([name])
    with outside_inference():
        values = rounded_values(layer.neuroada_w0[name].reshape(-1), layer.delta(name).detach().reshape(-1),
                                layer.weight.dtype)
    return flat, values


def _switch(layer: NeuroAdaLayer, want: list[str]) -> None:
    """Serve ``want`` (at most one adapter) merged, with ``layer.merge``'s rule and bits; a state of
    several merged adapters (merged by hand) is left through ``layer.unmerge``."""
    with layer.writing():
        _switch_locked(layer, want)


def _switch_locked(layer: NeuroAdaLayer, want: list[str]) -> None:
    current = layer.merged_adapters
    if current == want:
        if not current:  # nothing merged: an edit since is what the next forward, block or switch starts from
            layer.reread_w0()
        return
    try:
        _switch_writes(layer, current, want)
    except BaseException:  # failed after some of its writes: the base back wherever either side writes, and said so
        for n in dict.fromkeys(current + want):
            kernels.put_(layer.base_layer.weight, _positions(layer, n), layer.neuroada_w0[n])
        layer.merged_adapters = []
        layer._matched()
        raise


def _switch_writes(layer: NeuroAdaLayer, current: list[str], want: list[str]) -> None:
    moved = layer.weight_moved()  # an edit of the weight since w0 was read (while merged: lost at those entries)
    W = layer.base_layer.weight
    if len(current) == 1:
        if moved or not (len(want) == 1 and _same_positions(layer, current[0], want[0])):
            # put the originals back; skipped when the new adapter overwrites the same entries
            kernels.put_(W, _positions(layer, current[0]), layer.neuroada_w0[current[0]])
            layer.merged_adapters = []
    elif current:
        layer.unmerge()
    if moved and not layer.merged_adapters:
        layer.reread_w0(force=True)  # (the restore above may have moved the version itself)
    if want:
        kernels.put_(W, *_merged_entries(layer, want[0]))
    layer.merged_adapters = list(want)
    layer._matched()


@serialized
@uninterrupted()
def set_adapter(model: nn.Module, adapter_name: str | None) -> None:
    """Make one adapter the active one (None or "__base__": the plain base).

    An adapter loaded for inference is served merged into the weights: O(entries of the old and new adapter) to
    switch, nothing per forward, the weight tensors stay the same objects. A trainable one (attached, or loaded
    with is_trainable=True: its deltas require grad) is made active unmerged, so that it trains, as PEFT's
    set_adapter before a training loop; its outputs are the merged ones bit for bit. Layers the adapter does not
    target serve their base weights.
    """
    _refuse_in_batch(model, "set_adapter")
    if adapter_name is not None and not isinstance(adapter_name, str):  # a list was a bare TypeError (unhashable)
        raise NeuroAdaUsageError(f"set_adapter takes one adapter name (or None), not {type(adapter_name).__name__} "
                                 f"{adapter_name!r:.80}: for several at once, merge(model, names) or "
                                 f"add_weighted_adapter, or adapter_batch for one per sequence")
    _check_known(model, [adapter_name], allow_base=True)
    target = None if adapter_name in (None, BASE_ADAPTER) else adapter_name
    all_layers = layers(model)
    trainable = target is not None and _trainable(model, target, all_layers)
    if trainable:
        with torch.no_grad(), _switched_back_on_failure(all_layers):
            for layer in all_layers.values():
                _unserve(layer)
                layer.unmerge()
                layer.active_adapters = [target] if target in layer.neuroada_val else []
        _train_only(model, all_layers, target)
        return
    for name, layer in all_layers.items():  # found by _serve at the n-th layer, after n-1 had switched
        if not isinstance(layer, ServingLayer) and type(layer) is not NeuroAdaLayer:
            raise NeuroAdaUsageError(f"{name}: set_adapter cannot serve a {type(layer).__name__} (a NeuroAdaLayer "
                                     "subclass) with an adapter loaded for inference; nothing was switched")
    if target is not None:
        shared = _shared_weights(model)
        for name, layer in all_layers.items():  # before any weight changes
            if target in layer.neuroada_val:
                refuse_unmergeable(name, layer, shared, [target])
    with torch.no_grad(), _switched_back_on_failure(all_layers):
        for layer in all_layers.values():
            _serve(layer)
            want = [target] if target is not None and target in layer.neuroada_val else []
            _switch(layer, want)
            layer.active_adapters = list(want)
    _train_only(model, all_layers, None)


@contextlib.contextmanager
def _switched_back_on_failure(all_layers: dict[str, NeuroAdaLayer]):
    """A switch, unmerge or unload that fails at the n-th layer (e.g. out of memory) puts the n-1 before it and the n-th
    back as they were: each step of ``_switch``, ``layer.merge`` and ``layer.unmerge`` leaves the weight as
    ``merged_adapters`` says, also when it fails after writing, so switching back is exact."""
    before = {id(layer): (type(layer), list(layer.merged_adapters), list(layer.active_adapters))
              for layer in all_layers.values()}
    try:
        yield
    except BaseException:
        with uninterrupted(), torch.no_grad():
            for layer in all_layers.values():
                cls, merged, active = before[id(layer)]
                if layer.merged_adapters != merged:
                    _remerge(layer, merged)
                layer.active_adapters = active
                layer.__class__ = cls
        raise


def _trainable(model: nn.Module, name: str, all_layers: dict[str, NeuroAdaLayer]) -> bool:
    """Whether ``name`` trains when active: made to train (attached, or loaded with is_trainable=True: its config) and
    not frozen by the user since. requires_grad alone cannot say: attaching another adapter, or set_adapter to
    another one, turns it off too; those mark the adapters they freeze (model.park), so set_adapter back turns it on."""
    config = (getattr(model, CONFIGS_ATTR, None) or {}).get(name)
    if config is not None and config.inference_mode:
        return False
    return any(name in layer.neuroada_val and (layer.neuroada_val[name].requires_grad or name in layer.parked)
               for layer in all_layers.values())


def _train_only(model: nn.Module, all_layers: dict[str, NeuroAdaLayer], name: str | None) -> None:
    """As PEFT's set_adapter: the active adapter's deltas require grad, every other adapter's do not (so an
    optimizer built now, or print_trainable_parameters, sees the adapter that trains). Only adapters made to train
    are visited (an inference adapter's deltas never require grad): a server with 512 loaded adapters would otherwise
    walk them all at every switch (~40-90 ms for 56 layers here)."""
    configs = getattr(model, CONFIGS_ATTR, None) or {}
    movable = [n for n, c in configs.items() if not c.inference_mode]
    for layer in all_layers.values():
        vals = layer.neuroada_val
        for n in movable:
            if n in vals and vals[n].requires_grad != (n == name):
                val = vals[n]
                if val.requires_grad:
                    park(layer, n)
                else:
                    layer.parked.discard(n)
                val.requires_grad_(n == name)


@takes_model
def merged_adapter(model: nn.Module) -> str | None:
    """The adapter set_adapter serves (None: the base); raises if layers disagree (merged by hand)."""
    merged = {tuple(layer.merged_adapters) for layer in layers(model).values() if layer.merged_adapters}
    if not merged:
        return None
    if len(merged) == 1 and len(next(iter(merged))) == 1:
        return next(iter(merged))[0]
    raise NeuroAdaError(f"layers hold different merged adapters: {sorted(merged)}")


# -- mixed batches ----------------------------------------------------------------------------------------
STACKS_KEPT = 4  # stacks cached per layer, one per member set (most recent kept)


def _key(layer: NeuroAdaLayer, n: str, tensors: tuple | None = None) -> tuple:
    """What the stack's copy of adapter ``n`` depends on (_state's fields of its idx, val and w0, and its grid), as
    ``(plain values, tensors, storages)``: the first compared with ``==`` and the tensors by identity, each in one
    C-level pass (_same_state's per-field Python cost ~10 us per adapter and layer at every block entry); the
    storages are held so their addresses cannot be reused while the key is kept (see _Storage). ``tensors``: the
    three as _tensors read them (a caller going through many adapters looks the layer's containers up once)."""
    ts = tensors or (layer.neuroada_idx[n], layer.neuroada_val[n], layer.neuroada_w0[n])
    storages = tuple(t.untyped_storage() for t in ts)
    plain = (n, layer.grid(n), *map(version, ts), *(st._cdata for st in storages), *(t.storage_offset() for t in ts),
             *(t.dtype for t in ts), *(t.device for t in ts))
    return plain, ts, storages


def _same_key(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and all(map(operator.is_, a[1], b[1]))


def _stack(layer: NeuroAdaLayer, order: Sequence[str], used: Sequence[str]):
    """The stack of the layer's adapters that a block using ``used`` needs, cached until an idx/val/w0 tensor, a
    grid or the delta values of a used adapter change (a snapped delta depends on w0).

    Its members are every loaded adapter (model order) whose k is at most the largest k of the used ones: a block
    using only k=1 adapters gets a K = 1 stack (the fused path, and the bits of the same rows served alone) even when
    a k=8 adapter is loaded, while the members do not depend on which adapters of that k a block uses, so a compiled
    forward sees one stack shape for every such block. Only the used adapters' state (key and values, see _holds) is
    checked at entry (an unused member's slot is never read; when a block uses it, its changed state rebuilds the
    stack), so entering a block costs what its adapters cost, however many are loaded."""
    ks = {n: t.shape[1] for n, t in layer.neuroada_idx._buffers.items()}  # one pass: this runs per layer and block
    held = [n for n in used if n in ks]
    if not held:
        return None, {}
    k = max(ks[n] for n in held)
    members = tuple(n for n in order if ks.get(n, k + 1) <= k)
    layer._refresh(held)  # once per block entry, before the key reads idx and w0
    idxs, vals, w0s = layer.neuroada_idx, layer.neuroada_val, layer.neuroada_w0  # (submodules: slow attributes)
    now = {n: _key(layer, n, (idxs[n], vals[n], w0s[n])) for n in held}
    cache = layer.__dict__.setdefault(_STACK_ATTR, {})
    hit = cache.get(members)
    if (hit is None or not all(_same_key(hit[0][n], now[n]) for n in held)
            or not _holds(layer, hit[1], hit[2], held)):
        layer._refresh(members)
        keys = {n: now.get(n) or _key(layer, n) for n in members}
        with outside_inference():
            stack = AdapterStack([layer.neuroada_idx[n] for n in members], [layer.delta(n) for n in members],
                                 layer.d_in)
        hit = (keys, stack, {n: i for i, n in enumerate(members)})
    _keep_recent(cache, members, hit, STACKS_KEPT)
    return hit[1], hit[2]


_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _holds(layer: NeuroAdaLayer, stack: AdapterStack, slots: dict[str, int], names: Sequence[str]) -> bool:
    """Whether the stack's copies of these adapters' values are their deltas as they are now, bit for bit. val and
    w0 (which a grid's snap reads) written through ``.data`` move no version counter, so the key alone kept serving
    the values of the first block; this reads the block's own adapters once per entry, not every adapter loaded.

    One comparison for all of them (one stacked read of the stack's rows and one of the deltas) where every one
    has the stack's k: a comparison per adapter cost ~12 us of dispatch per adapter and layer, most of a block's
    entry with dozens of adapters."""
    rows = [slots[n] for n in names]
    if any(stack.ks[s] != stack.k for s in rows):  # a shorter row is padded in the stack: compared one by one
        return all(_holds_one(stack.val[s, :, :stack.ks[s]], layer.delta(n).detach()) for s, n in zip(rows, names))
    first = rows[0]
    held = (stack.val[first:first + len(rows)] if rows == list(range(first, first + len(rows)))
            else stack.val[torch.tensor(rows, device=stack.val.device)])
    now = [layer.delta(n).detach() for n in names]
    return _holds_one(held, now[0].unsqueeze(0) if len(now) == 1 else torch.stack(now))


def _holds_one(held: torch.Tensor, now: torch.Tensor) -> bool:
    now = now.to(held.dtype)  # (stack's promotion of mixed value dtypes and the stack's acc dtype are exact widenings)
    bits = _INT_OF[held.element_size()]
    return held.shape == now.shape and torch.equal(held.view(bits), now.view(bits))


class _Sequences:
    """Each sequence's adapter slot for one slot layout, shared by every layer with that layout (the
    grouping by adapter is read on the host once per block, not once per layer and step)."""

    def __init__(self, slots: tuple[int, ...], device):
        with outside_inference():
            self.ids = torch.tensor(slots, dtype=torch.int64, device=device)
        self.slots, self.device, self.n = slots, device, len(slots)
        self.groups = seq_groups(self.ids)
        self.mask = SeqMask(self.ids)  # what a compiled forward reads instead (tensors, no Python data)
        self._expanded: dict[int, _Sequences] = {}

    def expanded(self, m: int) -> "_Sequences":
        """Each sequence's slot ``m`` times in a row: the rows of a batch that generate expanded for beam search or
        num_return_sequences (transformers repeats every input ``m`` times in place, ``repeat_interleave``, and its
        beams stay within their input's rows); made once per ``m``."""
        if m == 1:
            return self
        e = self._expanded.get(m)
        if e is None:
            e = self._expanded[m] = _Sequences(tuple(s for s in self.slots for _ in range(m)), self.device)
        return e


def _exact_linears() -> tuple:
    return (nn.Linear, _conv1d_type())


class _Tokens:
    """The token count per sequence of the model call in progress, read from its ``input_ids`` or
    ``inputs_embeds`` by a pre-hook and forgotten by a hook when the call returns: a layer given its input
    flattened to ``[sequences x tokens, d]`` (OPT's MLP) is served only when its row count is the sequences times
    that count, and read as sequence-major, as transformers flattens (a submodule called on its own, such as an
    encoder, gets no count). It also holds the call's ``InputsT``: sequences' transposed inputs, shared by sibling
    layers (q, k, v), let go of when the call returns (a generation's later steps take another path)."""

    def __init__(self):
        self.seq_len = self.rows = None
        self.inputs_t = InputsT()

    def capture(self, module, args, kwargs) -> None:
        t = kwargs.get("input_ids")
        if t is None:
            t = kwargs.get("inputs_embeds")
        if t is None and args and isinstance(args[0], torch.Tensor):
            t = args[0]
        known = isinstance(t, torch.Tensor) and t.dim() >= 2
        self.seq_len, self.rows = (int(t.shape[1]), int(t.shape[0])) if known else (None, None)

    def forget(self, *_) -> None:
        self.seq_len = self.rows = None
        self.inputs_t.clear()


class _NoGradThroughBatch(torch.autograd.Function):
    """Identity on a mixed batch's output that refuses a backward: the block serves snapshots of the values, so
    a trainable adapter inside it gets no gradient, and torch's own error ("element 0 of tensors does not require
    grad") did not say why."""

    @staticmethod
    def forward(ctx, y, *vals):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, *grads):
        raise NeuroAdaUsageError("adapter_batch is inference-only: its adapters' values get no gradient inside the "
                                 "block; train one adapter with set_adapter and a plain forward")


class _MixedForward:
    def __init__(self, stack, seqs: _Sequences, tokens: _Tokens, used: Sequence[str] = ()):
        self.stack, self.seqs, self.tokens, self.used = stack, seqs, tokens, tuple(used)
        # what _fused needs that cannot change during the block, looked up once (a decoding step calls every
        # layer with a handful of tokens, where each check costs about as much as the gather it guards)
        self.k1_f32 = stack.k == 1 and stack.acc == torch.float32
        self.exact = _exact_linears()
        stack.idx, stack.val  # noqa: B018 -- built here, eagerly: a compiled forward only reads them

    def rows(self, x: torch.Tensor) -> _Sequences:
        """Whose rows ``x`` holds: the block's sequences, each repeated ``m`` times in a row when generate expanded
        the batch (beam search, num_return_sequences: see _Sequences.expanded), along the first dimension or, for
        a 2-D input, as their tokens in order (sequence-major, known from the model call in progress)."""
        n, lead, rows, seq_len = self.seqs.n, x.shape[0] if x.dim() >= 2 else 0, self.tokens.rows, self.tokens.seq_len
        if x.dim() == 2 and seq_len is not None and rows and rows % n == 0 and lead == rows * seq_len:
            return self.seqs.expanded(rows // n)  # tokens, flattened
        if lead == n or (lead % n == 0 and rows in ((None, lead) if x.dim() > 2 else (lead,))):
            return self.seqs.expanded(lead // n)  # (2-D rows a multiple of n with no call in progress: tokens? refused)
        raise NeuroAdaError(
            f"adapter_batch was given {n} adapter names but a layer got input of shape {tuple(x.shape)}: its first "
            f"dimension must be the sequences (beam search and num_return_sequences repeat each one in place), "
            f"or (2-D) their tokens in order")

    def __call__(self, layer: NeuroAdaLayer, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        seqs = self.rows(x)
        x2 = x.reshape(-1, x.shape[-1])
        seq_len = x2.shape[0] // seqs.n
        base = layer.base_layer
        fused = not args and not kwargs and self._fused(base, x)
        if torch.compiler.is_compiling():
            # the same ops on every sequence, selected by tensors built at block entry: no host reads, no shapes
            # that depend on the assignment, so another block of the same shapes reuses the compiled graph
            mask = seqs.mask
            if fused:
                y2 = bgmv_linear_static(x2, base.weight, base.bias, mask, self.stack, seq_len=seq_len,
                                        transposed=layer.transposed)
                return y2.view(x.shape[:-1] + (layer.d_out,))
            y = base(x, *args, **kwargs)
            return bgmv_add_static(y, x2, mask, self.stack, seq_len=seq_len)
        if fused:
            y = bgmv_linear_cpu(x2, base.weight, base.bias, seqs.ids, self.stack, seq_len=seq_len,
                                transposed=layer.transposed).view(x.shape[:-1] + (layer.d_out,))
        else:
            y = base(x, *args, **kwargs)
            y2 = y.reshape(-1, y.shape[-1])
            bgmv_add_(y2, x2, seqs.ids, self.stack, seq_len=seq_len, groups=seqs.groups,
                      inputs_t=self.tokens.inputs_t)
            y = y2.view(y.shape)
        if torch.is_grad_enabled() and not y.requires_grad:  # (never under no_grad / inference_mode: no cost there)
            held = layer.neuroada_val  # (the block's own adapters, not every one the layer holds)
            vals = [held[n] for n in self.used if n in held and held[n].requires_grad]
            if vals:  # a loss that reaches a trainable adapter only through this block: its backward says why
                y = _NoGradThroughBatch.apply(y, *vals)
        return y

    def _fused(self, base: nn.Module, x: torch.Tensor) -> bool:
        """Whether ``kernels.bgmv.bgmv_linear_cpu`` computes this layer: K = 1, f32 throughout on CPU, a plain
        Linear/Conv1D without hooks (whose forward it reproduces), no autocast and no graph to record. (A compiled
        forward computes it with ``bgmv_linear_static``: its out= writes cannot be traced with symbolic shapes.)"""
        if not (self.k1_f32 and FUSED and x.dtype == torch.float32 and x.device.type == "cpu"):
            return False
        W, b = base.weight, base.bias
        return (W.dtype == torch.float32 and (b is None or b.dtype == torch.float32) and type(base) in self.exact
                and not has_hooks(base) and kernels.get_backend() in ("auto", "cpu")
                and not (torch.is_grad_enabled() and (x.requires_grad or W.requires_grad))
                and not torch.is_autocast_enabled("cpu"))


@takes_model
@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Run the block's forwards (and generate) with sequence b using ``adapter_names[b]``.

    ``None`` or ``"__base__"`` is the plain base. Inside, the weights are the base's and each layer
    adds the sparse delta of every sequence's adapter (y = base(x) + S_a(x), f32 sums, one rounding);
    the adapter merged before the block is merged again after it. Inference only: no gradient
    reaches adapter values (gradients with respect to inputs do include the deltas on the torch path).

    Blocks on one model run one at a time: a block another thread opens waits for the running one to end (its
    state is the model's: two threads used to enter at once, and a quarter of their rows came out with the other
    thread's adapters or none). A forward outside any block, meanwhile, sees the block's state: serve a model from
    several threads through blocks only, or one model per thread.
    """
    with open_batch(model, adapter_names) as inside:
        yield inside


@contextlib.contextmanager
def open_batch(model: nn.Module, adapter_names: Sequence[str | None], call: tuple | None = None,
               what: str = "adapter_batch") -> Iterator[nn.Module]:
    """adapter_batch's block. ``call``: ``(args, kwargs)`` of a model call already under way (PEFT's keyword, see
    keyword_batch): its hooks ran before the block opened, so the token count its pre-hook reads is read from them."""
    if unwrapped(model).__dict__.get(MIXED_OWNER_ATTR) == threading.get_ident():
        _refuse_in_batch(model, what)  # nested in this thread's own block: refused, never a deadlock
    with model_lock(unwrapped(model)):
        _refuse_in_batch(model, what, disabled_ok=True)  # it puts back on exit what it changed
        with _adapter_batch_locked(model, adapter_names, call) as inside:
            yield inside


@contextlib.contextmanager
def _adapter_batch_locked(model: nn.Module, adapter_names: Sequence[str | None],
                          call: tuple | None = None) -> Iterator[nn.Module]:
    names = name_list(adapter_names, "adapter_batch", base_ok=True)
    if not names:
        raise NeuroAdaError("adapter_batch needs one adapter name per sequence, got none")
    order = _check_known(model, names, allow_base=True)
    in_batch = set(names)
    used = [n for n in order if n in in_batch]  # model order, so a set of adapters always stacks the same way
    all_layers = layers(model)
    previous = {name: (type(layer), list(layer.merged_adapters)) for name, layer in all_layers.items()}
    for name, layer in all_layers.items():
        if not isinstance(layer, ServingLayer) and type(layer) is not NeuroAdaLayer:
            raise NeuroAdaUsageError(f"{name}: cannot serve a {type(layer).__name__} in adapter_batch")
    shared: dict = {}
    tokens = _Tokens()
    hooks = (model.register_forward_pre_hook(tokens.capture, with_kwargs=True),
             model.register_forward_hook(tokens.forget, always_call=True))
    if call is not None:
        tokens.capture(model, *call)
    state = unwrapped(model)  # (the model, also when given as its torch.compile wrapper)
    try:
        state.__dict__[MIXED_ATTR] = names
        state.__dict__[MIXED_OWNER_ATTR] = threading.get_ident()
        with torch.no_grad():
            for name, layer in all_layers.items():
                _switch(layer, [])
                _serve(layer)
                stack, slots = _stack(layer, order, used)
                seq_slots = tuple(slots.get(n, -1) for n in names)
                if stack is None or max(seq_slots) < 0:
                    continue  # no sequence uses an adapter here: the base layer alone
                key = (seq_slots, stack.device)
                if key not in shared:
                    shared[key] = _Sequences(seq_slots, stack.device)
                layer._neuroada_mixed = _MixedForward(stack, shared[key], tokens, used)
        yield model
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for name, layer in all_layers.items():
                layer.__dict__.pop("_neuroada_mixed", None)
                cls, merged = previous[name]
                layer.__class__ = cls
                _remerge(layer, merged)
        state.__dict__.pop(MIXED_ATTR, None)
        state.__dict__.pop(MIXED_OWNER_ATTR, None)


def _remerge(layer: NeuroAdaLayer, merged: list[str]) -> None:
    """Give a layer whose weight holds the base (or other merged adapters) ``merged`` back: set_adapter's write for
    at most one adapter, else layer.merge's (the same rule and bits either way)."""
    if len(merged) <= 1:
        _switch(layer, merged)
    elif layer.merged_adapters != merged:
        layer.unmerge()
        layer.merge(merged)


@takes_model
@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """PEFT's ``with model.disable_adapter():``: the block's forwards are the plain base's, bit for bit; on exit
    (also on an exception) every layer serves what it served before, merged or not.

    Merged adapters (set_adapter's or merge's) are unmerged for the block, as set_adapter(model, None) does, and
    merged again after it; unmerged ones (a model in training, its deltas nonzero) are switched off with the layers'
    disable_adapters flag. No gradient reaches the deltas inside (a DPO reference pass, for instance). What would
    change the adapters meanwhile (set_adapter, attach, load_adapter, merge, unmerge, delete_adapter, unload) is
    refused inside the block, whose exit would silently undo it; an adapter_batch block inside serves the names it is
    given and puts back what it changed.
    """
    with model_lock(unwrapped(model)):  # held for the block: another thread's switch or block waits for its end
        with _disabled(model) as inside:
            yield inside


@contextlib.contextmanager
def _disabled(model: nn.Module) -> Iterator[nn.Module]:
    _refuse_in_batch(model, "disable_adapter")
    all_layers = layers(model)
    previous = {name: (list(layer.merged_adapters), layer.disable_adapters) for name, layer in all_layers.items()}
    unwrapped(model).__dict__[DISABLED_ATTR] = True  # (on the model, also when given as a compiled wrapper)
    try:
        with torch.no_grad():
            for layer in all_layers.values():
                layer.__dict__[DISABLED_ATTR] = True  # (a copy made inside is refused: see NeuroAdaLayer.__getstate__)
                _switch(layer, [])
                layer.disable_adapters = True
        yield model
    finally:  # (nothing inside could unload a layer or delete an adapter: refused while DISABLED_ATTR is set)
        unwrapped(model).__dict__.pop(DISABLED_ATTR, None)
        with torch.no_grad():
            for name, layer in all_layers.items():
                layer.__dict__.pop(DISABLED_ATTR, None)
                merged, layer.disable_adapters = previous[name]
                _remerge(layer, merged)


# -- combining --------------------------------------------------------------------------------------------
@serialized
def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float],
                         adapter_name: str, combination_type: str = "cat", **peft_options) -> None:
    """A new adapter ``sum_a w_a * A_a`` by ``neuroada-pack --combine``'s rule, in memory.

    That exact weighted sum is what PEFT's ``combination_type="cat"`` gives LoRA; ``"linear"`` is taken as the same
    sum (PEFT's "linear" mixes LoRA factors, an approximation sparse deltas do not need). PEFT's other combinations
    (svd, ties, dare_*, magnitude_prune) and their options are refused by name: they were a bare TypeError.

    Per row the union of positions; values summed in f32 in the given order, each term
    ``f32(f32(w) * f32(v))``; rounded once to the inputs' common file value dtype (F32 if they
    differ); short rows padded with +0.0 at their lowest unused columns so k is fixed per target.
    The arithmetic is the format core's (neuroada_format.merge.union_target), shared with neuroada-pack
    --combine. Nothing changes on the model if anything is refused.
    """
    from neuroada_format.merge import union_target  # the format core's arithmetic, shared with neuroada-pack

    _refuse_in_batch(model, "add_weighted_adapter")
    if combination_type not in ("cat", "linear"):
        raise NeuroAdaUsageError(f"add_weighted_adapter: combination_type={combination_type!r} is a PEFT combination "
                                 f"NeuroAda does not implement; it sums the weighted sparse deltas exactly (PEFT's "
                                 f"'cat'): combination_type='cat' or 'linear'")
    if peft_options:
        raise NeuroAdaUsageError(f"add_weighted_adapter: {', '.join(sorted(peft_options))} (PEFT's options of its svd, "
                                 f"ties, dare and magnitude_prune combinations) are not supported: the weighted deltas "
                                 f"are summed exactly")
    adapters = name_list(adapters, "add_weighted_adapter")
    if isinstance(weights, str) or not hasattr(weights, "__iter__"):
        raise NeuroAdaUsageError(f"add_weighted_adapter takes a list of weights, not {type(weights).__name__}")
    weights = list(weights)
    numbers = []
    for w in weights:  # float("x") was a bare ValueError, float(None) a TypeError
        try:
            if isinstance(w, (str, bytes, bool, np.bool_)):
                raise TypeError
            numbers.append(float(w))  # int, float, Fraction, Decimal, numpy and torch scalars, one-element arrays
        except (TypeError, ValueError, RuntimeError):  # (RuntimeError: a torch tensor of several elements)
            raise NeuroAdaUsageError(f"add_weighted_adapter: weights are numbers, got {type(w).__name__} "
                                     f"{w!r:.80}") from None
    weights = numbers
    if not adapters or len(adapters) != len(weights):
        raise NeuroAdaError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
    check_adapter_name(adapter_name)
    known = _check_known(model, adapters, allow_base=False)
    if adapter_name in known:
        raise NeuroAdaError(f"adapter {adapter_name!r} exists; delete it or pick another name")
    for w in weights:
        if not math.isfinite(w):
            raise NeuroAdaError(f"weight {w} is not finite")
    configs = getattr(model, CONFIGS_ATTR, None) or {}
    value_dtype = common_value_dtype(getattr(configs.get(a), "save_dtype", "F32") for a in adapters)

    new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    all_layers = layers(model)
    for name, layer in all_layers.items():
        parts = [(SimpleNamespace(indices=layer.neuroada_idx[a].cpu().numpy(),
                                  values=layer.delta(a).detach().float().cpu().numpy()), w)
                 for a, w in zip(adapters, weights) if a in layer.neuroada_val]
        if not parts:
            continue
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, by name
            idx, vals = union_target(name + ".weight", parts, layer.d_out, layer.d_in)
            rounded = vals.astype(NUMPY_DTYPES[value_dtype])
        if nonfinite_mask(rounded).any():
            raise NeuroAdaError(f"a combined value overflows {value_dtype}", tensor=name + ".weight", rule="3.7")
        dev = layer.weight.device
        new[name] = (torch.from_numpy(np.ascontiguousarray(idx)).to(dev),
                     torch.from_numpy(rounded.astype(np.float32)).to(dev))
    lead = configs.get(adapters[0])
    config = NeuroAdaConfig(
        k=max(t[0].shape[1] for t in new.values()), target_modules=sorted(new),
        save_dtype=value_dtype, delta_dtype=getattr(lead, "delta_dtype", "float32"), inference_mode=True,
        base_model_name_or_path=getattr(lead, "base_model_name_or_path", None),
        revision=getattr(lead, "revision", None), selection="union")

    merged = {name: list(layer.merged_adapters) for name, layer in all_layers.items() if layer.merged_adapters}
    added: list[NeuroAdaLayer] = []
    ok = False
    try:
        with torch.no_grad():
            for name in merged:
                all_layers[name].unmerge()  # w0 must be read from the base values
            dtype = VALUE_TORCH[value_dtype]  # an inference adapter: held in its value dtype, as load_adapter does
            for name, (idx, val) in new.items():
                layer = all_layers[name]
                layer.add_adapter(adapter_name, idx, val=val.to(dtype), val_dtype=dtype, activate=False)
                layer.neuroada_val[adapter_name].requires_grad_(False)
                added.append(layer)
        configs[adapter_name] = config
        setattr(model, CONFIGS_ATTR, configs)
        ok = True
    finally:
        with torch.no_grad():
            if not ok:
                for layer in added:
                    layer.delete_adapter(adapter_name)
            for name, names in merged.items():
                all_layers[name].merge(names)
