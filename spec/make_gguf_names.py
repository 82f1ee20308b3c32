"""Write spec/gguf-names.json: every Hugging Face (and other) key that spec section 15.2 maps to a GGUF tensor.

The reference maps keys through gguf-py's TensorNameMap; this file writes that table out for the architectures of
section 15.2, so that an implementation without gguf-py maps the same keys. Regenerate it with the gguf-py version
the spec names (`python spec/make_gguf_names.py`); tests/format/test_spec_doc.py checks it against gguf-py.
"""
from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version

import gguf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from neuroada_format.converters.gguf_names import ARCHS  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gguf-names.json")


def table(arch_name: str) -> dict[str, list[str]]:
    """GGUF tensor name (`{N}`: the block number) -> the keys that name it, sorted; the GGUF name is itself one.
    Built in gguf-py's order, so that a key its table lists for two tensors goes where gguf-py's last entry puts it."""
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    names: dict[str, str] = {}
    blocks = {**gguf.TensorNameMap.block_mappings_cfg, **gguf.TensorNameMap.arch_block_mappings_cfg.get(arch, {})}
    for cfg in (gguf.TensorNameMap.mappings_cfg, blocks):
        for tensor, keys in cfg.items():
            if tensor in gguf.MODEL_TENSORS[arch]:
                name = gguf.TENSOR_NAMES[tensor].replace("{bid}", "{N}")
                for key in (name, *keys):
                    names[key.replace("{bid}", "{N}")] = name
    out: dict[str, list[str]] = {}
    for key, name in names.items():
        out.setdefault(name, []).append(key)
    return {name: sorted(keys) for name, keys in sorted(out.items())}


def document() -> dict:
    return {"format": "neuroada-gguf-names", "gguf_py": version("gguf"),
            "rope_permuted": sorted(a for a, reorder in ARCHS.items() if reorder == "rope"),
            "qkv_regrouped": sorted(a for a, reorder in ARCHS.items() if reorder == "qkv"),
            "architectures": {a: table(a) for a in sorted(ARCHS)}}


def main() -> int:
    text = json.dumps(document(), indent=1, ensure_ascii=False) + "\n"
    with open(OUT + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(OUT + ".tmp", OUT)
    print(f"wrote {OUT} ({len(text):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
