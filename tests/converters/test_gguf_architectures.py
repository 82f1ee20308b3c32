"""GGUF bases of every architecture whose Hugging Face keys we map, end to end through transformers.

For each architecture a tiny model is built from its transformers config and written to GGUF the way
llama.cpp's converter writes that architecture (conversion/*.py in llama.cpp: gguf-py's name table; q/k rows
permuted for rope only for `llama`, which is also how Mistral checkpoints are written; Gemma's norm weights plus
one and no output head; Phi-3's fused qkv_proj and gate_up_proj kept fused; Bloom's and Falcon's fused
query_key_value rows regrouped as all queries, then keys, then values). transformers' GGUF loader, an independent
reader, must read each file back as the model it came from (for the one file it cannot read, Falcon's new decoder
architecture, a reader of the test's own, checked against transformers' Falcon attention). Then the user's path: the
model loaded from the GGUF, NeuroAda attached to every linear layer and trained deltas saved, `neuroada-merge` into
the GGUF; transformers reads the merged file as the runtime's merged model.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as QT, quants  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format import NeuroAdaError  # noqa: E402
from neuroada_format.converters import gguf_merge as gm  # noqa: E402
from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.converters import gguf_read as gr  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402
from neuroada_format.runtime import NeuroAdaConfig, attach, merge_and_unload, save_adapter  # noqa: E402

from test_gguf import HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, add_tiny_hparams, llama_cpp_permute  # noqa: E402

INTER = 96  # test_gguf's 256 would make Phi-3's fused gate_up 512 rows: no need here
IDS = [[1, 5, 9, 3, 7, 11, 2, 40, 33, 8, 8, 60], [4, 4, 19, 27, 50, 3, 1, 9, 13, 62, 7, 5]]


def _common(**kw):
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)


# GGUF architecture -> (transformers model, config); head_dim is what transformers' loader assumes for the
# architecture (it reads key_length only for Gemma), so the file and the model it reads back agree
CASES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_common(tie_word_embeddings=False))),
    "mistral-as-llama": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**_common(tie_word_embeddings=False, head_dim=HIDDEN // HEADS))),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_common(tie_word_embeddings=False))),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**_common(tie_word_embeddings=False, head_dim=128))),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**_common(head_dim=16))),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**_common(head_dim=16, sliding_window=32))),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**_common(head_dim=16, sliding_window=32))),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**_common(tie_word_embeddings=False))),
    # MoE: the experts are 3-D parameters, no linear layers (NeuroAda adapts the attention and the shared expert);
    # the expert sizes are transformers' defaults, which its GGUF loader assumes (it reads no expert length), and
    # Qwen3-MoE's loader normalizes the top-k weights as llama.cpp does
    "qwen2moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **_common(tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2))),
    "qwen3moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **_common(tie_word_embeddings=False, head_dim=128, num_experts=4, num_experts_per_tok=2,
                  norm_topk_prob=True))),
    "stablelm": lambda: transformers.StableLmForCausalLM(transformers.StableLmConfig(
        **_common(tie_word_embeddings=False))),
    "nemotron": lambda: transformers.NemotronForCausalLM(transformers.NemotronConfig(
        **_common(tie_word_embeddings=False, norm_eps=1e-6))),  # (its loader reads the eps into norm_eps)
    "starcoder2": lambda: transformers.Starcoder2ForCausalLM(transformers.Starcoder2Config(
        **_common(tie_word_embeddings=False, use_bias=True))),
    # Conv1D weights ([d_in, d_out] in the checkpoint, transposed by llama.cpp); transformers' loader reads no
    # position count or inner size, so those are GPT2Config's defaults
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, bos_token_id=1, eos_token_id=2)),
    # fused query_key_value, per head [q, k, v] in the checkpoint; biases on every linear; tied head
    "bloom": lambda: transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, bos_token_id=1, eos_token_id=2)),
    # Falcon-7B's layout: multi-query (one key/value head after all the query heads); no biases, tied head
    "falcon": lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        bos_token_id=1, eos_token_id=2)),
    # Falcon-40B/180B's layout: new decoder architecture, KV_HEADS groups of (HEADS / KV_HEADS queries, key, value)
    "falcon-new": lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_kv_heads=KV_HEADS, new_decoder_architecture=True, bos_token_id=1, eos_token_id=2)),
}
# gemma (1): llama.cpp writes it and we map it, but transformers' GGUF loader has no gemma (only gemma2+); nor does it
# read Falcon's new decoder architecture (it has no Falcon tensor processor and builds every Falcon file as Falcon-7B's
# multi-query layout), so that file is read by `read_falcon`, which test_falcon_new_decoder_file_* checks
READ_BY_TRANSFORMERS = [c for c in CASES if c not in ("gemma", "falcon-new")]
OWN_READER = ("falcon-new",)
READ_BACK = READ_BY_TRANSFORMERS + list(OWN_READER)


def gguf_arch(case: str) -> str:
    return {"mistral-as-llama": "llama", "falcon-new": "falcon"}.get(case, case)


def kv_groups(model) -> int:
    """The key/value groups of a Bloom or Falcon query_key_value, as llama.cpp's converter views it: Bloom's converter
    uses one per head; Falcon's reads num_kv_heads (or n_head_kv) from config.json, else 1, which for Falcon-7B's
    config.json (multi-query, no num_kv_heads) is 1 and for Falcon-40B's its num_kv_heads: the model's own count."""
    cfg = model.config
    return cfg.n_head if cfg.model_type == "bloom" else cfg.num_key_value_heads


def llama_cpp_regroup_qkv(a, n_head, n_kv):
    """llama.cpp's BloomModel / FalconModel.modify_tensors, written out independently of gm: the fused rows viewed as
    [n_kv, n_head / n_kv + 2, head_dim, ...], stored as every query head, then the key heads, then the value heads."""
    v = a.reshape(n_kv, n_head // n_kv + 2, -1, *a.shape[1:])
    rest = a.shape[1:]
    return np.concatenate([v[:, :-2].reshape(-1, *rest), v[:, -2].reshape(-1, *rest), v[:, -1].reshape(-1, *rest)])


def build(case: str, seed: int = 0):
    torch.manual_seed(seed)
    return CASES[case]().float().eval()


def write_like_llama_cpp(path, case: str, model, matrix_type=QT.Q8_0):
    """The model as llama.cpp's converter writes it: 2-D weights but the embedding as matrix_type, the rest F32."""
    arch = gguf_arch(case)
    cfg = model.config
    tmap = gguf.TensorNameMap(getattr(gguf.MODEL_ARCH, arch.upper()), LAYERS)
    w = gguf.GGUFWriter(os.fspath(path), arch)
    fused = arch in ("bloom", "falcon")  # their ffn is 4 * hidden; head_count_kv as the converter writes it
    four_wide = fused or arch == "gpt2"  # (GPT-2's converter writes 4 * n_embd, its inner size, and its n_ctx)
    kv_heads = kv_groups(model) if fused else HEADS if arch == "gpt2" else KV_HEADS  # (GPT-2: no grouped heads)
    add_tiny_hparams(w, inter=4 * HIDDEN if four_wide else INTER, kv_heads=kv_heads,
                     rope_base=float(getattr(cfg, "rope_theta", None) or 10000.0),
                     context=cfg.n_positions if arch == "gpt2" else 64)
    if (head_dim := cfg.to_dict().get("head_dim")) is not None:  # TextModel writes a config.json's head_dim
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch.startswith("gemma"):
        w.add_sliding_window(getattr(cfg, "sliding_window", None) or 32)
    if arch.endswith("moe"):
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch in ("stablelm", "nemotron"):  # their converters write the partial rope's width
        w.add_rope_dimension_count(int(cfg.rope_parameters["partial_rotary_factor"] * (HIDDEN // HEADS)))
    if arch == "nemotron":  # (besides the RMS key, which transformers' loader reads into norm_eps)
        w.add_layer_norm_eps(cfg.norm_eps)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    if arch == "starcoder2":
        w.add_layer_norm_eps(cfg.norm_epsilon)
    if arch == "stablelm":
        w.add_layer_norm_eps(cfg.layer_norm_eps)
    if arch in ("bloom", "falcon"):
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_pad_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and tied and arch != "gpt2":
            continue  # llama.cpp writes a tied head once, as token_embd (GPT-2's as output too)
        a = t.detach().numpy().astype(np.float32)
        if key.endswith("mlp.experts.gate_up_proj"):  # llama.cpp splits the fused experts: gate, then up
            half, blk = a.shape[1] // 2, key.split(".")[2]
            w.add_tensor(f"blk.{blk}.ffn_gate_exps.weight", np.ascontiguousarray(a[:, :half]))
            w.add_tensor(f"blk.{blk}.ffn_up_exps.weight", np.ascontiguousarray(a[:, half:]))
            continue
        if key.endswith("mlp.experts.down_proj"):
            key += ".weight"  # (a 3-D parameter without the suffix; llama.cpp's name has it, as the split ones')
        if arch == "bloom":
            key = key.removeprefix("transformer.")  # Bloom's converter drops it before the table lookup
        g = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        assert g is not None, key
        if fused and "query_key_value" in key:
            a = llama_cpp_regroup_qkv(a, HEADS, kv_groups(model))
        if g.endswith("ffn_gate_inp_shexp.weight"):
            a = a.reshape(-1)  # Qwen2-MoE's [1, hidden] shared-expert gate, stored as one row (transformers reads it so)
        if arch == "gpt2" and a.ndim == 2 and key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            a = np.ascontiguousarray(a.T)  # Conv1D [d_in, d_out] stored as [d_out, d_in]
        if arch == "llama" and key.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, HEADS, HEADS)
        elif arch == "llama" and key.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, HEADS, KV_HEADS)
        if (arch.startswith("gemma") or arch == "nemotron") and key.endswith("norm.weight"):
            a = a + 1  # llama.cpp stores Gemma's (1 + w) norm scale, and Nemotron's (LayerNorm1P)
        add_like_llama_cpp(w, g, a, key, matrix_type)
    return finish(w, path)


def add_like_llama_cpp(w, name: str, a: np.ndarray, key: str, matrix_type) -> None:
    """One tensor as llama.cpp's converter writes it at a file type: the 2-D weights but embeddings in matrix_type
    (encoded by gguf-py), the rest F32."""
    if a.ndim == 2 and "embed" not in key and matrix_type != QT.F32:
        q = quants.quantize(a, matrix_type)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=matrix_type)
    else:
        w.add_tensor(name, a)


def finish(w, path=None):
    """The writer's header, metadata and tensors to its file; returns `path` (the file written), for the callers' return."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_deltas_(model, *, seed: int, scale: float) -> None:
    """Every adapted layer's default deltas set to Gaussian values (as if trained), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "neuroada_val"):
                v = m.neuroada_val["default"]
                v.copy_(torch.randn(v.shape, generator=gen) * scale)


def linear_keys(model) -> list[str]:
    kinds = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, kinds) and n != "lm_head"]


def read_back(path, case=None):
    if case in OWN_READER:
        return read_falcon(path, case)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    return contiguous(model)


def contiguous(model):
    for p in model.parameters():  # transformers' GPT-2 reader keeps the Conv1D weights as transposed views, which
        p.data = p.data.contiguous()  # an in-place merge refuses (it says so): the user's model after .contiguous()
    return model


def read_falcon(path, case):
    """A Falcon GGUF read the way transformers' loader reads Bloom's (gguf-py decodes, the regrouping is undone), into
    the case's model: transformers' own loader cannot build Falcon's new decoder architecture from a GGUF."""
    model = build(case)
    n_kv = gr.read_gguf(path).kv["falcon.attention.head_count_kv"]
    stored = {t.name: quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
              for t in gguf.GGUFReader(os.fspath(path)).tensors}
    tmap = gguf.TensorNameMap(gguf.MODEL_ARCH.FALCON, LAYERS)
    state = {}
    for key, t in model.state_dict().items():
        a = stored[tmap.get_name("transformer.word_embeddings.weight" if key == "lm_head.weight" else key,
                                 try_suffixes=(".weight", ".bias"))]
        if "query_key_value" in key:
            order = llama_cpp_regroup_qkv(np.arange(a.shape[0]), HEADS, n_kv)
            a = a[np.argsort(order)]
        state[key] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    model.load_state_dict(state)
    return contiguous(model)


def logits(model) -> np.ndarray:
    with torch.inference_mode():
        return model(input_ids=torch.tensor(IDS), use_cache=False).logits.float().numpy()


def merges_as_the_runtime(tmp_path, base, read, keys, *, scale=0.05):
    """A user's path, the same for every architecture (this file's, test_gguf_gemma4.py's, test_gguf_gptoss_lfm2.py's):
    the GGUF `base` loaded in transformers (`read(path)`), NeuroAda on every linear layer (`keys`, its targets), deltas
    saved, merged into the GGUF. F32 targets: `read` gives the merged file as the runtime's merged model, bit for bit.
    Kept in their own type (Q8_0): the touched blocks are re-encoded and the file keeps almost all of the adapter's
    change. Every tensor no target names (biases, norms, experts) keeps its type and bytes. Returns the F32 merge's path."""
    model = read(base)
    l_base = logits(model)
    attach(model, NeuroAdaConfig(k=4, target_modules="all-linear"))
    random_deltas_(model, seed=1, scale=scale)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, value_dtype="F32")
    assert sorted(naf.load(adapter / "neuroada_model.safetensors").targets) == sorted(keys)
    report = naf.validate(os.fspath(adapter / "neuroada_model.safetensors"), gn.open_gguf_base(base))  # probes
    assert report.ok, report.problems
    merged_rt = merge_and_unload(model)
    l_rt = logits(merged_rt)
    assert np.linalg.norm(l_rt - l_base) > 0.05 * np.linalg.norm(l_base)  # the adapter changes the outputs

    out = tmp_path / "f32" / "merged.gguf"
    out.parent.mkdir()
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(adapter), "--out", os.fspath(out),
                      "--option", "target_type=F32"]) == 0
    sd_rt, sd_back = merged_rt.state_dict(), read(out).state_dict()
    for key in sd_rt:
        np.testing.assert_array_equal(sd_back[key].numpy(), sd_rt[key].numpy(), err_msg=key)
    np.testing.assert_array_equal(logits(read(out)), l_rt)

    out_q = tmp_path / "q" / "merged.gguf"
    out_q.parent.mkdir()
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(adapter), "--out", os.fspath(out_q)]) == 0
    view, before, after = gn.open_gguf_base(base), gr.read_gguf(base), gr.read_gguf(out_q)
    targets = {view.storage_name(key) for key in keys}
    assert {after.tensors[g].type for g in targets} == {before.tensors[g].type for g in targets}  # types kept
    l_q = logits(read(out_q))
    retention = 1 - np.linalg.norm(l_q - l_rt) / np.linalg.norm(l_rt - l_base)
    assert retention > 0.95, retention
    for merged in (gr.read_gguf(out), after):
        assert set(merged.tensors) == set(before.tensors)
        for name in sorted(set(before.tensors) - targets):
            assert merged.tensors[name].type == before.tensors[name].type, name
            np.testing.assert_array_equal(merged.raw(name), before.raw(name), err_msg=name)
    return out


def extracted_tune_merges_back(tmp_path, path, model, keys, *, transposed=False):
    """neuroada-pack --base model.gguf: a fine-tune of `model` (its own Hugging Face keys; `keys` changed in their first
    3 input columns) pairs with the F32 GGUF at `path`, and the extracted adapter merges into the file as the tune.
    transposed: the keys are Conv1D [d_in, d_out] weights (GPT-2)."""
    from neuroada_format.converters.pack import extract
    rng = np.random.default_rng(3)
    tuned = {key: t.detach().numpy().copy() for key, t in model.state_dict().items()}
    for key in keys:
        if transposed:
            tuned[key][:3] += rng.standard_normal((3, tuned[key].shape[1])).astype(np.float32) * 0.01
        else:
            tuned[key][:, :3] += rng.standard_normal((tuned[key].shape[0], 3)).astype(np.float32) * 0.01
    adapter, _ = extract(path, {k: tuned[k] for k in keys}, k=3, value_dtype="F32")
    assert sorted(adapter.targets) == sorted(keys)
    merges_into_the_tune(tmp_path, path, adapter, tuned, keys)


def merges_into_the_tune(tmp_path, path, adapter, tuned, keys) -> None:
    """An adapter extracted from a fine-tune validates against the GGUF at `path`, and merged with F32 targets the file
    holds the tune's weights at every key."""
    assert naf.validate(adapter, gn.open_gguf_base(path)).ok
    out = tmp_path / "merged.gguf"
    gm.merge_gguf(path, [adapter], out, target_type="F32")
    merged = gn.open_gguf_base(out)
    for key in keys:
        np.testing.assert_allclose(merged.array(key), tuned[key], atol=1e-6, err_msg=key)


@pytest.mark.parametrize("case", READ_BY_TRANSFORMERS)
def test_the_generated_file_is_the_model_for_transformers(case, tmp_path):
    """The generator writes what llama.cpp writes: transformers' loader reads it back as the model, exactly (F32)."""
    model = build(case)
    path = write_like_llama_cpp(tmp_path / "m.gguf", case, model, QT.F32)
    back = read_back(path)
    # llama.cpp writes Mistral as llama, so transformers builds a Llama: same keys, same computation
    assert type(back).__name__ == ("LlamaForCausalLM" if case == "mistral-as-llama" else type(model).__name__)
    sd, sd_back = model.state_dict(), back.state_dict()
    for key, t in sd.items():
        assert torch.equal(t, sd_back[key]), key
    np.testing.assert_array_equal(logits(back), logits(model))


@pytest.mark.parametrize("case", list(CASES))
def test_every_linear_weight_maps_to_its_values(case, tmp_path):
    """Our view: every linear weight by its Hugging Face key, in Hugging Face row order; `keys()` gives those keys."""
    model = build(case)
    path = write_like_llama_cpp(tmp_path / "m.gguf", case, model, QT.F32)
    view = gn.open_gguf_base(path)
    keys = linear_keys(model)
    assert keys and set(keys) <= set(view.keys())
    for key in keys:
        np.testing.assert_array_equal(view.array(key), model.state_dict()[key].numpy(), err_msg=key)
    if case == "phi3":  # fused as in the checkpoint: one GGUF tensor each
        assert view.storage_name("model.layers.0.self_attn.qkv_proj.weight") == "blk.0.attn_qkv.weight"
        assert view.storage_name("model.layers.0.mlp.gate_up_proj.weight") == "blk.0.ffn_up.weight"
        assert view.info("model.layers.0.mlp.gate_up_proj.weight")[1] == (2 * INTER, HIDDEN)


@pytest.mark.parametrize("case", READ_BACK)
def test_adapter_trained_on_the_gguf_model_merges_into_the_gguf(case, tmp_path):
    """merges_as_the_runtime, for each architecture; Bloom's query_key_value bias, whose rows llama.cpp regroups with
    the weight's, is among the tensors no target names, which keep their values."""
    base = write_like_llama_cpp(tmp_path / "base.gguf", case, build(case), QT.Q8_0)
    out = merges_as_the_runtime(tmp_path, base, lambda p: read_back(p, case), linear_keys(build(case)),
                                scale=0.2 if case == "bloom" else 0.05)  # (Bloom's normed embeddings: larger logits)
    if case == "qwen2moe":  # the one-row shared-expert gate keeps its 1-D layout (transformers reads only that)
        assert gr.read_gguf(out).tensors["blk.0.ffn_gate_inp_shexp.weight"].ne == (HIDDEN,)


@pytest.mark.parametrize("case", list(CASES))
def test_a_fine_tuned_checkpoint_pairs_with_the_gguf_base(case, tmp_path):
    """extracted_tune_merges_back for each architecture (fused keys for Phi-3, Conv1D ones for GPT-2)."""
    model = build(case)
    path = write_like_llama_cpp(tmp_path / "m.gguf", case, model, QT.F32)
    extracted_tune_merges_back(tmp_path, path, model, linear_keys(model), transposed=case == "gpt2")


@pytest.mark.parametrize("arch", ["mpt", "gptneox"])
def test_an_architecture_without_a_mapping_is_refused_by_name(arch, tmp_path):
    """Hugging Face keys on a GGUF of another architecture: rule 4.1 naming the architecture and the supported ones,
    never a guess (its converter may reorder rows, as llama.cpp's does for GPT-NeoX's fused qkv)."""
    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_output.weight", np.zeros((32, 32), np.float32))
    finish(w)
    view = gn.open_gguf_base(path)
    assert "blk.0.attn_output.weight" in view  # its own names still work
    with pytest.raises(NeuroAdaError) as e:
        view.resolve("model.layers.0.self_attn.o_proj.weight")
    assert e.value.rule == "4.1" and repr(arch) in str(e.value) and "gemma3" in str(e.value)


def test_gemma3_multimodal_adapter_merges_into_its_text_gguf(tmp_path):
    """Gemma 3 4B and larger are Gemma3ForConditionalGeneration: an adapter trained on it is keyed by its checkpoint's
    names (`language_model.model.layers.N...`), and llama.cpp writes the text model as a gemma3 GGUF with that prefix
    dropped (the vision tower goes to a separate mmproj file). The adapter merges into that GGUF: transformers reads
    the merged file's weights as the runtime's merged text weights, bit for bit. A vision tower target is refused (4.1)."""
    text = build("gemma3")
    vlm_config = transformers.Gemma3Config(
        text_config=text.config.to_dict(), mm_tokens_per_image=4, image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14))
    vlm = transformers.Gemma3ForConditionalGeneration(vlm_config).float().eval()
    vlm.model.language_model.load_state_dict(text.model.state_dict())
    base = write_like_llama_cpp(tmp_path / "base.gguf", "gemma3", text, QT.F32)
    attach(vlm, NeuroAdaConfig(k=4, target_modules=r".*language_model\..*_proj"))
    random_deltas_(vlm, seed=1, scale=0.05)
    adapter = tmp_path / "adapter"
    save_adapter(vlm, adapter, value_dtype="F32")
    keys = naf.load(adapter / "neuroada_model.safetensors").targets
    assert keys and all(k.startswith("language_model.model.layers.") for k in keys)
    out = tmp_path / "merged.gguf"
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(adapter), "--out", os.fspath(out)]) == 0
    text_merge_read_back(read_back(out), vlm, text, len(keys))

    tuned_checkpoint_extracts_the_trained_positions(tmp_path, base, vlm, adapter)  # (vlm: merged above)

    vision_target_refused(tmp_path, base, transformers.Gemma3ForConditionalGeneration(vlm_config).float().eval(), r".*vision_tower.*\.q_proj")


def tuned_checkpoint_extracts_the_trained_positions(tmp_path, base, tuned, adapter) -> None:
    """The other way for a multimodal model: its fine-tuned checkpoint (`tuned`, the merged model) paired with the text
    GGUF (neuroada-pack extract --base model.gguf) gives the targets under the checkpoint's names and the positions
    of the adapter trained (saved at `adapter`)."""
    from neuroada_format.converters.pack import extract
    tuned.save_pretrained(tmp_path / "tuned")
    got, report = extract(base, tmp_path / "tuned", k=4, positions="delta", value_dtype="F32")
    trained = naf.load(adapter / "neuroada_model.safetensors")
    assert sorted(got.targets) == sorted(trained.targets) and report["not_in_finetuned"] == []
    for key, t in trained.targets.items():
        np.testing.assert_array_equal(got.targets[key].indices, t.indices, err_msg=key)
    assert naf.validate(got, gn.open_gguf_base(base)).ok


def text_merge_read_back(back, vlm, text, n_targets: int) -> None:
    """A multimodal model's adapter merged into its text GGUF: the file read back (`back`, a text model) holds every
    linear weight as the runtime's merge of `vlm` (merged here) holds it, and exactly n_targets of them changed from
    `text`'s."""
    merged = merge_and_unload(vlm).model.language_model.state_dict()
    back = back.state_dict()
    changed = 0
    for key in linear_keys(text):
        np.testing.assert_array_equal(back[key].numpy(), merged[key[len("model."):]].numpy(), err_msg=key)
        changed += not np.array_equal(back[key].numpy(), text.state_dict()[key].numpy())
    assert changed == n_targets


def targets_refused(tmp_path, base, w, cases) -> None:
    """Each (key, rule) of `cases`, an adapter of one target keyed `key` (positions and values from the [d_out, d_in]
    array w), is refused by the merge into the GGUF `base` under that rule, and nothing is written."""
    idx = naf.select_indices(w, k=2, rule="magnitude")
    for key, rule in cases:
        target = naf.Target.from_weight(key, w, idx, np.ones(idx.shape, np.float32), value_dtype="F32")
        with pytest.raises(NeuroAdaError) as e:
            gm.merge_gguf(base, [naf.Adapter({key: target})], tmp_path / "no.gguf")
        assert e.value.rule == rule, (key, str(e.value))
        assert not (tmp_path / "no.gguf").exists()


def vision_target_refused(tmp_path, base, vlm, modules: str) -> None:
    """An adapter on a multimodal model's vision tower (`modules`), which llama.cpp writes to the mmproj file, not the
    text GGUF: its merge fails (4.1) and writes nothing."""
    attach(vlm, NeuroAdaConfig(k=2, target_modules=modules))
    save_adapter(vlm, tmp_path / "vision")
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(tmp_path / "vision"),
                      "--out", os.fspath(tmp_path / "v.gguf")]) != 0
    assert not (tmp_path / "v.gguf").exists()


@pytest.mark.parametrize("case", ["llama", "phi3", "qwen2moe", "gpt2", "falcon-new"])
def test_training_on_the_q8_0_grid_merges_exactly(case, tmp_path):
    """Every layout the mapping knows trains through the file's Q8_0 grid like any linear (llama's rope-permuted q/k,
    Phi-3's fused qkv, Qwen2-MoE's one-row shared-expert gate, GPT-2's Conv1D weights stored transposed, Falcon's
    regrouped qkv): the merged file decodes to the runtime's merged model exactly (no block re-encoded), in the
    checkpoint's orientation."""
    from neuroada_format.runtime import train_on_grid
    base = write_like_llama_cpp(tmp_path / "base.gguf", case, build(case), QT.Q8_0)
    model = read_back(base, case)
    keys = linear_keys(model)
    attach(model, NeuroAdaConfig(k=4, target_modules="all-linear"))
    types = train_on_grid(model, base)
    assert set(types) == set(keys) and set(types.values()) <= {"Q8_0", "F32"}  # (1-D tensors stay F32)
    random_deltas_(model, seed=2, scale=0.05)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter)  # the snapped deltas, in F32
    merged_rt = merge_and_unload(model)
    out = tmp_path / "merged.gguf"
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(adapter), "--out", os.fspath(out)]) == 0
    view = gn.open_gguf_base(out)
    for key in types:
        assert view.info(key)[1] == tuple(merged_rt.state_dict()[key].shape), key  # as the checkpoint holds it
        np.testing.assert_array_equal(view.array(key), merged_rt.state_dict()[key].numpy(), err_msg=key)
    np.testing.assert_array_equal(logits(read_back(out, case)), logits(merged_rt))


def test_a_gpt2_conv1d_key_with_an_out_in_adapter_is_refused(tmp_path):
    """GPT-2's checkpoint holds its Conv1D weights as [d_in, d_out]: an `out_in` target on such a key is refused
    (4.2), also for the square c_proj, whose shape alone would not tell the orientations apart."""
    base = write_like_llama_cpp(tmp_path / "base.gguf", "gpt2", build("gpt2"), QT.Q8_0)
    key = "transformer.h.0.attn.c_proj.weight"  # square: only the layout tells the orientations apart
    w = gn.open_gguf_base(base).array(key)
    idx = naf.select_indices(w.T, k=2, rule="magnitude")
    wrong = naf.Target.from_weight(key, w.T.copy(), idx, np.zeros(idx.shape, np.float32), value_dtype="F32")
    with pytest.raises(NeuroAdaError) as e:
        gm.merge_gguf(base, [naf.Adapter({key: wrong})], tmp_path / "wrong.gguf")
    assert e.value.rule == "4.2" and "transposed" in str(e.value)


def test_falcon_new_decoder_file_is_read_as_transformers_falcon_attention_splits_it(tmp_path, monkeypatch):
    """transformers' loader cannot read this file, so the layout is pinned against transformers' Falcon attention
    itself: llama.cpp's graph takes the fused output's first n_head * head_dim rows as the query heads, the next
    n_head_kv * head_dim as the key heads and the rest as the value heads (query head h sharing key/value head
    h // (n_head / n_head_kv), as transformers' repeat_kv does). Read so, the file gives the very q, k and v that
    FalconAttention splits from the checkpoint's rows (at position 0, where rope changes nothing). And `read_falcon`
    reads the file back as the model, exactly."""
    import transformers.models.falcon.modeling_falcon as mf
    model = build("falcon-new")
    model.config._attn_implementation = "eager"
    path = write_like_llama_cpp(tmp_path / "m.gguf", "falcon-new", model, QT.F32)
    seen, original = {}, mf.eager_attention_forward

    def spy(module, q, k, v, *args, **kwargs):
        seen.setdefault(module.layer_idx, (q, k, v))
        return original(module, q, k, v, *args, **kwargs)
    monkeypatch.setattr(mf, "eager_attention_forward", spy)
    inputs = {}

    def keep_input(module, args):
        inputs[module] = args[0]
    hooks = [layer.self_attention.query_key_value.register_forward_pre_hook(keep_input)
             for layer in model.transformer.h]
    with torch.no_grad():
        model(input_ids=torch.tensor(IDS)[:, :1], use_cache=False)  # one token each: position 0
    for hook in hooks:
        hook.remove()
    inputs = [inputs[layer.self_attention.query_key_value] for layer in model.transformer.h]
    f = gr.read_gguf(path)
    hd, n_kv = HIDDEN // HEADS, KV_HEADS
    for i in range(LAYERS):
        w = f.decode(f"blk.{i}.attn_qkv.weight")
        assert w.shape == ((HEADS + 2 * n_kv) * hd, HIDDEN)
        y = inputs[i][:, 0].numpy() @ w.T  # [batch, rows] as llama.cpp computes it
        q, k, v = (t[:, :, 0].numpy() for t in seen[i])  # [batch, heads, hd]
        np.testing.assert_allclose(y[:, :HEADS * hd].reshape(-1, HEADS, hd), q, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(y[:, HEADS * hd:(HEADS + n_kv) * hd].reshape(-1, n_kv, hd), k, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(y[:, (HEADS + n_kv) * hd:].reshape(-1, n_kv, hd), v, rtol=1e-5, atol=1e-6)
    assert seen[0][1].shape[1] == n_kv and model.transformer.h[0].self_attention.num_key_value_groups == HEADS // n_kv
    back = read_falcon(path, "falcon-new")
    back.config._attn_implementation = "eager"  # (as the model's: sdpa differs in the last bits)
    for key, t in model.state_dict().items():
        assert torch.equal(t, back.state_dict()[key]), key
    np.testing.assert_array_equal(logits(back), logits(model))


def _with_kv(path, tmp_path, arch, **changes):
    """The file again with some of its <arch>.* integers changed (gguf-py rewrites it; tensors as they were)."""
    reader = gguf.GGUFReader(os.fspath(path))
    out = tmp_path / f"changed-{len(changes)}.gguf"
    w = gguf.GGUFWriter(os.fspath(out), arch)
    w.add_block_count(LAYERS)
    w.add_head_count(changes.get("head_count", HEADS))
    if "embedding_length" in changes:
        w.add_embedding_length(changes["embedding_length"])
    if changes.get("head_count_kv", 0) is not None:
        w.add_head_count_kv(changes.get("head_count_kv", reader.fields[f"{arch}.attention.head_count_kv"].contents()))
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=tuple(int(d) for d in reversed(t.shape)),
                     raw_dtype=t.tensor_type)
    return finish(w, out)


@pytest.mark.parametrize("case, changes, rule, words", [
    ("falcon-new", {"head_count_kv": None}, "1.6", "head_count_kv is missing"),
    ("falcon-new", {"head_count_kv": 3}, "4.2", "do not split"),
    ("falcon-new", {"head_count": 3}, "4.2", "do not split"),
    ("falcon-new", {"head_count": 12, "embedding_length": HIDDEN}, "4.2", "contradicts itself"),  # 8 + 2 + 2 of 8
    ("bloom", {"head_count_kv": 2}, "1.6", "head_count_kv differs"),
])
def test_a_fused_qkv_whose_heads_do_not_pin_its_rows_is_refused(case, changes, rule, words, tmp_path):
    """Bloom's and Falcon's qkv rows are regrouped by the file's head counts: a count that is missing, that does not
    split the rows, that splits them into heads of another size than embedding_length / head_count (12 query heads
    and 2 key/value heads of 8 for 128 rows, where the file's heads are of 64 / 12), or (Bloom) a head_count_kv other
    than the head_count its converter writes, is refused naming the file, the tensor and the rule, never guessed; the
    file's other linears still map."""
    arch = gguf_arch(case)
    path = _with_kv(write_like_llama_cpp(tmp_path / "m.gguf", case, build(case), QT.F32), tmp_path, arch, **changes)
    view = gn.open_gguf_base(path)
    with pytest.raises(NeuroAdaError) as e:
        view.resolve("transformer.h.0.self_attention.query_key_value.weight")
    assert e.value.rule == rule and words in str(e.value), str(e.value)
    assert e.value.path == os.fspath(path) and e.value.tensor == "blk.0.attn_qkv.weight"
    assert view.storage_name("transformer.h.0.self_attention.dense.weight") == "blk.0.attn_output.weight"


def test_a_falcon_qkv_bias_is_refused_and_bloom_s_follows_its_rows(tmp_path):
    """llama.cpp's Falcon converter cannot write a query_key_value bias (its reorder views the tensor as 2-D) and
    llama.cpp loads none: a file holding one is not llama.cpp's, and its key is refused (4.1), while `keys()` still
    lists the file. Bloom's converter regroups the bias as the weight's rows: read back in the checkpoint's order."""
    model = build("falcon-new")
    path = write_like_llama_cpp(tmp_path / "m.gguf", "falcon-new", model, QT.F32)
    reader = gguf.GGUFReader(os.fspath(path))
    out = tmp_path / "bias.gguf"
    w = gguf.GGUFWriter(os.fspath(out), "falcon")
    add_tiny_hparams(w, inter=4 * HIDDEN, kv_heads=KV_HEADS)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.add_tensor("blk.0.attn_qkv.bias", np.zeros((HEADS + 2 * KV_HEADS) * HIDDEN // HEADS, np.float32))
    finish(w)
    view = gn.open_gguf_base(out)
    with pytest.raises(NeuroAdaError) as e:
        view.resolve("transformer.h.0.self_attention.query_key_value.bias")
    assert e.value.rule == "4.1" and e.value.tensor == "blk.0.attn_qkv.bias" and e.value.path == os.fspath(out)
    keys = view.keys()
    assert "blk.0.attn_qkv.bias" in keys and "transformer.h.0.self_attention.query_key_value.weight" in keys

    bloom = build("bloom")
    view = gn.open_gguf_base(write_like_llama_cpp(tmp_path / "b.gguf", "bloom", bloom, QT.F32))
    for i in range(LAYERS):
        key = f"transformer.h.{i}.self_attention.query_key_value.bias"
        assert key in view.keys()
        np.testing.assert_array_equal(view.array(key), bloom.state_dict()[key].numpy())


@pytest.mark.parametrize("case", ["bloom", "falcon", "falcon-new"])
def test_neuroada_pack_extracts_a_fine_tune_against_the_gguf(case, tmp_path):
    """The command line: `neuroada-pack --base model.gguf --finetuned folder` (the architecture read from the GGUF,
    Bloom's and Falcon's linears out_in): the fine-tune of the file's own (Q8_0-decoded) model pairs with its tensors
    by their Hugging Face keys, the adapter validates against the file and merges into it as the fine-tune."""
    from safetensors.numpy import save_file

    from neuroada_format.converters import pack_cli
    path = write_like_llama_cpp(tmp_path / "m.gguf", case, build(case), QT.Q8_0)
    model = read_back(path, case)
    keys = linear_keys(model)
    rng = np.random.default_rng(4)
    tuned = {key: t.numpy().copy() for key, t in model.state_dict().items() if key != "lm_head.weight"}  # tied
    for key in keys:
        tuned[key][:, :3] += rng.standard_normal((tuned[key].shape[0], 3)).astype(np.float32) * 0.01
    (tmp_path / "tuned").mkdir()
    save_file(tuned, os.fspath(tmp_path / "tuned" / "model.safetensors"))
    out = tmp_path / "a.safetensors"
    with pytest.raises(SystemExit) as e:
        pack_cli.main(["--base", os.fspath(path), "--finetuned", os.fspath(tmp_path / "tuned"), "-k", "3",
                       "--value-dtype", "F32", "-o", os.fspath(out)])
    assert e.value.code == 0
    adapter = naf.load(out)
    assert sorted(adapter.targets) == sorted(keys) and all(t.layout == "out_in" for t in adapter.targets.values())
    merges_into_the_tune(tmp_path, path, adapter, tuned, keys)
