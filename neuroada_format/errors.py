"""The one exception type the library raises for bad input.

Every message names the file, the tensor (when there is one) and the spec rule that was broken, so a
user can look the rule up in spec/SPEC.md and a CLI can print the message as a single line.
"""
from __future__ import annotations


class NeuroAdaError(Exception):
    """A file, tensor or argument breaks a rule of the NeuroAda adapter spec (or cannot be read)."""

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None,
                 rule: str | None = None):
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.rule = rule
        self.detail = message
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.path:
            parts.append(self.path)
        if self.tensor:
            parts.append(self.tensor)
        if self.rule:
            parts.append(f"rule {self.rule}")
        parts.append(self.detail)
        text = ": ".join(parts).replace("\n", " ")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")  # printable whatever the input
