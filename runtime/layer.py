"""``NeuroAdaLayer``: a PEFT-style wrapper holding sparse top-k deltas for one linear layer.

Per adapter name it stores ``idx`` (int64 ``[d_out, k]``), ``val`` (trainable ``[d_out, k]``) and
``w0`` (the original entries, base dtype ``[d_out, k]``) -- nothing dense. Keeping ``w0`` makes
unmerge exact (bit for bit) instead of a lossy subtraction.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import weakref
from collections import Counter
from typing import Iterable, Sequence

import torch
from torch import nn

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.errors import warn_caller

from .functional import (Overlay, additive_sparse_delta, inplace_sparse_delta_linear, merge_, transforms_active,
                         unmerge_, weight_lock)
from .kernels.cache import alias_key, aliases, cache_here, outside_inference, storage_of, version
from .kernels.pattern import Pattern
from .kernels.reference import INT_VIEW, gather_exact

__all__ = ["NeuroAdaLayer", "MODES", "check_adapter_name", "own_state_read"]

MODES = ("inplace", "additive")
GRID_ATTR = "neuroada_grid"  # a layer's nn.ModuleDict of quantization grids (runtime/quant_grid.py), by adapter


def _conv1d_type():
    # transformers is slow to import: if a Conv1D exists, transformers is already loaded
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


class _BufferDict(nn.Module):
    """Named buffers, so state_dict keys read ``<layer>.neuroada_idx.<adapter>`` like PEFT's.

    Adapters with one set of positions hold aliases of one tensor (see NeuroAdaLayer._twin): distinct tensor
    objects over one storage, so that ``named_buffers``, ``torch.func.functional_call`` and every other reader
    still sees one tensor per adapter. The container keeps that invisible wherever it is read or written, also
    when a caller goes through it directly (``layer.neuroada_idx.load_state_dict(...)``): a state loaded into an
    entry gives it its own copy first, and ``state_dict`` hands out a copy of an entry whose storage an earlier
    entry already gave (safetensors refuses shared memory)."""

    def __init__(self):
        super().__init__()
        self.register_state_dict_post_hook(_distinct_state)

    def __getstate__(self):
        """Aliases are pickled as one tensor object (pickle keeps one copy of an object, not of a storage),
        which __setstate__ turns into aliases again: a copy shares what the original shared."""
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        first, buffers = {}, type(self._buffers)()
        for n, t in self._buffers.items():
            key = None if t is None else alias_key(t)
            buffers[n] = t if key is None else first.setdefault(key, t)
        state["_buffers"] = buffers
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        seen = set()
        for n, t in self._buffers.items():  # one object under several names (see __getstate__): aliases of it
            if t is not None and id(t) in seen:
                self._buffers[n] = t.detach()
            seen.add(id(t))
        if _distinct_state not in self._state_dict_hooks.values():  # pickled before adapters could share
            self.register_state_dict_post_hook(_distinct_state)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __setitem__(self, name: str, t: torch.Tensor) -> None:
        self.register_buffer(name, t)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # torch copies a loaded tensor into the buffer: an entry sharing its storage with another gets its own first
        self.unshare([n for n in self._buffers if prefix + n in state_dict])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def unshare(self, names: Iterable[str]) -> None:
        """Give these entries their own copy where their storage is another entry's too."""
        held = Counter(storage_of(t) for t in self._buffers.values() if t is not None)
        for n in names:
            t = self._buffers[n]
            if t is not None and held[storage_of(t)] > 1:
                with outside_inference():
                    self._buffers[n] = t.clone()


_CONTAINERS: tuple = ()


BASE_ADAPTER = "__base__"  # the name set_adapter / adapter_batch give the plain base
# runtime/multi.py's per-layer serving caches (mixed-batch stacks, same-positions answers, set_adapter's merged
# entries), kept in the layer's __dict__; derived from idx/val/w0 and rebuilt on first use, so never copied
SERVING_CACHES = ("_neuroada_stack", "_neuroada_same_positions", "_neuroada_merged_values")
# merged sets of adapters (ordered) whose positions and originals a layer keeps, the most recently used: a server
# merging many combinations by hand kept one Overlay per combination ever seen (+58 MB for the 30 pairs of 6 adapters
# on a small model); training and serving use one or two
OVERLAYS_KEPT = 4


def check_adapter_name(name) -> None:
    """Adapter names become attribute names of torch containers (``neuroada_val.<name>``), so refuse the ones
    torch would refuse (a dot, or an attribute the container already has: ``copy``, ``keys``, ``train``...)
    with our error, before anything is added, rather than torch's KeyError halfway through."""
    global _CONTAINERS
    if not isinstance(name, str) or not name or any(c in name for c in "./\\"):
        raise NeuroAdaUsageError(f"adapter name {name!r} must be a non-empty string without '.', '/' or '\\'")
    # save_pretrained writes every adapter but "default" to a sub-folder of its name: refuse, up front, what is not
    # a folder name on common file systems (NUL nowhere, control characters not on Windows, over 255 bytes not on
    # ext4 or APFS), instead of a save that stops halfway after the training, or a folder that cannot be copied
    if any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name.encode("utf-8", "surrogatepass")) > 255:
        raise NeuroAdaUsageError(f"adapter name {name!r} must be a portable folder name, as save_pretrained writes it: "
                                 "no control characters, at most 255 bytes of UTF-8")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise NeuroAdaUsageError(f"adapter name {name!r} holds a lone surrogate, which no file name can")
    if name == BASE_ADAPTER:
        raise NeuroAdaUsageError(f"adapter name {name!r} is reserved for the plain base (set_adapter and "
                                 "adapter_batch read it so)")
    if not _CONTAINERS:
        _CONTAINERS = (nn.ParameterDict(), _BufferDict())
    if any(hasattr(c, name) for c in _CONTAINERS):
        raise NeuroAdaUsageError(f"adapter name {name!r} is taken by torch (an attribute of the containers that hold "
                                 "adapters, like ParameterDict.copy or Module.train); pick another")


def mode_problem(base_layer: nn.Module, mode: str) -> str | None:
    """Why ``base_layer`` cannot run in ``mode``, or None. attach and load_adapter ask it of every target before
    they change anything (a refusal found at the n-th layer left n-1 layers wrapped)."""
    if mode not in MODES:
        return f"mode must be one of {', '.join(MODES)}, got {mode!r}"
    if mode == "inplace" and type(base_layer) not in (nn.Linear, _conv1d_type()):
        return (f"inplace mode needs an exact nn.Linear or Conv1D base (its forward is mirrored), not "
                f"{type(base_layer).__name__}; use mode='additive' (or 'auto', which picks it)")
    if mode == "inplace" and not base_layer.weight.is_contiguous():  # said at attach, not at the first forward
        return ("inplace mode writes into the weight, which is not contiguous (a view with other strides, e.g. a "
                "transpose); use mode='additive' (or 'auto', which picks it)")
    return None


class NeuroAdaLayer(nn.Module):
    """Wraps ``nn.Linear`` or transformers' ``Conv1D`` (kept as ``base_layer``, like PEFT).

    ``mode="inplace"`` writes deltas into the frozen weight around each GEMM (needs an exact
    ``nn.Linear``/``Conv1D`` with a contiguous weight); ``mode="additive"`` adds ``S(x)`` to the
    untouched base output.
    """

    adapter_layer_names = ("neuroada_val",)
    other_param_names = ("neuroada_idx", "neuroada_w0")
    # odd while merge, unmerge or a switch writes the weight, one more after: an additive forward on another thread
    # that saw it move ran through a switch (base(x) may have read merged entries) and is done again under the lock
    _writes = 0

    def __init__(self, base_layer: nn.Module, mode: str = "inplace"):
        super().__init__()
        conv1d = _conv1d_type()
        if isinstance(base_layer, nn.Linear):
            self.transposed = False
            self.d_out, self.d_in = base_layer.weight.shape
        elif conv1d is not None and isinstance(base_layer, conv1d):
            self.transposed = True
            self.d_in, self.d_out = base_layer.weight.shape
        else:
            raise NeuroAdaUsageError(f"NeuroAdaLayer wraps nn.Linear or transformers Conv1D, not "
                                     f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        self.neuroada_val = nn.ParameterDict()
        self.neuroada_idx = _BufferDict()
        self.neuroada_w0 = _BufferDict()
        self.set_mode(mode)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._patterns: dict[str, Pattern] = {}
        self._overlays: dict[tuple, Overlay] = {}
        self._loading: dict | None = None  # set by _load_from_state_dict for the post-load hook
        self._twins: dict[tuple, str] = {}  # positions key -> an adapter holding them (see _twin)
        self.parked: set[str] = set()  # trainable adapters the runtime paused (see model.park)
        self.register_load_state_dict_post_hook(_after_load)
        self.register_state_dict_pre_hook(_current_w0)
        # in the mode of the layer it replaces: a new module trains, so an eval() model came back from attach or
        # load_adapter with every adapted layer in training mode (a merged eval forward warned it trains nothing)
        self.train(base_layer.training)

    def __getstate__(self):
        """Copies and pickles carry no caches: patterns and overlays hold tensors derived from idx/w0
        (a CSR among them, which cannot be deep-copied) and are rebuilt on first use; so do the serving caches,
        whose keys hold storage objects (multi._Storage), which pickle and torch.save refuse."""
        if "_neuroada_mixed" in self.__dict__:  # see multi.adapter_batch: the block's state lives in the layers
            raise NeuroAdaUsageError("copying a model inside an adapter_batch block is not supported: its layers hold "
                                     "the block's per-sequence state, which only the block puts back; copy it before "
                                     "or after the block")
        if "_neuroada_disabled" in self.__dict__:  # see multi.disable_adapter (model.DISABLED_ATTR)
            # the copy served the base for good and refused set_adapter, merge, ... "inside a disable_adapter block"
            # that it could never leave
            raise NeuroAdaUsageError("copying a model inside a disable_adapter block is not supported: the copy would "
                                     "stay disabled, with no block to leave; copy it before or after the block (a copy "
                                     "of the plain base: unload(copy.deepcopy(model)))")
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = {k: v for k, v in state.items() if k not in SERVING_CACHES and k not in ("_w0_weight", "_w0_version")}
        state.update(_patterns={}, _overlays={}, _loading=None)  # (the copy checks its w0 against its weight once)
        return state

    def __setstate__(self, state):
        state.setdefault("_twins", {})  # layers pickled before adapters could share positions
        state.setdefault("parked", set())  # ... or kept their paused adapters
        super().__setstate__(state)
        if _current_w0 not in self._state_dict_pre_hooks.values():  # pickled before it was registered
            self.register_state_dict_pre_hook(_current_w0)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.cuda()``... convert each buffer on its own: adapters that shared their idx and
        w0 (see _twin) share the converted ones again, instead of each keeping a copy; a merged adapter is merged again
        in a new dtype, so it serves what switching to it after the cast serves."""
        groups = []
        for kind in (self.neuroada_idx, self.neuroada_w0):
            held = {}
            for n, t in kind._buffers.items():
                key = None if t is None else alias_key(t)
                if key is not None:
                    held.setdefault(key, []).append(n)
            groups += [(kind, names) for names in held.values() if len(names) > 1]
        dtype = getattr(self.base_layer.weight, "dtype", None)
        out = super()._apply(fn, recurse)
        for kind, names in groups:
            first = kind._buffers.get(names[0])
            for n in names[1:]:
                t = kind._buffers.get(n)
                if first is not None and t is not None and not aliases(t, first):
                    kind._buffers[n] = first.detach()  # a distinct tensor object over the same storage
        if self.merged_adapters and getattr(self.base_layer.weight, "dtype", None) != dtype:
            # the weight held round(w0 + val) in the old dtype, now rounded again: it served other bits than the same
            # adapter switched to after the cast (a double rounding, history-dependent); the converted w0 goes back and
            # the merge is done again in the new dtype
            merged = list(self.merged_adapters)
            with torch.no_grad():
                self.unmerge()
                self.merge(merged)
        return out

    # -- configuration -------------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        problem = mode_problem(self.base_layer, mode)
        if problem:
            raise NeuroAdaUsageError(problem)
        self.mode = mode

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def __setattr__(self, name: str, value) -> None:
        """`weight` and `bias` are the base layer's: transformers' tie_weights sets ``lm_head.weight`` to the input
        embeddings again (which failed on the property with a bare KeyError); a weight set this way is the one served
        from then on, its originals read again (see reread_w0)."""
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", {}):
            if self.merged_adapters:
                raise NeuroAdaUsageError(f"cannot replace the {name} of a layer with merged adapters "
                                         f"({', '.join(self.merged_adapters)}): unmerge first")
            old = self.base_layer.weight
            if name == "weight" and (not isinstance(value, torch.Tensor) or value.shape != old.shape
                                     or value.dtype != old.dtype or value.device != old.device):
                what = (f"{type(value).__name__}" if not isinstance(value, torch.Tensor) else
                        f"a {value.dtype} weight of shape {tuple(value.shape)} on {value.device}")
                raise NeuroAdaUsageError(f"{what} cannot replace this adapted layer's {old.dtype} weight of shape "
                                         f"{tuple(old.shape)} on {old.device}: its adapters index it and hold its "
                                         f"values at their entries (move or convert the whole model instead)")
            setattr(self.base_layer, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _canonical_weight(self) -> torch.Tensor:
        W = self.base_layer.weight
        return W.t() if self.transposed else W

    def base_values(self, idx: torch.Tensor) -> torch.Tensor:
        """The base weight's own values at ``idx`` (canonical ``[d_out, k]``, int64, on the weight's device), also
        while adapters are merged: at their entries, their originals. load_adapter unmerged a served model for the
        whole load, and requests on other threads meanwhile got the plain base."""
        W = self.base_layer.weight
        with weight_lock(W):  # (never read while another thread's forward has its entries written)
            vals = gather_exact(self._canonical_weight().detach(), idx)
            if self.merged_adapters:
                ov = self.overlay(self.merged_adapters)
                r = torch.arange(self.d_out, device=idx.device).unsqueeze(1)
                pos = (idx * self.d_out + r if self.transposed else r * self.d_in + idx).reshape(-1)
                flat, order = ov.flat.sort()
                j = torch.searchsorted(flat, pos).clamp_(max=flat.numel() - 1)
                hit = flat[j] == pos
                vals.view(-1)[hit] = ov.w0.reshape(-1)[order][j[hit]].to(vals.dtype)
        return vals

    def add_adapter(self, name: str, idx: torch.Tensor, *, val: torch.Tensor | None = None,
                    val_dtype: torch.dtype = torch.float32, activate: bool | None = None) -> None:
        """Register ``idx`` (canonical ``[d_out, k]``, rows strictly increasing) with zero deltas
        (or ``val``). ``w0``: the base's values there (``base_values``: merged adapters stay merged).
        Activates the adapter when none is active (or when ``activate`` says so)."""
        check_adapter_name(name)
        if name in self.neuroada_val:
            raise NeuroAdaUsageError(f"adapter {name!r} exists")
        if self.merged and (activate or (activate is None and not self.active_adapters)):
            # (a merged layer's forward serves the merged adapters alone)
            raise NeuroAdaUsageError("unmerge before adding an active adapter: a merged layer serves what is merged")
        self.reread_w0()  # the adapters here already: an edit of the weight since they were added is theirs too
        W = self._canonical_weight()
        # ordinary tensors even when called in torch.inference_mode(): the adapter outlives the block and may train
        with outside_inference():
            idx = torch.as_tensor(idx).to(device=W.device, dtype=torch.int64).contiguous()
            if idx.is_inference():
                idx = idx.clone()
            if idx.dim() != 2 or idx.shape[0] != self.d_out:
                raise NeuroAdaError(f"idx must be [{self.d_out}, k], got {tuple(idx.shape)}", rule="3.4")
            pattern = Pattern(idx, self.d_in, transposed=self.transposed)  # validates range and order
            w0 = self.base_values(idx).contiguous()
            twin = self._twin(idx, w0)
            if twin is not None:  # the same positions and originals as an adapter here: hold one copy of them
                # aliases, not the twin's tensor objects: each adapter still has a tensor of its own (named_buffers,
                # functional_call and the like see one per adapter), only the storage is one
                pattern = self.pattern(twin)
                idx, w0 = self.neuroada_idx[twin].detach(), self.neuroada_w0[twin].detach()
            if val is None:
                v = torch.zeros(idx.shape, dtype=val_dtype, device=W.device)
            else:
                if tuple(val.shape) != tuple(idx.shape):
                    raise NeuroAdaError(f"val shape {tuple(val.shape)} != idx shape {tuple(idx.shape)}", rule="3.4")
                v = val.detach().to(device=W.device).clone()
        self.neuroada_idx[name] = idx
        self.neuroada_w0[name] = w0
        self.neuroada_val[name] = nn.Parameter(v)
        self._patterns[name] = pattern  # built on the very tensor now registered as the buffer
        self._twins.setdefault(_positions_key(idx), name)
        self._matched()
        if activate or (activate is None and not self.active_adapters):
            self.active_adapters.append(name)

    # -- adapters with one set of positions --------------------------------------------------------

    def _twin(self, idx: torch.Tensor, w0: torch.Tensor) -> str | None:
        """An adapter of this layer with these very positions and originals, or None.

        Magnitude top-k with one k selects the same entries of one base for every task, and a server loads dozens
        of such adapters: they share one ``idx`` and one ``w0`` tensor (10-12 of the 14-16 bytes an entry costs in
        memory, bf16 or f32 base), each keeping its own values. They hold aliases (distinct tensor objects over one
        storage, sharing a version counter), and sharing is invisible: a state loaded into one of them gives it its
        own copies first, and ``state_dict`` hands out copies (safetensors refuses tensors that share memory), both
        done by the containers (_BufferDict). Found through a content key, so a load costs the same with hundreds
        loaded."""
        name = self._twins.get(_positions_key(idx))
        if name is None or name not in self.neuroada_idx:
            return None
        i, w = self.neuroada_idx[name], self.neuroada_w0[name]
        if (i.shape != idx.shape or i.device != idx.device or i.is_inference() or w.dtype != w0.dtype
                or not torch.equal(i, idx) or not torch.equal(w, w0)):
            return None
        return name

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise NeuroAdaUsageError(f"adapter {name!r} is merged; unmerge first")
        idx = self.neuroada_idx[name]
        del self.neuroada_val[name]
        del self.neuroada_idx[name]
        del self.neuroada_w0[name]
        for key in [k for k, n in self._twins.items() if n == name]:  # another holder of the same tensors, if any
            heir = next((n for n, t in self.neuroada_idx._buffers.items() if aliases(t, idx)), None)
            if heir is None:
                del self._twins[key]
            else:
                self._twins[key] = heir
        self._patterns.pop(name, None)
        self._overlays = {k: v for k, v in self._overlays.items() if name not in k}
        self.parked.discard(name)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_adapter(self, names: str | Sequence[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        self._require(names)
        self.active_adapters = names

    def _require(self, names) -> None:
        missing = [n for n in names if n not in self.neuroada_val]
        if missing:
            raise NeuroAdaUsageError(f"no adapter named {missing[0]!r} in this layer "
                                     f"(have: {', '.join(self.neuroada_val) or 'none'})")

    # -- state_dict loading ---------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Loading may replace idx, w0, val or the base weight; the derived state is fixed afterwards
        (``_after_load``). A merged layer is unmerged first and merged again after, so a state taken
        merged or unmerged loads the same way: the weight's selected entries are always re-derived
        from ``w0`` (the original) rather than trusted from the file."""
        if self._loading is None:  # not prepared already by the model's own hook (see hf_checkpoint.py)
            self._loading = {"merged": self.prepare_load(state_dict, prefix)}
        self._loading["keys"] = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
        self._widen_held(state_dict, prefix)
        # (an adapter sharing positions with others gets its own copy of what is loaded: see _BufferDict)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _widen_held(self, state_dict, prefix: str) -> None:
        """Frozen values held in a narrower dtype than the state brings (load_adapter holds an inference adapter in
        its file's BF16) are widened to it, up to f32, before torch copies the state in: loading save_pretrained's
        exact f32 state after load_adapter gives the trained values back, not their BF16 rounding. Trainable values
        keep the dtype their config chose (delta_dtype), as any parameter does."""
        for name, val in self.neuroada_val.items():
            got = state_dict.get(f"{prefix}neuroada_val.{name}")
            if got is None or val.requires_grad or not got.is_floating_point():
                continue
            wide = torch.promote_types(val.dtype, got.dtype)
            if wide == torch.float64 and val.dtype != torch.float64:
                wide = torch.float32
            if wide != val.dtype:
                with outside_inference():
                    val.data = val.data.to(wide)

    def prepare_load(self, state_dict, prefix: str) -> list[str]:
        """Check this layer's entries of a state dict, then unmerge; returns the adapters that were
        merged (to merge again after the load). Raises NeuroAdaError before changing anything."""
        for name in list(self.neuroada_idx.keys()):  # bad shapes and indices are refused before anything changes
            # (torch refuses a size mismatch only after loading every other tensor)
            for kind, have in (("idx", self.neuroada_idx[name]), ("val", self.neuroada_val[name]),
                               ("w0", self.neuroada_w0[name])):
                got = state_dict.get(f"{prefix}neuroada_{kind}.{name}")
                if got is not None and tuple(got.shape) != tuple(have.shape):
                    raise NeuroAdaError(f"shape {list(got.shape)} in the state, {list(have.shape)} in the model (an "
                                        f"adapter attached with another k?); nothing was loaded",
                                        tensor=f"{prefix}neuroada_{kind}.{name}", rule="4.2")
            idx = state_dict.get(f"{prefix}neuroada_idx.{name}")
            if idx is not None:
                try:
                    Pattern(idx.to(torch.int64), self.d_in)
                except NeuroAdaError as exc:
                    raise NeuroAdaError(exc.detail, tensor=f"{prefix}neuroada_idx.{name}", rule=exc.rule) from None
        merged = list(self.merged_adapters)
        self.unmerge()
        try:
            if f"{prefix}base_layer.weight" not in state_dict and _is_plain(self.base_layer.weight):
                self._check_w0(state_dict, prefix)
        except NeuroAdaError:
            if merged:
                self.merge(merged)
            raise
        return merged

    def _check_w0(self, state_dict, prefix) -> None:
        """A w0 from a state without the weight must describe this very base: restoring it around
        every GEMM would otherwise write another model's values into the weight."""
        W = self._canonical_weight().detach()
        for name in list(self.neuroada_w0.keys()):
            w0 = state_dict.get(f"{prefix}neuroada_w0.{name}")
            if w0 is None:
                continue
            idx = state_dict.get(f"{prefix}neuroada_idx.{name}", self.neuroada_idx[name])
            ok = (tuple(w0.shape) == tuple(idx.shape) and not idx.is_floating_point()
                  and bool(((idx >= 0) & (idx < self.d_in)).all()))
            idx = idx.to(torch.int64)
            if not ok or not _same_bits(gather_exact(W, idx.to(W.device)), w0.to(device=W.device, dtype=W.dtype)):
                raise NeuroAdaError("the state's original entries (neuroada_w0) differ from this model's weights: "
                                    "it was saved from other base weights", tensor=f"{prefix}neuroada_w0.{name}",
                                    rule="4.3")

    # -- cached index structures --------------------------------------------------------------

    def pattern(self, name: str) -> Pattern:
        idx = self.neuroada_idx[name]
        if not cache_here():  # a torch.compile trace: derived from the live idx in the graph, nothing cached
            self.check_in_memory([name])
            return Pattern(idx, self.d_in, transposed=self.transposed, validate=False)  # checked where idx entered
        p = self._patterns.get(name)
        if p is None or not p.is_current(idx):  # .to(device), offloading or load_state_dict replaced/rewrote idx
            self._refresh([name])
            p = Pattern(self.neuroada_idx[name], self.d_in, transposed=self.transposed)
            self._patterns[name] = p
        return p

    def overlay(self, names: Iterable[str]) -> Overlay:
        names = tuple(names)
        pats = [self.pattern(n) for n in names]
        w0s = [self.neuroada_w0[n] for n in names]
        if not cache_here():  # as in pattern()
            return Overlay(pats, w0s)
        ov = self._overlays.get(names)
        if ov is not None and ov.is_current(pats, w0s) and next(reversed(self._overlays)) == names:
            return ov  # the forward's path: the set in use is the most recent one
        if ov is None or not ov.is_current(pats, w0s):
            self._refresh(names)
            ov = Overlay(pats, [self.neuroada_w0[n] for n in names])
        self._overlays.pop(names, None)  # the most recently used last; the oldest go
        self._overlays[names] = ov
        while len(self._overlays) > OVERLAYS_KEPT:
            del self._overlays[next(iter(self._overlays))]
        return ov

    def _refresh(self, names: Iterable[str]) -> None:
        """Before a cache is rebuilt (only then: a forward that hits its caches pays nothing): refuse offloaded
        adapter tensors and make inference-tensor idx/w0 ordinary (see check_in_memory and ordinary)."""
        self.check_in_memory(names)
        self.ordinary(names)

    def grid(self, name: str):
        """The quantization grid runtime/quant_grid.py registered for the adapter, or None (plain deltas)."""
        grids = self._modules.get(GRID_ATTR)
        return grids[name] if grids is not None and name in grids else None

    def delta(self, name: str) -> torch.Tensor:
        """The deltas the forward, merge and save use: ``neuroada_val``, or where runtime/quant_grid.py
        registered a quantization grid for the adapter, their snap to it (straight-through gradient)."""
        val, grid = self.neuroada_val[name], self.grid(name)
        if grid is None:
            return val
        return grid(val, self.neuroada_idx[name], self.neuroada_w0[name])

    # -- the originals ---------------------------------------------------------------------------
    _w0_version = None  # the base weight's version when w0 last matched it (see reread_w0) ...
    _w0_weight = staticmethod(lambda: None)  # ... and a weak reference to that weight (an id can be reused)

    def reread_w0(self, *, force: bool = False) -> None:
        """w0 holds the base weight's values at the adapters' entries, read when they were added. A weight written
        since (an edit under no_grad, an optimizer step on a base trained beside the deltas in the additive mode)
        has other values there: the in-place forward would restore the old ones over the edit after one forward, and
        a merge would write old + delta. So when the weight's version moved while nothing is merged (then the
        weight holds the originals), w0 is read again. The runtime's own writes go through ``.data`` or numpy and
        move no version, or are followed by `_matched`; a check costs one attribute read. force: read them whatever
        the version says (after a restore that may itself have moved it)."""
        W = self.base_layer.weight
        if not _is_plain(W):
            return  # (an offloaded weight is read by its hooks at the forward: nothing to compare here)
        with weight_lock(W):  # (decided and read while no other thread's forward holds its entries written)
            self._reread_w0(W, force)

    def _reread_w0(self, W: torch.Tensor, force: bool) -> None:
        if self.merged_adapters or not (force or self.weight_moved()):
            return
        if not all(_is_plain(t) for d in (self.neuroada_w0, self.neuroada_idx) for t in d._buffers.values()):
            return  # offloaded (refused by the forward: check_in_memory) or sharded adapter tensors
        self.ordinary(list(self.neuroada_w0.keys()))  # (w0 made in inference mode cannot be written otherwise)
        with torch.no_grad(), outside_inference():
            Wc = self._canonical_weight().detach()
            done: dict = {}  # w0 storage -> the positions read into it: twins share both, and stay shared
            for n in list(self.neuroada_w0.keys()):
                w0, idx = self.neuroada_w0[n], self.neuroada_idx[n]
                key = alias_key(w0)
                if key is not None and key in done and torch.equal(done[key], idx):
                    continue  # a twin of an adapter read already: the shared originals are current
                now = gather_exact(Wc, idx)
                if not _same_bits(now, w0):
                    if key is not None and key in done:  # shares originals but not positions: give it its own
                        self.neuroada_w0.unshare([n])
                    self.neuroada_w0[n].copy_(now)
                if key is not None:
                    done.setdefault(key, idx)
        self._matched()

    def weight_moved(self) -> bool:
        """Whether the base weight was written or replaced since w0 last matched it. A weight made in inference
        mode has no version to read (edits to it are not seen), and a trace cannot read one: False there."""
        W = self.base_layer.weight
        if not _is_plain(W) or W.is_inference() or not cache_here():
            return False  # (a sharded DTensor between FSDP2 steps is not the weight the forward reads)
        return version(W) != self._w0_version or self._w0_weight() is not W

    def _matched(self) -> None:
        """The weight is as w0 describes it now (just read, merged or restored by us)."""
        W = self.base_layer.weight
        self._w0_version, self._w0_weight = (None if W.is_inference() else version(W)), weakref.ref(W)

    # -- merge ----------------------------------------------------------------------------------

    def merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Write ``round(w0 + sum of vals)`` (f32 sum, one rounding) into the weight for the given
        (default: active) adapters plus any already merged, recomputed from the originals so that
        merging in steps gives the same bits as merging at once."""
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        with self.writing():
            self._merge([n for n in names if n not in self.merged_adapters])

    @contextlib.contextmanager
    def writing(self):
        """A change of the weight and of the state describing it (merge, unmerge, a switch): under the weight's lock
        (see functional.weight_lock), and marked for additive forwards on other threads (``_writes``)."""
        with weight_lock(self.base_layer.weight):
            self._writes += 1
            try:
                yield
            finally:
                self._writes += 1

    def _merge(self, new: list[str]) -> None:
        if not new:
            return
        self._require(new)
        self.reread_w0()
        W = self.base_layer.weight
        old = list(self.merged_adapters)
        allnames = old + new
        overlay, deltas = self.overlay(allnames), [self.delta(n) for n in allnames]  # (before any write)
        if old:
            unmerge_(W, self.overlay(old))
            self.merged_adapters = []
            self._matched()
        try:
            merge_(W, overlay, deltas)
        except BaseException:  # (e.g. out of memory) the weight said what merged_adapters says, always
            try:
                unmerge_(W, overlay)
            except BaseException:  # (failing too) the merge finished instead, and said so: the layer said unmerged
                merge_(W, overlay, deltas)  # over a partly merged weight, and served wrong values
                self.merged_adapters = allnames
                self._matched()
            else:
                self._matched()
                if old:
                    self._merge(old)
            raise
        self.merged_adapters = allnames
        self._matched()

    def unmerge(self) -> None:
        """Restore ``w0`` exactly."""
        with self.writing():
            self._unmerge()

    def _unmerge(self) -> None:
        if not self.merged_adapters:
            return
        moved = self.weight_moved()  # edited while merged: the merged entries are lost, the others are read again
        W, overlay = self.base_layer.weight, self.overlay(self.merged_adapters)
        try:
            unmerge_(W, overlay)
        except BaseException:  # failed after some or all of its writes: the weight says what merged_adapters says
            try:  # (the deltas read val, idx and w0, never W: computed only on this path)
                merge_(W, overlay, [self.delta(n) for n in self.merged_adapters])
            except BaseException:  # (failing too, e.g. out of memory again) the unmerge finished, and said so: the
                unmerge_(W, overlay)  # layer still said merged over a partly restored weight, and served wrong values
                self.merged_adapters = []
            self._matched()
            raise
        self.merged_adapters = []
        if moved:
            self.reread_w0(force=True)
        self._matched()

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer  # each attribute read through nn.Module costs host time, which small layers feel
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        seen = None if torch.compiler.is_compiling() else self._writes  # (read before "merged?": see _writes)
        held = self.neuroada_val
        active = [n for n in self.active_adapters if n in held]
        if self.merged_adapters or not active:
            self.warn_if_training_merged()
            return base(x, *args, **kwargs)
        W = base.weight  # (inlined: host time is felt on small layers; a trace reads no version)
        if cache_here() and (version(W) != self._w0_version or self._w0_weight() is not W):
            self.reread_w0()
        vals = [self.delta(n) for n in active]
        if any(v.is_meta for v in vals):  # offloaded parameters (idx and w0 are buffers: checked in _refresh)
            self.check_in_memory(active)
        if self.mode == "inplace" and not has_hooks(base) and not transforms_active():
            if seen is None:  # compiled: the operator itself keeps another thread's merge (_written_over_now)
                return inplace_sparse_delta_linear(x, base.weight, base.bias, self.overlay(active), vals)
            with weight_lock(W):  # merged by another thread since the check above: its writes are what we serve
                if self.merged_adapters:
                    return base(x, *args, **kwargs)
                return inplace_sparse_delta_linear(x, base.weight, base.bias, self.overlay(active), vals)
        if x.is_nested:  # nn.TransformerEncoder's eval path with a padding mask: the sparse term reads flat rows
            return torch.nested.as_nested_tensor([self(t, *args, **kwargs) for t in x.unbind()], layout=x.layout)
        y = self._additive(x, args, kwargs, active, vals)
        if seen is None or (seen % 2 == 0 and self._writes == seen):  # (compiled: a trace would guard on _writes,
            return y                                                   # a recompilation at every switch)
        with weight_lock(W):  # another thread merged or switched meanwhile: what it left, read whole
            if self.merged_adapters:
                return base(x, *args, **kwargs)
            return self._additive(x, args, kwargs, active, [self.delta(n) for n in active])

    def _additive(self, x: torch.Tensor, args, kwargs, active: list[str], vals: list[torch.Tensor]) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        for n, v in zip(active, vals):
            y = y + additive_sparse_delta(x, self.pattern(n), v, out_dtype=y.dtype)
        return y

    def warn_if_training_merged(self) -> None:
        """A merged weight is a constant to autograd: a training step would silently leave the deltas as they are.
        (Training mode and grad mode are tested first: a compiled serving forward then guards on nothing that
        set_adapter changes, so switching adapters does not recompile.)"""
        if self.training and torch.is_grad_enabled() and self.merged and any(
                self.neuroada_val[n].requires_grad for n in self.merged_adapters if n in self.neuroada_val):
            warn_caller(f"adapter(s) {', '.join(self.merged_adapters)} are merged into the weights, so their deltas "
                        f"get no gradient from this forward (as in PEFT); unmerge(model) to train them")

    def ordinary(self, names: Iterable[str]) -> None:
        """Make these adapters' idx and w0 ordinary tensors if they became inference tensors (``model.half()``
        inside ``torch.inference_mode()``): they are the runtime's own, derived from the base, and a cache never
        trusts an inference tensor (kernels/cache), so every forward would rebuild its patterns and overlays."""
        both = (self.neuroada_idx, self.neuroada_w0)  # (looked up once: this runs per adapter at block entry)
        for n in names:
            for buffers in both:
                t = buffers[n]
                if t.is_inference():
                    with outside_inference():
                        buffers[n] = t.clone()

    def check_in_memory(self, names: Iterable[str]) -> None:
        """Refuse adapter tensors on the meta device. accelerate's offloading (cpu_offload, a device_map with
        "cpu"/"disk" entries) loads weights in hooks around module calls; adapter tensors are read, never
        called, so they would stay on meta and serve garbage."""
        vals, idxs, w0s = self.neuroada_val, self.neuroada_idx, self.neuroada_w0
        for n in names:
            if vals[n].is_meta or idxs[n].is_meta or w0s[n].is_meta:
                raise NeuroAdaUsageError(f"adapter {n!r}: its tensors are on the meta device (offloaded, e.g. by "
                                         "accelerate's cpu_offload or a device_map with 'cpu'/'disk' entries); "
                                         "keep NeuroAda layers in memory, or merge_and_unload before offloading")

    def extra_repr(self) -> str:
        ks = {n: self.neuroada_idx[n].shape[1] for n in self.neuroada_idx.keys()}
        return f"mode={self.mode}, d_out={self.d_out}, d_in={self.d_in}, transposed={self.transposed}, k={ks}"


def _positions_key(idx: torch.Tensor) -> tuple:
    """A cheap key for finding adapters with equal ``idx`` (equality is then checked in full)."""
    if idx.numel() == 0:
        return tuple(idx.shape), str(idx.device), 0, 0
    return tuple(idx.shape), str(idx.device), int(idx.sum()), int(idx[:, 0].mul(idx[:, -1]).sum())


_OWN_READ = contextvars.ContextVar("neuroada_own_state_read", default=False)


@contextlib.contextmanager
def own_state_read():
    """Around the runtime's own ``state_dict()`` reads that take names or make their own copies (saving an adapter):
    shared idx and w0 are then not copied, which with dozens of adapters loaded would copy each one's."""
    token = _OWN_READ.set(True)
    try:
        yield
    finally:
        _OWN_READ.reset(token)


def _distinct_state(module: nn.Module, state_dict, prefix, local_metadata) -> None:
    """State-dict post-hook of the containers of idx and w0: an entry whose storage an earlier entry already gave
    (an adapter's idx or w0 shared with another one's, see NeuroAdaLayer._twin) is handed out as a copy, so every
    consumer sees the tensors it would without sharing (safetensors' save_file refuses shared memory; accelerate
    drops one of the names)."""
    if _OWN_READ.get():
        return
    seen = set()
    for name in module._buffers:
        key = prefix + name
        got = state_dict.get(key)
        if got is None:
            continue
        where = storage_of(got)
        if where in seen:
            state_dict[key] = got.detach().clone()
        seen.add(where)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's forward: hooks (accelerate's offloading loads the
    weight in one, user hooks read or change the output) or a forward patched onto the instance. The in-place
    path runs the GEMM itself, so such a module is served additively: ``base_layer(x) + S(x)``."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks or "forward" in module.__dict__)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal calls -0.0 and 0.0 equal, and NaN unequal to itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        ity = INT_VIEW[a.element_size()]
        a, b = a.contiguous().view(ity), b.contiguous().view(ity)
    return bool(torch.equal(a, b))


def _is_plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter) and t.device.type != "meta"


def _current_w0(layer: NeuroAdaLayer, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook: a state taken after an edit of the base weight holds its originals as they are now
    (not only once a forward has read them again)."""
    layer.reread_w0()


@torch.no_grad()
def _after_load(layer: NeuroAdaLayer, incompatible_keys) -> None:
    """Post-load hook: originals back at the selected entries, w0 re-read where the state had none,
    caches dropped, and the adapters that were merged before the load merged again."""
    info, layer._loading = getattr(layer, "_loading", None), None
    if info is None:
        return
    keys = info["keys"]
    W = layer._canonical_weight()
    layer._patterns.clear()
    layer._overlays.clear()
    if _is_plain(W):
        names = list(layer.neuroada_idx.keys())
        for n in names:  # w0 given: it is the original; write it back over whatever the weight holds
            if f"neuroada_w0.{n}" in keys:
                W.scatter_(1, layer.neuroada_idx[n], layer.neuroada_w0[n].to(W.dtype))
        for n in names:  # w0 not given: read it from the (now original) weight at the current idx
            if f"neuroada_w0.{n}" not in keys:
                now, w0 = gather_exact(W, layer.neuroada_idx[n]), layer.neuroada_w0[n]
                if not _same_bits(now, w0):  # new positions or a new base: written into this adapter's w0 alone
                    layer.neuroada_w0.unshare([n])  # (a twin that kept its idx keeps its originals)
                    layer.neuroada_w0[n].copy_(now)
    layer._matched()
    merged = [n for n in info["merged"] if n in layer.neuroada_val]
    if merged:
        layer.merge(merged)
