"""The revert journal of an in-place merge: what `neuroada-merge --revert` needs to undo it bit for bit.

Written (atomically, fsynced, folder fsynced) before the first byte of the base changes. It is a
safetensors file, so it is inspectable with any safetensors reader and never unpickled:

    __metadata__ = {"format": "neuroada-journal", "neuroada-journal": <one JSON document>}
    document = {
      "format": "neuroada-journal", "version": "1", "created": "<UTC ISO-8601>",
      "root": "<absolute folder holding the patched files>",
      "adapters": [{"path": ..., "scale": ...}, ...],            # for the record only
      "files": {"<path relative to root>": {"size": <bytes>, "header_sha256": "<hex>"
                                            [, "layout_file": "<path relative to root>"]}},
      "tensors": {"<tensor name>": {"file": "<relative path>", "dtype": "BF16|F16|F32",
                                    "offset": <absolute byte offset of the tensor's data>,
                                    "count": <elements in the tensor>,
                                    "sha256": "<hex of positions/T + original/T + merged/T bytes>"}}
    }
    tensors, per touched tensor T (written a tensor at a time; the JSON header last, padded with spaces to the
    room reserved for it, which every safetensors reader skips as whitespace):
      positions/T  U32 (I64 when the tensor has 2**32 elements or more): strictly increasing flat element offsets
      original/T   the base's dtype: the values before the merge
      merged/T     the base's dtype: the values the merge wrote

`header_sha256` covers the file's first 8 + N bytes (length prefix and JSON header), which a merge
never changes: a revert refuses files whose header differs (another checkpoint, a re-saved file).
A file whose layout is described elsewhere (an ONNX model's external data file: raw bytes, the
offsets are in the `.onnx`) names that file in `layout_file`, and `header_sha256` is then the
sha256 of the whole layout file, which an in-place merge of external data never changes either.
Keeping the merged values too lets a revert prove each position still holds either the merged value
(restore it) or the original (already reverted, or never reached by a killed merge) and refuse
anything else, such as a later merge on top that has not been reverted yet. That makes a revert
idempotent and safe after a SIGKILL at any point of the merge. The `sha256` of each tensor's three
arrays is checked before a revert touches anything, so a journal whose data bytes were damaged (a
flipped bit in `original/T`) is refused instead of writing wrong values back. The checksum is required:
a journal without one (from before it existed, or with it edited out) is refused, not trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
from neuroada_format.container import SafetensorsFile, strict_json
from neuroada_format.dtypes import BASE_DTYPES, NUMPY_DTYPES, dtype_name
from neuroada_format.errors import shell_word

from neuroada_format.durable import checkpoint_lock, fsync_path, remove_stale_siblings, reserve, write_file
from neuroada_format.safe_io import check_regular, kind_of, open_regular

from .backend import Mismatch, pause_for_tests
from .progress import bar
from .tensor_map import patch_values, values_at

FORMAT = "neuroada-journal"
JOURNAL_PREFIX = ".neuroada-journal-"   # default journal names; a merge's copy of a folder leaves them out
VERSION = "1"
POSITION_PREFIX, ORIGINAL_PREFIX, MERGED_PREFIX = "positions/", "original/", "merged/"


@dataclass
class JournalTarget:
    """One touched tensor as the journal's document records it (known before its arrays are worked out)."""
    tensor: str
    file: str              # relative to the journal's root
    dtype: str
    offset: int
    count: int


@dataclass
class JournalEntry(JournalTarget):
    positions: np.ndarray  # flat element offsets, sorted
    original: np.ndarray
    merged: np.ndarray


# 255 bytes per path component, less the prefix, "-<time>", "-<n>" (room for 5 digits) and ".safetensors"
_JOURNAL_NAME_ROOM = 255 - len(JOURNAL_PREFIX) - len("-20261206T002451") - len("-99999") - len(".safetensors")


def default_path(folder: str, name: str | None = None) -> str:
    """A free journal name in `folder`: .neuroada-journal-[<name>-]<time>[-n].safetensors (a merge's copy of a
    folder leaves such files out). A long <name> is shortened (keeping a digest of it) so that the journal's name
    fits in one path component: a base file with a legal 250-character name must not make the merge fail."""
    if name and len(os.fsencode(name)) > _JOURNAL_NAME_ROOM:
        raw, cut = os.fsencode(name), _JOURNAL_NAME_ROOM - 17
        while cut and raw[cut] & 0xC0 == 0x80:  # never inside a UTF-8 character
            cut -= 1
        name = os.fsdecode(raw[:cut]) + "~" + hashlib.sha256(raw).hexdigest()[:16]
    stem = os.path.join(folder, f"{JOURNAL_PREFIX}{name + '-' if name else ''}{time.strftime('%Y%m%dT%H%M%S')}")
    path, n = stem + ".safetensors", 1
    while os.path.lexists(path):
        n += 1
        path = f"{stem}-{n}.safetensors"
    return path


def journals_of(base) -> list[str]:
    """The journals an in-place merge of `base` left under their default names (default_path): in a folder base,
    or beside a single file. A base that no longer matches an adapter while one lies there was most likely left
    merged, or half merged by a killed run, by that merge (its own --revert restores it)."""
    base = os.path.abspath(os.fspath(base))
    folder, stem = (base, JOURNAL_PREFIX) if os.path.isdir(base) else \
        (os.path.dirname(base), f"{JOURNAL_PREFIX}{os.path.basename(base)}-")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = [n for n in names if n.startswith(stem) and n.endswith(".safetensors")]
    if os.path.isdir(base):  # (not those of single files the folder holds: .neuroada-journal-<file>-<time>)
        found = [n for n in found if n[len(stem):len(stem) + 1].isdigit()]
    return sorted(os.path.join(folder, n) for n in found)


@contextmanager
def patching(base, journal: str, *, reverting: str | None = None):
    """Around the in-place patch that follows a written journal: an interruption or I/O error there leaves BASE
    partly merged, so its one error line says so and gives the revert command (the default journal is a hidden
    file the user never named; 'interrupted' alone left a half-merged base and no hint). Around a revert's patch
    (`reverting`: the --base it was given, '' for none) the line says BASE is partly reverted and how to finish."""
    command = f"neuroada-merge --revert {shell_word(journal)}"  # pasteable
    if reverting is None:
        hint = f"{base} is partly merged; revert with: {command}"
    else:
        hint = f"{base} is partly reverted; finish with: {command}" + (f" --base {shell_word(reverting)}"
                                                                         if reverting else "")
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(hint) from None
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror or exc}; {hint}", exc.filename) from exc


def claim_path(journal, default: str) -> str:
    """The journal an in-place merge will write (`journal` as given, else `default`), refused before anything is
    written if it exists (it may be needed to revert an earlier merge) or its folder does not; stale siblings of
    killed writers are cleaned."""
    journal = os.path.abspath(os.fspath(journal)) if journal else default
    if os.path.lexists(journal):
        mode = os.stat(journal).st_mode if os.path.exists(journal) else stat.S_IFREG  # a dangling link: a name taken
        if not stat.S_ISREG(mode):  # `--journal /dev/null` was 'may be needed to revert an earlier merge'
            raise NeuroAdaUsageError(f"the journal path is a {kind_of(mode)}, not a new file; write it elsewhere",
                                     path=journal)
        raise NeuroAdaUsageError("journal already exists; it may be needed to revert an earlier merge", path=journal)
    if not os.path.isdir(os.path.dirname(journal)):
        raise NeuroAdaUsageError("the journal's parent folder does not exist", path=journal)
    remove_stale_siblings(journal)
    return journal


def position_dtype(count: int) -> np.dtype:
    """U32 positions where every element offset fits (all but the largest tensors), else I64."""
    return np.dtype("<u4") if count <= 1 << 32 else np.dtype("<i8")


def entry_sha256(positions: np.ndarray, original: np.ndarray, merged: np.ndarray) -> str:
    """The checksum of one tensor's journal arrays, as stored (little-endian bytes, in this order)."""
    h = hashlib.sha256()
    for a in (positions, original, merged):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def header_sha256(path: str) -> str:
    """sha256 of a safetensors file's length prefix and header (what a merge never changes)."""
    with open_regular(path) as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise NeuroAdaError("file is shorter than a safetensors header", path=path, rule="1.1")
        (n,) = struct.unpack("<Q", prefix)
        header = f.read(min(n, 100_000_000))
    return hashlib.sha256(prefix + header).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _file_entry(root: str, rel: str, layout: str | None) -> dict:
    size = os.path.getsize(os.path.join(root, rel))
    if layout is None:
        return {"size": size, "header_sha256": header_sha256(os.path.join(root, rel))}
    return {"size": size, "header_sha256": file_sha256(os.path.join(root, layout)), "layout_file": layout}


def _header(doc: dict, layout: dict[str, tuple[str, int, int, int]]) -> bytes:
    """The file's JSON header: the document in __metadata__, then name -> (dtype, elements, begin, end)."""
    header = {"__metadata__": {"format": FORMAT, FORMAT: json.dumps(doc, separators=(",", ":"))}}
    for name, (dtype, n, begin, end) in layout.items():
        header[name] = {"dtype": dtype, "shape": [n], "data_offsets": [begin, end]}
    return json.dumps(header, separators=(",", ":")).encode()


def _array_names(tensor: str) -> tuple[str, str, str]:
    return POSITION_PREFIX + tensor, ORIGINAL_PREFIX + tensor, MERGED_PREFIX + tensor


def _array_dtypes(t: JournalTarget) -> tuple[np.dtype, np.dtype, np.dtype]:
    """The numpy dtypes of a target's (positions, original, merged) arrays."""
    return position_dtype(t.count), NUMPY_DTYPES[t.dtype], NUMPY_DTYPES[t.dtype]


def write_journal(path: str, root: str, files: list[str], targets: list[JournalTarget],
                  arrays: Callable[[JournalTarget], tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                  adapters: list[dict], layouts: dict[str, str] | None = None) -> None:
    """Write the journal durably (neuroada_format.durable: temporary sibling, fsync, rename, folder
    fsync), never over an existing file. `arrays(target)` gives one target's (positions, original, merged),
    asked once per target in order and written at once, so memory holds one target's arrays, never the whole
    journal (an in-place merge of a 7B at k=20 would otherwise hold ~0.8 GB). The header, which must come first
    but holds each tensor's checksum and size, gets room sized for the largest values it could hold and is
    written last, padded with spaces (which safetensors readers skip as JSON whitespace).
    `layouts`: data file -> the file holding its layout (ONNX)."""
    layouts = layouts or {}
    doc = {
        "format": FORMAT, "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "root": os.path.abspath(root), "adapters": adapters,
        "files": {rel: _file_entry(root, rel, layouts.get(rel)) for rel in files},
        "tensors": {t.tensor: {"file": t.file, "dtype": t.dtype, "offset": int(t.offset), "count": int(t.count),
                               "sha256": "0" * 64} for t in targets},
    }
    most = sum(t.count * sum(d.itemsize for d in _array_dtypes(t)) for t in targets)
    widest = {}  # every size and offset at its largest possible value: at least as many digits as the real ones
    for t in targets:
        for name, dtype in zip(_array_names(t.tensor), _array_dtypes(t)):
            widest[name] = (dtype_name(dtype), t.count, most, most)
    room = -(-(len(_header(doc, widest))) // 8) * 8

    def write(tmp: str) -> None:
        layout, at = {}, 0
        with open(tmp, "wb") as f:
            f.seek(8 + room)
            for t in targets:
                parts = [np.ascontiguousarray(a, dtype=d) for a, d in zip(arrays(t), _array_dtypes(t))]
                doc["tensors"][t.tensor]["sha256"] = entry_sha256(*parts)
                for name, a in zip(_array_names(t.tensor), parts):
                    f.write(a.view(np.uint8).data)
                    layout[name] = (dtype_name(a.dtype), a.size, at, at + a.nbytes)
                    at += a.nbytes
                del parts  # (one target's arrays in memory at a time)
            header = _header(doc, layout)
            if len(header) > room:  # cannot happen: every number in it was sized at its largest
                raise RuntimeError(f"journal header of {len(header)} bytes outgrew its room of {room}")
            f.seek(0)
            f.write(struct.pack("<Q", room) + header + b" " * (room - len(header)))

    write_file(path, write, overwrite=False, durable=True)


@dataclass
class Journal:
    path: str
    doc: dict
    file: SafetensorsFile

    def targets(self) -> list[JournalTarget]:
        """What the journal touched, in file and offset order."""
        return [JournalTarget(name, t["file"], t["dtype"], t["offset"], t["count"])
                for name, t in sorted(self.doc["tensors"].items(), key=lambda kv: (kv[1]["file"], kv[1]["offset"]))]

    def entry(self, target: JournalTarget) -> JournalEntry:
        """One target with its arrays, read from the file now: a caller holds one target's arrays at a time."""
        return JournalEntry(target.tensor, target.file, target.dtype, target.offset, target.count,
                            *(self.file.array(n) for n in _array_names(target.tensor)))

    def entries(self) -> Iterator[JournalEntry]:
        for target in self.targets():
            yield self.entry(target)


def _malformed(path: str, why: str) -> NeuroAdaError:
    return NeuroAdaError(f"not a usable neuroada merge journal: {why}", path=path)


def read_journal(path, *, check_data: bool = True) -> Journal:
    """Open and check a journal (structure and self-consistency; the files are checked by revert). check_data=False
    leaves the arrays unread (positions' range and order, checksums): for the merge that has just written them and
    reads them back once to patch, where checking would read the whole journal a second time."""
    path = os.path.abspath(os.fspath(path))
    try:
        check_regular(path, rule=None)
    except NeuroAdaUsageError as exc:  # missing, a folder or a FIFO: said as such (exit 2)
        raise NeuroAdaUsageError(f"no usable journal: {exc.detail}", path=path) from None
    st = SafetensorsFile(path)
    meta = st.metadata or {}
    if meta.get("format") != FORMAT or FORMAT not in meta:  # some other file given as a journal: usage
        raise NeuroAdaUsageError("not a neuroada merge journal: its __metadata__ has no neuroada-journal "
                                 "document", path=path)
    try:
        doc = strict_json(meta[FORMAT], file_names=True)  # (paths as the file system has them)
    except (ValueError, RecursionError) as exc:
        raise _malformed(path, f"document is not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _malformed(path, "document is not a journal")
    if doc.get("version") != VERSION:
        raise _malformed(path, f"version {doc.get('version')!r} is not {VERSION!r}")
    files, tensors, root = doc.get("files"), doc.get("tensors"), doc.get("root")
    if not isinstance(root, str) or not isinstance(files, dict) or not isinstance(tensors, dict):
        raise _malformed(path, "root, files or tensors missing")
    def plain(rel) -> bool:
        return isinstance(rel, str) and not os.path.isabs(rel) and ".." not in rel.replace("\\", "/").split("/")

    for rel, f in files.items():
        if (not plain(rel) or not isinstance(f, dict) or not isinstance(f.get("size"), int)
                or not isinstance(f.get("header_sha256"), str) or not plain(f.get("layout_file", ""))):
            raise _malformed(path, f"file entry {rel!r} is invalid")
    for name, t in tensors.items():
        ok = (isinstance(t, dict) and t.get("file") in files and t.get("dtype") in BASE_DTYPES
              and all(isinstance(t.get(k), int) and t[k] >= 0 for k in ("offset", "count")))
        names = _array_names(name)
        if not ok or not all(n in st.tensors for n in names):
            raise _malformed(path, f"entry of tensor {name!r} is invalid")
        pos, orig, merged = (st.tensors[n] for n in names)
        n = pos.shape[0] if len(pos.shape) == 1 else -1
        if (pos.dtype not in ("U32", "I64") or orig.dtype != t["dtype"] or merged.dtype != t["dtype"]
                or not (pos.shape == orig.shape == merged.shape == (n,))):
            raise _malformed(path, f"arrays of tensor {name!r} are inconsistent")
        if not check_data:
            continue
        p = st.array(names[0])
        if p.size and (int(p.min()) < 0 or int(p.max()) >= t["count"]):
            raise _malformed(path, f"positions of tensor {name!r} fall outside the tensor")
        if p.size > 1 and not (np.diff(p.astype(np.int64)) > 0).all():  # (what every reader of the arrays assumes)
            raise _malformed(path, f"positions of tensor {name!r} are not strictly increasing")
        if not isinstance(t.get("sha256"), str):
            raise _malformed(path, f"entry of tensor {name!r} has no sha256, so its data cannot be checked (a "
                                   "journal from before checksums: revert it with the release that wrote it)")
        if entry_sha256(p, st.array(names[1]), st.array(names[2])) != t["sha256"]:
            raise _malformed(path, f"the data of tensor {name!r} is damaged (its sha256 differs); the base was "
                                   "not touched")
    return Journal(path, doc, st)


def refuse_shared(path: str, doing: str, hint: str) -> None:
    """Refuse writing `path` in place when it has other names (a symlink to a shared file, e.g. a Hugging Face
    cache blob, or other hard links): `doing` it would change every copy (used by in-place merges and revert)."""
    if os.path.islink(path):
        raise NeuroAdaUsageError(f"is a symlink (to {os.path.realpath(path)}), e.g. into a Hugging Face cache; "
                                 f"{doing} would change the shared file: {hint}", path=path)
    links = os.stat(path).st_nlink
    if links > 1:
        raise NeuroAdaUsageError(f"has {links} hard links; {doing} would change every copy: {hint}", path=path)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype(f"<u{a.dtype.itemsize}"))


def revert(journal, *, base=None, progress: bool = False) -> dict:
    """Restore the files a journal describes to their pre-merge bytes; harmless to run twice.

    base: where the checkpoint lives now, if it moved since the merge (folder, or the file itself: a
    journal of one file reverts that file under the name given; one of several refuses a file it lacks).
    Nothing is written unless every file matches the journal (header hash, size, and each position
    holding either its merged or its original value).
    """
    started = time.perf_counter()
    j = read_journal(journal)
    layout_file, renamed = None, {}
    if base is None:
        root = j.doc["root"]
    else:
        base = os.path.abspath(os.fspath(base))
        root = base if os.path.isdir(base) else os.path.dirname(base)
        files = j.doc["files"]
        if not os.path.isdir(base) and os.path.relpath(base, root) not in files:
            if any("layout_file" in f for f in files.values()):
                layout_file = base  # an ONNX model given by its (new) name (a data file given names only the folder)
            elif len(files) == 1:
                renamed = {next(iter(files)): base}  # the one file, under the name the user gave (never another)
            else:
                raise NeuroAdaUsageError(f"journal {j.path} describes {len(files)} files ({', '.join(sorted(files))}) "
                                         "and --base names a file that is none of them: give the checkpoint's "
                                         "folder", path=base)
    if not os.path.isdir(root):
        raise NeuroAdaUsageError("the folder named by the journal is missing (pass --base if it moved)", path=root)
    with checkpoint_lock(root, exclusive=True):  # the lock an in-place merge holds: never interleave
        return _revert(j, root, started, progress, layout_file, renamed, given=base or "")


def _revert(j: Journal, root: str, started: float, progress: bool, layout_file: str | None = None,
            renamed: dict | None = None, given: str = "") -> dict:
    """renamed: journal file -> the path --base gave it (a single-file base that moved or was renamed); given: that
    --base ('' for none), for the command that finishes an interrupted revert."""
    paths = {}
    for rel, f in j.doc["files"].items():
        path = (renamed or {}).get(rel) or os.path.join(root, rel)
        if not os.path.isfile(path):
            raise NeuroAdaUsageError("file named by the journal is missing (pass --base with its new path if it moved)",
                                     path=path)
        if os.path.islink(path):
            raise NeuroAdaUsageError("is a symlink; a revert would write through it into the shared file", path=path)
        layout = f.get("layout_file")
        if layout is None:
            if os.path.getsize(path) != f["size"] or header_sha256(path) != f["header_sha256"]:
                raise Mismatch(f"this file is not the one journal {j.path} was written for (its header differs)",
                               path=path)
        else:  # raw data whose offsets another file holds (ONNX external data): that file must be the same
            if os.path.getsize(path) != f["size"]:
                raise Mismatch(f"this file is not the one journal {j.path} was written for (its size differs)",
                               path=path)
            layout_path = layout_file or os.path.join(root, layout)
            check_regular(layout_path, rule=None)  # missing, renamed or a FIFO: a usage error naming it
            if file_sha256(layout_path) != f["header_sha256"]:
                raise Mismatch(f"the model file describing {rel}'s layout differs from the one journal {j.path} "
                               "recorded (re-exported or edited since the merge)", path=layout_path)
        paths[rel] = path
    headers = {rel: SafetensorsFile(p) for rel, p in paths.items() if "layout_file" not in j.doc["files"][rel]}
    todo, already = [], 0
    for target in j.targets():
        e = j.entry(target)
        if e.file in headers:
            info = headers[e.file].tensors.get(e.tensor)
            fits = (info is not None and info.dtype == e.dtype and headers[e.file].absolute_offset(e.tensor) == e.offset
                    and int(np.prod(info.shape)) == e.count)
        else:  # the layout file's hash matched: the journal's offsets are its offsets; still never past the end
            fits = e.offset + e.count * NUMPY_DTYPES[e.dtype].itemsize <= j.doc["files"][e.file]["size"]
        if not fits:
            raise Mismatch("tensor does not match the journal", path=paths[e.file], tensor=e.tensor)
        # disk blocks first: a full disk is an error here, never a SIGBUS from the map below
        reserve(paths[e.file], e.offset, e.count * np.dtype(e.original.dtype).itemsize)
        current = _bits(values_at(paths[e.file], e.dtype, e.offset, e.positions))
        is_original = current == _bits(np.asarray(e.original))
        unknown = ~(is_original | (current == _bits(np.asarray(e.merged))))
        if unknown.any():
            raise Mismatch(f"{int(unknown.sum())} values are neither the merged nor the original ones: the file "
                           "changed after this merge (revert later in-place merges first, newest first)",
                           path=paths[e.file], tensor=e.tensor)
        if is_original.all():
            already += 1
        else:
            todo.append(target)
    for rel in sorted({t.file for t in todo}):  # before the first write: a file to restore may have no other name
        refuse_shared(paths[rel], "reverting it in place", "break the link first (cp the file to a new name, "
                      "then mv that back over it), then revert")
    restored = 0
    with patching(root, j.path, reverting=given), bar(len(todo), "revert", enabled=progress, unit="tensor") as pbar:
        for target in todo:
            e = j.entry(target)  # read again: one target's arrays in memory at a time
            patch_values(paths[e.file], e.dtype, e.offset, e.count, e.positions, e.original)
            restored += int(e.positions.size)
            pbar.update(1)
            pause_for_tests()
    for rel in sorted({t.file for t in todo}):
        fsync_path(paths[rel])
    return {
        "mode": "revert", "journal": j.path, "base": root, "targets": len(j.doc["tensors"]),
        "targets_restored": len(todo), "targets_already_original": already, "values_restored": restored,
        "seconds": round(time.perf_counter() - started, 3),
    }
