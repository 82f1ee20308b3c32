"""examples/trainer_quickstart.py in its quick form on a tiny config model: Trainer + attach + save_model,
then load_adapter on a fresh base (the example checks the logits itself), and resume from a checkpoint."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import trainer_quickstart  # noqa: E402


def test_quickstart_trains_saves_and_reloads(tmp_path):
    out = trainer_quickstart.main(["--out", str(tmp_path / "run"), "--tiny", "--quick"])
    assert out["steps"] == 4
    assert sorted(os.listdir(out["final"])) == ["model.safetensors", "neuroada_config.json",
                                                "neuroada_model.safetensors", "training_args.bin"]
    assert all(n < 0.5 * out["base_bytes"] for n in out["sizes"].values())
    assert out["diff"] < 1e-2
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # --resume continues from the last checkpoint (here: already at max_steps, so nothing left to train)
    again = trainer_quickstart.main(["--out", str(tmp_path / "run"), "--tiny", "--quick", "--resume", "--steps", "6"])
    assert again["steps"] == 6
