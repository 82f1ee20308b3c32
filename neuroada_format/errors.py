"""The one exception family the library raises for bad input, and the exit codes the CLIs map it to.

Every message names the file, the tensor (when there is one) and the spec rule that was broken, so a
user can look the rule up in spec/SPEC.md and a CLI can print the message as a single line.

Exit codes, the same for every command (`neuroada`, `neuroada-merge`, `neuroada-pack`):

| code | meaning |
|---|---|
| 0 | done / valid |
| 1 | invalid input: an adapter, base, journal or config breaks a rule (NeuroAdaError) |
| 2 | usage or I/O: bad arguments, a missing or unreadable path, an output that exists, a busy lock, a full disk (NeuroAdaUsageError, OSError) |
| 130 | interrupted (Ctrl-C) |
| 141 | stdout closed by its reader (`... | head`): no message, as Unix tools end on SIGPIPE |
"""
from __future__ import annotations

import os
import re
import shlex
import sys
import warnings

# What `printable` escapes (spec section 11.1): C0 controls and DEL (newlines, ESC starting ANSI
# sequences), C1 controls (U+0080-U+009F, CSI included), the bidirectional controls that reorder what
# a terminal shows (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069), the line and paragraph
# separators U+2028/U+2029, and lone surrogates (text that cannot be encoded).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                          "\u2028\u2029\ud800-\udfff]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    ch = match.group()
    code = ord(ch)
    return _SHORT.get(ch) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


# modules a warning is never attributed to: ours, and the libraries that call into us (a Trainer resuming calls
# torch's load_state_dict, which calls our hook; a model's forward runs through transformers, its hub `kernels`
# wrappers and PEFT's or TRL's)
_NOT_THE_CALLER = ("neuroada_format", "torch", "transformers", "accelerate", "kernels", "peft", "trl", "functools",
                   "contextlib")


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn at the user's own line, the first frame outside the modules above: a fixed stacklevel pointed into our
    decorators or torch's Module.__call__ (the decorators between a public function and its body differ)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _NOT_THE_CALLER:
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


def printable(text) -> str:
    """`text` made safe to print on one line of a terminal: every character listed above is written
    as a Python-style escape (\\n, \\x1b, \\u202e); everything else, backslashes included, is kept.

    Use it on every file-derived string (paths, tensor and target names, metadata text) before it is
    printed; NeuroAdaError messages already are.
    """
    return _UNPRINTABLE.sub(_escape, str(text))


def shell_word(path) -> str:
    """`path` as one shell word that a user can paste from a printed command line (a path with spaces or
    quotes used to break the pasted command). shlex.quote when that survives the one-line printing
    (printable, and the whitespace runs the error lines collapse); otherwise $'...' quoting (bash, zsh,
    POSIX 2024) with every other whitespace and every character printable() escapes written as an escape."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not _UNPRINTABLE.search(text) and not re.search(r"\s", text.replace(" ", "")) and "  " not in text:
        return shlex.quote(text)

    def escape(ch: str) -> str:
        code = ord(ch)
        if ch in "\\'":
            return "\\" + ch
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is no UTF-8 (os.fsdecode's surrogateescape): the byte itself
            return f"\\x{code - 0xDC00:02x}"
        if ch.isspace() or _UNPRINTABLE.match(ch):
            return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"
        return ch

    return "$'" + "".join(map(escape, text)) + "'"


class NeuroAdaError(Exception):
    """A file, tensor or argument breaks a rule of the NeuroAda adapter spec (or cannot be read)."""

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None,
                 rule: str | None = None):
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.rule = rule
        self.detail = message
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.path:
            parts.append(self.path)
        if self.tensor:
            parts.append(self.tensor)
        if self.rule:
            parts.append(f"rule {self.rule}")
        parts.append(self.detail)
        return printable(": ".join(parts))  # one line, no terminal controls, whatever the input


class NeuroAdaUsageError(NeuroAdaError):
    """The input could not be used for reasons other than its content: a missing path, a wrong option,
    an output that already exists, a lock held by another run. Exit code 2 rather than 1."""


def missing_extra(needs: str, exc: ImportError, extra: str, *, path: str | None = None) -> NeuroAdaUsageError:
    """An optional dependency is not installed: a usage error (exit 2), never a verdict on the input file, naming
    the missing module and the extra that installs it."""
    module = (exc.name or extra).split(".")[0]
    return NeuroAdaUsageError(f"{needs} the {module} package, which is not installed "
                              f"(pip install 'neuroada-format[{extra}]')", path=path)


EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# 128 + SIGPIPE: what a shell reports for `cat`, `grep` or `yes` when the reader of their output leaves. Python
# ignores SIGPIPE, so the write raises BrokenPipeError instead; Python's docs end with 1 there, but 1 here
# means "invalid input", and 141 is the status pipelines (set -o pipefail) already expect from a closed pipe.
EXIT_BROKEN_PIPE = 141


def exit_code(exc: BaseException) -> int:
    """The CLI exit code for an exception (see the table in the module docstring)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, BrokenPipeError):  # an OSError, but the reader of stdout leaving is no failure of ours
        return EXIT_BROKEN_PIPE
    if isinstance(exc, NeuroAdaUsageError) or isinstance(exc, OSError):
        return EXIT_USAGE
    if isinstance(exc, NeuroAdaError):
        return EXIT_INVALID
    return EXIT_USAGE


def stdout_gone() -> int:
    """After a BrokenPipeError on stdout: point stdout at /dev/null (what is still buffered would fail again,
    with a message, when Python flushes it at exit) and return the exit code. Nothing is printed: the reader
    left on purpose (`| head`), as the Python docs' signal notes recommend."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no stdout to redirect
        pass
    return EXIT_BROKEN_PIPE
