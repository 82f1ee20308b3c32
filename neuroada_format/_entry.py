"""The console scripts' entry points (pyproject.toml [project.scripts]).

A script imports its module before calling anything in it, and the commands' modules take a second or more
to import (numpy, safetensors, click; torch or onnx behind some). A Ctrl-C in that second used to end in a
Python traceback, since the one-line failure handling (cli_common.run_command) did not run yet. This module
imports only the standard library and errors.py (and the package's __init__ imports nothing eagerly), so the guard below is
in place before any of that loads.
"""
from __future__ import annotations

import importlib
import signal
import sys

from .errors import EXIT_INTERRUPTED  # (errors.py imports only `re`)


def _interrupted() -> int:
    try:
        sys.stderr.write("error: interrupted\n")
        sys.stderr.flush()
    except OSError:
        pass
    return EXIT_INTERRUPTED


def _ignore_interrupts() -> None:
    """The command has ended (its report or its error line printed): a Ctrl-C now would only cut the exit short.
    Python puts SIGINT back to its default action for its own exit, so such a Ctrl-C ended a finished merge killed by
    SIGINT (a shell's 130, or a traceback); ignored, it is dropped, also when it is already pending."""
    while True:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return
        except KeyboardInterrupt:  # (one pending before the call took effect: dropped with it)
            continue


def _run(module: str):
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        return _interrupted()
    try:
        return main()
    except KeyboardInterrupt:  # (landed outside the command's own handling, just before it began or after it ended)
        return _interrupted()
    finally:
        _ignore_interrupts()


def neuroada():
    return _run("neuroada_format.cli")


def neuroada_merge():
    return _run("neuroada_format.converters.merge_cli")


def neuroada_pack():
    return _run("neuroada_format.converters.pack_cli")
