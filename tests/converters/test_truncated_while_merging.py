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


# -- cut while it is being patched (the in-place merge's and the revert's writes) -------------------------------------
ROWS, COLS, OFFSET = 512, 8192, 4096  # a 16 MB F32 tensor at OFFSET of the file


def _patch_setup(tmp_path):
    path = str(tmp_path / "base.bin")
    with open(path, "wb") as f:
        # (a tensor after it: a write of the last span re-grows a file cut just before it, and at the file's end
        # that would bring back its old size, a cut no size check sees; a hole where the cut removed data)
        f.write(np.random.default_rng(5).random(OFFSET // 4 + ROWS * COLS + 1024, dtype=np.float32).tobytes())
    cols = np.sort(np.random.default_rng(6).random((ROWS, COLS)).argsort(axis=1)[:, :20], axis=1)
    positions = (np.arange(ROWS)[:, None] * COLS + cols).reshape(-1)
    return path, positions, np.full(positions.size, 7.0, np.float32)


def _in_child(run) -> int:
    """``run()`` in a forked child: exit 0 if it raised our error naming the file, 1 if something else; a crash
    (SIGBUS: a map's page past the new end) is a negative exit code."""
    import multiprocessing

    def child():
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        try:
            run()
        except NeuroAdaError as exc:
            os._exit(0 if exc.path and "cut short" in str(exc) else 1)
        except BaseException:  # noqa: BLE001 - reported by the exit code
            os._exit(1)
        os._exit(1)  # finished as if nothing happened: the cut went unseen

    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    p.join(120)
    return p.exitcode


def _cut_by_a_thread(path: str, size: int) -> None:
    import threading

    t = threading.Thread(target=os.truncate, args=(path, size))
    t.start()
    t.join()


def test_a_base_cut_right_after_the_patch_read_its_size(tmp_path, monkeypatch):
    """Another thread cuts the file just after the patch checked its size. Through a map, a map of the old length
    (a SIGBUS on the first page past the new end; here Python's mmap refused it with a bare ValueError first); now
    the first read comes up short: our error, naming the file."""
    from neuroada_format.converters import tensor_map as tm

    path, positions, values = _patch_setup(tmp_path)
    real, done = os.fstat, []

    def fstat_then_cut(fd):
        st = real(fd)
        if not done and os.path.samefile(f"/proc/self/fd/{fd}", path):
            done.append(True)
            _cut_by_a_thread(path, OFFSET + 1000)
        return st

    def run():
        monkeypatch.setattr(tm.os, "fstat", fstat_then_cut)
        tm.patch_values(path, "F32", OFFSET, ROWS * COLS, positions, values)

    assert _in_child(run) == 0


@pytest.mark.parametrize("after", [1, 3])
def test_a_base_cut_between_two_writes_of_the_patch(tmp_path, monkeypatch, after):
    """The cut comes after some spans were written: the write of the next would grow the file back over the cut (no
    short read to see), so the size is checked after each write."""
    from neuroada_format.converters import tensor_map as tm

    path, positions, values = _patch_setup(tmp_path)
    real, calls = tm.write_exactly, [0]

    def write_then_cut(fd, view, pos):
        real(fd, view, pos)
        calls[0] += 1
        if calls[0] == after:  # (one call per span of up to READ_BLOCK bytes: four in this tensor)
            _cut_by_a_thread(path, OFFSET + 1000)

    monkeypatch.setattr(tm, "write_exactly", write_then_cut)
    with pytest.raises(NeuroAdaError, match="cut short") as err:
        tm.patch_values(path, "F32", OFFSET, ROWS * COLS, positions, values)
    assert err.value.path == path


def test_a_base_cut_by_another_process_during_patches_never_crashes(tmp_path):
    """A real second process truncates the file at a random moment while patches run: every run ends with our error
    or, when the cut came first, the 'shrank' refusal before any write; the process is never killed (SIGBUS)."""
    import multiprocessing
    import random
    import time

    from neuroada_format.converters import tensor_map as tm

    rng = random.Random(11)
    for trial in range(6):
        path, positions, values = _patch_setup(tmp_path)

        def patch_forever():
            try:
                for _ in range(1000):
                    tm.patch_values(path, "F32", OFFSET, ROWS * COLS, positions, values)
            except NeuroAdaError as exc:
                os._exit(0 if os.path.realpath(exc.path) == os.path.realpath(path) else 1)
            os._exit(2)  # the cut went unseen

        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=patch_forever)
        child.start()
        time.sleep(0.05 + rng.random() * 0.1)
        cutter = ctx.Process(target=os.truncate, args=(path, OFFSET + rng.randrange(ROWS * COLS * 2)))
        cutter.start()
        cutter.join(60)
        child.join(60)
        if child.is_alive():
            child.kill()
        assert child.exitcode == 0, f"trial {trial}: exit {child.exitcode}"


def targets_of_adapter(adapter) -> list[str]:
    return sorted(adapter.targets)


# -- GGUF ---------------------------------------------------------------------------------------------
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from neuroada_format.converters import gguf_merge as gm  # noqa: E402
from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.converters import gguf_read as gr  # noqa: E402
from neuroada_format.converters import gguf_split as gs  # noqa: E402
from test_gguf import TARGETS, hf_arrays, write_gguf  # noqa: E402
from test_gguf import make_adapter as gguf_adapter  # noqa: E402


@pytest.fixture
def gguf_base(tmp_path):
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.Q8_0)
    return path, gguf_adapter(gn.open_gguf_base(path), k=2)


def test_gguf_header_cut_while_parsed(gguf_base, monkeypatch):
    path, _ = gguf_base
    monkeypatch.setattr(gr._Cursor, "WINDOW", 64)  # the header is read in many windows
    _cut_once(monkeypatch, gr._Cursor, "at", path, 100)
    with pytest.raises(NeuroAdaError, match="truncated while read: the file ended at byte 100") as err:
        gr.read_gguf(path)
    assert err.value.path == os.fspath(path)


@pytest.mark.parametrize("step", ["validate", "merge"])
def test_gguf_tensors_cut_after_the_header_was_read(gguf_base, tmp_path, monkeypatch, step):
    path, adapter = gguf_base
    data_start = gr.read_gguf(path).data_start
    _cut_once(monkeypatch, gs, "read_gguf", path, data_start + 10)  # (where open_gguf_base reads the header)
    with pytest.raises(NeuroAdaUsageError, match="shrank") as err:
        if step == "validate":
            naf.validate(adapter, gn.open_gguf_base(path))
        else:
            gm.merge_gguf(path, [(adapter, 1.0)], tmp_path / "out.gguf")
    assert err.value.path == os.fspath(path)
    assert not (tmp_path / "out.gguf").exists()
