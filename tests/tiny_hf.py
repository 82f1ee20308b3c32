"""The tiny Hugging Face Llama that the runtime and PEFT-interop tests build from a config (nothing downloaded)."""
from __future__ import annotations

import torch
import transformers


def tiny_llama(seed=0, dtype=torch.float32, **kw) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=100)
    cfg.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(dtype).eval()


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
