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
