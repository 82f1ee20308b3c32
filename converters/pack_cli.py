"""`neuroada-pack`: extract an adapter from a dense fine-tune, combine adapters, repack one, or convert
to and from PEFT Super-Tuning folders (converters/peft_interop.py).

Exit codes are the table of neuroada_format.errors (cli_common.py): 0 written; 1 the inputs break a
rule (an invalid adapter or base, adapters or checkpoints that do not belong together); 2 usage or
I/O error; 130 interrupted. Every error is one line on stderr; `--json` prints the summary on stdout.
Adapter inputs are files or adapter folders. The output follows the one overwrite rule
(neuroada_format.durable.check_output): an existing -o needs --overwrite, and -o may never be, hold
or lie inside an input.

Each mode is one function below (`_extract`, `_combine`, `_repack`, `_to_peft`, `_from_peft`) returning
(summary, text); a new mode is one more option, one more function and one more branch in `cli`.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import ExitStack, contextmanager

import click
from click.core import ParameterSource

from neuroada_format import save as naf_save
from neuroada_format.durable import check_output, checkpoint_folder, checkpoint_lock
from neuroada_format.folder import adapter_paths

from . import pack, peft_interop
from .backend import load_adapter_file, refuse_misnamed
from .cli_common import echo, parse_scaled, printable, refuse_empty, refuse_folder_syntax, reporting, run_command

HELP = """Build NeuroAda adapters.

\b
Extract (the adapter closest to a dense fine-tune, k entries per row):
  neuroada-pack --base BASE --finetuned FT -k K -o OUT.safetensors

\b
Combine (one adapter equal to a weighted sum; weights default to 1):
  neuroada-pack --combine A.safetensors:0.7 B.safetensors:0.3 --base BASE -o OUT.safetensors

\b
Repack (other dtypes, current spec version):
  neuroada-pack --repack A.safetensors --value-dtype F16 -o OUT.safetensors

\b
PEFT (a Super-Tuning folder stock PEFT loads with PeftModel.from_pretrained, and back):
  neuroada-pack --to peft ADAPTER [--base BASE] [--task-type T] -o PEFT_DIR
  neuroada-pack --from-peft PEFT_DIR --base BASE -o OUT.safetensors

BASE and FT are safetensors checkpoints: a file or a Hugging Face folder, sharded or not; BASE may
also be a .gguf file.

--combine needs --base because the union of positions has new entries whose probe hash (the base values the
adapter is tied to) must be read from the base, and because each input is checked against it so
adapters made for different bases are refused.

By default every 2-D F32/F16/BF16 tensor named *.weight is a target except embeddings, output heads
(lm_head) and norms; --targets REGEX (searched in the tensor name) replaces that rule.
"""


def _need(paths: dict):
    for what, path in paths.items():
        if path is not None and not os.path.exists(path):
            raise click.UsageError(f"{what} {path}: no such file or folder")


@contextmanager
def _reading(*checkpoints):
    """The lock rule's shared lock on each checkpoint read (its folder, or the folder of a single file), as a merge
    into a copy takes: without it an extract run while an in-place merge patched the base read half-merged weights
    and wrote, with exit 0, an adapter tied to a base that never existed. A busy checkpoint is refused at once."""
    with ExitStack() as stack:
        for path in checkpoints:
            if path:
                stack.enter_context(checkpoint_lock(checkpoint_folder(path), exclusive=False))
        yield


def _file_summary(out: str, adapter) -> dict:
    return {"output": out, "targets": len(adapter.targets),
            "entries": int(sum(t.indices.size for t in adapter.targets.values())),
            "bytes": os.path.getsize(out)}


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="neuroada-format")
@click.argument("sources", nargs=-1, metavar="[ADAPTER[:WEIGHT]]...")
@click.option("--base", help="Base checkpoint (extract, combine, --from-peft; --to peft checks against it).")
@click.option("--finetuned", help="Dense fine-tuned checkpoint of the same architecture (extract).")
@click.option("-k", type=click.IntRange(min=1), help="Entries per row (extract).")
@click.option("-o", "--out", required=True, help="Adapter file (--to peft: folder) to write (atomically).")
@click.option("--positions", type=click.Choice(["delta", "magnitude"]), default="delta", show_default=True,
              help="delta: largest |FT - BASE| per row (best approximation); magnitude: the base's top-k |W| "
                   "(NeuroAda's positions).")
@click.option("--targets", metavar="REGEX", help="Tensors to extract (re.search on the name).")
@click.option("--layout-in-out", default="auto", show_default=True, metavar="REGEX|auto|none",
              help="Tensors stored [in, out] (GPT-2 Conv1D). auto: c_attn/c_proj/c_fc/q_attn when the base "
                   "folder's config.json says a GPT-2-family model_type.")
@click.option("--value-dtype", type=click.Choice(["BF16", "F16", "F32"]),
              help="Value dtype (extract default BF16; combine default: the inputs' own, F32 if mixed).")
@click.option("--index-dtype", type=click.Choice(["I16", "I32"]), help="Index dtype (repack).")
@click.option("--combine", "do_combine", is_flag=True, help="Combine the ADAPTER[:WEIGHT] arguments.")
@click.option("--repack", "repack_path", metavar="ADAPTER", help="Rewrite ADAPTER with other dtypes.")
@click.option("--base-name", help="Base model name recorded in the adapter (extract: default BASE's folder or "
                                   "file name; combine: default the first adapter's; --to peft: PEFT's "
                                   "base_model_name_or_path, default the adapter's).")
@click.option("--to", "to_format", type=click.Choice(["peft"]),
              help="Export ADAPTER (file or folder) to a PEFT Super-Tuning folder; --base checks it first.")
@click.option("--from-peft", "peft_dir", metavar="PEFT_DIR", help="Import a PEFT Super-Tuning folder (needs --base).")
@click.option("--task-type", type=click.Choice(["auto", "none", *peft_interop.TASK_TYPES]), default="auto",
              show_default=True,
              help="--to peft: PEFT's task_type (AutoPeftModelForCausalLM needs CAUSAL_LM). auto: from BASE's "
                   "config.json architectures (GPT2LMHeadModel, LlamaForCausalLM: CAUSAL_LM), else none.")
@click.option("--allow-inexact", is_flag=True,
              help="--to peft: export values that PEFT would round to the base dtype before adding.")
@click.option("--round-values", is_flag=True, help="--from-peft: round values to --value-dtype (RNE) "
                                                   "instead of refusing values that are not exact in it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o (never an input).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def cli(sources, base, finetuned, k, out, positions, targets, layout_in_out, value_dtype, index_dtype,
        do_combine, repack_path, base_name, to_format, peft_dir, task_type, allow_inexact, round_values, overwrite,
        as_json):
    refuse_empty(("-o/--out", out), ("--base", base), ("--finetuned", finetuned), ("--repack", repack_path),
                 ("--from-peft", peft_dir))
    if not to_format:  # (--to peft writes a folder)
        refuse_folder_syntax("-o/--out", out)
    if (allow_inexact and not to_format) or (round_values and not peft_dir):
        raise click.UsageError("--allow-inexact goes with --to peft, --round-values with --from-peft")
    extracting = not (to_format or peft_dir or repack_path is not None or do_combine)
    given = click.get_current_context().get_parameter_source
    if not to_format and given("task_type") is not ParameterSource.DEFAULT:
        raise click.UsageError("--task-type goes with --to peft")
    for option, name in (("positions", "--positions"), ("layout_in_out", "--layout-in-out")):
        if not extracting and given(option) is not ParameterSource.DEFAULT:
            raise click.UsageError(f"{name} applies to extraction (--base with --finetuned) only")
    # held until the command's context closes, after the output is written
    click.get_current_context().with_resource(_reading(base, finetuned if extracting else None))
    if to_format or peft_dir:
        if (to_format and peft_dir) or do_combine or repack_path or finetuned or k or targets or index_dtype:
            raise click.UsageError("--to peft / --from-peft take only ADAPTER or PEFT_DIR, --base, -o, --base-name "
                                   "and their own flags")
        if to_format and len(sources) != 1:
            raise click.UsageError("--to peft needs exactly one ADAPTER")
        if to_format and value_dtype:
            raise click.UsageError("--to peft writes F32 values (PEFT's own); --value-dtype does not apply")
        if peft_dir and (sources or not base):
            raise click.UsageError("--from-peft needs --base (the probe hashes are read from it) and no ADAPTER")
        summary, text = (_to_peft(sources[0], base, out, overwrite, base_name, task_type, allow_inexact)
                         if to_format else
                         _from_peft(peft_dir, base, out, overwrite, value_dtype, round_values, base_name))
    elif repack_path is not None:
        if do_combine or sources or base or finetuned or k or targets or base_name:
            raise click.UsageError("--repack takes only -o, --value-dtype, --index-dtype, --overwrite and --json")
        summary, text = _repack(repack_path, out, overwrite, value_dtype, index_dtype)
    elif do_combine:
        if not sources:
            raise click.UsageError("--combine needs at least one ADAPTER[:WEIGHT]")
        if not base:
            raise click.UsageError("--combine needs --base (see --help: the new positions' probe is read from it)")
        if finetuned or k or targets or index_dtype:
            raise click.UsageError("--finetuned, -k, --targets and --index-dtype do not apply to --combine")
        summary, text = _combine(sources, base, out, overwrite, value_dtype, base_name)
    else:
        if sources:
            raise click.UsageError(f"unexpected argument {sources[0]!r} (did you mean --combine?)")
        if index_dtype:
            raise click.UsageError("--index-dtype applies to --repack (extraction picks I16 where it fits)")
        missing = [opt for opt, v in (("--base", base), ("--finetuned", finetuned), ("-k", k)) if not v]
        if missing:
            raise click.UsageError(f"extraction needs {', '.join(missing)} (or use --combine / --repack)")
        summary, text = _extract(base, finetuned, k, positions, targets, layout_in_out, value_dtype, base_name,
                                 out, overwrite, progress=not as_json)
    with reporting(f"{os.path.abspath(out)} was written"):
        echo(json.dumps(summary, indent=2) if as_json else "\n".join(printable(line) for line in text.split("\n")))


def _output(out: str, inputs, overwrite: bool) -> str:
    """-o under the one overwrite rule (checked before any work: never after minutes of extraction)."""
    refuse_misnamed(out, "safetensors", "as a NeuroAda adapter (a safetensors file)")
    return check_output(out, inputs=inputs, overwrite=overwrite, kind="file")


def _repack(source, out, overwrite, value_dtype, index_dtype):
    original = load_adapter_file(source)
    out = _output(out, [source, original.path], overwrite)  # source: an adapter folder is an input as a whole
    adapter = pack.repack(original, value_dtype, index_dtype)
    naf_save(adapter, out, overwrite=overwrite)
    summary = {"mode": "repack", "source": source, "version": adapter.version, **_file_summary(out, adapter)}
    return summary, f"wrote {out}: {summary['targets']} targets, spec {adapter.version}, {summary['bytes']:,} bytes"


def _combine(sources, base, out, overwrite, value_dtype, base_name):
    parsed = [parse_scaled(s) for s in sources]
    _need({"base": base})
    adapters = [(load_adapter_file(p), w) for p, w in parsed]
    out = _output(out, [base] + [p for p, _ in parsed] + [a.path for a, _ in adapters], overwrite)
    combined = pack.combine(adapters, base, value_dtype=value_dtype, base_name=base_name)
    naf_save(combined, out, overwrite=overwrite)
    summary = {"mode": "combine", "sources": [{"path": p, "weight": w} for p, w in parsed],
               "k": {n: t.k for n, t in sorted(combined.targets.items())}, **_file_summary(out, combined)}
    return summary, (f"wrote {out}: {len(parsed)} adapters combined into {summary['targets']} targets, "
                     f"{summary['entries']:,} entries, {summary['bytes']:,} bytes")


def _to_peft(source, base, out, overwrite, base_name, task_type, allow_inexact):
    if base:
        _need({"base": base})
    s = peft_interop.to_peft(source, out, base=base, base_model_name_or_path=base_name, overwrite=overwrite,
                             task_type=None if task_type == "none" else task_type, allow_inexact=allow_inexact)
    summary = {"mode": "to-peft", "source": source, **s}
    return summary, (f"wrote {s['output']}: {s['targets']} targets, task_type {s['task_type'] or 'none'}, "
                     f"sparsity {s['sparsity']!r}, {s['entries']:,} entries + "
                     f"{s['peft_entries'] - s['entries']:,} padding, {s['peft_file_bytes']:,} bytes "
                     f"({s['peft_file_bytes'] / max(1, os.path.getsize(adapter_paths(source)[0])):.2f}x the adapter)"
                     + (f"; {s['inexact_values']:,} values PEFT rounds to the base dtype" if s["inexact_values"]
                        else ""))


def _from_peft(folder, base, out, overwrite, value_dtype, round_values, base_name):
    _need({"base": base, "PEFT folder": folder})
    out = _output(out, [folder, base], overwrite)
    adapter, report = peft_interop.import_peft(folder, base, value_dtype=value_dtype, round_values=round_values,
                                               base_name=base_name)
    naf_save(adapter, out, overwrite=overwrite)
    summary = {"mode": "from-peft", "source": folder, **report, **_file_summary(out, adapter)}
    how = ("the exported adapter, exactly" if report["exact_round_trip"] else
           f"k up to {max(t.k for t in adapter.targets.values())}, rows padded per spec 4.5")
    return summary, (f"wrote {out}: {summary['targets']} targets ({how}), {summary['entries']:,} entries, "
                     f"{summary['bytes']:,} bytes")


def _extract(base, finetuned, k, positions, targets, layout_in_out, value_dtype, base_name, out, overwrite, *,
             progress):
    _need({"base": base, "finetuned": finetuned})
    out = _output(out, [base, finetuned], overwrite)
    adapter, report = pack.extract(base, finetuned, k, positions, targets, layout_in_out=layout_in_out,
                                   value_dtype=value_dtype or "BF16",
                                   base_name=base_name or pack.file_label(base),
                                   progress=progress)
    naf_save(adapter, out, overwrite=overwrite)
    summary = {"mode": "extract", **_file_summary(out, adapter), "report": report}
    worst = sorted(report["targets"].items(), key=lambda kv: -kv[1]["rel_error"])[:5]
    lines = [f"wrote {out}: {summary['targets']} targets, k={k} ({positions}), {summary['entries']:,} "
             f"entries, {summary['bytes']:,} bytes",
             f"relative error ||D - D_k|| / ||D||: {report['rel_error']:.4g} overall, "
             f"{report['rel_error_stored']:.4g} with {report['value_dtype']} values"]
    if report["unchanged"]:
        lines.append(f"{len(report['unchanged'])} selected tensors are unchanged in the fine-tune (left out)")
    if report["not_in_finetuned"]:
        lines.append(f"{len(report['not_in_finetuned'])} selected tensors are missing from the fine-tune (left "
                     f"out), e.g. {report['not_in_finetuned'][0]}")
    lines += [f"  {r['rel_error']:.4g}  {name}" for name, r in worst]
    return summary, "\n".join(lines)


def main(argv=None):
    """Entry point: click parses, cli_common turns every failure into one line and an exit code."""
    sys.exit(run_command(cli, argv, "neuroada-pack"))


if __name__ == "__main__":
    main()
