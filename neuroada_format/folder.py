"""Adapter folders: the layout `save_adapter` writes, and the one resolver every entry point uses.

A folder holds `neuroada_config.json` (the training configuration, PEFT-like keys) and
`neuroada_model.safetensors` (the adapter, one file of the spec). The names are our own on purpose:
PEFT and transformers pick up any folder with an `adapter_config.json` and then fail on a `peft_type`
they do not know, so a NeuroAda folder must not look like a PEFT one. Folders written before this
layout (`adapter_config.json` with `peft_type: "NEUROADA"` + `adapter_model.safetensors`) still load.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

from .dtypes import VALUE_DTYPES
from .durable import finish_publishes, reading_folder
from .errors import NeuroAdaError, NeuroAdaUsageError, warn_caller
from .jsonparse import read_json
from .safe_io import check_regular

CONFIG_NAME = "neuroada_config.json"
WEIGHTS_NAME = "neuroada_model.safetensors"
LEGACY_CONFIG_NAME = "adapter_config.json"
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_CAP = 1 << 20  # a training configuration is a few hundred bytes


def read_config(path) -> dict:
    """An adapter folder's configuration file as a dict, read the one safe way (regular files only,
    at most CONFIG_CAP bytes, the one JSON parser and its limits: jsonparse).

    NeuroAdaUsageError when it cannot be read (missing, a FIFO, a device), NeuroAdaError when it is
    not a JSON object. The runtime's config loader and the converters read configs through this.
    """
    path = os.fspath(path)
    doc = read_json(path, rule=None, what="adapter config", cap=CONFIG_CAP)
    if not isinstance(doc, dict):
        raise NeuroAdaError(f"adapter config is a JSON {type(doc).__name__}, not an object", path=path)
    return doc


SELECTIONS = ("magnitude", "reverse", "random", "gradient")  # the rules the runtime's attach can compute
RECORDED_SELECTIONS = SELECTIONS + ("delta", "union", "custom")  # spec rules a loaded adapter may carry
MODES = ("auto", "inplace", "additive")
# PEFT's TaskType values (peft.utils.peft_types.TaskType, checked as PeftConfig checks them): task_type is metadata
# a PEFT user sets, kept in the config file and read back, never acted on (neuroada-pack --to peft writes it too)
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

_LAYERS_HINT = (r"adapt some layers only with a target_modules regex, e.g. target_modules=r'.*\.layers\.(0|1|2)\."
                r"self_attn\.(q_proj|v_proj)' (it must fullmatch the module name)")
_LORA_HINT = "it is a LoRA setting; NeuroAda trains k sparse deltas per output row (set k)"
# Options of PEFT's LoraConfig (and PeftConfig) that NeuroAda does not implement, with what to do instead. A PEFT
# user passes them out of habit: refused by name (NeuroAdaConfig's keywords, a config file's keys), never dropped,
# since training without what they ask for would look like it worked.
PEFT_UNSUPPORTED = {
    "modules_to_save": "unfreeze those modules yourself after attach (module.requires_grad_(True)): save_pretrained "
                       "keeps trained non-adapter tensors in model.safetensors",
    "layers_to_transform": _LAYERS_HINT,
    "layers_pattern": _LAYERS_HINT,
    "rank_pattern": "an adapter has one k for all its targets; attach another adapter with its own k and "
                    "target_modules for other modules",
    "alpha_pattern": _LORA_HINT,
    "r": _LORA_HINT,
    "lora_alpha": _LORA_HINT,
    "lora_dropout": _LORA_HINT,
    "use_rslora": _LORA_HINT,
    "use_dora": _LORA_HINT,
    "init_lora_weights": "NeuroAda's deltas start at zero (the adapted model starts as the base)",
    "bias": "NeuroAda adapts weights only; biases stay frozen (unfreeze them yourself after attach to train them)",
    "fan_in_fan_out": "the layout is detected: transformers' Conv1D layers (GPT-2) are adapted as they are",
    "lora_bias": _LORA_HINT,
    "megatron_config": "Megatron layers are not adapted; NeuroAda wraps nn.Linear and transformers Conv1D",
    "megatron_core": "Megatron layers are not adapted; NeuroAda wraps nn.Linear and transformers Conv1D",
    "layer_replication": "replicate layers in the base model before attaching",
    "trainable_token_indices": "unfreeze the embedding yourself after attach to train it",
    "target_parameters": "NeuroAda targets modules (nn.Linear, Conv1D) by name, with target_modules",
    "loftq_config": _LORA_HINT,
    "eva_config": _LORA_HINT,
    "corda_config": _LORA_HINT,
    "use_qalora": _LORA_HINT,
    "qalora_group_size": _LORA_HINT,
}


# PEFT's own defaults for the options above, which ask for nothing NeuroAda lacks: a LoraConfig ported as it is
# (modules_to_save=None, bias="none", ...) is accepted, and such a key is left out of the config
PEFT_NOOP_DEFAULTS = {
    "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
    "alpha_pattern": {}, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
    "use_dora": False, "init_lora_weights": True, "lora_bias": False, "megatron_config": None,
    "layer_replication": None, "trainable_token_indices": None, "target_parameters": None, "loftq_config": {},
    "eva_config": None, "corda_config": None, "use_qalora": False,
}


def asks_nothing(name: str, value) -> bool:
    """Whether PEFT option `name` is given its do-nothing default (PEFT_NOOP_DEFAULTS): dropped, not refused."""
    if name not in PEFT_NOOP_DEFAULTS:
        return False
    default = PEFT_NOOP_DEFAULTS[name]
    # 0 for lora_dropout's 0.0 is the default; 0 for a False flag, or 1 for init_lora_weights=True, is not
    return value == default and isinstance(value, bool) == isinstance(default, bool)


def refuse_peft_options(options: dict, path=None) -> None:
    """Refuse the first PEFT option NeuroAda does not implement (PEFT_UNSUPPORTED) that asks for something, naming
    it and what to do instead: NeuroAdaConfig's keywords and a config file's keys alike."""
    for name, value in options.items():
        if name in PEFT_UNSUPPORTED and not asks_nothing(name, value):
            raise NeuroAdaUsageError(f"{name} is a PEFT option NeuroAda does not support: {PEFT_UNSUPPORTED[name]}",
                                     path=path)


def module_spec(field_name: str, spec):
    """PEFT's forms of target_modules / exclude_modules: None, a regex string, or a collection of names (kept
    as a sorted list in JSON)."""
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(s, str) for s in spec):
        return sorted(spec) if isinstance(spec, (set, frozenset)) else list(spec)
    raise NeuroAdaUsageError(f"{field_name} must be a string (regex or 'all-linear'), a list of names or None, "
                             f"got {spec!r}")


def check_config_fields(d: dict) -> None:
    """The rules for the fields of a training configuration (runtime.NeuroAdaConfig applies them to its own;
    adapter_paths to a folder's file, so every command refuses the config load_adapter would refuse)."""
    k = d.get("k", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise NeuroAdaUsageError(f"k must be a positive integer, got {k!r}", rule="3.4")
    selection = d.get("selection", "magnitude")
    if selection not in RECORDED_SELECTIONS:
        raise NeuroAdaUsageError(f"selection must be one of {', '.join(RECORDED_SELECTIONS)}, got {selection!r}",
                                 rule="2.2")
    if d.get("mode", "auto") not in MODES:
        raise NeuroAdaUsageError(f"mode must be one of {', '.join(MODES)}, got {d.get('mode')!r}")
    if d.get("delta_dtype", "float32") not in ("float32", "bfloat16", "float16"):
        raise NeuroAdaUsageError(f"delta_dtype must be float32, bfloat16 or float16, got {d.get('delta_dtype')!r}")
    module_spec("target_modules", d.get("target_modules"))
    module_spec("exclude_modules", d.get("exclude_modules"))
    if d.get("save_dtype", "BF16") not in VALUE_DTYPES:
        raise NeuroAdaUsageError(f"save_dtype must be one of {', '.join(VALUE_DTYPES)}, got {d.get('save_dtype')!r}",
                                 rule="3.3")
    seed = d.get("seed")
    if seed is not None and type(seed) is not int:  # (refused by the metadata's rule 2.2 at the save, after training)
        raise NeuroAdaUsageError(f"seed must be an integer or None, got {seed!r}", rule="2.2")
    task_type = d.get("task_type")
    if task_type is not None and task_type not in TASK_TYPES:
        raise NeuroAdaUsageError(f"task_type must be one of {', '.join(TASK_TYPES)} (PEFT's TaskType) or None, "
                                 f"got {task_type!r}")
    refuse_peft_options(d)


def read_folder_config(path) -> dict:
    """A folder's configuration file, read (read_config) and checked (check_config_fields): NeuroAdaError naming
    the file when it breaks a rule, as for any other input file."""
    d = read_config(path)
    if d.get("peft_type", "NEUROADA") != "NEUROADA":
        raise NeuroAdaError(f"not a NeuroAda adapter config (peft_type {d.get('peft_type')!r})", path=path)
    try:
        check_config_fields(d)
    except NeuroAdaError as exc:
        raise NeuroAdaError(exc.detail, path=path, rule=exc.rule) from None
    return d


# What to do with another PEFT method's adapter (a LoRA): its delta is dense, so no file converts; its merged model does.
OTHER_PEFT_HINT = ("to get a NeuroAda adapter from it, merge it with PEFT (merge_and_unload, save_pretrained) and "
                   "extract from the merged model: neuroada-pack --base BASE --finetuned MERGED -k K -o OUT")


def _legacy_peft_type(folder: str) -> str | None:
    """The peft_type of a legacy/PEFT adapter_config.json in `folder`, or None when there is none."""
    path = os.path.join(folder, LEGACY_CONFIG_NAME)
    if not os.path.lexists(path):
        return None
    kind = read_config(path).get("peft_type")
    return kind if isinstance(kind, str) else "?"


def _present(path: str) -> bool:
    """True when something is at `path`; then it must be a regular file (or a link to one)."""
    if not os.path.lexists(path):
        return False
    check_regular(path)
    return True


def adapter_paths(path) -> tuple[str, str | None]:
    """(adapter file, config file or None) for an adapter file or an adapter folder.

    Raises NeuroAdaUsageError (rule 1.1) when there is no adapter there, when what is there is not a
    regular file (a FIFO, a device, a socket: see safe_io), and says so plainly when the folder is a
    PEFT adapter of another method (import those with `neuroada-pack --from-peft`). Symbolic links
    to regular files and folders are followed. A folder's config is checked (read_folder_config): a
    malformed one is refused by every command, as load_adapter refuses it.
    """
    file, config, _ = adapter_config(path)
    return file, config


def adapter_config(path) -> tuple[str, str | None, dict | None]:
    """adapter_paths plus the folder's config as read and checked (None without one), for callers that use it."""
    file, config = _locate(os.fspath(path))
    return file, config, read_folder_config(config) if config else None


@contextmanager
def reading_adapter(path):
    """adapter_config(path), with an adapter folder's shared lock (durable.reading_folder) held until the block ends:
    read its files inside the block. The CLIs resolved a folder and then read its files with no lock, so a save
    running meanwhile swapped them between the two (the config of one save, the weights of the next). The lock is
    the runtime's load_adapter's: a save waits for the read, and the read for a save."""
    with reading_folder(path):
        yield adapter_config(path)


def _locate(path: str) -> tuple[str, str | None]:
    if not os.path.isdir(path):
        if not os.path.lexists(path):
            raise NeuroAdaUsageError("no such adapter file or folder", path=path, rule="1.1")
        check_regular(path)
        return path, None
    finish_publishes(path)  # a save killed between its renames is finished first
    weights = os.path.join(path, WEIGHTS_NAME)
    if _present(weights):
        config = os.path.join(path, CONFIG_NAME)
        return weights, config if _present(config) else None
    kind = _legacy_peft_type(path)
    legacy = os.path.join(path, LEGACY_WEIGHTS_NAME)
    if kind == "NEUROADA" or (kind is None and _present(legacy)):
        if not _present(legacy):
            raise NeuroAdaUsageError(f"no {LEGACY_WEIGHTS_NAME} in the adapter folder", path=path, rule="1.1")
        return legacy, os.path.join(path, LEGACY_CONFIG_NAME) if kind else None
    if kind == "SUPERTUNING":  # PEFT's Super-Tuning holds NeuroAda's deltas: the one kind that converts
        raise NeuroAdaUsageError("this is a PEFT Super-Tuning adapter, not a NeuroAda one; convert it with "
                                 "`neuroada-pack --from-peft`", path=path, rule="1.1")
    if kind is not None:
        raise NeuroAdaUsageError(f"this is a PEFT adapter (peft_type {kind!r:.80}), not a NeuroAda one, and only "
                                 f"Super-Tuning adapters convert; {OTHER_PEFT_HINT}", path=path, rule="1.1")
    inside = sorted(e.name for e in os.scandir(path) if e.is_dir() and _present(os.path.join(e.path, WEIGHTS_NAME)))
    hint = f" (adapters saved by name are in its sub-folders: {', '.join(inside)[:200]})" if inside else ""
    raise NeuroAdaUsageError(f"no {WEIGHTS_NAME} in the folder: not an adapter folder{hint}", path=path, rule="1.1")


# save_pretrained (and Trainer's checkpoints) put the runtime's trainable state beside the adapter: model.safetensors,
# marked by STATE_MARKER. Besides the deltas it holds whatever else trained (a head the user unfroze, a LoRA under
# the adapter), which no adapter carries: every reader of the folder says so (trained_extras).
STATE_FILE = "model.safetensors"
STATE_MARKER = "_neuroada_trainable_state"
STATE_PROBE = "_neuroada_probe"
STATE_TRAINING = "_neuroada_training"  # the adapters that trained when the state was saved (one per line)
# the stand-in a folder save puts in STATE_FILE's place while its other files are renamed (durable.write_files'
# interim): Trainer reads that file alone, and found the previous save's state in a checkpoint killed mid-save; it
# holds the folder it was saved into, and the load hook refuses it
STATE_INTERRUPTED = "_neuroada_interrupted"


def state_text(tensor) -> str:
    """The text a trainable state carries as a uint8 tensor of its UTF-8 bytes (torch or numpy): the marker's guard
    name, a probe hash, the adapters that trained (Trainer hands load_state_dict tensors only)."""
    return bytes(int(b) & 0xFF for b in tensor.tolist()).decode("utf-8", "replace")


def trained_extras(path, *, strict: bool = False) -> tuple[str, list[str]] | None:
    """(state file, names) of the trained tensors a save_pretrained folder holds that are no adapter's; None when
    there are none, the folder has no trainable state of ours, or it cannot be read: this is advice, what loads is
    the adapter, checked on its own. With ``strict`` (runtime.load_trained_extras, which loads them) the last two
    are errors naming the path: a wrong path returned "nothing to load" and the trained head stayed untrained."""
    path = os.fspath(path)
    state = os.path.join(path, STATE_FILE)
    if not os.path.isdir(path) or not os.path.isfile(state):
        if strict:
            raise NeuroAdaUsageError(f"not a folder that save_pretrained wrote (no {STATE_FILE} in it)", path=path)
        return None
    try:
        from safetensors import safe_open

        with safe_open(state, framework="numpy") as f:
            keys = list(f.keys())
            if STATE_MARKER not in keys:
                if strict:
                    raise NeuroAdaUsageError("a model file, not the trainable state save_pretrained writes of an "
                                             "attached model", path=state)
                return None  # a plain model file: not ours to interpret
            guard = state_text(f.get_tensor(STATE_MARKER))
    except NeuroAdaError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable: the adapter is read and checked on its own
        if strict:
            raise NeuroAdaError(f"cannot read the trainable state: {exc}", path=state) from None
        return None
    extra = [k for k in keys if ".neuroada_" not in k
             and k not in (STATE_MARKER, STATE_TRAINING, STATE_INTERRUPTED, guard)
             and not k.startswith(STATE_PROBE + ".")]
    return (state, extra) if extra else None


def warn_trained_extras(path, consequence: str) -> None:
    """Warn, naming them, when the adapter folder `path` holds trained tensors that `consequence` says are lost."""
    found = trained_extras(path)
    if found:
        state, extra = found
        shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
        warn_caller(f"{state} also holds {len(extra)} trained tensor(s) that are not adapter deltas ({shown}), "
                    f"e.g. a head you unfroze; {consequence}")


# what a tool that reads an adapter folder says of those tensors (the runtime's load_adapter says how to load them)
TRAINED_EXTRAS_LOST = ("this command reads only the adapter, so a merge or export of it keeps the base's values of "
                       "those tensors (for a merged checkpoint loaded in Python: "
                       "neuroada_format.runtime.load_trained_extras(model, ADAPTER_FOLDER) copies them in)")
