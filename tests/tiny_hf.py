"""The tiny Hugging Face models (a Llama; T5 and BART for encoder-decoders) that the runtime and PEFT-interop tests
build from a config (nothing downloaded)."""
from __future__ import annotations

import torch
import transformers


def tiny_llama(seed=0, dtype=torch.float32, **kw) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=100)
    cfg.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(dtype).eval()


# bos/eos/pad inside a tiny vocabulary (some classes' defaults, e.g. Phi3's 32000, are not)
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_t5(vocab_size=96) -> transformers.T5ForConditionalGeneration:
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        **TOKENS))


def tiny_bart(vocab_size=96) -> transformers.BartForConditionalGeneration:
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        decoder_start_token_id=2, forced_eos_token_id=None, **TOKENS))


def with_deltas(model, k=3, seed=1, **cfg):
    """Attach NeuroAda and give the deltas f32 values off the BF16 grid, as training leaves them
    (reproducible and fast)."""
    from neuroada_format.runtime import NeuroAdaConfig, attach
    from neuroada_format.runtime.guards import layers

    attach(model, NeuroAdaConfig(k=k, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model).values():
            v = layer.neuroada_val["default"]
            v.copy_(torch.randn(v.shape, generator=g) * 0.05)
    return model
