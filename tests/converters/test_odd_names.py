"""File names that are not UTF-8 (found by bench/surroundings.py): `neuroada-pack --combine` and extract
recorded the input's name in the adapter metadata as is, a lone surrogate escape, and then refused their
own output (exit 1, rule 2.2, blaming OUT). Such a name is written with U+FFFD in metadata instead."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format.converters import pack_cli

_spec = importlib.util.spec_from_file_location("_merge_builders_odd", Path(__file__).with_name("test_merge_safetensors.py"))
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes")


def pack(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        pack_cli.main([os.fspath(a) for a in argv])
    return exc.value.code, capsys.readouterr().err


def test_inputs_with_undecodable_names_pack_like_any_other(tmp_path, capsys):
    rng = np.random.default_rng(4)
    arrays = B.llama_arrays(rng, conv1d=False, layers=1)
    odd = os.fsdecode(b"ck-\xff")
    base = Path(B.write_checkpoint(tmp_path / odd, arrays, shards=1, extras=False))
    tuned = {n: (w + np.asarray(0.01, w.dtype) if w.ndim == 2 else w) for n, w in arrays.items()}
    ft = B.write_checkpoint(tmp_path / "ft", tuned, shards=1, extras=False)
    code, err = pack(capsys, "--base", base, "--finetuned", ft, "-k", "2", "-o", tmp_path / "x.safetensors")
    assert code == 0, err
    assert naf.load(tmp_path / "x.safetensors").base_name == "ck-\ufffd"
    a = tmp_path / os.fsdecode(b"a-\xfe.safetensors")
    shutil.copy(tmp_path / "x.safetensors", a)
    code, err = pack(capsys, "--combine", a, tmp_path / "x.safetensors", "--base", base, "-o", tmp_path / "c.safetensors")
    assert code == 0, err
    combined = naf.load(tmp_path / "c.safetensors")
    assert naf.validate(combined).ok and "a-\ufffd.safetensors x 1" in combined.extra["description"]
