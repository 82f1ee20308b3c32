"""Shared fixtures: seeded randomness, real adapter/base files on disk, and raw safetensors bytes.

Everything here is generic (no test's expectations live here) so format, runtime and converter tests
can all build the same kind of real files in a tmp_path.
"""
from __future__ import annotations

import json
import math
import os
import struct
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

import neuroada_format as naf

NP_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
             "I16": np.dtype("<i2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"), "U8": np.dtype("u1")}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_weight(rng, shape, dtype="BF16"):
    """A base weight as stored, in one of the base dtypes."""
    return (rng.standard_normal(shape) * 0.05).astype(NP_DTYPES[dtype])


def random_sorted_indices(rng, d_out, d_in, k):
    """[d_out, k] strictly increasing columns per row, drawn uniformly (fast: argpartition of noise)."""
    noise = rng.random((d_out, d_in))
    return np.sort(np.argpartition(noise, k - 1, axis=1)[:, :k], axis=1)


def make_target(rng, name="model.layers.0.mlp.up_proj.weight", shape=(16, 32), k=4, *, base_dtype="BF16",
                value_dtype="BF16", layout="out_in", weight=None, select="magnitude"):
    """(stored weight, Target) for a canonical shape [d_out, d_in]; indices by magnitude or at random."""
    d_out, d_in = shape
    if weight is None:
        stored = (d_out, d_in) if layout == "out_in" else (d_in, d_out)
        weight = random_weight(rng, stored, base_dtype)
    canon = weight if layout == "out_in" else weight.T
    if select == "magnitude":
        idx = naf.select_indices(canon, k)
    else:
        idx = random_sorted_indices(rng, d_out, d_in, k)
    values = (rng.standard_normal((d_out, k)) * 0.01).astype(NP_DTYPES[value_dtype])
    return weight, naf.Target.from_weight(name, weight, idx, values, layout=layout, value_dtype=value_dtype)


@pytest.fixture
def small_model(rng):
    """A tiny Llama-shaped base (dict of bf16 arrays) and a valid k=3 adapter for three of its weights."""
    base = {
        "model.embed_tokens.weight": random_weight(rng, (32, 16)),
        "model.layers.0.self_attn.q_proj.weight": random_weight(rng, (16, 16)),
        "model.layers.0.mlp.up_proj.weight": random_weight(rng, (40, 16)),
        "model.layers.0.mlp.down_proj.weight": random_weight(rng, (16, 40)),
        "model.norm.weight": random_weight(rng, (16,)),
    }
    targets = {}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.0.mlp.down_proj.weight"):
        _, t = make_target(rng, name, base[name].shape, 3, weight=base[name])
        targets[name] = t
    adapter = naf.Adapter(targets, base_name="tiny-llama", base_revision="r1",
                          structure_hash=naf.ArrayBase(base).structure_hash())
    return base, adapter


def write_base(folder, arrays: dict, *, shards: int = 0, single_name: str = "model.safetensors"):
    """Write a base as a HF folder: one model.safetensors (shards=0) or N shards + index json."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    names = sorted(arrays)
    if shards == 0:
        save_file({n: np.ascontiguousarray(arrays[n]) for n in names}, os.path.join(folder, single_name),
                  metadata={"format": "pt"})
        return os.fspath(folder)
    weight_map = {}
    per = math.ceil(len(names) / shards)
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s * per:(s + 1) * per]
        save_file({n: np.ascontiguousarray(arrays[n]) for n in part}, os.path.join(folder, shard),
                  metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    total = sum(int(a.nbytes) for a in arrays.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return os.fspath(folder)


# -- raw safetensors bytes, for files no well-behaved writer would produce -----------------------------
def tensor_entries(tensors: dict[str, tuple[str, tuple, bytes]]):
    """Header entries and the data section for {name: (dtype, shape, raw bytes)}, packed in order."""
    header, data, pos = {}, bytearray(), 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        data += raw
        pos += len(raw)
    return header, bytes(data)


def raw_safetensors(header, data: bytes = b"", *, header_len: int | None = None, pad: bool = True) -> bytes:
    """Bytes of a safetensors file from a header (dict, str or bytes), with an optional lying length."""
    if isinstance(header, dict):
        text = json.dumps(header, separators=(",", ":")).encode()
    elif isinstance(header, str):
        text = header.encode()
    else:
        text = bytes(header)
    if pad and isinstance(header, dict):
        text += b" " * (-len(text) % 8)
    n = len(text) if header_len is None else header_len
    return struct.pack("<Q", n) + text + data


def adapter_bytes(targets: dict[str, dict], *, doc_overrides: dict | None = None,
                  metadata: dict | None = None, extra_tensors: dict | None = None) -> bytes:
    """A hand-packed adapter file. targets: {name: {indices, values (numpy), shape, layout, dtype, k, probe}}.

    Any metadata field can be overridden (doc_overrides) or the whole __metadata__ replaced (metadata),
    so tests can produce exactly one defect at a time.
    """
    tensors = {}
    doc_targets = {}
    for name, t in targets.items():
        idx, val = t["indices"], t["values"]
        tensors["indices/" + name] = (t.get("index_dtype") or naf_dtype(idx.dtype), t.get("index_shape", idx.shape),
                                      idx.tobytes())
        tensors["values/" + name] = (t.get("value_dtype") or naf_dtype(val.dtype), t.get("value_shape", val.shape),
                                     val.tobytes())
        doc_targets[name] = {"shape": list(t.get("shape", (idx.shape[0], 64))), "layout": t.get("layout", "out_in"),
                             "dtype": t.get("dtype", "BF16"), "k": t.get("k", idx.shape[1]),
                             "probe": t.get("probe", "sha256:" + "0" * 64)}
    tensors.update(extra_tensors or {})
    header, data = tensor_entries(tensors)
    if metadata is None:
        doc = {"format": "neuroada", "version": "1.0",
               "base": {"name": None, "revision": None, "structure_hash": None},
               "selection": {"rule": "magnitude", "tie_break": "lower-column"},
               "merge": {"rule": "add-f32-round-once"}, "targets": doc_targets}
        doc.update(doc_overrides or {})
        metadata = {"neuroada": json.dumps(doc)}
    header = {"__metadata__": metadata, **header}
    return raw_safetensors(header, data)


def naf_dtype(dtype) -> str:
    from neuroada_format.dtypes import dtype_name

    return dtype_name(dtype)


@pytest.fixture(scope="session")
def craft():
    """The builders above as one namespace (session-scoped, so hypothesis tests may use it too)."""
    return SimpleNamespace(weight=random_weight, indices=random_sorted_indices, target=make_target,
                           base=write_base, entries=tensor_entries, raw=raw_safetensors,
                           adapter=adapter_bytes, dtypes=NP_DTYPES)


@pytest.fixture
def raw_file(tmp_path):
    """Write bytes to a fresh file under tmp_path and return its path."""
    counter = iter(range(1_000_000))

    def write(data: bytes, name: str | None = None) -> str:
        path = tmp_path / (name or f"raw-{next(counter)}.safetensors")
        path.write_bytes(data)
        return os.fspath(path)

    return write
