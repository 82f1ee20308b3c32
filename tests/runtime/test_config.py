"""NeuroAdaConfig as a PEFT user drives it: PEFT's task_type is kept, PEFT options NeuroAda does not implement are
refused by name (keywords and config files alike), and keys a newer version wrote are not dropped unseen."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.folder import adapter_paths
from neuroada_format.runtime import NeuroAdaConfig, attach, load_adapter, save_adapter
from neuroada_format.runtime.guards import layers
from neuroada_format.runtime.targets import find_targets

transformers = pytest.importorskip("transformers")

from tiny_hf import tiny_llama, with_deltas  # noqa: E402  (tests/tiny_hf.py)


def ids():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def saved(tmp_path, **cfg):
    """An adapter folder of a tiny Llama, and its config as a dict."""
    folder = tmp_path / "a"
    save_adapter(with_deltas(tiny_llama(), k=2, **cfg), folder)
    return folder, json.loads((folder / "neuroada_config.json").read_text())


def test_task_type_is_kept_saved_and_read_back(tmp_path):
    """PEFT users pass task_type="CAUSAL_LM" (or peft.TaskType.CAUSAL_LM): metadata, kept as PEFT keeps it. It was a
    TypeError about an unexpected keyword."""
    assert NeuroAdaConfig(task_type="CAUSAL_LM").task_type == "CAUSAL_LM"
    assert NeuroAdaConfig().task_type is None
    peft = pytest.importorskip("peft")
    cfg = NeuroAdaConfig(task_type=peft.TaskType.SEQ_CLS)
    assert cfg.task_type == "SEQ_CLS" and type(cfg.task_type) is str
    folder, doc = saved(tmp_path, task_type=peft.TaskType.CAUSAL_LM)
    assert doc["task_type"] == "CAUSAL_LM"
    assert NeuroAdaConfig.from_pretrained(folder).task_type == "CAUSAL_LM"
    model = load_adapter(tiny_llama(), folder)
    assert model.neuroada_configs["default"].task_type == "CAUSAL_LM"
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "neuroada_config.json").read_text())["task_type"] == "CAUSAL_LM"
    with pytest.raises(NeuroAdaUsageError, match="task_type must be one of .*CAUSAL_LM"):
        NeuroAdaConfig(task_type="CAUSAL")


@pytest.mark.parametrize("option, value", [
    ("r", 8), ("lora_alpha", 16), ("lora_dropout", 0.05), ("bias", "all"), ("fan_in_fan_out", True),
    ("init_lora_weights", "gaussian"), ("modules_to_save", ["lm_head"]), ("layers_to_transform", [0]),
    ("layers_pattern", "layers"), ("rank_pattern", {"q_proj": 4}), ("alpha_pattern", {"q_proj": 8}),
    ("use_dora", True),
])
def test_peft_options_we_do_not_implement_are_refused_by_name(option, value):
    """A PEFT user writes LoraConfig habits into NeuroAdaConfig: each is refused naming the option, not a TypeError
    about an unexpected keyword argument."""
    with pytest.raises(NeuroAdaUsageError, match=f"^{option} is a PEFT option NeuroAda does not support: "):
        NeuroAdaConfig(k=2, target_modules=["q_proj"], **{option: value})


def test_layers_to_transform_says_how_to_get_it_with_a_regex():
    with pytest.raises(NeuroAdaUsageError, match="target_modules regex") as err:
        NeuroAdaConfig(layers_to_transform=[1])
    regex = str(err.value).split("target_modules=r'")[1].split("'")[0]
    targets = find_targets(tiny_llama(), NeuroAdaConfig(target_modules=regex))  # the hint works as written
    assert targets == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                       "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_an_unknown_keyword_is_a_usage_error_with_a_suggestion():
    with pytest.raises(NeuroAdaUsageError, match="no option 'target_module' \\(did you mean 'target_modules'\\?\\)"):
        NeuroAdaConfig(target_module=["q_proj"])
    with pytest.raises(NeuroAdaUsageError, match="positional"):
        NeuroAdaConfig(*range(13))


def test_a_config_file_with_a_peft_option_is_refused_naming_the_file(tmp_path):
    """from_dict dropped keys it did not know: a file asking for lora_dropout or modules_to_save loaded as if it
    had not, and every command took it."""
    folder, doc = saved(tmp_path, target_modules=["q_proj"])
    path = folder / "neuroada_config.json"
    path.write_text(json.dumps({**doc, "modules_to_save": ["lm_head"]}))
    fresh = tiny_llama()
    with pytest.raises(NeuroAdaError, match="modules_to_save is a PEFT option NeuroAda does not support") as err:
        load_adapter(fresh, folder)
    assert err.value.path == str(path)
    assert not layers(fresh)
    for read in (lambda: NeuroAdaConfig.from_pretrained(folder), lambda: adapter_paths(folder)):
        with pytest.raises(NeuroAdaError, match="modules_to_save") as err:
            read()
        assert err.value.path == str(path)
    with pytest.raises(NeuroAdaUsageError, match="lora_alpha") as err:
        NeuroAdaConfig.from_dict({**doc, "lora_alpha": 16}, path)
    assert err.value.path == str(path)


def test_an_unknown_key_in_a_config_file_warns_naming_it_and_the_file(tmp_path):
    """A newer version's field is left out, with a warning, not silently."""
    folder, doc = saved(tmp_path, target_modules=["q_proj"])
    path = folder / "neuroada_config.json"
    path.write_text(json.dumps({**doc, "shiny_new_field": 1}))
    base = tiny_llama()
    with pytest.warns(UserWarning, match="shiny_new_field") as got:
        model = load_adapter(copy.deepcopy(base), folder)
    assert any(str(path) in str(w.message) for w in got)
    with pytest.warns(UserWarning, match="shiny_new_field"):
        assert NeuroAdaConfig.from_pretrained(folder).target_modules == ["q_proj"]
    with torch.no_grad():
        assert not torch.equal(model(ids()).logits, base(ids()).logits)  # the adapter loaded
    # the legacy layout's peft_type and what we write ourselves read without a word
    path.write_text(json.dumps({**doc, "peft_type": "NEUROADA"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NeuroAdaConfig.from_pretrained(folder)
        NeuroAdaConfig.from_dict(NeuroAdaConfig(task_type="CAUSAL_LM").to_dict())


def test_config_copies_and_compares():
    """The keyword check wraps __init__: copies, pickles and the signature are the dataclass's."""
    import inspect
    import pickle

    cfg = NeuroAdaConfig(k=3, task_type="CAUSAL_LM", target_modules=["q_proj"])
    assert copy.deepcopy(cfg) == cfg == pickle.loads(pickle.dumps(cfg))
    assert list(inspect.signature(NeuroAdaConfig).parameters)[:2] == ["k", "target_modules"]
    assert attach(tiny_llama(), cfg).neuroada_configs["default"] is cfg


PEFT_DEFAULTS = dict(modules_to_save=None, layers_to_transform=None, bias="none", lora_dropout=0.0,
                     fan_in_fan_out=False, init_lora_weights=True, rank_pattern={}, use_dora=False)


def test_peft_options_at_their_do_nothing_defaults_are_accepted_and_left_out(tmp_path):
    """A LoraConfig ported as it is (modules_to_save=None, bias='none', ...) asks for nothing NeuroAda lacks: the
    keyword and a config file holding it are accepted, without a warning, and the key is not written back."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = NeuroAdaConfig(k=2, target_modules=["q_proj"], **{**PEFT_DEFAULTS, "lora_dropout": 0})
        assert cfg == NeuroAdaConfig(k=2, target_modules=["q_proj"])
        assert not set(PEFT_DEFAULTS) & set(cfg.to_dict())
        path = cfg.save_pretrained(tmp_path)
        with open(path) as f:
            d = json.load(f)
        d.update(PEFT_DEFAULTS)
        with open(path, "w") as f:
            json.dump(d, f)
        assert NeuroAdaConfig.from_pretrained(tmp_path) == cfg
    for option, value in (("fan_in_fan_out", 0), ("init_lora_weights", 1), ("modules_to_save", []),
                          ("lora_dropout", False)):  # look alike, but not PEFT's default
        with pytest.raises(NeuroAdaUsageError, match=f"^{option} is a PEFT option"):
            NeuroAdaConfig(**{option: value})
