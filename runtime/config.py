"""NeuroAdaConfig: what to adapt and how, saved as neuroada_config.json with PEFT's key names.

The file name and the absence of a `peft_type` key are deliberate: PEFT and transformers pick up any
folder with an `adapter_config.json` (or a config naming a `peft_type`) and then fail on a method they
do not know. Legacy configs (`adapter_config.json`, `peft_type: "NEUROADA"`) are still read.
"""
from __future__ import annotations

import difflib
import enum
import functools
import json
import os
from dataclasses import asdict, dataclass, fields

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.durable import write_bytes
from neuroada_format.errors import warn_caller
from neuroada_format.folder import (CONFIG_NAME, LEGACY_CONFIG_NAME, MODES, RECORDED_SELECTIONS,  # noqa: F401
                                    SELECTIONS, WEIGHTS_NAME, asks_nothing, check_config_fields, module_spec,
                                    read_folder_config, refuse_peft_options)

# keys a config file may hold that are no field: the legacy layout's `peft_type: "NEUROADA"` (read_folder_config
# refuses any other peft_type)
FILE_ONLY_KEYS = ("peft_type",)


@dataclass
class NeuroAdaConfig:
    """k deltas per output neuron of every targeted linear layer.

    target_modules / exclude_modules follow PEFT: a string is a regex that must `fullmatch` the module
    name, a list matches a name exactly or as a dotted suffix, "all-linear" (also None, PEFT's "the default
    targets") is every linear layer but the output head. `mode` "auto" writes deltas into the weights around each GEMM ("inplace") unless
    the weight must not be written (no plain writable tensor), where it adds a sparse term ("additive").
    `task_type` is PEFT's metadata ("CAUSAL_LM", ...): checked, saved and read back, never acted on. PEFT options
    NeuroAda does not implement (r, lora_alpha, modules_to_save, layers_to_transform, ...) are refused by name,
    unless given PEFT's own do-nothing default (modules_to_save=None, bias="none", ...): those are left out.
    """
    k: int = 1
    target_modules: str | list[str] | None = "all-linear"
    exclude_modules: str | list[str] | None = None
    selection: str = "magnitude"
    seed: int | None = None
    mode: str = "auto"
    delta_dtype: str = "float32"  # dtype of the trainable master values; "bfloat16" halves their memory
    save_dtype: str = "BF16"      # value dtype written to adapter files
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    task_type: str | None = None

    def __post_init__(self):
        if isinstance(self.task_type, enum.Enum):  # peft.TaskType.CAUSAL_LM: kept as its plain string
            self.task_type = self.task_type.value
        check_config_fields(asdict(self))  # one set of rules, shared with the format core's folder reader
        if self.selection == "random" and self.seed is None:
            self.seed = 0
        if self.target_modules is None:  # PEFT's None: the method's default targets (here every linear layer)
            self.target_modules = "all-linear"
        self.target_modules = module_spec("target_modules", self.target_modules)
        self.exclude_modules = module_spec("exclude_modules", self.exclude_modules)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, path=None) -> "NeuroAdaConfig":
        """From a dict as to_dict writes it (`path`: the file it was read from, named in errors and warnings).

        A PEFT option NeuroAda does not implement is refused; any other key that is no field (written by a newer
        version) is left out with a warning naming it, so what a file asks for is never dropped unseen."""
        names = {f.name for f in fields(cls) if f.init}
        where = f"{os.fspath(path)}: " if path is not None else ""
        refuse_peft_options(d, path)
        unknown = [k for k in d if k not in names and k not in FILE_ONLY_KEYS and not asks_nothing(k, d[k])]
        if unknown:
            warn_caller(f"{where}NeuroAdaConfig ignores unknown key(s) {', '.join(map(repr, unknown))} (written by "
                        f"a newer version of neuroada?)")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, folder) -> str:
        """Write `folder/neuroada_config.json` atomically; returns its path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, CONFIG_NAME)
        write_bytes(path, self.to_json().encode("utf-8"), overwrite=True, durable=False)
        return path

    @classmethod
    def from_pretrained(cls, folder) -> "NeuroAdaConfig":
        """Read a folder's config (new or legacy name) or a config file path."""
        folder = os.fspath(folder)
        if os.path.isdir(folder):
            path = os.path.join(folder, CONFIG_NAME)
            if not os.path.exists(path):
                path = os.path.join(folder, LEGACY_CONFIG_NAME)
        else:
            path = folder
        return cls.from_checked(read_folder_config(path), path)

    @classmethod
    def from_checked(cls, d: dict, path) -> "NeuroAdaConfig":
        """From a config read_folder_config returned (the one JSON reader and its limits, the field rules)."""
        try:
            return cls.from_dict(d, path)
        except NeuroAdaError as exc:
            raise NeuroAdaError(exc.detail, path=path, rule=exc.rule) from None
        except TypeError as exc:
            raise NeuroAdaError(f"bad adapter config: {exc}", path=path) from None


def _refuse_unknown_options(init):
    """NeuroAdaConfig's __init__, refusing an option it does not have by name (a PEFT option NeuroAda does not
    implement says so and what to do instead) rather than the dataclass's TypeError about an unexpected keyword."""
    names = [f.name for f in fields(NeuroAdaConfig) if f.init]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        refuse_peft_options(kwargs)
        kwargs = {k: v for k, v in kwargs.items() if not asks_nothing(k, v)}  # PEFT's defaults ask for nothing
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise NeuroAdaUsageError(f"NeuroAdaConfig has no option {key!r}{hint}; its options are "
                                         f"{', '.join(names)}")
        if len(args) > len(names):
            raise NeuroAdaUsageError(f"NeuroAdaConfig takes at most {len(names)} positional arguments, got "
                                     f"{len(args)}: pass options by name")
        init(self, *args, **kwargs)

    return __init__


NeuroAdaConfig.__init__ = _refuse_unknown_options(NeuroAdaConfig.__init__)
