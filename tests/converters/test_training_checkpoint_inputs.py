"""A save_pretrained / Trainer checkpoint folder handed to the tools (audit of cross-tool pipelines, 2026-12-06).

Its model.safetensors is the runtime's trainable state: the deltas, and whatever else trained (a head the user
unfroze). The tools carried the adapter and dropped the rest without a word, so a merged model kept the base's head;
given as the base (the arguments swapped) the folder was read as a checkpoint of a few tensors, one error per target.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402
from neuroada_format.runtime import NeuroAdaConfig, attach  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from tiny_hf import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    tiny_llama().save_pretrained(d / "base")
    model = attach(tiny_llama(), NeuroAdaConfig(k=2))
    model.lm_head.requires_grad_(True)  # README's stand-in for modules_to_save
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)
    model.save_pretrained(d / "ck")
    return d


def neuroada(*args):
    exe = os.path.join(os.path.dirname(sys.executable), "neuroada")
    return subprocess.run([exe, *map(os.fspath, args)], capture_output=True, text=True, timeout=300)


def test_every_reader_says_the_trained_head_is_not_carried(folders, capsys):
    d = folders
    for r in (neuroada("validate", d / "ck", "--base", d / "base"), neuroada("inspect", d / "ck")):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 0 and len(lines) == 1, r.stderr
        assert "1 trained tensor(s) that are not adapter deltas (lm_head.weight)" in lines[0]
        assert "keeps the base's values" in lines[0] and lines[0].startswith("warning: ")
    code = merge_run(["--base", os.fspath(d / "base"), "--adapter", os.fspath(d / "ck"), "--out", os.fspath(d / "m")])
    err = capsys.readouterr().err
    assert code == 0 and "(lm_head.weight)" in err and "keeps the base's values" in err
    merged = transformers.LlamaForCausalLM.from_pretrained(d / "m")
    assert torch.equal(merged.lm_head.weight, tiny_llama().lm_head.weight)  # what the warning says


def test_a_checkpoint_given_as_the_base_is_named_as_such(folders, capsys):
    d = folders
    code = merge_run(["--base", os.fspath(d / "ck"), "--adapter", os.fspath(d / "ck"), "--out", os.fspath(d / "x")])
    lines = [l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("warning: ")]
    assert code == 1 and len(lines) == 1 and "rule 1.6" in lines[0], lines  # (the adapter side still warns)
    assert "a NeuroAda training checkpoint" in lines[0] and "the other way round" in lines[0]
    assert not os.path.exists(d / "x")
    r = neuroada("validate", d / "ck", "--base", d / "ck")
    errors = [l for l in r.stderr.strip().splitlines() if l.startswith("error: ")]
    assert r.returncode != 0 and len(errors) == 1 and "training checkpoint" in errors[0], r.stderr


def test_the_checkpoints_state_file_given_as_the_adapter_says_where_the_adapter_is(folders):
    """Pointing a tool at the folder's model.safetensors (what a Hugging Face user reaches for) said only 'no
    neuroada entry: not a NeuroAda adapter'; the line now says what the file is and what to give instead."""
    d = folders
    state = d / "ck" / "model.safetensors"
    for r in (neuroada("validate", state), neuroada("inspect", state)):
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"error: {state}: rule 2.1: ") and "trainable state" in r.stderr, r.stderr
        assert "give the folder, or its neuroada_model.safetensors" in r.stderr, r.stderr
