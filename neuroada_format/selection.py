"""Which k columns of each row get a delta: the spec's selection rules and their tie-break.

All rules reduce to "the k highest scores per row, ties to the lower column", so one exact top-k
routine serves magnitude, reverse, random and gradient selection; results are sorted ascending.
"""
from __future__ import annotations

import numpy as np

from .errors import NeuroAdaError

RULES = ("magnitude", "reverse", "random", "gradient")
TIE_BREAK = "lower-column"
ROW_CHUNK_ENTRIES = 1 << 20  # several f64/bool temporaries per chunk: keep them small


def topk_columns(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of the k largest scores (NaN ranks lowest; ties -> lower column), ascending.

    Exact and vectorised: partition finds the k-th largest score, then the ties at that score are
    filled from the left, which is the documented tie-break (bf16 weights tie often).
    """
    scores = np.asarray(scores)
    d_out, d_in = scores.shape
    if not 1 <= k <= d_in:
        raise NeuroAdaError(f"k={k} must be within [1, d_in={d_in}]", rule="3.4")
    out = np.empty((d_out, k), dtype=np.int64)
    rows_per_chunk = max(1, ROW_CHUNK_ENTRIES // d_in)
    for start in range(0, d_out, rows_per_chunk):
        s = np.asarray(scores[start:start + rows_per_chunk], dtype=np.float64)
        s = np.where(s == -np.inf, -1e300, s)  # scores come from f32: -1e300 stays below all finite
        s = np.where(np.isnan(s), -np.inf, s)    # and NaN ranks below even -Inf
        kth = np.partition(s, d_in - k, axis=1)[:, d_in - k][:, None]
        greater = s > kth
        need = k - greater.sum(axis=1, keepdims=True)
        equal = s == kth
        chosen = greater | (equal & (np.cumsum(equal, axis=1) <= need))
        out[start:start + s.shape[0]] = np.nonzero(chosen)[1].reshape(-1, k)
    return out


def select_indices(weight: np.ndarray, k: int, rule: str = "magnitude", *, seed: int | None = None,
                   scores: np.ndarray | None = None) -> np.ndarray:
    """Indices [d_out, k] (int64, ascending per row) of a canonical [out, in] weight under a rule.

    magnitude: largest |W|; reverse: smallest |W|; random: uniform from numpy's PCG64 seeded by `seed`
    (reproducible with this library only); gradient: largest `scores` (e.g. accumulated |grad|).
    """
    if rule == "magnitude":
        return topk_columns(np.abs(np.asarray(weight, dtype=np.float32)), k)
    if rule == "reverse":
        return topk_columns(-np.abs(np.asarray(weight, dtype=np.float32)), k)
    if rule == "random":
        if seed is None:
            raise NeuroAdaError("random selection needs a seed", rule="2.2")
        rng = np.random.default_rng(seed)
        return topk_columns(rng.random(np.shape(weight)), k)
    if rule == "gradient":
        if scores is None or np.shape(scores) != np.shape(weight):
            raise NeuroAdaError("gradient selection needs scores shaped like the weight", rule="2.2")
        return topk_columns(np.abs(np.asarray(scores, dtype=np.float64)), k)
    raise NeuroAdaError(f"unknown selection rule {rule!r}; expected one of {', '.join(RULES)}",
                        rule="2.2")
