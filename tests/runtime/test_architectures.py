"""End to end on the Hugging Face architectures users fine-tune today, each as a tiny model built in-process.

Per architecture: what "all-linear" and explicit target lists adapt (against PEFT's own choice on the same model),
training changes the loss and the deltas only, merge/unload/disable_adapter give the right outputs, save and load
(adapter file and save_pretrained's trainable state) reproduce them on a fresh model and refuse another base, and
greedy generation with the KV cache matches the merged model's. Also: gradient checkpointing, bf16 bases,
adapter_batch generation, Seq2SeqTrainer resume, the checkpoint merge (neuroada-merge's backend), the PEFT export,
the structure hash against the saved checkpoint, tied heads, and refusals of targets that are no linear layer.

Exactness: every adapted layer runs in the in-place mode (asserted), whose forward writes round(w0 + delta) into
the weight around the GEMM, i.e. the very weight merge writes; the unmerged and merged models therefore run the same
kernels on the same bits, so their outputs are compared bit for bit (tolerance 0). The base outputs inside
disable_adapter and after unload are the base's bit for bit too (the weights hold the original bits again).
"""
from __future__ import annotations

import copy
import re

import neuroada_format as naf
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from neuroada_format import NeuroAdaError, NeuroAdaUsageError  # noqa: E402
from neuroada_format.runtime import (NeuroAdaConfig, NeuroAdaLayer, adapter_batch, attach,  # noqa: E402
                                     disable_adapter, layers, load_adapter, merge_and_unload, save_adapter,
                                     set_adapter, unload)
from tiny_hf import TOKENS, tiny_bart, tiny_t5  # noqa: E402

T = transformers
VOCAB = 96
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, **TOKENS)


# name -> (builder, an explicit target_modules list, whether it is an encoder-decoder)
ARCHS = {
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**DECODER)), ["q_proj", "v_proj", "down_proj"], False),
    "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=8, **DECODER)), ["k_proj", "o_proj"], False),
    "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**DECODER)), ["q_proj", "gate_proj"], False),
    "gemma2": (lambda: T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=8, **DECODER)), ["v_proj", "up_proj"], False),
    "gemma3": (lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(head_dim=8, **DECODER)), ["q_proj", "down_proj"],
               False),
    "phi3": (lambda: T.Phi3ForCausalLM(T.Phi3Config(**DECODER)), ["qkv_proj", "gate_up_proj"], False),
    "gpt_neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, **TOKENS)), ["query_key_value", "dense_4h_to_h"], False),
    # experts held as 3D tensors (no linears: left out by all-linear, as by PEFT), saved one linear per expert
    "qwen2_moe": (lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        **DECODER)), ["q_proj", "shared_expert.up_proj"], False),
    "t5": (lambda: tiny_t5(VOCAB), ["q", "v", "wo"], True),
    "bart": (lambda: tiny_bart(VOCAB), ["q_proj", "fc1", "encoder_attn.out_proj"], True),
}
NAMES = list(ARCHS)


def build(arch, seed=0):
    torch.manual_seed(seed)
    return ARCHS[arch][0]().float().eval()


def inputs(arch, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if ARCHS[arch][2]:
        batch["labels"] = torch.randint(3, VOCAB, (2, 6), generator=g)
    else:
        batch["labels"] = ids
    return batch


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def same(a, b):
    return a.shape == b.shape and torch.equal(a, b)


def base_weights(model):
    """The frozen base tensors by their plain name (NeuroAda's own tensors left out), cloned."""
    out = {}
    for name, t in model.state_dict().items():
        if ".neuroada_" not in name:
            out[name.replace(".base_layer", "")] = t.detach().clone()
    return out


def peft_targets(model, target_modules):
    """The module names PEFT's LoRA wraps for this target_modules on a copy of the model, as layers: PEFT 0.22's
    all-linear also wraps MoE routers and fused experts by their parameters (ParamWrapper, around modules that are no
    linear layers), which NeuroAda leaves out (docs/runtime.md); those are not counted, and must be nothing else."""
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=target_modules, r=2))
    prefix = "base_model.model."
    by_parameter = getattr(peft.tuners.lora, "ParamWrapper", ())
    names = []
    for n, m in wrapped.named_modules():
        if not isinstance(m, peft.tuners.lora.LoraLayer):
            continue
        if by_parameter and isinstance(m, by_parameter):
            assert not isinstance(m.get_base_layer(), nn.Linear), n  # (a linear layer is wrapped as one)
            continue
        names.append(n[len(prefix):])
    return sorted(names)


def train(model, batch, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    return params


def trained(arch, config=None, seed=0):
    model = attach(build(arch, seed), config or NeuroAdaConfig(k=3))
    train(model, inputs(arch))
    return model


# -- 1. targets ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", NAMES)
def test_all_linear_adapts_what_peft_does(arch):
    model = build(arch)
    want = peft_targets(model, "all-linear")
    attach(model, NeuroAdaConfig(k=2))
    got = sorted(layers(model))
    assert got == want
    assert all(not n.endswith("lm_head") for n in got)  # the output head is left out, as in PEFT
    assert not isinstance(model.get_output_embeddings(), NeuroAdaLayer)
    assert {layer.mode for layer in layers(model).values()} == {"inplace"}


@pytest.mark.parametrize("arch", NAMES)
def test_explicit_target_list(arch):
    model = build(arch)
    targets = ARCHS[arch][1]
    want = peft_targets(model, targets)
    attach(model, NeuroAdaConfig(k=2, target_modules=targets))
    got = sorted(layers(model))
    assert got == want and got
    assert all(any(n == t or n.endswith("." + t) for t in targets) for n in got)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.neuroada_val.default" for n in got)
    d_out = sum(layer.d_out for layer in layers(model).values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * d_out
    regex = r".*\." + ARCHS[arch][1][0]  # a string is a regex fullmatch, in both
    want = peft_targets(build(arch), regex)
    assert sorted(layers(attach(build(arch), NeuroAdaConfig(k=2, target_modules=regex)))) == want and want


# -- 2. training ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", NAMES)
def test_training_changes_loss_and_only_deltas(arch):
    model = attach(build(arch), NeuroAdaConfig(k=3))
    batch = inputs(arch)
    before = base_weights(model)
    with torch.no_grad():
        loss0 = model(**batch).loss.item()
    params = train(model, batch)
    with torch.no_grad():
        loss1 = model(**batch).loss.item()
    assert loss1 < loss0  # AdamW on one repeated batch
    assert all(p.abs().sum() > 0 for p in params)  # every delta moved
    after = base_weights(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # the frozen base, bit for bit


@pytest.mark.parametrize("arch", NAMES)
def test_gradient_checkpointing_trains_the_same_deltas(arch):
    """Activation checkpointing recomputes each block's forward in the backward, where the in-place mode writes its
    deltas into the weights again: the deltas trained are the same as without it, bit for bit. (T5 excepted: its own
    gradients differ in the last bits under checkpointing, without any adapter (max 5e-8 on this model, full
    fine-tuning), as its position bias is recomputed and summed in another order; 2 Adam steps of 1e-2 keep that far
    below 1e-6.)"""
    batch = inputs(arch)
    plain = attach(build(arch), NeuroAdaConfig(k=3))
    train(plain, batch, steps=2)
    ckpt = build(arch)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    attach(ckpt, NeuroAdaConfig(k=3))
    train(ckpt, batch, steps=2)
    tol = dict(rtol=0, atol=1e-6) if arch == "t5" else dict(rtol=0, atol=0)
    for name, layer in layers(plain).items():
        torch.testing.assert_close(layers(ckpt)[name].neuroada_val["default"], layer.neuroada_val["default"], **tol)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batch, n=8):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i % len(v)] for k, v in self.batch.items()}


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_trainer_resume(arch, tmp_path):
    """Seq2SeqTrainer on an encoder-decoder (task SEQ_2_SEQ_LM): a run resumed from its step-2 checkpoint onto a
    model rebuilt the same way ends with the uninterrupted run's deltas, bit for bit, and the saved folder loads."""
    def run(resume=None):
        model = attach(build(arch), NeuroAdaConfig(k=2, task_type="SEQ_2_SEQ_LM"))
        args = T.Seq2SeqTrainingArguments(str(tmp_path / "run"), max_steps=4, save_steps=2, learning_rate=1e-2,
                                          per_device_train_batch_size=2, report_to=[], use_cpu=True,
                                          disable_tqdm=True, logging_strategy="no")
        trainer = T.Seq2SeqTrainer(model=model, args=args, train_dataset=_Rows(inputs(arch)))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    trainer, whole = run()
    trainer.save_model(str(tmp_path / "final"))
    _, resumed = run(str(tmp_path / "run" / "checkpoint-2"))
    for name, layer in layers(whole).items():
        assert layer.neuroada_val["default"].abs().sum() > 0
        assert torch.equal(layer.neuroada_val["default"], layers(resumed)[name].neuroada_val["default"]), name
    served = load_adapter(build(arch), tmp_path / "final")
    assert served.neuroada_configs["default"].task_type == "SEQ_2_SEQ_LM"
    assert sorted(layers(served)) == sorted(layers(whole))


# -- 3. merge, unload, disable_adapter -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", NAMES)
def test_merge_unload_disable(arch):
    batch = inputs(arch)
    base_out = logits(build(arch), batch)
    model = trained(arch)
    adapted = logits(model, batch)
    assert not same(adapted, base_out)
    with disable_adapter(model):
        assert same(logits(model, batch), base_out)
    assert same(logits(model, batch), adapted)  # what was served before comes back

    merged = merge_and_unload(copy.deepcopy(model))
    assert not layers(merged)
    assert same(logits(merged, batch), adapted)  # in-place forward == merged weights: tolerance 0

    plain = unload(copy.deepcopy(model))
    assert not layers(plain)
    assert same(logits(plain, batch), base_out)
    fresh = build(arch).state_dict()
    assert all(torch.equal(t, fresh[k]) for k, t in plain.state_dict().items())


@pytest.mark.parametrize("arch", NAMES)
def test_bf16_base(arch):
    """A bf16 base (how these models are usually loaded): training leaves its weights bit-identical, and the in-place
    forward writes bf16(w0 + delta), which is what merge writes, so merged logits equal the adapted ones exactly."""
    batch = inputs(arch)
    model = attach(build(arch).to(torch.bfloat16), NeuroAdaConfig(k=3))
    before = base_weights(model)
    train(model, batch, steps=2, lr=5e-2)
    assert all(torch.equal(t, before[k]) for k, t in base_weights(model).items())
    adapted = logits(model, batch)
    assert adapted.dtype == torch.bfloat16
    assert not same(adapted, logits(unload(copy.deepcopy(model)), batch))
    assert same(logits(merge_and_unload(model), batch), adapted)


# -- 4. save and load ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", NAMES)
def test_save_adapter_and_load(arch, tmp_path):
    batch = inputs(arch)
    task = "SEQ_2_SEQ_LM" if ARCHS[arch][2] else "CAUSAL_LM"
    # F32 values: the file holds the deltas exactly
    model = trained(arch, NeuroAdaConfig(k=3, save_dtype="F32", task_type=task))
    want = logits(model, batch)
    save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "a.safetensors")
    for path in (tmp_path / "a", tmp_path / "a.safetensors"):
        served = load_adapter(build(arch), path)
        assert sorted(layers(served)) == sorted(layers(model))
        if path.is_dir():  # PEFT's task_type rides along in the folder's config
            assert served.neuroada_configs["default"].task_type == task
        assert same(logits(served, batch), want)
    with pytest.raises(NeuroAdaError) as err:
        load_adapter(build(arch, seed=1), tmp_path / "a")
    assert err.value.rule == "4.3"


@pytest.mark.parametrize("arch", NAMES)
def test_save_pretrained_and_resume(arch, tmp_path):
    batch = inputs(arch)
    config = NeuroAdaConfig(k=3)
    model = trained(arch, config)
    want = logits(model, batch)
    model.save_pretrained(tmp_path / "ck")
    state = load_file(tmp_path / "ck" / "model.safetensors")
    # as Trainer resumes: the same base, attached the same way, then the trainable state (exact f32 deltas)
    resumed = attach(build(arch), NeuroAdaConfig(k=3))
    resumed.load_state_dict(state, strict=False)
    assert same(logits(resumed, batch), want)
    # the adapter in the folder (BF16 values by default) serves what the trained model gives with its deltas rounded
    served = load_adapter(build(arch), tmp_path / "ck")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p.to(torch.bfloat16).float())
    assert same(logits(served, batch), logits(model, batch))
    other = attach(build(arch, seed=1), NeuroAdaConfig(k=3))
    with pytest.raises(NeuroAdaError) as err:
        other.load_state_dict(state, strict=False)
    assert err.value.rule == "4.3"
    with pytest.raises(NeuroAdaError) as err:
        load_adapter(build(arch, seed=1), tmp_path / "ck")
    assert err.value.rule == "4.3"


# -- 5. generation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", NAMES)
def test_generate_matches_merged(arch):
    """Greedy generation with the KV cache: the tokens and every step's scores are the merged model's, bit for bit,
    and the same without the cache (so each cached step served the adapted weights); the plain base scores differ."""
    model = trained(arch)
    prompt = inputs(arch)
    kw = dict(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], max_new_tokens=5,
              min_new_tokens=5, do_sample=False, use_cache=True, return_dict_in_generate=True, output_scores=True)

    def run(m, **more):
        with torch.no_grad():
            out = m.generate(**{**kw, **more})
        return out.sequences, torch.stack(out.scores)

    tokens, scores = run(model)
    assert tokens.shape[1] == (1 if ARCHS[arch][2] else prompt["input_ids"].shape[1]) + 5
    m_tokens, m_scores = run(merge_and_unload(copy.deepcopy(model)))
    assert same(tokens, m_tokens) and same(scores, m_scores)
    u_tokens, u_scores = run(model, use_cache=False)
    assert same(tokens, u_tokens)
    torch.testing.assert_close(u_scores, scores, rtol=1e-4, atol=1e-4)  # other kernels (no cache): rounding only
    _, p_scores = run(unload(copy.deepcopy(model)))
    assert not torch.allclose(p_scores, scores)  # the adapter changes what is generated


@pytest.mark.parametrize("arch", NAMES)
def test_adapter_batch_generates_what_each_adapter_does(arch):
    """Two adapters served per sequence in one generate call (adapter_batch) give each sequence the tokens that
    adapter gives served alone (set_adapter, merged), greedy and with beams (generate repeats each input's rows:
    an encoder-decoder runs its encoder on the inputs and its decoder on the repeated rows, under the same names). The scores agree to float rounding only: the mixed batch adds
    each sequence's sparse term to the base product, set_adapter multiplies by the merged weight."""
    batch = inputs(arch)
    model = attach(build(arch), NeuroAdaConfig(k=2), "a")
    train(model, batch, steps=2)
    attach(model, NeuroAdaConfig(k=3), "b")
    train(model, batch, steps=2)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
              min_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
    beams = dict(kw, num_beams=2, num_return_sequences=2, output_scores=False)
    with torch.no_grad():
        with adapter_batch(model, ["a", "b"]):  # one name per input, also when generate expands the rows (beams)
            mixed = model.generate(**kw)
            mixed_beams = model.generate(**beams).sequences
        for row, name in enumerate(("a", "b")):
            set_adapter(model, name)
            alone = model.generate(**kw)
            assert same(mixed.sequences[row], alone.sequences[row])
            assert same(mixed_beams[2 * row:2 * row + 2], model.generate(**beams).sequences[2 * row:2 * row + 2])
            got, want = torch.stack(mixed.scores)[:, row], torch.stack(alone.scores)[:, row]
            finite = want.isfinite()  # min_new_tokens puts -inf at eos in both
            assert torch.equal(finite, got.isfinite())
            torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", NAMES)
def test_checkpoint_merge_equals_merge_and_unload(arch, tmp_path):
    """neuroada-merge's backend applies the adapter to the checkpoint save_pretrained wrote (its keys are the
    checkpoint's); the merged checkpoint, loaded with from_pretrained, gives merge_and_unload's logits bit for bit."""
    from neuroada_format.converters.backend import merge

    batch = inputs(arch)
    build(arch).save_pretrained(tmp_path / "base")
    model = trained(arch, NeuroAdaConfig(k=3, save_dtype="F32"))
    merge(tmp_path / "base", [(save_adapter(model, tmp_path / "a.safetensors"), 1.0)], tmp_path / "merged")
    loaded = type(model).from_pretrained(tmp_path / "merged").eval()
    assert same(logits(loaded, batch), logits(merge_and_unload(model), batch))


@pytest.mark.parametrize("arch", NAMES)
def test_peft_export_loads_in_stock_peft(arch, tmp_path):
    """The adapter exported for PEFT (neuroada-pack --to peft, checked against the saved checkpoint) loads with
    PeftModel.from_pretrained onto a fresh base and gives merge_and_unload's logits bit for bit (F32 base, F32
    values: PEFT's f32 add is the spec's merge rule)."""
    from neuroada_format.converters.peft_interop import to_peft

    batch = inputs(arch)
    build(arch).save_pretrained(tmp_path / "base")
    model = trained(arch, NeuroAdaConfig(k=3, save_dtype="F32"))
    to_peft(save_adapter(model, tmp_path / "a.safetensors"), tmp_path / "peft", base=tmp_path / "base")
    loaded = peft.PeftModel.from_pretrained(build(arch), tmp_path / "peft").eval()
    assert same(logits(loaded, batch), logits(merge_and_unload(model), batch))


# -- the structure hash -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", NAMES)
def test_structure_hash_is_the_saved_checkpoints(arch, tmp_path):
    """The adapter's structure hash describes the checkpoint save_pretrained writes (no warning 4.5 against it), also
    where transformers 5 saves tensors under other names than the model's (GPT-NeoX's lm_head is embed_out on disk,
    MoE experts are split per expert): it used to be the model's names, so those adapters were always warned about."""
    model = build(arch)
    model.save_pretrained(tmp_path / "base")
    attach(model, NeuroAdaConfig(k=2))
    report = naf.validate(save_adapter(model, tmp_path / "a.safetensors"), base=tmp_path / "base")
    assert report.ok and report.problems == []


def test_structure_hash_through_peft_wrapper(tmp_path):
    """The same on a PeftModel (names relative to the transformers model inside it)."""
    model = build("gpt_neox")
    model.save_pretrained(tmp_path / "base")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules=["query_key_value"], r=2))
    attach(wrapped, NeuroAdaConfig(k=2, target_modules=["dense"]))
    report = naf.validate(save_adapter(wrapped, tmp_path / "a.safetensors"), base=tmp_path / "base")
    assert report.ok and report.problems == []


# -- tied output head ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "t5", "bart"])
def test_tied_head_adapted_additively(arch):
    """Targeting a head tied to the input embeddings: the shared weight must not be written, so the layer adds its
    sparse term (additive mode), the embeddings stay the base's, and merging (which would change them) is refused."""
    model = build(arch)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    emb = model.get_input_embeddings().weight.detach().clone()
    attach(model, NeuroAdaConfig(k=2, target_modules=["lm_head"]))
    head = model.get_output_embeddings()
    assert isinstance(head, NeuroAdaLayer) and head.mode == "additive"
    batch = inputs(arch)
    train(model, batch, steps=2)
    assert head.neuroada_val["default"].abs().sum() > 0
    assert torch.equal(model.get_input_embeddings().weight, emb)
    with pytest.raises(NeuroAdaError, match="tied"):
        merge_and_unload(model)


def test_non_linear_target_refused():
    """A target that is no linear layer (Gemma's RMSNorm) is refused by name, before anything changes."""
    model = build("gemma2")
    with pytest.raises(NeuroAdaUsageError, match="input_layernorm"):
        attach(model, NeuroAdaConfig(k=2, target_modules=["input_layernorm"]))
    assert not layers(model)


@pytest.mark.parametrize("targets, named", [(["gate_up_proj"], r"names the parameter model\.layers\.0\.mlp\.experts"
                                                                r"\.gate_up_proj \(\[4, 32, 32\]\)"),
                                            (["experts"], r"model\.layers\.0\.mlp\.experts is a .*Qwen2MoeExperts")])
def test_moe_experts_refused_by_name(targets, named):
    """transformers 5 holds MoE experts as 3D parameters of one module: targeting them is refused, naming the
    parameter (it was "no module matches", as if the name were misspelt) or the module and its class."""
    model = build("qwen2_moe")
    with pytest.raises(NeuroAdaUsageError, match=named):
        attach(model, NeuroAdaConfig(k=2, target_modules=targets))
    assert not layers(model)


def test_moe_experts_beside_matching_linears_are_refused_not_dropped():
    """["q_proj", "down_proj"] on an MoE model matches the attention and the shared expert's linear, and the experts'
    3D down_proj parameter: the experts used to be dropped without a word, so a user who carried the usual list over
    believed they trained. Refused, naming the parameter and how to keep only the linears (exclude_modules)."""
    model = build("qwen2_moe")
    with pytest.raises(NeuroAdaUsageError, match=r"names the parameter model\.layers\.0\.mlp\.experts\.down_proj .*"
                                                 r"add '(.*)' to exclude_modules") as refused:
        attach(model, NeuroAdaConfig(k=2, target_modules=["q_proj", "down_proj"]))
    assert not layers(model)
    # the advice taken literally covers the experts of every layer (it named layer 0's alone, so each retry
    # moved the refusal to the next MoE layer)
    advice = re.search(r"add '(.*)' to exclude_modules", str(refused.value)).group(1)
    assert advice == "experts.down_proj"
    assert sum(".experts." in n for n, _ in model.named_parameters()) > 2  # experts in more than one layer
    with pytest.raises(NeuroAdaUsageError, match=r"names the parameter .*experts\.down_proj"):
        attach(model, NeuroAdaConfig(k=2, target_modules=r".*\.(q_proj|down_proj)"))
    attach(model, NeuroAdaConfig(k=2, target_modules=["q_proj", "down_proj"], exclude_modules=["experts.down_proj"]))
    assert sorted(n.split(".", 3)[3] for n in layers(model)) == ["mlp.shared_expert.down_proj"] * 2 + ["self_attn.q_proj"] * 2
