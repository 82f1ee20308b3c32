"""A progress bar for the converters that only a person at a terminal ever sees.

Bars go to stderr, appear only when stderr is a terminal and the step has run for a second, and
degrade to a no-op when tqdm is not installed (it belongs to an optional extra), so library callers,
pipes, CI logs and `--json` consumers get clean output.
"""
from __future__ import annotations

import sys

SHOW_AFTER_S = 1.0


class _Silent:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bar(total: int, desc: str, *, enabled: bool = True, unit: str = "B"):
    """A context-managed bar with update(n); silent unless enabled and stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Silent()
    byte_units = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=byte_units, unit_divisor=1024 if byte_units else 1000,
                file=sys.stderr, delay=SHOW_AFTER_S, leave=False, dynamic_ncols=True)
