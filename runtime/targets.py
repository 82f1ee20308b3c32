"""Which modules an adapter targets, and the checkpoint name of each: target_modules matching (PEFT's rules), the
output head left out, layers inside a foreign (PEFT) adapter or read by their owner without a call refused.

Kept apart because attach, save and load all name layers the same way."""
from __future__ import annotations

import re
import sys

from torch import nn

from neuroada_format import NeuroAdaUsageError

from .config import NeuroAdaConfig
from .guards import _linear_types
from .layer import NeuroAdaLayer


def _matches(name: str, spec) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _output_head_names(model: nn.Module) -> set[str]:
    """The output head "all-linear" leaves out: the output embeddings, else (classification models, whose head is
    not one) modules named as PEFT's sequence-classification heads are, ``score`` or ``classifier``."""
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, m in model.named_modules():
        if head is not None and m is head:
            names.add(name)
    if not names:
        names.update(n for n, _ in model.named_modules() if n.split(".")[-1] in ("lm_head", "score", "classifier"))
    return names


def _foreign_wrappers(model: nn.Module) -> dict[str, str]:
    """PEFT's modules that keep the original layer inside them, by name -> the attribute holding it:
    tuner layers (LoRA's Linear etc., `base_layer`) and ModulesToSaveWrapper (`original_module`).
    Everything else inside them (lora_A, lora_B, the trainable copies) is PEFT's adapter. Looked up,
    not imported: when PEFT was never loaded, no module can be one of its wrappers."""
    tuners, utils = sys.modules.get("peft.tuners.tuners_utils"), sys.modules.get("peft.utils.other")
    kinds = [(getattr(tuners, "BaseTunerLayer", None), "base_layer"),
             (getattr(utils, "AuxiliaryTrainingWrapper", None), "original_module")]
    kinds = [(k, attr) for k, attr in kinds if k is not None]
    out = {}
    if not kinds:
        return out
    for name, m in model.named_modules():
        for kind, attr in kinds:
            if isinstance(m, kind) and isinstance(m._modules.get(attr), nn.Module):
                out[name] = attr
                break
    return out


def _in_foreign_adapter(name: str, wrappers: dict[str, str]) -> bool:
    """True for a module or tensor that belongs to another library's adapter (off the original's path)."""
    for w, attr in wrappers.items():
        head = w + "." if w else ""
        if name.startswith(head) and name != w:
            rest = name[len(head):]
            if rest != attr and not rest.startswith(attr + "."):
                return True
    return False


def _peft_prefix(model: nn.Module) -> str:
    """"base_model.model." for a PeftModel (its names wrap the transformers model's), else ""."""
    peft = sys.modules.get("peft")
    kinds = tuple(k for k in (getattr(peft, "PeftModel", None), getattr(peft, "PeftMixedModel", None)) if k)
    return "base_model.model." if kinds and isinstance(model, kinds) else ""


def plain_name(model: nn.Module, name: str) -> str:
    """A module or tensor name as the plain base model has it: wrappers' `base_layer` steps (ours and
    PEFT's) and a PeftModel's prefix removed. Adapter files are keyed by these names."""
    prefix = _peft_prefix(model)
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]
    return ".".join(part for part in name.split(".") if part not in ("base_layer", "original_module"))


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer NeuroAda may adapt (or already adapts), by module name: NeuroAdaLayers, and
    plain linears that are neither inside one nor part of another library's adapter."""
    linear = _linear_types()
    wrappers = _foreign_wrappers(model)
    ours = [n for n, m in model.named_modules() if isinstance(m, NeuroAdaLayer)]
    out = {}
    for name, m in model.named_modules():
        if not name or _in_foreign_adapter(name, wrappers):
            continue
        if any(name.startswith(n + ".") for n in ours):
            continue  # the inside of a NeuroAdaLayer
        if isinstance(m, NeuroAdaLayer) or (isinstance(m, linear) and name not in wrappers):
            out[name] = m
    return out


def find_targets(model: nn.Module, config: NeuroAdaConfig) -> list[str]:
    """Module names to adapt, with PEFT's target_modules / exclude_modules semantics.

    Names are matched as the plain base model has them (see plain_name), so on a model carrying PEFT
    LoRA "q_proj" means the original linear inside PEFT's wrapper; LoRA's own layers are never targets.
    """
    for field in ("target_modules", "exclude_modules"):
        spec = getattr(config, field)
        if not isinstance(spec, str) and spec is not None and any(s.lower() == "all-linear" for s in spec):
            # a list entry matches module names, so ["all-linear", "q_proj"] silently adapted q_proj alone
            raise NeuroAdaUsageError(f"{field}={spec!r}: 'all-linear' is a shorthand only as the whole value, "
                                     f"{field}='all-linear' (a string); in a list it would be matched as a module name")
    heads = {plain_name(model, n) for n in _output_head_names(model)}
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear"
    wrappers = _foreign_wrappers(model)
    candidates = _adaptable(model)
    out = []
    for name, m in model.named_modules():
        if not name or name in candidates or _in_foreign_adapter(name, wrappers) or name in wrappers:
            continue
        plain = plain_name(model, name)
        if not all_linear and _matches(plain, config.target_modules) and not _matches(plain, config.exclude_modules):
            if not any(plain_name(model, c) == plain for c in candidates):
                cls = type(m)
                raise NeuroAdaUsageError(f"target module {name} is a {cls.__module__}.{cls.__qualname__}; NeuroAda "
                                         "adapts nn.Linear and transformers Conv1D layers with float weights")
    bypassed = _bypassed_linears(model)
    for name, m in candidates.items():
        plain = plain_name(model, name)
        in_head = plain in heads or any(plain.startswith(h + ".") for h in heads)  # RoBERTa's head is two linears
        hit = not in_head if all_linear else _matches(plain, config.target_modules)
        if hit and not _matches(plain, config.exclude_modules):
            if name in bypassed and not isinstance(m, NeuroAdaLayer):
                if all_linear:
                    continue  # (its in_proj_weight is a parameter, never a target: the attention is the base's)
                raise NeuroAdaUsageError(
                    f"target module {name} is the out_proj of an nn.MultiheadAttention, which reads its weight "
                    f"itself and never calls it: a delta there would neither train nor apply before merging; leave "
                    f"it out (exclude_modules=['out_proj'] or a target_modules that does not match it)")
            out.append(name)
    if not all_linear:
        _refuse_parameter_targets(model, config, candidates, wrappers, matched=bool(out))
    if not out:
        hint = ""
        if isinstance(config.target_modules, str) and not all_linear and any(
                _matches(plain_name(model, c), [config.target_modules]) for c in candidates):
            # target_modules="q_proj": PEFT's rule too, but the message did not say why nothing matched
            hint = (f" (a string is a regex that must match the whole module name; to match it as a name or dotted "
                    f"suffix, pass a list: target_modules=[{config.target_modules!r}])")
        raise NeuroAdaUsageError(f"no module matches target_modules={config.target_modules!r}{hint}")
    return sorted(set(out))


def _refuse_parameter_targets(model: nn.Module, config: NeuroAdaConfig, candidates: dict[str, nn.Module],
                              wrappers: dict[str, str], matched: bool) -> None:
    """target_modules that name parameters, not modules: say so. transformers 5 holds the experts of MoE models
    (Mixtral, Qwen2/3-MoE, ...) as 3D parameters of one module (``mlp.experts.gate_up_proj`` [experts, 2*ff, d]),
    so the ``gate_up_proj`` / ``down_proj`` targets users carried over from per-expert linears matched nothing, and
    were reported as matching no module at all; beside a name that did match (``["q_proj", "down_proj"]``, a dense
    layer's ``down_proj`` next to experts) they were dropped without a word, and the experts never trained."""
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in candidates or any(owner.startswith(c + ".") for c in candidates) or \
                _in_foreign_adapter(name, wrappers):
            continue  # a linear layer's own weight or bias (or inside one of ours, or another library's adapter)
        plain = plain_name(model, name)
        if _matches(plain, config.target_modules) and not _matches(plain, config.exclude_modules):
            cls = type(model.get_submodule(owner)) if owner else type(model)
            moe = (" (MoE experts held as one 3D tensor are not supported: target linear layers, e.g. the "
                   "attention projections or a shared expert)") if p.dim() == 3 else ""
            suffix = ".".join(plain.split(".")[-2:])  # every layer's copy (one MoE block per decoder layer)
            keep = (f"; to adapt only the linear layers it matches, add {suffix!r} to exclude_modules"
                    if matched else "")
            raise NeuroAdaUsageError(f"target_modules={config.target_modules!r} names the parameter {plain} "
                                     f"({list(p.shape)}) of {owner or 'the model'} ({cls.__qualname__}), not a linear "
                                     f"layer: NeuroAda adapts nn.Linear and transformers Conv1D modules{moe}{keep}")


def _bypassed_linears(model: nn.Module) -> set[str]:
    """Linears whose owner reads their weight itself and never calls them: nn.MultiheadAttention hands
    ``out_proj.weight`` to F.multi_head_attention_forward (fast path or not, in training too), so a delta there would
    neither train nor apply before a merge."""
    return {f"{name}.out_proj".lstrip(".") for name, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention) and isinstance(getattr(m, "out_proj", None), nn.Linear)}
