"""Write what an attached model trained as an adapter file or folder (spec/SPEC.md): to_adapter builds it in memory,
save_adapter writes it atomically, checked against what a path already holds.
Adapter files are keyed by the base tensor's own state_dict key, so `neuroada-merge` can apply them to the
checkpoint with no name guessing.

Kept apart from attach so that the Hugging Face hooks (save_pretrained) reuse it without importing model.py."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

import neuroada_format as naf
from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.adapter import encode as encode_adapter
from neuroada_format.dtypes import nonfinite_mask
from neuroada_format.durable import checkpoint_lock, write_files
from neuroada_format.folder import CONFIG_NAME, WEIGHTS_NAME

from .config import NeuroAdaConfig
from .guards import (CONFIGS_ATTR, TORCH_DTYPE_NAMES, VALUE_NUMPY, _check_path_argument, _full, _refuse_base_dtype,
                     _refuse_fsdp1, layers, takes_model, to_numpy, unwrapped)
from .introspection import checkpoint_keys, saved_structure
from .layer import NeuroAdaLayer
from .targets import plain_name


def layer_probe(layer: NeuroAdaLayer, adapter_name: str) -> str:
    """The probe hash (spec 6.1) of the base values at the adapter's positions, from the originals the layer keeps
    (w0, in the base's dtype): d_out*k values, never the weight. What the adapter file records per target and what
    save_pretrained's trainable state records per layer and adapter."""
    return layer_probe_of(layer.neuroada_w0[adapter_name])


def layer_probe_of(values: torch.Tensor) -> str:
    """The probe hash of base values read at an adapter's positions ([d_out, k], canonical order)."""
    return naf.probe_hash_from_values(values.detach().float().cpu().numpy())


@takes_model
def to_adapter(model: nn.Module, adapter_name: str = "default", *, value_dtype: str | None = None) -> naf.Adapter:
    """The named adapter as a neuroada_format.Adapter (values rounded to the file's value dtype).

    Under FSDP2 the deltas are sharded: every rank must call this (it gathers them).
    """
    model = unwrapped(model)
    configs = getattr(model, CONFIGS_ATTR, {})
    config = configs.get(adapter_name)
    if config is None:
        raise NeuroAdaUsageError(f"no adapter named {adapter_name!r} (have: {', '.join(configs) or 'none'})")
    _refuse_fsdp1(model, "saving the adapter")
    _refuse_offloaded(model, [adapter_name])
    vdt = value_dtype or config.save_dtype
    if vdt not in VALUE_NUMPY:
        raise NeuroAdaUsageError(f"value_dtype must be one of {', '.join(VALUE_NUMPY)}, got {vdt!r}", rule="3.3")
    targets = {}
    saved_keys = checkpoint_keys(model)
    for name, layer in layers(model).items():
        if adapter_name not in layer.neuroada_val:
            continue
        layer.reread_w0()  # (a base edited since the last forward: its probe and grid are what is saved)
        module = plain_name(model, name)
        key = saved_keys.get(module + ".weight", module + ".weight")
        # a model converted after attach (model.double()) failed here on the schema
        _refuse_base_dtype(layer.weight, key, "convert the model back (e.g. model.float()) before saving",
                           " (converted after attach?)")
        idx = to_numpy(layer.neuroada_idx[adapter_name])
        val32 = _full(layer.delta(adapter_name).detach()).float().cpu().numpy()
        with np.errstate(over="ignore"):
            val = val32.astype(VALUE_NUMPY[vdt])
        bad = nonfinite_mask(val) & np.isfinite(val32)  # finite deltas the value dtype cannot hold
        if bad.any():
            r, c = (int(i[0]) for i in np.nonzero(bad))
            raise NeuroAdaError(f"delta {val32[r, c]:g} at row {r}, slot {c} overflows {vdt}: save with "
                                f"value_dtype='F32' (or save_dtype='F32' in the config)", tensor=key, rule="3.7")
        targets[key] = naf.Target(
            key, idx.astype(np.int16 if layer.d_in <= 32768 else np.int32), val, (layer.d_out, layer.d_in),
            "in_out" if layer.transposed else "out_in", TORCH_DTYPE_NAMES[layer.weight.dtype],
            layer_probe(layer, adapter_name),
            # (1.2) the checkpoint names this weight differently: keep the model's name for PEFT and for loading
            extra={} if key == module + ".weight" else {"module": module},
        )
    mcfg = getattr(model, "config", None)
    base_name = config.base_model_name_or_path or getattr(mcfg, "_name_or_path", None) or None
    revision = config.revision or getattr(mcfg, "_commit_hash", None)
    selection = {"rule": config.selection, "tie_break": "lower-column", "seed": config.seed}
    if config.selection == "random":
        selection["generator"] = "torch.Generator(cpu).manual_seed(seed + target_number)"
    if config.selection == "gradient":
        selection["score"] = "abs(sum over calibration batches of dloss/dW)"
    return naf.Adapter(targets, base_name=base_name, base_revision=revision,
                       structure_hash=naf.structure_hash((n, d, s) for n, (d, s) in saved_structure(model).items()),
                       selection=selection, version=naf.version_for(targets.values()))


def _refuse_offloaded(model: nn.Module, names) -> None:
    """Saving reads the adapters' tensors and the base's values at their positions (probe hashes): where accelerate
    offloaded them (cpu_offload, disk_offload, dispatch_model with 'cpu'/'disk'), they are on the meta device between
    calls and torch's "Cannot copy out of meta tensor" was all the user saw."""
    for name, layer in layers(model).items():
        held = [n for n in names if n in layer.neuroada_val]
        if held and (layer.weight.is_meta or any(layer.neuroada_val[n].is_meta or layer.neuroada_idx[n].is_meta
                                                 or layer.neuroada_w0[n].is_meta for n in held)):
            raise NeuroAdaUsageError("the layer is offloaded (on the meta device between calls: accelerate's "
                                     "cpu_offload, disk_offload or a device_map with 'cpu'/'disk' entries), and saving "
                                     "reads its adapter and base values: save before offloading, or take accelerate's "
                                     "hooks off first (accelerate.hooks.remove_hook_from_module(model, recurse=True) "
                                     "puts offloaded weights back)", tensor=name + ".weight")


# save_adapter made a folder named "adapter.bin" (PEFT's old weights name) where a file was meant
_FILE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy", ".npz", ".json", ".gguf", ".onnx", ".h5")


def _check_save_path(path: str, single: bool) -> None:
    """The kind of what already lies at `path` (or a parent) against what save_adapter writes there, said before any
    work: OSError from deep in the write (IsADirectoryError at the rename, FileExistsError from makedirs) named
    neither the rule nor what to do."""
    if single and os.path.isdir(path):  # e.g. left by an earlier save to "task.safetensors/"
        raise NeuroAdaUsageError("a folder exists at this path, and a path ending in .safetensors saves one file; "
                                 "remove the folder or save elsewhere", path=path)
    suffix = os.path.splitext(path.rstrip("/" + os.sep))[1].lower()
    if not single and suffix in _FILE_SUFFIXES and not os.path.isdir(path):
        raise NeuroAdaUsageError(f"a path ending in {suffix} names a file, and only a .safetensors path saves one "
                                 f"(adapters are never pickled: no .bin or .pt); any other path is made a folder. "
                                 f"Save to {os.path.splitext(path)[0]}.safetensors, or to a folder name without a file "
                                 f"suffix", path=path)
    if not single and os.path.lexists(path) and not os.path.isdir(path):
        raise NeuroAdaUsageError("a file exists at this path, and a path not ending in .safetensors saves a folder "
                                 "(neuroada_config.json + neuroada_model.safetensors); save elsewhere, or to a "
                                 ".safetensors path for one file", path=path)
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NeuroAdaUsageError(f"{parent} is a file, so no folder can be made under it", path=path)


@takes_model
def save_adapter(model: nn.Module, path, adapter_name: str = "default", *, value_dtype: str | None = None,
                 is_main_process: bool = True) -> str:
    """Write the adapter: a path ending in .safetensors -> that one file; any other path -> a folder
    with neuroada_config.json + neuroada_model.safetensors (neuroada_format.folder's layout, which PEFT
    does not mistake for one of its own). Returns the adapter file's path.

    Under FSDP2 call it on every rank (the deltas are gathered collectively) with
    is_main_process=False on all but one; that one writes.
    """
    path = _check_path_argument(path, "save_adapter")
    single = path.endswith(".safetensors")
    _check_save_path(path, single)
    model = unwrapped(model)
    prepared = _prepare_adapter(model, adapter_name, value_dtype)
    file = path if single else os.path.join(path, WEIGHTS_NAME)
    if is_main_process:
        _write_adapter(path, single, *prepared)
    return file


def _prepare_adapter(model: nn.Module, adapter_name: str, value_dtype: str | None):
    """The adapter and, for a folder, its config, checked as the write will check them: every problem is found
    before the first file is written (save_pretrained replaced default's files, then found b's deltas overflow
    F16, leaving a folder whose adapter and state disagreed)."""
    adapter = to_adapter(model, adapter_name, value_dtype=value_dtype)
    naf.validate(adapter, strict=True)
    config = getattr(model, CONFIGS_ATTR)[adapter_name]
    # save_dtype: what the file holds (value_dtype= overrides the config's; recorded as BF16, a reload re-saved F32
    # values rounded to BF16 without a word)
    cfg = NeuroAdaConfig.from_dict({**config.to_dict(), "base_model_name_or_path": adapter.base_name,
                                    "revision": adapter.base_revision, "save_dtype": value_dtype or config.save_dtype})
    return adapter, cfg


def _write_adapter(path: str, single: bool, adapter: naf.Adapter, cfg: NeuroAdaConfig) -> None:
    """One file (``single``), or a folder's two. The folder's files are both written to temporary siblings first and
    renamed after: a save failing half-way (a full disk, Ctrl-C) left new weights beside the old config, which loaded
    without a word (load_adapter refuses such a pair). The renames are recorded first (durable.write_files), so a
    kill -9 between them is finished by the next read or save. The adapter was validated by _prepare_adapter."""
    if single:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as for the folder form
        naf.save(adapter, path, check=False)
        return
    contents = _folder_contents(path, adapter, cfg)
    # two saves into one folder at once (every DDP rank calling save_pretrained) take turns: interleaved, one's
    # weights were published beside the other's config
    with checkpoint_lock(path, exclusive=True, wait=True):
        write_files(contents, folder=path)  # (recorded: a kill -9 between the renames is finished by the next read)


def _folder_contents(path: str, adapter: naf.Adapter, cfg: NeuroAdaConfig) -> dict[str, bytes]:
    """An adapter folder's two files, as write_files publishes them (the folder made if missing)."""
    os.makedirs(path, exist_ok=True)
    file, config_file = os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)
    return {file: encode_adapter(adapter, check=False, path=file), config_file: cfg.to_json().encode("utf-8")}
