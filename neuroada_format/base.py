"""Base checkpoints as the validator and the converters see them: names -> lazily mapped arrays.

A base is a single .safetensors file, a Hugging Face folder (model.safetensors, or shards listed in
model.safetensors.index.json, never both: `_refuse_two_weight_sets`), an in-memory mapping of names to numpy
arrays, or, through the converters (optional extras), a .gguf file and, for one adapter, an .onnx model.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from .container import SafetensorsFile
from .dtypes import dtype_label, native
from .errors import NeuroAdaError, NeuroAdaUsageError, missing_extra
from .folder import STATE_MARKER
from .hashing import structure_hash
from .jsonparse import MAX_JSON_BYTES, read_json
from .metadata import METADATA_KEY

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CONFIG_CAP = 16 << 20  # a Hugging Face config.json is kilobytes; id2label tables reach a megabyte


class Checkpoint:
    """A safetensors checkpoint, possibly sharded. Nothing is read until an array is asked for."""

    def __init__(self, files: dict[str, SafetensorsFile], weight_map: dict[str, str], path: str,
                 index: dict | None = None):
        self.files = files            # shard file name -> parsed file
        self.weight_map = weight_map  # tensor name -> shard file name
        self.path = path
        self.index = index            # the parsed index json, when sharded

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def close(self) -> None:
        """Close every file (they also close when the checkpoint is dropped; a caller keeping an exception whose
        traceback holds it would keep them open). Idempotent."""
        for st in self.files.values():
            st.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys(self):
        return self.weight_map.keys()

    def file_of(self, name: str) -> SafetensorsFile:
        return self.files[self.weight_map[name]]

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        t = self.file_of(name).tensors[name]
        return t.dtype, t.shape

    def array(self, name: str) -> np.ndarray:
        return self.file_of(name).array(name)

    def structure_hash(self) -> str:
        return structure_hash((name, *self.info(name)) for name in self.weight_map)


class ArrayBase:
    """An in-memory base (e.g. a model's state dict converted to numpy), with the Checkpoint interface."""

    def __init__(self, arrays: Mapping[str, np.ndarray], path: str = "<memory>"):
        self.arrays = arrays
        self.path = path

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def keys(self):
        return self.arrays.keys()

    def _get(self, name: str):
        """The value under `name`, when it is an array (anything with a dtype and a shape): a list there used to
        end a validation with an AttributeError; it is a base that cannot be used (rule 1.6), raised."""
        a = self.arrays[name]
        if not (hasattr(a, "dtype") and hasattr(a, "shape")):
            raise NeuroAdaUsageError(f"the in-memory base holds a {type(a).__name__} under this name, not an "
                                     "array", path=self.path, tensor=name, rule="1.6")
        return a

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(dtype, shape). The dtype is named whatever it is (dtype_label): a big-endian F32 is F32, and a
        tensor safetensors has no name for (a complex rope table) no longer stops the structure hash."""
        a = self._get(name)
        return dtype_label(a.dtype), tuple(a.shape)

    def array(self, name: str) -> np.ndarray:
        """The array in native byte order (a big-endian one is copied: it is read for a few probes)."""
        a = np.asarray(self._get(name))
        return a if a.dtype.isnative else a.astype(native(a.dtype))

    def structure_hash(self) -> str:
        return structure_hash((name, *self.info(name)) for name in self.arrays)


INDEX_CAP = MAX_JSON_BYTES  # the one JSON limit (jsonparse); a 405B model's index json is under 1 MB


def _shard_name(name, index_path: str) -> str:
    """A shard must be a plain file name in the folder (it may be a symlink, as in the HF cache)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "\0" in name or "/" in name
            or "\\" in name or os.path.isabs(name)):
        raise NeuroAdaError(f"weight_map entry {name!r} is not a file name inside the folder",
                            path=index_path, rule="1.6")
    return name


def model_config(base) -> dict | None:
    """The `config.json` beside a base (in its folder, or beside a base file), or None when there is none.

    Read the one safe way (safe_io: regular files only; jsonparse: the one parser and its limits), so
    a FIFO raises NeuroAdaUsageError and a hostile text (100,000 levels deep, NaN) NeuroAdaError
    rule 1.6, never a hang or a RecursionError. A JSON value that is not an object counts as none.
    """
    path = getattr(base, "path", base)
    if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
        return None  # an in-memory base ("<memory>") has no folder
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config = os.path.join(folder, CONFIG_FILE)
    if not os.path.lexists(config):
        return None
    doc = read_json(config, rule="1.6", what="model config", cap=CONFIG_CAP)
    return doc if isinstance(doc, dict) else None


def _open_gguf(path: str):
    """A GGUF file (llama.cpp) as a base: the converters' strict reader, keyed by Hugging Face names and
    de-quantized to the values the probe hash covers (spec section 15). Imported on demand: gguf is optional."""
    try:
        from neuroada_format.converters.gguf_names import open_gguf_base
    except ImportError as exc:
        raise missing_extra("GGUF bases need", exc, "gguf", path=path) from None
    return open_gguf_base(path)


def _open_onnx(path: str, adapter):
    """An ONNX model as a base for one adapter: the converters' view (onnx_resolve.open_onnx_base), which finds each
    target as a merge does (by name, exporter scope, node name, else probe hash; spec 15.4), so it exists only for an
    adapter. Imported on demand: onnx is optional."""
    if adapter is None:
        raise NeuroAdaUsageError("an ONNX model is read as a base for one adapter (its targets are found in the graph "
                                 "by the adapter's names, shapes and probe hashes): neuroada validate and "
                                 "neuroada-merge read it, this command does not; give a safetensors checkpoint",
                                 path=path, rule="1.6")
    try:
        from neuroada_format.converters.onnx_resolve import open_onnx_base
    except ImportError as exc:
        raise missing_extra("ONNX bases need", exc, "onnx", path=path) from None
    return open_onnx_base(path, adapter)


def _refuse_two_weight_sets(folder: str, single: str, weight_map: dict[str, str]) -> None:
    """A folder holding both model.safetensors and an index json listing other files (typically a leftover of an
    earlier save with another shard size) holds two sets of weights, and loaders disagree on which is the model:
    transformers' from_pretrained loads model.safetensors whenever it is a file (modeling_utils checks
    SAFE_WEIGHTS_NAME before SAFE_WEIGHTS_INDEX_NAME), loaders that follow the index load its shards. Whichever we
    picked, a merge, a validation or an extraction could use other weights than the ones the model is loaded from
    (and a merged copy would carry the unmerged set along), so the folder is refused, naming both files. An index
    that lists model.safetensors alone names the same weights: no ambiguity. A model.safetensors that is no file
    (a dangling link, a folder) is skipped, as transformers skips it, and the index is used."""
    if os.path.isfile(single) and set(weight_map.values()) - {SINGLE_FILE}:
        raise NeuroAdaError(f"holds both {SINGLE_FILE} and {INDEX_FILE}, which lists other files: two sets of "
                            f"weights (transformers loads {SINGLE_FILE}, loaders following the index its shards), so "
                            f"which one is the model is ambiguous; remove the one that is a leftover of an earlier "
                            f"save", path=folder, rule="1.6")


# output heads that transformers ties to the input embeddings (GPT-2's, Falcon's, Llama's with tie_word_embeddings,
# Whisper's proj_out, GPT-NeoX's embed_out): save_pretrained stores the shared tensor once, under the embedding's name
TIED_HEADS = ("lm_head", "proj_out", "embed_out")


def absent_target(base, name: str) -> str:
    """Rule 4.1's message. A tied output head is not stored in the checkpoint, so a target on it (the runtime trains
    one additively) used to read as a wrong base; say why it is absent and what to do."""
    detail = "target is not a tensor of the base"
    if not isinstance(base, Checkpoint) or name.rpartition(".")[0].rpartition(".")[2] not in TIED_HEADS:
        return detail
    folder = base.path if os.path.isdir(base.path) else os.path.dirname(base.path)
    try:
        config = read_json(os.path.join(folder, "config.json"), rule=None, what="model config", cap=1 << 20)
        tied = config.get("tie_word_embeddings") is True or \
            (config.get("text_config") or {}).get("tie_word_embeddings") is True
    except (NeuroAdaError, AttributeError):
        return detail
    if not tied:
        return detail
    return (f"{detail}: this checkpoint ties the output head to the input embeddings (tie_word_embeddings in "
            f"config.json), so the head is stored once, as the embedding, and a delta on it cannot be merged into "
            f"the file without changing the embeddings too; serve the adapter unmerged (load_adapter), or train "
            f"with the head untied or not targeted")


PEFT_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _refuse_adapter(st: SafetensorsFile, path: str) -> None:
    """An adapter given as the base (the two arguments swapped, or the adapter's folder given twice) used to be read
    as a checkpoint of a few tensors: every target was then 'not a tensor of the base', one line each."""
    if st.metadata and METADATA_KEY in st.metadata:
        raise NeuroAdaError("this is a NeuroAda adapter, not a base checkpoint (base and adapter given the other way "
                            "round?)", path=path, rule="1.6")
    if STATE_MARKER in st.tensors:  # a save_pretrained / Trainer checkpoint folder: its model.safetensors is the state
        raise NeuroAdaError("this is a NeuroAda training checkpoint (save_pretrained or a Trainer checkpoint: the "
                            "adapter and its trainable state), not a base checkpoint; give it as the adapter (base and "
                            "adapter given the other way round?), or merge it into the base first", path=path,
                            rule="1.6")


def open_base(base, adapter=None) -> Checkpoint | ArrayBase:
    """Open a base given as a path (file or HF folder) or a mapping of name -> numpy array. An `.onnx` file is
    opened for `adapter` (`_open_onnx`), and refused without one."""
    if all(hasattr(base, a) for a in ("__contains__", "info", "array")):
        return base  # anything with the base interface (Checkpoint, ArrayBase, converters' ONNX view)
    if isinstance(base, Mapping):
        return ArrayBase(base)
    path = os.fspath(base)
    if os.path.isdir(path):
        index_path = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        if os.path.lexists(index_path):  # present: it is read (safe_io refuses a FIFO, a device, a dangling link)
            index = read_json(index_path, rule="1.6", what="index json", cap=INDEX_CAP)
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict):
                raise NeuroAdaError("index json has no weight_map object", path=index_path, rule="1.6")
            weight_map = {k: _shard_name(v, index_path) for k, v in wm.items()}
            _refuse_two_weight_sets(path, single, weight_map)
            files: dict[str, SafetensorsFile] = {}
            try:  # a refusal closes what it opened (a caller keeping the exception kept the files open)
                for shard in sorted(set(weight_map.values())):
                    files[shard] = SafetensorsFile(os.path.join(path, shard), unknown_dtypes=True)
                for shard, st in files.items():  # a shard is a base file like any other: no adapter (spec 2.6)
                    _refuse_adapter(st, os.path.join(path, shard))
                for key, shard in weight_map.items():
                    if key not in files[shard].tensors:
                        raise NeuroAdaError(f"weight_map says {key!r} is in {shard}, which lacks it",
                                            path=index_path, rule="1.6")
            except BaseException:
                Checkpoint(files, weight_map, path).close()
                raise
            return Checkpoint(files, weight_map, path, index)
        if not os.path.lexists(single):
            candidates = sorted(f for f in os.listdir(path)
                                if f.endswith(".safetensors") and not f.startswith("."))
            if len(candidates) != 1:  # several: which one is the model cannot be guessed, so say they were seen
                several = (f", and {len(candidates)} other .safetensors files ({', '.join(candidates[:4])[:200]}"
                           f"{', ...' if len(candidates) > 4 else ''}): name the file" if candidates else "")
                raise NeuroAdaError(f"no {SINGLE_FILE} or {INDEX_FILE} in the folder{several}", path=path,
                                    rule="1.6")
            if candidates[0] == PEFT_ADAPTER_FILES[1] and os.path.lexists(os.path.join(path, PEFT_ADAPTER_FILES[0])):
                raise NeuroAdaError(f"a PEFT adapter folder ({', '.join(PEFT_ADAPTER_FILES)}), not a base checkpoint",
                                    path=path, rule="1.6")
            single = os.path.join(path, candidates[0])
        path = single
    if not os.path.lexists(path):
        raise NeuroAdaUsageError("no such file or folder", path=path, rule="1.1")
    if path.lower().endswith(".gguf"):
        return _open_gguf(path)
    if path.lower().endswith(".onnx"):  # in any letter case, as the converters claim ONNX files
        return _open_onnx(path, adapter)
    st = SafetensorsFile(path, unknown_dtypes=True)
    try:
        _refuse_adapter(st, path)
    except BaseException:
        st.close()
        raise
    name = os.path.basename(path)
    return Checkpoint({name: st}, {k: name for k in st.tensors}, path)
