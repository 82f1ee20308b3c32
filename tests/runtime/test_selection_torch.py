"""Selection in torch equals the numpy reference; random is seeded; gradient selection is exact and
never holds more than one layer's dense gradient (measured with a dispatch-level allocation meter)."""

from __future__ import annotations

import copy
import weakref

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import neuroada_format as naf
from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.runtime import NeuroAdaConfig, attach
from neuroada_format.runtime.guards import layers, to_numpy
from neuroada_format.runtime.selection import select, topk_columns

transformers = pytest.importorskip("transformers")


DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
TIED_VALUES = [0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 1e-3]
SPECIALS = [float("nan"), float("inf"), float("-inf")]


# -- torch == numpy --------------------------------------------------------------------------------
@st.composite
def weights(draw):
    d_out = draw(st.integers(1, 6))
    d_in = draw(st.integers(1, 40))
    k = draw(st.integers(1, d_in))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["random", "tied", "tied+specials"]))
    rng = np.random.default_rng(seed)
    if kind == "random":
        w = rng.standard_normal((d_out, d_in)) * rng.choice([1e-3, 1.0, 100.0])
    else:
        pool = TIED_VALUES + (SPECIALS if kind == "tied+specials" else [])
        w = rng.choice(pool, size=(d_out, d_in))
    return torch.from_numpy(w.astype(np.float32)).to(DTYPES[dtype]), k


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=weights(), rule=st.sampled_from(["magnitude", "reverse"]))
def test_torch_selection_equals_numpy_reference(case, rule):
    w, k = case
    got = select(w, k, rule).numpy()
    want = naf.select_indices(to_numpy(w), k, rule)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int64 and (np.diff(got, axis=1) > 0).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=weights(), rule=st.sampled_from(["magnitude", "reverse"]), rows=st.integers(1, 4))
def test_selection_in_row_blocks_equals_numpy_reference(case, rule, rows):
    """Blocks of a few rows: tie-free blocks take the fast path, tied ones the exact tie-break."""
    from neuroada_format.runtime import selection

    w, k = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selection, "ROW_CHUNK_ENTRIES", rows * w.shape[1])
        got = select(w, k, rule).numpy()
    np.testing.assert_array_equal(got, naf.select_indices(to_numpy(w), k, rule))


def test_all_tied_row_takes_the_lowest_columns():
    w = torch.full((3, 10), 0.25, dtype=torch.bfloat16)
    assert select(w, 4, "magnitude").tolist() == [[0, 1, 2, 3]] * 3
    assert select(w, 4, "reverse").tolist() == [[0, 1, 2, 3]] * 3


def test_topk_columns_keeps_f64_precision_and_rejects_bad_k():
    s = torch.tensor([[1.0, 1.0 + 1e-12, 1.0]], dtype=torch.float64)  # equal in f32, not in f64
    assert topk_columns(s, 1).tolist() == [[1]]
    with pytest.raises(NeuroAdaError):
        topk_columns(s, 4)


# -- random ----------------------------------------------------------------------------------------
def tiny_llama(seed=0, layers_=2, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers_,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100, **kw)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def indices(model, name="default"):
    return {n: l.neuroada_idx[name].clone() for n, l in layers(model).items()}


def test_random_selection_is_seeded_and_reproducible():
    base = tiny_llama()
    runs = {}
    for seed in (7, 7, 8):
        m = attach(copy.deepcopy(base), NeuroAdaConfig(k=3, selection="random", seed=seed))
        runs.setdefault(seed, []).append(indices(m))
    a, b = runs[7]
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], runs[8][0][n]) for n in a)
    # targets of the same shape still get different draws (the generator is offset per target)
    q0, q1 = a["model.layers.0.self_attn.q_proj"], a["model.layers.1.self_attn.q_proj"]
    assert not torch.equal(q0, q1)
    for idx in a.values():
        assert (idx[:, 1:] > idx[:, :-1]).all()
    # a random draw does not follow the weights: it is not the magnitude selection
    mag = indices(attach(copy.deepcopy(base), NeuroAdaConfig(k=3)))
    assert any(not torch.equal(a[n], mag[n]) for n in a)


def test_random_selection_default_seed_is_recorded():
    m = attach(tiny_llama(), NeuroAdaConfig(k=2, selection="random"))
    assert m.neuroada_configs["default"].seed == 0


# -- gradient --------------------------------------------------------------------------------------
class DenseMeter(TorchDispatchMode):
    """Peak bytes of live floating-point storages of at least `min_numel` elements created inside.

    Every op (forward, and backward too: the CPU autograd engine runs on this thread with the mode
    stack restored) reports its outputs; a storage counts until the last tensor viewing it dies.
    """

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel = min_numel
        self.refs: dict[int, list] = {}    # storage pointer -> weakrefs of the tensors using it
        self.sizes: dict[int, int] = {}
        self.peak = 0

    def _live(self) -> int:
        for ptr in [p for p, refs in self.refs.items() if all(r() is None for r in refs)]:
            del self.refs[ptr], self.sizes[ptr]
        return sum(self.sizes.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() < self.min_numel:
                continue
            st_ = t.untyped_storage()
            ptr = st_.data_ptr()
            if ptr in self.refs:
                self.refs[ptr].append(weakref.ref(t))  # a view (or in-place result) of a counted storage
                continue
            if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr
                   for a in tree_leaves((args, kwargs))):
                continue  # in-place on a tensor made outside (e.g. a weight): nothing allocated
            self.refs[ptr] = [weakref.ref(t)]
            self.sizes[ptr] = st_.nbytes()
        self.peak = max(self.peak, self._live())
        return out


def calib_batches(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (2, 6), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def dense_reference(model, batches, k):
    """Indices from the full model's dense gradients (all targets at once), summed over batches."""
    model = copy.deepcopy(model)
    from neuroada_format.runtime.targets import find_targets

    names = find_targets(model, NeuroAdaConfig())
    for p in model.parameters():
        p.requires_grad_(False)
    ws = {n: model.get_submodule(n).weight for n in names}
    for w in ws.values():
        w.requires_grad_(True)
    for b in batches:
        model(**b).loss.backward()
    out = {}
    for n, w in ws.items():
        g = to_numpy(w.grad)
        assert np.abs(g.astype(np.float32)).sum() > 0
        out[n] = naf.select_indices(w.detach().float().numpy(), k, "gradient", scores=g)
    return out


@pytest.mark.parametrize("n_batches,n_layers,dtype", [(1, 3, torch.float32), (1, 3, torch.bfloat16),
                                                      (2, 2, torch.float32)])
def test_gradient_selection_matches_dense_full_model_gradient(n_batches, n_layers, dtype):
    base = tiny_llama(layers_=n_layers, dtype=dtype)
    batches = calib_batches(n_batches)
    want = dense_reference(base, batches, k=3)
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = list(want)
    sizes = [model.get_submodule(n).weight.numel() for n in names]
    meter = DenseMeter(min_numel=min(sizes))
    with meter:
        attach(model, NeuroAdaConfig(k=3, selection="gradient"), calibration=batches)
    got = indices(model)
    assert sorted(got) == sorted(want)
    for n in names:
        np.testing.assert_array_equal(got[n].numpy(), want[n], err_msg=n)
    # the selection is not magnitude's (the gradient really drove it)
    mag = indices(attach(copy.deepcopy(base), NeuroAdaConfig(k=3)))
    assert any(not torch.equal(got[n], mag[n]) for n in names)
    # one layer's dense gradient at a time: the live dense floats never exceed a few copies of the
    # largest layer (gradient, |gradient|, accumulator), far below all targets' gradients together
    one_layer = max(sizes) * 4
    all_layers = sum(sizes) * 4
    assert all_layers >= 9 * one_layer  # so the bound below separates the two
    assert meter.peak <= 4 * one_layer, (meter.peak / one_layer, all_layers / one_layer)
    # scoring left the model as it was: no grads, requires_grad only on the new deltas, eval mode
    for name, t in model.state_dict().items():
        key = name.replace(".base_layer", "")
        if ".neuroada_" not in name:
            assert torch.equal(t, before[key])
    assert all(p.grad is None for p in model.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".neuroada_val." in n}


@pytest.mark.parametrize("n_batches", [1, 2])
def test_gradient_selection_of_a_second_adapter_scores_the_plain_base(n_batches):
    """A second attach trains alone on the plain base, so it is scored there: an adapter already attached (with
    deltas large enough to move every gradient) changes neither its columns nor its own state."""
    base = tiny_llama(layers_=2)
    batches = calib_batches(n_batches)
    want = dense_reference(base, batches, k=3)
    model = attach(copy.deepcopy(base), NeuroAdaConfig(k=4), "first")
    with torch.no_grad():
        for layer in layers(model).values():
            layer.neuroada_val["first"].normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    attach(model, NeuroAdaConfig(k=3, selection="gradient"), "second", calibration=batches)
    for n, layer in layers(model).items():
        np.testing.assert_array_equal(layer.neuroada_idx["second"].numpy(), want[n], err_msg=n)
        assert layer.active_adapters == ["second"]
    # and with "first" active, the scores would have differed: the check above is not vacuous
    shifted = copy.deepcopy(base)
    with torch.no_grad():
        for n, layer in layers(model).items():
            w = shifted.get_submodule(n).weight
            w.scatter_add_(1, layer.neuroada_idx["first"], layer.neuroada_val["first"].to(w.dtype))
    other = dense_reference(shifted, batches, k=3)
    assert any(not np.array_equal(other[n], want[n]) for n in want)


def test_meter_sees_a_full_dense_gradient():
    """The meter is honest: a plain backward that keeps every target's gradient is caught."""
    model = tiny_llama(layers_=3)
    from neuroada_format.runtime.targets import find_targets

    names = find_targets(model, NeuroAdaConfig())
    ws = [model.get_submodule(n).weight for n in names]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in ws:
        w.requires_grad_(True)
    meter = DenseMeter(min_numel=min(w.numel() for w in ws))
    with meter:
        model(**calib_batches(1)[0]).loss.backward()
    assert meter.peak >= sum(w.numel() * 4 for w in ws)


def test_gradient_selection_on_gpt2_conv1d_uses_the_canonical_view():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    batch = calib_batches(1)[0]
    batch = {k: v % 64 for k, v in batch.items()}
    ref = copy.deepcopy(base)
    for p in ref.parameters():
        p.requires_grad_(False)
    conv = {n: m for n, m in ref.named_modules() if type(m).__name__ == "Conv1D"}
    for m in conv.values():
        m.weight.requires_grad_(True)
    ref(**batch).loss.backward()
    model = attach(copy.deepcopy(base), NeuroAdaConfig(k=2, selection="gradient"), calibration=[batch])
    for n, m in conv.items():
        want = naf.select_indices(m.weight.detach().numpy().T, 2, "gradient", scores=m.weight.grad.numpy().T)
        np.testing.assert_array_equal(layers(model)[n].neuroada_idx["default"].numpy(), want)


def test_gradient_selection_on_already_wrapped_inplace_layers():
    """A second, gradient-selected adapter over in-place layers: scored additively, mode restored."""
    model = attach(tiny_llama(), NeuroAdaConfig(k=2))
    assert {l.mode for l in layers(model).values()} == {"inplace"}
    attach(model, NeuroAdaConfig(k=2, selection="gradient"), "grad", calibration=calib_batches(1))
    assert {l.mode for l in layers(model).values()} == {"inplace"}
    assert all("grad" in l.neuroada_idx for l in layers(model).values())


def test_gradient_selection_needs_batches_and_leaves_model_alone():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    for calib in (None, []):
        with pytest.raises(NeuroAdaError, match="calibration"):
            attach(model, NeuroAdaConfig(k=2, selection="gradient"), calibration=calib)
    assert not layers(model) and not hasattr(model, "neuroada_configs")
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("n_batches", [1, 2])
def test_gradient_selection_without_labels_says_so(n_batches):
    """A calibration batch as a tokenizer returns it has no labels, so the model's loss is None: that used to end
    in AttributeError ('NoneType' has no attribute 'backward') or TypeError; a loss_fn that returns a per-token
    loss failed in autograd. Both are usage errors now, and the model is left as it was."""
    model = tiny_llama()
    before, mode = copy.deepcopy(model.state_dict()), model.training
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}] * n_batches
    with pytest.raises(NeuroAdaUsageError, match="labels"):
        attach(model, NeuroAdaConfig(k=2, selection="gradient"), calibration=batches)
    with pytest.raises(NeuroAdaUsageError, match=r"scalar .*shape \(2, 6, 100\)"):
        attach(model, NeuroAdaConfig(k=2, selection="gradient"), calibration=batches,
               loss_fn=lambda m, b: m(**b).logits)
    assert not layers(model) and not hasattr(model, "neuroada_configs")
    assert all(p.requires_grad for p in model.parameters()) and model.training == mode
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    labelled = [dict(b, labels=ids) for b in batches]  # and with labels it selects
    attach(model, NeuroAdaConfig(k=2, selection="gradient"), calibration=labelled)
    assert layers(model)
