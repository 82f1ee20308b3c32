"""`neuroada-merge`: merge adapters into a checkpoint (new copy or in place) and revert in-place merges.

    neuroada-merge --base BASE --adapter A[:SCALE] [--adapter B:0.5] --out OUT
    neuroada-merge --base BASE --adapter A --in-place [--journal J]
    neuroada-merge --revert J

BASE is any format registered in backend.py (safetensors file or folder, ONNX file, a folder of ONNX models such
as an Optimum encoder-decoder export, GGUF); a folder is an ONNX export when it holds .onnx models and no
safetensors weights at its top (both at once is refused). An adapter is a file or an adapter folder. Exit codes
are the table of neuroada_format.errors (cli_common.py): 0 done;
1 an input breaks a rule (an invalid adapter, one that does not belong to the base, a broken base or
journal); 2 usage or I/O error; 130 interrupted. Every error is one stderr line, never a traceback.
A merge killed mid-way leaves no OUT, only `OUT.tmp-<host>-<pid>-<hex>` siblings (and, for an ONNX model with
external data, its output lock `.OUT.neuroada-lock` and the data files it had published), which the next merge
to the same OUT deletes.
"""
from __future__ import annotations

import json
import os
import sys

import click

from .backend import MergeSummary, merge
from .cli_common import (echo, parse_scaled, printable, refuse_empty, refuse_folder_syntax, reporting, run_command,
                         shell_word)


def _done(summary: dict) -> str:
    """What a finished run did, for an error line whose report could not be printed (the journal, above all)."""
    if summary["mode"] == "revert":
        return f"the revert from {summary['journal']} is done"
    if summary["journal"]:
        return (f"{summary['output']} was merged in place; revert with: neuroada-merge --revert "
                f"{shell_word(summary['journal'])}")
    return f"{summary['output']} was written"


def _report(summary, as_json: bool) -> None:
    if isinstance(summary, MergeSummary):
        for w in summary.warnings:
            echo(f"warning: {printable(w)}", err=True)
        summary = summary.to_dict()
    with reporting(_done(summary)):
        _print(summary, as_json)


def _print(summary: dict, as_json: bool) -> None:
    if as_json:
        echo(json.dumps(summary, indent=2, default=str))
        return
    took = f" in {summary['seconds']:.2f} s"
    if summary["mode"] == "revert":
        echo(printable(f"reverted {summary['targets_restored']} of {summary['targets']} tensors "
                       f"({summary['values_restored']:,} values; {summary['targets_already_original']} "
                       f"already original) from {summary['journal']}{took}"))
        return
    line = (f"merged {summary['targets']} tensors ({summary['values_touched']:,} values) from "
            f"{len(summary['adapters'])} adapter(s) into {summary['output']}{took}")
    if (summary.get("details") or {}).get("note"):  # a backend's one-line remark (GGUF: exact or re-encoded)
        line += f"; {summary['details']['note']}"
    if summary["journal"]:
        line += f"; revert with: neuroada-merge --revert {shell_word(summary['journal'])}"  # pasteable
    echo(printable(line))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base", metavar="BASE", help="Base checkpoint: a Hugging Face folder, a .safetensors file, "
                                             "an .onnx model, a folder of .onnx models (an Optimum export: all "
                                             "merged at once) or a llama.cpp .gguf file.")
@click.option("--adapter", "adapter_specs", multiple=True, metavar="PATH[:SCALE]",
              help="Adapter file or folder, optionally with a scale (repeat to merge several, summed in this "
                   "order).")
@click.option("--out", metavar="OUT", help="New folder/file to write (same kind as BASE).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT (atomically).")
@click.option("--in-place", is_flag=True, help="Patch BASE itself after writing a revert journal.")
@click.option("--journal", metavar="J", help="Where --in-place writes its revert journal "
                                             "(default: .neuroada-journal-<time>.safetensors inside a BASE folder, "
                                             ".neuroada-journal-<file>-<time>.safetensors beside a BASE file; dot-files, "
                                             "which merges of a folder leave out).")
@click.option("--revert", "revert_journal", metavar="JOURNAL",
              help="Undo an --in-place merge with its journal (--base if the checkpoint moved).")
@click.option("--no-verify", is_flag=True, help="Skip the checks that read base values (probe hash); "
                                                 "names, shapes and dtypes are still checked.")
@click.option("--fsync", "durable", is_flag=True,
              help="Flush what is written to disk before it appears under its name, so it also survives a "
                   "power cut (like cp, the default leaves write-back to the kernel; a killed merge never "
                   "leaves a partial OUT either way). The --in-place journal is always flushed.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="A setting of BASE's format backend (repeatable). GGUF: target_type=F16|Q8_0|..., "
                   "requant=Q8_0, encoder=search|naive, touched_weight=N (default 100).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.version_option(package_name="neuroada-format")
def command(base, adapter_specs, out, overwrite, in_place, journal, revert_journal, no_verify, durable, options,
            as_json):
    """Merge NeuroAda adapters into BASE (a new copy, or in place), or revert an in-place merge."""
    refuse_empty(("--revert", revert_journal), ("--base", base), ("--out", out), ("--journal", journal))
    if revert_journal:
        if adapter_specs or out or in_place or overwrite or journal or durable or options or no_verify:
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
    if out and os.path.isfile(base):  # every file BASE gives a file OUT (a folder BASE gives a folder)
        refuse_folder_syntax("--out", out)
    refuse_folder_syntax("--journal", journal)
    settings = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--option {item!r} is not KEY=VALUE")
        key = key.replace("-", "_")
        if key in settings:  # the last one used to win silently (and a warning recommended the one overridden)
            raise click.UsageError(f"--option {key} is given twice ({settings[key]!r} and {value!r}); give it once")
        settings[key] = value
    # paths, not loaded adapters: the seam counts an adapter folder as given among the inputs OUT may not touch
    adapters = [parse_scaled(spec) for spec in adapter_specs]
    summary = merge(base, adapters, out, in_place=in_place, journal=journal,
                    verify=not no_verify, overwrite=overwrite, durable=durable, progress=True, options=settings)
    _report(summary, as_json)
    return 0


def run(argv=None) -> int:
    """The CLI as a function returning its exit code (what `main` exits with)."""
    return run_command(command, argv, "neuroada-merge")


def main(argv=None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
