"""Mixed-batch sparse deltas: one call adds, to every token, the delta of the adapter its sequence uses.

For token ``t`` of a sequence that uses adapter slot ``a`` (``-1``: the plain base, nothing added)::

    y[t, i] += sum_j val[a, i, j] * x[t, idx[a, i, j]]          (summed in f32, rounded once into y)

It is Punica's BGMV with a gather in place of the low-rank product. ``AdapterStack`` holds one layer's
adapters; the stacked ``[n, d_out, K]`` tensors (k padded to the largest K with zero values) exist
for the all-sequences gather and the Triton kernel, built only when one of those runs.

Four implementations, equal up to summation order:

* ``bgmv_reference``: dense deltas, token masks (the specification; tests only);
* ``bgmv_add_cpu_`` (stock torch, also runs on CUDA): for decoding steps and small problems, one
  gather ``x[t, idx[a(t)]]`` for all sequences through an index expanded over the tokens; for long
  sequences with k=1, one column ``index_select`` per sequence into a shared buffer and one fused
  multiply-add; with k>1, one product per sequence of SEQS_MIN tokens or more, else one per adapter
  present on the sequences that use it -- ``embedding_bag`` over ``x^T``, vectorised over the tokens
  (measured faster here than a CSR ``spmm``, which degrades sharply past a few hundred tokens). None
  loops over tokens;
* ``bgmv_linear_cpu`` (K = 1, f32, no autograd): the base layer and the delta in one: the delta is
  gathered into the output and the GEMM accumulates onto it (beta = 1), instead of adding it to a
  finished output;
* Triton (CUDA, or the interpreter in tests): one program per (sequence, block of output rows, tile of
  tokens); it loads the sequence's adapter id once, its ``idx``/``val`` rows once, and gathers ``x`` for
  each token. Every load is masked and upcast; the kernel writes f32 and torch does any rounding.

Triton is imported (and the kernel decorated, which is when ``TRITON_INTERPRET`` is read) on first use
only, so importing this module never pays for triton.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

from neuroada_format import NeuroAdaUsageError

from . import get_backend
from .cache import aliases, outside_inference, version
from .cpu import bag_rows
from .reference import acc_dtype, dense_delta

__all__ = ["AdapterStack", "InputsT", "seq_groups", "bgmv_reference", "bgmv_add_", "bgmv_add_cpu_",
           "bgmv_add_triton_", "bgmv_linear_cpu", "SeqMask", "bgmv_add_static", "bgmv_linear_static", "triton_available"]

# Above this many gathered elements (tokens x d_out x K, K > 1) the all-sequences gather gives way to one
# product per adapter present: its [T, d_out, K] intermediate stops paying for the saved calls. With K = 1
# the intermediate is no larger than the output, so the gather always wins.
GATHER_MAX = 1 << 18
# K > 1 on short sequences: with this many adapters present, one product per adapter (long rows, few calls) beat
# the one bag over every sequence (short rows), 5.6 vs 6.3 ms; from 2 on the bag did, flat in the adapters (tiny
# Llama, 32 x 16 tokens, 1 thread, 2026-12-08)
GROUPED_MAX = 1
SEQS_MIN = 64  # tokens per sequence from which K > 1 deltas are made sequence by sequence (see _seqs_path)
PATH: str | None = None  # force "gather", "rows", "seqs", "bag" or "grouped" (tests, measurements)
SLICE_ADD_MIN = 1 << 15  # elements per sequence above which deltas are added sequence by sequence


class AdapterStack:
    """One layer's adapters, slot ``a`` = ``idxs[a]`` (int64 ``[d_out, k_a]``) and ``vals[a]``.

    Values are a snapshot for serving (detached); callers rebuild the stack when an adapter changes.
    """

    def __init__(self, idxs: Sequence[torch.Tensor], vals: Sequence[torch.Tensor], d_in: int):
        if not idxs or len(idxs) != len(vals):
            raise NeuroAdaUsageError("need one val per idx and at least one adapter")
        d_out = idxs[0].shape[0]
        for i, v in zip(idxs, vals):
            if i.dim() != 2 or i.shape[0] != d_out or tuple(v.shape) != tuple(i.shape) or i.dtype != torch.int64:
                raise NeuroAdaUsageError("every adapter needs int64 idx and val of one shape [d_out, k]")
        with outside_inference():
            self.idxs = tuple(i.contiguous() for i in idxs)
            self.vals = tuple(v.detach() for v in vals)
        self.n, self.d_out, self.d_in = len(idxs), int(d_out), int(d_in)
        self.ks = tuple(int(i.shape[1]) for i in idxs)
        self.k = max(self.ks)
        self.acc = acc_dtype(*self.vals)
        self.device = self.idxs[0].device
        self._idx = self._val = None
        self._vals_acc: dict = {}
        self._cols: dict = {}
        self._plan = None

    def col(self, slot: int) -> torch.Tensor:
        """The single column per row of a k=1 adapter, contiguous."""
        c = self._cols.get(slot)
        if c is None:
            with outside_inference():
                c = self._cols[slot] = self.idxs[slot][:, 0].contiguous()
        return c

    def shared_col(self) -> torch.Tensor | None:
        """``[d_out]``: the one column per row that every adapter of a K = 1 stack reads, when they share their
        positions (see ``idx``); None otherwise."""
        if self.k != 1 or self.idx.stride(0) != 0:
            return None
        return self.col(0)

    def val_acc(self, slot: int, dtype: torch.dtype) -> torch.Tensor:
        """``vals[slot]`` in ``dtype``, contiguous: a row of the stacked ``val`` when that exists and fits (adapters
        held in BF16 would otherwise get a second f32 copy each), else a copy kept for the next call."""
        if self._val is not None and dtype == self.acc and self.ks[slot] == self.k:
            return self._val[slot]
        v = self._vals_acc.get((slot, dtype))
        if v is None:
            with outside_inference():
                v = self.vals[slot].to(dtype).contiguous()
            self._vals_acc[(slot, dtype)] = v
        return v

    @property
    def idx(self) -> torch.Tensor:
        """``[n, d_out, K]``; a short row repeats its last column (its padded values are zero).

        Adapters selected by magnitude with one k on one base share their positions (the top-k of the same
        weights), and a server loads dozens of them: then the stack is one copy of ``[d_out, K]`` seen n times (a
        stride-0 view, which every reader indexes by slot) instead of n int64 copies, 8 bytes per entry each."""
        if self._idx is None:
            first = self.idxs[0]
            if all(i is first or (i.shape == first.shape and torch.equal(i, first)) for i in self.idxs[1:]):
                with outside_inference():  # a copy: the stack must not follow later writes into an adapter's idx
                    self._idx = first.clone().unsqueeze(0).expand(self.n, self.d_out, self.k)
                return self._idx
            with outside_inference():
                out = torch.empty(self.n, self.d_out, self.k, dtype=torch.int64, device=self.device)
                for a, i in enumerate(self.idxs):
                    out[a, :, :i.shape[1]] = i
                    if i.shape[1] < self.k:
                        out[a, :, i.shape[1]:] = i[:, -1:]
            self._idx = out
        return self._idx

    @property
    def val(self) -> torch.Tensor:
        """``[n, d_out, K]`` in the accumulation dtype, zero in the padding."""
        if self._val is None:
            with outside_inference():
                out = torch.zeros(self.n, self.d_out, self.k, dtype=self.acc, device=self.device)
                for a, v in enumerate(self.vals):
                    out[a, :, :v.shape[1]] = v
            self._val = out
        return self._val

    def gather_plan(self, ids: torch.Tensor, acc: torch.dtype):
        """``(seqs, cols [B', d_out*K], vals [B', d_out, K])`` for the sequences of ``ids`` that use an
        adapter (``seqs``: their positions, None when all do). Cached for the last ``ids`` tensor seen:
        a decoding step calls every layer with the same ids, and re-deriving this per layer and token
        was a fifth of generation's overhead here."""
        hit = self._plan
        if hit is not None and hit[0] is ids and hit[1] == version(ids) and hit[2] == acc:
            return hit[3]
        with outside_inference():
            live = ids >= 0
            seqs = None
            sel = ids
            if not bool(live.all()):
                seqs = live.nonzero().view(-1)
                sel = ids.index_select(0, seqs)
            cols = self.idx.index_select(0, sel).view(sel.shape[0], self.d_out * self.k)
            vals = self.val.to(acc).index_select(0, sel)
        plan = (seqs, cols, vals)
        self._plan = (ids, version(ids), acc, plan)
        return plan

    def __repr__(self) -> str:
        return f"AdapterStack(n={self.n}, d_out={self.d_out}, d_in={self.d_in}, k={self.ks})"


def _token_ids(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    return ids if seq_len == 1 else ids.repeat_interleave(seq_len)


def seq_groups(ids: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """``[(slot, sequence indices)]`` per adapter present (None: every sequence); base ones left out.

    Reads ids on the host, so callers serving many layers compute it once per batch.
    """
    seq = ids.tolist()
    out = []
    for slot in sorted(set(seq)):
        if slot < 0:
            continue
        members = [b for b, s in enumerate(seq) if s == slot]
        rows = None if len(members) == len(seq) else torch.tensor(members, dtype=torch.int64, device=ids.device)
        out.append((slot, rows))
    return out


# -- reference -------------------------------------------------------------------------------------------
def bgmv_reference(x: torch.Tensor, ids: torch.Tensor, stack: AdapterStack, *, seq_len: int = 1) -> torch.Tensor:
    """The delta ``[T, d_out]`` in f32 (f64 for f64 inputs), from dense per-adapter deltas."""
    acc = acc_dtype(x, *stack.vals)
    tok = _token_ids(ids, seq_len)
    out = torch.zeros(x.shape[0], stack.d_out, dtype=acc, device=x.device)
    for a in range(stack.n):
        m = tok == a
        if bool(m.any()):
            D = dense_delta(stack.idxs[a], stack.vals[a], stack.d_in, dtype=acc)
            out[m] = x[m].to(acc) @ D.t()
    return out


# -- stock torch -----------------------------------------------------------------------------------------
def _add_seqs_(y3: torch.Tensor, seqs: torch.Tensor | None, delta: torch.Tensor) -> None:
    """y3[seqs] = round_y(y3[seqs] + delta), delta in the accumulation dtype: one rounding.

    index_add_ over dim 0 runs as a scatter_add whose inner loop strides across sequences; for long
    sequences adding slice by slice (contiguous runs of S x d_out) was about 3x faster here, and over
    token rows of a [T, d_out] view it was far slower still.
    """
    same = y3.dtype == delta.dtype
    if seqs is None:
        if same:
            y3.add_(delta)
        else:
            y3.copy_(y3.to(delta.dtype).add_(delta))
    elif delta.shape[1] * delta.shape[2] >= SLICE_ADD_MIN:
        for i, b in enumerate(seqs.tolist()):
            if same:
                y3[b].add_(delta[i])
            else:
                y3[b].copy_(y3[b].to(delta.dtype).add_(delta[i]))
    elif same:
        y3.index_add_(0, seqs, delta)
    else:
        y3.index_copy_(0, seqs, y3.index_select(0, seqs).to(delta.dtype).add_(delta).to(y3.dtype))


def _slot_delta(x: torch.Tensor, stack: AdapterStack, slot: int, acc: torch.dtype) -> torch.Tensor:
    """``S_a(x)`` ``[T, d_out]`` (contiguous) for tokens ``x [T, d_in]`` that all use one adapter."""
    idx, k = stack.idxs[slot], stack.ks[slot]
    val = stack.val_acc(slot, acc)
    if k == 1:  # a column gather: each token reads d_out entries of its own (cached) row
        return x.index_select(1, idx[:, 0]).to(acc).mul_(val[:, 0])
    return bag_rows(x.to(acc), idx, val).t().contiguous()  # vectorised over the tokens


def _gather_path(y3, x3, ids, stack, acc) -> None:
    """Every sequence at once: gather ``x[t, idx[a(t)]]`` through an index expanded over the tokens."""
    S = x3.shape[1]
    seqs, cols, v = stack.gather_plan(ids, acc)
    if seqs is not None:
        x3 = x3.index_select(0, seqs)
    B, K = cols.shape[0], stack.k
    g = torch.gather(x3, 2, cols.view(B, 1, stack.d_out * K).expand(B, S, stack.d_out * K)).to(acc)
    if K == 1:
        if seqs is None and y3.dtype == acc:
            y3.addcmul_(g, v.view(B, 1, stack.d_out))  # one fused pass over y
            return
        delta = g.mul_(v.view(B, 1, stack.d_out))
    else:
        delta = torch.einsum("bsik,bik->bsi", g.view(B, S, stack.d_out, K), v)
    _add_seqs_(y3, seqs, delta)


def _rows_path(y3, x3, ids, stack, acc) -> None:
    """k=1, long sequences: each sequence's columns ``x[b][:, idx[a(b)]]`` by one ``index_select``
    into a shared buffer, then one fused multiply-add. On the bench model this cost a third of the
    expanded-index gather's overhead (whose kernel is slow per element), so it is worth B small calls."""
    B, S, _ = x3.shape
    live = [(b, a) for b, a in enumerate(ids.tolist()) if a >= 0]
    if not live:
        return
    if torch.is_grad_enabled() and x3.requires_grad:  # out= has no autograd
        g = torch.stack([x3[b].index_select(1, stack.col(a)) for b, a in live])
    else:
        g = torch.empty(len(live), S, stack.d_out, dtype=x3.dtype, device=x3.device)
        for i, (b, a) in enumerate(live):
            torch.index_select(x3[b], 1, stack.col(a), out=g[i])
    slots = torch.tensor([a for _, a in live], dtype=torch.int64, device=x3.device)
    v = stack.val.to(acc).index_select(0, slots).view(len(live), 1, stack.d_out)
    if len(live) == B and y3.dtype == acc:
        y3.addcmul_(g.to(acc), v)  # one fused pass over y
        return
    seqs = None if len(live) == B else torch.tensor([b for b, _ in live], dtype=torch.int64, device=x3.device)
    _add_seqs_(y3, seqs, g.to(acc).mul_(v))


class InputsT:
    """Every sequence's ``x^T [d_in, S]``, as ``_seqs_path`` reads them, made by one copy per layer input and kept
    for the next layer that reads the same input (q, k and v; gate and up) within one model call (adapter_batch
    clears it when the call returns).

    The last copy is kept with the x it came from: holding that x means no other tensor can have its memory while
    they are compared, so equal elements of one storage at one version are the same values (an inference tensor
    has no version: it gets a copy per layer)."""

    def __init__(self):
        self._last = None

    def clear(self) -> None:
        self._last = None

    def __call__(self, x3: torch.Tensor, acc: torch.dtype) -> list[torch.Tensor]:
        last = self._last
        if last is not None and last[1] == acc and aliases(last[0], x3) and last[2] == version(x3):
            return last[3]
        # A sequence at a time, each its own tensor: a 2-D transposed copy takes torch's blocked path (4x faster here
        # at 1024 wide than one copy of the 3-D transpose), and a sequence's buffer is small enough to come back
        # from the heap; one [B, d_in, S] buffer was a fresh mapping per layer, page faults and all (2.6x the time).
        same = x3.dtype == acc
        xt3 = [x3[b].t().contiguous() if same else x3[b].t().to(acc, memory_format=torch.contiguous_format)
               for b in range(x3.shape[0])]
        self._last = (x3, acc, version(x3), xt3)
        return xt3


def _seqs_path(y3, x3, ids, stack, acc, inputs_t: InputsT | None = None) -> None:
    """K > 1, long sequences: one product per sequence, with its own adapter, ``embedding_bag`` over that sequence's
    ``x^T`` (shared by sibling layers through ``inputs_t``); each [d_out, S] result is still in cache when it is
    added, transposed, into its sequence's output. Per-sequence copies of x^T and of each result were two thirds of
    the delta's time on the bench model (8 x 128 tokens, 4 adapters, k=20, 2 threads); sharing the first and adding
    the second as a strided view is measured in bench/RESULTS.md. (Against one product per adapter on the sequences
    that use it, which gathers those sequences first, it was faster from 64 tokens a sequence; shorter ones pay
    more for the calls, hence SEQS_MIN.)"""
    xt3 = (inputs_t or InputsT())(x3, acc)
    # The result goes in transposed: as a strided view where two threads share the add (the blocked 2-D copy is one
    # thread's), as a contiguous copy where there is only one (the strided add ran 1.6-1.9x that copy and add)
    blocked = torch.get_num_threads() == 1
    for b, a in enumerate(ids.tolist()):
        if a < 0:
            continue
        d = F.embedding_bag(stack.idxs[a], xt3[b], per_sample_weights=stack.val_acc(a, acc), mode="sum").t()
        _add_seqs_(y3[b], None, d.contiguous() if blocked else d)


def _bag_path(y3, x3, ids, stack, acc) -> None:
    """K > 1, short sequences: every sequence in one ``embedding_bag``. Its table is all sequences' ``x^T`` stacked
    (``[B * d_in, S]``), and output row ``(b, i)`` is the bag of sequence b's rows ``b * d_in + idx[a(b), i, :]``
    weighted by ``val[a(b), i, :]``: the same sums as one product per adapter (``_grouped_path``), whose small calls
    per adapter present (a gather of its sequences, the product, a scatter back) made a 32 x 16-token batch cost
    4x as much with 32 adapters as with one on the tiny Llama (1 thread, 2026-12-08)."""
    S, d_in = x3.shape[1:]
    seqs, cols, v = stack.gather_plan(ids, acc)
    if seqs is not None:
        x3 = x3.index_select(0, seqs)
    n, d_out, K = cols.shape[0], stack.d_out, stack.k
    if n == 0:  # every sequence on the plain base
        return
    base = torch.arange(0, n * d_in, d_in, dtype=cols.dtype, device=cols.device).view(n, 1)
    rows = cols.add(base).view(n * d_out, K)  # O(n d_out K): 1/S of the product's own work
    table = torch.empty(n, d_in, S, dtype=acc, device=x3.device)
    table.copy_(x3.transpose(1, 2))  # (autograd records the copy: gradients reach x through it)
    out = F.embedding_bag(rows, table.view(n * d_in, S), per_sample_weights=v.reshape(n * d_out, K), mode="sum")
    _add_seqs_(y3, seqs, out.view(n, d_out, S).transpose(1, 2))


def _grouped_path(y3, x3, stack, groups, acc) -> None:
    """One product per adapter present, on the sequences that use it."""
    B, S, d_in = x3.shape
    for slot, seqs in groups:
        xs = x3 if seqs is None else x3.index_select(0, seqs)
        delta = _slot_delta(xs.reshape(-1, d_in), stack, slot, acc)
        _add_seqs_(y3, seqs, delta.view(xs.shape[0], S, stack.d_out))


def bgmv_add_cpu_(y: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, stack: AdapterStack, *, seq_len: int = 1,
                  groups: list | None = None, path: str | None = None, inputs_t: InputsT | None = None) -> torch.Tensor:
    """Stock-torch path (differentiable in ``x``). ``groups``: ``seq_groups(ids)`` if known; ``inputs_t``: the
    model call's shared ``InputsT``, if any; ``path``:
    "gather" | "rows" (k=1 only) | "seqs" | "bag" (k>1) | "grouped" | None: gather for decoding steps and small
    problems, else rows for k=1, seqs for k>1 on sequences of SEQS_MIN tokens or more; on shorter ones grouped (one
    product per adapter present) for up to GROUPED_MAX adapters, else bag (see PATH)."""
    acc = acc_dtype(x, *stack.vals)
    T, B = x.shape[0], ids.shape[0]
    if T == 0:
        return y
    if B * seq_len != T:
        raise NeuroAdaUsageError(f"{B} sequences of {seq_len} tokens != {T} tokens")
    x3 = x.reshape(B, seq_len, stack.d_in)
    y3 = y.view(B, seq_len, stack.d_out)
    path = path or PATH
    if path is None:
        if seq_len == 1 or T * stack.d_out * stack.k <= GATHER_MAX:
            path = "gather"
        else:
            path = "rows" if stack.k == 1 else "seqs" if seq_len >= SEQS_MIN else None
        if path is None:
            groups = seq_groups(ids) if groups is None else groups
            path = "grouped" if len(groups) <= GROUPED_MAX else "bag"
    if path == "gather":
        _gather_path(y3, x3, ids, stack, acc)
    elif path == "rows" and stack.k == 1:
        _rows_path(y3, x3, ids, stack, acc)
    elif path == "seqs":
        _seqs_path(y3, x3, ids, stack, acc, inputs_t)
    elif path == "bag" and stack.k > 1:
        _bag_path(y3, x3, ids, stack, acc)
    else:
        _grouped_path(y3, x3, stack, seq_groups(ids) if groups is None else groups, acc)
    return y


def bgmv_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                    stack: AdapterStack, *, seq_len: int = 1, transposed: bool = False) -> torch.Tensor:
    """``linear(x, W, b)`` plus the mixed-batch delta of a K = 1 stack, in f32, without autograd.

    The delta is gathered straight into the output and the GEMM accumulates onto it (``addmm_``, beta=1), so
    the finished output is never read back to add a delta: on the bench model (8 x 128 tokens, 2 threads) that
    extra pass over ``[T, d_out]`` cost more than the gather itself (mixed forward 1.06x the base -> 1.015x).
    Same sums as base + delta in f32: ``f32(x W^T) + f32(x[t, idx] val)``. ``W`` is stored ``[in, out]`` when
    ``transposed`` (Conv1D). With K > 1 the delta's own cost dominates and writing it first measured no
    better, so those stacks keep ``bgmv_add_`` on the base output.
    """
    T, B = x.shape[0], ids.shape[0]
    if stack.k != 1 or B * seq_len != T:
        raise NeuroAdaUsageError(f"bgmv_linear_cpu needs K = 1 and {B} sequences of {seq_len} tokens = {T} tokens")
    d_out = stack.d_out
    y = torch.empty(T, d_out, dtype=x.dtype, device=x.device)
    x3, y3 = x.reshape(B, seq_len, stack.d_in), y.view(B, seq_len, d_out)
    seqs, cols, v = stack.gather_plan(ids, y.dtype)
    if seqs is None and seq_len == 1:  # a decoding step: a plain 2-D gather (the expanded 3-D one costs ~30% more)
        shared = stack.shared_col()
        if shared is not None:  # one [d_out] index for every sequence instead of B rows of it (read from memory
            torch.index_select(x, 1, shared, out=y)  # each step, after the weights have pushed them out of cache)
        else:
            torch.gather(x, 1, cols, out=y)
        y.mul_(v.view(B, d_out))
    elif seqs is None:
        torch.gather(x3, 2, cols.view(B, 1, d_out).expand(B, seq_len, d_out), out=y3)
        y3.mul_(v.view(B, 1, d_out))
    else:  # sequences on the plain base add nothing
        y.zero_()
        n = seqs.shape[0]
        g = torch.gather(x3.index_select(0, seqs), 2, cols.view(n, 1, d_out).expand(n, seq_len, d_out))
        y3.index_copy_(0, seqs, g.mul_(v.view(n, 1, d_out)))
    if bias is not None:
        y.add_(bias)
    return y.addmm_(x, weight if transposed else weight.t())


# -- torch.compile ---------------------------------------------------------------------------------------
class SeqMask:
    """What the static forms below read of one batch's adapter assignment, computed once, eagerly, per block:
    ``sel [B]`` (each sequence's slot, 0 for the plain base: a valid row to gather), ``live [B, 1, 1]`` (whether
    it uses an adapter) and ``all_live`` (0-dim: whether every sequence does). Tensors only: a compiled forward
    reads them as graph inputs, so another assignment of the same batch size is new data, not a new graph."""

    def __init__(self, ids: torch.Tensor):
        with outside_inference():
            live = ids >= 0
            self.sel = ids.clamp(min=0)
            self.live = live.view(-1, 1, 1)
            self.all_live = live.all()


def _static_gather(x3: torch.Tensor, sel: torch.Tensor, stack: AdapterStack, acc: torch.dtype):
    """``(g [B, S, d_out*K], v [B, d_out, K])``: every sequence's gathered inputs and values, with ``_gather_path``'s
    ops; a base sequence reads slot 0 (its rows are dropped by the caller)."""
    B, S = x3.shape[0], x3.shape[1]
    width = stack.d_out * stack.k
    cols = stack.idx.index_select(0, sel).view(B, 1, width)
    v = stack.val.to(acc).index_select(0, sel)
    return torch.gather(x3, 2, cols.expand(B, S, width)), v


def bgmv_add_static(y: torch.Tensor, x: torch.Tensor, mask: SeqMask, stack: AdapterStack, *,
                    seq_len: int = 1) -> torch.Tensor:
    """``bgmv_add_`` for torch.compile: returns ``y`` plus the mixed-batch delta as a new tensor (no in-place
    writes, no host reads, shapes that depend on no adapter assignment). Same ops and roundings as the eager
    gather path (``_gather_path`` + ``_add_seqs_``), computed for every sequence and selected by ``mask.live``,
    so it gives the eager gather path's bits; the eager seqs and grouped paths (K > 1, long sequences) sum in
    another order. The stacked ``stack.idx`` / ``stack.val`` must exist before tracing (``adapter_batch`` builds them)."""
    acc = acc_dtype(x, *stack.vals)
    B, d_out, K = mask.sel.shape[0], stack.d_out, stack.k
    x3, y3 = x.reshape(B, seq_len, stack.d_in), y.reshape(B, seq_len, d_out)
    g, v = _static_gather(x3, mask.sel, stack, acc)
    g = g.to(acc)
    if K == 1:
        delta = g * v.view(B, 1, d_out)
        if y3.dtype == acc:  # eager fuses the multiply-add (one rounding) only when every sequence uses an adapter
            out = torch.where(mask.all_live, torch.addcmul(y3, g, v.view(B, 1, d_out)), y3 + delta)
            return torch.where(mask.live, out, y3).view(y.shape)
    else:
        delta = torch.einsum("bsik,bik->bsi", g.view(B, seq_len, d_out, K), v)
    out = y3 + delta if y3.dtype == acc else (y3.to(acc) + delta).to(y3.dtype)
    return torch.where(mask.live, out, y3).view(y.shape)


def bgmv_linear_static(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: SeqMask,
                       stack: AdapterStack, *, seq_len: int = 1, transposed: bool = False) -> torch.Tensor:
    """``bgmv_linear_cpu`` for torch.compile: the delta (zero for base sequences), plus the bias, then the GEMM
    accumulated onto it by ``addmm``: the eager fused path's ops and bits, without its ``out=`` writes (which
    cannot be traced with symbolic shapes)."""
    B, d_out = mask.sel.shape[0], stack.d_out
    if stack.k != 1:
        raise NeuroAdaUsageError("bgmv_linear_static needs K = 1")
    g, v = _static_gather(x.reshape(B, seq_len, stack.d_in), mask.sel, stack, x.dtype)
    y = torch.where(mask.live, g * v.view(B, 1, d_out), torch.zeros((), dtype=x.dtype, device=x.device))
    y = y.view(B * seq_len, d_out)
    if bias is not None:
        y = y + bias
    return torch.addmm(y, x, weight if transposed else weight.t())


# -- Triton ----------------------------------------------------------------------------------------------
tl = None  # triton.language, bound on first use (the kernel body below resolves it as a global)
_jit = None
_triton_state: bool | None = None


def triton_available() -> bool:
    """Whether the Triton kernel can be decorated here (triton importable)."""
    global tl, _jit, _triton_state
    if _triton_state is None:
        try:
            import triton
            import triton.language as language
        except Exception:  # pragma: no cover - depends on the install
            _triton_state = False
            return False
        tl = language
        _jit = triton.jit(_bgmv_kernel)
        _triton_state = True
    return _triton_state


def _bgmv_kernel(x_ptr, ids_ptr, idx_ptr, val_ptr, y_ptr, out_ptr, S, d_out, K,
                 s_xt, s_xc, s_ia, s_ir, s_va, s_vr, s_yt, s_yr,
                 ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # program (b, rb, tb): sequence b, output rows rb*BLOCK_R.., tokens tb*BLOCK_T.. of that sequence, read
    # from one flat grid axis (axis 1 would stop at 65,535 row blocks: a wide head at K >= 2048)
    pid = tl.program_id(0)
    n_t = tl.cdiv(S, BLOCK_T)
    n_r = tl.cdiv(d_out, BLOCK_R)
    tb = pid % n_t
    b = pid // (n_t * n_r)
    r = ((pid // n_t) % n_r) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_K)
    a = tl.load(ids_ptr + b)
    used = a >= 0
    a_safe = tl.where(used, a, 0)
    rm = r < d_out
    m2 = rm[:, None] & (j < K)[None, :] & used
    cols = tl.load(idx_ptr + a_safe * s_ia + r[:, None] * s_ir + j[None, :], mask=m2, other=0)
    v = tl.load(val_ptr + a_safe * s_va + r[:, None] * s_vr + j[None, :], mask=m2, other=0).to(ACC)
    for tt in range(0, BLOCK_T):
        pos = tb * BLOCK_T + tt
        tok = (b * S + pos).to(tl.int64)  # tok x stride passes 2^31 on long batches of wide layers
        inside = pos < S
        xv = tl.load(x_ptr + tok * s_xt + cols * s_xc, mask=m2 & inside, other=0).to(ACC)
        s = tl.sum(xv * v, axis=1)
        ym = rm & inside
        yv = tl.load(y_ptr + tok * s_yt + r.to(tl.int64) * s_yr, mask=ym, other=0).to(ACC)  # r x stride: 64-bit
        tl.store(out_ptr + tok * d_out + r, yv + s, mask=ym)


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def bgmv_add_triton_(y: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, stack: AdapterStack, *,
                     seq_len: int = 1, block_r: int | None = None, block_t: int = 16) -> torch.Tensor:
    """Triton path: ``out = f32(y) + delta`` per program, then torch rounds into ``y`` (no-op for f32)."""
    if not triton_available():
        raise NeuroAdaUsageError("triton is not installed")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    for t in (x, y, ids):
        if not t.is_cuda and not interpret:
            raise NeuroAdaUsageError("the Triton bgmv kernel got a CPU tensor; set TRITON_INTERPRET=1 before its first "
                               "use to run it in the interpreter")
    T = x.shape[0]
    B = ids.shape[0]
    if T == 0:
        return y
    if B * seq_len != T:
        raise NeuroAdaUsageError(f"{B} sequences of {seq_len} tokens != {T} tokens")
    acc = acc_dtype(x, *stack.vals)
    out = y if (y.dtype == acc and y.is_contiguous()) else torch.empty(T, stack.d_out, dtype=acc, device=y.device)
    bk = _pow2(stack.k)
    br = _pow2(block_r or max(1, min(128, 2048 // bk)))
    bt = _pow2(max(1, min(block_t, seq_len)))
    idx, val = stack.idx, stack.val
    from .triton import flat_grid

    _jit[flat_grid(B, (stack.d_out + br - 1) // br, (seq_len + bt - 1) // bt)](
        x, ids.to(torch.int64).contiguous(), idx, val, y, out, seq_len, stack.d_out, stack.k,
        x.stride(0), x.stride(1), idx.stride(0), idx.stride(1), val.stride(0), val.stride(1),
        y.stride(0), y.stride(1),
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_R=br, BLOCK_K=bk, BLOCK_T=bt,
    )
    if out is not y:
        y.copy_(out)  # torch rounds (RNE)
    return y


# -- dispatch --------------------------------------------------------------------------------------------
def bgmv_add_(y: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, stack: AdapterStack, *, seq_len: int = 1,
              groups: list | None = None, inputs_t: InputsT | None = None) -> torch.Tensor:
    """Add the mixed-batch delta into ``y [T, d_out]`` in place (and return it).

    ``x [T, d_in]``; ``ids [T // seq_len]`` int: the adapter slot of each run of ``seq_len`` tokens
    (``-1`` = base). The backend follows ``kernels.get_backend()``: CUDA tensors go to Triton unless
    autograd needs a graph through ``x`` (the Triton path has no backward), everything else to torch.
    """
    name = get_backend()
    if name == "reference":
        delta = bgmv_reference(x, ids, stack, seq_len=seq_len)
        _add_seqs_(y.view(ids.shape[0], seq_len, stack.d_out), None, delta.view(ids.shape[0], seq_len, -1))
        return y
    needs_graph = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    if name == "triton" or (name == "auto" and x.is_cuda and not needs_graph and triton_available()):
        if needs_graph:
            raise NeuroAdaUsageError("the Triton bgmv kernel has no backward; run under torch.no_grad()")
        return bgmv_add_triton_(y, x, ids, stack, seq_len=seq_len)
    return bgmv_add_cpu_(y, x, ids, stack, seq_len=seq_len, groups=groups, inputs_t=inputs_t)
