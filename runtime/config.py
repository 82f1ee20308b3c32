"""NeuroAdaConfig: what to adapt and how, saved as neuroada_config.json with PEFT's key names.

The file name and the absence of a `peft_type` key are deliberate: PEFT and transformers pick up any
folder with an `adapter_config.json` (or a config naming a `peft_type`) and then fail on a method they
do not know. Legacy configs (`adapter_config.json`, `peft_type: "NEUROADA"`) are still read.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.durable import write_bytes
from neuroada_format.folder import CONFIG_NAME, LEGACY_CONFIG_NAME, WEIGHTS_NAME, read_config  # noqa: F401  (one definition)

SELECTIONS = ("magnitude", "reverse", "random", "gradient")  # the rules attach can compute
RECORDED_SELECTIONS = SELECTIONS + ("delta", "union", "custom")  # spec rules a loaded adapter may carry
MODES = ("auto", "inplace", "additive")


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
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise NeuroAdaUsageError(f"k must be a positive integer, got {self.k!r}", rule="3.4")
        if self.selection not in RECORDED_SELECTIONS:
            raise NeuroAdaUsageError(f"selection must be one of {', '.join(RECORDED_SELECTIONS)}, got {self.selection!r}",
                                rule="2.2")
        if self.selection == "random" and self.seed is None:
            self.seed = 0
        if self.mode not in MODES:
            raise NeuroAdaUsageError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.delta_dtype not in ("float32", "bfloat16", "float16"):
            raise NeuroAdaUsageError(f"delta_dtype must be float32, bfloat16 or float16, got {self.delta_dtype!r}")
        self.target_modules = _module_spec("target_modules", self.target_modules)
        self.exclude_modules = _module_spec("exclude_modules", self.exclude_modules)
        if self.save_dtype not in ("BF16", "F16", "F32"):
            raise NeuroAdaUsageError(f"save_dtype must be BF16, F16 or F32, got {self.save_dtype!r}", rule="3.3")

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
        d = read_config(path)  # regular files only, the one JSON parser and its limits (never a RecursionError)
        if d.get("peft_type", "NEUROADA") != "NEUROADA":
            kind = d.get("peft_type")
            raise NeuroAdaError(f"not a NeuroAda adapter config (peft_type {kind!r})", path=path)
        try:
            return cls.from_dict(d)
        except NeuroAdaError as exc:
            raise NeuroAdaError(exc.detail, path=path, rule=exc.rule) from None
        except TypeError as exc:
            raise NeuroAdaError(f"bad adapter config: {exc}", path=path) from None


def _module_spec(field_name: str, spec):
    """PEFT's forms: None, a regex string, or a collection of names (kept as a sorted list in JSON)."""
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(s, str) for s in spec):
        return sorted(spec) if isinstance(spec, (set, frozenset)) else list(spec)
    raise NeuroAdaUsageError(f"{field_name} must be a string (regex or 'all-linear'), a list of names or None, "
                        f"got {spec!r}")
