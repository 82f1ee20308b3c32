"""Guards every entry point shares: the attributes NeuroAda keeps on a model, the per-model locks, and the refusals
of models it cannot change safely (DDP, FSDP1, compiled, sharded, offloaded, inside an adapter_batch block).

Kept apart so that attach, save, load and merge each import them without importing one another."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import weakref
from typing import Iterator

import ml_dtypes
import numpy as np
import torch
from torch import nn

from neuroada_format import NeuroAdaError, NeuroAdaUsageError

from .layer import NeuroAdaLayer


CONFIGS_ATTR = "neuroada_configs"
MIXED_ATTR = "_neuroada_adapter_batch"  # on the model while a multi.adapter_batch block runs
MIXED_OWNER_ATTR = "_neuroada_adapter_batch_thread"  # the thread running it
DISABLED_ATTR = "_neuroada_disabled"  # on the model and its layers while a multi.disable_adapter block runs
AUTO_ATTR = "_neuroada_auto_mode"       # set on layers whose mode was chosen by mode="auto"
HOOK_ATTR = "_neuroada_sharding_hook"   # the model's forward pre-hook that re-resolves "auto" under FSDP2
HF_ATTR = "_neuroada_hf_hooks"         # the model's load_state_dict hooks (see _install_hf)
BASE_LAYER = ".base_layer"
TORCH_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
VALUE_NUMPY = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}
VALUE_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _linear_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain PyTorch models
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def _dtensor_type():
    # looked up, not imported: when torch.distributed.tensor was never loaded nothing can be a DTensor
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _fsdp_module_type():
    mod = sys.modules.get("torch.distributed.fsdp")
    return getattr(mod, "FSDPModule", None)


def _is_sharded(t) -> bool:
    dt = _dtensor_type()
    return dt is not None and isinstance(t, dt)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), else the tensor."""
    return t.full_tensor() if _is_sharded(t) else t


FSDP1_REFUSED = ("FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel) flattens the deltas into one parameter with "
                 "the frozen base weights, so the base would get gradients and the deltas could not be read back; "
                 "shard with FSDP2 instead (torch.distributed.fsdp.fully_shard after attach; accelerate and "
                 "Trainer: fsdp_version 2)")


def _fsdp1_managed(t: torch.Tensor) -> bool:
    """A parameter FSDP1 flattened, or (inside its forward) a view into one of its flat parameters."""
    return bool(getattr(t, "_fsdp_flattened", False) or getattr(getattr(t, "_base", None), "_is_flat_param", False))


def _refuse_fsdp1(model: nn.Module, what: str) -> None:
    """The model is, holds or sits inside an FSDP1 wrapper (its parameters are flattened)."""
    mod = sys.modules.get("torch.distributed.fsdp")
    if mod is None:
        return  # FSDP1 was never imported: nothing can be flattened by it
    if (any(isinstance(m, mod.FullyShardedDataParallel) or _fsdp1_managed(getattr(m, "weight", None))
            for m in model.modules()) or any(_fsdp1_managed(p) for _, p in _base_parameters(model))):
        raise NeuroAdaUsageError(f"{what}: {FSDP1_REFUSED}")


def _refuse_ddp(model: nn.Module, what: str) -> None:
    """DDP prefixes every name with ``module.`` (targets and adapter keys would not match the plain model's) and
    all-reduces only the parameters it saw when built (deltas added later would train apart on each rank)."""
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules()):
        raise NeuroAdaUsageError(f"{what} on a DistributedDataParallel-wrapped model: {what} before wrapping in DDP "
                                 "(call it on the plain model, then wrap that in DistributedDataParallel); DDP "
                                 "prefixes every name with 'module.' and syncs only the parameters it was built with")


def _refuse_compiled(model: nn.Module) -> None:
    """torch.compile's wrapper prefixes every name with ``_orig_mod.``: attached through it, the adapter's keys would
    fit no plain model (load_adapter says the same when an adapter's keys miss, see check_against_model)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # never imported: nothing can be compiled
    compiled = getattr(eval_frame, "OptimizedModule", None)
    if compiled is not None and any(isinstance(m, compiled) for m in model.modules()):
        raise NeuroAdaUsageError("attach on a torch.compile'd model (its wrapper prefixes every name with _orig_mod.): "
                                 "attach to the model before compiling it (or to model._orig_mod)")


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers. Saving reads names, and theirs carry
    ``module.`` / ``_orig_mod.`` prefixes that are no key of the base (attach refuses the wrappers; saving through
    them, after attaching in the right order, is what training scripts do)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    compiled = getattr(eval_frame, "OptimizedModule", ())
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif compiled and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


# one lock per model (weakly keyed: a lock in the model's __dict__ would stop deepcopy and pickling)
_MODEL_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()  # (makes creating one atomic)


def _new_model_locks() -> None:
    """In a forked child: a lock the parent's other threads held (a block running there) would never be freed, and
    the child's calls waited forever (they were refused at once before the locks: that refusal is what it gets)."""
    global _MODEL_LOCKS_GUARD
    _MODEL_LOCKS_GUARD = threading.Lock()
    _MODEL_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_model_locks)


def model_lock(model: nn.Module) -> threading.RLock:
    """Held by every call that changes a model's adapters or what it serves (attach, load_adapter, merge, unmerge,
    set_adapter, delete_adapter, ...) and for the whole of an adapter_batch or disable_adapter block: a server's
    threads take turns. Two set_adapter calls at once left a weight holding both adapters' entries while the layer
    recorded one (the base never came back), and a call checked for an open block just before another thread
    opened one. Reentrant: calls made inside a block by its own thread get through to their own refusal."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


def check_model(model, what: str) -> None:
    """Refuse a first argument that is no torch model by the call's name: None (what set_adapter, delete_adapter and
    the like return, kept by a habitual ``model = ...``) or a string failed deep inside with a bare AttributeError,
    and load_trained_extras returned [] without a word."""
    if not isinstance(model, nn.Module):
        hint = (" (set_adapter, delete_adapter, add_weighted_adapter and the like change the model in place and return "
                "None: keep the model itself)") if model is None else ""
        raise NeuroAdaUsageError(f"{what} takes a torch model (an nn.Module), not {type(model).__name__}{hint}")


def takes_model(func):
    """``func(model, ...)`` refusing a ``model`` that is no nn.Module by the function's name (see check_model)."""
    @functools.wraps(func)
    def call(model, *args, **kwargs):
        check_model(model, func.__name__)
        return func(model, *args, **kwargs)
    return call


def serialized(func):
    """``func(model, ...)`` run holding ``model_lock``; waiting for it can be interrupted (Ctrl-C)."""
    @functools.wraps(func)
    def call(model, *args, **kwargs):
        check_model(model, func.__name__)
        with model_lock(unwrapped(model)):
            return func(model, *args, **kwargs)
    return call


def _refuse_sharded(model: nn.Module, what: str) -> None:
    _refuse_fsdp1(model, what)
    fsdp = _fsdp_module_type()
    if fsdp is not None and any(isinstance(m, fsdp) for m in model.modules()):
        raise NeuroAdaUsageError(f"{what} must happen before fully_shard (FSDP2): the deltas have to exist when "
                            "the model is sharded so that FSDP manages them")
    if any(_is_sharded(p) for _, p in _base_parameters(model)):
        raise NeuroAdaError(f"{what} needs whole weights, but some are sharded DTensors")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy/view of a tensor; bf16 goes through its bits (numpy has no bf16)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@takes_model
def layers(model: nn.Module) -> dict[str, NeuroAdaLayer]:
    """Every NeuroAdaLayer of the model by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NeuroAdaLayer)}


def _base_parameters(model: nn.Module, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` less NeuroAda's deltas (each layer's ``neuroada_val``). load_adapter's checks
    walk these on every call, so a load costs what the base and its own adapter cost, not what the adapters loaded
    before hold (hundreds, when one base serves many tasks). The sharding checks see no less: FSDP1, FSDP2 and
    tensor parallelism reach a layer's deltas only with the layer itself, whose class or base weight they change."""
    containers, seen = set(), set()
    for prefix, m in model.named_modules(remove_duplicate=remove_duplicate):
        if isinstance(m, NeuroAdaLayer):
            containers.add(id(m.neuroada_val))  # named_modules yields a layer before its children
        if id(m) in containers:
            continue
        for name, p in m._parameters.items():
            if p is None or id(p) in seen:
                continue
            if remove_duplicate:
                seen.add(id(p))
            yield (prefix + "." if prefix else "") + name, p


def _shared_weights(model: nn.Module) -> set[int]:
    """Ids of the parameters registered more than once (tied weights). Deltas are left out: none is ever tied."""
    seen: dict[int, int] = {}
    for _, p in _base_parameters(model, remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _refuse_in_batch(model: nn.Module, what: str, *, disabled_ok: bool = False, waits: bool = False) -> None:
    """adapter_batch adds per-sequence deltas to the weights it found and puts its state back on exit: anything
    that changes weights, classes or active adapters meanwhile would give wrong rows and an inconsistent end.
    disable_adapter likewise puts back on exit what each layer served, which would silently undo such a change
    (`disabled_ok`: a call that itself puts back what it changes, adapter_batch). `waits`: an early check by a call
    that takes the model's lock next (and checks again under it): another thread's block is waited for, not refused,
    and only a block of this thread's own is refused now."""
    model = unwrapped(model)  # (the state is on the model, also when a call or block got its compiled wrapper)
    if waits:
        if model.__dict__.get(MIXED_OWNER_ATTR) == threading.get_ident():
            raise NeuroAdaUsageError(f"{what} inside an adapter_batch block; leave the block first")
        return  # (a disable_adapter block has no owner here: the check under the lock refuses this thread's own)
    if model.__dict__.get(MIXED_ATTR) is not None:
        owner = model.__dict__.get(MIXED_OWNER_ATTR)
        if owner is not None and owner != threading.get_ident():
            raise NeuroAdaUsageError(f"{what} while another thread runs an adapter_batch block on this model; serve "
                                     f"it from several threads through adapter_batch blocks only (they run one at a "
                                     f"time), or give each thread its own model")
        raise NeuroAdaUsageError(f"{what} inside an adapter_batch block; leave the block first")
    if model.__dict__.get(DISABLED_ATTR) and not disabled_ok:
        raise NeuroAdaUsageError(f"{what} inside a disable_adapter block, whose exit would undo it; leave the block "
                                 f"first")


def _serving(layer: NeuroAdaLayer) -> bool:
    from .multi import ServingLayer  # (multi builds on this module)

    return isinstance(layer, ServingLayer)


def _unserve(layer: NeuroAdaLayer) -> None:
    """A layer set_adapter served becomes a plain NeuroAdaLayer again; what was merged stays merged and active."""
    if _serving(layer):
        layer.__class__ = NeuroAdaLayer
        layer.active_adapters = list(layer.merged_adapters)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _canonical(module: nn.Module) -> torch.Tensor:
    base = module.base_layer if isinstance(module, NeuroAdaLayer) else module
    w = base.weight
    return w if isinstance(base, nn.Linear) else w.t()


def _layout(module: nn.Module) -> str:
    base = module.base_layer if isinstance(module, NeuroAdaLayer) else module
    return "out_in" if isinstance(base, nn.Linear) else "in_out"


def _refuse_base_dtype(weight: torch.Tensor, tensor: str, advice: str, how: str = "") -> None:
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise NeuroAdaUsageError(f"the adapter format describes F32, F16 and BF16 base weights, this one is "
                                 f"{weight.dtype}{how}: {advice}", tensor=tensor)


def name_list(names, what: str, *, base_ok: bool = False) -> list:
    """A list of adapter names from ``names``: a str is refused (``merge(model, "ab")`` merged adapters a and b,
    ``"math"`` was reported as "no adapter named 'm'"), as are a non-iterable and items that are not names (a bare
    TypeError). ``base_ok``: None may stand for the base (adapter_batch)."""
    if isinstance(names, str) or not hasattr(names, "__iter__"):
        hint = f" (one adapter: [{names!r}])" if isinstance(names, str) else ""
        raise NeuroAdaUsageError(f"{what} takes a list of adapter names, not {type(names).__name__} "
                                 f"{names!r:.80}{hint}")
    names = list(names)
    for n in names:
        if not isinstance(n, str) and not (base_ok and n is None):
            raise NeuroAdaUsageError(f"{what}: adapter names are strings{' (or None, the base)' if base_ok else ''}, "
                                     f"got {type(n).__name__} {n!r:.80}")
    return names


def _check_path_argument(path, what: str) -> str:
    """A path argument as a str: None or a number raised a bare TypeError from os.fspath, '' a FileNotFoundError."""
    if not isinstance(path, (str, os.PathLike)):
        raise NeuroAdaUsageError(f"{what} needs a path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise NeuroAdaUsageError(f"{what} needs a path; got an empty one")
    return path


def _offloaded(module: nn.Module | None) -> bool:
    """Whether accelerate loads this module's weights in a hook around its calls (cpu_offload, disk_offload, a
    device_map with "cpu"/"disk" entries): its parameters stay on the meta device between calls."""
    hook = getattr(module, "_hf_hook", None)
    return any(getattr(h, "offload", False) or getattr(h, "weights_map", None) is not None
               for h in getattr(hook, "hooks", (hook,)) if h is not None)  # (a SequentialHook holds several)


def _check_base_weight(w: torch.Tensor, tensor: str, why: str, module: nn.Module | None = None) -> None:
    if w.is_meta and _offloaded(module):
        raise NeuroAdaUsageError(f"the base weight is offloaded by accelerate (a device_map with 'cpu'/'disk' "
                                 f"entries, cpu_offload or disk_offload: it lives on the meta device between calls), "
                                 f"and {why}: give the targeted layers room (max_memory), leave the offloaded "
                                 "layers out of target_modules, or load the model without offloading", tensor=tensor)
    if w.is_meta:
        raise NeuroAdaUsageError(f"the base weight is on the meta device, and {why}: load the model's weights first "
                                 "(from_pretrained, or to_empty + load_state_dict)", tensor=tensor)
    if not w.is_floating_point():
        # bitsandbytes' 4-bit weights are packed uint8 [n, 1], its 8-bit ones int8: selecting or merging on those
        # integers would pick meaningless entries (or fail on a shape of d_in = 1), and model.float() does not
        # unpack them
        kind = type(w).__name__ if type(w) not in (torch.Tensor, nn.Parameter) else "tensor"
        raise NeuroAdaUsageError(f"the base weight holds quantized integers ({kind} {w.dtype}{list(w.shape)}), and "
                                 f"{why}: NeuroAda selects and merges on float weights, so load the model unquantized "
                                 "(e.g. torch_dtype=torch.bfloat16 without a quantization_config); for a llama.cpp "
                                 "GGUF base, train on its de-quantized copy (see train_on_grid)", tensor=tensor)


@contextlib.contextmanager
def uninterrupted():
    """Ctrl-C held back until the block ends (and then raised): merge, unmerge, unload, set_adapter and delete_adapter
    walk the layers one at a time, in milliseconds, and one interrupted part-way left the model half switched (after a
    part-way delete_adapter the adapter was still listed, and a save wrote 12 of its 14 targets without a word).
    Only where Python's own SIGINT handler is installed (the main thread; not inside a program's own handler)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
