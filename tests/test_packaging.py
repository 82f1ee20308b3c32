"""What a release holds: the wheel installs only the package (schema and licence included, no tests or benchmarks);
the sdist is the whole source release (spec text, vectors, tests with the examples and benchmarks they run), so a
packager can build and test from it alone. Built with the installed setuptools, offline, in a separate process."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build(kind: str, out: Path) -> Path:
    """Built in a copy of the checkout (setuptools leaves build/ and egg-info beside the sources)."""
    src = out.parent / f"src-{kind}"
    if not src.exists():
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                                 "__pycache__", "_work", ".cache", ".hypothesis"))
    code = f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / proc.stdout.strip().splitlines()[-1]


def test_wheel_and_sdist(tmp_path):
    wheel = zipfile.ZipFile(build("wheel", tmp_path / "w")).namelist()
    assert {n.split("/")[0] for n in wheel} == {"neuroada_format", "neuroada_format-0.1.0.dist-info"}
    assert {f"neuroada_format/spec/schema/{n}" for n in ['metadata-v1.schema.json']} <= set(wheel)
    assert "neuroada_format-0.1.0.dist-info/licenses/LICENSE" in wheel
    gguf_modules = {f"neuroada_format/converters/gguf_{m}.py" for m in ("read", "names", "encode", "merge")}
    assert {"neuroada_format/runtime/kernels/triton.py"} | gguf_modules <= set(wheel)

    with tarfile.open(build("sdist", tmp_path / "s")) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    wanted = {n for n in tracked if n.split("/")[0] in ("spec", "docs", "tests", "examples", "bench", "runtime",
                                                          "converters", "neuroada_format")}
    wanted |= {"LICENSE", "README.md", "pyproject.toml"}
    if tracked:  # (a git checkout: every tracked file of those folders is in the sdist)
        assert wanted - names == set()
    assert not any("__pycache__" in n or n.endswith(".pyc") or n.startswith("bench/_work") for n in names)
