"""extract / combine / repack and the neuroada-pack CLI, on real safetensors checkpoints in tmp folders."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format import save as naf_save
import neuroada_format.metadata as metadata
from neuroada_format.converters import pack
from neuroada_format.converters.pack_cli import main

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype("<f4")

LINEAR = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
          "model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"]


def llama_like(rng, dtype=F32):
    """A small Llama-shaped state dict, with the tensors the default target rule must leave out."""
    shapes = {"model.embed_tokens.weight": (40, 16), "model.norm.weight": (16,), "lm_head.weight": (40, 16),
              "model.layers.0.input_layernorm.weight": (16,),
              "model.layers.0.self_attn.q_proj.weight": (16, 16), "model.layers.0.mlp.up_proj.weight": (24, 16),
              "model.layers.0.mlp.down_proj.weight": (16, 24), "model.layers.1.self_attn.o_proj.weight": (16, 16)}
    return {n: (rng.standard_normal(s) * 0.05).astype(dtype) for n, s in shapes.items()}


def random_sorted_indices(rng, d_out, d_in, k):
    return np.sort(np.argpartition(rng.random((d_out, d_in)), k - 1, axis=1)[:, :k], axis=1)


def sparse_adapter(rng, base, names, k, *, value_dtype="BF16", scale=0.05, layout=None):
    targets = {}
    for name in names:
        w = base[name]
        lay = (layout or {}).get(name, "out_in")
        d_out, d_in = w.shape if lay == "out_in" else w.shape[::-1]
        idx = random_sorted_indices(rng, d_out, d_in, k)
        vals = (rng.standard_normal((d_out, k)) * scale).astype(naf.dtypes.NUMPY_DTYPES[value_dtype])
        targets[name] = naf.Target.from_weight(name, w, idx, vals, layout=lay, value_dtype=value_dtype)
    return naf.Adapter(targets, base_name="tiny", structure_hash=naf.ArrayBase(base).structure_hash())


def finetune_with(base, adapter):
    ft = dict(base)
    for name, t in adapter.targets.items():
        ft[name] = naf.merge_weight(base[name], [t], t.layout)
    return ft


def dense(t: naf.Target) -> np.ndarray:
    out = np.zeros(t.shape, np.float32)
    np.put_along_axis(out, np.asarray(t.indices, np.int64), np.asarray(t.values, np.float32), axis=1)
    return out


# -- extract ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_extract_recovers_exactly_sparse_finetune(tmp_path, rng, dtype, craft):
    base = llama_like(rng, naf.dtypes.NUMPY_DTYPES[dtype])
    truth = sparse_adapter(rng, base, LINEAR, 3)
    ft = finetune_with(base, truth)
    bdir, fdir = craft.base(tmp_path / "base", base), craft.base(tmp_path / "ft", ft, shards=3)

    adapter, report = pack.extract(bdir, fdir, 3, value_dtype="F32")
    assert sorted(adapter.targets) == sorted(LINEAR)                  # embeddings, head, norms left out
    assert report["rel_error"] == 0.0 and all(r["rel_error"] == 0.0 for r in report["targets"].values())
    assert adapter.selection["rule"] == "delta" and adapter.structure_hash == truth.structure_hash
    naf.validate(adapter, base=bdir, strict=True)
    for name, t in adapter.targets.items():
        assert np.array_equal(t.indices, truth.targets[name].indices)
        merged = naf.merge_weight(base[name], [t])
        if dtype == "BF16":   # D = FT - BASE is exact in f32 (8-bit significands), so W + D is FT exactly
            assert merged.tobytes() == ft[name].tobytes()
        else:                 # D = fl(FT - W) can round (when FT and W are not within 2x), W + D then too
            assert np.all(np.abs(merged - ft[name]) <= np.spacing(np.abs(ft[name])))

    bf, rep16 = pack.extract(bdir, fdir, 3)                           # default BF16 values
    assert rep16["rel_error"] == 0.0 and rep16["rel_error_stored"] < 2 ** -8
    for name, t in bf.targets.items():
        merged = naf.merge_weight(base[name], [t]).astype(np.float32)
        d = np.abs(ft[name].astype(np.float32) - base[name].astype(np.float32))
        # within the value's bf16 rounding (half an ulp of |D|) plus one rounding of the sum
        tol = d * 2.0 ** -8 + np.abs(ft[name].astype(np.float32)) * (2.0 ** -8 if dtype == "BF16" else 2.0 ** -23)
        assert np.all(np.abs(merged - ft[name].astype(np.float32)) <= tol + 1e-12)


def test_extract_pads_with_positive_zero(tmp_path, rng, craft):
    """A fine-tune that turns +0.0 into -0.0 gives -0.0 differences; stored, they must be +0.0 (rule 4.5)."""
    base = llama_like(rng)
    name = LINEAR[0]
    base[name][:, :6] = 0.0
    ft = dict(base)
    ft[name] = base[name].copy()
    ft[name][:, :6] = -0.0          # no numeric change: every delta of these columns is -0.0
    ft[name][0, 10] += 0.25         # one real change, so the tensor is not "unchanged"
    bdir, fdir = craft.base(tmp_path / "b", base), craft.base(tmp_path / "f", ft)
    adapter, _ = pack.extract(bdir, fdir, 3, targets=[name])
    t = adapter.targets[name]
    vals = np.asarray(t.values, np.float32)
    zero = vals == 0
    assert zero.sum() == t.indices.size - 1
    assert not np.signbit(vals[zero]).any()
    assert np.asarray(t.indices[1]).tolist() == [0, 1, 2]      # padding at the lowest columns
    assert naf.validate(adapter, base=bdir, strict=True).ok


def test_extract_reports_error_of_dense_finetune(tmp_path, rng, craft):
    base = llama_like(rng)
    ft = {n: (w + rng.standard_normal(w.shape).astype(F32) * 0.01 if w.ndim == 2 else w) for n, w in base.items()}
    bdir, fdir = craft.base(tmp_path / "b", base), craft.base(tmp_path / "f", ft)
    delta, rep = pack.extract(bdir, fdir, 4)
    mag, rep_mag = pack.extract(bdir, fdir, 4, positions="magnitude")
    for name in LINEAR:
        d = ft[name].astype(np.float32) - base[name].astype(np.float32)
        kept = -np.sort(-np.abs(d.astype(np.float64)), axis=1)[:, :4]
        want = np.sqrt(max(np.square(d.astype(np.float64)).sum() - np.square(kept).sum(), 0) / np.square(
            d.astype(np.float64)).sum())
        assert rep["targets"][name]["rel_error"] == pytest.approx(want, rel=1e-9)
        assert 0 < rep["targets"][name]["rel_error"] < 1
        assert rep["targets"][name]["rel_error"] <= rep_mag["targets"][name]["rel_error"]  # best k-sparse
        assert rep["targets"][name]["rel_error_stored"] >= rep["targets"][name]["rel_error"]
        # with the values as the file stores them (BF16): an independent reference from the adapter written
        t = delta.targets[name]
        d64 = (d if t.layout == "out_in" else d.T).astype(np.float64)
        approx = np.zeros_like(d64)
        np.put_along_axis(approx, np.asarray(t.indices, np.int64), np.asarray(t.values, np.float64), axis=1)
        want_stored = np.linalg.norm(d64 - approx) / np.linalg.norm(d64)
        assert rep["targets"][name]["rel_error_stored"] == pytest.approx(want_stored, rel=1e-6)
        assert want_stored > want * (1 + 1e-9)  # BF16 rounding of the kept values costs something here
    assert mag.selection["rule"] == "magnitude"
    assert naf.validate(mag, base=bdir, check_selection=True).ok          # NeuroAda's own positions
    assert 0 < rep["rel_error"] < rep_mag["rel_error"] < 1


def test_extract_targets_layout_and_refusals(tmp_path, rng, craft):
    base = {"h.0.attn.c_attn.weight": (rng.standard_normal((16, 48)) * 0.05).astype(F32),   # Conv1D [in, out]
            "h.0.mlp.c_fc.weight": (rng.standard_normal((16, 64)) * 0.05).astype(F32),
            "wte.weight": (rng.standard_normal((50, 16)) * 0.05).astype(F32)}
    truth = sparse_adapter(rng, base, ["h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"], 2,
                           layout={"h.0.attn.c_attn.weight": "in_out", "h.0.mlp.c_fc.weight": "in_out"})
    ft = finetune_with(base, truth)
    bdir, fdir = craft.base(tmp_path / "b", base), craft.base(tmp_path / "f", ft)
    with open(os.path.join(bdir, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2"}, f)
    adapter, rep = pack.extract(bdir, fdir, 2, value_dtype="F32")
    assert {t.layout for t in adapter.targets.values()} == {"in_out"}
    assert adapter.targets["h.0.attn.c_attn.weight"].shape == (48, 16)
    assert rep["rel_error"] == 0.0
    only, _ = pack.extract(bdir, fdir, 2, targets=r"c_fc")
    assert list(only.targets) == ["h.0.mlp.c_fc.weight"]
    # unchanged tensors are left out and reported; all-unchanged is an error
    same, rep = pack.extract(bdir, fdir, 2, targets=r"weight$")
    assert rep["unchanged"] == ["wte.weight"] and "wte.weight" not in same.targets
    with pytest.raises(naf.NeuroAdaError, match="equals the base"):
        pack.extract(bdir, bdir, 2)
    with pytest.raises(naf.NeuroAdaError, match="k=17 exceeds d_in=16"):
        pack.extract(bdir, fdir, 17)
    other = dict(ft, **{"h.0.mlp.c_fc.weight": np.zeros((16, 65), F32)})
    with pytest.raises(naf.NeuroAdaError, match=r"h\.0\.mlp\.c_fc\.weight: rule 4\.2: shape \[16, 65\]"):
        pack.extract(bdir, craft.base(tmp_path / "o", other), 2)


def test_extract_streams_tensor_by_tensor(tmp_path, rng, craft):
    """Peak numpy allocation stays far below one checkpoint: tensors are mapped, read one at a time."""
    base = {f"model.layers.{i}.mlp.up_proj.weight": (rng.standard_normal((128, 128)) * 0.05).astype(F32)
            for i in range(64)}
    ft = {n: w + np.float32(0.001) * rng.standard_normal(w.shape).astype(F32) for n, w in base.items()}
    bdir, fdir = craft.base(tmp_path / "b", base), craft.base(tmp_path / "f", ft)
    one_checkpoint = sum(w.nbytes for w in base.values())
    del base, ft
    tracemalloc.start()
    try:
        adapter, _ = pack.extract(bdir, fdir, 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(adapter.targets) == 64
    assert peak < one_checkpoint / 2, (peak, one_checkpoint)


# -- combine ---------------------------------------------------------------------------------------
@pytest.fixture
def two_adapters(tmp_path, rng, craft):
    base = llama_like(rng, BF16)
    bdir = craft.base(tmp_path / "base", base)
    a = sparse_adapter(rng, base, LINEAR, 3)
    b = sparse_adapter(rng, base, LINEAR[1:], 5)            # overlaps a on most rows, lacks one target
    return base, bdir, a, b


@pytest.mark.parametrize("value_dtype", ["F32", "BF16"])
def test_combine_is_the_weighted_sum(two_adapters, value_dtype):
    base, bdir, a, b = two_adapters
    wa, wb = 0.7, -1.3
    c = pack.combine([(a, wa), (b, wb)], bdir, value_dtype=value_dtype)
    naf.validate(c, base=bdir, strict=True)                  # probes recomputed at the new positions
    assert c.selection["rule"] == "union"
    for name, t in c.targets.items():
        parts = [(x.targets[name], w) for x, w in ((a, wa), (b, wb)) if name in x.targets]
        acc = np.zeros(t.shape, np.float32)
        touched = np.zeros(t.shape, bool)
        for p, w in parts:                                   # the f32 sum, in order
            rows = np.arange(p.d_out)[:, None]
            acc[rows, p.indices] += np.float32(w) * np.asarray(p.values, np.float32)
            touched[rows, p.indices] = True
        want = acc.astype(naf.dtypes.NUMPY_DTYPES[value_dtype]).astype(np.float32)
        assert np.array_equal(dense(t), want)                 # rounded once, +0.0 elsewhere
        assert t.k == touched.sum(axis=1).max()               # k = longest union
        # pads: +0.0 values at the lowest columns the row does not use
        for r in range(t.d_out):
            pads = [int(c_) for c_ in t.indices[r] if not touched[r, c_]]
            free = [c_ for c_ in range(t.d_in) if not touched[r, c_]][:len(pads)]
            assert pads == free
            assert all(np.signbit(np.float32(v)) == 0 for v, c_ in zip(t.values[r], t.indices[r]) if not touched[r, c_])

    # merging C vs merging A then B with the same weights
    for name in c.targets:
        pairs = [(x.targets[name], w) for x, w in ((a, wa), (b, wb)) if name in x.targets]
        via_c = naf.merge_weight(base[name], [(c.targets[name], 1.0)])
        via_ab = naf.merge_weight(base[name], pairs)
        both = np.zeros(c.targets[name].shape, bool)
        if len(pairs) == 2:
            ia = np.zeros_like(both)
            ia[np.arange(ia.shape[0])[:, None], pairs[0][0].indices] = True
            ib = np.zeros_like(both)
            ib[np.arange(ib.shape[0])[:, None], pairs[1][0].indices] = True
            both = ia & ib
        single = ~both
        if value_dtype == "F32":
            # one term per position: C holds exactly f32(w * v), so the merge is bit-identical there
            assert np.array_equal(via_c.view(np.uint16)[single], via_ab.view(np.uint16)[single])
        # elsewhere C's single rounding differs from A-then-B by at most one bf16 ulp of the result (the
        # f32 sums associate differently) plus, for BF16 values, half a bf16 ulp of the combined value
        diff = np.abs(via_c.astype(np.float32) - via_ab.astype(np.float32))
        bound = np.abs(via_ab.astype(np.float32)) * 2.0 ** -7
        if value_dtype == "BF16":
            bound += np.abs(dense(c.targets[name])) * 2.0 ** -8
        assert np.all(diff <= bound)
        changed = int((diff > 0).sum())
        if value_dtype == "F32":
            assert changed <= int(both.sum())


def test_combine_scale_one_disjoint_is_bit_identical(rng, tmp_path):
    base = llama_like(rng, BF16)
    a = sparse_adapter(rng, base, LINEAR[:2], 2)
    b = sparse_adapter(rng, base, LINEAR[2:], 2)
    c = pack.combine([a, b], base)                            # weight 1, disjoint targets, BF16 values
    for name in LINEAR:
        src = a if name in a.targets else b
        assert np.array_equal(c.targets[name].indices, src.targets[name].indices)
        assert c.targets[name].values.tobytes() == src.targets[name].values.tobytes()
        assert c.targets[name].probe == src.targets[name].probe


def test_combine_refusals(two_adapters, rng):
    base, bdir, a, b = two_adapters
    other_base = {n: w + BF16.type(0.5) if w.ndim == 2 else w for n, w in base.items()}
    stranger = sparse_adapter(rng, other_base, LINEAR[:1], 2)
    stranger.structure_hash = a.structure_hash
    with pytest.raises(naf.NeuroAdaError, match="rule 4.3"):
        pack.combine([(a, 1.0), (stranger, 1.0)], bdir)
    moved = naf.Adapter(dict(b.targets), structure_hash="sha256:" + "1" * 64)
    with pytest.raises(naf.NeuroAdaError, match="different base structure hashes"):  # unchecked: nothing to go on
        pack.combine([(a, 1.0), (moved, 1.0)], bdir, verify=False)
    with pytest.warns(RuntimeWarning, match="rule 4.5"):  # checked: the probes decide, as in validate and merge
        combined = pack.combine([(a, 1.0), (moved, 1.0)], bdir)
    assert combined.structure_hash == naf.open_base(bdir).structure_hash() and naf.validate(combined, base=bdir).ok
    name = LINEAR[1]
    t = b.targets[name]
    reshaped = naf.Adapter({name: naf.Target(name, t.indices[:8], t.values[:8], (8, t.d_in), t.layout, t.dtype,
                                             t.probe)})
    with pytest.raises(naf.NeuroAdaError, match=r"rule 4\.2: target is BF16\[8, 16\]"):
        pack.combine([(a, 1.0), (reshaped, 1.0)], bdir, verify=False)


# -- repack ----------------------------------------------------------------------------------------
def test_repack_round_trips_and_upgrades(two_adapters, tmp_path, monkeypatch):
    base, bdir, a, _ = two_adapters
    a.extra = {"created_by": "test", "x-future": {"kept": [1, 2]}}
    src = os.fspath(tmp_path / "a.safetensors")
    naf.save(a, src)
    wide = pack.repack(naf.load(src), "F32", "I32")
    naf_save(wide, tmp_path / "wide.safetensors")
    back = naf.load(tmp_path / "wide.safetensors")
    assert {t.value_dtype for t in back.targets.values()} == {"F32"}
    assert {t.index_dtype for t in back.targets.values()} == {"I32"}
    narrow = pack.repack(back, "BF16", "I16")
    naf_save(narrow, tmp_path / "narrow.safetensors")
    again = naf.load(tmp_path / "narrow.safetensors")
    for name, t in a.targets.items():
        assert again.targets[name].values.tobytes() == t.values.tobytes()
        assert again.targets[name].indices.tobytes() == t.indices.tobytes()
    assert again.extra == a.extra and again.version == metadata.VERSION
    naf.validate(again, base=bdir, strict=True)

    monkeypatch.setattr(metadata, "VERSION", "1.4")        # pretend the library moved on a minor
    assert pack.repack(naf.load(src)).version == "1.4"
    newer = naf.load(src)
    newer.version = "1.9"
    assert pack.repack(newer).version == "1.9"             # never claims an older minor than it has
    monkeypatch.undo()

    big = naf.Adapter({n: naf.Target(n, t.indices, np.full(t.values.shape, 1e5, F32), t.shape, t.layout, t.dtype,
                                     t.probe) for n, t in a.targets.items()})
    with pytest.raises(naf.NeuroAdaError, match="overflows F16"):
        pack.repack(big, "F16")


# -- CLI -------------------------------------------------------------------------------------------
def run(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_extract_combine_repack(tmp_path, rng, capsys, craft):
    base = llama_like(rng, BF16)
    truth = sparse_adapter(rng, base, LINEAR, 2)
    bdir, fdir = craft.base(tmp_path / "b", base), craft.base(tmp_path / "f", finetune_with(base, truth))
    out = os.fspath(tmp_path / "x.safetensors")
    code, stdout, err = run(capsys, "--base", bdir, "--finetuned", fdir, "-k", "2", "-o", out, "--json")
    assert code == 0 and err == ""
    summary = json.loads(stdout)
    assert summary["mode"] == "extract" and summary["targets"] == 4 and summary["report"]["rel_error"] == 0.0
    code, stdout, err = run(capsys, "--base", bdir, "--finetuned", fdir, "-k", "2", "-o", out)
    assert code == 2 and "already exists" in err  # the one overwrite rule: replacing needs --overwrite
    code, stdout, _ = run(capsys, "--base", bdir, "--finetuned", fdir, "-k", "2", "-o", out, "--overwrite")
    assert code == 0 and stdout.startswith(f"wrote {out}: 4 targets")

    naf.save(truth, tmp_path / "t.safetensors")
    comb = os.fspath(tmp_path / "c.safetensors")
    code, stdout, _ = run(capsys, "--combine", out + ":0.5", os.fspath(tmp_path / "t.safetensors") + ":-0.5",
                          "--base", bdir, "-o", comb, "--json")
    assert code == 0 and json.loads(stdout)["sources"][1]["weight"] == -0.5
    c = naf.load(comb)
    assert all(np.abs(np.asarray(t.values, np.float32)).max() < 1e-2 for t in c.targets.values())

    code, stdout, err = run(capsys, "--repack", comb, "--value-dtype", "F16", "-o", comb, "--overwrite")
    assert code == 2 and "is the input" in err  # -o never replaces an input, even with --overwrite
    code, stdout, _ = run(capsys, "--repack", comb, "--value-dtype", "F16", "-o", comb + ".f16")
    assert code == 0 and {t.value_dtype for t in naf.load(comb + ".f16").targets.values()} == {"F16"}

    # usage errors: exit 2, one line
    for argv, msg in ((["--base", bdir, "--finetuned", fdir, "-o", out], "extraction needs -k"),
                      (["--combine", out, "-o", comb], "--combine needs --base"),
                      (["--base", bdir, "--finetuned", fdir + "-nope", "-k", "1", "-o", out], "no such file"),
                      (["--repack", comb, "-k", "2", "-o", out], "--repack takes only"),
                      (["-k", "0", "-o", out], "0 is not in the range"),
                      (["stray.safetensors", "-o", out], "did you mean --combine"),
                      (["--repack", comb, "--base-name", "x", "-o", out], "--repack takes only"),
                      (["--repack", comb, "--positions", "magnitude", "-o", out], "--positions applies to extraction"),
                      (["--combine", out, "--base", bdir, "--layout-in-out", "none", "-o", comb],
                       "--layout-in-out applies to extraction"),
                      (["--base", bdir, "--finetuned", fdir, "-k", "1", "--targets", "(", "-o", out + ".new"],
                       "is not a regular expression"),
                      (["--base", bdir, "--finetuned", fdir, "-k", "1", "--layout-in-out", "(", "-o", out + ".new"],
                       "is not a regular expression")):
        code, stdout, err = run(capsys, *argv)
        assert code == 2 and stdout == "" and err.count("\n") == 1 and msg in err, (argv, err)

    # unusable inputs: exit 1, one line
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 5)
    other = craft.base(tmp_path / "other", {n: w + BF16.type(0.25) if w.ndim == 2 else w for n, w in base.items()})
    for argv, msg in ((["--repack", os.fspath(garbage), "-o", out, "--overwrite"], "rule 1.1"),
                      (["--combine", out, "--base", other, "-o", comb, "--overwrite"], "rule 4.3"),
                      (["--base", bdir, "--finetuned", bdir, "-k", "1", "-o", out, "--overwrite"], "equals the base")):
        code, stdout, err = run(capsys, *argv)
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, (argv, err)

    code, stdout, _ = run(capsys, "--help")
    assert code == 0 and "--combine needs --base because" in stdout.replace("\n", " ").replace("  ", " ")


def test_console_script_is_installed(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "neuroada-pack")
    if not os.path.exists(exe):
        pytest.skip("neuroada-pack not installed in this environment")
    r = subprocess.run([exe, "--repack", os.fspath(tmp_path / "nope.safetensors"), "-o", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such adapter file" in r.stderr


@pytest.mark.parametrize("case", ["k_too_large", "nonfinite_finetune", "finetune_shape", "combine_overflow",
                                  "repack_overflow", "to_peft_inexact", "to_peft_in_out"])
def test_cli_errors_name_the_file_the_tensor_and_the_rule(tmp_path, rng, capsys, craft, case):
    """Each refusal is one line naming the file it is about (the fine-tune, the base or the adapter), the tensor
    and the rule; several used to name only the tensor."""
    base = llama_like(rng, BF16)
    bdir = craft.base(tmp_path / "base", base)
    up = "model.layers.0.mlp.up_proj.weight"
    p = {n: os.fspath(tmp_path / f"{n}.safetensors") for n in ("a", "out")}
    if case in ("k_too_large", "nonfinite_finetune", "finetune_shape"):
        ft = finetune_with(base, sparse_adapter(rng, base, LINEAR, 2))
        if case == "nonfinite_finetune":
            ft[up] = ft[up].copy()
            ft[up][3, 4] = np.inf
        if case == "finetune_shape":
            ft[up] = np.zeros((24, 8), BF16)
        fdir = craft.base(tmp_path / "ft", ft)
        argv = ["--base", bdir, "--finetuned", fdir, "-k", "100" if case == "k_too_large" else "2", "-o", p["out"]]
        where, rule = (bdir, "3.4") if case == "k_too_large" else (fdir, "3.7" if case == "nonfinite_finetune" else "4.2")
    elif case in ("combine_overflow", "repack_overflow"):
        a = sparse_adapter(rng, base, [up], 2, value_dtype="F32")
        for t in a.targets.values():
            np.asarray(t.values)[:] = 3e38
        naf.save(a, p["a"])
        argv = (["--combine", p["a"], p["a"], "--base", bdir, "-o", p["out"]] if case == "combine_overflow" else
                ["--repack", p["a"], "--value-dtype", "F16", "-o", p["out"]])
        where, rule = p["a"], "3.7"
    else:
        layout = {up: "in_out"} if case == "to_peft_in_out" else None
        a = sparse_adapter(rng, base, [up], 2, value_dtype="F32", layout=layout)
        naf.save(a, p["a"])
        argv = ["--to", "peft", p["a"], "--base", bdir, "-o", os.fspath(tmp_path / "peft")]
        where, rule = p["a"], "16"
    tensor = "model.layers.0.mlp.down_proj.weight" if case == "k_too_large" else up  # the first too narrow
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == "", (code, out, err)
    # (a folder with one checkpoint file is named by that file)
    assert err.count("\n") == 1 and re.match(rf"error: {re.escape(where)}(/model\.safetensors)?: {tensor}: rule {rule}: ",
                                              err), err
    if case == "to_peft_inexact":
        assert "--allow-inexact" in err
    assert not os.path.exists(p["out"]) and not os.path.exists(tmp_path / "peft")


def test_version_like_the_other_commands(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0 and out.startswith("neuroada-pack, version ") and err == ""


def test_extract_says_what_the_adapter_does_not_carry(tmp_path, rng, craft):
    """A fine-tune that also changed tensors outside the targets (lm_head, norms, the embedding) lost those changes
    without a word, and a target stored in another dtype than the base's was not mentioned either. Each is now one
    warning line (count and first names) and a report entry; a fine-tune that changed only targets gets neither."""
    exe = os.path.join(os.path.dirname(sys.executable), "neuroada-pack")
    up = "model.layers.0.mlp.up_proj.weight"
    base = llama_like(rng, BF16)
    only_targets = finetune_with(base, sparse_adapter(rng, base, LINEAR, 2))
    ft = dict(only_targets)
    outside = ["lm_head.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
               "model.norm.weight"]
    for name in outside[:3]:
        ft[name] = (base[name].astype(F32) + 0.5).astype(BF16)
    ft["model.norm.weight"] = base["model.norm.weight"].copy()
    ft["model.norm.weight"][7] = 2.0  # one entry is enough
    ft[up] = ft[up].astype(F32)  # a target saved in another dtype
    ft["model.extra.weight"] = np.ones((4, 4), BF16)  # only in the fine-tune
    bdir = craft.base(tmp_path / "base", base)
    runs = {}
    for label, tensors in (("ft", ft), ("only_targets", only_targets)):
        folder = craft.base(tmp_path / label, tensors, shards=2)
        r = subprocess.run([exe, "--base", bdir, "--finetuned", folder, "-k", "2", "-o",
                            os.fspath(tmp_path / f"{label}.safetensors"), "--json"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        runs[label] = (r.stderr, json.loads(r.stdout)["report"])

    err, report = runs["ft"]
    changed = sorted(outside + ["model.extra.weight"])
    assert err.splitlines() == [
        "warning: 4 tensors outside the targets differ from the base and are not in the adapter: "
        "lm_head.weight, model.embed_tokens.weight, model.layers.0.input_layernorm.weight ...",
        "warning: 1 tensor of the fine-tune is not in the base at all (added layers, or another architecture?) and "
        "not in the adapter: model.extra.weight",
        f"warning: 1 target has another dtype in the fine-tune than in the base; the adapter is made for the base's "
        f"dtype: {up} (BF16 in the base, F32 in the fine-tune)"], err
    assert report["changed_outside_targets"] == changed and report["only_in_finetuned"] == ["model.extra.weight"]
    assert report["dtype_changed"] == {up: {"base": "BF16", "finetuned": "F32"}}
    assert {"positions", "k", "value_dtype", "targets", "rel_error", "rel_error_stored", "entries", "unchanged",
            "not_in_finetuned", "not_float_2d"} <= set(report)  # the keys it had
    assert sorted(report["targets"]) == sorted(LINEAR)

    err, report = runs["only_targets"]
    assert err == "" and report["changed_outside_targets"] == [] and report["dtype_changed"] == {}


def _extract_peak(bdir, fdir, warned: str) -> tuple[dict, int]:
    """extract(bdir, fdir, k=2)'s report and the peak of numpy/Python allocations it made; it must warn `warned`."""
    tracemalloc.start()
    try:
        with pytest.warns(pack.ExtractWarning, match=warned):
            _, report = pack.extract(bdir, fdir, 2)
        return report, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_extract_compares_the_other_tensors_one_at_a_time(tmp_path, rng, craft):
    """Comparing the tensors outside the targets reads them as extraction reads its targets: mapped, one at a
    time, never a whole checkpoint in memory."""
    base = {f"model.layers.{i}.post_norm.weight": (rng.standard_normal((128, 128)) * 0.05).astype(F32)
            for i in range(64)}
    base["model.layers.0.mlp.up_proj.weight"] = (rng.standard_normal((16, 16)) * 0.05).astype(F32)
    ft = {n: w + np.float32(0.001) for n, w in base.items()}
    bdir, fdir = craft.base(tmp_path / "b", base), craft.base(tmp_path / "f", ft)
    one_checkpoint = sum(w.nbytes for w in base.values())
    del base, ft
    report, peak = _extract_peak(bdir, fdir, "64 tensors outside the targets differ")
    assert len(report["changed_outside_targets"]) == 64
    assert peak < one_checkpoint / 4, (peak, one_checkpoint)


def test_extract_compares_a_large_tensor_a_piece_at_a_time(tmp_path, rng, craft, monkeypatch):
    """A tensor outside the targets (an embedding of 1-2 GB in a real model) is compared COMPARE_BYTES at a time,
    read from the file piece by piece, never whole: both sides whole would be twice its size in memory."""
    monkeypatch.setattr(pack, "COMPARE_BYTES", 16 << 10)
    emb = (rng.standard_normal((1024, 512)) * 0.05).astype(F32)
    base = {"model.embed_tokens.weight": emb,
            "model.layers.0.mlp.up_proj.weight": (rng.standard_normal((16, 16)) * 0.05).astype(F32)}
    ft = {n: w + np.float32(0.001) for n, w in base.items()}
    ft["model.embed_tokens.weight"] = emb.copy()
    ft["model.embed_tokens.weight"][-1, -1] += 1  # differs in its last piece only
    bdir, fdir = craft.base(tmp_path / "b", base), craft.base(tmp_path / "f", ft)
    del base, ft
    report, peak = _extract_peak(bdir, fdir, "model.embed_tokens.weight")
    assert report["changed_outside_targets"] == ["model.embed_tokens.weight"]
    assert peak < emb.nbytes / 4, (peak, emb.nbytes)
