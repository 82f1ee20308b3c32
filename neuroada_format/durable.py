"""Durable writes: the one place that puts a new file or folder under a user's name.

Every writer (adapter `save`, `neuroada-pack`, the merge backends, the in-place journal) goes through
here, so each guarantee is kept once:

- Nothing appears half-written: output is built under a temporary sibling `<OUT>.tmp-<host>-<pid>-<hex>`
  and renamed into place (`publish`). A killed writer leaves such a sibling, never a partial OUT; the
  next write to the same OUT deletes the siblings whose process (on this host) is gone
  (`remove_stale_siblings`).
- New files get the permissions a plain `open()` would give (0666 less the umask, `default_mode`),
  not the 0600 of a private temporary file; a merged copy of a base gets the base's, less the umask
  (`derived_mode`), as `cp` gives.
- Durability is the caller's choice (`durable`): fsync the data, then the folder after the rename, so
  the result also survives a power cut. A killed process never needs it (its writes are already in
  the page cache); a journal always asks for it.
- One lock rule (`checkpoint_lock`): an in-place merge or revert holds an exclusive lock on the folder
  of the files it patches, for the whole operation; a copy holds a shared one while it reads. A run
  that cannot get its lock at once is refused (never waits, never interleaves). A write that publishes
  several files under one OUT (an ONNX model and its external data) also holds `output_lock` on OUT, so
  two such writes never pair one's model with the other's data, and one killed between its renames does
  not block the next.
- One overwrite rule (`check_output`): an existing OUT is replaced only when asked, and never when
  OUT is, contains or lies inside an input (replacing it would destroy what is being read), whatever
  `overwrite` says, nor when deleting OUT's old folder could delete what is no output of ours (`refuse_deleting`:
  the root, the home folder, the working directory or a folder above them, a repository, a folder without
  safetensors weights). Checked on real paths, so symlinks and `..` do not get around it.

Standard library only: the numpy-free core imports this too.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import stat
import sys
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, in-place runs are not serialised
    fcntl = None

from .errors import NeuroAdaError, NeuroAdaUsageError
from .safe_io import kind_of, read_regular

TMP_MARK = ".tmp-"


# -- temporary siblings ------------------------------------------------------------------------------
def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", platform.node())[:32] or "host"


_NAME_MAX = 255   # bytes in one path component on every common file system
_SUFFIX_ROOM = 64  # TMP_MARK + host tag (<= 32) + pid + hex, with room to spare


def _tmp_stem(name: str) -> str:
    """`name`, or a shortened one that is still unique to it, so that `<stem>.tmp-...` fits in a path
    component: a legal 230-character OUT must not fail because its temporary sibling's name is too long."""
    raw = os.fsencode(name)
    if len(raw) <= _NAME_MAX - _SUFFIX_ROOM:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return os.fsdecode(raw[:_NAME_MAX - _SUFFIX_ROOM - 17]) + "~" + digest


def temp_sibling(path: str) -> str:
    """A fresh name beside `path` that stale-sibling cleanup can attribute to this host and process."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{_tmp_stem(name)}{TMP_MARK}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(path: str) -> list[str]:
    """Delete `<path>.tmp-*` siblings left by killed writers of this host; returns what was removed."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(_tmp_stem(name) + TMP_MARK) + r"(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]+$")
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry)
        if not m or m["host"] != _host_tag():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        remove(os.path.join(folder, entry))
        removed.append(os.path.join(folder, entry))
    return removed


def remove(path: str) -> None:
    """Remove a file, a symlink (not what it points to) or a folder tree, read-only folders in it included
    (ours to remove: a temporary sibling or a replaced output, e.g. one copied from a 0555 base folder)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, onerror=_forcing(os.path.abspath(path)))


def _owner_rwx(folder: str) -> bool:
    """Give a folder's owner read, write and search rights; False if nothing could be changed."""
    try:
        st = os.lstat(folder)
        if stat.S_ISLNK(st.st_mode) or st.st_mode & stat.S_IRWXU == stat.S_IRWXU:
            return False
        os.chmod(folder, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
        return True
    except OSError:
        return False


def _forcing(top: str):
    """rmtree's error hook for the tree at `top`: where a folder's mode forbids listing, searching or unlinking,
    give its owner the rights and remove what failed, subtree included (rmtree skips an entry it could not
    open or stat). Folders above `top` are the user's: never changed."""
    def retry(func, path, exc_info):
        exc = exc_info[1]
        if not isinstance(exc, PermissionError):
            raise exc
        path = os.path.abspath(path)
        changed = path != top and _owner_rwx(os.path.dirname(path))
        if os.path.isdir(path) and not os.path.islink(path):
            changed = _owner_rwx(path) or changed
            if not changed:
                raise exc
            shutil.rmtree(path, onerror=retry)
        elif not changed:
            raise exc
        elif os.path.lexists(path):
            os.unlink(path)
    return retry


# -- permissions and flushing ------------------------------------------------------------------------
_UMASK_LOCK = threading.Lock()


def default_mode(executable: bool = False) -> int:
    """The mode a plain open() (or mkdir, with executable) would create: 0666/0777 less the umask."""
    with _UMASK_LOCK:  # reading the umask means setting it; keep other threads out of the gap
        umask = os.umask(0o022)
        os.umask(umask)
    return (0o777 if executable else 0o666) & ~umask


def derived_mode(source_mode: int) -> int:
    """The mode of a file (or folder) made from another, a merged copy of a base: the source's permission bits less
    the umask, as `cp` gives. Every merge backend uses it, so that a private base (0600) never gives a readable
    output, nor a private umask (077) a world-readable one."""
    return stat.S_IMODE(source_mode) & default_mode(executable=True)


def copy_folder_modes(tmp: str, source: str, dirs, *, durable: bool) -> None:
    """Give a folder copy under construction (`tmp`, holding `dirs` relative to both) the source folder's modes, its
    subfolders' too (a private 0700 subfolder must not come out 0755), once their files are in (a 0555 one could not
    take them), and always the owner's to manage: a read-only source (0555, as in a shared cache) must not give an
    output that a later --overwrite or a cleanup can no longer remove. Deepest first; durable: each fsynced."""
    for d in sorted(dirs, key=lambda d: -d.count(os.sep)):
        os.chmod(os.path.join(tmp, d), derived_mode(os.stat(os.path.join(source, d)).st_mode) | stat.S_IRWXU)
        if durable:
            fsync_dir(os.path.join(tmp, d))
    os.chmod(tmp, derived_mode(os.stat(source).st_mode) | stat.S_IRWXU)
    if durable:
        fsync_dir(tmp)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def reserve(path, offset: int, length: int) -> None:
    """Make sure the byte range [offset, offset + length) of an existing file has disk blocks, so
    writing it through a memory map cannot fail: a store into a hole of a sparse file on a full file
    system is a SIGBUS, which no caller can turn into an error. Never changes data or size (fallocate
    mode 0 only allocates holes). A full disk raises OSError(ENOSPC) naming the file, before anything
    is written; file systems that cannot allocate ahead are left as they are.
    """
    if length <= 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        length = min(length, os.fstat(fd).st_size - offset)  # inside the file only: never extend it
        if length <= 0:
            return
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", -1)):
            return
        raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(path)) from None
    finally:
        os.close(fd)


# -- publishing --------------------------------------------------------------------------------------
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """Linux renameat2; False where the OS or file system lacks it (callers fall back)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    if err == errno.EEXIST:
        raise _exists(dst)
    raise OSError(err, os.strerror(err), dst)


def _exists(path: str) -> NeuroAdaUsageError:
    return NeuroAdaUsageError("output already exists; pass --overwrite to replace it", path=path)


def publish(tmp: str, out: str, *, overwrite: bool, durable: bool) -> None:
    """Rename the finished temporary sibling `tmp` to `out`.

    Without overwrite an `out` that appeared meanwhile is never replaced (renameat2 NOREPLACE where
    the OS has it). With overwrite a file is replaced by one rename; a folder is swapped with
    renameat2(RENAME_EXCHANGE) and the old one deleted afterwards, so `out` always names a whole tree.
    """
    if os.path.lexists(out):
        if not overwrite:
            raise _exists(out)
        mode = os.lstat(out).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            raise NeuroAdaUsageError(f"output exists and is a {kind_of(mode)}, which is never replaced", path=out)
        if os.path.isdir(tmp) and not os.path.islink(out):
            if os.path.isdir(out):
                refuse_deleting(out)  # check_output said so before the work; the old tree is deleted below
            with _replacing(out):
                if not _renameat2(tmp, out, _RENAME_EXCHANGE):
                    old = temp_sibling(out)
                    os.rename(out, old)
                    os.rename(tmp, out)
                    tmp = old
                remove(tmp)  # now the previous OUT
        else:
            os.replace(tmp, out)
    elif not _renameat2(tmp, out, _RENAME_NOREPLACE):
        os.rename(tmp, out)
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(out)))


def write_file(path, write: Callable[[str], None], *, overwrite: bool = True, durable: bool = True,
               mode: int | None = None) -> None:
    """Write one file atomically: `write(tmp)` fills a temporary sibling, which gets `mode` (default:
    what open() would give), is fsynced when durable, and is published under `path`.

    On any failure (or interrupt) the sibling is removed and `path` is untouched.
    """
    path = os.path.abspath(os.fspath(path))
    tmp = _filled_sibling(path, write, durable=durable, mode=mode)
    try:
        publish(tmp, path, overwrite=overwrite, durable=durable)
    except BaseException as exc:
        _named_after(exc, path, tmp)


def _filled_sibling(path: str, write: Callable[[str], None], *, durable: bool, mode: int | None) -> str:
    """A temporary sibling of `path` filled by `write(tmp)`, given its mode and fsynced when durable; removed again
    on any failure. Left-overs of killed writers of `path` are removed first."""
    remove_stale_siblings(path)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        os.chmod(tmp, default_mode() if mode is None else mode)
        if durable:
            fsync_path(tmp)
    except BaseException as exc:
        _named_after(exc, path, tmp)
    return tmp


def filled_sibling(path, write: Callable[[str], None], *, durable: bool, mode: int | None = None) -> str:
    """A finished temporary sibling of `path` (see `_filled_sibling`), for a writer that publishes several files
    together (`publish_together`): each is filled before any is renamed."""
    return _filled_sibling(os.path.abspath(os.fspath(path)), write, durable=durable, mode=mode)


def publish_together(out: str, tmp: str, companions: dict[str, str], *, overwrite: bool, durable: bool,
                     claim: "OutputClaim") -> None:
    """Publish OUT (the file a reader opens: an ONNX model, a split GGUF set's first shard) with the files read
    beside it (companions: {final path: finished temporary}) so that `out` never names a set mixing two runs' files.

    Order: every file is complete (fsynced when durable) under its temporary name; an existing `out` is removed
    (overwrite only); the companions are published; `out` is published last. A reader opening `out` finds no file or
    the new set (readers that had the old files open keep them). The caller holds `out`'s `output_lock` (`claim`),
    in which the companions are recorded before the first rename, so a run killed between two renames leaves no
    `out` and files that the next run to `out` removes (instead of refusing them as an existing output)."""
    claim.pending(companions)
    if companions and overwrite and os.path.lexists(out):
        os.unlink(out)
    for final, t in companions.items():
        publish(t, final, overwrite=overwrite, durable=False)
    publish(tmp, out, overwrite=overwrite, durable=durable)
    claim.done()


def _named_after(exc: BaseException, path: str, tmp: str):
    """Remove `tmp` and raise `exc` again, an OSError naming `path`, the file the user named, not our sibling."""
    if os.path.lexists(tmp):
        remove(tmp)
    if isinstance(exc, OSError) and (exc.filename is None or exc.filename == tmp):
        raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
    raise exc


def write_files(contents: dict, *, durable: bool = True, folder=None, interim: dict | None = None) -> None:
    """Several files published together (`contents`: path -> bytes, or a function filling the temporary path it is
    given), replacing what is there: every one is written to its temporary sibling before any is renamed, so a
    failure while writing (a full disk, Ctrl-C) leaves all of them as they were.

    With `folder` (which holds every path, in it or its sub-folders; the caller holds the checkpoint_lock of every
    folder a path lies in) the renames are recorded first (PUBLISH_RECORD, see _record_home): a writer killed between
    two of them (kill -9, a power cut) left a mismatched set, and now leaves the record, by which the next write into
    the folder or read of it (finish_publish) makes the renames that were left, so the folder holds the new files
    whole. `interim` (path -> contents, with `folder` only): files put in place right after the record and before the
    set, for a reader that reads one file of the set without ours (Trainer reads the trainable state alone): while
    the set is pending, it finds a file that refuses, not the file of an earlier set. Without `folder`, a failure
    between the renames leaves some replaced."""
    for path in contents:  # a destination no rename can replace is refused before anything is written
        if os.path.lexists(path):
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                raise NeuroAdaUsageError(f"output exists and is a {kind_of(mode)}, which is never replaced",
                                         path=os.path.abspath(os.fspath(path)))
    finals = [os.path.abspath(os.fspath(p)) for p in contents]
    staged = list(zip(finals, contents.values()))
    homes = {}
    if folder is not None:
        folder = os.path.abspath(os.fspath(folder))
        staged = [(os.path.abspath(os.fspath(p)), d) for p, d in (interim or {}).items()] + staged
        homes = {path: _record_home(folder, path) for path, _ in staged}
        for home in sorted(set(homes.values())):  # a killed writer's temporaries are its new files, not stale siblings
            _roll_forward(home)
    temps, recorded = [], []
    try:
        for path, data in staged:
            fill = data if callable(data) else _writer(data)
            temps.append((path, _filled_sibling(path, fill, durable=durable, mode=None)))
        records = {}
        for path, tmp in temps:
            if path in homes:
                home = homes[path]
                records.setdefault(home, []).append([os.path.relpath(tmp, home), os.path.relpath(path, home)])
        for home, renames in records.items():
            for tmp, out in renames:  # what a reader would refuse is never recorded (a folder swapped for a link now)
                try:
                    _check_recorded_rename(home, tmp, out)
                except ValueError as exc:
                    raise NeuroAdaUsageError(f"the save cannot be recorded ({exc}); nothing was replaced",
                                             path=home) from None
            write_bytes(os.path.join(home, PUBLISH_RECORD), json.dumps({"renames": renames}).encode("utf-8"),
                        durable=durable)
            recorded.append(home)
        for path, tmp in temps:
            publish(tmp, path, overwrite=True, durable=durable)
        for home in recorded:
            remove(os.path.join(home, PUBLISH_RECORD))
            if durable:
                fsync_dir(home)
    except BaseException:
        if recorded:  # (Ctrl-C between two renames) the set is finished now, or by the next write or read
            try:
                for home in recorded:
                    _roll_forward(home)
            except Exception:  # noqa: BLE001 - the record stays for the next one; the first error is the one to see
                pass
        else:
            for _, tmp in temps:
                if os.path.lexists(tmp):
                    remove(tmp)
        raise


PUBLISH_RECORD = ".neuroada-publish.json"  # the renames of a write_files set under way (see write_files)


def _record_home(folder: str, path: str) -> str:
    """The folder whose record lists the rename onto `path`: `folder`, for a file in it or in a real sub-folder of it;
    else the sub-folder holding the file, which is a symbolic link or lies under one (the user's own, to another
    disk). A reader never makes a rename through a link (a hostile record could move files anywhere), so such
    renames are recorded where they are made, in a record without a link in its way, which a reader of that
    sub-folder finishes (_record_folders). The records are written one after the other before the first rename: a
    writer killed between two of them leaves each folder's files whole, but the sub-folder's may then be the next
    save's and the folder's the previous one's (a window of one small file write)."""
    where = os.path.dirname(path)
    rel = os.path.relpath(where, folder)
    if rel == os.curdir or (not rel.startswith(os.pardir + os.sep) and rel != os.pardir
                            and os.path.realpath(where) == os.path.join(os.path.realpath(folder), rel)):
        return folder
    return where


def finish_publish(folder) -> bool:
    """Finish a write_files set whose writer was killed between its renames (its record is in `folder`), so that a
    reader sees the new files whole; True if there was one. Waits for a writer that is still at work (its lock)."""
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.lexists(os.path.join(folder, PUBLISH_RECORD)):
        return False
    if _settled(folder):
        return True
    with checkpoint_lock(folder, exclusive=True, wait=True):
        return _roll_forward(folder)


def _record_folders(folder: str) -> tuple[str, str]:
    """Where a record of a save touching `folder` lies: in it, or (save_pretrained's record of a named adapter's
    sub-folder) in the folder above."""
    folder = os.path.abspath(os.fspath(folder))
    return folder, os.path.dirname(folder)


def finish_publishes(folder) -> None:
    """finish_publish for every record of a save touching `folder` (see _record_folders), before its files are read."""
    for where in _record_folders(folder):
        finish_publish(where)


@contextmanager
def reading_folder(folder):
    """Hold a shared lock on `folder` (waiting for a writer's) while its files are read: a read between a save's
    renames found the new weights beside the old config (load_adapter refused a folder that was fine) or, the other
    way round, a mix it took. A killed writer's record is finished first, outside the lock (finishing takes the
    exclusive one, which our own shared lock would block, as would a save holding the folder above while it waits for
    this one). A path that is no folder (an adapter file) has no save set to wait for: nothing is held."""
    if not os.path.isdir(folder):
        yield
        return
    records = _record_folders(folder)
    folder = records[0]
    while True:
        finish_publishes(folder)
        with checkpoint_lock(folder, exclusive=False, wait=True):
            if not all(_settled(where) for where in records):
                continue  # (a writer killed before we got the lock: finishing its record waits for ours)
            yield
            return


def _recorded_renames(folder: str) -> list[tuple[str, str]] | None:
    """The (temporary, file) pairs of the record in `folder`, checked (_check_recorded_rename); None without one."""
    record = os.path.join(folder, PUBLISH_RECORD)
    if not os.path.lexists(record):
        return None
    try:
        renames = json.loads(read_regular(record, 1 << 20, rule=None, what="record").decode("utf-8"))["renames"]
        for a, b in renames:
            _check_recorded_rename(folder, a, b)
        return [(os.path.join(folder, a), os.path.join(folder, b)) for a, b in renames]
    except (OSError, ValueError, KeyError, TypeError, NeuroAdaUsageError) as exc:
        raise NeuroAdaError(f"the record of a save into this folder that was interrupted between its renames cannot "
                            f"be read ({exc}); the folder may hold a mix of old and new files: remove "
                            f"{PUBLISH_RECORD} (no save or load of the folder goes on while it is there), then save "
                            f"again", path=record) from None


def _unfinished(folder: str) -> bool:
    """Whether the record in `folder` lists a rename not made yet (its temporary still there)."""
    pairs = _recorded_renames(folder)
    return pairs is not None and any(os.path.lexists(tmp) for tmp, _ in pairs)


def _settled(folder: str) -> bool:
    """Whether `folder` can be read as it is: no record, or one whose renames were all made in a folder this process
    may not write (a shared store, a read-only mount), which is left for a writer to remove (_roll_forward). Taking
    the folder's exclusive lock to find that out deadlocked a reader holding its shared lock (reading_folder)."""
    if not os.path.lexists(os.path.join(folder, PUBLISH_RECORD)):
        return True
    return not os.access(folder, os.W_OK) and not _unfinished(folder)


_READ_ONLY = frozenset((errno.EACCES, errno.EPERM, errno.EROFS))


def _roll_forward(folder: str) -> bool:
    """The renames a record lists that were not made yet, then the record removed (the caller holds the lock).

    A folder this process may not write (a shared model store, a read-only mount): a record whose renames were all
    made (killed before removing it) leaves a whole set, read as it is, the record left in place; one with renames
    left is refused, since the folder holds a mix that only a writer can finish."""
    pairs = _recorded_renames(folder)
    if pairs is None:
        return False
    try:
        for tmp, out in pairs:
            if os.path.lexists(tmp):  # (gone: renamed before the kill)
                os.replace(tmp, out)
        for parent in sorted({os.path.dirname(out) for _, out in pairs}):
            fsync_dir(parent)
        os.unlink(os.path.join(folder, PUBLISH_RECORD))
        fsync_dir(folder)
    except OSError as exc:
        left = [out for tmp, out in pairs if os.path.lexists(tmp)]
        if exc.errno in _READ_ONLY and not left:
            return True
        why = ("needs write access, which this process lacks here (a read-only folder or mount)"
               if exc.errno in _READ_ONLY else f"failed ({exc.strerror or exc})")
        raise NeuroAdaError(f"a save into this folder was interrupted between its renames, so it holds old and new "
                            f"files side by side ({len(left)} not yet in place, e.g. {os.path.relpath(left[0], folder)}"
                            f"), and finishing the save {why}; nothing was read. Load or save the folder once as a "
                            f"user who may write it (that finishes the save), then read it again" if left else
                            f"a save into this folder was interrupted after its renames, and removing its record "
                            f"{PUBLISH_RECORD} {why}", path=folder) from None
    return True


def _check_recorded_rename(folder: str, tmp, out) -> None:
    """A record is read from a folder that anyone may have written (a downloaded adapter), and finishing it renames
    files, so it may only do what a killed writer of ours would have: move a temporary sibling of ours onto its own
    file, in the folder or a real (not symbolically linked) sub-folder of it. Anything else raises ValueError."""
    if not (isinstance(tmp, str) and isinstance(out, str) and tmp and out):
        raise ValueError("an entry is not a pair of paths")
    for rel in (tmp, out):
        if os.path.isabs(rel) or any(part in ("", ".", "..") for part in rel.split(os.sep)):
            raise ValueError(f"{rel!r} is not a path inside the folder")
    where, name = os.path.split(out)
    if os.path.dirname(tmp) != where or not os.path.basename(tmp).startswith(_tmp_stem(name) + TMP_MARK):
        raise ValueError(f"{tmp!r} is not a temporary sibling of {out!r}")
    if where and os.path.realpath(os.path.join(folder, where)) != os.path.join(os.path.realpath(folder), where):
        raise ValueError(f"{where!r} is a symbolic link or under one")


def _writer(data: bytes) -> Callable[[str], None]:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return write


def write_bytes(path, data: bytes, *, overwrite: bool = True, durable: bool = True, mode: int | None = None) -> None:
    """`write_file` for content already in memory; write errors (ENOSPC) come back as OSError naming `path`."""
    write_file(path, _writer(data), overwrite=overwrite, durable=durable, mode=mode)


_WRITE_SIDE = frozenset(getattr(errno, name) for name in ("ENOSPC", "EFBIG", "EDQUOT") if hasattr(errno, name))


@contextmanager
def naming_write_errors(out):
    """A full disk or file-size limit met while writing OUT is reported on OUT: sendfile, pwrite and file
    objects name no file, shutil.copyfile names its source, and a temporary sibling's name means nothing
    to the user (spec 11.5: every write error names the file)."""
    try:
        yield
    except OSError as exc:
        ours = _tmp_stem(os.path.basename(os.fspath(out))) + TMP_MARK  # our temporary sibling, or a file in it
        temporary = isinstance(exc.filename, str) and any(
            part.startswith(ours) for part in os.path.normpath(exc.filename).split(os.sep))
        if (exc.errno in _WRITE_SIDE and exc.filename != os.fspath(out)) or temporary:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), os.fspath(out)) from exc
        raise


# -- the overwrite rule ------------------------------------------------------------------------------
def _real(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def _inside(path: str, folder: str) -> bool:
    """Whether real path `path` is `folder` or lies below it."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(out, *, inputs: Iterable = (), overwrite: bool = False, kind: str | None = None,
                 companions: Iterable = ()) -> str:
    """The one overwrite rule every writer applies before it starts; returns OUT as an absolute path.

    - OUT's parent folder must exist, and the names of OUT and its companions must fit in a path component
      (`<out>.data` of a 251-byte OUT does not: found only at the last rename, after all the work).
    - OUT (and each companion: other files the write will put beside it, e.g. ONNX external data)
      may not be, hold, or lie inside any input, nor be a hard link to one, even with overwrite.
    - An existing OUT or companion is replaced only with overwrite, and OUT only by one of the same
      `kind` ("file" or "folder", when given); never a FIFO, device or socket (`--out /dev/null
      --overwrite` run as root would replace the device), nor a symbolic link (the rename that
      publishes OUT would replace the link, not what it names, or fail after all the work for a folder).
    - An existing OUT folder is replaced only when it can be an earlier output of ours (`refuse_deleting`).
    All refusals are NeuroAdaUsageError (exit 2); nothing has been written when they are raised.
    """
    out = os.path.abspath(os.fspath(out))
    if not os.path.isdir(os.path.dirname(out)):
        raise NeuroAdaUsageError("the output's parent folder does not exist", path=out)
    companions = [os.path.abspath(os.fspath(c)) for c in companions]
    for target in [out, *companions]:  # before any work: the rename that publishes it would fail at the very end
        _check_name_length(target, "the output" if target == out else "the output's companion file")
    inputs = [os.path.abspath(os.fspath(p)) for p in inputs if p is not None]
    inputs += _linked_entries(inputs)
    for target in [out, *companions]:
        real = _real(target)
        what = "the output" if target == out else f"the output's companion file {target}"
        for src in inputs:
            real_src = _real(src)
            if real == real_src or (os.path.lexists(target) and _same_file(target, src)):
                raise NeuroAdaUsageError(f"{what} is the input {src}; write elsewhere (or use --in-place "
                                         f"where offered)", path=target)
            # the input's own directory entry counts too: a symbolic link given as the input, kept inside OUT, would
            # vanish with OUT even though what it names lies elsewhere
            entry = os.path.join(_real(os.path.dirname(src)), os.path.normcase(os.path.basename(src)))
            if _inside(real_src, real) or _inside(entry, real):
                raise NeuroAdaUsageError(f"{what} would contain the input {src}, which writing it would "
                                         f"destroy; write elsewhere", path=target)
            if _inside(real, real_src):
                raise NeuroAdaUsageError(f"{what} lies inside the input {src}; write elsewhere", path=target)
        for src in inputs:  # after the direct checks: a file given as an input is named as such
            linked = _hard_link_into(target, src)
            if linked:
                how = ("a hard link to the input file" if os.stat(target).st_nlink > 1 else
                       "the input file seen through another mount:")
                raise NeuroAdaUsageError(f"{what} is {how} {linked}; write elsewhere", path=target)
        if os.path.lexists(target):
            if not overwrite:
                raise _exists(target)
            _refuse_replacing(target, what, folder_ok=target == out)
    if kind is not None and os.path.lexists(out):
        is_dir = os.path.isdir(out)
        if is_dir != (kind == "folder"):
            raise NeuroAdaUsageError(f"output exists and is {'a folder' if is_dir else 'a file'}, but this "
                                     f"writes {'a folder' if kind == 'folder' else 'a file'}", path=out)
    if overwrite and os.path.isdir(out) and not os.path.islink(out):
        refuse_deleting(out)
        with _replacing(out):  # a run reading it now would be refused at the swap, after all the work: say so first
            pass
    return out


def _replacing(folder: str):
    """The exclusive lock on an existing OUT folder that an overwrite swaps out and deletes. A merge copying from that
    folder holds it shared, and opens its files by path one after the other: swapped meanwhile, it wrote a copy
    with the old tree's shards and the new tree's config.json, which neither tree is."""
    return checkpoint_lock(folder, exclusive=True, doing="replacing it (--overwrite)")


# What every folder our tools write holds at its top: a merge into a copy copies the whole base folder, whose weights
# open_base found there (model.safetensors, the index json of its shards, or a single *.safetensors), a PEFT
# folder holds adapter_model.safetensors, and a merged ONNX export folder its *.onnx models.
_WEIGHTS_SUFFIXES = (".safetensors", ".safetensors.index.json", ".onnx")
# What no folder our tools write holds at its top: a merge into a copy leaves a base folder's own out (a `git clone`
# of a Hub repository), so an earlier output is never taken for a repository.
REPOSITORY_MARKS = (".git", ".hg", ".svn")


def _homes() -> list[str]:
    """The user's home folder, as $HOME says and as the password database says (sudo may keep either)."""
    homes = [os.path.expanduser("~")]
    try:
        import pwd

        homes.append(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError, AttributeError):  # Windows; a uid without an entry (containers)
        pass
    return [_real(h) for h in homes if h and os.path.isabs(h)]


def refuse_deleting(folder: str) -> None:
    """Refuse (NeuroAdaUsageError, exit 2, nothing deleted) to replace the existing folder `folder`, whose old tree
    --overwrite deletes, unless it can be a previous output of our tools. Refused, checked on real paths:

    - the file system root, the user's home folder or a folder holding it, the current working directory or a
      folder holding it (`--out ~`, `--out .`, `--out ..`);
    - a folder holding a `.git`, `.hg` or `.svn` entry (`--out /some/project`: a repository; a merge into a copy
      leaves a base folder's own out, so an earlier output never holds one);
    - a folder that holds entries but no safetensors weights or ONNX models at its top (no `*.safetensors` file,
      `*.safetensors.index.json` or `*.onnx`): no output of ours, since every folder our tools write holds one (a
      merge into a copy copies the base folder, whose weights open_base found at its top; a PEFT folder holds
      adapter_model.safetensors; a merged ONNX export folder its models). Its other entries (tokenizer files,
      subfolders, anything copied from the base) say nothing, as a copy carries the base folder's whole tree.

    So a previous output of the same command (merge into a copy, `neuroada-pack --to peft`) is always replaced,
    and so is an empty folder; what cannot be one is left to the user to delete.
    """
    real = _real(folder)
    if os.path.dirname(real) == real:
        raise NeuroAdaUsageError("the output is the file system root; --overwrite never deletes it: write elsewhere",
                                 path=folder)
    for home in _homes():
        if _inside(home, real):
            where = "is your home folder" if home == real else f"holds your home folder {home}"
            raise NeuroAdaUsageError(f"the output {where}; --overwrite deletes the old folder with all it holds, so "
                                     f"it never replaces that: write elsewhere", path=folder)
    try:
        cwd = _real(os.getcwd())
    except OSError:  # the working directory was removed: nothing of it to protect
        cwd = None
    if cwd is not None and _inside(cwd, real):
        where = "is the current working directory" if cwd == real else f"holds the current working directory {cwd}"
        raise NeuroAdaUsageError(f"the output {where}; --overwrite deletes the old folder with all it holds, so it "
                                 f"never replaces that: write elsewhere", path=folder)
    entries = sorted(os.listdir(folder))
    marks = [e for e in entries if e in REPOSITORY_MARKS]
    if marks:
        raise NeuroAdaUsageError(f"the output holds {marks[0]} (a repository); --overwrite deletes the old folder "
                                 f"with all it holds, so it never replaces a repository: write elsewhere", path=folder)
    if entries and not any(e.endswith(_WEIGHTS_SUFFIXES) for e in entries):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise NeuroAdaUsageError(f"the output holds {shown} but no safetensors weights or ONNX models, so it is no "
                                 f"earlier output of this tool, and --overwrite would delete all it holds: write "
                                 f"elsewhere, or remove the folder yourself", path=folder)


def _check_name_length(path: str, what: str) -> None:
    folder, name = os.path.split(path)
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = _NAME_MAX
    size = len(os.fsencode(name))
    if size > limit:
        raise NeuroAdaUsageError(f"{what}'s name is {size} bytes, more than a file name may have here ({limit}); "
                                 f"choose a shorter output name", path=path)


def _linked_entries(inputs: list) -> list:
    """The symbolic links inside input folders: a Hugging Face cache snapshot's files are links into its blobs/
    folder, so the data an input folder holds may lie elsewhere, and writing OUT there (a blob as -o, or blobs/ as
    an -o folder with --overwrite) would destroy the input although OUT is neither in nor around the folder."""
    found = []
    for src in inputs:
        if not os.path.isdir(src):
            continue
        for here, dirs, names in os.walk(src):
            found += [os.path.join(here, n) for n in dirs + names if os.path.islink(os.path.join(here, n))]
    return found


def _hard_link_into(target: str, folder: str) -> str | None:
    """A file of the input folder `folder` that the existing file `target` is a hard link to, if any."""
    try:
        st = os.stat(target)
    except OSError:
        return None
    # not only st_nlink > 1: one file seen through two mounts (a bind mount, a container volume inside another)
    # has a single link, and real paths cannot tell the two names apart either
    if not stat.S_ISREG(st.st_mode) or not os.path.isdir(folder):
        return None
    for here, _, names in os.walk(folder):
        for name in names:
            try:
                other = os.stat(os.path.join(here, name))
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return os.path.join(here, name)
    return None


def _mount_points() -> list[str] | None:
    """Every mount point of this process (Linux: /proc/self/mountinfo, bind mounts included), or None."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    unescape = re.compile(rb"\\([0-7]{3})")
    return [os.fsdecode(unescape.sub(lambda m: bytes([int(m.group(1), 8)]), line.split(b" ")[4]))
            for line in lines if len(line.split(b" ")) > 4]


def _mount_inside(folder: str) -> str | None:
    """A mount point strictly inside `folder` (real path), if any: replacing the folder removes its old tree, and
    that removal would delete the mounted file system's files (a bind mount of an input among them)."""
    points = _mount_points()
    if points is not None:
        return next((p for p in points if p != folder and _inside(os.path.normcase(p), folder)), None)
    for here, dirs, _ in os.walk(folder):  # elsewhere: mounts of other devices
        for d in dirs:
            if os.path.ismount(os.path.join(here, d)):
                return os.path.join(here, d)
    return None


def _refuse_replacing(target: str, what: str, *, folder_ok: bool) -> None:
    mode = os.lstat(target).st_mode
    if stat.S_ISDIR(mode) and folder_ok:
        mounted = _mount_inside(_real(target))
        if mounted:
            raise NeuroAdaUsageError(f"{what} holds a mount point ({mounted}); replacing it would delete the files "
                                     f"of the file system mounted there: unmount it, or write elsewhere", path=target)
    if stat.S_ISDIR(mode) and not folder_ok:  # a companion is a file: a folder there would fail after all the work
        raise NeuroAdaUsageError(f"{what} exists and is a folder, which --overwrite never replaces by a file",
                                 path=target)
    if stat.S_ISLNK(mode):
        raise NeuroAdaUsageError(f"{what} is a symbolic link (to {os.readlink(target)}); publishing replaces the "
                                 "link itself, not what it names: give the real path, or remove the link",
                                 path=target)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise NeuroAdaUsageError(f"{what} exists and is a {kind_of(mode)}, which --overwrite never replaces",
                                 path=target)


# -- the lock rule -----------------------------------------------------------------------------------
def checkpoint_folder(path) -> str:
    """The folder checkpoint_lock locks for a checkpoint given by path: the folder itself (a link to one locks the
    folder it names: flock follows it), or the folder really holding a single-file checkpoint. A file named through a
    symbolic link in another folder used to lock the link's folder, so a copy merge reading it and an in-place merge
    patching it (by its real name, the only one it accepts) did not see each other: the copy mixed tensors from before
    and after the patch."""
    path = os.path.abspath(os.fspath(path))
    return path if os.path.isdir(path) else os.path.dirname(os.path.realpath(path))


@contextmanager
def checkpoint_lock(folder, *, exclusive: bool, doing: str | None = None, wait: bool = False):
    """Hold an advisory lock (flock) on `folder` for the duration: exclusive for runs that change the
    files in it (in-place merge, revert), shared for runs that only read them (a merge into a copy).

    Refused at once with NeuroAdaUsageError (exit 2) when another run holds a conflicting lock, so
    two in-place merges can never interleave; with ``wait`` the run waits its turn instead (the runtime's
    saves: two ranks that both save one folder write one after the other). Where the file system has no
    locks (some network mounts) or the OS none (Windows), nothing is locked.
    """
    folder = os.path.abspath(os.fspath(folder))
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                doing = doing or ("an in-place merge or revert" if exclusive
                                  else "reading it (validate, a merge into a copy, an extraction)")
                raise NeuroAdaUsageError(f"busy: another run holds the lock on this checkpoint folder, so "
                                         f"{doing} must wait; try again when it has finished", path=folder) from None
            except OSError:
                pass  # no locks here (e.g. ENOLCK on a network mount)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


LOCK_MARK = ".neuroada-lock"


def output_lock_path(out) -> str:
    """The lock file of OUT: a hidden `.<name>.neuroada-lock` beside it, removed when the write ends."""
    folder, name = os.path.split(os.path.abspath(os.fspath(out)))
    return os.path.join(folder, f".{_tmp_stem(name)}{LOCK_MARK}")


class OutputClaim:
    """What `output_lock` yields: `pending({final: tmp})` records the files a multi-file publish is about to
    rename into place, `done()` says OUT itself is published; `removed`: files of a killed earlier run cleaned up."""

    def __init__(self, out: str, fd: int | None):
        self.out, self._fd, self.removed, self._pending = out, fd, [], False

    def pending(self, renames: dict) -> None:
        """Before the first rename of {final path: finished temporary}: each final name with its temporary's
        inode (a rename keeps it), so the next run removes only files this run put there, never a file someone
        else created under the same name."""
        self._pending = True
        if self._fd is None:
            return
        record = []
        for final, tmp in renames.items():
            st = os.stat(tmp)
            record.append([os.path.basename(final), st.st_dev, st.st_ino])
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(record).encode(), 0)
        os.fsync(self._fd)  # a few bytes: the next run must find the record whatever happens to this one

    def done(self) -> None:
        self._pending = False

    def _recover(self) -> None:
        """An unheld lock file holding a record is a run that died (or failed) mid-publish: without OUT, the
        recorded files that are still the very files it renamed (same inode) are its leftovers, so remove them;
        with OUT, its publish had finished. Either way the record is cleared."""
        raw = os.pread(self._fd, 1 << 20, 0)
        try:
            record = json.loads(raw) if raw else []
        except ValueError:  # a record cut short: nothing it names is trusted
            record = []
        folder = os.path.dirname(self.out)
        if isinstance(record, list) and not os.path.lexists(self.out):
            for item in record:
                if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                        and os.path.basename(item[0]) == item[0] and item[0] not in ("", ".", "..")):
                    continue
                path = os.path.join(folder, item[0])
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and [st.st_dev, st.st_ino] == item[1:]:
                    os.unlink(path)
                    self.removed.append(path)
        if raw:
            os.ftruncate(self._fd, 0)


@contextmanager
def output_lock(out):
    """Hold an exclusive lock on OUT's lock file (`output_lock_path`) while a run writes OUT as several files.

    Refused at once with NeuroAdaUsageError (exit 2) while another run holds it (never waits, as
    `checkpoint_lock`). The lock file records the files a publish is about to rename into place, by inode
    (`OutputClaim.pending`), so that a run killed between its renames (an ONNX data file published, its
    model not) is told apart from a user's own files: the next run removes that run's files before the
    overwrite check, instead of refusing them as an existing output. The lock file is removed when the
    write ends; a run that fails mid-publish removes its published files itself, and only a killed one leaves
    the lock file with its record. Where there are no locks, nothing is locked or recovered.
    """
    out = os.path.abspath(os.fspath(out))
    path = output_lock_path(out)
    if fcntl is None or not os.path.isdir(os.path.dirname(out)):
        yield OutputClaim(out, None)  # no locks, or no folder: the overwrite check says so
        return
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        try:
            fd = os.open(path, flags, default_mode())
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NeuroAdaUsageError("the output's lock file is a symbolic link; remove it", path=path) from None
            raise OSError(exc.errno, exc.strerror or str(exc), path) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NeuroAdaUsageError("the output's lock file is not a regular file; remove it", path=path)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NeuroAdaUsageError("busy: another run is writing this output; try again when it has finished",
                                     path=out) from None
        except OSError:  # no locks here (e.g. ENOLCK on a network mount)
            os.close(fd)
            yield OutputClaim(out, None)
            return
        except BaseException:
            os.close(fd)
            raise
        try:  # the previous holder may have removed the file between our open and our lock: lock the new one
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    claim = OutputClaim(out, fd)
    try:
        claim._recover()
        yield claim
    finally:
        try:
            if claim._pending:  # failed mid-publish (an exception, a full disk, Ctrl-C): clean up now, as the next
                try:            # run would (a pipeline writing many outputs never reruns this one)
                    claim._recover()
                    claim._pending = False
                except OSError:
                    pass  # the record stays for the next run
            if not claim._pending:
                os.unlink(path)  # while still locked: a run that opened it meanwhile sees it gone and retries
        finally:
            os.close(fd)
