"""What an adapter loaded for inference holds: its file's value dtype (BF16: 2 bytes a value, not f32's 4), and
nothing a user can observe changes for it: merged weights, forwards, set_adapter, mixed batches, saving and an exact
state loaded afterwards give the bits that f32 copies of the same values gave."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroada_format.runtime import (adapter_batch, add_weighted_adapter, load_adapter, merge_and_unload, save_adapter,
                                     set_adapter)
from neuroada_format.runtime.kernels.bgmv import AdapterStack
from neuroada_format.runtime.guards import layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_hf import tiny_llama, with_deltas  # noqa: E402  (tests/tiny_hf.py)

IDS = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(5))


def trained(seed: int, k: int = 3, **cfg):
    return with_deltas(tiny_llama(), k=k, seed=seed, **cfg)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("held")
    out = {}
    for name, seed, dtype in (("a", 1, None), ("b", 2, None), ("f16", 3, "F16"), ("f32", 4, "F32")):
        out[name] = d / f"{name}.safetensors"
        save_adapter(trained(seed), out[name], value_dtype=dtype)
    return out


def loaded(files, names, *, is_trainable=False):
    model = tiny_llama()
    for n in names:
        load_adapter(model, files[n], n, is_trainable=is_trainable)
    if is_trainable:
        model.requires_grad_(False)
    return model


@pytest.mark.parametrize("name, dtype", [("a", torch.bfloat16), ("f16", torch.float16), ("f32", torch.float32)])
def test_an_inference_load_holds_the_files_value_dtype(files, name, dtype):
    held = loaded(files, [name])
    master = loaded(files, [name], is_trainable=True)
    for layer, twin in zip(layers(held).values(), layers(master).values()):
        v, m = layer.neuroada_val[name], twin.neuroada_val[name]
        assert v.dtype == dtype and not v.requires_grad
        assert m.dtype == torch.float32  # trainable: the config's delta_dtype, for the optimizer
        assert torch.equal(v.float(), m)  # the same values: the file's dtype holds them exactly
    held_bytes, master_bytes = (sum(v.nbytes for layer in layers(m).values() for v in layer.neuroada_val.values())
                                for m in (held, master))
    assert held_bytes == master_bytes * dtype.itemsize // 4


def test_what_is_served_is_the_same_bits_as_from_f32_copies(files, tmp_path):
    held, master = loaded(files, ["a", "b"]), loaded(files, ["a", "b"], is_trainable=True)
    with torch.no_grad():
        assert torch.equal(held(IDS).logits, master(IDS).logits)  # the active adapter, unmerged
        for name in ["b", None, "a"]:
            set_adapter(held, name)
            set_adapter(master, name)
            assert all(torch.equal(x.base_layer.weight, y.base_layer.weight)
                       for x, y in zip(layers(held).values(), layers(master).values()))
        set_adapter(held, None)
        set_adapter(master, None)
        for names in (["a", "b", None, "a"], ["b", "b", "a", "a"]):
            with adapter_batch(held, names):
                got = held(IDS).logits
            with adapter_batch(master, names):
                want = master(IDS).logits
            assert torch.equal(got, want)
    save_adapter(held, tmp_path / "again.safetensors", "a")
    assert _same_tensors(tmp_path / "again.safetensors", files["a"])  # written back as read
    for m in (held, master):
        set_adapter(m, "a")
    merged = [merge_and_unload(m).state_dict() for m in (held, master)]
    assert merged[0].keys() == merged[1].keys()
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])


def _same_tensors(p, q):
    from safetensors.numpy import load_file

    a, b = load_file(str(p)), load_file(str(q))
    return a.keys() == b.keys() and all(np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)) for k in a)


def test_an_exact_state_loaded_afterwards_is_not_rounded_to_the_files_dtype(files):
    """save_pretrained's model.safetensors holds the f32 master values; loading it after load_adapter (what the
    warning about a folder's extra tensors tells users to do) gives those values back, not their BF16 rounding."""
    source = trained(1)
    held = loaded(files, ["a"])
    state = {k.replace(".default", ".a"): v for k, v in source.state_dict().items() if ".neuroada_val." in k}
    assert any(not torch.equal(v, v.bfloat16().float()) for v in state.values())  # off the BF16 grid
    held.load_state_dict(state, strict=False)
    for key, v in state.items():
        got = held.get_parameter(key)
        assert got.dtype == torch.float32 and torch.equal(got, v)
    with torch.no_grad():
        set_adapter(held, "a")
        want = merge_and_unload(copy.deepcopy(source)).state_dict()
        got = merge_and_unload(held).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_trainable_values_keep_the_dtype_their_config_chose():
    """delta_dtype='bfloat16' is the user's choice for master values: a wider state is rounded into it, as into
    any parameter, and the parameter the optimizer holds stays what it was."""
    model = trained(1, delta_dtype="bfloat16")
    v = layers(model)["model.layers.0.self_attn.q_proj"].neuroada_val["default"]
    assert v.dtype == torch.bfloat16 and v.requires_grad
    state = {k: t.float() + 1e-3 for k, t in model.state_dict().items() if ".neuroada_val." in k}
    model.load_state_dict(state, strict=False)
    assert v.dtype == torch.bfloat16 and v is layers(model)["model.layers.0.self_attn.q_proj"].neuroada_val["default"]


def test_a_weighted_combination_is_held_in_its_value_dtype(files):
    model = loaded(files, ["a", "b"])
    add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "mix")
    master = loaded(files, ["a", "b"], is_trainable=True)
    add_weighted_adapter(master, ["a", "b"], [0.5, 0.5], "mix")
    for layer, twin in zip(layers(model).values(), layers(master).values()):
        assert layer.neuroada_val["mix"].dtype == torch.bfloat16  # rounded to BF16 by the combine rule anyway
        assert torch.equal(layer.neuroada_val["mix"].float(), twin.neuroada_val["mix"].float())


def test_a_stack_of_narrow_values_keeps_one_f32_copy():
    """The mixed-batch paths read every adapter in f32; with BF16-held values the per-adapter reads are rows of the
    stacked f32 tensor, not a second f32 copy of each adapter."""
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(32, generator=g)[:4].sort().values for _ in range(16)])
    vals = [torch.randn(16, 4, generator=g).bfloat16() for _ in range(3)]
    stack = AdapterStack([idx] * 3, vals, 32)
    stacked = stack.val
    for slot in range(3):
        v = stack.val_acc(slot, torch.float32)
        assert v.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
        assert v.is_contiguous() and torch.equal(v, vals[slot].float())
    ragged = AdapterStack([idx, idx[:, :2].contiguous()], [vals[0], vals[1][:, :2]], 32)
    ragged.val  # noqa: B018
    short = ragged.val_acc(1, torch.float32)  # a short row's stacked copy is padded: its own copy instead
    assert short.shape == (16, 2) and torch.equal(short, vals[1][:, :2].float())
