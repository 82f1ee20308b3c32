"""Adapter folders: the layout `save_adapter` writes, and the one resolver every entry point uses.

A folder holds `neuroada_config.json` (the training configuration, PEFT-like keys) and
`neuroada_model.safetensors` (the adapter, one file of the spec). The names are our own on purpose:
PEFT and transformers pick up any folder with an `adapter_config.json` and then fail on a `peft_type`
they do not know, so a NeuroAda folder must not look like a PEFT one. Folders written before this
layout (`adapter_config.json` with `peft_type: "NEUROADA"` + `adapter_model.safetensors`) still load.
"""
from __future__ import annotations

import os

from .errors import NeuroAdaError, NeuroAdaUsageError
from .jsonparse import read_json
from .safe_io import check_regular

CONFIG_NAME = "neuroada_config.json"
WEIGHTS_NAME = "neuroada_model.safetensors"
LEGACY_CONFIG_NAME = "adapter_config.json"
LEGACY_WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_CAP = 1 << 20  # a training configuration is a few hundred bytes


def read_config(path) -> dict:
    """An adapter folder's configuration file as a dict, read the one safe way (regular files only,
    at most CONFIG_CAP bytes, the one JSON parser and its limits: jsonparse).

    NeuroAdaUsageError when it cannot be read (missing, a FIFO, a device), NeuroAdaError when it is
    not a JSON object. The runtime's config loader and the converters read configs through this.
    """
    path = os.fspath(path)
    doc = read_json(path, rule=None, what="adapter config", cap=CONFIG_CAP)
    if not isinstance(doc, dict):
        raise NeuroAdaError(f"adapter config is a JSON {type(doc).__name__}, not an object", path=path)
    return doc


def _legacy_peft_type(folder: str) -> str | None:
    """The peft_type of a legacy/PEFT adapter_config.json in `folder`, or None when there is none."""
    path = os.path.join(folder, LEGACY_CONFIG_NAME)
    if not os.path.lexists(path):
        return None
    kind = read_config(path).get("peft_type")
    return kind if isinstance(kind, str) else "?"


def _present(path: str) -> bool:
    """True when something is at `path`; then it must be a regular file (or a link to one)."""
    if not os.path.lexists(path):
        return False
    check_regular(path)
    return True


def adapter_paths(path) -> tuple[str, str | None]:
    """(adapter file, config file or None) for an adapter file or an adapter folder.

    Raises NeuroAdaUsageError (rule 1.1) when there is no adapter there, when what is there is not a
    regular file (a FIFO, a device, a socket: see safe_io), and says so plainly when the folder is a
    PEFT adapter of another method (import those with `neuroada-pack --from-peft`). Symbolic links
    to regular files and folders are followed.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        if not os.path.lexists(path):
            raise NeuroAdaUsageError("no such adapter file or folder", path=path, rule="1.1")
        check_regular(path)
        return path, None
    weights = os.path.join(path, WEIGHTS_NAME)
    if _present(weights):
        config = os.path.join(path, CONFIG_NAME)
        return weights, config if _present(config) else None
    kind = _legacy_peft_type(path)
    legacy = os.path.join(path, LEGACY_WEIGHTS_NAME)
    if kind == "NEUROADA" or (kind is None and _present(legacy)):
        if not _present(legacy):
            raise NeuroAdaUsageError(f"no {LEGACY_WEIGHTS_NAME} in the adapter folder", path=path, rule="1.1")
        return legacy, os.path.join(path, LEGACY_CONFIG_NAME) if kind else None
    if kind is not None:
        raise NeuroAdaUsageError(f"this is a PEFT adapter (peft_type {kind!r:.80}), not a NeuroAda one; convert "
                                 "it with `neuroada-pack --from-peft`", path=path, rule="1.1")
    inside = sorted(e.name for e in os.scandir(path) if e.is_dir() and _present(os.path.join(e.path, WEIGHTS_NAME)))
    hint = f" (adapters saved by name are in its sub-folders: {', '.join(inside)[:200]})" if inside else ""
    raise NeuroAdaUsageError(f"no {WEIGHTS_NAME} in the folder: not an adapter folder{hint}", path=path, rule="1.1")
