"""NeuroAdaConfig: what to adapt and how, saved as adapter_config.json the way PEFT users expect."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from neuroada_format import NeuroAdaError

SELECTIONS = ("magnitude", "reverse", "random", "gradient")  # the rules attach can compute
RECORDED_SELECTIONS = SELECTIONS + ("delta", "union", "custom")  # spec rules a loaded adapter may carry
MODES = ("auto", "inplace", "additive")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


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
    peft_type: str = field(default="NEUROADA", init=False)

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise NeuroAdaError(f"k must be a positive integer, got {self.k!r}", rule="3.4")
        if self.selection not in RECORDED_SELECTIONS:
            raise NeuroAdaError(f"selection must be one of {', '.join(RECORDED_SELECTIONS)}, got {self.selection!r}",
                                rule="2.2")
        if self.selection == "random" and self.seed is None:
            self.seed = 0
        if self.mode not in MODES:
            raise NeuroAdaError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.delta_dtype not in ("float32", "bfloat16", "float16"):
            raise NeuroAdaError(f"delta_dtype must be float32, bfloat16 or float16, got {self.delta_dtype!r}")
        self.target_modules = _module_spec("target_modules", self.target_modules)
        self.exclude_modules = _module_spec("exclude_modules", self.exclude_modules)
        if self.save_dtype not in ("BF16", "F16", "F32"):
            raise NeuroAdaError(f"save_dtype must be BF16, F16 or F32, got {self.save_dtype!r}", rule="3.3")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NeuroAdaConfig":
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save_pretrained(self, folder) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, folder) -> "NeuroAdaConfig":
        path = os.path.join(folder, CONFIG_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError) as exc:
            raise NeuroAdaError(f"cannot read adapter config: {exc}", path=path) from None
        if not isinstance(d, dict) or d.get("peft_type", "NEUROADA") != "NEUROADA":
            kind = d.get("peft_type") if isinstance(d, dict) else type(d).__name__
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
    raise NeuroAdaError(f"{field_name} must be a string (regex or 'all-linear'), a list of names or None, "
                        f"got {spec!r}")
