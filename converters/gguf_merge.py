"""GGUF bases (llama.cpp): the merge backend (spec/SPEC.md section 15.3). The file is read by gguf_read, its tensors
found by Hugging Face name through gguf_names, and the touched blocks re-encoded by gguf_encode.

Merging keeps each tensor's encoding unless told otherwise: F32/F16/BF16 tensors get rule M bit for bit;
Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 tensors get the rule-M values re-encoded block by block, only in blocks that hold a
touched value (every other block stays byte-identical). A Q8_0/Q4_0/Q4_1 block whose rule-M values all lie
on its original grid (deltas trained through it: runtime train_on_grid) is packed on that grid with its
own scale and minimum, exactly and without the least-error search; the summary counts those blocks and
the re-encoded ones, and only re-encoded blocks are warned about. Q4_K/Q5_K/Q6_K tensors (llama.cpp's
Q4_K_M and Q5_K_M files) are kept in their type the same way, super-block by super-block (gguf_kquants), and so
are Q2_K and Q3_K (Q2_K and Q3_K_S/M files), IQ4_XS and IQ4_NL (their levels: a fixed non-uniform table). Types
gguf-py can only decode and we do not encode (IQ types but IQ4_NL/IQ4_XS) are refused unless `requant` names a type to
re-encode them into. `target_type`
re-encodes every touched tensor (e.g. F16, to keep the merge exact up to F16 rounding). Metadata and
tokenizer bytes are copied verbatim.

When no tensor changes type (the usual merge) the output has the input's layout exactly and every byte
is written once, in file order: the kernel copies the untouched ranges (sendfile), each touched tensor
is read from the input a block of rows at a time, merged (quantized blocks: decoded, merged, only the
touched ones re-encoded), patched in the buffer and written at its offset; the probe hashes are checked
from that same read. That costs about what copying the file does (bench/merge.py). A merge that changes
types lays the file out anew and works each tensor out whole first.
"""
from __future__ import annotations

import math
import os
import queue
import struct
import threading
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from neuroada_format import NeuroAdaError, NeuroAdaUsageError, plan_merge
from neuroada_format.durable import (OutputClaim, derived_mode, filled_sibling, publish_together, remove,
                                     write_file)
from neuroada_format.hashing import probe_hash_from_values
from neuroada_format.merge import Delta, MergeOverflowWarning
from neuroada_format.validate import PROBE_MISMATCH, validate

from .backend import Backend, Mismatch, Resolved, Written, claiming_output, pause_for_tests
from . import gguf_kquants as kq
from .gguf_encode import ENCODABLE, QUANT_TYPES, _decode, encode_blocks, on_original_grid, qtype
from .gguf_names import GGUFBase, open_gguf_base
from .gguf_split import GGUFSet, output_shards
from .gguf_read import FLOAT_TYPES, RULE, GGUFFile, TensorInfo, _numpy_dtype
from .progress import bar
from .safetensors_merge import _send  # the one kernel copy
from .tensor_map import read_exactly, write_exactly

BLOCK_BYTES = 4 << 20       # rows of a touched float tensor read, merged and written at a time
BLOCK_VALUES = 1 << 18      # values of a touched block-quantized tensor decoded and re-encoded at a time: enough
                            # touched blocks that the encoders' steps are long operations, few enough that their
                            # temporaries stay in the CPU cache (against 1 << 16, merges 10-30% faster; 1 << 20
                            # made Q4_K 20% slower, and whole tensors made the encoder before 2x slower); the
                            # K-quant types split between threads take more (gguf_kquants.batch_values)


@dataclass
class _TensorPlan:
    info: TensorInfo
    out_type: QT
    deltas: list[Delta]                       # in GGUF row order
    sources: list[tuple]                      # per delta: (hf name, target, adapter), for its probe hash
    inverse: np.ndarray | None                # GGUF row -> canonical row order (None: the same)
    positions: np.ndarray | None = None       # retyping only: sorted flat positions (GGUF order) touched
    patch: tuple[np.ndarray, np.ndarray] | None = None  # retyping only: (unit ids, bytes) of a kept-type tensor
    on_grid: int = 0                           # kept block type: touched blocks packed on their original grid
    reencoded: int = 0                         # kept block type: touched blocks the encoder re-encoded

    @property
    def retyped(self) -> bool:
        return self.out_type != self.info.type

    @property
    def out_nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.out_type]
        return math.prod(self.info.ne) // block * size


@dataclass
class _Plan:
    tensors: dict[str, _TensorPlan]
    touched: int
    same_layout: bool                         # no tensor changes type: the input's layout, copied and patched
    verify: bool


# Past about 1e7 the untouched values' weight of 1 falls below f32's resolution of the error sums, so a larger weight
# changes nothing but the risk of overflowing them (1e20: numpy's overflow warnings on stderr and wrong choices)
MAX_TOUCHED_WEIGHT = 1e6


def _touched_weight(value) -> float:
    """The encoder's weight on delta-carrying values: a number in (0, MAX_TOUCHED_WEIGHT] (1 weighs them like the
    rest); anything else would silently make the search ignore or invert what it is there to keep, or overflow."""
    try:
        w = float(value)
    except (TypeError, ValueError):
        w = math.nan
    if not 0 < w <= MAX_TOUCHED_WEIGHT:  # (NaN fails both)
        raise NeuroAdaUsageError(f"--option touched_weight must be a number > 0 and at most {MAX_TOUCHED_WEIGHT:g}, "
                                 f"got {value!r}")
    return w


def _outputs(view: GGUFBase, out: str) -> list[str]:
    """The paths a merge into OUT writes: a split set's copy is a set of as many shards (`output_shards`), a file's
    is OUT itself."""
    return output_shards(out, len(view.file.shards)) if isinstance(view.file, GGUFSet) else [out]


class GGUFBackend(Backend):
    """neuroada-merge into a GGUF file or split set (copy only: a GGUF is not patched in place)."""

    format = "gguf"

    def __init__(self, *, requant=None, target_type=None, encoder: str = "search", touched_weight: float = 100.0):
        self.requant = None if requant is None else qtype(requant)
        self.target_type = None if target_type is None else qtype(target_type)
        if encoder not in ("search", "naive"):
            raise NeuroAdaUsageError(f"unknown encoder {encoder!r} (search, naive)")
        self.encoder = encoder
        self.touched_weight = _touched_weight(touched_weight)

    def configured(self, **options) -> "GGUFBackend":
        """A GGUF backend with its own options: requant, target_type, encoder, touched_weight
        (`merge(..., options=)`, or `neuroada-merge --option requant=Q8_0` on the command line)."""
        known = {"requant", "target_type", "encoder", "touched_weight"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise NeuroAdaUsageError(f"GGUF merges take the options {', '.join(sorted(known))}; "
                                     f"unknown: {', '.join(unknown)}")
        kept = {"requant": self.requant, "target_type": self.target_type, "encoder": self.encoder,
                "touched_weight": self.touched_weight}
        return GGUFBackend(**{**kept, **options})

    def open(self, path: str) -> GGUFBase:
        return open_gguf_base(path)

    def inputs(self, view: GGUFBase) -> list[str]:
        return [s.path for s in view.file.shards] if isinstance(view.file, GGUFSet) else [view.path]

    def output_name(self, view: GGUFBase, out: str) -> str:
        """A split set's copy is a split set of as many shards (`output_shards`): its first shard is what is
        published last and named in the summary."""
        return _outputs(view, out)[0]

    def companions(self, view: GGUFBase, out: str) -> list[str]:
        return _outputs(view, out)[1:]

    def claim_output(self, view: GGUFBase, out: str):
        """A split set's shards are several renames (`durable.publish_together`): OUT's lock is held for the whole
        write; one file needs none."""
        return claiming_output(view, out) if isinstance(view.file, GGUFSet) else nullcontext()

    def resolve(self, view: GGUFBase, adapters, *, verify: bool) -> Resolved:
        by_tensor: dict[str, list] = {}
        for adapter, scale in adapters:
            report = validate(adapter, view, probes=False)  # rules 3.x and 4.1/4.2 through the view
            report.raise_if_invalid()
            for name, t in adapter.targets.items():
                mapped = view.resolve(name)
                if t.layout != ("in_out" if mapped.transposed else "out_in"):  # (validate compared the shapes only)
                    raise Mismatch(f"GGUF stores {mapped.gguf_name} as [d_out, d_in], which the checkpoint holds "
                                   f"{'transposed' if mapped.transposed else 'as it is'}; a {t.layout} target has "
                                   f"no mapping", path=view.path, tensor=name, rule="4.2")
                by_tensor.setdefault(mapped.gguf_name, []).append((name, t, scale, adapter))
        warnings = []  # tensors that keep their block type are counted as they are written (`write`)
        retyped = sorted(g for g in by_tensor if self._out_type(view, view.file.tensors[g]) in QUANT_TYPES
                         and self._out_type(view, view.file.tensors[g]) != view.file.tensors[g].type)
        if retyped:
            t = self._out_type(view, view.file.tensors[retyped[0]])
            warnings.append(f"{len(retyped)} touched tensors are re-encoded into a block type (e.g. {retyped[0]}: "
                            f"{t.name}); their merged values are not exact (spec section 15.3); "
                            f"--option target_type=F32 keeps them exact (F16 rounds each value of those tensors once)")
        if self.requant is not None and (self.target_type is not None
                                         or all(view.file.tensors[g].type in ENCODABLE for g in by_tensor)):
            warnings.append(f"requant={self.requant.name} applies only to tensor types that cannot be re-encoded "
                            f"here (most IQ types), and no touched tensor has one: it changes nothing "
                            f"(--option target_type= sets the type of every touched tensor)")
        return Resolved(by_tensor, len(by_tensor), warnings)

    def _out_type(self, view: GGUFBase, info: TensorInfo) -> QT:
        if self.target_type is not None:
            return self.target_type
        if info.type in ENCODABLE:
            return info.type
        if self.requant is not None:
            return self.requant
        raise NeuroAdaUsageError(f"tensor type {info.type.name} can be read but not re-encoded here; "
                                 f"name a type for the touched tensors with --option requant=Q8_0 (or F16)",
                                 path=view.path, tensor=info.name)

    def plan(self, view: GGUFBase, resolved: Resolved, *, verify: bool, in_place: bool) -> _Plan:
        """When every touched tensor keeps its type (the usual merge) nothing is read here but each
        adapter's smallest target (its probe hash, so a wrong base fails before the copy starts): the
        write merges every tensor as it copies it and checks the other probe hashes from that same read.
        A merge that changes types works every tensor out here (the file is laid out anew)."""
        plans = {}
        for gname, entries in resolved.data.items():
            info = view.file.tensors[gname]
            out_type = self._out_type(view, info)
            if out_type in QUANT_TYPES and info.ne[0] % GGML_QUANT_SIZES[out_type][0]:
                raise NeuroAdaUsageError(f"rows of {info.ne[0]} values do not split into {out_type.name} blocks",
                                         path=view.path, tensor=gname)
            mapped = view.resolve(entries[0][0])
            deltas = []
            for name, t, scale, _ in entries:
                idx, val = np.asarray(t.indices), np.asarray(t.values)
                if mapped.perm is not None:  # adapter rows into GGUF row order
                    idx, val = idx[mapped.perm], val[mapped.perm]
                deltas.append(Delta(idx, val, scale))
            plans[gname] = _TensorPlan(info, out_type, deltas, [(n, t, a) for n, t, _, a in entries], mapped.inverse)
        same_layout = all(tp.out_type == tp.info.type for tp in plans.values())
        if same_layout:
            if verify:
                _first_probes(view, plans)
            return _Plan(plans, 0, True, verify)
        touched = 0
        for gname, tp in plans.items():
            touched += self._plan_whole(view, tp, verify)
        return _Plan(plans, touched, False, verify)

    def _plan_whole(self, view: GGUFBase, tp: _TensorPlan, verify: bool) -> int:
        """One tensor of a merge that changes types: merged values and checked probes; for a tensor that keeps its
        type the units to patch. A re-typed tensor's new bytes are made as it is written (`_retyped_bytes`), one
        tensor at a time: made here, all of them were held at once (a 7B file re-typed to F16: about 13 GB)."""
        info, out_type, gname = tp.info, tp.out_type, tp.info.name
        weight = view.file.decode(gname)  # float types: as stored; block types: exact f32 decode
        mp = plan_merge(weight, tp.deltas, checked=True)
        if verify:
            _check_probes(tp, [mp.originals_of(i) for i in range(len(tp.deltas))])
        tp.positions = mp.positions
        if tp.retyped:
            return int(mp.positions.size)
        if out_type == info.type and info.type in FLOAT_TYPES:
            tp.patch = (mp.positions, mp.merged.view(np.uint8).reshape(mp.positions.size, -1))
        elif out_type == info.type:
            block = GGML_QUANT_SIZES[info.type][0]
            ids, new, tp.on_grid = _reencode(info.type, weight.reshape(-1, block), view.file.blocks(gname), mp,
                                             block, self.encoder, self.touched_weight, (view.file.path, gname),
                                             row_blocks=info.ne[0] // block)
            tp.reencoded = int(ids.size) - tp.on_grid
            tp.patch = (ids, new)
        return int(mp.positions.size)

    def _retyped_bytes(self, view: GGUFBase, tp: _TensorPlan) -> bytes:
        """A re-typed tensor's new bytes: its merged values (the merge worked out again, as planned) in the new type."""
        info, out_type, gname = tp.info, tp.out_type, tp.info.name
        weight = view.file.decode(gname)
        mp = plan_merge(weight, tp.deltas, checked=True)
        full = np.array(weight, dtype=np.float32).reshape(-1)
        full[mp.positions] = mp.merged
        if out_type in FLOAT_TYPES:
            with np.errstate(over="ignore"):
                data = full.astype(_numpy_dtype(out_type))
            lost = ~np.isfinite(data.astype(np.float32)) & np.isfinite(full)
            touched = int(lost[mp.positions].sum())
            if int(lost.sum()) > touched:  # base values the adapter never touched: not ours to turn into Inf
                raise NeuroAdaError(f"{int(lost.sum()) - touched} values of the base that the adapter does not "
                                    f"touch lie beyond the {out_type.name} range; re-type it to F32 instead",
                                    path=view.path, tensor=info.name)
            if touched:  # as for a base of that type: the rule rounds them to +-Inf, and says so
                warnings.warn(MergeOverflowWarning(out_type.name, touched), stacklevel=2)
            return data.tobytes()
        _refuse_nonfinite_retyped(info, out_type, weight, view.file.path)
        _refuse_unencodable(out_type, mp, (view.file.path, gname))
        _refuse_unencodable_base(out_type, full, mp.positions, (view.file.path, gname))
        block = GGML_QUANT_SIZES[out_type][0]
        return encode_blocks(out_type, full.reshape(-1, block), method=self.encoder).tobytes()

    def _fill(self, view: GGUFBase, f: GGUFFile, plan: _Plan, tmp: str, out: str, progress: bool) -> dict:
        """Write the merged copy of one file (a whole base, or one shard of a set: its tensors only) into tmp."""
        mine = {g: tp for g, tp in plan.tensors.items() if g in f.tensors}
        if plan.same_layout:
            with bar(f.size, f"merge -> {os.path.basename(out)}", enabled=progress) as pbar:
                values, units = _write_same_layout(f, _Plan(mine, 0, True, plan.verify), tmp, self.encoder,
                                                   self.touched_weight, pbar)
            return {"bytes": f.size, "values": values, "units": units}
        written = _write_retyped(f, plan, tmp, lambda tp: self._retyped_bytes(view, tp))
        return {"bytes": written, "values": sum(int(tp.positions.size) for tp in mine.values()),
                "units": sum(int(tp.patch[0].size) for tp in mine.values() if tp.patch is not None)}

    def write(self, view: GGUFBase, plan: _Plan, out: str, *, overwrite: bool, durable: bool,
              progress: bool) -> Written:
        f = view.file
        if isinstance(f, GGUFSet):
            counts, shards, removed = self._write_set(view, plan, out, overwrite=overwrite, durable=durable,
                                                      progress=progress)
        else:
            counts, shards, removed = {}, None, []

            def fill(tmp: str) -> None:
                counts.update(self._fill(view, f, plan, tmp, out, progress))
            write_file(out, fill, overwrite=overwrite, durable=durable, mode=derived_mode(os.stat(f.path).st_mode))
        details = {"retyped": {g: tp.out_type.name for g, tp in plan.tensors.items() if tp.retyped},
                   "units_rewritten": counts["units"], "encoder": self.encoder}
        if shards is not None:
            details["shards"] = shards
        warnings = []
        kept = [tp for tp in plan.tensors.values() if tp.out_type == tp.info.type and tp.info.type not in FLOAT_TYPES]
        if kept:
            on, off = sum(tp.on_grid for tp in kept), sum(tp.reencoded for tp in kept)
            details.update(blocks_on_grid=on, blocks_reencoded=off)
            types = "/".join(sorted({tp.info.type.name for tp in kept}))
            if off:
                worst = max(kept, key=lambda tp: tp.reencoded)
                warnings.append(
                    f"{off:,} of {on + off:,} touched blocks in {sum(tp.reencoded > 0 for tp in kept)} of {len(kept)} "
                    f"block-quantized tensors (most in {worst.info.name}: {worst.info.type.name}) were re-encoded: "
                    f"their merged values are off the block's grid, so they are not exact (spec section 15.3); "
                    f"{on:,} were packed exactly on their original grid; --option target_type=F32 keeps every "
                    f"value exact (F16 rounds each once), and training through the grid (runtime train_on_grid) "
                    f"keeps them on it")
                details["note"] = f"{types} targets: {off:,} of {on + off:,} touched blocks re-encoded, not exact"
            else:
                details["note"] = (f"{types} targets exact: all {on:,} touched blocks packed on their original "
                                   f"grid")
        return Written(counts["values"], 1 if shards is None else len(shards), counts["bytes"], details=details,
                       warnings=warnings, removed_stale=removed)

    def _write_set(self, view: GGUFBase, plan: _Plan, out: str, *, overwrite: bool, durable: bool,
                   progress: bool) -> tuple[dict, list[dict], list[str]]:
        """A split set's copy: every shard merged into a temporary sibling of its final name (`output_shards`) with
        its own layout and metadata, then all published together, the first shard last (`durable.publish_together`):
        a failure or kill before the renames leaves nothing under the final names, one between them leaves later
        shards without a first, which llama.cpp cannot load and the next merge to OUT removes. Returns the totals
        and, per shard, its path, touched tensors, values and bytes (the summary's details.shards)."""
        finals = _outputs(view, out)
        totals, shards, temps = {"bytes": 0, "values": 0, "units": 0}, [], []
        claim = getattr(view, "claim", None) or OutputClaim(finals[0], None)  # (write called without the driver)
        try:
            for shard, final in zip(view.file.shards, finals):
                counts = {}

                def fill(tmp: str, shard=shard, final=final, counts=counts) -> None:
                    counts.update(self._fill(view, shard, plan, tmp, final, progress))
                temps.append(filled_sibling(final, fill, durable=durable,
                                            mode=derived_mode(os.stat(shard.path).st_mode)))
                for k in totals:
                    totals[k] += counts[k]
                shards.append({"path": final, "tensors_touched": sum(g in shard.tensors for g in plan.tensors),
                               "values_touched": counts["values"], "bytes": counts["bytes"]})
            for final in finals:  # (an OUT shard appearing meanwhile: refused now, before any rename)
                if os.path.lexists(final) and not overwrite:
                    raise NeuroAdaUsageError("output already exists; pass --overwrite to replace it", path=final)
            publish_together(finals[0], temps[0], dict(zip(finals[1:], temps[1:])), overwrite=overwrite,
                             durable=durable, claim=claim)
            temps.clear()
        finally:
            for tmp in temps:
                if os.path.lexists(tmp):
                    remove(tmp)
        return totals, shards, list(claim.removed)


def _check_probes(tp: _TensorPlan, originals: list[np.ndarray]) -> None:
    """Rule 4.3 for every adapter's target in this tensor: originals[i] are delta i's base values in GGUF
    row order ([d_out, k] once reshaped); the probe hash covers them in canonical (Hugging Face) order."""
    for values, (name, t, adapter) in zip(originals, tp.sources):
        probed = np.asarray(values).reshape(t.indices.shape)
        if tp.inverse is not None:
            probed = probed[tp.inverse]
        if probe_hash_from_values(probed) != t.probe:
            raise Mismatch(PROBE_MISMATCH, path=adapter.path, tensor=name, rule="4.3")


def _first_probes(view: GGUFBase, plans: dict[str, _TensorPlan]) -> None:
    """Each adapter's smallest target checked against the base at once (reading that tensor only), so a
    merge onto the wrong base fails in milliseconds; the write checks every target as it copies it."""
    smallest: dict[int, tuple] = {}
    for tp in plans.values():
        for i, (name, t, adapter) in enumerate(tp.sources):
            key = (t.d_out * t.k, name)
            if id(adapter) not in smallest or key < smallest[id(adapter)][0]:
                smallest[id(adapter)] = (key, tp, i)
    for _, tp, i in smallest.values():
        name, t, adapter = tp.sources[i]
        if probe_hash_from_values(view.probed(name, t.indices)) != t.probe:
            raise Mismatch(PROBE_MISMATCH, path=adapter.path, tensor=name, rule="4.3")


# The largest |merged value| a block of each type can encode: its scale (and minimum) are stored as F16 (at most
# 65504), times the largest level for the symmetric types; a type with a minimum needs the value itself in range.
# For Q4_1/Q5_1 that is sufficient, not necessary: d * q + m with F16 d and m reaches 16 * 65504 (Q5_1: 32 *), and a
# block spanning [0, 9.8e5] encodes (m = 0, d = 65333), but whether a block fits depends on its spread (the encoders
# here need min >= -65504 and max - min <= 15 * 65504, or 31 *) and on its untouched values, not on any one value:
# a block of -5e5 and +5e5 stays under 16 * 65504 and cannot be encoded. So no per-value bound is exact; this one
# never lets an unencodable block through, and refuses only bases whose scales are already at the F16 maximum.
# Q4_K/Q5_K likewise: with llama.cpp's d >= 0 (ours) a negative value is reached only by the minimum dmin * mn, at
# most 65504 * 63 (a bound of d * sc * q's 65504 * 63 * 15 let the fresh encoder's dmin overflow to Inf); Q2_K's 4-bit
# minimums reach 65504 * 15.
_F16_MAX = 65504.0
BLOCK_VALUE_MAX = {QT.Q8_0: _F16_MAX * 127, QT.Q4_0: _F16_MAX * 8, QT.Q5_0: _F16_MAX * 16, QT.Q4_1: _F16_MAX,
                   QT.Q5_1: _F16_MAX, QT.Q6_K: _F16_MAX * 127 * 32, QT.Q4_K: _F16_MAX * 63,
                   QT.Q5_K: _F16_MAX * 63, QT.Q3_K: _F16_MAX * 32 * 4, QT.IQ4_XS: _F16_MAX * 32 * 127,
                   QT.IQ4_NL: _F16_MAX * 127, QT.Q2_K: _F16_MAX * 15}


def _refuse_unencodable(t: QT, mp, where: tuple[str, str]) -> None:
    """A merged value beyond what the block type holds cannot be encoded (the scale would overflow to Inf and
    the whole block, untouched values included, would decode to zeros or NaN): refused, with the way out."""
    limit = BLOCK_VALUE_MAX.get(t)
    if limit is None or not mp.merged.size:
        return
    with np.errstate(invalid="ignore"):
        big = np.abs(mp.merged.astype(np.float32))
    bad = ~(big <= limit)  # NaN and Inf too
    if bad.any():
        raise NeuroAdaError(f"{int(bad.sum())} merged values reach {float(np.nanmax(big)):.4g}, beyond what a {t.name} "
                            f"block can encode (F16 scales: |value| up to {limit:.4g}); merge with a smaller scale, or "
                            "re-type the tensor with --option target_type=F32", path=where[0], tensor=where[1])


def _refuse_unencodable_base(t: QT, full: np.ndarray, positions: np.ndarray, where: tuple[str, str]) -> None:
    """A tensor re-typed into a block type has every block encoded afresh, so an untouched base value beyond what the
    type holds (a float base's) would lose its whole block as a touched one would: refused, blaming the base, as an
    untouched value beyond F16 is when re-typing to F16. full: the merged tensor, flat; positions: the touched ones."""
    limit = BLOCK_VALUE_MAX.get(t)
    if limit is None:
        return
    bad = ~(np.abs(full) <= limit)
    bad[positions] = False  # (the adapter's values: `_refuse_unencodable`)
    if bad.any():
        raise NeuroAdaError(f"{int(bad.sum())} values of the base that the adapter does not touch lie beyond what a "
                            f"{t.name} block can encode (F16 scales: |value| up to {limit:.4g}); re-type the tensor "
                            f"with --option target_type=F32 instead", path=where[0], tensor=where[1], rule=RULE)


def _scale_words(t: QT) -> str:
    """What a block of type t stores as F16 and scales its levels by: a scale, and for some types a minimum."""
    return "scale or minimum" if t in (QT.Q4_1, QT.Q5_1, QT.Q2_K, QT.Q4_K, QT.Q5_K) else "scale"


def _refuse_nonfinite(t: QT, before: np.ndarray, ids: np.ndarray, where: tuple[str, str], *, block0: int = 0,
                      row_blocks: int = 0) -> None:
    """Touched base blocks that decode to NaN or Inf cannot be re-encoded (no scale holds them, and a NaN never lies
    on a grid): a damaged base, refused under rule 1.6 with the first such block, before the adapter's scale is
    blamed (`_refuse_unencodable` saw the NaN-poisoned merged values as out of range). With finite F16 scales
    every block type here decodes to finite values, so the cause is a NaN or Inf scale (or minimum) in the block.
    before: the blocks' decoded values [n, block]; ids: their block numbers (plus block0: the first block of the
    rows they were read with); row_blocks: blocks per row, to say where the block lies (0: not said)."""
    bad = ~np.isfinite(before).all(axis=1)
    if not bad.any():
        return
    first = int(block0 + ids[bad.argmax()])
    n = before.shape[1]
    at = f"block {first}" if not row_blocks else (f"block {first} (GGUF row {first // row_blocks}, columns "
                                                  f"{first % row_blocks * n}-{first % row_blocks * n + n - 1})")
    scales = _scale_words(t)
    raise NeuroAdaError(f"base {t.name} {at} holds non-finite values (NaN/Inf: its F16 {scales} is NaN or Inf), and "
                        f"the merge touches it: no block can re-encode them; the base file is damaged",
                        path=where[0], tensor=where[1], rule=RULE)


def _refuse_nonfinite_retyped(info: TensorInfo, out_type: QT, weight: np.ndarray, path: str) -> None:
    """A tensor re-typed into a block type has every block encoded anew: a NaN/Inf base value (from a NaN or Inf
    block scale, or stored so in a float tensor) would be written as a NaN scale with numpy's 'invalid value'
    warnings and exit 0. Refused under rule 1.6, naming the first such position; F16/F32 carry them (section 8.1)."""
    bad = ~np.isfinite(np.asarray(weight, dtype=np.float32).reshape(-1))
    if not bad.any():
        return
    row, col = divmod(int(bad.argmax()), info.ne[0])
    cause = (f"a {info.type.name} block's F16 {_scale_words(info.type)} is NaN or Inf" if info.type not in FLOAT_TYPES
             else f"stored so in {info.type.name}")
    raise NeuroAdaError(f"the base holds non-finite values (NaN/Inf: {cause}) at {int(bad.sum())} positions, first "
                        f"GGUF row {row}, column {col}; re-encoding the tensor into {out_type.name} blocks cannot "
                        f"hold them (re-type it to F16 or F32, which keep them)", path=path, tensor=info.name,
                        rule=RULE)


def _reencode(t: QT, values: np.ndarray, blocks: np.ndarray, mp, block: int, encoder: str,
              touched_weight: float, where: tuple[str, str], *, block0: int = 0,
              row_blocks: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """The blocks holding a merged value, re-encoded: (block ids, their new bytes [n, type_size], how many
    of them were packed exactly on their original grid). values: the decoded tensor (or rows of it) as
    [n_blocks, block]; blocks: its bytes, one row per block; mp: its MergePlan. Blocks whose merged values
    all lie on their original grid are packed on it (`on_original_grid`: exact, no search); the others
    go to `encode_blocks`. Every other block is left as it is. where: (file, tensor) for errors; block0 and
    row_blocks: the number of the first block of `values` in the tensor and the blocks per row, for them."""
    which = mp.positions // block
    if which.size:  # positions are sorted, so their blocks are too: distinct ones without a sort
        keep = np.empty(which.size, bool)
        keep[0] = True
        np.not_equal(which[1:], which[:-1], out=keep[1:])
        ids = which[keep]
    else:
        ids = which
    before = np.array(values[ids], dtype=np.float32)
    _refuse_nonfinite(t, before, ids, where, block0=block0, row_blocks=row_blocks)
    _refuse_unencodable(t, mp, where)
    original = np.asarray(blocks[ids])
    where, col = np.searchsorted(ids, which), mp.positions % block
    on, out = on_original_grid(t, original, before, where, col, mp.merged)
    n_on = int(on.sum())
    if n_on == ids.size:
        return ids, out, n_on
    target = before.copy()
    target[where, col] = mp.merged
    mask = np.zeros(target.shape, bool)
    mask[where, col] = True
    if n_on == 0:  # (an adapter not trained on the grid: no copies of the blocks for the encoder)
        return ids, encode_blocks(t, target, original, mask, method=encoder, touched_weight=touched_weight,
                                  decoded=before), 0
    rest = ~on
    out[rest] = encode_blocks(t, target[rest], original[rest], mask[rest], method=encoder,
                              touched_weight=touched_weight, decoded=before[rest])
    return ids, out, n_on


def _write_same_layout(f: GGUFFile, plan: _Plan, tmp: str, encoder: str, touched_weight: float,
                       progress) -> tuple[int, int]:
    """The output when no tensor changes type: the input's layout exactly (header, metadata, tensor table,
    alignment, offsets), written once, front to back by one `_Writer`: the kernel copies each untouched
    range (sendfile), and each touched tensor is read a block of rows at a time into a buffer, its merged
    values (float types) or re-encoded blocks (quantized) are patched in, and the writer writes the block
    at its offset while this thread merges the next one.

    Why one writer in file order: on the development VM's ext4, a thread copying the untouched ranges
    while another wrote the merged ones made the same merge 2x slower (median), and copying the whole
    file first then storing the merged values into it through a map wrote the touched bytes twice.
    Returns (values merged, units rewritten: elements of float tensors, blocks of quantized ones).
    """
    touched = sorted(plan.tensors.values(), key=lambda tp: tp.info.offset)
    per_rows = {tp.info.name: _rows_per_chunk(tp.info) for tp in touched}
    size = max((per_rows[tp.info.name] * _row_bytes(tp.info) for tp in touched), default=0)
    values = units = pos = 0
    with f.reopen() as src:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        writer = _Writer(src.fileno(), fd, size, progress)
        try:
            for tp in touched:
                start = f.data_start + tp.info.offset
                if start > pos:
                    writer.copy(pos, start)
                v, u = _merge_tensor(src.fileno(), start, tp, per_rows[tp.info.name], writer, plan.verify,
                                     encoder, touched_weight, f.path)
                values, units, pos = values + v, units + u, start + tp.info.nbytes
                pause_for_tests()
            if pos < f.size:
                writer.copy(pos, f.size)
            writer.finish()
        finally:
            writer.stop()
            os.close(fd)
    return values, units


class _Writer:
    """The output's one writer, on a thread of its own, in file order: untouched ranges by the kernel
    (`_send`), merged blocks of rows from buffers handed over by `write`. Two buffers rotate, so the
    merge of one block overlaps the write of the one before. A failed write is raised by the next
    `buffer` or by `finish`; `stop` drops what is queued and waits for the thread."""

    def __init__(self, src_fd: int, dst_fd: int, buffer_bytes: int, progress, buffers: int = 2):
        self.src_fd, self.dst_fd, self.progress = src_fd, dst_fd, progress
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(buffers if buffer_bytes else 0):
            self.free.put(np.empty(buffer_bytes, np.uint8))
        self.error: BaseException | None = None
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gguf-merge-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while (job := self.jobs.get()) is not None and not self.halt.is_set():
                if job[0] == "copy":
                    _send(self.src_fd, self.dst_fd, job[1], job[2], self.progress, self.halt)
                else:
                    _, buf, n, offset = job
                    write_exactly(self.dst_fd, memoryview(buf[:n]), offset)
                    self.progress.update(n)
                    self.free.put(buf)
        except BaseException as exc:  # handed to the merging thread
            self.error = exc
            self.free.put(None)  # wakes a `buffer` call waiting for a free one

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def buffer(self) -> np.ndarray:
        """A free buffer (waits while both are being written)."""
        self._raise()
        buf = self.free.get()
        if buf is None:
            self._raise()
        return buf

    def copy(self, start: int, end: int) -> None:
        self._raise()
        self.jobs.put(("copy", start, end))

    def write(self, buf: np.ndarray, n: int, offset: int) -> None:
        """Write buf[:n] at offset; buf is not touched again until `buffer` returns it."""
        self.jobs.put(("write", buf, n, offset))

    def finish(self) -> None:
        """Wait for everything queued; raise a failed write."""
        self.jobs.put(None)
        self.thread.join()
        self._raise()

    def stop(self) -> None:
        self.halt.set()
        self.jobs.put(None)
        self.thread.join()


def _row_bytes(info: TensorInfo) -> int:
    block, type_size = GGML_QUANT_SIZES[info.type]
    return info.ne[0] // block * type_size


def _rows_per_chunk(info: TensorInfo) -> int:
    rows = info.shape[0]
    if info.type in FLOAT_TYPES:
        return min(rows, max(1, BLOCK_BYTES // _row_bytes(info)))
    return min(rows, max(1, kq.batch_values(info.type, BLOCK_VALUES) // info.ne[0]))


def _decode_touched(blocks: np.ndarray, info: TensorInfo, deltas: list[Delta]) -> np.ndarray:
    """Rows of a block-quantized tensor (their blocks' bytes [n, type_size]) as values [rows, cols], decoded only in
    the blocks that hold a delta's column: the merge reads no other value (at k=20 most blocks of a row hold none,
    and decoding them all was a fifth of a Q4_1 merge's time); the others are NaN, which no merge would accept."""
    block = GGML_QUANT_SIZES[info.type][0]
    per_row = info.ne[0] // block
    rows = len(blocks) // per_row
    held = np.zeros((rows, per_row), bool)
    for d in deltas:
        held[np.arange(rows)[:, None], np.asarray(d.indices) // block] = True
    ids = np.flatnonzero(held)
    out = np.full((len(blocks), block), np.nan, np.float32)
    out[ids] = _decode(blocks[ids], info.type).reshape(-1, block)
    return out.reshape(rows, info.ne[0])


def _merge_tensor(src_fd: int, start: int, tp: _TensorPlan, per: int, writer: _Writer, verify: bool, encoder: str,
                  touched_weight: float, path: str) -> tuple[int, int]:
    """Merge one touched tensor, `per` rows at a time: the rows are read from the input into a buffer of
    the writer's; float rows get rule M and the merged values are patched in; quantized rows are decoded
    and merged, and only the blocks holding a touched value are re-encoded (`_reencode`) and patched in,
    so every other block keeps its bytes; the writer then writes the buffer at the rows' offset. The
    probe hashes are checked from the same read, at the end (a mismatch stops the merge before the file
    is published)."""
    info = tp.info
    rows, row_bytes = info.shape[0], _row_bytes(info)
    block, unit = GGML_QUANT_SIZES[info.type]
    floats = info.type in FLOAT_TYPES
    originals = [np.empty(d.indices.shape, np.float32) for d in tp.deltas] if verify else None
    values = units = 0
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        a, b = r0 * row_bytes, r1 * row_bytes
        buf = writer.buffer()
        chunk = buf[:b - a]
        read_exactly(src_fd, memoryview(chunk), start + a)
        deltas = [Delta(d.indices[r0:r1], d.values[r0:r1], d.scale) for d in tp.deltas]
        if floats:
            weight = chunk.view(_numpy_dtype(info.type)).reshape(r1 - r0, info.ne[0])
        else:
            weight = _decode_touched(chunk.reshape(-1, unit), info, deltas)
        mp = plan_merge(weight, deltas, checked=True)
        if originals is not None:
            for i, o in enumerate(originals):
                o[r0:r1] = mp.originals_of(i).reshape(r1 - r0, -1)
        if floats:
            weight.reshape(-1)[mp.positions] = mp.merged  # weight is a view of chunk
            units += int(mp.positions.size)
        else:
            ids, new, on = _reencode(info.type, weight.reshape(-1, block), chunk.reshape(-1, unit), mp, block,
                                     encoder, touched_weight, (path, info.name), block0=r0 * (info.ne[0] // block),
                                     row_blocks=info.ne[0] // block)
            tp.on_grid, tp.reencoded = tp.on_grid + on, tp.reencoded + int(ids.size) - on
            chunk.reshape(-1, unit)[ids] = new
            units += int(ids.size)
        del chunk, weight
        writer.write(buf, b - a, start + a)
        values += int(mp.positions.size)
    if originals is not None:
        _check_probes(tp, originals)
    return values, units


def _write_retyped(f: GGUFFile, plan: _Plan, tmp: str, retyped_bytes) -> int:
    """A new file: header and metadata bytes verbatim, a new tensor table, data re-laid out aligned. A re-typed
    tensor's bytes come from `retyped_bytes(tensor plan)` as it is written, one tensor in memory at a time."""
    with f.reopen() as src:
        head = src.read(f.infos_start)
    table, layout, offset = bytearray(), [], 0
    for name, info in f.tensors.items():
        tp = plan.tensors.get(name)
        t = tp.out_type if tp is not None and tp.retyped else info.type
        nbytes = tp.out_nbytes if tp is not None and tp.retyped else info.nbytes
        enc = name.encode("utf-8")
        table += struct.pack("<Q", len(enc)) + enc + struct.pack("<I", len(info.ne))
        table += b"".join(struct.pack("<Q", d) for d in info.ne) + struct.pack("<IQ", int(t), offset)
        layout.append((name, offset, nbytes))
        offset = -(-(offset + nbytes) // f.alignment) * f.alignment
    header = head + bytes(table)
    data_start = -(-len(header) // f.alignment) * f.alignment
    with open(tmp, "wb") as out, f.reopen() as src:
        out.write(header + b"\0" * (data_start - len(header)))
        for name, off, nbytes in layout:
            pause_for_tests()
            out.seek(data_start + off)
            tp = plan.tensors.get(name)
            if tp is not None and tp.retyped:
                data = retyped_bytes(tp)
                if len(data) != nbytes:  # the table was written with the size the type implies
                    raise AssertionError(f"{name}: {len(data)} bytes, the table says {nbytes}")
                out.write(data)
                continue
            chunk = np.empty(nbytes, np.uint8)  # read from the file opened for the copy (type kept: same size)
            read_exactly(src.fileno(), memoryview(chunk), f.data_start + f.tensors[name].offset)
            if tp is not None:  # type kept: patch its units in the copy
                unit = tp.patch[1].shape[1]
                chunk.reshape(-1, unit)[tp.patch[0]] = tp.patch[1]
            out.write(chunk.data)
        end = data_start + offset
        out.truncate(end)
    return end


BACKEND = GGUFBackend()


def merge_gguf(base, adapters, out, *, requant=None, target_type=None, encoder: str = "search",
               touched_weight: float = 100.0, verify: bool = True, overwrite: bool = False, durable: bool = False):
    """Merge adapters into a GGUF file with the GGUF-only options, through the seam's driver."""
    from . import backend as seam
    options = {"requant": requant, "target_type": target_type, "encoder": encoder, "touched_weight": touched_weight}
    return seam.merge(base, adapters, out, verify=verify, overwrite=overwrite, durable=durable, format="gguf",
                      options=options)
