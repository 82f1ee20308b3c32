"""The format core and the `neuroada` CLI against hostile *surroundings* rather than hostile bytes.

FIFOs, character devices, sockets, directories and symlinks where files are expected; JSON at the
limits of the one parser (depth, number size) in every place JSON is read; tensor dtypes that are
not strings; names that carry newlines and terminal escapes. Every case must end in our own error
(NeuroAdaUsageError for a path that cannot be used, NeuroAdaError naming the rule for bad content),
one line, the right exit code, and never a hang: in-process cases run under a SIGALRM deadline, CLI
cases in real subprocesses with a timeout (a FIFO that is opened would block them for ever).
"""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format import safe_io
from neuroada_format.base import model_config
from neuroada_format.errors import exit_code, printable
from neuroada_format.folder import adapter_paths, read_config
from neuroada_format.jsonparse import MAX_DEPTH, read_json, strict_json

from deadline import deadline  # tests/deadline.py

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX special files")

UP = "model.layers.0.mlp.up_proj.weight"


def refused(call, kind=NeuroAdaError, rule=None, contains=None):
    """call() raises exactly our error of `kind` (usage errors are NeuroAdaErrors too), without hanging."""
    with deadline(10), pytest.raises(NeuroAdaError) as info:
        call()
    err = info.value
    assert isinstance(err, kind), (type(err), err)
    if kind is NeuroAdaError:
        assert not isinstance(err, NeuroAdaUsageError), err
    if rule is not None:
        assert err.rule == rule, err
    if contains is not None:
        assert contains in str(err), err
    assert "\n" not in str(err) and "\x1b" not in str(err)
    return err


# -- fixtures: real files and special files ------------------------------------------------------------
@pytest.fixture
def world(tmp_path, small_model, craft):
    arrays, adapter = small_model
    w = {"dir": tmp_path}
    w["base"] = craft.base(tmp_path / "base", arrays)
    w["sharded"] = craft.base(tmp_path / "sharded", arrays, shards=2)
    w["good"] = os.fspath(tmp_path / "good.safetensors")
    naf.save(adapter, w["good"])
    w["fifo"] = os.fspath(tmp_path / "fifo.safetensors")
    os.mkfifo(w["fifo"])
    w["socket"] = os.fspath(tmp_path / "sock.safetensors")
    s = socket.socket(socket.AF_UNIX)
    s.bind(w["socket"])
    w["_socket"] = s
    w["to_fifo"] = os.fspath(tmp_path / "link-to-fifo.safetensors")
    os.symlink(w["fifo"], w["to_fifo"])
    w["dangling"] = os.fspath(tmp_path / "dangling.safetensors")
    os.symlink(tmp_path / "nowhere", w["dangling"])
    w["to_good"] = os.fspath(tmp_path / "link-to-good.safetensors")
    os.symlink(w["good"], w["to_good"])
    yield w
    s.close()


def replace_with_fifo(path):
    os.unlink(path)
    os.mkfifo(path)


SPECIAL = ["fifo", "socket", "to_fifo", "/dev/zero", "/dev/null"]


def special(world, which):
    return world.get(which, which)


# -- item 5: nothing that is not a regular file is opened, let alone read ---------------------------------
@pytest.mark.parametrize("which", SPECIAL)
def test_special_file_as_adapter_is_refused_everywhere(world, which):
    path = special(world, which)
    for call in (lambda: naf.load(path), lambda: naf.validate(path), lambda: adapter_paths(path),
                 lambda: safe_io.open_regular(path), lambda: read_json(path, rule="1.6")):
        refused(call, NeuroAdaUsageError, contains="not a regular file")
    assert exit_code(refused(lambda: naf.load(path), NeuroAdaUsageError)) == 2


@pytest.mark.parametrize("which", SPECIAL)
def test_special_file_as_base_is_refused(world, which):
    path = special(world, which)
    refused(lambda: naf.open_base(path), NeuroAdaUsageError, rule="1.1", contains="not a regular file")
    refused(lambda: naf.validate(world["good"], base=path), NeuroAdaUsageError)


@pytest.mark.parametrize("name", ["model.safetensors", "model-00001-of-00002.safetensors",
                                  "model-00002-of-00002.safetensors", "model.safetensors.index.json"])
def test_fifo_inside_a_base_folder(world, name):
    folder = world["sharded"] if name.startswith("model-") or name.endswith(".json") else world["base"]
    replace_with_fifo(os.path.join(folder, name))
    refused(lambda: naf.open_base(folder), NeuroAdaUsageError, contains="FIFO")
    refused(lambda: naf.validate(world["good"], base=folder), NeuroAdaUsageError)


def test_fifo_config_json_beside_a_base(world):
    assert model_config(world["base"]) is None  # no config.json: nothing to read
    os.mkfifo(os.path.join(world["base"], "config.json"))
    refused(lambda: model_config(world["base"]), NeuroAdaUsageError, contains="FIFO")
    refused(lambda: model_config(os.path.join(world["base"], "model.safetensors")), NeuroAdaUsageError)
    assert model_config(naf.ArrayBase({})) is None


@pytest.mark.parametrize("layout", ["own", "legacy"])
@pytest.mark.parametrize("fifo", ["weights", "config"])
def test_fifo_inside_an_adapter_folder(world, tmp_path, layout, fifo):
    folder = tmp_path / f"adapter-{layout}-{fifo}"
    folder.mkdir()
    weights = folder / ("neuroada_model.safetensors" if layout == "own" else "adapter_model.safetensors")
    config = folder / ("neuroada_config.json" if layout == "own" else "adapter_config.json")
    if fifo == "weights":
        os.mkfifo(weights)
        config.write_text(json.dumps({"peft_type": "NEUROADA"}))
    else:
        os.link(world["good"], weights)
        os.mkfifo(config)
    refused(lambda: adapter_paths(folder), NeuroAdaUsageError, contains="FIFO")
    if fifo == "config":
        refused(lambda: read_config(config), NeuroAdaUsageError, contains="FIFO")


def test_a_swap_between_check_and_open_is_caught_on_the_descriptor(world, monkeypatch):
    """Simulate a path that was a regular file when stat'ed and a FIFO when opened: the open must
    not block (O_NONBLOCK) and the descriptor check must refuse it."""
    monkeypatch.setattr(safe_io, "check_regular", lambda path, rule="1.1": None)
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    err = refused(lambda: safe_io.open_regular(world["fifo"]), NeuroAdaUsageError, contains="changed while")
    assert "FIFO" in str(err)
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before  # the descriptor was closed


def test_regular_files_behind_symlinks_are_read(world, tmp_path):
    assert naf.load(world["to_good"]).targets
    assert naf.validate(world["to_good"], base=world["base"]).ok
    linked_base = tmp_path / "linked-base"
    os.symlink(world["sharded"], linked_base)
    assert naf.validate(world["good"], base=linked_base).ok
    folder = tmp_path / "adapter"
    folder.mkdir()
    os.symlink(world["good"], folder / "neuroada_model.safetensors")
    linked_folder = tmp_path / "linked-adapter"
    os.symlink(folder, linked_folder)
    assert adapter_paths(linked_folder) == (os.fspath(linked_folder / "neuroada_model.safetensors"), None)
    with safe_io.open_regular(world["to_good"]) as f:
        assert os.get_blocking(f.fileno())  # O_NONBLOCK was cleared again
        assert f.read(8)


def test_dangling_symlink_and_directories(world, tmp_path):
    refused(lambda: naf.load(world["dangling"]), NeuroAdaUsageError, contains="no such file")
    refused(lambda: naf.open_base(world["dangling"]), NeuroAdaUsageError)
    refused(lambda: adapter_paths(world["dangling"]), NeuroAdaUsageError)
    refused(lambda: naf.load(tmp_path), NeuroAdaUsageError, contains="directory")
    refused(lambda: adapter_paths(tmp_path), NeuroAdaUsageError, contains="not an adapter folder")


def test_unreadable_file_is_a_usage_error(world):
    if os.geteuid() != 0:
        os.chmod(world["good"], 0)
        refused(lambda: naf.load(world["good"]), NeuroAdaUsageError, contains="Permission denied")
        return
    # root reads every file: the check runs in a forked child that gives root up (the test machines run as root;
    # the interpreter is already loaded there, which the other user could not start from root's own folders)
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="neuroada-unreadable-")
    try:
        os.chmod(folder, 0o755)  # the folder is open to the other user; the file is not
        path = os.path.join(folder, "good.safetensors")
        shutil.copy(world["good"], path)
        os.chmod(path, 0)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                os.close(read)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    naf.load(path)
                    said = "loaded"
                except NeuroAdaUsageError as exc:
                    said = f"usage: {exc}"
                except BaseException as exc:  # noqa: BLE001 - reported to the parent
                    said = f"other: {type(exc).__name__}: {exc}"
                os.write(write, said.encode("utf-8", "replace"))
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            said = f.read().decode()
        os.waitpid(pid, 0)
        assert said.startswith("usage: ") and "Permission denied" in said and path in said, said
    finally:
        shutil.rmtree(folder)


# -- item 6: a dtype that is not a string ----------------------------------------------------------------
BAD_DTYPES = [["I16"], {}, {"a": 1}, 16, None, True, 1.5]


def _with_dtype(craft, small_model, dtype):
    _, adapter = small_model
    t = adapter.targets[UP]
    raw = craft.adapter({UP: {"indices": np.asarray(t.indices), "values": np.asarray(t.values),
                              "shape": t.shape, "probe": t.probe}})
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["indices/" + UP]["dtype"] = dtype
    return craft.raw(header, raw[8 + n:])


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=repr)
def test_non_string_dtype_is_rule_1_3_everywhere(craft, small_model, raw_file, dtype):
    path = raw_file(_with_dtype(craft, small_model, dtype))
    refused(lambda: naf.load(path), NeuroAdaError, rule="1.3", contains="not a string")
    report = naf.validate(path)
    assert [p["rule"] for p in report.errors] == ["1.3"]
    refused(lambda: naf.open_base(path), NeuroAdaError, rule="1.3")  # as a base file (unknown dtypes allowed)


# -- item 7: one parser, one set of limits, for every entry point ------------------------------------------
def _nested(depth: int, leaf="1") -> str:
    return "[" * depth + leaf + "]" * depth


def _adapter_with_extra(craft, small_model, raw_text: str) -> bytes:
    """An adapter whose metadata document has one unknown top-level member with this raw JSON value."""
    _, adapter = small_model
    doc = json.dumps(adapter.document())
    meta = doc[:-1] + ', "x_unknown": ' + raw_text + "}"
    targets = {}
    for name, t in adapter.targets.items():
        targets[name] = {"indices": np.asarray(t.indices), "values": np.asarray(t.values), "shape": t.shape,
                         "probe": t.probe}
    return craft.adapter(targets, metadata={"neuroada": meta})


ACCEPTED = [_nested(MAX_DEPTH - 1), "1e308", "-0.0", "9" * 4300, "-" + "9" * 4300, '"' + "9" * 5000 + '"',
            '{"a": [1, {"b": null}]}']
REFUSED = [_nested(MAX_DEPTH), _nested(600), _nested(900), _nested(100_000), "1e999", "-1e999",
           "9" * 4301, "-" + "9" * 4301, "[NaN]", '{"a": 1, "a": 2}']


@pytest.mark.parametrize("text", ACCEPTED + REFUSED, ids=lambda t: t[:12] + f"..{len(t)}")
def test_validate_and_load_and_rewrite_agree(craft, small_model, raw_file, tmp_path, text):
    """A file is valid to `validate` exactly when `load` reads it and a re-save (what merge, pack and
    load_adapter do with the document) succeeds; refused files give rule 2.2 in both."""
    path = raw_file(_adapter_with_extra(craft, small_model, text))
    with deadline(10):
        report = naf.validate(path)
    if text in ACCEPTED:
        assert report.ok, report.problems
        adapter = naf.load(path)
        out = os.fspath(tmp_path / "again.safetensors")
        naf.save(adapter, out)  # deep copy + serialise + parse again
        assert naf.validate(out).ok and naf.load(out).extra["x_unknown"] == json.loads(text)
    else:
        assert [p["rule"] for p in report.errors] == ["2.2"], report.problems
        refused(lambda: naf.load(path), NeuroAdaError, rule="2.2")


@pytest.mark.parametrize("text", REFUSED, ids=lambda t: t[:12] + f"..{len(t)}")
def test_every_json_file_goes_through_the_same_limits(world, tmp_path, text):
    member = '{"x": ' + text + "}"  # (an object around the text: the depth counts it)
    with pytest.raises(ValueError):
        strict_json(member)
    # a checkpoint index, an adapter folder's configs, a base's config.json
    index = os.path.join(world["sharded"], "model.safetensors.index.json")
    with open(index, "w") as f:
        f.write('{"weight_map": {}, "x": ' + text + "}")
    refused(lambda: naf.open_base(world["sharded"]), NeuroAdaError, rule="1.6")
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text('{"peft_type": "NEUROADA", "x": ' + text + "}")
    refused(lambda: read_config(cfg), NeuroAdaError)
    refused(lambda: adapter_paths(tmp_path), NeuroAdaError)  # the legacy layout reads adapter_config.json
    with open(os.path.join(world["base"], "config.json"), "w") as f:
        f.write('{"model_type": "gpt2", "deep": ' + text + "}")
    refused(lambda: model_config(world["base"]), NeuroAdaError, rule="1.6")


def test_json_limits_accept_what_real_configs_hold(world):
    with open(os.path.join(world["base"], "config.json"), "w") as f:
        json.dump({"model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 4.0},
                   "quantization_config": {"config_groups": {"g": {"weights": {"num_bits": 4}}}}}, f)
    assert model_config(world["base"])["model_type"] == "llama"
    assert strict_json(b'{"a": "\\u00e9"}') == {"a": "\u00e9"}
    with pytest.raises(ValueError):
        strict_json(b"\xff{}")  # not UTF-8


def test_header_size_and_huge_lists_are_cheap_and_messages_short(craft, raw_file):
    header = {"t": {"dtype": "F32", "shape": list(range(-1, 300_000)), "data_offsets": [0, 4]}}
    path = raw_file(craft.raw(header, b"\0" * 4))
    err = refused(lambda: naf.load(path), NeuroAdaError, rule="1.3")
    assert len(str(err)) < 400
    big = raw_file(craft.raw({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4,
                             header_len=100_000_001))
    refused(lambda: naf.load(big), NeuroAdaError, rule="1.1")


# -- item 12: file-derived text is escaped before it is printed --------------------------------------------
FORGED = "w\nerror: forged.safetensors: rule 9.9: \x1b[2J\x1b]0;owned\x07\u202eevil\x9b31m"


def test_printable_escapes_exactly_the_spec_list():
    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable("\x00\x1b\x7f\x80\x9f") == "\\x00\\x1b\\x7f\\x80\\x9f"
    assert printable("\u061c\u200e\u200f\u202a\u202e\u2066\u2069\u2028\u2029\ud800") == \
        "\\u061c\\u200e\\u200f\\u202a\\u202e\\u2066\\u2069\\u2028\\u2029\\ud800"
    kept = "plain/name.weight é 漢字 \\ \u00a0 \U0001f600"
    assert printable(kept) == kept
    for code in range(0x110000):  # exactly the list of spec section 11.1, nothing more
        ch = chr(code)
        out = printable(ch)
        if _listed(code):
            assert out != ch and out.isascii() and out.isprintable() and out.startswith("\\"), hex(code)
        else:
            assert out == ch, hex(code)


def _listed(code):
    return (code < 0x20 or 0x7f <= code <= 0x9f or code in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029)
            or 0x202A <= code <= 0x202E or 0x2066 <= code <= 0x2069 or 0xD800 <= code <= 0xDFFF)


def test_error_messages_are_escaped(tmp_path):
    err = NeuroAdaError(FORGED, path=os.fspath(tmp_path / "a\nb"), tensor=FORGED, rule="1.1")
    text = str(err)
    assert "\n" not in text and "\x1b" not in text and "\u202e" not in text and "\x9b" not in text
    assert "w\\nerror: forged" in text


# -- the `neuroada` CLI as a real process ------------------------------------------------------------------
def _script():
    path = os.path.join(os.path.dirname(sys.executable), "neuroada")
    return [path] if os.path.exists(path) else [sys.executable, "-m", "neuroada_format.cli"]


def cli(*args, timeout=300):  # generous: a loaded machine is slow; a hang is for ever
    r = subprocess.run([*_script(), *map(os.fspath, args)], capture_output=True, text=True, timeout=timeout,
                       errors="surrogateescape")
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert "\x1b" not in r.stderr + r.stdout
    return r


def one_error_line(r):
    lines = r.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["validate", "inspect"])
@pytest.mark.parametrize("which", SPECIAL + ["dangling"])
def test_cli_special_files_exit_2_without_hanging(world, command, which):
    r = cli(command, special(world, which))
    assert r.returncode == 2 and r.stdout == ""
    assert "rule 1.1" in one_error_line(r)


@pytest.mark.parametrize("which", ["fifo", "/dev/zero", "socket"])
def test_cli_special_base_exits_2(world, which):
    r = cli("validate", world["good"], "--base", special(world, which))
    assert r.returncode == 2 and "not a regular file" in one_error_line(r)


def test_cli_fifo_shard_and_fifo_adapter_folder(world, tmp_path):
    replace_with_fifo(os.path.join(world["sharded"], "model-00002-of-00002.safetensors"))
    r = cli("validate", world["good"], "--base", world["sharded"])
    assert r.returncode == 2 and "FIFO" in one_error_line(r)
    folder = tmp_path / "ad"
    folder.mkdir()
    os.mkfifo(folder / "neuroada_model.safetensors")
    for command in ("validate", "inspect"):
        r = cli(command, folder)
        assert r.returncode == 2 and "FIFO" in one_error_line(r)


def test_cli_accepts_adapter_folders(world, tmp_path, small_model):
    _, adapter = small_model
    folder = tmp_path / "saved"
    folder.mkdir()
    naf.save(adapter, folder / "neuroada_model.safetensors")
    (folder / "neuroada_config.json").write_text(json.dumps({"k": 3}))
    r = cli("validate", folder, "--base", world["base"])
    assert r.returncode == 0 and r.stdout.startswith("valid: ") and "neuroada_model.safetensors" in r.stdout
    r = cli("inspect", folder)
    assert r.returncode == 0 and "3 targets" in r.stdout
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    naf.save(adapter, legacy / "adapter_model.safetensors")
    (legacy / "adapter_config.json").write_text(json.dumps({"peft_type": "NEUROADA"}))
    assert cli("validate", legacy).returncode == 0
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    r = cli("inspect", tmp_path / "lora")  # a LoRA does not convert (it used to be told to use --from-peft, which refused)
    line = one_error_line(r)
    assert r.returncode == 2 and "--from-peft" not in line and "only Super-Tuning adapters convert" in line
    assert "neuroada-pack --base BASE --finetuned MERGED" in line
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "adapter_config.json").write_text(json.dumps({"peft_type": "SUPERTUNING"}))
    r = cli("inspect", tmp_path / "st")
    assert r.returncode == 2 and "convert it with `neuroada-pack --from-peft`" in one_error_line(r)
    r = cli("validate", tmp_path / "nothing-here")
    assert r.returncode == 2 and "rule 1.1" in one_error_line(r)


@pytest.mark.parametrize("dtype", [["I16"], {}], ids=repr)
def test_cli_non_string_dtype_exits_1(craft, small_model, raw_file, dtype):
    path = raw_file(_with_dtype(craft, small_model, dtype))
    for command in ("validate", "inspect"):
        r = cli(command, path)
        assert r.returncode == 1 and "rule 1.3" in one_error_line(r)
    r = cli("validate", "--json", path)
    assert r.returncode == 1 and json.loads(r.stdout)["problems"][0]["rule"] == "1.3"


@pytest.mark.parametrize("text", [_nested(700), "1e999"], ids=["deep", "inf"])
def test_cli_refuses_what_load_refuses(craft, small_model, raw_file, text):
    path = raw_file(_adapter_with_extra(craft, small_model, text))
    for command in ("validate", "inspect"):
        r = cli(command, path)
        assert r.returncode == 1 and "rule 2.2" in one_error_line(r)


def test_cli_base_with_deep_or_broken_index_exits_1(world):
    with open(os.path.join(world["sharded"], "model.safetensors.index.json"), "w") as f:
        f.write(_nested(100_000))
    r = cli("validate", world["good"], "--base", world["sharded"])
    assert r.returncode == 1 and "rule 1.6" in one_error_line(r)


def _forged_adapter(craft, small_model):
    _, adapter = small_model
    t = adapter.targets[UP]
    return craft.adapter({FORGED: {"indices": np.asarray(t.indices), "values": np.asarray(t.values),
                                   "shape": t.shape, "probe": t.probe}},
                         doc_overrides={"base": {"name": "n\x1b[2J", "revision": "r\nerror: x",
                                                 "structure_hash": None}})


def test_cli_escapes_forged_names(world, craft, small_model, raw_file):
    path = raw_file(_forged_adapter(craft, small_model), name="ev\x1b[0mil\n.safetensors")
    r = cli("validate", path, "--base", world["base"])  # the target is not in the base: rule 4.1
    assert r.returncode == 1
    line = one_error_line(r)
    assert "rule 4.1" in line and "w\\nerror: forged" in line and "\\x1b[2J" in line and "\\u202e" in line
    r = cli("inspect", path)
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.strip("\n").split("\n")
    assert len(lines) == 5  # summary, base, selection, table header, one target row
    assert "/ev\\x1b[0mil\\n.safetensors: NeuroAda" in lines[0] and "n\\x1b[2J @ r\\nerror: x" in lines[1]
    assert not any(line.startswith("error") for line in lines)
    r = cli("inspect", "--json", path)
    assert json.loads(r.stdout)["targets"][0]["name"] == FORGED  # JSON escapes by itself


def test_cli_internal_error_is_one_line(world, monkeypatch):
    """The catch-all: whatever goes wrong inside, one line and exit 2, never a traceback."""
    from click.testing import CliRunner

    from neuroada_format import cli as cli_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli_module, "validate", broken)
    r = CliRunner().invoke(cli_module.main, ["validate", world["good"]])
    assert r.exit_code == 2 and r.stdout == ""
    assert one_error_line(r).startswith("error: internal error: RuntimeError: boom second line")
    r = CliRunner().invoke(cli_module.main, ["validate", world["good"], "--no-such-option"])
    assert r.exit_code == 2 and "no-such-option" in one_error_line(r)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "validate", interrupted)
    r = CliRunner().invoke(cli_module.main, ["validate", world["good"]])
    assert r.exit_code == 130 and "interrupted" in r.stderr and "Traceback" not in r.output
    r = CliRunner().invoke(cli_module.main, [])
    assert r.exit_code == 2 and "Usage: " in r.stderr  # bare `neuroada`: click's help, as click shows it


def test_fifo_made_by_mode_bits_is_still_refused(tmp_path):
    """mknod with S_IFIFO (another way to make one) goes the same way."""
    path = tmp_path / "made.safetensors"
    os.mknod(path, stat.S_IFIFO | 0o600)
    refused(lambda: naf.load(path), NeuroAdaUsageError, contains="FIFO")


def test_json_files_are_size_capped_before_reading(tmp_path):
    huge = tmp_path / "adapter_config.json"
    with open(huge, "wb") as f:
        f.truncate(4 << 30)  # 4 GiB, sparse: refused from its size, nothing is read
    refused(lambda: read_config(huge), NeuroAdaError, contains="larger than")
    if os.path.exists("/proc/self/status"):  # a pseudo-file reports 0 bytes: read as empty, never blocks
        refused(lambda: read_json("/proc/self/status", rule="1.6"), NeuroAdaError, rule="1.6")


def _tool(name):
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        pytest.skip(f"{name} is not installed")
    return path


@pytest.mark.parametrize("case", ["deep", "inf", "dtype", "fifo"])
def test_every_tool_refuses_alike(world, craft, small_model, raw_file, tmp_path, case):
    """Item 7's promise across processes: `neuroada validate`, `neuroada-merge` and `neuroada-pack`
    give the same line and the same exit code for the same hostile adapter (one parser, one reader)."""
    if case == "fifo":
        path, code = world["fifo"], 2
    elif case == "dtype":
        path, code = raw_file(_with_dtype(craft, small_model, ["I16"])), 1
    else:
        path, code = raw_file(_adapter_with_extra(craft, small_model, _nested(700) if case == "deep" else "1e999")), 1
    lines = set()
    for argv in ([*_script(), "validate", path],
                 [_tool("neuroada-merge"), "--base", world["base"], "--adapter", path, "--out", tmp_path / "m"],
                 [_tool("neuroada-pack"), "--combine", path, "--base", world["base"], "-o", tmp_path / "c.safetensors"]):
        r = subprocess.run(list(map(os.fspath, argv)), capture_output=True, text=True, timeout=300)
        assert r.returncode == code and "Traceback" not in r.stderr, (argv[0], r.stderr)
        lines.add(one_error_line(r))
    assert len(lines) == 1, lines
    assert not os.path.exists(tmp_path / "m") and not os.path.exists(tmp_path / "c.safetensors")
