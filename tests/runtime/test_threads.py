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
from neuroada_format.runtime.layer import NeuroAdaLayer  # noqa: E402
from neuroada_format.runtime.guards import layers # noqa: E402
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
    from neuroada_format.runtime.guards import MIXED_ATTR
    assert getattr(model, MIXED_ATTR, None) is None


# -- switches on one thread, forwards or other switches on another (found by the thread-safety audit) ---------------
def _two_served(tmp_path):
    """A model serving "a" (k=3) merged; "b" (k=6, other positions) loaded; ``base``: the weights before any merge."""
    from neuroada_format.runtime import set_adapter

    model = tiny_llama()
    for name, seed, k in (("a", 1, 3), ("b", 2, 6)):
        load_adapter(model, save_adapter(with_deltas(tiny_llama(), k=k, seed=seed),
                                         tmp_path / f"{name}.safetensors"), name)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    set_adapter(model, "a")
    return model, base


def test_a_forward_never_reads_a_weight_another_thread_is_merging(monkeypatch):
    """merge wrote the weight before recording it; a forward on another thread in between saw "nothing merged, weight
    moved" and read the merged values as the originals: unmerge then never gave the base back."""
    from neuroada_format.runtime import layer as layer_module

    target = next(iter(layers(with_deltas(tiny_llama(), k=3)).values()))
    assert target.mode == "inplace"
    base, w0 = target.weight.detach().clone(), target.neuroada_w0["default"].clone()
    written, forward_done = threading.Event(), threading.Event()
    real = layer_module.merge_

    def merge_(W, overlay, vals):
        real(W, overlay, vals)
        if threading.current_thread().name == "merging":
            written.set()
            forward_done.wait(1)  # without the lock the other thread's forward runs here

    monkeypatch.setattr(layer_module, "merge_", merge_)
    merging = threading.Thread(target=target.merge, name="merging")
    merging.start()
    assert written.wait(30)

    def forward():
        with torch.no_grad():
            target(torch.randn(2, target.d_in))
        forward_done.set()

    other = threading.Thread(target=forward)
    other.start()
    merging.join(30)
    other.join(30)
    assert forward_done.is_set()
    assert torch.equal(target.neuroada_w0["default"], w0)
    target.unmerge()
    assert torch.equal(target.weight, base)


def test_two_set_adapter_calls_at_once_take_turns(monkeypatch, tmp_path):
    """Two requests switching one model at once: both wrote their entries into a weight that recorded one of them,
    and set_adapter(model, None) left the other's there for good; or, a layer at a time, each switched some layers."""
    from neuroada_format.runtime import multi, set_adapter

    model, base = _two_served(tmp_path)
    paused, second_done, calls = threading.Event(), threading.Event(), []
    real = multi._serve

    def serve(layer):
        if threading.current_thread().name == "first":
            calls.append(layer)
            if len(calls) == 2:
                paused.set()  # the first switch, between its first and second layer
                second_done.wait(1)
        return real(layer)

    monkeypatch.setattr(multi, "_serve", serve)
    first = threading.Thread(target=set_adapter, args=(model, "b"), name="first")
    first.start()
    assert paused.wait(30)
    second = threading.Thread(target=lambda: (set_adapter(model, "a"), second_done.set()))
    second.start()
    first.join(30)
    second.join(30)
    assert second_done.is_set()
    assert all(l.merged_adapters == ["a"] for l in layers(model).values())  # the second ran after the first
    set_adapter(model, None)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


def test_loading_an_adapter_never_changes_what_is_served_meanwhile(monkeypatch, tmp_path):
    """load_adapter unmerged a served model for the whole load: requests on other threads got the plain base."""
    from neuroada_format.runtime import set_adapter

    model, base = _two_served(tmp_path)
    x = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model(x).logits
    seen, real = [], NeuroAdaLayer.add_adapter

    def add_adapter(layer, *args, **kwargs):
        with torch.no_grad():
            seen.append(torch.equal(model(x).logits, reference))  # what a request gets during the load
        return real(layer, *args, **kwargs)

    monkeypatch.setattr(NeuroAdaLayer, "add_adapter", add_adapter)
    # "c": the positions of "a" (magnitude, k=3), other values; "d": k=5, overlapping them in part
    paths = {n: save_adapter(with_deltas(tiny_llama(), k=k, seed=s), tmp_path / f"{n}.safetensors")
             for n, k, s in (("c", 3, 7), ("d", 5, 8))}
    for name, path in paths.items():
        load_adapter(model, path, name)
    monkeypatch.undo()
    assert seen and all(seen)
    fresh = tiny_llama()  # nothing merged: the originals read straight from the weight
    for name, path in paths.items():
        load_adapter(fresh, path, name)
        for n, layer in layers(fresh).items():
            assert torch.equal(layers(model)[n].neuroada_w0[name], layer.neuroada_w0[name]), (name, n)
    set_adapter(model, "c")
    set_adapter(fresh, "c")
    with torch.no_grad():
        assert torch.equal(model(x).logits, fresh(x).logits)
    set_adapter(model, None)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_a_disable_adapter_block_and_another_threads_adapter_batch_take_turns(tmp_path):
    """Each block puts back on exit what it found on entry: overlapping on two threads, one put its state back over
    the other's, and the model served the base instead of "a" afterwards."""
    import time

    from neuroada_format.runtime import adapter_batch, disable_adapter

    model, _ = _two_served(tmp_path)
    x = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model(x).logits
    order, entered = [], threading.Event()

    def disabled():
        with disable_adapter(model):
            entered.set()
            time.sleep(0.3)
            order.append("disable_adapter block ends")

    other = threading.Thread(target=disabled)
    other.start()
    assert entered.wait(30)
    with torch.no_grad(), adapter_batch(model, ["b", "a"]):
        order.append("adapter_batch block runs")
    other.join(30)
    assert order == ["disable_adapter block ends", "adapter_batch block runs"]  # (the other thread's end, too)
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference)


def _forward_through_a_merge(monkeypatch, target, x):
    """``target(x)`` on another thread, paused past its "merged?" check (before its write, or before the base layer
    reads the weight) while this thread merges the layer; its output."""
    paused, merged, out = threading.Event(), threading.Event(), []
    real = NeuroAdaLayer.delta

    def delta(layer, name):
        if threading.current_thread().name == "forward" and not paused.is_set():
            paused.set()
            merged.wait(30)
        return real(layer, name)

    monkeypatch.setattr(NeuroAdaLayer, "delta", delta)

    def forward():
        with torch.no_grad():
            out.append(target(x))

    other = threading.Thread(target=forward, name="forward")
    other.start()
    assert paused.wait(30)
    target.merge()
    merged.set()
    other.join(30)
    return out[0]


def test_a_forward_that_started_before_a_merge_serves_what_was_merged(monkeypatch):
    """A forward that found the layer unmerged, then wrote its entries after another thread merged it, put the
    originals back under a layer that recorded them merged: it served the base from then on."""
    target = next(iter(layers(with_deltas(tiny_llama(), k=3)).values()))
    base, x = target.weight.detach().clone(), torch.randn(2, target.d_in)
    with torch.no_grad():
        reference = target(x)  # the in-place mode's output is the merged layer's, bit for bit
    assert torch.equal(_forward_through_a_merge(monkeypatch, target, x), reference)
    with torch.no_grad():
        assert torch.equal(target(x), reference)  # still merged
    target.unmerge()
    assert torch.equal(target.weight, base)


def test_set_adapter_waits_for_a_forward_holding_its_entries_in_the_weight(monkeypatch, tmp_path):
    """A trained adapter served unmerged writes its entries around each product; set_adapter to an adapter at the same
    positions, meanwhile, wrote its own there, and the forward's restore then took them out of a layer that recorded
    them merged."""
    from neuroada_format.runtime import functional, set_adapter

    model = with_deltas(tiny_llama(), k=3)
    load_adapter(model, save_adapter(with_deltas(tiny_llama(), k=3, seed=5), tmp_path / "b.safetensors"), "b")
    twin = tiny_llama()
    load_adapter(twin, tmp_path / "b.safetensors", "b")
    set_adapter(twin, "b")
    x = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = twin(x).logits
    inside, switched = threading.Event(), threading.Event()
    real = functional._linear

    def linear(*args):
        if threading.current_thread().name == "forward" and not inside.is_set():
            inside.set()  # the first layer's entries are in its weight
            switched.wait(1)  # without the lock the switch runs here
        return real(*args)

    monkeypatch.setattr(functional, "_linear", linear)

    def forward():
        with torch.no_grad():
            model(x)

    other = threading.Thread(target=forward, name="forward")
    other.start()
    assert inside.wait(30)
    set_adapter(model, "b")
    switched.set()
    other.join(30)
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference)


# -- found by the review of the above ---------------------------------------------------------------------------------
def test_the_compiled_paths_operators_keep_a_merge_made_after_their_frame_started():
    """A compiled forward checks "not merged" in its guards, when its frame starts; its operator then wrote the
    adapter's entries and put w0 back, over a merge another thread made meanwhile: the layer said merged over the
    plain base (298 of 300 rounds of a compiled server thread against merge/unmerge)."""
    target = next(iter(layers(with_deltas(tiny_llama(), k=3)).values()))
    W, ov = target.weight, target.overlay(["default"])
    entries = ov.values([target.delta("default").detach()], W.dtype)
    target.merge()
    merged = W.detach().clone()
    x, g = torch.randn(3, target.d_in), torch.randn(3, target.d_out)
    with torch.no_grad():
        y = torch.ops.neuroada.overlay_linear(x, None, W, ov.flat, entries, ov.w0, False)
        gx = torch.ops.neuroada.overlay_linear_grad_input(g, W, ov.flat, entries, ov.w0, False)
    assert torch.equal(W, merged)
    assert torch.equal(y, torch.nn.functional.linear(x, merged)) and torch.equal(gx, g @ merged)
    target.unmerge()
    with torch.no_grad():
        torch.ops.neuroada.overlay_linear(x, None, W, ov.flat, entries, ov.w0, False)
    assert torch.equal(target.weight, target.base_layer.weight) and not torch.equal(W, merged)  # w0 back, unmerged


def test_an_additive_forward_running_through_a_merge_adds_no_delta_twice(monkeypatch):
    """The additive mode read "not merged", then the merged weight, and added the delta on top."""
    target = next(iter(layers(with_deltas(tiny_llama(), k=3, mode="additive")).values()))
    x = torch.randn(2, target.d_in)
    with torch.no_grad():
        reference = target(x)
    assert (_forward_through_a_merge(monkeypatch, target, x) - reference).abs().max() < 1e-5  # the merged layer's output (one rounding apart), not twice


def test_a_forked_child_is_refused_not_stuck_on_a_lock_its_parents_thread_held(tmp_path):
    """The child inherits the locks, held by a thread it does not have: its set_adapter waited forever."""
    import os

    from neuroada_format.runtime import adapter_batch, set_adapter

    model, _ = _two_served(tmp_path)
    inside, leave = threading.Event(), threading.Event()

    def block():
        with adapter_batch(model, ["a"]):
            inside.set()
            leave.wait(60)

    holder = threading.Thread(target=block)
    holder.start()
    assert inside.wait(30)
    try:
        pid = os.fork()
        if pid == 0:  # the child: refused at once, exit 0; anything else, exit 1 (a hang: killed below)
            code = 1
            try:
                set_adapter(model, "b")
            except Exception as exc:  # noqa: BLE001
                code = 0 if "another thread runs an adapter_batch block" in str(exc) else 1
            os._exit(code)
        for _ in range(600):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            threading.Event().wait(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the child's set_adapter hung")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        leave.set()
        holder.join(30)


def test_blocks_opened_on_a_compiled_wrapper_keep_their_state_on_the_model(tmp_path):
    """adapter_batch(torch.compile(model)) left its mark on the model after the block (every later set_adapter was
    refused as inside a block), and a disable_adapter block on the wrapper did not refuse set_adapter on the model."""
    from neuroada_format import NeuroAdaUsageError
    from neuroada_format.runtime import adapter_batch, disable_adapter, set_adapter

    model, _ = _two_served(tmp_path)
    compiled = torch.compile(model)  # (nothing runs: no compilation)
    with adapter_batch(compiled, ["a", "b"]):
        with pytest.raises(NeuroAdaUsageError, match="inside an adapter_batch block"):
            set_adapter(model, "b")
    set_adapter(model, "b")
    with disable_adapter(compiled):
        with pytest.raises(NeuroAdaUsageError, match="inside a disable_adapter block"):
            set_adapter(model, "a")
    set_adapter(compiled, "a")
    assert all(l.merged_adapters == ["a"] for l in layers(model).values())
