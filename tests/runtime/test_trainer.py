"""Training the deltas: a plain loop and transformers.Trainer, with and without gradient checkpointing,
across base dtypes, delta dtypes and autocast; reproducible, base weights untouched, merge == forward."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import neuroada_format as naf
from neuroada_format.runtime import NeuroAdaConfig, attach, merge, save_adapter, unmerge
from neuroada_format.runtime.guards import layers, to_numpy

transformers = pytest.importorskip("transformers")


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def tiny_llama(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=100)
    cfg.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(dtype)


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (2, 8), generator=g) for _ in range(n)]


def deltas(model):
    return {n: l.neuroada_val["default"].detach().clone() for n, l in layers(model).items()}


def base_bits(model):
    return {k.replace(".base_layer", ""): to_numpy(v).tobytes() for k, v in model.state_dict().items()
            if ".neuroada_" not in k}


def train(model, *, steps=4, lr=1e-2, autocast=False, checkpointing=None):
    """A plain loop: AdamW on the trainable parameters, one fixed batch per step. Returns the losses."""
    if checkpointing is not None:
        model.gradient_checkpointing_enable(**checkpointing)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    losses = []
    for ids in batches(1) * steps:  # one batch, so the loss must go down
        with ctx:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n


CASES = [(b, d, ac) for b in ("f32", "bf16", "f16") for d in ("float32", "bfloat16") for ac in (False, True)]


@pytest.mark.parametrize("base_dtype,delta_dtype,autocast", CASES,
                         ids=[f"{b}-{d}-{'autocast' if a else 'plain'}" for b, d, a in CASES])
def test_plain_loop(base_dtype, delta_dtype, autocast):
    base = tiny_llama(DTYPES[base_dtype])
    original = base_bits(base)
    cfg = NeuroAdaConfig(k=2, delta_dtype=delta_dtype)
    runs = []
    for checkpointing in (None, None, {}):
        model = attach(copy.deepcopy(base), cfg)
        losses = train(model, autocast=autocast, checkpointing=checkpointing)
        runs.append((model, losses, deltas(model)))
    (model, losses, d), (_, losses2, d2), (_, losses_ck, d_ck) = runs
    assert losses == losses2 and losses == losses_ck
    assert_same(d, d2)    # reproducible
    assert_same(d, d_ck)  # gradient checkpointing changes nothing
    assert all(v.dtype == getattr(torch, delta_dtype) and torch.isfinite(v).all() and v.any() for v in d.values())
    assert losses[-1] < losses[0]
    assert base_bits(model) == original  # training never wrote the base weights
    # the merged model is the trained forward, bit for bit (also under autocast)
    x = batches(1, seed=9)[0]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        trained = model(x).logits
        merge(model)
        merged = model(x).logits
        unmerge(model)
    assert torch.equal(trained, merged)
    assert base_bits(model) == original


def test_reentrant_checkpointing_gives_the_same_deltas():
    base = tiny_llama()
    cfg = NeuroAdaConfig(k=2)
    plain = attach(copy.deepcopy(base), cfg)
    train(plain)
    ck = attach(copy.deepcopy(base), cfg)
    train(ck, checkpointing={"gradient_checkpointing_kwargs": {"use_reentrant": True}})
    assert_same(deltas(plain), deltas(ck))


def test_seed_decides_the_run():
    base = tiny_llama()
    a, b = (attach(copy.deepcopy(base), NeuroAdaConfig(k=2, selection="random", seed=s)) for s in (1, 2))
    train(a)
    train(b)
    assert any(not torch.equal(x, y) for x, y in zip(deltas(a).values(), deltas(b).values()))


@pytest.mark.parametrize("how", ["forced", "tied-head"])
def test_additive_mode_trains(how):
    if how == "forced":
        base, cfg = tiny_llama(), NeuroAdaConfig(k=2, mode="additive")
    else:
        base, cfg = tiny_llama(tie_word_embeddings=True), NeuroAdaConfig(k=2, target_modules=["lm_head", "q_proj"])
    original = base_bits(base)
    model = attach(copy.deepcopy(base), cfg)
    assert layers(model)["lm_head" if how == "tied-head" else "model.layers.0.mlp.up_proj"].mode == "additive"
    losses = train(model)
    again = attach(copy.deepcopy(base), cfg)
    assert train(again) == losses
    assert_same(deltas(model), deltas(again))
    assert losses[-1] < losses[0] and all(v.any() for v in deltas(model).values())
    assert base_bits(model) == original
    if how == "forced":
        x = batches(1, seed=9)[0]
        with torch.no_grad():
            trained = model(x).logits
            merge(model)
            merged = model(x).logits
            unmerge(model)
        torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)
        assert base_bits(model) == original


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def hf_train(base, tmp_path, checkpointing):
    model = attach(copy.deepcopy(base), NeuroAdaConfig(k=2))
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(8):
        ids = torch.randint(0, 100, (8,), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"out-{checkpointing}"), max_steps=3, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
        data_seed=0, gradient_checkpointing=checkpointing, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ListDataset(data))
    trainer.train()
    assert trainer.state.global_step == 3
    assert model.is_gradient_checkpointing == checkpointing
    return model


def test_transformers_trainer(tmp_path):
    base = tiny_llama()
    original = base_bits(base)
    plain = hf_train(base, tmp_path, False)
    ck = hf_train(base, tmp_path, True)
    assert_same(deltas(plain), deltas(ck))
    assert all(v.any() for v in deltas(plain).values())
    assert base_bits(plain) == original
    path = save_adapter(plain, tmp_path / "trained.safetensors")
    base_np = {k: to_numpy(v) for k, v in base.state_dict().items()}
    naf.validate(path, base=naf.ArrayBase(base_np), check_selection=True, strict=True)


def _padded(batch):
    """An SFT-style collator: right padding, labels -100 on the padding."""
    width = max(len(item["input_ids"]) for item in batch)
    out = {"input_ids": torch.zeros(len(batch), width, dtype=torch.long),
           "attention_mask": torch.zeros(len(batch), width, dtype=torch.long),
           "labels": torch.full((len(batch), width), -100)}
    for i, item in enumerate(batch):
        n = len(item["input_ids"])
        out["input_ids"][i, :n], out["attention_mask"][i, :n], out["labels"][i, :n] = item["input_ids"], 1, item["labels"]
    return out


def test_the_trainer_options_a_peft_user_sets(tmp_path):
    """The options of a PEFT user's TrainingArguments, at once: gradient accumulation, label smoothing, NEFTune,
    length-grouped batches of a padding collator, non-reentrant checkpointing, checkpoints of the model only kept two
    at a time, and the best of them (by eval_loss) loaded at the end. The deltas train, the base stays bit for bit, the
    best checkpoint's deltas are what the model holds after training, and merge_and_unload -> save_pretrained ->
    from_pretrained is the trained model's forward, bit for bit."""
    from safetensors.torch import load_file

    from neuroada_format.runtime import merge_and_unload

    base = tiny_llama()
    original = base_bits(base)
    model = attach(copy.deepcopy(base).eval(), NeuroAdaConfig(k=2))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 100, (int(n),), generator=g) for n in torch.randint(4, 12, (24,), generator=g)]
    data = ListDataset([{"input_ids": r, "labels": r} for r in rows])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, label_smoothing_factor=0.1, neftune_noise_alpha=5.0,
        train_sampling_strategy="group_by_length", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, eval_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2, save_total_limit=2, save_only_model=True, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=True,  # the worst: an earlier checkpoint, so its load shows
        report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        logging_strategy="no", dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=ListDataset(data.items[:6]),
                                   data_collator=_padded)
    trainer.train()
    assert trainer.state.global_step == 6
    assert all(v.any() for v in deltas(model).values()) and base_bits(model) == original
    kept = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint-"))
    assert len(kept) == 2 and trainer.state.best_model_checkpoint
    best = load_file(f"{trainer.state.best_model_checkpoint}/model.safetensors")
    assert not trainer.state.best_model_checkpoint.endswith("-6")  # (the last one would prove nothing)
    assert f"checkpoint-{trainer.state.best_global_step}" in kept
    for name, v in deltas(model).items():
        assert torch.equal(best[f"{name}.neuroada_val.default"], v)
    model.eval()
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        trained = model(x).logits
    merge_and_unload(model).save_pretrained(tmp_path / "merged")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(back(x).logits, trained)
