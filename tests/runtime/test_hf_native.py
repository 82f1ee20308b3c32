"""The Hugging Face stack as a PEFT user drives it: save_pretrained / Trainer checkpoints (killed with
SIGKILL and resumed), from_pretrained on what we write, copies and pickles at every point of training,
state_dict round trips, model.to, PEFT LoRA underneath, and one error family."""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import neuroada_format as naf
from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.runtime import (NeuroAdaConfig, NeuroAdaLayer, attach, load_adapter, load_trained_extras, merge,
                                     merge_and_unload, save_adapter, trainable_parameters, unmerge)
from neuroada_format.runtime.guards import layers, to_numpy

transformers = pytest.importorskip("transformers")

from tiny_hf import tiny_llama  # noqa: E402  (tests/tiny_hf.py)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "hf_trainer_worker.py"


def ids(seed=3):
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def train_step(model, opt, x=None):
    x = ids(5) if x is None else x
    model.train()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def bits(model):
    return {k: to_numpy(v).tobytes() for k, v in model.state_dict().items()}


# -- bug 1: save_pretrained / from_pretrained ------------------------------------------------------------
def test_save_pretrained_writes_the_adapter_and_from_pretrained_refuses(tmp_path):
    base = tiny_llama()
    model = attach(copy.deepcopy(base), NeuroAdaConfig(k=2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_step(model, opt)
    model.save_pretrained(tmp_path / "ck")
    files = sorted(os.listdir(tmp_path / "ck"))
    assert files == ["model.safetensors", "neuroada_config.json", "neuroada_model.safetensors"]
    assert "config.json" not in files and "adapter_config.json" not in files
    base_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    for f in ("model.safetensors", "neuroada_model.safetensors"):
        assert (tmp_path / "ck" / f).stat().st_size < 0.1 * base_bytes  # adapter-sized
    # from_pretrained cannot build a model from it, so nothing random is ever served: no config.json, and
    # with the base's config given, the guard tensor fails the load (not a warning and random weights).
    # (LlamaForCausalLM.from_pretrained(folder) with no config at all is not tried: transformers 5 then
    # builds a default-size 7B Llama before it reads any weight.)
    with pytest.raises(ValueError, match="config.json"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    for cls in (transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM):
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            cls.from_pretrained(tmp_path / "ck", config=base.config)
    from safetensors.torch import load_file

    with pytest.raises(RuntimeError, match="size mismatch"):  # nor does a plain model take it by accident
        copy.deepcopy(base).load_state_dict(load_file(tmp_path / "ck" / "model.safetensors"), strict=False)
    # PEFT does not take it for one of its adapters either
    peft = pytest.importorskip("peft")
    with pytest.raises(Exception) as err:
        peft.PeftConfig.from_pretrained(tmp_path / "ck")
    assert not isinstance(err.value, KeyError)
    # the adapter loads onto a fresh base and gives the same logits (exact: the trainable state is f32)
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "ck")
    torch.testing.assert_close(logits(fresh), logits(model), atol=2e-3, rtol=0)
    again = attach(copy.deepcopy(base), NeuroAdaConfig(k=2))
    missing, unexpected = again.load_state_dict(load_file(tmp_path / "ck" / "model.safetensors"), strict=True)
    assert not missing and not unexpected  # a trainable state: the base is not missing, by design
    assert torch.equal(logits(again), logits(model))


def test_transformers_peft_integration_methods_say_which_function_does_it(tmp_path):
    """A transformers model's set_adapter, active_adapters, disable_adapters, ... are its PEFT integration's: on an
    attached model they said "No adapter loaded. Please load an adapter first." (an adapter was loaded), and
    model.load_adapter(our folder) "adapter model file not found". Now each names the function to call; where PEFT
    adapters are loaded through them (a LoRA beside ours) they are transformers' own, and they leave with unload."""
    peft = pytest.importorskip("peft")
    from neuroada_format.runtime import list_adapters, merge_and_unload, save_adapter

    model = attach(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    before = logits(model)
    for call, says in [(lambda: model.set_adapter("default"), r"set_adapter\(model, name\)"),
                       (lambda: model.active_adapters(), r"list_adapters\(model\)"),
                       (lambda: model.disable_adapters(), r"`with disable_adapter\(model\):`"),
                       (lambda: model.enable_adapters(), r"`with disable_adapter\(model\):`"),
                       (lambda: model.delete_adapter("default"), r"delete_adapter\(model, name\)"),
                       (lambda: model.get_adapter_state_dict(), r"trainable_state\(model\)"),
                       (lambda: model.load_adapter(str(tmp_path / "a"), adapter_name="b"),
                        r"load_adapter\(model, path\)"),
                       (lambda: model.load_adapter(peft_model_id=tmp_path / "a" / "neuroada_model.safetensors"),
                        r"load_adapter\(model, path\)")]:
        with pytest.raises(NeuroAdaUsageError, match=r"transformers' PEFT integration, which does not see NeuroAda "
                                                     r"adapters; neuroada_format.runtime's functions do: " + says):
            call()
    assert list_adapters(model) == ["default"] and torch.equal(logits(model), before)  # nothing changed
    assert torch.equal(logits(torch.load(_saved(model), weights_only=False)), before)  # still pickles
    # a LoRA added through transformers beside ours: its methods are transformers' own again
    model.add_adapter(peft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), adapter_name="lora")
    assert model.active_adapters() == ["lora"]
    with_lora = logits(model)
    model.disable_adapters()
    assert not torch.equal(logits(model), with_lora)
    model.enable_adapters()
    assert torch.equal(logits(model), with_lora)
    # unloaded, the model is transformers' plain model again
    plain = merge_and_unload(attach(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["q_proj"])))
    with pytest.raises(ValueError, match="No adapter loaded"):
        plain.active_adapters()

    class Own(torch.nn.Module):  # a model's own method of that name is its own, not transformers' integration
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def set_adapter(self, name):
            return f"own {name}"

    own = attach(Own(), NeuroAdaConfig(k=1))
    assert own.set_adapter("x") == "own x"


def _saved(model) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return buf


def test_save_pretrained_of_several_adapters_and_a_merged_and_unloaded_model(tmp_path):
    base = tiny_llama()
    model = attach(copy.deepcopy(base), NeuroAdaConfig(k=1))
    attach(model, NeuroAdaConfig(k=2, target_modules=["q_proj"]), "math")
    model.save_pretrained(tmp_path / "two")
    assert sorted(os.listdir(tmp_path / "two" / "math")) == ["neuroada_config.json", "neuroada_model.safetensors"]
    assert naf.load(tmp_path / "two" / "math" / "neuroada_model.safetensors").targets.keys() == \
        {n + ".weight" for n, l in layers(model).items() if "math" in l.neuroada_val}
    with pytest.raises(NeuroAdaUsageError, match="push"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)
    from neuroada_format.runtime import merge_and_unload

    plain = merge_and_unload(model)
    assert "save_pretrained" not in plain.__dict__ and not plain._load_state_dict_post_hooks
    plain.save_pretrained(tmp_path / "plain")  # an ordinary transformers checkpoint again
    assert (tmp_path / "plain" / "config.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert torch.equal(logits(reloaded), logits(plain))


def test_save_pretrained_of_selected_adapters_writes_only_their_trainable_state(tmp_path):
    """selected_adapters wrote only the selected adapters' folders, but every adapter's deltas into model.safetensors.
    Now only theirs (and trained tensors that are no adapter's, such as an unfrozen head), and that state reloads,
    strict or not, leaving the other adapters as they are."""
    from safetensors.torch import load_file

    def build():
        model = attach(tiny_llama(), NeuroAdaConfig(k=1))
        attach(model, NeuroAdaConfig(k=2, target_modules=["q_proj"]), "math")
        model.lm_head.weight.requires_grad_(True)
        return model

    model = build()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers(model).values():
            for v in layer.neuroada_val.values():
                v.copy_(torch.randn(v.shape, generator=g) * 0.05)
        model.lm_head.weight.add_(0.01)
    model.save_pretrained(tmp_path / "ck", selected_adapters=["math"])
    assert sorted(os.listdir(tmp_path / "ck")) == ["math", "model.safetensors"]
    state = load_file(tmp_path / "ck" / "model.safetensors")
    adapters = {k.rsplit(".", 1)[1] for k in state if ".neuroada_" in k}
    assert adapters == {"math"} and "lm_head.weight" in state
    assert {k for k in state if ".neuroada_val." in k} == {f"{n}.neuroada_val.math" for n, layer in
                                                          layers(model).items() if "math" in layer.neuroada_val}
    for strict in (True, False):
        again = build()
        missing, unexpected = again.load_state_dict(state, strict=strict)
        assert not missing and not unexpected
        for name, layer in layers(again).items():
            assert torch.equal(layer.neuroada_val["math"], layers(model)[name].neuroada_val["math"]) \
                if "math" in layer.neuroada_val else True
            assert not layer.neuroada_val["default"].any()  # not in the state: left as it was
        assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    served = load_adapter(tiny_llama(), tmp_path / "ck" / "math", "math")  # the folder saved with it fits the state
    served.load_state_dict(state, strict=False)
    model.save_pretrained(tmp_path / "all")  # no selection: every adapter, as before
    assert {k.rsplit(".", 1)[1] for k in load_file(tmp_path / "all" / "model.safetensors") if ".neuroada_" in k} == \
        {"default", "math"}


def test_load_adapter_says_what_a_folder_holds_besides_the_adapter(tmp_path):
    """A head unfrozen next to the adapter is saved in model.safetensors; load_adapter reads the adapter only, so
    it warns, naming the tensors and the call that loads them, and that call gives the trained model back."""
    base = tiny_llama()
    model = attach(copy.deepcopy(base), NeuroAdaConfig(k=2, target_modules=["q_proj", "v_proj"]))
    model.lm_head.weight.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        train_step(model, opt)
    model.save_pretrained(tmp_path / "ck")
    served = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=r"1 trained tensor\(s\) that are not adapter deltas \(lm_head.weight\).*"
                                         r"load_trained_extras\(model, "):
        load_adapter(served, tmp_path / "ck")
    assert (logits(served) - logits(model)).abs().max() > 1e-2  # the head was not loaded
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the whole state file said its f32 deltas were converted: they were not)
        assert load_trained_extras(served, tmp_path / "ck") == ["lm_head.weight"]
    assert torch.equal(served.lm_head.weight, model.lm_head.weight)
    # the rest is the adapter as saved (BF16 values of the f32 deltas that trained)
    torch.testing.assert_close(logits(served), logits(model), rtol=0, atol=1e-3)
    # a merged model (as neuroada-merge's checkpoint loads) holds the base's head: the state file cannot go in (its
    # guard fails on purpose), the extras can
    merged = merge_and_unload(copy.deepcopy(model))
    with torch.no_grad():
        merged.lm_head.weight.copy_(base.lm_head.weight)
    from safetensors.torch import load_file

    with pytest.raises(RuntimeError, match="size mismatch"):
        merged.load_state_dict(load_file(tmp_path / "ck" / "model.safetensors"), strict=False)
    assert load_trained_extras(merged, tmp_path / "ck") == ["lm_head.weight"]
    assert torch.equal(logits(merged), logits(model))
    other = torch.nn.Module()
    other.lm_head = torch.nn.Linear(1, 1)
    with pytest.raises(NeuroAdaUsageError, match=r"model.safetensors: lm_head.weight: the model holds it as \[1, 1\]"):
        load_trained_extras(other, tmp_path / "ck")
    with pytest.raises(NeuroAdaUsageError, match=r"lm_head.weight: the model has no tensor of this name"):
        load_trained_extras(torch.nn.Linear(1, 1), tmp_path / "ck")
    plain = attach(copy.deepcopy(base), NeuroAdaConfig(k=2, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(copy.deepcopy(base), tmp_path / "plain")  # nothing else there: no warning
    # an adapter saved by name lives in a sub-folder, which the error for the parent names
    attach(plain, NeuroAdaConfig(k=1), "math")
    plain.save_pretrained(tmp_path / "named", selected_adapters=["math"])
    with pytest.raises(NeuroAdaUsageError, match="sub-folders: math"):
        load_adapter(copy.deepcopy(base), tmp_path / "named")
    load_adapter(copy.deepcopy(base), tmp_path / "named" / "math")


def test_trainable_state_from_another_base_is_refused(tmp_path):
    model = attach(tiny_llama(), NeuroAdaConfig(k=2))
    with torch.no_grad():
        for layer in layers(model).values():
            layer.neuroada_val["default"].fill_(0.01)
    other = attach(tiny_llama(seed=5), NeuroAdaConfig(k=2))
    before = bits(other)
    with pytest.raises(NeuroAdaError) as err:
        other.load_state_dict({k: v for k, v in model.state_dict().items() if ".neuroada_" in k}, strict=False)
    assert err.value.rule == "4.3" and "neuroada_w0" in err.value.tensor
    bad = {k: v for k, v in model.state_dict().items() if ".neuroada_idx." in k}
    first = sorted(bad)[0]
    bad[first] = bad[first].flip(1)  # descending rows
    with pytest.raises(NeuroAdaError, match="strictly increasing"):
        other.load_state_dict(bad, strict=False)
    assert bits(other) == before


# -- the Trainer, killed and resumed -------------------------------------------------------------------
def _run(args, **kw):
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kw)


def _losses(log, after=0):
    return [(e["step"], e[k]) for e in log["log_history"] for k in ("loss", "eval_loss") if k in e and e["step"] > after]


def test_trainer_checkpoints_kill_minus_9_and_resume_bit_for_bit(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    b.mkdir()
    straight = _run([a, "--final", tmp_path / "a-final", "--log", tmp_path / "a.json"])
    killed = _run([b, "--pause-at", 7])
    deadline = time.monotonic() + 120
    while not (b / "paused-7").exists():
        assert killed.poll() is None, killed.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached step 7"
        time.sleep(0.05)
    assert sorted(p.name for p in b.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    os.kill(killed.pid, signal.SIGKILL)  # a real kill -9 in the middle of training
    assert killed.wait(30) == -signal.SIGKILL
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out.decode()[-3000:]
    resumed = _run([b, "--resume", "--final", tmp_path / "b-final", "--log", tmp_path / "b.json"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out.decode()[-3000:]

    log_a, log_b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert len(_losses(log_a, after=6)) == 8  # six training losses and two evaluations after the resume point
    assert _losses(log_b, after=6) == _losses(log_a, after=6)  # the same losses, bit for bit
    assert _losses(log_b) == _losses(log_a)
    # the same final adapter bytes (and trainable state); the final model is the best checkpoint's
    for f in ("neuroada_model.safetensors", "model.safetensors", "neuroada_config.json"):
        assert (tmp_path / "a-final" / f).read_bytes() == (tmp_path / "b-final" / f).read_bytes(), f
    best = Path(log_a["best_model_checkpoint"])
    assert Path(log_b["best_model_checkpoint"]).name == best.name
    assert (best / "neuroada_model.safetensors").read_bytes() == \
        (tmp_path / "a-final" / "neuroada_model.safetensors").read_bytes()
    # every checkpoint holds the adapter, adapter-sized, and nothing from_pretrained could misread
    model_bytes = log_a["model_bytes"]
    for ck in [*a.glob("checkpoint-*"), *b.glob("checkpoint-*")]:
        names = set(os.listdir(ck))
        assert {"neuroada_model.safetensors", "neuroada_config.json", "model.safetensors", "optimizer.pt",
                "trainer_state.json", "rng_state.pth"} <= names
        assert not names & {"config.json", "adapter_config.json", "adapter_model.safetensors"}
        for f in ("model.safetensors", "neuroada_model.safetensors", "optimizer.pt"):
            assert (ck / f).stat().st_size < 0.1 * model_bytes, (ck, f)
        assert naf.validate(ck / "neuroada_model.safetensors").ok
    assert len(list(a.glob("checkpoint-*"))) <= 2  # save_total_limit (the best one is kept)
    sys.path.insert(0, str(HERE))
    try:
        import hf_trainer_worker
    finally:
        sys.path.remove(str(HERE))
    base = hf_trainer_worker.tiny_llama()
    final = load_adapter(copy.deepcopy(base), tmp_path / "a-final")
    with pytest.raises(ValueError):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a-final")
    assert trainable_parameters(final)[0] == 0 and len(layers(final)) == 14
    x = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    exact = attach(copy.deepcopy(base), NeuroAdaConfig(k=2))
    from safetensors.torch import load_file

    exact.load_state_dict(load_file(tmp_path / "a-final" / "model.safetensors"))
    torch.testing.assert_close(logits(final, x), logits(exact, x), atol=2e-3, rtol=0)  # BF16 file vs f32 state


# -- bug 2: copies, pickles, state_dict round trips, .to at every point of training ---------------------
def _points(model, opt):
    """Yield a label at each point of a training step; the model is in that state while the caller checks."""
    yield "attached"
    x = ids(5)
    model.train()
    loss = model(input_ids=x, labels=x).loss
    yield "after-forward"  # a graph is alive and holds references to the layers
    loss.backward()
    model.eval()
    yield "after-backward"  # gradients on the deltas, the CSR caches built
    opt.step()
    yield "after-step"
    merge(model)
    yield "merged"
    unmerge(model)
    yield "unmerged"


@pytest.mark.parametrize("mode", ["inplace", "additive"])
def test_deepcopy_after_backward(mode):
    """The bug as a user met it: a CSR cached on the pattern made deepcopy raise after any backward."""
    model = attach(tiny_llama(), NeuroAdaConfig(k=2, mode=mode))
    x = ids(5)
    model(input_ids=x, labels=x).loss.backward()
    c = copy.deepcopy(model)  # NotImplementedError: Cannot access storage of SparseCsrTensorImpl (before)
    assert all(not l._patterns and not l._overlays for l in layers(c).values())  # caches are not copied
    assert torch.equal(logits(c), logits(model))
    import pickle

    assert torch.equal(logits(pickle.loads(pickle.dumps(model))), logits(model))


@pytest.mark.parametrize("mode", ["inplace", "additive"])
def test_copies_pickles_and_state_round_trips_at_every_point(tmp_path, mode):
    base = tiny_llama()
    model = attach(copy.deepcopy(base), NeuroAdaConfig(k=2, mode=mode))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen = []
    for point in _points(model, opt):
        seen.append(point)
        want = logits(model)
        c = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        p = torch.load(buf, weights_only=False)
        for other in (c, p):
            assert torch.equal(logits(other), want), point
            assert [l.merged_adapters for l in layers(other).values()] == \
                [l.merged_adapters for l in layers(model).values()]
            assert "save_pretrained" in other.__dict__  # the adapter-saving override travels along
            other.save_pretrained(tmp_path / f"{point}-{id(other)}")
        # a fresh attached model takes the state dict, merged or not, and behaves the same
        fresh = attach(copy.deepcopy(base), NeuroAdaConfig(k=2, mode=mode))
        fresh.load_state_dict(model.state_dict())
        if mode == "inplace" or not any(l.merged for l in layers(model).values()):
            assert torch.equal(logits(fresh), want), point  # the in-place forward is the merged model's
        else:  # an additive forward and a merged weight round differently
            torch.testing.assert_close(logits(fresh), want, rtol=1e-5, atol=1e-5)
        assert not any(l.merged for l in layers(fresh).values())
        unmerge(fresh)
        assert {k: v for k, v in bits(fresh).items() if "neuroada_val" not in k} == \
            {k: v for k, v in bits(attach(copy.deepcopy(base), NeuroAdaConfig(k=2, mode=mode))).items()
             if "neuroada_val" not in k}  # the base (and w0) came back exactly
        # loading into itself, merged or not, changes nothing
        own = model.state_dict()
        own = {k: v.clone() for k, v in own.items()}
        if point != "after-forward":  # between forward and backward a weight must not be rewritten
            model.load_state_dict(own)
            assert torch.equal(logits(model), want), point
    assert seen == ["attached", "after-forward", "after-backward", "after-step", "merged", "unmerged"]
    # and training goes on in a copy as in the original (torch's Parameter deepcopy drops .grad: zero first)
    opt.zero_grad(set_to_none=True)
    c = copy.deepcopy(model)
    opt_c = torch.optim.AdamW([p for p in c.parameters() if p.requires_grad], lr=1e-2)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict shares same-dtype tensors)
    assert train_step(c, opt_c) == train_step(model, opt)
    assert torch.equal(logits(c), logits(model))


def test_to_dtype_keeps_working_and_unmerges_exactly():
    base = tiny_llama()
    model = attach(copy.deepcopy(base), NeuroAdaConfig(k=2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_step(model, opt)
    want = logits(model)
    model.to(torch.bfloat16)
    assert all(l.neuroada_w0["default"].dtype == torch.bfloat16 for l in layers(model).values())
    got = logits(model)
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() < 0.5
    merged_free = logits(model)
    merge(model)
    assert torch.equal(logits(model), merged_free)  # in-place forward == merged model, in bf16 too
    unmerge(model)
    ref = copy.deepcopy(base).to(torch.bfloat16)
    for name, layer in layers(model).items():
        assert torch.equal(layer.weight, ref.get_submodule(name).weight)
    model.to(torch.float32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert np.isfinite(train_step(model, opt))


# -- bug 3: PEFT LoRA underneath --------------------------------------------------------------------------
def test_attach_on_a_peft_lora_model_adapts_the_base_linears_and_keeps_lora_training(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), lora)
    lora_params = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert lora_params and all(".lora_" in n for n in lora_params)
    attach(pm, NeuroAdaConfig(k=2))  # "all-linear"
    names = sorted(layers(pm))
    assert len(names) == 14 and not [n for n in names if "lora_" in n]  # never LoRA's own layers
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in names  # the linear inside PEFT's
    assert isinstance(pm.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.base_layer"), NeuroAdaLayer)
    assert layers(pm)["base_model.model.model.layers.0.self_attn.q_proj.base_layer"].mode == "additive"
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert lora_params <= trainable  # LoRA keeps training
    assert trainable - lora_params == {n + ".neuroada_val.default" for n in names}
    x = ids(5)
    pm.train()
    pm(input_ids=x, labels=x).loss.backward()
    assert all(pm.get_parameter(n).grad is not None and pm.get_parameter(n).grad.any() for n in trainable)
    # the adapter is keyed by the plain base's names and valid against it
    path = save_adapter(pm, tmp_path / "a.safetensors")
    base_np = {k: to_numpy(v) for k, v in base.state_dict().items()}
    report = naf.validate(path, base=naf.ArrayBase(base_np), check_selection=True, strict=True)
    assert report.ok and not report.problems
    assert "model.layers.0.self_attn.q_proj.weight" in naf.load(path).targets
    # ... and loads onto a plain base or onto another LoRA model
    assert len(layers(load_adapter(copy.deepcopy(base), path))) == 14
    other = load_adapter(peft.get_peft_model(copy.deepcopy(base), lora), path)
    assert len(layers(other)) == 14
    # names are matched as PEFT matches them: "q_proj" is the linear inside PEFT's wrapper
    only_q = attach(peft.get_peft_model(copy.deepcopy(base), lora), NeuroAdaConfig(k=1, target_modules=["q_proj"]))
    assert sorted(layers(only_q)) == [f"base_model.model.model.layers.{i}.self_attn.q_proj.base_layer" for i in (0, 1)]
    # the trainable state Trainer resumes from holds LoRA too
    pm.save_pretrained(tmp_path / "ck")
    from safetensors.torch import load_file

    state = load_file(tmp_path / "ck" / "model.safetensors")
    assert lora_params <= set(state)


def test_peft_modules_to_save_keeps_training_and_its_head_is_no_target(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                  modules_to_save=["lm_head"]))
    before = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert "base_model.model.lm_head.modules_to_save.default.weight" in before
    attach(pm, NeuroAdaConfig(k=1))
    assert not [n for n in layers(pm) if "lm_head" in n]  # "all-linear" leaves the head out, copies included
    assert before <= {n for n, p in pm.named_parameters() if p.requires_grad}
    path = save_adapter(pm, tmp_path / "a.safetensors")
    report = naf.validate(path, base=naf.ArrayBase({k: to_numpy(v) for k, v in base.state_dict().items()}))
    assert report.ok and not report.problems  # structure hash of the plain base (no 4.5 warning)


def test_attach_on_lora_injected_into_a_plain_model():
    """peft.inject_adapter_in_model (what transformers' model.add_adapter does): LoRA inside a plain model."""
    peft = pytest.importorskip("peft")
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["q_proj"]), tiny_llama())
    lora_params = {n for n, p in model.named_parameters() if p.requires_grad}
    attach(model, NeuroAdaConfig(k=1))
    assert not [n for n in layers(model) if "lora_" in n] and len(layers(model)) == 14
    assert lora_params <= {n for n, p in model.named_parameters() if p.requires_grad}


# -- bug 6: Trainer(bf16=True) leaves autocast on the model's forward --------------------------------------
def test_bf16_trainer_autocast_is_visible_and_removable(tmp_path):
    """accelerate wraps model.forward in autocast for mixed precision and leaves it there after
    training (PEFT models get the same). In-process logits are then bf16-autocast logits; removing the
    wrapper (accelerate's extract_model_from_parallel(keep_fp32_wrapper=False), or reloading) gives the
    plain f32 ones. Documented in docs/trainer.md; here: the saved adapter is the same either way."""
    base = tiny_llama()
    model = attach(copy.deepcopy(base), NeuroAdaConfig(k=2))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 100, (8,), generator=g) for _ in range(8)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          bf16=True, disable_tqdm=True, logging_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    wrapped = logits(model)
    from accelerate.utils import extract_model_from_parallel

    plain = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    assert plain is model
    unwrapped = logits(model)
    assert not torch.equal(wrapped, unwrapped)  # autocast was on before
    trainer.save_model(tmp_path / "final")
    fresh = attach(copy.deepcopy(base), NeuroAdaConfig(k=2))
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(tmp_path / "final" / "model.safetensors"))
    assert torch.equal(logits(fresh), unwrapped)  # a reload equals the model without the wrapper


# -- bug 7: one error family --------------------------------------------------------------------------------
def test_runtime_errors_are_ours():
    from neuroada_format.runtime.kernels import Pattern
    from neuroada_format.runtime.selection import select, topk_columns

    layer = NeuroAdaLayer(torch.nn.Linear(8, 4))
    layer.add_adapter("a", torch.tensor([[0, 1]] * 4))
    cases = [
        lambda: NeuroAdaLayer(torch.nn.Conv2d(2, 2, 1)),
        lambda: layer.set_mode("sideways"),
        lambda: layer.add_adapter("a", torch.tensor([[0, 1]] * 4)),
        lambda: layer.add_adapter("b", torch.tensor([[1, 0]] * 4)),
        lambda: layer.add_adapter("c", torch.tensor([[0, 9]] * 4)),
        lambda: layer.add_adapter("d", torch.tensor([[0, 1]] * 3)),
        lambda: layer.set_adapter("nope"),
        lambda: layer.merge(["nope"]),
        lambda: Pattern(torch.tensor([[0, 1]], dtype=torch.int32), 4),
        lambda: topk_columns(torch.zeros(2, 3), 4),
        lambda: select(torch.zeros(2, 3), 1, "loudest"),
        lambda: attach(tiny_llama(), NeuroAdaConfig(k=1, target_modules=["mlp"])),
        lambda: NeuroAdaConfig(k=0),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(NeuroAdaError) as err:
            case()
        assert type(err.value).__module__ == "neuroada_format.errors", i
    layer.merge(["a"])
    with pytest.raises(NeuroAdaUsageError, match="unmerge"):
        layer.delete_adapter("a")


def test_trainer_resume_into_a_model_attached_otherwise_is_refused(tmp_path):
    """Trainer resumes with load_state_dict(strict=False), where unmatched keys are only a logged warning: a model
    rebuilt with another adapter name (or narrower targets) resumed from zero deltas with the saved AdamW state
    applied to them. A trainable state that does not fit the model's adapters is now refused before anything loads;
    one rebuilt as before still resumes, and an adapter the state does not name (a server's others) is left alone."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 100, (8,), generator=g) for _ in range(8)]
    data = [{"input_ids": r, "labels": r} for r in rows]

    def trainer(model, steps):
        args = transformers.TrainingArguments(str(tmp_path / "run"), max_steps=steps, save_steps=2, learning_rate=1e-2,
                                              per_device_train_batch_size=2, report_to=[], use_cpu=True, seed=0,
                                              disable_tqdm=True)
        return transformers.Trainer(model=model, args=args, train_dataset=data)

    trainer(attach(tiny_llama(), NeuroAdaConfig(k=2), "task"), 2).train()
    ck = tmp_path / "run" / "checkpoint-2"
    for name, cfg in (("default", NeuroAdaConfig(k=2)), ("task", NeuroAdaConfig(k=2, target_modules=["q_proj"])),
                      ("task", NeuroAdaConfig(k=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                   "up_proj", "down_proj", "lm_head"]))):
        model = attach(tiny_llama(), cfg, name)
        before = bits(model)
        with pytest.raises(NeuroAdaError, match="does not fit the model's adapters") as err:
            trainer(model, 3).train(resume_from_checkpoint=str(ck))
        assert "nothing was loaded" in str(err.value)
        assert bits(model) == before
    model = attach(tiny_llama(), NeuroAdaConfig(k=2), "task")
    attach(model, NeuroAdaConfig(k=1, target_modules=["q_proj"]), "other")  # not in the state: left alone
    from safetensors.torch import load_file

    state = load_file(ck / "model.safetensors")
    model.load_state_dict(state, strict=False)
    assert all(torch.equal(layer.neuroada_val["task"], state[f"{n}.neuroada_val.task"]) for n, layer in layers(model).items()
               if "task" in layer.neuroada_val)
    resumed = attach(tiny_llama(), NeuroAdaConfig(k=2), "task")
    trainer(resumed, 3).train(resume_from_checkpoint=str(ck))
    assert all(layer.neuroada_val["task"].abs().sum() > 0 for layer in layers(resumed).values())


def test_resume_with_another_adapter_active_is_refused(tmp_path):
    """A checkpoint saved while 'default' trained (set_adapter back to it after attaching 'b'), resumed into a model
    rebuilt without that set_adapter ('b' active): both adapters fit the state, so it loaded, and Trainer then gave
    'default''s AdamW moments to 'b' (torch checks their count only): 'b' trained in silence, or the process crashed
    in the fused step when the two k differ. Refused before anything loads; with the same adapter active it resumes.
    Deltas of another dtype (delta_dtype changed) load with a warning."""
    from neuroada_format.runtime import set_adapter

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": r, "labels": r} for r in (torch.randint(0, 100, (8,), generator=g) for _ in range(8))]

    def build(active, k_b=2, **cfg):
        model = attach(tiny_llama(), NeuroAdaConfig(k=2, **cfg))
        attach(model, NeuroAdaConfig(k=k_b, **cfg), "b")
        if active:
            set_adapter(model, active)
        return model

    def trainer(model, steps):
        args = transformers.TrainingArguments(str(tmp_path / "run"), max_steps=steps, save_steps=2, learning_rate=1e-2,
                                              per_device_train_batch_size=2, report_to=[], use_cpu=True, seed=0,
                                              disable_tqdm=True)
        return transformers.Trainer(model=model, args=args, train_dataset=data)

    trainer(build("default"), 2).train()
    ck = tmp_path / "run" / "checkpoint-2"
    from safetensors.torch import load_file

    assert bytes(load_file(ck / "model.safetensors")["_neuroada_training"].tolist()) == b"default"
    for k_b in (2, 3):
        model = build(None, k_b)
        before = bits(model)
        with pytest.raises(NeuroAdaError, match=r"saved while adapter\(s\) default trained, and in this model b would"):
            trainer(model, 3).train(resume_from_checkpoint=str(ck))
        assert bits(model) == before
    frozen = build(None)
    frozen.requires_grad_(False)
    frozen.load_state_dict(load_file(ck / "model.safetensors"), strict=False)  # evaluation: nothing trains, loads
    resumed = build("default")
    trainer(resumed, 3).train(resume_from_checkpoint=str(ck))
    assert all(layer.neuroada_val["b"].abs().sum() == 0 for layer in layers(resumed).values())
    assert all(layer.neuroada_val["default"].abs().sum() > 0 for layer in layers(resumed).values())
    with pytest.warns(UserWarning, match=r"adapter 'default': the trainable state holds float32 deltas and this model's "
                                         r"are bfloat16 \(delta_dtype\)"):
        build("default", delta_dtype="bfloat16").load_state_dict(load_file(ck / "model.safetensors"), strict=False)


# -- the base a trainable state was trained on ---------------------------------------------------------
PROBE = "_neuroada_probe."  # neuroada_format.folder.STATE_PROBE: "_neuroada_probe.<layer>.<adapter>" in model.safetensors


def _rows(n=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": r, "labels": r} for r in (torch.randint(0, 100, (8,), generator=g) for _ in range(n))]


def _trainer(model, out, steps, **kw):
    data = _rows()
    args = transformers.TrainingArguments(str(out), max_steps=steps, save_steps=2, learning_rate=1e-2,
                                          per_device_train_batch_size=2, report_to=[], use_cpu=True, seed=0,
                                          disable_tqdm=True, eval_strategy="steps", eval_steps=2,
                                          load_best_model_at_end=True, metric_for_best_model="eval_loss",
                                          greater_is_better=False, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:2])


def _trained_state(model, path):
    """`model` with deltas off zero, saved with save_pretrained; returns model.safetensors' state."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers(model).values():
            for v in layer.neuroada_val.values():
                v.copy_(torch.randn(v.shape, generator=g) * 0.05)
    model.save_pretrained(path)
    return load_file(path / "model.safetensors")


def test_trainer_resume_onto_another_base_is_refused_and_onto_its_own_continues_exactly(tmp_path):
    """Resumed onto another base (the model name or revision changed between runs, other weights of the same
    architecture) a checkpoint loaded silently: the deltas and positions went on training on the wrong base. The
    trainable state now holds each adapter's probe hash, recomputed from the model's base at load: another base is
    refused before anything loads (other weights: other positions; a nudged revision: the same positions, other
    values), the base it trained on resumes exactly, and load_best_model_at_end reloads the best checkpoint."""
    straight = attach(tiny_llama(), NeuroAdaConfig(k=2))
    _trainer(straight, tmp_path / "a", 4).train()
    ck = tmp_path / "a" / "checkpoint-2"
    nudged = tiny_llama()
    with torch.no_grad():
        for p in nudged.parameters():
            p.mul_(0.5)  # every value differs, the magnitude order (the positions) does not
    for other in (tiny_llama(seed=5), nudged):
        model = attach(other, NeuroAdaConfig(k=2))
        before = bits(model)
        with pytest.raises(NeuroAdaError, match="the checkpoint was trained on another base model or revision: build "
                                                "the model from the base it was trained on") as err:
            _trainer(model, tmp_path / "b", 4).train(resume_from_checkpoint=str(ck))
        assert err.value.rule == "4.3" and "adapter 'default'" in str(err.value) and "nothing was loaded" in str(err.value)
        assert err.value.tensor.endswith(".weight") and "rounds" not in str(err.value)  # an F32 model: no dtype hint
        assert bits(model) == before
    assert all(torch.equal(a.neuroada_idx["default"], b.neuroada_idx["default"])
               for a, b in zip(layers(straight).values(), layers(model).values()))  # the nudged base: same positions
    resumed = attach(tiny_llama(), NeuroAdaConfig(k=2))
    trainer = _trainer(resumed, tmp_path / "b", 4)
    trainer.train(resume_from_checkpoint=str(ck))
    assert Path(trainer.state.best_model_checkpoint).name in ("checkpoint-2", "checkpoint-4")
    for name, layer in layers(resumed).items():
        assert torch.equal(layer.neuroada_val["default"], layers(straight)[name].neuroada_val["default"]), name
        assert layer.neuroada_val["default"].abs().sum() > 0


def test_the_trainable_state_records_each_adapters_probe_hash_and_no_load_reports_it(tmp_path):
    """One entry per layer and adapter saved, the probe hash the adapter file records for that target; popped by the
    load hook, so a strict load reports nothing missing or unexpected, and load_adapter does not take the entries
    for trained tensors it leaves."""
    def build():
        model = attach(tiny_llama(), NeuroAdaConfig(k=2))
        attach(model, NeuroAdaConfig(k=1, target_modules=["q_proj"]), "math")
        return model

    model = build()
    state = _trained_state(model, tmp_path / "ck")
    probes = {k: bytes(v.tolist()).decode() for k, v in state.items() if k.startswith(PROBE)}
    assert set(probes) == {f"{PROBE}{n}.{a}" for n, layer in layers(model).items() for a in layer.neuroada_idx.keys()}
    for folder, adapter in ((tmp_path / "ck", "default"), (tmp_path / "ck" / "math", "math")):
        for key, t in naf.load(folder / "neuroada_model.safetensors").targets.items():
            assert probes[f"{PROBE}{key[:-len('.weight')]}.{adapter}"] == t.probe
            assert state[f"{PROBE}{key[:-len('.weight')]}.{adapter}"].dtype == torch.uint8
    for strict in (True, False):
        again = build()
        missing, unexpected = again.load_state_dict(state, strict=strict)
        assert not missing and not unexpected
        assert all(torch.equal(layer.neuroada_val[a], layers(model)[n].neuroada_val[a])
                   for n, layer in layers(again).items() for a in layer.neuroada_val.keys())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "holds N trained tensor(s) that are not adapter deltas" would be an error
        load_adapter(tiny_llama(), tmp_path / "ck")
    model.save_pretrained(tmp_path / "math", selected_adapters=["math"])
    from safetensors.torch import load_file

    assert {k for k in load_file(tmp_path / "math" / "model.safetensors") if k.startswith(PROBE)} == \
        {k for k in probes if k.endswith(".math")}


def test_a_state_of_another_base_changes_nothing_and_one_without_probe_hashes_loads_as_before(tmp_path):
    """Refused before any tensor loads, a merged model left merged; a state without the entries (as save_pretrained
    wrote it before they existed) loads as it always did, unchecked."""
    state = _trained_state(attach(tiny_llama(), NeuroAdaConfig(k=2)), tmp_path / "ck")
    other = attach(tiny_llama(seed=5), NeuroAdaConfig(k=2))
    with torch.no_grad():
        for layer in layers(other).values():
            layer.neuroada_val["default"].fill_(0.02)
    merge(other)
    before = bits(other)
    with pytest.raises(NeuroAdaError, match="another base model or revision") as err:
        other.load_state_dict(state, strict=False)
    assert err.value.rule == "4.3"
    assert bits(other) == before and all(layer.merged for layer in layers(other).values())
    old = {k: v for k, v in state.items() if not k.startswith(PROBE)}
    assert len(old) < len(state)
    unmerge(other)
    missing, unexpected = other.load_state_dict(old, strict=True)
    assert not missing and not unexpected
    assert all(torch.equal(layer.neuroada_val["default"], state[f"{n}.neuroada_val.default"])
               for n, layer in layers(other).items())


def test_a_base_in_another_dtype_is_the_same_base_only_where_it_holds_the_same_values(tmp_path):
    """The probe hash covers the base values as the run held them (spec 14). Trained on F32 values and resumed in
    BF16, which rounds them: refused (the adapter saved later would claim the rounded base), with a hint at the dtype.
    Trained on BF16 and resumed in F32, which holds every BF16 value: the same base, it loads."""
    state = _trained_state(attach(tiny_llama(), NeuroAdaConfig(k=2)), tmp_path / "f32")
    narrow = attach(tiny_llama(dtype=torch.bfloat16), NeuroAdaConfig(k=2))
    before = bits(narrow)
    with pytest.raises(NeuroAdaError, match="another base model or revision") as err:
        narrow.load_state_dict(state, strict=False)
    assert err.value.rule == "4.3" and "whose values BF16 rounds" in str(err.value) and "load the model in that dtype" \
        in str(err.value)
    assert bits(narrow) == before
    state = _trained_state(attach(tiny_llama(dtype=torch.bfloat16), NeuroAdaConfig(k=2)), tmp_path / "bf16")
    wide = attach(tiny_llama(dtype=torch.bfloat16).float(), NeuroAdaConfig(k=2))
    missing, unexpected = wide.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    assert all(torch.equal(layer.neuroada_val["default"], state[f"{n}.neuroada_val.default"].float())
               for n, layer in layers(wide).items())


def test_a_state_naming_more_adapters_than_loaded_still_gives_the_head(tmp_path):
    """docs/trainer.md's recipe for a head unfrozen next to the adapters (load_adapter, then load_state_dict of
    model.safetensors) keeps working when the folder holds adapters the served model did not load: the state is
    refused only where it does not fit an adapter both have."""
    model = attach(tiny_llama(), NeuroAdaConfig(k=2, target_modules=["q_proj", "v_proj"]))
    attach(model, NeuroAdaConfig(k=1, target_modules=["q_proj"]), "b")
    model.lm_head.weight.requires_grad_(True)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
        for layer in layers(model).values():
            for v in layer.neuroada_val.values():
                v.fill_(0.01)
    model.save_pretrained(tmp_path / "ck")
    served = tiny_llama()
    with pytest.warns(UserWarning, match="not adapter deltas"):
        load_adapter(served, tmp_path / "ck")
    from safetensors.torch import load_file

    served.load_state_dict(load_file(tmp_path / "ck" / "model.safetensors"), strict=False)
    assert torch.equal(served.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("shard", [None, "100KB"])
def test_save_pretrained_into_the_base_models_folder_is_refused(tmp_path, shard):
    """save_pretrained writes the trainable state as model.safetensors: saved into the base model's own folder (a
    PEFT habit: PEFT writes only adapter_model.safetensors there) it replaced the base weights with an adapter-sized
    file, or shadowed a sharded base for from_pretrained. Now refused before anything is written; saving a folder
    save_pretrained wrote before (a checkpoint) again still works."""
    folder = tmp_path / "base"
    tiny_llama().save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert ("model.safetensors.index.json" in before) == bool(shard)
    model = attach(transformers.AutoModelForCausalLM.from_pretrained(folder), NeuroAdaConfig(k=2))
    with pytest.raises(NeuroAdaUsageError, match="save the adapter into another folder"):
        model.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    transformers.AutoModelForCausalLM.from_pretrained(folder)  # the base still loads
    model.save_pretrained(tmp_path / "ck")
    model.save_pretrained(tmp_path / "ck")  # its own trainable state is overwritten as before
    load_adapter(transformers.AutoModelForCausalLM.from_pretrained(folder), tmp_path / "ck")


def test_an_attached_model_is_freed_when_its_last_reference_goes(tmp_path):
    """save_pretrained and resize_token_embeddings live in the model's __dict__; as partials of the model they made a
    reference cycle, and a deleted model (its weights: GPU memory on a server) lived until the cyclic collector ran.
    They hold the model weakly now; a deep copy's and an unpickled model's methods are their own."""
    import gc
    import io
    import weakref

    gc.disable()
    try:
        model = attach(tiny_llama(), NeuroAdaConfig(k=2))
        gone = weakref.ref(model)
        weight = weakref.ref(layers(model)["model.layers.0.mlp.up_proj"].base_layer.weight)
        del model
        assert gone() is None and weight() is None
    finally:
        gc.enable()
    model = attach(tiny_llama(), NeuroAdaConfig(k=2))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer in layers(twin).values():
            layer.neuroada_val["default"].fill_(0.25)
    twin.save_pretrained(tmp_path / "twin")
    assert all((naf.load(tmp_path / "twin" / "neuroada_model.safetensors").targets[k].values == 0.25).all()
               for k in naf.load(tmp_path / "twin" / "neuroada_model.safetensors").targets)
    buffer = io.BytesIO()
    torch.save(twin, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert again.save_pretrained.model() is again and twin.save_pretrained.model() is twin
    assert model.save_pretrained.model() is model
