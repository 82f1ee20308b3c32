"""One base serving many task adapters, used as a demanding server would: casts after loading, many adapters loaded
and deleted, mixed batches against each sequence served alone. Real files (save_adapter), a real HF Llama."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from neuroada_format.runtime import (  # noqa: E402
    NeuroAdaConfig, adapter_batch, attach, delete_adapter, list_adapters, load_adapter, save_adapter, set_adapter)
from neuroada_format.runtime.guards import layers  # noqa: E402
from tests.tiny_hf import tiny_llama  # noqa: E402


def _adapter_file(base, folder, name, k, targets="all-linear", seed=0):
    m = copy.deepcopy(base)
    attach(m, NeuroAdaConfig(k=k, target_modules=targets), name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(m).values():
            layer.neuroada_val[name].normal_(0, 0.05, generator=g)
    return save_adapter(m, str(folder / f"{name}.safetensors"), name)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    base = tiny_llama(max_position_embeddings=64)
    return base, {"a": _adapter_file(base, folder, "a", 2, seed=1), "b": _adapter_file(base, folder, "b", 3, seed=2)}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_while_merged_serves_what_a_switch_after_the_cast_serves(two, dtype):
    """model.to(bf16) with an adapter merged rounded the merged f32 values again: the adapter then served other
    bits than the same adapter switched to after the cast (set_adapter(b); set_adapter(a) changed a's outputs)."""
    base, files = two
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    merged_first, cast_first = copy.deepcopy(base), copy.deepcopy(base)
    for m in (merged_first, cast_first):
        for n, f in files.items():
            load_adapter(m, f, n)
    set_adapter(merged_first, "a")
    merged_first.to(dtype)
    cast_first.to(dtype)
    set_adapter(cast_first, "a")
    assert torch.equal(_logits(merged_first, ids), _logits(cast_first, ids))
    served = _logits(merged_first, ids)
    set_adapter(merged_first, "b")
    set_adapter(merged_first, "a")
    assert torch.equal(_logits(merged_first, ids), served)
    set_adapter(merged_first, None)  # and the base comes back bit for bit
    assert torch.equal(_logits(merged_first, ids), _logits(copy.deepcopy(base).to(dtype), ids))

