"""Forwards from several threads at once, as a server with a thread pool runs them.

The in-place mode writes the adapter's entries into the shared base weight around each product and puts the originals
back after it. Without a lock per weight, a thread could restore the originals while another was still multiplying, and
that call silently used the plain base for the layer (12-20 of 120 calls here had logits off by up to 0.6).
"""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("transformers")

from neuroada_format.runtime import load_adapter, save_adapter  # noqa: E402
from neuroada_format.runtime.model import layers  # noqa: E402
from tiny_hf import tiny_llama, with_deltas  # noqa: E402


def _hammer(model, inputs, reference, threads=4, calls=30, grad=False):
    """Run `calls` forwards on each of `threads` threads; the outputs that differ from the reference."""
    wrong, failures = [], []
    start = threading.Barrier(threads)

    def work(i):
        try:
            start.wait()
            for _ in range(calls):
                x = inputs[i % len(inputs)]
                with torch.set_grad_enabled(grad):
                    y = model(x).logits
                    if grad:
                        y.float().square().mean().backward()
                if not torch.equal(y.detach(), reference[i % len(inputs)]):
                    wrong.append(float((y.detach() - reference[i % len(inputs)]).abs().max()))
        except Exception as exc:  # noqa: BLE001 - reported below, in the test's thread
            failures.append(exc)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not failures, failures
    return wrong


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_concurrent_forwards_of_a_loaded_adapter_match_one_thread(tmp_path, dtype):
    trained = with_deltas(tiny_llama(dtype=dtype), k=8)
    save_adapter(trained, tmp_path / "a")
    served = load_adapter(tiny_llama(dtype=dtype), tmp_path / "a")
    assert {layer.mode for layer in layers(served).values()} == {"inplace"}
    before = {n: p.detach().clone() for n, p in served.named_parameters()}
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randint(0, 100, (2, 10), generator=g) for _ in range(4)]
    with torch.no_grad():
        reference = [served(x).logits for x in inputs]
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # many Python threads, each with one torch thread: the calls truly overlap
    try:
        assert _hammer(served, inputs, reference) == []
    finally:
        torch.set_num_threads(prev)
    assert all(torch.equal(p, before[n]) for n, p in served.named_parameters())  # the base is whole again


def test_concurrent_training_steps_keep_the_base_and_the_forward(tmp_path):
    """Forward and backward on several threads (gradients accumulate): every forward still sees the adapter, and the
    frozen base is bit for bit what it was when the threads are done."""
    model = with_deltas(tiny_llama(), k=4)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randint(0, 100, (2, 8), generator=g) for _ in range(4)]
    with torch.no_grad():
        reference = [model(x).logits for x in inputs]
    assert _hammer(model, inputs, reference, calls=10, grad=True) == []
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_adapter_batch_blocks_from_two_threads_run_one_at_a_time(tmp_path):
    """adapter_batch keeps its state on the model: two threads used to enter blocks at once (the check and the mark
    were not atomic) and a quarter of their rows came out with the other thread's adapters or none, or were refused
    as 'inside an adapter_batch block'. A block another thread opens now waits; every row equals one thread's."""
    from neuroada_format.runtime import adapter_batch

    files = {}
    for name, seed in (("a", 1), ("b", 2)):
        files[name] = save_adapter(with_deltas(tiny_llama(), k=3, seed=seed), tmp_path / f"{name}.safetensors")
    model = tiny_llama()
    for name, path in files.items():
        load_adapter(model, path, name)
    x = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(5))
    reference = {}
    for name in files:
        with torch.no_grad(), adapter_batch(model, [name, name]):
            reference[name] = model(x).logits
    assert not torch.equal(reference["a"], reference["b"])
    wrong, failures = [], []
    start = threading.Barrier(2)

    def work(name):
        try:
            start.wait()
            for _ in range(40):
                with torch.no_grad(), adapter_batch(model, [name, name]):
                    y = model(x).logits
                if not torch.equal(y, reference[name]):
                    wrong.append(name)
        except Exception as exc:  # noqa: BLE001 - reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and not wrong, (failures[:1], len(wrong))
    from neuroada_format.runtime.model import MIXED_ATTR
    assert getattr(model, MIXED_ATTR, None) is None
