"""Attach NeuroAda to any PyTorch / Hugging Face model, save and load adapter files, merge and unmerge.

The model is modified in place (target layers are wrapped in NeuroAdaLayer, PEFT-style, keeping the
original as `base_layer`); adapter files are the format of spec/SPEC.md, keyed by the base tensor's
own state_dict key, so `neuroada-merge` can apply them to the checkpoint with no name guessing.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
import torch
from torch import nn

import neuroada_format as naf
from neuroada_format import NeuroAdaError

from .config import CONFIG_NAME, WEIGHTS_NAME, NeuroAdaConfig
from .layer import NeuroAdaLayer
from .selection import select

CONFIGS_ATTR = "neuroada_configs"
BASE_LAYER = ".base_layer"
TORCH_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
VALUE_NUMPY = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}


# -- helpers -----------------------------------------------------------------------------------------
def _linear_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain PyTorch models
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy/view of a tensor; bf16 goes through its bits (numpy has no bf16)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def layers(model: nn.Module) -> dict[str, NeuroAdaLayer]:
    """Every NeuroAdaLayer of the model by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NeuroAdaLayer)}


def _matches(name: str, spec) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _output_head_names(model: nn.Module) -> set[str]:
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, m in model.named_modules():
        if head is not None and m is head:
            names.add(name)
    if not names:
        names.update(n for n, _ in model.named_modules() if n.split(".")[-1] in ("lm_head", "score"))
    return names


def find_targets(model: nn.Module, config: NeuroAdaConfig) -> list[str]:
    """Module names to adapt, with PEFT's target_modules / exclude_modules semantics."""
    linear = _linear_types()
    heads = _output_head_names(model)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, NeuroAdaLayer) or not name:
            continue
        if BASE_LAYER[1:] in name.split("."):
            continue  # the inside of an already wrapped layer
        if config.target_modules == "all-linear":
            hit = isinstance(m, linear) and name not in heads
        else:
            hit = _matches(name, config.target_modules)
        if hit and not _matches(name, config.exclude_modules):
            if not isinstance(m, linear):
                raise NeuroAdaError(f"target module {name} is a {type(m).__name__}; NeuroAda adapts "
                                    "nn.Linear and transformers Conv1D layers")
            out.append(name)
    # modules already wrapped by an earlier attach are targets too when they match
    for name, m in layers(model).items():
        if config.target_modules == "all-linear" or _matches(name, config.target_modules):
            if not _matches(name, config.exclude_modules):
                out.append(name)
    if not out:
        raise NeuroAdaError(f"no module matches target_modules={config.target_modules!r}")
    return sorted(set(out))


def _shared_weights(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _mode_for(module: nn.Module, config: NeuroAdaConfig, shared: set[int]) -> str:
    """In place where the weight is a plain, contiguous, unshared tensor of an exact Linear/Conv1D."""
    if config.mode != "auto":
        return config.mode
    w = module.weight
    plain = type(w) in (torch.Tensor, nn.Parameter) and w.is_contiguous() and w.is_floating_point()
    exact = type(module) in _linear_types()
    return "inplace" if plain and exact and id(w) not in shared else "additive"


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


# -- attach ------------------------------------------------------------------------------------------
def attach(model: nn.Module, config: NeuroAdaConfig | None = None, adapter_name: str = "default", *,
           calibration: Iterable | None = None, loss_fn: Callable | None = None) -> nn.Module:
    """Add a NeuroAda adapter to `model` (in place; returned for chaining). Only the deltas train.

    For selection="gradient", `calibration` is an iterable of batches and `loss_fn(model, batch)`
    returns a scalar loss (default: `model(**batch).loss`); scores are accumulated one layer at a
    time, so dense gradients are never held for more than one weight.
    """
    config = config or NeuroAdaConfig()
    configs = getattr(model, CONFIGS_ATTR, None) or {}
    if adapter_name in configs:
        raise NeuroAdaError(f"adapter {adapter_name!r} is already attached")
    names = find_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    scores = _gradient_scores(model, names, calibration, loss_fn) if config.selection == "gradient" else {}
    shared = _shared_weights(model)
    delta_dtype = getattr(torch, config.delta_dtype)
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        if not isinstance(module, NeuroAdaLayer):
            module = NeuroAdaLayer(module, mode=_mode_for(module, config, shared))
            _set_module(model, name, module)
        if module.merged:
            raise NeuroAdaError(f"{name} has merged adapters; unmerge before attaching another")
        w = _canonical(module)
        idx = select(w, config.k, config.selection, seed=config.seed, scores=scores.pop(name, None),
                     generator_offset=i)
        module.add_adapter(adapter_name, idx, val_dtype=delta_dtype, activate=True)
        module.neuroada_val[adapter_name].requires_grad_(not config.inference_mode)
    configs[adapter_name] = config
    setattr(model, CONFIGS_ATTR, configs)
    return model


def _default_loss(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.loss if hasattr(out, "loss") else out


def _gradient_scores(model, names, calibration, loss_fn) -> dict[str, torch.Tensor]:
    if calibration is None:
        raise NeuroAdaError("selection='gradient' needs calibration batches")
    batches = list(calibration)
    loss_fn = loss_fn or _default_loss
    scores = {}
    was_training = model.training
    model.eval()
    for name in names:  # one layer at a time: one dense gradient alive at most
        module = model.get_submodule(name)
        weight = (module.base_layer if isinstance(module, NeuroAdaLayer) else module).weight
        weight.requires_grad_(True)
        acc = torch.zeros_like(weight, dtype=torch.float32)
        for batch in batches:
            loss = loss_fn(model, batch)
            (grad,) = torch.autograd.grad(loss, weight)
            acc += grad.float().abs()
        weight.requires_grad_(False)
        scores[name] = acc.t() if _layout(module) == "in_out" else acc
    model.train(was_training)
    return scores


# -- introspection -----------------------------------------------------------------------------------
def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, counting each tensor once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = trainable_parameters(model)
    base = total - sum(p.numel() for layer in layers(model).values() for p in layer.neuroada_val.values())
    print(f"trainable params: {trainable:,} || all params: {base + trainable:,} || "
          f"trainable%: {100 * trainable / max(base + trainable, 1):.4f}")


def base_state_names(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The model's tensors under their original (unwrapped) names: name -> (dtype, shape)."""
    out = {}
    for name, t in model.state_dict().items():
        if ".neuroada_" in name:
            continue
        out[name.replace(BASE_LAYER, "")] = (TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape))
    return out


# -- save --------------------------------------------------------------------------------------------
def to_adapter(model: nn.Module, adapter_name: str = "default", *, value_dtype: str | None = None) -> naf.Adapter:
    """The named adapter as a neuroada_format.Adapter (values rounded to the file's value dtype)."""
    configs = getattr(model, CONFIGS_ATTR, {})
    config = configs.get(adapter_name)
    if config is None:
        raise NeuroAdaError(f"no adapter named {adapter_name!r} (have: {', '.join(configs) or 'none'})")
    vdt = value_dtype or config.save_dtype
    targets = {}
    for name, layer in layers(model).items():
        if adapter_name not in layer.neuroada_val:
            continue
        key = name + ".weight"
        idx = to_numpy(layer.neuroada_idx[adapter_name])
        val = layer.neuroada_val[adapter_name].detach().float().cpu().numpy().astype(VALUE_NUMPY[vdt])
        w0 = layer.neuroada_w0[adapter_name]
        targets[key] = naf.Target(
            key, idx.astype(np.int16 if layer.d_in <= 32768 else np.int32), val, (layer.d_out, layer.d_in),
            "in_out" if layer.transposed else "out_in", TORCH_DTYPE_NAMES[layer.weight.dtype],
            naf.probe_hash_from_values(w0.detach().float().cpu().numpy()),
        )
    mcfg = getattr(model, "config", None)
    base_name = config.base_model_name_or_path or getattr(mcfg, "_name_or_path", None) or None
    revision = config.revision or getattr(mcfg, "_commit_hash", None)
    selection = {"rule": config.selection, "tie_break": "lower-column", "seed": config.seed}
    if config.selection == "random":
        selection["generator"] = "torch.Generator(cpu).manual_seed(seed + target_number)"
    return naf.Adapter(targets, base_name=base_name, base_revision=revision,
                       structure_hash=naf.structure_hash((n, d, s) for n, (d, s) in base_state_names(model).items()),
                       selection=selection)


def save_adapter(model: nn.Module, path, adapter_name: str = "default", *, value_dtype: str | None = None) -> str:
    """Write the adapter: a file path -> one .safetensors file; a folder -> PEFT-style layout
    (adapter_config.json + adapter_model.safetensors). Returns the adapter file's path."""
    path = os.fspath(path)
    adapter = to_adapter(model, adapter_name, value_dtype=value_dtype)
    if path.endswith(".safetensors"):
        naf.save(adapter, path)
        return path
    os.makedirs(path, exist_ok=True)
    config = getattr(model, CONFIGS_ATTR)[adapter_name]
    cfg = NeuroAdaConfig.from_dict({**config.to_dict(), "base_model_name_or_path": adapter.base_name,
                                    "revision": adapter.base_revision})
    file = os.path.join(path, WEIGHTS_NAME)
    naf.save(adapter, file)
    cfg.save_pretrained(path)
    return file


# -- load --------------------------------------------------------------------------------------------
def _resolve(path) -> tuple[str, NeuroAdaConfig | None]:
    path = os.fspath(path)
    if os.path.isdir(path):
        file = os.path.join(path, WEIGHTS_NAME)
        cfg = NeuroAdaConfig.from_pretrained(path) if os.path.exists(os.path.join(path, CONFIG_NAME)) else None
        if not os.path.exists(file):
            raise NeuroAdaError(f"no {WEIGHTS_NAME} in the folder", path=path, rule="1.1")
        return file, cfg
    return path, None


def check_against_model(adapter: naf.Adapter, model: nn.Module) -> None:
    """Rules 4.1-4.3 against the model's own weights; raises before anything is touched.

    Base values are read with every merged adapter unmerged (so a model serving a merged adapter can
    still check a new one); the caller re-merges.
    """
    modules = dict(model.named_modules())
    for key, t in sorted(adapter.targets.items()):
        mod_name = key[:-len(".weight")] if key.endswith(".weight") else None
        module = modules.get(mod_name) if mod_name else None
        if module is None or not isinstance(module, (NeuroAdaLayer, *_linear_types())):
            raise NeuroAdaError("no linear layer of the model has this weight", path=adapter.path,
                                tensor=key, rule="4.1")
        w = _canonical(module)
        dtype = TORCH_DTYPE_NAMES.get(w.dtype)
        if tuple(w.shape) != tuple(t.shape) or dtype != t.dtype or _layout(module) != t.layout:
            raise NeuroAdaError(f"model weight is {dtype}{list(w.shape)} ({_layout(module)}), adapter expects "
                                f"{t.dtype}{list(t.shape)} ({t.layout})", path=adapter.path, tensor=key,
                                rule="4.2")
        idx = torch.from_numpy(np.asarray(t.indices, dtype=np.int64)).to(w.device)
        probe = naf.probe_hash_from_values(w.detach().gather(1, idx).float().cpu().numpy())
        if probe != t.probe:
            raise NeuroAdaError("probe hash differs: this adapter was made for other base weights",
                                path=adapter.path, tensor=key, rule="4.3")


def load_adapter(model: nn.Module, path, adapter_name: str = "default", *, is_trainable: bool = False,
                 mode: str = "auto") -> nn.Module:
    """Load an adapter file or PEFT-style folder onto `model` under `adapter_name`.

    The file is validated (structure and content) and checked against the model's weights (shapes,
    dtypes, probe hash) before anything changes; on any problem the model is left exactly as it was.
    """
    file, cfg = _resolve(path)
    adapter = naf.load(file)
    naf.validate(adapter, strict=True)
    configs = getattr(model, CONFIGS_ATTR, None) or {}
    if adapter_name in configs:
        raise NeuroAdaError(f"adapter {adapter_name!r} is already loaded; delete it or pick another name")
    merged = {name: list(layer.merged_adapters) for name, layer in layers(model).items() if layer.merged}
    for name in merged:
        model.get_submodule(name).unmerge()
    try:
        check_against_model(adapter, model)
        ks = {t.k for t in adapter.targets.values()}
        config = cfg or NeuroAdaConfig(k=max(ks), target_modules=sorted(k[:-7] for k in adapter.targets),
                                       base_model_name_or_path=adapter.base_name, revision=adapter.base_revision)
        config.inference_mode = not is_trainable
        if adapter.selection.get("rule") in ("magnitude", "reverse", "random", "gradient"):
            config.selection = adapter.selection["rule"]
        config.mode = mode
        shared = _shared_weights(model)
        delta_dtype = getattr(torch, config.delta_dtype)
        for key, t in adapter.targets.items():
            name = key[:-len(".weight")]
            module = model.get_submodule(name)
            if not isinstance(module, NeuroAdaLayer):
                module = NeuroAdaLayer(module, mode=_mode_for(module, config, shared))
                _set_module(model, name, module)
            w = module.weight
            idx = torch.from_numpy(np.asarray(t.indices, dtype=np.int64)).to(w.device)
            val = torch.from_numpy(np.asarray(t.values, dtype=np.float32)).to(device=w.device, dtype=delta_dtype)
            module.add_adapter(adapter_name, idx, val=val, val_dtype=delta_dtype, activate=True)
            module.neuroada_val[adapter_name].requires_grad_(is_trainable)
        configs[adapter_name] = config
        setattr(model, CONFIGS_ATTR, configs)
    finally:
        for name, names in merged.items():
            model.get_submodule(name).merge(names)
    return model


# -- merge -------------------------------------------------------------------------------------------
def merge(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Write the (active, or named) deltas into the weights with the spec's rule: f32 sum, one rounding."""
    for layer in layers(model).values():
        names = [n for n in (adapter_names or layer.active_adapters) if n in layer.neuroada_val]
        if names:
            layer.merge(names)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every merged weight to its original bits."""
    for layer in layers(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge, then replace each NeuroAdaLayer by its base layer: a plain model with the original keys."""
    merge(model, adapter_names)
    for name, layer in layers(model).items():
        _set_module(model, name, layer.base_layer)
    if hasattr(model, CONFIGS_ATTR):
        delattr(model, CONFIGS_ATTR)
    return model
