"""PyTorch runtime for NeuroAda: train sparse deltas on any model and apply them (installed as neuroada_format.runtime)."""

try:  # the format core and the converters work without torch; this package is the one part that needs it
    import torch  # noqa: F401
except ImportError as exc:
    raise ImportError("neuroada_format.runtime needs torch: pip install 'neuroada-format[torch]'",
                      name=exc.name) from exc

from . import kernels
from .functional import (
    AdditiveSparseDelta,
    InplaceSparseDeltaLinear,
    Overlay,
    additive_sparse_delta,
    inplace_sparse_delta_linear,
)
from .kernels import Pattern
from .config import NeuroAdaConfig
from .layer import NeuroAdaLayer
from .guards import layers
from .model import attach
from .introspection import print_trainable_parameters, trainable_parameters
from .saving import save_adapter, to_adapter
from .hf_checkpoint import trainable_state
from .loading import load_adapter, load_trained_extras
from .merging import merge, merge_and_unload, unload, unmerge

__all__ = [
    "NeuroAdaConfig",
    "attach",
    "save_adapter",
    "load_adapter",
    "load_trained_extras",
    "to_adapter",
    "merge",
    "unmerge",
    "merge_and_unload",
    "unload",
    "print_trainable_parameters",
    "trainable_parameters",
    "trainable_state",
    "layers",
    "kernels",
    "Pattern",
    "Overlay",
    "InplaceSparseDeltaLinear",
    "AdditiveSparseDelta",
    "inplace_sparse_delta_linear",
    "additive_sparse_delta",
    "NeuroAdaLayer",
]

from .multi import (  # noqa: E402
    BASE_ADAPTER,
    ServingLayer,
    adapter_batch,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    list_adapters,
    merged_adapter,
    set_adapter,
    stop_serving,
)

__all__ += [
    "BASE_ADAPTER",
    "ServingLayer",
    "adapter_batch",
    "add_weighted_adapter",
    "delete_adapter",
    "disable_adapter",
    "list_adapters",
    "merged_adapter",
    "set_adapter",
    "stop_serving",
]

from .quant_grid import QuantGrid, grid_types, load_quantized_weights, remove_grid, train_on_grid  # noqa: E402

__all__ += ["QuantGrid", "train_on_grid", "remove_grid", "grid_types", "load_quantized_weights"]
