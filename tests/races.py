"""Races against the file system, staged deterministically for tests (import as `from races import ...`)."""
from __future__ import annotations

import contextlib
import os
from unittest import mock

from neuroada_format import safe_io


@contextlib.contextmanager
def fifo_after_check():
    """Every path safe_io checks is swapped for a FIFO right after the check passed: what a reader that opens
    by name after checking would then block on."""
    real_check = safe_io.check_regular

    def check_then_swap(path, **kw):
        st = real_check(path, **kw)
        os.remove(path)
        os.mkfifo(path)
        return st

    with mock.patch.object(safe_io, "check_regular", check_then_swap):
        yield
