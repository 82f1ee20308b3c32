"""Efficient paths built from stock torch ops (sparse CSR products, flat index writes).

Nothing here is CPU-specific in the code, but the choices were measured on CPU (see the module
``tests/runtime/bench_cpu.py``): ``sampled_addmm`` over a fixed CSR pattern beats the dense
``grad_y^T x`` + gather by about 10x at k=20, and a CSR ``spmm`` beats gathering ``x[:, idx]``.
None of them materialises ``[T, d_out, k]`` or any dense ``[d_out, d_in]`` tensor.
"""

from __future__ import annotations

import torch

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


# grad_y is transposed a block of tokens at a time, so each temporary stays near this size: one
# whole [d_out, tokens] copy per layer (1-3 MB on the 109M bench model) fragmented glibc's heap
# enough to add ~3% to a training step's peak RSS; blocks of ~256 KB cost no measurable time.
ROWDOT_BLOCK_BYTES = 256 << 10


def sampled_rowdot(grad_y: torch.Tensor, x: torch.Tensor, idx) -> torch.Tensor:
    """``grad_val [d_out, k]`` for ``grad_y [T, d_out]``, ``x [T, d_in]``, accumulated in f32 (f64 if given)."""
    p = as_pattern(idx, x.shape[-1])
    acc = acc_dtype(grad_y, x)
    T = grad_y.shape[0]
    out = torch.zeros(p.nnz, dtype=acc, device=x.device)
    if T == 0:
        return out.view(p.d_out, p.k)
    pattern = p.csr_zeros(acc)
    block = max(8, ROWDOT_BLOCK_BYTES // (p.d_out * torch.finfo(acc).bits // 8))
    for t0 in range(0, T, block):
        g = grad_y[t0:t0 + block]
        # a row-major [d_out, tokens] copy makes sampled_addmm ~3x faster than the strided view
        gyt = torch.empty(g.shape[1], g.shape[0], dtype=acc, device=g.device).copy_(g.t())
        xs = x[t0:t0 + block].to(acc).contiguous()
        out += torch.sparse.sampled_addmm(pattern, gyt, xs, beta=0.0, alpha=1.0).values()
    return out.view(p.d_out, p.k)


def gather_matvec(x: torch.Tensor, idx, val: torch.Tensor) -> torch.Tensor:
    """``S(x)[t, i] = sum_j val[i, j] x[t, idx[i, j]]`` as ``(Delta @ x^T)^T``; returns a [T, d_out] view."""
    p = as_pattern(idx, x.shape[-1])
    acc = acc_dtype(x, val)
    if x.shape[0] == 0:
        return torch.zeros(0, p.d_out, dtype=acc, device=x.device)
    return torch.sparse.mm(p.csr(val.to(acc)), x.to(acc).t()).t()


def gather_matvec_t(grad_y: torch.Tensor, idx, val: torch.Tensor, d_in: int | None = None) -> torch.Tensor:
    """``S^T(g)[t, c] = sum_{(i,j): idx[i,j]=c} val[i, j] g[t, i]`` from the column-major pattern."""
    p = as_pattern(idx, d_in)
    acc = acc_dtype(grad_y, val)
    if grad_y.shape[0] == 0:
        return torch.zeros(0, p.d_in, dtype=acc, device=grad_y.device)
    return torch.sparse.mm(p.csc_matrix(val.to(acc)), grad_y.to(acc).t()).t()
