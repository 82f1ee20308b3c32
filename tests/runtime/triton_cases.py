"""Triton kernels against the references. Not collected by the main run (name): it must execute in
a process where TRITON_INTERPRET=1 was set before the kernels were imported (test_triton_interpreter
does that), or on a CUDA machine: ``python -m pytest tests/runtime/triton_cases.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 set before import", allow_module_level=True)
tk = pytest.importorskip("neuroada_format.runtime.kernels.triton")
if not tk.AVAILABLE:
    pytest.skip("triton not installed", allow_module_level=True)

from neuroada_format import NeuroAdaUsageError  # noqa: E402
from neuroada_format.runtime import kernels  # noqa: E402
from neuroada_format.runtime.functional import Overlay, additive_sparse_delta, inplace_sparse_delta_linear  # noqa: E402
from neuroada_format.runtime.kernels import Pattern, reference  # noqa: E402

DEV = "cpu" if tk.INTERPRET else "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand_idx(d_out, d_in, k, gen):
    return torch.rand(d_out, d_in, generator=gen).topk(k, 1).indices.sort(1).values.to(DEV)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


def bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_rowdot(gen, dtype):
    T, d_out, d_in, k = 37, 19, 13, 3  # tails in every block dimension
    gy = torch.randn(T, 2 * d_out, generator=gen).to(dtype).to(DEV)[:, ::2]  # strided
    x = torch.randn(T, d_in, generator=gen).to(dtype).to(DEV)
    p = Pattern(rand_idx(d_out, d_in, k, gen), d_in)
    want = reference.sampled_rowdot(gy, x, p)
    # one program; several with tails; token spans with a short last span (37 = 16 + 16 + 5), more spans asked
    # for than there are tiles (capped at one per tile)
    for kw in ({}, {"block_r": 8, "block_t": 16}, {"block_r": 8, "block_t": 8, "token_spans": 3},
               {"block_t": 16, "token_spans": 100}):
        got = tk.sampled_rowdot(gy, x, p, **kw)
        assert got.dtype == torch.float32 and got.shape == (d_out, k)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the spans' partial sums are added in a fixed order: the same bits every time
    again = [tk.sampled_rowdot(gy, x, p, block_t=8, token_spans=3) for _ in range(2)]
    assert torch.equal(again[0], again[1])
    if DEV == "cpu":  # no SMs to fill under the interpreter
        assert tk._token_spans(1, 10_000, 32, x.device) == 1
    else:  # enough programs for every SM, never more spans than token tiles
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        assert tk._token_spans(2, 10_000, 32, x.device) * 2 >= sms
        assert tk._token_spans(1, 40, 32, x.device) == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_rowdot_dense_product(gen, dtype, monkeypatch):
    """The dense-product path (16-bit CUDA inputs by default) against the reference, in blocks of rows."""
    T, d_out, d_in, k = 37, 19, 13, 3
    gy = torch.randn(T, 2 * d_out, generator=gen).to(dtype).to(DEV)[:, ::2]  # strided
    x = torch.randn(T, d_in, generator=gen).to(dtype).to(DEV)
    p = Pattern(rand_idx(d_out, d_in, k, gen), d_in)
    want = reference.sampled_rowdot(gy, x, p)
    monkeypatch.setattr(tk, "DENSE_ROWDOT", True)
    for block in (tk.DENSE_BLOCK, 5 * d_in, 1):  # one block; 4 blocks with a tail; one row per block
        monkeypatch.setattr(tk, "DENSE_BLOCK", block)
        got = tk.sampled_rowdot(gy, x, p)
        assert got.dtype == torch.float32 and got.shape == (d_out, k)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the default path: the dense product for 16-bit CUDA inputs from k=2 on, the gather kernel at k=1
    monkeypatch.setattr(tk, "DENSE_ROWDOT", None)
    assert tk._dense_ok(gy, x, k) == (DEV == "cuda" and dtype != torch.float32)
    assert not tk._dense_ok(gy, x, 1)
    torch.testing.assert_close(tk.sampled_rowdot(gy, x, p), want, rtol=1e-5, atol=1e-5)
    p1 = Pattern(p.idx[:, :1].contiguous(), d_in)
    torch.testing.assert_close(tk.sampled_rowdot(gy, x, p1), reference.sampled_rowdot(gy, x, p1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_and_segment_reduce(gen, dtype):
    T, d_out, d_in, k = 21, 34, 9, 2
    idx = rand_idx(d_out, d_in - 1, 1, gen) + 1
    idx = torch.cat([torch.zeros_like(idx), idx], 1)  # column 0 in every row: a long CSC segment
    p = Pattern(idx, d_in)
    x = torch.randn(T, d_in, generator=gen).to(dtype).to(DEV)
    gy = torch.randn(T, d_out, generator=gen).to(dtype).to(DEV)
    val = torch.randn(d_out, k, generator=gen).to(dtype).to(DEV)
    tol = dict(rtol=1e-5, atol=1e-5)
    for kw in ({}, {"block_r": 8, "block_t": 8}):
        torch.testing.assert_close(tk.gather_matvec(x, p, val, **kw), reference.gather_matvec(x, p, val), **tol)
    torch.testing.assert_close(tk.gather_matvec_t(gy, p, val, block_e=8), reference.gather_matvec_t(gy, p, val),
                               **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_scatter_restore_bits(gen, dtype, transposed):
    d_out, d_in, k = 9, 11, 4
    Wc = torch.randn(d_out, d_in, generator=gen).to(dtype).to(DEV)
    W = Wc.t().contiguous() if transposed else Wc.clone()
    idx = rand_idx(d_out, d_in, k, gen)
    w0 = Wc.gather(1, idx)
    val = (torch.randn(d_out, k, generator=gen) * 1e-2).to(DEV)
    orig = W.clone()
    want = orig.clone()
    reference.scatter_(want, idx, w0, val, transposed=transposed)
    tk.scatter_(W, Pattern(idx, d_in, transposed=transposed), w0, val, transposed=transposed)
    assert torch.equal(bits(W), bits(want))  # RNE rounding done by torch, bits moved by the kernel
    tk.restore_(W, idx, w0, transposed=transposed)
    assert torch.equal(bits(W), bits(orig))


@pytest.mark.parametrize("mode", ["inplace", "additive"])
@pytest.mark.parametrize("d_out, d_in, k", [(12, 8, 2), (3, 40, 1)], ids=["x-kept", "columns-kept"])
def test_autograd_end_to_end(gen, mode, d_out, d_in, k):
    W = torch.randn(d_out, d_in, generator=gen).to(DEV)
    idx = rand_idx(d_out, d_in, k, gen)
    p = Pattern(idx, d_in)
    ov = Overlay([p], [W.gather(1, idx)])
    assert (ov.compact() is not None) == (d_in == 40)  # the second shape saves only the used columns (Overlay.compact)
    x = torch.randn(2, 5, d_in, generator=gen).to(DEV)
    val = torch.randn(d_out, k, generator=gen).to(DEV)
    out = {}
    for backend in ("reference", "triton"):
        xx = x.clone().requires_grad_(True)
        vv = val.clone().requires_grad_(True)
        with kernels.use_backend(backend):
            if mode == "inplace":
                y = inplace_sparse_delta_linear(xx, W, None, ov, [vv])
            else:
                y = torch.nn.functional.linear(xx, W) + additive_sparse_delta(xx, p, vv)
            y.square().sum().backward()
        out[backend] = (y.detach(), xx.grad, vv.grad)
    for a, b in zip(out["reference"], out["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_put_moves_the_version_like_any_in_place_write(gen):
    """merge() between a forward and its backward must be caught: the Triton store is a raw pointer write,
    so put_ bumps the weight's version by hand, as the torch paths do."""
    from neuroada_format import NeuroAdaError
    from neuroada_format.runtime.functional import merge_

    W = torch.randn(6, 10, generator=gen).to(DEV)
    idx = rand_idx(6, 10, 2, gen)
    ov = Overlay([Pattern(idx, 10)], [W.gather(1, idx)])
    v0 = W._version
    tk.put_(W, ov.flat, W.view(-1)[ov.flat] + 1)
    assert W._version > v0
    val = torch.zeros(6, 2, device=DEV, requires_grad=True)
    with kernels.use_backend("triton"):
        y = inplace_sparse_delta_linear(torch.randn(3, 10, generator=gen).to(DEV), W, None, ov, [val])
        merge_(W, ov, [val])
        with pytest.raises(NeuroAdaError, match="modified in place between forward and backward"):
            y.sum().backward()


def test_every_launch_uses_one_flat_grid_axis(gen, monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65,535 programs: a 128k-row head at k >= 129 runs one row per program and
    would not launch with row blocks on axis 1. Every kernel therefore launches on axis 0 alone and splits the
    program id itself; the results must still match the references with tails in both split dimensions."""
    grids = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            grids.append((self.fn.__name__ if hasattr(self.fn, "__name__") else str(self.fn), tuple(grid)))
            return self.fn[grid]

    for name in ("_store_bits_kernel", "_add_kernel", "_rowdot_kernel", "_gather_kernel", "_segment_kernel"):
        monkeypatch.setattr(tk, name, Recorder(getattr(tk, name)))
    T, d_out, d_in, k = 23, 21, 17, 3
    p = Pattern(rand_idx(d_out, d_in, k, gen), d_in)
    x = torch.randn(T, d_in, generator=gen).to(DEV)
    gy = torch.randn(T, d_out, generator=gen).to(DEV)
    val = torch.randn(d_out, k, generator=gen).to(DEV)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tk.gather_matvec(x, p, val, block_t=4, block_r=4), reference.gather_matvec(x, p, val),
                               **tol)
    torch.testing.assert_close(tk.gather_matvec_t(gy, p, val, block_t=4, block_e=2),
                               reference.gather_matvec_t(gy, p, val), **tol)
    torch.testing.assert_close(tk.sampled_rowdot(gy, x, p, block_r=4, block_t=4), reference.sampled_rowdot(gy, x, p),
                               **tol)
    W = torch.randn(d_out, d_in, generator=gen).to(DEV)
    tk.scatter_(W, p, W.gather(1, p.idx), val, block=8)
    assert len(grids) >= 5
    assert all(len(g) == 1 for _, g in grids), grids
    # the multi-axis launches have as many programs as before: (6 token tiles x 6 row blocks), (17 columns x 6 tiles)
    assert grids[0][1] == (36,) and grids[1][1] == (17 * 6,), grids


def test_flat_grid_takes_a_wide_head_and_names_the_limit():
    # a 256k-row vocabulary head at k = 256, 8192 tokens: one row per program, far past 65,535 row blocks
    assert tk.flat_grid(8192 // 16, 256_000) == (512 * 256_000,)
    with pytest.raises(NeuroAdaUsageError, match="grid limit"):
        tk.flat_grid(2**16, 2**16)
