"""A safetensors file truncated in place after its header was read (`cp` over it, a download restarting).

SafetensorsFile used to hand out views of a memory map: touching a page past the new end raised SIGBUS,
which killed `neuroada validate --base M --check-selection` and `neuroada-pack --finetuned FT` with exit
135 and no message. Tensors are now read with positional reads: a short read is one NeuroAdaError (rule
1.4, spec 2.3: a file shorter than its last range), naming the file and the tensor.

The truncation is made deterministic by cutting the file right after SafetensorsFile parsed its header.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import neuroada_format as naf
from neuroada_format import container
from neuroada_format.container import SafetensorsFile
from neuroada_format.errors import NeuroAdaError, NeuroAdaUsageError


@pytest.fixture
def st_path(tmp_path):
    """A file with a small tensor first and a larger one after it (safetensors sorts by dtype, then name)."""
    path = os.fspath(tmp_path / "m.safetensors")
    save_file({"a_first": np.arange(16, dtype=np.float32).reshape(4, 4),
               "b_second": np.arange(4096, dtype=np.float32).reshape(64, 64)}, path, metadata={"format": "pt"})
    return path


def _truncate_after_open(monkeypatch, victim: str, size: int = 0):
    """Cut `victim` to `size` bytes as soon as a SafetensorsFile has parsed its header."""
    original = SafetensorsFile.__init__

    def init(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        if os.path.realpath(self.path) == os.path.realpath(victim):
            os.truncate(victim, size)

    monkeypatch.setattr(SafetensorsFile, "__init__", init)


def test_truncated_file_is_one_error_in_a_process_that_survives(st_path):
    """In a child process: before the fix this died of SIGBUS (returncode -7), which would kill pytest too."""
    script = textwrap.dedent("""
        import os, sys
        from neuroada_format.container import SafetensorsFile
        from neuroada_format.errors import NeuroAdaError
        st = SafetensorsFile(sys.argv[1])
        os.truncate(sys.argv[1], st.data_start + 4)
        try:
            st.array("b_second")
        except NeuroAdaError as exc:
            print(type(exc).__name__, exc.rule, exc.tensor, sep="|")
            print(exc)
            sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", script, st_path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, (r.returncode, r.stderr)
    kind, message = r.stdout.strip().split("\n")
    assert kind == "NeuroAdaError|1.4|b_second"
    assert st_path in message and "truncated" in message


@pytest.mark.parametrize("method", ["array", "raw"])
def test_tensor_past_the_new_end_raises_rule_1_4_naming_file_and_tensor(st_path, method):
    st = SafetensorsFile(st_path)
    first = st.tensors["a_first"]
    cut = st.data_start + first.end + 100  # a_first whole, b_second cut short
    assert st.absolute_offset("b_second") == st.data_start + first.end
    os.truncate(st_path, cut)
    with pytest.raises(NeuroAdaError) as info:
        getattr(st, method)("b_second")
    exc = info.value
    assert not isinstance(exc, NeuroAdaUsageError)  # invalid input (exit 1), as a truncated file at open is
    assert exc.rule == "1.4" and exc.tensor == "b_second" and exc.path == st_path
    assert st_path in str(exc) and f"ended at byte {cut}" in str(exc) and f"now {cut} bytes" in str(exc)
    # what is still there reads as before
    np.testing.assert_array_equal(st.array("a_first"), np.arange(16, dtype=np.float32).reshape(4, 4))


def test_file_emptied_after_open(st_path):
    st = SafetensorsFile(st_path)
    os.truncate(st_path, 0)
    for name in st.tensors:
        with pytest.raises(NeuroAdaError, match="truncated or rewritten while being read") as info:
            st.array(name)
        assert info.value.rule == "1.4" and info.value.tensor == name and st_path in str(info.value)


def test_arrays_are_fresh_read_only_and_exact(st_path):
    st = SafetensorsFile(st_path)
    a, b = st.array("b_second"), st.array("b_second")
    assert a.dtype == np.dtype("<f4") and a.shape == (64, 64) and not a.flags.writeable
    np.testing.assert_array_equal(a, np.arange(4096, dtype=np.float32).reshape(64, 64))
    assert not np.shares_memory(a, b)
    r = st.raw("a_first")
    assert r.dtype == np.uint8 and r.shape == (64,) and not r.flags.writeable
    assert r.tobytes() == np.arange(16, dtype="<f4").tobytes()
    with pytest.raises(ValueError):
        a[0, 0] = 1  # read-only as the map's views were: merge_weight_ refuses a base's array by that


def test_reading_one_tensor_reads_only_its_bytes(st_path, monkeypatch):
    st = SafetensorsFile(st_path)
    calls = []
    real = os.preadv if hasattr(os, "preadv") else None
    if real is None:
        pytest.skip("no os.preadv on this platform")

    def counting(fd, buffers, pos):
        calls.append((pos, sum(len(memoryview(b)) for b in buffers)))
        return real(fd, buffers, pos)

    monkeypatch.setattr(container.os, "preadv", counting)
    st.array("a_first")
    assert calls == [(st.absolute_offset("a_first"), 64)]


def test_file_renamed_over_after_open_still_reads_the_opened_file(st_path, tmp_path):
    st = SafetensorsFile(st_path)
    other = os.fspath(tmp_path / "other.safetensors")
    save_file({"x": np.zeros(3, np.float32)}, other)
    os.replace(other, st_path)
    np.testing.assert_array_equal(st.array("b_second"), np.arange(4096, dtype=np.float32).reshape(64, 64))


def test_close_and_context_manager(st_path):
    with SafetensorsFile(st_path) as st:
        assert st.array("a_first").shape == (4, 4)
    with pytest.raises(ValueError, match="closed"):
        st.array("a_first")
    st.close()  # idempotent


def test_open_base_truncated_after_open(tmp_path, small_model, craft):
    arrays, _ = small_model
    folder = craft.base(tmp_path / "base", arrays)
    base = naf.open_base(folder)
    name = "model.layers.0.mlp.up_proj.weight"
    path = os.path.join(folder, "model.safetensors")
    os.truncate(path, base.file_of(name).data_start)
    with pytest.raises(NeuroAdaError) as info:
        base.array(name)
    assert info.value.rule == "1.4" and info.value.tensor == name and path in str(info.value)


def _adapter_and_base_cut_after_open(tmp_path, small_model, craft, monkeypatch) -> tuple[str, str, str]:
    """(adapter, base folder, its file): the file is cut to 64 bytes right after its header is read."""
    arrays, adapter = small_model
    folder = craft.base(tmp_path / "base", arrays)
    good = os.fspath(tmp_path / "good.safetensors")
    naf.save(adapter, good)
    victim = os.path.join(folder, "model.safetensors")
    _truncate_after_open(monkeypatch, victim, size=64)
    return good, folder, victim


def test_validate_check_selection_api(tmp_path, small_model, craft, monkeypatch):
    good, folder, victim = _adapter_and_base_cut_after_open(tmp_path, small_model, craft, monkeypatch)
    with pytest.raises(NeuroAdaError) as info:
        naf.validate(good, base=folder, check_selection=True)
    assert info.value.rule == "1.4" and victim in str(info.value)


def test_validate_check_selection_cli_prints_one_error_line(tmp_path, small_model, craft, monkeypatch):
    from neuroada_format.cli import main

    good, folder, victim = _adapter_and_base_cut_after_open(tmp_path, small_model, craft, monkeypatch)
    r = CliRunner().invoke(main, ["validate", good, "--base", folder, "--check-selection"])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and victim in lines[0] and "1.4" in lines[0], r.stderr
    assert "Traceback" not in r.output + r.stderr


def test_pack_finetuned_truncated_after_open_prints_one_error_line(tmp_path, small_model, craft, monkeypatch, capsys):
    from neuroada_format.converters import pack_cli

    arrays, _ = small_model
    base = craft.base(tmp_path / "base", arrays)
    tuned = {n: (w + np.asarray(0.01, w.dtype) if w.ndim == 2 else w) for n, w in arrays.items()}
    ft = craft.base(tmp_path / "ft", tuned)
    victim = os.path.join(ft, "model.safetensors")
    _truncate_after_open(monkeypatch, victim, size=64)
    out = tmp_path / "o.safetensors"
    with pytest.raises(SystemExit) as exc:
        pack_cli.main(["--base", base, "--finetuned", ft, "-k", "2", "-o", os.fspath(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 1, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and victim in lines[0], err
    assert not out.exists()
