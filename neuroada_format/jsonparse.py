"""The one JSON parser, with one set of limits, for every JSON text the project reads.

Safetensors headers, the adapter metadata document, checkpoint index files and configuration files
(neuroada_config.json, adapter_config.json, a base's config.json) all go through `strict_json`, so a
text is accepted by every tool or by none: `neuroada validate` cannot call valid what a merge, a pack
or `load_adapter` later refuses (spec section 11.1 lists the limits):

- at most MAX_JSON_BYTES (100,000,000) bytes, the safetensors header cap;
- nesting at most MAX_DEPTH (64) arrays/objects deep: deep enough for any real document (a header
  is 3 deep, the metadata document 4, Hugging Face configs under 10), shallow enough that nothing
  downstream (copying, re-serialising) can hit Python's recursion limit;
- no key twice in one object, no NaN/Infinity/-Infinity constants, no number that overflows to
  infinity (1e999), no integer literal of more than MAX_INT_DIGITS (4300) digits;
- no string that is not Unicode text: a lone surrogate escape (`"\\ud800"`) is valid JSON syntax, but it
  names no character, cannot be written as UTF-8 (hashing or re-saving such a name would crash), and
  safetensors' own parser (serde_json) refuses it.

Every refusal is a ValueError, whatever the cause (a RecursionError inside the parser included).
"""
from __future__ import annotations

import json
import math
import os
import re

from .errors import NeuroAdaError

MAX_JSON_BYTES = 100_000_000
MAX_DEPTH = 64
MAX_INT_DIGITS = 4300  # Python's own default limit for int('...'), made explicit


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows to infinity")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"integer of {digits} digits (more than {MAX_INT_DIGITS})")
    return int(text)


_CONTAINERS = (dict, list)
# anchored at a run's first digit: unanchored, each of a run's n positions rescans the run (n^2 / 2 steps;
# 400 runs of 4300 digits took 3.5 s)
_LONG_DIGITS = re.compile(r"(?<![0-9])[0-9]{%d}" % (MAX_INT_DIGITS + 1))
# What can decode to a lone surrogate: an escape \uD800-\uDFFF, or the code point itself in a str given
# directly (never in one decoded from UTF-8). Two searches: the escape alone scans 20 MB in ~6 ms.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def depth(value, stop: int | None = None) -> int:
    """Nesting depth: 0 for a scalar, 1 + the deepest member for an array or object.

    Level by level, without recursion; stops early once deeper than `stop`. Runs of scalars are
    skipped at C speed (set(map(type, ...))): about 20 ms for a 10,000-tensor checkpoint header.
    """
    level = [value] if type(value) in _CONTAINERS else []
    reached = 0
    while level:
        reached += 1
        if stop is not None and reached > stop:
            break
        below = []
        for node in level:
            members = node.values() if type(node) is dict else node
            kinds = set(map(type, members))
            if dict in kinds or list in kinds:
                below += [m for m in members if type(m) in _CONTAINERS]
        level = below
    return reached


def strict_json(text, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH, file_names: bool = False):
    """Parse one JSON text (str, or bytes in UTF-8) under the limits above; ValueError when refused.

    `file_names`: for a document of our own that records paths (the merge journal), also accept the escapes
    \udc80-\udcff that Python writes for a path's bytes that are no UTF-8 (os.fsdecode), so such a path reads
    back as the same file; every other lone surrogate is still refused."""
    if len(text) > max_bytes:
        raise ValueError(f"JSON text of {len(text):,} bytes is larger than {max_bytes:,}")
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8")  # UnicodeDecodeError is a ValueError
    # Only a text holding a run of more than MAX_INT_DIGITS digits can hold such an integer: the
    # others skip the per-integer hook (a 100 MB header of integers parses 3x faster without it).
    bounded = _bounded_int if _LONG_DIGITS.search(text) else None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants,
                           parse_float=_finite_float, parse_int=bounded)
    except RecursionError:
        raise ValueError(f"nested more than {max_depth} levels deep") from None
    if depth(value, stop=max_depth) > max_depth:
        raise ValueError(f"nested more than {max_depth} levels deep")
    # rare: only then walk the value (a high-low pair decodes to one character and passes)
    if _SURROGATE_ESCAPE.search(text) or (not text.isascii() and _SURROGATE.search(text)):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogateescape" if file_names else "strict")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate escape (\\ud800-\\udfff), which is not "
                             "Unicode text") from None
    return value


def read_json(path, *, rule: str | None, what: str = "JSON file", cap: int = MAX_JSON_BYTES):
    """Parse a JSON file through `safe_io` (regular files only) and `strict_json`.

    NeuroAdaUsageError when the path cannot be read (missing, a FIFO or device: exit 2), NeuroAdaError
    with `rule` when the text is refused (exit 1). Use this for every config and index file.
    """
    from .safe_io import read_regular

    path = os.fspath(path)
    data = read_regular(path, cap, rule=rule, what=what)
    try:
        return strict_json(data, max_bytes=cap)
    except ValueError as exc:
        raise NeuroAdaError(f"{what} is not valid JSON: {exc}", path=path, rule=rule) from None
