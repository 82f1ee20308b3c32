"""The adapter's JSON metadata document: version handling and JSON Schema validation (rules 2.x).

safetensors' `__metadata__` holds strings only, so the whole document is stored as one JSON string
under the key "neuroada"; the schema lives in spec/schema/ and ships inside the package.
"""
from __future__ import annotations

import itertools
import json
import re
from functools import lru_cache
from importlib import resources

from .container import Problems
from .jsonparse import strict_json

FORMAT_NAME = "neuroada"
METADATA_KEY = "neuroada"
VERSION = "1.0"
SUPPORTED_MAJOR = 1
MODULE_VERSION = "1.2"  # the first version that defines targets.T.module
MERGE_RULE = "add-f32-round-once"
_VERSION_RE = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")  # fullmatch: "$" would let "1.0\n" through


def version_for(targets) -> str:
    """The version a new file is written as: the lowest that defines the fields it uses. A file whose targets
    record no `module` is "1.0", byte for byte what earlier writers wrote."""
    return MODULE_VERSION if any("module" in t.extra for t in targets) else VERSION


def version_key(version: str) -> tuple:
    """A sort key for a valid MAJOR.MINOR: without leading zeros, a longer number is larger, so the parts
    compare as (length, text), with no int() (which refuses over 4300 digits)."""
    major, minor = version.split(".")
    return (len(major), major), (len(minor), minor)


@lru_cache(maxsize=1)
def schema() -> dict:
    text = resources.files("neuroada_format.spec").joinpath("schema/metadata-v1.schema.json").read_text()
    return json.loads(text)


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(schema())


def parse_document(metadata: dict | None, p: Problems) -> dict | None:
    """The checked metadata document, or None after reporting why it can't be used."""
    if metadata is None or METADATA_KEY not in metadata:
        p.error("2.1", f"__metadata__ has no {METADATA_KEY!r} entry: not a NeuroAda adapter")
        return None
    try:
        doc = strict_json(metadata[METADATA_KEY])  # the one parser and its limits (jsonparse)
    except ValueError as exc:
        p.error("2.2", f"metadata is not valid JSON: {exc}")
        return None
    if not isinstance(doc, dict):
        p.error("2.2", "metadata JSON is not an object")
        return None
    if doc.get("format") != FORMAT_NAME:
        p.error("2.2", f"metadata format is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
        return None
    version = doc.get("version")
    match = _VERSION_RE.fullmatch(version) if isinstance(version, str) else None
    if not match:
        p.error("2.3", f"version {version!r} is not MAJOR.MINOR")
        return None
    if match.group(1) != str(SUPPORTED_MAJOR):  # compared as text: int() refuses over 4300 digits
        newer = "a newer" if version_key(version) > version_key(f"{SUPPORTED_MAJOR}.0") else "an older"
        shown = version if len(version) <= 40 else f"{version[:20]}... ({len(version)} characters)"
        if newer == "a newer":
            p.error("2.3", f"written for spec version {shown}, a newer major version than this reader "
                           f"supports ({SUPPORTED_MAJOR}.x); upgrade neuroada-format to read it")
        else:  # no release reads it: upgrading cannot help
            p.error("2.3", f"written for spec version {shown}, an older major version, which is not supported "
                           f"(this reader reads {SUPPORTED_MAJOR}.x only)")
        return None
    if _plainly_valid(doc):
        return doc if _strict_types(doc, p) else None
    # the first 20 only: sorting them all cost ~100 us and ~3.5 KB a broken target (75 s at the header cap)
    errors = sorted(itertools.islice(_validator().iter_errors(doc), 20), key=lambda e: list(e.absolute_path))
    for err in errors:
        where = "/".join(_shorten(str(x)) for x in err.absolute_path) or "(document)"
        tensor = None
        if len(err.absolute_path) >= 2 and err.absolute_path[0] == "targets":
            tensor = _shorten(str(err.absolute_path[1]))
        elif "propertyNames" in err.relative_schema_path and isinstance(err.instance, str):
            tensor = _shorten(err.instance)  # a bad target key: name it (spec 7), shortened like the message
        p.error("2.2", f"metadata {where}: {_short_message(err)}", tensor=tensor)
    if errors:
        return None
    return doc if _strict_types(doc, p) else None


_SHOWN = 80  # characters of a key shown in a message: a 1,000,000-character key made a 1 MB one-line message


def _shorten(text: str) -> str:
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}... ({len(text):,} characters)"


def _short_message(err) -> str:
    """jsonschema's message, with a long string it quotes (a target key over 1024 characters) shortened."""
    message = err.message
    if isinstance(err.instance, str) and len(err.instance) > _SHOWN:
        message = message.replace(repr(err.instance), repr(err.instance[:_SHOWN]) +
                                  f"... ({len(err.instance):,} characters)")
    return message if len(message) <= 4 * _SHOWN else f"{message[:4 * _SHOWN]}... ({len(message):,} characters)"


_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
_V1 = re.compile(r"1\.(0|[1-9][0-9]*)")
_RULES = frozenset(("magnitude", "reverse", "random", "gradient", "delta", "union", "custom"))
_I32_MAX = 2147483647


def _plainly_valid(doc: dict) -> bool:
    """A fast check that implies the schema holds; never the reverse.

    jsonschema's import and its walk over every target cost ~50-80 ms per adapter here (a quarter
    of a `neuroada-merge` run on a 1.6 GB checkpoint). Documents that pass this stricter check (ints
    must be Python ints, patterns must match whole strings) skip it; anything else, valid or not,
    goes to jsonschema, which alone words the errors. tests/format/test_metadata_fast.py checks on
    the conformance vectors and on random mutations that this never accepts what the schema rejects.
    """
    def is_str(x, n=None):
        return isinstance(x, str) if n is None else isinstance(x, str) and n.fullmatch(x) is not None

    def is_count(x):
        return type(x) is int and 1 <= x <= _I32_MAX

    base, sel, merge, targets = (doc.get(key) for key in ("base", "selection", "merge", "targets"))
    if not (doc.get("format") == FORMAT_NAME and is_str(doc.get("version"), _V1)
            and isinstance(base, dict) and isinstance(sel, dict) and isinstance(merge, dict)
            and isinstance(targets, dict) and targets):
        return False
    if not ({"name", "revision", "structure_hash"} <= base.keys()
            and all(base[key] is None or is_str(base[key]) for key in ("name", "revision"))
            and (base["structure_hash"] is None or is_str(base["structure_hash"], _SHA256))):
        return False
    # (== and `in` against str constants are False for every non-str value JSON can hold)
    if not (is_str(sel.get("rule")) and sel["rule"] in _RULES and sel.get("tie_break") == "lower-column"
            and (sel.get("seed") is None or type(sel["seed"]) is int)):
        return False
    if merge.get("rule") != MERGE_RULE:
        return False
    if any(key in doc and not is_str(doc[key]) for key in ("created_by", "description")):
        return False
    for name, t in targets.items():
        if not (1 <= len(name) <= 1024 and isinstance(t, dict)):
            return False
        shape = t.get("shape")
        if not (type(shape) is list and len(shape) == 2 and is_count(shape[0]) and is_count(shape[1])
                and is_count(t.get("k")) and t.get("layout") in ("out_in", "in_out")
                and t.get("dtype") in ("F32", "F16", "BF16") and is_str(t.get("probe"), _SHA256)
                and ("module" not in t or (is_str(t["module"]) and 1 <= len(t["module"]) <= 1024))):
            return False
    return True


def _strict_types(doc: dict, p: Problems) -> bool:
    """What JSON Schema lets through: whole-number floats as integers (3.0), lone surrogates in text."""
    ok = True
    # The schema's patterns are ECMA-262 regexes, whose "$" ends the text; Python's (what jsonschema uses)
    # also matches before a final newline, so "sha256:<hex>\n" would pass it.
    hashes = [("base/structure_hash", None, doc["base"]["structure_hash"])]
    hashes += [(f"targets/{name}/probe", name, entry["probe"]) for name, entry in doc["targets"].items()]
    for where, tensor, value in hashes:
        if value is not None and not _SHA256.fullmatch(value):
            p.error("2.2", f"metadata {where}: {value!r:.80} is not 'sha256:' and 64 lowercase hex digits",
                    tensor=tensor)
            ok = False
    seed = doc["selection"].get("seed")
    if seed is not None and not _is_int(seed):
        p.error("2.2", f"metadata selection/seed: {seed!r} is not an integer")
        ok = False
    for name, entry in doc["targets"].items():
        if not _is_int(entry["k"]) or not all(_is_int(d) for d in entry["shape"]):
            p.error("2.2", f"metadata targets/{name}: k and shape must be integers, not "
                           f"{entry['k']!r} / {entry['shape']!r}", tensor=name)
            ok = False
    return ok


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
