"""PEFT's mixed batch as a keyword: ``model(**inputs, adapter_names=names)`` and ``model.generate(**inputs,
adapter_names=names)`` run as ``with adapter_batch(model, names): model(**inputs)`` / ``.generate(**inputs)`` do, with
their bits, one name per input row ("__base__" or None: the plain base).

A transformers model takes any keyword, so the names reached its layers and were dropped: every row got what
set_adapter serves. attach and load_adapter therefore give the model its own ``forward`` and ``generate`` (see
hf_checkpoint._install_hf; unload takes them back): the method the model had, with the keyword taken off and the
block opened around it. A PEFT adapter loaded through transformers' own integration keeps the keyword's meaning
there (the keyword goes through to it untouched)."""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from neuroada_format import NeuroAdaUsageError

from .guards import MIXED_OWNER_ATTR, name_list, unwrapped
from .multi import open_batch

KEYWORD = "adapter_names"
# where a call's batch size is read, in this order (then its first positional argument): decoder-only and
# encoder-decoder forwards, and generate's ``inputs``
_INPUTS = ("input_ids", "inputs_embeds", "inputs", "decoder_input_ids", "decoder_inputs_embeds")


class KeywordBatch:
    """``model.forward`` or ``model.generate`` (``name``) of an attached model, called as ``func(model, ...)`` through
    hf_checkpoint._ModelMethod. ``previous``: the method the instance held before (an accelerate hook's forward), or
    None for the class's. (A class, not a closure: an attached model pickles and deep-copies.)"""

    def __init__(self, name: str, previous=None):
        self.name, self.previous = name, previous

    @property
    def __name__(self) -> str:
        return self.name

    def own(self, model: nn.Module):
        """The method this one stands in for, bound to ``model``."""
        if self.previous is not None:
            return self.previous
        return getattr(type(model), self.name).__get__(model, type(model))

    def __call__(self, model: nn.Module, *args, **kwargs):
        own = self.own(model)
        if KEYWORD not in kwargs or getattr(model, "_hf_peft_config_loaded", False):
            return own(*args, **kwargs)
        return _in_batch(self.name, model, own, args, kwargs)


@torch.compiler.disable(recursive=False)
def _in_batch(name: str, model: nn.Module, own, args: tuple, kwargs: dict):
    """``own(*args, **kwargs)`` inside the block the call's keyword asks for. Under torch.compile (the model given as
    its compiled wrapper) the block opens and closes outside the graph (_open and _close are never traced: dynamo
    followed them into the stack caches, guarding and recompiling on their Python state), and ``own`` is compiled
    as under an adapter_batch opened by hand."""
    names = kwargs.pop(KEYWORD)
    if names is None:  # as in PEFT: no mixed batch asked for
        return own(*args, **kwargs)
    block = _open(name, model, names, args, kwargs)
    try:
        out = own(*args, **kwargs)
    except BaseException as e:
        _close(block, e)
        raise
    _close(block, None)
    return out


@torch.compiler.disable
def _open(name: str, model: nn.Module, names, args: tuple, kwargs: dict) -> contextlib.ExitStack:
    forward = name == "forward"
    what = f"model{'' if forward else '.generate'}(..., adapter_names=...)"
    names = _checked(model, names, args, kwargs, what, forward)
    block = contextlib.ExitStack()
    # a forward's own hooks ran before it was called: the block reads the call's token count from its inputs
    block.enter_context(open_batch(model, names, (args, kwargs) if forward else None, what))
    return block


@torch.compiler.disable
def _close(block: contextlib.ExitStack, error: BaseException | None) -> None:
    block.__exit__(type(error) if error is not None else None, error, getattr(error, "__traceback__", None))


def _checked(model: nn.Module, names, args: tuple, kwargs: dict, what: str, forward: bool) -> list:
    """The names as a list, refused (before anything changes) where PEFT refuses them: the wrong count, a training
    forward, a block already open in this thread. Unknown names and layers that cannot serve a mixed batch are
    refused by the block itself, as adapter_batch refuses them."""
    names = name_list(names, KEYWORD, base_ok=True)
    if not names:  # (where no input gives the batch size, adapter_batch's own words named a call never made)
        raise NeuroAdaUsageError(f"{what} got an empty list: one adapter name per input (\"__base__\" or None: the "
                                 f"plain base), or adapter_names=None for no mixed batch")
    if unwrapped(model).__dict__.get(MIXED_OWNER_ATTR) == threading.get_ident():
        raise NeuroAdaUsageError(f"{what} inside an adapter_batch block, which already gives every row its adapter: "
                                 f"call it without adapter_names there, or leave the block first")
    if forward and model.training and torch.is_grad_enabled():
        raise NeuroAdaUsageError(f"{what} in training mode with gradients enabled: a mixed batch serves its adapters "
                                 f"inference-only, so their deltas would get no gradient (PEFT refuses adapter_names "
                                 f"in training mode too); call model.eval() or run it under torch.no_grad(), and "
                                 f"train one adapter with set_adapter and a plain forward")
    batch = _batch_size(args, kwargs)
    if batch is not None and batch != len(names):
        repeat = ("; generate repeats each input's rows for num_beams and num_return_sequences itself"
                  if not forward else "")
        raise NeuroAdaUsageError(f"{what} got {len(names)} adapter names for a batch of {batch} inputs: one name per "
                                 f"input (\"__base__\" or None: the plain base){repeat}")
    return names


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """The call's number of inputs, where its inputs say it (a batch of token ids or embeddings); else None, and the
    layers check the rows they get (see multi._MixedForward.rows)."""
    for t in (*(kwargs.get(key) for key in _INPUTS), args[0] if args else None):
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return int(t.shape[0])
    return None
