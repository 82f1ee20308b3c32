"""Split GGUF sets (llama.cpp's gguf-split shards) as bases: the first shard is the whole set for validation, probe
hashes and train_on_grid, as llama.cpp reads it; any other shard, a missing or foreign shard, a tensor in two shards
is refused in one line naming the file and rule 1.6 (spec section 15.1). Merging into a set is refused until the
writer lays out shards (converters/gguf_split.py).

The sets are written by gguf-py's GGUFWriter with a shard limit, which lays them out as gguf-split does (names
PREFIX-0000i-of-0000N.gguf; the model's metadata in the first; split.no, split.count, split.tensors.count in each).
"""
from __future__ import annotations

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


def test_merging_into_a_split_set_is_refused_and_writes_nothing(split_set, tmp_path, capsys):
    first, _, adapter = split_set
    before = {p: p.read_bytes() for p in shards(first)}
    rc, err = one_line_error(capsys, ["--base", os.fspath(first), "--adapter", os.fspath(adapter),
                                      "--out", os.fspath(tmp_path / "m.gguf")])
    assert rc == 2 and "split GGUF set of 3" in err and "rule 1.6" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("m.gguf")]
    assert {p: p.read_bytes() for p in shards(first)} == before


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
