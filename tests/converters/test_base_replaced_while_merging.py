"""A base whose files are replaced while a merge reads them: a re-download renamed into place, a `latest` link to a
snapshot folder repointed. The merge reads the headers first and the files again later, by name; it used to copy a
mix of the two versions (or patch the new file at the old header's offsets) and exit 0. Now it is refused, naming
the file, and nothing is written."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format import NeuroAdaUsageError
from neuroada_format.converters import safetensors_merge as sm


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_replaced_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _load("test_merge_safetensors")  # llama_arrays, write_checkpoint, make_adapter, targets_of


def digest(root) -> dict[str, str]:
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def two_versions(tmp_path):
    """Two checkpoints of the same layout and other values (both fit the adapter: same positions, so only the probe
    hashes could tell them apart), and an adapter made on the first."""
    rng = np.random.default_rng(11)
    old = B.llama_arrays(rng, layers=1)
    new = {n: (a.astype(np.float32) * 2).astype(a.dtype) for n, a in old.items()}
    adapter = B.make_adapter(rng, old, B.targets_of(old), 3)
    naf.save(adapter, tmp_path / "a.safetensors")
    return old, new, tmp_path / "a.safetensors"


def _replace_after_open(monkeypatch, swap):
    """Run `swap` once the merge has read the base's headers and checked the adapters, before any file is read again."""
    real = sm.check_adapters

    def check_then_swap(*args, **kw):
        out = real(*args, **kw)
        swap()
        return out

    monkeypatch.setattr(sm, "check_adapters", check_then_swap)


@pytest.mark.parametrize("verify", [True, False])
def test_a_single_file_renamed_over_is_refused(tmp_path, two_versions, monkeypatch, verify):
    old, new, adapter = two_versions
    base = Path(B.write_checkpoint(tmp_path / "old", old, shards=1, extras=False)) / "model.safetensors"
    B.write_checkpoint(tmp_path / "new", new, shards=1, extras=False)
    _replace_after_open(monkeypatch, lambda: os.replace(tmp_path / "new" / "model.safetensors", base))
    with pytest.raises(NeuroAdaUsageError, match="was replaced while the merge was reading the base") as err:
        sm.merge_safetensors(base, [(adapter, 1.0)], tmp_path / "out.safetensors", verify=verify)
    assert err.value.path == os.fspath(base)
    assert not (tmp_path / "out.safetensors").exists() and os.listdir(tmp_path).count("out.safetensors") == 0
    again = Path(B.write_checkpoint(tmp_path / "again", new, shards=1, extras=False)) / "model.safetensors"
    assert digest(base) == digest(again)  # the file renamed in is left as it came


@pytest.mark.parametrize("in_place", [False, True])
def test_a_repointed_folder_link_is_refused(tmp_path, two_versions, monkeypatch, in_place):
    old, new, adapter = two_versions
    B.write_checkpoint(tmp_path / "snap-old", old, shards=3)
    B.write_checkpoint(tmp_path / "snap-new", new, shards=3)
    before = {p: digest(tmp_path / p) for p in ("snap-old", "snap-new")}
    os.symlink("snap-old", tmp_path / "latest")

    def repoint():
        os.symlink("snap-new", tmp_path / "latest.tmp")
        os.replace(tmp_path / "latest.tmp", tmp_path / "latest")

    _replace_after_open(monkeypatch, repoint)
    with pytest.raises(NeuroAdaUsageError, match="was replaced while the merge was reading the base"):
        if in_place:
            sm.merge_in_place(tmp_path / "latest", [(adapter, 1.0)])
        else:
            sm.merge_safetensors(tmp_path / "latest", [(adapter, 1.0)], tmp_path / "out")
    assert {p: digest(tmp_path / p) for p in before} == before  # neither version patched, no journal left
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "latest", "snap-new", "snap-old"]


def test_a_gguf_renamed_over_is_refused(tmp_path, monkeypatch):
    G = _load("test_gguf")
    from neuroada_format.converters import gguf_merge as gm
    from neuroada_format.converters import gguf_names as gn

    base = G.write_gguf(tmp_path / "m.gguf", G.hf_arrays(0))
    G.write_gguf(tmp_path / "other.gguf", G.hf_arrays(1))
    adapter = G.make_adapter(gn.open_gguf_base(base))
    backend = type(gm.BACKEND)
    real = backend.plan

    def plan_then_swap(self, *args, **kw):
        out = real(self, *args, **kw)
        os.replace(tmp_path / "other.gguf", base)
        return out

    monkeypatch.setattr(backend, "plan", plan_then_swap)
    with pytest.raises(NeuroAdaUsageError, match="was replaced while the merge was reading the base") as err:
        gm.merge_gguf(base, [(adapter, 1.0)], tmp_path / "out.gguf", verify=False)
    assert err.value.path == os.fspath(base)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_a_gguf_renamed_over_between_two_tensor_reads_is_refused(tmp_path, monkeypatch):
    """Each positional read checks that the file is still the one opened: a re-typed merge reads whole tensors
    (read_tensor), and a file renamed over after the first read would otherwise give a merge of two files' tensors."""
    G = _load("test_gguf")
    from neuroada_format.converters import gguf_merge as gm
    from neuroada_format.converters import gguf_names as gn
    from neuroada_format.converters import gguf_read as gr

    base = G.write_gguf(tmp_path / "m.gguf", G.hf_arrays(0))
    G.write_gguf(tmp_path / "other.gguf", G.hf_arrays(1))
    adapter = G.make_adapter(gn.open_gguf_base(base))
    real = gr.read_tensor
    calls = []

    def read_then_swap(*args, **kw):
        out = real(*args, **kw)
        calls.append(1)
        if len(calls) == 1:
            os.replace(tmp_path / "other.gguf", base)
        return out

    monkeypatch.setattr(gr, "read_tensor", read_then_swap)
    with pytest.raises(NeuroAdaUsageError, match="was replaced while the merge was reading") as err:
        gm.merge_gguf(base, [(adapter, 1.0)], tmp_path / "out.gguf", target_type="F32")
    assert err.value.path == os.fspath(base)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_a_base_that_shrinks_is_named_not_the_output(tmp_path, two_versions, monkeypatch):
    old, _, adapter = two_versions
    base = Path(B.write_checkpoint(tmp_path / "old", old, shards=1, extras=False)) / "model.safetensors"
    size = base.stat().st_size
    _replace_after_open(monkeypatch, lambda: os.truncate(base, size - 4096))
    with pytest.raises(NeuroAdaUsageError, match="shrank while the merge was reading it") as err:
        sm.merge_safetensors(base, [(adapter, 1.0)], tmp_path / "out.safetensors", verify=False)
    assert err.value.path == os.fspath(base)
    assert not (tmp_path / "out.safetensors").exists()
    shutil.rmtree(tmp_path / "old")


def test_a_reader_through_a_linked_file_holds_the_real_folders_lock(tmp_path, two_versions):
    """A copy merge reading the base through a symbolic link in another folder locked the link's folder, so an
    in-place merge of the real file (the only name in-place accepts) ran beside it and the copy mixed tensors from
    before and after the patch. The lock is now the real folder's: the in-place merge is refused as busy."""
    from neuroada_format.durable import checkpoint_folder, checkpoint_lock

    old, _, adapter = two_versions
    real = Path(B.write_checkpoint(tmp_path / "real", old, shards=1, extras=False)) / "model.safetensors"
    (tmp_path / "view").mkdir()
    os.symlink(real, tmp_path / "view" / "model.safetensors")
    assert checkpoint_folder(tmp_path / "view" / "model.safetensors") == os.fspath(tmp_path / "real")
    before = digest(real)
    with checkpoint_lock(checkpoint_folder(tmp_path / "view" / "model.safetensors"), exclusive=False):
        with pytest.raises(NeuroAdaUsageError, match="busy"):
            sm.merge_in_place(real, [(adapter, 1.0)])
    assert digest(real) == before
