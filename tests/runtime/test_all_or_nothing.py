"""A runtime call that fails leaves the model exactly as it was, and usable: attach and load_adapter change it in
many steps (wrap, add, freeze, pause, serve), so a refusal only a layer can make, or Ctrl-C, part-way must put every
step back. Found by an audit: a failure at the n-th target left n-1 layers wrapped and serving part of the adapter,
the base frozen, and the adapter's name taken (the retry the error advised was refused)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.runtime import NeuroAdaConfig, attach, load_adapter, save_adapter, set_adapter
from neuroada_format.runtime.layer import NeuroAdaLayer
from neuroada_format.runtime.guards import layers
from tests.tiny_hf import tiny_llama, with_deltas

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


class SubLinear(nn.Linear):
    """A Linear subclass (as Falcon's FalconLinear): its forward is not mirrored, so in-place mode refuses it."""


def _with_subclass(model, name="model.layers.1.mlp.down_proj"):
    parent, _, child = name.rpartition(".")
    old = model.get_submodule(name)
    new = SubLinear(old.in_features, old.out_features, bias=False)
    new.weight = old.weight
    setattr(model.get_submodule(parent), child, new)
    return model


def _state(model):
    """Everything a failed call must not change."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
        "grad": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "layers": {n: (type(l).__name__, list(l.active_adapters), list(l.merged_adapters), sorted(l.parked))
                   for n, l in layers(model).items()},
        "dict": sorted(k for k in model.__dict__ if "neuroada" in k or k in ("save_pretrained", "resize_token_embeddings")),
        "hooks": sum(len(m._forward_pre_hooks) + len(m._load_state_dict_pre_hooks) + len(m._load_state_dict_post_hooks)
                     for m in model.modules()),
    }


def _assert_same(a, b):
    for key in ("params", "buffers"):
        assert a[key].keys() == b[key].keys(), key
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), n
    for key in ("grad", "modules", "layers", "dict", "hooks"):
        assert a[key] == b[key], key


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def adapter_file(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_adapter(with_deltas(_with_subclass(tiny_llama()), k=2, target_modules="all-linear"), path)
    return path


def test_attach_refuses_a_target_its_mode_cannot_run_before_changing_anything():
    model = _with_subclass(tiny_llama())
    before, logits = _state(model), _logits(model)
    with pytest.raises(NeuroAdaUsageError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*SubLinear"):
        attach(model, NeuroAdaConfig(k=2, target_modules="all-linear", mode="inplace"))
    _assert_same(before, _state(model))
    attach(model, NeuroAdaConfig(k=2, target_modules="all-linear"))  # the retry the message advises
    assert torch.equal(_logits(model), logits)


def test_load_adapter_refuses_a_target_its_mode_cannot_run_before_changing_anything(adapter_file):
    model = _with_subclass(tiny_llama())
    before, logits = _state(model), _logits(model)
    with pytest.raises(NeuroAdaUsageError, match=r"down_proj\.weight.*SubLinear"):
        load_adapter(model, adapter_file, mode="inplace")
    _assert_same(before, _state(model))
    assert torch.equal(_logits(model), logits)
    load_adapter(model, adapter_file)
    assert not torch.equal(_logits(model), logits)


class _Interrupt:
    """NeuroAdaLayer.add_adapter raising on its n-th call: a Ctrl-C (or out of memory) part-way through the loop."""

    def __init__(self, monkeypatch, n, exc=KeyboardInterrupt):
        self.calls, real = 0, NeuroAdaLayer.add_adapter

        def add_adapter(layer, *args, **kwargs):
            self.calls += 1
            if self.calls == n:
                raise exc()
            return real(layer, *args, **kwargs)

        monkeypatch.setattr(NeuroAdaLayer, "add_adapter", add_adapter)
        self.undo = lambda: monkeypatch.setattr(NeuroAdaLayer, "add_adapter", real)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, MemoryError])
@pytest.mark.parametrize("setup", ["plain", "trained", "served"])
def test_attach_interrupted_part_way_leaves_the_model_as_it_was(monkeypatch, setup, exc):
    model = tiny_llama()
    if setup != "plain":
        with_deltas(model, k=2, target_modules=["q_proj", "v_proj"])  # trainable: attach would pause it
    if setup == "served":
        set_adapter(model, "default")
    before, logits = _state(model), _logits(model)
    stop = _Interrupt(monkeypatch, 5, exc)
    with pytest.raises(exc):
        attach(model, NeuroAdaConfig(k=3, target_modules="all-linear"), "new")
    _assert_same(before, _state(model))
    assert torch.equal(_logits(model), logits)
    stop.undo()
    attach(model, NeuroAdaConfig(k=3, target_modules="all-linear"), "new")  # the name is free, the call works
    assert len(layers(model)) == 14


@pytest.mark.parametrize("setup", ["plain", "trained", "served"])
def test_load_adapter_interrupted_part_way_leaves_the_model_as_it_was(monkeypatch, adapter_file, setup):
    model = _with_subclass(tiny_llama())
    if setup != "plain":
        with_deltas(model, k=2, target_modules=["q_proj", "v_proj"])
    if setup == "served":
        set_adapter(model, "default")
    before, logits = _state(model), _logits(model)
    stop = _Interrupt(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        load_adapter(model, adapter_file, "b", is_trainable=True)
    _assert_same(before, _state(model))
    assert torch.equal(_logits(model), logits)
    stop.undo()
    load_adapter(model, adapter_file, "b", is_trainable=True)
    set_adapter(model, "b")
    reference = _with_subclass(tiny_llama())
    load_adapter(reference, adapter_file)
    assert torch.allclose(_logits(model), _logits(reference), atol=1e-6)


def test_a_refusal_inside_the_loop_is_rolled_back_too(monkeypatch, adapter_file):
    """Any NeuroAdaError a layer raises late (here injected) leaves nothing behind either."""
    model = tiny_llama()
    before = _state(model)
    _Interrupt(monkeypatch, 3, lambda: NeuroAdaError("injected"))
    with pytest.raises(NeuroAdaError, match="injected"):
        attach(model, NeuroAdaConfig(k=1, target_modules="all-linear"))
    _assert_same(before, _state(model))


# -- saves ---------------------------------------------------------------------------------------------------------
def _files(folder):
    import os

    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), folder)] = f.read()
    return out


def test_save_pretrained_checks_every_adapter_before_writing_any(tmp_path):
    """b's deltas overflow F16 (its save dtype): found before default's files were replaced (they were, and the
    checkpoint's adapter and trainable state then disagreed)."""
    from neuroada_format.runtime.hf_checkpoint import save_pretrained

    model = with_deltas(tiny_llama(), k=2, target_modules=["q_proj"])
    attach(model, NeuroAdaConfig(k=1, target_modules=["v_proj"], save_dtype="F16"), "b")
    save_pretrained(model, tmp_path / "ckpt")
    good = _files(tmp_path / "ckpt")
    with torch.no_grad():
        for layer in layers(model).values():
            if "default" in layer.neuroada_val:
                layer.neuroada_val["default"].add_(0.5)  # default trained on ...
            if "b" in layer.neuroada_val:
                layer.neuroada_val["b"].fill_(1e6)  # ... and b left F16's range
    with pytest.raises(NeuroAdaError, match=r"rule 3\.7.*overflows F16"):
        save_pretrained(model, tmp_path / "ckpt")
    assert _files(tmp_path / "ckpt") == good


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_a_folder_save_failing_at_its_config_leaves_the_old_pair(monkeypatch, tmp_path, exc):
    import os

    old = with_deltas(tiny_llama(), k=2, target_modules="all-linear")
    save_adapter(old, tmp_path / "task")
    good = _files(tmp_path / "task")
    new = tiny_llama()
    attach(new, NeuroAdaConfig(k=3, target_modules=["q_proj"], selection="random", seed=7))
    calls, real = [], os.fsync

    def failing(fd):  # the second file's flush to disk: the config, after the weights were written
        calls.append(fd)
        if len(calls) == 2:
            raise exc(28, "No space left on device") if exc is OSError else exc()
        return real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(exc):
        save_adapter(new, tmp_path / "task")
    monkeypatch.setattr(os, "fsync", real)
    assert len(calls) == 2
    assert _files(tmp_path / "task") == good  # no new weights beside the old config, no temporary files


def test_a_killed_folder_save_leaves_nothing_the_next_save_keeps(tmp_path):
    """kill -9 in the middle of a folder save leaves a temporary sibling, which the next save removes (the first
    version wrote through naf.save into a sibling of a sibling, which no later save recognised)."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal
        from neuroada_format.runtime import saving as m
        from tests.tiny_hf import tiny_llama, with_deltas
        real = os.fsync
        def killed(fd):
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync = killed
        m.save_adapter(with_deltas(tiny_llama(), k=1, target_modules=["q_proj"]), {str(tmp_path / "task")!r})
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name.startswith("neuroada_model.safetensors.tmp-") for p in (tmp_path / "task").iterdir()] == [True]
    save_adapter(with_deltas(tiny_llama(), k=1, target_modules=["q_proj"]), tmp_path / "task")
    assert sorted(p.name for p in (tmp_path / "task").iterdir()) == ["neuroada_config.json",
                                                                     "neuroada_model.safetensors"]


def test_load_adapter_refuses_a_folder_whose_config_does_not_describe_its_weights(tmp_path):
    """What only kill -9 between a folder save's two renames (or a hand copy) can leave."""
    import shutil

    save_adapter(with_deltas(tiny_llama(), k=2, target_modules="all-linear"), tmp_path / "old")
    new = tiny_llama()
    attach(new, NeuroAdaConfig(k=3, target_modules=["q_proj"], selection="random", seed=7))
    save_adapter(new, tmp_path / "new")
    shutil.copy(tmp_path / "new" / "neuroada_model.safetensors", tmp_path / "old" / "neuroada_model.safetensors")
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(NeuroAdaError, match=r"does not describe its weights \(k=2 against the file's k=3; selection "
                                            r"'magnitude' against the file's 'random'\)"):
        load_adapter(model, tmp_path / "old")
    _assert_same(before, _state(model))
    load_adapter(model, tmp_path / "old" / "neuroada_model.safetensors")  # the file itself, as the message says


def test_config_seed_must_be_an_integer():
    for seed in ("x", 1.5, True):
        with pytest.raises(NeuroAdaUsageError, match="seed must be an integer or None"):
            NeuroAdaConfig(k=1, seed=seed)


@pytest.mark.parametrize("path", [None, 5, ""])
def test_save_and_load_need_a_path(tmp_path, path):
    model = with_deltas(tiny_llama(), k=1, target_modules=["q_proj"])
    with pytest.raises(NeuroAdaUsageError, match="needs a path"):
        save_adapter(model, path)
    with pytest.raises(NeuroAdaUsageError, match="needs a path"):
        load_adapter(tiny_llama(), path)


def test_an_unknown_value_dtype_is_refused_by_name(tmp_path):
    from neuroada_format.runtime import to_adapter

    model = with_deltas(tiny_llama(), k=1, target_modules=["q_proj"])
    for call in (lambda: to_adapter(model, value_dtype="F8"), lambda: save_adapter(model, tmp_path / "a",
                                                                                      value_dtype="F8")):
        with pytest.raises(NeuroAdaUsageError, match="value_dtype must be one of BF16, F16, F32, got 'F8'"):
            call()
    assert not (tmp_path / "a").exists()


# -- arguments of the wrong kind: our refusal, before anything changes ---------------------------------------------
def _two_adapters():
    model = with_deltas(tiny_llama(), k=1, target_modules=["q_proj"])
    attach(model, NeuroAdaConfig(k=1, target_modules=["v_proj"]), "b")
    return model


@pytest.mark.parametrize("call, message", [
    (lambda m: __import__("neuroada_format.runtime", fromlist=["merge"]).merge(m, "default"),
     r"merge takes a list of adapter names, not str 'default' \(one adapter: \['default'\]\)"),
    (lambda m: __import__("neuroada_format.runtime", fromlist=["merge"]).merge(m, 5), "not int 5"),
    (lambda m: __import__("neuroada_format.runtime", fromlist=["merge_and_unload"]).merge_and_unload(m, "b"),
     "merge takes a list"),
    (lambda m: __import__("neuroada_format.runtime", fromlist=["delete_adapter"]).delete_adapter(m, ["b"]),
     "delete_adapter takes one adapter name, not list"),
    (lambda m: __import__("neuroada_format.runtime", fromlist=["x"]).add_weighted_adapter(m, ["default", "b"],
                                                                                          ["x", 1], "c"),
     "weights are numbers, got str 'x'"),
    (lambda m: __import__("neuroada_format.runtime", fromlist=["x"]).add_weighted_adapter(m, "default", [1], "c"),
     "add_weighted_adapter takes a list of adapter names"),
    (lambda m: __import__("neuroada_format.runtime", fromlist=["x"]).adapter_batch(m, None).__enter__(),
     "adapter_batch takes a list of adapter names, not NoneType"),
    (lambda m: __import__("neuroada_format.runtime", fromlist=["x"]).adapter_batch(m, [1]).__enter__(),
     r"adapter names are strings \(or None, the base\), got int 1"),
    (lambda m: m.save_pretrained("unused", selected_adapters="default"), "selected_adapters takes a list"),
    (lambda m: attach(m, {"k": 1}, "c"), r"attach takes a NeuroAdaConfig, not dict: NeuroAdaConfig\(\*\*that_dict\)"),
])
def test_arguments_of_the_wrong_kind_are_refused_by_name(tmp_path, monkeypatch, call, message):
    """merge(model, "ab") merged adapters a and b (a str taken as its characters); the others were bare TypeErrors,
    ValueErrors or AttributeErrors from deep inside."""
    monkeypatch.chdir(tmp_path)
    model = _two_adapters()
    before, logits = _state(model), _logits(model)
    with pytest.raises(NeuroAdaUsageError, match=message):
        call(model)
    _assert_same(before, _state(model))
    assert torch.equal(_logits(model), logits)
    assert not any(tmp_path.iterdir())


def _public_functions_taking_a_model() -> list[str]:
    """Every public runtime function whose first parameter is the model, so that a new one cannot be left out."""
    import inspect

    import neuroada_format.runtime as runtime

    return [n for n in runtime.__all__ if inspect.isfunction(getattr(runtime, n))
            and list(inspect.signature(getattr(runtime, n)).parameters)[:1] == ["model"]]


@pytest.mark.parametrize("name", _public_functions_taking_a_model())
@pytest.mark.parametrize("model", [None, "model"])
def test_a_model_that_is_no_torch_model_is_refused_by_name(tmp_path, name, model):
    """None (what set_adapter and the like return, kept by ``model = set_adapter(model, ...)``) or a string given as
    the model was a bare AttributeError (or TypeError) from deep inside; load_trained_extras returned [] silently."""
    import neuroada_format.runtime as runtime

    args = {"attach": (NeuroAdaConfig(k=1),), "load_adapter": (tmp_path,), "save_adapter": (tmp_path / "a",),
            "set_adapter": ("default",), "delete_adapter": ("default",), "add_weighted_adapter": (["a"], [1.0], "b"),
            "adapter_batch": (["default"],), "load_trained_extras": (tmp_path,), "train_on_grid": (tmp_path / "g",),
            "load_quantized_weights": (tmp_path / "g",)}
    hint = r" \(set_adapter, delete_adapter, .* return None: keep the model itself\)" if model is None else "$"
    with pytest.raises(NeuroAdaUsageError, match=rf"^{name} takes a torch model \(an nn.Module\), not "
                                                 rf"{type(model).__name__}{hint}"):
        result = getattr(runtime, name)(model, *args.get(name, ()))
        if name in ("adapter_batch", "disable_adapter"):
            result.__enter__()
    assert not any(tmp_path.iterdir())


def test_set_adapter_refuses_a_layer_it_cannot_serve_before_switching_any(tmp_path):
    class OwnLayer(NeuroAdaLayer):
        pass

    model = with_deltas(tiny_llama(), k=1, target_modules="all-linear")
    load_adapter(model, save_adapter(model, tmp_path / "b.safetensors"), "b")  # for inference: served merged
    last = list(layers(model).values())[-1]
    last.__class__ = OwnLayer
    before = _state(model)
    with pytest.raises(NeuroAdaUsageError, match="cannot serve a OwnLayer.*nothing was switched"):
        set_adapter(model, "b")
    _assert_same(before, _state(model))


def test_load_trained_extras_refuses_what_is_not_a_checkpoint(tmp_path):
    """A typo, a file, a plain model file or a damaged state loaded nothing and returned [] (the trained head stayed
    at its initial values without a word)."""
    from safetensors.torch import save_file

    from neuroada_format.runtime import load_trained_extras

    model = with_deltas(tiny_llama(), k=1, target_modules=["q_proj"])
    model.lm_head.weight.requires_grad_(True)
    with torch.no_grad():
        model.lm_head.weight.add_(0.25)  # as if trained
    model.save_pretrained(tmp_path / "ckpt")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "ckpt")
    assert load_trained_extras(fresh, tmp_path / "ckpt") == ["lm_head.weight"]
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    (tmp_path / "plain").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "plain" / "model.safetensors")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    for path, message in ((tmp_path / "ckpt-typo", "not a folder that save_pretrained wrote"),
                          (tmp_path / "ckpt" / "model.safetensors", "not a folder that save_pretrained wrote"),
                          (tmp_path / "plain", "a model file, not the trainable state"),
                          (tmp_path / "broken", "cannot read the trainable state")):
        with pytest.raises(NeuroAdaError, match=message):
            load_trained_extras(fresh, path)


# -- Ctrl-C during the per-layer loops -----------------------------------------------------------------------------
@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler, whatever pytest was started with (a job run with `&` in a non-interactive shell
    starts with SIGINT ignored: the signals these tests send did nothing, and they failed on a correct tree)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _ctrl_c_at(monkeypatch, method, n):
    """SIGINT sent to this process from inside the n-th call of NeuroAdaLayer.<method> (or multi.<function>): the
    user's Ctrl-C part-way."""
    import os
    import signal

    from neuroada_format.runtime import multi

    owner = multi if method.startswith("_") else NeuroAdaLayer
    calls, real = [0], getattr(owner, method)

    def wrapped(layer, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real(layer, *args, **kwargs)

    monkeypatch.setattr(owner, method, wrapped)


@pytest.mark.parametrize("call, method, check", [
    ("delete", "delete_adapter", lambda m: all("b" not in l.neuroada_val for l in layers(m).values())),
    ("merge", "merge", lambda m: all(l.merged for l in layers(m).values() if l.active_adapters)),
    ("set_adapter", "_serve", lambda m: all(l.merged_adapters == ["b"] for l in layers(m).values()
                                           if "b" in l.neuroada_val)),
    ("unload", "unmerge", lambda m: not layers(m)),
])
def test_ctrl_c_in_a_per_layer_loop_waits_for_the_loop(monkeypatch, tmp_path, call, method, check, python_sigint):
    """The interrupt is raised once every layer is done: the model is never left half switched (after a part-way
    delete_adapter the adapter was still listed, and a save wrote 12 of its 14 targets without a word)."""
    from neuroada_format.runtime import delete_adapter, list_adapters, merge, unload

    model = with_deltas(tiny_llama(), k=1, target_modules="all-linear")
    load_adapter(model, save_adapter(model, tmp_path / "a.safetensors"), "b")
    if call == "unload":
        merge(model)
    _ctrl_c_at(monkeypatch, method, 3)
    run = {"delete": lambda: delete_adapter(model, "b"), "merge": lambda: merge(model),
           "set_adapter": lambda: set_adapter(model, "b"), "unload": lambda: unload(model)}[call]
    with pytest.raises(KeyboardInterrupt):
        run()
    assert check(model)
    if call == "delete":
        assert list_adapters(model) == ["default"]



# -- found by the review of the above --------------------------------------------------------------------------------
def test_a_failed_attach_never_removes_an_adapter_that_was_there(monkeypatch):
    """An attached model inside a plain container: attach(outer, ..., "default") fails on the inner model's layers,
    which hold a "default" already; putting back must not delete theirs (it did: the trained deltas were lost)."""
    inner = with_deltas(tiny_llama(), k=2, target_modules="all-linear")
    outer = nn.Module()
    outer.inner = inner
    values = {n: l.neuroada_val["default"].detach().clone() for n, l in layers(inner).items()}
    with pytest.raises(NeuroAdaUsageError, match="exists"):
        attach(outer, NeuroAdaConfig(k=1, target_modules="all-linear"))
    assert {n: l.neuroada_val["default"] for n, l in layers(inner).items()}.keys() == values.keys()
    assert all(torch.equal(layers(inner)[n].neuroada_val["default"], v) for n, v in values.items())


def test_a_second_ctrl_c_while_putting_back_still_puts_everything_back(monkeypatch, python_sigint):
    import os
    import signal

    model = tiny_llama()
    before = _state(model)
    _Interrupt(monkeypatch, 5)
    real = NeuroAdaLayer.delete_adapter

    def delete_adapter(layer, name):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again during the rollback
        return real(layer, name)

    monkeypatch.setattr(NeuroAdaLayer, "delete_adapter", delete_adapter)
    with pytest.raises(KeyboardInterrupt):
        attach(model, NeuroAdaConfig(k=1, target_modules="all-linear"))
    _assert_same(before, _state(model))


def test_set_adapter_trains_an_adapter_on_a_layer_subclass():
    """Only serving (an inference adapter, merged) needs the exact class; a trainable adapter is made active."""
    class OwnLayer(NeuroAdaLayer):
        pass

    model = _two_adapters()
    for layer in layers(model).values():
        layer.__class__ = OwnLayer
    set_adapter(model, "b")
    assert all(l.active_adapters == (["b"] if "b" in l.neuroada_val else []) for l in layers(model).values())


def test_add_weighted_adapter_takes_any_real_number():
    from decimal import Decimal
    from fractions import Fraction

    import numpy as np

    from neuroada_format.runtime import add_weighted_adapter, list_adapters

    model = _two_adapters()
    for i, weights in enumerate(([Fraction(1, 2), Decimal("0.5")], [np.float32(0.5), np.array(0.5)],
                                 [torch.tensor(0.5), 1])):
        add_weighted_adapter(model, ["default", "b"], weights, f"c{i}")
    assert list_adapters(model)[-3:] == ["c0", "c1", "c2"]
    for bad in (np.True_, "0.5", np.array([0.5, 0.5]), torch.tensor([0.5, 0.5])):
        with pytest.raises(NeuroAdaUsageError, match="weights are numbers"):
            add_weighted_adapter(model, ["default", "b"], [bad, 1], "d")


def test_save_pretrained_writes_a_folder_whatever_its_name(tmp_path):
    model = with_deltas(tiny_llama(), k=1, target_modules=["q_proj"])
    model.save_pretrained(tmp_path / "run.safetensors")
    assert sorted(p.name for p in (tmp_path / "run.safetensors").iterdir()) == [
        "model.safetensors", "neuroada_config.json", "neuroada_model.safetensors"]
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "run.safetensors")
    assert torch.allclose(_logits(fresh), _logits(model), atol=1e-4)  # (the file's values are BF16)


# -- other failures part-way (e.g. out of memory at the n-th layer) ------------------------------------------------
def _fail_at(monkeypatch, owner, name, n, exc=MemoryError):
    """``owner.name`` raising on its n-th call, as an allocation that fails at the n-th layer."""
    calls, real = [0], getattr(owner, name)

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise exc("out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def _served(tmp_path):
    """"default" trainable on every linear, "b" (its copy) and "c" (k=2: other positions) loaded for inference."""
    model = with_deltas(tiny_llama(), k=1, target_modules="all-linear")
    path = save_adapter(model, tmp_path / "b.safetensors")
    load_adapter(model, path, "b")
    load_adapter(model, save_adapter(with_deltas(tiny_llama(), k=2, target_modules="all-linear", seed=3),
                                     tmp_path / "c.safetensors"), "c")
    return model


def test_merge_failing_at_a_layer_puts_back_the_layers_before_it(monkeypatch, tmp_path):
    from neuroada_format.runtime import layer as layer_module, merge

    model = _served(tmp_path)
    merge(model, ["b"])  # the 3rd layer's merge unmerges "b" first, then fails to write both
    before, logits = _state(model), _logits(model)
    _fail_at(monkeypatch, layer_module, "merge_", 3)
    with pytest.raises(MemoryError):
        merge(model, ["default"])
    _assert_same(before, _state(model))
    assert torch.equal(_logits(model), logits)
    monkeypatch.undo()
    merge(model, ["default"])  # the retry works
    assert all(l.merged_adapters == ["b", "default"] for l in layers(model).values())


@pytest.mark.parametrize("to, owner, name", [
    ("c", "multi", "_merged_entries"),        # inference adapter at other positions: "b" restored, then it fails
    ("default", "layer", "unmerge"),          # a trainable adapter: unmerged, made active
])
def test_set_adapter_failing_at_a_layer_switches_every_layer_back(monkeypatch, tmp_path, to, owner, name):
    from neuroada_format.runtime import multi

    model = _served(tmp_path)
    set_adapter(model, "b")
    before, logits = _state(model), _logits(model)
    _fail_at(monkeypatch, multi if owner == "multi" else NeuroAdaLayer, name, 3)
    with pytest.raises(MemoryError):
        set_adapter(model, to)
    _assert_same(before, _state(model))
    assert torch.equal(_logits(model), logits)
    monkeypatch.undo()
    set_adapter(model, to)
    assert all(l.active_adapters == [to] for l in layers(model).values())


def test_delete_adapter_failing_at_a_layer_keeps_the_adapter_everywhere(monkeypatch, tmp_path):
    from neuroada_format.runtime import delete_adapter, list_adapters, merge

    model = _served(tmp_path)
    merge(model, ["default", "b"])
    before, logits = _state(model), _logits(model)
    _fail_at(monkeypatch, NeuroAdaLayer, "merge", 3)  # re-merging "default" after taking "b" out, 3rd layer
    with pytest.raises(MemoryError):
        delete_adapter(model, "b")
    _assert_same(before, _state(model))
    assert torch.equal(_logits(model), logits)
    assert list_adapters(model) == ["default", "b", "c"]
    monkeypatch.undo()
    delete_adapter(model, "b")
    assert list_adapters(model) == ["default", "c"]
    assert all(l.merged_adapters == ["default"] for l in layers(model).values())


def test_two_saves_into_one_folder_at_once_take_turns(monkeypatch, tmp_path):
    """Every DDP rank calling save_pretrained, or two jobs given one output: the second save waits for the first
    (interleaved, the first's config was published over the second's weights: a pair load_adapter refuses)."""
    import threading

    from neuroada_format import durable
    from neuroada_format.folder import WEIGHTS_NAME

    one, two = (with_deltas(tiny_llama(), k=k, target_modules=["q_proj"]) for k in (1, 2))
    first_weights_out, second_done = threading.Event(), threading.Event()
    real = durable.publish

    def publish(tmp, out, **kwargs):
        real(tmp, out, **kwargs)
        if threading.current_thread().name == "first" and out.endswith(WEIGHTS_NAME):
            first_weights_out.set()
            second_done.wait(2)  # without the lock the second save runs to its end here

    monkeypatch.setattr(durable, "publish", publish)
    first = threading.Thread(target=save_adapter, args=(one, tmp_path / "task"), name="first")
    first.start()
    assert first_weights_out.wait(60)
    second = threading.Thread(target=lambda: (save_adapter(two, tmp_path / "task"), second_done.set()))
    second.start()
    first.join(60)
    second.join(60)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "task")  # refused as a mismatched pair before the lock
    assert all(l.neuroada_val["default"].shape[1] == 2 for l in layers(fresh).values())  # the second, whole
    assert sorted(p.name for p in (tmp_path / "task").iterdir()) == ["neuroada_config.json", WEIGHTS_NAME]


# -- pinned by the mutation audit of the above ---------------------------------------------------------------------
def test_a_layer_merge_failing_after_its_write_puts_the_weight_back(monkeypatch, tmp_path):
    from neuroada_format.runtime import layer as layer_module, merge

    model = _served(tmp_path)
    before, logits = _state(model), _logits(model)
    real, calls = layer_module.merge_, [0]

    def written_then_failed(W, overlay, deltas):
        real(W, overlay, deltas)
        calls[0] += 1
        if calls[0] == 3:
            raise MemoryError("injected after the write")

    monkeypatch.setattr(layer_module, "merge_", written_then_failed)
    with pytest.raises(MemoryError):
        merge(model, ["default"])
    _assert_same(before, _state(model))
    assert torch.equal(_logits(model), logits)


def test_set_adapter_failing_puts_back_several_merged_adapters(monkeypatch, tmp_path):
    from neuroada_format.runtime import merge, multi

    model = _served(tmp_path)
    merge(model, ["default", "b"])  # merged by hand: two adapters per layer, which a switch back must merge again
    before, logits = _state(model), _logits(model)
    _fail_at(monkeypatch, multi, "_merged_entries", 3)
    with pytest.raises(MemoryError):
        set_adapter(model, "c")
    _assert_same(before, _state(model))
    assert torch.equal(_logits(model), logits)


def test_save_validates_the_adapter_it_writes(tmp_path):
    """The writes skip naf.save's own check (save_adapter validated before): a duplicated index must still stop it."""
    model = with_deltas(tiny_llama(), k=2, target_modules=["q_proj"])
    layer = next(iter(layers(model).values()))
    with torch.no_grad():
        layer.neuroada_idx["default"][0, 1] = layer.neuroada_idx["default"][0, 0]
    with pytest.raises(NeuroAdaError, match="3.6"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a" / "neuroada_model.safetensors").exists()


def test_save_pretrained_checks_every_adapters_path_before_writing(tmp_path):
    model = with_deltas(tiny_llama(), k=2, target_modules=["q_proj"])
    attach(model, NeuroAdaConfig(k=1, target_modules=["v_proj"]), "b")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "b").write_text("a file where b's folder goes")
    with pytest.raises(NeuroAdaUsageError):
        model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["b"]


def test_merge_from_a_worker_thread():
    """Ctrl-C is held back on the main thread only; elsewhere signal.signal raises, and merge must not."""
    import threading

    from neuroada_format.runtime import merge

    model = with_deltas(tiny_llama(), k=1, target_modules=["q_proj"])
    errors = []

    def run():
        try:
            merge(model)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(60)
    assert errors == [] and all(l.merged for l in layers(model).values())


@pytest.mark.parametrize("setup", ["plain", "attached", "load"])
def test_a_failure_in_the_last_step_of_attach_or_load_puts_everything_back(monkeypatch, tmp_path, setup):
    """_install_hf (the model's save_pretrained and friends) is the last step: failing there must undo it too."""
    from neuroada_format.runtime import loading, model as model_module

    caller = loading if setup == "load" else model_module  # the module whose function looks _install_hf up
    model = tiny_llama() if setup == "plain" else with_deltas(tiny_llama(), k=2, target_modules=["q_proj"])
    path = save_adapter(model, tmp_path / "a.safetensors") if setup == "load" else None
    before, configs = _state(model), dict(getattr(model, "neuroada_configs", {}))
    real = caller._install_hf

    def failing(m):
        real(m)
        raise KeyboardInterrupt

    monkeypatch.setattr(caller, "_install_hf", failing)
    with pytest.raises(KeyboardInterrupt):
        if setup == "load":
            load_adapter(model, path, "b")
        else:
            attach(model, NeuroAdaConfig(k=1, target_modules=["v_proj"]), "new")
    _assert_same(before, _state(model))
    assert dict(getattr(model, "neuroada_configs", {})) == configs
    if setup == "plain":
        assert "save_pretrained" not in model.__dict__


def test_a_second_in_place_adapter_on_wrapped_layers():
    model = with_deltas(tiny_llama(), k=2, target_modules=["q_proj"], mode="inplace")
    attach(model, NeuroAdaConfig(k=1, target_modules=["q_proj"], mode="inplace"), "b")
    assert all("b" in l.neuroada_val for l in layers(model).values())


def test_a_base_bias_under_its_plain_name_is_refused():
    model = attach(tiny_llama(attention_bias=True), NeuroAdaConfig(k=2, target_modules=["q_proj"]))
    state = {k: v for k, v in tiny_llama(attention_bias=True).state_dict().items() if k.endswith("q_proj.bias")}
    with pytest.raises(NeuroAdaUsageError, match="base bias"):
        model.load_state_dict(state, strict=False)


@pytest.mark.parametrize("what", ["base weight", "adapter originals"])
def test_merge_refuses_one_offloaded_tensor_before_merging_any(what):
    from neuroada_format.runtime import merge

    model = with_deltas(tiny_llama(), k=2, target_modules=["q_proj"])
    layer = layers(model)["model.layers.1.self_attn.q_proj"]
    if what == "base weight":
        layer.base_layer.weight = nn.Parameter(torch.empty_like(layer.base_layer.weight, device="meta"),
                                               requires_grad=False)
    else:
        layer.neuroada_w0["default"] = torch.empty_like(layer.neuroada_w0["default"], device="meta")
    with pytest.raises(NeuroAdaUsageError, match="offloaded" if what == "base weight" else "meta device"):
        merge(model)
    assert not any(l.merged for l in layers(model).values())


def test_save_refuses_a_layer_whose_base_weight_alone_is_offloaded(tmp_path):
    model = with_deltas(tiny_llama(), k=2, target_modules=["q_proj"])
    layer = layers(model)["model.layers.1.self_attn.q_proj"]
    layer.base_layer.weight = nn.Parameter(torch.empty_like(layer.base_layer.weight, device="meta"),
                                           requires_grad=False)
    with pytest.raises(NeuroAdaUsageError, match="save before offloading"):
        save_adapter(model, tmp_path / "a")


def test_a_path_whose_fspath_is_bytes(tmp_path):
    class BytesPath:
        def __fspath__(self):
            return str(tmp_path / "a.safetensors").encode()

    assert save_adapter(with_deltas(tiny_llama(), k=1, target_modules=["q_proj"]), BytesPath()) == \
        str(tmp_path / "a.safetensors")


def test_train_on_grid_needs_a_path():
    from neuroada_format.runtime.quant_grid import train_on_grid

    with pytest.raises(NeuroAdaUsageError, match="train_on_grid needs a path"):
        train_on_grid(with_deltas(tiny_llama(), k=1, target_modules=["q_proj"]), None)


def test_a_folder_whose_config_names_another_seed_is_refused(tmp_path):
    import json

    model = attach(tiny_llama(), NeuroAdaConfig(k=2, target_modules=["q_proj"], selection="random", seed=7))
    save_adapter(model, tmp_path / "a")
    config = tmp_path / "a" / "neuroada_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "seed": 8}))
    with pytest.raises(NeuroAdaError, match="seed 8 against the file's 7"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_a_layer_offloaded_under_several_accelerate_hooks_is_named():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = tiny_llama()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    q_proj = model.model.layers[0].self_attn.q_proj
    add_hook_to_module(q_proj, ModelHook(), append=True)  # now a SequentialHook holding the offload hook
    assert type(q_proj._hf_hook).__name__ == "SequentialHook"
    with pytest.raises(NeuroAdaError, match="offloaded by accelerate"):
        attach(model, NeuroAdaConfig(k=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("what", ["fifo", "folder"])
def test_a_folder_save_whose_config_cannot_be_replaced_changes_nothing(tmp_path, what):
    """A FIFO (or a folder) where the config goes was refused only at its rename, after the new weights had replaced
    the old ones: a pair load_adapter refuses."""
    import os

    from neuroada_format import NeuroAdaUsageError

    save_adapter(with_deltas(tiny_llama(), k=2, target_modules="all-linear"), tmp_path / "task")
    config = tmp_path / "task" / "neuroada_config.json"
    config.unlink()
    os.mkfifo(config) if what == "fifo" else config.mkdir()
    weights = (tmp_path / "task" / "neuroada_model.safetensors").read_bytes()
    with pytest.raises(NeuroAdaUsageError, match="never replaced"):
        save_adapter(with_deltas(tiny_llama(), k=3, target_modules="all-linear"), tmp_path / "task")
    assert sorted(os.listdir(tmp_path / "task")) == ["neuroada_config.json", "neuroada_model.safetensors"]
    assert (tmp_path / "task" / "neuroada_model.safetensors").read_bytes() == weights  # (no temporary files left)


# -- unmerge / unload / merge_and_unload failing part-way: every weight's bytes as before --------------------------
def _weight_bytes(model):
    """Each parameter and buffer as raw bytes (torch.equal calls -0.0 and 0.0 equal, and NaN unequal to itself)."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {n: t.detach().cpu().contiguous().view(torch.uint8).clone() for n, t in named}


def _adapter_state(model):
    from neuroada_format.runtime.guards import CONFIGS_ATTR

    return (_weight_bytes(model), _state(model), sorted(getattr(model, CONFIGS_ATTR, {})),
            [(n, id(m)) for n, m in model.named_modules()], "save_pretrained" in model.__dict__)


def _assert_unchanged(before, model):
    now = _adapter_state(model)
    assert before[0].keys() == now[0].keys()
    changed = [n for n in before[0] if not torch.equal(before[0][n], now[0][n])]
    assert changed == []
    _assert_same(before[1], now[1])
    assert before[2:] == now[2:]


def _written_then_failed(monkeypatch, owner, name, n):
    """``owner.name`` doing its write, then raising on its n-th call (a failure found after the bytes moved)."""
    real, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            raise MemoryError("injected after the write")
        return out

    monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("served", ["merge", "set_adapter", "merge two"])
@pytest.mark.parametrize("how", ["before", "after"])
@pytest.mark.parametrize("call", ["unmerge", "unload"])
def test_unmerge_and_unload_failing_at_a_layer_put_every_layer_back(monkeypatch, tmp_path, served, how, call):
    from neuroada_format.runtime import layer as layer_module, merge, unload, unmerge

    model = _served(tmp_path)
    if served == "set_adapter":
        set_adapter(model, "b")  # served layers: unmerge makes them plain NeuroAdaLayers, active what was merged
    else:
        merge(model, ["b"] if served == "merge" else ["default", "b"])
    before, logits = _adapter_state(model), _logits(model)
    (_fail_at if how == "before" else _written_then_failed)(monkeypatch, layer_module, "unmerge_", 3)
    with pytest.raises(MemoryError):
        (unmerge if call == "unmerge" else unload)(model)
    _assert_unchanged(before, model)
    assert torch.equal(_logits(model), logits)
    monkeypatch.undo()
    (unmerge if call == "unmerge" else unload)(model)  # the retry works
    assert torch.equal(_weight_bytes(model)["model.layers.0.mlp.up_proj.base_layer.weight" if call == "unmerge" else
                                            "model.layers.0.mlp.up_proj.weight"],
                       _weight_bytes(tiny_llama())["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("call", ["unload", "merge_and_unload"])
@pytest.mark.parametrize("served", ["merge", "set_adapter", "unmerged"])
def test_unload_failing_while_putting_base_layers_in_puts_every_layer_back(monkeypatch, tmp_path, call, served):
    """The 3rd layer's replacement by its base layer raising: the two replaced before it are wrapped again, and
    merge_and_unload's merge (or unload's unmerge) undone."""
    from neuroada_format.runtime import merge, merge_and_unload, merging, unload

    model = _served(tmp_path)
    if served == "set_adapter":
        set_adapter(model, "b")
    elif served == "merge":
        merge(model, ["b"])
    before, logits = _adapter_state(model), _logits(model)
    _fail_at(monkeypatch, merging, "_set_module", 3, exc=RuntimeError)
    with pytest.raises(RuntimeError, match="injected"):
        (unload if call == "unload" else merge_and_unload)(model)
    _assert_unchanged(before, model)
    assert torch.equal(_logits(model), logits)
    monkeypatch.undo()
    (unload if call == "unload" else merge_and_unload)(model)
    assert not layers(model)


def test_merge_and_unload_failing_in_its_merge_puts_every_layer_back(monkeypatch, tmp_path):
    from neuroada_format.runtime import layer as layer_module, merge_and_unload

    model = _served(tmp_path)
    set_adapter(model, "b")
    before = _adapter_state(model)
    _written_then_failed(monkeypatch, layer_module, "merge_", 3)
    with pytest.raises(MemoryError):
        merge_and_unload(model, ["default"])
    _assert_unchanged(before, model)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("to", ["c", None, "default"])
def test_set_adapter_failing_after_a_write_puts_every_weight_back_bit_for_bit(monkeypatch, tmp_path, to, n):
    """A switch's n-th write (restoring the old adapter's entries, or writing the new one's) raising after it wrote."""
    from neuroada_format.runtime import multi

    model = _served(tmp_path)
    set_adapter(model, "b")
    before, logits = _adapter_state(model), _logits(model)
    _written_then_failed(monkeypatch, multi.kernels, "put_", n)
    with pytest.raises(MemoryError):
        set_adapter(model, to)
    _assert_unchanged(before, model)
    assert torch.equal(_logits(model), logits)


@pytest.mark.parametrize("served", ["merge", "merge two"])
def test_an_unmerge_whose_rollback_fails_too_leaves_each_layer_as_it_says(monkeypatch, tmp_path, served):
    """The 3rd layer's unmerge failing after its write, and the re-merge that undoes it failing as well (out of memory
    twice): that layer kept merged_adapters ['b'] over its restored base weight, so it served without b's deltas
    (logits off by 0.1) and the model-level rollback, seeing nothing to do, left it so. Now each layer's weight is what
    its merged_adapters says, and the model serves what it did."""
    from neuroada_format.runtime import layer as layer_module, merge, unmerge

    names = ["b"] if served == "merge" else ["default", "b"]
    model, reference = _served(tmp_path), _served(tmp_path)
    merge(model, names)
    merge(reference, names)
    base, logits = _weight_bytes(tiny_llama()), _logits(model)
    _written_then_failed(monkeypatch, layer_module, "unmerge_", 3)
    _fail_at(monkeypatch, layer_module, "merge_", 1)
    with pytest.raises(MemoryError) as raised:
        unmerge(model)
    monkeypatch.undo()
    merged = _weight_bytes(reference)
    for name, layer in layers(model).items():
        key = name + ".base_layer.weight"
        bits = _weight_bytes(model)[key]
        assert torch.equal(bits, merged[key] if layer.merged_adapters else base[name + ".weight"]), name
    assert torch.allclose(_logits(model), logits, atol=1e-5)
    assert "injected after the write" in str(raised.value)  # the first failure is the one reported


def test_save_pretrained_of_a_temporary_model_says_so(tmp_path):
    """The method holds its model weakly: on a model that only the expression held (freed once the method was looked
    up) it raised AttributeError: 'NoneType' object has no attribute 'named_modules'."""
    with pytest.raises(NeuroAdaUsageError, match="save_pretrained: its model no longer exists"):
        with_deltas(tiny_llama(), k=1, target_modules=["q_proj"]).save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("merged", [[], ["b"]])
def test_a_merge_whose_rollback_fails_too_leaves_each_layer_as_it_says(monkeypatch, tmp_path, merged):
    """The 3rd layer's merge failing after its write, and the unmerge undoing it failing as well: that layer said
    unmerged (or b alone) over a partly merged weight, and served wrong values without a word (logits off by 0.09).
    Now every layer's weight is what its merged_adapters says, bit for bit."""
    from neuroada_format.runtime import layer as layer_module, merge

    model = _served(tmp_path)
    merge(model, merged)
    _written_then_failed(monkeypatch, layer_module, "merge_", 3)
    _fail_at(monkeypatch, layer_module, "unmerge_", 3 if merged else 1)
    with pytest.raises(MemoryError) as raised:
        merge(model, ["default"])
    monkeypatch.undo()
    reference = _served(tmp_path)
    for name, layer in layers(reference).items():
        layer.merge(layers(model)[name].merged_adapters)  # (the same bits in one step as in several)
    want, now = _weight_bytes(reference), _weight_bytes(model)
    assert [n for n in want if not torch.equal(want[n], now[n])] == []
    assert torch.equal(_logits(model), _logits(reference))
    assert "injected after the write" in str(raised.value)  # the first failure is the one reported


@pytest.mark.parametrize("method", ["set_adapter", "delete_adapter", "active_adapters", "disable_adapters"])
def test_a_peft_integration_method_of_a_temporary_model_says_so(method):
    """transformers' PEFT-integration methods on a temporary attached model (``attach(load(...), cfg).delete_adapter``)
    raised AttributeError: '_HfPeftMethod' object has no attribute '__name__', from the message meant to explain."""
    with pytest.raises(NeuroAdaUsageError, match=f"^{method}: its model no longer exists"):
        getattr(with_deltas(tiny_llama(), k=1, target_modules=["q_proj"]), method)("default")
