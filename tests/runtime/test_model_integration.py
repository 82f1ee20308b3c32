"""A tiny GPT-2 (Conv1D layers) with every projection wrapped: zero deltas change nothing, HF's
gradient checkpointing gives the same grads, and merging reproduces the trained forward."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from neuroada_format.runtime import NeuroAdaLayer  # noqa: E402


def tiny_gpt2(mode):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.requires_grad_(False)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(3)
    layers = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Conv1D):
                d_in, d_out = child.weight.shape
                layer = NeuroAdaLayer(child, mode=mode)
                idx = child.weight.detach().t().abs().topk(2, dim=1).indices.sort(1).values
                layer.add_adapter("default", idx)
                setattr(mod, child_name, layer)
                layers.append(layer)
    return model, ref, layers, gen


@pytest.mark.parametrize("mode", ["inplace", "additive"])
def test_tiny_gpt2(mode):
    model, ref, layers, gen = tiny_gpt2(mode)
    ids = torch.randint(0, 64, (2, 12), generator=gen)
    assert len(layers) == 8
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # zero deltas: the base model exactly
        for layer in layers:
            layer.neuroada_val["default"].normal_(std=0.05, generator=gen)
    vals = [layer.neuroada_val["default"] for layer in layers]

    def grads():
        for v in vals:
            v.grad = None
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        model.eval()
        return loss.detach(), [v.grad.clone() for v in vals]

    loss, g = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    loss_ck, g_ck = grads()
    assert torch.equal(loss, loss_ck)
    for a, b in zip(g, g_ck):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(v.abs().sum() > 0 for v in g)
    with torch.no_grad():
        trained = model(ids).logits
        for layer in layers:
            layer.merge()
        merged = model(ids).logits
        for layer in layers:
            layer.unmerge()
        assert torch.equal(model(ids).logits, trained)
    if mode == "inplace":
        assert torch.equal(merged, trained)
    else:
        torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)
    ref_sd = ref.state_dict()  # the base weights came back bit for bit
    for n, t in model.state_dict().items():
        base_key = n.replace(".base_layer", "")
        if base_key in ref_sd:
            assert torch.equal(t, ref_sd[base_key]), n
