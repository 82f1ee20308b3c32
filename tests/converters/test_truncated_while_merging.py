"""A base file truncated by another program while a merge, a revert or a GGUF read has it open (a download
restarting, `cp` over it).

These paths read through memory maps: touching a page past the new end is a SIGBUS, which kills the process with
exit 135 and no message (what the format core's readers did until they moved to positional reads). They read with
positional reads now, so a short read is one error naming the file, and nothing is written. Each test cuts the file
at a fixed point of the run (after the header was read, or after the first read), so it is deterministic; a
regression would crash the test process rather than fail a test.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.converters import journal as jr
from neuroada_format.converters import safetensors_merge as sm

from test_merge_safetensors import llama_arrays, make_adapter, targets_of, tree_digest, write_checkpoint


def _cut_once(monkeypatch, module, name: str, victim, size: int):
    """Truncate `victim` to `size` bytes right after the first call of module.name (a step of the run)."""
    real = getattr(module, name)
    done = []

    def then_cut(*args, **kw):
        out = real(*args, **kw)
        if not done:
            done.append(True)
            os.truncate(victim, size)
        return out

    monkeypatch.setattr(module, name, then_cut)


@pytest.fixture
def checkpoint(tmp_path):
    rng = np.random.default_rng(3)
    arrays = llama_arrays(rng, "F32", layers=1)
    base = write_checkpoint(tmp_path / "base", arrays, shards=1, extras=False)
    adapter = make_adapter(rng, arrays, targets_of(arrays), 3)
    return base, os.path.join(base, "model.safetensors"), adapter


@pytest.mark.parametrize("verify", [True, False])
def test_in_place_merge_of_a_base_cut_after_its_header_was_read(tmp_path, checkpoint, monkeypatch, verify):
    base, victim, adapter = checkpoint
    header_end = naf.open_base(base).file_of(targets_of_adapter(adapter)[0]).data_start
    _cut_once(monkeypatch, sm, "check_adapters", victim, header_end + 100)
    with pytest.raises(NeuroAdaUsageError, match="shrank while the merge was reading it") as err:
        sm.merge_in_place(base, [(adapter, 1.0)], journal=tmp_path / "j.safetensors", verify=verify)
    assert err.value.path == victim
    assert not (tmp_path / "j.safetensors").exists() and os.path.getsize(victim) == header_end + 100
    assert not [n for n in os.listdir(tmp_path) if n.startswith("j.safetensors")]  # no temporary journal left


def test_in_place_patch_of_a_base_cut_after_the_journal_is_refused_before_mapping(tmp_path, checkpoint, monkeypatch):
    base, victim, adapter = checkpoint
    _cut_once(monkeypatch, sm, "write_journal", victim, 200)
    with pytest.raises(NeuroAdaUsageError, match="shrank while the merge was reading it"):
        sm.merge_in_place(base, [(adapter, 1.0)], journal=tmp_path / "j.safetensors")
    assert os.path.getsize(victim) == 200  # never extended by the map, never written


def test_in_place_patch_of_a_base_one_byte_short_is_refused_as_such(tmp_path, checkpoint, monkeypatch):
    """The map's end check is exact: a file cut by one byte is 'shrank', not mmap's bare 'length is greater'."""
    base, victim, adapter = checkpoint
    size = os.path.getsize(victim)
    _cut_once(monkeypatch, sm, "write_journal", victim, size - 1)
    with pytest.raises(NeuroAdaUsageError, match="shrank while the merge was reading it"):
        sm.merge_in_place(base, [(adapter, 1.0)], journal=tmp_path / "j.safetensors")
    assert os.path.getsize(victim) == size - 1


def test_revert_of_a_base_cut_after_its_checks(tmp_path, checkpoint, monkeypatch):
    base, victim, adapter = checkpoint
    journal = sm.merge_in_place(base, [(adapter, 1.0)]).journal
    merged = tree_digest(base)
    header_end = naf.open_base(base).file_of(targets_of_adapter(adapter)[0]).data_start
    _cut_once(monkeypatch, jr, "reserve", victim, header_end + 8)  # reserve comes right before the read
    with pytest.raises(NeuroAdaUsageError, match="shrank") as err:
        jr.revert(journal)
    assert err.value.path == victim
    monkeypatch.undo()
    assert tree_digest(base) != merged and os.path.getsize(victim) == header_end + 8  # nothing written back


def targets_of_adapter(adapter) -> list[str]:
    return sorted(adapter.targets)


# -- GGUF ---------------------------------------------------------------------------------------------
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from neuroada_format.converters import gguf_merge as gm  # noqa: E402
from test_gguf import TARGETS, hf_arrays, write_gguf  # noqa: E402
from test_gguf import make_adapter as gguf_adapter  # noqa: E402


@pytest.fixture
def gguf_base(tmp_path):
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.Q8_0)
    return path, gguf_adapter(gm.open_gguf_base(path), k=2)


def test_gguf_header_cut_while_parsed(gguf_base, monkeypatch):
    path, _ = gguf_base
    monkeypatch.setattr(gm._Cursor, "WINDOW", 64)  # the header is read in many windows
    _cut_once(monkeypatch, gm._Cursor, "at", path, 100)
    with pytest.raises(NeuroAdaError, match="truncated while read: the file ended at byte 100") as err:
        gm.read_gguf(path)
    assert err.value.path == os.fspath(path)


@pytest.mark.parametrize("step", ["validate", "merge"])
def test_gguf_tensors_cut_after_the_header_was_read(gguf_base, tmp_path, monkeypatch, step):
    path, adapter = gguf_base
    data_start = gm.read_gguf(path).data_start
    _cut_once(monkeypatch, gm, "read_gguf", path, data_start + 10)
    with pytest.raises(NeuroAdaUsageError, match="shrank") as err:
        if step == "validate":
            naf.validate(adapter, gm.open_gguf_base(path))
        else:
            gm.merge_gguf(path, [(adapter, 1.0)], tmp_path / "out.gguf")
    assert err.value.path == os.fspath(path)
    assert not (tmp_path / "out.gguf").exists()
