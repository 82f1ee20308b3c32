"""Efficient paths built from stock torch ops (sparse CSR products, bags of rows, flat index writes).

Nothing here is CPU-specific in the code, but the choices were measured on CPU (see the module
``tests/runtime/bench_cpu.py``): ``sampled_addmm`` over a fixed CSR pattern beats the dense
``grad_y^T x`` + gather by about 10x at k=20, and ``embedding_bag`` over the transposed activations
beats both gathering ``x[:, idx]`` and a CSR ``spmm`` (which slows down badly past a few hundred
tokens). None of them materialises ``[T, d_out, k]`` or any dense ``[d_out, d_in]`` tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pattern import as_pattern, weight_pattern
from .reference import acc_dtype

__all__ = ["scatter_", "restore_", "put_", "sampled_rowdot", "gather_matvec", "gather_matvec_t"]


def put_(W: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write ``values`` (already rounded to W's dtype) at flat positions of the contiguous W."""
    if not W.is_contiguous():
        raise ValueError("in-place sparse writes need a contiguous weight; use the additive mode")
    # index_put_ costs O(entries); scatter_ costs ~100 ms on an 11008x4096 weight whatever k is
    W.view(-1).index_put_((flat,), values.reshape(-1).to(W.dtype))
    return W


def scatter_(W: torch.Tensor, idx, w0: torch.Tensor, val: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """W[i, idx[i, j]] = round_W(f32(w0) + f32(val)); O(d_out * k)."""
    p = weight_pattern(W, idx, transposed)
    acc = acc_dtype(w0, val)
    return put_(W, p.flat, (w0.reshape(-1).to(acc) + val.reshape(-1).to(acc)).to(W.dtype))


def restore_(W: torch.Tensor, idx, w0: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """Put the original values back, bit for bit."""
    p = weight_pattern(W, idx, transposed)
    return put_(W, p.flat, w0)


def sampled_rowdot(grad_y: torch.Tensor, x: torch.Tensor, idx) -> torch.Tensor:
    """``grad_val [d_out, k]`` for ``grad_y [T, d_out]``, ``x [T, d_in]``, accumulated in f32 (f64 if given)."""
    p = as_pattern(idx, x.shape[-1])
    acc = acc_dtype(grad_y, x)
    if grad_y.shape[0] == 0:
        return torch.zeros(p.d_out, p.k, dtype=acc, device=x.device)
    # a row-major [d_out, T] copy makes sampled_addmm ~3x faster than the strided view; one pass converts too.
    # (Copying it a block of tokens at a time made no measurable difference to peak RSS, and cost time
    # at 2 threads: each call is an OpenMP region.)
    gyt = torch.empty(grad_y.shape[1], grad_y.shape[0], dtype=acc, device=grad_y.device).copy_(grad_y.t())
    xs = x.to(acc).contiguous()
    out = torch.sparse.sampled_addmm(p.csr_zeros(acc), gyt, xs, beta=0.0, alpha=1.0)
    return out.values().view(p.d_out, p.k)


def gather_matvec(x: torch.Tensor, idx, val: torch.Tensor) -> torch.Tensor:
    """``S(x)[t, i] = sum_j val[i, j] x[t, idx[i, j]]``; returns a [T, d_out] view (of a [d_out, T] tensor)."""
    p = as_pattern(idx, x.shape[-1])
    acc = acc_dtype(x, val)
    if x.shape[0] == 0:
        return torch.zeros(0, p.d_out, dtype=acc, device=x.device)
    # a row of x^T holds one input feature for every token: each output row is a bag of k such rows
    xt = x.to(acc).t().contiguous()
    bags = p.col.view(p.d_out, p.k)
    return F.embedding_bag(bags, xt, per_sample_weights=val.to(acc).reshape(p.d_out, p.k), mode="sum").t()


def gather_matvec_t(grad_y: torch.Tensor, idx, val: torch.Tensor, d_in: int | None = None) -> torch.Tensor:
    """``S^T(g)[t, c] = sum_{(i,j): idx[i,j]=c} val[i, j] g[t, i]`` from the column-major pattern:
    input column c is the bag of the output rows that selected it (empty bags give zeros)."""
    p = as_pattern(idx, d_in)
    acc = acc_dtype(grad_y, val)
    if grad_y.shape[0] == 0:
        return torch.zeros(0, p.d_in, dtype=acc, device=grad_y.device)
    colptr, rows, perm = p.csc
    gt = grad_y.to(acc).t().contiguous()
    weights = val.to(acc).reshape(-1)[perm]
    return F.embedding_bag(rows, gt, colptr[:-1], per_sample_weights=weights, mode="sum").t()
