"""torch.func (grad, vmap, functional_call): per-sample gradients and meta-learning run through the adapters.

The in-place path writes into the weight, which no transform can trace, so a layer whose forward runs under a
transform serves additively (``base(x) + S(x)``, the same function); these check the gradients against the
plain autograd ones and against a dense reference, and that the in-place function itself refuses clearly.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from neuroada_format import NeuroAdaUsageError
from neuroada_format.runtime import NeuroAdaConfig, attach
from neuroada_format.runtime.functional import AdditiveSparseDelta, Overlay, inplace_sparse_delta_linear
from neuroada_format.runtime.kernels import Pattern

pytest.importorskip("transformers")
from tiny_hf import tiny_llama  # noqa: E402


def trained(mode: str):
    model = tiny_llama()
    attach(model, NeuroAdaConfig(k=3, target_modules=["q_proj", "v_proj", "down_proj"], mode=mode))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)  # nonzero deltas, so a wrong path would show in the loss and gradients
    return model


def deltas(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["auto", "additive"])
def test_func_grad_equals_backward(mode):
    model = trained(mode)
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(1))

    def loss(params):
        return torch.func.functional_call(model, params, (ids,), {"labels": ids}).loss

    got = torch.func.grad(loss)(deltas(model))
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    assert got.keys() == deltas(model).keys() and len(got) == 6
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
            assert got[n].abs().sum() > 0, n


def test_per_sample_gradients_with_vmap():
    """vmap(grad): one gradient per sequence, as differential privacy needs, each equal to its own backward."""
    model = trained("auto")
    ids = torch.randint(0, 100, (4, 5), generator=torch.Generator().manual_seed(2))

    def loss(params, one):
        return torch.func.functional_call(model, params, (one[None],), {"labels": one[None]}).loss

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule")  # torch's note about its CPU attention kernel
        per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(deltas(model), ids)
    for b in range(ids.shape[0]):
        model.zero_grad()
        model(ids[b:b + 1], labels=ids[b:b + 1]).loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per[n][b], p.grad, rtol=1e-4, atol=1e-6, msg=f"{n} sample {b}")


def test_vmap_over_deltas_and_inputs():
    """A batch of deltas (an ensemble of adapters) and a batch of inputs, each pair through its own S(x)."""
    g = torch.Generator().manual_seed(3)
    p = Pattern(torch.rand(5, 9, generator=g).topk(2, 1).indices.sort(1).values, 9)
    vals = torch.randn(3, 5, 2, generator=g)
    xs = torch.randn(3, 4, 9, generator=g)
    got = torch.func.vmap(lambda x, v: AdditiveSparseDelta.apply(x, v, p, None))(xs, vals)
    dense = torch.zeros(3, 5, 9).scatter(2, p.idx.expand(3, 5, 2), vals)
    torch.testing.assert_close(got, xs @ dense.transpose(1, 2))
    got = torch.func.vmap(lambda v: AdditiveSparseDelta.apply(xs[0], v, p, None))(vals)  # deltas only
    torch.testing.assert_close(got, xs[0] @ dense.transpose(1, 2))
    jac = torch.func.jacrev(lambda v: AdditiveSparseDelta.apply(xs[0], v, p, None))(vals[0])
    assert jac.shape == (4, 5, 5, 2)
    torch.testing.assert_close(jac.sum((0, 1)), xs[0][:, p.idx].sum(0))  # d sum(S) / d val[i, j] = sum_t x[t, idx]


def test_the_in_place_function_refuses_a_transform_by_name():
    lin = nn.Linear(8, 4)
    lin.weight.requires_grad_(False)
    idx = lin.weight.abs().topk(2, 1).indices.sort(1).values
    ov = Overlay([Pattern(idx, 8)], [lin.weight.gather(1, idx)])
    x = torch.randn(3, 8)
    with pytest.raises(NeuroAdaUsageError, match="additive mode"):
        torch.func.grad(lambda v: inplace_sparse_delta_linear(x, lin.weight, lin.bias, ov, [v]).sum())(
            torch.zeros(4, 2))
    # outside a transform it trains as always, and the weight is unchanged afterwards
    w = lin.weight.clone()
    v = torch.zeros(4, 2, requires_grad=True)
    inplace_sparse_delta_linear(x, lin.weight, lin.bias, ov, [v]).sum().backward()
    assert v.grad.abs().sum() > 0 and torch.equal(lin.weight, w)
