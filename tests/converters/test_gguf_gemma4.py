"""Gemma 4 GGUF bases (`gemma4`), end to end through transformers, as test_gguf_architectures.py checks the others.

llama.cpp's converter (conversion/gemma.py, Gemma4Model) writes Gemma 4's text model through gguf-py's name table with
every 2-D weight as the checkpoint holds it and the norms unshifted (Gemma 4's RMSNorm scales by w, not 1 + w, so
unlike Gemma 1-3 nothing is stored plus one). What it renames or adds is no linear weight: `layer_scalar` is written as
blk.N.layer_output_scale.weight, the router's `scale` and `per_expert_scale` as blk.N.ffn_gate_inp.scale and
blk.N.ffn_down_exps.scale, the experts stay 3-D (blk.N.ffn_gate_up_exps, ffn_down_exps), a tied lm_head is not
written, and a rope_freqs tensor is generated for the full-attention layers' partial rope. The multimodal checkpoint's
text weights (`model.language_model.`) lose that prefix; its vision tower goes to the separate mmproj file.

Two tiny text models cover the config features that change the tensor set: "ple" (as E2B/E4B: per-layer embeddings,
kv-shared layers without k/v projections, double-wide MLPs on those layers, sliding and full layers with different head
dims) and "moe" (as 26B-A4B: a MoE block beside the dense MLP in every layer, full layers with attention_k_eq_v, so no
v_proj, and their own kv head count). transformers' GGUF loader parses only part of a gemma4 file's config (no
per-layer-input size, no MoE, no layer types or kv sharing: it would build a model with its 262144-row default
per-layer embedding), so it is given the model's config and reads the tensors; the config keys it does parse are
checked against the model's. It reads every tensor back but those llama.cpp renames (layer_scalar, router.scale,
router.per_expert_scale) and the 3-D experts (transformers looks for blk.N.ffn_gate_up_exps without the `.weight` the
file's name has): `read_back` fills exactly those from the same file with gguf-py's reader, by llama.cpp's names.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.gemma4")
from gguf import GGMLQuantizationType as QT  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.converters import gguf_read as gr  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402
from neuroada_format.runtime import NeuroAdaConfig, attach, save_adapter  # noqa: E402

from test_gguf import HEADS, HIDDEN, KV_HEADS, VOCAB  # noqa: E402
from test_gguf_architectures import (add_like_llama_cpp, extracted_tune_merges_back, finish,  # noqa: E402
                                     linear_keys, logits, merges_as_the_runtime, random_deltas_,
                                     tuned_checkpoint_extracts_the_trained_positions,
                                     targets_refused, text_merge_read_back, vision_target_refused)

INTER, PLE = 96, 32  # every d_in a multiple of Q8_0's 32-value block, as in a real file

CONFIGS = {
    "ple": dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
                use_double_wide_mlp=True, hidden_size_per_layer_input=PLE, vocab_size_per_layer_input=VOCAB),
    "moe": dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
                enable_moe_block=True, num_experts=4, top_k_experts=4, moe_intermediate_size=32,
                attention_k_eq_v=True, num_global_key_value_heads=1),
}
# The Q8_0 retention below measures the merge on a tiny random model, whose sensitivity to any weight noise must be
# that of a trained one for the measure to mean the same as for the other architectures. Two things of Gemma 4 make a
# random one far touchier: attention runs with scaling 1, leaving its temperature to the trained q/k norm weights
# (QK_NORM: at their initial 1 a 16-wide head's logits reach +-16, the softmax is near one-hot, and Q8 noise turns into
# 5-6% of the adapter's effect: 0.942, 0.952, 0.945 kept over three seeds; at 0.5 both norms together give the
# 1/sqrt(head_dim) temperature, 0.5 * 0.5 * 16 = 4 = sqrt(16)), and top-k routing over a random router's near ties
# flips experts (top 2 of 4: 0.88 to 0.96); "moe" routes over all four experts, so that the router stays a continuous
# linear target like any other, its weights by softmax (0.97 to 0.98).
QK_NORM = 0.5
# what llama.cpp writes under another name than gguf-py's table gives, and transformers' loader does not read back
RENAMED = {"layer_scalar": "layer_output_scale.weight", "router.scale": "ffn_gate_inp.scale",
           "router.per_expert_scale": "ffn_down_exps.scale"}


def text_config(case: str):
    return transformers.Gemma4TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=16, global_head_dim=32, max_position_embeddings=64, rms_norm_eps=1e-6,
        sliding_window=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, **CONFIGS[case])


def build(case: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.Gemma4ForCausalLM(text_config(case)).float().eval()
    with torch.no_grad():  # norms and scales away from their initial ones (a norm stored shifted, a scale not read
        for key, t in model.state_dict().items():  # back would show)
            if key.endswith("norm.weight") or renamed(key):
                t.add_(torch.randn(t.shape) * 0.1)
            if key.endswith(("q_norm.weight", "k_norm.weight")):
                t.mul_(QK_NORM)
    return model


def gguf_name(key: str, tmap) -> str:
    """The GGUF tensor llama.cpp's converter writes a text-model key to (its renames first, then gguf-py's table)."""
    for hf, g in RENAMED.items():
        if key.endswith("." + hf):
            return f"blk.{key.split('.')[2]}.{g}"
    name = key + ".weight" if key.endswith(("experts.gate_up_proj", "experts.down_proj")) else key
    g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
    assert g is not None, key
    return g


def write_like_llama_cpp(path, model, matrix_type=QT.Q8_0):
    """The text model as llama.cpp's converter writes it: 2-D weights but the embeddings as matrix_type, the rest F32
    (the 3-D experts too), with the converter's hyper-parameters and generated rope_freqs."""
    cfg = model.config
    layers = cfg.num_hidden_layers
    tmap = gguf.TensorNameMap(gguf.MODEL_ARCH.GEMMA4, layers)
    w = gguf.GGUFWriter(os.fspath(path), "gemma4")
    w.add_block_count(layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    shared = [mode == "reuse" for mode in cfg.kv_sharing_modes]
    if cfg.use_double_wide_mlp:  # llama.cpp writes a per-layer list then
        w.add_feed_forward_length([cfg.intermediate_size * (2 if s else 1) for s in shared])
    else:
        w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    kv = [cfg.per_layer_config[i].num_key_value_heads for i in range(layers)]
    w.add_head_count_kv(kv if len(set(kv)) > 1 else kv[0])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    full = cfg.per_layer_config[cfg.layer_types.index("full_attention")].head_dim
    swa = cfg.per_layer_config[cfg.layer_types.index("sliding_attention")].head_dim
    w.add_key_length(full)
    w.add_value_length(full)
    w.add_key_length_swa(swa)
    w.add_value_length_swa(swa)
    w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    w.add_rope_dimension_count(full)
    w.add_rope_dimension_count_swa(swa)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    w.add_shared_kv_layers(cfg.num_kv_shared_layers)
    w.add_embedding_length_per_layer_input(cfg.hidden_size_per_layer_input or 0)
    if cfg.enable_moe_block:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([1] * VOCAB)
    w.add_pad_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    # the full layers' partial rope as llama.cpp expresses it: frequency factor 1 for the rotated pairs, 1e30 after
    partial = cfg.rope_parameters["full_attention"]["partial_rotary_factor"]
    rotated = int(full * partial / 2)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * rotated + [1e30] * (full // 2 - rotated), np.float32))
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes a tied head once, as token_embd
        a = t.detach().numpy().astype(np.float32)
        g = gguf_name(key, tmap)
        add_like_llama_cpp(w, g, a, key, matrix_type)
    return finish(w, path)


def read_back(path, config):
    """transformers' GGUF loader, given the config it cannot parse from a gemma4 file (see the module docstring); the
    tensors it does not map (UNREAD, and only those) are then filled from the same file by gguf-py's reader, under
    llama.cpp's names, so that the whole model comes from the file."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=torch.float32, output_loading_info=True)
    missing = set(info["missing_keys"])
    assert missing == {k for k in model.state_dict() if unread(k)}, missing
    tensors = {t.name: t for t in gguf.GGUFReader(os.fspath(path)).tensors}
    tmap = gguf.TensorNameMap(gguf.MODEL_ARCH.GEMMA4, config.num_hidden_layers)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key in missing:
                g = tensors[gguf_name(key, tmap)]
                t.copy_(torch.from_numpy(gguf.dequantize(g.data, g.tensor_type).reshape(t.shape)))
    return model.eval()


def unread(key: str) -> bool:
    """Tensors transformers' GGUF loader does not read back from a gemma4 file: llama.cpp's renamed ones and the
    experts (transformers looks for them without the `.weight` llama.cpp gives them)."""
    return renamed(key) or key.endswith(("experts.gate_up_proj", "experts.down_proj"))


def renamed(key: str) -> bool:
    return any(key.endswith("." + hf) for hf in RENAMED)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_the_generated_file_is_the_model_for_transformers(case, tmp_path):
    """The generator writes what llama.cpp writes: transformers' loader reads every tensor it maps back as the model,
    exactly (F32), and the config keys it parses are the model's; llama.cpp's renamed tensors hold their values."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    model = build(case)
    path = write_like_llama_cpp(tmp_path / "m.gguf", model, QT.F32)
    parsed = load_gguf_checkpoint(os.fspath(path))["config"]
    cfg = model.config
    assert parsed["model_type"] == "gemma4_text"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps", "sliding_window",
                "vocab_size", "max_position_embeddings"):
        assert parsed[key] == pytest.approx(getattr(cfg, key), rel=1e-7), key  # (the eps is stored as f32)
    assert parsed["global_head_dim"] == cfg.per_layer_config[1].head_dim == 32 != cfg.per_layer_config[0].head_dim

    back = read_back(path, cfg)
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    for key, t in sd.items():
        assert torch.equal(t, sd_back[key]), key
    np.testing.assert_array_equal(logits(back), logits(model))

    stored = gr.read_gguf(path)
    names = [k for k in sd if renamed(k)]
    assert len(names) == (3 if case == "moe" else 1) * cfg.num_hidden_layers
    for key in names:
        np.testing.assert_array_equal(stored.decode(gguf_name(key, None)).reshape(-1), sd[key].numpy(), err_msg=key)
    assert not any(".attn_k." in g or ".attn_v." in g for g in stored.tensors if g.startswith(("blk.2.", "blk.3.")))


@pytest.mark.parametrize("case", list(CONFIGS))
def test_every_linear_weight_maps_to_its_values(case, tmp_path):
    """Our view: every linear weight by its Hugging Face key, in Hugging Face row order; `keys()` gives those keys."""
    model = build(case)
    path = write_like_llama_cpp(tmp_path / "m.gguf", model, QT.F32)
    view = gn.open_gguf_base(path)
    keys = linear_keys(model)
    assert keys and set(keys) <= set(view.keys())
    for key in keys:
        np.testing.assert_array_equal(view.array(key), model.state_dict()[key].numpy(), err_msg=key)
    if case == "ple":
        assert view.storage_name("model.per_layer_model_projection.weight") == "per_layer_model_proj.weight"
        assert view.storage_name("model.layers.1.per_layer_input_gate.weight") == "blk.1.inp_gate.weight"
        assert view.storage_name("model.layers.1.per_layer_projection.weight") == "blk.1.proj.weight"
        assert view.info("model.layers.3.mlp.up_proj.weight")[1] == (2 * INTER, HIDDEN)  # double wide, kv-shared
    else:
        assert view.storage_name("model.layers.0.router.proj.weight") == "blk.0.ffn_gate_inp.weight"
        assert view.info("model.layers.1.self_attn.q_proj.weight")[1] == (HEADS * 32, HIDDEN)  # full: global head dim


@pytest.mark.parametrize("case", list(CONFIGS))
def test_adapter_trained_on_the_gguf_model_merges_into_the_gguf(case, tmp_path):
    """merges_as_the_runtime (test_gguf_architectures.py) for both Gemma 4 text models: the per-layer-embedding
    linears and the router among the targets, the experts and renamed scales among the tensors kept."""
    cfg = text_config(case)
    base = write_like_llama_cpp(tmp_path / "base.gguf", build(case), QT.Q8_0)
    merges_as_the_runtime(tmp_path, base, lambda p: read_back(p, cfg), linear_keys(build(case)))


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_fine_tuned_checkpoint_pairs_with_the_gguf_base(case, tmp_path):
    """extracted_tune_merges_back: a Gemma 4 fine-tune's checkpoint (its own Hugging Face keys) pairs with the GGUF."""
    model = build(case)
    path = write_like_llama_cpp(tmp_path / "m.gguf", model, QT.F32)
    extracted_tune_merges_back(tmp_path, path, model, linear_keys(model))


def test_what_llama_cpp_renames_or_keeps_3d_is_no_target(tmp_path):
    """The router's scales and layer_scalar, which llama.cpp writes under names of its own, and the 3-D experts
    (Parameters, no Linear: the runtime never targets them) do not map from their Hugging Face keys, so a target on one
    is 4.1; the experts' own GGUF name is no [d_out, d_in] matrix, 4.2. Never a guess."""
    model = build("moe")
    base = write_like_llama_cpp(tmp_path / "base.gguf", model, QT.F32)
    view = gn.open_gguf_base(base)
    sd = model.state_dict()
    keys = ["model.layers.0.router.scale", "model.layers.0.router.per_expert_scale", "model.layers.0.layer_scalar",
            "model.layers.0.experts.gate_up_proj", "model.layers.0.experts.down_proj"]
    assert not any(key in view for key in keys) and "blk.0.ffn_down_exps.weight" in view
    w = sd["model.layers.0.experts.down_proj"].numpy()[0]  # one expert's [hidden, moe_inter]
    targets_refused(tmp_path, base, w, [*((k, "4.1") for k in keys), ("blk.0.ffn_down_exps.weight", "4.2")])


def test_gemma4_multimodal_adapter_merges_into_its_text_gguf(tmp_path):
    """Gemma 4 is released as Gemma4ForConditionalGeneration, its text weights under `model.language_model.`, which
    llama.cpp's converter drops (the vision tower goes to the mmproj file). An adapter trained on it, keyed
    `model.language_model.layers.N...`, merges into the text GGUF: transformers reads the merged file's weights as the
    runtime's merged text weights, bit for bit; a fine-tune of it pairs with the GGUF; a vision tower target is 4.1."""
    text = build("ple")
    vlm_config = transformers.Gemma4Config(
        text_config=text.config.to_dict(), audio_config=None,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64,
                           pooling_kernel_size=2),
        boi_token_id=VOCAB - 4, eoi_token_id=VOCAB - 3, image_token_id=VOCAB - 2, video_token_id=VOCAB - 1)
    vlm = transformers.Gemma4ForConditionalGeneration(vlm_config).float().eval()
    vlm.model.language_model.load_state_dict(text.model.state_dict())
    base = write_like_llama_cpp(tmp_path / "base.gguf", text, QT.F32)
    attach(vlm, NeuroAdaConfig(k=4, target_modules=r".*language_model\..*(_proj|_projection|_gate)"))
    random_deltas_(vlm, seed=1, scale=0.05)
    adapter = tmp_path / "adapter"
    save_adapter(vlm, adapter, value_dtype="F32")
    keys = naf.load(adapter / "neuroada_model.safetensors").targets
    assert sorted(keys) == sorted("model.language_model." + k[len("model."):] for k in linear_keys(text))
    out = tmp_path / "merged.gguf"
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(adapter), "--out", os.fspath(out)]) == 0
    text_merge_read_back(read_back(out, text.config), vlm, text, len(keys))

    tuned_checkpoint_extracts_the_trained_positions(tmp_path, base, vlm, adapter)  # (vlm: merged above)

    vision_target_refused(tmp_path, base, transformers.Gemma4ForConditionalGeneration(vlm_config).float().eval(), r".*vision_tower.*\.q_proj\.linear")
