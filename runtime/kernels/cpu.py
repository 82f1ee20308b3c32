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

from neuroada_format import NeuroAdaUsageError

from .pattern import as_pattern, weight_pattern
from .reference import INT_VIEW, acc_dtype

__all__ = ["scatter_", "restore_", "put_", "sampled_rowdot", "gather_matvec", "gather_matvec_t", "bag_rows"]


def put_(W: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write ``values`` (already rounded to W's dtype) at flat positions of the contiguous W.

    On CPU the bits move through numpy's fancy assignment, one single-threaded pass: torch's
    index_put_ is an OpenMP region, and on a machine whose cores were busy each one waited ~8 ms for
    its second thread (a 28-weight adapter switch took 224 ms instead of ~3 ms). index_put_ stays for
    other devices and inside torch.compile. Either way O(entries) (scatter_ costs ~100 ms on an
    11008x4096 weight whatever k is) and W's version counter moves as for any in-place write.
    """
    if not W.is_contiguous():
        raise NeuroAdaUsageError("in-place sparse writes need a contiguous weight; use the additive mode")
    values = values.reshape(-1).to(W.dtype)
    if W.device.type == "cpu" and not torch.compiler.is_compiling():
        bits = INT_VIEW[W.element_size()]
        W.detach().view(-1).view(bits).numpy()[flat.numpy()] = values.detach().view(bits).numpy()
        if not W.is_inference():  # an inference tensor keeps no version to move
            torch.autograd.graph.increment_version(W)
    else:
        W.view(-1).index_put_((flat,), values)
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


ROWDOT_BLOCK = 1 << 20  # elements of the k=1 gather temporary (4 MB of f32)


def sampled_rowdot(grad_y: torch.Tensor, x: torch.Tensor, idx) -> torch.Tensor:
    """``grad_val [d_out, k]`` for ``grad_y [T, d_out]``, ``x [T, d_in]``, accumulated in f32 (f64 if given)."""
    p = as_pattern(idx, x.shape[-1])
    acc = acc_dtype(grad_y, x)
    if grad_y.shape[0] == 0:
        return torch.zeros(p.d_out, p.k, dtype=acc, device=x.device)
    if p.k == 1:
        return _rowdot_k1(grad_y, x, p, acc)
    # Each sampled entry is dot(grad_y^T[i, :], x[:, c]) over the tokens, so both operands go in with the
    # token axis contiguous: a row-major [d_out, T] copy of grad_y (~3x faster than the strided view) and x
    # as the transpose of a row-major [d_in, T] copy (1.5-2.5x faster than row-major x on the bench shapes,
    # and no 10x stalls at 2 threads when the d_out x T rows outgrow the cache). One pass converts too.
    # (Copying a block of tokens at a time made no measurable difference to peak RSS, and cost time
    # at 2 threads: each call is an OpenMP region.)
    gyt = torch.empty(grad_y.shape[1], grad_y.shape[0], dtype=acc, device=grad_y.device).copy_(grad_y.t())
    xt = torch.empty(x.shape[1], x.shape[0], dtype=acc, device=x.device).copy_(x.t())
    out = torch.sparse.sampled_addmm(p.csr_zeros(acc), gyt, xt.t(), beta=0.0, alpha=1.0)
    return out.values().view(p.d_out, p.k)


def _rowdot_k1(grad_y: torch.Tensor, x: torch.Tensor, p, acc: torch.dtype) -> torch.Tensor:
    """k=1: gather each token's one selected input per output row, weight by grad_y, sum over the
    tokens (a block of tokens at a time, so no temporary exceeds ROWDOT_BLOCK elements). Measured
    here 1.4-3.6x faster than sampled_addmm at k=1 (256 and 2048 tokens; slower from k=2 on), and a
    k=1 training step of bench/train.py's model peaked 25-45 MB lower in RSS."""
    T = grad_y.shape[0]
    rows = max(1, ROWDOT_BLOCK // p.d_out)
    if T <= rows:  # one block (the usual case): no accumulator, three ops (host time counts on small layers)
        g = x.index_select(1, p.col)
        return (g if g.dtype == acc else g.to(acc)).mul_(grad_y if grad_y.dtype == acc else grad_y.to(acc)
                                                         ).sum(0).view(p.d_out, 1)
    out = torch.zeros(p.d_out, dtype=acc, device=x.device)
    for s in range(0, T, rows):
        g = x[s:s + rows].index_select(1, p.col).to(acc)
        out += g.mul_(grad_y[s:s + rows].to(acc)).sum(0)
    return out.view(p.d_out, 1)


def gather_matvec(x: torch.Tensor, idx, val: torch.Tensor) -> torch.Tensor:
    """``S(x)[t, i] = sum_j val[i, j] x[t, idx[i, j]]``; returns a [T, d_out] view (of a [d_out, T] tensor)."""
    p = as_pattern(idx, x.shape[-1])
    acc = acc_dtype(x, val)
    if x.shape[0] == 0:
        return torch.zeros(0, p.d_out, dtype=acc, device=x.device)
    return bag_rows(x.to(acc), p.col.view(p.d_out, p.k), val.to(acc).reshape(p.d_out, p.k)).t()


def bag_rows(x: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """``S(x)^T [d_out, T]`` for ``x [T, d_in]`` and ``idx``/``val [d_out, k]`` (one dtype): a row of
    ``x^T`` holds one input feature for every token, and each output row is a weighted bag of k of them."""
    return F.embedding_bag(idx, x.t().contiguous(), per_sample_weights=val, mode="sum")


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
