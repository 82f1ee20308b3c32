"""Models that transformers 5 saves under other names than it holds them: adapters keyed by the checkpoint (spec 4.6).

Gemma 3 4B and larger are Gemma3ForConditionalGeneration: transformers 5 holds the text layers as
`model.language_model.layers.N` but save_pretrained writes (and the Hub's files hold) `language_model.model.layers.N`;
GPT-NeoX's head is `lm_head` in the model and `embed_out` on disk. Adapters used to be keyed by the model's names, so
an adapter for such a model could be loaded back but not merged into, validated against or exported with its own
base checkpoint (rule 4.1). Now a target's key is the checkpoint's (spec 2.5: the base tensor's key) and a 1.2 file
records the model's module beside it. Each test builds the real model class from a tiny config and uses the real
checkpoint save_pretrained writes.
"""
from __future__ import annotations

import json

import neuroada_format as naf
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402

from neuroada_format.converters.backend import merge  # noqa: E402
from neuroada_format.converters.pack import extract  # noqa: E402
from neuroada_format.converters.peft_interop import import_peft, to_peft  # noqa: E402
from neuroada_format.runtime import (NeuroAdaConfig, attach, load_adapter, merge_and_unload,  # noqa: E402
                                     save_adapter)
from neuroada_format.runtime.introspection import checkpoint_keys # noqa: E402

T = transformers
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _gemma3_vlm():
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=300, max_position_embeddings=64, **TOKENS)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    return T.Gemma3ForConditionalGeneration(T.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299, boi_token_index=297,
        eoi_token_index=298))


def _gpt_neox():
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=64, tie_word_embeddings=False, **TOKENS))


# name -> (builder, targets, one renamed target: (the model's module, the checkpoint's key))
CASES = {
    "gemma3_vlm": (_gemma3_vlm, ["q_proj", "down_proj"],
                   ("model.language_model.layers.0.self_attn.q_proj", "language_model.model.layers.0.self_attn.q_proj"
                                                                      ".weight")),
    "gpt_neox_head": (_gpt_neox, ["query_key_value", "lm_head"], ("lm_head", "embed_out.weight")),
}
IDS = torch.tensor([[5, 9, 3, 7, 11, 40, 33, 8, 60, 12], [4, 19, 27, 50, 3, 9, 13, 62, 7, 5]])


def build(case, seed=0):
    torch.manual_seed(seed)
    return CASES[case][0]().float().eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained(case):
    model = attach(build(case), NeuroAdaConfig(k=3, save_dtype="F32", target_modules=CASES[case][1]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    return model.eval()


def saved_keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        return set(f.keys())


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param


@pytest.fixture
def setup(case, tmp_path):
    """(model trained, its adapter file, the base checkpoint save_pretrained wrote)."""
    build(case).save_pretrained(tmp_path / "base")
    model = trained(case)
    return model, save_adapter(model, tmp_path / "a.safetensors"), tmp_path / "base"


def test_targets_are_keyed_by_the_checkpoint(case, setup):
    """Every key is a tensor of the saved checkpoint; a renamed one records the model's module; the file says 1.2;
    validated against the checkpoint: no problem at all (rule 4.1 and warning 4.5 used to fire)."""
    model, file, base = setup
    adapter = naf.load(file)
    assert set(adapter.targets) <= saved_keys(base)
    module, key = CASES[case][2]
    assert adapter.targets[key].extra == {"module": module}
    assert adapter.version == "1.2"
    plain = [t for t in adapter.targets.values() if not t.extra]
    assert all(name[:-len(".weight")] in dict(model.named_modules()) for name in (t.name for t in plain))
    report = naf.validate(file, base=base)
    assert report.ok and report.problems == []


def test_other_models_still_write_1_0():
    """A model saved under its own names (nearly all) writes what earlier versions wrote: 1.0, no module field."""
    model = attach(T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4,
                                                    num_key_value_heads=2, **TOKENS)), NeuroAdaConfig(k=2))
    assert checkpoint_keys(model) == {}
    from neuroada_format.runtime.saving import to_adapter

    adapter = to_adapter(model)
    assert adapter.version == "1.0" and all(not t.extra for t in adapter.targets.values())


def test_checkpoint_merge_equals_merge_and_unload(case, setup, tmp_path):
    """neuroada-merge's backend into the model's own checkpoint; from_pretrained of the result gives
    merge_and_unload's logits bit for bit."""
    model, file, base = setup
    merge(base, [(file, 1.0)], tmp_path / "merged")
    loaded = type(model).from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits(loaded), logits(merge_and_unload(model)))


def test_load_back_and_files_keyed_by_the_model(case, setup, tmp_path):
    """The file loads onto a fresh model (checkpoint key -> module) to the trained outputs; a file written before
    (keyed by the model's names, 1.0) still loads to the same outputs."""
    model, file, _ = setup
    want = logits(model)
    assert torch.equal(logits(load_adapter(build(case), file)), want)
    adapter = naf.load(file)
    old = naf.Adapter({t.extra.get("module", name[:-len(".weight")]) + ".weight":
                       naf.Target(t.extra.get("module", name[:-len(".weight")]) + ".weight", t.indices, t.values,
                                  t.shape, t.layout, t.dtype, t.probe)
                       for name, t in adapter.targets.items()},
                      base_name=adapter.base_name, base_revision=adapter.base_revision,
                      structure_hash=adapter.structure_hash, selection=adapter.selection)
    naf.save(old, tmp_path / "old.safetensors")
    assert naf.load(tmp_path / "old.safetensors").version == "1.0"
    assert torch.equal(logits(load_adapter(build(case), tmp_path / "old.safetensors")), want)


def test_a_wrong_base_is_still_refused(case, setup):
    """Renamed keys go through the same probe check: a differently seeded model refuses the file (4.3)."""
    _, file, _ = setup
    with pytest.raises(naf.NeuroAdaError, match="4.3"):
        load_adapter(build(case, seed=1), file)


def test_peft_export_uses_the_models_modules_and_round_trips(case, setup, tmp_path):
    """The PEFT export names the model's modules (PEFT wraps the model, not the checkpoint): stock PEFT loads it to
    the trained outputs; importing it back against the checkpoint gives the same adapter, byte for byte."""
    model, file, base = setup
    module, _ = CASES[case][2]
    to_peft(file, tmp_path / "peft", base=base)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert module in config["target_modules"]
    loaded = peft.PeftModel.from_pretrained(build(case), tmp_path / "peft").eval()
    assert torch.equal(logits(loaded), logits(model))
    back, report = import_peft(tmp_path / "peft", base)
    assert report["exact_round_trip"]
    naf.save(back, tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == open(file, "rb").read()


def test_an_extracted_fine_tune_loads_onto_the_model(case, setup, tmp_path):
    """neuroada-pack extract pairs two checkpoints by their (checkpoint) keys; the adapter it makes loads onto the
    model class by those keys and reproduces the fine-tune (k large enough to carry every change)."""
    model, file, base = setup
    merge_and_unload(model).save_pretrained(tmp_path / "tuned")
    adapter, _ = extract(base, tmp_path / "tuned", k=3, positions="delta", value_dtype="F32",
                         targets=sorted(naf.load(file).targets))  # the head is no default target
    naf.save(adapter, tmp_path / "x.safetensors")
    assert set(adapter.targets) <= saved_keys(base)
    fresh = load_adapter(build(case), tmp_path / "x.safetensors")
    assert torch.equal(logits(merge_and_unload(fresh)), logits(model))


def test_one_weight_named_twice_is_refused(case, setup, tmp_path):
    """A file naming one weight both ways (the model's name and the checkpoint's) would add its deltas twice:
    refused as 4.1 before anything changes."""
    _, file, _ = setup
    adapter = naf.load(file)
    module, key = CASES[case][2]
    t = adapter.targets[key]
    adapter.targets[module + ".weight"] = naf.Target(module + ".weight", t.indices, t.values, t.shape, t.layout,
                                                     t.dtype, t.probe)
    naf.save(adapter, tmp_path / "twice.safetensors")
    model = build(case)
    before = logits(model)
    with pytest.raises(naf.NeuroAdaError, match=r"4\.1.*same weight|same weight.*4\.1"):
        load_adapter(model, tmp_path / "twice.safetensors")
    assert torch.equal(logits(model), before) and not any(".neuroada_" in n for n in model.state_dict())


def test_combine_and_repack_keep_the_module(case, setup, tmp_path):
    """neuroada-pack --combine and --repack carry each target's module (the combined adapter still exports to PEFT
    under the model's names); two adapters recording different modules for one tensor are refused (4.1)."""
    from neuroada_format.converters.pack import combine, repack

    _, file, base = setup
    module, key = CASES[case][2]
    a = naf.load(file)
    both = combine([(a, 0.5), (naf.load(file), 0.5)], base)
    assert both.targets[key].extra == {"module": module} and both.version == "1.2"
    packed = repack(a, value_dtype="BF16")
    assert packed.targets[key].extra == {"module": module} and packed.version == "1.2"
    other = naf.load(file)
    other.targets[key].extra = {"module": "somewhere.else"}
    with pytest.raises(naf.NeuroAdaError, match="different modules"):
        combine([(a, 1.0), (other, 1.0)], base)


def test_inspect_shows_the_module(case, setup):
    """`neuroada inspect` says which targets the model holds under another name (and --json gives each module)."""
    from click.testing import CliRunner

    from neuroada_format.cli import main

    _, file, _ = setup
    module, key = CASES[case][2]
    text = CliRunner().invoke(main, ["inspect", file])
    assert text.exit_code == 0 and "spec 1.2" in text.output and "under another name" in text.output
    data = json.loads(CliRunner().invoke(main, ["inspect", "--json", file]).output)
    assert {t["name"]: t.get("module") for t in data["targets"]}[key] == module


def test_all_linear_on_the_multimodal_model_is_peft_s():
    """`all-linear` on Gemma3ForConditionalGeneration adapts exactly the modules PEFT's LoRA wraps (text layers, vision
    tower and projector; not the head), except an nn.MultiheadAttention's out_proj."""
    import copy

    from neuroada_format.runtime.guards import layers

    model = build("gemma3_vlm")
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=2))
    theirs = sorted(n[len("base_model.model."):] for n, m in wrapped.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer))
    # but SigLIP's pooling head is an nn.MultiheadAttention, which never calls its out_proj (PEFT wraps it anyway)
    mha = {n + ".out_proj" for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)}
    assert mha == {"model.vision_tower.head.attention.out_proj"}
    ours = sorted(layers(attach(model, NeuroAdaConfig(k=1, target_modules="all-linear"))))
    assert ours == sorted(set(theirs) - mha) and any("vision_tower" in n for n in ours) and "lm_head" not in ours
