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

__all__ = ["version", "cache_here", "outside_inference", "storage_of", "alias_key", "aliases"]


def version(t: torch.Tensor):
    """``t._version``; for an inference tensor a fresh object, equal to nothing (see the module docstring)."""
    return object() if t.is_inference() else t._version


def cache_here() -> bool:
    """Whether the runtime's caches of derived index structures are used here: not inside a torch.compile trace.

    A trace cannot read whether a cache is current (a version is a data-dependent value, an inference-tensor test
    a graph break), and a trace that filled a cache would change what its graph was guarded on (the cache was
    empty), so the next call would compile again. So a traced forward derives what it needs from the live idx and
    w0 inside the graph (index arithmetic, cheap next to the layer's product) and keeps nothing: it never serves
    a stale structure, and guards on no cache. Eager forwards use and fill the caches as before."""
    return not torch.compiler.is_compiling()


def outside_inference():
    """Create ordinary tensors even inside ``torch.inference_mode()`` (a no-op outside it, and inside a
    torch.compile trace, which cannot test for inference mode: a graph break)."""
    if not cache_here():
        return contextlib.nullcontext()
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()


def storage_of(t: torch.Tensor):
    """Which storage a tensor holds: equal for aliases (views, ``detach()``), whatever their Python objects; an
    empty tensor, or one without a storage of its own (a wrapper subclass such as DTensor), answers for itself."""
    if not t.numel():
        return id(t)
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return id(t)


def alias_key(t: torch.Tensor) -> tuple | None:
    """Equal for tensors that are the same elements of one storage (an adapter's idx or w0 and its twin's: see
    NeuroAdaLayer._twin); None for an empty tensor, which shares nothing. Compared while both tensors are alive, no
    other storage can be either one's, so this is no address guess."""
    if not t.numel():
        return None
    return storage_of(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device


def aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    key = alias_key(a)
    return key is not None and key == alias_key(b)
