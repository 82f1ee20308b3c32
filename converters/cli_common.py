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
import sys
import warnings

import click

from neuroada_format import NeuroAdaError
from neuroada_format.merge import MergeOverflowWarning
from neuroada_format.errors import EXIT_INTERRUPTED, EXIT_USAGE, exit_code, printable, shell_word, stdout_gone  # noqa: F401 (re-export)

from .backend import finite_scale

_SCALE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def parse_scaled(spec: str) -> tuple[str, float]:
    """'PATH' or 'PATH:SCALE' -> (path, scale); the one reading every command uses.

    Only a trailing ':<decimal number>' is a scale (paths may contain ':'), and the whole string is a
    path when it names an existing file or folder and the part before the colon does not. A scale
    must be finite in f32 (NeuroAdaUsageError otherwise).
    """
    spec = os.fspath(spec)
    head, sep, tail = spec.rpartition(":")
    if sep and head and _SCALE.match(tail) and (os.path.exists(head) or not os.path.exists(spec)):
        return head, finite_scale(tail, head)
    return spec, 1.0


def fail(message) -> None:
    """Print one error line (whitespace collapsed, control characters escaped)."""
    click.echo("error: " + printable(" ".join(str(message).split())), err=True)


def _message(exc: BaseException) -> str:
    if isinstance(exc, NeuroAdaError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return f"internal error: {type(exc).__name__}: {exc} (set NEUROADA_DEBUG=1 for a traceback)"


class _OneLineWarnings:
    """A showwarning that prints each kind of warning once, as one `warning: ...` line (Python's own
    format is two lines with a source path, and a merge may raise the same warning once per block).
    Overflow counts come once per tensor or block: the first is shown at once, the total at the end."""

    def __init__(self):
        self.seen: set = set()
        self.overflow: dict[str, list[int]] = {}  # dtype -> [warnings, positions]

    def show(self, message, category, filename, lineno, file=None, line=None):
        if isinstance(message, MergeOverflowWarning):
            n = self.overflow.setdefault(message.dtype, [0, 0])
            n[0] += 1
            n[1] += message.positions
        text = printable(" ".join(str(message).split()))
        key = (category, re.sub(r"\d+", "N", text))
        if key not in self.seen:
            self.seen.add(key)
            click.echo(f"warning: {text}", err=True)

    def finish(self) -> None:
        for dtype, (count, positions) in self.overflow.items():
            if count > 1:
                click.echo(f"warning: in all, the merge overflowed the {dtype} range at {positions} positions "
                           f"(over {count} tensors or blocks)", err=True)


def run_command(command: click.Command, argv, prog_name: str) -> int:
    """Run a click command; every failure becomes one stderr line and its exit code (never a traceback)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # interpreter diagnostics, not messages for users: a Ctrl-C landing between open() and `with`
            # leaves a file object that the garbage collector reports as "unclosed file"
            warnings.simplefilter("ignore", ResourceWarning)
            shown = _OneLineWarnings()
            warnings.showwarning = shown.show
            # the context by hand, not command.main(): main() answers a Ctrl-C by printing an empty line to
            # stderr before its Abort, and the interruption must be the one line below
            args = list(sys.argv[1:] if argv is None else argv)
            with command.make_context(prog_name, args) as ctx:
                code = command.invoke(ctx)
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
