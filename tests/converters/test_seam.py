"""The converter seam: backend registry, one summary, one overwrite rule, one exit-code table, adapter
folders wherever an adapter file is accepted. Real checkpoints in tmp folders, real CLI processes."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format import durable
from neuroada_format.converters import backend as seam
from neuroada_format.converters import pack_cli
from neuroada_format.converters.cli_common import parse_scaled, printable
from neuroada_format.converters.merge_cli import run as merge_run
from neuroada_format.folder import CONFIG_NAME, WEIGHTS_NAME

_spec = importlib.util.spec_from_file_location("_merge_builders", Path(__file__).with_name("test_merge_safetensors.py"))
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"


@pytest.fixture
def model(tmp_path):
    """(base folder, adapter file, adapter folder, arrays)."""
    rng = np.random.default_rng(7)
    arrays = B.llama_arrays(rng, conv1d=False)
    base = B.write_checkpoint(tmp_path / "base", arrays)
    adapter = B.make_adapter(rng, arrays, B.targets_of(arrays), 3)
    naf.save(adapter, tmp_path / "a.safetensors")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    naf.save(adapter, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps({"k": 3}))
    return base, os.fspath(tmp_path / "a.safetensors"), os.fspath(folder), arrays


def merge_cli(capsys, *args):
    code = merge_run([os.fspath(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def pack_run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        pack_cli.main([os.fspath(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def tree(root) -> dict:
    root = Path(root)
    return {os.fspath(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- registry and summary ----------------------------------------------------------------------------
def test_registry_picks_backends_by_format(tmp_path):
    (tmp_path / "m.ONNX").write_bytes(b"")
    assert seam.format_of(tmp_path / "m.ONNX") == "onnx"
    assert seam.format_of(tmp_path / "x.safetensors") == "safetensors"
    assert seam.format_of(tmp_path) == "safetensors"                 # folders: the fallback backend
    for fmt in seam.REGISTRY:
        impl = seam.backend(fmt)
        assert isinstance(impl, seam.Backend) and impl.format == fmt
    with pytest.raises(naf.NeuroAdaUsageError, match="unknown base format"):
        seam.backend("pickle")


def test_one_summary_type_for_copies_and_in_place(model, tmp_path):
    base, a, _, _ = model
    copy = seam.merge(base, [(a, 1.0)], tmp_path / "out")
    in_place = seam.merge(base, [(a, 1.0)], in_place=True)
    fields = {f.name for f in dataclasses.fields(seam.MergeSummary)}
    for s in (copy, in_place):
        assert isinstance(s, seam.MergeSummary) and set(s.to_dict()) == fields
        json.dumps(s.to_dict())
        assert isinstance(s.targets, int) and s.targets == len(B.targets_of(model[3]))
    assert (copy.mode, copy.output, copy.format) == ("copy", os.fspath(tmp_path / "out"), "safetensors")
    assert (in_place.mode, in_place.output) == ("in-place", base) and os.path.isfile(in_place.journal)


# -- one overwrite rule ------------------------------------------------------------------------------
def test_check_output_refuses_aliases_containers_and_insides(tmp_path):
    src = tmp_path / "par" / "ck"
    src.mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"x")
    os.link(src / "model.safetensors", tmp_path / "hard.safetensors")
    os.symlink(src, tmp_path / "link")
    cases = {
        "is the input": [src, tmp_path / "link", tmp_path / "hard.safetensors"],
        "would contain": [tmp_path / "par", tmp_path],
        "lies inside": [src / "model.safetensors", src / "new", tmp_path / "link" / "new"],
    }
    for needle, outs in cases.items():
        for out in outs:
            for overwrite in (False, True):
                with pytest.raises(naf.NeuroAdaUsageError, match=needle):
                    durable.check_output(out, inputs=[src, src / "model.safetensors"], overwrite=overwrite)
    with pytest.raises(naf.NeuroAdaUsageError, match="parent folder"):
        durable.check_output(tmp_path / "no" / "out", inputs=[src])
    (tmp_path / "x.onnx.data").write_bytes(b"unrelated")
    with pytest.raises(naf.NeuroAdaUsageError, match="already exists"):
        durable.check_output(tmp_path / "x.onnx", inputs=[src], companions=[tmp_path / "x.onnx.data"])
    assert durable.check_output(tmp_path / "x.onnx", inputs=[src], companions=[tmp_path / "x.onnx.data"],
                                overwrite=True) == os.fspath(tmp_path / "x.onnx")


def test_an_input_given_through_a_link_inside_out_is_kept(model, tmp_path, capsys):
    """`--base holder/b --out holder --overwrite`, holder/b a link to the real base: the base's data lay elsewhere,
    but replacing holder deleted the path the user had given; OUT may not hold an input's own directory entry."""
    base, a, _, _ = model
    holder = tmp_path / "holder"
    holder.mkdir()
    os.symlink(base, holder / "b")
    code, _, err = merge_cli(capsys, "--base", holder / "b", "--adapter", a, "--out", holder, "--overwrite")
    assert code == 2 and "would contain the input" in one_line(err)
    assert os.path.islink(holder / "b") and os.path.isdir(holder / "b")
    with pytest.raises(naf.NeuroAdaUsageError, match="would contain"):
        durable.check_output(holder, inputs=[holder / "b"], overwrite=True)
    assert durable.check_output(tmp_path / "elsewhere", inputs=[holder / "b"]) == os.fspath(tmp_path / "elsewhere")


def test_merge_out_containing_the_base_is_refused_even_with_overwrite(model, tmp_path, capsys):
    """Issue 13 item 2: `--out PARENT --overwrite` used to delete BASE and everything beside it."""
    base, a, _, _ = model
    par = tmp_path / "par"
    par.mkdir()
    shutil.move(base, par / "ck")
    (par / "notes.txt").write_text("mine")
    before = tree(par)
    code, _, err = merge_cli(capsys, "--base", par / "ck", "--adapter", a, "--out", par, "--overwrite")
    assert code == 2 and "would contain the input" in one_line(err)
    assert tree(par) == before


def test_pack_never_replaces_an_input(model, tmp_path, capsys):
    """Issue 13 item 1: -o inside the base folder, or equal to an input, is refused (exit 2, nothing written)."""
    base, a, _, _ = model
    ft = tmp_path / "ft"
    shutil.copytree(base, ft)
    before = tree(base)
    target = os.path.join(base, sorted(n for n in os.listdir(base) if n.endswith(".safetensors"))[0])
    for extra in ([], ["--overwrite"]):
        code, _, err = pack_run(capsys, "--base", base, "--finetuned", ft, "-k", "2", "-o", target, *extra)
        assert code == 2 and "input" in one_line(err)
        code, _, err = pack_run(capsys, "--combine", a, "--base", base, "-o", a, *extra)
        assert code == 2 and "is the input" in one_line(err)
    assert tree(base) == before


# -- adapter folders (issue 11 item 4) ---------------------------------------------------------------
def test_merge_accepts_an_adapter_folder(model, tmp_path, capsys):
    base, a, folder, _ = model
    code, out, err = merge_cli(capsys, "--base", base, "--adapter", f"{folder}:0.5", "--out", tmp_path / "o1", "--json")
    assert code == 0, err
    assert json.loads(out)["adapters"] == [{"path": os.path.join(folder, WEIGHTS_NAME), "scale": 0.5}]
    code, _, err = merge_cli(capsys, "--base", base, "--adapter", f"{a}:0.5", "--out", tmp_path / "o2")
    assert code == 0, err
    assert tree(tmp_path / "o1") == tree(tmp_path / "o2")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = merge_cli(capsys, "--base", base, "--adapter", empty, "--out", tmp_path / "o3")
    assert code == 2 and "not an adapter folder" in one_line(err)


def test_pack_accepts_adapter_folders(model, tmp_path, capsys):
    base, a, folder, _ = model
    code, out, err = pack_run(capsys, "--combine", f"{folder}:0.5", f"{a}:0.5", "--base", base,
                              "-o", tmp_path / "c.safetensors", "--json")
    assert code == 0, err
    assert json.loads(out)["output"] == os.fspath(tmp_path / "c.safetensors")
    code, _, err = pack_run(capsys, "--repack", folder, "--value-dtype", "F32", "-o", tmp_path / "r.safetensors")
    assert code == 0, err
    assert {t.value_dtype for t in naf.load(tmp_path / "r.safetensors").targets.values()} == {"F32"}


# -- --repack keeps unknown fields (issue 11 item 7) -------------------------------------------------
def test_repack_keeps_per_target_unknown_fields(tmp_path, capsys):
    src = VECTORS / "valid" / "minor_1_7_unknown_fields.safetensors"
    original = naf.load(src)
    extras = {n: t.extra for n, t in original.targets.items()}
    assert any(extras.values())  # the vector has per-target unknown fields ({'quantization': None})
    code, _, err = pack_run(capsys, "--repack", src, "--value-dtype", "F32", "-o", tmp_path / "r.safetensors")
    assert code == 0, err
    repacked = naf.load(tmp_path / "r.safetensors")
    assert {n: t.extra for n, t in repacked.targets.items()} == extras
    assert repacked.version == original.version and repacked.extra == original.extra


# -- one PATH:SCALE reading --------------------------------------------------------------------------
def test_scale_reading_is_shared_and_strict(tmp_path, capsys, model):
    base, a, _, _ = model
    assert parse_scaled(f"{a}:-0.5") == (a, -0.5)
    with pytest.raises(naf.NeuroAdaUsageError, match="not a decimal number"):  # the file is there: the scale is bad
        parse_scaled(f"{a}:inf")
    assert parse_scaled(f"{tmp_path}/none:inf") == (f"{tmp_path}/none:inf", 1.0)  # no such file: a path (said later)
    with pytest.raises(naf.NeuroAdaUsageError, match="finite f32"):
        parse_scaled(f"{a}:1e39")
    for run in (lambda: merge_cli(capsys, "--base", base, "--adapter", f"{a}:1e39", "--out", tmp_path / "o"),
                lambda: pack_run(capsys, "--combine", f"{a}:1e39", "--base", base, "-o", tmp_path / "c")):
        code, _, err = run()
        assert code == 2 and "finite f32" in one_line(err)   # one line: no numpy RuntimeWarning before it


# -- one exit-code table, no traceback ---------------------------------------------------------------
def _broken_base(tmp_path, base) -> Path:
    """Rule 1.6: a folder whose index json is not JSON."""
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "model.safetensors.index.json").write_text("{not json")
    return broken


def _script(name: str) -> str:
    exe = shutil.which(name, path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip(f"{name} is not installed")
    return exe


def test_a_broken_base_gives_the_same_exit_code_from_every_command(model, tmp_path):
    base, a, _, _ = model
    broken = _broken_base(tmp_path, base)
    runs = {
        "validate": [_script("neuroada"), "validate", a, "--base", broken],
        "merge": [_script("neuroada-merge"), "--base", broken, "--adapter", a, "--out", tmp_path / "o"],
        "pack extract": [_script("neuroada-pack"), "--base", broken, "--finetuned", base, "-k", "1",
                         "-o", tmp_path / "x.safetensors"],
        "pack combine": [_script("neuroada-pack"), "--combine", a, "--base", broken, "-o", tmp_path / "c.safetensors"],
    }
    codes = {}
    for what, argv in runs.items():
        r = subprocess.run([os.fspath(x) for x in argv], capture_output=True, text=True, timeout=120)
        assert "Traceback" not in r.stderr, (what, r.stderr)
        codes[what] = r.returncode
        assert "rule 1.6" in r.stdout + r.stderr, (what, r.stdout, r.stderr)
    assert set(codes.values()) == {naf.errors.EXIT_INVALID}, codes
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "x.safetensors")


def test_unexpected_errors_are_one_internal_error_line(model, tmp_path, capsys, monkeypatch):
    base, a, _, _ = model

    def boom(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.delenv("NEUROADA_DEBUG", raising=False)
    monkeypatch.setattr("neuroada_format.converters.merge_cli.merge", boom)
    code, _, err = merge_cli(capsys, "--base", base, "--adapter", a, "--out", tmp_path / "o")
    assert code == naf.errors.exit_code(RecursionError()) and "internal error: RecursionError" in one_line(err)
    monkeypatch.setattr(pack_cli.pack, "combine", boom)
    code, _, err = pack_run(capsys, "--combine", a, "--base", base, "-o", tmp_path / "c.safetensors")
    assert code == naf.errors.exit_code(RecursionError()) and "internal error: RecursionError" in one_line(err)
    monkeypatch.setattr(pack_cli.pack, "combine", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    code, _, err = pack_run(capsys, "--combine", a, "--base", base, "-o", tmp_path / "c.safetensors")
    assert code == naf.errors.EXIT_INTERRUPTED and "interrupted" in one_line(err)


def test_file_derived_text_cannot_drive_the_terminal(model, tmp_path, capsys):
    base, _, _, _ = model
    evil = tmp_path / "evil\x1b[2J\nerror: forged.safetensors"
    evil.write_bytes(b"\x00" * 4)
    code, _, err = merge_cli(capsys, "--base", base, "--adapter", evil, "--out", tmp_path / "o")
    assert code == 1 and "\x1b" not in err and err.count("\n") == 1
    assert printable("a\x1b[2Jb\nc") in (r"a\x1b[2Jb\nc", r"a\x1b[2Jb\x0ac")


# -- the selection-rule registry ---------------------------------------------------------------------
def test_selection_registry_is_what_the_spec_allows():
    """A new rule is one registry entry plus the spec: the schema's enum and the fast metadata check
    must name exactly the registry's rules."""
    import neuroada_format.metadata as metadata
    from neuroada_format.selection import CHECKABLE, COMPUTABLE, RULES, select_indices

    schema = json.loads((VECTORS.parent / "schema" / "metadata-v1.schema.json").read_text())
    assert set(schema["properties"]["selection"]["properties"]["rule"]["enum"]) == set(RULES)
    assert set(metadata._RULES) == set(RULES)
    assert CHECKABLE == {"magnitude", "reverse"} and set(COMPUTABLE) == {"magnitude", "reverse", "random", "gradient"}
    w = np.array([[0.5, -2.0, 1.0, 0.0]], np.float32)
    assert select_indices(w, 2, "magnitude").tolist() == [[1, 2]]
    assert select_indices(w, 2, "reverse").tolist() == [[0, 3]]
    assert select_indices(w, 1, "gradient", scores=np.array([[0, 0, 0, -9.0]])).tolist() == [[3]]
    assert select_indices(w, 2, "random", seed=1).tolist() == select_indices(w, 2, "random", seed=1).tolist()
    for rule, kwargs, needle in (("delta", {}, "unknown selection rule"), ("random", {}, "needs a seed"),
                                 ("gradient", {}, "needs scores")):
        with pytest.raises(naf.NeuroAdaError, match=needle):
            select_indices(w, 1, rule, **kwargs)


# -- smaller hardening that the shared paths give every command --------------------------------------
def test_write_errors_name_the_file_and_leave_nothing(tmp_path):
    target = tmp_path / "journal.safetensors"

    def full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left") as info:
        durable.write_file(target, full)
    assert info.value.filename == os.fspath(target) and os.listdir(tmp_path) == []


def test_overflow_warning_is_one_line(model, tmp_path, capsys):
    base, _, _, arrays = model
    rng = np.random.default_rng(1)
    name = B.targets_of(arrays)[0]
    adapter = B.make_adapter(rng, arrays, [name], 2, value_dtype="F32")
    t = adapter.targets[name]
    huge = naf.Target(name, t.indices, np.full(t.values.shape, 3.4e38, np.float32), t.shape, t.layout, t.dtype, t.probe)
    naf.save(naf.Adapter({name: huge}), tmp_path / "huge.safetensors")
    code, _, err = merge_cli(capsys, "--base", base, "--adapter", tmp_path / "huge.safetensors", "--out", tmp_path / "o")
    assert code == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: merge overflowed"), err


@pytest.mark.parametrize("in_place", [False, True])
def test_overflow_warnings_add_up_to_what_the_output_holds(model, tmp_path, capsys, in_place):
    """One warning per tensor or block, deduplicated into one line, showed the first count only; the total comes
    last, counted once per merged tensor (the early probe check merges one tensor a second time)."""
    base, _, _, arrays = model
    rng = np.random.default_rng(1)
    names = B.targets_of(arrays)[:3]
    adapter = B.make_adapter(rng, arrays, names, 2, value_dtype="F32")
    huge = {n: naf.Target(n, t.indices, np.full(t.values.shape, 3.4e38, np.float32), t.shape, t.layout, t.dtype,
                          t.probe) for n, t in adapter.targets.items()}
    naf.save(naf.Adapter(huge), tmp_path / "huge.safetensors")
    if in_place:
        shutil.copytree(base, tmp_path / "work")
        args = ["--base", tmp_path / "work", "--adapter", tmp_path / "huge.safetensors", "--in-place"]
        merged = tmp_path / "work"
    else:
        args = ["--base", base, "--adapter", tmp_path / "huge.safetensors", "--out", tmp_path / "o"]
        merged = tmp_path / "o"
    code, _, err = merge_cli(capsys, *args)
    assert code == 0
    lines = err.strip().splitlines()
    held = sum(int((~np.isfinite(naf.open_base(merged).array(n).astype(np.float32))).sum()) for n in names)
    assert held == sum(t.values.size for t in huge.values())
    assert len(lines) == 2 and lines[0].startswith("warning: merge overflowed"), err
    assert lines[1] == f"warning: in all, the merge overflowed the BF16 range at {held} positions (over 3 tensors or blocks)"


# -- the lock rule (issue 13 item 3) -----------------------------------------------------------------
def test_in_place_runs_are_refused_while_the_checkpoint_is_locked(model, tmp_path):
    base, a, _, _ = model
    before = tree(base)
    with durable.checkpoint_lock(base, exclusive=False):      # e.g. a merge copying from this base
        with pytest.raises(naf.NeuroAdaUsageError, match="busy"):
            seam.merge(base, [(a, 1.0)], in_place=True)
        seam.merge(base, [(a, 1.0)], tmp_path / "copy")        # readers share the lock
    assert tree(base) == before
    journal = seam.merge(base, [(a, 1.0)], in_place=True, journal=tmp_path / "j.safetensors").journal
    from neuroada_format.converters.journal import revert
    with durable.checkpoint_lock(base, exclusive=True):
        with pytest.raises(naf.NeuroAdaUsageError, match="busy"):
            revert(journal)
        with pytest.raises(naf.NeuroAdaUsageError, match="busy"):
            seam.merge(base, [(a, 1.0)], tmp_path / "copy2")
    revert(journal)
    assert tree(base) == before


def test_overwrite_never_swaps_out_a_folder_a_merge_is_reading(model, tmp_path):
    """A merge copying from X holds X's lock shared and opens X's files by path one after another; a second run
    writing X with --overwrite swapped X meanwhile, and the reader wrote, exit 0, the old tree's shards beside the
    new tree's config.json. Replacing X now takes its lock exclusively: refused as busy, before the work and (for a
    reader that starts during the work) at the swap, and X is left whole."""
    base, a, b, _ = model
    x = tmp_path / "x"
    seam.merge(base, [(a, 1.0)], x)
    before = tree(x)
    with durable.checkpoint_lock(x, exclusive=False):  # a merge reading x
        with pytest.raises(naf.NeuroAdaUsageError, match=r"busy.*replacing it \(--overwrite\)"):
            seam.merge(base, [(b, 2.0)], x, overwrite=True)
        assert tree(x) == before and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # no work left behind
        out = durable.check_output(tmp_path / "y", overwrite=True)  # no reader of y yet: accepted
    shutil.copytree(x, tmp_path / "y")
    new = tmp_path / "new"
    shutil.copytree(base, new)
    with durable.checkpoint_lock(out, exclusive=False):  # a reader that started during the work
        with pytest.raises(naf.NeuroAdaUsageError, match="busy"):
            durable.publish(str(new), out, overwrite=True, durable=False)
    assert tree(tmp_path / "y") == before and os.path.isdir(new)
    seam.merge(base, [(b, 2.0)], x, overwrite=True)  # no reader: replaced
    assert tree(x) != before


def _race_child(argv, slowdown):
    os.environ[seam.SLOWDOWN_ENV] = slowdown
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os._exit(merge_run(argv))


@pytest.mark.skipif(os.name != "posix", reason="needs fork")
def test_two_in_place_merges_racing_one_wins_one_is_refused(model, tmp_path):
    """Both used to exit 0 and leave a mix of the two merges that neither revert restored."""
    import multiprocessing

    base, a, _, arrays = model
    b = tmp_path / "b.safetensors"
    naf.save(B.make_adapter(np.random.default_rng(5), arrays, B.targets_of(arrays), 4), b)
    before = tree(base)
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_race_child, args=(["--base", base, "--adapter", os.fspath(ad), "--in-place",
                                                        "--journal", os.fspath(tmp_path / f"j{i}.safetensors")],
                                                       "0.05"))
                for i, ad in enumerate((a, b))]
    for c in children:
        c.start()
    for c in children:
        c.join(120)
    codes = sorted(c.exitcode for c in children)
    assert codes == [0, 2], codes
    winner = next(i for i, c in enumerate(children) if c.exitcode == 0)
    assert not (tmp_path / f"j{1 - winner}.safetensors").exists()
    from neuroada_format.converters.journal import revert
    revert(tmp_path / f"j{winner}.safetensors")
    assert tree(base) == before


def test_backend_options_reach_a_configured_backend(model, tmp_path, capsys):
    base, a, _, _ = model
    code, _, err = merge_cli(capsys, "--base", base, "--adapter", a, "--out", tmp_path / "o", "--option", "requant=Q8_0")
    assert code == 2 and "safetensors merges take no options (got requant)" in one_line(err)
    code, _, err = merge_cli(capsys, "--base", base, "--adapter", a, "--out", tmp_path / "o", "--option", "nokey")
    assert code == 2 and "KEY=VALUE" in one_line(err)
    seen = []

    class Configurable(type(seam.backend("safetensors"))):
        def configured(self, **options):
            seen.append(options)
            return self

    monkey = Configurable()
    orig = seam.backend

    def fake(fmt, options=None):
        return monkey.configured(**options) if options else orig(fmt)

    seam_backend, seam.backend = seam.backend, fake
    try:
        summary = seam.merge(base, [(a, 1.0)], tmp_path / "o2", options={"level": "3"})
    finally:
        seam.backend = seam_backend
    assert seen == [{"level": "3"}] and summary.values_touched > 0


# -- damaged journals (issue 13 item 4) ---------------------------------------------------------------
def test_a_journal_with_damaged_data_is_refused_before_the_base_is_touched(model, tmp_path, capsys):
    from safetensors import safe_open

    from neuroada_format.converters.journal import revert

    base, a, _, _ = model
    pristine = tree(base)
    journal = seam.merge(base, [(a, 1.0)], in_place=True, journal=tmp_path / "j.safetensors").journal
    merged = tree(base)
    good = Path(journal).read_bytes()
    header_len = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + header_len])
    name = next(k for k in header if k.startswith("original/"))
    start = 8 + header_len + header[name]["data_offsets"][0]
    damaged = bytearray(good)
    damaged[start] ^= 0x01                                    # one bit of one original value
    Path(journal).write_bytes(bytes(damaged))
    with safe_open(journal, "np") as f:                      # still a well-formed safetensors file
        assert name in f.keys()
    code, _, err = merge_cli(capsys, "--revert", journal)
    assert code == 1 and "damaged" in one_line(err)
    assert tree(base) == merged                               # nothing was written back
    Path(journal).write_bytes(good)                           # the genuine journal still works
    revert(journal)
    assert tree(base) == pristine


def _journal_opened(model, tmp_path):
    """(base, journal, the merged base's tree, the journal's __metadata__, its document, its arrays) after an
    in-place merge, for tests that edit the journal and write it back."""
    from safetensors import safe_open

    from neuroada_format.converters.journal import FORMAT

    base, a, _, _ = model
    journal = seam.merge(base, [(a, 1.0)], in_place=True, journal=tmp_path / "j.safetensors").journal
    with safe_open(journal, "np") as f:
        meta = f.metadata()
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    return base, journal, tree(base), meta, json.loads(meta[FORMAT]), arrays


def test_a_journal_whose_checksums_were_removed_is_refused(model, tmp_path, capsys):
    """Editing the sha256 fields out (and the data) must not turn the check off."""
    from safetensors.numpy import save_file

    from neuroada_format.converters.journal import FORMAT

    base, journal, merged, meta, doc, arrays = _journal_opened(model, tmp_path)
    for entry in doc["tensors"].values():
        del entry["sha256"]
    name = next(k for k in arrays if k.startswith("original/"))
    arrays[name] = arrays[name].copy()
    arrays[name].view(np.uint8)[0] ^= 0x01                    # and one original value altered
    save_file(arrays, journal, metadata={**meta, FORMAT: json.dumps(doc)})
    code, _, err = merge_cli(capsys, "--revert", journal)
    assert code == 1 and "no sha256" in one_line(err)
    assert tree(base) == merged


def test_a_journal_whose_positions_are_out_of_order_is_refused(model, tmp_path, capsys):
    """Every reader of a journal's arrays (the revert's gather included) takes the positions as sorted; a journal
    with its arrays permuted and its checksums recomputed was taken as valid and refused later with a misleading
    'values are neither the merged nor the original ones'."""
    from safetensors.numpy import save_file

    from neuroada_format.converters.journal import FORMAT, entry_sha256

    base, journal, merged, meta, doc, arrays = _journal_opened(model, tmp_path)
    name = next(k[len("positions/"):] for k in arrays if k.startswith("positions/"))
    order = np.arange(arrays["positions/" + name].size)[::-1]  # the same entries, reversed
    for prefix in ("positions/", "original/", "merged/"):
        arrays[prefix + name] = np.ascontiguousarray(arrays[prefix + name][order])
    doc["tensors"][name]["sha256"] = entry_sha256(*(arrays[p + name] for p in ("positions/", "original/", "merged/")))
    save_file(arrays, journal, metadata={**meta, FORMAT: json.dumps(doc)})
    code, _, err = merge_cli(capsys, "--revert", journal)
    assert code == 1 and "are not strictly increasing" in one_line(err)
    assert tree(base) == merged


def test_a_long_but_legal_output_name_is_written_and_its_dead_siblings_cleaned(model, tmp_path):
    """An OUT of 240 characters is legal; its temporary sibling (OUT + .tmp-host-pid-hex) was not."""
    _, a, _, _ = model
    out = tmp_path / ("x" * 236 + ".safetensors")
    assert len(out.name) == 248
    r = subprocess.run([_script("neuroada-pack"), "--repack", os.fspath(a), "-o", os.fspath(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert naf.load(out).document() == naf.load(a).document()
    dead = durable.temp_sibling(out).replace(f"-{os.getpid()}-", "-999999999-")  # a writer that is gone
    assert len(os.path.basename(dead)) <= 255
    Path(dead).write_bytes(b"half")
    assert durable.remove_stale_siblings(out) == [dead] and sorted(p.name for p in tmp_path.iterdir()
                                                                     if p.name.startswith("xxx")) == [out.name]


# -- full disks (issue 13 item 8) ---------------------------------------------------------------------
@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only; skipped elsewhere)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", os.fspath(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", os.fspath(mnt)], capture_output=True)


def _sparse_base(path: Path, rows: int, cols: int) -> np.ndarray:
    """A safetensors file with one F32 tensor of zeros whose data is a hole (no disk blocks)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}})
    header += " " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header.encode())
        f.truncate(8 + len(header) + rows * cols * 4)
    return np.zeros((rows, cols), np.float32)


def test_in_place_merge_on_a_full_disk_fails_cleanly(tiny_tmpfs, tmp_path):
    """Patching a sparse base through a map on a full file system used to die of SIGBUS (exit 135)."""
    base = tiny_tmpfs / "model.safetensors"
    w = _sparse_base(base, 1024, 1024)                      # 4 MiB of hole on a 1 MiB file system
    assert os.stat(base).st_blocks * 512 < 1 << 20
    idx = naf.select_indices(w, 1)
    target = naf.Target.from_weight("w", w, idx, np.full(idx.shape, 0.5, np.float32), value_dtype="F32")
    naf.save(naf.Adapter({"w": target}), tmp_path / "a.safetensors")
    before = base.read_bytes()
    for argv in (["--in-place", "--journal", tmp_path / "j.safetensors"],):
        r = subprocess.run([os.fspath(x) for x in [_script("neuroada-merge"), "--base", base, "--adapter",
                                                   tmp_path / "a.safetensors", *argv]],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "No space left on device" in one_line(r.stderr) and os.fspath(base) in r.stderr
    assert base.read_bytes() == before and not (tmp_path / "j.safetensors").exists()


def test_pack_output_on_a_full_disk_names_the_file(tiny_tmpfs, tmp_path):
    """`neuroada-pack -o` on a full file system printed safetensors' own exception as an internal error."""
    w = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    idx = naf.select_indices(w, 64)
    target = naf.Target.from_weight("w", w, idx, np.full(idx.shape, 0.5, np.float32), value_dtype="F32")
    src = tmp_path / "a.safetensors"
    naf.save(naf.Adapter({"w": target}), src)               # 384 KiB of tensors
    (tiny_tmpfs / "filler").write_bytes(b"x" * (900 << 10))  # leaves ~100 KiB free
    out = tiny_tmpfs / "b.safetensors"
    r = subprocess.run([_script("neuroada-pack"), "--repack", os.fspath(src), "-o", os.fspath(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    line = one_line(r.stderr)
    assert "No space left on device" in line and os.fspath(out) in line, line
    assert not out.exists() and B.siblings(out) == []


# -- what a copy copies (issue 13 item 10) ------------------------------------------------------------
def test_a_copy_follows_file_links_and_refuses_folder_links_and_special_files(model, tmp_path, capsys):
    base, a, _, _ = model
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("private")
    blob = tmp_path / "blob.txt"
    blob.write_text("tokenizer")
    os.symlink(blob, Path(base) / "tokenizer.txt")            # file links: copied as content (HF cache)
    code, _, err = merge_cli(capsys, "--base", base, "--adapter", a, "--out", tmp_path / "o1")
    assert code == 0, err
    out_file = tmp_path / "o1" / "tokenizer.txt"
    assert not out_file.is_symlink() and out_file.read_text() == "tokenizer"
    cases = {"extras": lambda p: os.symlink(secret, p), "dangling": lambda p: os.symlink(tmp_path / "nope", p),
             "pipe": lambda p: os.mkfifo(p)}
    for name, make in cases.items():
        make(Path(base) / name)
        code, _, err = merge_cli(capsys, "--base", base, "--adapter", a, "--out", tmp_path / f"o-{name}")
        line = one_line(err)
        assert code == 2 and os.path.join(base, name) in line, line
        assert {"extras": "link to a folder", "dangling": "dangling", "pipe": "FIFO"}[name] in line
        assert not (tmp_path / f"o-{name}").exists() and B.siblings(tmp_path / f"o-{name}") == []
        os.unlink(Path(base) / name)


# -- one parser: a file is valid everywhere or nowhere (issue 13 items 6, 7) ---------------------------
def _rewrite(src: str, dst: Path, edit) -> str:
    """Copy an adapter file with its JSON header edited by `edit(header dict, metadata text) -> text`."""
    raw = Path(src).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = edit(header, header["__metadata__"]["neuroada"])
    text += " " * (-len(text) % 8)
    dst.write_bytes(len(text).to_bytes(8, "little") + text.encode() + raw[8 + n:])
    return os.fspath(dst)


def _with_doc(header, doc_text, extra: str) -> str:
    header = dict(header)
    header["__metadata__"] = dict(header["__metadata__"], neuroada=doc_text[:-1] + extra + "}")
    return json.dumps(header)


def _dtype_not_string(header, doc_text) -> str:
    name = next(k for k in header if k.startswith("indices/"))
    header[name]["dtype"] = [header[name]["dtype"]]
    return json.dumps(header)


def test_hostile_adapters_get_the_same_verdict_from_every_command(model, tmp_path, capsys):
    from neuroada_format.cli import main as neuroada_main

    base, a, _, _ = model
    files = {
        "dtype not a string": _rewrite(a, tmp_path / "d.safetensors", _dtype_not_string),
        "nested 700 deep": _rewrite(a, tmp_path / "n.safetensors",
                                    lambda h, d: _with_doc(h, d, ',"x":' + "[" * 700 + "]" * 700)),
        "1e999": _rewrite(a, tmp_path / "i.safetensors", lambda h, d: _with_doc(h, d, ',"x":1e999')),
    }
    for what, path in files.items():
        with pytest.raises(SystemExit) as exc:
            neuroada_main(["validate", path])
        validate_code = exc.value.code
        capsys.readouterr()
        merge_code, _, merge_err = merge_cli(capsys, "--base", base, "--adapter", path, "--out", tmp_path / "o")
        pack_code, _, pack_err = pack_run(capsys, "--repack", path, "-o", tmp_path / "r.safetensors")
        assert validate_code == merge_code == pack_code == naf.errors.EXIT_INVALID, (what, validate_code,
                                                                                      merge_err, pack_err)
        for err in (merge_err, pack_err):
            assert "internal error" not in one_line(err), (what, err)
        assert not (tmp_path / "o").exists() and not (tmp_path / "r.safetensors").exists()


def test_extract_says_which_targets_the_fine_tune_lacks(tmp_path, capsys):
    rng = np.random.default_rng(3)
    arrays = B.llama_arrays(rng, conv1d=False)
    base = B.write_checkpoint(tmp_path / "base", arrays, shards=1)
    tuned = {n: (w + np.asarray(0.5, w.dtype) if w.ndim == 2 else w) for n, w in arrays.items()}
    missing = B.targets_of(arrays)[0]
    del tuned[missing]
    ft = B.write_checkpoint(tmp_path / "ft", tuned, shards=1)
    code, out, err = pack_run(capsys, "--base", base, "--finetuned", ft, "-k", "1", "-o", tmp_path / "x.safetensors")
    assert code == 0, err
    assert "1 selected tensors are missing from the fine-tune" in out and missing in out


# -- special files never hang a command (issue 13 item 5) ----------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_anywhere_are_refused_not_waited_on(model, tmp_path):
    base, a, _, _ = model
    fifo_st, fifo_onnx, fifo_j = tmp_path / "f.safetensors", tmp_path / "f.onnx", tmp_path / "j.safetensors"
    for p in (fifo_st, fifo_onnx, fifo_j):
        os.mkfifo(p)
    merge, pack = _script("neuroada-merge"), _script("neuroada-pack")
    runs = [[merge, "--base", fifo_st, "--adapter", a, "--out", tmp_path / "o1"],
            [merge, "--base", fifo_onnx, "--adapter", a, "--out", tmp_path / "o2.onnx"],
            [merge, "--base", base, "--adapter", fifo_st, "--out", tmp_path / "o3"],
            [merge, "--revert", fifo_j],
            [pack, "--repack", fifo_st, "-o", tmp_path / "r.safetensors"],
            [pack, "--base", base, "--finetuned", fifo_st, "-k", "1", "-o", tmp_path / "x.safetensors"],
            [pack, "--combine", fifo_st, "--base", base, "-o", tmp_path / "c.safetensors"]]
    for argv in runs:
        r = subprocess.run([os.fspath(x) for x in argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (argv, r.returncode, r.stderr)
        one_line(r.stderr)


# -- kill -9 during a pack write ----------------------------------------------------------------------
def _pack_child(argv):
    import time as _time

    real = durable.publish

    def slow_publish(*args, **kwargs):  # the temporary sibling is complete: die before it is published
        _time.sleep(30)
        return real(*args, **kwargs)

    durable.publish = slow_publish
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    try:
        pack_cli.main(argv)
    except SystemExit as exc:
        os._exit(exc.code or 0)


@pytest.mark.skipif(os.name != "posix", reason="needs fork and SIGKILL")
def test_a_killed_pack_leaves_no_output_and_the_next_run_cleans_up(model, tmp_path):
    import multiprocessing
    import signal
    import time

    base, a, _, _ = model
    out = tmp_path / "c.safetensors"
    argv = ["--combine", a, "--base", base, "-o", os.fspath(out)]
    child = multiprocessing.get_context("fork").Process(target=_pack_child, args=(argv,))
    child.start()
    deadline = time.monotonic() + 60
    while not B.siblings(out) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert B.siblings(out) and not out.exists()          # a sibling, never a partial output
    with pytest.raises(SystemExit) as exc:
        pack_cli.main(argv)
    assert exc.value.code == 0 and out.exists() and B.siblings(out) == []
    assert naf.validate(naf.load(out)).ok


# -- outputs that are not plain files or folders (found by an attacker's audit) -------------------------
def test_overwrite_never_replaces_a_fifo_socket_or_symbolic_link(model, tmp_path, capsys):
    """`--out /dev/null --overwrite`, run as root, replaced the device with a regular file; a link to a folder
    failed only after the whole merge, and a link to a file was silently replaced by the output."""
    import socket

    base, a, _, _ = model
    special = tmp_path / "special"
    special.mkdir()
    os.mkfifo(special / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fspath(special / "sock"))
    (special / "elsewhere").mkdir()
    os.symlink("elsewhere", special / "dirlink")
    (special / "file").write_bytes(b"mine")
    os.symlink("file", special / "filelink")
    before = {n: os.lstat(special / n) for n in os.listdir(special)}
    try:
        for name, needle in (("fifo", "FIFO"), ("sock", "socket"), ("dirlink", "symbolic link"),
                             ("filelink", "symbolic link")):
            out = special / name
            code, _, err = merge_cli(capsys, "--base", base, "--adapter", a, "--out", out, "--overwrite")
            assert code == 2 and needle in one_line(err), err
            code, _, err = pack_run(capsys, "--repack", a, "-o", out, "--overwrite")
            assert code == 2 and needle in one_line(err), err
            with pytest.raises(naf.NeuroAdaUsageError, match=needle):
                durable.check_output(out, overwrite=True)
    finally:
        sock.close()
    after = {n: os.lstat(special / n) for n in os.listdir(special)}
    assert {n: (s.st_ino, s.st_mode) for n, s in after.items()} == {n: (s.st_ino, s.st_mode) for n, s in before.items()}
    assert (special / "file").read_bytes() == b"mine" and os.listdir(special / "elsewhere") == []
    # the last guard, for writers that publish without check_output (save_adapter...)
    with pytest.raises(naf.NeuroAdaUsageError, match="FIFO"):
        durable.write_bytes(special / "fifo", b"x")
    assert sorted(os.listdir(special)) == sorted(before)


def test_pack_output_hard_linked_to_a_file_of_the_base_folder_is_refused(model, tmp_path, capsys):
    base, a, _, _ = model
    shard = sorted(n for n in os.listdir(base) if n.endswith(".safetensors"))[0]
    alias = tmp_path / "alias.safetensors"
    os.link(os.path.join(base, shard), alias)
    before = tree(base)
    code, _, err = pack_run(capsys, "--combine", a, "--base", base, "-o", alias, "--overwrite")
    assert code == 2 and "hard link to the input file" in one_line(err), err
    assert tree(base) == before and os.path.samefile(alias, os.path.join(base, shard))


def _as_unprivileged(argv: list, **kw) -> subprocess.CompletedProcess:
    """Run argv where file permissions apply: as root, without any capability (setpriv); else as is."""
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: file permissions would not apply")
        argv = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *argv]
    return subprocess.run([os.fspath(x) for x in argv], capture_output=True, text=True, timeout=300, **kw)


def test_a_read_only_base_folder_gives_outputs_that_can_be_replaced(model, tmp_path):
    """The copy took the base folder's mode (0555): a later --overwrite published, then failed to delete the old
    output, and every run after that failed on the undeletable leftover."""
    base, a, _, _ = model
    os.chmod(base, 0o555)
    out = tmp_path / "merged"
    merge = [_script("neuroada-merge"), "--base", base, "--adapter", a, "--out", out]
    try:
        for extra in ([], ["--overwrite"], ["--overwrite"]):
            r = _as_unprivileged(merge + extra)
            assert r.returncode == 0 and r.stderr == "", r.stderr
            assert B.siblings(out) == [] and os.stat(out).st_mode & 0o700 == 0o700
    finally:
        os.chmod(base, 0o755)


def test_remove_deletes_trees_with_read_only_and_unreadable_folders(tmp_path):
    top = tmp_path / "t"
    (top / "ro" / "deep").mkdir(parents=True)
    (top / "ro" / "deep" / "f").write_bytes(b"x")
    (top / "ro" / "g").write_bytes(b"y")
    (top / "closed").mkdir()
    (top / "closed" / "h").write_bytes(b"z")
    (top / "noexec" / "sub").mkdir(parents=True)   # readable, not searchable: its entries cannot be stat'ed
    (top / "noexec" / "sub" / "f").write_bytes(b"w")
    os.chmod(top / "noexec", 0o444)
    os.chmod(top / "ro" / "deep", 0o555)
    os.chmod(top / "ro", 0o555)
    os.chmod(top / "closed", 0)
    os.chmod(top, 0o555)
    os.chmod(tmp_path, 0o755)
    code = f"from neuroada_format import durable; durable.remove({os.fspath(top)!r})"
    r = _as_unprivileged([sys.executable, "-c", code])
    assert r.returncode == 0 and not top.exists(), r.stderr
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o755  # the folder above is the user's: left alone


def test_write_errors_name_the_output(tmp_path):
    """sendfile and pwrite name no file, and shutil.copyfile names its source even when the destination's
    disk is full: a full disk or a file-size limit met while writing OUT is reported on OUT."""
    import errno

    out = tmp_path / "out"
    for raised in (OSError(errno.ENOSPC, "No space left on device"),
                   OSError(errno.EFBIG, "File too large", "/the/base/model.onnx.data")):
        with pytest.raises(OSError) as info, durable.naming_write_errors(out):
            raise raised
        assert info.value.filename == os.fspath(out) and info.value.errno == raised.errno
    with pytest.raises(OSError) as info, durable.naming_write_errors(out):  # a read error keeps its own name
        raise OSError(errno.EIO, "Input/output error", "/the/base")
    assert info.value.filename == "/the/base"


def test_merge_and_to_peft_on_a_full_disk_name_the_output(tiny_tmpfs, tmp_path):
    w = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    idx = naf.select_indices(w, 64)
    target = naf.Target.from_weight("lin.weight", w, idx, np.full(idx.shape, 0.5, np.float32), value_dtype="F32")
    src = tmp_path / "a.safetensors"
    naf.save(naf.Adapter({"lin.weight": target}), src)
    base = tmp_path / "base.safetensors"
    B.write_checkpoint(tmp_path / "b", {"lin.weight": w}, shards=1, extras=False)
    shutil.copyfile(tmp_path / "b" / "model.safetensors", base)   # 1 MiB: larger than what is left
    (tiny_tmpfs / "filler").write_bytes(b"x" * (900 << 10))  # ~100 KiB left
    for argv, out in (([_script("neuroada-merge"), "--base", base, "--adapter", src, "--out"], tiny_tmpfs / "m.safetensors"),
                      ([_script("neuroada-pack"), "--to", "peft", src, "-o"], tiny_tmpfs / "peft")):
        r = subprocess.run([os.fspath(x) for x in [*argv, out]], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (r.returncode, r.stderr)
        line = one_line(r.stderr)
        assert "No space left on device" in line and os.fspath(out) in line, line
        assert not out.exists() and B.siblings(out) == []


def _dup(a):
    a = a.copy()
    if a.size > 1:
        a[1] = a[0]
    return a


# each edit keeps the file a well-formed safetensors journal with matching checksums; what breaks is one rule of its
# structure, which revert relies on and read_journal checks before the base is touched
JOURNAL_EDITS = {
    "a repeated position": (lambda arrays, doc, name: arrays.update(
        {f"positions/{name}": _dup(arrays[f"positions/{name}"])}), "not strictly increasing"),
    "a position at the tensor's end": (lambda arrays, doc, name: arrays.update(
        {f"positions/{name}": np.append(arrays[f"positions/{name}"][:-1], doc["tensors"][name]["count"]).astype(
            arrays[f"positions/{name}"].dtype)}), "fall outside the tensor"),
    "a negative position": (lambda arrays, doc, name: arrays.update(
        {f"positions/{name}": np.append(np.int64(-1), arrays[f"positions/{name}"][1:].astype(np.int64))}),
        "fall outside the tensor"),
    "float positions": (lambda arrays, doc, name: arrays.update(
        {f"positions/{name}": arrays[f"positions/{name}"].astype(np.float32)}), "are inconsistent"),
    "originals in another dtype than the document's": (lambda arrays, doc, name: arrays.update(
        {f"original/{name}": arrays[f"original/{name}"].view(np.uint16).astype(np.float32)}), "are inconsistent"),
    "a count that is not the tensor's": (lambda arrays, doc, name: doc["tensors"][name].update(
        count=doc["tensors"][name]["count"] - 1), "tensor does not match the journal"),
}


@pytest.mark.parametrize("edit", sorted(JOURNAL_EDITS))
def test_a_journal_breaking_a_structural_rule_is_refused_before_the_base_is_touched(model, tmp_path, capsys, edit):
    """Each of read_journal's structural checks, by a journal edited to break only it (checksums recomputed): one
    line, exit 1, nothing written back. Without them revert failed later with an IndexError, a read past the tensor
    or 'neither merged nor original'."""
    from safetensors.numpy import save_file

    from neuroada_format.converters.journal import FORMAT, entry_sha256

    base, journal, merged, meta, doc, arrays = _journal_opened(model, tmp_path)
    name = next(k[len("positions/"):] for k in arrays if k.startswith("positions/") and arrays[k].size > 2)
    change, says = JOURNAL_EDITS[edit]
    change(arrays, doc, name)
    try:
        doc["tensors"][name]["sha256"] = entry_sha256(*(arrays[p + name] for p in ("positions/", "original/",
                                                                                      "merged/")))
    except Exception:  # noqa: BLE001 - (arrays of a kind the checksum cannot read: the structure check comes first)
        pass
    save_file(arrays, journal, metadata={**meta, FORMAT: json.dumps(doc)})
    code, _, err = merge_cli(capsys, "--revert", journal)
    line = one_line(err)
    assert code == 1 and "Traceback" not in err, err
    assert says in line, line
    assert tree(base) == merged


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_a_refused_merge_or_base_leaves_no_file_open_while_its_exception_is_kept(tmp_path):
    """A server keeps exceptions (futures, error lists): each refused merge of a 2-shard base kept its 2 shards
    open, an ONNX one its data map, and open_base given an adapter kept that file open, for as long as the exception
    lived. The views are closed when the merge ends and a refused base when it is refused."""
    rng = np.random.default_rng(5)
    arrays = B.llama_arrays(rng, layers=1)
    base = B.write_checkpoint(tmp_path / "base", arrays, shards=2)
    other = {n: (a.astype(np.float32) * 2).astype(a.dtype) for n, a in arrays.items()}
    mismatched = B.make_adapter(rng, other, B.targets_of(other), 2)  # made on other values: probe mismatch
    good = B.make_adapter(rng, arrays, B.targets_of(arrays), 2)
    naf.save(good, tmp_path / "a.safetensors")
    (tmp_path / "exists").mkdir()
    kept = []
    before = _open_fds()
    for _ in range(10):
        for call in (lambda: seam.merge(base, [(mismatched, 1.0)], tmp_path / "out"),
                     lambda: seam.merge(base, [(good, 1.0)], tmp_path / "exists"),
                     lambda: seam.merge(base, [(mismatched, 1.0)], in_place=True),
                     lambda: naf.open_base(tmp_path / "a.safetensors")):
            with pytest.raises(naf.NeuroAdaError) as err:
                call()
            kept.append(err.value)
    assert len(kept) == 40 and _open_fds() == before
    assert not (tmp_path / "out").exists()


def test_a_folder_named_like_a_model_file_is_a_folder(tmp_path):
    """format_of looked for the lower-cased path on disk: a folder `Ck.ONNX` was taken for an ONNX model."""
    from neuroada_format.converters.backend import format_of
    folder = tmp_path / "Ck.ONNX"
    folder.mkdir()
    assert format_of(folder) == "safetensors"  # (the fallback: a folder's reader says what it holds)
    assert format_of(tmp_path / "model.ONNX") == "onnx"
