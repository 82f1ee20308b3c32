"""The efficient CPU kernels against the dense references, and the dispatch switches."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.runtime import kernels
from neuroada_format.runtime.kernels import Pattern, cpu, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("k", [1, 5])
def test_sampled_rowdot_matches_dense(rt, gen, dtype, k):
    T, d_out, d_in = 13, 11, 17
    gy = torch.randn(T, d_out, generator=gen).to(dtype)
    x = torch.randn(T, d_in, generator=gen).to(dtype)
    p = Pattern(rt.rand_idx(d_out, d_in, k, gen), d_in)
    got = cpu.sampled_rowdot(gy, x, p)
    want = reference.sampled_rowdot(gy, x, p)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a strided grad_y (e.g. a slice of a bigger buffer) gives the same numbers
    gy_wide = torch.randn(T, 2 * d_out, generator=gen).to(dtype)
    torch.testing.assert_close(cpu.sampled_rowdot(gy_wide[:, ::2], x, p),
                               reference.sampled_rowdot(gy_wide[:, ::2], x, p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [1, 11, 40, 1 << 20])  # a token per block .. all tokens in one
def test_sampled_rowdot_k1_token_blocks(rt, gen, monkeypatch, block):
    """The k=1 path reduces over blocks of tokens; every block size gives the dense answer."""
    monkeypatch.setattr(cpu, "ROWDOT_BLOCK", block)
    T, d_out, d_in = 19, 11, 17
    gy = torch.randn(T, d_out, generator=gen)
    x = torch.randn(T, d_in, generator=gen)
    p = Pattern(rt.rand_idx(d_out, d_in, 1, gen), d_in)
    torch.testing.assert_close(cpu.sampled_rowdot(gy, x, p), reference.sampled_rowdot(gy, x, p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_gather_matvec_and_transpose_match_dense(rt, gen, dtype):
    T, d_out, d_in, k = 9, 14, 10, 3
    x = torch.randn(T, d_in, generator=gen).to(dtype)
    gy = torch.randn(T, d_out, generator=gen).to(dtype)
    # column 0 is picked by every row (as outlier channels are under magnitude selection), others at random
    rest = rt.rand_idx(d_out, d_in - 1, k - 1, gen) + 1
    idx = torch.cat([torch.zeros(d_out, 1, dtype=torch.int64), rest], 1)
    p = Pattern(idx, d_in)
    val = torch.randn(d_out, k, generator=gen).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu.gather_matvec(x, p, val), reference.gather_matvec(x, p, val), **tol)
    torch.testing.assert_close(cpu.gather_matvec_t(gy, p, val), reference.gather_matvec_t(gy, p, val), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_scatter_restore_bit_exact(rt, gen, dtype, transposed):
    d_out, d_in, k = 8, 12, 4
    Wc = torch.randn(d_out, d_in, generator=gen).to(dtype)
    W = Wc.t().contiguous() if transposed else Wc.clone()
    idx = rt.rand_idx(d_out, d_in, k, gen)
    w0 = Wc.gather(1, idx)
    val = torch.randn(d_out, k, generator=gen) * 1e-2
    p = Pattern(idx, d_in, transposed=transposed)
    orig = W.clone()
    cpu.scatter_(W, p, w0, val, transposed=transposed)
    want = rt.merged_canonical(Wc, idx, val)
    assert rt.same_bits(W.t() if transposed else W, want)
    cpu.restore_(W, p, w0, transposed=transposed)
    assert rt.same_bits(W, orig)
    # reference agrees with the efficient path
    W2 = orig.clone()
    reference.scatter_(W2, idx, w0, val, transposed=transposed)
    assert rt.same_bits(W2.t() if transposed else W2, want)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4),
       st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=4, max_size=4))
def test_bf16_scatter_rounds_like_ml_dtypes(w_bits, vals):
    """The merge rule (f32 sum, one RNE rounding) equals numpy/ml_dtypes on arbitrary bf16 patterns."""
    w_np = np.array(w_bits, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(1, 4)
    v_np = np.array(vals, dtype=np.float32).reshape(1, 4)
    W = torch.from_numpy(w_np.view(np.int16).copy()).view(torch.bfloat16)
    idx = torch.arange(4).view(1, 4)
    cpu.scatter_(W, idx, W.clone(), torch.from_numpy(v_np))
    want = (w_np.astype(np.float32) + v_np).astype(ml_dtypes.bfloat16)
    got = W.view(torch.int16).numpy().view(np.uint16)
    w = want.view(np.uint16)
    nan = np.isnan(want.astype(np.float32))
    assert np.array_equal(got[~nan], w[~nan]) and np.isnan(W.float().numpy()[nan]).all()


@pytest.mark.parametrize("w0_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("val_dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", [((40,), (40,)), ((), (40,)), ((40,), ())])
def test_rounded_values_one_addition_in_the_accumulation_dtype(gen, w0_dtype, val_dtype, shapes):
    """The merge rule, whichever operand type promotion would widen (zero-dim operands included, which do not
    decide a result's dtype), against converting both operands first."""
    w0 = (torch.randn(shapes[0], generator=gen, dtype=torch.float64) * 3).to(w0_dtype)
    val = (torch.randn(shapes[1], generator=gen, dtype=torch.float64) * 0.01).to(val_dtype)
    acc = torch.float64 if torch.float64 in (w0_dtype, val_dtype) else torch.float32
    for out in (w0_dtype, torch.float32, torch.bfloat16):
        got = reference.rounded_values(w0, val, out)
        want = (w0.to(acc) + val.to(acc)).to(out)
        assert got.dtype == out and torch.equal(got, want)


def test_pattern_validation_and_layouts(rt, gen):
    with pytest.raises(NeuroAdaError, match="strictly increasing"):
        Pattern(torch.tensor([[1, 1]]), 4)
    with pytest.raises(NeuroAdaError, match="strictly increasing"):
        Pattern(torch.tensor([[2, 1]]), 4)
    with pytest.raises(NeuroAdaError, match="outside"):
        Pattern(torch.tensor([[0, 4]]), 4)
    with pytest.raises(NeuroAdaError):
        Pattern(torch.tensor([[0, 1]], dtype=torch.int32), 4)
    idx = torch.tensor([[0, 2], [1, 3], [0, 3]])
    p = Pattern(idx, 4)
    assert p.flat.tolist() == [0, 2, 5, 7, 8, 11]
    pt = Pattern(idx, 4, transposed=True)  # stored [4, 3]
    assert pt.flat.tolist() == [0, 6, 4, 10, 2, 11]
    colptr, rows, perm = p.csc
    assert colptr.tolist() == [0, 2, 3, 4, 6]
    assert rows.tolist() == [0, 2, 1, 0, 1, 2] and perm.tolist() == [0, 4, 2, 1, 3, 5]
    assert p.is_current(idx) and not p.is_current(idx.clone())
    idx.add_(0)
    assert not p.is_current(idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_operators_pass_opcheck_and_match_the_kernels(rt, gen, dtype):
    """The operators torch.compile sees in place of the k > 1 kernels (neuroada::sampled_rowdot,
    neuroada::gather_matvec_t): their schemas, fake implementations (shape, dtype, strides) and results pass torch's
    own operator checks, and they return exactly what the eager dispatch does."""
    T, d_out, d_in, k = 9, 14, 10, 3
    idx = rt.rand_idx(d_out, d_in, k, gen)
    gy = torch.randn(T, d_out, generator=gen).to(dtype)
    x = torch.randn(T, d_in, generator=gen).to(dtype)
    val = torch.randn(d_out, k, generator=gen).to(dtype)
    torch.library.opcheck(kernels._sampled_rowdot_op, (gy, x, idx))
    torch.library.opcheck(kernels._gather_matvec_t_op, (gy, idx, val, d_in))
    p = Pattern(idx, d_in)
    assert torch.equal(kernels._sampled_rowdot_op(gy, x, idx), kernels.sampled_rowdot(gy, x, p))
    assert torch.equal(kernels._gather_matvec_t_op(gy, idx, val, d_in), kernels.gather_matvec_t(gy, p, val))


def test_empty_token_batch(rt, gen):
    p = Pattern(rt.rand_idx(5, 6, 2, gen), 6)
    assert cpu.sampled_rowdot(torch.zeros(0, 5), torch.zeros(0, 6), p).abs().sum() == 0
    assert cpu.gather_matvec(torch.zeros(0, 6), p, torch.ones(5, 2)).shape == (0, 5)
    assert cpu.gather_matvec_t(torch.zeros(0, 5), p, torch.ones(5, 2)).shape == (0, 6)


def test_dispatch_switches(monkeypatch, rt, gen):
    x = torch.randn(3, 6, generator=gen)
    assert kernels._impl(x) is cpu
    with kernels.use_backend("reference"):
        assert kernels._impl(x) is reference
    assert kernels._impl(x) is cpu
    monkeypatch.setenv("NEUROADA_KERNELS", "reference")
    assert kernels._impl(x) is reference
    monkeypatch.setenv("NEUROADA_KERNELS", "nonsense")
    with pytest.raises(NeuroAdaUsageError):
        kernels.get_backend()
    with pytest.raises(NeuroAdaUsageError):
        kernels.set_backend("nonsense")


def test_triton_module_imports_without_gpu(rt, gen):
    """Importable anywhere; on CPU tensors without the interpreter it says what to do instead of crashing."""
    import os

    tk = pytest.importorskip("neuroada_format.runtime.kernels.triton")
    if tk.INTERPRET or torch.cuda.is_available() or not tk.AVAILABLE:
        pytest.skip("only meaningful on a CPU-only machine without TRITON_INTERPRET")
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    p = Pattern(rt.rand_idx(4, 5, 2, gen), 5)
    with pytest.raises(NeuroAdaUsageError, match="TRITON_INTERPRET"):
        tk.sampled_rowdot(torch.zeros(3, 4), torch.zeros(3, 5), p)
    with kernels.use_backend("triton"), pytest.raises(NeuroAdaUsageError, match="TRITON_INTERPRET"):
        kernels.gather_matvec(torch.zeros(3, 5), p, torch.zeros(4, 2))
