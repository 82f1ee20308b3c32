"""Hugging Face integration: save_pretrained, the trainable state Trainer checkpoints and resumes from, the
load_state_dict hooks that check such a state against the model, and the PEFT-named methods installed on the model.

Kept apart because attach and load_adapter install these on the model and unload removes them."""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
import sys
import weakref

import torch
from torch import nn

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.durable import checkpoint_lock, write_files
from neuroada_format.errors import warn_caller
from neuroada_format.folder import (CONFIG_NAME, STATE_FILE, STATE_INTERRUPTED, STATE_MARKER, STATE_PROBE,
                                    STATE_TRAINING, WEIGHTS_NAME, state_text)

from .guards import CONFIGS_ATTR, HF_ATTR, TORCH_DTYPE_NAMES, _full, layers, name_list, takes_model, unwrapped
from .introspection import base_state_names
from .kernels.reference import gather_exact
from .layer import NeuroAdaLayer, own_state_read
from .saving import _check_save_path, _folder_contents, _prepare_adapter, _refuse_offloaded, layer_probe, layer_probe_of
from .targets import plain_name


# STATE_FILE: what Trainer resumes from, the trainable state, nothing else; STATE_MARKER: a key saying "this state
# holds what trains, not the base" (neuroada_format.folder, where every reader of an adapter folder looks for them)
# keys "_neuroada_probe.<layer>.<adapter>" of a trainable state: the probe hash (spec 6.1) of the base values the
# adapter trained on, as the bytes of its "sha256:<hex>" text, checked when the state is loaded (rule 4.3);
# STATE_TRAINING: the adapters that trained, so that a resume into a model where another one is active is refused


@takes_model
def trainable_state(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """What training changes, under the model's own state_dict keys: every adapter's indices and
    deltas (exact, in their training dtype) and any other parameter that requires grad (PEFT's LoRA,
    a head the user unfroze). The frozen base and w0 (read back from the base) are left out."""
    if state_dict is None:
        with own_state_read():  # idx is converted (a copy) below, w0 left out
            state_dict = model.state_dict()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    out = {}
    for key, t in state_dict.items():
        if ".neuroada_idx." in key:  # columns < d_in: int16 or int32 on disk (loading converts back)
            t = _full(t).detach().cpu()
            out[key] = t.to(torch.int16 if t.numel() == 0 or int(t.max()) < 32768 else torch.int32).contiguous()
        elif ".neuroada_val." in key or key in trainable:
            out[key] = _full(t).detach().cpu().contiguous()
    return out


def _warn_ignored_save_options(kwargs: dict) -> None:
    """transformers' save_pretrained options that would change what is written, given to an attached model's: the
    files here are fixed (adapter-sized safetensors, one state file), so they were ignored without a word; said now.
    Options that change nothing here (token, safe_serialization=True, ...) pass quietly, as transformers' do."""
    ignored = [f"{k}={kwargs[k]!r}" for k in ("variant", "max_shard_size", "save_function") if kwargs.get(k) is not None]
    if kwargs.get("safe_serialization") is False:
        ignored.append("safe_serialization=False (nothing here is ever pickled)")
    if ignored:
        warn_caller(f"save_pretrained of an attached model writes the adapter files and one adapter-sized "
                    f"model.safetensors; ignored: {', '.join(ignored)}")


def save_pretrained(model: nn.Module, save_directory, *, is_main_process: bool = True, state_dict: dict | None = None,
                    selected_adapters: list[str] | None = None, push_to_hub: bool = False, **kwargs) -> None:
    """`model.save_pretrained` of an attached model (attach installs it on the instance), and so what
    transformers.Trainer's save_model and periodic checkpoints write:

    - each adapter in the format (`neuroada_config.json` + `neuroada_model.safetensors`; "default" in
      the folder itself, any other in a sub-folder of its name, as PEFT does), loadable with load_adapter;
    - `model.safetensors`: the trainable state (see trainable_state), exact, which Trainer's resume and
      load_best_model_at_end load with `model.load_state_dict(..., strict=False)`; with `selected_adapters`, only
      theirs of the adapters' deltas (loading it leaves the model's other adapters as they are).

    Adapter-sized, like a PEFT checkpoint. Nothing in it lets `from_pretrained` build a model with
    random base weights: there is no config.json (AutoModel*.from_pretrained raises), and with a config
    passed in, the guard tensor in model.safetensors makes the load fail on a size mismatch.
    """
    if push_to_hub:
        raise NeuroAdaUsageError("save_pretrained(push_to_hub=True) is not supported for an attached model; "
                                 "save the folder and upload it yourself")
    _warn_ignored_save_options(kwargs)
    folder = os.fspath(save_directory)
    model = unwrapped(model)
    if os.path.isfile(folder):
        raise NeuroAdaUsageError("save_pretrained needs a folder, not a file", path=folder)
    configs = getattr(model, CONFIGS_ATTR, None) or {}
    names = list(configs) if selected_adapters is None else name_list(selected_adapters, "selected_adapters")
    for name in names:
        if name not in configs:
            raise NeuroAdaUsageError(f"no adapter named {name!r} (have: {', '.join(configs) or 'none'})")
    _refuse_model_weights(folder)
    _refuse_offloaded(model, names)
    state = trainable_state(model, state_dict)
    if selected_adapters is not None:  # the other adapters' deltas are not saved: their training is not this save's
        state = {k: v for k, v in state.items() if _state_adapter(k) in (None, *names)}
    paths = {name: folder if name == "default" else os.path.join(folder, name) for name in names}
    for path in paths.values():
        _check_save_path(path, single=False)
    prepared = {name: _prepare_adapter(model, name, None) for name in names}  # all checked before any write
    if not is_main_process:
        return
    from safetensors.torch import save_file

    # A guard against transformers: from_pretrained(folder, config=...) would load this file, find every
    # base weight missing and initialise them at random with a warning. Under one real base name the
    # file holds a tensor of an impossible shape, so that load fails (size mismatch) instead; our own
    # load_state_dict hook drops it, named by the marker.
    guard = next((k for k in base_state_names(model) if k not in state), "")
    if guard:  # (none when every base tensor trains: the state is then a whole model)
        state[guard] = torch.zeros(0, dtype=torch.uint8)
    state[STATE_MARKER] = _text_tensor(guard)
    # the base each adapter trained on, per layer: loading onto another base (another model, revision or weights)
    # is refused by the load hook, which recomputes it (see _check_state_probes). A tensor, not file metadata:
    # Trainer's resume and load_best_model_at_end hand load_state_dict the tensors only.
    for name, layer in layers(model).items():
        for adapter in layer.neuroada_idx.keys():
            if f"{name}.neuroada_idx.{adapter}" in state:
                state[f"{STATE_PROBE}.{name}.{adapter}"] = _text_tensor(layer_probe(layer, adapter))
    saved = {_state_adapter(k) for k in state} - {None}
    state[STATE_TRAINING] = _text_tensor("\n".join(sorted(_training_adapters(model) & saved)))
    # Every file is published as one set (write_files) under the folder's lock and those of the adapters' sub-folders:
    # two saves into one folder at once (two jobs, or ranks) left one's adapters beside the other's state, which was
    # written after the lock; one killed between two renames is finished by the next read or save of the folder.
    os.makedirs(folder, exist_ok=True)
    contents = {}
    for name, path in paths.items():
        contents.update(_folder_contents(path, *prepared[name]))
    # one metadata key only: safetensors writes them from a hash map, in an order that varies by process
    contents[os.path.join(folder, STATE_FILE)] = lambda tmp: save_file(state, tmp, metadata={"format": "pt"})
    # until the set is in place, the state file is a stand-in that the load hook refuses: Trainer's resume reads that
    # file alone, and a checkpoint killed mid-save resumed from the previous save's state (or found none)
    stand_in = {STATE_MARKER: state[STATE_MARKER], STATE_INTERRUPTED: _text_tensor(os.path.abspath(folder)),
                **({guard: state[guard]} if guard else {})}
    interim = {os.path.join(folder, STATE_FILE): lambda tmp: save_file(stand_in, tmp, metadata={"format": "pt"})}
    with contextlib.ExitStack() as locks:  # the folder first, then its sub-folders: the order every save takes
        for path in sorted(set(paths.values()) | {folder}, key=lambda p: (p != folder, p)):
            locks.enter_context(checkpoint_lock(path, exclusive=True, wait=True))
        write_files(contents, folder=folder, interim=interim)


def _refuse_model_weights(folder: str) -> None:
    """save_pretrained writes the trainable state as model.safetensors: into a folder that holds a model's own weights
    (the base model's folder, where a PEFT user might save an adapter beside it) that would replace the base weights
    with an adapter-sized file, or shadow sharded/.bin ones for from_pretrained. Refused before anything is written;
    a model.safetensors this function wrote before (a checkpoint saved again) is overwritten as usual."""
    for name in ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(folder, name)):
            raise NeuroAdaUsageError(f"the folder holds a model's weights ({name}), and save_pretrained writes "
                                     f"{STATE_FILE} (the adapters' trainable state), which from_pretrained would read "
                                     f"instead of them: save the adapter into another folder", path=folder)
    state = os.path.join(folder, STATE_FILE)
    if not os.path.lexists(state):
        return
    from safetensors import safe_open

    try:
        with safe_open(state, framework="np") as f:
            ours = STATE_MARKER in f.keys()
    except Exception:
        ours = False
    if not ours:
        raise NeuroAdaUsageError(f"{STATE_FILE} in this folder is not a trainable state save_pretrained wrote (a "
                                 f"model's weights?), and saving would replace it with the adapters' trainable state: "
                                 f"save the adapter into another folder (or remove that file first)", path=folder)


def _training_adapters(model: nn.Module) -> set[str]:
    """The adapters whose deltas require grad (in any layer): the ones an optimizer built now would hold."""
    return {a for layer in layers(model).values() for a, v in layer.neuroada_val.items() if v.requires_grad}


def _check_state_training(module: nn.Module, saved, named: set[str]) -> None:
    """A trainable state is loaded by Trainer's resume before the optimizer state saved with it: with another adapter
    active than in the run that saved it (set_adapter left out when the model was rebuilt), the optimizer's moments,
    checked by torch for their count only, went to that adapter's deltas, which trained on in silence (same k) or
    crashed the process (another k). Compared over the adapters both sides have; a model training none (loading for
    evaluation), or a state saved when none trained, is left alone."""
    model_names = {a for layer in layers(module).values() for a in layer.neuroada_val.keys()}
    was = set(filter(None, state_text(saved).split("\n"))) & model_names
    now = _training_adapters(module) & named
    if now and was and now != was:
        raise NeuroAdaError(f"this trainable state was saved while adapter(s) {', '.join(sorted(was)) or 'none'} "
                            f"trained, and in this model {', '.join(sorted(now))} would: its optimizer state would "
                            f"train the wrong deltas; make the same adapter(s) active as in the run that saved it "
                            f"(set_adapter) before loading; nothing was loaded", rule="4.1")


def _warn_delta_dtypes(module: nn.Module, state_dict, prefix: str) -> None:
    """Deltas saved in one dtype and loaded into another (delta_dtype changed between runs) are rounded, and the
    optimizer state saved with them no longer fits their dtype: said once, not refused (the values are usable)."""
    for name, layer in layers(module).items():
        for adapter, v in layer.neuroada_val.items():
            got = state_dict.get(f"{prefix}{name}.neuroada_val.{adapter}")
            if isinstance(got, torch.Tensor) and got.dtype != v.dtype:
                warn_caller(f"adapter {adapter!r}: the trainable state holds {str(got.dtype)[6:]} deltas and this "
                            f"model's are {str(v.dtype)[6:]} (delta_dtype): loading converts them, and an optimizer "
                            f"state saved with them does not fit; attach with the run's delta_dtype to resume "
                            f"exactly")
                return


def _state_adapter(key: str) -> str | None:
    """The adapter a trainable-state key holds deltas or positions of (``<layer>.neuroada_val.<adapter>``), or None."""
    if ".neuroada_idx." in key or ".neuroada_val." in key:
        return key.rsplit(".", 1)[1]
    return None


def _text_tensor(text: str) -> torch.Tensor:
    """A text as a uint8 tensor of its UTF-8 bytes: how the trainable state carries words (Trainer reads tensors
    only)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _state_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """A state marked as trainable state (save_pretrained's model.safetensors) holds no base by design;
    its guard tensor (see save_pretrained) is not a weight, nor are its probe hashes, which are checked against this
    model's base (see _check_state_probes) and never reach torch (no unexpected keys). A save's stand-in
    (STATE_INTERRUPTED) is refused: its checkpoint was killed while it was written."""
    interrupted = state_dict.get(prefix + STATE_INTERRUPTED)
    if interrupted is not None:
        where = state_text(interrupted)
        raise NeuroAdaError(f"this trainable state is the stand-in of a save that was killed before its files were all "
                            f"in place (a checkpoint interrupted while it was written): Trainer's files beside it "
                            f"(optimizer.pt, trainer_state.json) are from before that save or missing, so nothing was "
                            f"loaded. Resume from an earlier checkpoint; load_adapter({where!r}) finishes the save "
                            f"and loads its adapters", path=where)
    marker = state_dict.pop(prefix + STATE_MARKER, None)
    training = state_dict.pop(prefix + STATE_TRAINING, None)
    head = f"{prefix}{STATE_PROBE}."
    probes = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(head)]}
    module.__dict__["_neuroada_partial_load"] = None
    if marker is not None:
        guard = state_text(marker)
        if guard:
            state_dict.pop(prefix + guard, None)
        named = module.__dict__["_neuroada_partial_load"] = _check_state_adapters(module, state_dict, prefix)
        if training is not None:
            _check_state_training(module, training, named)
        _warn_delta_dtypes(module, state_dict, prefix)
    held = layers(module)
    for name in held:  # a base checkpoint loaded after attach: torch would leave every adapted layer out in silence
        for attr in ("weight", "bias"):
            if f"{prefix}{name}.{attr}" in state_dict and f"{prefix}{name}.base_layer.{attr}" not in state_dict:
                raise NeuroAdaUsageError(
                    f"the state holds the base {attr} of an adapted layer under its plain name, which attach moved to "
                    f"{name}.base_layer.{attr}: loading base weights after attach would leave every adapted layer "
                    "out (strict=False says nothing), and attach selected the positions from the weights it found; "
                    "load the base weights first, then attach", tensor=f"{prefix}{name}.{attr}")
    # every layer checks its part before any loads, so a refused state changes nothing
    prepared = []
    try:
        for name, layer in held.items():
            layer_prefix = f"{prefix}{name}."
            if layer._loading is None and any(k.startswith(layer_prefix) for k in state_dict):
                layer._loading = {"merged": layer.prepare_load(state_dict, layer_prefix)}
                prepared.append(layer)
        if probes:  # after the shapes (4.2) and unmerged: the weights hold the base again
            _check_state_probes(module, held, state_dict, prefix, probes)
    except NeuroAdaError:
        for layer in prepared:
            merged, layer._loading = layer._loading["merged"], None
            if merged:
                layer.merge(merged)
        raise


def _check_state_adapters(module: nn.Module, state_dict, prefix: str) -> set[str]:
    """A trainable state (save_pretrained's model.safetensors) must fit the model's adapters. Loaded with strict=False
    (Trainer's resume and load_best_model_at_end) a mismatch is otherwise only a logged warning: an adapter attached
    under another name or on other targets would go on training from zero deltas, with the saved optimizer state
    (same parameter count) applied to them. So the state must name at least one of the model's adapters, and each
    adapter both have must have the same tensors in both. Adapters only one side has are left alone (a server that
    loaded some of a folder's adapters, then the state for its unfrozen head; a state save_pretrained wrote for
    selected_adapters). Returns the adapters the state names."""
    have, model_names = set(), set()
    for name, layer in layers(module).items():
        for adapter in layer.neuroada_idx.keys():
            model_names.add(adapter)
            have.update(f"{prefix}{name}.neuroada_{kind}.{adapter}" for kind in ("idx", "val"))
    got = {k for k in state_dict if k.startswith(prefix) and _state_adapter(k)}
    names = {_state_adapter(k) for k in got}
    both = names & model_names
    unexpected = sorted(k for k in got - have if _state_adapter(k) in both)
    missing = sorted(k for k in have - got if _state_adapter(k) in both)
    if (names and not both) or unexpected or missing:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for v, what in ((unexpected, "not in the model"),
                                                                  (missing, "missing from the state")) if v]
        detail = f"adapter tensors {'; '.join(parts)}. " if parts else ""
        raise NeuroAdaError(f"this trainable state does not fit the model's adapters: {detail}The state holds "
                            f"adapter(s) {', '.join(sorted(names))}, the model has "
                            f"{', '.join(sorted(model_names)) or 'none'}: build the model as for the run that saved "
                            f"it (same attach config and adapter name); nothing was loaded", rule="4.1")
    return names


def _check_state_probes(module: nn.Module, held: dict[str, NeuroAdaLayer], state_dict, prefix: str,
                        probes: dict[str, torch.Tensor]) -> None:
    """Rule 4.3 for a trainable state: each adapter's probe hash, recorded by save_pretrained, recomputed from this
    model's base values at the state's positions. Without it a checkpoint resumed onto another base (the model name
    or revision changed between runs, other weights of the same architecture) loaded silently and trained on, and the
    adapter saved later would claim a base it never trained on. Reads d_out*k values per layer: the layer's originals
    (w0) where the state's positions are the layer's own, else the unmerged weight at them. The values are hashed as
    the base holds them (spec 14): a base widened exactly (BF16 -> F32) is the same base, one rounded is not."""
    head = f"{prefix}{STATE_PROBE}."
    for key, saved in sorted(probes.items()):
        name, _, adapter = key[len(head):].rpartition(".")
        layer = held.get(name)
        idx = state_dict.get(f"{prefix}{name}.neuroada_idx.{adapter}")
        if layer is None or adapter not in layer.neuroada_idx or idx is None:
            continue  # an adapter the model does not have is left alone (see _check_state_adapters)
        own = layer.neuroada_idx[adapter]
        idx = idx.to(device=own.device, dtype=torch.int64)
        if torch.equal(idx, own):
            values = layer.neuroada_w0[adapter]
            if values.is_meta:
                continue  # offloaded (refused at the first forward, see NeuroAdaLayer.check_in_memory)
        else:
            w = layer._canonical_weight()
            if type(w) not in (torch.Tensor, nn.Parameter) or w.is_meta:
                continue  # sharded or offloaded: no whole weight to read the other positions from
            values = gather_exact(w.detach(), idx.to(w.device))
        if layer_probe_of(values) == state_text(saved):
            continue
        have = TORCH_DTYPE_NAMES.get(layer.weight.dtype)
        hint = (f" (or from this base in a wider dtype, e.g. float32, whose values {have} rounds: the hash covers the "
                f"values it trained on; then load the model in that dtype)" if have in ("F16", "BF16") else "")
        raise NeuroAdaError(f"adapter {adapter!r}: the probe hash of the base values at its positions differs from the "
                            f"one saved with it: the checkpoint was trained on another base model or revision: build "
                            f"the model from the base it was trained on{hint}; nothing was loaded",
                            tensor=plain_name(module, name) + ".weight", rule="4.3")


def _state_post_hook(module, incompatible_keys) -> None:
    """w0 is never missing (it is read back from the base); nor, when a trainable state loads, is the base or an
    adapter the state does not name (left alone, see _check_state_adapters), so strict loads of it work too."""
    named = module.__dict__.pop("_neuroada_partial_load", None)
    keep = [k for k in incompatible_keys.missing_keys if ".neuroada_w0." not in k
            and (named is None or (".neuroada_" in k and _state_adapter(k) in (None, *named)))]
    incompatible_keys.missing_keys[:] = keep


class _ModelMethod:
    """``func(model, ...)`` kept in the model's own ``__dict__`` (transformers' methods are the class's), holding the
    model weakly: a partial there was a reference cycle, so a deleted adapted model, its weights and GPU memory
    included, lived on until the cyclic collector ran (never, under ``gc.freeze()``). A deep copy's method is the
    copy's, and a pickle's the unpickled model's."""

    def __init__(self, func, model: nn.Module):
        self.func, self.model = func, weakref.ref(model)

    def __call__(self, *args, **kwargs):
        model = self.model()
        if model is None:  # (a bare AttributeError on None, from deep inside the call)
            raise NeuroAdaUsageError(f"{self.func.__name__}: its model no longer exists (a temporary, as in "
                                     f"attach(load(...), config).{self.func.__name__}(...), is freed as soon as the "
                                     f"method is looked up): keep the model in a variable and call it on that")
        return self.func(model, *args, **kwargs)

    def __deepcopy__(self, memo):
        model = self.model()  # (func copied too: a method it wraps is the copy's)
        return type(self)(copy.deepcopy(self.func, memo), memo.get(id(model), model))

    def __reduce__(self):
        return type(self), (self.func, self.model())


class _OwnMethod(_ModelMethod):
    """A _ModelMethod standing in for one of the model's own methods (``func.own(model)``: forward, generate), whose
    parameters transformers and Trainer read (which inputs generate passes, which dataset columns Trainer keeps):
    inspect.signature shows that method's, not ``(*args, **kwargs)``."""

    @property
    def __signature__(self):
        model = self.model()
        return None if model is None else inspect.signature(self.func.own(model))


# transformers' PEFT-integration methods -> what does that here. They see PEFT's adapters only, and on a model with
# NeuroAda ones said "No adapter loaded. Please load an adapter first." (load_adapter: "adapter model file not found")
_HF_PEFT_METHODS = {"set_adapter": "set_adapter(model, name)",
                    "active_adapters": "list_adapters(model) (merged_adapter(model): the one set_adapter serves)",
                    "disable_adapters": "`with disable_adapter(model):` (the plain base inside the block)",
                    "enable_adapters": "`with disable_adapter(model):` (the adapter is back after the block)",
                    "delete_adapter": "delete_adapter(model, name)",
                    "get_adapter_state_dict": "trainable_state(model), or save_adapter(model, path)",
                    "load_adapter": "load_adapter(model, path)"}


class _HfPeftMethod:
    """transformers' ``model.<name>`` on an attached model: its own where PEFT adapters are loaded through it (a LoRA
    added with model.add_adapter beside ours), else refused with the neuroada_format.runtime call that does it.
    ``model.load_adapter`` is refused for a NeuroAda folder or file only: a PEFT folder still loads through it.
    (A class, not a closure: an attached model pickles, torch.save(model).)"""

    def __init__(self, name: str):
        self.name = name

    @property
    def __name__(self) -> str:
        """What _ModelMethod names the call by, as for a function (its 'model no longer exists' message)."""
        return self.name

    def __call__(self, model: nn.Module, *args, **kwargs):
        name, ours = self.name, True
        if name == "load_adapter":
            path = args[0] if args else kwargs.get("peft_model_id")
            ours = isinstance(path, (str, os.PathLike)) and (
                os.path.exists(os.path.join(path, CONFIG_NAME)) or os.path.exists(os.path.join(path, WEIGHTS_NAME))
                or (os.path.isfile(path) and os.fspath(path).endswith(".safetensors")))
        if not ours or getattr(model, "_hf_peft_config_loaded", False):
            return getattr(type(model), name)(model, *args, **kwargs)
        raise NeuroAdaUsageError(f"model.{name} is transformers' PEFT integration, which does not see NeuroAda "
                                 f"adapters; neuroada_format.runtime's functions do: {_HF_PEFT_METHODS[name]}")


def _install_hf(model: nn.Module) -> None:
    """Make the HF entry points save and load the adapter: a per-instance save_pretrained (see _ModelMethod) and
    load_state_dict hooks on the model; transformers' PEFT-integration methods say what to call instead; forward and
    generate take PEFT's adapter_names (see keyword_batch)."""
    if callable(getattr(model, "save_pretrained", None)):
        model.__dict__["save_pretrained"] = _ModelMethod(save_pretrained, model)
    mixin = getattr(sys.modules.get("transformers.integrations.peft"), "PeftAdapterMixin", None)
    for name in _HF_PEFT_METHODS:  # transformers' own only: a model class's own method of that name is left alone
        if mixin is not None and getattr(type(model), name, None) is getattr(mixin, name, False):
            model.__dict__[name] = _ModelMethod(_HfPeftMethod(name), model)
    if callable(getattr(type(model), "resize_token_embeddings", None)):
        model.__dict__["resize_token_embeddings"] = _ModelMethod(resize_token_embeddings, model)
    from .keyword_batch import KeywordBatch  # (it builds on multi, which imports this module's importers)

    for name in ("forward", "generate"):  # PEFT's model(..., adapter_names=[...]) (see keyword_batch)
        current = model.__dict__.get(name)
        if callable(getattr(type(model), name, None)) and not _keyword_batch(current):
            model.__dict__[name] = _OwnMethod(KeywordBatch(name, current), model)
    if getattr(model, HF_ATTR, None) is None:
        setattr(model, HF_ATTR, (model.register_load_state_dict_pre_hook(_state_pre_hook),
                                 model.register_load_state_dict_post_hook(_state_post_hook)))


def _keyword_batch(method) -> bool:
    """Whether ``method`` (a model's own attribute) is the forward or generate _install_hf put there."""
    from .keyword_batch import KeywordBatch

    return isinstance(method, _OwnMethod) and isinstance(method.func, KeywordBatch)


def resize_token_embeddings(model: nn.Module, *args, **kwargs):
    """`model.resize_token_embeddings` of an attached model: refused, before anything changes, when the output head
    is an adapted layer. transformers resized the input embeddings first, then failed on the head with a raw
    TypeError (not an nn.Linear), leaving the model half resized; and a head of another shape would not fit the
    positions its adapters index anyway. Otherwise transformers' own method."""
    heads = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(heads, NeuroAdaLayer):
        raise NeuroAdaUsageError("resize_token_embeddings would change the shape of the output head, which an adapter "
                                 "adapts (its positions index the old rows): resize before attach, or leave the head "
                                 "out of target_modules; nothing was resized")
    return type(model).resize_token_embeddings(model, *args, **kwargs)


def _uninstall_hf(model: nn.Module) -> None:
    model.__dict__.pop("save_pretrained", None)
    for name in _HF_PEFT_METHODS:
        model.__dict__.pop(name, None)
    model.__dict__.pop("resize_token_embeddings", None)
    for name in ("forward", "generate"):  # the method the model had before comes back (one wrapped since stays)
        ours = model.__dict__.get(name)
        if _keyword_batch(ours):
            if ours.func.previous is None:
                del model.__dict__[name]
            else:
                model.__dict__[name] = ours.func.previous
    for handle in getattr(model, HF_ATTR, None) or ():
        handle.remove()
    if HF_ATTR in model.__dict__:
        delattr(model, HF_ATTR)
