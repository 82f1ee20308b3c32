"""neuroada_format: read, write, validate and merge NeuroAda sparse-delta adapters (numpy only).

    import neuroada_format as naf
    adapter = naf.load("task.safetensors")            # memory-mapped, structure checked
    naf.validate(adapter, base="path/to/model").raise_if_invalid()
    merged = naf.merge_weight(W, [adapter.targets[name]])

The spec is spec/SPEC.md; rule numbers in errors refer to its section 7.

The names below are imported on first use (PEP 562), so that importing the package itself is cheap: the
console scripts (`_entry.py`) must start under their Ctrl-C guard before numpy and the rest are loaded.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "Adapter": "adapter", "Target": "adapter", "atomic_write": "adapter", "load": "adapter", "save": "adapter",
    "ArrayBase": "base", "Checkpoint": "base", "open_base": "base",
    "NeuroAdaError": "errors", "NeuroAdaUsageError": "errors",
    "probe_hash": "hashing", "probe_hash_from_values": "hashing", "structure_hash": "hashing",
    "Delta": "merge", "MergePlan": "merge", "Saved": "merge", "merge_weight": "merge", "merge_weight_": "merge",
    "merged_values": "merge", "plan_merge": "merge", "unmerge_weight_": "merge",
    "select_indices": "selection", "topk_columns": "selection",
    "Report": "validate", "version_for": "metadata",
}

__all__ = sorted([*_EXPORTS, "SPEC_VERSION", "validate"])


def __getattr__(name: str):
    if name == "SPEC_VERSION":
        value = importlib.import_module(".metadata", __name__).VERSION
    elif name in _EXPORTS:
        value = getattr(importlib.import_module("." + _EXPORTS[name], __name__), name)
    elif not name.startswith("__"):  # a submodule not imported yet (naf.errors, naf.metadata), as before
        try:
            return importlib.import_module("." + name, __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`validate` names both a submodule and the function the package exports. Importing the submodule binds
    the package attribute to the module; the eager import rebound it to the function, and so does this."""

    @property
    def validate(self):
        return importlib.import_module(".validate", __name__).validate

    @validate.setter
    def validate(self, value):  # the import system setting the submodule: the function stays the name
        pass


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .adapter import Adapter, Target, atomic_write, load, save
    from .base import ArrayBase, Checkpoint, open_base
    from .errors import NeuroAdaError, NeuroAdaUsageError
    from .hashing import probe_hash, probe_hash_from_values, structure_hash
    from .merge import (Delta, MergePlan, Saved, merge_weight, merge_weight_, merged_values, plan_merge,
                        unmerge_weight_)
    from .metadata import VERSION as SPEC_VERSION
    from .selection import select_indices, topk_columns
    from .validate import Report, validate
