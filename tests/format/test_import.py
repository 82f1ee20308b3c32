"""The format core is numpy-only: importing and using it must not pull in torch, onnx or triton."""
from __future__ import annotations

import subprocess
import sys
import textwrap

HEAVY = ("torch", "onnx", "onnxruntime", "onnxscript", "triton", "transformers", "peft")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_import_alone_pulls_in_no_framework():
    r = _run(f"""
        import neuroada_format, sys
        for name in {HEAVY!r}:
            assert name not in sys.modules, name
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_whole_api_and_cli_pull_in_no_framework(tmp_path):
    r = _run(f"""
        import sys, numpy as np, ml_dtypes
        import neuroada_format as naf
        from neuroada_format import cli
        from click.testing import CliRunner
        w = np.arange(48, dtype=np.float32).reshape(6, 8).astype(ml_dtypes.bfloat16)
        t = naf.Target.from_weight("w", w, naf.select_indices(w, 2))
        path = {str(tmp_path / 'a.safetensors')!r}
        naf.save(naf.Adapter({{"w": t}}), path)
        assert naf.validate(naf.load(path), base={{"w": w}}, check_selection=True).ok
        naf.merge_weight(w, [naf.load(path).targets["w"]])
        assert CliRunner().invoke(cli.main, ["inspect", "--json", path]).exit_code == 0
        for name in {HEAVY!r}:
            assert name not in sys.modules, name
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_the_exact_check_from_the_issue():
    r = subprocess.run([sys.executable, "-c",
                        "import neuroada_format, sys; assert 'torch' not in sys.modules; "
                        "assert 'onnx' not in sys.modules; assert 'triton' not in sys.modules"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
