"""Every Triton kernel compiles for sm_90 and sm_80 (H100/H200, A100) here, with no GPU: triton_aot.py binds the
runtime's own launches and compiles them through ptxas, in a child process without TRITON_INTERPRET (the
interpreter the other kernel tests use accepts code the compiler refuses)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_triton_kernels_compile_for_gpu_targets(tmp_path):
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))  # compile, not a cached binary
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_aot.py")], env=env, capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(HERE)))
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "76 compilations, 0 failed" in proc.stdout, tail
