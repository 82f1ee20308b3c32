"""The `neuroada` command through click's CliRunner, plus real subprocesses of the installed script."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import neuroada_format as naf
from neuroada_format.cli import main

UP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture
def files(tmp_path, small_model, craft):
    """A valid adapter, its base folder, and adapters with exactly one problem each."""
    arrays, adapter = small_model
    paths = {"base": craft.base(tmp_path / "base", arrays, shards=2)}
    paths["good"] = os.fspath(tmp_path / "good.safetensors")
    naf.save(adapter, paths["good"])
    t = adapter.targets[UP]
    val = np.array(t.values)
    val[4, 0] = np.nan
    nan_adapter = naf.Adapter({**adapter.targets, UP: naf.Target(UP, t.indices, val, t.shape, probe=t.probe)},
                              base_name=adapter.base_name)
    paths["nan"] = os.fspath(tmp_path / "nan.safetensors")
    naf.save(nan_adapter, paths["nan"], check=False)
    with open(paths["good"], "rb") as f:
        data = f.read()
    paths["truncated"] = os.fspath(tmp_path / "truncated.safetensors")
    with open(paths["truncated"], "wb") as f:
        f.write(data[:-3])
    w = arrays[UP].copy()
    w.view(np.uint16)[0, int(t.indices[0, 0])] ^= 1
    paths["other_base"] = craft.base(tmp_path / "other", {**arrays, UP: w})
    paths["i32"] = os.fspath(tmp_path / "i32.safetensors")
    naf.save(adapter, paths["i32"], index_dtype="I32")
    paths["missing"] = os.fspath(tmp_path / "missing.safetensors")
    return paths


def run(*args):
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def one_line(text):
    lines = text.strip("\n").split("\n")
    assert len(lines) == 1, text
    return lines[0]


def test_validate_valid(files):
    r = run("validate", files["good"])
    assert r.exit_code == 0 and r.stderr == ""
    assert one_line(r.stdout) == f"valid: {files['good']}"
    r = run("validate", files["good"], "--base", files["base"])
    assert r.exit_code == 0 and one_line(r.stdout) == f"valid: {files['good']} against {files['base']}"
    assert run("validate", files["good"], "--base", files["base"], "--check-selection").exit_code == 0


def test_check_selection_without_a_base_is_a_usage_error(files):
    """--check-selection compares with a base's top-k: without --base it used to pass silently, checking nothing."""
    r = run("validate", files["good"], "--check-selection")
    assert r.exit_code == 2 and r.stdout == ""
    assert one_line(r.stderr) == "error: --check-selection compares the indices with a base's top-k: it needs --base"


def test_an_onnx_base_is_read_and_a_corrupt_one_is_one_line(files, tmp_path):
    """An .onnx base is read by the converters' ONNX view (tests/converters/test_onnx_validate.py): a file that is no
    model is a base breaking rule 1.1 (exit 1, as neuroada-merge says it), in one line; it used to be refused unread."""
    pytest.importorskip("onnx")
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not read")
    r = run("validate", files["good"], "--base", os.fspath(onnx))
    assert r.exit_code == 1 and "rule 1.1: not a readable ONNX model" in one_line(r.stderr)


def test_interrupt_is_exactly_one_line(files, monkeypatch):
    """click's own main() prints an empty line before its Abort; the command prints only its one line."""
    import neuroada_format.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "validate", interrupted)
    r = run("validate", files["good"])
    assert r.exit_code == 130 and r.stderr == "error: interrupted\n" and r.stdout == ""


@pytest.mark.parametrize("which, rule", [("nan", "3.7"), ("truncated", "1.4")])
def test_validate_invalid_exits_1_with_one_line(files, which, rule):
    r = run("validate", files[which])
    assert r.exit_code == 1 and r.stdout == ""
    line = one_line(r.stderr)
    assert line.startswith(f"error: {files[which]}: ") and f"rule {rule}:" in line


def test_validate_against_the_wrong_base(files):
    r = run("validate", files["good"], "--base", files["other_base"])
    assert r.exit_code == 1
    line = one_line(r.stderr)
    assert f"{UP}: rule 4.3" in line


def test_warnings_go_to_stdout_and_keep_exit_0(files):
    r = run("validate", files["i32"])
    assert r.exit_code == 0 and r.stderr == ""
    lines = r.stdout.strip().split("\n")
    assert lines[-1] == f"valid: {files['i32']}"
    assert all(line.startswith("warning: ") and "rule 3.2" in line for line in lines[:-1]) and len(lines) == 4


@pytest.mark.parametrize("args, rule, code", [
    (["missing"], "1.1", 2),                    # a missing path: usage / I/O
    (["good", "--base", "missing"], "1.1", 2),
    (["good", "--base", "truncated"], "1.4", 1),  # a base whose content breaks a rule: invalid input
    (["good", "--base", "good"], "1.6", 1),     # an adapter is no base: said as such, not as missing targets
])
def test_validate_missing_file_or_broken_base_exit_codes(files, args, rule, code):
    argv = [files.get(a, a) for a in args]
    r = run("validate", *argv)
    assert r.exit_code == code and "valid:" not in r.stdout  # (warnings, if any, go to stdout)
    line = r.stderr.split("\n")[0]  # one line per problem found
    assert line.startswith("error: ") and f"rule {rule}" in line


def test_validate_hostile_index_exits_1(files, tmp_path):
    index = os.path.join(files["base"], "model.safetensors.index.json")
    with open(index) as f:
        doc = json.load(f)
    doc["weight_map"][UP] = "../../etc/passwd"
    with open(index, "w") as f:
        json.dump(doc, f)
    r = run("validate", files["good"], "--base", files["base"])
    assert r.exit_code == 1 and "rule 1.6" in one_line(r.stderr)  # the same code every CLI gives


def test_validate_json(files):
    r = run("validate", "--json", files["good"], "--base", files["base"])
    assert r.exit_code == 0
    report = json.loads(r.stdout)
    assert report == {"path": files["good"], "valid": True, "base": files["base"], "problems": []}
    r = run("validate", files["nan"], "--json")
    assert r.exit_code == 1 and r.stderr == ""
    report = json.loads(r.stdout)
    assert report["valid"] is False
    assert [(p["rule"], p["severity"], p["tensor"]) for p in report["problems"]] == [("3.7", "error", UP)]
    r = run("validate", files["truncated"], "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["problems"][0]["rule"] == "1.4"


def test_inspect_text(files, small_model):
    _, adapter = small_model
    r = run("inspect", files["good"])
    assert r.exit_code == 0 and r.stderr == ""
    out = r.stdout
    size = os.path.getsize(files["good"])
    first = out.split("\n")[0]
    assert first == f"{files['good']}: NeuroAda spec 1.0, 3 targets, {3 * (16 + 40 + 16):,} entries, {size:,} bytes"
    assert f"base: tiny-llama @ r1  structure {adapter.structure_hash}" in out
    assert "selection: magnitude (tie-break lower-column)" in out
    row = next(line for line in out.split("\n") if line.startswith(UP))
    assert row.split()[1:7] == ["40x16", "out_in", "3", "I16", "BF16", f"{40 * 3 * 4:,}"]


def test_inspect_json(files, small_model):
    _, adapter = small_model
    r = run("inspect", "--json", files["good"])
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["path"] == files["good"] and info["version"] == "1.0"
    assert info["base"] == {"name": "tiny-llama", "revision": "r1", "structure_hash": adapter.structure_hash}
    assert info["selection"] == {"rule": "magnitude", "tie_break": "lower-column"}
    assert info["file_bytes"] == os.path.getsize(files["good"])
    assert info["tensor_bytes"] == adapter.nbytes and info["entries"] == 3 * (16 + 40 + 16)
    by_name = {t["name"]: t for t in info["targets"]}
    assert set(by_name) == set(adapter.targets)
    for name, t in adapter.targets.items():
        got = by_name[name]
        assert got["shape"] == list(t.shape) and got["k"] == 3 and got["layout"] == "out_in"
        assert (got["index_dtype"], got["value_dtype"], got["base_dtype"]) == ("I16", "BF16", "BF16")
        assert got["bytes"] == t.indices.nbytes + t.values.nbytes
        v = np.asarray(t.values, np.float32)
        assert got["values"]["min"] == float(v.min()) and got["values"]["max"] == float(v.max())
        assert got["values"]["mean_abs"] == pytest.approx(float(np.abs(v).mean()))
        assert got["values"]["nonzero"] == np.count_nonzero(v) / v.size


@pytest.mark.parametrize("which, code", [("truncated", 1), ("missing", 2)])
def test_inspect_bad_input(files, which, code):
    r = run("inspect", files[which])
    assert r.exit_code == code and r.stdout == ""
    assert one_line(r.stderr).startswith(f"error: {files[which]}: rule 1.")


def test_inspect_json_is_strict_json_even_for_nan_values(files):
    r = run("inspect", "--json", files["nan"])
    json.loads(r.stdout, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_help_and_version():
    r = run("--help")
    assert r.exit_code == 0 and "validate" in r.stdout and "inspect" in r.stdout
    r = run("--version")
    assert r.exit_code == 0 and naf.__version__ in r.stdout
    r = run("validate")
    assert r.exit_code == 2  # click's usage error


# -- real processes ---------------------------------------------------------------------------------------
def _script():
    path = os.path.join(os.path.dirname(sys.executable), "neuroada")
    return [path] if os.path.exists(path) else [sys.executable, "-m", "neuroada_format.cli"]


def _process(*args):
    return subprocess.run([*_script(), *args], capture_output=True, text=True, timeout=60)


def test_real_process_exit_codes_and_single_line_errors(files):
    ok = _process("validate", files["good"], "--base", files["base"])
    assert ok.returncode == 0 and ok.stderr == "" and ok.stdout.startswith("valid: ")
    bad = _process("validate", files["nan"])
    assert bad.returncode == 1 and bad.stdout == ""
    assert "rule 3.7" in one_line(bad.stderr) and "Traceback" not in bad.stderr
    gone = _process("validate", files["missing"], "--json")
    assert gone.returncode == 2 and "rule 1.1" in one_line(gone.stderr) and "Traceback" not in gone.stderr
    info = _process("inspect", "--json", files["good"])
    assert info.returncode == 0 and len(json.loads(info.stdout)["targets"]) == 3


def test_real_process_out_of_range_index_with_base_is_one_line(files, tmp_path, craft, small_model):
    arrays, adapter = small_model
    t = adapter.targets[UP]
    idx = np.array(t.indices)
    idx[-1, -1] = t.d_in
    targets = {UP: {"indices": idx, "values": np.asarray(t.values), "shape": t.shape, "probe": t.probe}}
    path = tmp_path / "oob.safetensors"
    path.write_bytes(craft.adapter(targets))
    r = _process("validate", os.fspath(path), "--base", files["base"])
    assert "Traceback" not in r.stderr and r.returncode == 1 and "rule 3.5" in one_line(r.stderr)


def test_real_process_unprintable_target_name(tmp_path, craft):
    targets = {"w\ud800": {"indices": np.array([[0, 1]], np.int16), "values": np.ones((1, 2), np.float32),
                           "shape": (1, 4)}}
    path = tmp_path / "odd.safetensors"
    path.write_bytes(craft.adapter(targets))
    r = _process("inspect", os.fspath(path))
    # a name that is no text (a lone surrogate escape) cannot be printed, hashed or matched: the header is refused
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {path}: rule 1.2: ") and "lone surrogate" in r.stderr, r.stderr


@pytest.mark.parametrize("config, says", [
    ('{"k": 2,', "not valid JSON"),
    ('{"k": -1}', "rule 3.4: k must be a positive integer"),
    ('{"k": 2, "save_dtype": "F64"}', "rule 3.3: save_dtype"),
    ('{"k": 2, "target_modules": 7}', "target_modules must be"),
    ('[1, 2]', "not an object"),
    ('{"peft_type": "LORA"}', "not a NeuroAda adapter config"),
])
def test_a_folder_whose_config_load_adapter_would_refuse_is_invalid_everywhere(files, tmp_path, config, says):
    """`neuroada validate folder/` said "valid" (exit 0) for a config load_adapter refuses, and neuroada-merge merged
    it: the CLIs read only the .safetensors file. Every command now checks a folder's config by the same rules."""
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(files["good"], folder / "neuroada_model.safetensors")
    (folder / "neuroada_config.json").write_text('{"k": 2, "target_modules": ["up_proj"], "save_dtype": "BF16"}')
    assert run("validate", str(folder)).exit_code == 0
    (folder / "neuroada_config.json").write_text(config)
    for cmd in ("validate", "inspect"):
        r = run(cmd, str(folder))
        assert r.exit_code == 1 and r.stdout == "", (cmd, r.stdout)
        line = one_line(r.stderr)
        assert line.startswith(f"error: {folder / 'neuroada_config.json'}: ") and says in line, line


def test_python_dash_m_is_the_neuroada_command(files):
    ok = subprocess.run([sys.executable, "-m", "neuroada_format", "validate", files["good"]], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("valid: ")
    gone = subprocess.run([sys.executable, "-m", "neuroada_format", "validate", files["missing"]], capture_output=True,
                          text=True, timeout=60)
    assert gone.returncode == 2 and "rule 1.1" in one_line(gone.stderr) and "Traceback" not in gone.stderr
