"""Autograd functions: gradcheck, agreement with the mask-based formulation, bit-identity with the
merged model, layouts, recomputation and autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from neuroada_format import NeuroAdaError
from neuroada_format.runtime import functional, kernels
from neuroada_format.runtime.functional import (
    Overlay,
    additive_sparse_delta,
    inplace_sparse_delta_linear,
)
from neuroada_format.runtime.kernels import Pattern


def setup(rt, gen, d_out=7, d_in=6, k=2, dtype=torch.float64, transposed=False, n_adapters=1):
    Wc = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64).to(dtype)
    W = (Wc.t().contiguous() if transposed else Wc.clone()).requires_grad_(False)
    pats, w0s, vals = [], [], []
    for _ in range(n_adapters):
        idx = rt.rand_idx(d_out, d_in, k, gen)
        pats.append(Pattern(idx, d_in, transposed=transposed))
        w0s.append(Wc.gather(1, idx))
        vals.append((torch.randn(d_out, k, generator=gen, dtype=torch.float64) * 0.1)
                    .to(dtype if dtype == torch.float64 else torch.float32).requires_grad_(True))
    return Wc, W, Overlay(pats, w0s), vals


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("transposed", [False, True])
def test_gradcheck_inplace(rt, gen, backend, transposed):
    Wc, W, ov, vals = setup(rt, gen, transposed=transposed, n_adapters=2)  # 2 adapters: overlaps likely
    b = torch.randn(7, dtype=torch.float64, generator=gen).requires_grad_(True)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen).requires_grad_(True)
    before = W.clone()
    with kernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, b, v1, v2: inplace_sparse_delta_linear(x, W, b, ov, [v1, v2]),
                                        (x, b, *vals))
    assert torch.equal(W, before)


def saved_widths(fn):
    """Run fn() and return the last dim of every tensor autograd saved for backward."""
    widths = []

    def pack(t):
        widths.append(t.shape[-1] if t.dim() else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return widths


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("transposed", [False, True])
def test_few_columns_keep_only_those_for_backward(rt, gen, backend, transposed):
    """A layer whose adapters read at most a third of the input columns (k=1 on a wide input, like a Llama
    down_proj) keeps x[:, those columns] for grad_val instead of x; gradients are unchanged."""
    d_out, d_in = 3, 40  # at most 12 columns of 40 in use
    Wc, W, ov, vals = setup(rt, gen, d_out, d_in, k=2, transposed=transposed, n_adapters=2)
    cols, pats = ov.compact()
    assert torch.equal(cols, torch.unique(torch.cat([p.idx.reshape(-1) for p in ov.patterns])))
    for p, q in zip(ov.patterns, pats):
        assert torch.equal(cols[q.idx], p.idx) and q.d_in == cols.numel()
    b = torch.randn(d_out, dtype=torch.float64, generator=gen).requires_grad_(True)
    x = torch.randn(2, 4, d_in, dtype=torch.float64, generator=gen).requires_grad_(True)
    with kernels.use_backend(backend):
        widths = saved_widths(lambda: inplace_sparse_delta_linear(x, W, b, ov, vals))
        assert cols.numel() in widths and d_in not in widths  # only the used columns were kept
        assert torch.autograd.gradcheck(lambda x, b, v1, v2: inplace_sparse_delta_linear(x, W, b, ov, [v1, v2]),
                                        (x, b, *vals))
    # against the mask-based formulation, one adapter, f32
    Wc, W, ov, vals = setup(rt, gen, d_out, d_in, k=1, dtype=torch.float32, transposed=transposed)
    assert ov.compact() is not None
    x = torch.randn(5, d_in, generator=gen).requires_grad_(True)
    y = inplace_sparse_delta_linear(x, W, None, ov, vals)
    y_ref, grads = rt.masked_dense(x, Wc, None, ov.patterns[0].idx, vals[0])
    gy = torch.randn(y.shape, generator=gen)
    gx, gv = torch.autograd.grad(y, (x, vals[0]), gy)
    gx_ref, gv_ref = grads(gy)
    if not transposed:  # the reference runs the canonical layout's GEMM
        assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gv, gv_ref, rtol=1e-5, atol=1e-5)


def test_many_columns_keep_x_itself(rt, gen):
    # siblings (q, k, v) share one saved x; a compact copy each would cost more than that x
    Wc, W, ov, vals = setup(rt, gen, d_out=12, d_in=12, k=1)
    assert ov.compact() is None
    x = torch.randn(5, 12, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert 12 in saved_widths(lambda: inplace_sparse_delta_linear(x, W, None, ov, vals))
    frozen = [v.detach() for v in vals]  # nothing to train: no x kept at all
    x2 = torch.randn(5, 12, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert 12 not in saved_widths(lambda: inplace_sparse_delta_linear(x2, W, None, ov, frozen))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_additive(rt, gen, backend):
    Wc, W, ov, vals = setup(rt, gen, k=3)
    p = ov.patterns[0]
    x = torch.randn(5, 6, dtype=torch.float64, generator=gen).requires_grad_(True)
    with kernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, v: additive_sparse_delta(x, p, v), (x, vals[0]))


@pytest.mark.parametrize("mode", ["inplace", "additive"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(10,), (2, 5)])
def test_matches_mask_based(rt, gen, mode, bias, shape):
    d_out, d_in, k = 12, 9, 3
    Wc, W, ov, vals = setup(rt, gen, d_out, d_in, k, dtype=torch.float32)
    b = torch.randn(d_out, generator=gen) if bias else None
    x = torch.randn(*shape, d_in, generator=gen).requires_grad_(True)
    if mode == "inplace":
        y = inplace_sparse_delta_linear(x, W, b, ov, vals)
    else:
        y = F.linear(x, W, b) + additive_sparse_delta(x, ov.patterns[0], vals[0])
    y_ref, grads = rt.masked_dense(x, Wc, b, ov.patterns[0].idx, vals[0])
    gy = torch.randn(y.shape, generator=gen)
    gx, gv = torch.autograd.grad(y, (x, vals[0]), gy)
    gx_ref, gv_ref = grads(gy)
    if mode == "inplace":  # the same GEMMs as the merged model: identical bits
        assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gv, gv_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("val_dtype", [torch.float32, torch.bfloat16])
def test_inplace_forward_bit_identical_to_merged(rt, gen, dtype, val_dtype):
    d_out, d_in, k = 16, 24, 4
    Wc, W, ov, vals = setup(rt, gen, d_out, d_in, k, dtype=dtype)
    val = vals[0].detach().to(val_dtype).requires_grad_(True)
    b = torch.randn(d_out, generator=gen).to(dtype)
    x = torch.randn(3, 5, d_in, generator=gen).to(dtype).requires_grad_(True)
    y = inplace_sparse_delta_linear(x, W, b, ov, [val])
    Wm = rt.merged_canonical(Wc, ov.patterns[0].idx, val)
    assert torch.equal(y, F.linear(x, Wm, b))
    assert torch.equal(W, Wc)  # restored, bit for bit
    y.sum().backward()
    assert val.grad.dtype == val_dtype and x.grad.dtype == dtype
    assert torch.equal(x.grad, torch.ones_like(y) @ Wm)


def test_cpu_writes_go_parallel_only_when_large_and_threads_allow(rt):
    """numpy (one thread, least host time) unless the write is large enough for index_put_ to split it and torch has
    more than one thread; other devices always take index_put_."""
    big, small = functional.PARALLEL_WRITE_MIN, functional.PARALLEL_WRITE_MIN - 1
    W = torch.zeros(2, 2)
    with rt.threads(2):
        assert not functional._numpy_writes(W, big) and functional._numpy_writes(W, small)
    with rt.threads(1):
        assert functional._numpy_writes(W, big) and functional._numpy_writes(W, small)
    assert not functional._numpy_writes(torch.zeros(2, 2, device="meta"), small)


def test_a_write_large_enough_for_threads_keeps_merged_outputs_and_restores_the_weight(rt, gen):
    """The path a k=20 gate/up projection takes at 2 threads (index_put_ on CPU), end to end."""
    d_out, d_in = 2048, 40
    k = functional.PARALLEL_WRITE_MIN // d_out
    Wc, W, ov, vals = setup(rt, gen, d_out, d_in, k, dtype=torch.float32)
    x = torch.randn(3, d_in, generator=gen).requires_grad_(True)
    with rt.threads(2):
        assert not functional._numpy_writes(W, ov.flat.numel())
        y = inplace_sparse_delta_linear(x, W, None, ov, vals)
        y.sum().backward()
        Wm = rt.merged_canonical(Wc, ov.patterns[0].idx, vals[0])
        want_y, want_gx = F.linear(x, Wm), torch.ones_like(y) @ Wm  # (a GEMM's bits depend on the thread count)
    assert torch.equal(rt.bits(W), rt.bits(Wc))
    assert torch.equal(y, want_y) and torch.equal(x.grad, want_gx)


def test_backward_reads_the_kept_merged_entries_only_if_no_later_forward_rewrote_them(rt, gen):
    """The forward hands its merged entries to its backward in one buffer per overlay (no fresh tensor per layer and
    step). A second forward with other deltas before the first backward (a quantization grid's snap of a changed
    value is a new tensor, which autograd does not guard) rewrites it: the first backward then recomputes its own."""
    d_out, d_in, k = 16, 24, 3
    Wc, W, ov, vals = setup(rt, gen, d_out, d_in, k, dtype=torch.float32)
    other = (vals[0].detach() + 0.5).requires_grad_(True)
    x = torch.randn(5, d_in, generator=gen).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y1 = inplace_sparse_delta_linear(x, W, None, ov, vals)
    buf = ov._kept
    y2 = inplace_sparse_delta_linear(x2, W, None, ov, [other])
    assert ov._kept is buf  # the same buffer, now holding the second forward's entries
    y1.sum().backward()
    y2.sum().backward()
    g = torch.ones(5, d_out)
    assert torch.equal(x.grad, g @ rt.merged_canonical(Wc, ov.patterns[0].idx, vals[0]))
    assert torch.equal(x2.grad, g @ rt.merged_canonical(Wc, ov.patterns[0].idx, other))
    y3 = inplace_sparse_delta_linear(x, W, None, ov, vals)  # a later step: the same buffer again
    y3.sum().backward()
    assert ov._kept is buf and torch.equal(rt.bits(W), rt.bits(Wc))
    _, W2, ov2, vals2 = setup(rt, gen, d_out, d_in, k, dtype=torch.float32)
    inplace_sparse_delta_linear(x.detach(), W2, None, ov2, vals2).sum().backward()
    assert ov2._kept is None  # x needs no gradient: backward never runs the product through W' again


@pytest.mark.parametrize("writes", ["numpy", "index_put_"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float64])
def test_training_writes_move_bits_and_always_put_them_back(rt, gen, monkeypatch, writes, wdtype):
    """The writes of the training forward and backward: numpy on CPU, index_put_ on other devices (forced here on
    CPU). Merged bits inside, the base's own bits after (a -0.0 and a NaN with a payload among the selected
    entries), also when the product raises; gradients as the merged model's."""
    if writes == "index_put_":
        monkeypatch.setattr(functional, "_numpy_writes", lambda W, entries: False)
    d_out, d_in, k = 16, 24, 3
    Wc = torch.randn(d_out, d_in, generator=gen).to(wdtype)
    idx = rt.rand_idx(d_out, d_in, k, gen)
    Wc[0, idx[0, 0]] = -0.0
    nan = rt.bits(Wc)[1]
    nan[idx[1, 1]] = rt.bits(torch.tensor(float("nan"), dtype=wdtype)) + 3  # a NaN other than the default one
    W = Wc.clone()
    ov = Overlay([Pattern(idx, d_in)], [rt.bits(Wc).gather(1, idx).view(wdtype)])  # (a bf16 gather drops NaN payloads)
    val = (torch.randn(d_out, k, generator=gen) * 0.1).to(torch.float64 if wdtype == torch.float64 else
                                                           torch.float32).requires_grad_(True)
    x = torch.randn(5, d_in, generator=gen).to(wdtype).requires_grad_(True)
    y = inplace_sparse_delta_linear(x, W, None, ov, [val])
    Wm = rt.merged_canonical(Wc, idx, val)
    assert torch.equal(rt.bits(W), rt.bits(Wc))
    assert torch.equal(y.nan_to_num(7.0), F.linear(x, Wm).nan_to_num(7.0))  # the NaN entry gives a NaN column
    y.sum().backward()
    assert torch.equal(rt.bits(W), rt.bits(Wc))
    g = torch.ones_like(y)
    assert torch.equal(x.grad.nan_to_num(7.0), (g @ Wm).nan_to_num(7.0))
    ref = kernels.reference.sampled_rowdot(g, x.detach(), idx).to(val.dtype)
    assert torch.allclose(val.grad, ref, rtol=1e-5, atol=1e-6)
    inside = []

    def failing_product(x, W, b, transposed):  # the product fails while the merged entries are written
        inside.append(torch.equal(W.nan_to_num(7.0), Wm.nan_to_num(7.0)))
        raise RuntimeError("out of memory")

    monkeypatch.setattr(functional, "_linear", failing_product)
    with pytest.raises(RuntimeError, match="out of memory"):
        inplace_sparse_delta_linear(x, W, None, ov, [val])
    assert inside == [True] and torch.equal(rt.bits(W), rt.bits(Wc))


def test_conv1d_layout(rt, gen):
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    d_out, d_in, k = 10, 6, 2
    conv = Conv1D(d_out, d_in)
    with torch.no_grad():
        conv.bias.normal_(generator=gen)
    conv.requires_grad_(False)
    Wc = conv.weight.t()
    idx = rt.rand_idx(d_out, d_in, k, gen)
    ov = Overlay([Pattern(idx, d_in, transposed=True)], [Wc.gather(1, idx)])
    val = (torch.randn(d_out, k, generator=gen) * 0.1).requires_grad_(True)
    x = torch.randn(2, 4, d_in, generator=gen).requires_grad_(True)
    y = inplace_sparse_delta_linear(x, conv.weight, conv.bias, ov, [val])
    merged = Conv1D(d_out, d_in)
    with torch.no_grad():
        merged.weight.copy_(rt.merged_canonical(Wc, idx, val).t())
        merged.bias.copy_(conv.bias)
    assert torch.equal(y, merged(x))
    y_ref, grads = rt.masked_dense(x, Wc, conv.bias, idx, val)
    gy = torch.randn(y.shape, generator=gen)
    gx, gv = torch.autograd.grad(y, (x, val), gy)
    gx_ref, gv_ref = grads(gy)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gv, gv_ref, rtol=1e-5, atol=1e-5)


def test_bias_gradient(rt, gen):
    Wc, W, ov, vals = setup(rt, gen, dtype=torch.float32)
    b = torch.randn(7, generator=gen).requires_grad_(True)
    x = torch.randn(4, 6, generator=gen)
    gy = torch.randn(4, 7, generator=gen)
    (gb,) = torch.autograd.grad(inplace_sparse_delta_linear(x, W, b, ov, vals), (b,), gy)
    torch.testing.assert_close(gb, gy.sum(0))


def test_weight_version_untouched_and_other_graphs_stay_valid(rt, gen):
    """A tied weight used elsewhere keeps a valid saved copy: we never bump its version counter."""
    Wc, W, ov, vals = setup(rt, gen, dtype=torch.float32)
    v0 = W._version
    z_in = torch.randn(3, 6, generator=gen).requires_grad_(True)
    z = z_in @ W.t()  # saves W for backward
    x = torch.randn(3, 6, generator=gen).requires_grad_(True)
    y = inplace_sparse_delta_linear(x, W, None, ov, vals)
    (y.sum() + z.sum()).backward()
    assert W._version == v0
    torch.testing.assert_close(z_in.grad, torch.ones(3, 7) @ Wc)


def test_refuses_trainable_weight(rt, gen):
    Wc, W, ov, vals = setup(rt, gen, dtype=torch.float32)
    with pytest.raises(NeuroAdaError, match="frozen"):
        inplace_sparse_delta_linear(torch.randn(2, 6), W.requires_grad_(True), None, ov, vals)


@pytest.mark.parametrize("mode", ["inplace", "additive"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_grads(rt, gen, mode, reentrant):
    d, k = 8, 2
    Wc1, W1, ov1, v1 = setup(rt, gen, d, d, k, dtype=torch.float32)
    Wc2, W2, ov2, v2 = setup(rt, gen, d, d, k, dtype=torch.float32)
    params = v1 + v2

    def layer(x, W, ov, vals):
        if mode == "inplace":
            return inplace_sparse_delta_linear(x, W, None, ov, vals)
        return F.linear(x, W) + additive_sparse_delta(x, ov.patterns[0], vals[0])

    def block(x):
        return layer(torch.tanh(layer(x, W1, ov1, v1)), W2, ov2, v2)

    x = torch.randn(2, 3, d, generator=gen).requires_grad_(True)

    def grads(fn):  # .backward(), not autograd.grad: reentrant checkpointing only supports the former
        for t in [x] + params:
            t.grad = None
        fn(x).square().sum().backward()
        return [t.grad.clone() for t in [x] + params]

    plain = grads(block)
    ck = grads(lambda x: checkpoint(block, x, use_reentrant=reentrant))
    for a, b in zip(plain, ck):
        assert torch.equal(a, b)
    assert torch.equal(W1, Wc1) and torch.equal(W2, Wc2)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bf16_autocast_cpu(rt, gen, base_dtype):
    """Under autocast the GEMM runs in bf16: the written entry must be what autocast makes of the
    merged weight (round to the base dtype, then to bf16), and grads stay close to f32 ones."""
    d_out, d_in, k = 32, 48, 4
    Wc, W, ov, vals = setup(rt, gen, d_out, d_in, k, dtype=base_dtype)
    with torch.no_grad():
        vals[0].mul_(10)
    b = torch.randn(d_out, generator=gen).to(base_dtype)
    x = torch.randn(4, 8, d_in, generator=gen).requires_grad_(True)
    Wm = rt.merged_canonical(Wc, ov.patterns[0].idx, vals[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = inplace_sparse_delta_linear(x, W, b, ov, vals)
        y_merged = F.linear(x, Wm, b)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_merged)
    assert torch.equal(W, Wc)
    gy = torch.randn(y.shape, generator=gen)
    gx, gv = torch.autograd.grad(y, (x, vals[0]), gy.to(y.dtype))
    assert gx.dtype == torch.float32 and gv.dtype == torch.float32
    # f32 truth (same merged weight, full precision)
    y32, grads = rt.masked_dense(x, Wm.float(), b.float(), ov.patterns[0].idx, torch.zeros_like(vals[0]))
    gx32, gv32 = grads(gy)
    assert (gx - gx32).norm() / gx32.norm() < 2e-2
    assert (gv - gv32).norm() / gv32.norm() < 2e-2


def test_autocast_additive(rt, gen):
    Wc, W, ov, vals = setup(rt, gen, 16, 12, 3, dtype=torch.float32)
    x = torch.randn(6, 12, generator=gen).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = F.linear(x, W)
        y = base + additive_sparse_delta(x, ov.patterns[0], vals[0], out_dtype=base.dtype)
    assert y.dtype == torch.bfloat16
    gv = torch.autograd.grad(y.float().sum(), vals[0])[0]
    y32, grads = rt.masked_dense(x, Wc, None, ov.patterns[0].idx, vals[0])
    gv32 = grads(torch.ones_like(y32))[1]
    assert (gv - gv32).norm() / gv32.norm() < 2e-2


def test_overlapping_adapters_sum_in_f32_round_once(rt, gen):
    d_out, d_in = 4, 5
    Wc = torch.randn(d_out, d_in, generator=gen).bfloat16()
    idx_a = torch.tensor([[0, 1], [1, 2], [0, 4], [2, 3]])
    idx_b = torch.tensor([[1, 3], [1, 2], [3, 4], [0, 1]])
    va, vb = torch.randn(d_out, 2, generator=gen) * 0.01, torch.randn(d_out, 2, generator=gen) * 0.01
    ov = Overlay([Pattern(idx_a, d_in), Pattern(idx_b, d_in)], [Wc.gather(1, idx_a), Wc.gather(1, idx_b)])
    W = Wc.clone()
    ov.apply_(W, [va, vb])
    want = Wc.float().scatter_add(1, idx_a, va).scatter_add(1, idx_b, vb).bfloat16()
    assert torch.equal(W, want)
    ov.restore_(W)
    assert torch.equal(W, Wc)


def test_weight_changed_between_forward_and_backward_is_refused(rt, gen):
    Wc, W, ov, vals = setup(rt, gen, dtype=torch.float32)
    x = torch.randn(3, 6, generator=gen).requires_grad_(True)
    y = inplace_sparse_delta_linear(x, W, None, ov, vals)
    with torch.no_grad():
        W.mul_(1.0)
    with pytest.raises(NeuroAdaError, match="modified in place"):
        y.sum().backward()


@pytest.mark.parametrize("mode", ["inplace", "additive"])
@pytest.mark.parametrize("trained", [True, False])
def test_input_is_saved_only_for_grad_val(rt, gen, mode, trained):
    """x is kept for backward only when some delta trains; a frozen adapter under a graph that needs
    grad_x (layers below still train) keeps no copy of x, and grad_x is unchanged."""
    Wc, W, ov, vals = setup(rt, gen, 8, 6, 2)
    vals = [v.detach().requires_grad_(trained) for v in vals]
    x = torch.randn(4, 6, dtype=torch.float64, generator=gen).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if mode == "inplace":
            y = inplace_sparse_delta_linear(x, W, None, ov, vals)
        else:
            y = additive_sparse_delta(x, ov.patterns[0], vals[0])
    assert any(t is x for t in saved) == trained
    (gx,) = torch.autograd.grad(y.sum(), x)
    dense = torch.zeros_like(Wc).scatter_(1, ov.patterns[0].idx, vals[0].detach())
    want_w = (Wc + dense) if mode == "inplace" else dense
    torch.testing.assert_close(gx, torch.ones(4, 8, dtype=torch.float64) @ want_w)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_form_of_the_inplace_linear(rt, gen, transposed, bias):
    """What a torch.compile trace runs in place of write / GEMM / restore (neuroada::overlay_linear and
    overlay_linear_grad_input): torch's operator checks pass (schema, fake shapes and strides; W is declared
    unmutated, and is its own bits again when each returns), and the results are the eager function's bit for bit."""
    from neuroada_format.runtime.functional import _overlay_linear, _overlay_linear_grad_input

    Wc, W, ov, vals = setup(rt, gen, d_out=9, d_in=5, k=2, dtype=torch.float32, transposed=transposed)
    b = torch.randn(9, generator=gen) if bias else None
    x = torch.randn(3, 4, 5, generator=gen)
    g = torch.randn(3, 4, 9, generator=gen)
    before = W.clone()
    merged = ov.values([v.detach() for v in vals], W.dtype)
    args = (ov.flat, merged, ov.w0, transposed)
    torch.library.opcheck(_overlay_linear, (x, b, W, *args))
    torch.library.opcheck(_overlay_linear_grad_input, (g, W, *args))
    assert torch.equal(W, before)
    xr = x.clone().requires_grad_(True)
    y = inplace_sparse_delta_linear(xr, W, b, ov, [v.detach() for v in vals])
    (gx,) = torch.autograd.grad(y, xr, g)
    assert torch.equal(_overlay_linear(x, b, W, *args), y)
    assert torch.equal(_overlay_linear_grad_input(g, W, *args), gx)
