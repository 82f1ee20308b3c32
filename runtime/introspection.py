"""What an adapted model holds, read without changing it: its trainable parameters, the base's saved structure and
the checkpoint key of each adaptable layer (Hugging Face's key renamings undone).

Kept apart because saving and the Hugging Face hooks read these, and attach installs those hooks."""
from __future__ import annotations

import sys

import torch
from torch import nn

import neuroada_format as naf

from .guards import TORCH_DTYPE_NAMES, takes_model
from .layer import own_state_read
from .targets import _adaptable, _foreign_wrappers, _in_foreign_adapter, _peft_prefix, plain_name


@takes_model
def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, counting each tensor once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


@takes_model
def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's line: every parameter counted once in "all" (frozen adapters' deltas and an unfrozen head too)."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")


def base_state_names(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The model's tensors under their original (unwrapped) names: name -> (dtype, shape).

    A tensor tied to an earlier one (lm_head.weight sharing the embeddings) is listed once, under its
    first name, as save_pretrained stores it, so the structure hash matches the saved checkpoint.
    NeuroAda's tensors and another library's adapter tensors (PEFT's lora_A/B) are not the base's.
    """
    first: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied parameter is one object
        if first.setdefault(id(p), name) != name:
            tied.add(name)
    wrappers = _foreign_wrappers(model)
    out = {}
    with own_state_read():
        state = model.state_dict()
    for name, t in state.items():
        if ".neuroada_" in name or name in tied or _in_foreign_adapter(name, wrappers):
            continue
        out[plain_name(model, name)] = (TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape))
    return out


def _hf_reverter(model: nn.Module):
    """``(hf_model, revert_weight_conversion)`` when transformers 5 may save `model` under other names, else None."""
    hf = model.base_model.model if _peft_prefix(model) else model  # the model the plain names are relative to
    utils = sys.modules.get("transformers.modeling_utils")
    if utils is None or not isinstance(hf, utils.PreTrainedModel):
        return None
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: checkpoint keys are the model's
        return None
    return hf, revert_weight_conversion


def saved_structure(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """base_state_names as transformers' save_pretrained writes them to the checkpoint: what the structure hash
    (spec 6.2) describes, so that validating an adapter against the saved base gives no false warning 4.5.

    transformers 5 keeps a "conversion mapping" between some models and their checkpoints, applied at load and
    reverted at save: GPT-NeoX's ``lm_head.weight`` is ``embed_out.weight`` on disk, MoE experts held as one 3D
    tensor are saved one linear per expert. Hashed under the model's names, every GPT-NeoX adapter was reported as
    made for another structure. The same reversal is run here on meta tensors (names, dtypes and shapes, no data)."""
    names = base_state_names(model)
    found = _hf_reverter(model)
    if found is None:
        return names
    hf, revert = found
    dtypes = {v: k for k, v in TORCH_DTYPE_NAMES.items()}
    meta = {n: torch.empty(shape, dtype=dtypes[d], device="meta") for n, (d, shape) in names.items() if d in dtypes}
    if len(meta) != len(names):
        return names
    try:
        saved = revert(hf, meta)
    except Exception:  # a mapping that cannot run on meta tensors (custom code): the hash is only a warning's
        return names
    return {n: (TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for n, t in saved.items()}


def checkpoint_keys(model: nn.Module) -> dict[str, str]:
    """Each adaptable weight's plain name -> its key in the checkpoint save_pretrained writes, where the two differ.

    Spec 2.5 keys a target by the base tensor's key, and the base a converter merges into is that checkpoint:
    transformers 5 holds Gemma 3's text layers as ``model.language_model.layers.N`` but saves (and the Hub's files
    hold) ``language_model.model.layers.N``, and GPT-NeoX's head is ``embed_out`` on disk. Keyed by the model's
    names, such an adapter could be loaded back but not merged into its own base's files (rule 4.1). The weights
    go through transformers' own reversal once, as meta tensors; a tensor it splits or fuses (MoE experts, never
    targets) keeps its name."""
    found = _hf_reverter(model)
    if found is None:
        return {}
    hf, revert = found
    meta = {plain_name(model, name) + ".weight": torch.empty(tuple(m.weight.shape), dtype=m.weight.dtype,
                                                             device="meta")
            for name, m in _adaptable(model).items() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    key_of = {id(t): key for key, t in meta.items()}
    seen: dict[str, list[str]] = {}
    try:
        saved = list(revert(hf, dict(meta)).items())
    except Exception:  # one at a time, so that a tensor the mapping cannot revert alone costs only its own name
        saved = []
        for key, t in meta.items():
            try:
                saved += list(revert(hf, {key: t}).items())
            except Exception:
                continue
    # a rename hands the same tensor object on; a split or fused tensor is a new one (no key of ours)
    for new, t in saved:
        if id(t) in key_of:
            seen.setdefault(key_of[id(t)], []).append(new)
    return {key: news[0] for key, news in seen.items() if len(news) == 1 and news[0] != key}


def _modules_by_key(model: nn.Module) -> dict[str, str]:
    """Adapter target key -> module name, for every adaptable linear: under the base's weight name in the model
    and, where transformers 5 saves it under another name, under that one too (checkpoint_keys)."""
    out = {plain_name(model, name) + ".weight": name for name in _adaptable(model)}
    for key, saved in checkpoint_keys(model).items():
        out.setdefault(saved, out[key])
    return out


def _module_for(by_key: dict[str, str], key: str, target: naf.Target) -> str | None:
    """The module an adapter's target is for: by its key, else by the module name a 1.2 file records."""
    name = by_key.get(key)
    if name is None and isinstance(target.extra.get("module"), str):
        name = by_key.get(target.extra["module"] + ".weight")
    return name
