"""The spec's selection rules in torch: magnitude and reverse equal neuroada_format.select_indices (tested against
it). "random" is the runtime's own draw (spec 5 leaves the generator to the implementation): a torch generator
seeded with the config's seed plus the layer's position among the targets, so the same config and targets give the
same columns, another target list other ones, and never numpy's columns of select_indices.

torch.topk breaks ties arbitrarily, so it only finds the k-th largest score; the tie-break (lower
column first) is then applied exactly, as in the numpy reference.
"""
from __future__ import annotations

import torch

from neuroada_format import NeuroAdaError, NeuroAdaUsageError

# Scores are made and ranked a block of rows at a time, so no temporary is larger than ~1 MB: a dense
# copy per weight (11 MB for one Llama MLP matrix) raised glibc's mmap threshold and left ~230 MB of
# free heap resident after attach, which training then grew on (measured: +10% peak RSS at k=1).
ROW_CHUNK_ENTRIES = 1 << 18


def topk_columns(scores: torch.Tensor, k: int, transform=None) -> torch.Tensor:
    """Per row, columns of the k largest scores, ascending, int64 (spec 5: ties -> lower column; NaN
    ranks below every score, -Inf included).

    Scores are compared in f32 (f64 when given f64): every bf16/f16/f32 value is exact in f32, so the
    order is the numpy reference's, and no dense f64 copy of a large score matrix is made.
    ``transform`` (e.g. torch.abs) turns a block of rows into scores, so callers need no dense copy.
    """
    d_out, d_in = scores.shape
    if not 1 <= k <= d_in:
        raise NeuroAdaError(f"k={k} must be within [1, d_in={d_in}]", rule="3.4")
    work = torch.float64 if scores.dtype == torch.float64 else torch.float32
    out = torch.empty((d_out, k), dtype=torch.int64, device=scores.device)
    rows = max(1, ROW_CHUNK_ENTRIES // d_in)
    for start in range(0, d_out, rows):
        s = scores[start:start + rows]
        s = (transform(s) if transform is not None else s).to(work)
        nan = torch.isnan(s)
        has_nan = bool(nan.any())
        if has_nan:
            s = s.masked_fill(nan, float("-inf"))
        kth = torch.topk(s, k, dim=1, sorted=True).values[:, -1:]
        greater = s > kth
        need = k - greater.sum(dim=1, keepdim=True)
        equal = s == kth
        if not has_nan and bool((equal.sum(dim=1, keepdim=True) == need).all()):
            out[start:start + s.shape[0]] = (greater | equal).nonzero()[:, 1].view(-1, k)
            continue  # no surplus ties at the k-th score (the usual case): nothing to break
        if has_nan:
            equal &= ~nan  # real ties first (-Inf included), then NaNs, each from the left
        chosen = greater | (equal & (equal.cumsum(dim=1) <= need))
        if has_nan:
            need = need - (chosen & ~greater).sum(dim=1, keepdim=True)
            chosen |= nan & (nan.cumsum(dim=1) <= need)
        out[start:start + s.shape[0]] = chosen.nonzero()[:, 1].view(-1, k)
    return out


def select(weight: torch.Tensor, k: int, rule: str, *, seed: int | None = None,
           scores: torch.Tensor | None = None, generator_offset: int = 0) -> torch.Tensor:
    """Indices [d_out, k] for a canonical [out, in] weight under one of the spec's rules."""
    with torch.no_grad():
        if rule == "magnitude":
            return topk_columns(weight, k, torch.abs)
        if rule == "reverse":
            return topk_columns(weight, k, lambda s: s.abs().neg_())
        if rule == "random":
            g = torch.Generator(device="cpu").manual_seed(int(seed or 0) + generator_offset)
            return topk_columns(torch.rand(weight.shape, generator=g).to(weight.device), k)
        if rule == "gradient":
            if scores is None or tuple(scores.shape) != tuple(weight.shape):
                raise NeuroAdaUsageError("gradient selection needs scores shaped like the weight")
            return topk_columns(scores, k, torch.abs)
    raise NeuroAdaUsageError(f"unknown selection rule {rule!r}", rule="2.2")
