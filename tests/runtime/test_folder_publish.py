"""A folder save (save_adapter to a folder, save_pretrained) publishes its files as one set: a process killed with
SIGKILL between two of its renames left new weights beside an old config (which load_adapter refuses, so the user's
save was lost) and now leaves a record by which the next read or save finishes the renames; two processes saving
into one folder at once take turns over every file, the trainable state included (it was written outside the lock,
so one's adapters ended up beside the other's state). The children are forked processes, killed for real."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
import torch
from safetensors import safe_open

from neuroada_format import NeuroAdaError, durable
from neuroada_format.folder import CONFIG_NAME, STATE_FILE, WEIGHTS_NAME
from neuroada_format.runtime import NeuroAdaConfig, attach, load_adapter, save_adapter
from neuroada_format.runtime.guards import layers
from tests.tiny_hf import tiny_llama, with_deltas

pytestmark = pytest.mark.skipif(os.name != "posix" or "fork" not in multiprocessing.get_all_start_methods(),
                                reason="needs fork and SIGKILL")


def _two_adapters(k: int, seed: int):
    model = with_deltas(tiny_llama(), k=k, seed=seed, target_modules=["q_proj", "v_proj"])
    attach(model, NeuroAdaConfig(k=k, target_modules=["o_proj"]), "b")
    return model


def _killed_after_renames(n: int):
    """In the child: durable.publish SIGKILLs the process after its n-th rename of a saved file (n=0: right after
    the record of the renames was published, before any of them)."""
    real, count = durable.publish, [0]

    def publish(tmp, out, **kwargs):
        real(tmp, out, **kwargs)
        if out.endswith(durable.PUBLISH_RECORD):
            if n == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    durable.publish = publish


def _in_child(target, *args) -> int:
    """Run ``target(*args)`` in a forked child; returns its exit code (-9: killed by SIGKILL)."""
    def run():
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        target(*args)
        os._exit(0)

    child = multiprocessing.get_context("fork").Process(target=run)
    child.start()
    child.join(120)
    assert not child.is_alive()
    return child.exitcode


def _values(model, name="default"):
    return {n: l.neuroada_val[name].detach().to(torch.bfloat16) for n, l in layers(model).items()
            if name in l.neuroada_val}


def _assert_holds(folder, model, name="default"):
    fresh = tiny_llama()
    load_adapter(fresh, folder, name)
    want = _values(model, name)
    assert _values(fresh, name).keys() == want.keys()
    assert all(torch.equal(_values(fresh, name)[n].float(), want[n].float()) for n in want)


@pytest.mark.parametrize("renames", [0, 1])
def test_save_adapter_killed_between_its_renames_leaves_the_new_pair(tmp_path, renames):
    folder = tmp_path / "task"
    old, new = (with_deltas(tiny_llama(), k=k, seed=s, target_modules=["q_proj"]) for k, s in ((1, 1), (2, 5)))
    save_adapter(old, folder)

    def save():
        _killed_after_renames(renames)
        save_adapter(new, folder)

    assert _in_child(save) == -signal.SIGKILL
    assert os.path.exists(folder / durable.PUBLISH_RECORD)  # what the kill left: the record, the new files whole
    _assert_holds(folder, new)  # finished by the read (refused as a mismatched pair after renames=1 before)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_a_save_after_a_killed_one_finishes_it_first_then_saves(tmp_path):
    folder = tmp_path / "task"
    old, new, newer = (with_deltas(tiny_llama(), k=k, seed=s, target_modules=["q_proj"]) for k, s in ((1, 1), (2, 5),
                                                                                                     (3, 7)))
    save_adapter(old, folder)

    def save():
        _killed_after_renames(1)
        save_adapter(new, folder)

    assert _in_child(save) == -signal.SIGKILL
    save_adapter(newer, folder)
    _assert_holds(folder, newer)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporaries left


def test_a_save_killed_while_writing_leaves_the_old_pair(tmp_path, monkeypatch):
    folder = tmp_path / "task"
    old, new = (with_deltas(tiny_llama(), k=k, seed=s, target_modules=["q_proj"]) for k, s in ((1, 1), (2, 5)))
    save_adapter(old, folder)

    def save():
        real = durable._filled_sibling

        def filled(path, write, **kw):
            tmp = real(path, write, **kw)
            if path.endswith(CONFIG_NAME):  # both temporaries written, nothing recorded or renamed yet
                os.kill(os.getpid(), signal.SIGKILL)
            return tmp

        durable._filled_sibling = filled
        save_adapter(new, folder)

    assert _in_child(save) == -signal.SIGKILL
    assert not os.path.exists(folder / durable.PUBLISH_RECORD)
    _assert_holds(folder, old)
    save_adapter(new, folder)  # the dead writer's temporaries are removed by the next save
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def _save_killed_over_an_older_one(folder, renames: int):
    """Two adapters saved with save_pretrained in `folder`, then another model's two, killed (SIGKILL, in a child)
    after `renames` of that save's renames; returns that model."""
    old, new = _two_adapters(1, 1), _two_adapters(2, 5)
    old.save_pretrained(folder)

    def save():
        _killed_after_renames(renames)
        new.save_pretrained(folder)

    assert _in_child(save) == -signal.SIGKILL
    return new


@pytest.mark.parametrize("renames", [1, 3, 4])
def test_save_pretrained_killed_between_its_renames_leaves_the_new_set(tmp_path, renames):
    """default's pair, b's pair in b/, then model.safetensors: one set, finished by reading any adapter of it."""
    folder = tmp_path / "ckpt"
    new = _save_killed_over_an_older_one(folder, renames)
    _assert_holds(folder / "b", new, "b")  # the record is in the folder above b/
    _assert_holds(folder, new)
    with safe_open(str(folder / STATE_FILE), framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.o_proj.neuroada_idx.b").shape[1] == 2  # the new state
    assert sorted(p.name for p in folder.iterdir()) == ["b", STATE_FILE, CONFIG_NAME, WEIGHTS_NAME]


def test_two_processes_saving_one_folder_never_mix_their_files(tmp_path):
    """The first pauses (up to 3 s, holding nothing but what the save holds) before publishing its trainable state;
    the second saves meanwhile. Before, the state was written outside the lock: the first's state was published over
    the second's adapters. Now the second waits for the first's whole set, and the folder is the second's."""
    folder, paused = tmp_path / "ckpt", tmp_path / "paused"
    first, second = _two_adapters(1, 1), _two_adapters(2, 5)
    folder.mkdir()

    def save_first():
        real = durable.publish

        def publish(tmp, out, **kwargs):
            if out.endswith(STATE_FILE):
                paused.touch()
                time.sleep(3)
            real(tmp, out, **kwargs)

        durable.publish = publish
        first.save_pretrained(folder)

    ctx = multiprocessing.get_context("fork")
    a = ctx.Process(target=save_first)
    a.start()
    deadline = time.monotonic() + 60
    while not paused.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert paused.exists()
    b = ctx.Process(target=second.save_pretrained, args=(folder,))
    b.start()
    a.join(60)
    b.join(60)
    assert a.exitcode == 0 and b.exitcode == 0
    with safe_open(str(folder / STATE_FILE), framework="pt") as f:
        state_k = {f.get_tensor(f"model.layers.0.self_attn.{m}.neuroada_idx.{n}").shape[1]
                   for m, n in (("q_proj", "default"), ("o_proj", "b"))}
    assert state_k == {2}  # the second's state ...
    _assert_holds(folder, second)  # ... beside the second's adapters
    _assert_holds(folder / "b", second, "b")


@pytest.mark.parametrize("case", ["symlinked sub-folder", "not a temporary", "outside", "fifo", "not json"])
def test_a_hostile_record_renames_nothing_and_is_our_error(tmp_path, case):
    """The record is read from a folder anyone may have written (a downloaded adapter) and finishing it renames files:
    a record no killed writer of ours could have left is refused, and nothing is renamed, here or elsewhere."""
    import json

    from neuroada_format import NeuroAdaError

    folder, elsewhere = tmp_path / "task", tmp_path / "elsewhere"
    model = with_deltas(tiny_llama(), k=1, seed=1, target_modules=["q_proj"])
    save_adapter(model, folder)
    elsewhere.mkdir()
    victim = elsewhere / "notes.txt"
    victim.write_text("keep me")
    mover = elsewhere / f"{durable._tmp_stem('notes.txt')}{durable.TMP_MARK}x"
    mover.write_text("attacker's")
    (folder / "link").symlink_to(elsewhere)
    record = folder / durable.PUBLISH_RECORD
    renames = {"symlinked sub-folder": [[f"link/{mover.name}", "link/notes.txt"]],
               "not a temporary": [[WEIGHTS_NAME, CONFIG_NAME]],
               "outside": [[f"../elsewhere/{mover.name}", "../elsewhere/notes.txt"]]}
    if case == "fifo":
        os.mkfifo(record)
    else:
        record.write_text("{" if case == "not json" else json.dumps({"renames": renames[case]}))
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink() and p != record}
    with pytest.raises(NeuroAdaError) as err:
        load_adapter(tiny_llama(), folder)
    assert durable.PUBLISH_RECORD in str(err.value)
    assert victim.read_text() == "keep me" and mover.read_text() == "attacker's"
    assert {p.name: p.read_bytes() for p in folder.iterdir()
            if p.is_file() and not p.is_symlink() and p != record} == before


def test_a_load_and_a_save_of_one_folder_take_turns(tmp_path, monkeypatch):
    """A load_adapter reading a folder while another process saved it (measured: 13 of 985 loads of a folder saved in
    a loop) read the old config, then the new weights, and refused the folder as a mismatched pair. Here the reader
    pauses between its two reads for as long as the save takes (at most 3 s): the save now waits for the read to
    end, and each sees a whole pair."""
    import threading

    import neuroada_format as naf

    folder = tmp_path / "task"
    old = with_deltas(tiny_llama(), k=2, target_modules=["q_proj"])
    save_adapter(old, folder)
    new = with_deltas(tiny_llama(), k=3, seed=5, target_modules=["q_proj"])
    config_read, saved, real_load = threading.Event(), threading.Event(), naf.load
    loaded, failed = [], []

    def load_after_a_pause(file, *args, **kwargs):  # the reader, after it read the config and before the weights
        config_read.set()
        saved.wait(3)
        return real_load(file, *args, **kwargs)

    def read():
        try:
            loaded.append(load_adapter(tiny_llama(), folder))
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            failed.append(exc)

    monkeypatch.setattr(naf, "load", load_after_a_pause)
    reader = threading.Thread(target=read)
    reader.start()
    assert config_read.wait(60)
    save_adapter(new, folder)
    saved.set()
    reader.join(60)
    assert failed == []
    want = _values(old)
    assert all(torch.equal(_values(loaded[0])[n].float(), want[n].float()) for n in want)
    fresh = tiny_llama()
    load_adapter(fresh, folder)
    want = _values(new)
    assert all(torch.equal(_values(fresh)[n].float(), want[n].float()) for n in want)


def test_a_load_of_a_named_adapter_does_not_deadlock_with_a_save_of_the_folder_above(tmp_path):
    """A killed save's record left in the folder above a named adapter's sub-folder, and a save holding that folder's
    lock on its way to the sub-folder's: the load finished the record only once it held the sub-folder, so each waited
    for the other. It finishes the record first now."""
    import json
    import threading

    folder = tmp_path / "ckpt"
    model = _two_adapters(2, 0)
    model.save_pretrained(folder)
    (folder / durable.PUBLISH_RECORD).write_text(json.dumps(  # its renames all made: only the record was left
        {"renames": [["b/neuroada_config.json.tmp-host-1-00", "b/neuroada_config.json"]]}))
    holding, loaded = threading.Event(), []

    def saver():  # save_pretrained's order: the folder, then its sub-folders
        with durable.checkpoint_lock(folder, exclusive=True, wait=True):
            holding.set()
            time.sleep(1)  # (the load takes the sub-folder's lock meanwhile, without the fix)
            with durable.checkpoint_lock(folder / "b", exclusive=True, wait=True):
                pass

    threading.Thread(target=saver, daemon=True).start()
    assert holding.wait(30)
    reader = threading.Thread(target=lambda: loaded.append(load_adapter(tiny_llama(), folder / "b", "b")), daemon=True)
    reader.start()
    reader.join(20)
    assert loaded and not reader.is_alive()
    assert not (folder / durable.PUBLISH_RECORD).exists()


def test_an_unreadable_record_says_what_to_do_in_an_order_that_works(tmp_path):
    """The message said "save again, then remove the record", but a save into the folder is refused for that same
    record: the advice could not be followed. Removing it first, then saving, works."""
    import json

    folder = tmp_path / "task"
    model = with_deltas(tiny_llama(), k=2, target_modules=["q_proj"])
    save_adapter(model, folder)
    record = folder / durable.PUBLISH_RECORD
    record.write_text(json.dumps({"renames": [["../x.tmp-1", "x"]]}))
    with pytest.raises(NeuroAdaError, match=r"remove \.neuroada-publish\.json .*then save again") as err:
        save_adapter(model, folder)
    assert err.value.path == str(record)
    record.unlink()
    save_adapter(model, folder)
    _assert_holds(folder, model)


@pytest.mark.parametrize("renames", [3, 4])
def test_a_save_through_a_symlinked_sub_folder_killed_between_its_renames_leaves_the_new_set(tmp_path, renames):
    """A named adapter's sub-folder that is a symbolic link (the user's, to another disk): the reader never renames
    through a link (a hostile record's move), so such sets were published unrecorded, and a kill between the renames
    left b/ with the new weights beside the old config, refused by every load. Its renames are recorded in the
    sub-folder itself now (no link in the reader's way), and reading b/ finishes them. Renames: the state's stand-in,
    default's pair, b's pair, the state; 3: default's pair in place, 4: b's weights too."""
    folder, elsewhere = tmp_path / "ckpt", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "b").symlink_to(elsewhere)
    new = _save_killed_over_an_older_one(folder, renames)
    assert (elsewhere / durable.PUBLISH_RECORD).exists() and (folder / durable.PUBLISH_RECORD).exists()
    _assert_holds(folder / "b", new, "b")
    _assert_holds(folder, new)
    assert sorted(p.name for p in elsewhere.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert sorted(p.name for p in folder.iterdir()) == ["b", STATE_FILE, CONFIG_NAME, WEIGHTS_NAME]
    new.save_pretrained(folder)  # and saves go on as before
    _assert_holds(folder / "b", new, "b")


def test_a_save_through_a_symlinked_sub_folder_interrupted_by_ctrl_c_is_finished_by_the_writer(tmp_path,
                                                                                               monkeypatch):
    """Ctrl-C between two renames: the writer finishes its recorded set itself, through the link included."""
    folder, elsewhere = tmp_path / "ckpt", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "b").symlink_to(elsewhere)
    first = _two_adapters(2, 0)
    first.save_pretrained(folder)
    real, count = durable.publish, [0]

    def interrupted(tmp, out, **kwargs):
        real(tmp, out, **kwargs)
        if not out.endswith(durable.PUBLISH_RECORD):
            count[0] += 1
            if count[0] == 4:  # (the stand-in, default's pair, b's weights)
                raise KeyboardInterrupt

    monkeypatch.setattr(durable, "publish", interrupted)
    other = _two_adapters(3, 1)
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(folder)
    monkeypatch.undo()
    assert not (folder / durable.PUBLISH_RECORD).exists() and not (elsewhere / durable.PUBLISH_RECORD).exists()
    _assert_holds(folder, other)
    _assert_holds(folder / "b", other, "b")


# -- Trainer's resume reads model.safetensors alone ----------------------------------------------------------------
def _trainer(run, model, steps, lr=1e-2):
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": r, "labels": r} for r in (torch.randint(0, 100, (8,), generator=g) for _ in range(8))]
    args = transformers.TrainingArguments(str(run), max_steps=steps, save_steps=2, learning_rate=lr,
                                          per_device_train_batch_size=2, report_to=[], use_cpu=True, seed=0,
                                          disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=data)


@pytest.mark.parametrize("renames", [1, 3])
def test_trainer_resume_from_a_checkpoint_killed_mid_save_is_refused(tmp_path, renames):
    """Trainer resumes from model.safetensors alone (load_state_dict through our hooks, no path), and a save's
    renames put that file in place last: a run killed while saving checkpoint-4 over an earlier run's checkpoint-4
    (a rerun into the same output_dir) resumed from the earlier run's state beside this run's adapter files, without a
    word. While a save is pending the file is a stand-in now, which the hook refuses, saying what to do; the folder's
    own readers finish the save. 1: only the stand-in in place; 3: default's pair too."""
    from neuroada_format import NeuroAdaError as Refused

    run = tmp_path / "run"
    _trainer(run, attach(tiny_llama(), NeuroAdaConfig(k=2)), 4).train()  # the earlier run: checkpoint-2, -4

    def rerun_killed_while_saving_checkpoint_4():
        _killed_after_renames(renames)
        _trainer(run, attach(tiny_llama(), NeuroAdaConfig(k=2)), 4, lr=5e-2).train(
            resume_from_checkpoint=str(run / "checkpoint-2"))

    assert _in_child(rerun_killed_while_saving_checkpoint_4) == -signal.SIGKILL
    ck = run / "checkpoint-4"
    assert (ck / durable.PUBLISH_RECORD).exists()
    model = attach(tiny_llama(), NeuroAdaConfig(k=2))
    before = {n: l.neuroada_val["default"].clone() for n, l in layers(model).items()}
    with pytest.raises(Refused, match="killed before its files were all in place") as err:
        _trainer(run, model, 6).train(resume_from_checkpoint=str(ck))
    assert "Resume from an earlier checkpoint" in str(err.value) and "\n" not in str(err.value)
    assert all(torch.equal(l.neuroada_val["default"], before[n]) for n, l in layers(model).items())
    _trainer(run, attach(tiny_llama(), NeuroAdaConfig(k=2)), 6).train(resume_from_checkpoint=str(run / "checkpoint-2"))
    fresh = tiny_llama()
    load_adapter(fresh, ck)  # finishes the save: the rerun's adapter, and its state beside it
    assert not (ck / durable.PUBLISH_RECORD).exists()
    with safe_open(str(ck / STATE_FILE), framework="pt") as f:
        for n, layer in layers(fresh).items():
            assert torch.equal(f.get_tensor(f"{n}.neuroada_val.default").to(torch.bfloat16),
                               layer.neuroada_val["default"].to(torch.bfloat16))


# -- a folder this process may not write ---------------------------------------------------------------------------
def _read_without_write_access(folder, read):
    """``read()`` in a forked child that may not write ``folder`` (a shared model store): as root, where chmod does
    not bite, the child drops to nobody's uid (the folder's ancestors are searchable, see _store); otherwise the
    folder is made read-only for the read. Returns ("ok", what read returned) or ("error", type name, message)."""
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()

    def child():
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            child_end.send(("ok", read()))
        except BaseException as exc:  # noqa: BLE001 - sent back whole, for the assertions
            child_end.send(("error", type(exc).__name__, str(exc)))
        os._exit(0)

    modes = {}
    if os.geteuid() != 0:
        for p in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
            modes[p] = p.stat().st_mode
            p.chmod(0o555)
    try:
        proc = ctx.Process(target=child)
        proc.start()
        got = parent_end.recv() if parent_end.poll(120) else ("timeout",)
        proc.join(30)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    return got


@pytest.fixture
def _store():
    """A folder outside pytest's 0700 base folder, so that nobody's uid can search its way to it."""
    import shutil
    import tempfile

    top = tempfile.mkdtemp(prefix="neuroada-store-")
    os.chmod(top, 0o755)
    try:
        yield __import__("pathlib").Path(top)
    finally:
        shutil.rmtree(top)


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_read_only_folder_whose_save_was_killed_after_its_renames_reads_as_saved(_store):
    """A save killed after its last rename, before it removed its record: the folder holds the new set whole, but
    finishing meant removing the record, which a reader without write access cannot, so the folder was refused. It
    is read as it is now, and the record stays for a writer."""
    folder = _store / "task"
    old, new = (with_deltas(tiny_llama(), k=k, seed=s, target_modules=["q_proj"]) for k, s in ((1, 1), (2, 5)))
    save_adapter(old, folder)

    def save():
        _killed_after_renames(2)  # both files in place
        save_adapter(new, folder)

    assert _in_child(save) == -signal.SIGKILL
    before = _files(folder)
    want = {n: v.float() for n, v in _values(new).items()}

    def read():
        fresh = tiny_llama()
        load_adapter(fresh, folder)
        return all(torch.equal(_values(fresh)[n].float(), want[n]) for n in want)

    assert _read_without_write_access(folder, read) == ("ok", True)
    assert _files(folder) == before  # the record included: nothing was changed


def test_a_read_only_folder_whose_save_was_killed_between_its_renames_is_refused_in_one_line(_store):
    """Renames left to make: the folder holds new weights beside the old config, and only a writer can finish them:
    every reader (load_adapter, the CLIs) refuses with our one-line error, never a PermissionError, and changes
    nothing."""
    from click.testing import CliRunner

    from neuroada_format.cli import main as neuroada

    folder = _store / "task"
    old, new = (with_deltas(tiny_llama(), k=k, seed=s, target_modules=["q_proj"]) for k, s in ((1, 1), (2, 5)))
    save_adapter(old, folder)

    def save():
        _killed_after_renames(1)  # the weights in place, not the config
        save_adapter(new, folder)

    assert _in_child(save) == -signal.SIGKILL
    before = _files(folder)
    got = _read_without_write_access(folder, lambda: load_adapter(tiny_llama(), folder) and None)
    assert got[:2] == ("error", "NeuroAdaError"), got
    assert "needs write access" in got[2] and "nothing was read" in got[2] and "\n" not in got[2]

    def cli():
        result = CliRunner().invoke(neuroada, ["validate", str(folder)])
        return result.exit_code, result.output, repr(result.exception)

    code, output, exc = _read_without_write_access(folder, cli)[1]
    assert code not in (0, None) and "needs write access" in output and len(output.strip().splitlines()) == 1, \
        (code, output, exc)
    assert "Traceback" not in output and "PermissionError" not in output
    assert _files(folder) == before
    _assert_holds(folder, new)  # a writer finishes it


def test_load_trained_extras_of_a_folder_whose_save_was_killed_reads_the_saved_head(tmp_path):
    """load_trained_extras read model.safetensors with no lock and no record finished: after a save killed between
    its renames it read the state of the save before (or now the stand-in, which holds no head: nothing loaded, no
    word). It reads under reading_folder now, which finishes the save first."""
    from neuroada_format.runtime import load_trained_extras

    folder = tmp_path / "ckpt"

    def with_head(seed):
        model = with_deltas(tiny_llama(), k=1, seed=seed, target_modules=["q_proj"])
        model.lm_head.weight.requires_grad_(True)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=g))
        return model

    old, new = with_head(1), with_head(2)
    old.save_pretrained(folder)

    def save():
        _killed_after_renames(3)  # the stand-in and default's pair in place, not the state
        new.save_pretrained(folder)

    assert _in_child(save) == -signal.SIGKILL
    fresh = tiny_llama()
    assert load_trained_extras(fresh, folder) == ["lm_head.weight"]
    assert torch.equal(fresh.lm_head.weight, new.lm_head.weight)
