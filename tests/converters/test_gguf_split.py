"""Split GGUF sets (llama.cpp's gguf-split shards) as bases: the first shard is the whole set for validation, probe
hashes and train_on_grid, as llama.cpp reads it; any other shard, a missing or foreign shard, a tensor in two shards
is refused in one line naming the file and rule 1.6 (spec section 15.1). A merge into a set writes a set laid out as
the input, equal tensor by tensor to the merge into the unsplit model, published together (spec section 15.3).

The sets are written by gguf-py's GGUFWriter with a shard limit, which lays them out as gguf-split does (names
PREFIX-0000i-of-0000N.gguf; the model's metadata in the first; split.no, split.count, split.tensors.count in each).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT, quants  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format import NeuroAdaError, NeuroAdaUsageError  # noqa: E402
from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.converters import gguf_read as gr  # noqa: E402
from neuroada_format.converters.gguf_split import GGUFSet  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402

from test_gguf import TARGETS, hf_arrays, make_adapter, write_gguf  # noqa: E402

PER_SHARD = 8  # 20 tensors -> 3 shards of 8, 8 and 4


@pytest.fixture
def split_set(tmp_path):
    """(first shard, the same model unsplit, an adapter file made against the unsplit one)."""
    first = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.Q4_1, split_max_tensors=PER_SHARD)
    whole = write_gguf(tmp_path / "whole.gguf", hf_arrays(), QT.Q4_1)
    adapter = tmp_path / "a.safetensors"
    naf.save(make_adapter(gn.open_gguf_base(whole)), adapter)
    return first, whole, adapter


def shards(first):
    return [first.with_name(f"base-{i:05d}-of-00003.gguf") for i in (1, 2, 3)]


def test_the_set_is_written_as_gguf_split_writes_it(split_set):
    first, _, _ = split_set
    files = [gr.read_gguf(p) for p in shards(first)]
    assert [len(f.tensors) for f in files] == [8, 8, 4]
    assert [(f.kv["split.no"], f.kv["split.count"], f.kv["split.tensors.count"]) for f in files] == \
        [(0, 3, 20), (1, 3, 20), (2, 3, 20)]
    assert files[0].kv["general.architecture"] == "llama" and "general.architecture" not in files[1].kv
    # the targets are spread over every shard: a view of the first file alone misses some
    owners = {gn.open_gguf_base(first).resolve(t).gguf_name for t in TARGETS}
    assert all(owners & set(f.tensors) for f in files)


def test_the_first_shard_reads_as_the_whole_model(split_set):
    first, whole, adapter = split_set
    view, ref = gn.open_gguf_base(first), gn.open_gguf_base(whole)
    assert isinstance(view.file, GGUFSet) and view.path == os.fspath(first)
    assert view.keys() == ref.keys()
    for name in ref.keys():
        np.testing.assert_array_equal(view.array(name), ref.array(name))
        assert view.info(name) == ref.info(name) and view.encoding(name) == ref.encoding(name)
    a = naf.load(adapter)
    for name, t in a.targets.items():
        np.testing.assert_array_equal(view.probed(name, np.asarray(t.indices)), ref.probed(name, np.asarray(t.indices)))
    assert naf.validate(a, view).ok  # probe hashes included


def test_cli_validate_against_the_first_shard(split_set):
    from click.testing import CliRunner

    from neuroada_format.cli import main as neuroada
    first, _, adapter = split_set
    res = CliRunner().invoke(neuroada, ["validate", os.fspath(adapter), "--base", os.fspath(first)])
    assert res.exit_code == 0, res.output
    other = write_gguf(first.parent / "other.gguf", hf_arrays(seed=4), QT.Q4_1, split_max_tensors=PER_SHARD)
    res = CliRunner().invoke(neuroada, ["validate", os.fspath(adapter), "--base", os.fspath(other)])
    assert res.exit_code == 1 and "4.3" in res.output  # another model's set: the probe hashes differ


def one_line_error(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = merge_run(argv)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return rc, err


@pytest.mark.parametrize("shard", [2, 3])
def test_a_later_shard_is_refused_naming_the_first(split_set, tmp_path, capsys, shard):
    from click.testing import CliRunner

    from neuroada_format.cli import main as neuroada
    first, _, adapter = split_set
    path = shards(first)[shard - 1]
    with pytest.raises(NeuroAdaUsageError, match="give the first, base-00001-of-00003.gguf") as e:
        gn.open_gguf_base(path)
    assert e.value.path == os.fspath(path) and e.value.rule == "1.6" and f"shard {shard} of 3" in str(e.value)
    res = CliRunner().invoke(neuroada, ["validate", os.fspath(adapter), "--base", os.fspath(path)])
    assert res.exit_code == 2 and "base-00001-of-00003.gguf" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    rc, err = one_line_error(capsys, ["--base", os.fspath(path), "--adapter", os.fspath(adapter),
                                      "--out", os.fspath(tmp_path / "m.gguf")])
    assert rc == 2 and "give the first" in err and not (tmp_path / "m.gguf").exists()


def _merge(argv, capsys=None) -> tuple[int, str]:
    rc = merge_run([os.fspath(a) for a in argv])
    return rc, (capsys.readouterr().err.strip() if capsys else "")


def _tensors(path) -> dict:
    """Every tensor of a GGUF file as gguf-py reads it back: name -> (type, shape, raw bytes)."""
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, tuple(int(d) for d in t.shape), bytes(np.asarray(t.data).tobytes()))
            for t in r.tensors}


def _assert_set_equals_file(out_first, count, merged_whole, base_first):
    """A merged set holds, tensor by tensor, the bytes of the same merge into the unsplit model, in the input's
    tensor-to-shard layout with each shard's own metadata (split.* kept)."""
    outs = [out_first.with_name(out_first.name.replace("-00001-of-", f"-{i:05d}-of-")) for i in range(1, count + 1)]
    ins = [base_first.with_name(base_first.name.replace("-00001-of-", f"-{i:05d}-of-")) for i in range(1, count + 1)]
    whole = _tensors(merged_whole)
    seen = {}
    for o, i in zip(outs, ins):
        got, src = gr.read_gguf(o), gr.read_gguf(i)
        assert list(got.tensors) == list(src.tensors)
        assert {k: v for k, v in got.kv.items()} == {k: v for k, v in src.kv.items()}
        seen.update(_tensors(o))
    assert seen.keys() == whole.keys()
    for name, (t, shape, data) in whole.items():
        assert seen[name] == (t, shape, data), name
    return outs


@pytest.mark.parametrize("qt", [QT.F32, QT.F16, QT.Q8_0, QT.Q4_0])
def test_merge_into_a_set_equals_the_merge_into_the_unsplit_model(tmp_path, capsys, qt):
    first = write_gguf(tmp_path / "base.gguf", hf_arrays(), qt, split_max_tensors=PER_SHARD)
    whole = write_gguf(tmp_path / "whole.gguf", hf_arrays(), qt)
    adapter = tmp_path / "a.safetensors"
    naf.save(make_adapter(gn.open_gguf_base(whole)), adapter)
    before = {p: p.read_bytes() for p in shards(first)}
    assert _merge(["--base", whole, "--adapter", adapter, "--out", tmp_path / "mw.gguf"])[0] == 0
    capsys.readouterr()
    assert _merge(["--base", first, "--adapter", adapter, "--out", tmp_path / "m.gguf", "--json"])[0] == 0
    summary = json.loads(capsys.readouterr().out)
    outs = _assert_set_equals_file(tmp_path / "m-00001-of-00003.gguf", 3, tmp_path / "mw.gguf", first)
    assert {p: p.read_bytes() for p in shards(first)} == before  # the input set is untouched
    assert summary["output"] == os.fspath(outs[0]) and summary["files"] == 3
    assert summary["bytes_written"] == sum(os.path.getsize(o) for o in outs)
    per = summary["details"]["shards"]
    assert [d["path"] for d in per] == [os.fspath(o) for o in outs]
    assert sum(d["values_touched"] for d in per) == summary["values_touched"] > 0
    assert all(d["tensors_touched"] for d in per)  # the targets are spread over every shard
    # merged values: the set read as one base equals the merged unsplit file through the Hugging Face view
    a, b = gn.open_gguf_base(outs[0]), gn.open_gguf_base(tmp_path / "mw.gguf")
    for t in TARGETS:
        np.testing.assert_array_equal(a.array(t), b.array(t))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or "neuroada-lock" in p.name]


def test_a_retyped_merge_into_a_set_equals_the_unsplit_one(split_set, tmp_path):
    first, whole, adapter = split_set
    opt = ["--option", "target_type=F32"]
    assert _merge(["--base", whole, "--adapter", adapter, "--out", tmp_path / "mw.gguf", *opt])[0] == 0
    assert _merge(["--base", first, "--adapter", adapter, "--out", tmp_path / "m-00001-of-00003.gguf", *opt])[0] == 0
    _assert_set_equals_file(tmp_path / "m-00001-of-00003.gguf", 3, tmp_path / "mw.gguf", first)


def test_merging_into_a_set_refuses_aliases_and_existing_outputs(split_set, tmp_path, capsys):
    first, _, adapter = split_set
    before = {p: p.read_bytes() for p in shards(first)}
    args = ["--base", os.fspath(first), "--adapter", os.fspath(adapter)]

    def refused(out, *extra, says):
        rc, err = one_line_error(capsys, [*args, "--out", os.fspath(out), *extra])
        assert rc == 2 and says in err, err
        assert {p: p.read_bytes() for p in shards(first)} == before
    # OUT's shards would be the input's own (even with --overwrite)
    refused(tmp_path / "base.gguf", "--overwrite", says="is the input")
    # a later shard of the output a symbolic link to, or a hard link of, an input shard
    os.symlink(shards(first)[1], tmp_path / "s-00002-of-00003.gguf")
    refused(tmp_path / "s.gguf", "--overwrite", says="is the input")
    os.link(shards(first)[2], tmp_path / "h-00003-of-00003.gguf")
    refused(tmp_path / "h.gguf", "--overwrite", says="is the input")  # (same inode)
    # named as another shard, or a shard of another count
    refused(tmp_path / "m-00002-of-00003.gguf", says="named as shard 2 of 3")
    refused(tmp_path / "m-00001-of-00004.gguf", says="base is a set of 3")
    # an existing shard of OUT without --overwrite: nothing written
    (tmp_path / "m-00003-of-00003.gguf").write_bytes(b"mine")
    refused(tmp_path / "m.gguf", says="already exists")
    assert not (tmp_path / "m-00001-of-00003.gguf").exists()
    assert (tmp_path / "m-00003-of-00003.gguf").read_bytes() == b"mine"
    assert merge_run([*args, "--out", os.fspath(tmp_path / "m.gguf"), "--overwrite"]) == 0
    assert (tmp_path / "m-00003-of-00003.gguf").read_bytes() != b"mine"
    # in place: GGUF files are never patched in place, a set no more than one file
    rc, err = one_line_error(capsys, [*args, "--in-place"])
    assert rc == 2 and "in place" in err


def test_a_killed_merge_into_a_set_leaves_no_partial_set(split_set, tmp_path):
    """SIGKILL at random moments: under the final names, the whole new set or no first shard (later shards a kill
    between the renames left are removed by the next merge to OUT, which then needs no --overwrite)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("_faults", Path(__file__).with_name("test_fault_injection.py"))
    F = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(F)
    first, whole, adapter = split_set
    argv = ["--base", first, "--adapter", adapter, "--out", tmp_path / "m.gguf"]
    assert merge_run([*map(os.fspath, argv[:4]), "--out", os.fspath(tmp_path / "ref.gguf")]) == 0
    ref = [tmp_path / f"ref-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    outs = [tmp_path / f"m-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    _, full = F._run(argv)
    rng = np.random.default_rng(5)
    for _ in range(8):
        for o in outs:
            if o.exists():
                o.unlink()
        F._run(argv, kill_after=float(rng.uniform(0, full)))
        if outs[0].exists():
            assert [o.read_bytes() for o in outs] == [r.read_bytes() for r in ref]
        F._run(argv if not outs[0].exists() else [*argv, "--overwrite"])  # no refusal of a killed run's leftovers
        assert [o.read_bytes() for o in outs] == [r.read_bytes() for r in ref]
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _shard(path, no, count, total, tensors: dict[str, np.ndarray]):
    """A later shard written by hand: split keys as given (no architecture, as gguf-split writes one), Q4_1 tensors."""
    w = gguf.GGUFWriter(os.fspath(path), None)
    w.add_uint16("split.no", no)
    w.add_uint16("split.count", count)
    w.add_int32("split.tensors.count", total)
    for name, a in tensors.items():
        q = quants.quantize(a, QT.Q4_1)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=QT.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _refused(first, match, cls=NeuroAdaError):
    with pytest.raises(cls, match=match) as e:
        gn.open_gguf_base(first)
    assert e.value.rule == "1.6"
    return e.value


def test_a_missing_or_foreign_shard_is_refused(split_set, tmp_path):
    first, _, _ = split_set
    s1, s2, s3 = shards(first)
    keep = tmp_path / "keep.gguf"
    shutil.move(s3, keep)
    assert _refused(first, "shard 3 of the split set is missing: base-00003-of-00003.gguf").path == os.fspath(first)
    shutil.move(keep, s3)
    # a shard of another split (two shards): its split.count is not this set's
    other = write_gguf(tmp_path / "o.gguf", hf_arrays(), QT.Q4_1, split_max_tensors=12)
    shutil.copy(s2, keep)
    shutil.copy(other.with_name("o-00002-of-00002.gguf"), s2)
    assert _refused(first, "not shard 2 of 3").path == os.fspath(s2)
    shutil.copy(keep, s2)
    gn.open_gguf_base(first)  # whole again
    # right keys, but one of the first shard's tensors again
    taken = next(iter(gr.read_gguf(s1).tensors))
    rng = np.random.default_rng(0)
    _shard(s3, 2, 3, 20, {taken: rng.standard_normal((64, 64)).astype(np.float32)})
    e = _refused(first, "tensor is in two shards of the split set")
    assert e.tensor == taken and e.path == os.fspath(s3)
    # right keys, too few tensors in all
    _shard(s3, 2, 3, 20, {"blk.9.extra.weight": rng.standard_normal((64, 64)).astype(np.float32)})
    _refused(first, "hold 17 tensors, split.tensors.count says 20")
    # another split.tensors.count
    _shard(s3, 2, 3, 21, {})
    _refused(first, "split.tensors.count=21, the first shard says 20")


def test_a_first_shard_not_named_as_llama_cpp_names_one_is_refused(split_set, tmp_path):
    first, _, _ = split_set
    renamed = tmp_path / "model.gguf"
    shutil.copy(first, renamed)
    e = _refused(renamed, "not named as llama.cpp names one")
    assert e.path == os.fspath(renamed)
    _shard(tmp_path / "bad-00001-of-00002.gguf", 2, 2, 1, {})  # split.no past split.count
    _refused(tmp_path / "bad-00001-of-00002.gguf", "split metadata is not a shard's")


def test_train_on_grid_takes_the_first_shard(split_set):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from neuroada_format.runtime import NeuroAdaConfig, attach, grid_types, train_on_grid
    first, whole, _ = split_set
    read = transformers.AutoModelForCausalLM.from_pretrained(whole.parent, gguf_file=whole.name, dtype=torch.float32)
    config = read.config
    del config.quantization_config
    plain = type(read)(config).eval()
    plain.load_state_dict(read.state_dict())
    import copy
    a, b = attach(copy.deepcopy(plain), NeuroAdaConfig(k=4)), attach(copy.deepcopy(plain), NeuroAdaConfig(k=4))
    assert train_on_grid(a, first) == train_on_grid(b, whole)
    assert grid_types(a) == grid_types(b) and len(grid_types(a)) == 14
    with pytest.raises(NeuroAdaUsageError, match="give the first"):
        train_on_grid(attach(copy.deepcopy(plain), NeuroAdaConfig(k=4)), shards(first)[1])


def test_a_set_of_one_is_a_whole_file_whatever_its_split_no(tmp_path):
    """split.count 1 is a whole file (spec section 15.1): its split.no, out of range here, is not read, as llama.cpp
    reads split.no only for a count of two or more (vector gguf_split_count_one: split.no absent)."""
    rng = np.random.default_rng(1)
    _shard(tmp_path / "one.gguf", 5, 1, 1, {"blk.0.extra.weight": rng.standard_normal((4, 64)).astype(np.float32)})
    view = gn.open_gguf_base(tmp_path / "one.gguf")
    assert not isinstance(view.file, GGUFSet) and view.keys() == ["blk.0.extra.weight"]
