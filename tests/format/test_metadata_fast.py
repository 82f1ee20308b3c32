"""The metadata fast path (`_plainly_valid`) may skip jsonschema only for documents the schema accepts.

It is deliberately stricter than the schema; the one thing it must never do is accept a document the
schema rejects. Checked on every conformance vector and on random mutations of a valid document.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuroada_format.container import Problems, SafetensorsFile
from neuroada_format.metadata import METADATA_KEY, _plainly_valid, parse_document, schema

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"
VALIDATOR = jsonschema.Draft202012Validator(schema())
SHA = "sha256:" + "ab" * 32

VALID = {
    "format": "neuroada", "version": "1.0",
    "base": {"name": "tiny", "revision": None, "structure_hash": SHA},
    "selection": {"rule": "magnitude", "tie_break": "lower-column", "seed": None},
    "merge": {"rule": "add-f32-round-once"},
    "targets": {
        "model.layers.0.q.weight": {"shape": [8, 16], "layout": "out_in", "dtype": "BF16", "k": 2, "probe": SHA},
        "h.0.attn.c_attn.weight": {"shape": [24, 8], "layout": "in_out", "dtype": "F32", "k": 1, "probe": SHA},
    },
    "created_by": "tests",
}


def schema_ok(doc) -> bool:
    return not any(VALIDATOR.iter_errors(doc))


def test_a_plain_valid_document_takes_the_fast_path():
    assert schema_ok(VALID) and _plainly_valid(VALID)
    p = Problems("x", strict=False)
    assert parse_document({METADATA_KEY: json.dumps(VALID)}, p) == VALID and not p.items


def vector_documents():
    for path in sorted(VECTORS.rglob("*.safetensors")):
        try:
            st_file = SafetensorsFile(str(path), Problems(str(path), strict=True))
            text = (st_file.metadata or {}).get(METADATA_KEY)
            doc = json.loads(text) if text else None
        except Exception:
            continue
        if isinstance(doc, dict):
            yield pytest.param(doc, id=str(path.relative_to(VECTORS)))


@pytest.mark.parametrize("doc", list(vector_documents()))
def test_vectors_fast_path_agrees_with_the_schema(doc):
    if _plainly_valid(doc):
        assert schema_ok(doc)


def test_every_valid_vector_takes_the_fast_path():
    docs = [p.values[0] for p in vector_documents() if "valid/" in p.id and "invalid/" not in p.id]
    assert docs and all(_plainly_valid(d) for d in docs if schema_ok(d))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.sampled_from([0, 1, 2147483647, 2147483648])
    | st.floats(allow_nan=False) | st.sampled_from([1.0, 2.0, True, False])
    | st.text(max_size=8) | st.sampled_from(["neuroada", "1.0", "1.01", "1.0\n", "2.0", SHA, SHA + "\n", SHA.upper(),
                                             "out_in", "in_out", "BF16", "bf16", "F64", "magnitude", "lower-column",
                                             "add-f32-round-once", "", "x" * 1025]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


def paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, prefix + (i,))


ALL_PATHS = [p for p in paths(VALID) if p]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), st.sampled_from(["set", "delete", "add"]), json_values,
                          st.text(max_size=1030)), min_size=1, max_size=3))
def test_random_mutations_never_pass_fast_but_fail_the_schema(edits):
    doc = copy.deepcopy(VALID)
    for path, action, value, key in edits:
        parent = doc
        try:
            for step in path[:-1]:
                parent = parent[step]
            last = path[-1]
            if action == "set":
                parent[last] = value
            elif action == "delete":
                del parent[last]
            elif isinstance(parent, dict):
                parent[key] = value
            else:
                parent.append(value)
        except (KeyError, IndexError, TypeError, AttributeError):  # the path no longer exists
            continue
    if _plainly_valid(doc):
        assert schema_ok(doc), doc


def test_loading_a_valid_adapter_does_not_import_jsonschema(tmp_path):
    """The point of the fast path: the CLI and load_adapter do not pay for jsonschema's import."""
    code = ("import sys, numpy as np, neuroada_format as naf\n"
            "w = np.ones((4, 8), np.float32)\n"
            "t = naf.Target.from_weight('w', w, np.array([[0], [1], [2], [3]]))\n"
            f"naf.save(naf.Adapter({{'w': t}}), {str(tmp_path / 'a.safetensors')!r})\n"
            f"a = naf.load({str(tmp_path / 'a.safetensors')!r})\n"
            "assert naf.validate(a).ok\n"
            "print('jsonschema' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
