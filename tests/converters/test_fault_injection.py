"""SIGKILL `neuroada-merge` at random moments: no partial OUT, BASE untouched, in-place always revertible.

Each trial forks a child that runs the CLI (`merge_cli.run`) with NEUROADA_TEST_SLOWDOWN set, so the
merge of a few-MB sharded checkpoint takes a few tenths of a second spread over ~30 steps (copy,
per-tensor patch, journal, rename); the parent kills it after a random delay. Forking (instead of
starting a fresh interpreter) keeps the trials cheap; the child is a separate process all the same.

What a killed merge may leave: `<OUT>.tmp-<host>-<pid>-<hex>` siblings (and journal temporaries);
the next merge to the same OUT (or journal) removes those of dead processes, checked at the end.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format.converters.journal import revert
from neuroada_format.converters.merge_cli import run
from neuroada_format.converters.safetensors_merge import SLOWDOWN_ENV

_spec = importlib.util.spec_from_file_location("_merge_builders", Path(__file__).with_name("test_merge_safetensors.py"))
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)

STEP_S = "0.01"
COPY_TRIALS, IN_PLACE_TRIALS, REVERT_TRIALS = 14, 12, 6

pytestmark = pytest.mark.skipif(os.name != "posix" or "fork" not in multiprocessing.get_all_start_methods(),
                                reason="needs fork and SIGKILL")


def _child(argv):
    os.environ[SLOWDOWN_ENV] = STEP_S
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os._exit(run(argv))


def _run(argv, kill_after: float | None = None) -> tuple[bool, float]:
    """Run the CLI in a forked child; SIGKILL it after kill_after seconds. Returns (killed, seconds)."""
    child = multiprocessing.get_context("fork").Process(target=_child, args=([os.fspath(a) for a in argv],))
    started = time.perf_counter()
    child.start()
    child.join(kill_after)
    killed = child.is_alive()
    if killed:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    else:
        assert child.exitcode == 0, f"merge failed with exit code {child.exitcode}"
    return killed, time.perf_counter() - started


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(77)
    arrays = B.llama_arrays(rng, "BF16", layers=3, hidden=256, inter=688, kv=128, vocab=512)
    base = B.write_checkpoint(tmp / "base", arrays, shards=3)
    adapters = []
    for i, k in enumerate((8, 3)):
        path = tmp / f"a{i}.safetensors"
        naf.save(B.make_adapter(rng, arrays, B.targets_of(arrays), k), path)
        adapters.append(path)
    size = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors"))
    assert size > 4 << 20  # a few MB
    return tmp, base, ["--adapter", adapters[0], "--adapter", f"{adapters[1]}:-0.5"]


def test_killed_copy_merge_leaves_no_partial_output(setup):
    tmp, base, adapter_args = setup
    pristine = B.tree_digest(base)
    ref, out = tmp / "ref", tmp / "out"
    assert run(["--base", base, *adapter_args, "--out", os.fspath(ref)]) == 0
    expected = B.tree_digest(ref)
    _, full = _run(["--base", base, *adapter_args, "--out", out])
    assert B.tree_digest(out) == expected
    shutil.rmtree(out)

    previous = tmp / "previous"  # an older merge that --overwrite replaces
    assert run(["--base", base, *adapter_args[:2], "--out", os.fspath(previous)]) == 0
    older = B.tree_digest(previous)
    assert older != expected

    rng = np.random.default_rng(1)
    killed = 0
    for trial in range(COPY_TRIALS):
        replace = trial % 2 == 1
        if replace:
            shutil.copytree(previous, out)
        was_killed, _ = _run(["--base", base, *adapter_args, "--out", out, *(["--overwrite"] if replace else [])],
                             kill_after=rng.uniform(0, 1.1 * full))
        killed += was_killed
        assert B.tree_digest(base) == pristine
        if out.exists():  # OUT is the complete new merge, or (replacing) still the complete old one
            assert B.tree_digest(out) in ([expected, older] if replace else [expected])
            shutil.rmtree(out)
        else:
            assert not replace, "an interrupted --overwrite must never leave OUT missing"
    assert killed >= COPY_TRIALS // 2

    leftovers = B.siblings(out)
    assert run(["--base", base, *adapter_args, "--out", os.fspath(out)]) == 0
    assert B.siblings(out) == [] and B.tree_digest(out) == expected
    print(f"copy merge: {killed}/{COPY_TRIALS} killed, {len(leftovers)} stale siblings removed by the next merge")


def test_killed_in_place_merge_is_always_revertible(setup):
    tmp, base, adapter_args = setup
    work = tmp / "work"
    shutil.copytree(base, work)
    pristine = B.tree_digest(work)
    journal = tmp / "journal.safetensors"
    merged_digest = None

    def restore():
        for name in os.listdir(base):
            if os.path.isfile(os.path.join(base, name)):
                shutil.copyfile(os.path.join(base, name), work / name)
        if journal.exists():
            journal.unlink()

    _, full = _run(["--base", work, *adapter_args, "--in-place", "--journal", journal])
    merged_digest = B.tree_digest(work)
    assert merged_digest != pristine
    restore()

    rng = np.random.default_rng(2)
    killed = outcomes_with_journal = 0
    for _ in range(IN_PLACE_TRIALS):
        was_killed, _ = _run(["--base", work, *adapter_args, "--in-place", "--journal", journal],
                             kill_after=rng.uniform(0, 1.1 * full))
        killed += was_killed
        if journal.exists():
            outcomes_with_journal += 1
            if not was_killed:
                assert B.tree_digest(work) == merged_digest
            revert(journal)
            revert(journal)  # idempotent
        assert B.tree_digest(work) == pristine  # without a journal the base was never touched
        restore()
    assert killed >= IN_PLACE_TRIALS // 2 and outcomes_with_journal > 0
    leftovers = B.siblings(journal)
    assert run(["--base", os.fspath(work), *adapter_args, "--in-place", "--journal", os.fspath(journal)]) == 0
    assert B.siblings(journal) == []
    print(f"in place: {killed}/{IN_PLACE_TRIALS} killed, {outcomes_with_journal} left a journal, "
          f"{len(leftovers)} stale journal temporaries removed")

    # a revert killed mid-way is finished by running it again
    rng = np.random.default_rng(3)
    revert_killed = 0
    for _ in range(REVERT_TRIALS):
        restore()
        assert run(["--base", os.fspath(work), *adapter_args, "--in-place", "--journal", os.fspath(journal)]) == 0
        was_killed, _ = _run(["--revert", journal], kill_after=rng.uniform(0, 0.4))
        revert_killed += was_killed
        revert(journal)
        assert B.tree_digest(work) == pristine
    assert revert_killed > 0
