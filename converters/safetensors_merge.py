"""The safetensors backend: merge adapters into a checkpoint (a file, or a Hugging Face folder, sharded
or not), into a new copy or in place with a revert journal.

A merge changes d_out*k values per target and never a size or a header, so the output is a copy of
each file in which the touched tensors are patched on the way: untouched bytes are copied by the
kernel (sendfile), and a touched tensor passes through a small buffer a block of rows at a time, its
merged values written into the block before the block is written out. Each base value is read once,
from memory the copy reads anyway (no map, no page faults), so a merge costs about a copy (files are
copied side by side, one thread per core). Peak memory stays at the adapters plus one 4 MB buffer
per copy thread (a whole tensor for the Conv1D layout, whose canonical rows are stored columns);
nothing is ever re-serialised, so every other byte (headers, `__metadata__`, index json,
tokenizer files, subfolders) is carried over exactly. A base folder's `.git`, `.hg` or `.svn` (a `git clone` of a
Hub repository) is left out: the merged checkpoint is no commit of that repository, its LFS store would double
the copy, and --overwrite refuses to delete a folder holding one (durable.refuse_deleting).

Safety rules this module keeps (the rest, common to every format, are the driver's: backend.py):
- BASE is only read (positional reads, never a map: a base truncated meanwhile is an error naming it, not a
  SIGBUS), unless an in-place merge is asked for, which patches it through maps after writing its journal.
- Every adapter is validated before OUT can appear (`verify=False` skips only the checks that read
  the base, i.e. the probe hash and structure hash; keys, shapes, dtypes and the adapters' own
  structure/content are always checked, because merging without them writes garbage). The header
  and content rules run first, and each adapter's smallest target is probed in BASE, so a wrong base
  fails before anything is copied; every other target's probe hash is computed from the same read
  that merges it and compared once the tensor is through. A mismatch anywhere removes the temporary
  sibling: OUT never appears.
- OUT is built in a temporary sibling and published by neuroada_format.durable (atomic rename; an
  existing OUT, with overwrite, is swapped whole). Durability is opt-in (`durable=True`, the CLI's
  --fsync): like cp and save_pretrained, the default leaves write-back to the kernel: fsync doubled
  a warm-cache merge's time here (bench/merge.py), and a killed process never needs it.
- In place: a revert journal (see journal.py) is written and fsynced before the first byte of BASE
  changes, whatever `durable` says; symlinked or hard-linked files are refused (patching them would
  change the shared copy).
"""
from __future__ import annotations

import errno
import math
import os
import stat
import sys
import threading
from dataclasses import dataclass, field

import numpy as np

from neuroada_format import (Adapter, Checkpoint, Delta, NeuroAdaError, NeuroAdaUsageError, Target,
                             open_base, plan_merge, validate)
from neuroada_format.base import absent_target
from neuroada_format.dtypes import NUMPY_DTYPES
from neuroada_format.durable import (REPOSITORY_MARKS, copy_folder_modes, derived_mode, fsync_path, publish, remove,
                                     remove_stale_siblings, reserve, temp_sibling)
from neuroada_format.hashing import ProbeHash
from neuroada_format.merge import overflow_unreported
from neuroada_format.layout import stored_shape
from neuroada_format.safe_io import kind_of, open_regular
from neuroada_format.validate import PROBE_MISMATCH, probe_mismatch

from . import backend as _backend
from .backend import SLOWDOWN_ENV, Backend, Mismatch, Resolved, Written, pause_for_tests  # noqa: F401
from .journal import (JOURNAL_PREFIX, JournalTarget, claim_path, default_path, patching, read_journal,
                      refuse_shared, write_journal)
from .progress import bar
from .tensor_map import FileId, check_same_file, file_id, patch_values, read_exactly, shrank, write_exactly

COPY_CHUNK = 64 << 20   # one sendfile call
BLOCK_BYTES = 4 << 20   # rows of a touched tensor read, merged and written at a time

# -- inputs ------------------------------------------------------------------------------------------
@dataclass
class _Base:
    path: str              # absolute path as given (file or folder)
    root: str | None       # the folder, when the base is a folder
    ck: Checkpoint
    ids: dict[str, FileId] = field(default_factory=dict)  # each file whose header was read: which file it was

    def close(self) -> None:
        self.ck.close()


@dataclass
class _Touch:
    """One base tensor the merge changes, with every adapter's contribution to it."""
    name: str
    file: str              # absolute path of the base file holding it
    rel: str               # that file's path relative to the base folder (or its name)
    dtype: str
    shape: tuple[int, ...]
    offset: int            # absolute byte offset of the tensor's data in the file
    layout: str
    deltas: list[Delta] = field(default_factory=list)
    sources: list[tuple[str | None, Target]] = field(default_factory=list)  # (adapter path, target) per delta
    expected: FileId | None = None  # the file whose header gave `offset` (check_same_file)

    @property
    def row_bytes(self) -> int:
        return self.shape[1] * NUMPY_DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes


def open_checkpoint(base) -> _Base:
    path = os.path.abspath(os.fspath(base))
    if not os.path.exists(path):
        raise NeuroAdaUsageError("no such file or folder", path=path, rule="1.1")
    ck = open_base(path)
    if not isinstance(ck, Checkpoint):
        raise NeuroAdaUsageError("the base must be a safetensors file or folder", path=path)
    return _Base(path, path if os.path.isdir(path) else None, ck, {st.path: st.file_id for st in ck.files.values()})


def check_adapters(adapters: list[tuple[Adapter, float]], base: _Base, verify: bool) -> list[str]:
    """Validate every adapter (against the base's headers when verify); raise Mismatch, return warnings.

    The probe hashes (rule 4.3) are left to the merge, which reads the same base values anyway
    (`_merge_tensor`, `prepare`), so nothing here reads a tensor's data.
    """
    warnings = []
    for adapter, _ in adapters:
        report = validate(adapter, base=base.ck if verify else None, probes=False)
        try:
            report.raise_if_invalid()
            if not verify:
                _check_fits(adapter, base.ck)
        except NeuroAdaError as exc:
            raise Mismatch.of(exc) from None
        warnings += [f"{adapter.path or '<adapter>'}: {p['tensor'] + ': ' if p['tensor'] else ''}"
                     f"rule {p['rule']}: {p['message']}" for p in report.problems if p["severity"] == "warning"]
    return warnings


def _check_fits(adapter: Adapter, ck: Checkpoint) -> None:
    """Rules 4.1/4.2 from the headers alone: what --no-verify still needs to merge safely."""
    for name, t in sorted(adapter.targets.items()):
        if name not in ck:
            raise NeuroAdaError(absent_target(ck, name), path=adapter.path, tensor=name, rule="4.1")
        dtype, shape = ck.info(name)
        want = stored_shape(t.shape, t.layout)
        if tuple(shape) != want or dtype != t.dtype:
            raise NeuroAdaError(f"base tensor is {dtype}{list(shape)}, adapter expects {t.dtype}{list(want)} "
                                f"({t.layout})", path=adapter.path, tensor=name, rule="4.2")


def touches_of(adapters: list[tuple[Adapter, float]], base: _Base) -> list[_Touch]:
    """The touched tensors in file/offset order, each with its deltas in the adapters' order."""
    touches: dict[str, _Touch] = {}
    for adapter, scale in adapters:
        for name, t in sorted(adapter.targets.items()):
            found = touches.get(name)
            if found is None:
                st = base.ck.file_of(name)
                info = st.tensors[name]
                rel = os.path.relpath(st.path, base.root) if base.root else os.path.basename(st.path)
                found = touches[name] = _Touch(name, st.path, rel, info.dtype, info.shape,
                                               st.absolute_offset(name), t.layout, expected=base.ids.get(st.path))
            elif found.layout != t.layout:
                raise Mismatch(f"adapters disagree on the layout of this target ({found.layout} vs {t.layout})",
                               path=adapter.path, tensor=name, rule="4.2")
            found.deltas.append(Delta(t.indices, t.values, scale))
            found.sources.append((adapter.path, t))
    return sorted(touches.values(), key=lambda t: (t.rel, t.offset))


def prepare(touch: _Touch, verify: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The touch's merge worked out from BASE a block of rows at a time, for an in-place merge's journal:
    (positions, originals, merged) over the whole tensor, with every probe hash checked (rule 4.3) when verify.
    Positional reads, not a map: a base truncated meanwhile is an error naming it, never a SIGBUS."""
    buffer = np.empty(_rows_per_block(touch) * touch.row_bytes, np.uint8)
    hashes = [ProbeHash() for _ in touch.deltas] if verify else None
    parts = []
    with open_regular(touch.file, rule=None) as f:
        check_same_file(f.fileno(), touch.expected, touch.file)
        for r0, _, plan in _merged_blocks(f.fileno(), touch, buffer, hashes):
            parts.append((plan.positions + r0 * touch.shape[1], plan.originals, plan.merged))
    _check_probes(touch, hashes)
    if not parts:  # a tensor with no rows
        return np.empty(0, np.int64), np.empty(0, NUMPY_DTYPES[touch.dtype]), np.empty(0, NUMPY_DTYPES[touch.dtype])
    positions, originals, merged = (np.concatenate(column) for column in zip(*parts))
    return positions, originals, merged


def _probe_failed(touch: _Touch, i: int) -> Mismatch:
    return Mismatch(PROBE_MISMATCH, path=touch.sources[i][0], tensor=touch.name, rule="4.3")


def first_probes(adapters: list[tuple[Adapter, float]], touches: list[_Touch]) -> None:
    """Check each adapter's smallest target against BASE at once (milliseconds), so a merge onto the
    wrong base fails before the copy starts rather than after a whole file; the copy checks the rest."""
    by_name = {t.name: t for t in touches}
    for adapter, _ in adapters:
        if adapter.targets:
            smallest = min(adapter.targets.values(), key=lambda t: (t.d_out * t.k, t.name))
            with overflow_unreported():  # the copy merges it again
                prepare(by_name[smallest.name], True)


# -- copying files -----------------------------------------------------------------------------------
class _Stopped(Exception):
    """A copy worker was told to stop because another one failed (the failure is what gets raised)."""


def _send(src_fd: int, dst_fd: int, start: int, end: int, progress, stop: threading.Event | None = None) -> None:
    """Copy bytes [start, end) to the same offsets in the kernel (sendfile), in chunks so progress and
    interruption stay responsive."""
    pos = start
    os.lseek(dst_fd, start, os.SEEK_SET)
    use_sendfile = hasattr(os, "sendfile") and sys.platform.startswith("linux")
    while pos < end:
        n = min(COPY_CHUNK, end - pos)
        if use_sendfile:
            try:
                sent = os.sendfile(dst_fd, src_fd, pos, n)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSOCK):
                    raise
                use_sendfile = False
                continue
        else:
            data = os.pread(src_fd, n, pos)
            sent = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst_fd, view):]
        if sent == 0:
            raise shrank(src_fd)
        pos += sent
        progress.update(sent)
        pause_for_tests()
        if stop is not None and stop.is_set():
            raise _Stopped


def run_side_by_side(fn, items, workers: int, stop: threading.Event) -> list:
    """[fn(item) for item in items] on `workers` threads (inline for one); the first failure sets
    `stop`, waits for the others to return, and is raised."""
    if workers <= 1:
        return [fn(item) for item in items]
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait  # here: one worker never needs it

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f.done() and f.exception() is not None:
                    raise f.exception()
            return [f.result() for f in futures]
        except BaseException:
            stop.set()  # the others stop at their next chunk, so nobody writes after this returns
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def copy_workers(files: int) -> int:
    """Threads for copying files side by side: one per core, at most 4 (the page cache's bandwidth,
    not the cores, is the limit beyond that), never more than there are files. Side by side because
    files are independent, so a sharded checkpoint keeps every core busy where cp would use one."""
    return max(1, min(files, os.cpu_count() or 1, 4))


def _rows_per_block(t: _Touch) -> int:
    """Stored rows per block: about BLOCK_BYTES of rows for out_in; all of an in_out (Conv1D) tensor,
    whose canonical rows are its stored columns."""
    if t.layout != "out_in":
        return t.shape[0]
    return min(t.shape[0], max(1, BLOCK_BYTES // max(t.row_bytes, 1)))


def _merged_blocks(src_fd: int, t: _Touch, buffer: np.ndarray, hashes: list[ProbeHash] | None):
    """Read `t` from `src_fd` a block of rows at a time into `buffer` and work out each block's merge (rows r0:r1
    of every delta), feeding the probe hashes in canonical order; yields (r0, the block's bytes, its plan)."""
    dt = NUMPY_DTYPES[t.dtype]
    rows, cols = t.shape
    row_bytes = t.row_bytes
    per_block = _rows_per_block(t)
    for r0 in range(0, rows, per_block):
        r1 = min(rows, r0 + per_block)
        raw = memoryview(buffer)[:(r1 - r0) * row_bytes]
        read_exactly(src_fd, raw, t.offset + r0 * row_bytes)
        block = buffer[:len(raw)].view(dt).reshape(r1 - r0, cols)
        deltas = t.deltas if t.layout != "out_in" else \
            [Delta(d.indices[r0:r1], d.values[r0:r1], d.scale) for d in t.deltas]
        plan = plan_merge(block, deltas, t.layout, checked=True)  # check_adapters ran rules 3.x
        for i, h in enumerate(hashes or ()):
            h.update(plan.originals_of(i))
        yield r0, raw, plan


def _check_probes(t: _Touch, hashes: list[ProbeHash] | None) -> None:
    for i, h in enumerate(hashes or ()):
        if h.digest() != t.sources[i][1].probe:
            raise _probe_failed(t, i)


def _merge_tensor(src_fd: int, dst_fd: int, t: _Touch, verify: bool, buffer: np.ndarray, progress,
                  stop: threading.Event | None) -> int:
    """Copy one touched tensor through `buffer`, a block of rows at a time, writing the merged values
    into each block before it is written out; returns the values written.

    Each block is its own small merge, so the merge reads each base value once, from memory the copy
    needs anyway: no map of either file and no page faults, which made this path as fast as sendfile
    alone here. The probe hashes (rule 4.3) are fed block by block and compared at the end, before the
    file can be published.
    """
    dt = NUMPY_DTYPES[t.dtype]
    hashes = [ProbeHash() for _ in t.deltas] if verify else None
    count = 0
    for r0, raw, plan in _merged_blocks(src_fd, t, buffer, hashes):
        buffer[:len(raw)].view(dt)[plan.positions] = plan.merged
        count += int(plan.positions.size)
        write_exactly(dst_fd, raw, t.offset + r0 * t.row_bytes)
        progress.update(len(raw))
        if stop is not None and stop.is_set():
            raise _Stopped
    _check_probes(t, hashes)
    return count


def copy_file(src: str, dst: str, progress, stop: threading.Event | None = None, *,
              touches: list[_Touch] = (), verify: bool = True, expected: FileId | None = None) -> tuple[int, int]:
    """Copy one file to a new `dst` (never overwrites) with its permission bits less the umask, merging `touches`
    (tensors of this file) on the way; returns (bytes, values merged).

    Untouched bytes go through the kernel (sendfile); touched tensors through a small buffer
    (`_merge_tensor`). Both write each byte of `dst` once, in order.
    """
    touches = sorted(touches, key=lambda t: t.offset)
    with open_regular(src, rule=None) as fi:  # never blocks on a FIFO swapped in
        check_same_file(fi.fileno(), expected, src)
        info = os.fstat(fi.fileno())
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        try:
            buffer = np.empty(max((_rows_per_block(t) * t.row_bytes for t in touches), default=0), np.uint8)
            pos, count = 0, 0
            for t in touches:
                _send(fi.fileno(), fd, pos, t.offset, progress, stop)
                count += _merge_tensor(fi.fileno(), fd, t, verify, buffer, progress, stop)
                pos = t.offset + t.nbytes
                pause_for_tests()
            _send(fi.fileno(), fd, pos, info.st_size, progress, stop)
            if hasattr(os, "fchmod"):
                os.fchmod(fd, derived_mode(info.st_mode))
        finally:
            os.close(fd)
    return info.st_size, count


def _tree(root: str) -> tuple[list[str], list[str]]:
    """Folders and files under root (relative), minus our journals and the folder's own .git, .hg or .svn: what a
    merge into a copy copies.

    The copy rule: regular files are copied, and so are symbolic links to regular files, as their
    content (the Hugging Face cache stores every file of a snapshot as a link to a blob). Refused,
    before anything is written: a symbolic link to a folder (following it would copy what it points
    to, say a home folder, into an OUT that users publish), a dangling link, anything that is not a
    regular file (FIFO, device, socket), and a folder that cannot be listed (never skipped silently).
    """
    def refuse(exc: OSError):
        raise exc

    dirs, files = [], []
    for here, subdirs, names in os.walk(root, followlinks=False, onerror=refuse):
        rel_here = os.path.relpath(here, root)
        if rel_here == os.curdir:  # the base folder's own repository is left out (see the module docstring)
            subdirs[:] = [d for d in subdirs if d not in REPOSITORY_MARKS]
            names = [n for n in names if n not in REPOSITORY_MARKS]
        for d in sorted(subdirs):
            full = os.path.join(here, d)
            if os.path.islink(full):
                raise NeuroAdaUsageError(f"is a symbolic link to a folder ({os.path.realpath(full)}); a merge does "
                                         "not follow it, as that would copy what it points to into the output: "
                                         "replace it by a copy of the folder, or remove it", path=full)
            dirs.append(os.path.normpath(os.path.join(rel_here, d)))
        subdirs.sort()
        for n in sorted(names):
            if n.startswith(JOURNAL_PREFIX):
                continue  # journals describe BASE's in-place merges, not the new checkpoint
            full = os.path.join(here, n)
            try:
                mode = os.stat(full).st_mode
            except FileNotFoundError:
                raise NeuroAdaUsageError("is a dangling symbolic link; remove it or restore its target",
                                         path=full) from None
            if not stat.S_ISREG(mode):
                raise NeuroAdaUsageError(f"is a {kind_of(mode)}, not a regular file; a merge copies only regular "
                                         "files: remove it from the checkpoint folder", path=full)
            files.append(os.path.normpath(os.path.join(rel_here, n)))
    return dirs, files

# -- merge in place ----------------------------------------------------------------------------------
def _refuse_shared(path: str) -> None:
    refuse_shared(path, "patching it", "copy the checkpoint first (cp -rL) or merge into a new folder with --out")
    if not os.access(path, os.W_OK):
        raise NeuroAdaUsageError("is not writable", path=path)


def default_journal_path(base: _Base) -> str:
    return default_path(base.root) if base.root else default_path(*os.path.split(base.path))



# -- the backend -------------------------------------------------------------------------------------
@dataclass
class _CopyPlan:
    touches: list[_Touch]
    verify: bool           # check every probe hash as the copy reads the values


@dataclass
class _InPlacePlan:
    touches: list[_Touch]
    files: list[str]
    adapters: list[dict]
    verify: bool


class SafetensorsBackend(Backend):
    """Safetensors files and Hugging Face folders (sharded or not); copies, or in place with a journal."""

    format = "safetensors"
    supports_in_place = True

    def open(self, path: str) -> _Base:
        return open_checkpoint(path)

    def inputs(self, view: _Base) -> list[str]:
        return [view.path] + sorted({st.path for st in view.ck.files.values()})

    def output_kind(self, view: _Base) -> str:
        return "folder" if view.root else "file"

    def base_path(self, view: _Base) -> str:
        return view.path

    def resolve(self, view: _Base, adapters, *, verify: bool) -> Resolved:
        warnings = check_adapters(adapters, view, verify)
        touches = touches_of(adapters, view)
        return Resolved((touches, adapters), len(touches), warnings)

    def plan(self, view: _Base, resolved: Resolved, *, verify: bool, in_place: bool):
        touches, adapters = resolved.data
        if not in_place:
            if verify:
                first_probes(adapters, touches)  # the copy checks every other probe as it goes
            return _CopyPlan(touches, verify)
        files = sorted({t.file for t in touches})
        for f in files:
            _refuse_shared(f)
        for t in touches:  # disk blocks first: a full disk fails here, cleanly, never as a SIGBUS from a map
            reserve(t.file, t.offset, t.nbytes)
        if verify:
            first_probes(adapters, touches)  # the journal's writing checks every other probe, before any patch
        return _InPlacePlan(touches, files, _backend.described(adapters), verify)

    def write(self, view: _Base, plan: _CopyPlan, out: str, *, overwrite: bool, durable: bool,
              progress: bool) -> Written:
        return _write_copy(view, plan.touches, out, verify=plan.verify, overwrite=overwrite, durable=durable,
                           progress=progress)

    def write_in_place(self, view: _Base, plan: _InPlacePlan, *, journal, durable: bool, progress: bool) -> Written:
        return _write_in_place(view, plan, journal, durable=durable, progress=progress)


BACKEND = SafetensorsBackend()


def _write_copy(b: _Base, touches: list[_Touch], out: str, *, verify: bool, overwrite: bool, durable: bool,
                progress: bool) -> Written:
    """Copy every file of the base into a temporary sibling of OUT, merging on the way, and publish it."""
    stale = remove_stale_siblings(out)
    if b.root:
        dirs, files = _tree(b.root)
        sources = {rel: os.path.join(b.root, rel) for rel in files}
    else:
        dirs, files = [], [os.path.basename(b.path)]
        sources = {files[0]: b.path}
    # which file each name is now (the headers' files as they were read): one replaced before it is copied is refused
    expected = {rel: b.ids.get(p) or file_id(p) for rel, p in sources.items()}
    by_file: dict[str, list[_Touch]] = {}
    for t in touches:
        by_file.setdefault(t.rel, []).append(t)
    sizes = {rel: os.path.getsize(p) for rel, p in sources.items()}
    tmp = temp_sibling(out)
    touched = written = 0
    stop = threading.Event()
    try:
        if b.root:
            os.mkdir(tmp, 0o700)
            for d in dirs:
                os.makedirs(os.path.join(tmp, d), exist_ok=True)
        with bar(sum(sizes.values()), f"merge -> {os.path.basename(out)}", enabled=progress) as pbar:

            def write_one(rel: str) -> tuple[int, int]:
                dst = os.path.join(tmp, rel) if b.root else tmp
                return copy_file(sources[rel], dst, pbar, stop, touches=by_file.get(rel, ()), verify=verify,
                                 expected=expected[rel])

            order = sorted(files, key=lambda rel: -sizes[rel])  # largest first: the last to finish is short
            for size, count in run_side_by_side(write_one, order, copy_workers(len(files)), stop):
                written += size
                touched += count
        if durable:  # after every copy: an fsync while another file is being written waits for it too
            for rel in order:
                fsync_path(os.path.join(tmp, rel) if b.root else tmp)
        if b.root:
            copy_folder_modes(tmp, b.root, dirs, durable=durable)
        pause_for_tests()
        publish(tmp, out, overwrite=overwrite, durable=durable)
    except BaseException:
        if os.path.lexists(tmp):
            remove(tmp)
        raise
    return Written(values_touched=touched, files=len(files), bytes_written=written, removed_stale=stale)


def _write_in_place(b: _Base, plan: _InPlacePlan, journal, *, durable: bool, progress: bool) -> Written:
    """Write the revert journal (always fsynced), then patch BASE's files through a memory map. A file replaced
    since its header was read is refused by `prepare` while the journal is written, so neither appears."""
    journal = claim_path(journal, default_journal_path(b))
    root = b.root or os.path.dirname(b.path)
    by_name = {t.name: t for t in plan.touches}

    def arrays(target: JournalTarget):
        return prepare(by_name[target.tensor], plan.verify)  # one read of the base: merged, originals, probes

    targets = [JournalTarget(t.name, t.rel, t.dtype, t.offset, math.prod(t.shape)) for t in plan.touches]
    write_journal(journal, root, [os.path.relpath(f, root) for f in plan.files], targets, arrays,
                  adapters=plan.adapters)
    pause_for_tests()
    touched = written = 0
    written_journal = read_journal(journal, check_data=False)  # the merged values come back, a tensor at a time
    with patching(b.root or b.path, journal), bar(len(targets), "merge in place", enabled=progress,
                                                   unit="tensor") as pbar:
        for target in targets:
            e, t = written_journal.entry(target), by_name[target.tensor]
            patch_values(t.file, e.dtype, e.offset, e.count, e.positions, e.merged, expected=t.expected)
            touched += int(e.positions.size)
            written += e.merged.nbytes
            pbar.update(1)
            pause_for_tests()
        if durable:
            for f in plan.files:
                fsync_path(f)
    written_journal.file.close()
    return Written(values_touched=touched, files=len(plan.files), bytes_written=written,
                   journal=journal, details={"journal_bytes": os.path.getsize(journal)})


# -- the library's entry points (the CLI goes through backend.merge too) -----------------------------
def merge_safetensors(base, adapters, out, *, verify: bool = True, overwrite: bool = False,
                      progress: bool = False, durable: bool = False) -> _backend.MergeSummary:
    """Write BASE + adapters to a new checkpoint OUT of the same kind (folder or file).

    adapters: (Adapter or path, scale) pairs, merged with the spec's rule in the given order.
    durable: fsync every file and folder before OUT appears (see the module docstring).
    """
    return _backend.merge(base, adapters, out, verify=verify, overwrite=overwrite, progress=progress,
                          durable=durable, format="safetensors")


def merge_in_place(base, adapters, *, journal=None, verify: bool = True, progress: bool = False,
                   durable: bool = False) -> _backend.MergeSummary:
    """Patch BASE's files through a memory map, after writing a revert journal (always fsynced);
    durable also fsyncs the patched files at the end."""
    return _backend.merge(base, adapters, in_place=True, journal=journal, verify=verify, progress=progress,
                          durable=durable, format="safetensors")
