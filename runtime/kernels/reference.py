"""Dense, obviously-correct versions of every kernel.

They materialise ``[d_out, d_in]`` tensors on purpose: they are the specification the efficient
paths are tested against, and are never used for training.
"""

from __future__ import annotations

import torch

from .pattern import as_pattern

__all__ = [
    "INT_VIEW",
    "acc_dtype",
    "rounded_values",
    "merged_weight",
    "scatter_",
    "restore_",
    "put_",
    "sampled_rowdot",
    "gather_matvec",
    "gather_matvec_t",
    "dense_delta",
]


# element size -> the int dtype a float tensor's bits are viewed as (bit-exact writes and comparisons: -0.0 is not
# 0.0, and a NaN equals itself)
INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def gather_exact(W: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``W.gather(1, idx)`` bit for bit. On CPU, gathering bf16 rewrites a NaN's payload and sign (0x7fc1 came
    back 0xffff): the original entries read that way were written back into the base by the next forward, and
    the probe hash made from them no longer matched the base checkpoint. Through an integer view bits are bits."""
    bits = INT_VIEW.get(W.element_size()) if W.is_floating_point() else None
    if bits is None:
        return W.gather(1, idx)
    return W.view(bits).gather(1, idx).view(W.dtype)


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """f32 accumulation, widened to f64 when any operand is f64 (so float64 gradcheck is exact)."""
    for t in tensors:
        if t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def rounded_values(w0: torch.Tensor, val: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``round_dtype(f32(w0) + f32(val))``: one addition in f32, one rounding -- the merge rule.

    Where one operand already has the accumulation dtype, type promotion widens the other (exactly) inside the
    addition: the same sum without a converted copy, one op fewer per layer and step on the training path."""
    acc = acc_dtype(w0, val)
    if w0.dtype != acc and val.dtype != acc:
        val = val.to(acc)
    if w0.dim() == 0 or val.dim() == 0:  # a zero-dim operand does not decide the result's dtype: convert both
        w0, val = w0.to(acc), val.to(acc)
    s = torch.add(w0, val)
    return s if s.dtype == dtype else s.to(dtype)


def _rc(p, W: torch.Tensor):
    """Stored-layout (row, col) index tensors of the pattern in W."""
    r = torch.arange(p.d_out, device=W.device).unsqueeze(1).expand(p.d_out, p.k)
    return (p.idx, r) if p.transposed else (r, p.idx)


def merged_weight(W: torch.Tensor, idx, w0: torch.Tensor, val: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """A dense copy of W (stored layout) with the merged entries written."""
    p = as_pattern(idx, W.shape[0] if transposed else W.shape[1], transposed=transposed)
    out = W.detach().clone()
    out[_rc(p, W)] = rounded_values(w0, val, W.dtype)
    return out


def scatter_(W: torch.Tensor, idx, w0: torch.Tensor, val: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    p = as_pattern(idx, W.shape[0] if transposed else W.shape[1], transposed=transposed)
    W[_rc(p, W)] = rounded_values(w0, val, W.dtype)
    return W


def restore_(W: torch.Tensor, idx, w0: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    p = as_pattern(idx, W.shape[0] if transposed else W.shape[1], transposed=transposed)
    W[_rc(p, W)] = w0.to(W.dtype)
    return W


def put_(W: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    W.view(-1)[flat] = values.to(W.dtype)
    return W


def dense_delta(idx, val: torch.Tensor, d_in: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Canonical dense ``Delta [d_out, d_in]`` (zeros except the selected entries)."""
    p = as_pattern(idx, d_in)
    dtype = dtype or val.dtype
    return torch.zeros(p.d_out, p.d_in, dtype=dtype, device=val.device).scatter(1, p.idx, val.to(dtype))


def sampled_rowdot(grad_y: torch.Tensor, x: torch.Tensor, idx) -> torch.Tensor:
    """``grad_val[i, j] = sum_t grad_y[t, i] x[t, idx[i, j]]`` via the full dense ``grad_y^T x``."""
    p = as_pattern(idx, x.shape[-1])
    acc = acc_dtype(grad_y, x)
    return (grad_y.to(acc).t() @ x.to(acc)).gather(1, p.idx)


def gather_matvec(x: torch.Tensor, idx, val: torch.Tensor) -> torch.Tensor:
    """``S(x) = x Delta^T`` with a dense Delta."""
    p = as_pattern(idx, x.shape[-1])
    acc = acc_dtype(x, val)
    return x.to(acc) @ dense_delta(p, val, dtype=acc).t()


def gather_matvec_t(grad_y: torch.Tensor, idx, val: torch.Tensor, d_in: int | None = None) -> torch.Tensor:
    """``S^T(g) = g Delta`` with a dense Delta."""
    p = as_pattern(idx, d_in)
    acc = acc_dtype(grad_y, val)
    return grad_y.to(acc) @ dense_delta(p, val, dtype=acc)
