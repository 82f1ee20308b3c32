"""A new user's first hour with the command lines (console scripts in a subprocess, real files): what the help
shows them, the odd names their files come with, and the surroundings a run meets: full or closed output streams,
file-size limits, Ctrl-C and kill -9 at the edges of a write."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import neuroada_format as naf


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_first_hour_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


A = _load("test_cli_audit")            # tool(), cli(), one_error_line(), in_place_pair(), slow merges, Ctrl-C
B = _load("test_merge_safetensors")    # sharded HF-like folders, adapters, the reference merge
cli, one_error_line = A.cli, A.one_error_line


def run_bytes(name: str, *args: bytes, cwd) -> subprocess.CompletedProcess:
    """A console script given arguments as raw bytes (names that are not UTF-8), its output decoded leniently."""
    r = subprocess.run([os.fsencode(A.tool(name)), *args], capture_output=True, timeout=120, cwd=cwd)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8", "replace"),
                                       r.stderr.decode("utf-8", "replace"))


@pytest.mark.parametrize("env", [{}, {"LANG": "C", "LC_ALL": "C"}])
def test_pack_help_shows_its_examples_without_control_characters(env):
    """`neuroada-pack --help` printed a raw backspace (\\x08) before three of its four examples: click takes the
    \\b that keeps an example's lines unwrapped as a marker only at the start of a paragraph, and those three had
    no blank line before them. Piped into a file or a pager the help showed ^H; now every example is a paragraph."""
    r = subprocess.run([A.tool("neuroada-pack"), "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "\b" not in r.stdout and not any(ch < " " and ch != "\n" for ch in r.stdout), repr(r.stdout[:800])
    lines = [line.strip() for line in r.stdout.splitlines()]
    for example in ("neuroada-pack --base BASE --finetuned FT -k K -o OUT.safetensors",
                    "neuroada-pack --combine A.safetensors:0.7 B.safetensors:0.3 --base BASE -o OUT.safetensors",
                    "neuroada-pack --repack A.safetensors --value-dtype F16 -o OUT.safetensors",
                    "neuroada-pack --from-peft PEFT_DIR --base BASE -o OUT.safetensors"):
        assert example in lines, example


@pytest.fixture
def model(tmp_path):
    """(base folder arrays, adapter path) on disk."""
    rng = np.random.default_rng(7)
    arrays = B.llama_arrays(rng, layers=1)
    naf.save(B.make_adapter(rng, arrays, B.targets_of(arrays), 3), tmp_path / "a.safetensors")
    return arrays, os.fspath(tmp_path / "a.safetensors")


def test_in_place_merge_of_a_folder_whose_name_is_not_utf8_reverts(tmp_path, model):
    """An in-place merge of a checkpoint folder whose name holds bytes that are not UTF-8 wrote its journal (the
    folder's path in it) and then refused to read it back ('document is not JSON ... lone surrogate'): exit 1,
    the journal left in the folder, no merge. The journal now keeps such paths as the file system has them:
    the merge runs, and the revert command it prints, pasted into a shell, restores every byte."""
    arrays, a = model
    pristine = B.write_checkpoint(tmp_path / "pristine", arrays)
    base = os.fsdecode(os.fsencode(tmp_path) + b"/ckpt-\xff\xfe")
    shutil.copytree(pristine, base)  # (a copy: safetensors orders a header's metadata anew on every save)
    before = B.tree_digest(base)
    r = run_bytes("neuroada-merge", b"--base", os.fsencode(base), b"--adapter", os.fsencode(a), b"--in-place",
                  cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    journals = [n for n in os.listdir(base) if n.startswith(".neuroada-journal-")]
    assert len(journals) == 1
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with open(os.path.join(base, shard), "rb") as f:
            assert f.read() == B.expected_bytes(os.path.join(pristine, shard), [(naf.load(a), 1.0)]), shard
    command = r.stdout.split("revert with: ", 1)[1].strip()
    assert command.startswith("neuroada-merge --revert $'")  # (the shell word of a name that is not UTF-8)
    done = subprocess.run(["bash", "-c", A.tool("neuroada-merge") + command[len("neuroada-merge"):]],
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert B.tree_digest(base) == before


def test_in_place_merge_of_a_file_whose_name_is_not_utf8_reverts(tmp_path, model):
    """The same for a single-file base and a journal named on the command line: the file's name is a key of the
    journal's file list, and --revert reads the journal back."""
    arrays, a = model
    B.write_checkpoint(tmp_path / "src", arrays, shards=1, extras=False)
    base = os.fsdecode(os.fsencode(tmp_path) + b"/model-\xe9.safetensors")
    os.rename(tmp_path / "src" / "model.safetensors", base)
    with open(base, "rb") as f:
        original = f.read()
    merged = B.expected_bytes(base, [(naf.load(a), 1.0)])
    journal = os.fsencode(tmp_path) + b"/j-\xff.safetensors"
    r = run_bytes("neuroada-merge", b"--base", os.fsencode(base), b"--adapter", os.fsencode(a), b"--in-place",
                  b"--journal", journal, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    with open(base, "rb") as f:
        assert f.read() == merged != original
    r = run_bytes("neuroada-merge", b"--revert", journal, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    with open(base, "rb") as f:
        assert f.read() == original


def test_an_onnx_output_name_that_is_not_utf8_is_refused_before_writing(tmp_path):
    """`--out` named with bytes that are not UTF-8 for a model with external data ended, after the data copy, in
    'internal error: UnicodeEncodeError' (exit 2): the .onnx names its data file in a protobuf string, which
    holds UTF-8 only. It is now refused up front, one line naming the output, nothing written."""
    pytest.importorskip("onnx")
    O = _load("test_onnx_merge")           # graph_model(), adapter_for(): a small model with external data
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    node = O.helper.make_node("MatMul", ["x", "fc.weight_T"], ["y"], name="/fc/MatMul")
    base = O.graph_model(tmp_path / "m.onnx", {"fc.weight_T": w}, [node], external={"fc.weight_T": "m.onnx.data"})
    naf.save(O.adapter_for("fc.weight", w.T.copy(), "out_in"), tmp_path / "a.safetensors")
    ok = cli("neuroada-merge", "--base", base, "--adapter", tmp_path / "a.safetensors", "--out", tmp_path / "o.onnx")
    assert ok.returncode == 0, ok.stderr  # (the model merges under a UTF-8 name)
    before = sorted(os.listdir(tmp_path))
    out = os.fsencode(tmp_path) + b"/merged-\xff.onnx"
    r = run_bytes("neuroada-merge", b"--base", os.fsencode(base), b"--adapter", b"a.safetensors", b"--out", out,
                  cwd=tmp_path)
    assert r.returncode == 2, r
    line = one_error_line(r)
    assert "merged-\\udcff.onnx" in line and "not UTF-8" in line and "internal error" not in line, line
    assert sorted(os.listdir(tmp_path)) == before


def test_an_in_place_write_error_names_the_file_it_was_patching(tmp_path, model):
    """An in-place merge whose patch write fails (here a file-size limit, `ulimit -f`, met past the first tensors;
    an I/O error would do the same) said 'error: File too large; BASE is partly merged; revert with: ...': pwrite
    names no file, so the line named none. It now names the file being patched, and the revert still restores it."""
    import resource

    arrays, a = model
    B.write_checkpoint(tmp_path / "ckpt", arrays, shards=1, extras=False)
    base = tmp_path / "ckpt" / "model.safetensors"
    before = base.read_bytes()
    journal = tmp_path / "j.safetensors"
    assert len(before) > 2 * 65536  # (tensors on both sides of the limit)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    r = subprocess.run([A.tool("neuroada-merge"), "--base", base, "--adapter", a, "--in-place", "--journal", journal],
                       capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert r.returncode == 2, r
    line = one_error_line(r)
    assert line.startswith(f"error: {base}: File too large; ") and "is partly merged" in line, line
    assert line.rstrip("\n").endswith(f"revert with: neuroada-merge --revert {journal}"), line
    assert base.read_bytes() != before  # (the tensors before the limit were patched)
    assert cli("neuroada-merge", "--revert", journal).returncode == 0
    assert base.read_bytes() == before


@pytest.mark.parametrize("stderr", ["full", "reader gone"])
@pytest.mark.parametrize("argv", [("neuroada-merge", "--base", "BASE", "--adapter", "missing", "--out", "OUT"),
                                  ("neuroada-pack", "--repack", "missing", "-o", "OUT.safetensors"),
                                  ("neuroada", "inspect", "missing")])
def test_a_refusal_keeps_its_exit_code_when_stderr_fails(tmp_path, model, argv, stderr):
    """A refusal whose one line could not be written (stderr to a full disk, `2>>log`; or its reader gone,
    `2>&1 | head -0`) exited 1, 'invalid input', for a missing path: writing the line raised, and Python's exit
    for an uncaught error is 1. The line is now let go and the exit code stays the table's (2 here)."""
    arrays, _ = model
    base = B.write_checkpoint(tmp_path / "base", arrays)
    args = [a.replace("BASE", base).replace("OUT", os.fspath(tmp_path / "out")) for a in argv]
    if stderr == "full":
        with open("/dev/full", "w") as err:
            code = subprocess.run([A.tool(args[0]), *args[1:]], stdout=subprocess.PIPE, stderr=err, cwd=tmp_path,
                                  timeout=120).returncode
    else:
        read, write = os.pipe()
        os.close(read)
        try:
            code = subprocess.run([A.tool(args[0]), *args[1:]], stdout=subprocess.PIPE, stderr=write, cwd=tmp_path,
                                  timeout=120).returncode
        finally:
            os.close(write)
    assert code == 2
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "base"]


@pytest.mark.parametrize("argv", [("neuroada", "inspect", "A"), ("neuroada", "validate", "--json", "A"),
                                  ("neuroada-pack", "--repack", "A", "-o", "OUT.safetensors")])
def test_a_closed_stdout_is_said_not_taken_for_success(tmp_path, model, argv):
    """Started with stdout closed (`>&-`), `neuroada inspect` exited 0 having printed nothing (click drops what it
    cannot write when there is no stdout), as every report was lost without a word; a stdout that fails
    (`> /dev/full`) already said so. Now both say it, exit 2, and name what was written."""
    _, a = model
    args = [x.replace("OUT", os.fspath(tmp_path / "out")).replace("A", a) if x in ("A", "OUT.safetensors") else x
            for x in argv]
    r = subprocess.run([A.tool(args[0]), *args[1:]], stderr=subprocess.PIPE, text=True, timeout=120,
                       preexec_fn=lambda: os.close(1))
    assert r.returncode == 2, r
    line = one_error_line(r)
    assert "writing the report to stdout failed: stdout is closed" in line, line
    if "-o" in args:
        assert line.rstrip().endswith(f"{tmp_path / 'out.safetensors'} was written")
        assert naf.load(tmp_path / "out.safetensors").targets.keys() == naf.load(a).targets.keys()


def test_a_rerun_after_a_killed_in_place_merge_names_the_journal_that_reverts_it(tmp_path):
    """kill -9 (an OOM kill, a closed terminal, a power cut) during an in-place merge leaves BASE half merged and
    its revert journal a hidden file beside it. Running the merge again then said only 'probe hash differs ...
    (different base or revision)': true, but no word of the journal. The line now names it with the command that
    restores BASE, for a merge into a copy as for one in place; that command does restore it."""
    import signal

    base, adapter = A.in_place_pair(tmp_path / "m")
    before = base.read_bytes()
    p = A.slow_in_place_merge(base, adapter)
    A.wait_until(lambda: base.read_bytes() != before, p)  # the first tensor is patched: BASE is half merged
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    journals = [n for n in os.listdir(base.parent) if n.startswith(".neuroada-journal-model.safetensors-")]
    assert len(journals) == 1
    journal = base.parent / journals[0]
    for extra in (["--in-place"], ["--out", tmp_path / "copy.safetensors"]):
        r = cli("neuroada-merge", "--base", base, "--adapter", adapter, *extra)
        assert r.returncode == 1, r
        line = one_error_line(r)
        assert "rule 4.3: probe hash differs" in line, line
        assert line.rstrip().endswith(f"; an earlier in-place merge of {base} left its journal, and may have left it "
                                      f"merged or half merged (a killed run): neuroada-merge --revert {journal} "
                                      f"restores it"), line
    assert not (tmp_path / "copy.safetensors").exists()
    assert cli("neuroada-merge", "--revert", journal).returncode == 0
    assert base.read_bytes() == before
    assert cli("neuroada-merge", "--base", base, "--adapter", adapter, "--in-place").returncode == 0  # a clean rerun


def test_a_base_without_a_journal_refuses_a_foreign_adapter_as_before(tmp_path):
    """No journal, no hint: an adapter of another base is refused with the plain rule 4.3 line."""
    base, _ = A.in_place_pair(tmp_path / "m")
    A.checkpoint(base, seed=1)  # (another base of the same shapes)
    _, adapter = A.in_place_pair(tmp_path / "o")
    r = cli("neuroada-merge", "--base", base, "--adapter", adapter, "--in-place")
    assert r.returncode == 1 and "rule 4.3" in one_error_line(r) and "left its journal" not in r.stderr, r.stderr


@pytest.mark.parametrize("tool", ["neuroada-merge", "neuroada-pack"])
def test_a_ctrl_c_after_the_report_leaves_a_finished_run_finished(tmp_path, model, tool):
    """A Ctrl-C that lands once the output is written and its report printed ended the run as interrupted: 'error:
    interrupted' (exit 130) under the report, or the process killed by SIGINT while Python exited (it puts SIGINT
    back to its default action for that), every time in 12 tries of each. A script then took a complete OUT for a
    failed run. Such a Ctrl-C is now dropped and the exit code is the run's own."""
    import signal

    arrays, a = model
    base = B.write_checkpoint(tmp_path / "base", arrays)
    for i in range(6):
        out = tmp_path / (f"out{i}" if tool == "neuroada-merge" else f"out{i}.safetensors")
        argv = (["--base", base, "--adapter", a, "--out", out] if tool == "neuroada-merge" else
                ["--repack", a, "-o", out])
        p = subprocess.Popen([A.tool(tool), *map(os.fspath, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=A.terminal_sigint)
        report = p.stdout.readline()
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=120)
        assert (p.returncode, err) == (0, ""), (i, p.returncode, report, err)
        assert report.startswith(("merged ", "wrote ")) and out.exists()


@pytest.mark.parametrize("name", ["task.gguf", "task.ONNX"])
def test_pack_refuses_an_output_named_for_another_format(tmp_path, model, name):
    """`neuroada-pack --repack A -o task.gguf` wrote a safetensors adapter under a GGUF name (exit 0), which a merge
    refuses for its own outputs: given later as a base it read as a broken GGUF. Refused the same way now, before
    any work."""
    _, a = model
    out = tmp_path / name
    r = cli("neuroada-pack", "--repack", a, "-o", out)
    assert r.returncode == 2, r
    line = one_error_line(r)
    assert line.startswith(f"error: {out}: the output is written as a NeuroAda adapter") and "name it for" in line
    assert not out.exists()


def test_an_interrupted_revert_says_how_to_finish_it(tmp_path):
    """Ctrl-C during `--revert` left BASE partly reverted with the line 'error: interrupted' and nothing more (the
    merge's own interruption gives its revert command). The line now says so and gives the command that finishes the
    revert, which does."""
    import signal

    base, adapter = A.in_place_pair(tmp_path / "m")
    original = base.read_bytes()
    journal = tmp_path / "j.safetensors"
    assert cli("neuroada-merge", "--base", base, "--adapter", adapter, "--in-place", "--journal", journal).returncode == 0
    merged = base.read_bytes()
    env = dict(os.environ, NEUROADA_TEST_SLOWDOWN="1")
    p = subprocess.Popen([A.tool("neuroada-merge"), "--revert", os.fspath(journal), "--base", os.fspath(base)], env=env,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=A.terminal_sigint)
    A.wait_until(lambda: base.read_bytes() != merged, p)  # the first tensor is back: BASE is partly reverted
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and out == "", (p.returncode, out, err)
    assert base.read_bytes() not in (merged, original)
    assert err == (f"error: interrupted: {base.parent} is partly reverted; finish with: neuroada-merge --revert "
                   f"{journal} --base {base}\n"), err
    command = err.split("finish with: ", 1)[1].split()
    assert cli(command[0], *command[1:]).returncode == 0
    assert base.read_bytes() == original
