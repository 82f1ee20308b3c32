"""Attach NeuroAda to any PyTorch / Hugging Face model: find the targets, select their positions and wrap them.

The model is modified in place (target layers are wrapped in NeuroAdaLayer, PEFT-style, keeping the
original as `base_layer`), all of them or none; load_adapter (loading.py) wraps through the same helpers.
Saving, loading and merging live beside it (saving.py, loading.py, merging.py), below it the guards every
entry point shares (guards.py), target finding (targets.py) and introspection (introspection.py).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterable

import torch
from torch import nn

from neuroada_format import NeuroAdaUsageError
from neuroada_format.errors import warn_caller

from .config import SELECTIONS, NeuroAdaConfig
from .guards import (AUTO_ATTR, CONFIGS_ATTR, FSDP1_REFUSED, HF_ATTR, HOOK_ATTR, _base_parameters, _canonical,
                     _check_base_weight, _fsdp1_managed, _fsdp_module_type, _layout, _linear_types, _refuse_base_dtype,
                     _refuse_compiled, _refuse_ddp, _refuse_in_batch, _refuse_sharded, _set_module, _shared_weights,
                     _unserve, layers, serialized, uninterrupted)
from .hf_checkpoint import _install_hf, _uninstall_hf
from .kernels.reference import gather_exact
from .layer import NeuroAdaLayer, check_adapter_name, has_hooks, mode_problem
from .selection import select, topk_columns
from .targets import _foreign_wrappers, _in_foreign_adapter, find_targets


def _mode_for(module: nn.Module, config: NeuroAdaConfig, shared: set[int], foreign: bool = False) -> str:
    """In place where the weight is a plain, contiguous, unshared tensor of an exact Linear/Conv1D.

    Anything else is additive: a weight shared with another module (tied embeddings) would see the
    deltas written into it, a Linear subclass may not run the GEMM we mirror, and a tensor subclass
    (quantised, DTensor) cannot be written entry by entry. A linear inside PEFT's wrapper is additive
    as well: PEFT merges LoRA into that very weight, which restoring w0 around a GEMM would undo. So is a
    module with hooks (see layer.has_hooks; one hooked later goes additive at each forward that finds hooks).
    Layers that FSDP2 manages go additive too,
    decided at their first forward (see _resolve_sharded_modes): inside FSDP2 the whole weight exists
    only transiently, in FSDP's own all-gather buffers.
    """
    if config.mode != "auto":
        return config.mode
    w = module.weight
    plain = type(w) in (torch.Tensor, nn.Parameter) and w.is_contiguous() and w.is_floating_point()
    exact = type(module) in _linear_types()
    ok = plain and exact and id(w) not in shared and not foreign and not has_hooks(module)
    return "inplace" if ok else "additive"


def _resolve_sharded_modes(model: nn.Module, args) -> None:
    """Forward pre-hook: "auto" layers inside an FSDP2 module switch to additive before they run.

    NeuroAda is attached before `fully_shard` (so that FSDP manages the deltas), hence "auto" cannot
    see the sharding when it first picks a mode; the first forward after sharding does.
    """
    fsdp = _fsdp_module_type()
    if fsdp is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return  # FSDP needs a process group: single-process runs never pay for the walk below
    stack = [(model, False)]
    while stack:
        module, managed = stack.pop()
        managed = managed or isinstance(module, fsdp)
        if isinstance(module, NeuroAdaLayer):
            if _fsdp1_managed(module.base_layer.weight):
                raise NeuroAdaUsageError(f"forward: {FSDP1_REFUSED}")
            if managed and getattr(module, AUTO_ATTR, False) and module.mode != "additive":
                module.set_mode("additive")
            continue
        stack.extend((child, managed) for child in module.children())


def _wrap(model: nn.Module, name: str, module: nn.Module, config: NeuroAdaConfig, shared: set[int],
          wrappers: dict[str, str]) -> NeuroAdaLayer:
    if isinstance(module, NeuroAdaLayer):
        return module
    foreign = name.rpartition(".")[0] in wrappers  # the original layer inside PEFT's wrapper
    layer = NeuroAdaLayer(module, mode=_mode_for(module, config, shared, foreign))
    setattr(layer, AUTO_ATTR, config.mode == "auto")
    if any(isinstance(model.get_submodule(p), nn.TransformerEncoderLayer) for p in _ancestors(name)):
        layer.register_forward_pre_hook(_no_fast_path)
    _set_module(model, name, layer)
    if getattr(model, HOOK_ATTR, None) is None:
        setattr(model, HOOK_ATTR, model.register_forward_pre_hook(_resolve_sharded_modes))
    return layer


def _warn_zero_weights(modules: dict[str, nn.Module], indices: dict[str, torch.Tensor]) -> None:
    """A target whose weight is all zeros (its top-1 |W| per row is 0): magnitude selection then picks columns 0..k-1
    of every row, which says nothing. The usual cause is a model whose weights are loaded after attach (built on the
    meta device, to_empty, then accelerate's load_checkpoint_in_model: the adapted layers' keys have moved, and the
    loader only logs them as unused). Read from the selected entries only."""
    zero = [name for name, m in modules.items() if not bool(gather_exact(_canonical(m).detach(), indices[name]).any())]
    if zero:
        warn_caller(f"{len(zero)} of {len(modules)} target weights are all zeros ({zero[0]}.weight"
                    f"{', ...' if len(zero) > 1 else ''}): magnitude selection picked columns 0..k-1 of every row. If "
                    "the base weights are loaded after attach, load them before it (attach selects from the weights "
                    "it finds, and a checkpoint's keys no longer reach the adapted layers)")


def _check_modes(modules: dict[str, nn.Module], config: NeuroAdaConfig, shared: set[int],
                 wrappers: dict[str, str]) -> None:
    """Refuse, before anything changes, a target that cannot run in the mode asked for (see layer.mode_problem)."""
    for name, module in modules.items():
        if isinstance(module, NeuroAdaLayer):
            continue  # already wrapped: it keeps its mode
        foreign = name.rpartition(".")[0] in wrappers
        problem = mode_problem(module, _mode_for(module, config, shared, foreign))
        if problem:
            raise NeuroAdaUsageError(problem, tensor=name + ".weight")


@contextlib.contextmanager
def _all_or_nothing(model: nn.Module, adapter_name: str, *, deltas: bool):
    """Put back what attach or load_adapter changed if they fail part-way (Ctrl-C, a refusal only a layer can make,
    out of memory): the wrapped layers, the new adapter, the frozen flags, the paused adapters, the served layers,
    the configs and hooks. A failure half-way left a model serving part of the adapter, with its base frozen and
    the adapter's name taken, so that the retry the error advised was refused too. ``deltas``: the call changes the
    other adapters' requires_grad too (attach); else only the base's are recorded, so that a load reads none of the
    adapters loaded before (see _base_parameters)."""
    flags = [(p, p.requires_grad) for p in (model.parameters() if deltas else (p for _, p in _base_parameters(model)))]
    before = {name: (layer, layer.__class__, list(layer.active_adapters), set(layer.parked),
                     adapter_name in layer.neuroada_val) for name, layer in layers(model).items()}
    had = {attr: model.__dict__.get(attr, _MISSING) for attr in (CONFIGS_ATTR, HOOK_ATTR, HF_ATTR)}
    hf_methods = {k: model.__dict__[k] for k in ("save_pretrained", "resize_token_embeddings") if k in model.__dict__}
    try:
        yield
    except BaseException:
        with uninterrupted():  # a second Ctrl-C must not cut the putting back short
            _put_back(model, adapter_name, before, flags, had, hf_methods)
        raise


def _put_back(model: nn.Module, adapter_name: str, before: dict, flags: list, had: dict, hf_methods: dict) -> None:
    for name, layer in layers(model).items():
        # only where this call added it: a model nested in another may hold an adapter of that name already
        added = name not in before or not before[name][4]
        if added and adapter_name in layer.neuroada_val and adapter_name not in layer.merged_adapters:
            layer.delete_adapter(adapter_name)
        if name not in before:
            _set_module(model, name, layer.base_layer)
    for layer, cls, active, parked, _ in before.values():
        layer.__class__, layer.active_adapters, layer.parked = cls, active, parked
    for p, requires_grad in flags:
        p.requires_grad_(requires_grad)
    hook = model.__dict__.get(HOOK_ATTR)
    if had[HOOK_ATTR] is _MISSING and hook is not None:
        hook.remove()
    if had[HF_ATTR] is _MISSING:
        _uninstall_hf(model)
    for attr, value in had.items():
        model.__dict__.pop(attr, None)
        if value is not _MISSING:
            model.__dict__[attr] = value
    model.__dict__.update(hf_methods)


_MISSING = object()


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts))]  # "" is the model itself


def _no_fast_path(module, args) -> None:
    """Registered on layers inside an nn.TransformerEncoderLayer: in eval mode its fast path reads linear1/linear2's
    weights itself (torch._transformer_encoder_layer_fwd) and never calls them, so every unmerged delta was left out
    (0.54 off a merged copy); torch takes the plain path when any submodule has a hook. Does nothing itself."""
    return None


# -- attach ------------------------------------------------------------------------------------------
def _release_free_heap() -> None:
    """Hand the heap that selection freed back to the OS (glibc keeps it resident otherwise: measured
    100-250 MB on a 109M model, which training then reuses unevenly and carries into its peak RSS).
    No-op off glibc; costs a few milliseconds."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@serialized
def attach(model: nn.Module, config: NeuroAdaConfig | None = None, adapter_name: str = "default", *,
           calibration: Iterable | None = None, loss_fn: Callable | None = None) -> nn.Module:
    """Add a NeuroAda adapter to `model` (in place; returned for chaining). Only the deltas train.

    For selection="gradient", `calibration` is an iterable of batches and `loss_fn(model, batch)`
    returns a scalar loss (default: `model(**batch).loss`); the score of an entry is |sum over the
    batches of dloss/dW|. At most one layer's dense gradient exists at any time: one batch costs one
    forward and backward, several batches one pass per batch and target layer.
    Call before wrapping the model in DDP or FSDP2 (`fully_shard`): a DDP-wrapped model is refused.
    Every input check happens before the model is touched: on a NeuroAdaError it is left as it was.
    """
    config = NeuroAdaConfig() if config is None else config
    if not isinstance(config, NeuroAdaConfig):  # a dict failed later with a bare AttributeError
        raise NeuroAdaUsageError(f"attach takes a NeuroAdaConfig, not {type(config).__name__}"
                                 + (": NeuroAdaConfig(**that_dict)" if isinstance(config, dict) else ""))
    check_adapter_name(adapter_name)
    _refuse_in_batch(model, "attach")
    _refuse_ddp(model, "attach")
    _refuse_compiled(model)
    configs = getattr(model, CONFIGS_ATTR, None) or {}
    if adapter_name in configs:
        raise NeuroAdaUsageError(f"adapter {adapter_name!r} is already attached")
    if config.selection not in SELECTIONS:
        raise NeuroAdaUsageError(f"attach selects with one of {', '.join(SELECTIONS)}; {config.selection!r} only "
                            f"describes an adapter built from others (load it with load_adapter)", rule="2.2")
    _refuse_sharded(model, "attach")
    names = find_targets(model, config)
    modules = {name: model.get_submodule(name) for name in names}
    _refuse_aliased(model, modules)
    for name, layer in layers(model).items():  # every layer: a merged one would keep serving its adapter
        if layer.merged:
            raise NeuroAdaUsageError(f"{name} has merged adapters; unmerge (or set_adapter(model, None)) before "
                                     "attaching another")
    for name, module in modules.items():
        _check_base_weight(module.weight, name + ".weight", "attach selects positions from it", module)
        # refused now, not at save_adapter after the training
        _refuse_base_dtype(module.weight, name + ".weight", "convert the model (e.g. model.float()) before attaching")
        d_in = _canonical(module).shape[1]
        if config.k > d_in:
            raise NeuroAdaUsageError(f"k={config.k} exceeds d_in={d_in}", tensor=name + ".weight", rule="3.4")
    shared, wrappers = _shared_weights(model), _foreign_wrappers(model)
    _check_modes(modules, config, shared, wrappers)
    if config.selection == "gradient":
        indices = _gradient_indices(model, modules, config.k, calibration, loss_fn)
    else:
        indices = {name: select(_canonical(m), config.k, config.selection, seed=config.seed, generator_offset=i)
                   for i, (name, m) in enumerate(modules.items())}
    if config.selection == "magnitude":
        _warn_zero_weights(modules, indices)
    with _all_or_nothing(model, adapter_name, deltas=True):
        for layer in layers(model).values():  # the adapters trained so far stop training; set_adapter may resume them
            for n, val in layer.neuroada_val.items():
                if val.requires_grad:
                    park(layer, n)
        _freeze(model, keep_deltas=False)
        delta_dtype = getattr(torch, config.delta_dtype)
        for name, module in modules.items():
            layer = _wrap(model, name, module, config, shared, wrappers)
            layer.add_adapter(adapter_name, indices[name], val_dtype=delta_dtype, activate=False)
            layer.neuroada_val[adapter_name].requires_grad_(not config.inference_mode)
        # As PEFT's set_adapter after add_adapter: the new adapter alone is active (and trains) on the plain base,
        # so it saves and reloads as what was trained; layers served by set_adapter get their own forward back.
        for layer in layers(model).values():
            _unserve(layer)
            layer.active_adapters = [adapter_name] if adapter_name in layer.neuroada_val else []
        configs = dict(configs)
        configs[adapter_name] = config
        setattr(model, CONFIGS_ATTR, configs)
        _install_hf(model)
    del indices
    _release_free_heap()
    _warn_frozen_head(model, config)
    return model


# The new task heads PEFT adds to modules_to_save by itself for these task types (its defaults, by module name).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _warn_frozen_head(model: nn.Module, config: NeuroAdaConfig) -> None:
    """A classification model's head is new (randomly initialised) and PEFT trains it without being asked; here the
    base is frozen, head included, and modules_to_save is not offered, so a classifier would silently train on a
    random frozen head. Said once, at attach, naming the head and the one line that trains it. Without a task_type
    every such head name counts: all-linear leaves the head out whatever the task_type (PEFT adapts it when none is
    given), so nothing would train it at all."""
    heads = TASK_HEADS.get(config.task_type) if config.task_type else {h for hs in TASK_HEADS.values() for h in hs}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in (heads or ()) and not isinstance(module, NeuroAdaLayer):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                why = (f"task_type={config.task_type}: " if config.task_type else
                       "a classification head, new in a fine-tune: ")
                warn_caller(f"{why}the head {name!r} is frozen with the base; PEFT trains it (modules_to_save). To "
                            f"train it here: model.get_submodule({name!r}).requires_grad_(True) (save_pretrained "
                            f"then keeps it in model.safetensors)")


def _refuse_aliased(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """One linear registered under two names (``self.b = self.a``) is one module that named_modules lists once: it
    would be wrapped under its first name only, and the forward through the other name would run without the delta
    (silently; PEFT does the same). Refused before anything changes, naming both."""
    names_of: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
    for name, module in modules.items():
        others = [n for n in names_of.get(id(module), ()) if n != name]
        if others:
            raise NeuroAdaUsageError(f"this linear layer is also registered as {others[0]!r} (one module under "
                                     f"{len(others) + 1} names): an adapter would reach it under one name only; give "
                                     f"each use its own module, or leave it out (exclude_modules)",
                                     tensor=name + ".weight")


def park(layer: NeuroAdaLayer, name: str) -> None:
    """Mark a trainable adapter whose requires_grad the runtime (not the user) turns off: attach of another adapter,
    set_adapter to another one. set_adapter back makes such an adapter train again; one the user froze serves. The
    mark is the layer's (`parked`), which copies, pickles and load_state_dict(assign=True) keep: it was an attribute
    of the delta Parameter, which deepcopy and assign=True drop, and a paused adapter then came back merged and
    silently stopped training."""
    layer.parked.add(name)


def _freeze(model: nn.Module, *, keep_deltas: bool) -> None:
    """Freeze the base model, as PEFT's get_peft_model does. Parameters of another library's adapter
    (PEFT's lora_A/lora_B, modules_to_save copies) keep their requires_grad: training both at once is
    what a user attaching NeuroAda to a LoRA model means. NeuroAda's own other adapters keep theirs
    when `keep_deltas` (load_adapter: their parameters are not even walked), else freeze (attach trains the
    new adapter only)."""
    wrappers = _foreign_wrappers(model)
    for name, p in _base_parameters(model) if keep_deltas else model.named_parameters():
        if not _in_foreign_adapter(name, wrappers):
            p.requires_grad_(False)


def _default_loss(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    if not hasattr(out, "loss"):
        return out
    if out.loss is None:  # a tokenizer's batch has no labels: the model computes no loss
        raise NeuroAdaUsageError("selection='gradient' scores positions by the gradient of the loss, and the model "
                                 "returned no loss for a calibration batch: give each batch 'labels' (for a causal "
                                 "LM, labels=input_ids) or pass loss_fn=")
    return out.loss


def _calibration_loss(loss_fn, model, batch) -> torch.Tensor:
    """loss_fn's value, checked: a non-scalar or non-tensor would fail deep in autograd with torch's words."""
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise NeuroAdaUsageError(f"selection='gradient' needs a scalar floating-point loss per calibration batch; "
                                 f"the loss function returned {what}")
    return loss.reshape(())


def _gradient_indices(model, modules: dict[str, nn.Module], k: int, calibration, loss_fn) -> dict[str, torch.Tensor]:
    """Top-k of |sum_b dloss_b/dW| per row for every target, holding one dense gradient at a time."""
    if calibration is None:
        raise NeuroAdaUsageError("selection='gradient' needs calibration batches")
    batches = list(calibration)
    if not batches:
        raise NeuroAdaUsageError("selection='gradient' got no calibration batches")
    loss_fn = loss_fn or _default_loss
    weights = {name: (m.base_layer if isinstance(m, NeuroAdaLayer) else m).weight for name, m in modules.items()}
    owners: dict[int, list[str]] = {}
    for name, w in weights.items():
        owners.setdefault(id(w), []).append(name)
    indices: dict[str, torch.Tensor] = {}

    def choose(names: list[str], grad: torch.Tensor | None) -> None:
        for name in names:
            w = weights[name]
            g = torch.zeros_like(w, dtype=torch.float32) if grad is None else grad
            g = g.t() if _layout(modules[name]) == "in_out" else g
            indices[name] = topk_columns(g.abs(), k)

    # a weight that requires grad cannot be written in place: score wrapped in-place layers additively
    switched = [m for m in modules.values() if isinstance(m, NeuroAdaLayer) and m.mode == "inplace"]
    was_training, flags = model.training, {id(p): p.requires_grad for p in model.parameters()}
    # the new adapter trains alone on the plain base (see attach), so the base alone is scored: adapters
    # already attached are switched off for the calibration passes
    active = {layer: layer.active_adapters for layer in layers(model).values()}
    model.eval()
    try:
        for layer in active:
            layer.active_adapters = []
        for m in switched:
            m.set_mode("additive")
        for p in model.parameters():
            p.requires_grad_(False)
        if len(batches) == 1:
            # one backward; AccumulateGrad runs as soon as a weight's gradient exists (autograd gives it
            # top priority), and the hook turns it into indices and drops it before the next one is made
            handles = []
            for names in owners.values():
                w = weights[names[0]]

                def hook(p, names=names):
                    choose(names, p.grad)
                    p.grad = None

                w.requires_grad_(True)
                handles.append(w.register_post_accumulate_grad_hook(hook))
            try:
                _calibration_loss(loss_fn, model, batches[0]).backward()
            finally:
                for h in handles:
                    h.remove()
                for w in weights.values():
                    w.requires_grad_(False)
                    w.grad = None
        else:
            for names in owners.values():  # one weight at a time: recompute rather than keep gradients
                w = weights[names[0]]
                w.requires_grad_(True)
                acc = None
                try:
                    for batch in batches:
                        (g,) = torch.autograd.grad(_calibration_loss(loss_fn, model, batch), w, allow_unused=True)
                        if g is not None:
                            acc = g.float() if acc is None else acc.add_(g)
                        del g
                finally:
                    w.requires_grad_(False)
                choose(names, acc)
                del acc
        for names in owners.values():  # never reached by the gradient: all scores 0, lowest columns
            if names[0] not in indices:
                choose(names, None)
    finally:
        for layer, names in active.items():
            layer.active_adapters = names
        for m in switched:
            m.set_mode("inplace")
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return indices
