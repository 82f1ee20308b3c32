"""GGUF bases whose quantised blocks have a NaN or Inf scale (a damaged or hostile file).

Before: `neuroada-merge` blamed the adapter's scale ("128 merged values reach 0.2271, beyond what a Q4_1 block can
encode ...; merge with a smaller scale", quoting a finite nanmax), and for an Inf scale numpy's "invalid value
encountered in multiply" RuntimeWarning leaked from gguf-py's decoder as a stray line. Now a touched block that
decodes to NaN/Inf is refused under rule 1.6, in one line naming the file, the tensor and the block, before any
output is published; untouched damaged blocks are copied as they are, and F16/F32 re-typing carries the values
(spec section 8.1). The files are real tiny GGUFs (gguf-py's writer), damaged by editing a block's F16 scale bytes.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format.converters import gguf_kquants as kq  # noqa: E402
from neuroada_format.converters import gguf_merge as gm  # noqa: E402
from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.converters import gguf_read as gr  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402

from test_gguf import hf_arrays, make_adapter, write_gguf  # noqa: E402
from test_gguf_grid_merge import touched_blocks  # noqa: E402

UP = "model.layers.0.mlp.up_proj.weight"       # [256, 64]: two 32-value blocks per row
UP_G = "blk.0.ffn_up.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"   # [64, 256]: one K-quant super-block per row
DOWN_G = "blk.0.ffn_down.weight"
BITS = {"nan": 0x7E00, "inf": 0x7C00, "-inf": 0xFC00}
# where a block's F16 scale lies: Q6_K keeps its super-scale d last, Q2_K its d and then dmin last; every other type
# first (Q4_1/Q5_1/Q4_K/Q5_K keep their minimum right after it, at byte 2)
SCALE_AT = {QT.Q6_K: -2, QT.Q3_K: -2, QT.Q2_K: -4}


def damaged(src, dst, gname, blocks, bits, at=None):
    """A copy of the GGUF file src with the F16 at byte `at` of the tensor's blocks `blocks` set to `bits`."""
    f = gr.read_gguf(src)
    info = f.tensors[gname]
    size = GGML_QUANT_SIZES[info.type][1]
    at = SCALE_AT.get(info.type, 0) if at is None else at
    data = bytearray(open(src, "rb").read())
    for b in blocks:
        pos = f.data_start + info.offset + b * size + (at % size)
        data[pos:pos + 2] = struct.pack("<H", bits)
    open(dst, "wb").write(bytes(data))
    return dst


def base_and_adapter(tmp_path, qt, kind, blocks=range(8), at=None, name=UP, gname=UP_G, src=None):
    """A damaged base and an adapter made against it (its own view, NaN/Inf values included): the probe hashes
    match, so the merge reaches the blocks."""
    src = src or write_gguf(tmp_path / f"clean-{qt.name}.gguf", hf_arrays(), qt)
    path = damaged(src, tmp_path / f"base-{qt.name}-{kind}.gguf", gname, blocks, BITS[kind], at)
    adapter = tmp_path / f"a-{qt.name}-{kind}.safetensors"
    naf.save(make_adapter(gn.open_gguf_base(path), targets=[name]), adapter)
    return path, adapter


def kquant_base(tmp_path, qt):
    """The tiny Llama with layer 0's down_proj in a K type (encoded by us), the rest Q8_0."""
    arrays = hf_arrays()
    raw = {DOWN: kq.encode(qt, arrays[DOWN].reshape(-1, GGML_QUANT_SIZES[qt][0]), None, None)
           .reshape(arrays[DOWN].shape[0], -1)}
    return write_gguf(tmp_path / f"clean-{qt.name}.gguf", arrays, QT.Q8_0, types={DOWN: qt}, raw=raw)


def merge(capsys, path, adapter, out, *extra):
    """neuroada-merge in this process, as the other GGUF tests run it: (exit code, stderr lines)."""
    capsys.readouterr()
    code = merge_run(["--base", os.fspath(path), "--adapter", os.fspath(adapter), "--out", os.fspath(out), *extra])
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).strip().splitlines()


def assert_refused(code, lines, path, gname, out, before):
    assert code == 1, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: ") and os.fspath(path) in line and gname in line, line
    assert "non-finite" in line and "NaN/Inf" in line and "rule 1.6" in line, line
    assert "merged values reach" not in line and "smaller scale" not in line, line  # the adapter is not blamed
    assert "RuntimeWarning" not in line and "encountered" not in line, line
    assert not out.exists() and not [p for p in os.listdir(out.parent) if p.startswith(out.name + ".tmp-")]
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("qt", [QT.Q4_1, QT.Q8_0, QT.Q4_0, QT.Q5_1, QT.Q5_0], ids=lambda t: t.name)
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_a_touched_block_with_a_nonfinite_scale_is_refused_in_one_line(tmp_path, capsys, qt, kind, verify):
    path, adapter = base_and_adapter(tmp_path, qt, kind)
    before = path.read_bytes()
    out = tmp_path / "m.gguf"
    code, lines = merge(capsys, path, adapter, out, *([] if verify else ["--no-verify"]))
    assert_refused(code, lines, path, UP_G, out, before)
    assert f"base {qt.name} block 0 (GGUF row 0, columns 0-31)" in lines[0], lines


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
def test_a_nonfinite_minimum_is_refused_too(tmp_path, capsys, kind):
    """Q4_1's F16 minimum (bytes 2-3 of the block): an Inf one decodes every value to Inf, a finite-looking
    'overflow' before."""
    path, adapter = base_and_adapter(tmp_path, QT.Q4_1, kind, at=2)
    before = path.read_bytes()
    out = tmp_path / "m.gguf"
    code, lines = merge(capsys, path, adapter, out)
    assert_refused(code, lines, path, UP_G, out, before)
    assert "scale or minimum is NaN or Inf" in lines[0], lines


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
def test_a_nonfinite_q2_k_minimum_is_refused(tmp_path, capsys, kind):
    """Q2_K keeps its F16 dmin last, after d: a NaN or Inf one makes the super-block's values NaN or Inf (Inf * a zero
    minimum integer is NaN), refused naming the scale or minimum, as Q4_1's minimum is."""
    path, adapter = base_and_adapter(tmp_path, QT.Q2_K, kind, blocks=range(4), at=-2, name=DOWN, gname=DOWN_G,
                                     src=kquant_base(tmp_path, QT.Q2_K))
    before = path.read_bytes()
    out = tmp_path / "m.gguf"
    code, lines = merge(capsys, path, adapter, out)
    assert_refused(code, lines, path, DOWN_G, out, before)
    assert "base Q2_K block 0 (GGUF row 0, columns 0-255)" in lines[0] and "scale or minimum is NaN or Inf" in lines[0]


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q3_K, QT.IQ4_XS, QT.IQ4_NL, QT.Q2_K],
                         ids=lambda t: t.name)
def test_kquant_superblocks_with_a_nonfinite_scale_are_refused(tmp_path, capsys, qt, kind):
    rows4 = range(4 * 256 // GGML_QUANT_SIZES[qt][0])  # the blocks of rows 0-3
    path, adapter = base_and_adapter(tmp_path, qt, kind, blocks=rows4, name=DOWN, gname=DOWN_G,
                                     src=kquant_base(tmp_path, qt))
    before = path.read_bytes()
    out = tmp_path / "m.gguf"
    code, lines = merge(capsys, path, adapter, out)
    assert_refused(code, lines, path, DOWN_G, out, before)
    last = GGML_QUANT_SIZES[qt][0] - 1
    assert f"base {qt.name} block 0 (GGUF row 0, columns 0-{last})" in lines[0], lines


def test_the_block_is_named_in_the_tensor_when_rows_are_merged_in_chunks(tmp_path, capsys, monkeypatch):
    """The write merges a tensor a few rows at a time: the block number is the tensor's, not the chunk's."""
    monkeypatch.setattr(gm, "BLOCK_VALUES", 16 * 64)  # 16 rows of up_proj at a time
    path, adapter = base_and_adapter(tmp_path, QT.Q8_0, "inf", blocks=[201])  # Inf ranks first: selected
    before = path.read_bytes()
    out = tmp_path / "m.gguf"
    code, lines = merge(capsys, path, adapter, out)
    assert_refused(code, lines, path, UP_G, out, before)
    assert "block 201 (GGUF row 100, columns 32-63)" in lines[0], lines


def test_the_installed_command_prints_one_line_and_no_runtime_warning(tmp_path):
    """The audit's case end to end: the neuroada-merge script in a process of its own, whose stderr would show
    Python's two-line RuntimeWarning (or the handler's 'warning: invalid value ...' line)."""
    path, adapter = base_and_adapter(tmp_path, QT.Q4_1, "inf", blocks=range(64))
    before = path.read_bytes()
    out = tmp_path / "m.gguf"
    script = os.path.join(os.path.dirname(sys.executable), "neuroada-merge")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "neuroada_format.converters.merge_cli"]
    res = subprocess.run([*cmd, "--base", os.fspath(path), "--adapter", os.fspath(adapter), "--out", os.fspath(out)],
                         capture_output=True, text=True, timeout=120)
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert "RuntimeWarning" not in res.stderr and "warning" not in res.stderr, res.stderr
    assert_refused(res.returncode, lines, path, UP_G, out, before)


def test_damaged_blocks_the_merge_does_not_touch_are_copied(tmp_path, capsys):
    """Only the blocks a merge rewrites must be finite: a damaged block no delta lands in keeps its bytes."""
    src = write_gguf(tmp_path / "clean.gguf", hf_arrays(), QT.Q4_1)
    view = gn.open_gguf_base(src)
    ad = make_adapter(view, targets=[UP])
    holds = touched_blocks(view, ad)[UP_G]
    free = int(np.flatnonzero(~holds)[0])
    path = damaged(src, tmp_path / "base.gguf", UP_G, [free], BITS["inf"])
    adapter = tmp_path / "a.safetensors"
    naf.save(ad, adapter)
    out = tmp_path / "m.gguf"
    code, lines = merge(capsys, path, adapter, out)
    assert code == 0, lines
    assert not any("encountered" in line or "RuntimeWarning" in line for line in lines), lines
    assert np.array_equal(gr.read_gguf(out).blocks(UP_G)[free], gr.read_gguf(path).blocks(UP_G)[free])


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_retyping_into_a_block_type_refuses_and_into_floats_carries(tmp_path, capsys, kind):
    """target_type=Q8_0 encodes every block anew: it wrote NaN scales with exit 0 and numpy's 'invalid value' lines.
    F32 keeps NaN/Inf as rule M does for a float base (section 8.1), without a stray warning."""
    path, adapter = base_and_adapter(tmp_path, QT.Q4_1, kind)
    before = path.read_bytes()
    out = tmp_path / "m.gguf"
    code, lines = merge(capsys, path, adapter, out, "--option", "target_type=Q8_0")
    assert_refused(code, lines, path, UP_G, out, before)
    assert "into Q8_0 blocks" in lines[0] and "GGUF row 0, column 0" in lines[0], lines
    code, lines = merge(capsys, path, adapter, out, "--option", "target_type=F32")
    assert code == 0, lines
    assert not any("encountered" in line or "RuntimeWarning" in line for line in lines), lines
    merged = gn.open_gguf_base(out).array(UP)
    assert not np.isfinite(merged[:4]).any() and np.isfinite(merged[4:]).all()


def test_reading_a_damaged_base_warns_nothing(tmp_path):
    """The view (validate's probes, extract, the merge's first probe check) decodes NaN/Inf quietly: they are the
    file's values; only re-encoding them is refused."""
    path, adapter = base_and_adapter(tmp_path, QT.Q4_1, "inf")
    view = gn.open_gguf_base(path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        values = view.array(UP)
        probed = view.probed(UP, naf.load(adapter).targets[UP].indices)
        assert naf.validate(naf.load(adapter), view).ok
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in seen]
    assert not np.isfinite(values[:4]).any() and not np.isfinite(probed[:4]).any()
