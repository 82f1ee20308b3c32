"""PEFT interop: ours -> stock PEFT Super-Tuning -> ours, bit for bit, with real PEFT and real files.

Every PEFT side here is PEFT 0.21.2 itself (`PeftModel.from_pretrained`, `get_peft_model`,
`save_pretrained`, `merge_and_unload`); the base models are tiny Llamas saved as real HF folders.
"""
from __future__ import annotations

import copy
import json
import os

import ml_dtypes
import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.converters import peft_interop as pi

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from neuroada_format.runtime import load_adapter, merge_and_unload, save_adapter  # noqa: E402
from neuroada_format.runtime.guards import layers, to_numpy # noqa: E402

from tiny_hf import tiny_llama, with_deltas  # noqa: E402  (tests/tiny_hf.py)

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub: PEFT and transformers would retry a network lookup for a local folder name otherwise."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def save_base(model, folder):
    model.save_pretrained(folder)
    return os.fspath(folder)


def reload(base_dir, dtype=torch.float32):
    """The base as a user has it: read from its folder (a model cast with .to(bf16) also casts its rotary
    buffers, so it is not the same model as one loaded in bf16; every side of a comparison reloads)."""
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()


def train_a_little(model, steps=2):
    """A few real optimizer steps on the deltas (the runtime's own forward/backward)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        x = ids()
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def ids():
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def bits(t):
    t = t.detach().contiguous()
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    return [k for k in sa if not (sa[k].dtype == sb[k].dtype and torch.equal(bits(sa[k]), bits(sb[k])))]


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def tree_bytes(folder):
    return {name: file_bytes(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


# -- the round trip of the issue -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_ours_to_peft_to_ours_is_exact(tmp_path, dtype):
    base = tiny_llama(dtype=DTYPES[dtype])
    with torch.no_grad():   # -0.0 base values where export padding lands: padding must keep them -0.0
        base.model.layers[0].mlp.down_proj.weight[0, :] = -0.0
        base.model.layers[1].self_attn.q_proj.weight[0, :] = -0.0
    base_dir = save_base(base, tmp_path / "base")
    base = reload(base_dir, DTYPES[dtype])
    model = with_deltas(copy.deepcopy(base), k=3, target_modules="all-linear")
    train_a_little(model)
    # BF16 values (the default); on an F16 base F16 values, since PEFT adds each value as an F16
    ours_file = save_adapter(model, tmp_path / "ours.safetensors", value_dtype="F16" if dtype == "f16" else None)
    before = file_bytes(ours_file)

    summary = pi.to_peft(ours_file, tmp_path / "peft", base=base_dir, base_model_name_or_path=base_dir)
    out = tmp_path / "peft"
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    assert file_bytes(ours_file) == before                               # input untouched

    # PEFT's own reading of the folder: its config class, one sparsity, counts by its own formula
    config = peft.PeftConfig.from_pretrained(os.fspath(out))
    assert type(config).__name__ == "SupertuningConfig" and config.save_precomputed_indices and config.r is None
    assert config.sparsity == summary["sparsity"]
    adapter = naf.load(ours_file)
    from safetensors.numpy import load_file
    stored = load_file(os.fspath(out / "adapter_model.safetensors"))
    for name, t in adapter.targets.items():
        key = "base_model.model." + name[:-len(".weight")]
        idx, val = stored[key + ".supertuning_indices"], stored[key + ".supertuning_values"]
        assert idx.dtype == np.int32 and val.dtype == np.float32
        assert idx.size == int(t.d_out * t.d_in * (1 - config.sparsity)) >= t.d_out * t.k
        assert np.unique(idx).size == idx.size                           # padding never collides
        n = t.d_out * t.k
        assert (val[n:].view(np.uint32) == 0x80000000).all()             # padding is -0.0
        assert np.array_equal(val[:n], np.asarray(t.values).astype(np.float32).reshape(-1))
    # the sparsity is the tightest one: a hair more and some target would not fit
    tighter = 1 - max(t.k / t.d_in for t in adapter.targets.values()) + 1e-9
    assert any(pi.peft_count(t.d_out * t.d_in, tighter) < t.d_out * t.k for t in adapter.targets.values())

    # stock PEFT loads it; its logits and its merged weights are ours bit for bit
    peft_model = peft.PeftModel.from_pretrained(reload(base_dir, DTYPES[dtype]), os.fspath(out)).eval()
    ours = merge_and_unload(load_adapter(copy.deepcopy(base), ours_file)).eval()
    with torch.no_grad():
        a, b = peft_model(ids()).logits, ours(ids()).logits
    assert torch.equal(bits(a), bits(b)), (a - b).abs().max()
    with torch.no_grad():
        base_logits = base(ids()).logits
    assert not torch.equal(a, base_logits)                               # the adapter does something
    assert same_state(peft_model.merge_and_unload(), ours) == []
    assert same_state(ours, base) != []
    # neuroada-merge's checkpoint gives the same logits too
    from neuroada_format.converters.merge_cli import main as merge_main
    with pytest.raises(SystemExit) as exc:
        merge_main(["--base", base_dir, "--adapter", os.fspath(ours_file), "--out", os.fspath(tmp_path / "merged")])
    assert exc.value.code == 0
    with torch.no_grad():
        assert torch.equal(bits(reload(tmp_path / "merged", DTYPES[dtype])(ids()).logits), bits(a))

    # and back: the same indices, values, dtypes and document, so the same file, byte for byte
    back, report = pi.import_peft(out, base_dir)
    assert report["exact_round_trip"]
    naf.save(back, tmp_path / "back.safetensors")
    assert file_bytes(tmp_path / "back.safetensors") == before
    # values asked for in another dtype (rounded): the document comes back, the exported file does not
    other = "F16" if next(iter(adapter.targets.values())).value_dtype != "F16" else "BF16"
    retyped, report = pi.import_peft(out, base_dir, value_dtype=other, round_values=True)
    assert not report["exact_round_trip"]
    for name, t in adapter.targets.items():
        u = back.targets[name]
        assert u.indices.dtype == t.indices.dtype and u.indices.tobytes() == np.asarray(t.indices).tobytes()
        assert u.values.dtype == t.values.dtype and u.values.tobytes() == np.asarray(t.values).tobytes()


def test_auto_peft_model_and_transformers_load_adapter_take_the_export(tmp_path):
    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base")
    model = with_deltas(copy.deepcopy(base), k=2, target_modules=["q_proj", "v_proj", "down_proj"])
    ours_file = save_adapter(model, tmp_path / "ours.safetensors")
    with pytest.raises(NeuroAdaUsageError, match="not one of PEFT's"):
        pi.to_peft(ours_file, tmp_path / "peft", base=base_dir, task_type="causal_lm")
    assert pi.task_type_of(base_dir) == "CAUSAL_LM" and pi.task_type_of(ours_file) is None
    summary = pi.to_peft(ours_file, tmp_path / "peft", base=base_dir, base_model_name_or_path=base_dir)
    assert summary["task_type"] == "CAUSAL_LM"                          # the default: from the base's config
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(os.fspath(tmp_path / "peft")).eval()
    hf = reload(base_dir)
    hf.load_adapter(os.fspath(tmp_path / "peft"))          # transformers' own PEFT integration
    ours = merge_and_unload(load_adapter(reload(base_dir), ours_file)).eval()
    with torch.no_grad():
        assert torch.equal(auto(ids()).logits, ours(ids()).logits)
        assert torch.equal(hf(ids()).logits, ours(ids()).logits)


def test_mixed_k_f32_values_and_i32_indices_round_trip(tmp_path):
    """Different k per target (the sparsity is set by the largest k / d_in), F32 values, I32 indices."""
    base = tiny_llama(seed=4)
    base_dir = save_base(base, tmp_path / "base")
    sd = {k: to_numpy(v) for k, v in base.state_dict().items()}
    rng = np.random.default_rng(0)
    targets = {}
    for name, k in (("model.layers.0.self_attn.q_proj.weight", 5), ("model.layers.0.mlp.down_proj.weight", 1),
                    ("model.layers.1.mlp.up_proj.weight", 64), ("model.layers.1.self_attn.k_proj.weight", 2)):
        w = sd[name]
        idx = naf.select_indices(w, k)
        vals = (rng.standard_normal(idx.shape) * 0.1).astype(np.float32)
        t = naf.Target.from_weight(name, w, idx, vals, value_dtype="F32")
        if name.endswith("k_proj.weight"):
            t.indices = t.indices.astype(np.int32)
        targets[name] = t
    naf.save(naf.Adapter(targets, base_name="tiny", structure_hash=naf.open_base(base_dir).structure_hash()),
             tmp_path / "a.safetensors")
    original = file_bytes(tmp_path / "a.safetensors")
    summary = pi.to_peft(tmp_path / "a.safetensors", tmp_path / "peft", base=base_dir)
    assert summary["sparsity"] == 0.0          # up_proj uses every column (k = d_in = 64)

    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, t in targets.items():
            w = merged.get_parameter(name)
            w.copy_(torch.from_numpy(naf.merge_weight(to_numpy(w), [t])))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.fspath(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert torch.equal(peft_model(ids()).logits, merged(ids()).logits)
    back = pi.from_peft(tmp_path / "peft", base_dir)
    naf.save(back, tmp_path / "back.safetensors")
    assert file_bytes(tmp_path / "back.safetensors") == original


# -- PEFT's own adapters -> ours --------------------------------------------------------------------
def peft_native(tmp_path, dtype=torch.float32, sparsity=0.97, targets=("q_proj", "v_proj", "down_proj")):
    """A real Super-Tuning adapter written by PEFT (random nonzero values), and its base folder."""
    base = tiny_llama(seed=7, dtype=dtype)
    base_dir = save_base(base, tmp_path / "base")
    torch.manual_seed(11)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.SupertuningConfig(
        target_modules=list(targets), sparsity=sparsity, init_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    return base, base_dir, os.fspath(tmp_path / "peft")


def merged_with(base, adapter):
    """The base with the adapter merged by the format core's reference rule (spec section 8)."""
    out = copy.deepcopy(base)
    with torch.no_grad():
        for name, t in adapter.targets.items():
            w = out.get_parameter(name)
            merged = naf.merge_weight(to_numpy(w), [t])
            w.view(torch.int16 if w.dtype == torch.bfloat16 else w.dtype).copy_(
                torch.from_numpy(merged.view(np.int16) if w.dtype == torch.bfloat16 else merged))
    return out


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_peft_native_adapter_imports_and_merges_like_peft(tmp_path, dtype):
    base, base_dir, folder = peft_native(tmp_path, DTYPES[dtype])
    peft_merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload()
    adapter, report = pi.import_peft(folder, base_dir)
    assert not report["exact_round_trip"]
    assert adapter.selection["rule"] == "custom" and "Super-Tuning" in adapter.extra["description"]
    assert any(r["padding"] for r in report["targets"].values())      # global top-|W|: uneven rows
    for t in adapter.targets.values():
        assert t.value_dtype == t.dtype == {"f32": "F32", "bf16": "BF16", "f16": "F16"}[dtype]
    naf.save(adapter, tmp_path / "imported.safetensors")
    assert naf.validate(tmp_path / "imported.safetensors", base=base_dir).ok
    ours = merged_with(base, naf.load(tmp_path / "imported.safetensors"))
    assert same_state(ours, peft_merged) == []
    # the runtime applies it the same way
    rt = merge_and_unload(load_adapter(copy.deepcopy(base), tmp_path / "imported.safetensors"))
    assert same_state(rt, peft_merged) == []
    # and it exports back to a folder PEFT reads with the same result (other padding, same merge)
    pi.to_peft(tmp_path / "imported.safetensors", tmp_path / "again", base=base_dir)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.fspath(tmp_path / "again")).eval()
    with torch.no_grad():
        assert torch.equal(bits(again(ids()).logits), bits(peft_merged(ids()).logits))


def test_negative_zero_base_under_import_padding_is_reported(tmp_path):
    """Rows PEFT left empty are padded with +0.0 (spec 4.5): a -0.0 base value there becomes +0.0,
    equal as a number; the report says how many, and nothing else differs from PEFT's merge."""
    base = tiny_llama(seed=7)
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight[3, :] = -0.0     # no |W| there: PEFT picks none of it
    base_dir = save_base(base, tmp_path / "base")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.SupertuningConfig(target_modules=["q_proj"], sparsity=0.97,
                                                                         init_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    peft_merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.fspath(tmp_path / "peft")).merge_and_unload()
    adapter, report = pi.import_peft(tmp_path / "peft", base_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    t = adapter.targets[name]
    assert report["targets"][name]["negative_zero_base_at_padding"] == t.k            # row 3: all padding
    ours = merged_with(base, adapter)
    assert same_state(ours, peft_merged) == [name]
    a, b = ours.get_parameter(name), peft_merged.get_parameter(name)
    assert torch.equal(a, b)                                   # as numbers: -0.0 == +0.0
    differ = (bits(a) != bits(b)).nonzero().tolist()
    assert differ == [[3, c] for c in range(t.k)]             # only the padded -0.0 entries of row 3


def test_import_value_dtype_is_exact_or_refused(tmp_path):
    base, base_dir, folder = peft_native(tmp_path)
    with pytest.raises(NeuroAdaError, match="not exact in BF16"):
        pi.from_peft(folder, base_dir, value_dtype="BF16")
    rounded = pi.from_peft(folder, base_dir, value_dtype="BF16", round_values=True)
    assert all(t.value_dtype == "BF16" for t in rounded.targets.values())
    exact = pi.from_peft(folder, base_dir)
    for name, t in exact.targets.items():
        want = np.asarray(t.values).astype(np.float32).astype(ml_dtypes.bfloat16)     # RNE
        assert np.array_equal(np.asarray(rounded.targets[name].values).view(np.uint16), want.view(np.uint16))


def rewrite(folder, *, config=None, tensors=None, metadata="keep"):
    """Edit a PEFT folder in place (tests only): new config keys and/or new tensors."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    cpath = os.path.join(folder, "adapter_config.json")
    wpath = os.path.join(folder, "adapter_model.safetensors")
    if config is not None:
        doc = json.loads(open(cpath).read())
        doc.update(config)
        with open(cpath, "w") as f:
            json.dump(doc, f)
    if tensors is not None:
        with safe_open(wpath, "np") as f:
            meta = f.metadata()
        current = load_file(wpath)
        new = tensors(current)
        save_file(new, wpath, metadata={"format": "pt"} if metadata == "drop" else meta)


def test_padding_changed_by_training_falls_back_to_exact_merge(tmp_path):
    """A folder we exported whose padding entries were then trained: no exact round trip, but the
    import still merges exactly as PEFT does (the padding positions become real entries)."""
    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base")
    model = with_deltas(copy.deepcopy(base), k=2, target_modules=["q_proj", "down_proj"])
    ours_file = save_adapter(model, tmp_path / "ours.safetensors")
    pi.to_peft(ours_file, tmp_path / "peft", base=base_dir)
    folder = os.fspath(tmp_path / "peft")

    def train_padding(t):
        for key in t:
            if key.endswith("values"):
                v = t[key].copy()
                v[-3:] = [0.25, -0.5, 0.125]
                t[key] = v
        return t

    rewrite(folder, tensors=train_padding)
    adapter, report = pi.import_peft(folder, base_dir)
    assert not report["exact_round_trip"]
    peft_merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload()
    assert same_state(merged_with(base, adapter), peft_merged) == []


def test_negative_zero_entries_are_dropped_and_change_nothing(tmp_path):
    base, base_dir, folder = peft_native(tmp_path)

    def some_neg_zero(t):
        for key in t:
            if key.endswith("values"):
                v = t[key].copy()
                v[::2] = -0.0
                t[key] = v
        return t

    rewrite(folder, tensors=some_neg_zero)
    adapter, report = pi.import_peft(folder, base_dir)
    assert all(r["dropped_negative_zero"] > 0 for r in report["targets"].values())
    peft_merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload()
    assert same_state(merged_with(base, adapter), peft_merged) == []


def test_reordered_entries_are_no_exact_round_trip_and_still_merge_as_peft(exported):
    """Our export with two entries of a row swapped (order and values), the document still beside them: not what
    export writes, so not restored from the document (whose columns would then be out of order), but imported by
    the general path, which merges exactly as PEFT does."""
    base_dir, folder, ours_file = exported

    def swap_first_two(t):
        for key in t:
            t[key] = t[key].copy()
            t[key][[0, 1]] = t[key][[1, 0]]
        return t

    rewrite(folder, tensors=swap_first_two)
    adapter, report = pi.import_peft(folder, base_dir)
    assert not report["exact_round_trip"]
    assert naf.validate(adapter, base=base_dir).ok
    ours = naf.load(ours_file)
    for name, t in ours.targets.items():
        base = naf.open_base(base_dir).array(name)
        assert np.array_equal(naf.merge_weight(base, [adapter.targets[name]]).view(np.uint32),
                              naf.merge_weight(base, [t]).view(np.uint32)), name


def test_a_value_beyond_the_chosen_value_dtype_is_refused(exported):
    """Importing into a narrower value dtype than the values need: refused as rule 3.7, never an Inf in the file."""
    base_dir, folder, _ = exported
    rewrite(folder, tensors=set_entry("supertuning_values", 0, 1e6), metadata="drop")
    with pytest.raises(NeuroAdaError, match=r"rule 3\.7: a value overflows F16"):
        pi.import_peft(folder, base_dir, value_dtype="F16", round_values=True)


# -- refusals --------------------------------------------------------------------------------------
@pytest.fixture
def exported(tmp_path):
    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base")
    model = with_deltas(copy.deepcopy(base), k=2, target_modules=["q_proj", "down_proj"])
    ours_file = save_adapter(model, tmp_path / "ours.safetensors")
    pi.to_peft(ours_file, tmp_path / "peft", base=base_dir)
    return base_dir, os.fspath(tmp_path / "peft"), ours_file


def first_key(t, suffix):
    return sorted(k for k in t if k.endswith(suffix))[0]


def set_entry(suffix, i, value, metadata="keep"):
    def edit(t):
        key = first_key(t, suffix)
        a = t[key].copy()
        a[i] = value if not callable(value) else value(a)
        t[key] = a
        return t
    return edit


@pytest.mark.parametrize("case, error, match", [
    ("lora", NeuroAdaError, r"peft_type is 'LORA'"),
    ("neuroada", NeuroAdaError, r"NeuroAda folder"),
    ("supra", NeuroAdaError, r"Supra"),
    ("modules_to_save", NeuroAdaError, r"modules_to_save"),
    ("no_indices", NeuroAdaError, r"save_precomputed_indices"),
    ("bad_sparsity", NeuroAdaError, r"sparsity"),
    ("sparsity_changed", NeuroAdaError, r"rule 4.2: .*another shape"),
    ("config_not_json", NeuroAdaError, r"PEFT config is not valid JSON"),
    ("config_fifo", NeuroAdaUsageError, r"adapter_config.json"),
    ("weights_fifo", NeuroAdaUsageError, r"adapter_model.safetensors"),
    ("no_config", NeuroAdaUsageError, r"no adapter_config.json"),
    ("no_weights", NeuroAdaUsageError, r"no adapter_model.safetensors"),
    ("pickle_only", NeuroAdaUsageError, r"pickle"),
    ("truncated", NeuroAdaError, r"rule 1\.[14]"),
    ("out_of_range", NeuroAdaError, r"rule 3.5"),
    ("negative", NeuroAdaError, r"rule 3.5"),
    ("duplicate", NeuroAdaError, r"rule 3.6"),
    ("nan", NeuroAdaError, r"rule 3.7"),
    ("lora_tensor", NeuroAdaError, r"Supra \(LoRA\) part"),
    ("foreign_tensor", NeuroAdaError, r"not a Super-Tuning tensor"),
    ("values_missing", NeuroAdaError, r"no supertuning_values"),
    ("int16_indices", NeuroAdaError, r"expected 1-D I32"),
    ("not_a_folder", NeuroAdaUsageError, r"no such PEFT adapter folder"),
    # values for modules PEFT would not wrap (it loads the folder and skips them): no adapter merges as PEFT does
    ("target_narrowed", NeuroAdaError, r"adapter_config.json: .*does not select, e.g. 'model.layers.0.mlp.down_proj'"),
    ("target_regex_narrowed", NeuroAdaError, r"does not select, e.g. 'model.layers.0.mlp.down_proj'"),
    ("no_targets", NeuroAdaError, r"does not select"),
    ("targets_not_strings", NeuroAdaError, r"target_modules is \[1\]: expected a string or a list of strings"),
    ("targets_bad_regex", NeuroAdaError, r"target_modules '\(' is not a regular expression"),
])
def test_hostile_folders_are_refused(exported, tmp_path, case, error, match):
    base_dir, folder, _ = exported
    wpath = os.path.join(folder, "adapter_model.safetensors")
    if case == "lora":
        rewrite(folder, config={"peft_type": "LORA"})
    elif case == "neuroada":
        rewrite(folder, config={"peft_type": "NEUROADA"})
    elif case == "supra":
        rewrite(folder, config={"r": 4, "lora_alpha": 8})
    elif case == "modules_to_save":
        rewrite(folder, config={"modules_to_save": ["lm_head"]})
    elif case == "no_indices":
        rewrite(folder, config={"save_precomputed_indices": False})
    elif case == "bad_sparsity":
        rewrite(folder, config={"sparsity": "0.9"})
    elif case == "sparsity_changed":
        rewrite(folder, config={"sparsity": 0.5})
    elif case == "config_not_json":
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            f.write('{"peft_type": "SUPERTUNING", "peft_type": "LORA"}')   # duplicate key
    elif case in ("config_fifo", "weights_fifo"):      # a named pipe would block a plain open() forever
        name = "adapter_config.json" if case == "config_fifo" else "adapter_model.safetensors"
        os.unlink(os.path.join(folder, name))
        os.mkfifo(os.path.join(folder, name))
    elif case == "no_config":
        os.unlink(os.path.join(folder, "adapter_config.json"))
    elif case == "no_weights":
        os.unlink(wpath)
    elif case == "pickle_only":
        os.rename(wpath, os.path.join(folder, "adapter_model.bin"))
    elif case == "truncated":
        data = file_bytes(wpath)
        with open(wpath, "wb") as f:
            f.write(data[:-5])
    elif case == "out_of_range":
        rewrite(folder, tensors=set_entry("indices", 0, 64 * 128))  # down_proj: 64 x 128
    elif case == "negative":
        rewrite(folder, tensors=set_entry("indices", 0, -1))
    elif case == "duplicate":
        rewrite(folder, tensors=set_entry("indices", 1, lambda a: a[0]))
    elif case == "nan":
        rewrite(folder, tensors=set_entry("values", 0, np.nan))
    elif case == "lora_tensor":
        rewrite(folder, tensors=lambda t: {**t, "base_model.model.model.layers.0.self_attn.q_proj"
                                                ".supertuning_lora_A.weight": np.zeros((2, 64), np.float32)})
    elif case == "foreign_tensor":
        rewrite(folder, tensors=lambda t: {**t, "lm_head.weight": np.zeros((2, 2), np.float32)})
    elif case == "values_missing":
        rewrite(folder, tensors=lambda t: {k: v for k, v in t.items() if k != first_key(t, "values")})
    elif case == "int16_indices":
        rewrite(folder, tensors=lambda t: {k: (v.astype(np.int16) if k.endswith("indices") else v)
                                           for k, v in t.items()})
    elif case == "not_a_folder":
        folder = os.path.join(folder, "nope")
    elif case == "target_narrowed":
        rewrite(folder, config={"target_modules": ["q_proj"]})
    elif case == "target_regex_narrowed":
        rewrite(folder, config={"target_modules": r".*\.q_proj"})
    elif case == "no_targets":
        rewrite(folder, config={"target_modules": None})
    elif case == "targets_not_strings":
        rewrite(folder, config={"target_modules": [1]})
    elif case == "targets_bad_regex":
        rewrite(folder, config={"target_modules": "("})
    before = tree_bytes(folder) if os.path.isdir(folder) and "fifo" not in case else None
    with pytest.raises(error, match=match) as exc:
        pi.from_peft(folder, base_dir)
    assert type(exc.value) is error
    if before is not None:
        assert tree_bytes(folder) == before        # inputs are never touched


def test_a_target_regex_that_backtracks_without_end_is_refused_in_seconds(exported, monkeypatch):
    """target_modules comes from the folder and is matched against module names from the folder: `(.|.)*!` against a
    30-character name takes 2**30 steps (PEFT loading the folder would hang too). The matching gets a deadline."""
    import signal
    import time

    base_dir, folder, _ = exported
    handler = signal.getsignal(signal.SIGALRM)
    rewrite(folder, config={"target_modules": "(.|.)*!"})
    monkeypatch.setattr(pi, "REGEX_SECONDS", 0.5)
    started = time.monotonic()
    with pytest.raises(NeuroAdaError, match=r"adapter_config.json: target_modules '\(\.\|\.\)\*!' did not finish "
                                            r"matching the file's 4 module names in 0.5 s"):
        pi.from_peft(folder, base_dir)
    assert time.monotonic() - started < 30
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) is handler
    rewrite(folder, config={"target_modules": r".*\.(q_proj|down_proj)"})
    assert pi.from_peft(folder, base_dir).targets  # a fine regex still imports (the timer is gone)
    # a caller's own running timer (a test timeout) is its deadline: never disarmed, delayed or replaced
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30)
        assert pi.from_peft(folder, base_dir).targets
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # off the main thread (a server importing adapters in a worker) signals cannot be used: it imports, undeadlined
    import threading

    got = []
    worker = threading.Thread(target=lambda: got.append(pi.from_peft(folder, base_dir).targets))
    worker.start()
    worker.join(60)
    assert got and got[0]
    # a SIGALRM handler installed outside Python (getsignal says None) is left alone: no timer of ours is armed
    armed = []
    monkeypatch.setattr(signal, "getsignal", lambda sig: None)
    monkeypatch.setattr(signal, "setitimer", lambda *a: armed.append(a))
    assert pi.from_peft(folder, base_dir).targets and not armed


@pytest.mark.parametrize("config", [
    {"target_modules": r"model\.layers\.\d+\.(self_attn\.q_proj|mlp\.down_proj)"},
    {"target_modules": ["q_proj", "down_proj", "up_proj"]},  # up_proj wrapped with nothing loaded: zero deltas
    # keys a Super-Tuning config does not have: PEFT warns and ignores them, so excluded modules still load
    {"exclude_modules": ["down_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
])
def test_other_spellings_of_the_same_targets_import(exported, tmp_path, config):
    """A config whose target_modules selects the file's modules another way (a regex, a longer list) is what PEFT
    applies in full: it imports, and merges as PEFT's own load does."""
    base_dir, folder, ours_file = exported
    rewrite(folder, config=config)
    base = reload(base_dir)
    peft_merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload()
    adapter = pi.from_peft(folder, base_dir)
    assert sorted(adapter.targets) == sorted(naf.load(ours_file).targets)
    assert same_state(merged_with(base, adapter), peft_merged) == []


def test_another_base_is_refused(exported, tmp_path):
    _, folder, _ = exported
    other = save_base(tiny_llama(seed=99), tmp_path / "other")                 # same shapes, other values
    with pytest.raises(NeuroAdaError, match=r"rule 4.3"):
        pi.from_peft(folder, other)
    smaller = save_base(tiny_llama(hidden_size=32, num_attention_heads=2, num_key_value_heads=1),
                        tmp_path / "smaller")
    with pytest.raises(NeuroAdaError, match=r"rule 4.2"):
        pi.from_peft(folder, smaller)
    shallow = save_base(tiny_llama(num_hidden_layers=1), tmp_path / "shallow")
    with pytest.raises(NeuroAdaError, match=r"rule 4.1"):
        pi.from_peft(folder, shallow)


def test_export_refusals_and_overwrite(exported, tmp_path):
    base_dir, folder, ours_file = exported
    before = tree_bytes(folder)
    with pytest.raises(NeuroAdaUsageError, match="exists"):
        pi.to_peft(ours_file, folder, base=base_dir)
    assert tree_bytes(folder) == before
    pi.to_peft(ours_file, folder, base=base_dir, overwrite=True, base_model_name_or_path="x/y")
    assert json.loads(open(os.path.join(folder, "adapter_config.json")).read())["base_model_name_or_path"] == "x/y"
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    # an output that is, or holds, the input is refused even with overwrite
    with pytest.raises(NeuroAdaUsageError):
        pi.to_peft(ours_file, tmp_path, base=base_dir, overwrite=True)
    # another base: the probe hashes say no before anything is written
    other = save_base(tiny_llama(seed=5), tmp_path / "other")
    with pytest.raises(NeuroAdaError, match="rule 4.3"):
        pi.to_peft(ours_file, tmp_path / "never", base=other)
    assert not os.path.exists(tmp_path / "never")


def test_export_refuses_what_peft_cannot_apply_exactly(tmp_path):
    # F32 values on a BF16 base: PEFT rounds each value to BF16 before adding; the spec adds in f32
    base = tiny_llama(dtype=torch.bfloat16)
    base_dir = save_base(base, tmp_path / "base")
    model = with_deltas(copy.deepcopy(base), k=2, target_modules=["q_proj"])
    f32 = save_adapter(model, tmp_path / "f32.safetensors", value_dtype="F32")
    with pytest.raises(NeuroAdaError, match="not exact in the base dtype BF16"):
        pi.to_peft(f32, tmp_path / "p", base=base_dir)
    summary = pi.to_peft(f32, tmp_path / "p", base=base_dir, allow_inexact=True)
    assert summary["inexact_values"] > 0
    # GPT-2's Conv1D is stored [in, out]; PEFT Super-Tuning wraps nn.Linear only
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                                n_positions=32)).eval()
    g = with_deltas(gpt2, k=2)
    gfile = save_adapter(g, tmp_path / "gpt2.safetensors")
    with pytest.raises(NeuroAdaError, match="nn.Linear only"):
        pi.to_peft(gfile, tmp_path / "g")
    assert not os.path.exists(tmp_path / "g")


def test_sparsity_choice_is_exact_for_awkward_shapes():
    for shapes in ([(4096, 4096, 20)], [(3, 7, 1), (5, 11, 2), (13, 17, 3)], [(1, 1, 1)], [(10, 10, 10)],
                   [(576, 576, 20), (192, 576, 20), (576, 1536, 20), (1536, 576, 20)], [(7, 1000003, 1)]):
        s = pi.choose_sparsity((d_out * d_in, d_out * k) for d_out, d_in, k in shapes)
        assert 0.0 <= s < 1.0
        assert all(pi.peft_count(d_out * d_in, s) >= d_out * k for d_out, d_in, k in shapes)
        # the target with the largest k / d_in gets no padding at all (none can be spared)
        d_out, d_in, k = max(shapes, key=lambda x: x[2] / x[1])
        assert pi.peft_count(d_out * d_in, s) == d_out * k
        assert s == float(repr(s)) and len(repr(s)) <= 12      # a plain decimal in the config


def test_lowest_free_positions():
    used = np.array([0, 1, 5, 6, 9], dtype=np.int64)
    assert pi._lowest_free(used, 6).tolist() == [2, 3, 4, 7, 8, 10]
    assert pi._lowest_free(np.array([], dtype=np.int64), 3).tolist() == [0, 1, 2]


# -- PEFT and transformers must not mistake our adapter folder for one of theirs -------------------
def test_peft_does_not_mistake_our_folder_for_its_own(tmp_path):
    from neuroada_format.folder import CONFIG_NAME, WEIGHTS_NAME

    base = tiny_llama()
    model = with_deltas(copy.deepcopy(base), k=2, target_modules=["q_proj"])
    folder = tmp_path / "ours"
    save_adapter(model, folder)
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    where = os.fspath(folder)

    loaders = {
        "PeftConfig.from_pretrained": lambda: peft.PeftConfig.from_pretrained(where),
        "PeftModel.from_pretrained": lambda: peft.PeftModel.from_pretrained(copy.deepcopy(base), where),
        "AutoPeftModelForCausalLM": lambda: peft.AutoPeftModelForCausalLM.from_pretrained(where),
        "model.load_adapter": lambda: copy.deepcopy(base).load_adapter(where),
        "AutoModelForCausalLM": lambda: transformers.AutoModelForCausalLM.from_pretrained(where),
    }
    for label, load in loaders.items():
        with pytest.raises(Exception) as exc:
            load()
        assert not isinstance(exc.value, KeyError), (label, exc.value)
        assert isinstance(exc.value, (ValueError, OSError)), (label, repr(exc.value))
        text = str(exc.value)
        assert "adapter_config.json" in text or "not found" in text or "Unrecognized model" in text, (label, text)
    with pytest.raises(NeuroAdaUsageError, match="NeuroAda adapter folder: use it as it is"):
        pi.from_peft(folder, save_base(base, tmp_path / "base"))
    # ...and our own loaders still take it
    assert naf.load(folder / WEIGHTS_NAME).targets
    loaded = load_adapter(copy.deepcopy(base), folder)
    assert layers(loaded)


# -- neuroada-pack --to peft / --from-peft ---------------------------------------------------------
def pack(capsys, *argv):
    from neuroada_format.converters.pack_cli import main

    capsys.readouterr()     # drop what building the models printed
    with pytest.raises(SystemExit) as exc:
        main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_round_trip_and_exit_codes(tmp_path, capsys, monkeypatch):
    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base")
    model = with_deltas(copy.deepcopy(base), k=2, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = save_adapter(model, tmp_path / "ours.safetensors")
    before = file_bytes(ours)
    peft_dir, back = tmp_path / "peft", tmp_path / "back.safetensors"

    code, out, err = pack(capsys, "--to", "peft", ours, "--base", base_dir, "-o", peft_dir, "--base-name", base_dir)
    assert code == 0 and not err and out.startswith(f"wrote {peft_dir}: 6 targets, task_type CAUSAL_LM, sparsity ")
    loaded = peft.PeftModel.from_pretrained(reload(base_dir), os.fspath(peft_dir)).eval()
    merged = merge_and_unload(load_adapter(reload(base_dir), ours)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, merged(ids()).logits)
    save_adapter(model, tmp_path / "ours_folder")          # an adapter folder works the same
    code, out, err = pack(capsys, "--to", "peft", tmp_path / "ours_folder", "-o", tmp_path / "peft2", "--json")
    assert code == 0 and not err
    assert json.loads(out)["output"] == os.fspath(tmp_path / "peft2")  # the key every mode's summary uses
    # a relative output as typed ('./x//y') is said as every mode says its output: the absolute path
    monkeypatch.chdir(tmp_path)
    code, out, err = pack(capsys, "--to", "peft", "ours_folder", "-o", ".//peft3", "--json")
    assert code == 0 and json.loads(out)["output"] == os.fspath(tmp_path / "peft3")
    code, out, err = pack(capsys, "--to", "peft", "ours_folder", "-o", "./peft4/")
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'peft4'}: ")
    # the same adapter gives the same bytes; the configs differ only in the name given with --base-name
    weights = "adapter_model.safetensors"
    assert file_bytes(tmp_path / "peft2" / weights) == file_bytes(peft_dir / weights)
    c1, c2 = (json.loads((d / "adapter_config.json").read_text()) for d in (peft_dir, tmp_path / "peft2"))
    assert c1.pop("base_model_name_or_path") == base_dir and c2.pop("base_model_name_or_path") is None
    assert c1.pop("task_type") == "CAUSAL_LM" and c2.pop("task_type") is None and c1 == c2   # from --base's config
    # what the task type is for: AutoPeftModelForCausalLM takes the folder from the command line as it is
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(os.fspath(peft_dir)).eval()
    with torch.no_grad():
        assert torch.equal(auto(ids()).logits, merged(ids()).logits)
    for flag, want in (("none", None), ("SEQ_CLS", "SEQ_CLS")):
        code, out, err = pack(capsys, "--to", "peft", ours, "--base", base_dir, "--task-type", flag,
                              "-o", tmp_path / f"peft-{flag}")
        assert code == 0 and not err
        assert json.loads((tmp_path / f"peft-{flag}" / "adapter_config.json").read_text())["task_type"] == want
    code, out, err = pack(capsys, "--from-peft", peft_dir, "--base", base_dir, "-o", back, "--json")
    assert code == 0 and not err
    summary = json.loads(out)
    assert summary["mode"] == "from-peft" and summary["exact_round_trip"] and summary["targets"] == 6
    assert file_bytes(back) == before

    # failures: one line on stderr, the exit code of the table (1 content, 2 usage/IO), no output written
    lora = tmp_path / "lora"
    os.mkdir(lora)
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (lora / "adapter_model.safetensors").write_bytes(b"")
    cases = [
        (2, ["--to", "peft", ours, "--base", base_dir, "-o", peft_dir], "already exists"),
        (2, ["--to", "peft", ours, "-o", tmp_path], "input"),                          # -o holds the input
        (2, ["--to", "peft", tmp_path / "nope.safetensors", "-o", tmp_path / "p2"], "no such adapter"),
        (2, ["--to", "peft", ours, "--value-dtype", "BF16", "-o", tmp_path / "p3"], "--value-dtype"),
        (2, ["--from-peft", peft_dir, "-o", tmp_path / "x.safetensors"], "needs --base"),
        (2, ["--from-peft", tmp_path / "nope", "--base", base_dir, "-o", tmp_path / "x.safetensors"], "no such"),
        (2, ["--from-peft", peft_dir, "--base", base_dir, "-o", back], "already exists"),
        (2, ["--from-peft", peft_dir, "--base", base_dir, "-o", peft_dir / "x.safetensors"], "input"),
        (2, ["--to", "peft", ours, "--round-values", "-o", tmp_path / "p4"], "--round-values"),
        (2, ["--from-peft", peft_dir, "--base", base_dir, "--task-type", "CAUSAL_LM", "-o", tmp_path / "x.safetensors"],
         "--task-type goes with --to peft"),
        (2, ["--to", "peft", ours, "--task-type", "causal", "-o", tmp_path / "p5"], "--task-type"),
        (1, ["--from-peft", lora, "--base", base_dir, "-o", tmp_path / "x.safetensors"], "peft_type is 'LORA'"),
        (1, ["--from-peft", peft_dir, "--base", save_base(tiny_llama(seed=9), tmp_path / "other"),
             "-o", tmp_path / "x.safetensors"], "rule 4.3"),
    ]
    for code_wanted, argv, text in cases:
        code, out, err = pack(capsys, *argv)
        assert code == code_wanted, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and text in err, (argv, err)
        assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "x.safetensors") and not os.path.exists(tmp_path / "p2")
    assert file_bytes(ours) == before
    # rounding on request: a PEFT-native folder to BF16 values
    _, native_base, native = peft_native(tmp_path / "native")
    code, out, err = pack(capsys, "--from-peft", native, "--base", native_base, "--value-dtype", "BF16",
                          "-o", tmp_path / "n.safetensors")
    assert code == 1 and "not exact in BF16" in err
    code, out, err = pack(capsys, "--from-peft", native, "--base", native_base, "--value-dtype", "BF16",
                          "--round-values", "-o", tmp_path / "n.safetensors")
    assert code == 0 and "rows padded per spec 4.5" in out
    assert naf.validate(tmp_path / "n.safetensors", base=native_base).ok


def test_export_checks_exactness_against_the_base_peft_will_load(tmp_path):
    """An adapter made on an F32 copy of a BF16 model (spec section 14) with F32 values: fine for an F32
    base, but PEFT on the BF16 base would round every value first, so that export is refused."""
    bf16 = tiny_llama(dtype=torch.bfloat16)
    bf16_dir = save_base(bf16, tmp_path / "bf16")
    f32_dir = save_base(reload(bf16_dir, torch.float32), tmp_path / "f32")      # the exact upcast
    model = with_deltas(reload(f32_dir), k=2, target_modules=["q_proj"])
    adapter = save_adapter(model, tmp_path / "a.safetensors", value_dtype="F32")
    pi.to_peft(adapter, tmp_path / "ok", base=f32_dir)
    with pytest.raises(NeuroAdaError, match="not exact in the base dtype BF16"):
        pi.to_peft(adapter, tmp_path / "no", base=bf16_dir)
    assert not os.path.exists(tmp_path / "no")
