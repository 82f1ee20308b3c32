"""A Ctrl-C printed two lines (found by bench/surroundings.py): when it landed between open() and the
`with` of a writer, the collected file object raised a ResourceWarning that the CLIs' one-line warning
printer showed as `warning: unclosed file ...` before `error: interrupted`."""
from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format.converters import pack, pack_cli

_spec = importlib.util.spec_from_file_location("_merge_builders_warn", Path(__file__).with_name("test_merge_safetensors.py"))
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)


def test_interrupt_with_a_file_left_open_is_one_line(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(3)
    arrays = B.llama_arrays(rng, conv1d=False, layers=1)
    naf.save(B.make_adapter(rng, arrays, B.targets_of(arrays), 2), tmp_path / "a.safetensors")

    def interrupted(*args, **kwargs):
        open(tmp_path / "left-open", "wb")   # noqa: SIM115 - what a Ctrl-C before `with` leaves behind
        gc.collect()
        raise KeyboardInterrupt

    monkeypatch.setattr(pack, "repack", interrupted)
    with pytest.raises(SystemExit) as exc:
        pack_cli.main(["--repack", os.fspath(tmp_path / "a.safetensors"), "-o", os.fspath(tmp_path / "r.safetensors")])
    err = capsys.readouterr().err
    assert exc.value.code == 130 and err == "error: interrupted\n", err  # not even click's blank line before it
