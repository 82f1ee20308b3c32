"""PEFT interop: NeuroAda adapters to and from PEFT Super-Tuning folders, exactly.

PEFT's Super-Tuning (peft >= 0.21, `SupertuningConfig(save_precomputed_indices=True)`) stores per
module a flat int32 `supertuning_indices` (positions r * d_in + c of the [out, in] weight) and f32
`supertuning_values`, and applies them as `W.view(-1).scatter_add(0, idx, val.to(W.dtype))`: each
value cast to the base dtype, added in f32 and rounded once. One `sparsity` per folder sets every
module's entry count to `int(numel * (1 - sparsity))`.

Export (`to_peft`): a per-row top-k adapter is a set of d_out * k flat positions, so it fits exactly
once every module is padded to that count. The sparsity is the largest one that leaves every target
room for its entries (found by bisection on the float, evaluating PEFT's own expression); each
module's real entries come first (row-major), then padding entries of value -0.0 at the lowest
unused positions. -0.0 is the additive identity of IEEE arithmetic (x + -0.0 == x bit for bit, -0.0
included), so padding changes nothing, while +0.0 would turn a -0.0 base value into +0.0. The merge
is then ours bit for bit whenever each value is exact in its base dtype (always for F32 bases; BF16
values on BF16 or F32 bases); other adapters are refused unless `allow_inexact`. Our metadata
document rides along in the safetensors `__metadata__` (PEFT ignores it) so that the way back is
byte-identical.

Import (`import_peft` / `from_peft`): the base is needed (to know d_in and to compute our probe
hashes). With our embedded document and entries that still fit it, the original adapter comes back
exactly. Otherwise entries are grouped by row: the value taken is the one PEFT applies
(`val.to(base dtype)`), -0.0 entries are dropped (identities), k is the longest row and shorter rows
are padded per spec 4.5 (+0.0 at the lowest unused columns); the merge is then PEFT's bit for bit,
except that a -0.0 base value under a padding entry becomes +0.0 (equal as a number; the report
counts them). Duplicate positions, out-of-range positions, non-finite values, Supra (LoRA) parts,
`modules_to_save` and folders without stored indices are refused.

numpy only (the format core's strict reader parses PEFT's file too): torch and peft are never imported.
"""
from __future__ import annotations

import json
import os
import re
import signal
import struct
import threading
from contextlib import contextmanager
from decimal import ROUND_FLOOR, Decimal

import numpy as np

from neuroada_format import (Adapter, NeuroAdaError, NeuroAdaUsageError, Target, load, open_base, probe_hash,
                             validate)
from neuroada_format.adapter import from_document
from neuroada_format.container import Problems, SafetensorsFile, strict_json
from neuroada_format.dtypes import BASE_DTYPES, NUMPY_DTYPES, VALUE_DTYPES, index_dtype_for, nonfinite_mask
# PEFT's TaskType values (one list with the runtime's config); AutoPeftModelFor* and PeftModel pick their wrapper
# class from it
from neuroada_format.folder import OTHER_PEFT_HINT, TASK_TYPES
from neuroada_format.folder import WEIGHTS_NAME as NEUROADA_WEIGHTS
from neuroada_format.jsonparse import read_json
from neuroada_format.folder import TRAINED_EXTRAS_LOST, reading_adapter, warn_trained_extras
from neuroada_format.merge import padded_rows
from neuroada_format.metadata import METADATA_KEY, parse_document, version_for

PEFT_TYPE = "SUPERTUNING"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
INDICES_SUFFIX = ".supertuning_indices"
VALUES_SUFFIX = ".supertuning_values"
DTYPES_KEY = "neuroada_dtypes"    # __metadata__: {target: [index dtype, value dtype]} of the exported adapter
CONFIG_CAP = 1 << 20              # an adapter_config.json is a few hundred bytes
INT32_MAX = 2 ** 31 - 1
NEG_ZERO_F32 = np.uint32(0x80000000)
CREATED_BY = "neuroada-pack --from-peft"
# a transformers class name's ending -> the task type it implies (config.json "architectures")
_ARCH_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def peft_count(numel: int, sparsity: float) -> int:
    """PEFT's entry count for a module (SupertuningLayer._num_trainable), evaluated the same way."""
    return int(numel * (1 - sparsity))


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", b))[0]


def choose_sparsity(needs) -> float:
    """A sparsity s in [0, 1) with peft_count(numel, s) >= need for every (numel, need) and the
    fewest entries: the counts of the largest such s, written with as few decimals as give them.

    peft_count is non-increasing in s (each float operation is monotone), so a bisection over the
    bit patterns of non-negative doubles finds the exact boundary; s = 0 (every entry) always fits.
    """
    needs = [(int(n), int(m)) for n, m in needs]

    def fits(s):
        return all(peft_count(numel, s) >= need for numel, need in needs)

    lo, hi = _float_bits(0.0), _float_bits(1.0)  # fits(lo); hi is outside [0, 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(_bits_float(mid)):
            lo = mid
        else:
            hi = mid
    best = _bits_float(lo)
    # The config is read by people too: the shortest decimal below `best` that gives the same counts.
    counts = [peft_count(numel, best) for numel, _ in needs]
    for digits in range(1, 18):
        short = float(Decimal(best).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_FLOOR))
        if [peft_count(numel, short) for numel, _ in needs] == counts:
            return short
    return best


def _lowest_free(used_sorted: np.ndarray, count: int) -> np.ndarray:
    """The `count` lowest non-negative integers not in `used_sorted` (ascending, distinct).

    The j-th free number is j plus the number of used ones below it; with q_i = used_i - i (how many
    free numbers lie below used_i) that is j + #{i: q_i <= j}.
    """
    q = used_sorted - np.arange(used_sorted.size, dtype=np.int64)
    j = np.arange(count, dtype=np.int64)
    return j + np.searchsorted(q, j, side="right")


def _exact_in(values_f32: np.ndarray, dtype: str) -> np.ndarray:
    """True where an f32 value survives a round trip through `dtype` bit for bit."""
    with np.errstate(over="ignore"):
        back = values_f32.astype(NUMPY_DTYPES[dtype]).astype(np.float32)
    return back.view(np.uint32) == values_f32.view(np.uint32)


# -- export ----------------------------------------------------------------------------------------
def _module_of(name: str, layout: str, path=None, module=None) -> str:
    """The PEFT module a target is for: the module a 1.2 file records (a checkpoint naming the weight otherwise,
    SPEC 4.6), else the target's key without ``.weight``."""
    if layout != "out_in":
        raise NeuroAdaError("PEFT Super-Tuning wraps torch.nn.Linear only; this target is stored [in, out] "
                            "(GPT-2 Conv1D) and cannot be exported", path=path, tensor=name, rule="16")
    if isinstance(module, str) and module:
        return module
    if not name.endswith(".weight") or name == ".weight":
        raise NeuroAdaError("PEFT addresses a module's weight as <module>.weight; this target name does not "
                            "end in .weight", path=path, tensor=name, rule="16")
    return name[:-len(".weight")]


def _peft_config(sparsity: float, modules: list[str], base_model_name_or_path, revision, task_type) -> dict:
    """The adapter_config.json PEFT 0.21.2 writes for SupertuningConfig, without auto-filled fields."""
    return {
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "init_weights": True,
        "lora_alpha": None,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": PEFT_TYPE,
        "r": None,
        "revision": revision,
        "save_precomputed_indices": True,
        "select_top": True,
        "sparsity": sparsity,
        "target_modules": modules,
        "task_type": task_type,
    }


def peft_tensors(adapter: Adapter, *, allow_inexact: bool = False, base_dtypes: dict | None = None):
    """(sparsity, {PEFT key: array}, per-target stats) for an adapter (no file is written).

    base_dtypes: the dtype of each target's tensor in the base PEFT will load (PEFT casts values to
    it); by default the dtype the adapter records."""
    modules = {name: _module_of(name, t.layout, adapter.path, t.extra.get("module"))
               for name, t in adapter.targets.items()}
    for name, t in adapter.targets.items():
        if t.d_out * t.d_in > INT32_MAX:
            raise NeuroAdaError(f"{t.d_out} x {t.d_in} positions do not fit PEFT's int32 flat indices",
                                path=adapter.path, tensor=name, rule="16")
    sparsity = choose_sparsity((t.d_out * t.d_in, t.d_out * t.k) for t in adapter.targets.values())
    tensors, stats = {}, {}
    for name, t in sorted(adapter.targets.items()):
        vals = np.asarray(t.values).astype(np.float32).reshape(-1)   # BF16/F16/F32 -> F32 is exact
        dtype = (base_dtypes or {}).get(name, t.dtype)
        inexact = ~_exact_in(vals, dtype)
        if inexact.any() and not allow_inexact:
            i = int(np.argmax(inexact))
            raise NeuroAdaError(
                f"{int(inexact.sum())} values (first: row {i // t.k}, slot {i % t.k}, {float(vals[i])!r}) are not "
                f"exact in the base dtype {dtype}; PEFT casts each value to the base dtype before adding, so its "
                f"merge would differ from the spec's (f32 add, one rounding). Repack the values to {dtype} "
                f"first (neuroada-pack --repack --value-dtype {dtype}), or allow an inexact export "
                f"(--allow-inexact)", path=adapter.path, tensor=name, rule="16")
        numel = t.d_out * t.d_in
        real = (np.arange(t.d_out, dtype=np.int64)[:, None] * t.d_in
                + np.asarray(t.indices, dtype=np.int64)).reshape(-1)       # ascending: rows strictly increase
        count = peft_count(numel, sparsity)
        pad = _lowest_free(real, count - real.size)
        module = KEY_PREFIX + modules[name]
        tensors[module + INDICES_SUFFIX] = np.concatenate([real, pad]).astype(np.int32)
        tensors[module + VALUES_SUFFIX] = np.concatenate(
            [vals, np.full(pad.size, -0.0, dtype=np.float32)])
        stats[name] = {"k": t.k, "entries": int(real.size), "peft_entries": int(count), "padding": int(pad.size),
                       "inexact_values": int(inexact.sum())}
    return sparsity, tensors, stats


def _write_safetensors(path: str, tensors: dict, metadata: dict) -> None:
    """A safetensors file with sorted keys, so that one adapter always gives the same bytes (the
    safetensors library orders `__metadata__` by a randomly seeded hash map). Layout per spec 2.1."""
    kinds = {"i": ("I32", "<i4"), "f": ("F32", "<f4")}       # PEFT's int32 indices and f32 values
    header, offset, arrays = {"__metadata__": dict(sorted(metadata.items()))}, 0, []
    for name in sorted(tensors):
        dtype, layout = kinds[tensors[name].dtype.kind]
        a = np.ascontiguousarray(tensors[name], dtype=layout)
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for a in arrays:
            f.write(a.tobytes())


def _write_folder(out: str, files: dict, *, overwrite: bool, inputs) -> None:
    """Write {name: write(path)} into a temporary sibling folder and rename it to `out` as a whole."""
    from neuroada_format import durable

    out = durable.check_output(out, inputs=inputs, overwrite=overwrite, kind="folder")
    durable.remove_stale_siblings(out)
    tmp = durable.temp_sibling(out)
    try:
        with durable.naming_write_errors(out):
            os.mkdir(tmp, durable.default_mode(executable=True))
            for name, write in files.items():
                path = os.path.join(tmp, name)
                write(path)
                os.chmod(path, durable.default_mode())
                durable.fsync_path(path)
            durable.fsync_dir(tmp)
            durable.publish(tmp, out, overwrite=overwrite, durable=True)
    except BaseException:
        if os.path.lexists(tmp):
            durable.remove(tmp)
        raise


def task_type_of(base) -> str | None:
    """The PEFT task type a base's config.json `architectures` implies (GPT2LMHeadModel: CAUSAL_LM), or None."""
    from neuroada_format.base import model_config

    config = model_config(base) if base is not None and not isinstance(base, dict) else None
    archs = config.get("architectures") if config else None
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        return None
    return next((task for ending, task in _ARCH_TASKS if archs[0].endswith(ending)), None)


def to_peft(adapter, out_dir, *, base=None, base_model_name_or_path=None, revision=None, task_type="auto",
            overwrite: bool = False, allow_inexact: bool = False) -> dict:
    """Write `adapter` (an Adapter, file or folder) as a PEFT Super-Tuning folder; returns a summary.

    With `base` the adapter is first validated against it (keys, shapes, dtypes, probe hashes), so a
    folder is only written for the model it belongs to. `base_model_name_or_path` / `revision`
    default to the adapter's recorded base identity (PEFT's loaders use them to find the base).
    task_type: one of TASK_TYPES, None, or "auto" (from the base's config.json, else None); without
    one, `AutoPeftModelForCausalLM` refuses the folder, while `PeftModel.from_pretrained` takes it.
    """
    if task_type == "auto":
        task_type = task_type_of(base)
    elif task_type is not None and task_type not in TASK_TYPES:
        raise NeuroAdaUsageError(f"task type {task_type!r} is not one of PEFT's: {', '.join(TASK_TYPES)}")
    from neuroada_format import durable

    inputs = []
    if not isinstance(adapter, Adapter):
        with reading_adapter(adapter) as (file, _, _):
            warn_trained_extras(adapter, TRAINED_EXTRAS_LOST)
            inputs += [file, os.fspath(adapter)]  # the folder as given is an input as a whole
            adapter = load(file)
    if base is not None and not hasattr(base, "array") and not isinstance(base, dict):
        inputs.append(os.fspath(base))
    # the overwrite rule before any work (and again when publishing)
    durable.check_output(out_dir, inputs=inputs, overwrite=overwrite, kind="folder")
    validate(adapter, base=base, strict=True)           # content rules (and the base, when given)
    base_dtypes = None
    if base is not None:
        b = open_base(base)
        base_dtypes = {name: b.info(name)[0] for name in adapter.targets}
    sparsity, tensors, stats = peft_tensors(adapter, allow_inexact=allow_inexact, base_dtypes=base_dtypes)
    modules = sorted(_module_of(name, t.layout, module=t.extra.get("module")) for name, t in adapter.targets.items())
    config = _peft_config(sparsity, modules,
                          adapter.base_name if base_model_name_or_path is None else base_model_name_or_path,
                          adapter.base_revision if revision is None else revision, task_type)
    dtypes = {name: [t.index_dtype, t.value_dtype] for name, t in adapter.targets.items()}
    metadata = {"format": "pt",
                METADATA_KEY: json.dumps(adapter.document(), sort_keys=True, separators=(",", ":")),
                DTYPES_KEY: json.dumps(dtypes, sort_keys=True, separators=(",", ":"))}

    def write_config(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")

    _write_folder(os.fspath(out_dir), {
        WEIGHTS_NAME: lambda path: _write_safetensors(path, tensors, metadata),
        CONFIG_NAME: write_config,
    }, overwrite=overwrite, inputs=inputs)
    peft_bytes = os.path.getsize(os.path.join(out_dir, WEIGHTS_NAME))
    return {"output": os.path.abspath(out_dir), "targets": len(adapter.targets), "sparsity": sparsity, "task_type": task_type,
            "entries": sum(s["entries"] for s in stats.values()),
            "peft_entries": sum(s["peft_entries"] for s in stats.values()),
            "inexact_values": sum(s["inexact_values"] for s in stats.values()),
            "adapter_tensor_bytes": int(adapter.nbytes), "peft_file_bytes": peft_bytes, "per_target": stats}


# -- import ----------------------------------------------------------------------------------------
def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.lexists(path):
        ours = os.path.exists(os.path.join(folder, NEUROADA_WEIGHTS))
        hint = " (it is a NeuroAda adapter folder: use it as it is)" if ours else ""
        raise NeuroAdaUsageError(f"no {CONFIG_NAME} in the folder: not a PEFT adapter folder{hint}", path=folder)
    config = read_json(path, rule=None, what="PEFT config", cap=CONFIG_CAP)   # regular files only, JSON limits
    if not isinstance(config, dict):
        raise NeuroAdaError("not a PEFT config (not a JSON object)", path=path)
    kind = config.get("peft_type")
    if kind != PEFT_TYPE:
        hint = " (this is a NeuroAda folder: use it as it is)" if kind == "NEUROADA" else f"; {OTHER_PEFT_HINT}"
        raise NeuroAdaError(f"peft_type is {kind!r}; only {PEFT_TYPE} (Super-Tuning) adapters can be imported{hint}",
                            path=path)
    if config.get("r") is not None:
        raise NeuroAdaError(f"Super-Tuning with r={config.get('r')!r} (Supra) adds a low-rank LoRA delta, which "
                            "a sparse NeuroAda adapter cannot represent", path=path)
    if config.get("modules_to_save"):
        raise NeuroAdaError(f"modules_to_save={config['modules_to_save']!r}: fully trained modules cannot be "
                            "represented by a sparse NeuroAda adapter", path=path)
    if config.get("save_precomputed_indices") is False:
        raise NeuroAdaError("save_precomputed_indices is false: the folder holds no indices (PEFT recomputes "
                            "them with torch.topk, whose tie order is not specified); re-save it with "
                            "save_precomputed_indices=True", path=path)
    s = config.get("sparsity")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
        raise NeuroAdaError(f"sparsity {s!r} is not a number in [0, 1)", path=path)
    return config


def _strings(value, field: str, path: str) -> str | list[str] | None:
    """A config field that PEFT reads as one regex or a list of module names."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise NeuroAdaError(f"{field} is {value!r}: expected a string or a list of strings", path=path)


def _selected_by(config: dict, path: str):
    """Which modules PEFT wraps under this config, matched as PEFT 0.21.2 matches target_modules (a regex the
    whole module name must match, or names a module name equals or ends with after a dot): only those receive
    the file's values when PEFT loads the folder; values stored for any other module are skipped. (Super-Tuning's
    config has no exclude_modules or layers_to_transform: PEFT ignores those keys in its file, and so do we.)"""
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise NeuroAdaError(f"target_modules is {targets!r}: expected a string or a list of strings", path=path)
    if isinstance(targets, str) and targets != "all-linear":  # "all-linear": every linear layer, which the file names
        try:
            re.compile(targets)
        except re.error as exc:
            raise NeuroAdaError(f"target_modules {targets!r} is not a regular expression: {exc}", path=path) from None

    def selects(key: str) -> bool:
        if targets is None:
            return False
        if isinstance(targets, str):
            return targets == "all-linear" or re.fullmatch(targets, key) is not None
        return key in targets or any(key.endswith("." + t) for t in targets)

    return selects


REGEX_SECONDS = 5.0  # matching a PEFT file's few hundred module names takes microseconds each


class _RegexTooSlow(Exception):
    pass


@contextmanager
def _regex_deadline(pattern, count: int, path: str):
    """A target_modules regex from the folder is run on module names from the folder: a pattern that backtracks
    without end (`(a|aa)*c` against a long name) would hang the tool, so its matching gets REGEX_SECONDS (Python's
    regex engine checks signals). Only where a timer can be had: the main thread of a POSIX process whose own real
    timer is not running (a caller's alarm, e.g. a test timeout, is its deadline: never disarmed or delayed)."""
    if (not isinstance(pattern, str) or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0 or signal.getsignal(signal.SIGALRM) is None):
        yield
        return

    def expired(signum, frame):
        raise _RegexTooSlow

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, REGEX_SECONDS)
    try:
        yield
    except _RegexTooSlow:
        raise NeuroAdaError(f"target_modules {pattern[:80]!r} did not finish matching the file's {count} module names in "
                            f"{REGEX_SECONDS:g} s (a regular expression that backtracks without end?)",
                            path=path) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _read_entries(folder: str):
    """(file, {module: (flat indices int64, values f32)}) from adapter_model.safetensors."""
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.lexists(path):
        bin_hint = (" (adapter_model.bin is a pickle, which is never read: re-save with safe_serialization)"
                    if os.path.exists(os.path.join(folder, "adapter_model.bin")) else "")
        raise NeuroAdaUsageError(f"no {WEIGHTS_NAME} in the PEFT folder{bin_hint}", path=folder)
    st = SafetensorsFile(path, Problems(path, strict=True))
    parts: dict[str, dict[str, str]] = {}
    for key in sorted(st.tensors):
        for suffix, kind in ((INDICES_SUFFIX, "indices"), (VALUES_SUFFIX, "values")):
            if key.startswith(KEY_PREFIX) and key.endswith(suffix) and len(key) > len(KEY_PREFIX) + len(suffix):
                parts.setdefault(key[len(KEY_PREFIX):-len(suffix)], {})[kind] = key
                break
        else:
            what = ("a Supra (LoRA) part" if "supertuning_lora" in key else "not a Super-Tuning tensor")
            raise NeuroAdaError(f"{what}; only supertuning_indices / supertuning_values can be imported",
                                path=path, tensor=key)
    if not parts:
        raise NeuroAdaError("the file holds no Super-Tuning tensors", path=path)
    entries = {}
    for module, kinds in parts.items():
        missing = {"indices", "values"} - set(kinds)
        if missing:
            raise NeuroAdaError(f"module has no supertuning_{missing.pop()} tensor", path=path, tensor=module)
        ii, vi = st.tensors[kinds["indices"]], st.tensors[kinds["values"]]
        if ii.dtype not in ("I32", "I64") or len(ii.shape) != 1:
            raise NeuroAdaError(f"indices are {ii.dtype}{list(ii.shape)}, expected 1-D I32", path=path,
                                tensor=kinds["indices"])
        if vi.dtype not in VALUE_DTYPES or len(vi.shape) != 1 or vi.shape != ii.shape:
            raise NeuroAdaError(f"values are {vi.dtype}{list(vi.shape)}, expected F32{list(ii.shape)} like the "
                                "indices", path=path, tensor=kinds["values"])
        entries[module] = (st.array(kinds["indices"]).astype(np.int64),
                           st.array(kinds["values"]).astype(np.float32))
    return st, entries


def _applied(values_f32: np.ndarray, base_dtype: str) -> np.ndarray:
    """The f32 value PEFT actually adds: `val.to(base dtype)` (RNE), widened back to f32 exactly."""
    with np.errstate(over="ignore"):
        return values_f32.astype(NUMPY_DTYPES[base_dtype]).astype(np.float32)


def _to_value_dtype(values_f32, dtype, round_values, path, name):
    with np.errstate(over="ignore"):
        out = values_f32.astype(NUMPY_DTYPES[dtype])
    if nonfinite_mask(out).any():
        raise NeuroAdaError(f"a value overflows {dtype}; choose a wider value dtype", path=path, tensor=name,
                            rule="3.7")
    if not round_values:
        bad = ~_exact_in(values_f32, dtype)
        if bad.any():
            i = int(np.argmax(bad))
            raise NeuroAdaError(f"{int(bad.sum())} values (first: {float(values_f32[i])!r}) are not exact in "
                                f"{dtype}; choose F32 values, or allow rounding (RNE) (neuroada-pack: --value-dtype F32, or "
                                f"--round-values)", path=path, tensor=name)
    return out


def _embedded(st: SafetensorsFile):
    """Our document and dtypes from an exported folder's __metadata__, or (None, None)."""
    meta = st.metadata or {}
    if METADATA_KEY not in meta:
        return None, None
    doc = parse_document(meta, Problems(st.path, strict=True))
    try:
        dtypes = strict_json(meta.get(DTYPES_KEY, "{}"))
    except (ValueError, RecursionError):
        dtypes = {}
    return doc, dtypes if isinstance(dtypes, dict) else {}


def _fits_embedded(doc, dtypes, targets_info) -> bool:
    """True when the entries are exactly what `to_peft` wrote for `doc` (then the original comes back)."""
    declared = doc["targets"]
    if set(declared) != set(targets_info):
        return False
    for name, (flat, vals, d_out, d_in, _) in targets_info.items():
        entry = declared[name]
        k = entry["k"]
        pair = dtypes.get(name)
        if (entry["shape"] != [d_out, d_in] or entry["layout"] != "out_in"
                or not (isinstance(pair, list) and len(pair) == 2 and pair[0] in ("I16", "I32")
                        and pair[1] in VALUE_DTYPES) or d_out * k > flat.size):
            return False
        n = d_out * k
        rows, cols = flat[:n] // d_in, flat[:n] % d_in
        if not np.array_equal(rows, np.repeat(np.arange(d_out, dtype=np.int64), k)):
            return False
        cols = cols.reshape(d_out, k)
        if k > 1 and not (np.diff(cols, axis=1) > 0).all():
            return False
        if not (vals[n:].view(np.uint32) == NEG_ZERO_F32).all() or not _exact_in(vals[:n], pair[1]).all():
            return False
    return True


def import_peft(folder, base, *, value_dtype: str | None = None, round_values: bool = False,
                base_name: str | None = None) -> tuple[Adapter, dict]:
    """(Adapter, report) from a PEFT Super-Tuning folder and the base it was trained on.

    value_dtype None: the exported adapter's own dtypes when the folder came from `to_peft`, else
    the base dtype of each target (the values PEFT actually adds). A value that is not exact in the
    chosen dtype is refused unless round_values (round to nearest even, as spec 4.3 allows).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise NeuroAdaUsageError("no such PEFT adapter folder", path=folder)
    if value_dtype is not None and value_dtype not in VALUE_DTYPES:
        raise NeuroAdaUsageError(f"value dtype {value_dtype!r} is not one of {', '.join(VALUE_DTYPES)}")
    config = _read_config(folder)
    sparsity = float(config["sparsity"])
    selects = _selected_by(config, os.path.join(folder, CONFIG_NAME))
    st, entries = _read_entries(folder)
    path = st.path
    with _regex_deadline(config.get("target_modules"), len(entries), os.path.join(folder, CONFIG_NAME)):
        ignored = sorted(m for m in entries if not selects(m))
    if ignored:
        raise NeuroAdaError(f"the file holds values for {len(ignored)} module(s) that the config's target_modules does "
                            f"not select, e.g. {ignored[0]!r}: PEFT "
                            f"loads the folder without applying them, so no adapter can merge as it does; fix "
                            f"{CONFIG_NAME} or the file", path=os.path.join(folder, CONFIG_NAME))
    b = open_base(base)
    doc, dtypes = _embedded(st)
    # an exported 1.2 file knows the checkpoint's key of a module the checkpoint names otherwise (SPEC 4.6)
    named = {entry["module"]: key for key, entry in (doc or {}).get("targets", {}).items()
             if isinstance(entry.get("module"), str)}
    info, renamed = {}, {}
    for module, (flat, vals) in sorted(entries.items()):
        name = named.get(module, module + ".weight")
        if name not in b:
            raise NeuroAdaError(f"the base has no tensor {name!r} for PEFT module {module!r}: not the base this "
                                f"adapter was trained on", path=path, tensor=name, rule="4.1")
        dtype, shape = b.info(name)
        if dtype not in BASE_DTYPES or len(shape) != 2:
            raise NeuroAdaError(f"base tensor is {dtype}{list(shape)}; expected a 2-D F32/F16/BF16 weight",
                                path=path, tensor=name, rule="4.2")
        d_out, d_in = (int(x) for x in shape)
        numel = d_out * d_in
        want = peft_count(numel, sparsity)
        if flat.size != want:
            raise NeuroAdaError(f"{flat.size} entries, but PEFT gives a {d_out}x{d_in} weight at sparsity "
                                f"{sparsity!r} {want}: the adapter was made for a base of another shape (PEFT "
                                f"would refuse to load it)", path=path, tensor=name, rule="4.2")
        if flat.size and (flat.min() < 0 or flat.max() >= numel):
            i = int(np.argmax((flat < 0) | (flat >= numel)))
            raise NeuroAdaError(f"position {int(flat[i])} (entry {i}) is outside the {d_out}x{d_in} weight",
                                path=path, tensor=name, rule="3.5")
        if np.unique(flat).size != flat.size:
            raise NeuroAdaError("a position appears twice; PEFT would add both values (in an unspecified order) "
                                "and an adapter row cannot hold one column twice", path=path, tensor=name,
                                rule="3.6")
        bad = nonfinite_mask(vals)
        if bad.any():
            raise NeuroAdaError(f"value {float(vals[int(np.argmax(bad))])!r} is not finite", path=path,
                                tensor=name, rule="3.7")
        info[name] = (flat, vals, d_out, d_in, dtype)
        if name != module + ".weight":
            renamed[name] = module

    exact = doc is not None and _fits_embedded(doc, dtypes, info)
    targets, report = {}, {}
    for name, (flat, vals, d_out, d_in, dtype) in info.items():
        weight = b.array(name)
        if exact:
            k = doc["targets"][name]["k"]
            n = d_out * k
            idx = (flat[:n] % d_in).reshape(d_out, k)
            f32 = vals[:n].reshape(d_out, k)
            idt, vdt = dtypes[name]
            dropped = padded = flips = 0
        else:
            applied = _applied(vals, dtype)
            keep = applied.view(np.uint32) != NEG_ZERO_F32      # -0.0 adds nothing, in PEFT and in ours
            dropped = int((~keep).sum())
            idx, f32 = padded_rows(flat[keep], applied[keep], d_out, d_in)
            padded = idx.size - int(keep.sum())
            idt, vdt = index_dtype_for(d_in), dtype
            # +0.0 padding (spec 4.5) turns a -0.0 base value into +0.0 where PEFT leaves it: say where
            every = (np.arange(d_out, dtype=np.int64)[:, None] * d_in + idx).reshape(-1)
            pad_at = every[~np.isin(every, flat[keep])]
            probed = np.asarray(weight).reshape(-1)[pad_at].astype(np.float32)
            flips = int((probed.view(np.uint32) == NEG_ZERO_F32).sum())
        vdt = value_dtype or vdt
        values = _to_value_dtype(f32.reshape(-1), vdt, round_values, path, name).reshape(f32.shape)
        idx = np.ascontiguousarray(idx, dtype=NUMPY_DTYPES[idt])
        target = Target(name, idx, np.ascontiguousarray(values), (d_out, d_in), "out_in", dtype,
                        probe_hash(weight, idx))
        if exact:
            entry = doc["targets"][name]
            if target.probe != entry["probe"]:
                raise NeuroAdaError("the base values at the adapter's positions differ from those it was exported "
                                    "for (probe hash): another base", path=path, tensor=name, rule="4.3")
            target.extra = {k: v for k, v in entry.items() if k not in ("shape", "layout", "dtype", "k", "probe")}
        elif name in renamed:
            target.extra = {"module": renamed[name]}
        targets[name] = target
        report[name] = {"k": target.k, "entries": int(flat.size), "dropped_negative_zero": dropped,
                        "padding": padded, "negative_zero_base_at_padding": flips}
    if exact:
        adapter = from_document(doc, targets)
    else:
        adapter = Adapter(targets, base_name=base_name or config.get("base_model_name_or_path"),
                          base_revision=config.get("revision") if isinstance(config.get("revision"), str) else None,
                          structure_hash=b.structure_hash() if hasattr(b, "structure_hash") else None,
                          selection={"rule": "custom", "tie_break": "lower-column"},
                          extra={"created_by": CREATED_BY,
                                 "description": f"imported from a PEFT Super-Tuning adapter (global top-|W| "
                                                f"selection, sparsity {sparsity!r})"},
                          version=version_for(targets.values()))
        if adapter.base_name is not None and not isinstance(adapter.base_name, str):
            adapter.base_name = None
    if base_name is not None:
        adapter.base_name = base_name
    validate(adapter, strict=True, path=path)
    # the exported adapter's document and positions, but values re-typed (--value-dtype F16 --round-values): not the
    # file that was exported, which "exact round trip" promised
    exact = exact and (value_dtype is None or all(dtypes[name][1] == value_dtype for name in info))
    return adapter, {"exact_round_trip": exact, "sparsity": sparsity, "targets": report}


def from_peft(folder, base, **kw) -> Adapter:
    """The NeuroAda adapter of a PEFT Super-Tuning folder (see `import_peft`)."""
    return import_peft(folder, base, **kw)[0]
