"""Mutation fuzzing of the adapter reader: load + validate (+ validate against the seed's base).

Valid seed files are mutated (bit flips, byte runs, truncations, appends, header-length edits,
header entry lies about offsets/dtypes/shapes, metadata JSON edits, pokes into the index and value
data) and every mutant goes through `load`, `validate` and `validate(base=...)` in this process, each
under a SIGALRM deadline. Outcomes are counted per stage: valid, NeuroAdaError by rule, OTHER
(any other exception: a bug) and HANG (deadline hit: a bug). Peak RSS comes from getrusage.

    python bench/fuzz.py                 # 10,000 cases, writes "## Format: fuzzing" in bench/RESULTS.md
    python bench/fuzz.py --n 500 --no-write
Crashing inputs are saved under bench/_work/fuzz-crashes/ with their traceback.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback

import ml_dtypes
import numpy as np

import neuroada_format as naf

HERE = os.path.dirname(os.path.abspath(__file__))
CRASH_DIR = os.path.join(HERE, "_work", "fuzz-crashes")
SECTION = "## Format: fuzzing"
DTYPE_NAMES = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
               "F64", "I64", "U64", "F128", "bf16", "", None, 3]
ODD_VALUES = [None, True, False, -1, 0, 1, 3.0, 2 ** 31, 2 ** 63, -2 ** 63, 1e308, "", "x", "1.0", "2.0", [],
              {}, [1], "sha256:" + "0" * 64, "out_in", "in_out", "BF16", "I16", [[[[[]]]]], "\ud800"]


class Deadline(Exception):
    pass


def _alarm(signum, frame):
    raise Deadline()


# -- seeds -----------------------------------------------------------------------------------------------
def seeds(rng):
    """(bytes, base arrays) for a few valid adapters covering dtypes, layouts and index widths."""
    out = []

    def make(specs, value_dtype, **adapter_kw):
        base, targets = {}, {}
        for name, stored, layout, base_dtype, k in specs:
            w = (rng.standard_normal(stored) * 0.05).astype(naf_dtype(base_dtype))
            canon = w if layout == "out_in" else w.T
            idx = naf.select_indices(canon, k)
            vals = (rng.standard_normal((canon.shape[0], k)) * 0.01).astype(naf_dtype(value_dtype))
            base[name] = w
            targets[name] = naf.Target.from_weight(name, w, idx, vals, layout=layout, value_dtype=value_dtype)
        base["model.norm.weight"] = np.ones(8, ml_dtypes.bfloat16)
        adapter = naf.Adapter(targets, structure_hash=naf.ArrayBase(base).structure_hash(), **adapter_kw)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "seed.safetensors")
            naf.save(adapter, path)
            with open(path, "rb") as f:
                out.append((f.read(), base))

    make([("model.layers.0.self_attn.q_proj.weight", (8, 8), "out_in", "BF16", 2),
          ("model.layers.0.mlp.up_proj.weight", (12, 8), "out_in", "BF16", 3)], "BF16",
         base_name="tiny", base_revision="main")
    make([("h.0.attn.c_attn.weight", (6, 10), "in_out", "F16", 4)], "F16",
         selection={"rule": "magnitude", "tie_break": "lower-column", "seed": None})
    make([("wide.weight", (2, 32800), "out_in", "F32", 3), ("narrow.weight", (3, 5), "out_in", "F32", 5)], "F32",
         base_name=None, extra={"created_by": "fuzz", "x-note": {"a": [1, 2]}})
    make([("one.weight", (1, 1), "out_in", "BF16", 1)], "BF16")
    return out


def naf_dtype(name):
    from neuroada_format.dtypes import NUMPY_DTYPES

    return NUMPY_DTYPES[name]


# -- mutators (bytes -> (bytes, description)) ---------------------------------------------------------------
def split(data):
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    if not isinstance(header, dict):
        raise ValueError("header not an object")
    return header, data[8 + n:]


def join(header, body, allow_nan=False):
    text = json.dumps(header, allow_nan=allow_nan).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(text)) + text + body


def pick(rng, options):
    """One element of a list, kept as the Python object (numpy's choice would convert it)."""
    return options[int(rng.integers(0, len(options)))]


def bit_flips(rng, data):
    data = bytearray(data)
    if not data:
        return bytes(data), "bit flips (empty)"
    count = int(rng.integers(1, 9))
    for _ in range(count):
        pos = int(rng.integers(0, len(data)))
        data[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(data), f"{count} bit flips"


def byte_run(rng, data):
    if not data:
        return data, "byte run (empty)"
    length = int(rng.integers(1, 65))
    pos = int(rng.integers(0, len(data)))
    kind = pick(rng, ["zero", "ff", "random", "digits", "quote"])
    fill = {"zero": b"\0" * length, "ff": b"\xff" * length, "random": rng.bytes(length),
            "digits": b"9" * length, "quote": b'"' * length}[kind]
    return data[:pos] + fill[: len(data) - pos] + data[pos + length:], f"{kind} run of {length} at {pos}"


def truncate(rng, data):
    cut = int(rng.integers(0, max(1, len(data))))
    return data[:cut], f"truncated to {cut} of {len(data)}"


def append(rng, data):
    extra = rng.bytes(int(rng.integers(1, 64)))
    return data + extra, f"{len(extra)} bytes appended"


def length_field(rng, data):
    (n,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (0,)
    choice = pick(rng, ["delta", "zero", "huge", "random", "file", "cap"])
    new = {"delta": max(0, n + int(rng.integers(-16, 17))), "zero": int(rng.integers(0, 3)), "huge": 2 ** 63,
           "random": int(rng.integers(0, 2 ** 63)), "file": len(data), "cap": 100_000_001}[choice]
    return struct.pack("<Q", new) + data[8:], f"header length {n} -> {new} ({choice})"


def header_entry(rng, data):
    header, body = split(data)
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return bit_flips(rng, data)
    name = names[int(rng.integers(0, len(names)))]
    entry = header[name]
    if not isinstance(entry, dict):
        return bit_flips(rng, data)
    op = pick(rng, ["offsets", "dtype", "shape", "drop_field", "add_field", "rename", "delete", "duplicate_text"])
    if op == "offsets":
        b, e = entry.get("data_offsets", [0, 0])[:2] if isinstance(entry.get("data_offsets"), list) else (0, 0)
        lie = pick(rng, ["shift", "grow", "swap", "zero", "huge", "negative", "float", "short", "same_as_other"])
        d = int(rng.integers(1, 17))
        entry["data_offsets"] = {"shift": [b + d, e + d], "grow": [b, e + d], "swap": [e, b], "zero": [0, e - b],
                                 "huge": [2 ** 62, 2 ** 62 + (e - b)], "negative": [-d, e], "float": [float(b), e],
                                 "short": [b], "same_as_other": [0, e - b]}[lie]
        desc = f"{name}: data_offsets {lie}"
    elif op == "dtype":
        entry["dtype"] = DTYPE_NAMES[int(rng.integers(0, len(DTYPE_NAMES)))]
        desc = f"{name}: dtype -> {entry['dtype']!r}"
    elif op == "shape":
        shape = entry.get("shape") if isinstance(entry.get("shape"), list) else [1]
        lie = pick(rng, ["double", "extra_dim", "drop_dim", "huge", "negative", "plus_one", "float", "string",
                          "transpose", "huge_consistent"])
        if lie == "huge_consistent":
            entry["shape"] = [2 ** 20, 2 ** 20]
            b = entry["data_offsets"][0] if isinstance(entry.get("data_offsets"), list) else 0
            entry["data_offsets"] = [b, b + 2 ** 41]
        else:
            entry["shape"] = {"double": [s * 2 for s in shape], "extra_dim": shape + [1], "drop_dim": shape[:-1],
                              "huge": [2 ** 40] + shape[1:], "negative": [-1] + shape[1:],
                              "plus_one": shape[:-1] + [shape[-1] + 1] if shape else [1],
                              "float": [float(s) for s in shape], "string": "x".join(map(str, shape)),
                              "transpose": shape[::-1]}[lie]
        desc = f"{name}: shape {shape} -> {lie}"
    elif op == "drop_field":
        field = pick(rng, ["dtype", "shape", "data_offsets"])
        entry.pop(str(field), None)
        desc = f"{name}: field {field} dropped"
    elif op == "add_field":
        entry["align"] = 8
        desc = f"{name}: extra field"
    elif op == "rename":
        new = pick(rng, ["lora_A/x", "indices/ghost", "values/ghost", name.replace("indices/", "values/"),
                          name + "/x", "", "__metadata__x"])
        header[str(new)] = header.pop(name)
        desc = f"{name} renamed to {new}"
    elif op == "delete":
        del header[name]
        desc = f"{name} deleted"
    else:
        text = json.dumps(header)
        text = text[:-1] + f", {json.dumps(name)}: {json.dumps(entry)}}}"
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw + body, f"{name} duplicated in header text"
    return join(header, body), desc


def _walk(rng, doc):
    """A random (parent, key) inside a JSON document."""
    parent, key = None, None
    node = doc
    for _ in range(int(rng.integers(1, 5))):
        if isinstance(node, dict) and node:
            keys = list(node)
            parent, key = node, keys[int(rng.integers(0, len(keys)))]
        elif isinstance(node, list) and node:
            parent, key = node, int(rng.integers(0, len(node)))
        else:
            break
        node = parent[key]
    return parent, key


def metadata_edit(rng, data):
    header, body = split(data)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not isinstance(meta.get("neuroada"), str):
        return bit_flips(rng, data)
    try:
        doc = json.loads(meta["neuroada"])
    except ValueError:
        return bit_flips(rng, data)
    op = pick(rng, ["set", "set", "delete", "rename_target", "add_target", "garbage", "nan", "deep",
                     "version", "meta_type"])
    allow_nan = False
    if op in ("set", "delete"):
        parent, key = _walk(rng, doc)
        if parent is None:
            return bit_flips(rng, data)
        if op == "set" or isinstance(parent, list):
            value = copy.deepcopy(ODD_VALUES[int(rng.integers(0, len(ODD_VALUES)))])
            parent[key] = value
            desc = f"metadata {key!r} -> {value!r}"[:120]
        else:
            del parent[key]
            desc = f"metadata {key!r} deleted"
    elif op == "rename_target" and isinstance(doc.get("targets"), dict) and doc["targets"]:
        old = next(iter(doc["targets"]))
        doc["targets"]["renamed." + old] = doc["targets"].pop(old)
        desc = f"metadata target {old} renamed"
    elif op == "add_target" and isinstance(doc.get("targets"), dict) and doc["targets"]:
        doc["targets"]["ghost.weight"] = copy.deepcopy(next(iter(doc["targets"].values())))
        desc = "metadata target without tensors added"
    elif op == "garbage":
        meta["neuroada"] = meta["neuroada"][: int(rng.integers(0, len(meta["neuroada"]) + 1))]
        return join(header, body), "metadata string truncated"
    elif op == "nan":
        parent, key = _walk(rng, doc)
        if parent is None:
            return bit_flips(rng, data)
        parent[key] = float("nan")
        allow_nan = True
        desc = f"metadata {key!r} -> NaN"
    elif op == "deep":
        meta["neuroada"] = "[" * int(rng.integers(500, 200_000))
        return join(header, body), "metadata deeply nested"
    elif op == "version":
        doc["version"] = pick(rng, ["2.0", "1.99", "0.1", "1", "1.0.0", "01.0"])
        desc = f"version -> {doc['version']}"
    else:
        header["__metadata__"] = pick(rng, [["x"], "x", {"neuroada": 5}, None])
        return join(header, body), "__metadata__ of the wrong type"
    meta["neuroada"] = json.dumps(doc, allow_nan=allow_nan)
    return join(header, body, allow_nan=allow_nan), desc


def data_poke(rng, data):
    """Write a chosen bad index or a NaN/Inf into one tensor's data (content rules 3.5-3.7)."""
    header, body = split(data)
    tensors = [(k, v) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if not tensors:
        return bit_flips(rng, data)
    name, entry = tensors[int(rng.integers(0, len(tensors)))]
    try:
        begin, end = entry["data_offsets"]
        size = {"I16": 2, "I32": 4, "BF16": 2, "F16": 2, "F32": 4}[entry["dtype"]]
    except (KeyError, TypeError, ValueError):
        return bit_flips(rng, data)
    if not (isinstance(begin, int) and isinstance(end, int)) or end - begin < size or begin < 0:
        return bit_flips(rng, data)
    at = begin + size * int(rng.integers(0, (end - begin) // size))
    body = bytearray(body)
    if entry["dtype"] in ("I16", "I32"):
        value = int(pick(rng, [-1, -32768, 32767, 40000, 0, 5, 2 ** 31 - 1]))
        fmt = "<h" if size == 2 else "<i"
        value = max(-(2 ** (8 * size - 1)), min(2 ** (8 * size - 1) - 1, value))
        body[at:at + size] = struct.pack(fmt, value)
        desc = f"{name}: index {value} poked"
    else:
        bits = {"BF16": [0x7FC0, 0x7F80, 0xFF80, 0x7F81], "F16": [0x7E00, 0x7C00, 0xFC00, 0x7C01],
                "F32": [0x7FC00000, 0x7F800000, 0xFF800000, 0x7F800001]}[entry["dtype"]]
        b = int(rng.choice(bits))
        body[at:at + size] = b.to_bytes(size, "little")
        desc = f"{name}: non-finite {b:#x} poked"
    return join(header, bytes(body)), desc


MUTATORS = [(bit_flips, 3), (byte_run, 2), (truncate, 1), (append, 1), (length_field, 1), (header_entry, 4),
            (metadata_edit, 4), (data_poke, 2)]


def mutate(rng, data):
    funcs = [m for m, _ in MUTATORS]
    weights = np.array([w for _, w in MUTATORS], float)
    steps = []
    for _ in range(int(rng.geometric(0.6))):
        fn = funcs[int(rng.choice(len(funcs), p=weights / weights.sum()))]
        try:
            data, desc = fn(rng, data)
        except (ValueError, TypeError, KeyError, IndexError, struct.error, RecursionError):
            data, desc = bit_flips(rng, data)  # header no longer parses (or lies): fall back to raw bytes
        steps.append(desc)
    return data, steps


# -- running ---------------------------------------------------------------------------------------------
def run_stage(fn, timeout):
    """('ok'|'rule X'|'valid'|'invalid X'|'OTHER'|'HANG', detail)."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        result = fn()
    except Deadline:
        return "HANG", None
    except naf.NeuroAdaError as exc:
        return f"rule {exc.rule}", None
    except Exception:  # noqa: BLE001 - any other exception is the finding
        return "OTHER", traceback.format_exc()
    finally:
        signal.alarm(0)
    if isinstance(result, naf.Report):
        return ("valid", None) if result.ok else (f"rule {result.errors[0]['rule']}", None)
    return "ok", None


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fuzz(n: int, seed: int, timeout: int, folder: str):
    rng = np.random.default_rng(seed)
    seed_files = seeds(rng)
    counts = {stage: collections.Counter() for stage in ("load", "validate", "validate+base")}
    crashes, inconsistent = [], []
    slowest = (0.0, None)
    rss_start = max_rss_mb()
    rss_jumps = []
    t0 = time.perf_counter()
    for i in range(n):
        data, base = seed_files[i % len(seed_files)]
        mutant, steps = mutate(rng, data)
        path = os.path.join(folder, f"case-{i}.safetensors")
        with open(path, "wb") as f:
            f.write(mutant)
        before_rss, t = max_rss_mb(), time.perf_counter()
        outcome = {}
        for stage, fn in (("load", lambda: naf.load(path)), ("validate", lambda: naf.validate(path)),
                          ("validate+base", lambda: naf.validate(path, base=base))):
            result, tb = run_stage(fn, timeout)
            outcome[stage] = result
            counts[stage][result] += 1
            if tb is not None or result == "HANG":
                crashes.append({"case": i, "stage": stage, "steps": steps, "size": len(mutant),
                                "traceback": tb or "deadline hit", "bytes": mutant})
        took = time.perf_counter() - t
        if took > slowest[0]:
            slowest = (took, steps)
        if max_rss_mb() - before_rss > 64:
            rss_jumps.append((i, max_rss_mb() - before_rss, steps))
        # load and validate must agree: load fails exactly when validate reports a structural error
        load_ok, val = outcome["load"] == "ok", outcome["validate"]
        structural = val.startswith("rule") and val.split()[1] not in ("3.5", "3.6", "3.7")
        if "OTHER" not in (outcome["load"], val) and load_ok == structural:
            inconsistent.append((i, outcome, steps))
        os.unlink(path)
    wall = time.perf_counter() - t0
    return {"counts": counts, "crashes": crashes, "inconsistent": inconsistent, "wall": wall, "n": n,
            "rss_start": rss_start, "rss_peak": max_rss_mb(), "rss_jumps": rss_jumps, "slowest": slowest,
            "seed": seed, "seeds": len(seed_files)}


def save_crashes(crashes) -> list[str]:
    paths = []
    if os.path.isdir(CRASH_DIR):  # forget the previous run's findings
        for name in os.listdir(CRASH_DIR):
            if name.startswith("case-"):
                os.unlink(os.path.join(CRASH_DIR, name))
    if not crashes:
        return paths
    os.makedirs(CRASH_DIR, exist_ok=True)
    for c in crashes[:50]:
        stem = os.path.join(CRASH_DIR, f"case-{c['case']}-{c['stage'].replace('+', '-')}")
        with open(stem + ".safetensors", "wb") as f:
            f.write(c["bytes"])
        with open(stem + ".txt", "w") as f:
            f.write("mutations: " + "; ".join(c["steps"]) + "\n\n" + c["traceback"])
        paths.append(stem)
    return paths


def crash_site(tb: str) -> str:
    """'IndexError at hashing.py:40 (probe_hash)': what was raised and where, without the varying message."""
    lines = tb.strip().split("\n")
    kind = lines[-1].split(":")[0]
    frames = [ln.strip() for ln in lines if ln.strip().startswith('File "')]
    if not frames:
        return kind
    last = frames[-1]
    path, lineno, func = last.split('"')[1], last.split("line ")[1].split(",")[0], last.split(" in ")[-1]
    return f"{kind} at {os.path.basename(path)}:{lineno} ({func})"


def report(res) -> str:
    from results_md import table

    stages = list(res["counts"])
    keys = sorted({k for c in res["counts"].values() for k in c},
                  key=lambda k: (k in ("OTHER", "HANG"), k not in ("ok", "valid"), k))
    rows = [["outcome", *stages]]
    for k in keys:
        rows.append([k, *(f"{res['counts'][s][k]:,}" if res["counts"][s][k] else "-" for s in stages)])
    for bad in ("OTHER", "HANG"):
        if bad not in keys:
            rows.append([bad, *("0" for _ in stages)])
    other = sum(res["counts"][s]["OTHER"] for s in stages)
    hang = sum(res["counts"][s]["HANG"] for s in stages)
    lines = [table(rows), "",
             f"{res['n']:,} mutants of {res['seeds']} valid seeds (rng seed {res['seed']}), each through all three "
             f"stages: wall {res['wall']:.1f} s ({res['n'] / res['wall']:.0f} cases/s), peak RSS "
             f"{res['rss_peak']:.0f} MB (after building the seeds {res['rss_start']:.0f} MB), cases that raised "
             f"peak RSS by > 64 MB: {len(res['rss_jumps'])}; slowest case {res['slowest'][0] * 1e3:.0f} ms.",
             f"OTHER exceptions: {other}; hangs: {hang}; load/validate disagreements: {len(res['inconsistent'])}."]
    if res["crashes"]:
        kinds = collections.Counter((c["stage"], crash_site(c["traceback"])) for c in res["crashes"])
        lines += ["", "Crashes by stage, exception and the innermost frame that raised it:", ""]
        lines += [f"- {stage}: `{site}` x {count}" for (stage, site), count in kinds.most_common()]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="number of mutated files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=5, help="seconds per stage before a case counts as a hang")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="neuroada-fuzz-") as folder:
        res = fuzz(args.n, args.seed, args.timeout, folder)
    text = report(res)
    print(text)
    saved = save_crashes(res["crashes"])
    if saved:
        print(f"\n{len(res['crashes'])} crashing cases; first {len(saved)} saved under {CRASH_DIR}")
        first = res["crashes"][0]
        print(f"first: case {first['case']} ({first['stage']}), mutations: {'; '.join(first['steps'])}")
        print(first["traceback"])
    for i, outcome, steps in res["inconsistent"][:5]:
        print(f"disagreement: case {i} {outcome} after {'; '.join(steps)}")
    if not args.no_write:
        from results_md import replace_section

        replace_section(SECTION, "`python bench/fuzz.py --n " + f"{args.n}`\n\n" + text)
        print(f"\nwrote {SECTION!r} in bench/RESULTS.md")
    return 1 if res["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
