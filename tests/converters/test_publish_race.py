"""Two `neuroada-pack` runs writing one new -o at once (found by bench/surroundings.py): both passed the
overwrite check before either had written, and the adapter writer then renamed over whatever was there, so
both exited 0 and one output silently replaced the other. Without --overwrite the rename now never replaces
(SPEC 11.5: an existing OUT is replaced only with --overwrite), so the later run is refused."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format.converters import pack, pack_cli

_spec = importlib.util.spec_from_file_location("_merge_builders_race", Path(__file__).with_name("test_merge_safetensors.py"))
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_appears_during_the_run_is_replaced_only_with_overwrite(tmp_path, capsys, monkeypatch,
                                                                                 overwrite):
    rng = np.random.default_rng(2)
    arrays = B.llama_arrays(rng, conv1d=False, layers=1)
    naf.save(B.make_adapter(rng, arrays, B.targets_of(arrays), 2), tmp_path / "a.safetensors")
    out = tmp_path / "r.safetensors"
    real = pack.repack

    def other_writer_meanwhile(*args, **kwargs):   # the check has passed; another run publishes first
        out.write_bytes(b"the other run's output")
        return real(*args, **kwargs)

    monkeypatch.setattr(pack, "repack", other_writer_meanwhile)
    with pytest.raises(SystemExit) as exc:
        pack_cli.main(["--repack", os.fspath(tmp_path / "a.safetensors"), "--value-dtype", "F32", "-o", os.fspath(out),
                       *(["--overwrite"] if overwrite else [])])
    err = capsys.readouterr().err
    if overwrite:
        assert exc.value.code == 0, err
        assert naf.validate(out).ok
    else:
        assert exc.value.code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1, err
        assert out.read_bytes() == b"the other run's output"
    assert B.siblings(out) == []


@pytest.mark.parametrize("cli", ["neuroada-merge", "neuroada-pack --to peft", "neuroada inspect"])
def test_a_cli_reading_an_adapter_folder_and_a_save_of_it_take_turns(tmp_path, cli):
    """Two processes: a CLI reading an adapter folder (paused, up to 3 s, after it resolved the folder and read its
    config, before it reads the weights) and a save_adapter of that folder. The CLIs took no lock, so the save went
    ahead and the CLI read the next save's weights under the config it had checked. They take the shared lock the
    runtime's readers take now: the save waits for the read, which reads the adapter it resolved."""
    import multiprocessing
    import time

    pytest.importorskip("transformers")
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    from neuroada_format import cli as neuroada_cli
    from neuroada_format.converters import backend, merge_cli, peft_interop
    from neuroada_format.runtime import load_adapter, save_adapter
    from neuroada_format.runtime.guards import layers
    from tests.tiny_hf import tiny_llama, with_deltas

    folder, base, out = tmp_path / "task", tmp_path / "base", tmp_path / "out"
    tiny_llama().save_pretrained(base)
    save_adapter(with_deltas(tiny_llama(), k=2, target_modules=["q_proj"]), folder)
    new = with_deltas(tiny_llama(), k=3, seed=5, target_modules=["q_proj"])
    paused, saved, seen = tmp_path / "paused", tmp_path / "saved", tmp_path / "seen"
    module, run, argv = {
        "neuroada-merge": (backend, merge_cli.main, ["--base", str(base), "--adapter", str(folder), "--out", str(out)]),
        "neuroada-pack --to peft": (peft_interop, pack_cli.main, ["--to", "peft", str(folder), "-o", str(out)]),
        "neuroada inspect": (neuroada_cli, neuroada_cli.main.main, ["inspect", str(folder)]),
    }[cli]

    def reader():
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        real = module.load

        def load(file, *args, **kwargs):
            paused.touch()
            deadline = time.monotonic() + 3
            while not saved.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            adapter = real(file, *args, **kwargs)
            seen.write_text(str(sorted({t.k for t in adapter.targets.values()})))
            return adapter

        module.load = load
        try:
            run(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code
        os._exit(code if isinstance(code, int) else 1)

    child = multiprocessing.get_context("fork").Process(target=reader)
    child.start()
    deadline = time.monotonic() + 60
    while not paused.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert paused.exists()
    save_adapter(new, folder)  # this process: waits for the reader's lock
    saved.touch()
    child.join(60)
    assert child.exitcode == 0
    assert seen.read_text() == "[2]"  # the adapter it had resolved, not the save's (k=3)
    fresh = tiny_llama()
    load_adapter(fresh, folder)
    assert {int(layer.neuroada_idx["default"].shape[1]) for layer in layers(fresh).values()} == {3}
