"""bench/train.py must keep running: its --smoke mode drives every method and the real-run checks on a
tiny model in one child process, and the shared RESULTS.md writer must touch only its own section."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "train.py")


def load_train():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_parent_does_not_import_torch():
    code = f"import runpy, sys; runpy.run_path({SCRIPT!r}, run_name='x'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_replace_section_keeps_the_others(tmp_path):
    spec = importlib.util.spec_from_file_location("results_md", os.path.join(ROOT, "bench", "results_md.py"))
    train = importlib.util.module_from_spec(spec)  # the writer every bench script shares
    spec.loader.exec_module(train)
    path = tmp_path / "RESULTS.md"
    train.replace_section("## B", "new b", str(path))  # created when missing
    assert path.read_text() == "# Benchmark results\n\n## B\n\nnew b\n"
    path.write_text("# Benchmark results\n\n## A\n\na text\n\n## B\n\nold b\nmore\n\n## C\n\nc text\n")
    train.replace_section("## B", "new b\n", str(path))
    assert path.read_text() == "# Benchmark results\n\n## A\n\na text\n\n## B\n\nnew b\n\n## C\n\nc text\n"
    train.replace_section("## C", "new c", str(path))
    assert path.read_text().endswith("## B\n\nnew b\n\n## C\n\nnew c\n")


def test_smoke_runs_every_method_and_the_real_checks():
    out = subprocess.run([sys.executable, SCRIPT, "--smoke"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    train = load_train()
    for label in train.LABELS.values():
        assert label in out.stdout
    assert "failed" not in out.stdout
    assert ": valid, problems: none" in out.stdout
    assert "max abs diff 0;" in out.stdout and "bit for bit: True" in out.stdout
    assert "wrote" not in out.stdout  # --smoke never touches RESULTS.md
    assert "**Paired, smoke" in out.stdout and "goal: NeuroAda k=1 step <= 1.05x floor" in out.stdout


def test_surroundings_smoke(tmp_path):
    """bench/surroundings.py must keep running: two cases of each class through the real CLIs, no bug found,
    RESULTS.md untouched."""
    script = os.path.join(ROOT, "bench", "surroundings.py")
    out = subprocess.run([sys.executable, script, "--n", "18", "--no-write", "--work", os.fspath(tmp_path / "w")],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for cls in ("special", "symlink", "alias", "readonly", "full", "concurrent", "kill", "journal", "names"):
        assert f"| {cls} |" in out.stdout
    assert "Cases with a bug: 0." in out.stdout and "HANG" not in out.stdout
    assert "wrote" not in out.stdout


def test_multitask_memory_part_runs():
    """bench/multitask.py's memory part must keep running (one 7B-shaped layer, 2 adapters): its table prints a
    per-entry size for every stage, and loading alone costs what the adapters' tensors hold (one shared int64 index
    and bf16 originals, BF16 values each: 7 bytes per entry for two), not the copies the serving caches used to
    keep (10 more per entry and adapter)."""
    script = os.path.join(ROOT, "bench", "multitask.py")
    out = subprocess.run([sys.executable, script, "--skip-switch", "--skip-mixed", "--no-write", "--layers", "1",
                          "--adapters", "2"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in out.stdout.splitlines()
            if line.startswith("| ") and line.count("|") == 4}
    for stage in ("loaded", "after set_adapter through all", "after an adapter_batch", "all of the above"):
        float(rows[stage])
    assert 6 <= float(rows["loaded"]) <= 14
    assert "wrote" not in out.stdout


def test_compiled_paired_timing_runs():
    """bench/train.py's compiled paired job must keep running (tiny model, one cycle): every model compiles and
    steps through torch.compile's default (inductor) backend."""
    worker = os.path.join(ROOT, "bench", "_train_worker.py")
    out = subprocess.run([sys.executable, worker, "paired-compiled=floor+neuroada20", "tiny", "1", "1", "tiny", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert rec["compiled"] is True and rec["methods"] == ["floor", "neuroada20"]
    assert all(len(rec["times"][m]) == 1 and rec["times"][m][0] > 0 for m in rec["methods"])


def test_section_keeps_the_hand_notes_and_names_the_cpu(tmp_path, monkeypatch):
    """Rewriting the section must not drop bench/train_notes.md (profiles no rerun repeats), and the header names
    the processor, since the ratios move with it."""
    train = load_train()
    with open(train.NOTES, encoding="utf-8") as f:
        assert train.notes_lines() == ["", *f.read().strip("\n").split("\n")]
    monkeypatch.setattr(train, "NOTES", str(tmp_path / "missing.md"))
    assert train.notes_lines() == []
    assert train.cpu_model().strip()


def test_onnx_retention_smoke(tmp_path):
    """bench/onnx_retention.py must keep running (--tiny: a two-layer Llama of hidden 80, so every block size pads
    the last block; fresh cache): every variant's rows print, the main adapter merges with the scopes put back, the
    grid-trained adapter's merge decodes to its runtime merge bit for bit, and RESULTS.md is left alone."""
    for mod in ("onnxruntime", "onnx", "transformers", "tokenizers"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    script = os.path.join(ROOT, "bench", "onnx_retention.py")
    results = os.path.join(ROOT, "bench", "RESULTS.md")
    before = open(results, encoding="utf-8").read()
    out = subprocess.run([sys.executable, script, "--tiny", "--steps", "2"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env={**os.environ, "NEUROADA_CACHE": os.fspath(tmp_path)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for label in ("int4 b32", "int4 b128", "int8 b128", "hqq4 b128"):
        rows = [line for line in out.stdout.splitlines() if line.startswith(f"| {label} |")]
        assert len(rows) == 5, rows
        grid_merge = next(r for r in rows if "trained through the file's grid: neuroada-merge" in r)
        assert "| 100.00% |" in grid_merge
        assert f"{label}: the grid-trained adapter's merged file decodes to its runtime merge bit for bit on 14 of 14" \
            in out.stdout
    assert "FAILED" not in out.stdout and "wrote the section" not in out.stdout
    assert open(results, encoding="utf-8").read() == before


def test_merge_kquant_rows_run_and_compare_with_a_revision(tmp_path, monkeypatch):
    """bench/merge.py --formats kquant must keep running (on tiny Llama shapes here): both mixes build, k=20 and k=1
    merge with per-type counts, and --baseline-rev (HEAD: the same code) runs each side in a process of its own and
    finds the merged files the same byte for byte."""
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))  # (its `results_md`)
    spec = importlib.util.spec_from_file_location("bench_merge", os.path.join(ROOT, "bench", "merge.py"))
    bm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bm)
    for name, value in {"HIDDEN": 256, "INTER": 512, "KV": 256, "VOCAB": 256, "N_TOKENS": 256, "HEADS": 4,
                        "KV_HEADS": 4}.items():
        monkeypatch.setattr(bm, name, value)
    monkeypatch.setattr(bm, "PROJECTIONS", {p: ((256, 256) if "attn" in p else (512, 256) if "down" not in p
                                                else (256, 512)) for p in bm.PROJECTIONS})
    keep = str(tmp_path / "files")
    result = bm.run_kquant(2, 1, None, ["q4_k_m", "q2_k"], keep)
    types = {key: set(r["types"]) for key, r in result["rows"].items()}
    assert types[("q4_k_m", 20)] == {"Q4_K", "Q6_K"} and types[("q2_k", 20)] == {"Q2_K", "Q3_K"}
    assert all(n > 0 for r in result["rows"].values() for n, _ in r["types"].values())
    new, old = bm.run_kquant_against("HEAD", 2, 1, None, ["q4_k_m"], keep)
    text = bm.kquant_section(new, old)
    assert "byte for byte the same as before's: 2 of 2." in text and "| Q4_K_M | k=20 |" in text
