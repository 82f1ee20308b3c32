"""Kernel dispatch: CUDA tensors go to Triton, everything else to the torch sparse paths.

The backend can be forced (tests, debugging) with ``NEUROADA_KERNELS`` = ``auto`` | ``cpu`` |
``reference`` | ``triton`` or with :func:`use_backend`. ``cpu`` means the stock-torch paths (they
also run on CUDA); ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before import.
The Triton module is imported lazily so that importing this package never touches triton.
"""

from __future__ import annotations

import contextlib
import os

import torch

from neuroada_format import NeuroAdaUsageError

from . import cpu, reference
from .pattern import Pattern, as_pattern

__all__ = [
    "Pattern",
    "as_pattern",
    "BACKENDS",
    "get_backend",
    "set_backend",
    "use_backend",
    "scatter_",
    "restore_",
    "put_",
    "sampled_rowdot",
    "gather_matvec",
    "gather_matvec_t",
]

BACKENDS = ("auto", "cpu", "reference", "triton")
_forced: str | None = None
_triton_mod = None
_triton_failed = False


def get_backend() -> str:
    name = _forced or os.environ.get("NEUROADA_KERNELS", "auto") or "auto"
    if name not in BACKENDS:
        raise NeuroAdaUsageError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for this process (``None`` returns to the env var / auto)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise NeuroAdaUsageError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    _forced = name


@contextlib.contextmanager
def use_backend(name: str | None):
    global _forced
    prev = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = prev


def _triton():
    global _triton_mod, _triton_failed
    if _triton_mod is None and not _triton_failed:
        try:
            from . import triton as mod
        except Exception:  # pragma: no cover - broken triton install
            _triton_failed = True
            return None
        if not mod.AVAILABLE:
            _triton_failed = True
            return None
        _triton_mod = mod
    return _triton_mod


def _impl(t: torch.Tensor):
    name = get_backend()
    if name == "reference":
        return reference
    if name == "cpu":
        return cpu
    if name == "triton":
        mod = _triton()
        if mod is None:
            raise NeuroAdaUsageError("NEUROADA_KERNELS=triton but triton cannot be imported")
        return mod
    if t.is_cuda:
        mod = _triton()
        if mod is not None:
            return mod
    return cpu


def scatter_(W: torch.Tensor, idx, w0: torch.Tensor, val: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """Write ``round_W(f32(w0) + f32(val))`` at ``(i, idx[i, j])`` of W (stored ``[in, out]`` if transposed)."""
    return _impl(W).scatter_(W, idx, w0, val, transposed=transposed)


def restore_(W: torch.Tensor, idx, w0: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """Write the original values ``w0`` back, bit for bit."""
    return _impl(W).restore_(W, idx, w0, transposed=transposed)


def put_(W: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write ``values`` (already in W's dtype) at flat positions of the contiguous stored W."""
    return _impl(W).put_(W, flat, values)


def sampled_rowdot(grad_y: torch.Tensor, x: torch.Tensor, idx) -> torch.Tensor:
    """``[d_out, k]``: ``sum_t grad_y[t, i] x[t, idx[i, j]]`` in f32 (f64 for f64 inputs)."""
    if torch.compiler.is_compiling():
        p = as_pattern(idx, x.shape[-1])
        if p.k > 1:  # k = 1 is plain index ops, which the compiler traces (and fuses); k > 1 is opaque to it
            return _sampled_rowdot_op(grad_y, x, p.idx)
    return _impl(x).sampled_rowdot(grad_y, x, idx)


@torch.library.custom_op("neuroada::sampled_rowdot", mutates_args=())
def _sampled_rowdot_op(grad_y: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``sampled_rowdot`` as one operator that torch.compile keeps whole: the k > 1 kernels (a sparse CSR product, a
    Triton launch) cannot be traced, and a backward that calls them would otherwise leave the graph at every adapted
    layer. Runs the same dispatch as eager, so a compiled step's gradients are eager's."""
    return _impl(x).sampled_rowdot(grad_y, x, Pattern(idx, x.shape[-1], validate=False)).contiguous()


@_sampled_rowdot_op.register_fake
def _(grad_y, x, idx):
    return x.new_empty(idx.shape, dtype=reference.acc_dtype(grad_y, x))


def gather_matvec(x: torch.Tensor, idx, val: torch.Tensor) -> torch.Tensor:
    """``S(x) [T, d_out]``: ``sum_j val[i, j] x[t, idx[i, j]]`` in f32 (f64 for f64 inputs)."""
    return _impl(x).gather_matvec(x, idx, val)


def gather_matvec_t(grad_y: torch.Tensor, idx, val: torch.Tensor, d_in: int | None = None) -> torch.Tensor:
    """``S^T(grad_y) [T, d_in]``, reduced per input column (deterministic, no atomics)."""
    if torch.compiler.is_compiling():  # grouping entries by column has a data-dependent shape (bincount)
        p = as_pattern(idx, d_in)
        return _gather_matvec_t_op(grad_y, p.idx, val, p.d_in)
    return _impl(grad_y).gather_matvec_t(grad_y, idx, val, d_in)


@torch.library.custom_op("neuroada::gather_matvec_t", mutates_args=())
def _gather_matvec_t_op(grad_y: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, d_in: int) -> torch.Tensor:
    """``gather_matvec_t`` as one operator for torch.compile (see ``_sampled_rowdot_op``); contiguous, as its fake
    says (the CPU path returns a transposed view, which its caller's reshape copies anyway)."""
    return _impl(grad_y).gather_matvec_t(grad_y, Pattern(idx, d_in, validate=False), val, d_in).contiguous()


@_gather_matvec_t_op.register_fake
def _(grad_y, idx, val, d_in):
    return grad_y.new_empty(grad_y.shape[0], d_in, dtype=reference.acc_dtype(grad_y, val))
