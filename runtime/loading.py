"""Load an adapter file or folder into a model (load_adapter), checked against the model first (check_against_model),
and a save_pretrained folder's other trained tensors (load_trained_extras).

Kept apart from attach, whose wrapping it reuses: loading adds the checks of a file against the model it goes into."""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import torch
from torch import nn

import neuroada_format as naf
from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.dtypes import common_value_dtype
from neuroada_format.durable import reading_folder
from neuroada_format.folder import CONFIG_NAME, reading_adapter, trained_extras, warn_trained_extras

from .config import MODES, NeuroAdaConfig
from .guards import (CONFIGS_ATTR, TORCH_DTYPE_NAMES, VALUE_NUMPY, _canonical, _check_base_weight,
                     _check_path_argument, _layout, _linear_types, _refuse_ddp, _refuse_in_batch, _refuse_sharded,
                     _serving, _shared_weights, check_model, layers, model_lock, takes_model, unwrapped)
from .hf_checkpoint import _install_hf
from .introspection import _module_for, _modules_by_key
from .kernels.reference import gather_exact
from .layer import NeuroAdaLayer, check_adapter_name
from .model import _all_or_nothing, _check_modes, _freeze, _wrap
from .targets import _bypassed_linears, _foreign_wrappers, plain_name


def held_values(values: np.ndarray, value_dtype: str, trainable: torch.dtype | None) -> torch.Tensor:
    """A loaded adapter's values as the runtime holds them (a copy: F32 values may come from a read-only map).

    ``trainable`` (the config's delta_dtype): master values for the optimizer. Otherwise the file's own dtype,
    which holds them exactly: every consumer (merge, set_adapter, mixed batches, the training forward) sums
    ``f32(w0) + f32(val)``, so the bits served are the same as from f32 copies, and a server that loads dozens of
    BF16 adapters holds 2 bytes per value instead of 4."""
    if trainable is not None:
        return torch.from_numpy(np.array(values, dtype=np.float32)).to(trainable)
    if value_dtype == "BF16":  # numpy has no bfloat16 torch can read: move the bits as int16
        return torch.from_numpy(np.array(values, dtype=ml_dtypes.bfloat16).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(values, dtype=VALUE_NUMPY[value_dtype]))


def _warn_unloaded_state(path) -> None:
    """A save_pretrained folder's model.safetensors may hold trained tensors that are no adapter's (a head the
    user unfroze, PEFT's LoRA): load_adapter reads only the adapter, so say what it leaves and how to load it."""
    warn_trained_extras(path, "load_adapter loads only the adapter. To use them too: "
                              f"load_trained_extras(model, {os.fspath(path)!r})")


@takes_model
def load_trained_extras(model: nn.Module, folder) -> list[str]:
    """Copy into ``model`` the trained tensors a save_pretrained folder holds beside its adapters (a head you unfroze),
    and return their names. For a model after load_adapter, and for a merged one (merge_and_unload, or the checkpoint
    neuroada-merge wrote, loaded with from_pretrained), which holds the base's values of them: the state file itself
    cannot be loaded into a model without the adapters (its guard entry fails on purpose), and its deltas are the
    adapters'. Every name and shape is checked before anything is copied."""
    folder = _check_path_argument(folder, "load_trained_extras")
    with reading_folder(folder):  # (a save's set, whole)
        found = trained_extras(folder, strict=True)
        if found is None:
            return []
        state, names = found
        from safetensors import safe_open

        with safe_open(state, framework="pt") as f:
            tensors = {n: f.get_tensor(n) for n in names}
    own = model.state_dict(keep_vars=True)
    for n, t in tensors.items():
        if n not in own:
            raise NeuroAdaUsageError("the model has no tensor of this name", path=state, tensor=n)
        if own[n].shape != t.shape:
            raise NeuroAdaUsageError(f"the model holds it as {list(own[n].shape)}, the file as {list(t.shape)}",
                                     path=state, tensor=n)
    with torch.no_grad():
        for n, t in tensors.items():
            own[n].copy_(t)  # into the model's own tensor: its dtype and device stay
    return names


def _module_at(model: nn.Module, key: str) -> nn.Module | None:
    """The module a weight key names (``a.b.weight`` -> ``a.b``), whatever its type, or None."""
    try:
        return model.get_submodule(key.rsplit(".", 1)[0]) if key.endswith(".weight") else None
    except AttributeError:
        return None


_NARROW = {"BF16": torch.bfloat16, "F16": torch.float16}


def check_against_model(adapter: naf.Adapter, model: nn.Module) -> None:
    """Rules 4.1-4.3 against the model's own weights; raises before anything is touched.

    Every target's presence, shape and dtype (4.1, 4.2) is checked before any probe (4.3), so an
    adapter for another architecture is reported as such. Base values are the base's own: at the entries of
    merged adapters, their originals (``NeuroAdaLayer.base_values``).
    """
    by_key, bypassed = _modules_by_key(model), _bypassed_linears(model)
    found = {}
    for key, t in sorted(adapter.targets.items()):
        name = _module_for(by_key, key, t)
        module = None if name is None else model.get_submodule(name)
        if name in bypassed and not isinstance(module, NeuroAdaLayer):
            raise NeuroAdaUsageError(f"the model's {name} is the out_proj of an nn.MultiheadAttention, which reads its "
                                     "weight itself and never calls it: a runtime delta there would not apply; merge "
                                     "this adapter into the checkpoint instead (neuroada-merge)", path=adapter.path,
                                     tensor=key)
        twin = next((k for k in found if _module_for(by_key, k, adapter.targets[k]) == name), None)
        if module is not None and twin is not None:  # the model's name and the checkpoint's, both in one file
            raise NeuroAdaError(f"targets {twin!r} and {key!r} name the same weight (one as the model holds it, one "
                                "as its checkpoint stores it): its deltas would be added twice", path=adapter.path,
                                tensor=key, rule="4.1")
        if module is None:
            other = _module_at(model, key)
            if other is not None and not isinstance(other, (*_linear_types(), NeuroAdaLayer)):  # (ours wrap one)
                what = (f"the model's {key.rsplit('.', 1)[0]} is a {type(other).__module__}."
                        f"{type(other).__qualname__}, not a linear layer with float weights")
            elif hasattr(model, "_orig_mod"):  # torch.compile's wrapper prefixes every name with _orig_mod.
                what = ("no linear layer of the model has this weight: this is a torch.compile'd model; load "
                        "adapters into the model before compiling it (or into model._orig_mod)")
            else:
                what = "no linear layer of the model has this weight"
            raise NeuroAdaError(what, path=adapter.path, tensor=key, rule="4.1")
        w = _canonical(module)
        _check_base_weight(w, key, "the adapter is checked against its values (probe hash)", module)
        dtype = TORCH_DTYPE_NAMES.get(w.dtype)
        # spec 1.1: the dtype may differ (identity is on values: the probe hash below decides)
        if tuple(w.shape) != tuple(t.shape) or dtype is None or _layout(module) != t.layout:
            raise NeuroAdaError(f"model weight is {dtype}{list(w.shape)} ({_layout(module)}), adapter expects "
                                f"{t.dtype}{list(t.shape)} ({t.layout})", path=adapter.path, tensor=key,
                                rule="4.2")
        found[key] = w, module
    for key, (w, module) in found.items():
        t = adapter.targets[key]
        idx = torch.from_numpy(np.asarray(t.indices, dtype=np.int64)).to(w.device)
        values = module.base_values(idx) if isinstance(module, NeuroAdaLayer) else gather_exact(w.detach(), idx)
        probe = naf.probe_hash_from_values(values.float().cpu().numpy())
        if probe != t.probe:
            have = TORCH_DTYPE_NAMES.get(w.dtype)
            # F32 holds every F16/BF16 value: only a narrower (or other 16-bit) model can have rounded them
            if have != t.dtype and have != "F32":
                hint = (f" (or for these weights before they became {have}: it was made on {t.dtype} values, which "
                        f"{have} rounds; load it onto the {t.dtype} model and merge_and_unload, then convert)")
            elif t.dtype in _NARROW and naf.probe_hash_from_values(
                    values.to(_NARROW[t.dtype]).float().cpu().numpy()) == t.probe:
                # made on these very weights, rounded: the model was cast after attach
                hint = (f" (it was made on these weights cast to {t.dtype}: a model cast after attach, as "
                        f"model.to({_NARROW[t.dtype]}) or Trainer's bf16_full_eval/fp16_full_eval do, rounds the "
                        f"base the adapter records; load it onto the model cast the same way)")
            else:
                hint = ""
            raise NeuroAdaError(f"probe hash differs: this adapter was made for other base weights{hint}",
                                path=adapter.path, tensor=key, rule="4.3")


def load_adapter(model: nn.Module, path, adapter_name: str = "default", *, is_trainable: bool = False,
                 mode: str = "auto") -> nn.Module:
    """Load an adapter file or PEFT-style folder onto `model` under `adapter_name`.

    As with PEFT, loading does not change what is served: the adapter becomes active only when none
    is (the first one loaded); pick another with multi.set_adapter. The file's selection record and
    value dtype are kept, so save_adapter writes back what was read. Loaded for inference (is_trainable=False,
    the default) the values stay in that dtype, which holds them exactly (BF16: half the memory of f32 copies);
    trainable, they become the config's delta_dtype master values.
    The file is validated (structure and content) and checked against the model's weights (shapes,
    dtypes, probe hash) before anything changes; on any problem the model is left exactly as it was.
    Like PEFT, the base parameters are frozen afterwards, so with is_trainable=True only deltas train.
    """
    check_adapter_name(adapter_name)
    check_model(model, "load_adapter")
    _refuse_in_batch(model, "load_adapter", waits=True)  # (said before reading the file; checked again under the lock)
    _refuse_ddp(model, "load_adapter")
    if mode not in MODES:
        raise NeuroAdaUsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    path = _check_path_argument(path, "load_adapter")
    with reading_adapter(path) as (file, config, doc):  # (not between a save's renames; the config checked once)
        adapter = naf.load(file)
    cfg = NeuroAdaConfig.from_checked(doc, config) if config else None
    naf.validate(adapter, strict=True)
    if cfg is not None:
        _check_folder_pair(cfg, adapter, file)
    with model_lock(unwrapped(model)):  # (the file is read and validated before: switches wait for less)
        _refuse_in_batch(model, "load_adapter")
        configs = getattr(model, CONFIGS_ATTR, None) or {}
        if adapter_name in configs:
            raise NeuroAdaUsageError(f"adapter {adapter_name!r} is already loaded; delete it or pick another name")
        _refuse_sharded(model, "load_adapter")
        existing = layers(model)
        # As PEFT: loading never changes what is served, not even while it loads (merged adapters stay merged: the base
        # is read around them). The adapter becomes active only on a model where no adapter is (the first one loaded),
        # in every layer it targets; on a model set_adapter serves, it waits.
        served = any(_serving(layer) for layer in existing.values())
        activate = not served and not any(layer.active_adapters or layer.merged for layer in existing.values())
        check_against_model(adapter, model)
        ks = {t.k for t in adapter.targets.values()}
        by_key, wrappers = _modules_by_key(model), _foreign_wrappers(model)
        modules = {key: _module_for(by_key, key, t) for key, t in adapter.targets.items()}
        config = cfg or NeuroAdaConfig(k=max(ks), target_modules=sorted(plain_name(model, n) for n in modules.values()),
                                       base_model_name_or_path=adapter.base_name, revision=adapter.base_revision)
        config.inference_mode = not is_trainable
        if cfg is None:
            config.selection = adapter.selection["rule"]
            seed = adapter.selection.get("seed")
            config.seed = seed if isinstance(seed, int) else config.seed
        # saved again as read: the file's values decide (a folder's config from before save_adapter recorded them
        # could say BF16 over F32 values)
        config.save_dtype = common_value_dtype(t.value_dtype for t in adapter.targets.values())
        config.mode = mode
        shared = _shared_weights(model)
        _check_modes({name: model.get_submodule(name) for name in modules.values()}, config, shared, wrappers)
        delta_dtype = getattr(torch, config.delta_dtype)
        with _all_or_nothing(model, adapter_name, deltas=False):
            for key, t in adapter.targets.items():
                name = modules[key]
                module = _wrap(model, name, model.get_submodule(name), config, shared, wrappers)
                w = module.weight
                idx = torch.from_numpy(np.asarray(t.indices, dtype=np.int64)).to(w.device)
                val = held_values(t.values, t.value_dtype, delta_dtype if is_trainable else None).to(w.device)
                module.add_adapter(adapter_name, idx, val=val, val_dtype=val.dtype, activate=activate)
                module.neuroada_val[adapter_name].requires_grad_(is_trainable)
                if served:  # a layer wrapped just now serves the base like its peers
                    from .multi import _serve

                    _serve(module)
            _freeze(model, keep_deltas=True)
            configs = dict(configs)
            configs[adapter_name] = config
            setattr(model, CONFIGS_ATTR, configs)
            _install_hf(model)
    _warn_unloaded_state(path)
    return model


def _check_folder_pair(cfg: NeuroAdaConfig, adapter: naf.Adapter, file: str) -> None:
    """A folder's config must describe its weights file: one replaced without the other (a file copied in by hand, a
    save killed between its two renames whose record was removed) loaded without a word, and saving it again
    recorded the config's selection for the file's positions."""
    ks = {t.k for t in adapter.targets.values()}
    rule, seed = adapter.selection.get("rule"), adapter.selection.get("seed")
    said = []
    if len(ks) == 1 and cfg.k not in ks:
        said.append(f"k={cfg.k} against the file's k={ks.pop()}")
    if rule != cfg.selection:
        said.append(f"selection {cfg.selection!r} against the file's {rule!r}")
    elif type(seed) is int and type(cfg.seed) is int and seed != cfg.seed:
        said.append(f"seed {cfg.seed} against the file's {seed}")
    if said:
        raise NeuroAdaError(f"the folder's {CONFIG_NAME} does not describe its weights ({'; '.join(said)}): one was "
                            "replaced without the other; save the adapter again, or load the .safetensors file itself",
                            path=file, rule="2.2")
