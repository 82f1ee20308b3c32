"""Which k columns of each row get a delta: the registry of the spec's selection rules (section 5).

Every rule a file may record (`selection.rule`) is one entry of `RULES`. The rules this library can
compute reduce to "the k highest scores per row, ties to the lower column", so each entry is just a
score function and one exact top-k routine serves them all; results are sorted ascending. Rules
marked `checkable` depend on the base values alone, so a validator can re-derive them (rule 4.4).
A new rule is one entry here plus its row in SPEC.md section 5 (and the schema's enum).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import NeuroAdaError

TIE_BREAK = "lower-column"
ROW_CHUNK_ENTRIES = 1 << 20  # several key/bool temporaries per chunk: keep them small


def topk_columns(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of the k largest scores (NaN ranks lowest; ties -> lower column), ascending.

    Exact and vectorised: partition finds the k-th largest score, then the ties at that score are
    filled from the left, which is the documented tie-break (bf16 weights tie often). Scores of 32 bits
    or fewer (|W| of any base, a fine-tune's |delta|) are ranked as int32 keys of the same order: half the
    memory traffic of binary64 and an exact order, which made extraction and the selection check several
    times faster than the copy they go with.
    """
    if not isinstance(scores, _RowwiseScores):
        scores = np.asarray(scores)
    d_out, d_in = scores.shape
    if not 1 <= k <= d_in:
        raise NeuroAdaError(f"k={k} must be within [1, d_in={d_in}]", rule="3.4")
    out = np.empty((d_out, k), dtype=np.int64)
    rows_per_chunk = max(1, ROW_CHUNK_ENTRIES // d_in)
    for start in range(0, d_out, rows_per_chunk):
        s = _order_keys(np.asarray(scores[start:start + rows_per_chunk]))
        kth = np.partition(s, d_in - k, axis=1)[:, d_in - k][:, None]
        greater = s > kth
        need = k - greater.sum(axis=1, keepdims=True)
        equal = s == kth
        if not (equal.sum(axis=1, keepdims=True) == need).all():  # more ties at the k-th score than places left
            equal &= np.cumsum(equal, axis=1, dtype=np.int32) <= need
        out[start:start + s.shape[0]] = np.nonzero(greater | equal)[1].reshape(-1, k)
    return out


_INT32_MIN = np.int32(np.iinfo(np.int32).min)


def _order_keys(s: np.ndarray) -> np.ndarray:
    """Keys whose order is the ranking's: NaN lowest (below -Inf), -0.0 equal to +0.0, otherwise the values'.

    Floats of 32 bits or fewer become int32 (their binary32 bits, negatives' magnitude bits flipped, so the signed
    integer order is the numeric one); anything else binary64 with -Inf moved below every finite value and NaN to
    -Inf."""
    if s.dtype.kind == "f" and s.dtype.itemsize <= 4 or s.dtype.name == "bfloat16":
        f = s.astype(np.float32) + np.float32(0.0)  # exact widening; -0.0 + 0.0 is +0.0 (a tie, spec 5.1)
        bits = f.view(np.int32)
        keys = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)
        keys[np.isnan(f)] = _INT32_MIN  # no number's key: that bit pattern is a NaN's
        return keys
    s = np.asarray(s, dtype=np.float64)
    s = np.where(s == -np.inf, -1e300, s)  # scores come from f32: -1e300 stays below all finite
    return np.where(np.isnan(s), -np.inf, s)  # and NaN ranks below even -Inf


class _RowwiseScores:
    """Scores made a row chunk at a time as `topk_columns` asks for them: |W| of a whole base tensor in f32
    would double a validator's memory on a large embedding (2 GB for 128256 x 4096)."""

    def __init__(self, weight, fn):
        self.weight, self.fn = weight, fn
        self.shape = np.shape(weight)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.fn(np.asarray(self.weight[rows], dtype=np.float32))


@dataclass(frozen=True)
class Rule:
    """One selection rule: how its scores are made (None: recorded only, not computable from the base
    and a seed/scores, e.g. positions taken from a fine-tune) and whether rule 4.4 re-derives it."""
    name: str
    scores: Callable | None = None   # (canonical weight, seed, scores) -> [d_out, d_in] scores
    checkable: bool = False
    needs: str | None = None         # "seed" | "scores": what select_indices must be given


def _magnitude(weight, seed, scores):
    return _RowwiseScores(weight, np.abs)


def _reverse(weight, seed, scores):
    return _RowwiseScores(weight, lambda w: -np.abs(w))


def _random(weight, seed, scores):
    return np.random.default_rng(seed).random(np.shape(weight))


def _gradient(weight, seed, scores):
    if np.shape(scores) != np.shape(weight):
        raise NeuroAdaError("gradient selection needs scores shaped like the weight", rule="2.2")
    return np.abs(np.asarray(scores, dtype=np.float64))


RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("magnitude", _magnitude, checkable=True),      # largest |W|: NeuroAda's own
    Rule("reverse", _reverse, checkable=True),          # smallest |W|
    Rule("random", _random, needs="seed"),              # numpy PCG64 seeded: reproducible with numpy only
    Rule("gradient", _gradient, needs="scores"),        # largest |scores| (e.g. accumulated |grad|)
    Rule("delta"),                                      # largest |W_ft - W| (neuroada-pack extract)
    Rule("union"),                                      # union of several adapters' positions (combine)
    Rule("custom"),                                     # anything else; say how in a field of your own
)}
COMPUTABLE = tuple(name for name, r in RULES.items() if r.scores is not None)
CHECKABLE = frozenset(name for name, r in RULES.items() if r.checkable)


def select_indices(weight: np.ndarray, k: int, rule: str = "magnitude", *, seed: int | None = None,
                   scores: np.ndarray | None = None) -> np.ndarray:
    """Indices [d_out, k] (int64, ascending per row) of a canonical [out, in] weight under a rule of
    `RULES` that can be computed (magnitude, reverse, random with `seed`, gradient with `scores`)."""
    entry = RULES.get(rule)
    if entry is None or entry.scores is None:
        raise NeuroAdaError(f"unknown selection rule {rule!r}; expected one of {', '.join(COMPUTABLE)}",
                            rule="2.2")
    if entry.needs == "seed" and seed is None:
        raise NeuroAdaError(f"{rule} selection needs a seed", rule="2.2")
    if entry.needs == "scores" and scores is None:
        raise NeuroAdaError(f"{rule} selection needs scores shaped like the weight", rule="2.2")
    return topk_columns(entry.scores(weight, seed, scores), k)
