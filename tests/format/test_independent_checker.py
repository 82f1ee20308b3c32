"""spec/independent/check.mjs, a second implementation written from SPEC.md alone, agrees with the
conformance manifest on every vector and merge: the spec is enough to implement the format."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "spec" / "vectors"
CHECKER = REPO / "spec" / "independent" / "check.mjs"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NODE, str(CHECKER), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], dict]:
    done = _run(str(VECTORS), "--json")
    assert done.returncode in (0, 1), done.stderr
    return {(r["kind"], r["name"]): r for r in json.loads(done.stdout)}


@pytest.mark.parametrize("vector", MANIFEST["vectors"], ids=[v["name"] for v in MANIFEST["vectors"]])
def test_vector_verdict_matches_manifest(rows, vector):
    got, want = rows[("vector", vector["name"])], vector["expected"]
    assert (got["valid"], got["errors"], got["warnings"], got["base_unreadable"]) == (
        want["valid"], sorted(want["errors"]), sorted(want["warnings"]), bool(want.get("base_unreadable"))
    ), got["messages"]


@pytest.mark.parametrize("merge", MANIFEST["merges"], ids=[m["name"] for m in MANIFEST["merges"]])
def test_merge_is_bit_exact(rows, merge):
    got = rows[("merge", merge["name"])]
    assert got["match"], got["messages"]


def test_every_manifest_entry_is_checked(rows):
    names = {("vector", v["name"]) for v in MANIFEST["vectors"]} | {("merge", m["name"]) for m in MANIFEST["merges"]}
    assert set(rows) == names


def test_text_output_and_exit_status():
    done = _run(str(VECTORS))
    assert done.returncode == 0, done.stdout[-2000:]
    lines = done.stdout.splitlines()
    total = len(MANIFEST["vectors"]) + len(MANIFEST["merges"])
    assert lines[-1] == f"{total} of {total} agree with the manifest"
    assert all(line.endswith("\tagrees") for line in lines[:-1])


def test_disagreement_fails(tmp_path):
    """A manifest that expects the wrong verdict makes the checker exit 1 naming the vector."""
    for sub in ("valid", "bases"):
        (tmp_path / sub).symlink_to(VECTORS / sub)
    vec = next(v for v in MANIFEST["vectors"] if v["name"] == "minimal")
    wrong = {**vec, "expected": {"valid": False, "errors": ["4.3"], "warnings": []}}
    (tmp_path / "manifest.json").write_text(json.dumps({**MANIFEST, "vectors": [wrong], "merges": []}))
    done = _run(str(tmp_path))
    assert done.returncode == 1
    assert "minimal\tvalid\terrors=-\twarnings=-\tDISAGREES" in done.stdout
