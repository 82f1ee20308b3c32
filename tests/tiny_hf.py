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
