"""neuroada_format: read, write, validate and merge NeuroAda sparse-delta adapters (numpy only).

    import neuroada_format as naf
    adapter = naf.load("task.safetensors")            # memory-mapped, structure checked
    naf.validate(adapter, base="path/to/model").raise_if_invalid()
    merged = naf.merge_weight(W, [adapter.targets[name]])

The spec is spec/SPEC.md; rule numbers in errors refer to its section 7.
"""
from .adapter import Adapter, Target, atomic_write, load, save
from .base import ArrayBase, Checkpoint, open_base
from .errors import NeuroAdaError, NeuroAdaUsageError
from .hashing import probe_hash, probe_hash_from_values, structure_hash
from .merge import Delta, MergePlan, Saved, merge_weight, merge_weight_, merged_values, plan_merge, unmerge_weight_
from .metadata import VERSION as SPEC_VERSION
from .selection import select_indices, topk_columns
from .validate import Report, validate

__version__ = "0.1.0"

__all__ = [
    "Adapter", "ArrayBase", "Checkpoint", "Delta", "MergePlan", "NeuroAdaError", "NeuroAdaUsageError", "Report", "SPEC_VERSION", "Saved",
    "Target", "atomic_write", "load", "merge_weight", "merge_weight_", "merged_values", "open_base", "plan_merge",
    "probe_hash", "probe_hash_from_values", "save", "select_indices", "structure_hash", "topk_columns", "unmerge_weight_",
    "validate",
]
