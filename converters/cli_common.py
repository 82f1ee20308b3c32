"""What every converter command shares: the one `PATH[:SCALE]` reading, adapter inputs (files or
folders), escaping file-derived text, and the one way a failure becomes a line and an exit code.

Exit codes come from `neuroada_format.errors.exit_code` (the table every command uses): 0 done;
1 invalid input (NeuroAdaError: a file breaks a rule, an adapter does not belong to the base);
2 usage or I/O (NeuroAdaUsageError, click usage errors, OSError) and internal errors; 130 interrupted;
141 stdout closed by its reader (`| head`), quietly.
A failure is one `error: ...` line on stderr, never a traceback (NEUROADA_DEBUG=1 shows one for
internal errors).
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
from contextlib import contextmanager

import click

from neuroada_format import NeuroAdaError, NeuroAdaUsageError
# the one printer and warning handler of every command (the `neuroada` group's too)
from neuroada_format.cli import StdoutError, echo, one_line_warnings
from neuroada_format.errors import EXIT_INTERRUPTED, EXIT_USAGE, exit_code, printable, shell_word, stdout_gone  # noqa: F401 (re-export)

from .backend import finite_scale

_SCALE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def parse_scaled(spec: str) -> tuple[str, float]:
    """'PATH' or 'PATH:SCALE' -> (path, scale); the one reading every command uses.

    Only a trailing ':<decimal number>' is a scale (paths may contain ':'), and the whole string is a
    path when it names an existing file or folder and the part before the colon does not. A scale must be
    finite in f32, and an existing path followed by ':' and no decimal is a bad scale (NeuroAdaUsageError both).
    """
    spec = os.fspath(spec)
    head, sep, tail = spec.rpartition(":")
    if sep and head and _SCALE.match(tail) and (os.path.exists(head) or not os.path.exists(spec)):
        return head, finite_scale(tail, head)
    if sep and head and tail and os.path.exists(head) and not os.path.exists(spec):
        # 'a.safetensors:nan' was 'no such adapter file or folder': the file is there, the scale is what is wrong
        raise NeuroAdaUsageError(f"the scale {tail!r} after ':' is not a decimal number (e.g. 0.5, 2, 1e-3)",
                                 path=spec)
    return spec, 1.0


def fail(message) -> None:
    """Print one error line (whitespace collapsed, control characters escaped)."""
    echo("error: " + printable(" ".join(str(message).split())), err=True)


def _message(exc: BaseException) -> str:
    if isinstance(exc, NeuroAdaError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return f"internal error: {type(exc).__name__}: {exc} (set NEUROADA_DEBUG=1 for a traceback)"


def refuse_empty(*options) -> None:
    """(name, value) pairs: a path option given as '' is a usage error naming it. `-o ''` became the working
    directory (refused as 'the output would contain the input ...', never saying -o was empty), and `--out ''`
    read as no --out at all."""
    for name, value in options:
        if value == "":
            raise click.UsageError(f"{name} is empty: name a path")


def refuse_folder_syntax(name: str, out) -> None:
    """A file output named with a trailing '/' is refused: the rename that publishes it dropped the slash and wrote
    a regular file `newdir` where the user asked for a folder (`cp x newdir/` says 'Not a directory')."""
    if out and os.fspath(out).endswith(("/", os.sep)):
        raise click.UsageError(f"{name} {out}: a file output cannot end in '/' (this writes a file: name it)")


@contextmanager
def reporting(done: str):
    """Around the report of a finished write: stdout failing there (`> /dev/full`) says the report was lost and
    what was done (`done`: 'OUT was written'), not a bare 'No space left on device' that read as OUT's disk.
    A Ctrl-C there is let pass: it printed 'error: interrupted' (exit 130) under the report of a complete OUT."""
    with _uninterruptible():
        try:
            yield
        except StdoutError as exc:
            raise StdoutError(exc.errno, f"{exc.strerror}; {done}") from None


@contextmanager
def _uninterruptible():
    """SIGINT ignored inside (where Python may set it: the main thread), the handler put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def run_command(command: click.Command, argv, prog_name: str) -> int:
    """Run a click command; every failure becomes one stderr line and its exit code (never a traceback)."""
    try:
        with one_line_warnings() as shown:  # (neuroada_format.cli: the `neuroada` group prints warnings the same way)
            # the context by hand, not command.main(): main() answers a Ctrl-C by printing an empty line to
            # stderr before its Abort, and the interruption must be the one line below
            args = list(sys.argv[1:] if argv is None else argv)
            with command.make_context(prog_name, args) as ctx:
                code = command.invoke(ctx)
            with _uninterruptible():  # (done: its warnings are part of the report)
                shown.finish()  # (not after a failure: its one error line says all, and no output was written)
    except click.exceptions.Exit as exc:        # --help, --version
        return exc.exit_code
    except click.ClickException as exc:         # usage errors: one line, not click's three
        fail(exc.format_message())
        return EXIT_USAGE
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        # an interrupt may say what it left behind (an in-place merge: the journal that reverts it)
        fail("interrupted" + (f": {exc}" if isinstance(exc, KeyboardInterrupt) and str(exc) else ""))
        return EXIT_INTERRUPTED
    except BrokenPipeError:                     # the reader of stdout left (`| head`): end quietly, as Unix tools do
        return stdout_gone()
    except SystemExit:
        raise
    except Exception as exc:
        internal = not isinstance(exc, (NeuroAdaError, OSError))
        if internal and os.environ.get("NEUROADA_DEBUG"):
            raise
        fail(_message(exc))
        return exit_code(exc)
    return code if isinstance(code, int) else 0
