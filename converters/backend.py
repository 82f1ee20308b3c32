"""The one seam every merge converter goes through: a small backend interface, a registry by format,
and the driver (`merge`) that runs the steps in the same order for every format.

A merge is four steps, always in this order, and nothing is written before the last one:

    view     = backend.open(base)                        # read-only view of the base; refuses bad files
    resolved = backend.resolve(view, adapters, verify)   # which base tensor each target is; rules 4.x
    plan     = backend.plan(view, resolved, verify, in_place)  # the merge worked out (may read values)
    counts   = backend.write(view, plan, out, ...) | backend.write_in_place(view, plan, ...)

The driver does everything that is the same for all formats: it parses and checks the adapters
(`normalise_adapters`), applies the one overwrite rule (`neuroada_format.durable.check_output`) with
the inputs and companion files the backend names, holds the lock rule's lock on the base
(`durable.checkpoint_lock`: exclusive in place, shared for a copy) from the first read to the last
write, times the run, and returns one `MergeSummary`.
Backends write only through `neuroada_format.durable` (temporary sibling, mode, fsync, atomic
publish, stale-sibling cleanup), so those guarantees hold for every format at once.

How to add a backend (e.g. GGUF):
1. One new file, `converters/<format>_merge.py`, defining a `Backend` subclass and `BACKEND = ThatClass()`.
   - `open(path)`: a read-only view; raise NeuroAdaError (content, exit 1) or NeuroAdaUsageError
     (missing path, exit 2). `inputs(view)`: every file and folder the merge reads (the overwrite
     rule refuses an OUT that aliases, contains or lies inside one). `output_kind(view)`: "file" or
     "folder". `companions(view, out)`: other paths a write to `out` creates beside it.
   - `resolve(view, adapters, verify)`: map target names to the base's tensors, validate the
     adapters against them (shapes, dtypes; with verify the probe hashes, rule 4.3, may be left to
     `plan`), return any object plus `targets` count and `warnings` (a `Resolved`).
   - `plan(view, resolved, verify, in_place)`: the merge, computed with `neuroada_format.plan_merge`
     (rule M: never re-implement the arithmetic); refuse before anything is written.
   - `write(view, plan, out, overwrite, durable, progress)` -> `Written`: build OUT under
     `durable.temp_sibling(out)` and `durable.publish` it. `write_in_place(...)` only if
     `supports_in_place` (else the driver refuses --in-place with a usage error).
   - Options of its own (e.g. a target encoding): override `configured(**options)` to return a new
     instance; they arrive from `merge(..., options={...})` and the CLI's `--option KEY=VALUE`.
   - Read user paths only through `neuroada_format.safe_io` (regular files only: a FIFO never hangs a
     merge); before patching a file in place through a map, `durable.reserve` its ranges (a full
     disk is then an error, not a SIGBUS).
2. One registration: a line in `REGISTRY` below (format name, module, file suffixes). Formats are
   picked by suffix, then the folder/fallback backend (a folder of ONNX models: `folder_kind`);
   `merge(..., format=...)` overrides.
Nothing else changes: the CLI, the summary, the overwrite and lock rules and exit codes come with the
seam. (`neuroada validate --base` and `neuroada-pack` read bases through the core's `open_base`, not
through this seam: a format they should read needs a base view there too.)
"""
from __future__ import annotations

import importlib
import math
import os
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from neuroada_format import Adapter, NeuroAdaError, NeuroAdaUsageError, load
from neuroada_format.durable import check_output, checkpoint_folder, checkpoint_lock, naming_write_errors, output_lock
from neuroada_format.folder import TRAINED_EXTRAS_LOST, reading_adapter, warn_trained_extras
from neuroada_format.errors import missing_extra, shell_word

SLOWDOWN_ENV = "NEUROADA_TEST_SLOWDOWN"


class Mismatch(NeuroAdaError):
    """An adapter does not belong to the base, or a journal to the files (exit code 1)."""

    @classmethod
    def of(cls, exc: NeuroAdaError) -> "Mismatch":
        return cls(exc.detail, path=exc.path, tensor=exc.tensor, rule=exc.rule)


def pause_for_tests() -> None:
    """Test-only hook: NEUROADA_TEST_SLOWDOWN (seconds) makes every write step sleep, so the
    fault-injection tests can SIGKILL a merge mid-way. Never set in normal use."""
    delay = os.environ.get(SLOWDOWN_ENV)
    if delay:
        time.sleep(float(delay))


# -- adapters as given -------------------------------------------------------------------------------
def finite_scale(scale, path=None) -> float:
    """A scale as a float that is finite in f32 (the merge rule multiplies in f32)."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise NeuroAdaUsageError(f"scale {scale!r} is not a number", path=path) from None
    with np.errstate(over="ignore"):
        if not math.isfinite(value) or not np.isfinite(np.float32(value)):
            raise NeuroAdaUsageError(f"scale {scale!r} is not a finite f32 number", path=path)
    return value


def load_adapter_file(path) -> Adapter:
    """An adapter from a file or an adapter folder (the one resolver, neuroada_format.folder)."""
    with reading_adapter(path) as (file, _, _):  # (the adapter is a memory map: its file, whatever is renamed later)
        warn_trained_extras(path, TRAINED_EXTRAS_LOST)
        return load(file)


def _refuse_input_as_journal(journal, inputs, folders) -> None:
    """--journal naming an input (the base, a shard, an adapter file, or a file of an adapter folder in `folders`) is
    refused in the words of the overwrite rule: the journal's own check (claim_path) refuses every existing path as
    'journal already exists; it may be needed to revert an earlier merge', which sent the user looking for one."""
    journal = os.path.abspath(os.fspath(journal))
    if not os.path.lexists(journal):
        return
    real = os.path.realpath(journal)
    for folder in folders:
        if os.path.isdir(folder) and os.path.dirname(real) == os.path.realpath(folder):
            inputs = [*inputs, journal]  # one of the adapter folder's files: named as itself
    for src in map(os.path.abspath, inputs):
        if real == os.path.realpath(src) or (os.path.exists(src) and os.path.exists(journal)
                                             and os.path.samefile(journal, src)):
            raise NeuroAdaUsageError(f"the journal is the input {src}; write it elsewhere (or leave --journal out "
                                     "for a new file beside BASE)", path=journal)


def normalise_adapters(adapters) -> list[tuple[Adapter, float]]:
    """(Adapter or path, scale) pairs (a bare Adapter or path means scale 1), scales finite in f32."""
    result = []
    for item in adapters:
        adapter, scale = item if isinstance(item, tuple) else (item, 1.0)
        if not isinstance(adapter, Adapter):
            adapter = load_adapter_file(adapter)
        result.append((adapter, finite_scale(scale, adapter.path)))
    if not result:
        raise NeuroAdaUsageError("no adapter to merge")
    return result


def described(adapters) -> list[dict]:
    return [{"path": os.path.abspath(a.path) if a.path else None, "scale": s} for a, s in adapters]


# -- what a backend returns --------------------------------------------------------------------------
@dataclass
class Resolved:
    """The outcome of `resolve`: backend data for `plan`, the number of base tensors touched, warnings."""
    data: Any
    targets: int
    warnings: list[str] = field(default_factory=list)


@dataclass
class Written:
    """What a write did (the backend's part of the summary)."""
    values_touched: int
    files: int
    bytes_written: int
    journal: str | None = None
    removed_stale: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what only the write could tell (added to resolve's)


@dataclass
class MergeSummary:
    """The one summary of a merge, whatever the format. `details` holds what only one format has
    (ONNX: how each target was found; in place: the journal's size)."""
    mode: str                # "copy" | "in-place"
    format: str              # the backend's name: "safetensors", "onnx", ...
    base: str
    output: str
    adapters: list[dict]     # [{"path", "scale"}] in merge order
    verified: bool
    durable: bool
    targets: int             # base tensors changed
    values_touched: int
    files: int               # files written (copy) or patched (in place)
    bytes_written: int
    seconds: float
    journal: str | None = None
    warnings: list[str] = field(default_factory=list)
    removed_stale: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able (the CLI's --json)."""
        return asdict(self)


# -- the interface -----------------------------------------------------------------------------------
@contextmanager
def claiming_output(view, out: str):
    """OUT's output lock held for a write that publishes several files (durable.publish_together), its claim left on
    the view for the writer while it is held."""
    with output_lock(out) as claim:
        view.claim = claim
        try:
            yield claim
        finally:
            view.claim = None


class Backend(ABC):
    """One base format. See the module docstring for what each step must do."""

    format: str = ""
    supports_in_place: bool = False
    no_in_place: str | None = None   # why --in-place is refused, when the generic sentence says too little

    @abstractmethod
    def open(self, path: str) -> Any:
        """A read-only view of the base at `path`."""

    @abstractmethod
    def inputs(self, view) -> list[str]:
        """Every file or folder of the base that the merge reads."""

    def output_kind(self, view) -> str:
        return "file"

    def companions(self, view, out: str) -> list[str]:
        return []

    def output_name(self, view, out: str) -> str:
        """The file the write publishes for the OUT given (absolute), which the overwrite rule, the lock and the
        summary then name: OUT itself, but for a base whose copy is several files named after it (a split GGUF
        set's first shard); refuses an OUT that cannot name such a copy."""
        return out

    def claim_output(self, view, out: str):
        """A context held from before the overwrite check to the end of the write. Nothing by default (one
        rename publishes OUT); a backend publishing several files returns `claiming_output(view, out)`."""
        return nullcontext()

    @abstractmethod
    def resolve(self, view, adapters: list[tuple[Adapter, float]], *, verify: bool) -> Resolved:
        """Map every target to the base and validate the adapters against it."""

    @abstractmethod
    def plan(self, view, resolved: Resolved, *, verify: bool, in_place: bool) -> Any:
        """Work the merge out; refuse (probe hashes, rule 4.3) before anything is written."""

    @abstractmethod
    def write(self, view, plan, out: str, *, overwrite: bool, durable: bool, progress: bool) -> Written:
        """Build OUT under a temporary sibling and publish it."""

    def write_in_place(self, view, plan, *, journal: str | None, durable: bool, progress: bool) -> Written:
        raise NeuroAdaUsageError(f"{self.format} bases cannot be merged in place; use --out")

    def configured(self, **options) -> "Backend":
        """This backend with format-specific options (`merge(..., options=)`, the CLI's --option KEY=VALUE);
        a backend that takes some returns a new configured instance. The default takes none."""
        if options:
            raise NeuroAdaUsageError(f"{self.format} merges take no options (got {', '.join(sorted(options))})")
        return self

    def base_path(self, view) -> str:
        return os.path.abspath(view.path)

    def lock_folder(self, view) -> str:
        """The folder the lock rule (neuroada_format.durable.checkpoint_lock) locks: the base folder, or
        the folder holding a single-file base (the root an in-place journal records)."""
        return checkpoint_folder(self.base_path(view))


# -- the registry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Registration:
    module: str                      # converters/<module>.py, defining BACKEND
    suffixes: tuple[str, ...] = ()   # file suffixes it claims (lower case)
    fallback: bool = False           # claims folders and files no suffix claims
    extra: str | None = None         # the pip extra its dependencies come with


REGISTRY: dict[str, Registration] = {
    "onnx": Registration("onnx_merge", suffixes=(".onnx",), extra="onnx"),
    "safetensors": Registration("safetensors_merge", suffixes=(".safetensors",), fallback=True),
    "gguf": Registration("gguf_merge", suffixes=(".gguf",), extra="gguf"),
    # a folder of ONNX models (an Optimum export: encoder_model.onnx, decoder_model.onnx, ...): see `folder_kind`
    "onnx-folder": Registration("onnx_folder_merge", extra="onnx"),
}

_FOLDER_WEIGHTS = (".safetensors", ".safetensors.index.json")


def refuse_misnamed(out, fmt: str, written: str) -> None:
    """An output named with another format's suffix is refused before any work: a GGUF written as m.safetensors
    would be read as one (and a merge's or pack's safetensors as m.gguf), by these tools as by others."""
    named = os.fspath(out).lower()
    other = next((f for f, reg in REGISTRY.items() if reg.suffixes and named.endswith(reg.suffixes)), None)
    if other is not None and other != fmt:
        raise NeuroAdaUsageError(f"the output is written {written}, but its name ends in "
                                 f"{REGISTRY[other].suffixes[0]}; name it for what it holds",
                                 path=os.path.abspath(os.fspath(out)))


def folder_kind(path) -> str:
    """What a folder base is, from the names at its top (dot-files, such as our journals, never count): ONNX models
    (`*.onnx`, any letter case) and no safetensors weights is an ONNX export ("onnx-folder"); anything else is a
    safetensors checkpoint, as before (its reader says what is missing). Both kinds at once is refused: which one
    to merge cannot be guessed, and merging the one kind would copy the other unmerged."""
    try:
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
    except OSError:
        return next(fmt for fmt, reg in REGISTRY.items() if reg.fallback)  # its reader reports what is wrong
    models = [n for n in names if n.lower().endswith(".onnx")]
    weights = [n for n in names if n.endswith(_FOLDER_WEIGHTS)]
    if models and weights:
        raise NeuroAdaUsageError(f"the folder holds both safetensors weights ({weights[0]}) and ONNX models "
                                 f"({models[0]}); which to merge is ambiguous: give a folder that holds one kind, "
                                 f"or the file itself", path=os.path.abspath(os.fspath(path)))
    if models:
        return "onnx-folder"
    return next(fmt for fmt, reg in REGISTRY.items() if reg.fallback)


def format_of(path) -> str:
    """The registered format that claims `path` by its suffix (folders and other files: the fallback)."""
    name = os.fspath(path).lower()
    if not os.path.isdir(path):  # (the path as given: a folder `Ck.ONNX` is no ONNX model)
        for fmt, reg in REGISTRY.items():
            if name.endswith(reg.suffixes) if reg.suffixes else False:
                return fmt
    return next(fmt for fmt, reg in REGISTRY.items() if reg.fallback)


def base_format(path) -> str:
    """The format of a base as `merge` reads it: a folder by what it holds (`folder_kind`), a file by `format_of`."""
    return folder_kind(path) if os.path.isdir(path) else format_of(path)


def backend(fmt: str, options: dict | None = None) -> Backend:
    """The registered backend of a format, imported on first use (optional dependencies stay optional),
    configured with `options` when given."""
    reg = REGISTRY.get(fmt)
    if reg is None:
        raise NeuroAdaUsageError(f"unknown base format {fmt!r}; known: {', '.join(REGISTRY)}")
    try:
        module = importlib.import_module(f"{__package__}.{reg.module}")
    except ImportError as exc:
        if exc.name and exc.name.endswith(reg.module):
            raise NeuroAdaUsageError(f"{fmt} bases are not supported by this installation "
                                     f"({__package__}.{reg.module} is missing)") from None
        if reg.extra:
            raise missing_extra(f"{fmt} merging needs", exc, reg.extra) from None
        raise NeuroAdaUsageError(f"{fmt} merging needs a package that is not installed: {exc}") from None
    return module.BACKEND.configured(**options) if options else module.BACKEND


# -- the driver --------------------------------------------------------------------------------------

@contextmanager
def naming_earlier_journals(base: str):
    """A probe hash failing (rule 4.3) on a base that holds an in-place merge's journal says so, with the revert
    command: after a killed in-place merge (kill -9, a power cut) the rerun said only 'different base or revision',
    and the journal that restores the base is a hidden file the user never named."""
    try:
        yield
    except NeuroAdaError as exc:
        from .journal import journals_of  # (journal imports this module)

        journals = journals_of(base) if exc.rule == "4.3" else []
        if not journals:
            raise
        hint = (f"; an earlier in-place merge of {base} left its journal, and may have left it merged or half merged "
                f"(a killed run): neuroada-merge --revert {shell_word(journals[-1])} restores it"
                + (f" ({len(journals)} journals there: revert the newest first)" if len(journals) > 1 else ""))
        raise type(exc)(exc.detail + hint, path=exc.path, tensor=exc.tensor, rule=exc.rule) from None


def merge(base, adapters, out=None, *, in_place: bool = False, journal=None, verify: bool = True,
          overwrite: bool = False, durable: bool = False, progress: bool = False,
          format: str | None = None, options: dict | None = None) -> MergeSummary:
    """Merge `adapters` into `base`: into a new OUT (same format), or in place (with a revert journal
    where the backend keeps one). adapters: (Adapter or path, scale) pairs, summed in this order.

    verify=False skips only the checks that read base values (probe hashes); names, shapes and
    dtypes are always checked. durable: fsync before anything appears under its name. format: a
    registered format name (default: picked from BASE by `base_format`); options: format-specific
    settings passed to the backend's `configured`.
    """
    started = time.perf_counter()
    base = os.path.abspath(os.fspath(base))
    if not os.path.lexists(base):
        raise NeuroAdaUsageError("no such file or folder", path=base, rule="1.1")
    if in_place == (out is not None):
        raise NeuroAdaUsageError("give exactly one of an output and in_place")
    if journal is not None and not in_place:
        raise NeuroAdaUsageError("a journal goes with in_place")
    impl = backend(format or base_format(base), options)
    if in_place and not impl.supports_in_place:
        raise NeuroAdaUsageError(impl.no_in_place or f"{impl.format} bases cannot be merged in place; use --out",
                                 path=base)
    given = [item[0] if isinstance(item, tuple) else item for item in adapters]
    adapters = normalise_adapters(adapters)
    view = impl.open(base)
    try:  # the view's files closed when the merge ends, also when the caller keeps a refusal
        if not in_place:
            refuse_misnamed(out, impl.format, f"in the base's format ({impl.format})")
            out = impl.output_name(view, os.path.abspath(os.fspath(out)))
        if in_place and journal:
            folders = [os.fspath(g) for g in given if not isinstance(g, Adapter)]
            given_files = [a.path for a, _ in adapters if a.path]
            _refuse_input_as_journal(journal, [os.fspath(base), *impl.inputs(view), *given_files, *folders], folders)
        claim = nullcontext() if in_place else impl.claim_output(view, os.path.abspath(os.fspath(out)))
        with claim:  # before the overwrite check: a killed run's half-published files are cleaned first
            if not in_place:  # an adapter folder as given is an input too (its config is not in a.path)
                inputs = impl.inputs(view) + [a.path for a, _ in adapters if a.path] + \
                    [os.fspath(g) for g in given if not isinstance(g, Adapter)]
                out = check_output(out, inputs=inputs, overwrite=overwrite, kind=impl.output_kind(view),
                                   companions=impl.companions(view, os.path.abspath(os.fspath(out))))
            with checkpoint_lock(impl.lock_folder(view), exclusive=in_place):  # from the first read to the last write
                with naming_earlier_journals(impl.base_path(view)):  # (probe hashes are checked up to the writes)
                    resolved = impl.resolve(view, adapters, verify=verify)
                    plan = impl.plan(view, resolved, verify=verify, in_place=in_place)
                    if in_place:  # (its errors name the journal or the patched file themselves)
                        done = impl.write_in_place(view, plan, journal=journal, durable=durable, progress=progress)
                    else:
                        with naming_write_errors(out):
                            done = impl.write(view, plan, out, overwrite=overwrite, durable=durable,
                                              progress=progress)
        return MergeSummary(
            mode="in-place" if in_place else "copy", format=impl.format, base=impl.base_path(view),
            output=impl.base_path(view) if in_place else out, adapters=described(adapters), verified=verify,
            durable=durable, targets=resolved.targets, values_touched=done.values_touched, files=done.files,
            bytes_written=done.bytes_written, seconds=round(time.perf_counter() - started, 3), journal=done.journal,
            warnings=resolved.warnings + done.warnings, removed_stale=done.removed_stale, details=done.details)
    finally:
        close = getattr(view, "close", None)
        if callable(close):
            close()
