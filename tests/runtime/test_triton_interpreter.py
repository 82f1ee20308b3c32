"""Runs triton_cases.py in a child process with TRITON_INTERPRET=1 set before anything imports the
kernels (the flag is read at decoration time, so this cannot share a process with other tests)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("NEUROADA_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-rs", os.path.join(HERE, "triton_cases.py")],
        env=env, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(HERE)),
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail
