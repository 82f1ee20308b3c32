"""A missing optional dependency (gguf, onnx, torch) is the installation's problem, not the input's: every command
says so in one line with the extra that installs it and exits 2, as neuroada-merge always did; `neuroada validate`
and `neuroada-pack` used to call a good GGUF base invalid (rule 1.6, exit 1), and the ONNX hint came twice."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import neuroada_format as naf

ENTRY = {"neuroada": "neuroada", "neuroada-merge": "neuroada_merge", "neuroada-pack": "neuroada_pack"}


def without(module: str, command: str, *args: str) -> subprocess.CompletedProcess:
    """`command args` in a fresh interpreter in which `import module` fails as it does when it is not installed."""
    code = (f"import sys; sys.modules[{module!r}] = None; sys.argv = {[command, *args]!r}; "
            f"from neuroada_format._entry import {ENTRY[command]} as main; sys.exit(main())")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def one_line_usage_error(proc: subprocess.CompletedProcess, extra: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip("\n").split("\n")
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert f"the {extra} package, which is not installed" in line, line
    assert line.count("pip install") == 1 and f"pip install 'neuroada-format[{extra}]'" in line, line
    assert "rule" not in line, line  # nothing is wrong with the file
    return line


@pytest.fixture
def files(tmp_path, small_model):
    arrays, adapter = small_model
    paths = {"adapter": os.fspath(tmp_path / "a.safetensors"), "b": os.fspath(tmp_path / "b.safetensors")}
    naf.save(adapter, paths["adapter"])
    naf.save(adapter, paths["b"])
    for name in ("model.gguf", "model.onnx"):  # never read: the reader's import fails first
        path = tmp_path / name
        path.write_bytes(b"GGUF" + bytes(60) if name.endswith("gguf") else b"\x08\x07")
        paths[name] = os.fspath(path)
    paths["hashes"] = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    paths["dir"] = tmp_path
    return paths


def test_gguf_missing(files, tmp_path):
    gguf = files["model.gguf"]
    line = one_line_usage_error(without("gguf", "neuroada", "validate", files["adapter"], "--base", gguf), "gguf")
    assert line.startswith(f"error: {gguf}: GGUF bases need")
    one_line_usage_error(without("gguf", "neuroada-merge", "--base", gguf, "--adapter", files["adapter"],
                                 "--out", os.fspath(tmp_path / "out.gguf")), "gguf")
    one_line_usage_error(without("gguf", "neuroada-pack", "--combine", f"{files['adapter']}:0.5",
                                 f"{files['b']}:0.5", "--base", gguf, "-o", os.fspath(tmp_path / "c.safetensors")),
                         "gguf")
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "c.safetensors").exists()
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == files["hashes"]


def test_onnx_missing(files, tmp_path):
    line = one_line_usage_error(without("onnx", "neuroada", "validate", files["adapter"], "--base",
                                        files["model.onnx"]), "onnx")
    assert line.startswith(f"error: {files['model.onnx']}: ONNX bases need")
    one_line_usage_error(without("onnx", "neuroada-merge", "--base", files["model.onnx"], "--adapter",
                                 files["adapter"], "--out", os.fspath(tmp_path / "out.onnx")), "onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_runtime_without_torch_names_the_extra():
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; "
                           "import neuroada_format.runtime"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "ImportError: neuroada_format.runtime needs torch: pip install 'neuroada-format[torch]'", last


def test_the_format_core_and_its_commands_need_none_of_them(files):
    code = ("import sys\nfor m in ('torch', 'onnx', 'gguf'): sys.modules[m] = None\n"
            f"sys.argv = ['neuroada', 'validate', {files['adapter']!r}]\n"
            "from neuroada_format._entry import neuroada\nsys.exit(neuroada())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("valid: "), proc.stderr


def test_a_gguf_package_older_than_the_architecture(tmp_path, small_model):
    """gguf-py learns architectures release by release (0.10 has no qwen3moe, gemma3 or gemma4): with one that lacks
    the file's, the merge says to upgrade it, in one line, exit 2, instead of an internal StopIteration."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    arrays, adapter = small_model
    base = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(os.fspath(base), "qwen3moe")
    w.add_block_count(1)
    for key, name in (("q_proj", "attn_q"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
        part = "self_attn" if key == "q_proj" else "mlp"
        w.add_tensor(f"blk.0.{name}.weight", arrays[f"model.layers.0.{part}.{key}.weight"].astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path = os.fspath(tmp_path / "a.safetensors")
    naf.save(adapter, path)
    before = base.read_bytes()
    code = ("import sys, gguf\n"
            "gguf.MODEL_ARCH_NAMES = {k: v for k, v in gguf.MODEL_ARCH_NAMES.items() if v != 'qwen3moe'}\n"
            f"sys.argv = ['neuroada-merge', '--base', {os.fspath(base)!r}, '--adapter', {path!r}, "
            f"'--out', {os.fspath(tmp_path / 'out.gguf')!r}]\n"
            "from neuroada_format._entry import neuroada_merge\nsys.exit(neuroada_merge())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no name table for architecture 'qwen3moe'" in proc.stderr and "pip install -U gguf" in proc.stderr
    assert not (tmp_path / "out.gguf").exists() and base.read_bytes() == before
