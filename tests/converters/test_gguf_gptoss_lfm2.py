"""gpt-oss and LFM2 GGUF bases (`gpt-oss`, `lfm2`), end to end through transformers, as test_gguf_architectures.py
checks the others.

gpt-oss: llama.cpp's converter (conversion/gpt_oss.py, GptOssModel, a TextModel: no rope permutation) writes the
attention projections and their biases, and the router (`mlp.router`, blk.N.ffn_gate_inp, kept F32 as every
ffn_gate_inp), as the checkpoint holds them; the sinks become blk.N.attn_sinks.weight. The experts are no linear
layers: `experts.gate_up_proj` [E, hidden, 2 * inter] (gate and up interleaved column by column) is transposed and
split into blk.N.ffn_gate_exps (the even rows) and ffn_up_exps (the odd ones), `down_proj` transposed into
ffn_down_exps, their biases split the same way; real files hold them in MXFP4, which the generator writes too.
transformers' loader reads gpt-oss files but maps neither the experts (their keys are not in its table as 3-D
parameters) nor the sinks (it looks for blk.N.attn_sinks without the `.weight` llama.cpp gives it): `read_back` fills
exactly those from the same file with gguf-py's reader, undoing llama.cpp's split and transposition.

LFM2: llama.cpp's converter (conversion/lfm2.py, LFM2Model) writes every 2-D weight as the checkpoint holds it: the
short-convolution blocks' in_proj (B, C and x stacked, [3 * hidden, hidden], not split) and out_proj, the attention
blocks' q/k/v/out_proj, the feed-forward w1/w3/w2 (ffn_gate, ffn_up, ffn_down). The one weight it reshapes is the
depthwise conv kernel `conv.conv` [hidden, 1, L], squeezed to blk.N.shortconv.conv [hidden, L] (kept F32): a Conv1d,
no linear weight and never a target. transformers' loader reads LFM2 files whole (it un-squeezes the kernel).

Mistral, checked here too: gguf-py has no `mistral` architecture (its names are `mistral3` and `mistral4`), so no file
says general.architecture "mistral"; llama.cpp writes MistralForCausalLM as `llama` (test_gguf_architectures.py's
mistral-as-llama; transformers' `mistral` config mapping serves llama files whose general.name says Mistral). It
writes Ministral3ForCausalLM and Mistral3ForConditionalGeneration's text model as `mistral3` through its LlamaModel
(conversion/mistral3.py, Ministral3Model), so q_proj/k_proj rows permuted for rope exactly as for llama;
transformers' loader has no `mistral3`, so those files are read back with gguf-py and transformers' own inverse of
that permutation (LlamaTensorProcessor._reverse_permute_weights) into a Ministral3ForCausalLM.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.gpt_oss")
pytest.importorskip("transformers.models.lfm2")
from gguf import GGMLQuantizationType as QT, quants  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format.converters import gguf_merge as gm  # noqa: E402
from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.converters import gguf_read as gr  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402
from neuroada_format.runtime import NeuroAdaConfig, attach, merge_and_unload, save_adapter  # noqa: E402

from test_gguf import HEADS, HIDDEN, KV_HEADS, VOCAB, add_tiny_hparams, llama_cpp_permute  # noqa: E402
from test_gguf_architectures import (add_like_llama_cpp, extracted_tune_merges_back, finish,  # noqa: E402
                                     linear_keys, logits, merges_as_the_runtime, random_deltas_,
                                     targets_refused, vision_target_refused)

LAYERS = 4
EXPERTS, EXPERT_INTER = 4, 32  # every d_in a multiple of the 32-value blocks (Q8_0, MXFP4), as in a real file


def gptoss_config():
    # head_dim and sliding_window: GptOssConfig's defaults, which transformers' loader assumes (it parses neither
    # key_length nor attention.sliding_window from a gpt-oss file); every expert
    # used, so that the router stays a continuous function of its weights (top-k over a random router's near ties
    # flips experts under any noise, and the Q8_0 retention below would measure that)
    return transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=EXPERT_INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_local_experts=EXPERTS,
        num_experts_per_tok=EXPERTS, max_position_embeddings=64, sliding_window=128, rms_norm_eps=1e-5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)


def lfm2_config():
    # block_auto_adjust_ff_dim as in the released configs: the feed-forward width is 2/3 of intermediate_size,
    # rounded up to block_multiple_of (144 -> 96), which llama.cpp's converter writes as feed_forward_length
    return transformers.Lfm2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=144, block_multiple_of=32, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64, conv_L_cache=3,
        layer_types=["conv", "full_attention", "conv", "full_attention"], pad_token_id=0, bos_token_id=1,
        eos_token_id=2)


CASES = {"gpt-oss": (transformers.GptOssForCausalLM, gptoss_config),
         "lfm2": (transformers.Lfm2ForCausalLM, lfm2_config)}


def build(case: str, seed: int = 0):
    torch.manual_seed(seed)
    cls, config = CASES[case]
    model = cls(config()).float().eval()
    with torch.no_grad():  # the parameters transformers initializes to constants (norms, sinks, biases, the router's
        for key, t in model.state_dict().items():  # zeros) given values of their own, so that none reads back by luck
            if t.ndim == 1 or key.endswith(("router.weight", "conv.conv.weight", "_bias")):
                t.add_(torch.randn(t.shape) * 0.1)
    return model


def ff_length(cfg) -> int:
    """LFM2's feed-forward width as llama.cpp's converter computes it (LFM2Model._add_feed_forward_length)."""
    ff = cfg.intermediate_size
    if cfg.block_auto_adjust_ff_dim:
        ff = int(2 * ff / 3)
        if cfg.block_ffn_dim_multiplier is not None:
            ff = int(cfg.block_ffn_dim_multiplier * ff)
        ff = cfg.block_multiple_of * ((ff + cfg.block_multiple_of - 1) // cfg.block_multiple_of)
    return ff


def llama_cpp_tensors(case: str, model):
    """(GGUF name, array) as llama.cpp's converter writes the model: gguf-py's table, and for gpt-oss the experts
    transposed and split (gate the even rows of the transposed gate_up_proj, up the odd ones), the sinks named
    `.weight`; for LFM2 the conv kernel squeezed. Written independently of gguf_names."""
    arch = gguf.MODEL_ARCH.GPT_OSS if case == "gpt-oss" else gguf.MODEL_ARCH.LFM2
    tmap = gguf.TensorNameMap(arch, model.config.num_hidden_layers)
    tied = model.config.tie_word_embeddings
    for key, t in model.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        if key == "lm_head.weight" and tied:
            continue  # a tied head is not in the checkpoint; llama.cpp writes token_embd only
        if ".experts." in key:
            blk, what = key.split(".")[2], key.rsplit(".", 1)[1]
            if what == "gate_up_proj":  # [E, hidden, 2 inter] -> [E, 2 inter, hidden]
                a = a.transpose(0, 2, 1)
                yield f"blk.{blk}.ffn_gate_exps.weight", np.ascontiguousarray(a[:, ::2])
                yield f"blk.{blk}.ffn_up_exps.weight", np.ascontiguousarray(a[:, 1::2])
            elif what == "gate_up_proj_bias":
                yield f"blk.{blk}.ffn_gate_exps.bias", np.ascontiguousarray(a[:, ::2])
                yield f"blk.{blk}.ffn_up_exps.bias", np.ascontiguousarray(a[:, 1::2])
            elif what == "down_proj":
                yield f"blk.{blk}.ffn_down_exps.weight", np.ascontiguousarray(a.transpose(0, 2, 1))
            else:
                assert what == "down_proj_bias", key
                yield f"blk.{blk}.ffn_down_exps.bias", a
            continue
        if key.endswith(".sinks"):
            key += ".weight"
        if key.endswith("conv.conv.weight"):
            a = a.squeeze(1)  # [hidden, 1, L] -> [hidden, L]
        g = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        assert g is not None, key
        yield g, a


# tensors llama.cpp's converter keeps F32 whatever the output type: 1-D ones, the norms, biases, every ffn_gate_inp
# (the router) and the short-conv kernel (base.py's list)
def stays_f32(name: str, a) -> bool:
    return a.ndim == 1 or not name.endswith(".weight") or ".ffn_gate_inp." in name or ".shortconv.conv." in name


def write_like_llama_cpp(path, case: str, model, matrix_type=QT.Q8_0, experts_type=QT.MXFP4, rope_scaling=False):
    """The model as llama.cpp's converter writes it: 2-D weights but the embedding as matrix_type, the experts as
    experts_type (MXFP4 in the released files), everything stays_f32 names in F32; the hyper-parameters its
    converter writes. rope_scaling: gpt-oss's YaRN keys (gpt-oss.rope.scaling.*), which llama.cpp writes but
    transformers' loader cannot parse (it takes a field's first part, the key's length, for the value, and fails):
    left out of the files it reads, where GptOssConfig's default rope, the same YaRN, stands for them."""
    cfg = model.config
    w = gguf.GGUFWriter(os.fspath(path), case)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if case == "gpt-oss":
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
        w.add_expert_feed_forward_length(cfg.intermediate_size)
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    else:
        w.add_feed_forward_length(ff_length(cfg))
        # the key/value head count per layer, 0 for a conv layer (how llama.cpp tells the layer kinds apart)
        w.add_head_count_kv([cfg.num_key_value_heads if t != "conv" else 0 for t in cfg.layer_types])
        w.add_shortconv_l_cache(cfg.conv_L_cache)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    if case == "gpt-oss" and rope_scaling:
        rope = cfg.rope_parameters
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_merges(["t 1"])  # a BPE vocabulary has merges, which llama.cpp requires (placeholder)
    w.add_token_types([1] * VOCAB)
    w.add_pad_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, a in llama_cpp_tensors(case, model):
        kind = experts_type if "_exps.weight" in name else matrix_type
        if a.ndim >= 2 and "token_embd" not in name and not stays_f32(name, a) and kind != QT.F32:
            q = quants.quantize(a, kind)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=kind)
        else:
            w.add_tensor(name, a)
    return finish(w, path)


def unread(key: str) -> bool:
    """What transformers' GGUF loader does not read back from a gpt-oss file: the experts (and their biases) and the
    sinks."""
    return ".mlp.experts." in key or key.endswith(".self_attn.sinks")


def read_back(path, case: str):
    """transformers' GGUF loader; for gpt-oss the tensors it does not map (`unread`, and only those) are then filled
    from the same file by gguf-py's reader under llama.cpp's names, llama.cpp's split and transposition undone, so
    that the whole model comes from the file."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, output_loading_info=True)
    missing = set(info["missing_keys"])
    assert missing == {k for k in model.state_dict() if case == "gpt-oss" and unread(k)}, missing
    if missing:
        stored = {t.name: quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
                  for t in gguf.GGUFReader(os.fspath(path)).tensors}
        with torch.no_grad():
            for key, t in model.state_dict().items():
                if key in missing:
                    t.copy_(torch.from_numpy(from_llama_cpp(key, stored, t.shape)))
    return model.eval()


def from_llama_cpp(key: str, stored: dict, shape) -> np.ndarray:
    """A gpt-oss sink or expert tensor from the arrays of a file llama.cpp wrote (the inverse of llama_cpp_tensors)."""
    blk = key.split(".")[2]
    if key.endswith(".sinks"):
        return stored[f"blk.{blk}.attn_sinks.weight"]
    what = key.rsplit(".", 1)[1]
    part = {"gate_up_proj": "weight", "gate_up_proj_bias": "bias", "down_proj": "weight", "down_proj_bias": "bias"}
    suffix = part[what]
    if what.startswith("down_proj"):
        a = stored[f"blk.{blk}.ffn_down_exps.{suffix}"]
        return a.transpose(0, 2, 1) if suffix == "weight" else a
    gate, up = stored[f"blk.{blk}.ffn_gate_exps.{suffix}"], stored[f"blk.{blk}.ffn_up_exps.{suffix}"]
    out = np.empty(shape, np.float32)
    if suffix == "weight":  # [E, hidden, 2 inter], gate in the even columns
        out[:, :, ::2], out[:, :, 1::2] = gate.transpose(0, 2, 1), up.transpose(0, 2, 1)
    else:
        out[:, ::2], out[:, 1::2] = gate, up
    return out


def targets_of(model) -> list[str]:
    """The linear weights a merge may target: every linear layer but the head, and gpt-oss's router (a parameter of
    its GptOssTopKRouter module, F.linear(x, weight, bias): no nn.Linear, so the runtime does not adapt it, but a
    fine-tune's changed router is a linear weight an extracted adapter carries)."""
    return linear_keys(model) + [k for k in model.state_dict() if k.endswith(".mlp.router.weight")]


@pytest.mark.parametrize("case", list(CASES))
def test_the_generated_file_is_the_model_for_transformers(case, tmp_path):
    """The generator writes what llama.cpp writes: transformers' loader parses the config it needs and reads every
    tensor back as the model, exactly (F32), gpt-oss's experts and sinks (which it does not map) through read_back."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    model = build(case)
    path = write_like_llama_cpp(tmp_path / "m.gguf", case, model, QT.F32, QT.F32)
    parsed = load_gguf_checkpoint(os.fspath(path))["config"]
    cfg = model.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert parsed[key] == getattr(cfg, key), key
    if case == "lfm2":  # the feed-forward width as written, the attention layers from the per-layer kv head counts
        assert parsed["intermediate_size"] == ff_length(cfg) == 96 and not parsed["block_auto_adjust_ff_dim"]
        assert parsed["full_attn_idxs"] == [1, 3] and parsed["conv_L_cache"] == cfg.conv_L_cache
    else:
        assert parsed["num_local_experts"] == EXPERTS and parsed["intermediate_size"] == EXPERT_INTER

    back = read_back(path, case)
    assert type(back) is type(model)
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    for key, t in sd.items():
        assert torch.equal(t, sd_back[key]), key
    np.testing.assert_array_equal(logits(back), logits(model))

    stored = gr.read_gguf(path).tensors
    if case == "lfm2":
        assert stored["blk.0.shortconv.conv.weight"].shape == (HIDDEN, cfg.conv_L_cache)  # squeezed
        assert stored["blk.0.shortconv.in_proj.weight"].shape == (3 * HIDDEN, HIDDEN)  # B, C, x: not split
        assert "blk.0.attn_q.weight" not in stored and "blk.1.shortconv.in_proj.weight" not in stored
        assert "output.weight" not in stored  # tied
    else:
        assert stored["blk.0.ffn_gate_exps.weight"].shape == (EXPERTS, EXPERT_INTER, HIDDEN)
        assert stored["blk.0.ffn_down_exps.weight"].shape == (EXPERTS, HIDDEN, EXPERT_INTER)
        assert stored["blk.0.ffn_gate_exps.bias"].shape == (EXPERTS, EXPERT_INTER)


@pytest.mark.parametrize("case", list(CASES))
def test_every_linear_weight_maps_to_its_values(case, tmp_path):
    """Our view: every linear weight by its Hugging Face key, in Hugging Face row order; `keys()` gives those keys."""
    model = build(case)
    path = write_like_llama_cpp(tmp_path / "m.gguf", case, model, QT.F32, QT.F32)
    view = gn.open_gguf_base(path)
    keys = targets_of(model)
    assert keys and set(keys) <= set(view.keys())
    for key in keys:
        np.testing.assert_array_equal(view.array(key), model.state_dict()[key].numpy(), err_msg=key)
        assert view.info(key) == ("F32", tuple(model.state_dict()[key].shape)), key
    if case == "lfm2":
        assert view.storage_name("model.layers.0.conv.in_proj.weight") == "blk.0.shortconv.in_proj.weight"
        assert view.storage_name("model.layers.0.conv.out_proj.weight") == "blk.0.shortconv.out_proj.weight"
        assert view.storage_name("model.layers.1.self_attn.out_proj.weight") == "blk.1.attn_output.weight"
        assert view.storage_name("model.layers.1.feed_forward.w1.weight") == "blk.1.ffn_gate.weight"
        assert view.storage_name("model.layers.1.feed_forward.w3.weight") == "blk.1.ffn_up.weight"
        assert view.storage_name("model.layers.1.feed_forward.w2.weight") == "blk.1.ffn_down.weight"
        assert "blk.0.shortconv.conv.weight" in view.keys()  # no key: its own name
    else:
        assert view.storage_name("model.layers.0.mlp.router.weight") == "blk.0.ffn_gate_inp.weight"
        assert view.storage_name("model.layers.0.self_attn.o_proj.bias") == "blk.0.attn_output.bias"
    # every tensor of the file that a key of the model names is listed by that key
    sd = model.state_dict()
    listed = set(view.keys())
    assert {k for k in sd if k in listed} >= set(keys) | {k for k in sd if k.endswith(("norm.weight", ".bias"))
                                                           and ".experts." not in k}


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_trained_on_the_gguf_model_merges_into_the_gguf(case, tmp_path):
    """merges_as_the_runtime (test_gguf_architectures.py): the tensors no target names, gpt-oss's MXFP4 experts and
    sinks and LFM2's conv kernel among them, keep their type and bytes."""
    base = write_like_llama_cpp(tmp_path / "base.gguf", case, build(case), QT.Q8_0)
    merges_as_the_runtime(tmp_path, base, lambda p: read_back(p, case), linear_keys(build(case)))
    if case == "gpt-oss":
        assert gr.read_gguf(base).tensors["blk.0.ffn_up_exps.weight"].type == QT.MXFP4


def test_a_gptoss_router_target_merges_as_rule_m(tmp_path):
    """The router is no nn.Linear (the runtime adapts only those), but its weight is an [n_expert, hidden] linear
    weight stored as the checkpoint holds it (F32, as llama.cpp keeps every ffn_gate_inp): a target on it merges
    into blk.N.ffn_gate_inp as rule M merges it into the checkpoint's tensor, bit for bit, and the file then reads
    back through transformers as the model with that merged router."""
    model = build("gpt-oss")
    base = write_like_llama_cpp(tmp_path / "base.gguf", "gpt-oss", model, QT.Q8_0)
    assert gr.read_gguf(base).tensors["blk.2.ffn_gate_inp.weight"].type == QT.F32
    key = "model.layers.2.mlp.router.weight"
    w = model.state_dict()[key].numpy()
    rng = np.random.default_rng(5)
    idx = naf.select_indices(w, k=8, rule="magnitude")
    target = naf.Target.from_weight(key, w, idx, rng.standard_normal(idx.shape).astype(np.float32) * 0.1,
                                    value_dtype="F32")
    adapter = naf.Adapter({key: target})
    assert naf.validate(adapter, gn.open_gguf_base(base)).ok
    out = tmp_path / "merged.gguf"
    gm.merge_gguf(base, [adapter], out)
    expected = naf.merge.merge_weight(w, [target])
    assert not np.array_equal(expected, w)
    np.testing.assert_array_equal(gn.open_gguf_base(out).array(key), expected)
    back = read_back(out, "gpt-oss").state_dict()
    np.testing.assert_array_equal(back[key].numpy(), expected)


@pytest.mark.parametrize("case", list(CASES))
def test_a_fine_tuned_checkpoint_pairs_with_the_gguf_base(case, tmp_path):
    """extracted_tune_merges_back: a fine-tune's checkpoint (its own Hugging Face keys; gpt-oss's router too) pairs
    with the GGUF's tensors."""
    model = build(case)
    path = write_like_llama_cpp(tmp_path / "m.gguf", case, model, QT.F32)
    extracted_tune_merges_back(tmp_path, path, model, targets_of(model))


def test_neuroada_pack_extracts_a_fine_tune_of_the_whole_checkpoint(tmp_path):
    """The command line with a whole fine-tuned checkpoint (every tensor, the 3-D experts and conv kernels included):
    only the linear weights pair with the GGUF's tensors; the adapter merges back as the tune."""
    from safetensors.numpy import save_file

    from neuroada_format.converters import pack_cli
    for case in CASES:
        path = write_like_llama_cpp(tmp_path / f"{case}.gguf", case, build(case), QT.Q8_0)
        model = read_back(path, case)
        keys = targets_of(model)
        rng = np.random.default_rng(4)
        tuned = {key: t.numpy().copy() for key, t in model.state_dict().items()
                 if not (key == "lm_head.weight" and model.config.tie_word_embeddings)}
        for key in keys:
            tuned[key][:, :3] += rng.standard_normal((tuned[key].shape[0], 3)).astype(np.float32) * 0.01
        folder = tmp_path / f"tuned-{case}"
        folder.mkdir()
        save_file(tuned, os.fspath(folder / "model.safetensors"))
        out = tmp_path / f"{case}.safetensors"
        with pytest.raises(SystemExit) as e:
            pack_cli.main(["--base", os.fspath(path), "--finetuned", os.fspath(folder), "-k", "3",
                           "--value-dtype", "F32", "-o", os.fspath(out)])
        assert e.value.code == 0, case
        adapter = naf.load(out)
        assert sorted(adapter.targets) == sorted(keys), case
        assert naf.validate(adapter, gn.open_gguf_base(path)).ok
        merged = tmp_path / f"{case}-merged.gguf"
        gm.merge_gguf(path, [adapter], merged, target_type="F32")
        view = gn.open_gguf_base(merged)
        for key in keys:
            np.testing.assert_allclose(view.array(key), tuned[key], atol=1e-6, err_msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_what_is_no_linear_weight_is_no_target(case, tmp_path):
    """gpt-oss's experts (3-D parameters and their [E, n] biases; MXFP4 in the file) and sinks, and LFM2's conv
    kernel (a Conv1d [hidden, 1, L] that llama.cpp squeezes to [hidden, L]) do not map from their Hugging Face keys,
    so a target on one is 4.1, whatever its shape; an expert tensor's own GGUF name is no [d_out, d_in] matrix, 4.2.
    Never a guess, and nothing is written."""
    model = build(case)
    base = write_like_llama_cpp(tmp_path / "base.gguf", case, model, QT.F32)
    view = gn.open_gguf_base(base)
    sd = model.state_dict()
    if case == "gpt-oss":
        keys = [f"model.layers.0.{k}" for k in ("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias",
                                                 "mlp.experts.down_proj", "mlp.experts.down_proj_bias",
                                                 "self_attn.sinks")]
        w = sd["model.layers.0.mlp.experts.down_proj"].numpy()[0].T.copy()  # one expert's [hidden, inter]
        own = [("blk.0.ffn_down_exps.weight", "4.2"), ("blk.0.ffn_gate_exps.weight", "4.2")]
    else:
        keys = ["model.layers.0.conv.conv.weight", "model.layers.2.conv.conv.weight"]
        w = sd["model.layers.0.conv.conv.weight"].numpy()[:, 0].copy()  # the squeezed [hidden, L] the file holds
        own = []
    assert not any(key in view for key in keys)
    assert not set(keys) & set(view.keys())
    targets_refused(tmp_path, base, w, [*((k, "4.1") for k in keys), *own])


def test_gptoss_rope_scaling_keys_change_nothing_we_read(tmp_path):
    """llama.cpp writes gpt-oss's YaRN parameters (gpt-oss.rope.scaling.*), which transformers' loader cannot parse:
    the other files here leave them out. Our view does not read them: the file with them maps every key to the same
    tensor and values, and a merge carries them over unchanged."""
    model = build("gpt-oss")
    plain = gn.open_gguf_base(write_like_llama_cpp(tmp_path / "a.gguf", "gpt-oss", model, QT.F32, QT.F32))
    path = write_like_llama_cpp(tmp_path / "b.gguf", "gpt-oss", model, QT.F32, QT.F32, rope_scaling=True)
    full = gn.open_gguf_base(path)
    assert full.file.kv["gpt-oss.rope.scaling.factor"] == 32.0
    assert full.keys() == plain.keys()
    for key in targets_of(model):
        assert full.storage_name(key) == plain.storage_name(key)
        np.testing.assert_array_equal(full.array(key), plain.array(key))
    key = "model.layers.0.self_attn.q_proj.weight"
    w = model.state_dict()[key].numpy()
    idx = naf.select_indices(w, k=2, rule="magnitude")
    target = naf.Target.from_weight(key, w, idx, np.ones(idx.shape, np.float32), value_dtype="F32")
    gm.merge_gguf(path, [naf.Adapter({key: target})], tmp_path / "m.gguf")
    merged = gr.read_gguf(tmp_path / "m.gguf")
    assert merged.kv == full.file.kv


# -- mistral3 ----------------------------------------------------------------------------------------------------
def build_ministral3(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Ministral3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=32, max_position_embeddings=64, rms_norm_eps=1e-6, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)  # head_dim 32: q_proj [HEADS * 32, HIDDEN], wider than the hidden size
    model = transformers.Ministral3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.endswith("norm.weight"):
                t.add_(torch.randn(t.shape) * 0.1)
    return model


def write_mistral3(path, model, matrix_type=QT.Q8_0):
    """A Ministral 3 model as llama.cpp's Ministral3Model (a LlamaModel) writes it: gguf-py's mistral3 table, the
    q_proj/k_proj rows permuted by LlamaModel.permute (test_gguf's llama_cpp_permute), 2-D weights but the embedding
    as matrix_type, the rest F32."""
    cfg = model.config
    tmap = gguf.TensorNameMap(gguf.MODEL_ARCH.MISTRAL3, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(os.fspath(path), "mistral3")
    rope = cfg.rope_parameters  # Ministral 3's is YaRN (its converter asserts so), written as the converter does
    add_tiny_hparams(w, inter=cfg.intermediate_size, rope_base=rope["rope_theta"])
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_rope_scaling_yarn_log_mul(rope["mscale_all_dim"])
    w.add_attn_temperature_scale(rope["llama_4_scaling_beta"])
    for key, t in model.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        if key.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, HEADS, HEADS)
        elif key.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, HEADS, KV_HEADS)
        g = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        add_like_llama_cpp(w, g, a, key, matrix_type)
    return finish(w, path)


def read_mistral3(path):
    """A mistral3 file read as transformers reads a llama one: gguf-py decodes, transformers' LlamaTensorProcessor
    undoes the rope permutation of attn_q/attn_k, into a Ministral3ForCausalLM (its loader has no mistral3)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    model = build_ministral3()
    stored = {t.name: quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
              for t in gguf.GGUFReader(os.fspath(path)).tensors}
    tmap = gguf.TensorNameMap(gguf.MODEL_ARCH.MISTRAL3, model.config.num_hidden_layers)
    unpermute = LlamaTensorProcessor()._reverse_permute_weights
    state = {}
    for key in model.state_dict():
        a = stored[tmap.get_name(key, try_suffixes=(".weight",))]
        if key.endswith("q_proj.weight"):
            a = unpermute(a, HEADS, HEADS)
        elif key.endswith("k_proj.weight"):
            a = unpermute(a, HEADS, KV_HEADS)
        state[key] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    model.load_state_dict(state)
    return model.eval()


def test_mistral3_file_maps_as_llama_cpp_permuted_it(tmp_path):
    """`mistral3` (Ministral 3, Mistral Small 3.x's text model): every linear weight by its key, q/k rows in
    Hugging Face order (the rope permutation undone, as transformers undoes it), keys() the model's; the file read by
    transformers' inverse permutation is the model; the rope alias q_proj_no_perm and the GGUF name keep file order."""
    model = build_ministral3()
    path = write_mistral3(tmp_path / "m.gguf", model, QT.F32)
    np.testing.assert_array_equal(logits(read_mistral3(path)), logits(model))
    view = gn.open_gguf_base(path)
    keys = linear_keys(model)
    assert set(keys) <= set(view.keys())
    sd = model.state_dict()
    assert set(sd) - {"lm_head.weight"} <= set(view.keys()) and "lm_head.weight" in view.keys()
    for key in keys:
        np.testing.assert_array_equal(view.array(key), sd[key].numpy(), err_msg=key)
    q = sd["model.layers.1.self_attn.q_proj.weight"].numpy()
    assert view.info("model.layers.1.self_attn.q_proj.weight")[1] == (HEADS * 32, HIDDEN)
    for name in ("model.layers.1.self_attn.q_proj_no_perm.weight", "blk.1.attn_q.weight"):
        np.testing.assert_array_equal(view.array(name), llama_cpp_permute(q, HEADS, HEADS), err_msg=name)


def test_mistral3_adapter_merges_into_the_gguf(tmp_path):
    """NeuroAda on every linear layer of the model read from the file, merged into it: F32 targets give the runtime's
    merged weights bit for bit (read back through transformers' inverse permutation), Q8_0 keeps > 95% of the
    adapter's change, untouched tensors keep their bytes; a fine-tune extracts against the file and merges back."""
    from neuroada_format.converters.pack import extract
    base = write_mistral3(tmp_path / "base.gguf", build_ministral3(), QT.Q8_0)
    model = read_mistral3(base)
    l_base = logits(model)
    attach(model, NeuroAdaConfig(k=4, target_modules="all-linear"))
    random_deltas_(model, seed=1, scale=0.05)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, value_dtype="F32")
    assert naf.validate(os.fspath(adapter / "neuroada_model.safetensors"), gn.open_gguf_base(base)).ok
    merged_rt = merge_and_unload(model)
    l_rt = logits(merged_rt)
    assert np.linalg.norm(l_rt - l_base) > 0.05 * np.linalg.norm(l_base)
    out = tmp_path / "f32.gguf"
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(adapter), "--out", os.fspath(out),
                      "--option", "target_type=F32"]) == 0
    back = read_mistral3(out)
    sd_rt, sd_back = merged_rt.state_dict(), back.state_dict()
    for key in sd_rt:
        np.testing.assert_array_equal(sd_back[key].numpy(), sd_rt[key].numpy(), err_msg=key)
    out_q = tmp_path / "q8.gguf"
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(adapter), "--out", os.fspath(out_q)]) == 0
    l_q = logits(read_mistral3(out_q))
    retention = 1 - np.linalg.norm(l_q - l_rt) / np.linalg.norm(l_rt - l_base)
    assert retention > 0.95, retention
    before, after = gr.read_gguf(base), gr.read_gguf(out_q)
    for name in ("token_embd.weight", "output.weight", "blk.0.attn_norm.weight", "output_norm.weight"):
        np.testing.assert_array_equal(after.raw(name), before.raw(name), err_msg=name)

    tuned = {key: t.numpy().copy() for key, t in read_mistral3(base).state_dict().items()}
    keys = linear_keys(build_ministral3())
    rng = np.random.default_rng(3)
    for key in keys:
        tuned[key][:, :3] += rng.standard_normal((tuned[key].shape[0], 3)).astype(np.float32) * 0.01
    extracted, _ = extract(base, {k: tuned[k] for k in keys}, k=3, value_dtype="F32")
    assert sorted(extracted.targets) == sorted(keys)
    assert naf.validate(extracted, gn.open_gguf_base(base)).ok
    gm.merge_gguf(base, [extracted], tmp_path / "tuned.gguf", target_type="F32")
    view = gn.open_gguf_base(tmp_path / "tuned.gguf")
    for key in keys:
        np.testing.assert_allclose(view.array(key), tuned[key], atol=1e-6, err_msg=key)


def test_mistral3_multimodal_adapter_merges_into_its_text_gguf(tmp_path):
    """Mistral Small 3.1/3.2 are Mistral3ForConditionalGeneration: text weights under `language_model.model.` in the
    checkpoint (`model.language_model.` in transformers 5's modules), which llama.cpp's converter drops (the Pixtral
    vision tower goes to the mmproj file). An adapter trained on it merges into the text GGUF as the runtime merges
    it, bit for bit; a vision tower target is 4.1 and writes nothing."""
    text = build_ministral3()
    cfg = transformers.Mistral3Config(
        text_config=text.config.to_dict(), image_token_index=VOCAB - 1, spatial_merge_size=2,
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=16, patch_size=4, image_size=16))
    vlm = transformers.Mistral3ForConditionalGeneration(cfg).float().eval()
    vlm.model.language_model.load_state_dict(text.model.state_dict())
    base = write_mistral3(tmp_path / "base.gguf", text, QT.F32)
    attach(vlm, NeuroAdaConfig(k=4, target_modules=r".*language_model\..*_proj"))
    random_deltas_(vlm, seed=1, scale=0.05)
    adapter = tmp_path / "adapter"
    save_adapter(vlm, adapter, value_dtype="F32")
    keys = naf.load(adapter / "neuroada_model.safetensors").targets
    # (saved as the checkpoint on the Hub names them: `language_model.model.`)
    assert sorted(keys) == sorted("language_model." + k for k in linear_keys(text))
    view = gn.open_gguf_base(base)
    assert view.storage_name("model.language_model.layers.1.self_attn.k_proj.weight") == "blk.1.attn_k.weight"
    assert view.storage_name("language_model.lm_head.weight") == "output.weight"
    out = tmp_path / "merged.gguf"
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(adapter), "--out", os.fspath(out)]) == 0
    merged = merge_and_unload(vlm).model.language_model.state_dict()
    back = read_mistral3(out).state_dict()
    for key in linear_keys(text):
        np.testing.assert_array_equal(back[key].numpy(), merged[key[len("model."):]].numpy(), err_msg=key)
        assert not np.array_equal(back[key].numpy(), text.state_dict()[key].numpy()), key

    vision_target_refused(tmp_path, base, transformers.Mistral3ForConditionalGeneration(cfg).float().eval(), r".*vision_tower.*\.q_proj")
