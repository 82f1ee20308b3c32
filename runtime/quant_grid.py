"""Training through a GGUF file's quantization grid, so the adapter survives a merge into that file exactly.

A 4-bit GGUF block holds 32 values as `d * q + m` (integer q in [0, 15], scale d and minimum m in f16; a
K-quant sub-block of 16 or 32 values likewise, its scale and minimum f16 super-scales times small integers).
Merging trained deltas into such a file means re-encoding the blocks that hold them, and a learned delta is
usually smaller than half a 4-bit step, so most of it is lost (bench/RESULTS.md, "GGUF merge: retention":
about 77% of the adapter's logit change kept on SmolLM2 Q4_1). Training *through* the grid instead snaps
each delta so that `w0 + delta` is a value the block already represents (its scale and minimum kept),
with a straight-through gradient: the optimizer updates the unsnapped deltas, the forward and the
gradient see the snapped ones. The merge into the file then changes only the blocks' 4-bit levels and
is exact: the merged file decodes to the runtime's merge value for value (a Q4_0 zero may come back as -0.0),
every other block byte-identical. An F16 or BF16 tensor's grid is its dtype (`FloatGrid`): the merge rounds
`w0 + delta` to it, so the runtime, training on an f32 copy, rounds the same way; F32 tensors need nothing.

    from neuroada_format.runtime import attach, train_on_grid, remove_grid
    attach(model, NeuroAdaConfig(k=20))        # model: the GGUF's de-quantized weights
    train_on_grid(model, "model.Q4_1.gguf")    # then any loop, or transformers.Trainer, unchanged
    ...
    model.save_pretrained("out")               # the adapter file holds the on-grid deltas (F32 values)
    # neuroada-merge --base model.Q4_1.gguf --adapter out --out merged.gguf   (exact, same size)

While a grid is on, `save_adapter` / `save_pretrained` / Trainer's save_model, `to_adapter` and `merge`
use the snapped deltas (`NeuroAdaLayer.delta`); the trainable state in Trainer checkpoints keeps the
unsnapped ones, which is what resuming needs (call `train_on_grid` again on the rebuilt model). The
adapter's `save_dtype` becomes F32 while the grid is on: a snapped delta `d * (q - q0)` needs up to 15
significant bits (more for a K-quant's sub-block scale). The grids come from converters/gguf_merge.py (`block_grid`, the Hugging Face -> GGUF
name map and llama.cpp's q/k row order); that module and the gguf package are imported only when a grid
is registered. Serving several adapters (runtime/multi.py: `set_adapter`, mixed batches,
`add_weighted_adapter`) reads the snapped deltas too, through the same `NeuroAdaLayer.delta`.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
from torch import nn

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.errors import missing_extra

from .kernels.cache import outside_inference, version
from .layer import GRID_ATTR, NeuroAdaLayer

__all__ = ["QuantGrid", "FloatGrid", "train_on_grid", "remove_grid", "grid_types"]

SAVED_CONFIGS_ATTR = "_neuroada_grid_configs"  # the model's adapter configs as they were before the grid


class QuantGrid(nn.Module):
    """One layer's block grid: per block a scale and a minimum (f32 values, kept as their int32 bits so
    that `model.to(dtype)` cannot round them), levels [lo, hi], `block` values per block along d_in.

    Called with an adapter's (val, idx, w0) it returns the deltas with `w0 + delta` on the grid: forward
    value exactly the snapped delta, gradient passed straight through to `val`.
    """

    def __init__(self, scale: np.ndarray, minimum: np.ndarray, lo: int, hi: int, block: int, qtype: str):
        super().__init__()
        with outside_inference():  # kept after an inference block: ordinary tensors
            self.register_buffer("scale_bits", _f32_bits(scale), persistent=False)
            self.register_buffer("minimum_bits", _f32_bits(minimum), persistent=False)
        self.lo, self.hi, self.block, self.qtype = int(lo), int(hi), int(block), str(qtype)

    def _at(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale, minimum and divisor (the scale, 1 where it is 0) of the block holding each selected
        entry, f32 [d_out, k]; cached while idx is the same, unchanged tensor."""
        key = (idx, version(idx), self.scale_bits.device)
        hit = self.__dict__.get("_cache")
        if hit is not None and hit[0][0] is key[0] and hit[0][1:] == key[1:]:
            return hit[1]
        with outside_inference():
            blk = idx // self.block
            d = self.scale_bits.gather(1, blk).view(torch.float32)
            m = self.minimum_bits.gather(1, blk).view(torch.float32)
            at = (d, m, torch.where(d == 0, 1.0, d))  # a zero scale: every level decodes to m
        self.__dict__["_cache"] = (key, at)
        return at

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_cache", None)  # derived from idx: rebuilt on first use, never copied
        return state

    @torch.no_grad()
    def levels(self, w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The nearest level q of values w [d_out, k] at idx, and its value d * q + m (f32, as gguf-py decodes)."""
        d, m, div = self._at(idx)  # (in place on temporaries: 210 layers of a small model pay per op)
        q = (w.float() - m).div_(div).round_().clamp_(self.lo, self.hi)
        return q, q * d + m

    @torch.no_grad()
    def snap(self, val: torch.Tensor, idx: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        """The on-grid deltas (no gradient): w0 + snap(val) is the grid value nearest to w0 + val."""
        w0f = w0.float()
        _, value = self.levels(w0f + val.float(), idx)
        return value.sub_(w0f).to(val.dtype)

    def forward(self, val: torch.Tensor, idx: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        snapped = self.snap(val, idx, w0)
        if not (torch.is_grad_enabled() and val.requires_grad):
            return snapped
        return snapped + (val - val.detach())  # value: snapped (+0 exactly); gradient: 1 (straight through)

    def extra_repr(self) -> str:
        return f"{self.qtype}, levels [{self.lo}, {self.hi}], block {self.block}"


class FloatGrid(nn.Module):
    """An F16 or BF16 tensor's grid: the dtype's own values. `w0 + delta` (f32 sum) is rounded to the dtype
    (round-to-nearest-even, as rule M rounds a merge into such a tensor; beyond its range, to its largest
    finite value, as a block grid clamps its levels), so a model holding the tensor's values in f32 trains,
    serves and merges what the file will hold. Same call as QuantGrid, straight-through gradient."""

    DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16}

    def __init__(self, qtype: str):
        super().__init__()
        self.qtype, self.dtype = str(qtype), self.DTYPES[qtype]

    @torch.no_grad()
    def levels(self, w: torch.Tensor, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Values w rounded to the dtype (as f32), twice: QuantGrid.levels' (level, value) with level = value."""
        big = torch.finfo(self.dtype).max
        value = w.float().clamp(-big, big).to(self.dtype).float()
        return value, value

    @torch.no_grad()
    def snap(self, val: torch.Tensor, idx: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        """The deltas d with f32(w0 + d) the dtype value nearest to w0 + val, so that the merge's rounding keeps
        it. d = f32(value - w0) does, except where the value is a power of two and |w0| under 2^-13 of it (F16;
        BF16: 2^-16), where there may be no such d at all: there the value is the dtype's next one toward zero
        (always reachable). An infinite w0 gets d = 0 (w0 kept); a NaN stays NaN, as on a block grid."""
        w0f = w0.float()
        _, value = self.levels(w0f + val.float())
        delta = value - w0f
        # (the next value's bits: the magnitude's minus one; garbage where value is 0, never used there)
        below = (value.to(self.dtype).view(torch.int16) - 1).view(self.dtype).float()
        alt = below - w0f
        alt = torch.where(w0f + alt == below, alt, 0.0)
        return torch.where((w0f + delta == value) | value.isnan(), delta, alt).to(val.dtype)

    forward = QuantGrid.forward

    def extra_repr(self) -> str:
        return self.qtype


def _f32_bits(x: np.ndarray) -> torch.Tensor:
    """f32 values as the int32 bits of their encoding (a K-quant sub-block scale, an f16 super-scale times a
    6- or 8-bit integer, needs up to 17 significant bits: more than f16 holds)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.int32).copy())


def _gguf_view(path):
    """converters/gguf_merge's view of a GGUF file (imported here: the runtime must import without gguf)."""
    try:
        from neuroada_format.converters import gguf_merge
    except ImportError as exc:
        raise missing_extra("training through a GGUF grid needs", exc, "gguf", path=os.fspath(path)) from None
    return gguf_merge, gguf_merge.open_gguf_base(path)


def _adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, NeuroAdaLayer]:
    from .model import layers

    found = {n: layer for n, layer in layers(model).items() if adapter_name in layer.neuroada_val}
    if not found:  # name what there is: an adapter attached under another name is the usual cause
        have = sorted({n for layer in layers(model).values() for n in layer.neuroada_val})
        hint = f" (have: {', '.join(have)}; pass adapter_name=)" if have else " (attach one first)"
        raise NeuroAdaUsageError(f"no attached layer holds an adapter named {adapter_name!r}{hint}")
    return found


def train_on_grid(model: nn.Module, gguf_path, adapter_name: str = "default") -> dict[str, str]:
    """Snap `adapter_name`'s deltas to the quantization grid of `gguf_path` (the model's base as a GGUF
    file: its weights must be that file's de-quantized values) in every layer whose GGUF tensor is
    block-quantized with a grid `converters.gguf_merge.block_grid` knows (Q4_0, Q4_1, Q8_0, Q3_K, Q4_K, Q5_K, Q6_K),
    and to F16/BF16 values where it is F16/BF16 (`FloatGrid`: the merge rounds w0 + delta to that dtype).

    Layers whose tensor is F32 stay plain (they merge exactly as they are), as do other block types (their
    merge re-encodes them). Returns {target: GGUF type} of every adapted layer; the snapping ones are
    those with a grid (see `grid_types`).

    Refused before anything changes: a file that is not this model's base (a target without a GGUF tensor,
    another shape, or selected weights that are not the file's values: NeuroAdaError), a merged layer,
    deltas that are not float32 or a weight in another layout (NeuroAdaUsageError).
    """
    found = _adapter_layers(model, adapter_name)
    from .model import CONFIGS_ATTR, _check_path_argument, _is_sharded, plain_name

    gm, view = _gguf_view(_check_path_argument(gguf_path, "train_on_grid"))
    path = view.path
    planned: dict[str, tuple[NeuroAdaLayer, QuantGrid | FloatGrid | None]] = {}
    types: dict[str, str] = {}
    for name, layer in found.items():
        key = plain_name(model, name) + ".weight"
        if layer.merged:
            raise NeuroAdaUsageError(f"{name} is merged; unmerge before training on a grid", tensor=key)
        val = layer.neuroada_val[adapter_name]
        if val.dtype != torch.float32:
            raise NeuroAdaUsageError(f"deltas in {val.dtype} cannot hold on-grid values exactly; train them in "
                                     f"float32 (delta_dtype='float32', the default; an adapter loaded for "
                                     f"inference holds its file's dtype: load it with is_trainable=True)", tensor=key)
        if _is_sharded(layer.weight):
            raise NeuroAdaUsageError("register the grid before sharding the model (FSDP2)", tensor=key)
        mapped = view.resolve(key)
        if mapped is None:
            raise NeuroAdaError(f"the GGUF file has no tensor for {key}: it is not this model's base",
                                path=path, tensor=key, rule="4.1")
        if layer.transposed != mapped.transposed:  # (GPT-2's Conv1D weights are stored transposed: gguf_merge)
            raise NeuroAdaUsageError(f"GGUF stores {mapped.gguf_name} as [d_out, d_in], which a "
                                     f"{'transposed (Conv1D)' if layer.transposed else 'linear'} layer's weight "
                                     f"is not", path=path, tensor=key)
        info = view.file.tensors[mapped.gguf_name]
        if tuple(info.shape) != (layer.d_out, layer.d_in):
            raise NeuroAdaError(f"{mapped.gguf_name} is {list(info.shape)}, the model's weight is "
                                f"{[layer.d_out, layer.d_in]}: not this model's base", path=path, tensor=key,
                                rule="4.2")
        idx, w0 = layer.neuroada_idx[adapter_name], layer.neuroada_w0[adapter_name]
        types[key] = info.type.name
        if info.type.name in FloatGrid.DTYPES:
            grid = FloatGrid(info.type.name)
        else:
            try:
                grid = QuantGrid(*gm.block_grid(view, key), qtype=info.type.name).to(w0.device)
            except NeuroAdaUsageError:  # no grid for this type (F32, Q5_0/Q5_1, Q2_K, IQ types): the layer stays plain
                grid = None
        if isinstance(grid, QuantGrid):
            _, on_grid = grid.levels(w0, idx)
            same = torch.equal(on_grid, w0.float())
        else:
            want = view.probed(key, idx.cpu().numpy())  # canonical [d_out, k], whatever the stored orientation
            same = np.array_equal(want.astype(np.float32), w0.detach().float().cpu().numpy())
        if not same:
            raise NeuroAdaError(f"the model's weights at the selected entries are not the values of "
                                f"{mapped.gguf_name} ({info.type.name}): the GGUF is not this model's base "
                                f"(the model must hold its de-quantized weights)", path=path, tensor=key,
                                rule="4.3")
        planned[name] = (layer, grid)
    # checked everything: now change the model
    for layer, grid in planned.values():
        grids = layer._modules.get(GRID_ATTR)
        if grid is None:
            if grids is not None and adapter_name in grids:
                del grids[adapter_name]
                if not len(grids):
                    del layer._modules[GRID_ATTR]
            continue
        if grids is None:
            grids = nn.ModuleDict()
            layer.add_module(GRID_ATTR, grids)
        grids[adapter_name] = grid
    configs = getattr(model, CONFIGS_ATTR, None) or {}
    if adapter_name in configs:
        saved = model.__dict__.setdefault(SAVED_CONFIGS_ATTR, {})
        saved.setdefault(adapter_name, configs[adapter_name])
        configs[adapter_name] = dataclasses.replace(configs[adapter_name], save_dtype="F32")
    return types


def grid_types(model: nn.Module, adapter_name: str = "default") -> dict[str, str]:
    """{layer name: GGUF type} of the layers whose `adapter_name` deltas are snapped to a grid now."""
    from .model import layers

    out = {}
    for name, layer in layers(model).items():
        grid = layer.grid(adapter_name)
        if grid is not None:
            out[name] = grid.qtype
    return out


def remove_grid(model: nn.Module, adapter_name: str = "default", *, snap: bool = False) -> None:
    """Back to plain deltas. With snap=True the snapped values are written into the deltas first, so the
    adapter keeps its on-grid values everywhere (serving, combining) and its F32 save dtype; without, the
    unsnapped deltas and the save dtype from before the grid come back."""
    from .model import CONFIGS_ATTR

    for layer in _adapter_layers(model, adapter_name).values():
        grid = layer.grid(adapter_name)
        if grid is None:
            continue
        if snap:
            with torch.no_grad():
                val = layer.neuroada_val[adapter_name]
                val.copy_(grid.snap(val, layer.neuroada_idx[adapter_name], layer.neuroada_w0[adapter_name]))
        grids = layer._modules[GRID_ATTR]
        del grids[adapter_name]
        if not len(grids):
            del layer._modules[GRID_ATTR]
    saved = model.__dict__.get(SAVED_CONFIGS_ATTR, {})
    before = saved.pop(adapter_name, None)
    if not saved:
        model.__dict__.pop(SAVED_CONFIGS_ATTR, None)
    configs = getattr(model, CONFIGS_ATTR, None) or {}
    if before is not None and adapter_name in configs and not snap:
        configs[adapter_name] = before
