"""Reading text files with errors that name the line (no heavy imports: serving uses it)."""
from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..cf_core.errors import InputError


def require_file(path: Path) -> Path:
    """``path``, a file that can be opened for reading, else an ``InputError`` naming it: not found, a
    directory, a pipe or device, or unreadable (e.g. its permissions)."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", source=str(path))
    if path.is_dir():
        raise InputError("is a directory, expected a file", source=str(path))
    if not path.is_file():  # (a pipe is read once, and naming a bad line reads it again; /dev/zero never ends)
        raise InputError("is not a regular file (a pipe or a device): save it to a file first", source=str(path))
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})", source=str(path)) from None
    return path


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """A read error (EIO, a file gone) inside the block as an ``InputError`` naming ``path``: pandas'
    parser and a bare ``read`` raise one that names no file."""
    try:
        yield
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})", source=str(path)) from None


def read_text(path: Path, encoding: str = "utf-8", csv_header: bool = False) -> str:
    """Whole file as text; a bad byte is reported with its line number (and, in a CSV whose first line
    is its header, ``csv_header``, the column it is in). A file that starts with the UTF-8 byte order
    mark is read as UTF-8 without it, whatever ``encoding`` says."""
    path = require_file(path)
    with reading(path):
        data = path.read_bytes()
    if data.startswith(UTF8_BOM):  # an editor's mark that the file is UTF-8, not part of its first field
        data, encoding = data[len(UTF8_BOM):], "utf-8"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"not valid {encoding} text (byte 0x{data[e.start]:02x})", source=str(path), line=line,
                         field=csv_column_at(data, e.start, encoding) if csv_header else None) from None


def csv_column_at(data: bytes, pos: int, encoding: str) -> str | None:
    """The name, in the header (the first non-blank line), of the CSV column that byte ``pos`` of
    ``data`` falls in (everything before ``pos`` decodes); None on the header itself, past its last
    column, or where the line does not parse (a quoted field over two lines)."""
    start = data.rfind(b"\n", 0, pos) + 1  # (the byte's line)
    at = 0  # (the header's line: the first that is not blank)
    while at < start:
        end = data.find(b"\n", at, start)
        if data[at:end].strip(BLANK.encode()):
            break
        at = end + 1
    else:  # (the byte is on the header's line)
        return None
    if data.count(b'"', end, start) % 2:  # (its line starts inside a quoted field)
        return None
    try:
        header = [h.strip() for h in next(csv.reader([data[at:end].decode(encoding)]))]
        k = len(next(csv.reader([data[start:pos].decode(encoding) + "x"]), [""])) - 1  # (x: the field the byte is in)
    except csv.Error:
        return None
    return header[k] if k < len(header) and header[k] else None


UTF8_BOM = b"\xef\xbb\xbf"
BLANK = " \t\r\n"  # what a blank line holds
TAIL_BLOCK = 1 << 16


def text_lines(text: str) -> list[str]:
    """The lines of a file's text, broken at "\n", "\r\n" or "\r" (universal newlines, as pandas reads
    them) and nowhere else: unlike ``str.splitlines``, a title holding a form feed, U+0085 (the byte 0x85
    of a Windows "…" read as ISO-8859-1) or U+2028 stays one line."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()  # (the break that ends the last line)
    return lines


def without_trailing_blank_lines(text: str) -> str:
    """``text`` less the blank lines at its end (its last line keeps its line break); ``text`` itself when
    it has none, or holds nothing but blanks (the readers name an empty file)."""
    end = len(text)
    while end and text[end - 1] in BLANK:
        end -= 1
    tail = text[end:].splitlines(keepends=True)
    return text if end == 0 or len(tail) < 2 else text[:end] + tail[0]


def lines_before_trailing_blanks(path: Path) -> int | None:
    """How many lines ``path`` has up to its last non-blank one when blank lines follow it, else None
    (no blank line at its end, or nothing but blanks). Reads only the file's tail when there are none.
    Lines end at "\n", "\r\n" or a lone "\r", as pandas' parser ends them."""
    with reading(path), open(require_file(path), "rb") as f:
        end = _content_end(f, f.seek(0, 2))
        f.seek(end)
        if end == 0 or len(f.read().decode("latin-1").splitlines()) < 2:
            return None
        f.seek(0)
        breaks, after_cr = 0, False
        while f.tell() < end:
            block = f.read(min(TAIL_BLOCK * 64, end - f.tell()))
            breaks += block.count(b"\n")
            if b"\r" in block:
                breaks += block.count(b"\r") - block.count(b"\r\n")
            breaks -= after_cr and block.startswith(b"\n")  # (a "\r\n" split between two blocks is one break)
            after_cr = block.endswith(b"\r")
    return breaks + 1


def _content_end(f, size: int) -> int:  # noqa: ANN001
    """The offset just after the last byte of an open binary file that is not blank (0: none)."""
    end = size
    while end > 0:
        start = max(0, end - TAIL_BLOCK)
        f.seek(start)
        kept = f.read(end - start).rstrip(BLANK.encode())
        if kept:
            return start + len(kept)
        end = start
    return 0


def plain_float(text: str) -> float:
    """``float(text)`` as the file readers take a number: ASCII only and no '_' (``float`` alone reads
    "４" and "5_0"); ValueError otherwise."""
    return float(_plain(text))


def plain_int(text: str) -> int:
    """``int(text)`` as ``plain_float`` takes a number ("１" and "1_0" refused); ValueError otherwise."""
    return int(_plain(text))


def _plain(text: str) -> str:
    text = str(text).strip()
    if not text.isascii() or "_" in text:
        raise ValueError(f"not a number: {text!r}")
    return text


def header_names(text: str, path: Path, line: int, skipinitialspace: bool = False) -> list[str]:
    """The column names of a CSV header (``line`` of ``path``, its ``text``), spaces around them left out;
    a name longer than the csv module's field limit (128 KiB) is an ``InputError``, not its csv.Error."""
    try:
        return [h.strip() for h in next(csv.reader([text], skipinitialspace=skipinitialspace), [])]
    except csv.Error as e:
        raise InputError(f"malformed CSV header ({e})", source=str(path), line=line) from None


def check_unique_columns(header: list[str], path: Path, line: int) -> None:
    """Every column of a CSV header (``line`` of ``path``) named once (pandas would read a second
    "rating" as "rating.1", and leave a nameless one "Unnamed: 4")."""
    for k, name in enumerate(header):
        if name in header[:k]:
            raise InputError("duplicate column" if name else f"columns {header.index(name) + 1} and {k + 1} have no name",
                             source=str(path), line=line, field=name or None)


def csv_records(path: Path, required: tuple[str, ...], what: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line, stripped fields)]) of a CSV whose header names ``required`` columns (blank lines
    skipped, before the header too); every problem (empty file, missing/unnamed/duplicate column, wrong
    field count, no ``what``s after the header) is an ``InputError`` naming file, line and field."""
    src = str(path)
    text = read_text(path, csv_header=True).lstrip("\ufeff")
    if not text.strip():
        raise InputError("empty file", source=src, line=1)
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    rows: list[tuple[int, list[str]]] = []
    start = 1  # the line the record being read starts on (a quoted field may hold line breaks)
    try:
        # the header: the first row with a field (blank lines before it are skipped, as in a ratings file)
        header = next(([h.strip() for h in row] for row in reader if any(f.strip() for f in row)), None)
        if header is None:
            raise InputError("empty file", source=src, line=1)
        at = reader.line_num
        missing = [c for c in required if c not in header]
        if missing:  # (before duplicates: a file without its header, "1,1" first, is missing one, not repeating one)
            raise InputError(f"missing column(s) {', '.join(missing)}; header has {', '.join(header) or 'nothing'}",
                             source=src, line=at, field=missing[0])
        for k, name in enumerate(header):
            if not name:
                raise InputError(f"column {k + 1} has no name", source=src, line=at)
            if name in header[:k]:
                raise InputError("duplicate column", source=src, line=at, field=name)
        start = reader.line_num + 1
        for row in reader:
            if any(f.strip() for f in row):
                if len(row) != len(header):
                    raise InputError(f"expected {len(header)} fields, found {len(row)}", source=src, line=start)
                rows.append((start, [f.strip() for f in row]))
            start = reader.line_num + 1
    except csv.Error as e:
        raise InputError(f"malformed CSV in the record that starts here ({e})", source=src, line=start) from None
    if not rows:
        raise InputError(f"no {what}s after the header", source=src, line=2)
    return header, rows


def read_pairs_csv(path: Path) -> tuple[list[tuple[str, str]], list[int]]:
    """The (user, item) rows of a CSV with a header naming ``user`` and ``item`` (`cfb predict --pairs`),
    and the line each is on; problems as ``csv_records`` says them, an empty id too."""
    header, rows = csv_records(Path(path), ("user", "item"), "user,item row")
    cols = [header.index("user"), header.index("item")]
    for n, row in rows:
        for name, k in zip(("user", "item"), cols):
            if not row[k]:
                raise InputError("empty id", source=str(path), line=n, field=name)
    return [(row[cols[0]], row[cols[1]]) for _, row in rows], [n for n, _ in rows]
