"""Quantized bases: NeuroAda selects the top-|W| entries of a float weight and merges into it, so a layer whose
weight holds quantized integers (bitsandbytes' packed 4-bit uint8 [n, 1], its int8, torch.ao's quantized modules)
is refused at attach and at load_adapter with what to do instead, before the model is touched. Before, k >= 2
failed on a confusing "k exceeds d_in=1" and k=1 advised model.float(), which does not unpack them."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.runtime import NeuroAdaConfig, attach, list_adapters, load_adapter, save_adapter
from neuroada_format.runtime.guards import layers


def same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and not layers(a)


def test_an_integer_weight_is_refused_at_attach_whatever_k():
    net = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    net[0].weight = nn.Parameter(torch.randint(-127, 127, (8, 16), dtype=torch.int8), requires_grad=False)
    before = copy.deepcopy(net)
    for k in (1, 2, 20):  # 20 > d_in of the second layer too: the quantization is the error that is named
        with pytest.raises(NeuroAdaUsageError, match=r"quantized integers \(tensor torch.int8\[8, 16\]\).*"
                                                     r"load the model unquantized") as e:
            attach(net, NeuroAdaConfig(k=k, target_modules=["0", "1"]))
        assert "0.weight" in str(e.value)
        assert same(net, before)


def test_torch_ao_quantized_linears_are_named_when_targeted_and_skipped_by_all_linear(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's own deprecation notes
        q = torch.ao.quantization.quantize_dynamic(net, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(NeuroAdaUsageError, match=r"target module 0 is a torch\.ao\.nn\.quantized.*float weights"):
        attach(q, NeuroAdaConfig(k=1, target_modules=["0"]))
    with pytest.raises(NeuroAdaUsageError, match="no module matches"):
        attach(q, NeuroAdaConfig(k=1, target_modules="all-linear"))
    assert not layers(q)
    # an adapter made on the float model names the quantized module it cannot load into
    attach(net, NeuroAdaConfig(k=1, target_modules=["0"]))
    save_adapter(net, tmp_path / "a")
    with pytest.raises(NeuroAdaError, match=r"rule 4\.1: the model's 0 is a torch\.ao\.nn\.quantized.*not a linear"):
        load_adapter(q, tmp_path / "a")


def bnb_model(kind: str, seed=0):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    plain = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    if kind == "4bit":
        q = nn.Sequential(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4"), nn.Linear(32, 16))
    else:
        q = nn.Sequential(bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False), nn.Linear(32, 16))
    q.load_state_dict(plain.state_dict())
    return plain, q.to("cpu")  # bitsandbytes quantizes on the move to a device


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bitsandbytes_layers_are_refused_at_attach_and_load(kind, tmp_path):
    plain, q = bnb_model(kind)
    assert not q[0].weight.is_floating_point()  # really quantized
    state = {k: v.clone() for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)}
    for k in (1, 2):
        with pytest.raises(NeuroAdaUsageError, match="quantized integers.*Params|quantized integers.*Int8") as e:
            attach(q, NeuroAdaConfig(k=k, target_modules=["0", "1"]))
        assert "0.weight" in str(e.value) and "unquantized" in str(e.value)
    assert not layers(q) and all(torch.equal(v, q.state_dict()[k]) for k, v in state.items())
    # an adapter made on the float model does not load onto the quantized one either
    attach(plain, NeuroAdaConfig(k=2, target_modules=["0", "1"]))
    save_adapter(plain, tmp_path / "a")
    with pytest.raises(NeuroAdaUsageError, match="quantized integers"):
        load_adapter(q, tmp_path / "a")
    assert not layers(q)


def test_a_compiled_model_is_told_to_load_before_compiling(tmp_path):
    """torch.compile's wrapper prefixes every module name with _orig_mod., so an adapter's keys find no layer; the
    4.1 error says why instead of calling a float Linear "not a linear layer"."""
    from tiny_hf import tiny_llama

    plain = tiny_llama()
    attach(plain, NeuroAdaConfig(k=1, target_modules=["q_proj"]))
    save_adapter(plain, tmp_path / "a")
    compiled = torch.compile(tiny_llama(), backend="eager")
    with pytest.raises(NeuroAdaError, match="rule 4.1: no linear layer.*torch.compile'd model.*before compiling"):
        load_adapter(compiled, tmp_path / "a")
    # a second adapter onto a model compiled after its first: the wrapper forwards attribute lookups, so the 4.1
    # check found the adapted layer and called it "a NeuroAdaLayer, not a linear layer with float weights"
    compiled = torch.compile(attach(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["q_proj"])), backend="eager")
    with pytest.raises(NeuroAdaError, match="rule 4.1: no linear layer.*torch.compile'd model.*before compiling"):
        load_adapter(compiled, tmp_path / "a", adapter_name="second")
    assert list_adapters(compiled._orig_mod) == ["default"]
