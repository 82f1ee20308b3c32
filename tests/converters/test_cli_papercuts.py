"""Papercuts of the command lines found by the CLI audit (console scripts in a subprocess, real files): a report
stdout cannot encode or write, a journal or output path that cannot be what the user meant, a repeated --option."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

import neuroada_format as naf


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_papercuts_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


A = _load("test_cli_audit")            # cli(), one_error_line(), checkpoint(), adapter_for(), in_place_pair()
B = _load("test_merge_safetensors")    # sharded HF-like folders, adapters, the reference merge
cli, one_error_line = A.cli, A.one_error_line


@pytest.fixture
def model(tmp_path):
    """(sharded base folder, adapter path, arrays) on disk."""
    rng = np.random.default_rng(7)
    arrays = B.llama_arrays(rng, layers=1)
    base = B.write_checkpoint(tmp_path / "base", arrays)
    naf.save(B.make_adapter(rng, arrays, B.targets_of(arrays), 3), tmp_path / "a.safetensors")
    return base, os.fspath(tmp_path / "a.safetensors"), arrays


def latin1_cli(name, *args, cwd=None):
    return cli(name, *args, cwd=cwd, env={**os.environ, "PYTHONIOENCODING": "latin-1"}, encoding="latin-1")


# -- #3: a report stdout cannot encode -----------------------------------------------------------------------------
def test_a_report_stdout_cannot_encode_is_escaped_and_the_run_succeeds(tmp_path, model):
    """A finished merge into 'merged\u20ac' on a latin-1 stdout ended in 'internal error: UnicodeEncodeError', exit 2,
    with the output written: a script took it for a failure. The line is now escaped (as error lines are), exit 0."""
    base, a, _ = model
    out = tmp_path / "merged\u20ac"
    r = latin1_cli("neuroada-merge", "--base", base, "--adapter", a, "--out", out)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("merged ") and f"into {tmp_path}/merged\\u20ac in " in r.stdout, r.stdout
    assert r.stdout.count("\n") == 1
    shard = "model-00002-of-00002.safetensors"
    assert (out / shard).read_bytes() == B.expected_bytes(os.path.join(base, shard), [(naf.load(a), 1.0)])

    ref, rp = tmp_path / "ref.safetensors", tmp_path / "rp\u20ac.safetensors"
    assert cli("neuroada-pack", "--repack", a, "-o", ref).returncode == 0
    r = latin1_cli("neuroada-pack", "--repack", a, "-o", rp)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith(f"wrote {tmp_path}/rp\\u20ac.safetensors: "), r.stdout
    assert rp.read_bytes() == ref.read_bytes()

    euro = tmp_path / "a\u20ac.safetensors"
    euro.write_bytes(Path(a).read_bytes())
    r = latin1_cli("neuroada", "validate", euro)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"valid: {tmp_path}/a\\u20ac.safetensors\n", "")


# -- #4: the `neuroada` group's warnings ------------------------------------------------------------------------------
def test_neuroada_prints_warnings_as_one_line_each(tmp_path, monkeypatch):
    """`neuroada validate` printed Python's own two-line warning (a numpy RuntimeWarning met while reading a GGUF
    base, with a source path and line): the group now has the one-line printer neuroada-merge/-pack use."""
    from click.testing import CliRunner

    import neuroada_format.cli as naf_cli

    A.small_adapter(tmp_path / "a.safetensors")
    real = naf_cli.validate

    def warning_validate(*args, **kwargs):
        for _ in range(3):  # once per block, as a dequantization warns: shown once
            warnings.warn("invalid value encountered in multiply", RuntimeWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(naf_cli, "validate", warning_validate)
    r = CliRunner().invoke(naf_cli.main, ["validate", os.fspath(tmp_path / "a.safetensors")])
    assert r.exit_code == 0 and r.stdout.startswith("valid: "), r.output
    assert r.stderr == "warning: invalid value encountered in multiply\n", r.stderr


# -- #5: --journal naming an input ----------------------------------------------------------------------------------
def test_a_journal_naming_an_input_is_refused_as_such(tmp_path, model):
    """--journal given as the adapter, a base shard or the base folder said 'journal already exists; it may be needed
    to revert an earlier merge' (and /dev/null the same), which sent the user looking for an earlier merge. Each is
    now named for what it is, in the words of the overwrite rule; nothing is written."""
    base, a, _ = model
    before = B.tree_digest(base), Path(a).read_bytes()
    shard = os.path.join(base, "model-00001-of-00002.safetensors")
    for journal in (a, shard, base):
        r = cli("neuroada-merge", "--base", base, "--adapter", a, "--in-place", "--journal", journal)
        assert r.returncode == 2, r
        assert one_error_line(r) == (f"error: {journal}: the journal is the input {journal}; write it elsewhere "
                                     f"(or leave --journal out for a new file beside BASE)\n"), r.stderr
    r = cli("neuroada-merge", "--base", base, "--adapter", a, "--in-place", "--journal", os.devnull)
    assert r.returncode == 2 and one_error_line(r) == (
        f"error: {os.devnull}: the journal path is a character device, not a new file; write it elsewhere\n")
    old = tmp_path / "old-journal.safetensors"  # not an input: possibly an earlier merge's journal, as before
    old.write_bytes(b"kept")
    r = cli("neuroada-merge", "--base", base, "--adapter", a, "--in-place", "--journal", old)
    assert r.returncode == 2 and "journal already exists; it may be needed to revert" in one_error_line(r)
    assert (B.tree_digest(base), Path(a).read_bytes()) == before and old.read_bytes() == b"kept"
    assert not [p for p in os.listdir(base) if p.startswith(".neuroada-journal-")]


# -- #6: a trailing slash on a file output ----------------------------------------------------------------------------
def test_a_file_output_ending_in_a_slash_is_refused(tmp_path, model):
    """`-o newdir/` wrote a regular file `newdir` (the slash was dropped by the path handling): a file output named
    as a folder is now a usage error. A folder output (a folder BASE's merge) still takes the slash."""
    base, a, arrays = model
    single = B.write_checkpoint(tmp_path / "single", arrays, shards=1, extras=False)
    cases = [("neuroada-pack", "--repack", a, "-o", "newdir/"),
             ("neuroada-merge", "--base", os.path.join(single, "model.safetensors"), "--adapter", a,
              "--out", "m.safetensors/"),
             ("neuroada-merge", "--base", base, "--adapter", a, "--in-place", "--journal", "j/")]
    for argv in cases:
        r = cli(*argv, cwd=tmp_path)
        assert r.returncode == 2, r
        line = one_error_line(r)
        assert line.endswith(f" {argv[-1]}: a file output cannot end in '/' (this writes a file: name it)\n"), line
    assert not {"newdir", "m.safetensors", "j"} & set(os.listdir(tmp_path))
    r = cli("neuroada-merge", "--base", base, "--adapter", a, "--out", "copy/", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "copy").is_dir(), r.stderr


# -- #7: a repeated --option ------------------------------------------------------------------------------------------
def test_an_option_given_twice_is_refused(tmp_path):
    """`--option target_type=F16 --option target_type=Q8_0` wrote Q8_0 with exit 0 (the last one won), while its own
    warning recommended the F16 the user had passed. A key given twice (either spelling) is now a usage error."""
    pytest.importorskip("gguf")
    G = _load("test_gguf")
    base = G.write_gguf(tmp_path / "base.gguf", G.hf_arrays(), G.QT.Q4_1)
    view = G.gn.open_gguf_base(base)
    naf.save(G.make_adapter(naf.ArrayBase({n: view.array(n) for n in G.TARGETS})), tmp_path / "a.safetensors")
    out = tmp_path / "m.gguf"
    for first, second in (("target_type=F16", "target_type=Q8_0"), ("target-type=F16", "target_type=F16")):
        r = cli("neuroada-merge", "--base", base, "--adapter", tmp_path / "a.safetensors", "--out", out,
                "--option", first, "--option", second)
        assert r.returncode == 2, r
        assert one_error_line(r).startswith("error: --option target_type is given twice ("), r.stderr
        assert not out.exists()
    r = cli("neuroada-merge", "--base", base, "--adapter", tmp_path / "a.safetensors", "--out", out,
            "--option", "target_type=F16")
    assert r.returncode == 0 and out.exists(), r.stderr


# -- #8: stdout failing after the work, and empty options -----------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failing_stdout_is_not_taken_for_a_full_output_disk(tmp_path, model):
    """`neuroada-merge ... > /dev/full` wrote OUT and then said only 'No space left on device', which read as OUT's
    disk being full. The line now says the report to stdout failed and what was done (the revert command of an
    in-place merge too: it was in the report that was lost)."""
    base, a, _ = model

    def to_full(*argv):
        with open("/dev/full", "w") as full:
            return subprocess.run([A.tool(argv[0]), *map(os.fspath, argv[1:])], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=120)

    out = tmp_path / "out"
    r = to_full("neuroada-merge", "--base", base, "--adapter", a, "--out", out)
    assert r.returncode == 2 and one_error_line(r) == (
        f"error: writing the report to stdout failed: No space left on device; {out} was written\n")
    assert (out / "model-00001-of-00002.safetensors").exists()
    r = to_full("neuroada-pack", "--repack", a, "-o", tmp_path / "r.safetensors", "--json")
    assert r.returncode == 2 and one_error_line(r) == (f"error: writing the report to stdout failed: No space left "
                                                       f"on device; {tmp_path / 'r.safetensors'} was written\n")
    r = to_full("neuroada", "validate", a)
    assert r.returncode == 2
    assert one_error_line(r) == "error: writing the report to stdout failed: No space left on device\n"

    before = B.tree_digest(base)
    journal = tmp_path / "j.safetensors"
    r = to_full("neuroada-merge", "--base", base, "--adapter", a, "--in-place", "--journal", journal)
    assert r.returncode == 2 and one_error_line(r).endswith(
        f"; {base} was merged in place; revert with: neuroada-merge --revert {journal}\n"), r.stderr
    r = to_full("neuroada-merge", "--revert", journal)
    assert r.returncode == 2 and one_error_line(r).endswith(f"; the revert from {journal} is done\n"), r.stderr
    assert B.tree_digest(base) == before


@pytest.mark.parametrize("argv, name", [
    (["neuroada-pack", "--repack", "{a}", "-o", ""], "-o/--out"),
    (["neuroada-merge", "--base", "{base}", "--adapter", "{a}", "--out", ""], "--out"),
    (["neuroada-merge", "--base", "{base}", "--adapter", "{a}", "--in-place", "--journal", ""], "--journal"),
    (["neuroada-merge", "--revert", ""], "--revert"),
])
def test_an_empty_path_option_is_named(tmp_path, model, argv, name):
    """`-o ''` became the working directory and was refused as 'the output would contain the input ...'; `--out ''`
    said 'give exactly one of --out OUT and --in-place'. Both now say the option is empty."""
    base, a, _ = model
    before = B.tree_digest(base)
    r = cli(*[x.format(base=base, a=a) for x in argv], cwd=tmp_path)
    assert r.returncode == 2 and one_error_line(r) == f"error: {name} is empty: name a path\n", r.stderr
    assert B.tree_digest(base) == before


def test_a_scale_that_is_no_decimal_is_named_not_taken_for_a_missing_file(tmp_path, model):
    """'A.safetensors:nan' (or ':inf', ':0x10') said 'no such adapter file or folder' about a file that is there."""
    base, a, _ = model
    for scale in ("nan", "inf", "0x10", "1_0"):
        r = cli("neuroada-merge", "--base", base, "--adapter", f"{a}:{scale}", "--out", tmp_path / "m")
        assert r.returncode == 2 and f"the scale '{scale}' after ':' is not a decimal number" in one_error_line(r)
        assert not (tmp_path / "m").exists()
    r = cli("neuroada-merge", "--base", base, "--adapter", f"{a}:0.5", "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("tied", [True, False])
def test_a_target_on_a_tied_head_says_why_it_is_absent(tmp_path, tied):
    """transformers' save_pretrained stores a tied output head once, as the embedding: an adapter the runtime trained
    on the head (additively) was refused as if the base were the wrong model. Now rule 4.1 says the head is tied."""
    import json

    from safetensors.numpy import save_file
    rng = np.random.default_rng(3)
    emb = (rng.standard_normal((40, 16)) * 0.05).astype(np.float32)
    base = tmp_path / "base"
    base.mkdir()
    save_file({"model.embed_tokens.weight": emb}, os.fspath(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": tied}))
    idx = np.sort(rng.permuted(np.tile(np.arange(16), (40, 1)), axis=1)[:, :2], axis=1)
    target = naf.Target.from_weight("lm_head.weight", emb, idx, np.full((40, 2), 0.01, np.float32))
    naf.save(naf.Adapter({"lm_head.weight": target}), tmp_path / "a.safetensors")
    for r in (cli("neuroada-merge", "--base", base, "--adapter", tmp_path / "a.safetensors", "--out", tmp_path / "m"),
              cli("neuroada", "validate", tmp_path / "a.safetensors", "--base", base)):
        line = one_error_line(r)
        assert r.returncode == 1 and "rule 4.1: target is not a tensor of the base" in line
        assert ("ties the output head to the input embeddings" in line) == tied, line
    assert not (tmp_path / "m").exists()
