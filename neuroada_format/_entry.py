"""The console scripts' entry points (pyproject.toml [project.scripts]).

A script imports its module before calling anything in it, and the commands' modules take a second or more
to import (numpy, safetensors, click; torch or onnx behind some). A Ctrl-C in that second used to end in a
Python traceback, since the one-line failure handling (cli_common.run_command) did not run yet. This module
imports only the standard library and errors.py (and the package's __init__ imports nothing eagerly), so the guard below is
in place before any of that loads.
"""
from __future__ import annotations

import importlib
import sys

from .errors import EXIT_INTERRUPTED  # (errors.py imports only `re`)


def _run(module: str):
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.stderr.flush()
        return EXIT_INTERRUPTED
    return main()


def neuroada():
    return _run("neuroada_format.cli")


def neuroada_merge():
    return _run("neuroada_format.converters.merge_cli")


def neuroada_pack():
    return _run("neuroada_format.converters.pack_cli")
