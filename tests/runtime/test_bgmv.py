"""Mixed-batch kernels: the stock-torch paths against the dense reference, and the Triton kernel under
the interpreter (in a child process, see bgmv_triton_cases.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from neuroada_format import NeuroAdaUsageError
from neuroada_format.runtime import kernels
from neuroada_format.runtime.kernels import bgmv
from neuroada_format.runtime.kernels.bgmv import AdapterStack, bgmv_add_, bgmv_add_cpu_, bgmv_reference

HERE = os.path.dirname(os.path.abspath(__file__))


def make_stack(gen, d_out=11, d_in=17, ks=(1, 4, 2), val_dtype=torch.float32):
    idxs = [rand_idx(d_out, d_in, k, gen) for k in ks]
    vals = [torch.randn(d_out, k, generator=gen).to(val_dtype) for k in ks]
    return AdapterStack(idxs, vals, d_in)


def rand_idx(d_out, d_in, k, gen):
    return torch.rand(d_out, d_in, generator=gen).topk(k, 1).indices.sort(1).values


def expected(y, x, ids, stack, seq_len):
    delta = bgmv_reference(x, ids, stack, seq_len=seq_len)
    return (y.to(delta.dtype) + delta).to(y.dtype)


def test_stack_pads_short_rows_with_zero_values(gen):
    st = make_stack(gen)
    assert st.idx.shape == st.val.shape == (3, 11, 4)
    assert torch.equal(st.idx[1], st.idxs[1]) and torch.equal(st.val[1], st.vals[1])
    assert torch.equal(st.idx[0, :, 1:], st.idxs[0][:, -1:].expand(11, 3))  # repeats a column it uses
    assert not st.val[0, :, 1:].any() and not st.val[2, :, 2:].any()
    with pytest.raises(NeuroAdaUsageError):
        AdapterStack([st.idxs[0]], [st.vals[1]], 17)


@pytest.mark.parametrize("k", [1, 3])
def test_adapters_sharing_positions_stack_them_once(gen, k):
    """Magnitude top-k adapters of one base share their positions: the stack holds one copy of them, seen by
    every slot, and serves exactly what a stack of n copies serves, on every path and in the static forms."""
    d_out, d_in = 11, 17
    idx = rand_idx(d_out, d_in, k, gen)
    idxs = [idx, idx.clone(), idx]
    st = AdapterStack(idxs, [torch.randn(d_out, k, generator=gen) for _ in idxs], d_in)
    assert st.idx.shape == (3, d_out, k) and st.idx.stride(0) == 0
    assert st.idx.untyped_storage().nbytes() == d_out * k * 8
    copies = AdapterStack(idxs, st.vals, d_in)
    copies._idx = st.idx.contiguous()  # what the stack held before: n copies
    W = torch.randn(d_out, d_in, generator=gen)
    # a decoding step of a shared K = 1 stack reads one [d_out] column index (bgmv_linear_cpu); the copies take
    # the per-sequence gather, and both must give the same bits below
    assert (st.shared_col() is not None) == (k == 1) and copies.shared_col() is None
    for seq_len in (1, 5):
        for ids in ([0, -1, 1, 2, 0, -1], [2, 2], [-1]):
            ids = torch.tensor(ids)
            T = len(ids) * seq_len
            x = torch.randn(T, d_in, generator=gen)
            y = torch.randn(T, d_out, generator=gen)
            for path in ("gather", "rows", "seqs", "bag", "grouped"):
                got = bgmv_add_cpu_(y.clone(), x, ids, st, seq_len=seq_len, path=path)
                assert torch.equal(got, bgmv_add_cpu_(y.clone(), x, ids, copies, seq_len=seq_len, path=path))
            mask = bgmv.SeqMask(ids)
            assert torch.equal(bgmv.bgmv_add_static(y, x, mask, st, seq_len=seq_len),
                               bgmv.bgmv_add_static(y, x, mask, copies, seq_len=seq_len))
            if k == 1:
                assert torch.equal(bgmv.bgmv_linear_cpu(x, W, None, ids, st, seq_len=seq_len),
                                   bgmv.bgmv_linear_cpu(x, W, None, ids, copies, seq_len=seq_len))
    before = st.idx.clone()
    idx[:, -1:] = d_in - 1 - idx[:, -1:]  # a later write into an adapter's idx does not reach a built stack
    assert torch.equal(st.idx, before)
    other = rand_idx(d_out, d_in, k, gen)
    assert AdapterStack([idx, other], [st.vals[0], st.vals[1]], d_in).idx.stride(0) == d_out * k  # not shared


@pytest.mark.parametrize("path", ["gather", "rows", "seqs", "bag", "grouped"])  # rows/bag: k=1/k>1 (else grouped)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seq_len", [1, 5])
@pytest.mark.parametrize("ks", [(1, 4, 2), (1, 1)])
@pytest.mark.parametrize("slices", [False, True])
def test_cpu_paths_match_reference(gen, monkeypatch, path, dtype, seq_len, ks, slices):
    monkeypatch.setattr(bgmv, "SLICE_ADD_MIN", 0 if slices else 1 << 30)  # per-sequence adds / index_add_
    st = make_stack(gen, ks=ks, val_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for ids in ([0, -1, 1, 1, 0, -1], [1, 1, 1], [-1, -1], [1], [0, 1]):
        ids = torch.tensor(ids)
        T = len(ids) * seq_len
        x = torch.randn(T, st.d_in, generator=gen).to(dtype)
        y = torch.randn(T, st.d_out, generator=gen).to(dtype)
        got = bgmv_add_cpu_(y.clone(), x, ids, st, seq_len=seq_len, path=path)
        want = expected(y, x, ids, st, seq_len)
        if dtype == torch.bfloat16:  # one rounding of a sum whose terms were added in another order
            torch.testing.assert_close(got, want, rtol=8e-3, atol=8e-3)
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        base = (ids.repeat_interleave(seq_len) < 0)
        assert torch.equal(got[base], y[base])  # base tokens untouched, bit for bit


def test_sibling_layers_share_the_sequences_transposes(rt, gen):
    """The long-sequence K > 1 path transposes each sequence's x once for the layers reading that x (q, k, v): a
    block's InputsT hands the second layer the first one's copies, an x changed in place gets new ones, and results
    are the unshared path's bits, at one thread (contiguous adds) as at two (strided ones)."""
    a, b = make_stack(gen, ks=(4, 2, 3)), make_stack(gen, ks=(2, 2, 5))
    assert a.d_in == b.d_in
    ids, seq_len = torch.tensor([2, 0, -1, 1]), 3
    x = torch.randn(ids.numel() * seq_len, a.d_in, generator=gen)
    ys = [torch.randn(x.shape[0], st.d_out, generator=gen) for st in (a, b)]
    shared = bgmv.InputsT()
    got = [bgmv_add_cpu_(y.clone(), x, ids, st, seq_len=seq_len, path="seqs", inputs_t=shared)
           for y, st in zip(ys, (a, b))]
    first = shared._last[3]
    assert bgmv_add_cpu_(ys[1].clone(), x, ids, b, seq_len=seq_len, path="seqs", inputs_t=shared) is not None
    assert shared._last[3] is first  # the same copies, again
    for n in (1, 2):
        with rt.threads(n):
            for g, y, st in zip(got, ys, (a, b)):
                assert torch.equal(g, bgmv_add_cpu_(y.clone(), x, ids, st, seq_len=seq_len, path="seqs"))
    for g, y, st in zip(got, ys, (a, b)):
        torch.testing.assert_close(g, expected(y, x, ids, st, seq_len), rtol=1e-6, atol=1e-6)
    x.mul_(2.0)
    again = bgmv_add_cpu_(ys[0].clone(), x, ids, a, seq_len=seq_len, path="seqs", inputs_t=shared)
    assert shared._last[3] is not first
    torch.testing.assert_close(again, expected(ys[0], x, ids, a, seq_len), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", [None, "gather", "rows", "seqs", "bag", "grouped"])
@pytest.mark.parametrize("ks", [(1, 4, 2), (1, 1, 1)])
def test_precomputed_groups_and_strided_tensors(gen, path, ks):
    st = make_stack(gen, ks=ks)
    ids = torch.tensor([2, 0, 2, -1])
    seq_len = 3
    x = torch.randn(12, 2 * st.d_in, generator=gen)[:, ::2]  # non-contiguous rows
    y_full = torch.randn(12, 2 * st.d_out, generator=gen)
    y = y_full[:, 1::2]
    want = expected(y, x, ids, st, seq_len)
    groups = bgmv.seq_groups(ids)
    assert [(slot, rows.tolist()) for slot, rows in groups] == [(0, [1]), (2, [0, 2])]
    assert bgmv.seq_groups(torch.tensor([1, 1])) == [(1, None)]
    got = bgmv_add_cpu_(y, x, ids, st, seq_len=seq_len, groups=groups, path=path)
    assert got is y
    torch.testing.assert_close(y_full[:, 1::2], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["gather", "rows", "seqs", "bag", "grouped"])
@pytest.mark.parametrize("ks", [(1, 4, 2), (1, 1, 1)])
def test_gradient_flows_to_inputs(gen, path, ks):
    st = make_stack(gen, ks=ks, val_dtype=torch.float64)
    ids = torch.tensor([1, -1, 0, 1])
    x = torch.randn(8, st.d_in, generator=gen, dtype=torch.float64)
    gy = torch.randn(8, st.d_out, generator=gen, dtype=torch.float64)
    grads = []
    for fn in ("cpu", "reference"):
        xx = x.clone().requires_grad_(True)
        y = xx @ torch.ones(st.d_in, st.d_out, dtype=torch.float64)  # a stand-in for the base layer
        if fn == "cpu":
            out = bgmv_add_cpu_(y, xx, ids, st, seq_len=2, path=path)
        else:
            out = y + bgmv_reference(xx, ids, st, seq_len=2)
        (gx,) = torch.autograd.grad(out, xx, gy)
        grads.append(gx)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seq_len", [1, 4])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_with_the_delta_written_first_matches_base_plus_reference(gen, seq_len, transposed, bias):
    st = make_stack(gen, ks=(1, 1, 1))
    W = torch.randn(st.d_out, st.d_in, generator=gen)
    stored = W.t().contiguous() if transposed else W  # Conv1D keeps [in, out]
    b = torch.randn(st.d_out, generator=gen) if bias else None
    for ids in ([0, -1, 2, 2, 1], [1, 1, 1], [-1, -1], [2]):
        ids = torch.tensor(ids)
        T = len(ids) * seq_len
        x = torch.randn(T, 2 * st.d_in, generator=gen)[:, ::2]  # strided rows are read as they are
        base = torch.nn.functional.linear(x, W, b)
        got = bgmv.bgmv_linear_cpu(x, stored, b, ids, st, seq_len=seq_len, transposed=transposed)
        torch.testing.assert_close(got, expected(base, x, ids, st, seq_len), rtol=1e-6, atol=1e-6)
        on_base = ids.repeat_interleave(seq_len) < 0
        torch.testing.assert_close(got[on_base], base[on_base], rtol=1e-6, atol=1e-6)
    with pytest.raises(NeuroAdaUsageError):  # K > 1 stacks keep bgmv_add_ on the base output
        bgmv.bgmv_linear_cpu(x, stored, b, ids, make_stack(gen), seq_len=seq_len)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seq_len", [1, 5])
@pytest.mark.parametrize("ks", [(1, 4, 2), (1, 1)])
def test_static_forms_give_the_eager_bits(gen, dtype, seq_len, ks):
    """What a compiled forward runs (every sequence computed, the base ones selected away by a mask) equals the eager
    gather path and the fused K = 1 GEMM bit for bit, whichever sequences use the base; y is not written."""
    st = make_stack(gen, ks=ks, val_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    W = torch.randn(st.d_out, st.d_in, generator=gen)
    b = torch.randn(st.d_out, generator=gen)
    for ids in ([0, -1, 1, 1, 0, -1], [1, 1, 1], [-1, -1], [1], [0, 1]):
        ids = torch.tensor(ids)
        T = len(ids) * seq_len
        x = torch.randn(T, 2 * st.d_in, generator=gen).to(dtype)[:, ::2]
        y = torch.randn(T, st.d_out, generator=gen).to(dtype)
        mask = bgmv.SeqMask(ids)
        want = bgmv_add_cpu_(y.clone(), x, ids, st, seq_len=seq_len, path="gather")
        y_before = y.clone()
        got = bgmv.bgmv_add_static(y, x, mask, st, seq_len=seq_len)
        assert torch.equal(y, y_before) and got.dtype == y.dtype and torch.equal(got, want), ids.tolist()
        if dtype == torch.float32 and st.k == 1:
            for transposed in (False, True):
                stored = W.t().contiguous() if transposed else W
                want = bgmv.bgmv_linear_cpu(x, stored, b, ids, st, seq_len=seq_len, transposed=transposed)
                got = bgmv.bgmv_linear_static(x, stored, b, mask, st, seq_len=seq_len, transposed=transposed)
                assert torch.equal(got, want), (ids.tolist(), transposed)


def test_dispatch_follows_backend(gen):
    st = make_stack(gen)
    ids = torch.tensor([0, 2, -1])
    x = torch.randn(6, st.d_in, generator=gen)
    y = torch.randn(6, st.d_out, generator=gen)
    want = expected(y, x, ids, st, 2)
    for backend in ("reference", "cpu", "auto"):
        with kernels.use_backend(backend):
            torch.testing.assert_close(bgmv_add_(y.clone(), x, ids, st, seq_len=2), want, rtol=1e-6, atol=1e-6)
    empty = torch.empty(0, st.d_in)
    assert bgmv_add_cpu_(torch.empty(0, st.d_out), empty, torch.empty(0, dtype=torch.int64), st).shape == (0, st.d_out)


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("NEUROADA_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-rs",
         os.path.join(HERE, "bgmv_triton_cases.py")],
        env=env, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(HERE)),
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("slices", [False, True])
def test_one_bag_for_all_sequences_gives_the_per_adapter_bits(gen, monkeypatch, dtype, slices):
    """The bag path (every sequence in one embedding_bag, the default for K > 1 on short sequences) sums each
    output in the order the per-adapter products did, so it serves their bits, with any number of adapters."""
    monkeypatch.setattr(bgmv, "SLICE_ADD_MIN", 0 if slices else 1 << 30)
    monkeypatch.setattr(bgmv, "GATHER_MAX", 0)  # the shapes of a real layer, in small
    st = make_stack(gen, d_out=13, d_in=29, ks=(3, 5, 1, 5), val_dtype=torch.bfloat16)
    for ids in ([0, 1, 2, 3, -1, 1, 3, 0], [3, 3, 3], [-1, 2], [1]):
        ids = torch.tensor(ids)
        seq_len = 6
        x = torch.randn(len(ids) * seq_len, st.d_in, generator=gen).to(dtype)
        y = torch.randn(len(ids) * seq_len, st.d_out, generator=gen).to(dtype)
        got = bgmv_add_cpu_(y.clone(), x, ids, st, seq_len=seq_len, path="bag")
        assert torch.equal(got, bgmv_add_cpu_(y.clone(), x, ids, st, seq_len=seq_len, path="grouped"))
        assert torch.equal(got, bgmv_add_cpu_(y.clone(), x, ids, st, seq_len=seq_len))  # the default path


def test_short_sequences_cost_one_product_whatever_the_number_of_adapters(gen, monkeypatch):
    """K > 1 on short sequences: one embedding_bag for the whole batch from two adapters present on (it was one per
    adapter present, each with its own gather and scatter: linear in the adapters)."""
    monkeypatch.setattr(bgmv, "GATHER_MAX", 0)
    calls = []
    real = torch.nn.functional.embedding_bag
    monkeypatch.setattr(torch.nn.functional, "embedding_bag", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    st = make_stack(gen, d_out=13, d_in=29, ks=(3, 5, 2, 5))
    for ids, n_calls in (([0, 1, 2, 3, 1, 0], 1), ([2, 2, 2], 1), ([1, -1, 3], 1)):
        ids = torch.tensor(ids)
        x = torch.randn(len(ids) * 4, st.d_in, generator=gen)
        y = torch.randn(len(ids) * 4, st.d_out, generator=gen)
        calls.clear()
        got = bgmv_add_cpu_(y.clone(), x, ids, st, seq_len=4)
        assert len(calls) == n_calls
        torch.testing.assert_close(got, expected(y, x, ids, st, 4), rtol=1e-6, atol=1e-6)
