"""Adapters with one set of positions (magnitude top-k with one k on one base: every task adapter of a server) hold
one idx and one w0 tensor between them, and nothing a user can observe changes: outputs, state dicts, safetensors
saves, loads into one of them, dtype and device moves, copies, deletes."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuroada_format.runtime import NeuroAdaConfig, attach, load_adapter, save_adapter, set_adapter
from neuroada_format.runtime.kernels.cache import aliases
from neuroada_format.runtime.guards import layers

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


def adapter_file(folder, name, k, seed, selection="magnitude"):
    m = tiny_llama()
    attach(m, NeuroAdaConfig(k=k, selection=selection, seed=seed), name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(m).values():
            layer.neuroada_val[name].normal_(0, 0.05, generator=g)
    return save_adapter(m, os.path.join(folder, f"{name}.safetensors"), name)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared")
    return {"a": adapter_file(folder, "a", 2, 1), "b": adapter_file(folder, "b", 2, 2),
            "c": adapter_file(folder, "c", 2, 3, selection="random"), "d": adapter_file(folder, "d", 3, 4)}


def loaded(files, names=("a", "b", "c", "d")):
    model = tiny_llama()
    for n in names:
        load_adapter(model, files[n], n)
    return model


def ids():
    return torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))


def served(model, name):
    set_adapter(model, name)
    with torch.no_grad():
        return model(ids()).logits


def test_same_positions_share_idx_and_w0_and_keep_their_values(files):
    model = loaded(files)
    for layer in layers(model).values():
        idx, w0, val = layer.neuroada_idx, layer.neuroada_w0, layer.neuroada_val
        assert aliases(idx["a"], idx["b"]) and aliases(w0["a"], w0["b"]) and val["a"] is not val["b"]
        assert idx["a"] is not idx["b"] and w0["a"] is not w0["b"]  # one storage, a tensor of each adapter's own
        assert not aliases(idx["c"], idx["a"]) and not aliases(idx["d"], idx["a"])  # other positions, other k
        assert layer.pattern("a") is layer.pattern("b")
    alone = {n: served(loaded(files, (n,)), n) for n in "abcd"}
    for n in "abcd":
        assert torch.equal(served(model, n), alone[n])


def test_state_dict_hands_out_distinct_tensors_that_safetensors_saves(files, tmp_path):
    model = loaded(files)
    state = model.state_dict()
    ptrs = [t.data_ptr() for k, t in state.items() if ".neuroada_" in k]
    assert len(ptrs) == len(set(ptrs))
    path = os.fspath(tmp_path / "state.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path)  # refuses tensors that share memory
    fresh = loaded(files)
    fresh.load_state_dict(load_file(path))
    for n in "abcd":
        assert torch.equal(served(fresh, n), served(model, n))


@pytest.mark.parametrize("with_w0", [True, False])
def test_a_state_loaded_into_one_adapter_leaves_its_twin_alone(files, with_w0):
    """torch copies a loaded state into the buffers: the adapter gets its own idx and w0 first. Without w0 in the
    state (a trainable state holds none), its originals are read again at its new positions, into its own w0."""
    model = loaded(files, ("a", "b"))
    before = served(model, "b")
    other = loaded(files, ("c",))  # other positions, under the name "a" below
    state = {k.replace(".neuroada_idx.c", ".neuroada_idx.a").replace(".neuroada_w0.c", ".neuroada_w0.a")
             .replace(".neuroada_val.c", ".neuroada_val.a"): v for k, v in other.state_dict().items()
             if ".neuroada_" in k and (with_w0 or ".neuroada_w0." not in k)}
    w0_b = {n: layer.neuroada_w0["b"].clone() for n, layer in layers(model).items()}
    model.load_state_dict(state, strict=False)
    assert torch.equal(served(model, "b"), before)
    assert torch.equal(served(model, "a"), served(other, "c"))
    for (name, layer), src in zip(layers(model).items(), layers(other).values()):
        assert torch.equal(layer.neuroada_idx["a"], src.neuroada_idx["c"])
        assert torch.equal(layer.neuroada_w0["a"], src.neuroada_w0["c"])
        assert torch.equal(layer.neuroada_w0["b"], w0_b[name])
        assert not torch.equal(layer.neuroada_idx["b"], src.neuroada_idx["c"])
        assert not aliases(layer.neuroada_idx["a"], layer.neuroada_idx["b"])


def test_moves_copies_and_deletes_keep_one_copy(files):
    model = loaded(files, ("a", "b"))
    want = {n: served(model, n) for n in "ab"}
    set_adapter(model, None)
    twin = copy.deepcopy(model)
    pickled = pickle.loads(pickle.dumps(model))
    model.to(torch.float64)
    for m in (model, twin, pickled):
        for layer in layers(m).values():
            assert aliases(layer.neuroada_idx["a"], layer.neuroada_idx["b"])
            assert aliases(layer.neuroada_w0["a"], layer.neuroada_w0["b"])
    assert all(layer.neuroada_w0["b"].dtype == torch.float64 for layer in layers(model).values())
    for n in "ab":
        assert torch.equal(served(twin, n), want[n])
    from neuroada_format.runtime import delete_adapter

    delete_adapter(twin, "a")  # the holder goes; the next adapter with these positions shares with "b"
    load_adapter(twin, files["a"], "again")
    for layer in layers(twin).values():
        assert aliases(layer.neuroada_idx["again"], layer.neuroada_idx["b"])
    assert torch.equal(served(twin, "again"), want["a"])


def test_saving_copies_no_shared_tensor(files, tmp_path, monkeypatch):
    """The runtime's own state reads (saving an adapter, save_pretrained) take names or convert what they keep, so
    with dozens of adapters loaded they must not copy each one's idx and w0; a user's state_dict() does."""
    import neuroada_format as naf

    model = loaded(files, ("a", "b"))
    shared = {t.data_ptr() for layer in layers(model).values()
              for buffers in (layer.neuroada_idx, layer.neuroada_w0) for t in buffers._buffers.values()}
    copied = []
    real = torch.Tensor.clone

    def spy(self, *args, **kwargs):
        if self.data_ptr() in shared:
            copied.append(tuple(self.shape))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", spy)
    path = save_adapter(model, tmp_path / "b.safetensors", "b")
    model.save_pretrained(tmp_path / "folder")
    assert copied == []
    want, got = naf.load(files["b"]), naf.load(path)
    for key, t in want.targets.items():
        assert (got.targets[key].indices == t.indices).all()
        assert got.targets[key].values.tobytes() == t.values.tobytes()
    model.state_dict()
    assert copied


def test_every_adapter_has_buffers_of_its_own_for_torch_func_and_named_buffers(files):
    """Twins hold aliases (one storage), not one tensor object: registered under two names, one object was listed
    once by named_buffers()/buffers(), and torch.func.functional_call took the two names for tied tensors and
    refused a state_dict (whose copies are distinct) with 'got multiple values for keys ... which are tied'."""
    model = loaded(files)
    names = [k for k in model.state_dict() if ".neuroada_idx." in k or ".neuroada_w0." in k]
    buffers = dict(model.named_buffers())
    assert all(k in buffers for k in names)
    assert len(list(model.buffers())) == len(buffers)
    set_adapter(model, "b")
    with torch.no_grad():
        want = model(ids()).logits
        got = torch.func.functional_call(model, model.state_dict(), (ids(),)).logits
    assert torch.equal(got, want)


def test_a_state_loaded_through_a_container_leaves_its_twin_alone(files, tmp_path):
    """The containers keep sharing invisible themselves: a load into one entry (layer.neuroada_idx.load_state_dict,
    which the layer's own hooks never see) rewrote the twin's positions too, and the container's state_dict held one
    storage under two names (safetensors refused it)."""
    model = loaded(files, ("a", "b"))
    before = served(model, "b")
    other = loaded(files, ("c",))  # other positions
    for layer, src in zip(layers(model).values(), layers(other).values()):
        save_file(dict(layer.neuroada_idx.state_dict()), os.fspath(tmp_path / "idx.safetensors"))
        save_file(dict(layer.neuroada_w0.state_dict()), os.fspath(tmp_path / "w0.safetensors"))
        layer.neuroada_idx.load_state_dict({"a": src.neuroada_idx["c"]}, strict=False)
        layer.neuroada_w0.load_state_dict({"a": src.neuroada_w0["c"]}, strict=False)
        assert torch.equal(layer.neuroada_idx["a"], src.neuroada_idx["c"])
        assert not torch.equal(layer.neuroada_idx["b"], src.neuroada_idx["c"])
    set_adapter(model, None)
    assert torch.equal(served(model, "b"), before)
