"""save_adapter / load_adapter / merge: real files checked by the format core against the model's own
state dict, refusals that leave the model bit-identical, and merges equal to the spec's reference."""

from __future__ import annotations

import copy
import json
import os
import warnings

import numpy as np
import pytest
import torch

import neuroada_format as naf
from neuroada_format import NeuroAdaError
from neuroada_format.runtime import (NeuroAdaConfig, attach, load_adapter, merge, merge_and_unload, save_adapter,
                                     trainable_parameters, unmerge)
from neuroada_format.runtime.guards import layers, to_numpy

transformers = pytest.importorskip("transformers")


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def tiny_llama(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=100)
    cfg.update(kw)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(dtype).eval()
    model.config._name_or_path = "tiny/llama"
    return model


def tiny_gpt2(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def with_deltas(model, k=3, seed=1, name="default", **cfg):
    """Attach and give the deltas values, as a few training steps would (but fast and reproducible)."""
    attach(model, NeuroAdaConfig(k=k, **cfg), name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model).values():
            v = layer.neuroada_val[name]
            v.copy_(torch.randn(v.shape, generator=g) * 0.05)
    return model


def numpy_state(model):
    return {k: to_numpy(v) for k, v in model.state_dict().items()}


def state_bits(model):
    return {k: to_numpy(v).tobytes() for k, v in model.state_dict().items()}


def base_bits(model):
    """The base tensors' bits under their original names (wrappers and deltas left out)."""
    return {k.replace(".base_layer", ""): v for k, v in state_bits(model).items() if ".neuroada_" not in k}


def ids(vocab=100):
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(3))


# -- save ------------------------------------------------------------------------------------------
def test_save_single_file_and_folder(tmp_path):
    base = tiny_llama()
    base_np = numpy_state(base)
    model = with_deltas(copy.deepcopy(base), k=3, target_modules=r".*\.(q|v|down)_proj")
    file = save_adapter(model, tmp_path / "a.safetensors")
    folder = tmp_path / "folder"
    weights = save_adapter(model, folder)
    assert file == os.fspath(tmp_path / "a.safetensors")
    assert sorted(os.listdir(folder)) == ["neuroada_config.json", "neuroada_model.safetensors"]  # not PEFT's names
    assert weights == os.fspath(folder / "neuroada_model.safetensors")
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic writes left nothing behind
    assert not [f for f in os.listdir(folder) if ".tmp" in f]
    # missing parent folders are made for the single file as for the folder (as save_pretrained does)
    nested = save_adapter(model, tmp_path / "new" / "deeper" / "a.safetensors")
    assert open(nested, "rb").read() == open(file, "rb").read()

    cfg = json.loads((folder / "neuroada_config.json").read_text())
    assert "peft_type" not in cfg  # nothing PEFT would take for one of its own methods
    assert cfg["base_model_name_or_path"] == "tiny/llama"
    assert cfg["target_modules"] == r".*\.(q|v|down)_proj" and cfg["k"] == 3
    assert {"exclude_modules", "selection", "revision", "inference_mode", "save_dtype"} <= set(cfg)

    for path in (file, weights):
        report = naf.validate(path, base=naf.ArrayBase(base_np), check_selection=True)
        assert report.ok and not report.problems, report.problems  # structure hash matches too (no 4.5)
        adapter = naf.load(path)
        assert adapter.base_name == "tiny/llama"
        assert sorted(adapter.targets) == sorted(n + ".weight" for n in layers(model))
        for key, t in adapter.targets.items():
            layer = layers(model)[key[:-len(".weight")]]
            assert t.layout == "out_in" and t.dtype == "F32" and t.k == 3 and t.value_dtype == "BF16"
            assert t.index_dtype == "I16"
            want = layer.neuroada_val["default"].detach().to(torch.bfloat16)
            assert np.array_equal(np.asarray(t.values).view(np.uint16), to_numpy(want).view(np.uint16))
    a, b = naf.load(file), naf.load(weights)
    for key in a.targets:
        assert np.array_equal(a.targets[key].indices, b.targets[key].indices)
        assert np.array_equal(a.targets[key].values.view(np.uint16), b.targets[key].values.view(np.uint16))


def test_save_gpt2_conv1d_records_in_out_layout(tmp_path):
    base = tiny_gpt2()
    model = with_deltas(copy.deepcopy(base), k=2)
    path = save_adapter(model, tmp_path / "g.safetensors", value_dtype="F16")
    naf.validate(path, base=naf.ArrayBase(numpy_state(base)), check_selection=True, strict=True)
    t = naf.load(path).targets["transformer.h.0.attn.c_attn.weight"]
    assert t.layout == "in_out" and t.shape == (96, 32) and t.value_dtype == "F16"


# -- load ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["file", "folder"])
def test_load_adapter_accepts_file_and_folder(tmp_path, form):
    base = tiny_llama()
    model = with_deltas(copy.deepcopy(base), k=2, exclude_modules=["o_proj"])
    target = tmp_path / "a.safetensors" if form == "file" else tmp_path / "folder"
    save_adapter(model, target)
    fresh = load_adapter(copy.deepcopy(base), target)
    assert set(layers(fresh)) == set(layers(model))
    assert trainable_parameters(fresh)[0] == 0
    for name, layer in layers(fresh).items():
        src = layers(model)[name]
        assert torch.equal(layer.neuroada_idx["default"], src.neuroada_idx["default"])
        rounded = src.neuroada_val["default"].detach().to(torch.bfloat16).float()  # the file keeps BF16 values
        assert torch.equal(layer.neuroada_val["default"], rounded)
    cfg = fresh.neuroada_configs["default"]
    assert cfg.k == 2 and cfg.inference_mode
    if form == "folder":
        assert cfg.exclude_modules == ["o_proj"]
    with torch.no_grad():  # the loaded (bf16-rounded) deltas act like the saved ones
        torch.testing.assert_close(fresh(ids()).logits, model(ids()).logits, atol=2e-3, rtol=0)
    trainable = load_adapter(copy.deepcopy(base), target, "t", is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n + ".neuroada_val.t" for n in layers(model)}


def test_f32_values_load_without_warnings_and_train(tmp_path):
    """F32 values (what train_on_grid saves) are read from a read-only map: loading must copy them, with
    no 'non-writable' warning, and a trainable load must take optimizer steps."""
    import warnings

    base = tiny_llama()
    model = with_deltas(copy.deepcopy(base), k=2)
    save_adapter(model, tmp_path / "a", value_dtype="F32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = load_adapter(copy.deepcopy(base), tmp_path / "a", is_trainable=True)
    for name, layer in layers(fresh).items():
        assert torch.equal(layer.neuroada_val["default"], layers(model)[name].neuroada_val["default"])
    opt = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    fresh(ids(), labels=ids()).loss.backward()
    opt.step()
    assert naf.load(tmp_path / "a" / "neuroada_model.safetensors").targets  # the file is untouched and valid


@pytest.mark.parametrize("value_dtype", ["F32", "F16"])
def test_a_folder_saved_in_another_value_dtype_is_saved_again_in_it(tmp_path, value_dtype):
    """save_adapter(folder, value_dtype="F32") recorded the config's save_dtype (BF16) in neuroada_config.json,
    and a load of the folder took the config's word: saved again, the F32 values came out rounded to BF16 (7e-5
    away) without a word. The folder records the dtype written, and a load takes it from the values."""
    base = tiny_llama()
    save_adapter(with_deltas(copy.deepcopy(base), k=2), tmp_path / "a", value_dtype=value_dtype)
    assert json.loads((tmp_path / "a" / "neuroada_config.json").read_text())["save_dtype"] == value_dtype
    save_adapter(load_adapter(copy.deepcopy(base), tmp_path / "a"), tmp_path / "again")
    first, again = (naf.load(tmp_path / d / "neuroada_model.safetensors") for d in ("a", "again"))
    for name, t in first.targets.items():
        u = again.targets[name]
        assert u.value_dtype == value_dtype and np.asarray(u.values).tobytes() == np.asarray(t.values).tobytes()


def test_legacy_peft_style_folder_still_loads(tmp_path):
    """Folders written before the neuroada_* names (adapter_config.json with peft_type NEUROADA)."""
    base = tiny_llama()
    model = with_deltas(copy.deepcopy(base), k=2, exclude_modules=["o_proj"])
    new = tmp_path / "new"
    save_adapter(model, new)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    cfg = json.loads((new / "neuroada_config.json").read_text())
    (legacy / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "NEUROADA"}))
    os.link(new / "neuroada_model.safetensors", legacy / "adapter_model.safetensors")
    a, b = load_adapter(copy.deepcopy(base), new), load_adapter(copy.deepcopy(base), legacy)
    assert b.neuroada_configs["default"] == a.neuroada_configs["default"]
    assert b.neuroada_configs["default"].exclude_modules == ["o_proj"]
    with torch.no_grad():
        assert torch.equal(a(ids()).logits, b(ids()).logits)


def test_load_refuses_bad_names_and_files(tmp_path):
    model = with_deltas(tiny_llama(), k=1)
    path = save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(NeuroAdaError, match="already"):
        load_adapter(model, path)
    with pytest.raises(NeuroAdaError, match="adapter name"):
        load_adapter(tiny_llama(), path, "x.y")
    for taken in ("copy", "keys", "train", "forward"):  # attributes of the adapter containers
        fresh = tiny_llama()
        with pytest.raises(NeuroAdaError, match="taken by torch"):
            load_adapter(fresh, path, taken)
        assert not layers(fresh)
    # names that are no portable folder name for save_pretrained's sub-folders (a NUL or one over 255 bytes made it
    # stop halfway, after the earlier adapters' folders; control characters are refused by Windows)
    for unwritable in ("a\x00b", "tab\tname", "x" * 256, "é" * 128, "\ud800"):
        fresh = tiny_llama()
        with pytest.raises(NeuroAdaError, match="adapter name"):
            load_adapter(fresh, path, unwritable)
        with pytest.raises(NeuroAdaError, match="adapter name"):
            attach(fresh, NeuroAdaConfig(k=1), unwritable)
        assert not layers(fresh)
    longest = "é" * 127  # 254 bytes: a folder name every common file system takes
    fresh = load_adapter(tiny_llama(), path, "default")
    load_adapter(fresh, path, longest)
    fresh.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / longest / "neuroada_model.safetensors").is_file()
    with pytest.raises(NeuroAdaError, match="mode"):
        load_adapter(tiny_llama(), path, mode="sideways")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeuroAdaError) as err:
        load_adapter(tiny_llama(), tmp_path / "empty")
    assert err.value.rule == "1.1"
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    os.link(path, lora / "adapter_model.safetensors")
    fresh = tiny_llama()
    with pytest.raises(NeuroAdaError, match="peft_type 'LORA'.*only Super-Tuning adapters convert.*--finetuned"):
        load_adapter(fresh, lora)
    assert not layers(fresh)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(NeuroAdaError) as err:
        load_adapter(tiny_llama(), tmp_path / "plain.safetensors")
    assert err.value.rule == "2.1"


@pytest.mark.parametrize("case", ["deep", "fifo", "infinity"])
def test_hostile_adapter_config_is_one_error(tmp_path, case):
    """Issue 13 item 14: a 100,000-deep neuroada_config.json raised RecursionError; a FIFO config must
    not block; a config is read by the one JSON parser with its limits, like every other JSON text."""
    import signal

    model = with_deltas(tiny_llama(), k=1)
    folder = tmp_path / "a"
    save_adapter(model, folder)
    cfg = folder / "neuroada_config.json"
    cfg.unlink()
    if case == "deep":
        cfg.write_text('{"k": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif case == "infinity":
        cfg.write_text('{"k": 1, "seed": 1e999}')
    else:
        os.mkfifo(cfg)
    fresh = tiny_llama()
    signal.alarm(20)                                       # a blocked open would hang the suite otherwise
    try:
        with pytest.raises(NeuroAdaError):
            load_adapter(fresh, folder)
        with pytest.raises(NeuroAdaError):
            NeuroAdaConfig.from_pretrained(folder)
    finally:
        signal.alarm(0)
    assert not layers(fresh)


MISMATCHES = {
    "other-weights": (lambda: tiny_llama(seed=9), "4.3"),
    "other-shapes": (lambda: tiny_llama(intermediate_size=96), "4.2"),
    "other-dtype": (lambda: tiny_llama(dtype=torch.bfloat16), "4.3"),  # rounded values: not the same base
    "missing-module": (lambda: tiny_llama(num_hidden_layers=1), "4.1"),
}


@pytest.mark.parametrize("merged", [False, True], ids=["plain", "other-adapter-merged"])
@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_mismatching_model_is_refused_and_left_exactly_as_it_was(tmp_path, case, merged):
    path = save_adapter(with_deltas(tiny_llama(), k=2), tmp_path / "a.safetensors")
    make, rule = MISMATCHES[case]
    target = make()
    if merged:
        with_deltas(target, k=1, seed=4, name="serving", target_modules=["q_proj", "up_proj"])
        merge(target)
    bits = state_bits(target)
    modules = [(n, type(m)) for n, m in target.named_modules()]
    merged_before = {n: list(l.merged_adapters) for n, l in layers(target).items()}
    grads = {n: p.requires_grad for n, p in target.named_parameters()}
    with pytest.raises(NeuroAdaError) as err:
        load_adapter(target, path)
    assert err.value.rule == rule and err.value.tensor and err.value.path == os.fspath(path)
    if case == "other-dtype":  # the way out is named: these weights before they were rounded
        assert "made on F32 values, which BF16 rounds; load it onto the F32 model and merge_and_unload" in str(err.value)
    elif rule == "4.3":
        assert "before they became" not in str(err.value)
    assert state_bits(target) == bits
    assert [(n, type(m)) for n, m in target.named_modules()] == modules
    assert {n: list(l.merged_adapters) for n, l in layers(target).items()} == merged_before
    assert {n: p.requires_grad for n, p in target.named_parameters()} == grads
    assert list(getattr(target, "neuroada_configs", {})) == (["serving"] if merged else [])


def test_the_dtype_hint_is_only_given_where_the_model_could_have_rounded(tmp_path):
    """A BF16-made adapter on other F32 weights: F32 would hold the BF16 values, so the weights differ; no hint."""
    path = save_adapter(with_deltas(tiny_llama(dtype=torch.bfloat16), k=2), tmp_path / "a.safetensors")
    with pytest.raises(NeuroAdaError) as err:
        load_adapter(tiny_llama(seed=9), path)
    assert err.value.rule == "4.3" and "before they became" not in str(err.value)


def test_load_next_to_a_merged_adapter_keeps_it_merged(tmp_path):
    base = tiny_llama()
    path = save_adapter(with_deltas(copy.deepcopy(base), k=2, seed=2), tmp_path / "b.safetensors")
    model = with_deltas(copy.deepcopy(base), k=1, seed=4, name="serving", target_modules=["q_proj"])
    merge(model)
    merged_bits = base_bits(model)
    load_adapter(model, path, "b")
    assert all(l.merged_adapters == ["serving"] for n, l in layers(model).items() if n.endswith("q_proj"))
    assert base_bits(model) == merged_bits  # the merged weights, same bits as before


# -- merge -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_merge_unmerge_is_bit_exact(make):
    base = make()
    model = with_deltas(copy.deepcopy(base), k=3)
    x = ids(64)
    original = state_bits(base)
    with torch.no_grad():
        trained = model(x).logits
        merge(model)
        merged_state = base_bits(model)
        assert torch.equal(model(x).logits, trained)  # in-place training forward == merged model
        changed = [k for k in original if merged_state[k] != original[k]]
        assert sorted(changed) == sorted(n + ".weight" for n in layers(model))
        merge(model)  # merging again changes nothing
        assert base_bits(model) == merged_state
        unmerge(model)
        assert torch.equal(model(x).logits, trained)
    assert base_bits(model) == original


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_merge_and_unload_equals_the_spec_reference(tmp_path, make, dtype):
    base = make(dtype=DTYPES[dtype])
    base_np = numpy_state(base)
    model = with_deltas(copy.deepcopy(base), k=3)
    path = save_adapter(model, tmp_path / "a.safetensors")
    adapter = naf.load(path)

    def check(merged, adapter):
        sd = merged.state_dict()
        assert list(sd) == list(base.state_dict())
        assert not layers(merged) and not hasattr(merged, "neuroada_configs")
        assert not merged._forward_pre_hooks
        for key, arr in base_np.items():
            got = to_numpy(sd[key])
            t = adapter.targets.get(key)
            want = arr if t is None else naf.merge_weight(arr, [t], t.layout)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), key
        assert any(to_numpy(sd[k]).tobytes() != base_np[k].tobytes() for k in adapter.targets)

    # a fresh base with the file loaded
    check(merge_and_unload(load_adapter(copy.deepcopy(base), path)), adapter)
    # the trained model itself, saved with its exact (f32) deltas
    exact = save_adapter(model, tmp_path / "exact.safetensors", value_dtype="F32")
    check(merge_and_unload(model), naf.load(exact))


def test_merge_refuses_tied_weight():
    model = with_deltas(tiny_llama(tie_word_embeddings=True), k=1, target_modules=["lm_head", "q_proj"])
    bits = state_bits(model)
    with pytest.raises(NeuroAdaError, match="shared") as err:
        merge(model)
    assert err.value.tensor == "lm_head.weight"
    assert state_bits(model) == bits and not any(l.merged for l in layers(model).values())


def test_structure_hash_of_a_tied_model_matches_its_saved_checkpoint(tmp_path):
    """save_pretrained stores tied lm_head/embeddings once; the adapter's structure hash must agree."""
    model = tiny_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "base")
    attach(model, NeuroAdaConfig(k=2, target_modules=["q_proj"]))
    report = naf.validate(save_adapter(model, tmp_path / "a.safetensors"), base=tmp_path / "base")
    assert report.ok and report.problems == []   # no rule 4.5 warning


def test_a_delta_the_save_dtype_cannot_hold_is_named_before_anything_is_written(tmp_path):
    model = with_deltas(tiny_llama(), k=2)
    attach(model, NeuroAdaConfig(k=1, save_dtype="F16"), "small")
    layer = next(iter(layers(model).values()))
    with torch.no_grad():
        layer.neuroada_val["small"][3, 0] = 1e5  # beyond F16's 65504
    out = tmp_path / "a.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy "overflow encountered" on the way
        with pytest.raises(NeuroAdaError, match=r"delta 100000 at row 3, slot 0 overflows F16: save with value_dtype='F32'"):
            save_adapter(model, out, "small")
    assert not out.exists()
    save_adapter(model, out, "small", value_dtype="F32")


def test_a_state_of_another_shape_is_refused_before_any_tensor_loads(tmp_path):
    """torch refuses a size mismatch only after loading every other tensor; an adapter re-attached with another k
    is refused first, so the other adapters' deltas are not half-replaced."""
    src = with_deltas(tiny_llama(), k=2, name="a")
    attach(src, NeuroAdaConfig(k=1), "b")
    with torch.no_grad():
        for layer in layers(src).values():
            layer.neuroada_val["b"].fill_(0.5)
    src.save_pretrained(tmp_path / "ck")
    dst = attach(tiny_llama(), NeuroAdaConfig(k=3), "a")
    attach(dst, NeuroAdaConfig(k=1), "b")
    bits = state_bits(dst)
    from safetensors.torch import load_file

    with pytest.raises(NeuroAdaError, match=r"shape \[\d+, 2\] in the state, \[\d+, 3\] in the model") as err:
        dst.load_state_dict(load_file(tmp_path / "ck" / "model.safetensors"), strict=False)
    assert err.value.rule == "4.2" and err.value.tensor.endswith("neuroada_idx.a")
    assert state_bits(dst) == bits


def test_an_adapter_saved_after_the_model_was_cast_says_so_on_the_original(tmp_path):
    """Trainer's bf16_full_eval (or model.to(torch.bfloat16)) casts an attached model: the base the adapter records is
    then the rounded one, and its probe hashes do not match the F32 checkpoint it came from. The refusal said only
    'made for other base weights'; it now says what happened, and the cast model takes the adapter."""
    model = with_deltas(tiny_llama(), k=2)
    model.to(torch.bfloat16)
    path = save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(NeuroAdaError) as err:
        load_adapter(tiny_llama(), path)
    assert err.value.rule == "4.3"
    assert "it was made on these weights cast to BF16" in str(err.value)
    assert "model.to(torch.bfloat16)" in str(err.value)
    load_adapter(tiny_llama().to(torch.bfloat16), path)
