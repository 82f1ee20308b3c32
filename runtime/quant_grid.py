"""Training through a quantized file's grid (a GGUF file's blocks, an ONNX Runtime MatMulNBits model's), so the
adapter survives a merge into that file exactly.

A 4-bit GGUF block holds 32 values as `d * q + m` (integer q in [0, 15], scale d and minimum m in f16; a
K-quant sub-block of 16 or 32 values likewise, its scale and minimum f16 super-scales times small integers).
An ONNX Runtime MatMulNBits block (4 or 8 bits, 16 to 256 values along d_in) holds fl32(scale * (code - zero
point)): the same grid with m = 0 and levels q = code - zero point in [-zero point, 2^bits - 1 - zero point]
(a minimum m = -zero point * scale would round twice: it misses ONNX Runtime's value at 40-55% of random
levels). With float zero points (ONNX Runtime's HQQ quantizer, 4-bit) onnxruntime does round twice,
fl32(fl32(code * scale) - fl32(scale * zero point)): there the grid is d = scale, m = -fl32(scale * zero point),
q = code in [0, 15], exactly. Merging trained deltas into such a file means re-encoding the blocks that hold
them, and a learned delta is usually smaller than half a 4-bit step, so much of it is lost (bench/RESULTS.md, "GGUF merge:
retention": about 77% of the adapter's logit change kept on SmolLM2 Q4_1; 60-80% in 4-bit MatMulNBits files of
tests/runtime/test_onnx_grid.py). Training *through* the grid instead snaps each delta so that `w0 + delta` is a
value the block already represents (its scale and minimum or zero point kept), with a straight-through gradient:
the optimizer updates the unsnapped deltas, the forward and the gradient see the snapped ones. The merge into the
file then changes only the blocks' levels and is exact: the merged file decodes to the runtime's merge value for
value (a zero may come back as -0.0), every other block byte-identical. The snap checks that the f32 sum
`w0 + delta` lands on the value: with f32 scales (ONNX Runtime's) no f32 delta reaches some levels from some
others, and those are not taken (`QuantGrid.snap`). An F16 or BF16 tensor's grid is its dtype (`FloatGrid`): the
merge rounds `w0 + delta` to it, so the runtime, training on an f32 copy, rounds the same way; F32 tensors need
nothing.

    from neuroada_format.runtime import attach, load_quantized_weights, train_on_grid
    # GGUF: the model holds the file's de-quantized weights (transformers' gguf_file loader, docs/gguf.md)
    # ONNX: load_quantized_weights(model, "model_int4.onnx") copies them in (before attach)
    attach(model, NeuroAdaConfig(k=20))
    train_on_grid(model, "model.Q4_1.gguf")    # or "model_int4.onnx"; then any loop, or transformers.Trainer
    ...
    model.save_pretrained("out")               # the adapter file holds the on-grid deltas (F32 values)
    # neuroada-merge --base model.Q4_1.gguf --adapter out --out merged.gguf   (exact, same size)

One `train_on_grid` for both, as one `neuroada-merge --base` takes both: the file says which it is (GGUF's magic;
ONNX, a protobuf, has none) and the rest (the grid classes, the saved dtype, `grid_types`, `remove_grid`, Trainer
checkpoints) is the same. While a grid is on, `save_adapter` / `save_pretrained` / Trainer's save_model,
`to_adapter` and `merge` use the snapped deltas (`NeuroAdaLayer.delta`); the trainable state in Trainer
checkpoints keeps the unsnapped ones, which is what resuming needs (call `train_on_grid` again on the rebuilt
model). The adapter's `save_dtype` becomes F32 while the grid is on: a snapped delta `d * (q - q0)` needs up to 15
significant bits (more for a K-quant's sub-block scale or an f32 scale). The grids come from the converters:
converters/gguf_encode.py (`block_grid`), converters/gguf_names.py (the Hugging Face -> GGUF name map and llama.cpp's
q/k row order) and converters/onnx_nbits.py (`Weight.grid`), each target found by converters/onnx_resolve.py's
resolver exactly as the merge finds it; those modules, gguf and onnx are imported only when a grid is registered.
Serving several adapters (runtime/multi.py: `set_adapter`, mixed batches, `add_weighted_adapter`) reads the snapped
deltas too, through the same `NeuroAdaLayer.delta`.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
from torch import nn

import neuroada_format as naf
from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.errors import missing_extra
from neuroada_format.layout import canonical_view

from .kernels.cache import outside_inference, version
from .layer import GRID_ATTR, NeuroAdaLayer
from .guards import takes_model

__all__ = ["QuantGrid", "FloatGrid", "train_on_grid", "remove_grid", "grid_types", "load_quantized_weights"]

SAVED_CONFIGS_ATTR = "_neuroada_grid_configs"  # the model's adapter configs as they were before the grid
REACH_STEPS = 2  # levels a snap moves toward w0's when no f32 delta reaches the nearest one (QuantGrid.snap)


class QuantGrid(nn.Module):
    """One layer's block grid: per block a scale and a minimum (f32 values, kept as their int32 bits so
    that `model.to(dtype)` cannot round them), levels [lo, hi] (one range for all blocks, or per block: an ONNX
    MatMulNBits block's zero point shifts its range), `block` values per block along d_in.

    Called with an adapter's (val, idx, w0) it returns the deltas with `w0 + delta` on the grid: forward
    value exactly the snapped delta, gradient passed straight through to `val`.
    """

    def __init__(self, scale: np.ndarray, minimum: np.ndarray, lo, hi, block: int, qtype: str):
        super().__init__()
        per_block = np.ndim(lo) > 0 or np.ndim(hi) > 0
        with outside_inference():  # kept after an inference block: ordinary tensors
            self.register_buffer("scale_bits", _f32_bits(scale), persistent=False)
            self.register_buffer("minimum_bits", _f32_bits(minimum), persistent=False)
            if per_block:  # (int32: a model.to(dtype) converts float buffers)
                for attr, x in (("lo_levels", lo), ("hi_levels", hi)):
                    levels = np.array(np.broadcast_to(np.asarray(x, np.int32), np.shape(scale)))  # (a writable copy)
                    self.register_buffer(attr, torch.from_numpy(levels), persistent=False)
        self.lo, self.hi = (None, None) if per_block else (int(lo), int(hi))
        self.block, self.qtype = int(block), str(qtype)

    def _at(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Scale, minimum, divisor (the scale, 1 where it is 0) and the lowest and highest level of the block
        holding each selected entry, f32 [d_out, k] (the levels ints where one range serves all blocks); cached
        while idx is the same, unchanged tensor."""
        key = (idx, version(idx), self.scale_bits.device)
        hit = self.__dict__.get("_cache")
        if hit is not None and hit[0][0] is key[0] and hit[0][1:] == key[1:]:
            return hit[1]
        with outside_inference():
            blk = idx // self.block
            d = self.scale_bits.gather(1, blk).view(torch.float32)
            m = self.minimum_bits.gather(1, blk).view(torch.float32)
            if self.lo is None:
                lo, hi = (self._buffers[a].gather(1, blk).float() for a in ("lo_levels", "hi_levels"))
            else:
                lo, hi = self.lo, self.hi
            at = (d, m, torch.where(d == 0, 1.0, d), lo, hi)  # a zero scale: every level decodes to m
        self.__dict__["_cache"] = (key, at)
        return at

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_cache", None)  # derived from idx: rebuilt on first use, never copied
        return state

    @torch.no_grad()
    def levels(self, w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The nearest level q of values w [d_out, k] at idx, and its value d * q + m (f32, as the file decodes)."""
        d, m, div, lo, hi = self._at(idx)  # (in place on temporaries: 210 layers of a small model pay per op)
        q = (w.float() - m).div_(div).round_().clamp_(lo, hi)
        return q, q * d + m

    @torch.no_grad()
    def snap(self, val: torch.Tensor, idx: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        """The on-grid deltas (no gradient): w0 + snap(val) is the grid value nearest to w0 + val, where some f32
        delta reaches it. None may: a value smaller in magnitude than its distance from w0 (a step toward or across
        zero) can lie between two sums w0 + delta (f32), and with f32 block scales (ONNX Runtime's) one in five
        random level pairs does. There the level moves toward w0's by up to REACH_STEPS levels, then to w0 itself
        (delta 0): the merge, which adds the delta to w0 in f32, must land on the value exactly."""
        w0f = w0.float()
        q, value = self.levels(w0f + val.float(), idx)
        delta = value - w0f
        bad = (w0f + delta != value) & ~value.isnan()  # (a NaN delta stays NaN, as the merge keeps it)
        if bad.device.type == "cpu" and not bool(bad.any()):  # (on a GPU no host sync: the steps run regardless)
            return delta.to(val.dtype)
        d, m = self._at(idx)[:2]
        q0, _ = self.levels(w0f, idx)
        for _ in range(REACH_STEPS):
            q = torch.where(bad, q - (q - q0).sign(), q)
            value = torch.where(bad, q * d + m, value)
            delta = torch.where(bad, value - w0f, delta)
            bad &= w0f + delta != value
        return torch.where(bad, 0.0, delta).to(val.dtype)

    def forward(self, val: torch.Tensor, idx: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        snapped = self.snap(val, idx, w0)
        if not (torch.is_grad_enabled() and val.requires_grad):
            return snapped
        return snapped + (val - val.detach())  # value: snapped (+0 exactly); gradient: 1 (straight through)

    def extra_repr(self) -> str:
        levels = "levels per block" if self.lo is None else f"levels [{self.lo}, {self.hi}]"
        return f"{self.qtype}, {levels}, block {self.block}"


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
    """converters/gguf_names' view of a GGUF file, and gguf_encode for its grids (imported here: the runtime must
    import without gguf)."""
    try:
        from neuroada_format.converters import gguf_encode, gguf_names
    except ImportError as exc:
        raise missing_extra("training through a GGUF grid needs", exc, "gguf", path=os.fspath(path)) from None
    return gguf_encode, gguf_names.open_gguf_base(path)


def _adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, NeuroAdaLayer]:
    from .guards import layers

    found = {n: layer for n, layer in layers(model).items() if adapter_name in layer.neuroada_val}
    if not found:  # name what there is: an adapter attached under another name is the usual cause
        have = sorted({n for layer in layers(model).values() for n in layer.neuroada_val})
        hint = f" (have: {', '.join(have)}; pass adapter_name=)" if have else " (attach one first)"
        raise NeuroAdaUsageError(f"no attached layer holds an adapter named {adapter_name!r}{hint}")
    return found


@takes_model
def train_on_grid(model: nn.Module, path, adapter_name: str = "default") -> dict[str, str]:
    """Snap `adapter_name`'s deltas to the quantization grid of `path`, the model's base as a quantized file
    (its weights must be that file's de-quantized values): a GGUF file (by its magic) or an ONNX model.

    GGUF: every layer whose tensor is block-quantized with a grid `converters.gguf_encode.block_grid` knows
    (Q4_0, Q4_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K). ONNX: every layer whose weight is an ONNX Runtime MatMulNBits
    weight (4 or 8 bits, with or without zero points), found as `neuroada-merge` finds it (by name, exporter
    scope, node name, else the probe hash over its decoded values). Both: F16/BF16 tensors get their dtype
    (`FloatGrid`: the merge rounds w0 + delta to it); F32 tensors stay plain (they merge exactly as they are),
    as do GGUF block types without a grid here (their merge re-encodes them). Returns {target: type} of every
    adapted layer (a GGUF type name, `MatMulNBits4` / `MatMulNBits8`, or F32/F16/BF16); the snapping ones are
    those with a grid (see `grid_types`).

    Refused before anything changes: a file that is not this model's base (a target it does not hold, another
    shape, or selected weights that are not the file's values: NeuroAdaError), a merged layer, deltas that are
    not float32 or a weight in another layout (NeuroAdaUsageError).
    """
    found = _adapter_layers(model, adapter_name)
    from .guards import _check_path_argument

    path = _check_path_argument(path, "train_on_grid")
    plan = _plan_gguf if _is_gguf(path) else _plan_onnx
    planned, types = plan(model, found, path, adapter_name)
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
        grids.train(layer.training)  # in its layer's mode, as the layer is in its model's (see NeuroAdaLayer)
    from .guards import CONFIGS_ATTR

    configs = getattr(model, CONFIGS_ATTR, None) or {}
    if adapter_name in configs:
        saved = model.__dict__.setdefault(SAVED_CONFIGS_ATTR, {})
        saved.setdefault(adapter_name, configs[adapter_name])
        configs[adapter_name] = dataclasses.replace(configs[adapter_name], save_dtype="F32")
    return types


def _is_gguf(path: str) -> bool:
    """A GGUF file by its magic (or its name, so that a damaged one gets the GGUF reader's verdict); anything
    else is read as an ONNX model, which has no magic of its own (a protobuf message)."""
    from neuroada_format.safe_io import open_regular

    with open_regular(path, rule="1.1") as f:
        return f.read(4) == b"GGUF" or path.lower().endswith(".gguf")


def _check_layer(name: str, layer: NeuroAdaLayer, adapter_name: str, key: str) -> None:
    """What no file can fix: a merged layer, deltas that cannot hold on-grid values, a sharded weight."""
    from .guards import _is_sharded

    if layer.merged:
        raise NeuroAdaUsageError(f"{name} is merged; unmerge before training on a grid", tensor=key)
    val = layer.neuroada_val[adapter_name]
    if val.dtype != torch.float32:
        raise NeuroAdaUsageError(f"deltas in {val.dtype} cannot hold on-grid values exactly; train them in "
                                 f"float32 (delta_dtype='float32', the default; an adapter loaded for "
                                 f"inference holds its file's dtype: load it with is_trainable=True)", tensor=key)
    if _is_sharded(layer.weight):
        raise NeuroAdaUsageError("register the grid before sharding the model (FSDP2)", tensor=key)


def _not_the_values(what: str, path: str, key: str) -> NeuroAdaError:
    return NeuroAdaError(f"the model's weights at the selected entries are not the values of {what}: the file is not "
                         f"this model's base (the model must hold its de-quantized weights)", path=path, tensor=key,
                         rule="4.3")


def _plan_gguf(model, found, gguf_path, adapter_name):
    """{layer name: (layer, grid or None)} and {target: GGUF type} for a GGUF base (see train_on_grid)."""
    from .targets import plain_name

    ge, view = _gguf_view(gguf_path)
    path = view.path
    planned: dict[str, tuple[NeuroAdaLayer, QuantGrid | FloatGrid | None]] = {}
    types: dict[str, str] = {}
    for name, layer in found.items():
        key = plain_name(model, name) + ".weight"
        _check_layer(name, layer, adapter_name, key)
        mapped = view.resolve(key)
        if mapped is None:
            raise NeuroAdaError(f"the GGUF file has no tensor for {key}: it is not this model's base",
                                path=path, tensor=key, rule="4.1")
        if layer.transposed != mapped.transposed:  # (GPT-2's Conv1D weights are stored transposed: gguf_names)
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
                grid = QuantGrid(*ge.block_grid(view, key), qtype=info.type.name).to(w0.device)
            except NeuroAdaUsageError:  # no grid for this type (F32, Q5_0/Q5_1, IQ types): the layer stays plain
                grid = None
        if isinstance(grid, QuantGrid):
            _, on_grid = grid.levels(w0, idx)
            same = torch.equal(on_grid, w0.float())
        else:
            want = view.probed(key, idx.cpu().numpy())  # canonical [d_out, k], whatever the stored orientation
            same = np.array_equal(want.astype(np.float32), w0.detach().float().cpu().numpy())
        if not same:
            raise _not_the_values(f"{mapped.gguf_name} ({info.type.name})", path, key)
        planned[name] = (layer, grid)
    return planned, types


def _onnx_modules(path):
    """converters/onnx_read and onnx_resolve (imported here: the runtime must import without onnx)."""
    try:
        from neuroada_format.converters import onnx_read, onnx_resolve
    except ImportError as exc:
        raise missing_extra("a quantized ONNX model needs", exc, "onnx", path=os.fspath(path)) from None
    return onnx_read, onnx_resolve


def _onnx_targets(model: nn.Module, shapes: dict[str, tuple], values: dict[str, torch.Tensor | None],
                  indices: dict[str, torch.Tensor | None]):
    """{layer name: Target} keyed as `to_adapter` keys the adapter file (the checkpoint's names), which is what
    `neuroada-merge` resolves in the graph: training and merging find the same weight. shapes: canonical
    [d_out, d_in] and layout per layer; values/indices: the layer's w0 and positions, for the probe stage (None:
    the resolver stops before it)."""
    from .guards import TORCH_DTYPE_NAMES
    from .introspection import checkpoint_keys
    from .saving import layer_probe_of
    from .targets import plain_name

    saved = checkpoint_keys(model)
    out = {}
    for name, (shape, layout, dtype) in shapes.items():
        module = plain_name(model, name)
        key = saved.get(module + ".weight", module + ".weight")
        idx = indices.get(name)
        idx = np.zeros((shape[0], 1), np.int32) if idx is None else idx.detach().cpu().numpy().astype(np.int32)
        probe = None if values.get(name) is None else layer_probe_of(values[name])
        out[name] = naf.Target(key, idx, np.zeros(idx.shape, np.float32), tuple(shape), layout,
                               TORCH_DTYPE_NAMES.get(dtype, "F32"), probe)
    return out


def _plan_onnx(model, found, onnx_path, adapter_name):
    """{layer name: (layer, grid or None)} and {target: type} for an ONNX base (see train_on_grid): each target
    resolved by converters/onnx_resolve, as the merge resolves it."""
    rd, rs = _onnx_modules(onnx_path)
    view = rd.OnnxModel(onnx_path)
    try:
        shapes = {n: ((l.d_out, l.d_in), "in_out" if l.transposed else "out_in", l.weight.dtype)
                  for n, l in found.items()}
        targets = _onnx_targets(model, shapes, {n: l.neuroada_w0[adapter_name] for n, l in found.items()},
                                {n: l.neuroada_idx[adapter_name] for n, l in found.items()})
        for name, layer in found.items():
            _check_layer(name, layer, adapter_name, targets[name].name)
        adapter = naf.Adapter({t.name: t for t in targets.values()})
        resolutions = rs.resolve_targets(view.path, adapter, _model=view)
        planned, types = {}, {}
        for name, layer in found.items():
            key = targets[name].name
            res = resolutions[key]
            idx, w0 = layer.neuroada_idx[adapter_name], layer.neuroada_w0[adapter_name]
            for init, layout in res.initializers():  # the merge's own dtype and shape check (rule 4.2), now
                problem = rs.stored_mismatch(view, init, layout, targets[name])
                if problem:  # (an F16 head of an f16 export, for an f32 model: no merge takes that adapter)
                    raise NeuroAdaError(f"{problem}: neuroada-merge refuses it (a float initializer must have the "
                                        f"model's dtype); leave this layer out of the targets", path=view.path,
                                        tensor=key, rule="4.2")
            cols = idx.detach().cpu().numpy().astype(np.int64)
            rows = np.arange(layer.d_out)[:, None]
            nb = view.quantized(res.initializer)
            if nb is not None:
                weight = view.nbits_weight(res.initializer)
                want = weight.values_at(rows, cols)
                types[key] = f"MatMulNBits{nb.bits}"
                grid = QuantGrid(*weight.grid(), qtype=types[key]).to(w0.device)
                what = f"MatMulNBits weight {res.initializer!r} ({nb.bits}-bit)"
            else:
                types[key] = view.dtype(res.initializer)
                want = canonical_view(view.array(res.initializer), res.layout)[rows, cols]
                grid = FloatGrid(types[key]) if types[key] in FloatGrid.DTYPES else None
                what = f"initializer {res.initializer!r} ({types[key]})"
            if not np.array_equal(np.asarray(want, np.float32), w0.detach().float().cpu().numpy()):
                raise _not_the_values(what, view.path, key)
            planned[name] = (layer, grid)
        return planned, types
    finally:
        view.close()


@takes_model
def load_quantized_weights(model: nn.Module, onnx_path) -> dict[str, str]:
    """Copy every MatMulNBits weight of an ONNX Runtime quantized model, de-quantized (fl32(scale * (code - zero
    point)); with float zero points fl32(fl32(code * scale) - fl32(scale * zero point)): the values ONNX Runtime
    computes with), into the model's linear layer it belongs to: the weights
    `train_on_grid` needs the model to hold. A GGUF file's are read by transformers' own loader instead
    (`from_pretrained(folder, gguf_file=name)`, docs/gguf.md); float initializers are left as the model has them.

    A weight belongs to the layer that `neuroada-merge`'s resolver finds it for by name, exporter scope or node name
    (never by probe: the model does not hold the values yet). A weight nothing names (a dynamo export quantized by
    ONNX Runtime keeps no name or scope) belongs to the layer it was quantized from: the model holds that checkpoint's
    float weights, and a round-to-nearest quantizer stores each value's nearest level (`_match_by_values`). Every
    MatMulNBits weight must find its layer, and each layer must be float32 (the decoded values need binary32);
    otherwise nothing is copied. Call it before `attach`. Returns {target key: the weight's name in the graph}.
    """
    from .guards import _canonical, _check_path_argument, _layout, layers
    from .targets import _adaptable

    path = _check_path_argument(onnx_path, "load_quantized_weights")
    if _is_gguf(path):
        raise NeuroAdaUsageError("a GGUF file's de-quantized weights are read by transformers' loader, "
                                 "from_pretrained(folder, gguf_file=name) (see docs/gguf.md); this call reads "
                                 "ONNX MatMulNBits models", path=path)
    if layers(model):
        raise NeuroAdaUsageError("load the quantized weights before attach: attach selects from the weights it finds "
                                 "and keeps their values at the selected entries")
    rd, rs = _onnx_modules(path)
    view = rd.OnnxModel(path)
    try:
        if not any(view.quantized(n) is not None for n in view.nbits):  # (the float export passed for the int4 one)
            raise NeuroAdaUsageError("the model holds no MatMulNBits weight (not an ONNX Runtime 4/8-bit quantized "
                                     "model), so there is nothing to load; pass the quantized file", path=view.path)
        modules = {n: m for n, m in _adaptable(model).items() if isinstance(getattr(m, "weight", None), torch.Tensor)}
        targets = _onnx_targets(model, {n: (tuple(_canonical(m).shape), _layout(m), m.weight.dtype)
                                        for n, m in modules.items()}, {}, {})
        found, refused = rs.resolve_by_name(view, targets.values())
        owner: dict[str, str] = {}
        for name, t in targets.items():
            res = found.get(t.name)
            if res is None or view.quantized(res.initializer) is None:
                continue
            if res.initializer in owner:
                raise NeuroAdaError(f"layers {owner[res.initializer]} and {name} both resolve to MatMulNBits weight "
                                    f"{res.initializer!r}", path=view.path, tensor=t.name, rule="4.1")
            owner[res.initializer] = name
        missing = [n for n in view.nbits if view.quantized(n) is not None and n not in owner]
        named = [refused[t] for t in sorted(refused) if any(repr(m) in str(refused[t]) for m in missing)]
        if named:  # a layer named a missing weight but was refused: its reason is the one to read (not another
            raise named[0]  # layer's, e.g. a tied head's float table, which this call leaves as it is anyway)
        decoded = {}
        if missing:  # nothing names them (a dynamo export quantized by ONNX Runtime): the layer they round from
            free = {n: _canonical(m).detach().float().cpu().numpy() for n, m in modules.items()
                    if n not in owner.values()}
            for init, name in _match_by_values(view, missing, free, decoded).items():
                owner[init] = name
        sharing: dict[int, list[str]] = {}
        for pname, p in model.named_parameters(remove_duplicate=False):
            sharing.setdefault(id(p), []).append(pname)
        for init, name in owner.items():
            key = targets[name].name
            weight = modules[name].weight
            if weight.dtype != torch.float32:
                raise NeuroAdaUsageError(f"{name} is {weight.dtype}; the de-quantized values need float32 to be held "
                                         f"exactly (load the model with dtype=torch.float32)", tensor=key)
            tied = [n for n in sharing.get(id(weight), []) if n != name + ".weight"]
            if tied:  # (a tied head: the export reads the embedding's own float copy, which the file keeps)
                raise NeuroAdaUsageError(
                    f"{name}.weight is tied to {', '.join(tied)}: copying MatMulNBits weight {init!r} into it would "
                    f"change those too, which the file does not quantize; untie it first (model.{name}.weight = "
                    f"torch.nn.Parameter(model.{name}.weight.detach().clone())) or quantize without that node",
                    path=view.path, tensor=key)
            values = decoded[name] if name in decoded else view.nbits_weight(init).decode_all()
            if not np.isfinite(values).all():
                raise NeuroAdaError(f"MatMulNBits weight {init!r} decodes to NaN or Inf (a scale is not finite); the "
                                    f"file is damaged", path=view.path, tensor=key, rule="1.6")
            decoded[name] = values
    finally:
        view.close()
    with torch.no_grad():  # every check passed: copy them all
        for name, values in decoded.items():
            w = _canonical(modules[name])
            w.copy_(torch.from_numpy(values).to(w.device))
    return {targets[name].name: init for init, name in owner.items()}


SAMPLE_BLOCKS = 64  # blocks of a weight checked against every same-shape layer before all its blocks are


def _match_by_values(view, missing: list[str], free: dict[str, np.ndarray], decoded: dict) -> dict[str, str]:
    """{MatMulNBits weight: the layer of `free` ({name: float [d_out, d_in]}, layers no name placed) it rounds from}.

    A layer matches a weight of its [d_out, d_in] = [N, K] when every decoded value is its block's level nearest to the
    layer's float value (`onnx_nbits.Weight.rounds_from`: within half a step, or the clamped end level), which is what
    ONNX Runtime's default round-to-nearest quantizer stores, and its HQQ quantizer too (each weight on its block's
    nearest code, for the scale and float zero point it optimised). The weights of another checkpoint fail on almost every block. Each weight needs
    exactly one such layer and each layer at most one weight: a tie (two layers with the same weights) is refused,
    never guessed, and so is a weight no layer rounds to, which is also what a quantizer that moves values off their
    nearest level (GPTQ's error compensation) gives. Checked on SAMPLE_BLOCKS spread blocks of every same-shape pair
    at once, then on all blocks of the pairs left. Fills `decoded` {layer: the weight's decoded values} with the
    values the check decoded."""
    from neuroada_format.converters import onnx_nbits  # (imported by _onnx_modules already: onnx is there)

    found: dict[str, list[str]] = {}
    values: dict[str, np.ndarray] = {}  # a weight's decoded blocks, once it has a candidate
    groups: dict[tuple, list[str]] = {}
    for init in missing:
        nb = view.nbits[init]
        onnx_nbits.refuse(view, nb, init)
        groups.setdefault((nb.N, nb.K, nb.block), []).append(init)
    for (N, K, block), inits in groups.items():
        names = [n for n, v in free.items() if v.shape == (N, K)]
        if not names:
            for init in inits:
                found[init] = []
            continue
        blocks = view.nbits_weight(inits[0]).blocks  # ([N, K] -> [blocks, block], a padded last block's padding 0)
        total = N * view.nbits[inits[0]].n_blocks
        ids = np.unique(np.linspace(0, total - 1, min(SAMPLE_BLOCKS, total)).round().astype(np.int64))
        sample = np.stack([blocks(free[n])[ids] for n in names])                          # [layers, blocks, block]
        everywhere = np.arange(total)
        for init in inits:
            weight = view.nbits_weight(init)
            maybe = [n for n, ok in zip(names, weight.rounds_from(ids, sample).all(-1)) if ok]
            if maybe:
                values[init] = weight.decode(everywhere)  # [blocks, block]: decode_all's values, decoded once
            found[init] = [n for n in maybe
                           if weight.rounds_from(everywhere, blocks(free[n]), values[init]).all()]
    for init in missing:
        if len(found[init]) > 1:
            raise NeuroAdaError(f"MatMulNBits weight {init!r} rounds from layers {', '.join(found[init])} alike (their "
                                f"float weights are the same): which one it belongs to is not known, so nothing is "
                                f"copied; name it after its layer or keep the exporter's scopes", path=view.path,
                                tensor=init, rule="4.1")
    unplaced = [i for i in missing if not found[i]]
    if unplaced:
        nb = view.nbits[unplaced[0]]
        same = [n for n, v in free.items() if v.shape == (nb.N, nb.K)]
        head = (f"{len(unplaced)} of the file's {len(view.nbits)} MatMulNBits weights (e.g. {unplaced[0]!r}, B "
                f"{nb.b!r}, [N, K] = [{nb.N}, {nb.K}]) match no layer of the model by name, exporter scope or node name")
        if not same:
            raise NeuroAdaError(f"{head}, and no layer has its shape [d_out, d_in] = [{nb.N}, {nb.K}]: the file is "
                                f"not an export of this model", path=view.path, tensor=unplaced[0], rule="4.1")
        raise NeuroAdaError(
            f"{head}, and none of the {len(same)} layers of its shape holds float weights it rounds to nearest from "
            f"(each decoded value within half a block step of the layer's): load the checkpoint the file was "
            f"quantized from, in float32. A quantizer that does not round to nearest (GPTQ) cannot be matched by "
            f"values: put each MatMul node's metadata_props (the exporter's scopes) back on the MatMulNBits node "
            f"that replaced it, or export with dynamo=False", path=view.path, tensor=unplaced[0], rule="4.3")
    owner: dict[str, str] = {}
    for init in missing:
        name = found[init][0]
        if name in owner.values():
            other = next(i for i, n in owner.items() if n == name)
            raise NeuroAdaError(f"MatMulNBits weights {other!r} and {init!r} both round from layer {name}: which one it "
                                f"holds is not known, so nothing is copied", path=view.path, tensor=init, rule="4.1")
        owner[init] = name
        decoded[name] = view.nbits_weight(init).unblocked(values[init])
    return owner


@takes_model
def grid_types(model: nn.Module, adapter_name: str = "default") -> dict[str, str]:
    """{layer name: GGUF type} of the layers whose `adapter_name` deltas are snapped to a grid now."""
    from .guards import layers

    out = {}
    for name, layer in layers(model).items():
        grid = layer.grid(adapter_name)
        if grid is not None:
            out[name] = grid.qtype
    return out


@takes_model
def remove_grid(model: nn.Module, adapter_name: str = "default", *, snap: bool = False) -> None:
    """Back to plain deltas. With snap=True the snapped values are written into the deltas first, so the
    adapter keeps its on-grid values everywhere (serving, combining) and its F32 save dtype; without, the
    unsnapped deltas and the save dtype from before the grid come back."""
    from .guards import CONFIGS_ATTR

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
