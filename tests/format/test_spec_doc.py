"""spec/SPEC.md says what the code does: rule numbers, worked examples and stated numbers are checked.

The worked examples live in fenced blocks (```json probe-example, ```json structure-example) and in
the table after the `<!-- merge-example: base BF16 -->` marker, so they are parsed, not copied here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format import container, dtypes
from neuroada_format.metadata import schema

REPO = Path(__file__).resolve().parents[2]
SPEC = (REPO / "spec" / "SPEC.md").read_text(encoding="utf-8")
CODE = {p.name: p.read_text(encoding="utf-8") for p in sorted((REPO / "neuroada_format").glob("*.py"))}
MANIFEST = json.loads((REPO / "spec" / "vectors" / "manifest.json").read_text(encoding="utf-8"))

RULE_IN_CODE = re.compile(r'(?:rule\s*=\s*|\.error\(\s*|\.warning\(\s*)"(\d+\.\d+)"')
WARNING_IN_CODE = re.compile(r'\.warning\(\s*"(\d+\.\d+)"')
BF16 = np.dtype(ml_dtypes.bfloat16)
DT = {"BF16": BF16, "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}


def section(number: int) -> str:
    match = re.search(rf"^## {number}\. .*?(?=^## {number + 1}\. |\Z)", SPEC, re.S | re.M)
    assert match, f"SPEC.md has no section {number}"
    return match.group(0)


def rule_table() -> dict[str, str]:
    """Rule number -> severity cell, from the rule table of section 7."""
    rows = re.findall(r"^\| (\d+\.\d+) \| ([^|]+) \|", section(7), re.M)
    assert rows
    table = dict(rows)
    assert len(table) == len(rows), "a rule is listed twice"
    return {rule: severity.strip() for rule, severity in table.items()}


def fenced(tag: str) -> dict:
    blocks = re.findall(rf"^```json {tag}\n(.*?)^```", SPEC, re.S | re.M)
    assert len(blocks) == 1, f"expected one ```json {tag} block"
    return json.loads(blocks[0])


# -- rule numbers ------------------------------------------------------------------------------------
def test_rule_numbers_in_code_and_spec_agree():
    in_code = {rule for text in CODE.values() for rule in RULE_IN_CODE.findall(text)}
    in_spec = set(rule_table())
    assert in_code, "no rule numbers found in neuroada_format/*.py"
    assert in_code - in_spec == set(), "rules the code uses but SPEC.md section 7 lacks"
    assert in_spec - in_code == set(), "rules SPEC.md section 7 lists but no code checks"


def test_warning_rules_are_marked_as_warnings():
    table = rule_table()
    warnings = {rule for text in CODE.values() for rule in WARNING_IN_CODE.findall(text)}
    assert warnings == {"3.2", "4.5", "4.6"}
    for rule in warnings:
        assert "warning" in table[rule].lower(), rule
    for rule, severity in table.items():
        if rule not in warnings:
            assert severity.lower().startswith("error"), rule


def test_every_rule_has_a_vector_and_vectors_use_only_spec_rules():
    table = rule_table()
    used = set()
    for v in MANIFEST["vectors"]:
        used |= set(v["expected"]["errors"]) | set(v["expected"]["warnings"])
    assert used <= set(table)
    assert set(table) - used == set(), "rules without a conformance vector"


# -- worked examples ---------------------------------------------------------------------------------
def test_probe_hash_example():
    ex = fenced("probe-example")
    weight = np.array(ex["canonical"], np.float32).astype(DT[ex["base_dtype"]])
    indices = naf.select_indices(weight, ex["k"], ex["selection"])
    assert indices.tolist() == ex["indices"]
    idx16 = indices.astype(np.int16)
    gathered = weight.astype(np.float32)[np.arange(weight.shape[0])[:, None], indices].reshape(-1)
    assert gathered.tolist() == ex["probed_f32"]
    assert gathered.astype("<f4").tobytes().hex() == ex["probed_bytes_hex"].replace(" ", "")
    assert naf.probe_hash(weight, idx16, "out_in") == ex["probe"]
    assert naf.probe_hash(np.ascontiguousarray(weight.T), idx16, "in_out") == ex["probe"]
    import hashlib

    assert "sha256:" + hashlib.sha256(bytes.fromhex(ex["probed_bytes_hex"].replace(" ", ""))).hexdigest() \
        == ex["probe"]


def test_structure_hash_example():
    ex = fenced("structure-example")
    entries = [(name, dtype, tuple(shape)) for name, dtype, shape in ex["entries"]]
    assert naf.structure_hash(entries) == ex["structure_hash"]
    import hashlib

    assert sorted(ex["lines"]) == ex["lines"]
    assert "sha256:" + hashlib.sha256("".join(ex["lines"]).encode()).hexdigest() == ex["structure_hash"]


def merge_rows():
    marker = SPEC.index("<!-- merge-example: base BF16 -->")
    lines = SPEC[marker:].splitlines()[1:]
    rows = []
    for line in lines[2:]:                       # skip the header and the |---| line
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        hexes = [re.match(r"0x[0-9A-Fa-f]+", c) for c in (cells[1], cells[3], cells[4])]
        terms = re.findall(r"(BF16|F16|F32) (0x[0-9A-Fa-f]+)[^×;]*× ([-+0-9.eE]+)", cells[2])
        assert all(hexes) and terms, line
        rows.append(pytest.param(int(hexes[0].group(0), 16), terms, int(hexes[1].group(0), 16),
                                 int(hexes[2].group(0), 16), id=f"case{cells[0]}"))
    assert len(rows) >= 6
    return rows


def _value(dtype: str, bits: int) -> np.ndarray:
    raw = np.array([bits], np.uint32 if dtype == "F32" else np.uint16)
    return raw.view(DT[dtype]).reshape(1, 1)


@pytest.mark.parametrize("w_bits, terms, acc_bits, result_bits", merge_rows())
def test_merge_example(w_bits, terms, acc_bits, result_bits):
    weight = _value("BF16", w_bits)
    deltas = [naf.Delta(np.zeros((1, 1), np.int16), _value(d, int(b, 16)), float(s)) for d, b, s in terms]
    # the accumulator, step by step as section 8.1 writes it
    acc = np.float32(weight[0, 0])
    with np.errstate(over="ignore"):
        for d in deltas:
            acc = np.float32(acc + np.float32(np.float32(d.scale) * np.float32(d.values[0, 0])))
        positions, merged = naf.merged_values(weight, deltas)
    assert int(np.array(acc, np.float32).view(np.uint32)) == acc_bits
    assert positions.tolist() == [0]
    assert int(merged.view(np.uint16)[0]) == result_bits
    # the bit formula of section 8.1 gives the same rounding
    u = acc_bits
    assert ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) == result_bits


# -- numbers stated in the text ----------------------------------------------------------------------
def test_stated_limits_match_the_code():
    assert f"{container.HEADER_CAP:,}" == "100,000,000" and "N ≤ 100,000,000" in SPEC
    assert dtypes.I16_MAX_D_IN == 32768 and "d_in ≤ 32768" in SPEC
    for name in dtypes.NUMPY_DTYPES:
        assert f"`{name}`" in section(2), name
    sel = schema()["properties"]["selection"]["properties"]["rule"]["enum"]
    for rule in sel:
        assert f"| `{rule}` |" in section(5), rule


def _adapter_bytes(projections: dict, layers: int, k: int) -> int:
    total = 0
    for d_out, d_in in projections.values():
        index_bytes = 2 if d_in <= dtypes.I16_MAX_D_IN else 4
        total += layers * d_out * k * (index_bytes + 2)
    return total


def test_stated_sizes_follow_the_formula():
    llama7b = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
               "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}
    assert f"{_adapter_bytes(llama7b, 32, 20):,}" == "108,789,760" and "108,789,760" in section(9)
    assert f"{_adapter_bytes(llama7b, 32, 1):,}" in section(9)
    h, inter, kv = 16384, 53248, 8 * 128
    llama405b = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (inter, h), "up": (inter, h),
                 "down": (h, inter)}
    size = _adapter_bytes(llama405b, 126, 20)
    assert f"{size:,}" in section(10)
    assert f"{size / 1e9:.2f} GB" in section(10)


# -- GGUF block decoding (section 15.2) ---------------------------------------------------------------
def _spec_decode(kind: str, block: bytes) -> np.ndarray:
    """Section 15.2's table, written from the text: d, m binary16; n_i nibbles (low first); h_i bits of qh."""
    f16 = lambda b: np.frombuffer(b, "<f2")[0].astype(np.float32)  # noqa: E731
    d = f16(block[:2])
    if kind == "Q8_0":
        return np.array([np.float32(d * np.float32(q)) for q in np.frombuffer(block[2:], np.int8)], np.float32)
    m = f16(block[2:4]) if kind in ("Q4_1", "Q5_1") else None
    rest = block[4:] if m is not None else block[2:]
    qh = int.from_bytes(rest[:4], "little") if kind.startswith("Q5") else 0
    qs = rest[4:] if kind.startswith("Q5") else rest
    out = []
    for i in range(32):
        n = qs[i] & 0x0F if i < 16 else qs[i - 16] >> 4
        n |= ((qh >> i) & 1) << 4
        q = n - {"Q4_0": 8, "Q5_0": 16}.get(kind, 0)
        v = np.float32(d * np.float32(q))
        out.append(v if m is None else np.float32(v + m))
    return np.array(out, np.float32)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_block_formulas_match_gguf_py(kind):
    gguf = pytest.importorskip("gguf")
    qt = gguf.GGMLQuantizationType[kind]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
    assert block_size == 32
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, (64, type_size), dtype=np.uint8)
    scales = rng.uniform(-2, 2, (64, 2)).astype(np.float16)
    raw[:, :2] = scales[:, :1].view(np.uint8)          # finite d (and m), some subnormal or negative
    if kind in ("Q4_1", "Q5_1"):
        raw[:, 2:4] = scales[:, 1:].view(np.uint8)
    raw[0, :2] = np.array([1], np.uint16).view(np.uint8)  # the least binary16 subnormal as d
    want = gguf.quants.dequantize(raw.reshape(-1), qt).reshape(64, 32)
    got = np.stack([_spec_decode(kind, raw[b].tobytes()) for b in range(64)])
    assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()


def test_the_tolerated_dtype_name_pattern_is_the_spec_s():
    """SPEC 2.2 states the form of an unknown dtype a base reader tolerates; a second reader follows the text."""
    stated = re.search(r"`(\[A-Z\]\[A-Z0-9_\]\{0,31\})`", SPEC)
    assert stated and stated.group(1) == container._DTYPE_NAME.pattern
    for name, ok in (("F6_E2M3", True), ("f6_e2m3", False), ("F4-E2M1", False)):  # SPEC's own examples
        assert bool(container._DTYPE_NAME.fullmatch(name)) == ok


def test_the_stated_tensor_order_of_safetensors_holds(tmp_path):
    """SPEC 2.3's note on the order safetensors writes (readers must not depend on it; the note must be true)."""
    assert "an adapter's F32 values before its I16 indices" in " ".join(SPEC.split())
    W = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = naf.Target.from_weight("w", W, np.array([[1], [2], [3]]), np.ones((3, 1), np.float32), value_dtype="F32")
    naf.save(naf.Adapter({"w": t}), tmp_path / "a.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = {k: v for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}
    order = [header[k]["dtype"] for k in sorted(header, key=lambda k: header[k]["data_offsets"])]
    assert order == ["F32", "I16"]


def test_gguf_names_file_is_gguf_py_s_table():
    """spec/gguf-names.json writes out the name table SPEC 15.2 maps keys through (gguf-py's TensorNameMap), so a
    reader without gguf-py maps the same keys: regenerated it equals the committed file, and expanded for three
    blocks it is exactly the mapping the reference resolves GGUF names with."""
    gguf = pytest.importorskip("gguf")
    from importlib.metadata import version
    names = json.loads((REPO / "spec" / "gguf-names.json").read_text(encoding="utf-8"))
    if version("gguf") != names["gguf_py"]:
        pytest.skip(f"the file is gguf-py {names['gguf_py']}'s table; installed {version('gguf')}")
    import sys
    sys.path.insert(0, str(REPO / "spec"))
    try:
        import make_gguf_names
    finally:
        sys.path.remove(str(REPO / "spec"))
    assert make_gguf_names.document() == names
    from neuroada_format.converters.gguf_names import ARCHS
    assert sorted(names["architectures"]) == sorted(ARCHS)
    assert names["rope_permuted"] == sorted(a for a, r in ARCHS.items() if r == "rope") == ["llama", "mistral3"]
    assert names["qkv_regrouped"] == sorted(a for a, r in ARCHS.items() if r == "qkv") == ["bloom", "falcon"]
    for arch, table in names["architectures"].items():
        tnm = gguf.TensorNameMap(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), 3)
        expanded = {k.replace("{N}", str(n)): g.replace("{N}", str(n))
                    for g, keys in table.items() for k in keys for n in range(3)}
        assert expanded == {k: g for k, (_, g) in tnm.mapping.items()}, arch
    assert "spec/gguf-names.json" in SPEC and "make_gguf_names.py" in SPEC
