"""The `neuroada-merge` command: exit codes 0/1/2, one-line errors without tracebacks, --json, scales."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format.converters.cli_common import parse_scaled as parse_adapter_spec
from neuroada_format.converters.merge_cli import run

_spec = importlib.util.spec_from_file_location("_merge_builders", Path(__file__).with_name("test_merge_safetensors.py"))
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)


@pytest.fixture
def model(tmp_path):
    """(base folder, adapter path, second adapter path, arrays) on disk."""
    rng = np.random.default_rng(42)
    arrays = B.llama_arrays(rng)
    base = B.write_checkpoint(tmp_path / "base", arrays)
    naf.save(B.make_adapter(rng, arrays, B.targets_of(arrays), 3), tmp_path / "a.safetensors")
    naf.save(B.make_adapter(rng, arrays, B.targets_of(arrays)[:4], 5, value_dtype="F32"), tmp_path / "b.safetensors")
    return base, os.fspath(tmp_path / "a.safetensors"), os.fspath(tmp_path / "b.safetensors"), arrays


def cli(capsys, *args) -> tuple[int, str, str]:
    code = run([os.fspath(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def test_merge_json_summary_and_output(capsys, tmp_path, model):
    base, a, b, _ = model
    code, out, err = cli(capsys, "--base", base, "--adapter", a, "--adapter", f"{b}:0.5", "--out", tmp_path / "out",
                         "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["output"] == os.fspath(tmp_path / "out") and summary["targets"] == len(B.targets_of(model[3]))
    assert summary["adapters"] == [{"path": a, "scale": 1.0}, {"path": b, "scale": 0.5}]
    assert summary["durable"] is False  # --fsync is opt-in
    for key in ("values_touched", "bytes_written", "seconds"):
        assert summary[key] > 0
    adapters = [(naf.load(a), 1.0), (naf.load(b), 0.5)]
    shard = "model-00002-of-00002.safetensors"
    assert open(tmp_path / "out" / shard, "rb").read() == B.expected_bytes(os.path.join(base, shard), adapters)
    code, out, err = cli(capsys, "--base", base, "--adapter", a, "--out", tmp_path / "out2")
    assert code == 0 and out.startswith("merged ") and len(out.strip().splitlines()) == 1


def test_in_place_and_revert(capsys, tmp_path, model):
    base, a, _, _ = model
    before = B.tree_digest(base)
    journal = tmp_path / "j.safetensors"
    code, out, err = cli(capsys, "--base", base, "--adapter", a, "--in-place", "--journal", journal, "--json")
    assert code == 0, err
    assert json.loads(out)["journal"] == os.fspath(journal) and B.tree_digest(base) != before
    for _ in range(2):  # idempotent
        code, out, err = cli(capsys, "--revert", journal)
        assert code == 0, err
        assert B.tree_digest(base) == before


@pytest.mark.parametrize("failure", ["wrong base", "tampered value", "wrong shape"])
def test_mismatch_exits_1_with_one_line(capsys, tmp_path, failure):
    base, adapter, victim = B._apply_verification_failure(tmp_path, np.random.default_rng(3), failure)
    naf.save(adapter, tmp_path / "a.safetensors")
    code, out, err = cli(capsys, "--base", base, "--adapter", tmp_path / "a.safetensors", "--out", tmp_path / "out")
    assert code == 1
    line = one_error_line(err)
    assert "rule 4." in line and (failure == "wrong base" or victim in line)
    assert not (tmp_path / "out").exists() and B.siblings(tmp_path / "out") == []


def test_invalid_adapter_file_exits_1(capsys, tmp_path, model):
    base = model[0]
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    code, _, err = cli(capsys, "--base", base, "--adapter", tmp_path / "junk.safetensors", "--out", tmp_path / "o")
    assert code == 1 and "rule 1.2" in one_error_line(err)


def test_wrong_journal_exits_1_and_a_non_journal_exits_2(capsys, tmp_path, model):
    base, a, _, arrays = model
    code, _, err = cli(capsys, "--base", base, "--adapter", a, "--in-place", "--journal", tmp_path / "j.safetensors")
    assert code == 0, err
    other = B.write_checkpoint(tmp_path / "other", B.llama_arrays(np.random.default_rng(9), layers=1), extras=False)
    code, _, err = cli(capsys, "--revert", tmp_path / "j.safetensors", "--base", other)
    assert code == 1 and "header differs" in one_error_line(err)
    code, _, err = cli(capsys, "--revert", a)
    assert code == 2 and "journal" in one_error_line(err)


@pytest.mark.parametrize("args, needle", [
    ([], "missing --base"),
    (["--base", "{base}"], "missing --adapter"),
    (["--base", "{base}", "--adapter", "{a}"], "exactly one of --out"),
    (["--base", "{base}", "--adapter", "{a}", "--out", "{tmp}/o", "--in-place"], "exactly one of --out"),
    (["--base", "{base}", "--adapter", "{a}", "--out", "{tmp}/o", "--journal", "{tmp}/j"], "--journal goes with"),
    (["--base", "{tmp}/nope", "--adapter", "{a}", "--out", "{tmp}/o"], "no such file"),
    (["--base", "{base}", "--adapter", "{tmp}/nope.safetensors", "--out", "{tmp}/o"], "no such adapter file"),
    (["--base", "{base}", "--adapter", "{a}:nan", "--out", "{tmp}/o"], "is not a decimal number"),
    (["--base", "{base}", "--adapter", "{a}", "--out", "{base}"], "use --in-place"),
    (["--base", "{base}", "--adapter", "{a}", "--out", "{tmp}/no/such/dir"], "parent folder does not exist"),
    (["--base", "{base}", "--adapter", "{a}", "--bogus"], "No such option"),
    (["--revert", "{tmp}/nope.safetensors"], "no usable journal: cannot read: no such file"),
    (["--revert", "{a}", "--adapter", "{a}"], "--revert takes only"),
    (["--revert", "{a}", "--fsync"], "--revert takes only"),
    (["--revert", "{a}", "--no-verify"], "--revert takes only"),   # was accepted and ignored
    # the output is the base's format: a name another format claims would be read as that format
    (["--base", "{base}", "--adapter", "{a}", "--out", "{tmp}/o.gguf"], "its name ends in .gguf"),
    (["--base", "{base}", "--adapter", "{a}", "--out", "{tmp}/o.ONNX"], "its name ends in .onnx"),
])
def test_usage_and_io_errors_exit_2(capsys, tmp_path, model, args, needle):
    base, a, _, _ = model
    args = [x.format(base=base, a=a, tmp=tmp_path) for x in args]
    code, out, err = cli(capsys, *args)
    assert code == 2 and needle in one_error_line(err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.gguf").exists()


def test_existing_output_needs_overwrite(capsys, tmp_path, model):
    base, a, b, _ = model
    assert cli(capsys, "--base", base, "--adapter", a, "--out", tmp_path / "o")[0] == 0
    code, _, err = cli(capsys, "--base", base, "--adapter", b, "--out", tmp_path / "o")
    assert code == 2 and "--overwrite" in one_error_line(err)
    assert cli(capsys, "--base", base, "--adapter", b, "--out", tmp_path / "o", "--overwrite")[0] == 0


def test_no_verify_is_opt_in(capsys, tmp_path):
    base, adapter, _ = B._apply_verification_failure(tmp_path, np.random.default_rng(4), "tampered value")
    naf.save(adapter, tmp_path / "a.safetensors")
    args = ["--base", base, "--adapter", tmp_path / "a.safetensors", "--out", tmp_path / "o"]
    assert cli(capsys, *args)[0] == 1
    code, out, err = cli(capsys, *args, "--no-verify", "--json")
    assert code == 0 and json.loads(out)["verified"] is False


def test_adapter_spec_scales(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_adapter_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_adapter_spec("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_adapter_spec("a.safetensors:-1e-3") == ("a.safetensors", -0.001)
    assert parse_adapter_spec("a.safetensors:.25") == ("a.safetensors", 0.25)
    assert parse_adapter_spec("runs/12:30/a.safetensors") == ("runs/12:30/a.safetensors", 1.0)
    assert parse_adapter_spec("runs/12:30/a.safetensors:2") == ("runs/12:30/a.safetensors", 2.0)
    assert parse_adapter_spec("C:\\adapters\\a.safetensors") == ("C:\\adapters\\a.safetensors", 1.0)
    assert parse_adapter_spec("a.safetensors:inf") == ("a.safetensors:inf", 1.0)  # not a decimal scale
    (tmp_path / "odd:2").write_bytes(b"")  # an existing file whose name ends like a scale
    assert parse_adapter_spec("odd:2") == ("odd:2", 1.0)
    (tmp_path / "odd").write_bytes(b"")  # both readings exist: the scale reading wins
    assert parse_adapter_spec("odd:2") == ("odd", 2.0)


def test_onnx_bases_are_dispatched_lazily(capsys, tmp_path, model, monkeypatch):
    """Backends are picked by the registry (by suffix) and imported only when used."""
    from neuroada_format.converters.backend import Backend, Resolved, Written

    _, a, _, _ = model
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    calls = []

    class Fake(Backend):
        format = "onnx"

        def open(self, path):
            return types.SimpleNamespace(path=path)

        def inputs(self, view):
            return [view.path]

        def resolve(self, view, adapters, *, verify):
            calls.append(("resolve", [s for _, s in adapters], verify))
            return Resolved(None, 1)

        def plan(self, view, resolved, *, verify, in_place):
            return None

        def write(self, view, plan, out, *, overwrite, durable, progress):
            calls.append(("write", out, durable))
            return Written(values_touched=3, files=1, bytes_written=4)

    monkeypatch.setitem(sys.modules, "neuroada_format.converters.onnx_merge", types.SimpleNamespace(BACKEND=Fake()))
    code, out, err = cli(capsys, "--base", tmp_path / "m.onnx", "--adapter", f"{a}:2", "--out", tmp_path / "o.onnx",
                         "--no-verify", "--fsync", "--json")
    assert code == 0, err
    assert json.loads(out)["values_touched"] == 3 and json.loads(out)["format"] == "onnx"
    assert calls == [("resolve", [2.0], False), ("write", os.fspath(tmp_path / "o.onnx"), True)]
    monkeypatch.setitem(sys.modules, "neuroada_format.converters.onnx_merge", None)  # as if the module were absent
    code, _, err = cli(capsys, "--base", tmp_path / "m.onnx", "--adapter", a, "--out", tmp_path / "o2.onnx")
    assert code == 2 and "onnx" in one_error_line(err)


def test_console_script_end_to_end(tmp_path, model):
    """The installed entry point itself: real process, exit codes and stderr as a user sees them."""
    base, a, _, _ = model
    exe = shutil.which("neuroada-merge", path=os.path.dirname(sys.executable)) or shutil.which("neuroada-merge")
    if exe is None:
        pytest.skip("neuroada-merge is not installed")
    ok = subprocess.run([exe, "--base", base, "--adapter", a, "--out", tmp_path / "o", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout)["targets"] > 0 and ok.stderr == ""
    bad = subprocess.run([exe, "--base", base, "--adapter", a, "--out", tmp_path / "o"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and one_error_line(bad.stderr) and bad.stdout == ""
