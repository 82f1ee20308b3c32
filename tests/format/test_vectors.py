"""The conformance vectors of spec/vectors/ against the reference implementation.

Each manifest entry is validated (exact sets of error and warning rules), loaded (structural errors
raise with the right rule), and each merge vector is checked bit for bit, against both the reference
merge and an independent scalar re-implementation of spec section 8. The committed vectors must be
exactly what spec/make_vectors.py writes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

import neuroada_format as naf
from neuroada_format.cli import main as cli
from neuroada_format.container import SafetensorsFile

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))

# Where the reference disagrees with the spec; each entry is reported to the format core's owner.
# strict xfail: the test starts failing (as a reminder to drop the entry) once the code is fixed.
KNOWN_DISCREPANCIES: dict[str, str] = {}


def _param(v):
    reason = KNOWN_DISCREPANCIES.get(v["name"])
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(v, id=v["name"], marks=marks)


def _structural(rule: str) -> bool:
    """Rules a fail-fast `load` checks: 1.x, 2.x and 3.1-3.4."""
    major, minor = (int(x) for x in rule.split("."))
    return major in (1, 2) or (major == 3 and minor <= 4)


def _rules(report, severity: str) -> list[str]:
    return sorted({p["rule"] for p in report.problems if p["severity"] == severity})


def _path(rel: str) -> str:
    return os.fspath(VECTORS / rel)


@pytest.mark.parametrize("vector", [_param(v) for v in MANIFEST["vectors"]])
def test_validate_matches_manifest(vector):
    expected = vector["expected"]
    base = _path(vector["base"]) if "base" in vector else None
    check = vector.get("check_selection", False)
    if expected.get("base_unreadable"):
        with pytest.raises(naf.NeuroAdaError) as info:
            naf.validate(_path(vector["file"]), base=base, check_selection=check)
        assert info.value.rule in expected["errors"]
        return
    report = naf.validate(_path(vector["file"]), base=base, check_selection=check)
    got = {"valid": report.ok, "errors": _rules(report, "error"), "warnings": _rules(report, "warning")}
    assert got == {k: expected[k] for k in ("valid", "errors", "warnings")}, report.problems


def _files():
    """One case per distinct adapter file; structural expectations do not depend on the base (vectors
    whose base is unreadable list the base's rule, not the adapter's, so they are left out)."""
    seen = {}
    for v in MANIFEST["vectors"]:
        if not v["expected"].get("base_unreadable"):
            seen.setdefault(v["file"], v)
    return [pytest.param(v, id=f) for f, v in seen.items()]


@pytest.mark.parametrize("vector", _files())
def test_load_raises_only_for_structure(vector):
    structural = [r for r in vector["expected"]["errors"] if _structural(r)]
    path = _path(vector["file"])
    if structural:
        with pytest.raises(naf.NeuroAdaError) as info:
            naf.load(path)
        assert info.value.rule == structural[0]
        assert info.value.path == path and "\n" not in str(info.value)
        return
    adapter = naf.load(path)
    # Readable by the safetensors library too, with the same arrays: the vectors are real safetensors.
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        assert set(f.keys()) == {p + n for n in adapter.targets for p in ("indices/", "values/")}
        for name, t in adapter.targets.items():
            assert f.get_tensor("indices/" + name).tobytes() == t.indices.tobytes()
            assert f.get_tensor("values/" + name).tobytes() == t.values.tobytes()


# -- merges ------------------------------------------------------------------------------------------
BF16 = np.dtype(ml_dtypes.bfloat16)


def _round_f32_bits(acc: np.float32, dtype: np.dtype):
    """Spec 8.1 round_D on one binary32, written from the bit formula (independent of ml_dtypes)."""
    if dtype == np.float32:
        return np.float32(acc)
    if dtype == np.float16:
        return np.float32(acc).astype(np.float16)
    u = int(np.array(acc, np.float32).view(np.uint32))
    if np.isnan(acc):
        return np.array(0x7FC0, np.uint16).view(BF16)
    return np.array((u + 0x7FFF + ((u >> 16) & 1)) >> 16 & 0xFFFF, np.uint16).view(BF16)


def scalar_merge(weight: np.ndarray, deltas, layout: str) -> np.ndarray:
    """Spec section 8, one position at a time in binary32 scalars: a second implementation."""
    out = np.array(weight, copy=True)
    flat = out.reshape(-1)
    d_out, d_in = weight.shape if layout == "out_in" else weight.shape[::-1]
    acc: dict[int, np.float32] = {}
    for target, scale in deltas:
        s = np.float32(scale)
        for r in range(d_out):
            for j in range(target.indices.shape[1]):
                c = int(target.indices[r, j])
                p = r * d_in + c if layout == "out_in" else c * d_out + r
                if p not in acc:
                    acc[p] = np.float32(flat[p])
                term = np.float32(s * np.float32(target.values[r, j]))
                acc[p] = np.float32(acc[p] + term)
    for p, a in acc.items():
        flat[p] = _round_f32_bits(a, weight.dtype)
    return out


@pytest.mark.parametrize("merge", MANIFEST["merges"], ids=[m["name"] for m in MANIFEST["merges"]])
def test_merge_vector_bit_for_bit(merge, tmp_path):
    if merge["base"].endswith(".onnx"):
        return _onnx_merge_vector(merge, tmp_path)
    base = naf.open_base(_path(merge["base"]))
    adapters = [(naf.load(_path(a["file"])), a["scale"]) for a in merge["adapters"]]
    expected = SafetensorsFile(_path(merge["expected"]))
    assert set(expected.tensors) == set(base.keys())
    for name in base.keys():
        weight = np.array(base.array(name))
        want = expected.array(name)
        deltas = [(a.targets[name], s) for a, s in adapters if name in a.targets]
        if not deltas:
            assert want.tobytes() == weight.tobytes(), name
            continue
        layout = deltas[0][0].layout
        with np.errstate(over="ignore"):
            got = naf.merge_weight(weight, deltas, layout)
            independent = scalar_merge(weight, deltas, layout)
            inplace = weight.copy()
            saved = naf.merge_weight_(inplace, deltas, layout)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), name
        assert independent.tobytes() == want.tobytes(), name
        assert inplace.tobytes() == want.tobytes(), name
        naf.unmerge_weight_(inplace, saved)
        assert inplace.tobytes() == weight.tobytes(), name


def _onnx_merge_vector(merge, tmp_path):
    """An ONNX MatMulNBits base (section 15.4): the reference's ONNX merge writes every initializer of `expected`, bit
    for bit; the merged weight, decoded here from the section's formula, is rule M on the base's decoded weight."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from neuroada_format.converters.onnx_merge import merge_onnx

    adapters = [(naf.load(_path(a["file"])), a["scale"]) for a in merge["adapters"]]
    out = os.fspath(tmp_path / "merged.onnx")
    merge_onnx(_path(merge["base"]), adapters, out)

    def inits(p):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(p).graph.initializer}
    got, want, base = inits(out), inits(_path(merge["expected"])), inits(_path(merge["base"]))
    assert set(got) == set(want) == set(base)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name

    def decoded(t, stem):  # 4-bit codes low nibble first, float zero points: fl32(fl32(q * s) - fl32(s * z))
        B, s, z = t[stem + "_Q4"], t[stem + "_scales"], t[stem + "_zero_points"]
        q = np.stack([B & 15, B >> 4], -1).reshape(B.shape[0], B.shape[1], -1).astype(np.float32)
        s, z = s.reshape(B.shape[0], -1, 1), z.reshape(B.shape[0], -1, 1)
        return (q * s - s * z).reshape(B.shape[0], -1)
    for name in {t for a, _ in adapters for t in a.targets}:
        deltas = [(a.targets[name], sc) for a, sc in adapters if name in a.targets]
        assert decoded(want, name).tobytes() == scalar_merge(decoded(base, name), deltas, "out_in").tobytes(), name


def test_onnx_validation_base_runs_in_onnxruntime():
    """The hand-written ONNX validation base is a real model: onnx's checker accepts it and onnxruntime computes each
    output from the canonical [d_out, d_in] weight the vectors' adapters were made on (spec 2.6 case 3's orientation:
    a MatMul's [d_in, d_out], a Gemm's transB, a Transpose; 15.4's MatMulNBits decoding)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    sys.path.insert(0, os.fspath(REPO / "spec"))
    try:
        import make_vectors
    finally:
        sys.path.pop(0)
    path = _path("bases/onnx_linear.onnx")
    model_bytes, canon = make_vectors.onnx_linear_base()
    assert Path(path).read_bytes() == model_bytes
    onnx.checker.check_model(onnx.load(path))
    rng = np.random.default_rng(0)
    x, x2, ids = rng.standard_normal((3, 6), np.float32), rng.standard_normal((3, 32), np.float32), np.array([4, 0, 2])
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = dict(zip((o.name for o in sess.get_outputs()), sess.run(None, {"X": x, "X2": x2, "ids": ids})))
    want = {"Y_q": x @ canon["q.weight"].T, "Y_o": x @ canon["o.weight"].T, "Y_k": x @ canon["k.weight"].T,
            "Y_up": x @ canon["up"].T, "Y_s": (x @ canon["q.weight"].T) @ canon["s.weight"].T,
            "Y_head": x @ canon["embed.weight"].T, "Y_embed": canon["embed.weight"][ids],
            "Y_down": x2 @ canon["down.weight"].T}
    assert set(out) == set(want)
    for name, w in want.items():
        np.testing.assert_allclose(out[name], w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_merge_order_matters_only_where_documented():
    """order_ab and order_ba differ on the F32 target (binary32 accumulation order), nowhere else."""
    ab = SafetensorsFile(_path("merge/order_ab_expected.safetensors"))
    ba = SafetensorsFile(_path("merge/order_ba_expected.safetensors"))
    differs = {n for n in ab.tensors if ab.array(n).tobytes() != ba.array(n).tobytes()}
    assert differs == {"m.f32.weight"}


# -- the folder itself -------------------------------------------------------------------------------
def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_regenerating_gives_identical_bytes(tmp_path):
    out = tmp_path / "vectors"
    subprocess.run([sys.executable, os.fspath(REPO / "spec" / "make_vectors.py"), "--out", os.fspath(out)],
                   check=True, capture_output=True, timeout=300)
    fresh, committed = _tree(out), _tree(VECTORS)
    assert sorted(fresh) == sorted(committed)
    changed = [rel for rel in fresh if fresh[rel] != committed[rel]]
    assert not changed, f"regenerated vectors differ: {changed[:5]}"


_SHARD = re.compile(r"^(.+)-\d{5}-of-\d{5}\.gguf$")


def _base_files(rel: str) -> set[str]:
    """The files a base path names: a folder's, or a GGUF shard with every file of its PREFIX beside it (spec section
    15.1: a split set is given by its first shard; the vectors keep each set's PREFIX to itself)."""
    base = VECTORS / rel
    if base.is_dir():
        return {rel + "/" + r for r in _tree(base)}
    m = _SHARD.match(base.name)
    if m is None:
        return {rel}
    folder = Path(rel).parent
    return {(folder / p.name).as_posix() for p in base.parent.iterdir()
            if (s := _SHARD.match(p.name)) is not None and s[1] == m[1]}


def test_folder_is_small_and_manifest_complete():
    files = _tree(VECTORS)
    assert sum(len(b) for b in files.values()) < 2_000_000
    referenced = {"manifest.json"}
    for v in MANIFEST["vectors"]:
        referenced.add(v["file"])
        if "base" in v:
            referenced |= _base_files(v["base"])
    for m in MANIFEST["merges"]:
        referenced |= {m["base"], m["expected"], *(a["file"] for a in m["adapters"])}
    assert referenced == set(files), "files not in the manifest or missing files"
    names = [v["name"] for v in MANIFEST["vectors"]] + [m["name"] for m in MANIFEST["merges"]]
    assert len(names) == len(set(names))
    assert MANIFEST["spec_version"] == naf.SPEC_VERSION


def test_resave_keeps_unknown_fields_of_a_newer_minor(tmp_path):
    src = _path("valid/minor_1_7_unknown_fields.safetensors")
    out = os.fspath(tmp_path / "resaved.safetensors")
    naf.save(naf.load(src), out)
    before = json.loads(SafetensorsFile(src).metadata["neuroada"])
    after = json.loads(SafetensorsFile(out).metadata["neuroada"])
    assert after == before


# -- the command line --------------------------------------------------------------------------------
def _run(*args):
    return CliRunner().invoke(cli, ["validate", *args])


def test_cli_exit_codes_on_vectors():
    ok = _run(_path("valid/multi_target.safetensors"), "--base", _path("bases/sharded"), "--check-selection")
    assert ok.exit_code == 0, ok.output
    assert "valid:" in ok.stdout

    bad = _run(_path("invalid/3.7_nan_bf16.safetensors"))
    assert bad.exit_code == 1
    assert len(bad.stderr.strip().splitlines()) == 1 and "rule 3.7" in bad.stderr

    mismatch = _run(_path("valid/magnitude_bf16.safetensors"), "--base", _path("bases/changed_value.safetensors"))
    assert mismatch.exit_code == 1 and "rule 4.3" in mismatch.stderr

    warn = _run(_path("valid/i32_where_i16_fits.safetensors"), "--json")
    assert warn.exit_code == 0
    assert [p["rule"] for p in json.loads(warn.stdout)["problems"]] == ["3.2"]

    broken = _run(_path("invalid/1.1_header_length_bomb.safetensors"))
    assert broken.exit_code == 1 and "rule 1.1" in broken.stderr

    unreadable_base = _run(_path("valid/magnitude_bf16.safetensors"), "--base",
                           _path("bases/index_escapes_folder"))  # a base breaking rule 1.6: invalid input
    assert unreadable_base.exit_code == 1 and "rule 1.6" in unreadable_base.stderr
    assert "Traceback" not in unreadable_base.output
