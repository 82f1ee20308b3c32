"""Helpers shared by the runtime tests (exposed as the ``rt`` fixture: plain functions, no state)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is fastest and immune to other processes' load on the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rand_idx(d_out, d_in, k, gen=None, device="cpu"):
    """[d_out, k] strictly increasing distinct columns per row."""
    noise = torch.rand(d_out, d_in, generator=gen)
    return noise.topk(k, dim=1).indices.sort(dim=1).values.to(device)


def merged_canonical(W_canon, idx, val):
    """round_W(f32(W) + f32(val)) at the selected entries of a canonical [out, in] weight (dense copy)."""
    acc = torch.float64 if torch.float64 in (W_canon.dtype, val.dtype) else torch.float32
    out = W_canon.detach().clone()
    sel = W_canon.detach().gather(1, idx).to(acc) + val.detach().to(acc)
    out.scatter_(1, idx, sel.to(W_canon.dtype))
    return out


def masked_dense(x, W_canon, b, idx, val):
    """The mask-based formulation: the merged dense weight is trainable; its gradient is read at
    the selected positions. Returns (y, grad_fn) where grad_fn(gy) -> (grad_x, grad_val)."""
    Wm = merged_canonical(W_canon, idx, val).requires_grad_(True)
    xx = x.detach().clone().requires_grad_(True)
    y = F.linear(xx, Wm, None if b is None else b.detach())

    def grads(gy):
        gx, gW = torch.autograd.grad(y, (xx, Wm), gy)
        return gx, gW.gather(1, idx)

    return y.detach(), grads


def bits(t):
    """Integer view for bit-for-bit comparisons (NaN-safe)."""
    ity = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(ity)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@contextlib.contextmanager
def threads(n):
    """torch's intra-op thread count set to ``n`` inside the block, the previous one back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def rt():
    return SimpleNamespace(rand_idx=rand_idx, merged_canonical=merged_canonical, masked_dense=masked_dense,
                           bits=bits, same_bits=same_bits, threads=threads)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
