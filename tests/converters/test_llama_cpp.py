"""llama.cpp itself runs our merged GGUF files: the real proof that the file a user runs holds the adapter.

A tiny Llama GGUF (test_gguf's generator: llama.cpp's layout, q/k rows permuted for rope, 4-bit
projections) is loaded by transformers' GGUF loader, a NeuroAda adapter with non-zero deltas is attached
to every linear layer, saved, and merged into the GGUF with `neuroada-merge`. llama.cpp (the
llama-cpp-python binding, an optional install: `CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install
llama-cpp-python`) then computes the logits of the merged file, compared with the runtime's merged model.

Skipped when `llama_cpp` cannot be imported; nothing else in the suite needs it.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama.cpp's Python binding is not installed (optional: "
    "CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install llama-cpp-python, a source build of 6-30 min on 2 cores)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from test_gguf import VOCAB, hf_arrays, write_gguf  # noqa: E402  (same folder: the tiny GGUF generator)
from test_gguf_architectures import random_deltas_  # noqa: E402

from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402
from neuroada_format.runtime import NeuroAdaConfig, attach, merge_and_unload, save_adapter  # noqa: E402

QT = gguf.GGMLQuantizationType
GGML_TYPE_F32 = 0  # llama.cpp's KV cache defaults to F16; F32 keeps the F32-target comparison exact-ish
SEQUENCES = [list(range(3, 35)), [7, 9, 11, 5, 60, 41, 22, 22, 17, 3, 33, 48, 50, 1, 2, 63, 12, 30, 8, 4]]


def cpp_logits(path) -> np.ndarray:
    """llama.cpp's logits at every position of SEQUENCES, stacked [positions, vocab]."""
    llm = llama_cpp.Llama(model_path=os.fspath(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=1,
                          type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    try:
        out = []
        for seq in SEQUENCES:
            llm.reset()
            llm.eval(seq)
            out.append(np.array(llm.scores[:len(seq)], dtype=np.float32))
        return np.concatenate(out)
    finally:
        llm.close()


def torch_logits(model) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model(input_ids=torch.tensor([s]), use_cache=False).logits[0].float().numpy()
                               for s in SEQUENCES])


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """(base file, {variant: merged file}, runtime base logits, runtime merged logits)."""
    tmp = tmp_path_factory.mktemp("llama_cpp")
    base = write_gguf(tmp / "base.gguf", hf_arrays(), QT.Q4_1)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=base.name, dtype=torch.float32).eval()
    l_base = torch_logits(model)
    attach(model, NeuroAdaConfig(k=4, target_modules="all-linear"))
    random_deltas_(model, seed=0, scale=0.1)
    adapter = tmp / "adapter"
    save_adapter(model, adapter, value_dtype="F32")  # the runtime's f32 deltas, exactly
    l_rt = torch_logits(merge_and_unload(model))
    files = {}
    for variant, opts in (("F32", ["--option", "target_type=F32"]), ("F16", ["--option", "target_type=F16"]),
                          ("Q4_1", [])):
        out = tmp / f"merged-{variant}.gguf"
        assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(adapter), "--out", os.fspath(out),
                          *opts]) == 0
        files[variant] = out
    return base, files, l_base, l_rt


def norm(a) -> float:
    return float(np.linalg.norm(a))


def retention(l_v, l_ref, l_base) -> float:
    """bench/gguf_retention.py's measure: the fraction of the adapter's logit change that l_v holds."""
    return 1.0 - norm(l_v - l_ref) / norm(l_ref - l_base)


def top1_agrees_where_decided(l_v, l_ref, tol) -> None:
    """Same top-1 token wherever the reference's top-2 margin exceeds twice the tolerance (near-ties may flip)."""
    top2 = np.sort(l_ref, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * tol
    assert decided.mean() > 0.8
    np.testing.assert_array_equal(l_v.argmax(1)[decided], l_ref.argmax(1)[decided])


def test_llama_cpp_reads_the_unmerged_base_like_transformers(merged):
    """The comparison's own noise, on the unmerged 4-bit file: llama.cpp rounds activations to 8 bits for
    its Q4_1 matmuls, so it matches transformers' de-quantized f32 model within a few percent (1% here)."""
    base, _, l_base, _ = merged
    lc = cpp_logits(base)
    assert lc.shape == l_base.shape == (sum(map(len, SEQUENCES)), VOCAB)
    assert norm(lc - l_base) < 0.05 * norm(l_base)


# Tolerances, as a fraction of the largest runtime logit. F32 targets: every matmul of the merged file is
# F32 (K/V kept in F32 too), so only the order of f32 sums differs (measured 6e-7). F16 targets: the file
# holds the merged weights rounded once to f16 (the runtime keeps f32) and llama.cpp rounds activations to
# f16 for F16 matmuls, both ~2^-11 relative per product (measured 6e-4).
FLOAT_TOL = {"F32": 1e-4, "F16": 5e-3}


@pytest.mark.parametrize("variant", ["F32", "F16"])
def test_float_target_merge_runs_in_llama_cpp_as_the_runtime_merge(merged, variant):
    base, files, l_base, l_rt = merged
    lc_base, lc = cpp_logits(base), cpp_logits(files[variant])
    change = norm(l_rt - l_base)
    assert change > 0.3 * norm(l_base)  # the adapter matters (0.8 of the base logits' norm)
    assert norm(lc - lc_base) > 0.5 * change  # and llama.cpp sees it: merged and base runs differ
    tol = FLOAT_TOL[variant] * np.abs(l_rt).max()
    assert np.abs(lc - l_rt).max() <= tol, (variant, np.abs(lc - l_rt).max(), tol)
    assert retention(lc, l_rt, lc_base) > {"F32": 0.999, "F16": 0.99}[variant]
    top1_agrees_where_decided(lc, l_rt, tol)


def test_q4_1_merge_runs_in_llama_cpp(merged):
    """Kept at Q4_1 the touched blocks are re-encoded, so the file itself loses part of the change (a quarter
    here, as transformers reads it); llama.cpp must run that file as transformers reads it (within its
    8-bit activation noise) and keep most of the runtime's change and top-1 tokens."""
    base, files, l_base, l_rt = merged
    lc_base, lc = cpp_logits(base), cpp_logits(files["Q4_1"])
    change = norm(l_rt - l_base)
    assert norm(lc - lc_base) > 0.5 * change  # not vacuous
    same_file = transformers.AutoModelForCausalLM.from_pretrained(
        files["Q4_1"].parent, gguf_file=files["Q4_1"].name, dtype=torch.float32).eval()
    l_file = torch_logits(same_file)
    # llama.cpp = transformers on the same merged file, up to llama.cpp's own noise (measured 1.1%, 1.4%)
    assert norm(lc - l_file) < 0.05 * norm(l_file) and norm(lc - l_file) < 0.1 * change
    assert np.mean(lc.argmax(1) == l_file.argmax(1)) >= 0.9  # measured 100%
    # against the runtime's f32 merge: the 4-bit file keeps most of it (measured 75%, top-1 83%)
    assert retention(lc, l_rt, lc_base) > 0.6
    assert np.mean(lc.argmax(1) == l_rt.argmax(1)) >= 0.75
