"""Split GGUF sets (llama.cpp's gguf-split, and gguf-py's writer with a shard limit): NAME-00001-of-0000N.gguf and
its siblings, each a complete GGUF file carrying `split.no` (0-based), `split.count` and `split.tensors.count`, the
first also the model's metadata. Given its first shard, llama.cpp loads the set as one model; so does this module
(spec section 15.1): it finds the siblings by llama.cpp's naming, checks that they belong together and presents them
as one GGUFFile-like object whose tensors are the union and whose metadata is the first shard's.

A module of its own because the reader (gguf_read) parses one file and must stay that simple, while the base view
(gguf_names) only needs "the tensors and their data", which this supplies for a set as a GGUFFile does for a file.
"""
from __future__ import annotations

import os
import re

import numpy as np

from neuroada_format import NeuroAdaError, NeuroAdaUsageError

from .gguf_read import RULE, GGUFFile, TensorInfo, read_gguf

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
# llama.cpp's shard names (llama_split_path: "%s-%05d-of-%05d.gguf"); numbers wider than 5 digits are its %05d too
_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5,})-of-(?P<count>\d{5,})\.gguf$")


def shard_name(prefix: str, no: int, count: int) -> str:
    """llama.cpp's name of shard `no` (0-based) of `count`."""
    return f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf"


def output_shards(out: str, count: int) -> list[str]:
    """The paths of a merged copy of a set of `count` shards for the OUT given (spec section 15.3): OUT's first shard
    name itself (PREFIX-00001-of-0000N.gguf, N = count), or else OUT's name less `.gguf` as the PREFIX, as llama.cpp
    needs them (it finds the siblings from the first shard's name). An OUT named as another shard, or as a shard of
    another count, is refused: its PREFIX would name a set it is not part of."""
    folder, name = os.path.split(out)
    m = _NAME.match(name)
    if m is not None:
        if int(m["no"]) != 1 or int(m["count"]) != count:
            raise NeuroAdaUsageError(f"the output is named as shard {int(m['no'])} of {int(m['count'])} of a split "
                                     f"set, and the base is a set of {count}: name the output PREFIX.gguf or "
                                     f"{shard_name(m['prefix'], 0, count)}", path=out, rule=RULE)
        prefix = m["prefix"]
    else:
        prefix = name[:-len(".gguf")] if name.lower().endswith(".gguf") else name
    if not prefix:
        raise NeuroAdaUsageError("the output's name has no PREFIX for its shards' names", path=out)
    return [os.path.join(folder, shard_name(prefix, i, count)) for i in range(count)]


def _int(f: GGUFFile, key: str):
    v = f.kv.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def split_of(f: GGUFFile) -> tuple[int, int] | None:
    """(split.no, split.count) of a shard of a set of two or more; None for a whole file: one with neither key, or a
    set of one whatever its split.no (spec section 15.1; llama.cpp reads split.no only for a count of two or more)."""
    if SPLIT_COUNT not in f.kv and SPLIT_NO not in f.kv:
        return None
    no, count = _int(f, SPLIT_NO), _int(f, SPLIT_COUNT)
    if count == 1:
        return None
    if count is None or no is None or not 0 <= no < count:
        raise f.err(f"split metadata is not a shard's: {SPLIT_NO}={f.kv.get(SPLIT_NO)!r}, "
                    f"{SPLIT_COUNT}={f.kv.get(SPLIT_COUNT)!r}")
    return None if count == 1 else (no, count)


class GGUFSet:
    """The shards of a split set read as one file: what GGUFBase reads of a GGUFFile (path, kv, tensors, and the
    data of each tensor, read from the shard holding it). `path` is the first shard's, as llama.cpp is given it."""

    def __init__(self, shards: list[GGUFFile]):
        self.shards = shards
        first = shards[0]
        self.path, self.kv = first.path, first.kv
        self.owner: dict[str, GGUFFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for s in shards:
            for name, info in s.tensors.items():
                if name in self.owner:
                    other = os.path.basename(self.owner[name].path)
                    raise NeuroAdaError(f"tensor is in two shards of the split set ({other} and "
                                        f"{os.path.basename(s.path)})", path=s.path, tensor=name, rule=RULE)
                self.owner[name], self.tensors[name] = s, info

    def err(self, msg: str, tensor: str | None = None) -> NeuroAdaError:
        return (self.owner[tensor] if tensor in self.owner else self.shards[0]).err(msg, tensor)

    def raw(self, name: str) -> np.ndarray:
        return self.owner[name].raw(name)

    def blocks(self, name: str) -> np.ndarray:
        return self.owner[name].blocks(name)

    def decode(self, name: str) -> np.ndarray:
        return self.owner[name].decode(name)

    def values_at(self, name: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.owner[name].values_at(name, rows, cols)


def read_gguf_or_set(path) -> GGUFFile | GGUFSet:
    """A GGUF file, or the split set whose first shard it is (checked whole: every shard present, numbered and
    counted alike, no tensor twice, as many tensors as split.tensors.count). Any other shard is refused, naming the
    first: llama.cpp too is given the first shard."""
    first = read_gguf(path)
    split = split_of(first)
    if split is None:
        return first
    no, count = split
    folder, name = os.path.split(first.path)
    m = _NAME.match(name)
    named = m is not None and int(m["no"]) == no + 1 and int(m["count"]) == count
    if no != 0:
        hint = f"; give the first, {shard_name(m['prefix'], 0, count)}" if named else ""
        raise NeuroAdaUsageError(f"shard {no + 1} of {count} of a split GGUF set (llama.cpp's gguf-split), not a "
                                 f"model by itself{hint}", path=first.path, rule=RULE)
    if not named:
        raise first.err(f"the first shard of a split set of {count} ({SPLIT_COUNT}), but not named as llama.cpp names "
                        f"one (NAME-00001-of-{count:05d}.gguf), so its other shards cannot be found")
    shards = [first]
    for i in range(1, count):
        p = os.path.join(folder, shard_name(m["prefix"], i, count))
        if not os.path.lexists(p):
            raise NeuroAdaError(f"shard {i + 1} of the split set is missing: {os.path.basename(p)}", path=first.path,
                                rule=RULE)
        s = read_gguf(p)
        if split_of(s) != (i, count):
            raise s.err(f"{SPLIT_NO}={s.kv.get(SPLIT_NO)!r}, {SPLIT_COUNT}={s.kv.get(SPLIT_COUNT)!r}: not shard "
                        f"{i + 1} of {count} of {name}'s set")
        if _int(s, SPLIT_TENSORS) != _int(first, SPLIT_TENSORS):
            raise s.err(f"{SPLIT_TENSORS}={s.kv.get(SPLIT_TENSORS)!r}, the first shard says "
                        f"{first.kv.get(SPLIT_TENSORS)!r}: not of one set")
        shards.append(s)
    whole = GGUFSet(shards)
    if len(whole.tensors) != _int(first, SPLIT_TENSORS):
        raise first.err(f"the {count} shards hold {len(whole.tensors)} tensors, {SPLIT_TENSORS} says "
                        f"{first.kv.get(SPLIT_TENSORS)!r}")
    return whole
