"""attach(): which modules are targeted (PEFT's own selection is the reference), what becomes
trainable, which mode "auto" picks, and that refused input leaves the model untouched."""

from __future__ import annotations

import copy
import re

import numpy as np
import os

import pytest
import torch
from torch import nn

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.runtime import (NeuroAdaConfig, NeuroAdaLayer, attach, print_trainable_parameters,
                                     merge_and_unload, save_adapter, trainable_parameters)
from neuroada_format.runtime.guards import layers
from neuroada_format.runtime.targets import find_targets

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def tiny_llama(tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": tiny_llama, "llama-tied": lambda: tiny_llama(tie=True), "gpt2": tiny_gpt2}


def peft_targets(make, **kw):
    """The module names PEFT's LoRA wraps for the same config, on a fresh copy of the model."""
    pm = peft.get_peft_model(make(), peft.LoraConfig(r=1, **kw))
    return {n.removeprefix("base_model.model.") for n in pm.targeted_module_names}


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [n for n, _ in model.named_modules()])


def assert_untouched(model, snap):
    state, grads, names = snap
    assert [n for n, _ in model.named_modules()] == names
    assert not layers(model)
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


# -- target selection -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_all_linear_is_what_peft_selects(arch):
    make = MODELS[arch]
    ours = set(find_targets(make(), NeuroAdaConfig(target_modules="all-linear")))
    assert ours == peft_targets(make, target_modules="all-linear")
    assert "lm_head" not in ours and ours
    kinds = {type(m) for n, m in make().named_modules() if n in ours}
    assert kinds == ({Conv1D} if arch == "gpt2" else {nn.Linear})
    assert set(find_targets(make(), NeuroAdaConfig(target_modules="ALL-LINEAR"))) == ours  # PEFT: any case


def tiny_classifier(kind):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=64, num_labels=3)
        return transformers.BertForSequenceClassification(cfg).eval()
    cfg = transformers.RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     vocab_size=64, num_labels=3)
    return transformers.RobertaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_all_linear_leaves_a_classification_head_out(kind):
    """A classifier is not an output embedding; like PEFT for SEQ_CLS, "all-linear" leaves it (and, RoBERTa's being
    two linears, everything inside it) to be trained whole, not given k deltas per row of a random init."""
    ours = set(find_targets(tiny_classifier(kind), NeuroAdaConfig(target_modules="all-linear")))
    assert ours and not any(n == "classifier" or n.startswith("classifier.") for n in ours)
    assert "bert.encoder.layer.0.attention.self.query" in ours or "roberta.encoder.layer.0.attention.self.query" in ours
    if kind == "bert":
        assert ours == peft_targets(lambda: tiny_classifier(kind), target_modules="all-linear", task_type="SEQ_CLS")


SPECS = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules=["self_attn.q_proj"])),                    # dotted suffix
    ("llama", dict(target_modules=["model.layers.1.mlp.down_proj"])),        # exact full name
    ("llama", dict(target_modules=r"model\.layers\.0\..*_proj")),            # regex, full match
    ("llama", dict(target_modules=r".*\.(k|o)_proj")),
    ("llama", dict(target_modules="all-linear", exclude_modules=["down_proj", "self_attn.k_proj"])),
    ("llama", dict(target_modules=r".*proj", exclude_modules=r"model\.layers\.1\..*")),
    ("llama-tied", dict(target_modules=["lm_head", "q_proj"])),              # the head when named
    ("gpt2", dict(target_modules=["c_attn"])),
    ("gpt2", dict(target_modules="all-linear", exclude_modules=["c_proj"])),  # attn.c_proj and mlp.c_proj
]


@pytest.mark.parametrize("arch,spec", SPECS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(SPECS)])
def test_target_and_exclude_modules_follow_peft(arch, spec):
    make = MODELS[arch]
    assert set(find_targets(make(), NeuroAdaConfig(**spec))) == peft_targets(make, **spec)


def test_matching_is_not_a_substring_or_search():
    model = tiny_llama()
    # "attn.q_proj" is a substring of "self_attn.q_proj" but not a dotted suffix
    with pytest.raises(NeuroAdaError, match="no module matches"):
        find_targets(model, NeuroAdaConfig(target_modules=["attn.q_proj"]))
    # a regex must match the whole name: "layers\.0\..*proj" alone matches nothing
    with pytest.raises(NeuroAdaError, match="no module matches") as err:
        find_targets(model, NeuroAdaConfig(target_modules=r"layers\.0\..*proj"))
    assert "pass a list" not in str(err.value)  # (as a list it matches nothing either)
    # a plain name as a string (PEFT's rule too): the error says why and what matches it as a suffix
    with pytest.raises(NeuroAdaError, match=r"no module matches target_modules='q_proj' \(a string is a regex that "
                                            r"must match the whole module name; .* target_modules=\['q_proj'\]\)"):
        find_targets(model, NeuroAdaConfig(target_modules="q_proj"))
    assert find_targets(model, NeuroAdaConfig(target_modules=r".*layers\.0\..*q_proj")) == \
        ["model.layers.0.self_attn.q_proj"]



@pytest.mark.parametrize("spec", [dict(target_modules=["all-linear"]), dict(target_modules=["all-linear", "q_proj"]),
                                  dict(target_modules=("ALL-LINEAR",)), dict(exclude_modules=["all-linear"])])
def test_all_linear_inside_a_list_is_refused_as_a_shorthand(spec):
    """"all-linear" is a shorthand only as the whole string; inside a list it was matched as a module name, so
    ["all-linear", "q_proj"] silently adapted q_proj alone (and ["all-linear"] said only "no module matches")."""
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(NeuroAdaError, match="'all-linear' is a shorthand only as the whole value"):
        attach(model, NeuroAdaConfig(k=2, **spec))
    assert_untouched(model, snap)


@pytest.mark.parametrize("spec", [["mlp"], ["q_proj", "input_layernorm"], r"model\.embed_tokens", r".*"])
def test_non_linear_target_is_refused_and_model_untouched(spec):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(NeuroAdaError, match="nn.Linear and transformers Conv1D"):
        attach(model, NeuroAdaConfig(k=2, target_modules=spec))
    assert_untouched(model, snap)


@pytest.mark.parametrize("bad", [dict(config=NeuroAdaConfig(k=65)), dict(adapter_name="a.b"), dict(adapter_name=""),
                                 dict(config=NeuroAdaConfig(target_modules=["nothing"]))])
def test_refused_attach_leaves_model_untouched(bad):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(NeuroAdaError) as err:
        attach(model, **bad)
    if "config" in bad and bad["config"].k == 65:
        assert err.value.rule == "3.4" and err.value.tensor.endswith(".weight")
    assert_untouched(model, snap)


def test_second_adapter_same_name_refused():
    model = attach(tiny_llama(), NeuroAdaConfig(k=1))
    with pytest.raises(NeuroAdaError, match="already attached"):
        attach(model, NeuroAdaConfig(k=1))


def test_already_wrapped_layers_are_targets_again_and_head_stays_out():
    model = attach(tiny_llama(), NeuroAdaConfig(k=1))
    attach(model, NeuroAdaConfig(k=2), "second")
    assert all({"default", "second"} <= set(l.neuroada_idx.keys()) for l in layers(model).values())
    assert not any(isinstance(m, NeuroAdaLayer) for n, m in model.named_modules() if ".base_layer" in n)
    assert "lm_head" not in layers(model)


# -- what trains -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,k", [("llama", 3), ("gpt2", 2), ("llama-tied", 1)])
def test_exactly_k_times_sum_of_d_out_trainable(arch, k, capsys):
    model = MODELS[arch]()
    total_before = sum(p.numel() for p in model.parameters())
    names = find_targets(model, NeuroAdaConfig())
    d_out = 0
    for n in names:
        m = model.get_submodule(n)
        d_out += m.weight.shape[1] if isinstance(m, Conv1D) else m.weight.shape[0]
    attach(model, NeuroAdaConfig(k=k))
    trainable, total = trainable_parameters(model)
    assert trainable == k * d_out
    assert total == total_before + k * d_out
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names == {n + ".neuroada_val.default" for n in names}
    for layer in layers(model).values():
        val = layer.neuroada_val["default"]
        assert val.shape == (layer.d_out, k) and val.dtype == torch.float32 and not val.any()
        assert not layer.base_layer.weight.requires_grad
    print_trainable_parameters(model)
    out = capsys.readouterr().out.strip()
    m = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", out)
    assert m, out
    assert int(m[1].replace(",", "")) == k * d_out
    assert int(m[2].replace(",", "")) == total_before + k * d_out
    assert float(m[3]) == pytest.approx(100 * k * d_out / (total_before + k * d_out), abs=1e-4)
    # an unfrozen head counts once; a second adapter's attach freezes the first, whose deltas still count
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)
    attach(model, NeuroAdaConfig(k=1), "second")
    head.weight.requires_grad_(True)
    trainable, total = trainable_parameters(model)
    assert total == total_before + (k + 1) * d_out and trainable == d_out + head.weight.numel()
    print_trainable_parameters(model)
    m = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)",
                     capsys.readouterr().out.strip())
    assert (int(m[1].replace(",", "")), int(m[2].replace(",", ""))) == (trainable, total)


def test_inference_mode_and_bf16_deltas():
    model = attach(tiny_llama(), NeuroAdaConfig(k=2, delta_dtype="bfloat16", inference_mode=True))
    assert trainable_parameters(model)[0] == 0
    assert {l.neuroada_val["default"].dtype for l in layers(model).values()} == {torch.bfloat16}


def test_conv1d_and_linear_selection_use_the_canonical_rows():
    import neuroada_format as naf

    for make in (tiny_llama, tiny_gpt2):
        base = make()
        model = attach(copy.deepcopy(base), NeuroAdaConfig(k=3))
        for name, layer in layers(model).items():
            w = base.get_submodule(name).weight.detach()
            canon = w.t() if isinstance(layer.base_layer, Conv1D) else w
            assert layer.transposed == isinstance(layer.base_layer, Conv1D)
            assert torch.equal(layer.neuroada_idx["default"], torch.from_numpy(naf.select_indices(canon.numpy(), 3)))


# -- mode="auto" -----------------------------------------------------------------------------------
class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.plain = nn.Linear(8, 8)
        self.sub = ScaledLinear(8, 8)
        self.strided = nn.Linear(8, 8)
        self.strided.weight = nn.Parameter(torch.randn(8, 8).t())  # a transposed view: not contiguous
        self.a = nn.Linear(8, 8, bias=False)
        self.b = nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight  # shared

    def forward(self, x):
        return self.b(self.a(self.strided(self.sub(self.plain(x)))))


def test_auto_mode_rule():
    model = attach(Toy(), NeuroAdaConfig(k=2, target_modules=["plain", "sub", "strided", "a", "b"]))
    modes = {n: l.mode for n, l in layers(model).items()}
    assert modes == {"plain": "inplace", "sub": "additive", "strided": "additive", "a": "additive", "b": "additive"}
    forced = attach(Toy(), NeuroAdaConfig(k=2, target_modules=["plain", "a"], mode="additive"))
    assert {l.mode for l in layers(forced).values()} == {"additive"}


def test_tied_head_is_additive_under_auto():
    model = attach(tiny_llama(tie=True), NeuroAdaConfig(k=2, target_modules=["lm_head", "q_proj"]))
    modes = {n: l.mode for n, l in layers(model).items()}
    assert modes.pop("lm_head") == "additive"
    assert set(modes.values()) == {"inplace"}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tie_weights_on_an_attached_model_keeps_the_adapted_head_tied_and_served():
    """transformers calls model.tie_weights() itself (after loading, Trainer, accelerate): with the tied head adapted
    it set `lm_head.weight` on the NeuroAdaLayer and failed with a bare KeyError ("attribute 'weight' already
    exists"). The layer hands weight/bias to its base layer; a weight of another shape is refused."""
    model = attach(tiny_llama(tie=True), NeuroAdaConfig(k=2, target_modules=["lm_head", "q_proj"]))
    _randomized(model)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model(ids).logits, before)
    for other in (torch.zeros(3, 64), torch.zeros(100, 64, dtype=torch.bfloat16)):  # another shape or dtype
        with pytest.raises(NeuroAdaUsageError, match=r"weight of shape \(\d+, 64\) on cpu cannot replace"):
            model.lm_head.weight = nn.Parameter(other)
    with pytest.raises(NeuroAdaUsageError, match=r"NoneType cannot replace"):
        model.lm_head.weight = None
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_saving_after_converting_the_model_to_float64_is_a_clear_refusal(tmp_path):
    """attach refuses an F64 base; model.double() after attach trained, then every save failed on the schema
    ("rule 2.2: ... 'F64' is not one of ['F32','F16','BF16'] (and 13 more problems)")."""
    model = attach(tiny_llama(), NeuroAdaConfig(k=2, target_modules=["q_proj"])).double()
    for save in (lambda: save_adapter(model, tmp_path / "a.safetensors"), lambda: model.save_pretrained(tmp_path / "f")):
        with pytest.raises(NeuroAdaUsageError, match=r"this one is torch.float64 \(converted after attach\?\): "
                                                     r"convert the model back \(e.g. model.float\(\)\) before saving"):
            save()
    assert not (tmp_path / "a.safetensors").exists() and not list((tmp_path / "f").glob("*"))
    save_adapter(model.float(), tmp_path / "a.safetensors")  # what the message says works


def test_zero_deltas_change_nothing():
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    base = tiny_llama()
    with torch.no_grad():
        want = base(ids).logits
        for mode in ("inplace", "additive"):
            model = attach(copy.deepcopy(base), NeuroAdaConfig(k=2, mode=mode))
            got = model(ids).logits
            assert torch.equal(got, want) if mode == "inplace" else torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("bad", [dict(target_modules=5), dict(exclude_modules=[1]), dict(k=True), dict(k=0),
                                 dict(save_dtype="F64"), dict(selection="largest"), dict(mode="sideways"),
                                 dict(delta_dtype="float64")])
def test_config_refuses_bad_values(bad):
    with pytest.raises(NeuroAdaError):
        NeuroAdaConfig(**bad)


def test_config_accepts_peft_collection_forms():
    assert NeuroAdaConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]
    assert NeuroAdaConfig(target_modules=("q_proj",), exclude_modules=("x",)).exclude_modules == ["x"]
    assert NeuroAdaConfig(target_modules=None).to_dict()["target_modules"] == "all-linear"  # PEFT: default targets


# -- modules with hooks --------------------------------------------------------------------------------------
def _randomized(model, name="default", std=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers(model).values():
            v = layer.neuroada_val[name]
            v.copy_(torch.randn(v.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("when", ["before attach", "after attach"])
def test_hooks_on_a_wrapped_linear_run_on_every_path(when):
    """The in-place path runs the GEMM itself, so a hooked linear (accelerate's offloading, activation capture) is
    served additively, base_layer(x) + S(x), as PEFT's LoRA serves it: its hooks run unmerged as merged."""
    from neuroada_format.runtime import adapter_batch, merge, unmerge

    model = tiny_llama()
    seen = []

    def hook(module, args, out):
        seen.append(out.detach().clone())

    q = model.model.layers[0].self_attn.q_proj
    if when == "before attach":
        q.register_forward_hook(hook)
    attach(model, NeuroAdaConfig(k=2))
    _randomized(model)
    layer = model.model.layers[0].self_attn.q_proj
    if when == "after attach":
        layer.base_layer.register_forward_hook(hook)
    assert layer.mode == ("additive" if when == "before attach" else "inplace")
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert len(seen) == 1 and layer.neuroada_val["default"].grad.abs().sum() > 0  # the deltas still train
    model.eval()
    with torch.no_grad():
        unmerged = model(ids).logits
        merge(model)
        merged = model(ids).logits
        unmerge(model)
        with adapter_batch(model, ["default", None]):
            model(ids)
    assert len(seen) == 4
    torch.testing.assert_close(unmerged, merged, rtol=1e-5, atol=1e-5)


def test_offloaded_adapter_tensors_are_refused_not_served():
    accelerate = pytest.importorskip("accelerate")
    from neuroada_format.runtime import adapter_batch

    model = _randomized(attach(tiny_llama(), NeuroAdaConfig(k=2)))
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with pytest.raises(NeuroAdaError, match="meta device"):
            model(ids)
        with pytest.raises(NeuroAdaError, match="meta device"):
            with adapter_batch(model, ["default", None]):
                model(ids)


def test_an_offloaded_model_is_refused_by_merge_and_save_before_anything_changes(tmp_path):
    """After accelerate offloads an attached model, merge_and_unload merged the layers before the first offloaded one
    and then failed (half-merged), and save_adapter / save_pretrained failed on torch's "Cannot copy out of meta
    tensor", naming nothing."""
    accelerate = pytest.importorskip("accelerate")
    from neuroada_format.runtime import merge_and_unload

    model = _randomized(attach(tiny_llama(), NeuroAdaConfig(k=2)))
    accelerate.dispatch_model(model, device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                                                 "model.layers.1": "disk", "model.norm": "cpu",
                                                 "model.rotary_emb": "cpu", "lm_head": "cpu"},
                              offload_dir=str(tmp_path / "offload"))
    weights = {n: l.weight.detach().clone() for n, l in layers(model).items() if not l.weight.is_meta}
    with pytest.raises(NeuroAdaError, match="meta device"):
        merge_and_unload(model)
    assert not any(l.merged for l in layers(model).values())
    assert all(torch.equal(layers(model)[n].weight, w) for n, w in weights.items())
    for save in (lambda: save_adapter(model, tmp_path / "a"), lambda: model.save_pretrained(tmp_path / "b")):
        with pytest.raises(NeuroAdaError, match=r"model\.layers\.1\..*offloaded.*save before offloading"):
            save()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_attach_to_an_offloaded_model_says_so(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(NeuroAdaError, match="offloaded by accelerate.*max_memory"):
        attach(model, NeuroAdaConfig(k=2))


def test_base_weights_loaded_after_attach_are_refused_and_zero_weights_warned():
    """Built on the meta device, to_empty, attach, then the checkpoint: the adapted layers' keys had moved (X.weight ->
    X.base_layer.weight), so load_state_dict(strict=False) (and accelerate's loader, which only logs unused keys) left
    every adapted layer at its empty values, and attach had selected columns 0..k-1 from them: training went on
    without a word."""
    source = tiny_llama()
    with torch.device("meta"):
        model = type(source)(source.config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    with pytest.warns(UserWarning, match=r"14 of 14 target weights are all zeros .*load them before it"):
        attach(model, NeuroAdaConfig(k=2))
    with pytest.raises(NeuroAdaError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight: the state holds the base "
                                            r"weight of an adapted layer.*load the base weights first, then attach"):
        model.load_state_dict(source.state_dict(), strict=False)
    assert not model.model.embed_tokens.weight.any()  # refused before anything loaded


@pytest.mark.parametrize("mode", ["inplace", "additive"])
def test_second_derivatives_work_additively_and_are_refused_in_place(mode):
    """A gradient penalty differentiates the backward itself; the in-place backward writes into W, which no graph
    can record, so it says to use the additive mode, whose second derivative equals a dense reference's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8))
    attach(net, NeuroAdaConfig(k=2, target_modules=["0"], mode=mode))
    layer = net[0]
    with torch.no_grad():
        layer.neuroada_val["default"].normal_(0, 0.1)
    x = torch.randn(4, 16, requires_grad=True)
    gx, = torch.autograd.grad((net(x) ** 2).sum(), x, create_graph=False)  # first order: fine either way
    if mode == "inplace":
        with pytest.raises(NeuroAdaError, match="mode='additive'"):
            torch.autograd.grad((net(x) ** 2).sum(), x, create_graph=True)
        return
    gx, = torch.autograd.grad((net(x) ** 2).sum(), x, create_graph=True)
    (gx ** 2).sum().backward()
    got = layer.neuroada_val["default"].grad
    idx, val = layer.neuroada_idx["default"], layer.neuroada_val["default"].detach().clone().requires_grad_(True)
    W = layer.base_layer.weight.detach()
    Weff = W.scatter(1, idx, W.gather(1, idx) + val)
    y = torch.nn.functional.linear(x, Weff, layer.base_layer.bias.detach())
    rgx, = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
    (rgx ** 2).sum().backward()
    torch.testing.assert_close(got, val.grad, rtol=1e-4, atol=1e-5)


def test_attach_and_load_refuse_bases_the_format_cannot_describe(tmp_path):
    from neuroada_format import NeuroAdaUsageError
    from neuroada_format.runtime import load_adapter, save_adapter

    model = tiny_llama().double()
    snap = snapshot(model)
    with pytest.raises(NeuroAdaUsageError, match="F32, F16 and BF16 base weights, this one is torch.float64"):
        attach(model, NeuroAdaConfig(k=1))
    assert_untouched(model, snap)
    saved = save_adapter(attach(tiny_llama(), NeuroAdaConfig(k=1)), tmp_path / "a.safetensors")
    with torch.device("meta"):
        meta = tiny_llama()
    snap = snapshot(meta)
    for call in (lambda: attach(meta, NeuroAdaConfig(k=1, selection="random")), lambda: load_adapter(meta, saved)):
        with pytest.raises(NeuroAdaUsageError, match="meta device"):
            call()
        assert [n for n, _ in meta.named_modules()] == snap[2] and not layers(meta)


def test_training_a_merged_adapter_warns_and_unmerge_trains_it():
    """Merged, the deltas are folded into a constant weight: a training step would silently change nothing."""
    from neuroada_format.runtime import merge, unmerge

    model = _randomized(attach(tiny_llama(), NeuroAdaConfig(k=2)))
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    model.train()
    for serve in (lambda: merge(model), lambda: merge(model, ["default"])):
        serve()
        with pytest.warns(UserWarning, match="merged into the weights.*unmerge"):
            loss = model(input_ids=ids, labels=ids).loss
        assert not loss.requires_grad  # (with anything else trainable, a step would run and skip the deltas)
        with torch.no_grad():  # evaluating a merged model is what merging is for: no warning
            import warnings as w
            with w.catch_warnings():
                w.simplefilter("error")
                model(input_ids=ids)
        unmerge(model)
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(l.neuroada_val["default"].grad.abs().sum() > 0 for l in layers(model).values())
        model.zero_grad(set_to_none=True)


def test_adapted_layers_keep_the_models_train_or_eval_mode(tmp_path):
    """A new module trains: attach and load_adapter on an eval() model left every adapted layer (and its adapters'
    containers) in training mode under a model that said eval, so merging and serving it with grad enabled warned
    that the merged deltas get no gradient. Now each layer takes the mode of the layer it replaces, both ways."""
    from neuroada_format.runtime import load_adapter, merge

    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    model = attach(tiny_llama(), NeuroAdaConfig(k=2))
    assert not model.training and not any(m.training for m in model.modules())
    save_adapter(model, tmp_path / "a")
    served = load_adapter(tiny_llama(), tmp_path / "a", is_trainable=True)
    assert not any(m.training for m in served.modules())
    merge(model)
    import warnings as w
    with w.catch_warnings():
        w.simplefilter("error")
        model(input_ids=ids)  # grad enabled, eval mode: serving, not training
    trains = attach(tiny_llama().train(), NeuroAdaConfig(k=2))
    assert all(m.training for m in trains.modules())


@pytest.mark.parametrize("tie", [False, True])
def test_resize_token_embeddings_of_an_adapted_head_is_refused_before_anything_changes(tie):
    """With lm_head a target, transformers resized the input embeddings, then failed on the head with a raw TypeError
    (not an nn.Linear): a half-resized model. Refused now before anything changes; with the head not adapted, the
    resize is transformers' own and the adapted layers keep working."""
    model = tiny_llama(tie=tie)
    attach(model, NeuroAdaConfig(k=2, target_modules=["lm_head", "q_proj"]))
    emb = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(NeuroAdaUsageError, match="resize before attach"):
        model.resize_token_embeddings(108)
    assert torch.equal(model.get_input_embeddings().weight, emb) and model.config.vocab_size == 100

    model = tiny_llama(tie=tie)
    attach(model, NeuroAdaConfig(k=2, target_modules=["q_proj"]))
    model.resize_token_embeddings(108)
    assert model.config.vocab_size == 108 and len(layers(model)) == 2
    assert model(input_ids=torch.tensor([[1, 107]])).logits.shape == (1, 2, 108)


def test_set_adapter_back_to_an_attached_adapter_trains_it_again():
    """PEFT's multi-task habit: attach A and train it, attach B and train it, set_adapter(A) and train A again.
    Attaching B froze A's deltas, and set_adapter used to read "frozen" as "loaded for inference": A was served
    merged and never trained again (silently, when anything else required grad). Trainability now comes from the
    adapter's config, and, as in PEFT, only the active adapter's deltas require grad."""
    from neuroada_format.runtime import merged_adapter, set_adapter

    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    model = attach(tiny_llama(), NeuroAdaConfig(k=2))
    attach(model, NeuroAdaConfig(k=1), "b")
    set_adapter(model, "default")
    assert merged_adapter(model) is None
    model.lm_head.requires_grad_(True)  # something else trains too: the failure used to be silent
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("neuroada_val.default") for n in trainable)
    assert not any(n.endswith("neuroada_val.b") for n in trainable)
    assert trainable_parameters(model)[0] == model.lm_head.weight.numel() + sum(
        l.neuroada_val["default"].numel() for l in layers(model).values())
    before = {n: l.neuroada_val["default"].detach().clone() for n, l in layers(model).items()}
    b_before = {n: l.neuroada_val["b"].detach().clone() for n, l in layers(model).items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(not torch.equal(before[n], l.neuroada_val["default"]) for n, l in layers(model).items())
    assert all(torch.equal(b_before[n], l.neuroada_val["b"]) for n, l in layers(model).items())
    set_adapter(model, "b")  # and the other way: b trains, default is frozen
    assert all(l.neuroada_val["b"].requires_grad and not l.neuroada_val["default"].requires_grad
               for l in layers(model).values())
    set_adapter(model, None)  # the base: no adapter trains
    assert not any(v.requires_grad for l in layers(model).values() for v in l.neuroada_val.values())
    set_adapter(model, "default")  # parked by set_adapter, so it trains again
    assert merged_adapter(model) is None and all(l.neuroada_val["default"].requires_grad for l in layers(model).values())
    model.requires_grad_(False)  # frozen by the user: served merged, as an inference adapter
    set_adapter(model, "b")
    set_adapter(model, "default")
    assert merged_adapter(model) == "default"


@pytest.mark.parametrize("how", ["deepcopy", "torch.save", "assign"])
def test_a_paused_adapter_still_trains_again_after_the_model_is_copied(how):
    """The pause (attach of another adapter froze A's deltas) was marked on the delta Parameter itself, which
    copy.deepcopy and load_state_dict(assign=True) drop: set_adapter(copy, A) then served A merged, and the
    training went on without a word, A's deltas never changing. The layer keeps the mark now."""
    import io

    from neuroada_format.runtime import merged_adapter, set_adapter

    model = attach(tiny_llama(), NeuroAdaConfig(k=2, target_modules=["q_proj"]))
    attach(model, NeuroAdaConfig(k=1, target_modules=["q_proj"]), "b")
    if how == "deepcopy":
        model = copy.deepcopy(model)
    elif how == "torch.save":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        model = torch.load(buf, weights_only=False)
    else:
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    set_adapter(model, "default")
    assert merged_adapter(model) is None
    assert all(l.neuroada_val["default"].requires_grad and not l.neuroada_val["b"].requires_grad
               for l in layers(model).values())


def test_a_linear_registered_under_two_names_is_refused_naming_both():
    """`self.b = self.a`: named_modules lists the module once, so it was wrapped as `a` only and the forward through
    `b` ran without the delta (0.096 off a dense reference), and merge blamed 'tied weights'."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a
            self.c = nn.Linear(8, 8)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    net = Twice()
    with pytest.raises(NeuroAdaUsageError, match=r"a\.weight: this linear layer is also registered as 'b'"):
        attach(net, NeuroAdaConfig(k=2, target_modules="all-linear"))
    assert not layers(net) and net.a is net.b
    attach(net, NeuroAdaConfig(k=2, target_modules=["c"]))  # what it says: leave it out
    assert sorted(layers(net)) == ["c"]


def test_serving_and_saving_follow_a_base_edited_while_an_adapter_is_served(tmp_path):
    """An edit of the base while adapter a is served merged: switching away put a's originals back (the edit is lost
    at a's own entries, which hold merged values) and marked the weight as matching every w0, so b was then served
    from its stale originals. A state dict or to_adapter taken after an edit, before any forward, held the old
    originals (and the model's own state refused to load back). Both read the weight as it is now."""
    from neuroada_format.runtime import load_adapter, set_adapter, to_adapter

    model = _randomized(attach(tiny_llama(), NeuroAdaConfig(k=2, target_modules=["q_proj"])))
    save_adapter(model, tmp_path / "a.safetensors")
    attach(model, NeuroAdaConfig(k=2, target_modules=["q_proj"], selection="random"), "b")
    save_adapter(_randomized(model, "b"), tmp_path / "b.safetensors", "b")
    served = load_adapter(tiny_llama(), tmp_path / "a.safetensors", "a")
    load_adapter(served, tmp_path / "b.safetensors", "b")
    q = served.model.layers[0].self_attn.q_proj
    set_adapter(served, "a")
    with torch.no_grad():
        q.weight.add_(0.25)
    set_adapter(served, None)
    now = q.weight.detach().clone()
    set_adapter(served, "b")
    idx, val = q.neuroada_idx["b"], q.neuroada_val["b"].detach()
    assert torch.equal(q.weight, now.scatter(1, idx, now.gather(1, idx) + val))
    set_adapter(served, None)
    with torch.no_grad():  # an edit, then a save and a state with no forward between
        q.weight.mul_(2)
    state = {k: v.clone() for k, v in served.state_dict().items()}
    assert torch.equal(state["model.layers.0.self_attn.q_proj.neuroada_w0.b"], q.weight.detach().gather(1, idx))
    key = "model.layers.0.self_attn.q_proj.weight"
    saved_first = to_adapter(served, "b").targets[key].probe
    served(torch.zeros(1, 2, dtype=torch.long))
    assert to_adapter(served, "b").targets[key].probe == saved_first  # the same with or without a forward
    served.load_state_dict(state)  # the model's own state loads back
    set_adapter(served, "a")
    with pytest.raises(NeuroAdaUsageError, match=r"cannot replace the weight of a layer with merged adapters \(a\)"):
        q.weight = nn.Parameter(q.weight.detach().clone())


def test_merge_of_no_names_merges_nothing_and_set_adapter_of_a_list_is_refused():
    """merge(model, []) merged the active adapters (`names or active`); PEFT merges nothing. set_adapter(model,
    ["a"]) failed with a bare TypeError (unhashable list)."""
    from neuroada_format.runtime import merge, set_adapter

    model = _randomized(attach(tiny_llama(), NeuroAdaConfig(k=2, target_modules=["q_proj"])))
    merge(model, [])
    assert not any(l.merged_adapters for l in layers(model).values())
    with pytest.raises(NeuroAdaUsageError, match=r"set_adapter takes one adapter name \(or None\), not list"):
        set_adapter(model, ["default"])
    merge(model)
    assert all(l.merged_adapters == ["default"] for l in layers(model).values())


def test_set_adapter_on_a_trainable_adapter_trains_it(tmp_path):
    """PEFT's habit: load an adapter trainable (or attach two), set_adapter to it, train. set_adapter used to serve
    every adapter merged, so the training forward warned and backward failed (nothing required grad). A trainable
    adapter is now made active unmerged and trains; its outputs are the merged ones bit for bit; an adapter loaded
    for inference is still served merged, and switching between the two kinds works both ways."""
    from neuroada_format.runtime import ServingLayer, load_adapter, save_adapter, set_adapter

    base = _randomized(attach(tiny_llama(), NeuroAdaConfig(k=2)))
    save_adapter(base, tmp_path / "a")
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    load_adapter(model, tmp_path / "a", "served")
    load_adapter(model, tmp_path / "a", "tuned", is_trainable=True)
    set_adapter(model, "served")
    assert all(isinstance(l, ServingLayer) and l.merged_adapters == ["served"] for l in layers(model).values())
    with torch.no_grad():
        want = model(input_ids=ids).logits
    set_adapter(model, "tuned")
    assert all(not isinstance(l, ServingLayer) and not l.merged and l.active_adapters == ["tuned"]
               for l in layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)  # unmerged in place: the merged bits
    model.train()
    import warnings as w
    with w.catch_warnings():
        w.simplefilter("error")
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(l.neuroada_val["tuned"].grad.abs().sum() > 0 for l in layers(model).values())
    assert all(l.neuroada_val["served"].grad is None for l in layers(model).values())
    model.eval()
    set_adapter(model, "served")  # and back: merged serving of the other, the base untouched in between
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    set_adapter(model, None)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)


def test_a_classifier_is_told_its_new_head_is_frozen():
    """task_type="SEQ_CLS": PEFT trains the new (random) head by itself (modules_to_save); here the base is frozen
    with it, so attach warns, naming the head and the line that trains it. No warning once the head trains, nor
    for a causal LM."""
    import warnings as w

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, num_labels=3, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(cfg)
    with pytest.warns(UserWarning, match=r"head 'score' is frozen.*requires_grad_\(True\)"):
        attach(model, NeuroAdaConfig(k=2, task_type="SEQ_CLS"))
    assert "score" not in layers(model) and not model.score.weight.requires_grad
    model.get_submodule("score").requires_grad_(True)  # as the warning says: it now trains beside the deltas
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
    assert model.score.weight.grad is not None
    with w.catch_warnings():
        w.simplefilter("error")
        attach(tiny_llama(), NeuroAdaConfig(k=2, task_type="CAUSAL_LM"))
        unfrozen = transformers.LlamaForSequenceClassification(cfg)
        attach(unfrozen, NeuroAdaConfig(k=2, task_type="SEQ_CLS", target_modules=["q_proj", "score"]))  # adapted


def test_target_modules_none_means_the_default_targets():
    """PEFT reads target_modules=None as "the method's default targets"; it used to end in "no module matches
    target_modules=None"."""
    assert NeuroAdaConfig(k=1, target_modules=None).target_modules == "all-linear"
    a, b = attach(tiny_llama(), NeuroAdaConfig(k=1, target_modules=None)), attach(tiny_llama(), NeuroAdaConfig(k=1))
    assert sorted(layers(a)) == sorted(layers(b)) and layers(a)


def test_save_adapter_onto_a_path_of_the_other_kind_is_a_usage_error(tmp_path):
    """A folder named *.safetensors (left by a save to 'task.safetensors/') or a plain file where a folder would go
    raised IsADirectoryError / FileExistsError from deep in the write; both are refused up front, naming the path,
    and what lies there is left alone."""
    from neuroada_format.runtime import save_adapter

    model = attach(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["q_proj"]))
    (tmp_path / "task.safetensors").mkdir()
    (tmp_path / "notes").write_text("hello")
    with pytest.raises(NeuroAdaUsageError, match="a folder exists at this path") as e:
        save_adapter(model, tmp_path / "task.safetensors")
    assert str(tmp_path / "task.safetensors") in str(e.value) and not list((tmp_path / "task.safetensors").iterdir())
    with pytest.raises(NeuroAdaUsageError, match="a file exists at this path"):
        save_adapter(model, tmp_path / "notes")
    with pytest.raises(NeuroAdaUsageError, match="is a file, so no folder can be made"):
        save_adapter(model, tmp_path / "notes" / "sub" / "a.safetensors")
    assert (tmp_path / "notes").read_text() == "hello"
    assert save_adapter(model, tmp_path / "task.safetensors" / "a.safetensors")  # inside the folder: fine


@pytest.mark.parametrize("name", ["adapter.bin", "adapter_model.BIN", "weights.pt", "task.pth", "delta.gguf"])
def test_save_adapter_to_a_file_name_of_another_format_is_refused(tmp_path, name):
    """PEFT's habit, save to "adapter.bin", made a folder named adapter.bin holding our two files: only .safetensors
    saves one file, so a name that says another file format is refused, with the .safetensors name to use; nothing is
    written. A folder of that name that exists already is the user's choice and is saved into."""
    from neuroada_format.runtime import save_adapter

    model = attach(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["q_proj"]))
    stem = os.path.splitext(name)[0]
    with pytest.raises(NeuroAdaUsageError, match=rf"names a file.*{stem}\.safetensors") as e:
        save_adapter(model, tmp_path / name)
    assert str(tmp_path / name) in str(e.value) and not list(tmp_path.iterdir())
    (tmp_path / name).mkdir()
    assert save_adapter(model, tmp_path / name)  # an existing folder of that name: saved into


def test_save_pretrained_says_which_transformers_options_it_ignores(tmp_path):
    """variant / max_shard_size / save_function / safe_serialization=False change what transformers writes; an
    attached model's files are fixed, and they were ignored without a word. Options that change nothing pass
    quietly (Trainer's own call warns about nothing)."""
    import warnings as w

    model = attach(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match=r"ignored: variant='v2', max_shard_size='1KB', safe_serialization=False"):
        model.save_pretrained(tmp_path / "a", variant="v2", max_shard_size="1KB", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.safetensors", "neuroada_config.json",
                                                                 "neuroada_model.safetensors"]
    with w.catch_warnings():
        w.simplefilter("error")
        model.save_pretrained(tmp_path / "b", safe_serialization=True, token=None, state_dict=None)


def test_unfreezing_the_base_after_attach_says_how_to_train_it():
    """A full fine-tuning habit, model.requires_grad_(True) after attach, met an error that said "use the additive
    mode" without saying where that is chosen; it changed nothing. With mode='additive' both train."""
    model = _randomized(attach(tiny_llama(), NeuroAdaConfig(k=2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.requires_grad_(True)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NeuroAdaUsageError, match=r"unfrozen after attach.*NeuroAdaConfig\(\.\.\., mode='additive'\)"):
        model(input_ids=ids, labels=ids)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    both = attach(tiny_llama(), NeuroAdaConfig(k=2, mode="additive")).requires_grad_(True)
    both(input_ids=ids, labels=ids).loss.backward()
    q = both.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.grad is not None and q.neuroada_val["default"].grad is not None


def test_each_warning_points_at_the_callers_line(tmp_path):
    """A warning names the line that caused it. Fixed stacklevels pointed into our own decorators (runtime/model.py's
    ``return func(model, *args, **kwargs)`` for attach's frozen-head warning, _ModelMethod for save_pretrained's) or
    into torch (Module.__call__ for a training forward through a merged adapter): the user saw a library line, and
    Python's once-per-location filter merged warnings from different calls."""
    import json

    from neuroada_format.runtime import load_adapter

    def here(make, match):
        with pytest.warns(UserWarning, match=match) as record:
            make()
        assert {r.filename for r in record if re.search(match, str(r.message))} == {__file__}

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, num_labels=3, pad_token_id=0)
    here(lambda: attach(transformers.LlamaForSequenceClassification(cfg), NeuroAdaConfig(k=1, task_type="SEQ_CLS")),
         "is frozen with the base")
    zeros = tiny_llama()
    with torch.no_grad():
        zeros.model.layers[0].self_attn.q_proj.weight.zero_()
    here(lambda: attach(zeros, NeuroAdaConfig(k=1, target_modules=["q_proj"])), "all zeros")
    model = _randomized(attach(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["q_proj"])))
    model.lm_head.requires_grad_(True)
    here(lambda: model.save_pretrained(tmp_path / "a", max_shard_size="1KB"), "ignored: max_shard_size")
    here(lambda: load_adapter(tiny_llama(), tmp_path / "a"), "also holds 1 trained tensor")
    other = attach(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["q_proj"], delta_dtype="bfloat16"))
    from safetensors.torch import load_file
    here(lambda: other.load_state_dict(load_file(tmp_path / "a" / "model.safetensors"), strict=False), "delta_dtype")
    from neuroada_format.runtime import merge
    merge(model)
    model.train()
    here(lambda: model(input_ids=torch.zeros(1, 3, dtype=torch.long)), "merged into the weights")
    config = tmp_path / "a" / "neuroada_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "from_the_future": 1}))
    here(lambda: load_adapter(tiny_llama(), tmp_path / "a"), "unknown key")


def test_a_bf16_nan_payload_in_the_base_survives_attach_forward_and_the_probe(tmp_path):
    """torch's CPU gather rewrites a bf16 NaN (0x7fc1 came back 0xffff): attach read the original entries that way,
    the first forward wrote them back into the base, and the probe hash was not the base's (validate: rule 4.3)."""
    import neuroada_format as naf
    from neuroada_format.runtime import save_adapter

    lin = nn.Sequential(nn.Linear(4, 3, bias=False)).to(torch.bfloat16)
    with torch.no_grad():
        lin[0].weight.view(torch.int16)[1, 2] = 0x7FC1  # a quiet NaN with a payload
    before = lin[0].weight.detach().view(torch.int16).clone()
    base = {"0.weight": lin[0].weight.detach().float().numpy().astype(naf.dtypes.NUMPY_DTYPES["BF16"])}
    base["0.weight"].view(np.int16)[...] = before.numpy()
    attach(lin, NeuroAdaConfig(k=4))  # every column: the NaN is selected
    with torch.no_grad():
        lin(torch.ones(2, 4, dtype=torch.bfloat16))
    assert torch.equal(lin[0].base_layer.weight.detach().view(torch.int16), before)
    save_adapter(lin, tmp_path / "a.safetensors")
    assert naf.validate(tmp_path / "a.safetensors", base=base).ok


def test_a_non_contiguous_weight_is_said_up_front():
    """A Linear whose weight is a transposed view: auto picks additive and trains it; mode='inplace' used to be
    accepted and fail at the first forward; merge advised 'use the additive mode' (the mode in use) after the layers
    before it were already merged. Both are refused before anything changes, naming the weight."""
    from neuroada_format.runtime import merge

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 5), nn.Linear(6, 5))
        m[1].weight = nn.Parameter(torch.randn(6, 5).t())  # same shape, other strides
        return m

    with pytest.raises(NeuroAdaUsageError, match="not contiguous"):
        attach(model(), NeuroAdaConfig(k=2, target_modules=["0", "1"], mode="inplace"))
    m = attach(model(), NeuroAdaConfig(k=2, target_modules=["0", "1"]))
    assert [l.mode for l in layers(m).values()] == ["inplace", "additive"]
    with torch.no_grad():
        for l in layers(m).values():
            l.neuroada_val["default"].fill_(0.25)
    before = [l.weight.detach().clone() for l in layers(m).values()]
    with pytest.raises(NeuroAdaUsageError, match=r"1\.weight.*not contiguous"):
        merge(m)
    assert all(not l.merged for l in layers(m).values())  # nothing half-merged
    assert all(torch.equal(b, l.weight) for b, l in zip(before, layers(m).values()))


# -- torch's own transformer modules ---------------------------------------------------------------------------------
class _VitBlock(nn.Module):
    """The shape of torchvision's ViT encoder block: an nn.MultiheadAttention and an MLP."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Linear(16, 16)

    def forward(self, x):
        return self.mlp(self.attn(x, x, x, need_weights=False)[0])


def test_multihead_attention_out_proj_is_never_a_target():
    """nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward and never calls out_proj: its
    delta had no effect before merging (1e-7 against 0.47 merged) and no gradient. all-linear leaves it out; naming it
    is refused, and the model is left as it was."""
    torch.manual_seed(0)
    model = _VitBlock()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NeuroAdaUsageError, match=r"attn\.out_proj is the out_proj of an nn\.MultiheadAttention.*"
                                                 r"exclude_modules=\['out_proj'\]"):
        attach(model, NeuroAdaConfig(k=2, target_modules=["out_proj", "mlp"]))
    assert not layers(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    attach(model, NeuroAdaConfig(k=2, target_modules="all-linear"))
    assert list(layers(model)) == ["mlp"]
    attach(model, NeuroAdaConfig(k=2, target_modules=["out_proj", "mlp"], exclude_modules=["out_proj"]), "b")
    assert list(layers(model)) == ["mlp"]


@pytest.mark.parametrize("mode", ["inplace", "additive"])
@pytest.mark.parametrize("nested", [False, True])
def test_transformer_encoder_layer_serves_its_deltas_in_eval(mode, nested):
    """In eval mode nn.TransformerEncoderLayer's fast path reads linear1/linear2's weights itself: every unmerged
    delta was left out (0.54 off the merged model), so an evaluation during training saw the base. The adapted
    layers carry a hook, which sends torch down its plain path; the unmerged model gives the merged one's output,
    also through nn.TransformerEncoder's nested-tensor path (a padding mask)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    base = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()
    model = attach(copy.deepcopy(base), NeuroAdaConfig(k=2, target_modules=["linear1", "linear2"], mode=mode))
    with torch.no_grad():
        for lay in layers(model).values():
            lay.neuroada_val["default"].normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]) if nested else None
    with torch.no_grad():
        got = model(x, src_key_padding_mask=mask)
        merged = merge_and_unload(copy.deepcopy(model))
        want = merged(x, src_key_padding_mask=mask)
        plain = base(x, src_key_padding_mask=mask)
    assert (want - plain).abs().max() > 0.1  # the deltas matter
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    model.train()
    loss = model(x, src_key_padding_mask=mask).sum()
    loss.backward()
    assert all(lay.neuroada_val["default"].grad.abs().sum() > 0 for lay in layers(model).values())


def test_an_adapter_file_for_multihead_attention_out_proj_is_refused_by_load_adapter(tmp_path):
    """An adapter made elsewhere (the numpy API, another tool) may target out_proj: the checkpoint merge applies it,
    the runtime could not, so load_adapter says so and leaves the model alone."""
    import neuroada_format as naf
    from neuroada_format.runtime import load_adapter

    torch.manual_seed(0)
    model = _VitBlock()
    w = model.attn.out_proj.weight.detach().numpy()
    idx = naf.select_indices(w, 2)
    target = naf.Target("attn.out_proj.weight", idx, np.full(idx.shape, 0.5, dtype=np.float32), w.shape, dtype="F32",
                        probe=naf.probe_hash_from_values(np.take_along_axis(w, idx.astype(np.int64), 1)))
    path = tmp_path / "a.safetensors"
    naf.save(naf.Adapter({target.name: target}), path)
    with pytest.raises(NeuroAdaUsageError, match=r"attn\.out_proj is the out_proj of an nn\.MultiheadAttention"):
        load_adapter(model, path)
    assert not layers(model)


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS", "CAUSAL_LM"])
def test_a_frozen_classification_head_is_named_at_attach(task_type):
    """A classifier's head is new (random) in a fine-tune; attach freezes it with the base. It said so only with
    task_type='SEQ_CLS', yet all-linear leaves the head out whatever the task_type: without one, nothing trained it
    and nothing was said. The warning names the head and the line that trains it; a causal LM's task says nothing."""
    import warnings

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        attach(model, NeuroAdaConfig(k=2, task_type=task_type))
    said = [str(w.message) for w in seen if "frozen with the base" in str(w.message)]
    if task_type == "CAUSAL_LM":
        assert said == []
        return
    assert len(said) == 1 and "'classifier'" in said[0]
    assert "model.get_submodule('classifier').requires_grad_(True)" in said[0]
    assert "classifier" not in layers(model)
    model.get_submodule("classifier").requires_grad_(True)  # the advice, followed: the head trains beside the deltas
    out = model(input_ids=torch.randint(0, 64, (2, 5)), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
