"""The spec's selection rules in torch, equal to neuroada_format.select_indices (tested against it).

torch.topk breaks ties arbitrarily, so it only finds the k-th largest score; the tie-break (lower
column first) is then applied exactly, as in the numpy reference.
"""
from __future__ import annotations

import torch

ROW_CHUNK_ENTRIES = 1 << 24


def topk_columns(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, columns of the k largest scores (NaN lowest, ties -> lower column), ascending, int64."""
    d_out, d_in = scores.shape
    out = torch.empty((d_out, k), dtype=torch.int64, device=scores.device)
    rows = max(1, ROW_CHUNK_ENTRIES // d_in)
    for start in range(0, d_out, rows):
        s = scores[start:start + rows].double()
        s = torch.where(s == float("-inf"), torch.full_like(s, -1e300), s)  # below every f32 score
        s = torch.nan_to_num(s, nan=float("-inf"), posinf=float("inf"))     # NaN ranks below -Inf
        kth = torch.topk(s, k, dim=1, sorted=True).values[:, -1:]
        greater = s > kth
        need = k - greater.sum(dim=1, keepdim=True)
        equal = s == kth
        chosen = greater | (equal & (equal.cumsum(dim=1) <= need))
        out[start:start + s.shape[0]] = chosen.nonzero()[:, 1].view(-1, k)
    return out


def select(weight: torch.Tensor, k: int, rule: str, *, seed: int | None = None,
           scores: torch.Tensor | None = None, generator_offset: int = 0) -> torch.Tensor:
    """Indices [d_out, k] for a canonical [out, in] weight under one of the spec's rules."""
    with torch.no_grad():
        if rule == "magnitude":
            return topk_columns(weight.float().abs(), k)
        if rule == "reverse":
            return topk_columns(-weight.float().abs(), k)
        if rule == "random":
            g = torch.Generator(device="cpu").manual_seed(int(seed or 0) + generator_offset)
            return topk_columns(torch.rand(weight.shape, generator=g).to(weight.device), k)
        if rule == "gradient":
            return topk_columns(scores.float().abs(), k)
    raise ValueError(f"unknown selection rule {rule!r}")
