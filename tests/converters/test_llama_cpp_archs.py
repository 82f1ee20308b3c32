"""llama.cpp runs our merges into every architecture we map: each delta lands where llama.cpp's graph reads it.

transformers' GGUF loader (test_gguf_architectures.py, test_gguf_gemma4.py, test_gguf_gptoss_lfm2.py) undoes the
row orders llama.cpp's converter writes by its own code, and cannot read gemma, mistral3 or Falcon's new decoder
architecture at all. The proof a user needs is llama.cpp's: for each architecture the tests' tiny model is written
by its writer (F32, as llama.cpp's converter writes it), llama.cpp must compute the model's logits from that file, and
after NeuroAda on every linear layer, `neuroada-merge` into the file (targets F32) the runtime's merged model's. A row
permutation put wrong (rope's q/k, Bloom's and Falcon's regrouped qkv) changes llama.cpp's logits far beyond the
tolerance, which the negative controls show by merging with the permutation left out.

Two things of the tests' configs llama.cpp does not follow, set here on the reference model and file: llama.cpp never
reads Gemma 2/3's query_pre_attn_scalar but picks the attention scale by model size (1 / sqrt(head_dim), for 27B
1 / sqrt(hidden / heads)), which is what every released config's says; the tiny configs keep transformers' default
256, so their reference models get query_pre_attn_scalar = head_dim. And gpt-oss's file carries its YaRN rope keys
(its writer leaves them out only for transformers' loader, which cannot parse them).

Skipped when `llama_cpp` cannot be imported (see test_llama_cpp.py).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding is not installed (optional)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402
from neuroada_format.runtime import NeuroAdaConfig, attach, merge_and_unload, save_adapter  # noqa: E402

import test_gguf_architectures as ta  # noqa: E402
from test_llama_cpp import cpp_logits, norm, torch_logits  # noqa: E402


def _gemma4():
    import test_gguf_gemma4  # (skips where transformers has no Gemma 4)
    return test_gguf_gemma4


def _gptoss_lfm2():
    import test_gguf_gptoss_lfm2
    return test_gguf_gptoss_lfm2


def _as_llama_cpp_scales(case: str):
    """ta.build(case), for Gemma 2/3 with the attention scale llama.cpp applies (see the module docstring)."""
    model = ta.build(case)
    if case in ("gemma2", "gemma3"):
        cfg = model.config
        cfg.query_pre_attn_scalar = cfg.head_dim
        same = type(model)(cfg).float().eval()
        same.load_state_dict(model.state_dict())
        return same
    return model


# case -> (the reference model, its file as llama.cpp's converter writes it, at F32)
CASES = {case: (lambda case=case: _as_llama_cpp_scales(case),
                lambda path, model, case=case: ta.write_like_llama_cpp(path, case, model, QT.F32))
         for case in ta.CASES}
CASES.update({f"gemma4-{c}": (lambda c=c: _gemma4().build(c),
                              lambda path, model: _gemma4().write_like_llama_cpp(path, model, QT.F32))
              for c in ("ple", "moe")})
CASES.update({c: (lambda c=c: _gptoss_lfm2().build(c),
                  lambda path, model, c=c: _gptoss_lfm2().write_like_llama_cpp(
                      path, c, model, QT.F32, experts_type=QT.F32, rope_scaling=c == "gpt-oss"))
              for c in ("gpt-oss", "lfm2")})
CASES["mistral3"] = (lambda: _gptoss_lfm2().build_ministral3(),
                     lambda path, model: _gptoss_lfm2().write_mistral3(path, model, QT.F32))

# Tolerance on the largest difference, as a fraction of the largest logit. All-F32 files (and F32 K/V cache): only the
# order of f32 sums differs, measured 1e-7 to 7e-6 (gemma, Bloom, gpt-oss) of the largest logit. GELU: ggml's CPU
# GELU looks its result up in an f16 table, ~1e-3 relative per activation: measured 1e-4 to 6e-4.
GELU = ("gemma2", "gemma3", "gemma4-ple", "gemma4-moe", "starcoder2", "gpt2", "falcon", "falcon-new")
TOL = {case: 3e-3 if case in GELU else 1e-4 for case in CASES}
# the architectures whose converter reorders rows, and the permutation that does it here (Falcon-7B's multi-query
# layout, one key/value group, is already all queries, then the key, then the value: its regrouping is the identity)
PERMUTED = {"llama": "rope_permutation", "mistral-as-llama": "rope_permutation", "mistral3": "rope_permutation",
            "bloom": "qkv_permutation", "falcon-new": "qkv_permutation"}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_file_runs_in_llama_cpp_as_the_runtime_merge(case, tmp_path, monkeypatch):
    build, write = CASES[case]
    model = build()
    base = write(tmp_path / "base.gguf", model)
    l_base = torch_logits(model)
    tol = TOL[case] * np.abs(l_base).max()
    lc_base = cpp_logits(base)  # llama.cpp loads the file and computes the model
    assert np.abs(lc_base - l_base).max() <= tol, (case, np.abs(lc_base - l_base).max() / np.abs(l_base).max())

    attach(model, NeuroAdaConfig(k=4, target_modules="all-linear"))
    ta.random_deltas_(model, seed=1, scale=0.2 if case == "bloom" else 0.05)  # (as test_gguf_architectures.py)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, value_dtype="F32")
    l_rt = torch_logits(merge_and_unload(model))
    change = np.abs(l_rt - l_base).max()
    assert change > 20 * tol  # the adapter matters far beyond the tolerance
    out = tmp_path / "merged.gguf"
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(adapter), "--out", os.fspath(out),
                      "--option", "target_type=F32"]) == 0
    lc = cpp_logits(out)
    assert np.abs(lc - l_rt).max() <= TOL[case] * np.abs(l_rt).max(), \
        (case, np.abs(lc - l_rt).max() / np.abs(l_rt).max(), change / np.abs(l_rt).max())

    if case in PERMUTED:  # the negative control: the same merge with the rows left in the checkpoint's order
        monkeypatch.setattr(gn, PERMUTED[case], lambda n_rows, *heads: np.arange(n_rows))
        wrong = tmp_path / "unpermuted.gguf"
        assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(adapter), "--out", os.fspath(wrong),
                          "--option", "target_type=F32", "--no-verify"]) == 0
        assert np.abs(cpp_logits(wrong) - l_rt).max() > 10 * TOL[case] * np.abs(l_rt).max()


def test_a_merged_split_set_runs_in_llama_cpp_as_the_unsplit_merge(tmp_path, monkeypatch):
    """A tiny Llama written as gguf-split lays a set out (3 tensors a shard), merged as a set: llama.cpp loads the
    merged set from its first shard and computes the runtime's merged model, the same logits as from the unsplit
    merged file."""
    model = _as_llama_cpp_scales("llama")
    base = ta.write_like_llama_cpp(tmp_path / "base.gguf", "llama", model, QT.F32)
    real_writer = gguf.GGUFWriter
    monkeypatch.setattr(gguf, "GGUFWriter", lambda path, arch, **kw: real_writer(path, arch, split_max_tensors=3, **kw))
    ta.write_like_llama_cpp(tmp_path / "split.gguf", "llama", model, QT.F32)
    monkeypatch.undo()
    shards = sorted(p.name for p in tmp_path.glob("split-*.gguf"))
    assert len(shards) > 2 and shards[0] == f"split-00001-of-{len(shards):05d}.gguf"
    first = tmp_path / shards[0]
    assert np.array_equal(cpp_logits(first), cpp_logits(base))  # llama.cpp reads the set as the file

    attach(model, NeuroAdaConfig(k=4, target_modules="all-linear"))
    ta.random_deltas_(model, seed=1, scale=0.05)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, value_dtype="F32")
    l_rt = torch_logits(merge_and_unload(model))
    for src, out in ((base, tmp_path / "merged.gguf"), (first, tmp_path / "merged-set.gguf")):
        assert merge_run(["--base", os.fspath(src), "--adapter", os.fspath(adapter), "--out", os.fspath(out),
                          "--option", "target_type=F32"]) == 0
    merged_shards = sorted(p.name for p in tmp_path.glob("merged-set-*.gguf"))
    assert merged_shards == [s.replace("split-", "merged-set-") for s in shards]
    lc_set, lc_file = cpp_logits(tmp_path / merged_shards[0]), cpp_logits(tmp_path / "merged.gguf")
    assert np.array_equal(lc_set, lc_file)
    assert np.abs(lc_set - l_rt).max() <= TOL["llama"] * np.abs(l_rt).max()
    assert np.abs(lc_set - cpp_logits(first)).max() > 20 * TOL["llama"] * np.abs(l_rt).max()  # the merge matters
