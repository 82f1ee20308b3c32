"""Opening untrusted paths for reading: regular files only, and nothing that can block or act on open.

A FIFO opened for reading waits for a writer (forever, for a hostile `mkfifo model.safetensors`); a
character device may never end (/dev/zero) or do something when opened (a terminal, a tape); a socket
or a directory is no file at all. Every read of a user-given path in the format core goes through
`open_regular`, and converters and the runtime should use it too (or `read_regular` for small files):

1. stat the path and refuse anything that is not a regular file, before opening it (devices are never
   opened). Symbolic links are followed: a link to a regular file is fine (the Hugging Face cache
   stores every file as one); a link to a FIFO or device is refused like the thing itself.
2. open it with O_NONBLOCK | O_NOCTTY | O_CLOEXEC: a path swapped for a FIFO or a terminal between
   the check and the open can neither block the open nor become our controlling terminal;
3. fstat the descriptor, the check no swap can get around, refuse anything but a regular file, and
   only then clear O_NONBLOCK.

Failures raise NeuroAdaUsageError (exit code 2: the path cannot be used, whatever it holds).
Standard library only.
"""
from __future__ import annotations

import io
import os
import stat

from .errors import NeuroAdaError, NeuroAdaUsageError

try:
    import fcntl
except ImportError:  # Windows: no FIFOs to block on and no fcntl; the two S_ISREG checks remain
    fcntl = None

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def kind_of(mode: int) -> str:
    """A short name for what a stat mode describes (for error messages)."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _refuse(path: str, why: str, rule: str | None) -> NeuroAdaUsageError:
    return NeuroAdaUsageError(f"cannot read: {why}", path=path, rule=rule)


def check_regular(path, *, rule: str | None = "1.1") -> os.stat_result:
    """The stat of `path` (symlinks followed) if it is a regular file; NeuroAdaUsageError otherwise.

    Opens nothing, so it is also the check for a path that another tool will open (a config file the
    runtime reads, a file a resolver hands on).
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _refuse(path, "no such file", rule) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise _refuse(path, getattr(exc, "strerror", None) or str(exc), rule) from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, f"not a regular file but a {kind_of(st.st_mode)}", rule)
    return st


def open_regular(path, *, rule: str | None = "1.1") -> io.BufferedReader:
    """A binary reader of the regular file at `path` (see the module docstring for what is refused).

    Raises NeuroAdaUsageError naming the path and `rule` (1.1 for adapter files, the caller's rule
    otherwise) when the path is missing, unreadable, or not a regular file.
    """
    path = os.fspath(path)
    check_regular(path, rule=rule)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (OSError, ValueError) as exc:
        raise _refuse(path, getattr(exc, "strerror", None) or str(exc), rule) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse(path, f"not a regular file but a {kind_of(mode)} (it changed while opening)", rule)
        if fcntl is not None and _OPEN_FLAGS & getattr(os, "O_NONBLOCK", 0):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        reader = open(fd, "rb", closefd=True)
    except BaseException:
        try:   # a Ctrl-C inside open() may have closed fd already: the interrupt, not EBADF, is what to report
            os.close(fd)
        except OSError:
            pass
        raise
    return reader


def read_regular(path, cap: int, *, rule: str | None = "1.1", what: str = "file") -> bytes:
    """The whole content of a small regular file, refused (NeuroAdaError, `rule`) beyond `cap` bytes.

    Reads the size fstat reports and no more: a file that grows meanwhile cannot make us read past
    the cap, and a pseudo-file that reports 0 bytes (/proc) is never read, so cannot block.
    """
    path = os.fspath(path)
    with open_regular(path, rule=rule) as f:
        size = os.fstat(f.fileno()).st_size
        if size > cap:
            raise NeuroAdaError(f"{what} is larger than {cap:,} bytes", path=path, rule=rule)
        try:
            return f.read(size) if size else b""
        except OSError as exc:
            raise _refuse(path, exc.strerror or str(exc), rule) from None


def pread_into(fd: int, view: memoryview, pos: int) -> int:
    """One positional read into `view` (the descriptor's offset untouched, so threads may share it); the number of
    bytes read, 0 at the end of the file. Platforms without pread (Windows) need a seek under a lock instead."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], pos)
    data = os.pread(fd, len(view), pos)
    view[:len(data)] = data
    return len(data)
