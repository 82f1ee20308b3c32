"""PEFT's mixed batch as a keyword: ``model(**inputs, adapter_names=names)`` and ``model.generate(**inputs,
adapter_names=names)`` on an attached transformers model serve what ``with adapter_batch(model, names):`` serves, bit
for bit (forward, greedy and beam generation, causal LM and encoder-decoders), refuse what PEFT refuses with our
errors, leave the merged adapter in place, and take turns across threads. Real adapter files, real HF classes."""

from __future__ import annotations

import copy
import functools
import inspect
import pickle
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from neuroada_format import NeuroAdaError, NeuroAdaUsageError  # noqa: E402
from neuroada_format.runtime import (NeuroAdaConfig, NeuroAdaLayer, adapter_batch, attach,  # noqa: E402
                                     disable_adapter, load_adapter, merge_and_unload, merged_adapter, save_adapter,
                                     set_adapter, unload)
from neuroada_format.runtime.guards import MIXED_ATTR, MIXED_OWNER_ATTR, layers  # noqa: E402
from tiny_hf import tiny_bart, tiny_llama, tiny_t5, with_deltas  # noqa: E402

IDS = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(0))
MIXED = ["a", "__base__", "b", None]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two adapter files for tiny_llama(): "a" k=1 on every linear, "b" k=3 on three projections."""
    folder = tmp_path_factory.mktemp("names")
    return {"a": save_adapter(with_deltas(tiny_llama(), k=1, seed=1), folder / "a.safetensors"),
            "b": save_adapter(with_deltas(tiny_llama(), k=3, seed=2, target_modules=["q_proj", "v_proj", "down_proj"]),
                              folder / "b.safetensors")}


def served(files, merged=None):
    model = tiny_llama()
    for name, path in files.items():
        load_adapter(model, path, name)
    set_adapter(model, merged)
    return model


def in_block(model, names, call):
    with torch.no_grad(), adapter_batch(model, names):
        return call()


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model, before, merged):
    """What a call with the keyword must leave as it found: the merged adapter, the weights' bits, the layers'
    classes, and no block marked open."""
    assert merged_adapter(model) == merged
    after = weights(model)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert all(type(layer).__name__ == "ServingLayer" for layer in layers(model).values())
    assert MIXED_ATTR not in model.__dict__ and MIXED_OWNER_ATTR not in model.__dict__


@pytest.mark.parametrize("merged", [None, "b"])
@pytest.mark.parametrize("names", [MIXED, ["a", None, "a", "__base__"], ["b"] * 4])
def test_forward_gives_adapter_batchs_bits(files, names, merged):
    """["a", None, ...] alone uses a K = 1 stack (the fused CPU path), MIXED a K = 3 one; a merged adapter is
    taken out for the call and put back after it."""
    model = served(files, merged)
    want = in_block(model, names, lambda: model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits)
    before = weights(model)
    with torch.no_grad():
        got = model(input_ids=IDS, attention_mask=torch.ones_like(IDS), adapter_names=names).logits
        positional = model(IDS, adapter_names=tuple(names)).logits
    assert torch.equal(got, want) and torch.equal(positional, want)
    assert_unchanged(model, before, merged)
    for row, name in enumerate(names):  # and the rows are each adapter's, not what set_adapter serves
        set_adapter(model, None if name == "__base__" else name)
        with torch.no_grad():
            torch.testing.assert_close(got[row], model(IDS).logits[row], rtol=1e-5, atol=1e-5)


def test_base_rows_are_the_plain_base_bit_for_bit(files):
    model = served(files, merged="a")
    with torch.no_grad():
        got = model(IDS, adapter_names=MIXED).logits
        plain = tiny_llama()(IDS).logits
    assert torch.equal(got[1], plain[1]) and torch.equal(got[3], plain[3])
    assert not torch.allclose(got[0], plain[0], atol=1e-3) and not torch.allclose(got[2], plain[2], atol=1e-3)


def _seq2seq(build):
    model = build().float().eval()
    attach(model, NeuroAdaConfig(k=2), "a")
    attach(model, NeuroAdaConfig(k=1), "b")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in layers(model).values():
            for v in layer.neuroada_val.values():
                v.copy_(torch.randn(v.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("arch", ["llama", "t5", "bart"])
def test_generate_gives_adapter_batchs_bits_greedy_and_with_beams(files, arch):
    """One name per input: generate repeats each input's rows for beams and returned sequences (an encoder-decoder
    runs its encoder on the inputs, its decoder on the repeated rows), as adapter_batch serves them."""
    model = served(files, merged="b") if arch == "llama" else _seq2seq({"t5": tiny_t5, "bart": tiny_bart}[arch])
    ids = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(1))
    names = ["a", "__base__", "b"]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
              do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    for extra in ({}, {"num_beams": 2, "num_return_sequences": 2}, {"num_beams": 3}):
        want = in_block(model, names, lambda: model.generate(**kw, **extra))
        got = model.generate(**kw, **extra, adapter_names=names)
        assert torch.equal(got.sequences, want.sequences), extra
        assert torch.equal(torch.stack(got.scores), torch.stack(want.scores)), extra
        with torch.no_grad(), disable_adapter(model):
            plain = model.generate(**kw, **extra)
        assert not torch.equal(torch.stack(got.scores), torch.stack(plain.scores))  # the adapters are served
    if arch == "llama":
        assert merged_adapter(model) == "b"


def test_layers_given_flattened_tokens_are_served(files):
    """OPT's MLP gets its input as [sequences x tokens, d], which the block reads as every sequence's tokens in order
    from the model call's input_ids: the forward's own hooks ran before the block opened, so it reads them from the
    call itself."""
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100, word_embed_proj_dim=32,
        max_position_embeddings=64)).eval()
    attach(model, NeuroAdaConfig(k=2), "a")
    attach(model, NeuroAdaConfig(k=1), "b")
    with torch.no_grad():
        for layer in layers(model).values():
            for v in layer.neuroada_val.values():
                v.normal_(0, 0.2)
    names = ["b", None, "a", "a"]
    want = in_block(model, names, lambda: model(IDS).logits)
    with torch.no_grad():
        assert torch.equal(model(IDS, adapter_names=names).logits, want)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=1, attention_mask=torch.ones_like(IDS))
    assert torch.equal(model.generate(IDS, adapter_names=names, **kw), in_block(model, names,
                                                                                lambda: model.generate(IDS, **kw)))


def test_refusals_name_the_rule_and_change_nothing(files):
    model = served(files, merged="a")
    before = weights(model)
    refused = [
        (lambda: model(IDS, adapter_names=["a", "b"]),
         r"model\(\.\.\., adapter_names=\.\.\.\) got 2 adapter names for a batch of 4 inputs: one name per input"),
        (lambda: model.generate(IDS[:2], max_new_tokens=2, adapter_names=["a"] * 4, num_beams=2),
         r"model\.generate\(\.\.\., adapter_names=\.\.\.\) got 4 adapter names for a batch of 2 inputs: one name per "
         r"input .*generate repeats each input's rows for num_beams and num_return_sequences itself"),
        (lambda: model(IDS, adapter_names=["a", "nope", "b", None]), r"no adapter named 'nope' \(have: a, b\)"),
        (lambda: model.generate(IDS, max_new_tokens=2, adapter_names=["a", "b", "c", "d"]),
         r"no adapter named 'c' \(have: a, b\)"),
        (lambda: model(IDS, adapter_names="a"), r"adapter_names takes a list of adapter names, not str 'a'"),
        (lambda: model(IDS, adapter_names=["a", 1, "b", None]), r"adapter_names: adapter names are strings"),
    ]
    for call, says in refused:
        with torch.no_grad(), pytest.raises(NeuroAdaError, match=says):
            call()
        assert_unchanged(model, before, "a")


def test_training_mode_with_gradients_is_refused_saying_why(files):
    """PEFT refuses adapter_names in training mode: the block serves its adapters inference-only."""
    model = served(files, merged="a").train()
    before = weights(model)
    with pytest.raises(NeuroAdaUsageError, match=r"model\(\.\.\., adapter_names=\.\.\.\) in training mode with "
                                                 r"gradients enabled: .*their deltas would get no gradient"):
        model(IDS, adapter_names=MIXED)
    assert_unchanged(model, before, "a")
    want = in_block(model, MIXED, lambda: model(IDS).logits)
    with torch.no_grad():  # training mode without gradients, or eval mode with them: served
        assert torch.equal(model(IDS, adapter_names=MIXED).logits, want)
    model.eval()
    assert torch.equal(model(IDS, adapter_names=MIXED).logits.detach(), want)
    assert_unchanged(model, before, "a")


def test_inside_an_open_block_the_keyword_is_refused(files):
    model = served(files)
    with torch.no_grad(), adapter_batch(model, MIXED):
        want = model(IDS).logits
        for call, what in ((lambda: model(IDS, adapter_names=MIXED), r"model\("),
                           (lambda: model.generate(IDS, max_new_tokens=2, adapter_names=MIXED), r"model\.generate\(")):
            with pytest.raises(NeuroAdaUsageError, match=what + r"\.\.\., adapter_names=\.\.\.\) inside an "
                                                               r"adapter_batch block, which already gives every row"):
                call()
        assert torch.equal(model(IDS).logits, want)  # the block goes on serving its names
    assert MIXED_ATTR not in model.__dict__


def test_layers_that_cannot_serve_a_mixed_batch_are_refused_as_by_adapter_batch(files):
    class OwnLayer(NeuroAdaLayer):
        pass

    model = served(files)
    last = list(layers(model).values())[-1]
    last.__class__ = OwnLayer
    before = weights(model)
    with torch.no_grad(), pytest.raises(NeuroAdaUsageError, match="cannot serve a OwnLayer in adapter_batch"):
        model(IDS, adapter_names=MIXED)
    assert type(last) is OwnLayer and merged_adapter(model) is None
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["forward", "generate"])
def test_an_error_inside_the_call_puts_the_merged_adapter_back(files, method):
    model = served(files, merged="b")
    before = weights(model)

    def boom(*_):
        raise RuntimeError("boom inside the forward")

    handle = model.model.layers[1].register_forward_pre_hook(boom)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom inside the forward"):
        if method == "forward":
            model(IDS, adapter_names=MIXED)
        else:
            model.generate(IDS, max_new_tokens=2, adapter_names=MIXED)
    handle.remove()
    assert_unchanged(model, before, "b")
    done = []  # the model's lock is free: another thread's call goes through
    worker = threading.Thread(target=lambda: done.append(model(IDS, adapter_names=MIXED).logits.detach()))
    worker.start()
    worker.join(timeout=60)
    assert len(done) == 1 and torch.equal(done[0], in_block(model, MIXED, lambda: model(IDS).logits))


def test_two_threads_get_their_own_rows(files):
    """Each call opens the block under the model's lock: two threads calling at once take turns, and every row is
    the one its own call asked for."""
    model = served(files, merged="a")
    plan = [MIXED, ["b", "b", "__base__", "a"]]
    reference = [in_block(model, names, lambda: model(IDS).logits) for names in plan]
    assert not torch.equal(reference[0], reference[1])
    wrong, failures = [], []
    start = threading.Barrier(2)

    def work(i):
        try:
            start.wait()
            for _ in range(15):
                with torch.no_grad():
                    y = model(IDS, adapter_names=plan[i]).logits
                if not torch.equal(y, reference[i]):
                    wrong.append(i)
        except Exception as exc:  # noqa: BLE001 - reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and not wrong, (failures[:1], len(wrong))
    assert merged_adapter(model) == "a" and MIXED_ATTR not in model.__dict__


def test_a_peft_adapter_loaded_through_transformers_keeps_its_meaning_of_the_keyword(files):
    """A LoRA added with transformers' model.add_adapter beside ours: the keyword goes to transformers untouched
    (its names are PEFT's, no block is opened)."""
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    load_adapter(model, files["b"], "b")  # (q, v, down: k_proj is free for the LoRA)
    model.add_adapter(peft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False), adapter_name="lora")
    assert model._hf_peft_config_loaded
    with torch.no_grad():
        want = type(model).forward(model, IDS, adapter_names=["lora"] * 4).logits
        assert torch.equal(model(IDS, adapter_names=["lora"] * 4).logits, want)


def test_forward_and_generate_look_like_the_models_own(files, tmp_path):
    """transformers reads forward's parameters (which inputs generate passes, which dataset columns Trainer keeps)."""
    model = served(files)
    assert {"forward", "generate"} <= model.__dict__.keys()
    assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))
    assert inspect.signature(model.generate) == inspect.signature(type(model).generate.__get__(model))
    assert model._supports_logits_to_keep()  # generate's own reading: it computes the last position's logits only
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(str(tmp_path), report_to=[]))
    trainer._set_signature_columns_if_needed()  # the dataset columns Trainer keeps: the forward's inputs, not none
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)


def test_unload_gives_back_the_forward_the_model_had(files):
    """A forward the instance held before attach (accelerate's hooks put one there) is wrapped, and comes back on
    unload; merge_and_unload leaves the class's."""
    model = tiny_llama()
    calls = []

    def own_forward(*args, **kwargs):
        calls.append(sorted(kwargs))
        return type(model).forward(model, *args, **kwargs)

    model.forward = own_forward
    load_adapter(model, files["a"], "a")
    load_adapter(model, files["b"], "b")
    want = in_block(model, MIXED, lambda: model(IDS).logits)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(model(IDS, adapter_names=MIXED).logits, want)
    assert calls == [[]]  # the keyword never reaches the model's own forward
    unload(model)
    assert model.__dict__["forward"] is own_forward and "generate" not in model.__dict__
    other = merge_and_unload(served(files, merged="a"))
    assert "forward" not in other.__dict__ and "generate" not in other.__dict__
    with pytest.raises(ValueError, match="adapter_names"):  # a plain transformers model again: transformers' refusal
        other.generate(IDS, max_new_tokens=1, adapter_names=MIXED, do_sample=False, pad_token_id=0)


def test_copies_and_pickles_serve_their_own_adapters(files):
    model = served(files, merged="b")
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.__dict__["forward"].model() is other
        with torch.no_grad():
            layer = layers(other)["model.layers.0.self_attn.q_proj"]
            layer.neuroada_val["a"].mul_(2)  # the copy's own adapter: the original's rows stay as they were
        want = in_block(other, MIXED, lambda: other(IDS).logits)
        with torch.no_grad():
            assert torch.equal(other(IDS, adapter_names=MIXED).logits, want)
            assert not torch.equal(model(IDS, adapter_names=MIXED).logits, want)
        assert merged_adapter(other) == "b"
    # a forward the instance held before (accelerate's is a partial of the model): the copy's wraps the copy's
    model = tiny_llama()
    model.forward = functools.partial(type(model).forward, model)
    load_adapter(model, files["a"], "a")
    other = copy.deepcopy(model)
    assert other.__dict__["forward"].func.previous.args[0] is other
    with torch.no_grad():
        layers(other)["model.layers.0.self_attn.q_proj"].neuroada_val["a"].mul_(2)
    want = in_block(other, ["a", None], lambda: other(IDS[:2]).logits)
    with torch.no_grad():
        assert torch.equal(other(IDS[:2], adapter_names=["a", None]).logits, want)


def test_a_compiled_wrapper_takes_the_keyword(files):
    """torch.compile(model): the block opens outside the graph and the forward inside it is compiled, block after
    block (without fullgraph: a block is Python state, no graph can hold its opening)."""
    from torch._dynamo.utils import counters

    model = served(files, merged="a")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    try:
        for names in (MIXED, ["b", None, "b", "a"], MIXED):
            want = in_block(model, names, lambda: model(IDS).logits)
            with torch.no_grad():
                torch.testing.assert_close(compiled(IDS, adapter_names=names).logits, want, rtol=1e-5, atol=1e-5)
        # the model's forward, compiled once for the block (dynamo followed the block's opening into the stack caches
        # before, 46 graphs for these three calls)
        assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
        kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        want = in_block(model, MIXED, lambda: model.generate(IDS, **kw))
        assert torch.equal(compiled.generate(IDS, adapter_names=MIXED, **kw), want)
        assert merged_adapter(model) == "a"
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_a_ddp_wrapped_model_takes_the_keyword(tmp_path):
    """DistributedDataParallel hands its keywords to the model it wraps (a gloo group of one rank)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = with_deltas(tiny_llama(), k=2)  # trainable deltas: DDP needs parameters that require grad
    attach(model, NeuroAdaConfig(k=1, target_modules=["q_proj", "up_proj"]), "b")
    with torch.no_grad():
        for layer in layers(model).values():
            if "b" in layer.neuroada_val:
                layer.neuroada_val["b"].normal_(0, 0.1)
    model.eval()
    names = ["default", "b", None, "b"]
    want = in_block(model, names, lambda: model(IDS).logits)
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=(tmp_path / "store").as_uri())
    try:
        wrapped = DistributedDataParallel(model)
        with torch.no_grad():
            assert torch.equal(wrapped(IDS, adapter_names=names).logits, want)
    finally:
        dist.destroy_process_group()


def test_a_plain_torch_model_takes_the_keyword_too():
    """Not only transformers models: attach gives any model the keyword (adapter_batch serves any model)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    attach(model, NeuroAdaConfig(k=2), "a")
    with torch.no_grad():
        for layer in layers(model).values():
            layer.neuroada_val["a"].normal_(0, 0.5)
    x = torch.randn(3, 5, 8)
    want = in_block(model, ["a", None, "a"], lambda: model(x))
    with torch.no_grad():
        got = model(x, adapter_names=["a", None, "a"])
    assert torch.equal(got, want) and not torch.equal(got[0], got[1])
    assert "generate" not in model.__dict__


def test_an_empty_list_is_refused_as_the_keywords_own_usage_error():
    """Where no input gives the batch size (an input named other than input_ids/inputs_embeds), an empty list was
    refused as invalid input in adapter_batch's words, a call the user never made."""

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, features):
            return self.fc(features)

    model = Features().eval()
    attach(model, NeuroAdaConfig(k=2), "a")
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
        with pytest.raises(NeuroAdaUsageError, match=r"model\(\.\.\., adapter_names=\.\.\.\) got an empty list: one "
                                                     r"adapter name per input"):
            model(features=x, adapter_names=[])
        assert torch.equal(model(features=x), want) and MIXED_ATTR not in model.__dict__
        assert torch.equal(model(features=x, adapter_names=None), want)
