"""The `neuroada` command: validate and inspect adapters (a file, or a folder save_adapter wrote).

Exit codes come from `errors.exit_code`, the table every command shares: 0 valid / done, 1 invalid
input (the adapter, or the base it is checked against, breaks a rule), 2 usage or I/O (a missing or
unreadable path, a FIFO or device, a bad option), 130 interrupted, 141 stdout closed by its reader
(`| head`; quietly). A failure is one `error: ...` line on stderr, never a traceback (NEUROADA_DEBUG=1
shows one for internal errors); every file-derived string is printed through `errors.printable`.
`--json` prints a machine-readable report instead. The printer (`echo`: escapes what stdout cannot encode, says
when stdout fails) and the one-line warnings here are every command's (converters/cli_common.py uses them).
"""
from __future__ import annotations

import errno
import json
import os
import re
import sys
import warnings
from contextlib import contextmanager

import click
import numpy as np

from .adapter import load
from .durable import checkpoint_folder, checkpoint_lock
from .errors import EXIT_INTERRUPTED, EXIT_INVALID, EXIT_USAGE, NeuroAdaError, exit_code, printable, stdout_gone
from .folder import TRAINED_EXTRAS_LOST, reading_adapter, warn_trained_extras
from .merge import MergeOverflowWarning
from .validate import validate


class StdoutError(OSError):
    """Writing the report to stdout failed (a full disk behind `> file`): not the command's own output."""


def echo(text="", *, err: bool = False) -> None:
    """click.echo of a report line, with what the stream cannot encode written as a backslash escape (as Python
    writes stderr): a finished merge into an OUT named with a euro sign ended, on a latin-1 stdout, in 'internal
    error: UnicodeEncodeError' and exit 2, with OUT written. A stdout that fails (`> /dev/full`) raises StdoutError
    saying so: 'No space left on device' alone read as a full disk under the output. A stderr that fails is let be:
    raising there turned every refusal's exit code into Python's 1 for an uncaught error."""
    stream = sys.stderr if err else sys.stdout
    if stream is None and not err:  # started with stdout closed (`>&-`): click.echo would drop the report silently
        raise StdoutError(errno.EBADF, "writing the report to stdout failed: stdout is closed")
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text = str(text).encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:  # an encoding name codecs does not know: leave it to the stream
        pass
    try:
        click.echo(text, err=err)
    except OSError as exc:
        if err:  # stderr full or its reader gone (`2>>log` on a full disk): nowhere to say it; the exit code says it
            return
        if isinstance(exc, BrokenPipeError):  # the reader left (`| head`): each command's quiet 141
            raise
        stdout_gone()  # stdout at /dev/null: what is still buffered must not fail again, with a message, at exit
        raise StdoutError(exc.errno, f"writing the report to stdout failed: {exc.strerror or exc}") from None


def _fail(message: str) -> None:
    echo("error: " + printable(" ".join(str(message).split())), err=True)


class OneLineWarnings:
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
            echo(f"warning: {text}", err=True)

    def finish(self) -> None:
        for dtype, (count, positions) in self.overflow.items():
            if count > 1:
                echo(f"warning: in all, the merge overflowed the {dtype} range at {positions} positions "
                     f"(over {count} tensors or blocks)", err=True)


@contextmanager
def one_line_warnings():
    """Every command's warnings as OneLineWarnings lines (yielded: call its finish() after a success)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # interpreter diagnostics, not messages for users: a Ctrl-C landing between open() and `with`
        # leaves a file object that the garbage collector reports as "unclosed file"
        warnings.simplefilter("ignore", ResourceWarning)
        shown = OneLineWarnings()
        warnings.showwarning = shown.show
        yield shown


def _message(exc: BaseException) -> str:
    if isinstance(exc, NeuroAdaError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror or exc}" if exc.filename else f"{exc.strerror or exc}"
    return f"internal error: {type(exc).__name__}: {exc} (set NEUROADA_DEBUG=1 for a traceback)"


class _OneLineGroup(click.Group):
    """A click group whose every failure is one stderr line and an exit code from the shared table."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            # the context by hand, not click's main(): that answers a Ctrl-C by printing an empty line to stderr
            # before its Abort, and the interruption must be the one line below
            args = list(sys.argv[1:] if args is None else args)
            # the one-line warnings of neuroada-merge/-pack: a numpy RuntimeWarning met while reading a GGUF base
            # was Python's two lines with a source path
            with one_line_warnings() as shown:
                with self.make_context(prog_name or "neuroada", args, **extra) as ctx:
                    code = self.invoke(ctx)
                shown.finish()
        except click.exceptions.Exit as exc:  # --help, --version
            code = exc.exit_code
        except click.ClickException as exc:  # usage errors: one line, not click's three
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `neuroada`: the help, as click shows it
                exc.show()
            else:
                _fail(exc.format_message())
            code = EXIT_USAGE
        except (click.exceptions.Abort, KeyboardInterrupt):
            _fail("interrupted")
            code = EXIT_INTERRUPTED
        except BrokenPipeError:  # the reader of stdout left (`| head`): end quietly, as Unix tools do
            code = stdout_gone()
        except SystemExit:
            raise
        except Exception as exc:
            if not isinstance(exc, (NeuroAdaError, OSError)) and os.environ.get("NEUROADA_DEBUG"):
                raise
            _fail(_message(exc))
            code = exit_code(exc)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="neuroada-format")
def main():
    """NeuroAda sparse-delta adapters: validate, inspect (and merge/pack via neuroada-merge/-pack)."""


@main.command("validate")
@click.argument("adapter", type=click.Path())
@click.option("--base", type=click.Path(),
              help="Base model: a .safetensors file, a Hugging Face folder, a .gguf file or an .onnx model.")
@click.option("--check-selection", is_flag=True,
              help="Also check magnitude/reverse indices are the base's top-k (reads whole rows).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def validate_cmd(adapter, base, check_selection, as_json):
    """Check ADAPTER (a file or an adapter folder) against every rule of the spec (and BASE when given)."""
    if check_selection and not base:
        raise click.UsageError("--check-selection compares the indices with a base's top-k: it needs --base")
    file, _, _ = click.get_current_context().with_resource(reading_adapter(adapter))  # (read under its lock)
    warn_trained_extras(adapter, TRAINED_EXTRAS_LOST)
    if base:  # the lock rule's shared lock, as every reader of a checkpoint takes: never judge a half-merged base
        click.get_current_context().with_resource(checkpoint_lock(checkpoint_folder(base), exclusive=False))
    report = validate(file, base=base, check_selection=check_selection)
    if as_json:
        echo(json.dumps(report.to_dict(), indent=2))  # ensure_ascii: every control is escaped
    else:
        for p in report.problems:
            where = f"{p['tensor']}: " if p["tensor"] else ""
            echo(printable(f"{p['severity']}: {file}: {where}rule {p['rule']}: {p['message']}"),
                 err=p["severity"] == "error")
        if report.ok:
            against = f" against {base}" if base else ""
            echo(printable(f"valid: {file}{against}"))
    return 0 if report.ok else EXIT_INVALID


def _stats(values: np.ndarray) -> dict:
    """Statistics over the finite values (JSON has no NaN); non-finite ones are counted apart."""
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    finite = v[np.isfinite(v)]
    stats = {"min": None, "max": None, "mean_abs": None, "nonzero": 0.0, "nonfinite": int(v.size - finite.size)}
    if finite.size:
        stats.update({"min": float(finite.min()), "max": float(finite.max()),
                      "mean_abs": float(np.abs(finite).mean()),
                      "nonzero": float(np.count_nonzero(v) / v.size)})
    return stats


def describe(adapter) -> dict:
    targets = []
    for name, t in sorted(adapter.targets.items()):
        targets.append({
            "name": name, "shape": list(t.shape), "layout": t.layout, "base_dtype": t.dtype, "k": t.k,
            "index_dtype": t.index_dtype, "value_dtype": t.value_dtype,
            "bytes": int(t.indices.nbytes + t.values.nbytes), "values": _stats(t.values),
            **({"module": t.extra["module"]} if isinstance(t.extra.get("module"), str) else {}),  # spec 4.6
        })
    return {
        "path": adapter.path, "version": adapter.version,
        "base": {"name": adapter.base_name, "revision": adapter.base_revision,
                 "structure_hash": adapter.structure_hash},
        "selection": adapter.selection,
        "targets": targets,
        "entries": int(sum(t.indices.size for t in adapter.targets.values())),
        "tensor_bytes": int(adapter.nbytes),
        "file_bytes": os.path.getsize(adapter.path) if adapter.path else None,
    }


@main.command("inspect")
@click.argument("adapter", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect_cmd(adapter, as_json):
    """Describe ADAPTER (a file or an adapter folder): targets, shapes, k, dtypes, bytes, value
    statistics, base identity."""
    with reading_adapter(adapter) as (file, _, _):
        warn_trained_extras(adapter, TRAINED_EXTRAS_LOST)
        info = describe(load(file))
    if as_json:
        echo(json.dumps(info, indent=2))  # ensure_ascii: every control is escaped
        return 0
    b = info["base"]
    out = printable  # every string below may come from the file
    echo(out(f"{info['path']}: NeuroAda spec {info['version']}, {len(info['targets'])} targets, "
             f"{info['entries']:,} entries, {info['file_bytes']:,} bytes"))
    echo(out(f"base: {b['name'] or '-'} @ {b['revision'] or '-'}  structure {b['structure_hash'] or '-'}"))
    sel = info["selection"]
    echo(out(f"selection: {sel.get('rule')} (tie-break {sel.get('tie_break')}"
             f"{', seed ' + str(sel['seed']) if sel.get('seed') is not None else ''})"))
    header = f"{'target':<48} {'shape':>13} {'layout':>6} {'k':>4} {'idx':>4} {'val':>4} {'bytes':>10} " \
             f"{'mean|v|':>9} {'nonzero':>7}"
    echo(header)
    for t in info["targets"]:
        shape = "x".join(map(str, t["shape"]))
        mean = t["values"]["mean_abs"]
        name = out(t["name"])
        echo(out(f"{name[-48:]:<48} {shape:>13} {t['layout']:>6} {t['k']:>4} {t['index_dtype']:>4} "
                 f"{t['value_dtype']:>4} {t['bytes']:>10,} {mean if mean is not None else 0:>9.2e} "
                 f"{t['values']['nonzero']:>7.1%}"))
    renamed = [t for t in info["targets"] if "module" in t]
    if renamed:  # spec 4.6: keys are the checkpoint's; the model holds these weights under other names
        echo(f"{len(renamed)} target(s) the model holds under another name (module), e.g. "
             + out(f"{renamed[0]['name']} -> {renamed[0]['module']}"))
    return 0


if __name__ == "__main__":
    main()
