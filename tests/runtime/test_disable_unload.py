"""PEFT's `with model.disable_adapter():` and `model.unload()`: the plain base's outputs and weights, bit for bit, on
a model in training (nonzero unmerged deltas, in place and additive), a merged one and one set_adapter serves."""

from __future__ import annotations

import copy

import pytest
import torch

from neuroada_format.runtime import (NeuroAdaConfig, NeuroAdaLayer, adapter_batch, attach, disable_adapter,
                                     load_adapter, merge, merge_and_unload, merged_adapter, save_adapter, set_adapter,
                                     unload)
from neuroada_format.runtime.guards import layers, to_numpy

transformers = pytest.importorskip("transformers")

from tiny_hf import tiny_llama, with_deltas  # noqa: E402  (tests/tiny_hf.py)


def ids():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def bits(model):
    return {k: to_numpy(v).tobytes() for k, v in model.state_dict().items()}


def trained(base, mode):
    """A model in training: deltas nonzero and unmerged, one adapter unfrozen."""
    model = with_deltas(copy.deepcopy(base), k=2, mode=mode)
    assert all(layer.mode == mode and not layer.merged for layer in layers(model).values())
    return model


def served(base, tmp_path):
    """A server: two adapters loaded, one of them merged by set_adapter."""
    for name, seed in (("a", 1), ("b", 2)):
        save_adapter(with_deltas(copy.deepcopy(base), k=2, seed=seed), tmp_path / name)
    model = load_adapter(copy.deepcopy(base), tmp_path / "a", "a")
    load_adapter(model, tmp_path / "b", "b")
    set_adapter(model, "b")
    return model


@pytest.mark.parametrize("kind", ["inplace", "additive", "merged", "served"])
def test_disable_adapter_gives_the_base_and_puts_the_adapter_back(kind, tmp_path):
    base = tiny_llama()
    want = logits(base)
    model = served(base, tmp_path) if kind == "served" else trained(base, "inplace" if kind == "merged" else kind)
    if kind == "merged":
        merge(model)
    adapted, before = logits(model), bits(model)
    assert not torch.allclose(adapted, want)
    with disable_adapter(model) as inside:
        assert inside is model
        assert torch.equal(logits(model), want)
        if kind in ("inplace", "additive"):  # a training-mode forward inside depends on no delta (a reference pass)
            model.train()
            assert not model(input_ids=ids(), labels=ids()).loss.requires_grad
            model.eval()
    assert torch.equal(logits(model), adapted)
    assert bits(model) == before  # merged weights are merged again, to the same bits
    if kind in ("inplace", "additive"):  # and the deltas train again
        model.train()
        assert model(input_ids=ids(), labels=ids()).loss.requires_grad
        model.eval()
    with pytest.raises(RuntimeError, match="boom"):
        with disable_adapter(model):
            assert torch.equal(logits(model), want)
            raise RuntimeError("boom")
    assert torch.equal(logits(model), adapted) and bits(model) == before
    if kind == "served":
        assert merged_adapter(model) == "b"
        with disable_adapter(model):  # adapter_batch inside the block serves the names it is given
            with adapter_batch(model, ["a", "__base__"]):
                assert torch.equal(model(ids()).logits[1], want[1])
            assert torch.equal(logits(model), want)
        assert torch.equal(logits(model), adapted)
    if kind == "merged":
        assert all(layer.merged_adapters == ["default"] for layer in layers(model).values())


def test_what_would_change_the_adapters_is_refused_inside_the_block(tmp_path):
    """The exit puts back what each layer served, so a set_adapter, unload or delete_adapter inside the block was
    silently undone (or half undone). Each is refused now, naming the block, and the model is as before after it."""
    from neuroada_format.runtime import add_weighted_adapter, delete_adapter, unmerge

    base = tiny_llama()
    model = served(base, tmp_path)
    served_logits, base_logits = logits(model), logits(base)
    calls = {"set_adapter": lambda: set_adapter(model, "a"), "unload": lambda: unload(model),
             "merge_and_unload": lambda: merge_and_unload(model), "merge": lambda: merge(model),
             "unmerge": lambda: unmerge(model), "delete_adapter": lambda: delete_adapter(model, "b"),
             "attach": lambda: attach(model, NeuroAdaConfig(k=2), "c"),
             "load_adapter": lambda: load_adapter(model, tmp_path / "a", "a2"),
             "add_weighted_adapter": lambda: add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "ab")}
    with disable_adapter(model):
        for what, call in calls.items():
            with pytest.raises(Exception, match=f"^{what} inside a disable_adapter block"):
                call()
        assert torch.equal(logits(model), base_logits)
    assert merged_adapter(model) == "b" and torch.equal(logits(model), served_logits)
    with disable_adapter(model):  # and the block can be entered again
        assert torch.equal(logits(model), base_logits)
    set_adapter(model, "a")  # outside the block, as before
    assert merged_adapter(model) == "a"


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_made_inside_the_block_is_refused(tmp_path, how):
    """A deep copy (or torch.save) taken inside a disable_adapter block carried the block's state: the copy served
    the base for good and refused set_adapter, merge, ... "inside a disable_adapter block" it could never leave.
    Refused now, as a copy inside an adapter_batch block is; before and after the block copies work."""
    import io

    base = tiny_llama()
    model = served(base, tmp_path)
    served_logits = logits(model)

    def copied():
        if how == "deepcopy":
            return copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    with disable_adapter(model):
        with pytest.raises(Exception, match=r"^copying a model inside a disable_adapter block is not supported: .* "
                                            r"unload\(copy.deepcopy\(model\)\)"):
            copied()
    assert torch.equal(logits(model), served_logits)
    after = copied()
    assert torch.equal(logits(after), served_logits)
    set_adapter(after, "a")  # a copy made outside the block switches freely
    assert torch.equal(logits(unload(copied())), logits(base))


def test_disable_adapter_is_refused_inside_an_adapter_batch_block(tmp_path):
    base = tiny_llama()
    model = served(base, tmp_path)
    with adapter_batch(model, ["a", "b"]):
        with pytest.raises(Exception, match="inside an adapter_batch block"):
            with disable_adapter(model):
                pass


@pytest.mark.parametrize("kind", ["inplace", "additive", "merged", "served"])
def test_unload_gives_the_plain_base_back_without_merging(kind, tmp_path):
    base = tiny_llama()
    want, base_bits = logits(base), bits(base)
    model = served(base, tmp_path) if kind == "served" else trained(base, "inplace" if kind == "merged" else kind)
    if kind == "merged":
        merge(model)
    assert not torch.equal(logits(model), want)
    out = unload(model)
    assert out is model
    assert not any(isinstance(m, NeuroAdaLayer) for m in model.modules())
    assert bits(model) == base_bits  # the same keys, and the weights bit for bit as before attach
    assert torch.equal(logits(model), want)
    assert "save_pretrained" not in model.__dict__ and not hasattr(model, "neuroada_configs")
    assert not model._load_state_dict_pre_hooks and not model._forward_pre_hooks
    attach(model, NeuroAdaConfig(k=1))  # a plain model again: it takes a new adapter
    assert layers(model)


def test_merge_and_unload_still_merges():
    base = tiny_llama()
    model = trained(base, "inplace")
    adapted = logits(model)
    plain = merge_and_unload(model)
    assert not layers(plain) and bits(plain) != bits(base)
    assert torch.allclose(logits(plain), adapted, atol=1e-5)
