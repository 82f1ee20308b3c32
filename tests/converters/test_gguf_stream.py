"""The GGUF merge's streamed write: when no tensor changes type, the output keeps the input's layout
byte for byte outside the touched tensors (copied by the kernel), and each touched tensor (read a block
of rows at a time, merged, written at its offset) holds exactly what merging the whole tensor at once
gives.

The reference here is the whole-tensor merge written out from the public pieces (decode the tensor,
rule M through `plan_merge`, re-encode the blocks that hold a touched value with `encode_blocks`), i.e.
what the merge did before it streamed; the chunk sizes are made tiny so tensors split into many blocks
of rows, with a short last one.
"""
from __future__ import annotations

import dataclasses
import errno
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, quants  # noqa: E402

import neuroada_format as naf  # noqa: E402
from neuroada_format import NeuroAdaError  # noqa: E402
from neuroada_format.converters import gguf_encode as ge  # noqa: E402
from neuroada_format.converters import gguf_merge as gm  # noqa: E402
from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.converters import gguf_read as gr  # noqa: E402
from neuroada_format.converters import block_fit  # noqa: E402
from neuroada_format.merge import Delta, plan_merge  # noqa: E402

from test_gguf import ALL_TYPES, hf_arrays, make_adapter, write_gguf  # noqa: E402


@pytest.fixture
def small_chunks(monkeypatch):
    """Blocks of a few rows (the defaults hold a whole tiny tensor in one block)."""
    monkeypatch.setattr(gm, "BLOCK_BYTES", 1000)    # floats: 3 rows of 64 F32, 7 of 64 F16, 1 of 256 F32
    monkeypatch.setattr(gm, "BLOCK_VALUES", 200)    # quantized: 3 rows of 64, 1 row of 256


def whole_tensor_reference(path, adapters, *, encoder="search", touched_weight=100.0) -> bytes:
    """The merged file as the whole-tensor merge makes it: every touched tensor decoded at once, merged
    with rule M, its float values written / its touched blocks re-encoded, patched into a copy."""
    view = gn.open_gguf_base(path)
    f = view.file
    data = bytearray(open(path, "rb").read())
    by_tensor = {}
    for adapter, scale in adapters:
        for name, t in adapter.targets.items():
            by_tensor.setdefault(view.resolve(name).gguf_name, []).append((name, t, scale))
    for gname, entries in by_tensor.items():
        info = f.tensors[gname]
        m = view.resolve(entries[0][0])
        deltas = []
        for _, t, scale in entries:
            idx, val = np.asarray(t.indices), np.asarray(t.values)
            if m.perm is not None:
                idx, val = idx[m.perm], val[m.perm]
            deltas.append(Delta(idx, val, scale))
        weight = np.array(f.decode(gname))
        mp = plan_merge(weight, deltas)
        start = f.data_start + info.offset
        if info.type in gr.FLOAT_TYPES:
            weight.reshape(-1)[mp.positions] = mp.merged
            data[start:start + info.nbytes] = weight.tobytes()
            continue
        block, unit = GGML_QUANT_SIZES[info.type]
        ids = np.unique(mp.positions // block)
        values = np.array(weight.reshape(-1, block)[ids], dtype=np.float32)
        mask = np.zeros(values.shape, bool)
        where = np.searchsorted(ids, mp.positions // block)
        values[where, mp.positions % block] = mp.merged
        mask[where, mp.positions % block] = True
        blocks = np.array(f.blocks(gname))
        blocks[ids] = ge.encode_blocks(info.type, values, blocks[ids], mask, method=encoder,
                                       touched_weight=touched_weight)
        data[start:start + info.nbytes] = blocks.tobytes()
    return bytes(data)


def touched_ranges(path, adapter):
    view = gn.open_gguf_base(path)
    f = view.file
    return sorted((f.data_start + f.tensors[g].offset, f.data_start + f.tensors[g].offset + f.tensors[g].nbytes)
                  for g in {view.resolve(n).gguf_name for n in adapter.targets})


@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda t: t.name)
def test_streamed_merge_equals_the_whole_tensor_merge(tmp_path, small_chunks, qt):
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), qt)
    view = gn.open_gguf_base(path)
    a, b = make_adapter(view, k=5, seed=3), make_adapter(view, k=3, seed=4, value_dtype="BF16")
    out = tmp_path / "m.gguf"
    s = gm.merge_gguf(path, [(a, 0.75), (b, -1.0)], out)
    got, want = out.read_bytes(), whole_tensor_reference(path, [(a, 0.75), (b, -1.0)])
    assert got == want
    assert s.details["retyped"] == {} and s.bytes_written == os.path.getsize(path)
    assert s.values_touched == sum(plan_merge(np.zeros(t.shape, np.float32),
                                              [a.targets[n], b.targets[n]]).positions.size
                                   for n, t in a.targets.items())


@pytest.mark.parametrize("qt", [QT.F16, QT.Q4_1], ids=lambda t: t.name)
def test_layout_is_the_input_s_and_untouched_bytes_are_identical(tmp_path, small_chunks, qt):
    """Header, metadata, tensor table, padding and every byte outside the touched tensors: the input's."""
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), qt)
    adapter = make_adapter(gn.open_gguf_base(path), k=4)
    out = tmp_path / "m.gguf"
    gm.merge_gguf(path, [adapter], out)
    src, dst = gr.read_gguf(path), gr.read_gguf(out)
    assert (src.data_start, src.alignment, src.size) == (dst.data_start, dst.alignment, dst.size)
    assert {n: (t.type, t.ne, t.offset, t.nbytes) for n, t in src.tensors.items()} == \
        {n: (t.type, t.ne, t.offset, t.nbytes) for n, t in dst.tensors.items()}
    a, b = path.read_bytes(), out.read_bytes()
    pos = 0
    for start, end in touched_ranges(path, adapter):
        assert a[pos:start] == b[pos:start]
        assert a[start:end] != b[start:end]
        pos = end
    assert a[pos:] == b[pos:]


def test_search_and_naive_encoders_and_weights_stream_the_same(tmp_path, small_chunks):
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.Q4_0)
    adapter = make_adapter(gn.open_gguf_base(path), k=6, scale=0.01)
    for encoder, weight in (("naive", 100.0), ("search", 1.0), ("search", 1000.0)):
        out = tmp_path / f"{encoder}-{weight}.gguf"
        gm.merge_gguf(path, [adapter], out, encoder=encoder, touched_weight=weight)
        assert out.read_bytes() == whole_tensor_reference(path, [(adapter, 1.0)], encoder=encoder,
                                                          touched_weight=weight)


def test_a_wrong_probe_found_while_streaming_leaves_nothing(tmp_path, small_chunks):
    """Only each adapter's smallest target is probed before the copy; a wrong probe hash on any other
    target is found as its tensor is copied, and the temporary file is removed: OUT never appears."""
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.F16)
    adapter = make_adapter(gn.open_gguf_base(path))
    big = max(adapter.targets.values(), key=lambda t: t.d_out * t.k)
    adapter.targets[big.name] = dataclasses.replace(big, probe="sha256:" + "0" * 64)
    out = tmp_path / "m.gguf"
    with pytest.raises(NeuroAdaError) as exc:
        gm.merge_gguf(path, [adapter], out)
    assert exc.value.rule == "4.3" and exc.value.tensor == big.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf"]
    gm.merge_gguf(path, [adapter], out, verify=False)  # without verification: merged as asked
    assert out.read_bytes() == whole_tensor_reference(path, [(adapter, 1.0)])


def test_a_wrong_base_fails_before_the_copy_starts(tmp_path, small_chunks, monkeypatch):
    """Each adapter's smallest target is probed before anything is read or written beyond it: an adapter for another
    base fails at once, not after the whole file went through the copy (a mutation dropping that check passed)."""
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.F16)
    adapter = make_adapter(gn.open_gguf_base(path))
    small = min(adapter.targets.values(), key=lambda t: (t.d_out * t.k, t.name))
    adapter.targets[small.name] = dataclasses.replace(small, probe="sha256:" + "0" * 64)

    def no_copy(*args, **kw):
        raise AssertionError("the copy started")

    monkeypatch.setattr(gm, "_write_same_layout", no_copy)
    with pytest.raises(NeuroAdaError) as exc:
        gm.merge_gguf(path, [adapter], tmp_path / "m.gguf")
    assert exc.value.rule == "4.3" and exc.value.tensor == small.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf"]


def test_a_full_disk_while_merging_is_raised_and_leaves_nothing(tmp_path, small_chunks, monkeypatch):
    """The disk fills up while a touched tensor is written (its third block of rows write, after the kernel
    copied the bytes before it): the OSError reaches the caller and the temporary file is removed."""
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.Q8_0)
    adapter = make_adapter(gn.open_gguf_base(path))
    calls = {"n": 0}
    real = os.pwrite

    def full_disk(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)
    monkeypatch.setattr(gm.os, "pwrite", full_disk)
    out = tmp_path / "m.gguf"
    with pytest.raises(OSError) as exc:
        gm.merge_gguf(path, [adapter], out)
    assert exc.value.errno == errno.ENOSPC and calls["n"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf"]


def test_a_failed_kernel_copy_is_raised_and_leaves_nothing(tmp_path, small_chunks, monkeypatch):
    """The kernel copy of an untouched range fails (here the input shrinking under it): that failure reaches
    the caller as that OSError, and the temporary file is removed."""
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.F16)
    adapter = make_adapter(gn.open_gguf_base(path))

    def shrinking(src_fd, dst_fd, start, end, progress, stop=None):
        half = (start + end) // 2
        os.sendfile(dst_fd, src_fd, start, half - start)
        progress.update(half - start)
        raise OSError(errno.EIO, "file shrank while being copied")
    monkeypatch.setattr(gm, "_send", shrinking)
    out = tmp_path / "m.gguf"
    with pytest.raises(OSError, match="shrank") as exc:
        gm.merge_gguf(path, [adapter], out)
    assert exc.value.errno == errno.EIO
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf"]


def test_deltas_on_the_grid_keep_block_bytes_when_streamed(tmp_path, small_chunks):
    """A delta of zero leaves every block as it was: the streamed output is the input, byte for byte."""
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.Q4_1)
    view = gn.open_gguf_base(path)
    zero = naf.Adapter({n: dataclasses.replace(t, values=np.zeros_like(np.asarray(t.values)))
                        for n, t in make_adapter(view).targets.items()})
    out = tmp_path / "m.gguf"
    gm.merge_gguf(path, [zero], out)
    assert out.read_bytes() == path.read_bytes()


def test_grid_evaluation_in_place_is_the_plain_formula():
    """The encoder's inner step, written in place and one block per column for speed, gives the plain formula's
    bits (levels and errors), also for zero scales, blocks whose error overflows, and without a minimum (Q4_0 /
    Q8_0: the formula's m = 0)."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((300, 32)) * 0.05).astype(np.float32)
    x[7] = 3e38
    x[8, ::2] = -0.0
    w = np.where(rng.random(x.shape) < 0.1, np.float32(100), np.float32(1))
    d = (np.abs(rng.standard_normal(300)) * 0.01).astype(np.float32)
    d[:5] = 0
    d[5] = -0.0
    for lo, hi, m in ((0, 15, (rng.standard_normal(300) * 0.05).astype(np.float32)), (-8, 7, None),
                      (-128, 127, None)):
        mm = np.zeros(300, np.float32) if m is None else m
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inv = np.where(d == 0, 0, 1 / d).astype(np.float32)
            q = np.clip(np.rint((x - mm[:, None]) * inv[:, None]), lo, hi).astype(np.float32)
            err = (w * (d[:, None] * q + mm[:, None] - x) ** 2).sum(axis=1)
            err = np.where(np.isfinite(err), err, np.inf)
            got_q, got_err = block_fit.grid_eval(np.ascontiguousarray(x.T), np.ascontiguousarray(w.T), d, m, lo, hi)
        assert got_q.dtype == np.float32 and got_err.dtype == np.float32
        assert got_q.T.tobytes() == q.tobytes() and got_err.tobytes() == err.tobytes()


@pytest.mark.parametrize("qt", [QT.Q4_1, QT.Q4_0, QT.Q8_0], ids=lambda t: t.name)
def test_naive_grid_is_gguf_pys_bit_for_bit(qt):
    """The search's first candidate (ge._naive_grid) is the scale and minimum of gguf-py's own blocks, also for
    zeros of both signs, equal values, a tie for the largest magnitude and blocks whose scale overflows F16."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((20000, 32)) * np.exp2(rng.integers(-30, 20, (20000, 1)))).astype(np.float32)
    x[:50], x[50:100], x[100:150, ::2], x[150:200] = -0.0, 0.0, -0.0, x[150:200, :1]
    x[200:250, 5] = -x[200:250].max(axis=1)
    x[250, 0], x[251, 0] = 3e38, -3e38
    with np.errstate(over="ignore", invalid="ignore"):
        b = quants.quantize(x.reshape(-1), qt).reshape(len(x), -1)
    d, m = ge._naive_grid(qt, x)
    assert d.astype(np.float16).tobytes() == b[:, :2].tobytes()
    if qt == QT.Q4_1:
        assert m.astype(np.float16).tobytes() == b[:, 2:4].tobytes()
    else:
        assert not m.any()


def test_column_sums_are_numpys_row_sums_bit_for_bit():
    """The searches sum blocks down the columns of their transpose (block_fit.column_sums): the same bits as numpy's
    sum of each row, for the block and sub-block sizes (32, 16) and a few more, with zeros of both signs, values of
    every magnitude, Inf and NaN."""
    rng = np.random.default_rng(6)
    for n in (8, 16, 24, 32, 64, 128):
        a = (rng.standard_normal((20000, n)) * np.exp2(rng.integers(-30, 30, (20000, n)))).astype(np.float32)
        a[:50] = -0.0
        a[50:100, ::3] = 0.0
        a[100, 3], a[101, 5], a[102, 7] = np.inf, -np.inf, np.nan
        assert block_fit.column_sums(np.ascontiguousarray(a.T)).tobytes() == a.sum(axis=1).tobytes(), n


def test_an_interrupt_mid_merge_leaves_nothing_and_no_thread(tmp_path, small_chunks, monkeypatch):
    """Ctrl-C while a tensor is merged: no thread is left behind, the temporary file
    removed, and the interrupt (not some other error) is what the caller sees."""
    import threading
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.F16)
    adapter = make_adapter(gn.open_gguf_base(path))
    real, calls = gm._merge_tensor, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(gm, "_merge_tensor", interrupted)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(KeyboardInterrupt):
        gm.merge_gguf(path, [adapter], tmp_path / "m.gguf")
    assert {t.name for t in threading.enumerate()} <= before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf"]


def test_durable_merge_writes_the_same_file(tmp_path):
    path = write_gguf(tmp_path / "base.gguf", hf_arrays(), QT.Q4_1)
    adapter = make_adapter(gn.open_gguf_base(path))
    gm.merge_gguf(path, [adapter], tmp_path / "a.gguf")
    gm.merge_gguf(path, [adapter], tmp_path / "b.gguf", durable=True)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
