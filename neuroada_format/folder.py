"""Adapter folders: the layout `save_adapter` writes, and the one resolver every entry point uses.

A folder holds `neuroada_config.json` (the training configuration, PEFT-like keys) and
`neuroada_model.safetensors` (the adapter, one file of the spec). The names are our own on purpose:
PEFT and transformers pick up any folder with an `adapter_config.json` and then fail on a `peft_type`
they do not know, so a NeuroAda folder must not look like a PEFT one. Folders written before this
layout (`adapter_config.json` with `peft_type: "NEUROADA"` + `adapter_model.safetensors`) still load.
"""
from __future__ import annotations

import json
import os

from .errors import NeuroAdaError, NeuroAdaUsageError

CONFIG_NAME = "neuroada_config.json"
WEIGHTS_NAME = "neuroada_model.safetensors"
LEGACY_CONFIG_NAME = "adapter_config.json"
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"


def _legacy_peft_type(folder: str) -> str | None:
    """The peft_type of a legacy/PEFT adapter_config.json in `folder`, or None when there is none."""
    path = os.path.join(folder, LEGACY_CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError, RecursionError):
        return "?"
    kind = doc.get("peft_type") if isinstance(doc, dict) else None
    return kind if isinstance(kind, str) else "?"


def adapter_paths(path) -> tuple[str, str | None]:
    """(adapter file, config file or None) for an adapter file or an adapter folder.

    Raises NeuroAdaUsageError (rule 1.1) when there is no adapter there, and says so plainly when the
    folder is a PEFT adapter of another method (import those with `neuroada-pack --from-peft`).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise NeuroAdaUsageError("no such adapter file or folder", path=path, rule="1.1")
        return path, None
    weights = os.path.join(path, WEIGHTS_NAME)
    if os.path.exists(weights):
        config = os.path.join(path, CONFIG_NAME)
        return weights, config if os.path.exists(config) else None
    kind = _legacy_peft_type(path)
    legacy = os.path.join(path, LEGACY_WEIGHTS_NAME)
    if kind == "NEUROADA" or (kind is None and os.path.exists(legacy)):
        if not os.path.exists(legacy):
            raise NeuroAdaUsageError(f"no {LEGACY_WEIGHTS_NAME} in the adapter folder", path=path, rule="1.1")
        return legacy, os.path.join(path, LEGACY_CONFIG_NAME) if kind else None
    if kind is not None:
        raise NeuroAdaUsageError(f"this is a PEFT adapter (peft_type {kind!r}), not a NeuroAda one; convert it "
                                 "with `neuroada-pack --from-peft`", path=path, rule="1.1")
    raise NeuroAdaUsageError(f"no {WEIGHTS_NAME} in the folder: not an adapter folder", path=path, rule="1.1")
