"""Wrappers that rename every module: DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``).
Attached through one, targets and adapter keys carry the prefix (a saved adapter no longer fits the plain model), and
DDP never syncs the deltas, which did not exist when it was built; refused before the model is touched, saying to
attach first."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from neuroada_format import NeuroAdaUsageError
from neuroada_format.runtime import NeuroAdaConfig, attach, load_adapter, save_adapter
from neuroada_format.runtime.guards import layers
from tiny_hf import tiny_llama

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of world size 1 (a file store: no port to pick), destroyed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=(tmp_path / "store").as_uri())
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_attach_and_load_on_a_ddp_wrapped_model_are_refused(one_rank, tmp_path):
    plain = attach(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["q_proj"]))
    save_adapter(plain, tmp_path / "a")
    model = tiny_llama()
    wrapped = DistributedDataParallel(model)
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    with pytest.raises(NeuroAdaUsageError, match="attach on a DistributedDataParallel-wrapped model: attach before "
                                                 "wrapping in DDP"):
        attach(wrapped, NeuroAdaConfig(k=1))
    with pytest.raises(NeuroAdaUsageError, match="load_adapter before wrapping in DDP"):
        load_adapter(wrapped, tmp_path / "a")
    after = wrapped.state_dict()
    assert not layers(wrapped) and after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # the order the message asks for works: attach (here load) on the plain model, then wrap it
    load_adapter(model, tmp_path / "a", is_trainable=True)
    assert len(layers(DistributedDataParallel(model))) == 2


def test_attach_on_a_compiled_model_is_refused(tmp_path):
    """Before, attach adapted '_orig_mod.model...' layers and save_adapter wrote those keys."""
    model = tiny_llama()
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(NeuroAdaUsageError, match=r"attach on a torch.compile'd model \(its wrapper prefixes every "
                                                 r"name with _orig_mod.\): attach to the model before compiling it "
                                                 r"\(or to model._orig_mod\)"):
        attach(compiled, NeuroAdaConfig(k=1))
    assert not layers(model)
    attach(compiled._orig_mod, NeuroAdaConfig(k=1, target_modules=["q_proj"]))  # what the message offers
    assert sorted(layers(compiled)) == ["_orig_mod.model.layers.0.self_attn.q_proj",
                                        "_orig_mod.model.layers.1.self_attn.q_proj"]


def test_saving_through_ddp_or_compile_writes_the_plain_keys(one_rank, tmp_path):
    """Attach first, then wrap (the order attach asks for): saving through the wrapper is what a training script
    does. Before, save_adapter(DDP(m)) said "no adapter named 'default' (have: none)" and save_adapter on the
    compiled model wrote '_orig_mod.'-prefixed keys that fit no base."""
    import neuroada_format as naf
    from neuroada_format.runtime import to_adapter

    model = attach(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["q_proj"]))
    want = sorted(naf.load(save_adapter(model, tmp_path / "plain.safetensors")).targets)
    assert want == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    for label, wrapper in (("ddp", DistributedDataParallel(model)), ("compiled", torch.compile(model, backend="eager")),
                           ("both", torch.compile(DistributedDataParallel(model), backend="eager"))):
        assert sorted(naf.load(save_adapter(wrapper, tmp_path / f"{label}.safetensors")).targets) == want, label
        assert sorted(to_adapter(wrapper).targets) == want, label
    torch.compile(model, backend="eager").save_pretrained(tmp_path / "folder")  # Trainer's save_model, compiled
    assert sorted(naf.load(tmp_path / "folder" / "neuroada_model.safetensors").targets) == want
    assert len(layers(load_adapter(tiny_llama(), tmp_path / "compiled.safetensors"))) == 2


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_of_an_unmerged_model_runs_the_adapter(strict):
    """torch.export of an attached model (in-place mode, not merged) failed ("We found a fake tensor in the exported
    program constant's list") or, strict, exported a program whose output was a FakeTensor: the traced branch handed
    the operator `weight.data`, which export lifts as a constant. It hands over the parameter (detached) now."""
    torch.manual_seed(0)
    model = attach(tiny_llama(), NeuroAdaConfig(k=2, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    model.eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False).logits

    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        eager = Logits(model)(ids)
        exported = torch.export.export(Logits(model), (ids,), strict=strict).module()(ids)
        again = Logits(model)(ids)
    assert type(exported) is torch.Tensor
    torch.testing.assert_close(exported, eager, rtol=0, atol=0)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)  # the base weights were restored after the trace
