"""Many adapters on one tiny Llama: merged switching (bit-exact, also under torch.compile without
recompiling), mixed-adapter batches and generation, weighted combinations, refusals that change nothing.

The adapters are real files written by save_adapter from models built in-process; the references are
the format core's merge rule and per-sequence runs with the adapter merged.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import neuroada_format as naf  # noqa: E402
from neuroada_format import NeuroAdaError, NeuroAdaUsageError  # noqa: E402
from neuroada_format.runtime import (  # noqa: E402
    NeuroAdaConfig,
    NeuroAdaLayer,
    ServingLayer,
    adapter_batch,
    add_weighted_adapter,
    attach,
    delete_adapter,
    list_adapters,
    load_adapter,
    merge_and_unload,
    merged_adapter,
    save_adapter,
    set_adapter,
    stop_serving,
)
from neuroada_format.runtime import multi  # noqa: E402
from neuroada_format.runtime.kernels import bgmv  # noqa: E402
from neuroada_format.runtime.guards import layers, to_numpy # noqa: E402

VOCAB = 100
# name -> (k, target_modules): different k, and one adapter that leaves the attention alone
SPECS = {"math": (1, "all-linear"), "cs": (3, "all-linear"), "code": (2, ["gate_proj", "up_proj", "down_proj"])}


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base model and three adapter files for it (random deltas, BF16 values on disk)."""
    folder = tmp_path_factory.mktemp("zoo")
    base = tiny_llama()
    files = {}
    for i, (name, (k, targets)) in enumerate(SPECS.items()):
        m = copy.deepcopy(base)
        attach(m, NeuroAdaConfig(k=k, target_modules=targets), name)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for layer in layers(m).values():
                layer.neuroada_val[name].normal_(0, 0.05, generator=g)
        files[name] = save_adapter(m, os.path.join(folder, f"{name}.safetensors"), name)
    other = tiny_llama(seed=1)  # same shapes, other weights
    attach(other, NeuroAdaConfig(k=1), "alien")
    files["alien"] = save_adapter(other, os.path.join(folder, "alien.safetensors"), "alien")
    arrays = {k: to_numpy(v).copy() for k, v in base.state_dict().items()}
    return base, files, arrays, folder


def served(zoo, names=("math", "cs", "code")):
    base, files, _, _ = zoo
    model = copy.deepcopy(base)
    for n in names:
        load_adapter(model, files[n], n)
    return model


def base_weights(model):
    """The wrapped model's weights under their original names."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".neuroada_" not in k}


def bits(t):
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def snapshot(model):
    """Everything observable about the model's adapter state, bit for bit."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(bits(v).numpy().tobytes())
    per_layer = {n: (type(layer).__name__, list(layer.merged_adapters), list(layer.active_adapters),
                     sorted(layer.neuroada_val.keys())) for n, layer in layers(model).items()}
    return h.hexdigest(), list_adapters(model), per_layer


def check_merged(model, zoo, name):
    """Every weight equals the format core's merge of `name`'s file into the base (or the base itself)."""
    _, files, arrays, _ = zoo
    adapter = naf.load(files[name]) if name is not None else None
    for key, w in base_weights(model).items():
        want = arrays[key]
        if adapter is not None and key in adapter.targets:
            want = naf.merge_weight(want, [adapter.targets[key]])
        assert np.array_equal(to_numpy(w).view(np.uint32), want.view(np.uint32)), (name, key)


def ids_batch(n, length=7, seed=3):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


# -- merged switching --------------------------------------------------------------------------------------
def test_set_adapter_writes_the_merge_rule_and_restores_the_base(zoo):
    model = served(zoo)
    assert list_adapters(model) == ["math", "cs", "code"]
    ptrs = {k: w.data_ptr() for k, w in base_weights(model).items()}
    q = model.get_submodule("model.layers.1.self_attn.q_proj").base_layer.weight
    for name in ["math", "cs", None, "code", "__base__", "cs", "math", "code", "math", None]:
        version = q._version
        set_adapter(model, name)
        check_merged(model, zoo, None if name == "__base__" else name)
        assert merged_adapter(model) == (None if name == "__base__" else name)
        assert q._version > version or name in ("code", "__base__")  # in-place writes are tracked
    assert {k: w.data_ptr() for k, w in base_weights(model).items()} == ptrs  # same tensors throughout
    assert all(type(layer) is ServingLayer for layer in layers(model).values())
    # the code adapter leaves attention unmerged, and the layers say so
    set_adapter(model, "code")
    attn = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert attn.merged_adapters == [] and model.get_submodule("model.layers.0.mlp.up_proj").merged_adapters == ["code"]


def test_set_adapter_keeps_switch_caches_for_the_last_adapters_only(zoo):
    """A server visiting many adapters keeps flat positions (8 bytes per entry, twice the file; merged values are
    computed at each switch) for the last SWITCH_KEPT it served, not for each; one served again after that gets the
    same bits, and a mixed batch over adapters of one set of positions stacks those positions once per layer."""
    base, files, _, _ = zoo
    model = copy.deepcopy(base)
    names = [f"t{i}" for i in range(5)]
    for n in names:
        load_adapter(model, files["cs"], n)  # one file under five names: the same positions, like magnitude top-k
    for n in names + ["t0", None, "t0"]:
        set_adapter(model, n)
        check_merged(model, zoo, None if n is None else "cs")
    for layer in layers(model).values():
        assert list(layer.__dict__[multi._MERGED_ATTR]) == ["t4", "t0"][-multi.SWITCH_KEPT:]
        assert all(layer._patterns[n]._flat is None for n in names)  # no per-adapter positions kept elsewhere
    with torch.no_grad(), adapter_batch(model, ["t1", None, "t3"]):
        got = model(ids_batch(3)).logits
    for layer in layers(model).values():
        stack = list(layer.__dict__[multi._STACK_ATTR].values())[-1][1]
        assert stack.n == 5 and stack.idx.stride(0) == 0
    set_adapter(model, "t1")
    with torch.no_grad():
        torch.testing.assert_close(got[0], model(ids_batch(3)).logits[0], rtol=1e-5, atol=1e-5)


def test_switch_and_merge_caches_stay_bounded_whatever_the_history(zoo):
    """A server switching among many adapters kept one "same positions?" answer per ordered pair of adapters and layer
    (n^2: 1.5 GiB for 100 adapters on a 7B model), and one Overlay per combination merged by hand: both keep the most
    recent few now, and what is served stays the merge rule's bits."""
    from neuroada_format.runtime import merge, unmerge
    from neuroada_format.runtime.layer import OVERLAYS_KEPT

    base, files, _, _ = zoo
    model = copy.deepcopy(base)
    names = [f"t{i}" for i in range(7)]
    for i, n in enumerate(names):
        load_adapter(model, files["cs" if i % 2 else "math"], n)
    order = [names[(i * 3) % 7] for i in range(40)] + [names[(i * 5 + 1) % 7] for i in range(40)]
    for n in order:
        set_adapter(model, n)
    check_merged(model, zoo, "cs" if names.index(order[-1]) % 2 else "math")
    for layer in layers(model).values():
        assert len(layer.__dict__.get(multi._SAME_ATTR, {})) <= multi.SAME_KEPT
    set_adapter(model, None)
    for a in names[:4]:
        for b in names[:4]:
            if a != b:
                merge(model, [a, b])
                unmerge(model)
    check_merged(model, zoo, None)
    assert all(len(layer._overlays) <= OVERLAYS_KEPT for layer in layers(model).values())


def test_set_adapter_outputs_equal_a_merged_model(zoo):
    base, files, _, _ = zoo
    model = served(zoo)
    ids = ids_batch(3)
    with torch.no_grad():
        for name in ("cs", "math"):
            ref = merge_and_unload(load_adapter(copy.deepcopy(base), files[name], name))
            set_adapter(model, name)
            assert torch.equal(model(ids).logits, ref(ids).logits)
        set_adapter(model, None)
        assert torch.equal(model(ids).logits, base(ids).logits)
        stop_serving(model)  # back to NeuroAdaLayer.forward: nothing merged, nothing active
        assert all(type(layer) is NeuroAdaLayer for layer in layers(model).values())
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_compiled_model_switches_without_recompiling(zoo):
    model = served(zoo)
    ids = ids_batch(2)
    refs = {}
    with torch.no_grad():
        for name in ("math", "cs", "code", None):
            set_adapter(model, name)
            refs[name] = model(ids).logits
        torch._dynamo.reset()
        set_adapter(model, "math")
        compiled = torch.compile(model, backend="eager")
        assert torch.equal(compiled(ids).logits, refs["math"])
        with torch._dynamo.config.patch(error_on_recompile=True):  # any recompilation raises
            for name in ("cs", None, "code", "math", "__base__", "cs"):
                set_adapter(model, name)
                assert torch.equal(compiled(ids).logits, refs[None if name == "__base__" else name]), name
    torch._dynamo.reset()


def test_a_compiled_model_serves_mixed_batches():
    """torch.compile traces adapter_batch's static forms (kernels.bgmv.bgmv_linear_static / bgmv_add_static: the
    eager fused CPU path for K = 1 stacks writes through out=, which symbolic shapes cannot trace): the compiled model
    gives the eager rows, block after block."""
    model = with_adapters_a_b(tiny_llama(), k=1, std=0.05)
    ids = ids_batch(2, length=6)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        for names in (["a", "b"], ["b", None], ["a", "b"], ["b", "a"]):
            with adapter_batch(model, names):
                want = model(ids).logits
                got = compiled(ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


_BUILT: list = []  # module globals: dynamo replays a traced append to a global list, not to a closure's list
_CHECKED: list = []


def _patterns_while_compiling(m):
    """Record, for every Pattern built and every Pattern.check call, whether it ran inside a torch.compile trace
    (the recording is Python state the trace reads: a compiled graph made while it runs guards on it)."""
    from neuroada_format.runtime.kernels.pattern import Pattern

    _BUILT.clear()
    _CHECKED.clear()
    real_init, real_check = Pattern.__init__, Pattern.check

    def init(self, *args, **kwargs):
        _BUILT.append(torch.compiler.is_compiling())
        real_init(self, *args, **kwargs)

    def check(self):
        _CHECKED.append(torch.compiler.is_compiling())
        return real_check(self)

    m.setattr(Pattern, "__init__", init)
    m.setattr(Pattern, "check", check)
    return _BUILT, _CHECKED


@pytest.mark.parametrize("mode", ["inplace", "additive"])
def test_a_compiled_forward_builds_patterns_in_one_graph(zoo, monkeypatch, mode):
    """A model served without set_adapter (NeuroAdaLayer.forward), copied (a copy, like a load_state_dict, starts
    without its index patterns): the compiled forward derives the patterns inside the graph with no graph break, at
    Pattern.check (whose answer is data) or at the cache checks around it (versions and inference-tensor tests,
    which a trace cannot read), so fullgraph=True compiles; logits equal eager's, under no_grad and inference_mode,
    and the next calls reuse the graph (the trace neither reads nor fills the caches, so it guards on none). The
    indices were checked where they entered (load_adapter); an eager rebuild still checks them."""
    base, files, _, _ = zoo
    loaded = load_adapter(copy.deepcopy(base), files["cs"], "cs", mode=mode)
    ids = ids_batch(2)
    with torch.no_grad():
        want = copy.deepcopy(loaded)(ids).logits
    with monkeypatch.context() as m:
        built, checked = _patterns_while_compiling(m)
        model = copy.deepcopy(loaded)
        torch._dynamo.reset()
        with torch.no_grad():
            assert torch.equal(torch.compile(model, backend="eager", fullgraph=True)(ids).logits, want)
        assert True in built and True not in checked  # built inside the trace, never checked there
    for ctx in (torch.no_grad, torch.inference_mode):
        model = copy.deepcopy(loaded)
        assert all(not layer._patterns and layer.active_adapters == ["cs"] for layer in layers(model).values())
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with ctx():
            assert torch.equal(compiled(ids).logits, want)
        assert all(not layer._patterns and not layer._overlays for layer in layers(model).values())  # none kept
        with torch._dynamo.config.patch(error_on_recompile=True), ctx():
            for _ in range(2):
                assert torch.equal(compiled(ids).logits, want)
    torch._dynamo.reset()
    with monkeypatch.context() as m:
        built, checked = _patterns_while_compiling(m)
        q = model.get_submodule("model.layers.0.self_attn.q_proj")
        q.neuroada_idx["cs"] = q.neuroada_idx["cs"].flip(1)  # descending rows: refused by the eager rebuild
        with torch.no_grad(), pytest.raises(NeuroAdaError, match="strictly increasing"):
            model(ids)
        assert checked and set(checked) == {False}


@pytest.mark.parametrize("backward_inside", [False, True])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_training_step_under_autocast(zoo, backend, backward_inside):
    """Trainer(bf16=True, torch_compile=True) runs the forward under CPU autocast and the backward after it (the AMP
    recipe). The compiled graph runs our write-multiply-restore operators inside the autocast region, where their
    GEMMs were cast to bf16 against fakes that said f32: the backward failed ('BFloat16 != float'). They compute in
    the dtypes they are given now; loss and gradients as eager's to bf16 rounding, the base weights untouched."""
    base, files, _, _ = zoo
    loaded = load_adapter(copy.deepcopy(base), files["cs"], "cs", is_trainable=True, mode="inplace").train()
    ids = ids_batch(2)
    before = {k: v.clone() for k, v in base_weights(loaded).items()}

    def step(model, run):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(ids, labels=ids).loss
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return loss.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want_grads = step(ref := copy.deepcopy(loaded), ref)
    model = copy.deepcopy(loaded)
    torch._dynamo.reset()
    loss, grads = step(model, torch.compile(model, backend=backend))
    torch._dynamo.reset()
    torch.testing.assert_close(loss, want_loss, rtol=2e-2, atol=2e-2)
    assert grads.keys() == want_grads.keys() and len(grads) == len(layers(model))
    for n in grads:
        scale = want_grads[n].abs().max()
        assert scale > 0 and (grads[n] - want_grads[n]).abs().max() <= 0.05 * scale, n
    assert all(torch.equal(before[k], v) for k, v in base_weights(model).items())


@pytest.mark.parametrize("mode", ["inplace", "additive"])
@pytest.mark.parametrize("name", ["math", "cs"])  # k = 1 and k = 3
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_training_step_is_one_graph(zoo, monkeypatch, name, mode, backend):
    """Training through a compiled model whose patterns are rebuilt during the step: the adapter trains as one
    graph, forward and backward (fullgraph), at every k and in both modes; the loss and the deltas' gradients are
    eager's (in the additive mode up to the order in which x's gradients are summed), the base weights are back, and Pattern.check never runs inside the trace (it used to, and broke the
    graph there). The k > 1 backward (a sparse CSR product) and the additive mode's transposed product (grouped by
    column: a data-dependent shape) reach the graph as the operators neuroada::sampled_rowdot and
    neuroada::gather_matvec_t; before they were, every adapted layer's call left the graph. aot_eager traces the
    backward too, through the operators' fake implementations."""
    base, files, _, _ = zoo
    loaded = load_adapter(copy.deepcopy(base), files[name], name, is_trainable=True, mode=mode).train()
    assert {layer.mode for layer in layers(loaded).values()} == {mode}
    ids = ids_batch(2)

    def step(model, run):
        loss = run(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want_grads = step(ref := copy.deepcopy(loaded), ref)
    built, checked = _patterns_while_compiling(monkeypatch)
    model = copy.deepcopy(loaded)
    assert all(not layer._patterns for layer in layers(model).values())
    torch._dynamo.reset()
    loss, grads = step(model, torch.compile(model, backend=backend, fullgraph=True))
    torch._dynamo.reset()
    assert torch.equal(loss, want_loss) and grads.keys() == want_grads.keys() and len(grads) == len(layers(model))
    if mode == "inplace":
        assert all(torch.equal(grads[n], want_grads[n]) for n in grads)
    else:
        # y = base(x) + S(x) gives x one more consumer, and the compiled graph's autograd sums the gradients that x
        # receives in another order than eager's: last bits move, from the second layer down (measured ~1 ulp)
        for n in grads:
            torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-5, atol=1e-6 * float(want_grads[n].abs().max()))
    assert any(g.abs().max() > 0 for g in grads.values())
    assert True in built and True not in checked
    assert all(torch.equal(a, b) for a, b in zip(base_weights(model).values(), base_weights(ref).values()))


@pytest.mark.parametrize("name", ["math", "cs"])
def test_a_compiled_training_step_writes_no_whole_weight(zoo, name):
    """The graphs AOTAutograd hands a compiler for an in-place training step: the writes into the frozen weights are
    the neuroada::overlay_linear operators (forward) and overlay_linear_grad_input (backward), and no aten op writes
    into or copies a weight. Traced op by op, each write into a weight (a graph input) became a copy of the whole
    weight with the entries set and another to restore it, in forward and in backward."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    base, files, _, _ = zoo
    model = load_adapter(copy.deepcopy(base), files[name], name, is_trainable=True).train()
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    ids = ids_batch(2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    compiled(ids, labels=ids).loss.backward()
    torch._dynamo.reset()
    targets = {tuple(layer.base_layer.weight.shape) for layer in layers(model).values()}
    ops = [n for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    names = [str(n.target) for n in ops]
    assert len(graphs) == 2 and names.count("neuroada.overlay_linear.default") == len(layers(model))
    # the first layer's q, k, v read the (frozen) embeddings: no input gradient, so no backward write there
    assert names.count("neuroada.overlay_linear_grad_input.default") == len(layers(model)) - 3
    writes = [n for n in ops if any(w in str(n.target) for w in ("index_put", "copy", "scatter", "clone"))]
    shapes = [tuple(n.meta["val"].shape) for n in writes if isinstance(n.meta.get("val"), torch.Tensor)]
    flat = {math.prod(t) for t in targets}
    assert not [s for s in shapes if s in targets or (len(s) == 1 and s[0] in flat)], writes


def test_compiled_gradient_accumulation_keeps_the_saved_weights_valid(zoo):
    """Two compiled forwards, then one backward through both (what gradient accumulation without a backward per
    micro-batch, or a loss over two passes, does): the compiled graphs save the frozen weights for their backward,
    and the second forward's writes around its GEMMs must not count as changing them (they used to: autograd raised
    "modified by an inplace operation"). Loss and gradients are eager's bit for bit."""
    base, files, _, _ = zoo
    loaded = load_adapter(copy.deepcopy(base), files["cs"], "cs", is_trainable=True).train()
    a, b = ids_batch(2), ids_batch(2, seed=5)

    def two(run):
        loss = run(a, labels=a).loss + run(b, labels=b).loss
        loss.backward()
        return loss.detach()

    ref = copy.deepcopy(loaded)
    want = two(ref)
    model = copy.deepcopy(loaded)
    torch._dynamo.reset()
    got = two(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    assert torch.equal(got, want)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == len(layers(model))
    assert all(torch.equal(g, dict(ref.named_parameters())[n].grad) for n, g in grads.items())


# blocks of one batch size, every kind of assignment: all on adapters, some on the base, one adapter for all
COMPILE_BLOCKS = (["a", "b", None], ["b", None, "a"], ["a", "a", "a"], [None, "b", "b"], ["b", "a", "a"],
                  [None, None, "a"])


@pytest.mark.parametrize("ks, fused", [((1, 1), True), ((1, 1), False), ((1, 3), True)],
                         ids=["k1-fused", "k1-addcmul", "k1-and-k3"])
def test_compiled_adapter_batch_reuses_one_graph_across_blocks(monkeypatch, ks, fused):
    """Each block gives its layers new per-sequence state; a compiled forward reads it as tensors (the masks built at
    block entry), so after the first block later blocks of the same shapes run the same graph: any recompilation
    raises. The whole model is one graph (fullgraph: no break), and the logits are the eager block's bit for bit,
    whichever eager path the layer takes (the fused K = 1 GEMM, the fused multiply-add when every sequence uses an
    adapter, the padded K = 3 stack). A stack holds the adapters of k up to the largest a block uses, so with k=1
    and k=3 adapters the blocks using only the k=1 one have a graph of their own (warmed up too)."""
    monkeypatch.setattr(multi, "FUSED", fused)
    model = tiny_llama()
    for i, (name, k) in enumerate(zip(("a", "b"), ks)):
        attach(model, NeuroAdaConfig(k=k), name)
        with torch.no_grad():
            for layer in layers(model).values():
                layer.neuroada_val[name].normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    ids = ids_batch(3, length=6)
    with torch.no_grad():
        want = []
        for names in COMPILE_BLOCKS:
            with adapter_batch(model, names):
                want.append(model(ids).logits)
        assert not torch.equal(want[0], want[1])  # the assignments do change the logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with adapter_batch(model, COMPILE_BLOCKS[0]):  # warm-up: the one compilation
            assert torch.equal(compiled(ids).logits, want[0])
        if ks[0] != ks[1]:  # blocks using only the k=1 adapter get its K = 1 stack (fused): their own graph
            with adapter_batch(model, COMPILE_BLOCKS[2]):
                assert torch.equal(compiled(ids).logits, want[2])
        with torch._dynamo.config.patch(error_on_recompile=True):
            for names, w in zip(COMPILE_BLOCKS[1:], want[1:]):
                with adapter_batch(model, names):
                    assert torch.equal(compiled(ids).logits, w), names
    torch._dynamo.reset()


def test_compiled_forward_generates_in_adapter_batch_without_recompiling():
    """transformers' way to compile generation (model.forward = torch.compile(model.forward)): the first block compiles
    the prefill and the decoding step, later blocks with other assignments reuse them, and the greedy tokens are the
    eager block's."""
    model = with_adapters_a_b(tiny_llama(), k=2, std=0.05)
    ids = ids_batch(3, length=5, seed=8)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    blocks = COMPILE_BLOCKS[:4]
    with torch.no_grad():
        want = []
        for names in blocks:
            with adapter_batch(model, names):
                want.append(model.generate(ids, **kw))
        assert len({tuple(w[:, 5:].reshape(-1).tolist()) for w in want}) > 1
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="eager", fullgraph=True)
        try:
            with adapter_batch(model, blocks[0]):
                assert torch.equal(model.generate(ids, **kw), want[0])
            with torch._dynamo.config.patch(error_on_recompile=True):
                for names, w in zip(blocks[1:], want[1:]):
                    with adapter_batch(model, names):
                        assert torch.equal(model.generate(ids, **kw), w), names
        finally:
            del model.forward
    torch._dynamo.reset()


# -- mixed batches -----------------------------------------------------------------------------------------
NAMES = ["math", "__base__", "cs", "code", "math", None]


def alone(model, ids, names):
    """Each sequence run by itself with its adapter merged."""
    out = []
    for b, name in enumerate(names):
        set_adapter(model, name)
        out.append(model(ids[b:b + 1]).logits)
    return torch.cat(out)


@pytest.mark.parametrize("path", ["gather", "grouped", "seqs"])
def test_adapter_batch_forward_equals_each_sequence_alone(zoo, monkeypatch, path):
    monkeypatch.setattr(bgmv, "PATH", path)
    calls, made = [], []
    real_call = bgmv.InputsT.__call__

    def spy(self, x3, acc):
        out = real_call(self, x3, acc)
        calls.append(self)
        if not any(out is m for m in made):
            made.append(out)
        return out

    monkeypatch.setattr(bgmv.InputsT, "__call__", spy)
    model = served(zoo)
    ids = ids_batch(len(NAMES))
    with torch.no_grad():
        want = alone(model, ids, NAMES)
        set_adapter(model, "cs")
        before = snapshot(model)
        with adapter_batch(model, NAMES):
            assert merged_adapter(model) is None  # the base weights, plus per-sequence deltas
            got = model(ids).logits
            if path == "seqs":  # q, k and v read one input: its transposes were made once, and let go of after the call
                assert len(made) < len(calls) and calls[0]._last is None
        assert snapshot(model) == before  # "cs" merged again, bit for bit; classes and lists as they were
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the deltas do change the outputs


def test_k1_adapters_run_as_one_gemm_onto_the_delta(monkeypatch):
    """k=1 stacks in f32 on CPU: each layer gathers the delta into its output and the GEMM adds onto it
    (kernels.bgmv.bgmv_linear_cpu); forward and greedy tokens equal each sequence served merged, alone. With
    a graph to record (x requires grad) the layer falls back to base + delta, and the gradient holds the deltas."""
    model = tiny_llama()
    for i, name in enumerate(("a", "b", "c")):
        attach(model, NeuroAdaConfig(k=1, inference_mode=True), name)
        with torch.no_grad():
            for layer in layers(model).values():
                layer.neuroada_val[name].normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    calls = []
    real = multi.bgmv_linear_cpu
    monkeypatch.setattr(multi, "bgmv_linear_cpu", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    names = ["b", None, "a", "c", "b"]
    ids = ids_batch(len(names))
    with torch.no_grad():
        want = alone(model, ids, names)
        set_adapter(model, None)
        with adapter_batch(model, names):
            got = model(ids).logits
        assert calls and len(calls) % len(layers(model)) == 0  # every layer, once per forward
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[0], got[1], atol=1e-3)

        kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        want_tokens = []
        for b, name in enumerate(names):
            set_adapter(model, name)
            want_tokens.append(model.generate(ids[b:b + 1], **kw))
        set_adapter(model, None)
        with adapter_batch(model, names):
            assert torch.equal(model.generate(ids, **kw), torch.cat(want_tokens))

    # a graph through the inputs: base + delta on the torch path (the fused GEMM has no autograd)
    calls.clear()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with adapter_batch(model, names):
        out = model(inputs_embeds=emb).logits
    assert not calls
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)
    (g_mixed,) = torch.autograd.grad(out[0].sum(), emb)
    set_adapter(model, names[0])
    (g_alone,) = torch.autograd.grad(model(inputs_embeds=emb[:1]).logits.sum(), emb)
    torch.testing.assert_close(g_mixed[0], g_alone[0], rtol=1e-4, atol=1e-5)


def test_adapter_batch_generate_greedy_tokens_equal(zoo):
    model = served(zoo)
    ids = ids_batch(len(NAMES), length=5, seed=8)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = []
        for b, name in enumerate(NAMES):
            set_adapter(model, name)
            want.append(model.generate(ids[b:b + 1], **kw))
        set_adapter(model, None)
        with adapter_batch(model, NAMES):  # prefill [B, 5], then KV-cached steps of [B, 1]
            got = model.generate(ids, **kw)
    assert torch.equal(got, torch.cat(want))
    assert len({tuple(r.tolist()) for r in got[:, 5:]}) > 1


def with_adapters_a_b(model, k, std):
    """Adapters "a" and "b" attached to every linear of `model`, random deltas (seeded per adapter)."""
    for i, name in enumerate(("a", "b")):
        attach(model, NeuroAdaConfig(k=k), name)
        with torch.no_grad():
            for layer in layers(model).values():
                layer.neuroada_val[name].normal_(0, std, generator=torch.Generator().manual_seed(i))
    return model


@pytest.mark.parametrize("k, path, fused", [(2, None, True), (1, "rows", False), (1, None, True)])
def test_adapter_batch_on_unserved_layers_and_gpt2_conv1d(zoo, monkeypatch, k, path, fused):
    # a GPT-2 (Conv1D, stored [in, out], with biases) whose layers never went through set_adapter
    monkeypatch.setattr(bgmv, "PATH", path)
    monkeypatch.setattr(multi, "FUSED", fused)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32)
    model = with_adapters_a_b(transformers.GPT2LMHeadModel(cfg).eval(), k, std=0.1)
    ids = ids_batch(3)
    names = ["b", "a", None]
    with torch.no_grad():
        with adapter_batch(model, names):
            got = model(ids).logits
        assert all(type(layer) is NeuroAdaLayer for layer in layers(model).values())
        want = alone(model, ids, names)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_adapter_batch_serves_layers_given_flattened_tokens(k):
    """OPT's MLP gets its input as [sequences x tokens, d]: rows are every sequence's tokens in order, which the
    block reads off the model call's input_ids; any other row count is refused, not served to the wrong rows."""
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=VOCAB, word_embed_proj_dim=32, max_position_embeddings=64)
    model = with_adapters_a_b(transformers.OPTForCausalLM(cfg).eval(), k, std=0.2)
    ids = ids_batch(3, length=5)
    names = ["b", None, "a"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        with adapter_batch(model, names):
            got = model(ids).logits
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            beams = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=2, num_return_sequences=2, **kw)
            fc1 = model.model.decoder.layers[0].fc1
            with pytest.raises(NeuroAdaError, match="first dimension must be the sequences"):
                fc1(torch.zeros(3 * 5 + 3, 32))  # not 3 sequences x 5 tokens
            model(ids)
            with pytest.raises(NeuroAdaError, match="first dimension must be the sequences"):
                fc1(torch.zeros(3 * 5, 32))  # the right count, but no model call in progress says what the rows are
        want = alone(model, ids, names)
        want_gen, want_beams = [], []
        for b, name in enumerate(names):
            set_adapter(model, name)
            want_gen.append(model.generate(ids[b:b + 1], attention_mask=torch.ones_like(ids[b:b + 1]), **kw))
            want_beams.append(model.generate(ids[b:b + 1], attention_mask=torch.ones_like(ids[b:b + 1]), num_beams=2,
                                             num_return_sequences=2, **kw))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, torch.cat(want_gen))
    assert torch.equal(beams, torch.cat(want_beams))  # generate's expanded rows, each input's beams in a row
    with torch.no_grad():
        set_adapter(model, None)
        assert not torch.allclose(got[0], model(ids[:1]).logits[0], atol=1e-3)  # the adapters do change the output


def test_adapter_batch_refusals_leave_the_model_alone(zoo):
    model = served(zoo)
    set_adapter(model, "math")
    before = snapshot(model)
    with pytest.raises(NeuroAdaError, match="no adapter named 'nope'"):
        with adapter_batch(model, ["math", "nope"]):
            pass
    with pytest.raises(NeuroAdaError, match="one adapter name per sequence"):
        with adapter_batch(model, []):
            pass
    assert snapshot(model) == before
    with torch.no_grad(), pytest.raises(NeuroAdaError, match="2 adapter names"):
        with adapter_batch(model, ["math", "cs"]):
            model(ids_batch(3))  # e.g. beam search multiplied the batch
    assert snapshot(model) == before
    from neuroada_format.runtime import merge, unmerge

    _, files, _, _ = zoo
    with adapter_batch(model, ["cs"]):
        for call in (lambda: set_adapter(model, "cs"), lambda: delete_adapter(model, "cs"),
                     lambda: adapter_batch(model, ["cs"]).__enter__(),
                     lambda: add_weighted_adapter(model, ["cs"], [1.0], "x"),
                     # these change weights, classes or active adapters under the block too
                     lambda: merge(model, ["code"]), lambda: unmerge(model), lambda: merge_and_unload(model),
                     lambda: attach(model, NeuroAdaConfig(k=1), "new"),
                     lambda: load_adapter(model, files["alien"], "alien")):
            with pytest.raises(NeuroAdaUsageError, match="adapter_batch"):
                call()
    assert snapshot(model) == before


def test_merge_refuses_an_unknown_name_before_writing(zoo):
    from neuroada_format.runtime import merge

    model = served(zoo)
    set_adapter(model, "math")
    before = snapshot(model)
    for names in (["nope"], ["cs", "nope"]):
        with pytest.raises(NeuroAdaError, match="no adapter named 'nope'"):
            merge(model, names)
        assert snapshot(model) == before


# -- loading, deleting, combining --------------------------------------------------------------------------
def test_bad_third_adapter_is_refused_and_changes_nothing(zoo, tmp_path):
    _, files, _, _ = zoo
    model = served(zoo, names=("math", "cs"))
    set_adapter(model, "math")
    before = snapshot(model)
    raw = open(files["code"], "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[:-7])
    for path, rule in ((files["alien"], "4.3"), (str(truncated), "1.4")):
        with pytest.raises(NeuroAdaError) as err:
            load_adapter(model, path, "third")
        assert err.value.rule == rule
        assert snapshot(model) == before
    with pytest.raises(NeuroAdaError, match="already loaded"):
        load_adapter(model, files["code"], "cs")
    assert snapshot(model) == before
    load_adapter(model, files["code"], "code")  # a good one still loads, and "math" stays merged
    check_merged(model, zoo, "math")
    set_adapter(model, "code")
    check_merged(model, zoo, "code")


def test_delete_adapter(zoo):
    model = served(zoo)
    set_adapter(model, "cs")
    with pytest.warns(UserWarning, match="'cs' was active and is deleted: the base model is served now"):
        delete_adapter(model, "cs")
    check_merged(model, zoo, None)
    assert list_adapters(model) == ["math", "code"]
    assert all("cs" not in layer.neuroada_val for layer in layers(model).values())
    with pytest.raises(NeuroAdaError, match="no adapter named 'cs'"):
        set_adapter(model, "cs")
    with pytest.raises(NeuroAdaError):
        delete_adapter(model, "cs")
    set_adapter(model, "math")
    delete_adapter(model, "code")  # not the merged one: "math" stays
    check_merged(model, zoo, "math")


def test_deleting_the_active_adapter_says_the_base_is_served(zoo):
    """PEFT's delete_adapter makes the first remaining adapter active (with a warning); here the base is served after
    the active adapter goes, so a PEFT habit (delete the old adapter, keep generating) served the base without a word.
    Deleting an adapter that is not active, the last one, or any after set_adapter(model, None) says nothing."""
    model = served(zoo, ("math", "cs", "code"))  # the first one loaded, "math", is active (unmerged)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        delete_adapter(model, "cs")  # not the active one
    with pytest.warns(UserWarning, match=r"'math' was active .* \(PEFT would make 'code' active\); "
                                         r"set_adapter\(model, 'code'\)") as record:
        delete_adapter(model, "math")
    assert record[0].filename == __file__  # points at the caller's line
    check_merged(model, zoo, None)
    x = ids_batch(2)
    with torch.no_grad():
        assert torch.equal(model(x).logits, zoo[0](x).logits)  # what the warning says: the base is served
    set_adapter(model, "code")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        delete_adapter(model, "code")  # the last one: no other to name
    model = served(zoo, ("math", "cs"))
    set_adapter(model, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        delete_adapter(model, "math")


def test_delete_one_of_two_merged_adapters_keeps_the_other_merged(zoo):
    """merge(model, [a, b]) then delete_adapter(a): the weights must hold b alone, by the merge rule's bits (a
    mutation that dropped re-merging the rest left the plain base, and no test noticed)."""
    from neuroada_format.runtime import merge

    model = served(zoo, ("math", "cs"))
    merge(model, ["math", "cs"])
    delete_adapter(model, "math")
    check_merged(model, zoo, "cs")
    assert all(layer.merged_adapters == ["cs"] for layer in layers(model).values())


def test_add_weighted_adapter_is_packs_combine(zoo, tmp_path):
    from neuroada_format.converters.pack import combine

    _, files, arrays, _ = zoo
    model = served(zoo)
    set_adapter(model, "code")
    add_weighted_adapter(model, ["math", "cs"], [0.7, 0.3], "combo")
    assert list_adapters(model) == ["math", "cs", "code", "combo"]
    check_merged(model, zoo, "code")  # still served as before
    path = save_adapter(model, tmp_path / "combo.safetensors", "combo")
    report = naf.validate(path, base=arrays)
    assert report.ok and not report.problems, report.problems
    mine = naf.load(path)
    packed = combine([(naf.load(files["math"]), 0.7), (naf.load(files["cs"]), 0.3)], arrays)
    assert sorted(mine.targets) == sorted(packed.targets)
    for key, t in packed.targets.items():
        assert 3 <= t.k <= 4  # the union of k=1 and k=3 positions, padded per target
        assert np.array_equal(mine.targets[key].indices, t.indices)
        assert np.array_equal(mine.targets[key].values.view(np.uint16), t.values.view(np.uint16))
        assert mine.targets[key].probe == t.probe
    assert mine.selection["rule"] == "union"
    set_adapter(model, "combo")
    for key, w in base_weights(model).items():
        want = naf.merge_weight(arrays[key], [packed.targets[key]]) if key in packed.targets else arrays[key]
        assert np.array_equal(to_numpy(w).view(np.uint32), want.view(np.uint32)), key


def test_add_weighted_adapter_refusals(zoo):
    model = served(zoo)
    set_adapter(model, "math")
    before = snapshot(model)
    for adapters, weights, name, match in (
        (["math", "nope"], [1, 1], "x", "no adapter named 'nope'"),
        (["math"], [1, 2], "x", "one weight per adapter"),
        (["math", "cs"], [1, float("nan")], "x", "not finite"),
        (["math"], [1], "cs", "exists"),
        (["math"], [1], "__base__", "reserved for the plain base"),
        (["math"], [1], "copy", "taken by torch"),  # ParameterDict.copy (was a KeyError from torch)
        (["math", "cs"], [1e39, 1.0], "x", "overflows"),  # finite in f64, not in f32
    ):
        with pytest.raises(NeuroAdaError, match=match):
            add_weighted_adapter(model, adapters, weights, name)
        assert snapshot(model) == before
    # PEFT's keywords: its other combinations and their options were a bare TypeError (unexpected keyword)
    for kwargs, match in (({"combination_type": "svd"}, "combination_type='svd' is a PEFT combination NeuroAda does "
                                                         "not implement.*'cat' or 'linear'"),
                          ({"combination_type": "dare_ties", "density": 0.5}, "'dare_ties'"),
                          ({"combination_type": "cat", "svd_rank": 4}, "svd_rank .* are not supported")):
        with pytest.raises(NeuroAdaUsageError, match=match):
            add_weighted_adapter(model, ["math", "cs"], [0.5, 0.5], "x", **kwargs)
        assert snapshot(model) == before
    for how in ("cat", "linear"):  # the exact weighted sum, PEFT's "cat"
        add_weighted_adapter(model, ["math", "cs"], [0.7, 0.3], how, combination_type=how)
    for layer in layers(model).values():
        assert torch.equal(layer.neuroada_idx["cat"], layer.neuroada_idx["linear"])
        assert torch.equal(layer.neuroada_val["cat"], layer.neuroada_val["linear"])


@pytest.mark.parametrize("order", [("math", "cs", "code"), ("code", "math", "cs")])
def test_loading_more_adapters_does_not_change_what_is_served(zoo, order):
    """As PEFT's load_adapter: the first adapter loaded becomes active, later ones wait for set_adapter, also
    where the first leaves layers free ("code" leaves the attention alone) that a later one targets: switching
    it on there would serve a mix nobody trained."""
    base, files, _, _ = zoo
    model = copy.deepcopy(base)
    ids = ids_batch(2)
    with torch.no_grad():
        load_adapter(model, files[order[0]], order[0])
        first = model(ids).logits
        for name in order[1:]:
            load_adapter(model, files[name], name)
        again = model(ids).logits
    assert torch.equal(first, again)  # not the sum of three adapters
    assert {n: layer.active_adapters for n, layer in layers(model).items()} == {
        n: ([order[0]] if order[0] in layer.neuroada_val else []) for n, layer in layers(model).items()}
    set_adapter(model, "cs")
    check_merged(model, zoo, "cs")


class _Reads(dict):
    """A container's ``_parameters`` / ``_buffers`` that logs each read: an entry by name, or ``"<walk>"`` for any
    iteration (``named_parameters``, ``state_dict`` and ``ParameterDict.values`` all read through these)."""

    def __init__(self, entries, log):
        super().__init__(entries)
        self.log = log

    def __getitem__(self, key):
        self.log.append(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.log.append(key)
        return super().get(key, default)

    def __iter__(self):
        self.log.append("<walk>")
        return super().__iter__()

    def items(self):
        self.log.append("<walk>")
        return super().items()

    def values(self):
        self.log.append("<walk>")
        return super().values()

    def keys(self):
        self.log.append("<walk>")
        return super().keys()


@pytest.mark.parametrize("serve", [False, True])
def test_loading_an_adapter_reads_none_of_the_adapters_loaded_before(zoo, serve):
    """A load's work must not grow with the adapters already loaded: its checks walked every parameter of the
    model (sharding, freezing, tied weights), each loaded adapter's deltas included, so a load onto a small Llama
    took ~8 ms with one adapter loaded and ~65 ms with 512. It may read only the adapter it loads and, on a model
    set_adapter serves, the merged one (unmerged while the new one reads the base, then merged again). The
    load still freezes the whole base and leaves every delta's requires_grad as it was."""
    base, files, _, _ = zoo
    model = copy.deepcopy(base)
    load_adapter(model, files["math"], "math", is_trainable=True)
    load_adapter(model, files["cs"], "cs")
    if serve:
        set_adapter(model, "cs")
    model.lm_head.weight.requires_grad_(True)  # unfrozen by hand: a load freezes the base again
    log = []
    for layer in layers(model).values():
        layer.neuroada_val._parameters = _Reads(layer.neuroada_val._parameters, log)
        for buffers in (layer.neuroada_idx, layer.neuroada_w0):
            buffers._buffers = _Reads(buffers._buffers, log)
    load_adapter(model, files["code"], "more", is_trainable=True)
    assert set(log) <= ({"more", "cs"} if serve else {"more"}), sorted(set(log))
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    # (set_adapter to "cs" froze "math", as PEFT's set_adapter freezes the inactive adapters)
    assert {n for n, g in grads.items() if g} == {n for n in grads if (".neuroada_val.math" in n and not serve)
                                                  or ".neuroada_val.more" in n}
    if serve:
        check_merged(model, zoo, "cs")


def test_a_combined_adapter_folder_round_trips(zoo, tmp_path):
    """A 'union' adapter saved as a PEFT folder reloads, and saving it again keeps its record and bits."""
    base, _, arrays, _ = zoo
    model = served(zoo)
    add_weighted_adapter(model, ["math", "cs"], [0.5, 0.5], "combo")
    first = save_adapter(model, tmp_path / "combo", "combo")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "combo", "combo")
    again = save_adapter(fresh, tmp_path / "again.safetensors", "combo")
    a, b = naf.load(first), naf.load(again)
    assert b.selection["rule"] == "union" and a.selection == b.selection
    for key, t in a.targets.items():
        assert b.targets[key].value_dtype == t.value_dtype
        assert np.array_equal(b.targets[key].indices, t.indices)
        assert np.array_equal(b.targets[key].values.view(np.uint8), t.values.view(np.uint8))
    with pytest.raises(NeuroAdaError, match="only describes an adapter built from others"):
        attach(copy.deepcopy(base), NeuroAdaConfig(k=1, selection="union"))


def test_a_file_keeps_its_value_dtype_and_seed_through_load_and_save(zoo, tmp_path):
    base, _, _, _ = zoo
    m = copy.deepcopy(base)
    attach(m, NeuroAdaConfig(k=2, selection="random", seed=7, save_dtype="F16"), "r")
    path = save_adapter(m, tmp_path / "r.safetensors", "r")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, path, "r")
    again = naf.load(save_adapter(fresh, tmp_path / "again.safetensors", "r"))
    assert again.selection["rule"] == "random" and again.selection["seed"] == 7
    assert {t.value_dtype for t in again.targets.values()} == {"F16"}


# -- which adapter is active: one answer for the whole model (as PEFT) ------------------------------------
def test_loading_onto_a_served_model_waits_and_serves_the_base_in_new_layers(zoo):
    base, files, _, _ = zoo
    model = copy.deepcopy(base)
    load_adapter(model, files["code"], "code")
    set_adapter(model, None)
    ids = ids_batch(2)
    with torch.no_grad():
        plain = model(ids).logits
        load_adapter(model, files["math"], "math")  # wraps the attention projections now
        assert torch.equal(model(ids).logits, plain)
    assert all(type(l) is ServingLayer and l.active_adapters == [] for l in layers(model).values())
    set_adapter(model, "math")
    check_merged(model, zoo, "math")


def test_a_second_attach_trains_alone_and_reloads_as_trained(zoo, tmp_path):
    base, _, _, _ = zoo
    model = attach(copy.deepcopy(base), NeuroAdaConfig(k=1))
    with torch.no_grad():
        for layer in layers(model).values():
            layer.neuroada_val["default"].fill_(0.2)
    attach(model, NeuroAdaConfig(k=2, target_modules=["q_proj", "v_proj"], save_dtype="F32"), "second")
    assert {n: l.active_adapters for n, l in layers(model).items()} == {
        n: (["second"] if n.endswith(("q_proj", "v_proj")) else []) for n in layers(model)}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n in dict(model.named_parameters()) if n.endswith("neuroada_val.second")]
    ids = ids_batch(2)
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
        trained = model(ids).logits
    model.save_pretrained(tmp_path / "ckpt")
    again = load_adapter(copy.deepcopy(base), tmp_path / "ckpt" / "second")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, trained) and not torch.equal(base(ids).logits, trained)


def test_attach_after_set_adapter_trains_the_new_adapter(zoo):
    base, files, _, _ = zoo
    model = copy.deepcopy(base)
    load_adapter(model, files["math"], "math")
    set_adapter(model, "math")
    with pytest.raises(NeuroAdaUsageError, match="merged adapters"):
        attach(model, NeuroAdaConfig(k=1), "new")
    set_adapter(model, None)
    attach(model, NeuroAdaConfig(k=1), "new")
    assert all(type(l) is NeuroAdaLayer and l.active_adapters == ["new"] for l in layers(model).values())
    ids = ids_batch(2)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(l.neuroada_val["new"].grad is not None for l in layers(model).values())


def test_unmerge_after_set_adapter_keeps_the_adapter_applied(zoo):
    """As merge + unmerge (and PEFT): unmerge restores the weights, the active adapter stays applied unmerged."""
    from neuroada_format.runtime import unmerge

    model = served(zoo)
    ids = ids_batch(2)
    set_adapter(model, "cs")
    with torch.no_grad():
        want = model(ids).logits
        unmerge(model)
        got = model(ids).logits
    assert all(not l.merged and l.active_adapters == (["cs"] if "cs" in l.neuroada_val else [])
               for l in layers(model).values())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # unmerged: the same sum, another rounding
    check_merged(model, zoo, None)


def _cacheless_copy(model):
    """A deep copy of `model` with every serving cache forgotten: what a block must compute without its caches."""
    fresh = copy.deepcopy(model)
    for layer in layers(fresh).values():
        multi._forget_caches(layer)
    return fresh


def _block_logits(model, names, ids):
    with torch.no_grad(), adapter_batch(model, names):
        return model(ids).logits


def test_set_adapter_refuses_a_tied_weight_and_changes_nothing(tmp_path):
    tied = tiny_llama()
    tied.config.tie_word_embeddings = True
    tied.lm_head.weight = tied.model.embed_tokens.weight
    m = attach(copy.deepcopy(tied), NeuroAdaConfig(k=2, target_modules=["lm_head"]))
    with torch.no_grad():
        layers(m)["lm_head"].neuroada_val["default"].normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    path = save_adapter(m, tmp_path / "head.safetensors")
    model = load_adapter(copy.deepcopy(tied), path, "head")
    before = snapshot(model)
    with pytest.raises(NeuroAdaError, match="shared with another module") as err:
        set_adapter(model, "head")
    assert err.value.tensor == "lm_head.weight" and snapshot(model) == before


def test_cached_stacks_follow_a_dtype_change(zoo):
    """model.to(dtype) swaps parameter storage without moving versions: the serving caches must notice."""
    model = served(zoo)
    names = ["math", "cs", None]
    ids = ids_batch(3)
    with torch.no_grad(), adapter_batch(model, names):
        model(ids)  # caches built in f32
    set_adapter(model, "cs")
    set_adapter(model, None)
    model.to(torch.bfloat16)
    fresh = _cacheless_copy(model)
    assert torch.equal(_block_logits(model, names, ids), _block_logits(fresh, names, ids))
    with torch.no_grad():
        # (a stale f32 stack cast on the fly could round the same: check what the caches hold)
        stacks = [st for layer in layers(model).values() for _, st, _ in layer.__dict__[multi._STACK_ATTR].values()]
        assert all(v.dtype == torch.bfloat16 for st in stacks for v in st.vals)
        set_adapter(model, "cs")
        set_adapter(fresh, "cs")
        assert all(multi._merged_entries(layer, "cs")[1].dtype == torch.bfloat16
                   for layer in layers(model).values() if "cs" in layer.neuroada_val)
        assert all(torch.equal(a.base_layer.weight, b.base_layer.weight)
                   for a, b in zip(layers(model).values(), layers(fresh).values()))


def test_serving_caches_are_not_fooled_by_a_reused_address(zoo):
    """A caching allocator (CUDA's) hands a freed block straight to the next tensor of its size, so after
    ``model.half().float()`` a parameter can hold a new storage at its old address, with an unchanged version.
    Emulated here: a second storage over the same memory, given new values without a version bump."""
    model = served(zoo)
    ids = ids_batch(2)
    set_adapter(model, "cs")  # caches filled
    set_adapter(model, None)
    with torch.no_grad(), adapter_batch(model, ["cs", "math"]):
        model(ids)
    for layer in layers(model).values():
        if "cs" in layer.neuroada_val:
            v = layer.neuroada_val["cs"]
            bits = {2: torch.int16, 4: torch.int32}[v.element_size()]  # numpy has no bfloat16: move the bits
            raw = torch.from_numpy(v.detach().view(bits).numpy())
            same_memory = raw.view(v.dtype)
            assert same_memory.data_ptr() == v.data_ptr()
            tripled = (v.detach() * 3).view(bits).numpy()
            before = v._version
            v.data = same_memory
            raw.numpy()[...] = tripled  # numpy writes move no version
            assert v._version == before
    fresh = _cacheless_copy(model)
    with torch.no_grad():
        for m in (model, fresh):
            set_adapter(m, "cs")
        assert all(torch.equal(a.base_layer.weight, b.base_layer.weight)
                   for a, b in zip(layers(model).values(), layers(fresh).values()))
        for m in (model, fresh):
            set_adapter(m, None)
        with adapter_batch(model, ["cs", "math"]):
            got = model(ids).logits
        with adapter_batch(fresh, ["cs", "math"]):
            want = fresh(ids).logits
        assert torch.equal(got, want)


@pytest.mark.parametrize("edit", ["val", "rebase"])
def test_switches_after_edits_through_data_serve_the_new_values(zoo, edit):
    """Optimizers, EMAs and merging code write through ``p.data``: a new tensor on the same storage with a version
    counter of its own, so the parameter's version does not move. set_adapter's merged values and adapter_batch's
    stacks were kept under version keys and served the values of their first use. "val": every delta moved (an
    optimizer step); "rebase": the base weights scaled and each adapter's originals (w0) re-read, as code merging
    something into the base does. The reference is a copy without caches."""
    model = served(zoo)
    ids = ids_batch(3)
    for name in ("math", "cs", "code", None):  # every cache filled
        set_adapter(model, name)
    with torch.no_grad(), adapter_batch(model, ["math", "cs", None]):
        model(ids)
    versions = {n: (layer.base_layer.weight._version, {a: v._version for a, v in layer.neuroada_val.items()})
                for n, layer in layers(model).items()}
    for layer in layers(model).values():
        if edit == "val":
            for v in layer.neuroada_val.values():
                v.data.add_(0.125)
        else:
            W = layer.base_layer.weight
            W.data.mul_(1.5)  # exact in f32: only the exponent moves
            for a in layer.neuroada_w0.keys():
                layer.neuroada_w0[a].data.copy_(W.data.gather(1, layer.neuroada_idx[a]))
    assert versions == {n: (layer.base_layer.weight._version, {a: v._version for a, v in layer.neuroada_val.items()})
                        for n, layer in layers(model).items()}  # what the caches were keyed on did not move
    fresh = _cacheless_copy(model)
    with torch.no_grad():
        for name in ("cs", "math", None, "code"):
            for m in (model, fresh):
                set_adapter(m, name)
            assert all(torch.equal(bits(a.base_layer.weight), bits(b.base_layer.weight))
                       for a, b in zip(layers(model).values(), layers(fresh).values())), name
        for m in (model, fresh):
            set_adapter(m, None)
        with adapter_batch(model, ["math", "cs", None]):
            got = model(ids).logits
        with adapter_batch(fresh, ["math", "cs", None]):
            want = fresh(ids).logits
        assert torch.equal(got, want)


@pytest.mark.parametrize("how", ["attach", "load_adapter"])
def test_the_base_name_is_reserved(zoo, how):
    base, files, _, _ = zoo
    model = copy.deepcopy(base)
    with pytest.raises(NeuroAdaUsageError, match="reserved"):
        if how == "attach":
            attach(model, NeuroAdaConfig(k=1), "__base__")
        else:
            load_adapter(model, files["math"], "__base__")
    assert layers(model) == {}


def test_copying_inside_a_block_is_refused_and_the_block_still_exits_cleanly(zoo):
    """A copy taken inside adapter_batch would keep the block's per-sequence state with nothing to put it back."""
    model = served(zoo)
    set_adapter(model, "math")
    before = snapshot(model)
    with torch.no_grad(), adapter_batch(model, ["cs", None]):
        with pytest.raises(NeuroAdaUsageError, match="inside an adapter_batch block"):
            copy.deepcopy(model)
        model(ids_batch(2))
    assert snapshot(model) == before
    copy.deepcopy(model)  # outside the block: fine


def test_a_served_model_pickles_and_saves_whole(zoo):
    """set_adapter's and adapter_batch's caches live in the layers; their keys hold storage objects (see
    multi._Storage), which pickle refused ("UntypedStorage has no attribute 'dtype'") and torch.save too ("Cannot
    save multiple tensors or storages that view the same data as different types"), so a model could not be
    pickled or torch.save'd once it had served. Copies carry no caches: the copy rebuilds them and serves the
    same bits."""
    import io
    import pickle

    model = served(zoo)
    set_adapter(model, "cs")
    with torch.no_grad(), adapter_batch(model, ["math", None, "code"]):
        mixed = model(ids_batch(3)).logits
    set_adapter(model, "math")
    with torch.no_grad():
        want = {n: (set_adapter(model, n), model(ids_batch(3)).logits)[1] for n in ("cs", "math", None, "code")}
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for copied in (pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)):
        assert all(multi._MERGED_ATTR not in layer.__dict__ and multi._STACK_ATTR not in layer.__dict__
                   for layer in layers(copied).values())
        assert merged_adapter(copied) == "code"
        with torch.no_grad():
            for n, logits in want.items():
                set_adapter(copied, n)
                assert torch.equal(copied(ids_batch(3)).logits, logits), n
            with adapter_batch(copied, ["math", None, "code"]):
                assert torch.equal(copied(ids_batch(3)).logits, mixed)


def test_a_block_stacks_only_the_adapters_its_sequences_use(zoo):
    """An adapter of larger k that no sequence uses cannot change the batch: "cs" (k=3) loaded but unused left a batch
    of k=1 "math" rows padded to K=3, off the fused K=1 path and 1e-7 away from the same batch on a model without
    "cs" (found by the many-adapters audit). A block's stack holds the loaded adapters of k up to its largest."""
    _, files, _, _ = zoo
    ids = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(3))
    names = ["math", None, "math", "math"]
    alone, crowded = served(zoo, ["math"]), served(zoo, ["math", "cs", "code"])
    for i in range(5):  # more adapters loaded under other names, none of them used
        load_adapter(crowded, files["cs"], f"cs{i}")
    with torch.no_grad():
        with adapter_batch(alone, names):
            want = alone(ids).logits
        with adapter_batch(crowded, names):
            got = crowded(ids).logits
            mixed = [layer._neuroada_mixed for layer in layers(crowded).values()]
            assert all(m.stack.n == 1 and m.stack.k == 1 and m.k1_f32 for m in mixed)
    assert torch.equal(got, want)
    # a block using a k=3 adapter gets the stack of every adapter of k <= 3; going back reuses the first one
    first = {n: list(layer.__dict__[multi._STACK_ATTR].values())[-1][1] for n, layer in layers(crowded).items()}
    with torch.no_grad():
        with adapter_batch(crowded, ["cs", "cs3", "math", None]):
            crowded(ids)
            assert {m.stack.n for m in (layer._neuroada_mixed for layer in layers(crowded).values())
                    if m is not None} == {7, 8}  # every adapter of k <= 3: "code" (k=2) holds only the MLP
        with adapter_batch(crowded, names):
            assert torch.equal(crowded(ids).logits, want)
    assert all(list(layer.__dict__[multi._STACK_ATTR].values())[-1][1] is first[n]
               for n, layer in layers(crowded).items())
    assert list_adapters(crowded) == ["math", "cs", "code", *(f"cs{i}" for i in range(5))]


def test_backward_through_a_mixed_batch_says_it_is_inference_only():
    """A trainable adapter inside adapter_batch gets no gradient (the block serves snapshots of its values):
    a backward says so in our error, not torch's "element 0 of tensors does not require grad"; under no_grad
    nothing changes, and gradients with respect to the inputs still flow."""
    from tiny_hf import tiny_llama, with_deltas

    from neuroada_format.runtime import adapter_batch

    model = with_deltas(tiny_llama(), k=3)
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with adapter_batch(model, ["default", None]):
        loss = model(ids).logits.sum()
        with pytest.raises(NeuroAdaUsageError, match="inference-only"):
            loss.backward()
        with torch.no_grad():
            assert not model(ids).logits.requires_grad
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=emb).logits.sum().backward()
        assert emb.grad is not None and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("used, edited", [("a0 a1", "a1"), ("a0 a1 a3", "a3"), ("a0 a3", "a0"),
                                          ("a1 short", "short")])
@pytest.mark.parametrize("change", ["data", "replace"])
def test_a_block_sees_one_adapters_change_among_many(used, edited, change):
    """Block entry checks a layer's used adapters together (one stacked comparison, keys compared in one pass): a
    change to one of them, in a run of slots ("a0 a1"), after an unused slot ("a0 a1 a3", "a0 a3") or with a
    smaller k than the stack's ("short"), must rebuild the stack, as a per-adapter check did. "data": one value
    written through ``.data`` (no version moves); "replace": a new parameter of other values put in its place.
    The reference is a copy without caches."""
    model = tiny_llama()
    for n in ["a0", "a1", "a2", "a3", "short"]:
        attach(model, NeuroAdaConfig(k=1 if n == "short" else 3, inference_mode=True), n)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in layers(model).values():
            for v in layer.neuroada_val.values():
                v.normal_(0, 0.05, generator=g)
    used = used.split() + [None, edited]
    ids = ids_batch(len(used))
    with torch.no_grad(), adapter_batch(model, used):
        before = model(ids).logits  # every stack cached
    with torch.no_grad():
        for layer in layers(model).values():
            v = layer.neuroada_val[edited]
            if change == "data":
                v.data[-1, -1] += 0.25
            else:
                layer.neuroada_val[edited] = torch.nn.Parameter(v.detach().clone().add_(0.25), requires_grad=False)
    got = _block_logits(model, used, ids)
    assert torch.equal(got, _block_logits(_cacheless_copy(model), used, ids)) and not torch.equal(got, before)
