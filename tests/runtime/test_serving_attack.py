"""One base serving many task adapters, used as a demanding server would: casts after loading, many adapters loaded
and deleted, mixed batches against each sequence served alone. Real files (save_adapter), a real HF Llama."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from neuroada_format.runtime import (  # noqa: E402
    NeuroAdaConfig, adapter_batch, attach, list_adapters, load_adapter, save_adapter, set_adapter)
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


def test_load_adapter_from_another_thread_waits_for_a_running_block(two):
    """Hot-loading a new adapter version while another thread serves a mixed batch: load_adapter's early check
    refused it ("while another thread runs an adapter_batch block"), where delete_adapter and set_adapter wait for
    the block to end, as the docs say of every call that changes the adapters."""
    import threading
    import time

    base, files = two
    model = copy.deepcopy(base)
    load_adapter(model, files["a"], "a")
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    entered, outcome = threading.Event(), {}

    def loader():
        entered.wait()
        try:
            load_adapter(model, files["b"], "b")
            outcome["loaded"] = "b" in list_adapters(model)
        except Exception as e:  # noqa: BLE001 -- reported by the assertion below
            outcome["error"] = repr(e)

    t = threading.Thread(target=loader)
    t.start()
    with torch.no_grad(), adapter_batch(model, ["a", None]):
        entered.set()
        time.sleep(0.2)  # the loader is waiting now
        assert "b" not in list_adapters(model)  # nothing changes under a live block
        model(ids)
    t.join(timeout=60)
    assert outcome == {"loaded": True}
    with pytest.raises(Exception, match="inside an adapter_batch block"):  # this thread's own block: still refused
        with adapter_batch(model, ["a", "b"]):
            load_adapter(model, files["a"], "c")
    assert list_adapters(model) == ["a", "b"]


def test_peft_adapter_names_keyword_is_served_not_ignored(two):
    """PEFT's mixed batch is model(..., adapter_names=[...]); a transformers model takes any keyword, so the names
    were dropped and every row got the base (or the set_adapter adapter) without a word. Each row now gets its own
    adapter, as inside adapter_batch (tests/runtime/test_adapter_names.py has the rest)."""
    base, files = two
    model = copy.deepcopy(base)
    load_adapter(model, files["a"], "a")
    load_adapter(model, files["b"], "b")
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mixed = model(ids, adapter_names=["a", "b"]).logits
        with adapter_batch(model, ["a", "b"]):
            assert torch.equal(mixed, model(ids).logits)
    for row, name in enumerate(("a", "b")):
        set_adapter(model, name)
        assert torch.allclose(mixed[row], _logits(model, ids[row:row + 1])[0], atol=1e-5, rtol=0)
