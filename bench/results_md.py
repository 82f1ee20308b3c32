"""bench/RESULTS.md: each benchmark owns one "## " section and replaces only that one.

Shared by the scripts in this folder (run as `python bench/<script>.py`, so this folder is on sys.path).
"""
from __future__ import annotations

import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def replace_section(heading: str, body: str, path: str = RESULTS) -> None:
    """Write `heading` + body into RESULTS.md, replacing only the section with that exact heading."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark results\n"
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    new = [heading, "", *body.strip("\n").split("\n"), ""]
    if start is None:
        lines = [*lines[:len(lines) - (lines[-1] == "")], "", *new]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = [*lines[:start], *new, *lines[end:]]
    out = "\n".join(lines).rstrip("\n") + "\n"
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(out)
    os.replace(tmp, path)


def table(rows: list[list]) -> str:
    """A markdown table: the first row is the header; cells are shown with str()."""
    head, *rest = rows
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rest]
    return "\n".join(lines)
