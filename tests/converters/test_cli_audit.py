"""Refusals found by auditing the commands as a user runs them (console scripts in a subprocess, real files)."""
from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import pytest
import numpy as np
from safetensors.numpy import save_file

BF16 = np.dtype(ml_dtypes.bfloat16)
Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"


def tool(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def cli(name: str, *args, cwd=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([tool(name), *map(os.fspath, args)], capture_output=True, text=True, timeout=120,
                          cwd=cwd, **kw)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def checkpoint(path, dtype=BF16, *, seed=0, delta=None) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {Q: (rng.standard_normal((16, 16)) * 0.05).astype(dtype),
              UP: (rng.standard_normal((24, 16)) * 0.05).astype(dtype),
              "model.norm.weight": np.ones(16, dtype)}
    if delta is not None:
        arrays = {n: (a.astype(np.float32) + (delta if n == Q else 0)).astype(a.dtype) for n, a in arrays.items()}
    save_file(arrays, os.fspath(path))
    return arrays


def test_extract_value_overflowing_the_value_dtype_names_the_finetune(tmp_path):
    """A fine-tune whose deltas do not fit --value-dtype F16 used to print numpy's 'overflow encountered in cast'
    warning and then blame the output file being written ('value inf ... is not finite'), not the fine-tune; it is
    now one line naming the fine-tune, the tensor and rule 3.7, as combine and repack already did."""
    checkpoint(tmp_path / "base.safetensors")
    checkpoint(tmp_path / "ft.safetensors", delta=1e6)
    out = tmp_path / "out.safetensors"
    r = cli("neuroada-pack", "--base", tmp_path / "base.safetensors", "--finetuned", tmp_path / "ft.safetensors",
            "-k", "2", "--value-dtype", "F16", "-o", out)
    assert r.returncode == 1, r
    line = one_error_line(r)
    assert line.startswith(f"error: {tmp_path / 'ft.safetensors'}: {Q}: rule 3.7: ") and "F16" in line, line
    assert not out.exists()


def test_in_place_merge_of_a_base_file_with_a_long_name(tmp_path):
    """The default journal beside a base file is .neuroada-journal-<file>-<time>.safetensors: for a legal base file
    name of 250 bytes that is longer than a path component may be, so the in-place merge failed with 'File name too
    long' on a file the user never named. The <file> part is now shortened (with a digest of the name)."""
    import neuroada_format as naf

    rng = np.random.default_rng(5)
    for stem in ("x" * 238, "é" * 119):  # 250 bytes with .safetensors; the second is cut on a character boundary
        base = tmp_path / f"{stem}.safetensors"
        arrays = checkpoint(base)
        w = arrays[Q]
        idx = np.sort(np.argsort(-np.abs(w.astype(np.float32)), axis=1)[:, :2], axis=1)
        adapter = tmp_path / "a.safetensors"
        naf.save(naf.Adapter({Q: naf.Target.from_weight(Q, w, idx, (rng.standard_normal((16, 2)) * 0.01).astype(BF16),
                                                         layout="out_in", value_dtype="BF16")}, base_name="t"), adapter)
        before = base.read_bytes()
        r = cli("neuroada-merge", "--base", base, "--adapter", adapter, "--in-place")
        assert r.returncode == 0, r.stderr
        journals = [p for p in os.listdir(tmp_path) if p.startswith(".neuroada-journal-")]
        assert len(journals) == 1 and len(os.fsencode(journals[0])) <= 255, journals
        journals[0].encode("utf-8")  # a whole name, not a cut character
        assert base.read_bytes() != before
        r = cli("neuroada-merge", "--revert", tmp_path / journals[0])
        assert r.returncode == 0, r.stderr
        assert base.read_bytes() == before
        os.remove(tmp_path / journals[0])


def test_pack_never_writes_over_the_files_a_symlinked_base_folder_holds(tmp_path):
    """A Hugging Face cache snapshot is a folder of symbolic links into blobs/. The overwrite rule compared -o only
    with the folder as given, so `-o blobs/<shard blob> --overwrite` (extract, combine, --from-peft) replaced the base's
    weights, and `--to peft -o blobs --overwrite` deleted every blob of the base (exit 0 both times). The links inside
    an input folder now count as inputs too."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snap"
    blobs.mkdir(), snap.mkdir()
    arrays = checkpoint(blobs / "abc123")
    (snap / "model.safetensors").symlink_to("../blobs/abc123")
    checkpoint(tmp_path / "ft.safetensors", delta=0.01)
    adapter_for(arrays, tmp_path / "a.safetensors")
    before = (blobs / "abc123").read_bytes()
    runs = [("--base", snap, "--finetuned", tmp_path / "ft.safetensors", "-k", "2", "-o", blobs / "abc123"),
            ("--combine", tmp_path / "a.safetensors", "--base", snap, "-o", blobs / "abc123"),
            ("--to", "peft", tmp_path / "a.safetensors", "--base", snap, "-o", blobs)]
    for args in runs:
        r = cli("neuroada-pack", *args, "--overwrite")
        assert r.returncode == 2, (args, r)
        line = one_error_line(r)
        assert os.fspath(snap / "model.safetensors") in line, line
        assert sorted(os.listdir(blobs)) == ["abc123"] and (blobs / "abc123").read_bytes() == before
    # a new file beside the blobs is no input: still written
    r = cli("neuroada-pack", *runs[0][:-1], blobs / "new.safetensors")
    assert r.returncode == 0, r.stderr



def terminal_sigint() -> None:
    """Popen's preexec_fn for the tests that press Ctrl-C: a command started from a terminal gets SIGINT at its default,
    but a shell that runs this suite in the background (`cmd &`, nohup) hands its children SIGINT ignored, an ignored
    signal stays ignored across exec, and Python then installs no KeyboardInterrupt handler at all."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def slow_in_place_merge(base, adapter, *extra, pause: float = 1):
    """neuroada-merge --in-place started with the test hook that makes each write step sleep `pause` seconds, so a
    test can act while it holds the lock or has patched part of BASE."""
    env = dict(os.environ, NEUROADA_TEST_SLOWDOWN=str(pause))
    return subprocess.Popen([tool("neuroada-merge"), "--base", os.fspath(base), "--adapter", os.fspath(adapter),
                             "--in-place", *map(os.fspath, extra)], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=terminal_sigint)


def wait_until(done, proc):
    """Poll `done()` while `proc` still runs (a minute at most)."""
    import time

    deadline = time.monotonic() + 60
    while not done():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)

def test_interrupted_in_place_merge_says_how_to_revert(tmp_path):
    """Ctrl-C during an in-place merge (after its journal is written) leaves BASE partly merged; the one error line
    was 'error: interrupted', with no word of that nor of the journal, a hidden file the user never named (a rerun
    then fails on the probe hash). The line now gives the revert command, and that command restores BASE."""
    import signal

    base, adapter = in_place_pair(tmp_path / "m")
    before = base.read_bytes()
    p = slow_in_place_merge(base, adapter)
    wait_until(lambda: base.read_bytes() != before, p)  # the first tensor is patched: BASE is partly merged
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and out == "", (p.returncode, out, err)
    assert err.count("\n") == 1 and err.startswith("error: interrupted: ") and "Traceback" not in err, err
    journal = err.split("neuroada-merge --revert ", 1)[1].strip()
    assert os.path.basename(journal).startswith(".neuroada-journal-") and os.path.exists(journal), err
    r = cli("neuroada-merge", "--revert", journal)
    assert r.returncode == 0, r.stderr
    assert base.read_bytes() == before


def test_pack_does_not_read_a_base_while_an_in_place_merge_patches_it(tmp_path):
    """neuroada-pack took no lock on the checkpoints it reads: an extract run while an in-place merge patched the base
    read half-merged weights and wrote (exit 0) an adapter whose probe hashes match neither the base nor the merged
    model. It now takes the lock rule's shared lock, as a merge into a copy does, so it is refused as busy."""
    folder = tmp_path / "base"
    folder.mkdir()
    arrays = checkpoint(folder / "model.safetensors")
    checkpoint(tmp_path / "ft.safetensors", delta=0.01)
    adapter_for(arrays, tmp_path / "a.safetensors")
    before = (folder / "model.safetensors").read_bytes()
    # each pack run takes a few seconds on a loaded machine: the merge pauses long enough to outlast all three
    merge = slow_in_place_merge(folder, tmp_path / "a.safetensors", "--journal", tmp_path / "j.safetensors", pause=8)
    try:
        # the journal is written: the lock is held, BASE patched next
        wait_until(lambda: (tmp_path / "j.safetensors").exists(), merge)
        for args in (["--base", folder, "--finetuned", tmp_path / "ft.safetensors", "-k", "2"],
                     ["--base", tmp_path / "ft.safetensors", "--finetuned", folder, "-k", "2"],
                     ["--combine", tmp_path / "a.safetensors", "--base", folder]):
            r = cli("neuroada-pack", *args, "-o", tmp_path / "out.safetensors")
            assert merge.poll() is None, "the merge ended before this pack run did: the test proves nothing"
            assert r.returncode == 2, (args, r)
            assert "busy" in one_error_line(r) and not (tmp_path / "out.safetensors").exists()
    finally:
        merge.communicate(timeout=60)
    assert merge.returncode == 0 and (folder / "model.safetensors").read_bytes() != before
    r = cli("neuroada-pack", "--base", folder, "--finetuned", tmp_path / "ft.safetensors", "-k", "2", "-o",
            tmp_path / "out.safetensors")
    assert r.returncode == 0, r.stderr


def test_validate_does_not_judge_a_base_while_an_in_place_merge_patches_it(tmp_path):
    """`neuroada validate A --base B` run during an in-place merge of B read half-patched weights and reported the
    adapter invalid for 'a different base or revision' (exit 1) although it was made for B. It now takes the shared
    lock every reader of a checkpoint takes and says the base is busy (exit 2)."""
    folder = tmp_path / "base"
    in_place_pair(folder, adapter=tmp_path / "a.safetensors")
    before = (folder / "model.safetensors").read_bytes()
    merge = slow_in_place_merge(folder, tmp_path / "a.safetensors", "--journal", tmp_path / "j.safetensors")
    try:
        # one target patched, the other not yet
        wait_until(lambda: (folder / "model.safetensors").read_bytes() != before, merge)
        r = cli("neuroada", "validate", tmp_path / "a.safetensors", "--base", folder)
        assert r.returncode == 2 and "busy" in one_error_line(r), r
    finally:
        merge.communicate(timeout=60)
    assert merge.returncode == 0
    assert cli("neuroada-merge", "--revert", tmp_path / "j.safetensors").returncode == 0
    r = cli("neuroada", "validate", tmp_path / "a.safetensors", "--base", folder)
    assert r.returncode == 0 and r.stdout.startswith("valid: "), r


def test_pack_never_replaces_a_base_file_seen_through_another_mount(tmp_path):
    """One folder mounted twice (a bind mount, a container volume inside another) shows each file under two real
    paths with one link: the overwrite rule looked for the same inode in an input folder only when the file had
    several hard links, so `-o OTHER_MOUNT/model.safetensors --overwrite` with --base FOLDER replaced the base's
    weights (exit 0). Every file of an input folder is now compared by device and inode."""
    import shutil

    import pytest

    folder, mount = tmp_path / "base", tmp_path / "mnt"
    folder.mkdir(), mount.mkdir()
    checkpoint(folder / "model.safetensors")
    checkpoint(tmp_path / "ft.safetensors", delta=0.01)
    if not shutil.which("mount") or subprocess.run(["mount", "--bind", os.fspath(folder), os.fspath(mount)],
                                                   capture_output=True).returncode != 0:
        pytest.skip("needs permission to bind-mount a folder")
    try:
        before = (folder / "model.safetensors").read_bytes()
        r = cli("neuroada-pack", "--base", folder, "--finetuned", tmp_path / "ft.safetensors", "-k", "2", "-o",
                mount / "model.safetensors", "--overwrite")
        assert r.returncode == 2, r
        assert os.fspath(folder / "model.safetensors") in one_error_line(r)
        assert (folder / "model.safetensors").read_bytes() == before
    finally:
        subprocess.run(["umount", os.fspath(mount)], check=True)


def test_overwrite_never_deletes_across_a_mount_point_inside_out(tmp_path):
    """--overwrite replaces an OUT folder by renaming the new one over it and deleting the old tree; that deletion
    went into any file system mounted inside OUT: with the base bind-mounted at OUT/m, `neuroada-merge --base B
    --out OUT --overwrite` emptied B and then failed with 'm: Device or resource busy'. An OUT folder holding a
    mount point is now refused before any work, and nothing is deleted."""
    import shutil

    import pytest

    base, out = tmp_path / "base", tmp_path / "out"
    base.mkdir(), (out / "m").mkdir(parents=True)
    arrays = checkpoint(base / "model.safetensors")
    adapter_for(arrays, tmp_path / "a.safetensors")
    if not shutil.which("mount") or subprocess.run(["mount", "--bind", os.fspath(base), os.fspath(out / "m")],
                                                   capture_output=True).returncode != 0:
        pytest.skip("needs permission to bind-mount a folder")
    before = (base / "model.safetensors").read_bytes()
    try:
        for command, args in (("neuroada-merge", ["--base", base, "--adapter", tmp_path / "a.safetensors", "--out"]),
                              ("neuroada-pack", ["--to", "peft", tmp_path / "a.safetensors", "-o"])):
            r = cli(command, *args, out, "--overwrite")
            assert r.returncode == 2, r
            assert "mount point" in one_error_line(r) and os.fspath(out) in r.stderr
            assert os.listdir(base) == ["model.safetensors"] and (base / "model.safetensors").read_bytes() == before
    finally:
        for mounted in (out / "m", *(p / "m" for p in tmp_path.iterdir() if ".tmp-" in p.name)):
            subprocess.run(["umount", os.fspath(mounted)], capture_output=True)


SLOW_IMPORT = """
import os, sys, time

class _SlowNumpy:
    '''Stands for a slow start-up: the first import of numpy sleeps, after saying so in a file.'''
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            sys.meta_path.remove(self)
            open(os.environ["NEUROADA_TEST_IMPORTING"], "w").close()
            time.sleep(60)
        return None

sys.meta_path.insert(0, _SlowNumpy())
"""


@pytest.mark.parametrize("script", ["neuroada", "neuroada-merge", "neuroada-pack"])
def test_ctrl_c_while_the_command_is_still_importing(tmp_path, script):
    """A console script imports its module (numpy, safetensors, click, ...: a second or more) before any of our code
    runs, so a Ctrl-C in that second printed a Python traceback. It is now the one 'error: interrupted' line and
    exit code 130, as a Ctrl-C later in the run gives."""
    import signal
    import time

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_IMPORT)
    mark = tmp_path / "importing"
    env = dict(os.environ, PYTHONPATH=os.fspath(hook), NEUROADA_TEST_IMPORTING=os.fspath(mark))
    p = subprocess.Popen([tool(script), "--help"], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=terminal_sigint)
    deadline = time.monotonic() + 60
    while not mark.exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert (p.returncode, out, err) == (130, "", "error: interrupted\n")


def small_adapter(path) -> None:
    import neuroada_format as naf

    w = checkpoint(path.parent / "for-adapter.safetensors")[Q]
    idx = np.sort(np.argsort(-np.abs(w.astype(np.float32)), axis=1)[:, :2], axis=1)
    naf.save(naf.Adapter({Q: naf.Target.from_weight(Q, w, idx, np.full((16, 2), 0.5, BF16), layout="out_in",
                                                     value_dtype="BF16")}, base_name="t"), path)


def test_exit_code_table_gives_a_closed_stdout_141():
    """errors.exit_code is where the codes come from (its table says 141 for a closed stdout): a BrokenPipeError is
    an OSError, which the table otherwise maps to 2."""
    from neuroada_format.errors import exit_code

    assert exit_code(BrokenPipeError()) == 141 and exit_code(OSError()) == 2


@pytest.mark.parametrize("argv", [("neuroada", "validate", "--json", "A"), ("neuroada", "inspect", "A"),
                                  ("neuroada", "--help"), ("neuroada-merge", "--help"), ("neuroada-pack", "--help")])
def test_reader_of_stdout_leaving_early_ends_quietly(tmp_path, argv):
    """`neuroada validate --json A | head -c 10`: when the reader of stdout has gone, the write fails with EPIPE
    (Python ignores SIGPIPE). That was 'error: [Errno 32] Broken pipe' and exit 2; it is now what Unix tools do,
    no message and the status of a SIGPIPE death, 141 (128 + 13)."""
    small_adapter(tmp_path / "a.safetensors")
    args = [os.fspath(tmp_path / "a.safetensors") if a == "A" else a for a in argv[1:]]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left before the first write: every write fails, whatever the pipe's buffer
    try:
        r = subprocess.run([tool(argv[0]), *args], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (141, "")


def in_place_pair(folder, adapter=None):
    """A base file in `folder` and an adapter of two targets for it (`adapter`, by default a.safetensors beside it)."""
    folder.mkdir()
    base = folder / "model.safetensors"
    arrays = checkpoint(base)
    adapter = adapter or folder / "a.safetensors"
    adapter_for(arrays, adapter, (Q, UP))
    return base, adapter


def adapter_for(arrays, path, names=(Q,)):
    """An adapter of k=2 magnitude positions and values 0.5 on `names` of the checkpoint `arrays`, saved at `path`."""
    import neuroada_format as naf

    targets = {}
    for name in names:
        w = arrays[name]
        idx = np.sort(np.argsort(-np.abs(w.astype(np.float32)), axis=1)[:, :2], axis=1)
        targets[name] = naf.Target.from_weight(name, w, idx, np.full((w.shape[0], 2), 0.5, BF16), layout="out_in",
                                               value_dtype="BF16")
    naf.save(naf.Adapter(targets, base_name="t"), path)


def test_revert_commands_are_printed_as_shell_words(tmp_path):
    """The revert command an in-place merge prints (on success, and in the error line of an interrupted one) put the
    journal's path in as it is: beside a base in "it's my model" the pasted command split at the space and left a
    quote open. The path is now one shell word: the pasted command reverts."""
    import shlex
    import signal

    base, adapter = in_place_pair(tmp_path / "it's my model")
    before = base.read_bytes()

    def revert(hint: str) -> None:
        argv = shlex.split(hint)
        assert argv[:2] == ["neuroada-merge", "--revert"] and len(argv) == 3, hint
        r = cli(*argv)
        assert r.returncode == 0, r.stderr
        assert base.read_bytes() == before

    r = cli("neuroada-merge", "--base", base, "--adapter", adapter, "--in-place")
    assert r.returncode == 0 and base.read_bytes() != before, r.stderr
    revert(r.stdout.split("revert with: ", 1)[1].strip())

    p = slow_in_place_merge(base, adapter)
    wait_until(lambda: base.read_bytes() != before, p)  # partly merged
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.count("\n") == 1, err
    revert(err.split("revert with: ", 1)[1].strip())


@pytest.mark.parametrize("name", ["plain.safetensors", "a b", "it's", "a  b", "tab\there", "new\nline", "esc\x1b[31m",
                                  "back\\slash's", "nbsp\u00a0", "sep\u2028", "byte\udcff", "-dash"])
def test_shell_word_survives_the_one_line_printing_and_a_real_shell(name):
    """What a printed command line carries: after printable() and the whitespace collapse of an error line, bash
    reads the word back as the very path."""
    from neuroada_format.errors import printable, shell_word

    word = shell_word(name)
    assert " ".join(printable(word).split()) == word, word
    r = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout == os.fsencode(name), (word, r)


def _two_weight_sets(folder, *, index_lists_single=False) -> dict:
    """A checkpoint folder holding model.safetensors (seed 0) and an index json whose shards hold other weights
    (seed 1), as an earlier save with another shard size leaves it; returns the shards' arrays."""
    import json

    folder.mkdir()
    checkpoint(folder / "model.safetensors")
    sharded = checkpoint(folder / "model-00001-of-00002.safetensors", seed=1)
    if index_lists_single:
        weight_map = dict.fromkeys(sharded, "model.safetensors")
        os.unlink(folder / "model-00001-of-00002.safetensors")
    else:
        save_file({"model.norm.weight": sharded["model.norm.weight"]},
                  os.fspath(folder / "model-00002-of-00002.safetensors"))
        save_file({n: a for n, a in sharded.items() if n != "model.norm.weight"},
                  os.fspath(folder / "model-00001-of-00002.safetensors"))
        weight_map = {n: "model-0000%d-of-00002.safetensors" % (2 if n == "model.norm.weight" else 1) for n in sharded}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sharded


def _adapter_for(arrays, path) -> None:
    import neuroada_format as naf

    w = arrays[Q]
    idx = np.sort(np.argsort(-np.abs(w.astype(np.float32)), axis=1)[:, :2], axis=1)
    naf.save(naf.Adapter({Q: naf.Target.from_weight(Q, w, idx, np.full((16, 2), 0.5, BF16), layout="out_in",
                                                     value_dtype="BF16")}, base_name="t"), path)


def _tree(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_with_model_safetensors_and_an_index_of_other_shards_is_refused(tmp_path):
    """A folder holding both model.safetensors and model.safetensors.index.json (with other shards) holds two sets of
    weights. transformers' from_pretrained loads model.safetensors; we read the index's shards, so merge (copy and
    --in-place), validate --base and extract all used weights transformers never loads, with exit 0 (the copy even
    carried both sets along). Such a folder now breaks rule 1.6, naming both files, and nothing is written."""
    base = tmp_path / "base"
    sharded = _two_weight_sets(base)
    _adapter_for(sharded, tmp_path / "a.safetensors")  # made for the shards: what the old reader picked
    checkpoint(tmp_path / "ft.safetensors", seed=1, delta=0.01)
    before = _tree(base)
    runs = [("neuroada-merge", "--base", base, "--adapter", tmp_path / "a.safetensors", "--out", tmp_path / "out"),
            ("neuroada-merge", "--base", base, "--adapter", tmp_path / "a.safetensors", "--in-place"),
            ("neuroada", "validate", tmp_path / "a.safetensors", "--base", base),
            ("neuroada-pack", "--base", base, "--finetuned", tmp_path / "ft.safetensors", "-k", "2",
             "-o", tmp_path / "x.safetensors")]
    for command, *args in runs:
        r = cli(command, *args)
        assert r.returncode == 1, (args, r)  # the base breaks rule 1.6: invalid input
        line = one_error_line(r)
        assert line.startswith(f"error: {base}: ") and "model.safetensors and model.safetensors.index.json" in line \
            and "ambiguous" in line, line
        assert _tree(base) == before
        assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "base", "ft.safetensors"]


def test_an_index_listing_only_model_safetensors_is_no_ambiguity(tmp_path):
    """An index json whose weight_map names model.safetensors alone points at the same weights: still merged."""
    base = tmp_path / "base"
    _two_weight_sets(base, index_lists_single=True)
    import safetensors.numpy

    _adapter_for(safetensors.numpy.load_file(os.fspath(base / "model.safetensors")), tmp_path / "a.safetensors")
    r = cli("neuroada-merge", "--base", base, "--adapter", tmp_path / "a.safetensors", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    r = cli("neuroada", "validate", tmp_path / "a.safetensors", "--base", base)
    assert r.returncode == 0, r.stderr


def _overwrite_setup(tmp_path):
    """A base folder with side files and a subfolder, and an adapter for it; returns (base, adapter)."""
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    arrays = checkpoint(base / "model.safetensors")
    (base / "tokenizer.json").write_text("{}")
    (base / "sub" / "notes.txt").write_text("carried over")
    _adapter_for(arrays, tmp_path / "a.safetensors")
    return base, tmp_path / "a.safetensors"


def _precious(folder, *extra) -> dict:
    """A folder that passes every other refusal (it holds safetensors weights) and files the user would miss."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"not an output of ours")
    (folder / "thesis.tex").write_text("years of work")
    for name in extra:
        (folder / name).mkdir()
    return _tree(folder)


def _refused(r, folder, needle) -> None:
    assert r.returncode == 2, r
    line = one_error_line(r)
    assert line.startswith(f"error: {folder}: ") and needle in line, line


def test_overwrite_never_deletes_the_home_folder_or_one_holding_it(tmp_path):
    """`neuroada-merge ... --out ~ --overwrite` deleted the home folder's whole tree and put the merged checkpoint in
    its place (exit 0); so did `neuroada-pack --to peft A -o ~ --overwrite`. Refused now, nothing deleted."""
    base, adapter = _overwrite_setup(tmp_path)
    home = tmp_path / "users" / "me"
    before = _precious(home)
    env = dict(os.environ, HOME=os.fspath(home))
    for out, needle in ((home, "is your home folder"), (tmp_path / "users", f"holds your home folder {home}")):
        for command, *args in (("neuroada-merge", "--base", base, "--adapter", adapter, "--out", out),
                               ("neuroada-pack", "--to", "peft", adapter, "-o", out)):
            r = cli(command, *args, "--overwrite", env=env)
            _refused(r, out, needle)
            assert _tree(home) == before and not any(".tmp-" in p for p in os.listdir(out.parent))


def test_overwrite_never_deletes_the_working_directory_or_a_folder_holding_it(tmp_path):
    """`--out . --overwrite` (or `--out ..`) deleted the working directory's tree, exit 0. Refused now."""
    base, adapter = _overwrite_setup(tmp_path)
    work = tmp_path / "project" / "work"
    before = _precious(work)
    for out, shown, needle in ((".", work, "is the current working directory"),
                               (work, work, "is the current working directory"),
                               ("..", tmp_path / "project", f"holds the current working directory {work}")):
        for command, *args in (("neuroada-merge", "--base", base, "--adapter", adapter, "--out", out),
                               ("neuroada-pack", "--to", "peft", adapter, "-o", out)):
            r = cli(command, *args, "--overwrite", cwd=work)
            _refused(r, shown, needle)
            assert _tree(work) == before


@pytest.mark.parametrize("mark", [".git", ".git-file", ".hg", ".svn"])
def test_overwrite_never_deletes_a_repository(tmp_path, mark):
    """`--out /some/project --overwrite` deleted a git repository, history included (exit 0). A folder holding .git
    (a folder, or the file a linked work tree has), .hg or .svn is refused now."""
    base, adapter = _overwrite_setup(tmp_path)
    repo = tmp_path / "repo"
    _precious(repo, *([mark] if mark != ".git-file" else []))
    if mark == ".git-file":
        (repo / ".git").write_text("gitdir: /elsewhere/.git/worktrees/repo\n")
    before = _tree(repo)
    for command, *args in (("neuroada-merge", "--base", base, "--adapter", adapter, "--out", repo),
                           ("neuroada-pack", "--to", "peft", adapter, "-o", repo)):
        r = cli(command, *args, "--overwrite")
        _refused(r, repo, f"holds {mark.removesuffix('-file')} (a repository)")
        assert _tree(repo) == before and sorted(os.listdir(repo)) == sorted(
            [".git" if mark == ".git-file" else mark, "model.safetensors", "thesis.tex"])


def test_overwrite_never_deletes_a_folder_without_safetensors_weights(tmp_path):
    """A folder without a *.safetensors file or index json at its top is no output of ours (every folder our tools
    write holds one), so --overwrite, which deletes all it holds, refuses it now instead of deleting it."""
    base, adapter = _overwrite_setup(tmp_path)
    docs = tmp_path / "docs"
    (docs / "photos").mkdir(parents=True)
    (docs / "letter.txt").write_text("keep me")
    before = _tree(docs)
    for command, *args in (("neuroada-merge", "--base", base, "--adapter", adapter, "--out", docs),
                           ("neuroada-pack", "--to", "peft", adapter, "-o", docs)):
        r = cli(command, *args, "--overwrite")
        _refused(r, docs, "holds letter.txt, photos but no safetensors weights")
        assert _tree(docs) == before and (docs / "photos").is_dir()


def test_the_root_is_never_replaced():
    """Every command's inputs lie inside /, which the input rule already refused, and on Linux / holds mount points
    (/proc), which the mount rule refuses; refuse_deleting says so itself wherever neither applies."""
    from neuroada_format import NeuroAdaUsageError
    from neuroada_format.durable import check_output, refuse_deleting

    with pytest.raises(NeuroAdaUsageError, match="the output is the file system root"):
        refuse_deleting("/")
    with pytest.raises(NeuroAdaUsageError, match="the output (is the file system root|holds a mount point)"):
        check_output("/", overwrite=True)  # no input given: nothing else refuses it


def test_overwrite_still_replaces_a_previous_output_of_the_same_command(tmp_path):
    """The refusals above never block what --overwrite is for: replacing the command's own earlier output (a merged
    copy of a base folder, with its side files and subfolders; a PEFT folder; an adapter file), or an empty folder."""
    import safetensors.numpy

    base, adapter = _overwrite_setup(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "empty").mkdir()
    checkpoint(tmp_path / "ft.safetensors", delta=0.01)
    runs = [("neuroada-merge", "--base", base, "--adapter", adapter, "--out", "merged"),
            ("neuroada-merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "empty"),
            ("neuroada-pack", "--to", "peft", adapter, "-o", "peft"),
            ("neuroada-pack", "--base", base, "--finetuned", tmp_path / "ft.safetensors", "-k", "2", "-o",
             "x.safetensors")]
    for command, *args in runs:
        out = args[-1]
        if out != tmp_path / "empty":
            r = cli(command, *args, cwd=work)
            assert r.returncode == 0, r.stderr
        r = cli(command, *args, "--overwrite", cwd=work)
        assert r.returncode == 0, (args, r.stderr)
    assert sorted(os.listdir(work / "merged")) == ["model.safetensors", "sub", "tokenizer.json"]
    assert sorted(os.listdir(tmp_path / "empty")) == ["model.safetensors", "sub", "tokenizer.json"]
    assert (work / "merged" / "sub" / "notes.txt").read_text() == "carried over"
    assert sorted(os.listdir(work / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert safetensors.numpy.load_file(os.fspath(work / "merged" / "model.safetensors"))[Q].shape == (16, 16)


def test_a_merged_copy_of_a_cloned_repository_leaves_its_git_out_and_is_replaced(tmp_path):
    """A base folder cloned from the Hub (`git clone`) holds .git: the merge into a copy carried it along (the LFS store
    doubling the copy, the output posing as a commit of the repository), and the refusal of folders holding .git would
    then block replacing that very output. The copy now leaves the base's .git out, so --overwrite replaces it."""
    import shutil

    base, adapter = _overwrite_setup(tmp_path)
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", os.fspath(base)], check=True, capture_output=True)
    else:
        (base / ".git" / "objects").mkdir(parents=True)
    (base / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    before = _tree(base)
    for extra in ([], ["--overwrite"]):
        r = cli("neuroada-merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "out", *extra)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(tmp_path / "out")) == [".gitattributes", "model.safetensors", "sub", "tokenizer.json"]
    assert _tree(base) == before and (base / ".git").is_dir()


def test_an_adapter_given_as_the_base_is_named_as_such(tmp_path):
    """Base and adapter given the other way round (or the adapter twice): the adapter was read as a checkpoint of a
    few tensors, and every target came out as 'not a tensor of the base', one line each. One line now says it."""
    base, adapter = in_place_pair(tmp_path / "m")
    for command, *args in (("neuroada-merge", "--base", adapter, "--adapter", adapter, "--out", tmp_path / "o"),
                           ("neuroada", "validate", adapter, "--base", adapter),
                           ("neuroada-pack", "--base", adapter, "--finetuned", base, "-k", "2",
                            "-o", tmp_path / "x.safetensors")):
        r = cli(command, *args)
        assert r.returncode == 1, (args, r)
        assert "rule 1.6: this is a NeuroAda adapter, not a base checkpoint" in one_error_line(r)
    assert sorted(os.listdir(tmp_path)) == ["m"]
