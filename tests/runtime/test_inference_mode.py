"""The runtime under ``torch.inference_mode()``, where serving code runs.

Tensors created there are inference tensors: no version counter, never saved for backward. Loading,
switching, mixed batches and generation inside such a block must give the bits they give under
``no_grad``, and what the block leaves behind (adapter tensors, cached index structures) must keep
working after it, for training too. Tensors that became inference tensors in the user's hands are
never trusted by a cache: a change made to one in place is served, not a stale copy.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from neuroada_format.runtime import (  # noqa: E402
    NeuroAdaConfig,
    adapter_batch,
    add_weighted_adapter,
    attach,
    load_adapter,
    merge_and_unload,
    save_adapter,
    set_adapter,
)
from neuroada_format.runtime.guards import layers # noqa: E402

VOCAB = 100
SPECS = {"one": 1, "three": 3}


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                   pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inference")
    out = {}
    for i, (name, k) in enumerate(SPECS.items()):
        m = attach(tiny_llama(), NeuroAdaConfig(k=k), name)
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for layer in layers(m).values():
                layer.neuroada_val[name].normal_(0, 0.05, generator=g)
        out[name] = save_adapter(m, os.path.join(folder, f"{name}.safetensors"), name)
    return out


def loaded(files, **kw):
    model = tiny_llama()
    for name in SPECS:
        load_adapter(model, files[name], name, **kw)
    return model


def ids_batch(n=4, length=6):
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(5))


def adapter_tensors(model):
    for layer in layers(model).values():
        for d in (layer.neuroada_val, layer.neuroada_idx, layer.neuroada_w0):
            yield from (d[k] for k in d.keys())


def serve_all(model, ids):
    """Logits of every serving path, in a fixed order."""
    out = []
    for name in (*SPECS, None):
        set_adapter(model, name)
        out.append(model(ids).logits)
    names = ["one", "three", None, "one"]
    with adapter_batch(model, names):
        out.append(model(ids).logits)
        out.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False))
    return out


def test_loading_and_serving_inside_inference_mode_gives_the_no_grad_bits(files):
    ids = ids_batch()
    with torch.no_grad():
        want = serve_all(loaded(files), ids)
    with torch.inference_mode():
        model = loaded(files)
        got = serve_all(model, ids)
        again = serve_all(model, ids)  # second pass: served from the caches the first one built
    for w, g, a in zip(want, got, again):
        assert torch.equal(w, g) and torch.equal(w, a)
    assert not any(t.is_inference() for t in adapter_tensors(model))
    # what the block cached keeps serving outside it, with the same bits
    with torch.no_grad():
        assert all(torch.equal(w, g) for w, g in zip(want, serve_all(model, ids)))


def test_caches_built_inside_inference_mode_are_kept_and_reused(files):
    model = loaded(files)
    ids = ids_batch()
    with torch.inference_mode():
        with adapter_batch(model, ["one", "three", "one", None]):
            model(ids)
            stacks = {n: list(layer.__dict__["_neuroada_stack"].values())[-1][1] for n, layer in layers(model).items()}
            plans = {n: s._plan[3] for n, s in stacks.items() if s._plan is not None}
            model(ids)
            assert plans and all(stacks[n]._plan[3] is p for n, p in plans.items())
    for layer in layers(model).values():
        for p in layer._patterns.values():
            assert not p.flat.is_inference() and not p.idx.is_inference()


def test_an_adapter_loaded_inside_inference_mode_trains_like_one_loaded_outside(files):
    ids = ids_batch()
    runs = []
    for inside in (False, True):
        model = tiny_llama()
        with torch.inference_mode(inside):
            load_adapter(model, files["three"], "three", is_trainable=True)
        params = [p for p in model.parameters() if p.requires_grad]
        assert params and not any(p.is_inference() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), [p.detach().clone() for p in params]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_merging_and_combining_inside_inference_mode(files):
    ids = ids_batch()
    with torch.no_grad():
        ref = loaded(files)
        add_weighted_adapter(ref, ["one", "three"], [0.5, 0.5], "mix")
        set_adapter(ref, "mix")
        want_mix = ref(ids).logits
        plain = merge_and_unload(loaded(files))
        want_merged = plain(ids).logits
    with torch.inference_mode():
        model = loaded(files)
        add_weighted_adapter(model, ["one", "three"], [0.5, 0.5], "mix")
        set_adapter(model, "mix")
        assert torch.equal(model(ids).logits, want_mix)
        merged = merge_and_unload(loaded(files))
        assert torch.equal(merged(ids).logits, want_merged)
    assert not any(t.is_inference() for t in adapter_tensors(model))


def _forward(model, ids, path):
    if path == "set_adapter":
        set_adapter(model, "three")
        out = model(ids).logits
        set_adapter(model, None)
        return out
    if path == "adapter_batch":
        with adapter_batch(model, ["three"] * ids.shape[0]):
            return model(ids).logits
    return model(ids).logits


@pytest.mark.parametrize("path", ["unmerged", "set_adapter", "adapter_batch"])
def test_inference_tensors_the_user_made_are_never_served_stale(files, path):
    """``model.double()`` inside inference_mode turns weights, deltas and originals into inference tensors, which
    keep no version: a delta changed in place there must be what the next forward serves."""
    ids = ids_batch()
    want = []
    for scale in (1, 3):  # the same model built with ordinary tensors, deltas scaled beforehand
        ref = tiny_llama()
        load_adapter(ref, files["three"], "three")
        ref.double()
        with torch.no_grad():
            for layer in layers(ref).values():
                layer.neuroada_val["three"].mul_(scale)
            want.append(_forward(ref, ids, path))
    model = tiny_llama()
    load_adapter(model, files["three"], "three")
    with torch.inference_mode():
        model.double()
        vals = [layer.neuroada_val["three"] for layer in layers(model).values()]
        assert all(v.is_inference() for v in vals)
        first = _forward(model, ids, path)
        for v in vals:
            v.mul_(3)
        second = _forward(model, ids, path)
    assert torch.equal(first, want[0]) and torch.equal(second, want[1])
    assert not torch.equal(first, second)
    # the runtime's own idx and w0 were made ordinary again, so their caches hold from then on
    for layer in layers(model).values():
        assert not layer.neuroada_idx["three"].is_inference() and not layer.neuroada_w0["three"].is_inference()
    if path == "unmerged":
        layer = next(iter(layers(model).values()))
        with torch.inference_mode():
            model(ids)
            ov = layer._overlays[("three",)]
            model(ids)
        assert layer._overlays[("three",)] is ov
