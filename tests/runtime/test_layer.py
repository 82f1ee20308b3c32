"""NeuroAdaLayer: merge/unmerge exactness, several adapters, modes, Conv1D, state_dict keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuroada_format import NeuroAdaError
from neuroada_format.runtime import NeuroAdaLayer

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_layer(rt, gen, d_out=12, d_in=10, k=3, dtype=torch.float32, mode="inplace", names=("default",),
               bias=True, val_scale=0.05):
    lin = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=gen))
    layer = NeuroAdaLayer(lin, mode=mode)
    for n in names:
        layer.add_adapter(n, rt.rand_idx(d_out, d_in, k, gen))
        with torch.no_grad():
            layer.neuroada_val[n].copy_(torch.randn(d_out, k, generator=gen) * val_scale)
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_unmerge_bit_exact(rt, gen, dtype):
    layer = make_layer(rt, gen, dtype=dtype)
    W = layer.weight
    orig = W.detach().clone()
    x = torch.randn(5, 10, generator=gen).to(dtype)
    y_train = layer(x)
    layer.merge()
    assert layer.merged
    idx, val = layer.neuroada_idx["default"], layer.neuroada_val["default"]
    assert rt.same_bits(W, rt.merged_canonical(orig, idx, val))
    assert torch.equal(layer(x), y_train)  # training forward == merged model, bit for bit
    layer.unmerge()
    assert not layer.merged and rt.same_bits(W, orig)


@pytest.mark.parametrize("dtype", DTYPES)
def test_several_adapters_one_rounding_and_stepwise_merge(rt, gen, dtype):
    layer = make_layer(rt, gen, d_in=6, k=3, dtype=dtype, names=("a", "b"))  # overlaps are likely at k=3 of 6
    orig = layer.weight.detach().clone()
    ia, ib = layer.neuroada_idx["a"], layer.neuroada_idx["b"]
    va, vb = layer.neuroada_val["a"].detach(), layer.neuroada_val["b"].detach()
    assert (ia.unsqueeze(2) == ib.unsqueeze(1)).any()
    want = orig.float().scatter_add(1, ia, va).scatter_add(1, ib, vb).to(dtype)
    untouched = torch.ones_like(orig, dtype=torch.bool).scatter(1, ia, False).scatter(1, ib, False)
    want[untouched] = orig[untouched]
    layer.set_adapter(["a", "b"])
    x = torch.randn(4, 6, generator=gen).to(dtype)
    y_train = layer(x)
    layer.merge()
    assert rt.same_bits(layer.weight, want)
    assert torch.equal(layer(x), y_train)
    layer.unmerge()
    assert rt.same_bits(layer.weight, orig)
    layer.merge(["a"])
    layer.merge(["b"])  # recomputed from the originals: same bits as merging both at once
    assert layer.merged_adapters == ["a", "b"] and rt.same_bits(layer.weight, want)
    layer.unmerge()
    assert rt.same_bits(layer.weight, orig)


@pytest.mark.parametrize("bias", [True, False])
def test_modes_agree_and_train(rt, gen, bias):
    layer = make_layer(rt, gen, bias=bias)
    x = torch.randn(2, 3, 10, generator=gen).requires_grad_(True)
    grads = {}
    for mode in ("inplace", "additive"):
        layer.set_mode(mode)
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        y.square().sum().backward()
        grads[mode] = (y.detach(), x.grad.clone(), layer.neuroada_val["default"].grad.clone())
    for a, b in zip(grads["inplace"], grads["additive"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_conv1d_layer_and_state_dict(rt, gen):
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(12, 10)
    layer = NeuroAdaLayer(conv)
    assert (layer.d_out, layer.d_in, layer.transposed) == (12, 10, True)
    idx = rt.rand_idx(12, 10, 2, gen)
    layer.add_adapter("default", idx)
    assert torch.equal(layer.neuroada_w0["default"], conv.weight.t().gather(1, idx))
    with torch.no_grad():
        layer.neuroada_val["default"].normal_(generator=gen)
    orig = conv.weight.detach().clone()
    x = torch.randn(3, 4, 10, generator=gen)
    y = layer(x)
    layer.merge()
    assert torch.equal(conv.weight.t(), rt.merged_canonical(orig.t(), idx, layer.neuroada_val["default"]))
    assert torch.equal(conv(x), y)
    # the originals of a layer with merged adapters: read around them (Conv1D's transposed positions)
    assert torch.equal(layer.base_values(idx), orig.t().gather(1, idx))
    layer.unmerge()
    assert torch.equal(conv.weight, orig)
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "neuroada_val.default",
                                       "neuroada_idx.default", "neuroada_w0.default"}


def test_disable_delete_and_errors(rt, gen):
    layer = make_layer(rt, gen)
    base = layer.base_layer
    x = torch.randn(3, 10, generator=gen)
    orig = base.weight.detach().clone()
    layer.merge()
    layer.disable_adapters = True
    assert torch.equal(layer(x), base(x)) and not layer.merged  # disabling unmerges
    layer.disable_adapters = False
    with pytest.raises(NeuroAdaError):
        layer.add_adapter("default", rt.rand_idx(12, 10, 2, gen))
    with pytest.raises(NeuroAdaError):
        layer.add_adapter("x.y", rt.rand_idx(12, 10, 2, gen))
    with pytest.raises(NeuroAdaError):
        layer.add_adapter("bad", torch.tensor([[1, 0]] * 12))
    layer.merge()
    late = rt.rand_idx(12, 10, 2, gen)
    with pytest.raises(NeuroAdaError, match="unmerge before adding an active adapter"):
        layer.add_adapter("late", late, activate=True)
    late[:, 0] = layer.neuroada_idx["default"][:, 0]  # (one column where "default" is merged, one maybe not)
    late = late.sort(dim=1).values
    active, layer.active_adapters = layer.active_adapters, []
    with pytest.raises(NeuroAdaError, match="unmerge before adding an active adapter"):
        layer.add_adapter("late", late)  # (with none active, the first adapter added becomes active)
    layer.active_adapters = active
    layer.add_adapter("late", late)  # waits, as load_adapter's on a served model: its originals read around the merge
    assert layer.active_adapters == ["default"] and layer.merged
    assert torch.equal(layer.neuroada_w0["late"], orig.gather(1, late))
    with pytest.raises(NeuroAdaError):
        layer.delete_adapter("default")
    layer.unmerge()
    assert torch.equal(layer.neuroada_w0["late"], orig.gather(1, late))
    layer.delete_adapter("late")
    layer.delete_adapter("default")
    assert torch.equal(layer(x), base(x)) and len(layer.neuroada_idx) == 0
    with pytest.raises(NeuroAdaError):
        NeuroAdaLayer(nn.Conv2d(2, 2, 1))


def test_bf16_master_values_and_state_reload(rt, gen):
    lin = nn.Linear(10, 8).bfloat16()
    layer = NeuroAdaLayer(lin)
    layer.add_adapter("default", rt.rand_idx(8, 10, 2, gen), val_dtype=torch.bfloat16)
    x = torch.randn(4, 10, generator=gen).bfloat16()
    layer(x).float().sum().backward()
    assert layer.neuroada_val["default"].grad.dtype == torch.bfloat16
    # loading new indices into the buffer (in place) must invalidate the cached pattern
    sd = layer.state_dict()
    sd["neuroada_idx.default"] = rt.rand_idx(8, 10, 2, gen)
    sd["neuroada_w0.default"] = lin.weight.detach().gather(1, sd["neuroada_idx.default"])
    layer.load_state_dict(sd)
    p = layer.pattern("default")
    assert torch.equal(p.idx, sd["neuroada_idx.default"]) and p.is_current(layer.neuroada_idx["default"])


@pytest.mark.parametrize("mode", ["inplace", "additive"])
def test_a_base_weight_written_after_the_adapter_was_added_is_what_forward_and_merge_use(rt, gen, mode):
    """w0 (the originals at the adapter's entries) was read once, at add_adapter. A weight edited since (under
    no_grad, or stepped by an optimizer as a base trained beside the deltas in the additive mode) was served with
    the old entries: the in-place forward wrote them back over the edit (every selected entry of a `W.mul_(2)` was
    reverted after one forward), and merge wrote old + delta (0.059 away on an SGD-stepped q_proj). w0 is read
    again when the weight's version moved while nothing is merged."""
    layer = make_layer(rt, gen, mode=mode)
    idx, val = layer.neuroada_idx["default"], layer.neuroada_val["default"].detach()
    x = torch.randn(5, 10, generator=gen)
    layer(x)  # a forward before the edit: caches built on the old originals
    with torch.no_grad():
        layer.weight.mul_(2)
    edited = layer.weight.detach().clone()
    want = torch.nn.functional.linear(x, rt.merged_canonical(edited, idx, val), layer.base_layer.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    assert rt.same_bits(layer.weight, edited)  # the forward left the edit in place
    layer.merge()
    assert rt.same_bits(layer.weight, rt.merged_canonical(edited, idx, val))
    layer.unmerge()
    assert rt.same_bits(layer.weight, edited)
    with torch.no_grad():  # edited again, then another adapter added (attach, load_adapter): the edit is kept
        layer.weight.add_(1)
    edited = layer.weight.detach().clone()
    layer.add_adapter("other", rt.rand_idx(12, 10, 3, gen), activate=False)
    want = torch.nn.functional.linear(x, rt.merged_canonical(edited, idx, val), layer.base_layer.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    assert rt.same_bits(layer.weight, edited)
    if mode == "additive":  # the base trains beside the deltas: each step's weight is the one merged
        layer.base_layer.weight.requires_grad_(True)
        opt = torch.optim.SGD([layer.base_layer.weight, layer.neuroada_val["default"]], lr=0.5)
        layer(x).square().sum().backward()
        opt.step()
        trained, val = layer.weight.detach().clone(), layer.neuroada_val["default"].detach()
        assert not torch.equal(trained, edited)
        layer.merge()
        assert rt.same_bits(layer.weight, rt.merged_canonical(trained, idx, val))
        layer.unmerge()
        assert rt.same_bits(layer.weight, trained)


def test_twins_keep_sharing_their_originals_when_the_weight_changes(rt, gen):
    """Adapters with one set of positions hold one w0 (the memory a server with dozens of them saves); reading the
    originals again after an edit keeps it one tensor."""
    from neuroada_format.runtime.kernels.cache import storage_of

    layer = make_layer(rt, gen, names=("a",))
    for n in ("b", "c"):
        layer.add_adapter(n, layer.neuroada_idx["a"].clone(), activate=False)
    assert len({storage_of(layer.neuroada_w0[n]) for n in "abc"}) == 1
    with torch.no_grad():
        layer.weight.mul_(3)
    layer(torch.randn(2, 10, generator=gen))
    assert len({storage_of(layer.neuroada_w0[n]) for n in "abc"}) == 1
    assert torch.equal(layer.neuroada_w0["c"], layer.weight.detach().gather(1, layer.neuroada_idx["a"]))


# -- base edits around a merge (found by mutation: each passed with the re-read it pins removed) ------------------
def _two_adapters():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(10, 12)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(12, 10, generator=g))
    layer = NeuroAdaLayer(lin, mode="inplace")
    layer.add_adapter("a", torch.tensor([[0, 1, 2]] * 12), activate=True)
    layer.add_adapter("b", torch.tensor([[5, 6, 7]] * 12), activate=False)
    with torch.no_grad():
        for n in "ab":
            layer.neuroada_val[n].copy_(torch.randn(12, 3, generator=g) * 0.1)
    return layer


def test_an_edit_made_while_another_adapter_is_merged_reaches_the_next_one_served():
    """Merge a, edit W, unmerge, serve b (other positions): b's originals are the edited weight's, and its in-place
    forward leaves the edit in place (it wrote b's stale originals back over it)."""
    layer = _two_adapters()
    layer.merge(["a"])
    with torch.no_grad():
        layer.weight.mul_(2)
    layer.unmerge()
    layer.active_adapters = ["b"]
    assert torch.equal(layer.neuroada_w0["b"], layer.weight.detach().gather(1, layer.neuroada_idx["b"]))
    edited = layer.weight.detach().clone()
    layer(torch.randn(3, 10))
    assert torch.equal(layer.weight.detach(), edited)


def test_a_state_dict_taken_while_merged_does_not_take_the_merged_entries_for_originals():
    """Merged, edited, state_dict, unmerge: the merged entries come back to their values from before the merge (a
    re-read while merged took the merged values as originals and left the delta baked into the base)."""
    layer = _two_adapters()
    before = layer.weight.detach().clone()
    layer.merge(["a"])
    with torch.no_grad():
        layer.weight.add_(1)
    layer.state_dict()
    layer.unmerge()
    idx = layer.neuroada_idx["a"]
    assert torch.equal(layer.weight.detach().gather(1, idx), before.gather(1, idx))


def test_a_bias_assigned_to_an_adapted_layer_is_the_base_layers():
    layer = _two_adapters()
    bias = nn.Parameter(torch.full((12,), 3.0), requires_grad=False)
    layer.bias = bias
    assert layer.base_layer.bias is bias and layer.bias is bias
    x = torch.randn(2, 10)
    layer.active_adapters = []
    torch.testing.assert_close(layer(x), x @ layer.weight.detach().t() + 3.0)


def test_a_deleted_adapter_leaves_no_pause_behind(tmp_path):
    """delete_adapter forgets a paused adapter's pause: a new adapter of that name that the user froze must not be
    made trainable again by set_adapter."""
    from neuroada_format.runtime import NeuroAdaConfig, attach, delete_adapter, layers, set_adapter
    from tiny_hf import tiny_llama

    model = attach(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["q_proj"]), "a")
    attach(model, NeuroAdaConfig(k=1, target_modules=["q_proj"]), "b")  # pauses a
    assert all("a" in layer.parked for layer in layers(model).values())
    delete_adapter(model, "a")
    assert all("a" not in layer.parked for layer in layers(model).values())
    attach(model, NeuroAdaConfig(k=1, target_modules=["q_proj"]), "a")
    for layer in layers(model).values():
        layer.neuroada_val["a"].requires_grad_(False)  # frozen by the user
    set_adapter(model, "a")
    assert not any(layer.neuroada_val["a"].requires_grad for layer in layers(model).values())
