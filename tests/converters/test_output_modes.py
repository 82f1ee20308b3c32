"""One rule for the permission bits of what a merge writes, in every backend: the base's bits less the umask, as
`cp` gives. The safetensors backend copied the base's bits and ignored the umask (a public base merged with a private
adapter under umask 077 came out world-readable); the ONNX and GGUF ones ignored the base (a 0600 base gave 0644)."""
from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import numpy as np
import pytest

import neuroada_format as naf
from neuroada_format.converters import backend


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_modes_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def adapter_for(name: str, w: np.ndarray, path) -> str:
    idx = naf.select_indices(w, 2)
    naf.save(naf.Adapter({name: naf.Target.from_weight(name, w, idx, np.full(idx.shape, 0.01, np.float32))}), path)
    return os.fspath(path)


def safetensors_base(folder: Path):
    from safetensors.numpy import save_file
    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    save_file({"lin.weight": w}, os.fspath(folder / "base.safetensors"))
    return [folder / "base.safetensors"], folder / "base.safetensors", "lin.weight", w, "out.safetensors", []


def onnx_base(folder: Path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)  # MatMul: stored [in, out]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "lin.weight"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(w, "lin.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, os.fspath(folder / "base.onnx"), save_as_external_data=True, location="base.onnx.data",
                    size_threshold=0)
    files = [folder / "base.onnx", folder / "base.onnx.data"]
    return files, folder / "base.onnx", "lin.weight", np.ascontiguousarray(w.T), "out.onnx", ["out.onnx.data"]


def gguf_base(folder: Path):
    pytest.importorskip("gguf")
    G = _load("test_gguf")
    from neuroada_format.converters import gguf_names as gn
    path = G.write_gguf(folder / "base.gguf", G.hf_arrays(0))
    base = gn.open_gguf_base(path)
    name = sorted(G.TARGETS)[0]
    return [Path(path)], Path(path), name, base.array(name), "out.gguf", []


@pytest.mark.parametrize("build", [safetensors_base, onnx_base, gguf_base])
@pytest.mark.parametrize("base_mode, umask, want", [(0o644, 0o077, 0o600), (0o600, 0o022, 0o600),
                                                    (0o640, 0o022, 0o640), (0o664, 0o002, 0o664)])
def test_outputs_get_the_bases_bits_less_the_umask(tmp_path, build, base_mode, umask, want):
    files, base, name, w, out, companions = build(tmp_path)
    adapter = adapter_for(name, w, tmp_path / "a.safetensors")
    for f in files:
        os.chmod(f, base_mode)
    old = os.umask(umask)
    try:
        backend.merge(base, [(adapter, 1.0)], tmp_path / out, verify=False)
    finally:
        os.umask(old)
    for f in [out, *companions]:
        assert oct(stat.S_IMODE(os.stat(tmp_path / f).st_mode)) == oct(want), f
