"""`neuroada-merge`: merge adapters into a checkpoint (new copy or in place) and revert in-place merges.

    neuroada-merge --base BASE --adapter A.safetensors [--adapter B.safetensors:0.5] --out OUT
    neuroada-merge --base BASE --adapter A.safetensors --in-place [--journal J]
    neuroada-merge --revert J

Exit codes: 0 done; 1 an adapter is invalid or does not belong to the base (or a journal to the
files); 2 usage or I/O error. Every error is one stderr line, never a traceback. A merge killed
mid-way leaves no OUT, only `OUT.tmp-<host>-<pid>-<hex>` siblings, which the next merge to the same
OUT deletes.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys

import click

from neuroada_format import NeuroAdaError, load

from .safetensors_merge import Mismatch

EXIT_MISMATCH = 1
EXIT_USAGE = 2
_SCALE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


class _Invalid(Exception):
    """An adapter file exists but is not a valid adapter (exit 1)."""


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """'path' or 'path:SCALE'; only a trailing ':<decimal number>' is a scale (paths may contain ':').

    The whole string is a path when it names an existing file and the part before the colon does not.
    """
    head, sep, tail = spec.rpartition(":")
    if sep and head and _SCALE.match(tail) and (os.path.exists(head) or not os.path.exists(spec)):
        scale = float(tail)
        if not math.isfinite(scale) or abs(scale) > 3.4028234663852886e38:
            raise click.UsageError(f"adapter scale {tail!r} is not a finite f32 number")
        return head, scale
    return spec, 1.0


def _load_adapters(specs) -> list:
    adapters = []
    for spec in specs:
        path, scale = parse_adapter_spec(spec)
        if not os.path.isfile(path):
            raise NeuroAdaError("no such adapter file", path=path, rule="1.1")
        try:
            adapters.append((load(path), scale))
        except NeuroAdaError as exc:
            raise _Invalid(str(exc)) from None
    return adapters


def _merge_onnx(base, adapters, out, *, verify, in_place, progress, durable) -> dict:
    try:
        from .onnx_merge import merge_onnx
    except ImportError as exc:
        if exc.name and exc.name.endswith("onnx_merge"):
            raise NeuroAdaError("ONNX bases are not supported by this installation "
                                "(neuroada_format.converters.onnx_merge is missing)", path=base) from None
        raise NeuroAdaError(f"ONNX merging needs the onnx extra (pip install 'neuroada-format[onnx]'): {exc}",
                            path=base) from None
    return merge_onnx(base, adapters, out, verify=verify, in_place=in_place, progress=progress, durable=durable)


def _report(summary: dict, as_json: bool) -> None:
    for w in summary.get("warnings") or ():
        click.echo(f"warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    mode = summary.get("mode")
    seconds = summary.get("seconds")
    took = f" in {seconds:.2f} s" if isinstance(seconds, (int, float)) else ""
    if mode == "revert":
        click.echo(f"reverted {summary['targets_restored']} of {summary['targets']} tensors "
                   f"({summary['values_restored']:,} values; {summary['targets_already_original']} already "
                   f"original) from {summary['journal']}{took}")
        return
    targets = summary.get("targets", "?")
    count = len(targets) if isinstance(targets, dict) else targets  # ONNX summaries list each target
    output = summary.get("output") or summary.get("out") or summary.get("base")
    line = (f"merged {count} tensors ({summary.get('values_touched', 0):,} values) from "
            f"{len(summary.get('adapters') or [])} adapter(s) into {output}{took}")
    if summary.get("journal"):
        line += f"; revert with: neuroada-merge --revert {summary['journal']}"
    click.echo(line)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base", metavar="BASE", help="Base checkpoint: a Hugging Face folder, a .safetensors file, or "
                                             "an .onnx model.")
@click.option("--adapter", "adapter_specs", multiple=True, metavar="PATH[:SCALE]",
              help="Adapter file, optionally with a scale (repeat to merge several, summed in this order).")
@click.option("--out", metavar="OUT", help="New folder/file to write (same kind as BASE).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT (atomically).")
@click.option("--in-place", is_flag=True, help="Patch BASE itself after writing a revert journal.")
@click.option("--journal", metavar="J", help="Where --in-place writes its revert journal "
                                             "(default: beside BASE, .neuroada-journal-<time>.safetensors).")
@click.option("--revert", "revert_journal", metavar="JOURNAL",
              help="Undo an --in-place merge with its journal (--base if the checkpoint moved).")
@click.option("--no-verify", is_flag=True, help="Skip the checks that read base values (probe hash); "
                                                 "names, shapes and dtypes are still checked.")
@click.option("--fsync", "durable", is_flag=True,
              help="Flush what is written to disk before it appears under its name, so it also survives a "
                   "power cut (like cp, the default leaves write-back to the kernel; a killed merge never "
                   "leaves a partial OUT either way). The --in-place journal is always flushed.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.version_option(package_name="neuroada-format")
def command(base, adapter_specs, out, overwrite, in_place, journal, revert_journal, no_verify, durable, as_json):
    """Merge NeuroAda adapters into BASE (a new copy, or in place), or revert an in-place merge."""
    if revert_journal:
        if adapter_specs or out or in_place or overwrite or journal or durable:
            raise click.UsageError("--revert takes only a journal (and --base if the checkpoint moved); "
                                   "it always flushes what it restores")
        from .journal import revert

        _report(revert(revert_journal, base=base, progress=True), as_json)
        return 0
    if not base:
        raise click.UsageError("missing --base (or --revert JOURNAL)")
    if not adapter_specs:
        raise click.UsageError("missing --adapter")
    if in_place == bool(out):
        raise click.UsageError("give exactly one of --out OUT and --in-place")
    if journal and not in_place:
        raise click.UsageError("--journal goes with --in-place")
    if overwrite and in_place:
        raise click.UsageError("--overwrite goes with --out")
    if not os.path.exists(base):
        raise NeuroAdaError("no such file or folder", path=base, rule="1.1")
    adapters = _load_adapters(adapter_specs)
    verify = not no_verify
    if base.lower().endswith(".onnx"):
        if journal:
            raise click.UsageError("--journal applies to safetensors bases only")
        if out and os.path.lexists(out) and not overwrite:
            raise NeuroAdaError("output already exists; pass --overwrite to replace it", path=out)
        summary = _merge_onnx(base, adapters, out, verify=verify, in_place=in_place, progress=True, durable=durable)
    elif in_place:
        from .safetensors_merge import merge_in_place

        summary = merge_in_place(base, adapters, journal=journal, verify=verify, progress=True, durable=durable)
    else:
        from .safetensors_merge import merge_safetensors

        summary = merge_safetensors(base, adapters, out, verify=verify, overwrite=overwrite, progress=True,
                                    durable=durable)
    _report(summary, as_json)
    return 0


def _fail(message: str, code: int) -> int:
    click.echo("error: " + " ".join(str(message).split()), err=True)
    return code


def run(argv=None) -> int:
    """The CLI as a function returning its exit code (what `main` exits with)."""
    try:
        code = command.main(args=argv, prog_name="neuroada-merge", standalone_mode=False)
    except click.UsageError as exc:
        return _fail(exc.format_message(), EXIT_USAGE)
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        return _fail("interrupted", 130)
    except _Invalid as exc:
        return _fail(str(exc), EXIT_MISMATCH)
    except Mismatch as exc:
        return _fail(str(exc), EXIT_MISMATCH)
    except NeuroAdaError as exc:
        rule = exc.rule or ""
        return _fail(str(exc), EXIT_MISMATCH if rule[:2] in ("3.", "4.") else EXIT_USAGE)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", EXIT_USAGE)
    except Exception as exc:  # a bug; still one line, with a way to see the traceback
        if os.environ.get("NEUROADA_DEBUG"):
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc} (set NEUROADA_DEBUG=1 for a traceback)",
                     EXIT_USAGE)
    return code if isinstance(code, int) else 0


def main(argv=None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
