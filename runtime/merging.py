"""Write adapters into the base weights and take them out again: merge, unmerge, merge_and_unload, unload.

Kept apart from attach and load because these only change weights and wrappers already there, all layers or none."""
from __future__ import annotations

import contextlib

from torch import nn

from neuroada_format import NeuroAdaError, NeuroAdaUsageError

from .guards import (CONFIGS_ATTR, HOOK_ATTR, _is_sharded, _refuse_in_batch, _set_module, _shared_weights, _unserve,
                     layers, name_list, serialized, uninterrupted)
from .hf_checkpoint import _uninstall_hf
from .layer import NeuroAdaLayer


def refuse_unmergeable(name: str, layer: NeuroAdaLayer, shared: set[int], names=()) -> None:
    """Merging (merge, set_adapter) writes into the weight itself: refused where that changes something else, or
    where the weight or the adapters' tensors are offloaded (found at the n-th layer, n-1 were merged already)."""
    layer.check_in_memory(names)
    if layer.weight.is_meta:
        raise NeuroAdaUsageError("the base weight is offloaded (on the meta device, e.g. by accelerate's device_map "
                                 "with 'cpu'/'disk' entries), and merging writes into it; nothing was merged: merge "
                                 "before offloading, or save the adapter and merge it with neuroada-merge",
                                 tensor=name + ".weight")
    if _is_sharded(layer.weight):
        raise NeuroAdaError("cannot merge into a sharded (FSDP2) weight; save the adapter and merge it "
                            "into the whole model or checkpoint", tensor=name + ".weight")
    if id(layer.weight) in shared:
        raise NeuroAdaError("the weight is shared with another module (tied weights): merging would change "
                            "that module too; serve this adapter unmerged (adapter_batch) or untie the weight "
                            "first", tensor=name + ".weight")
    if not layer.weight.is_contiguous():  # checked with the rest, before any layer is written: never half-merged
        raise NeuroAdaUsageError("the weight is not contiguous (a view with other strides, e.g. a transpose), and "
                                 "merging writes into its storage; serve this adapter unmerged, give the layer a "
                                 "contiguous weight, or save the adapter and merge it with neuroada-merge",
                                 tensor=name + ".weight")


@serialized
@uninterrupted()
def merge(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Write the (active, or named) deltas into the weights with the spec's rule: f32 sum, one rounding."""
    _refuse_in_batch(model, "merge")
    if adapter_names is not None:  # every name must exist somewhere, as for set_adapter (checked before any write)
        from .multi import _check_known  # (multi builds on this module)

        adapter_names = name_list(adapter_names, "merge")
        _check_known(model, adapter_names, allow_base=False)
    shared = _shared_weights(model)
    for name, layer in layers(model).items():
        asked = layer.active_adapters if adapter_names is None else adapter_names
        names = [n for n in asked if n in layer.neuroada_val]
        if names:
            refuse_unmergeable(name, layer, shared, names)
    done = []
    try:
        for layer in layers(model).values():
            # ([] merges nothing, as in PEFT; None: the active adapters)
            names = [n for n in (layer.active_adapters if adapter_names is None else adapter_names)
                     if n in layer.neuroada_val]
            if names:
                before = list(layer.merged_adapters)
                layer.merge(names)
                done.append((layer, before))
    except BaseException:  # (e.g. out of memory at the n-th layer) the n-1 merged before it are put back
        merged_back(done)
        raise
    return model


def merged_back(done: list) -> None:
    """Undo a loop's merges part-way: ``done`` lists ``(layer, what it had merged before)``, last undone first."""
    with uninterrupted():  # (a second Ctrl-C must not cut it short)
        for layer, before in reversed(done):
            layer.unmerge()
            if before:
                layer.merge(before)


@serialized
@uninterrupted()
def unmerge(model: nn.Module) -> nn.Module:
    """Restore every merged weight to its original bits; the adapters stay active, applied unmerged (as in
    PEFT), also where set_adapter had merged them."""
    _refuse_in_batch(model, "unmerge")
    with _as_before_on_failure(model):
        for layer in layers(model).values():
            _unserve(layer)
            layer.unmerge()
    return model


@contextlib.contextmanager
def _as_before_on_failure(model: nn.Module):
    """unmerge, unload and merge_and_unload all-or-nothing: a failure at the n-th layer (out of memory, a refusal
    found late) merges, serves and activates every layer again as before the call, its weight bit for bit, and the
    exception goes on (a part-way unmerge left some layers merged and some not). The layers are put back in the model
    by _unload itself."""
    from .multi import _switched_back_on_failure  # (multi builds on this module)

    with _switched_back_on_failure(layers(model)):
        yield


@serialized
@uninterrupted()
def merge_and_unload(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge, then replace each NeuroAdaLayer by its base layer: a plain model with the original keys."""
    _refuse_in_batch(model, "merge_and_unload")
    with _as_before_on_failure(model):
        merge(model, adapter_names)
        return _unload(model)


@serialized
@uninterrupted()
def unload(model: nn.Module) -> nn.Module:
    """PEFT's unload: every NeuroAdaLayer replaced by its base layer without merging (what was merged, by merge or
    set_adapter, is unmerged first), so the model is the plain base again, its weights bit for bit as before attach.
    The base parameters stay frozen, as PEFT leaves them."""
    _refuse_in_batch(model, "unload")
    with _as_before_on_failure(model):
        unmerge(model)
        return _unload(model)


def _unload(model: nn.Module) -> nn.Module:
    """Put every layer's base layer back and drop what attach installed on the model (configs, hooks); the layers go
    back in whole if one cannot be taken out (then nothing else was dropped yet)."""
    wrapped = layers(model)
    try:
        for name, layer in wrapped.items():
            _set_module(model, name, layer.base_layer)
    except BaseException:
        with uninterrupted():
            for name, layer in wrapped.items():
                if model.get_submodule(name) is not layer:
                    _set_module(model, name, layer)
        raise
    if hasattr(model, CONFIGS_ATTR):
        delattr(model, CONFIGS_ATTR)
    hook = getattr(model, HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        delattr(model, HOOK_ATTR)
    _uninstall_hf(model)
    return model
