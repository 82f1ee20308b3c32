"""NeuroAdaConfig: what to adapt and how, saved as neuroada_config.json with PEFT's key names.

The file name and the absence of a `peft_type` key are deliberate: PEFT and transformers pick up any
folder with an `adapter_config.json` (or a config naming a `peft_type`) and then fail on a method they
do not know. Legacy configs (`adapter_config.json`, `peft_type: "NEUROADA"`) are still read.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

from neuroada_format import NeuroAdaError
from neuroada_format.durable import write_bytes
from neuroada_format.folder import (CONFIG_NAME, LEGACY_CONFIG_NAME, MODES, RECORDED_SELECTIONS,  # noqa: F401
                                    SELECTIONS, WEIGHTS_NAME, check_config_fields, module_spec, read_folder_config)


@dataclass
class NeuroAdaConfig:
    """k deltas per output neuron of every targeted linear layer.

    target_modules / exclude_modules follow PEFT: a string is a regex that must `fullmatch` the module
    name, a list matches a name exactly or as a dotted suffix, "all-linear" is every linear layer but
    the output head. `mode` "auto" writes deltas into the weights around each GEMM ("inplace") unless
    the weight must not be written (no plain writable tensor), where it adds a sparse term ("additive").
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

    def __post_init__(self):
        check_config_fields(asdict(self))  # one set of rules, shared with the format core's folder reader
        if self.selection == "random" and self.seed is None:
            self.seed = 0
        self.target_modules = module_spec("target_modules", self.target_modules)
        self.exclude_modules = module_spec("exclude_modules", self.exclude_modules)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NeuroAdaConfig":
        names = {f.name for f in fields(cls) if f.init}
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
            return cls.from_dict(d)
        except NeuroAdaError as exc:
            raise NeuroAdaError(exc.detail, path=path, rule=exc.rule) from None
        except TypeError as exc:
            raise NeuroAdaError(f"bad adapter config: {exc}", path=path) from None
