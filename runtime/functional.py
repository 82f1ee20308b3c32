"""Autograd functions for sparse top-k deltas on a frozen linear weight.

Two strategies:

* in-place (``InplaceSparseDeltaLinear``): write ``round(w0 + val)`` into the selected entries of the
  frozen weight around the GEMM and put ``w0`` back right after. The training forward is then the
  very GEMM the merged model runs (bit-identical output), no dense delta or dense ``dW`` ever exists,
  and ``grad_val`` comes from a sampled row-dot over the fixed pattern.
* additive (``AdditiveSparseDelta``): ``y = base(x) + S(x)`` for bases that must not be written
  (shared, quantised, non-contiguous weights); ``S^T`` for ``grad_x`` uses the column-major pattern.

The weight is never given to ``save_for_backward``: its storage is rewritten in forward and backward,
and we write through ``.data`` so its version counter does not move (other graphs that saved it stay
valid because the original values are always back in place when control leaves these functions).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Sequence

import torch
import torch.nn.functional as F

from neuroada_format import NeuroAdaError, NeuroAdaUsageError

from . import kernels
from .kernels import reference
from .kernels.cache import cache_here, outside_inference, version
from .kernels.pattern import Pattern
from .kernels.reference import INT_VIEW, acc_dtype, rounded_values

__all__ = [
    "Overlay",
    "InplaceSparseDeltaLinear",
    "AdditiveSparseDelta",
    "inplace_sparse_delta_linear",
    "additive_sparse_delta",
    "transforms_active",
    "merge_",
    "unmerge_",
]


COMPACT_MAX = 1 / 3  # share of the input columns below which only the used ones are kept for backward


class Overlay:
    """All active adapters' entries of one weight, deduplicated.

    Adapters may select the same position; each position then gets ``w0 + v_a + v_b + ...`` summed
    in f32 (adapter order) and rounded once. Training forward, backward and ``merge`` all go through
    :meth:`apply_`, so they produce the same bits.
    """

    def __init__(self, patterns: Sequence[Pattern], w0s: Sequence[torch.Tensor]):
        patterns, w0s = tuple(patterns), tuple(w0s)
        if not patterns or len(patterns) != len(w0s):
            raise NeuroAdaUsageError("need one w0 per pattern and at least one pattern")
        p0 = patterns[0]
        for p, w in zip(patterns, w0s):
            if (p.d_out, p.d_in, p.transposed) != (p0.d_out, p0.d_in, p0.transposed):
                raise NeuroAdaUsageError("all patterns of an overlay must describe the same weight")
            if tuple(w.shape) != (p.d_out, p.k):
                raise NeuroAdaUsageError(f"w0 shape {tuple(w.shape)} != {(p.d_out, p.k)}")
        self.patterns, self.w0s = patterns, w0s
        self._w0_versions = tuple(version(w) if cache_here() else None for w in w0s)  # None: made in a trace
        self._compact = None
        self._bits = None  # (flat, w0) as numpy integer arrays, for the CPU writes of written()
        self._kept, self._kept_count = None, 0  # see keep()
        self.d_out, self.d_in, self.transposed = p0.d_out, p0.d_in, p0.transposed
        if len(patterns) == 1:
            self.flat, self.invs, self.w0 = p0.flat, None, w0s[0].reshape(-1)
        else:
            with outside_inference():
                u, inv = torch.unique(torch.cat([p.flat for p in patterns]), sorted=True, return_inverse=True)
                self.invs = tuple(inv.split([p.nnz for p in patterns]))
                w0u = torch.empty(u.numel(), dtype=w0s[0].dtype, device=u.device)
                for i, w in zip(self.invs, w0s):
                    w0u[i] = w.reshape(-1)  # shared slots receive equal originals
            self.flat, self.w0 = u, w0u

    def compact(self) -> tuple[torch.Tensor, tuple[Pattern, ...]] | None:
        """``(cols, patterns)`` when the adapters read at most ``COMPACT_MAX`` of the input columns, else None.

        Only ``x[:, cols]`` is needed for ``grad_val``, so such a layer keeps that for backward instead of
        ``x``; ``patterns`` index into it. With k=1 a projection whose input is much wider than its output
        (a Llama down_proj reads about 31% of its columns) keeps a third of what it would. The bound is low
        because sibling layers (q, k, v) share one saved ``x`` that their compact copies would each replace.
        A torch.compile trace does not work it out (how many columns is data: a graph break) and keeps ``x``.
        """
        if not cache_here():
            return None
        if self._compact is None:
            with outside_inference():
                cols = torch.unique(torch.cat([p.col for p in self.patterns]))  # sorted
                if cols.numel() <= COMPACT_MAX * self.d_in:
                    pats = tuple(Pattern(torch.searchsorted(cols, p.idx).contiguous(), cols.numel(), validate=False)
                                 for p in self.patterns)  # searchsorted keeps each row's order: still valid
                    self._compact = (cols, pats)
                else:
                    self._compact = False
        return self._compact or None

    def is_current(self, patterns: Sequence[Pattern], w0s: Sequence[torch.Tensor]) -> bool:
        return (
            len(patterns) == len(self.patterns)
            and all(a is b for a, b in zip(patterns, self.patterns))
            and all(a is b and version(a) == v for a, b, v in zip(w0s, self.w0s, self._w0_versions))
        )

    def values(self, vals: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The merged entries, ``round_dtype(f32(w0) + sum f32(val))``, in ``flat`` order."""
        if self.invs is None:
            return rounded_values(self.w0, vals[0].reshape(-1), dtype)
        s = self.w0.to(acc_dtype(self.w0, *vals)).clone()
        for i, v in zip(self.invs, vals):
            s.index_add_(0, i, v.reshape(-1).to(s.dtype))  # no duplicates inside one adapter: deterministic
        return s.to(dtype)

    def keep(self, merged: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``merged`` copied into a buffer this overlay keeps, and a count of the copies made so far.

        The training forward hands its merged entries to its backward. A fresh small tensor per layer, alive from
        forward to backward between the large activations, fragments glibc's heap: a k=1 step of the bench model
        peaked at 1244 MB with them and at 1217 MB with the buffer (medians of five processes, 1 thread; the floor
        ~1145 MB; k=20 1339 and 1352 MB, medians of three: no change beyond noise). A later forward overwrites the
        buffer, so the backward reads it only while the count is still its own (:meth:`kept`), and otherwise
        recomputes the entries."""
        buf = self._kept
        if buf is None or (buf.dtype, buf.device, buf.shape) != (merged.dtype, merged.device, merged.shape):
            with outside_inference():
                buf = self._kept = torch.empty_like(merged)
        buf.copy_(merged)
        self._kept_count += 1
        return buf, self._kept_count

    def kept(self, count: int) -> torch.Tensor | None:
        """The buffer of :meth:`keep` if no copy was made into it after the one that returned ``count``."""
        return self._kept if count == self._kept_count else None

    def apply_(self, W: torch.Tensor, vals: Sequence[torch.Tensor], *, via: torch.dtype | None = None) -> None:
        """Write the merged entries into the stored W. ``via``: round to that dtype first, then to
        W's (what autocast does to a merged weight of dtype ``via``)."""
        if len(vals) != len(self.patterns):
            raise NeuroAdaUsageError("one val per adapter expected")
        if via is None and self.invs is None:
            kernels.scatter_(W, self.patterns[0], self.w0s[0], vals[0], transposed=self.transposed)
        else:
            v = self.values(vals, via or W.dtype)
            kernels.put_(W, self.flat, v.to(W.dtype))

    def restore_(self, W: torch.Tensor) -> None:
        kernels.put_(W, self.flat, self.w0)

    def written(self, W: torch.Tensor, merged: torch.Tensor):
        """``W`` with ``merged`` (in W's dtype, ``flat`` order) written inside the block, ``w0`` back after it:
        the training forward's and backward's writes (see ``_written``); on CPU through numpy arrays of ``flat``
        and ``w0`` made once per overlay (they share memory with its tensors)."""
        arrays = None
        if W.device.type == "cpu" and self.w0.dtype == W.dtype:  # an overlay's w0 keeps its dtype (a cast: new overlay)
            if self._bits is None:
                self._bits = (self.flat.numpy(), self.w0.view(INT_VIEW[W.element_size()]).numpy())
            arrays = self._bits
        return _written(W, self.flat, merged, self.w0, arrays)


def _autocast_on(dev: str) -> bool:
    try:
        return torch.is_autocast_enabled(dev)
    except (RuntimeError, TypeError):  # device types without autocast support
        return False


def _autocast_dtype(x: torch.Tensor):
    """The dtype autocast would run a linear in for ``x``, or None when autocast leaves it alone."""
    dev = x.device.type
    if not _autocast_on(dev) or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(dev)


def _no_autocast(dev: str):
    """Autocast switched off around our own ops, where it is on; entering the context costs ~10 us per call,
    twice per layer and step, so it is skipped where there is nothing to switch off."""
    return torch.autocast(dev, enabled=False) if _autocast_on(dev) else contextlib.nullcontext()


PARALLEL_WRITE_MIN = 8192  # entries from which a CPU write goes through index_put_ when torch has several threads


def _numpy_writes(W: torch.Tensor, entries: int) -> bool:
    """Whether ``_written`` moves the bits through numpy (CPU tensors) rather than ``index_put_``.

    Each written entry is a cache miss that usually goes to memory (~15 ns on the bench machine against ~5 ns from
    cache): at k=20 about 100 ms of a CPU step of the bench model. numpy moves them on one thread with the least host
    time; ``index_put_`` splits a large write across torch's threads. Measured side by side in one process (bench
    model, steps interleaved): with 2 threads, index_put_ for every write took a k=20 step to 0.93x, but a k=1 step
    (writes of 1-3k entries) to 1.01x; with 1 thread, index_put_ took a k=20 step to 1.015x. Hence numpy below
    ``PARALLEL_WRITE_MIN`` entries or on one thread. index_put_ is an OpenMP region, which waits for every thread: on
    a machine whose cores were busy a call once waited ~8 ms for its second one. (Never called in a torch.compile
    trace: there the writes are inside an operator, which a trace does not enter.)"""
    return W.device.type == "cpu" and (entries < PARALLEL_WRITE_MIN or torch.get_num_threads() < 2)


_WEIGHT_LOCKS: dict[int, threading.RLock] = {}
if hasattr(os, "register_at_fork"):  # a forked child has one thread: locks held by the parent's others never free
    os.register_at_fork(after_in_child=_WEIGHT_LOCKS.clear)


def weight_lock(W: torch.Tensor) -> threading.RLock:
    """One lock per weight storage, held from a write to its restore: a forward on another thread (a server answering
    requests in a thread pool) must not multiply with the weight while it holds, or has lost, this call's entries.
    Calls of one layer then take turns; different layers still run side by side. Reentrant: a layer holds it around
    its own state changes (merge, unmerge, a switch, re-reading w0) and the writes inside, so that a forward on
    another thread never reads the weight between a write and the state that describes it (w0 was re-read from a
    weight another thread had merged, and unmerge then "restored" merged values). Keyed by address: a lock left
    behind by a freed weight is at worst shared by a later one, which costs a wait, never a wrong result."""
    try:
        key = W.data_ptr()
    except (RuntimeError, NotImplementedError):  # (a tensor without storage of its own, e.g. a DTensor)
        key = id(W)
    lock = _WEIGHT_LOCKS.get(key)
    if lock is None:
        lock = _WEIGHT_LOCKS.setdefault(key, threading.RLock())  # atomic under the GIL: one lock per key
    return lock


@contextlib.contextmanager
def _written(W: torch.Tensor, flat: torch.Tensor, merged: torch.Tensor, w0: torch.Tensor, arrays=None):
    """``W.data`` with ``merged`` at ``flat`` inside the block, its own values ``w0`` again after it, however the
    block exits. ``arrays``: ``(flat, w0)`` as numpy integer arrays, when the caller keeps them.

    Every training forward and backward does this once per adapted layer, so it is the bare bit moves through
    integer views: numpy fancy assignments or ``index_put_`` on CPU (``_numpy_writes``), one ``index_put_`` each
    elsewhere (a stock op: a Triton launch costs more host time than the move itself). The general ``kernels.put_``
    checks, dispatches and converts every operand per call: host time, which is what a GPU step of small layers
    waits on. The writes go through ``W.data``, whose version counter is its own: compiled graphs save W for their
    backward, and a second forward before that backward (two passes summed into one loss) must not look like a change
    to it."""
    with weight_lock(W):
        Wd = W.data
        if not Wd.is_contiguous():
            raise NeuroAdaUsageError("in-place sparse writes need a contiguous weight; use the additive mode")
        if merged.dtype != Wd.dtype or w0.dtype != Wd.dtype:  # a weight cast after attach: the general path converts
            kernels.put_(Wd, flat, merged)
            try:
                yield Wd
            finally:
                kernels.put_(Wd, flat, w0)
            return
        bits = INT_VIEW[Wd.element_size()]
        merged = merged.view(bits)  # same-size dtypes: a view whatever the strides
        if _numpy_writes(Wd, flat.numel()):  # (numpy reshapes cost less host time than torch's)
            flat_np, w0_np = arrays or (flat.numpy(), w0.view(bits).numpy().reshape(-1))
            wb = Wd.view(bits).numpy().reshape(-1)
            wb[flat_np] = merged.numpy().reshape(-1)
            try:
                yield Wd
            finally:
                wb[flat_np] = w0_np
            return
        wb = Wd.view(-1).view(bits)
        wb.index_put_((flat,), merged.reshape(-1))
        try:
            yield Wd
        finally:
            wb.index_put_((flat,), w0.view(bits).reshape(-1))


@contextlib.contextmanager
def _written_over_now(W: torch.Tensor, flat: torch.Tensor, merged: torch.Tensor):
    """``_written``, putting back what the weight holds at ``flat`` when the block starts instead of ``w0``: the
    compiled path's operators. Their frame checked "not merged" when it started (its guards); another thread's merge
    since then was taken out again by the restore of w0, and the layer said merged over the plain base."""
    with weight_lock(W):
        now = W.data.reshape(-1).index_select(0, flat)
        with _written(W, flat, merged, now) as Wd:
            yield Wd


@torch.library.custom_op("neuroada::overlay_linear", mutates_args=())
def _overlay_linear(x: torch.Tensor, b: torch.Tensor | None, W: torch.Tensor, flat: torch.Tensor,
                    merged: torch.Tensor, w0: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``linear(x, W', b)``, W' = W with ``merged`` at ``flat``: written, multiplied, restored, as the eager path does.

    One operator for torch.compile. Traced op by op, the two writes into W (a graph input) became copies of the whole
    weight, in forward and again in backward: dense work on every adapted layer, what the in-place mode exists to
    avoid. W holds its own values again when the operator returns, so it is declared to mutate nothing."""
    with _no_autocast(x.device.type), _written_over_now(W, flat, merged) as Wd:  # (see _overlay_linear_grad_input)
        if x.dtype != Wd.dtype:
            return _linear(x.to(Wd.dtype), Wd, None if b is None else b.to(Wd.dtype), transposed).to(x.dtype)
        return _linear(x, Wd, b, transposed)


@_overlay_linear.register_fake
def _(x, b, W, flat, merged, w0, transposed):
    return x.new_empty(x.shape[:-1] + (W.shape[1] if transposed else W.shape[0],))


@torch.library.custom_op("neuroada::overlay_linear_grad_input", mutates_args=())
def _overlay_linear_grad_input(g: torch.Tensor, W: torch.Tensor, flat: torch.Tensor, merged: torch.Tensor,
                               w0: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``grad_x`` through W' (see ``_overlay_linear``). Both operators compute in the dtypes they are given, as
    their fakes say: a compiled graph runs them inside the caller's autocast region, where the GEMM would otherwise
    be cast (a bf16 grad_x against an f32 fake: the compiled backward failed, 'BFloat16 != float')."""
    with _no_autocast(g.device.type), _written_over_now(W, flat, merged) as Wd:
        if g.dtype != Wd.dtype:
            return _linear_grad_input(g.to(Wd.dtype), Wd, transposed).to(g.dtype)
        return _linear_grad_input(g, Wd, transposed)


@_overlay_linear_grad_input.register_fake
def _(g, W, flat, merged, w0, transposed):
    return g.new_empty(g.shape[:-1] + (W.shape[0] if transposed else W.shape[1],))


def _linear(x, W, b, transposed):
    # mirror nn.Linear / transformers' Conv1D exactly, so outputs match the merged model bit for bit
    if not transposed:
        return F.linear(x, W, b)
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.addmm(b, x2, W) if b is not None else torch.mm(x2, W)
    return y.view(x.shape[:-1] + (W.shape[1],))


def _linear_grad_input(g, W, transposed):
    return g @ (W.t() if transposed else W)


def _with_overlay(overlay: Overlay, weight: torch.Tensor, vals, cast, fn, traced, merged=None):
    """Run ``fn(W')`` where W' is the weight with the overlay written, in the autocast dtype if any.

    Same dtype: write into the frozen weight itself and restore it; inside a torch.compile trace, ``traced(W, flat,
    merged, w0)`` does the same as one operator. Autocast to another dtype: the GEMM would use a cast copy anyway, so
    write into that copy (rounded to the base dtype first, then to the autocast dtype, exactly what autocast does to
    a merged weight) and leave W alone.
    """
    W = weight.data  # untracked storage alias: no version bump on the user's parameter
    if cast is None or W.dtype == cast:
        if merged is None or merged.dtype != W.dtype:
            merged = overlay.values(vals, W.dtype)
        if not cache_here():  # a trace: the parameter itself (detached), never `.data`, which torch.export would
            return traced(weight.detach(), overlay.flat, merged, overlay.w0)  # lift as a fake constant
        with overlay.written(W, merged):
            return fn(W)
    Wc = W.to(cast)
    overlay.apply_(Wc, vals, via=W.dtype)
    return fn(Wc)


class InplaceSparseDeltaLinear(torch.autograd.Function):
    """``y = linear(x, W + Delta, b)`` computed by writing Delta into W around the GEMM.

    ``apply(x, weight, bias, overlay, *vals)``; ``weight`` must be frozen and contiguous. Correct
    under recomputation (checkpointing re-runs forward; nothing stale is cached) and under autocast
    (the GEMM and its backward run in the autocast dtype, like a merged model's would).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, overlay: Overlay, *vals):
        cast = _autocast_dtype(x)
        with _no_autocast(x.device.type):
            if cast is not None:
                xc, bc = x.to(cast), (None if bias is None else bias.to(cast))
            else:
                xc, bc = x, bias
            t = overlay.transposed
            # the merged entries, made once for forward and backward (eager only: a trace keeps no tensors on ctx)
            merged = overlay.values(vals, weight.dtype) if cache_here() and cast in (None, weight.dtype) else None
            ctx.kept = None  # the merged entries again for grad_x (none when x needs no gradient; none in a trace)
            if merged is not None and ctx.needs_input_grad[0]:
                merged, ctx.kept = overlay.keep(merged)  # (the fresh copy goes before the product allocates)
            y = _with_overlay(overlay, weight, vals, cast, lambda W: _linear(xc, W, bc, t),
                              lambda *w: _overlay_linear(xc, bc, *w, t), merged)
        # x is needed only for grad_val: a frozen adapter (x needing a gradient for layers below) keeps none,
        # and a layer whose adapters read few input columns keeps only those (Overlay.compact)
        saved, ctx.patterns = None, overlay.patterns
        if any(ctx.needs_input_grad[4:]):
            compact = overlay.compact()
            if compact is None:
                saved = xc
            else:
                saved = xc.reshape(-1, overlay.d_in).index_select(1, compact[0])
                ctx.patterns = compact[1]
        ctx.save_for_backward(saved, *vals)
        ctx.weight = weight  # a reference, not a saved tensor (see module docstring)
        ctx.weight_version = version(weight) if cache_here() else None  # a trace cannot read a version
        ctx.overlay = overlay
        ctx.cast = cast
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # create_graph=True: this backward's own ops would need a graph through W's writes
            raise NeuroAdaUsageError("a second derivative through the in-place mode (backward or autograd.grad with "
                                     "create_graph=True, e.g. a gradient penalty) is not supported; attach with "
                                     "mode='additive' for that (and, for a transformers model on CPU, an attention "
                                     "with a second derivative: attn_implementation='eager')")
        xc, *vals = ctx.saved_tensors
        ov: Overlay = ctx.overlay
        if ctx.weight_version is not None and version(ctx.weight) != ctx.weight_version:
            # e.g. merge()/load_state_dict between forward and backward: re-scattering would be wrong
            raise NeuroAdaError("the base weight was modified in place between forward and backward (merge, "
                                "load_state_dict or an optimizer touched it); run backward first")
        cast = ctx.cast
        grad_x = grad_b = None
        gy2 = grad_y.reshape(-1, ov.d_out)
        if ctx.needs_input_grad[0]:
            with _no_autocast(grad_y.device.type):
                g = grad_y if cast is None else grad_y.to(cast)
                if cast is None and g.dtype != ctx.weight.dtype:
                    g = g.to(ctx.weight.dtype)
                t = ov.transposed
                grad_x = _with_overlay(ov, ctx.weight, vals, cast, lambda W: _linear_grad_input(g, W, t),
                                       lambda *w: _overlay_linear_grad_input(g, *w, t),
                                       None if ctx.kept is None else ov.kept(ctx.kept))
            if grad_x.dtype != ctx.x_dtype:
                grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = gy2.to(acc_dtype(gy2)).sum(0).to(ctx.bias_dtype)
        grad_vals = []
        x2 = None
        for a, v in enumerate(vals):
            if ctx.needs_input_grad[4 + a]:
                if x2 is None:
                    x2 = xc.reshape(-1, xc.shape[-1])
                gv = kernels.sampled_rowdot(gy2, x2, ctx.patterns[a])
                grad_vals.append(gv if gv.dtype == v.dtype else gv.to(v.dtype))
            else:
                grad_vals.append(None)
        return (grad_x, None, grad_b, None, *grad_vals)


def transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, functional_call inside one) wraps this call."""
    return torch._C._are_functorch_transforms_active()


class AdditiveSparseDelta(torch.autograd.Function):
    """``S(x) = x Delta^T`` as its own autograd node, to be added to an untouched ``base(x)``.

    ``apply(x, val, pattern, out_dtype)``; sums run in f32 whatever the dtypes of ``x`` and ``val``.
    torch.func transforms it too (``setup_context``, :meth:`vmap`): per-sample gradients and meta-learning
    run through this node, and the runtime sends a layer here whenever a transform is active.
    """

    @staticmethod
    def forward(x, val, pattern: Pattern, out_dtype):
        with _no_autocast(x.device.type):
            s = kernels.gather_matvec(x.reshape(-1, pattern.d_in), pattern, val)
        return s.to(out_dtype or x.dtype).reshape(x.shape[:-1] + (pattern.d_out,))

    @staticmethod
    def setup_context(ctx, inputs, output):
        # a separate setup_context is what lets torch.func (grad, vmap, jacrev) transform this node
        x, val, pattern, _ = inputs
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, val)  # x: for grad_val only
        ctx.pattern = pattern
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype

    @staticmethod
    def vmap(info, in_dims, x, val, pattern, out_dtype):
        # S is applied token by token, so a batch of inputs is just more tokens; a batch of deltas is one node each
        x_dim, val_dim = in_dims[0], in_dims[1]
        if val_dim is None:
            out = AdditiveSparseDelta.apply(x.movedim(x_dim, 0), val, pattern, out_dtype)
            return out, 0
        xs = [None] * info.batch_size if x_dim is None else x.movedim(x_dim, 0).unbind(0)
        outs = [AdditiveSparseDelta.apply(x if xb is None else xb, vb, pattern, out_dtype)
                for xb, vb in zip(xs, val.movedim(val_dim, 0).unbind(0))]
        return torch.stack(outs), 0

    @staticmethod
    def backward(ctx, grad_s):
        x, val = ctx.saved_tensors
        p: Pattern = ctx.pattern
        g2 = grad_s.reshape(-1, p.d_out)
        grad_x = grad_val = None
        # under a torch.func transform the backward itself is transformed: its sparse (CSR) products cannot be,
        # so it takes the dense references (a [d_out, d_in] product per layer, as full fine-tuning computes)
        impl = reference if transforms_active() else kernels
        if ctx.needs_input_grad[0]:
            grad_x = impl.gather_matvec_t(g2, p, val).to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_val = impl.sampled_rowdot(g2, x.reshape(-1, p.d_in), p).to(val.dtype)
        return grad_x, grad_val, None, None


def inplace_sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                overlay: Overlay, vals: Sequence[torch.Tensor]) -> torch.Tensor:
    """``linear(x, W + Delta, b)``; W is stored ``[in, out]`` when ``overlay.transposed`` (Conv1D)."""
    if transforms_active():
        raise NeuroAdaUsageError("a torch.func transform (grad, vmap, jacrev, ...) cannot run through writes into the "
                                 "weight; use the additive mode (NeuroAdaLayer serves it that way by itself)")
    if weight.requires_grad:
        raise NeuroAdaUsageError("the base weight must be frozen (requires_grad=False) for in-place sparse deltas, and "
                                 "this one was unfrozen after attach (model.requires_grad_(True)?); to train base weights "
                                 "beside the deltas, attach with NeuroAdaConfig(..., mode='additive')")
    return InplaceSparseDeltaLinear.apply(x, weight, bias, overlay, *vals)


def additive_sparse_delta(x: torch.Tensor, pattern: Pattern, val: torch.Tensor, *,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``S(x)`` with the shape of ``x`` except the last dim (``d_out``); dtype ``out_dtype`` or x's."""
    return AdditiveSparseDelta.apply(x, val, pattern, out_dtype)


@torch.no_grad()
def merge_(weight: torch.Tensor, overlay: Overlay, vals: Sequence[torch.Tensor]) -> None:
    """Write the merged entries permanently (a tracked in-place write: W's version moves)."""
    with weight_lock(weight):
        overlay.apply_(weight.detach(), [v.detach() for v in vals])


@torch.no_grad()
def unmerge_(weight: torch.Tensor, overlay: Overlay) -> None:
    """Put ``w0`` back; exact, whatever was merged."""
    with weight_lock(weight):
        overlay.restore_(weight.detach())
