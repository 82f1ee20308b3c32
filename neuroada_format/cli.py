"""The `neuroada` command: validate and inspect adapter files.

Exit codes: 0 valid / done, 1 invalid adapter, 2 usage or I/O error. Errors are one line, never a
traceback; `--json` prints a machine-readable report instead.
"""
from __future__ import annotations

import functools
import json
import os
import sys

import click
import numpy as np

from .adapter import load
from .errors import NeuroAdaError
from .validate import validate

EXIT_INVALID = 1
EXIT_USAGE = 2


def one_line_errors(func):
    """Turn our errors and I/O failures into a single stderr line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except NeuroAdaError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        except OSError as exc:
            click.echo(f"error: {exc.filename or ''}: {exc.strerror or exc}", err=True)
            sys.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="neuroada-format")
def main():
    """NeuroAda sparse-delta adapters: validate, inspect (and merge/pack via neuroada-merge/-pack)."""


@main.command("validate")
@click.argument("adapter", type=click.Path(dir_okay=False))
@click.option("--base", type=click.Path(), help="Base model: a .safetensors file or a Hugging Face folder.")
@click.option("--check-selection", is_flag=True,
              help="Also check magnitude/reverse indices are the base's top-k (reads whole rows).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@one_line_errors
def validate_cmd(adapter, base, check_selection, as_json):
    """Check ADAPTER against every rule of the spec (and against BASE when given)."""
    if not os.path.exists(adapter):
        raise NeuroAdaError("no such file", path=adapter, rule="1.1")
    report = validate(adapter, base=base, check_selection=check_selection)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for p in report.problems:
            where = f"{p['tensor']}: " if p["tensor"] else ""
            click.echo(f"{p['severity']}: {adapter}: {where}rule {p['rule']}: {p['message']}",
                       err=p["severity"] == "error")
        if report.ok:
            against = f" against {base}" if base else ""
            click.echo(f"valid: {adapter}{against}")
    sys.exit(0 if report.ok else EXIT_INVALID)


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
@click.argument("adapter", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@one_line_errors
def inspect_cmd(adapter, as_json):
    """Describe ADAPTER: targets, shapes, k, dtypes, bytes, value statistics, base identity."""
    try:
        info = describe(load(adapter))
    except NeuroAdaError as exc:
        click.echo(f"invalid: {exc}", err=True)
        sys.exit(EXIT_INVALID if os.path.exists(adapter) else EXIT_USAGE)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    b = info["base"]
    click.echo(f"{info['path']}: NeuroAda spec {info['version']}, {len(info['targets'])} targets, "
               f"{info['entries']:,} entries, {info['file_bytes']:,} bytes")
    click.echo(f"base: {b['name'] or '-'} @ {b['revision'] or '-'}  structure {b['structure_hash'] or '-'}")
    sel = info["selection"]
    click.echo(f"selection: {sel.get('rule')} (tie-break {sel.get('tie_break')}"
               f"{', seed ' + str(sel['seed']) if sel.get('seed') is not None else ''})")
    header = f"{'target':<48} {'shape':>13} {'layout':>6} {'k':>4} {'idx':>4} {'val':>4} {'bytes':>10} " \
             f"{'mean|v|':>9} {'nonzero':>7}"
    click.echo(header)
    for t in info["targets"]:
        shape = "x".join(map(str, t["shape"]))
        mean = t["values"]["mean_abs"]
        click.echo(f"{t['name'][-48:]:<48} {shape:>13} {t['layout']:>6} {t['k']:>4} {t['index_dtype']:>4} "
                   f"{t['value_dtype']:>4} {t['bytes']:>10,} {mean if mean is not None else 0:>9.2e} "
                   f"{t['values']['nonzero']:>7.1%}")


if __name__ == "__main__":
    main()
