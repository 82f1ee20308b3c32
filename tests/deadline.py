"""A SIGALRM guard for tests that must not block (FIFOs, devices, hostile files): a hang becomes a failure."""
from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def deadline(seconds: float = 5):
    def fire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: something blocked")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
