"""Two `neuroada-pack` runs writing one new -o at once (found by bench/surroundings.py): both passed the
overwrite check before either had written, and the adapter writer then renamed over whatever was there, so
both exited 0 and one output silently replaced the other. Without --overwrite the rename now never replaces
(SPEC 11.5: an existing OUT is replaced only with --overwrite), so the later run is refused."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format.converters import pack, pack_cli

_spec = importlib.util.spec_from_file_location("_merge_builders_race", Path(__file__).with_name("test_merge_safetensors.py"))
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_appears_during_the_run_is_replaced_only_with_overwrite(tmp_path, capsys, monkeypatch,
                                                                                 overwrite):
    rng = np.random.default_rng(2)
    arrays = B.llama_arrays(rng, conv1d=False, layers=1)
    naf.save(B.make_adapter(rng, arrays, B.targets_of(arrays), 2), tmp_path / "a.safetensors")
    out = tmp_path / "r.safetensors"
    real = pack.repack

    def other_writer_meanwhile(*args, **kwargs):   # the check has passed; another run publishes first
        out.write_bytes(b"the other run's output")
        return real(*args, **kwargs)

    monkeypatch.setattr(pack, "repack", other_writer_meanwhile)
    with pytest.raises(SystemExit) as exc:
        pack_cli.main(["--repack", os.fspath(tmp_path / "a.safetensors"), "--value-dtype", "F32", "-o", os.fspath(out),
                       *(["--overwrite"] if overwrite else [])])
    err = capsys.readouterr().err
    if overwrite:
        assert exc.value.code == 0, err
        assert naf.validate(out).ok
    else:
        assert exc.value.code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1, err
        assert out.read_bytes() == b"the other run's output"
    assert B.siblings(out) == []
