"""What the runtime's caches may rely on, and what they must not keep, under ``torch.inference_mode``.

Serving code runs in ``torch.inference_mode()``, and tensors created there are *inference tensors*: they
keep no version counter (reading ``._version`` raises) and cannot be saved for backward later. Two rules
follow for every cache of derived index structures and every adapter tensor the runtime registers:

* keys use :func:`version`, which never matches for an inference tensor (nothing can tell whether one
  was changed in place, so a cache keyed on one is rebuilt instead of trusted);
* what outlives the call (buffers, parameters, cached structures) is built inside :func:`outside_inference`,
  so an adapter loaded or first served in an inference block still trains, and still hits its caches, after it.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["version", "outside_inference"]


def version(t: torch.Tensor):
    """``t._version``; for an inference tensor a fresh object, equal to nothing (see the module docstring)."""
    return object() if t.is_inference() else t._version


def outside_inference():
    """Create ordinary tensors even inside ``torch.inference_mode()`` (a no-op outside it)."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()
