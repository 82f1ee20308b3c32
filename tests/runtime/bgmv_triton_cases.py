"""The Triton bgmv kernel against the dense reference. Not collected by the main run (name): it needs
TRITON_INTERPRET=1 set before the kernel is first decorated (test_bgmv.py runs it in a child process),
or a CUDA machine: ``python -m pytest tests/runtime/bgmv_triton_cases.py``. Shapes are tiny because
each interpreted program costs tens of milliseconds.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 set before import", allow_module_level=True)

from neuroada_format.runtime import kernels  # noqa: E402
from neuroada_format.runtime.kernels import bgmv  # noqa: E402

if not bgmv.triton_available():
    pytest.skip("triton not installed", allow_module_level=True)

DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(11)


def stack(gen, d_out=10, d_in=13, ks=(1, 3, 2)):
    idxs = [torch.rand(d_out, d_in, generator=gen).topk(k, 1).indices.sort(1).values.to(DEV) for k in ks]
    vals = [torch.randn(d_out, k, generator=gen).to(DEV) for k in ks]
    return bgmv.AdapterStack(idxs, vals, d_in)


def bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq_len", [1, 3])
def test_kernel_matches_reference(gen, dtype, seq_len):
    st = stack(gen)
    ids = torch.tensor([0, -1, 2, 1], device=DEV)
    T = 4 * seq_len
    x = torch.randn(T, 2 * st.d_in, generator=gen).to(dtype).to(DEV)[:, ::2]  # strided columns
    y = torch.randn(T, st.d_out, generator=gen).to(dtype).to(DEV)
    delta = bgmv.bgmv_reference(x, ids, st, seq_len=seq_len)
    want = (y.float() + delta).to(dtype)  # one rounding, by torch
    # one program per row block, then several blocks with tails in rows and tokens
    for kw in ({}, {"block_r": 4, "block_t": 2}):
        got = bgmv.bgmv_add_triton_(y.clone(), x, ids, st, seq_len=seq_len, **kw)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:  # the kernel's f32 sum can differ from torch's in the last bit before rounding
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
        base = torch.arange(T, device=DEV) // seq_len == 1
        assert torch.equal(bits(got[base]), bits(y[base]))


def test_stack_sharing_positions(gen):
    """Adapters with one set of positions stack it once (a stride-0 slot axis): the kernel reads it by stride."""
    idx = torch.rand(10, 13, generator=gen).topk(3, 1).indices.sort(1).values.to(DEV)
    st = bgmv.AdapterStack([idx, idx.clone()], [torch.randn(10, 3, generator=gen).to(DEV) for _ in range(2)], 13)
    assert st.idx.stride(0) == 0
    ids = torch.tensor([1, -1, 0], device=DEV)
    x = torch.randn(6, 13, generator=gen).to(DEV)
    y = torch.randn(6, 10, generator=gen).to(DEV)
    want = (y + bgmv.bgmv_reference(x, ids, st, seq_len=2)).float()
    got = bgmv.bgmv_add_triton_(y.clone(), x, ids, st, seq_len=2, block_r=4, block_t=2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_noncontiguous_output_and_dispatch(gen):
    st = stack(gen)
    ids = torch.tensor([2, 2, 0], device=DEV)
    x = torch.randn(6, st.d_in, generator=gen).to(DEV)
    y_full = torch.randn(6, 2 * st.d_out, generator=gen).to(DEV)
    y = y_full[:, ::2]  # the kernel writes an f32 buffer, torch copies it back
    want = y + bgmv.bgmv_reference(x, ids, st, seq_len=2)
    with kernels.use_backend("triton"):
        got = bgmv.bgmv_add_(y, x, ids, st, seq_len=2)
    assert got is y
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


def test_launch_uses_one_flat_grid_axis(gen, monkeypatch):
    """(sequence, row block, token tile) comes from axis 0 alone: axis 1 would cap a launch at 65,535 row blocks
    (a wide head at K >= 2048 runs one row per program). Tails in all three split dimensions still match."""
    grids = []
    real = bgmv._jit

    class Recorder:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return real[grid]

    monkeypatch.setattr(bgmv, "_jit", Recorder())
    st = stack(gen, d_out=11)
    ids = torch.tensor([1, -1, 2], device=DEV)
    x = torch.randn(15, st.d_in, generator=gen).to(DEV)
    y = torch.randn(15, st.d_out, generator=gen).to(DEV)
    want = y + bgmv.bgmv_reference(x, ids, st, seq_len=5)
    got = bgmv.bgmv_add_triton_(y.clone(), x, ids, st, seq_len=5, block_r=4, block_t=2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert grids == [(3 * 3 * 3,)]  # 3 sequences x 3 row blocks x 3 token tiles
