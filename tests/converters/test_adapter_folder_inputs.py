"""An adapter given as a folder is an input as a whole (SPEC 11.5, the one overwrite rule).

Found by bench/surroundings.py: the writers protected only the folder's weights file, so
`-o ADAPTER_FOLDER/neuroada_config.json --overwrite` replaced the adapter's config with the output (exit 0:
data loss), and an output inside the adapter folder was written although the rule refuses outputs that
lie inside an input."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format.converters import pack_cli
from neuroada_format.converters.merge_cli import run as merge_run
from neuroada_format.folder import CONFIG_NAME, WEIGHTS_NAME

_spec = importlib.util.spec_from_file_location("_merge_builders_afi", Path(__file__).with_name("test_merge_safetensors.py"))
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)


@pytest.fixture
def world(tmp_path):
    rng = np.random.default_rng(11)
    arrays = B.llama_arrays(rng, conv1d=False, layers=1)
    base = Path(B.write_checkpoint(tmp_path / "ck", arrays, shards=1, extras=False)) / "model.safetensors"
    adapter = B.make_adapter(rng, arrays, B.targets_of(arrays), 2)
    naf.save(adapter, tmp_path / "a.safetensors")
    folder = tmp_path / "af"
    folder.mkdir()
    naf.save(adapter, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps({"k": 2}))
    return base, tmp_path / "a.safetensors", folder


def tree(root: Path) -> dict:
    return {os.fspath(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(capsys, argv) -> tuple[int, str]:
    argv = [os.fspath(a) for a in argv]
    if argv[0] == "merge":
        code = merge_run(argv[1:])
    else:
        with pytest.raises(SystemExit) as exc:
            pack_cli.main(argv[1:])
        code = exc.value.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["merge", "combine", "repack", "to peft"])
@pytest.mark.parametrize("where", ["config", "new file inside"])
def test_no_writer_puts_its_output_into_an_adapter_folder_it_reads(world, capsys, command, where):
    base, a, folder = world
    out = folder / (CONFIG_NAME if where == "config" else "out")
    if command == "to peft" and where == "config":
        out = folder / "peft"            # a folder output: a new folder inside the input
    argv = {"merge": ["merge", "--base", base, "--adapter", folder, "--out", out],
            "combine": ["pack", "--combine", a, folder, "--base", base, "-o", out],
            "repack": ["pack", "--repack", folder, "--value-dtype", "F32", "-o", out],
            "to peft": ["pack", "--to", "peft", folder, "-o", out]}[command]
    before = tree(folder)
    code, err = run(capsys, [*argv, "--overwrite"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "input" in lines[0], (code, err)
    assert tree(folder) == before


def test_the_same_commands_still_write_beside_the_folder(world, capsys, tmp_path):
    base, a, folder = world
    for i, argv in enumerate([["merge", "--base", base, "--adapter", folder, "--out", tmp_path / "m.safetensors"],
                              ["pack", "--combine", a, folder, "--base", base, "-o", tmp_path / "c.safetensors"],
                              ["pack", "--repack", folder, "--value-dtype", "F32", "-o", tmp_path / "r.safetensors"],
                              ["pack", "--to", "peft", folder, "-o", tmp_path / "peft"]]):
        code, err = run(capsys, argv)
        assert code == 0, (i, err)
