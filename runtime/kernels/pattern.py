"""Index structures derived from one adapter's ``idx`` and shared by every kernel backend.

They are built once per layer (and rebuilt only when ``idx`` changes) because rebuilding them on
each call would cost about as much as the sparse products they serve.
"""

from __future__ import annotations

import warnings

import torch

from neuroada_format import NeuroAdaError, NeuroAdaUsageError

from .cache import aliases, cache_here, outside_inference, version

__all__ = ["Pattern", "as_pattern", "sparse_csr"]


def sparse_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size) -> torch.Tensor:
    """CSR constructor without per-call invariant checks: the pattern was validated once when built."""
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _consume_beta_warning() -> None:
    # torch warns once per process that CSR support is "beta"; take that warning here, quietly,
    # so the first training step of a user does not print it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse_csr(torch.zeros(2, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(1), (1, 1))


_consume_beta_warning()


class Pattern:
    """The positions ``(i, idx[i, j])`` of one adapter in canonical ``[d_out, d_in]`` coordinates.

    ``transposed`` says the weight is stored ``[d_in, d_out]`` (transformers' Conv1D): canonical row
    ``i`` is then stored column ``i``, which only changes the flat positions used for writing.
    The CSR view (row-major) serves ``sampled_rowdot`` and ``S(x)``; the column-major view serves
    ``S^T`` as a gather-and-reduce per input column, so no atomics are needed and results are
    deterministic.
    """

    def __init__(self, idx: torch.Tensor, d_in: int, *, transposed: bool = False, validate: bool = True):
        if idx.dim() != 2:
            raise NeuroAdaError(f"idx must be [d_out, k], got shape {tuple(idx.shape)}", rule="3.4")
        if idx.dtype != torch.int64:
            raise NeuroAdaError(f"idx must be int64, got {idx.dtype}")
        self.idx = idx
        self.version = version(idx) if cache_here() else None  # None: made in a trace, for it alone (cache_here)
        self.d_out, self.k = idx.shape
        self.d_in = int(d_in)
        self.transposed = bool(transposed)
        with outside_inference():
            self._idx_c = idx.contiguous()
        if validate:
            self.check()
        self._flat = None
        self._crow = None
        self._zeros = {}
        self._csc = None

    _CACHES = ("_flat", "_crow", "_zeros", "_csc")

    def __getstate__(self):
        """Derived index structures are caches: rebuilt on demand, never copied or pickled (a CSR
        tensor cannot be deep-copied at all)."""
        state = self.__dict__.copy()
        state.update(_flat=None, _crow=None, _zeros={}, _csc=None)
        return state

    def check(self) -> None:
        """Reject indices the sparse structures silently rely on (range, strictly increasing rows)."""
        idx = self._idx_c
        if idx.numel() == 0:
            return
        bad_range = (idx < 0).any() | (idx >= self.d_in).any()
        bad_order = (idx[:, 1:] <= idx[:, :-1]).any() if self.k > 1 else torch.zeros((), dtype=torch.bool)
        if bool(bad_range):
            raise NeuroAdaError(f"idx has columns outside [0, {self.d_in})", rule="3.5")
        if bool(bad_order):
            raise NeuroAdaError("idx rows must be strictly increasing", rule="3.6")

    def is_current(self, idx: torch.Tensor) -> bool:
        """Whether the pattern describes ``idx`` as it is now: this very tensor, or an alias of it (adapters with one
        set of positions hold aliases of one idx and share its pattern, see NeuroAdaLayer._twin), unchanged."""
        if idx is self.idx:
            return version(idx) == self.version
        return aliases(idx, self.idx) and version(idx) == self.version and version(self.idx) == self.version

    @property
    def shape(self):
        return (self.d_out, self.d_in)

    @property
    def device(self):
        return self.idx.device

    @property
    def nnz(self) -> int:
        return self.d_out * self.k

    @property
    def col(self) -> torch.Tensor:
        return self._idx_c.view(-1)

    @property
    def rows(self) -> torch.Tensor:
        """Canonical row of each entry, in CSR order."""
        return torch.arange(self.d_out, device=self.device).repeat_interleave(self.k)

    @property
    def flat(self) -> torch.Tensor:
        """Positions of the entries in the contiguous *stored* weight, in CSR order (kept: training and
        merging write them twice per layer and step)."""
        if self._flat is None:
            with outside_inference():
                self._flat = self.positions()
        return self._flat

    def positions(self) -> torch.Tensor:
        """``flat``, without keeping it when it is not kept already: for callers with a bounded cache of their own
        (set_adapter keeps the last adapters it served, not 8 bytes per entry of every adapter it ever served)."""
        if self._flat is not None:
            return self._flat
        r = torch.arange(self.d_out, device=self.device).unsqueeze(1)
        f = self._idx_c * self.d_out + r if self.transposed else r * self.d_in + self._idx_c
        return f.reshape(-1)

    @property
    def crow(self) -> torch.Tensor:
        if self._crow is None:
            with outside_inference():
                self._crow = torch.arange(0, self.nnz + 1, self.k, device=self.device, dtype=torch.int64)
        return self._crow

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """Sparse ``Delta [d_out, d_in]`` with ``values`` in CSR order (shares the index tensors)."""
        return sparse_csr(self.crow, self.col, values.reshape(-1), self.shape)

    def csr_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        """The bare sampling pattern for ``sampled_addmm`` (values are ignored with beta=0)."""
        t = self._zeros.get(dtype)
        if t is None:
            with outside_inference():
                t = self.csr(torch.zeros(self.nnz, dtype=dtype, device=self.device))
            self._zeros[dtype] = t
        return t

    @property
    def csc(self):
        """``(colptr [d_in+1], rows [nnz], perm [nnz])``: entries grouped by input column, rows
        ascending inside a column; ``perm`` maps each back to its CSR slot (to permute ``val``)."""
        if self._csc is None:
            with outside_inference():
                col = self.col
                # stable sort by column keeps rows ascending within a column
                perm = torch.argsort(col, stable=True)
                counts = torch.bincount(col, minlength=self.d_in)
                colptr = torch.zeros(self.d_in + 1, dtype=torch.int64, device=self.device)
                torch.cumsum(counts, 0, out=colptr[1:])
                rows = torch.div(perm, self.k, rounding_mode="floor") if self.k > 0 else perm
                self._csc = (colptr, rows.contiguous(), perm)
        return self._csc

    def csc_matrix(self, values: torch.Tensor) -> torch.Tensor:
        """Sparse ``Delta^T [d_in, d_out]`` as CSR (i.e. Delta in CSC) carrying ``values`` (CSR order)."""
        colptr, rows, perm = self.csc
        return sparse_csr(colptr, rows, values.reshape(-1)[perm], (self.d_in, self.d_out))

    def __repr__(self) -> str:
        return f"Pattern(d_out={self.d_out}, d_in={self.d_in}, k={self.k}, transposed={self.transposed})"


def as_pattern(idx, d_in: int | None = None, *, transposed: bool = False) -> Pattern:
    """Accept either a cached Pattern or a raw ``idx`` tensor (then build a throw-away one)."""
    if isinstance(idx, Pattern):
        return idx
    if d_in is None:
        raise NeuroAdaUsageError("d_in is required when idx is a plain tensor")
    return Pattern(idx, d_in, transposed=transposed)


def weight_pattern(W: torch.Tensor, idx, transposed: bool) -> Pattern:
    """The pattern of ``idx`` for a stored weight W, checking that W has the shape it describes."""
    p = as_pattern(idx, W.shape[0] if transposed else W.shape[1], transposed=transposed)
    stored = (p.d_in, p.d_out) if p.transposed else (p.d_out, p.d_in)
    if tuple(W.shape) != stored:
        raise NeuroAdaError(f"weight of shape {tuple(W.shape)} does not match pattern {p} (stored {stored})",
                            rule="4.2")
    return p
