"""A Ctrl-C inside open_regular's open() (found by bench/surroundings.py, `neuroada-pack --repack` under
SIGINT): the half-built file object closed the descriptor, the cleanup closed it again, and the EBADF it
raised replaced the interrupt, so the CLI said `error: Bad file descriptor` (exit 2) instead of
`error: interrupted` (130)."""
from __future__ import annotations

import io

import pytest

from neuroada_format import safe_io


def test_an_interrupt_inside_open_stays_an_interrupt(tmp_path, monkeypatch):
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"x" * 16)

    def interrupted_open(fd, *args, **kwargs):
        io.open(fd, *args, **kwargs).close()   # the descriptor is gone, as when FileIO is dropped mid-open
        raise KeyboardInterrupt

    monkeypatch.setattr(safe_io, "open", interrupted_open, raising=False)
    with pytest.raises(KeyboardInterrupt):
        safe_io.open_regular(path)
    monkeypatch.undo()
    with safe_io.open_regular(path) as f:
        assert f.read() == b"x" * 16
