"""Reading text files with errors that name the line (no heavy imports: serving uses it)."""
from __future__ import annotations

from pathlib import Path

from ..cf_core.errors import InputError


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """Whole file as text; a bad byte is reported with its line number."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", source=str(path))
    if path.is_dir():
        raise InputError("is a directory, expected a file", source=str(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})", source=str(path)) from None
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"not valid {encoding} text (byte 0x{data[e.start]:02x})", source=str(path), line=line) from None
