"""The one exception type users see: a one-line message naming the problem."""
from __future__ import annotations


class CfbError(Exception):
    """An error with a message fit for the user (no traceback is shown for it)."""


class InputError(CfbError):
    """Bad input: names the file (or entry), the line and the field."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 field: str | None = None):
        where = ", ".join(p for p in (
            source, f"line {line}" if line is not None else None,
            f"field '{field}'" if field else None) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.source, self.line, self.field = source, line, field
