"""Two CPU processes (gloo) train the deltas under DDP and FSDP2 on half the batch each; the gathered
adapter must equal a single process trained on the whole batch. Skip with -m "not distributed"."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import neuroada_format as naf
from neuroada_format.runtime import attach, to_adapter

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

pytestmark = pytest.mark.distributed

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
WORLD = 2


def _worker_module():
    spec = importlib.util.spec_from_file_location("neuroada_dist_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, out) -> list[dict]:
    env = dict(os.environ, WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    procs = [subprocess.Popen([sys.executable, WORKER, kind, os.fspath(out)], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    """Single process, whole batch: the deltas both distributed runs must reproduce."""
    w = _worker_module()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = attach(w.build_model(), w.config())
        losses = w.train(full, w.global_batch())
        half = attach(w.build_model(), w.config())
        w.train(half, w.global_batch().chunk(WORLD)[0])
    finally:
        torch.set_num_threads(threads)
    return to_adapter(full, value_dtype="F32"), losses, to_adapter(half, value_dtype="F32")


def assert_same_deltas(path, reference):
    want, _, half = reference
    got = naf.load(path)
    assert sorted(got.targets) == sorted(want.targets)
    scale = max(float(np.abs(t.values).max()) for t in want.targets.values())
    assert scale > 1e-3  # the deltas moved
    differs_from_half = False
    for key, t in want.targets.items():
        g = got.targets[key]
        assert np.array_equal(g.indices, t.indices) and g.probe == t.probe, key
        np.testing.assert_allclose(g.values, t.values, rtol=1e-4, atol=1e-6 * scale, err_msg=key)
        differs_from_half |= not np.allclose(half.targets[key].values, t.values, rtol=1e-4, atol=1e-6 * scale)
    assert differs_from_half  # so the comparison can tell "averaged over both halves" from "one half"


def test_ddp_matches_single_process(tmp_path, reference):
    reports = launch("ddp", tmp_path)
    assert_same_deltas(tmp_path / "adapter.safetensors", reference)
    for rep in reports:
        assert rep["modes_at_attach"] == ["inplace"] and rep["modes"] == ["inplace"]
    # each rank saw its own half, so their losses differ; their mean is the single-process loss
    assert reports[0]["losses"][0] != reports[1]["losses"][0]
    assert (reports[0]["losses"][0] + reports[1]["losses"][0]) / 2 == pytest.approx(reference[1][0], rel=1e-5)


def test_fsdp2_matches_single_process_and_goes_additive(tmp_path, reference):
    reports = launch("fsdp", tmp_path)
    assert_same_deltas(tmp_path / "adapter.safetensors", reference)
    for rep in reports:
        assert rep["sharded"] == ["DTensor"]             # weights and deltas were sharded by fully_shard
        assert rep["modes_at_attach"] == ["inplace"]     # attach ran on the whole, plain model
        assert rep["modes"] == ["additive"]              # "auto" re-resolved once FSDP2 managed the layers
        assert "sharded" in rep["merge_refused"]
        assert "before fully_shard" in rep["attach_refused"]
    assert (reports[0]["losses"][0] + reports[1]["losses"][0]) / 2 == pytest.approx(reference[1][0], rel=1e-5)


def test_fsdp1_is_refused_with_one_error_that_names_fsdp2(tmp_path):
    """FSDP1 would flatten the deltas with the frozen base (the base then gets gradients, the deltas cannot be
    read back): the first forward, saving and attaching to an FSDP1-wrapped model each raise our usage
    error naming FSDP2, instead of torch's or a broken adapter file."""
    reports = launch("fsdp1", tmp_path)
    for rep in reports:
        for what in ("forward", "save", "attach_after"):
            assert rep[what] is not None and "FSDP2" in rep[what] and "fully_shard" in rep[what], (what, rep[what])
        assert "adapter.safetensors" not in rep["written"]
