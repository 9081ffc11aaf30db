"""Readers for the public datasets' own layouts, recognised by their files.

MovieLens:
- 100k: ``u.data`` (tab-separated ``user item rating timestamp``), ``u.item`` (``|``-separated, 19 genre
  flags, ISO-8859-1), ``u.user`` (``id|age|gender|occupation|zip``); scale 1..5.
- 1M: ``ratings.dat``, ``movies.dat``, ``users.dat``, ``::``-separated, ISO-8859-1; scale 1..5. Its
  ``users.dat`` codes are decoded: ``age`` becomes a number, the band's lower bound (18, 25, 35, 45, 50,
  56), except code 1 ("Under 18") which becomes 15, a typical age in that band (the bound would be 0),
  so a new user's real age can be compared with it; ``occupation`` becomes its name ("programmer").
- 10M: ``ratings.dat``, ``movies.dat`` (and ``tags.dat``), ``::``-separated, no ``users.dat``; half stars,
  scale 0.5..5. A ``::`` folder with ``users.dat`` is read as 1M; without it, as 10M, unless it has no
  ``tags.dat`` and only whole stars: 1M's files without its users (scale 1..5, no demographics).
- 20M, 25M, 32M, latest, latest-small: ``ratings.csv`` (``userId,movieId,rating,timestamp``),
  ``movies.csv`` (``movieId,title,genres``), optional ``tags.csv`` (``userId,movieId,tag,timestamp``);
  half stars, scale 0.5..5.
A folder with the ratings files of two releases (``u.data``, ``ratings.dat``, ``ratings.csv``) is refused.

Items get ``title`` and attributes ``genres`` (list; "(no genres listed)" is none), ``year`` (from the
title's trailing "(1995)", absent when the title has none) and, where the release has tags, ``tags``:
the 10 most applied tags (lower-cased), most applied first.

goodbooks-10k, both releases, told apart by the header of ``ratings.csv``:
- v1 (Kaggle): ``book_id,user_id,rating`` with duplicate pairs (the last one is kept); its ``books.csv``
  keys books by ``id`` (what ratings' ``book_id`` means), its own ``book_id`` being the Goodreads id.
- v2: ``user_id,book_id,rating``; ``books.csv`` keyed by ``book_id``, with ``goodreads_book_id``.
Items get ``title`` and attributes ``authors`` (list), ``original_publication_year`` (int),
``language_code`` and ``tags``: the 10 most used shelf names from ``book_tags.csv`` + ``tags.csv``
(keyed by the Goodreads id), leaving out Goodreads' default shelves read/to-read/currently-reading.

Every release's ratings must lie on its scale in its steps (whole stars 1..5: 100k, 1M, goodbooks; half
stars 0.5..5: 10M and the CSV releases), at no negative time, and (where the release has its item file)
name items that file lists; blank lines at the end of any file are left out (one between rows is an
error). Every problem raises ``InputError`` naming file, line and field before anything is written. Large
ratings files are parsed by pandas' C reader, user and item ids as text exactly as written (so that they
match the ids of the release's other files), into categorical columns; when the reader objects, the
file is re-read line by line to name the first bad line and field.
"""
from __future__ import annotations

import csv
import io
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from ..cf_core.errors import InputError
from .sources import (ML100K_GENRES, Dataset, _fields, _numeric, check_listed, check_scale, check_times,
                      check_unique_columns, id_column, not_a_number_said, number_in_text)
from .textfile import (UTF8_BOM, header_names, lines_before_trailing_blanks, plain_float, read_text, reading,
                       require_file, text_lines, without_trailing_blank_lines)

HALF_STARS = (0.5, 5.0)
# whose item ids a release's are: 100k numbers its movies its own way; 1M, 10M and the CSV releases
# share the MovieLens site's movieId
ML100K_CATALOGUE, MOVIELENS_CATALOGUE = "MovieLens 100k", "MovieLens (movieId)"
WHOLE_STARS = (1.0, 5.0)
STEP = {HALF_STARS: 0.5, WHOLE_STARS: 1.0}  # each scale's step between ratings
TOP_TAGS = 10

ML1M_AGES = {"1": 15, "18": 18, "25": 25, "35": 35, "45": 45, "50": 50, "56": 56}
ML1M_OCCUPATIONS = ["other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
                    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
                    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer"]
NO_GENRES = "(no genres listed)"
GOODREADS_DEFAULT_SHELVES = {"read", "to-read", "currently-reading"}

# the year in a title's last parentheses, or in those before a release's "(V)" (video) or "(TV)" mark
_YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*(?:\d{4})?)?\)(?:\s*\((?:V|TV)\))?\s*$")

# what each MovieLens layout is recognised by (in this order)
MOVIELENS_MARKERS = [("u.data", "100k"), ("ratings.dat", "1M/10M"), ("ratings.csv", "20M/25M/32M/latest")]


def title_year(title: str) -> int | None:
    """The year in a MovieLens title's trailing parentheses ("Toy Story (1995)" -> 1995)."""
    m = _YEAR.search(title or "")
    return int(m.group(1)) if m else None


def _genres(value: str) -> list[str]:
    return [g for g in (x.strip() for x in value.split("|")) if g and g != NO_GENRES]


def _item_attrs(title: str, genres: list[str], **extra) -> dict:
    attrs: dict = {"genres": genres}
    year = title_year(title)
    if year is not None:
        attrs["year"] = year
    attrs.update({k: v for k, v in extra.items() if v not in (None, "")})
    return attrs


# --- ratings files ---------------------------------------------------------------------------------------
def _diagnose(path: Path, lines: list[tuple[int, list[str]]], names: list[str], cols: dict[str, int],
              layout: str, stray: str | None = None) -> None:
    """Raise for the first bad line: field count, empty ids, a lone ``stray`` character in a field (a
    ':' in a '::'-separated line), non-numeric rating or timestamp."""
    for n, f in lines:
        if len(f) != len(names):
            raise InputError(f"expected {len(names)} fields ({layout}), found {len(f)}", source=str(path), line=n)
        for key in ("user", "item"):
            if not f[cols[key]].strip():
                raise InputError("empty id", source=str(path), line=n, field=names[cols[key]])
        if stray and (k := next((k for k, x in enumerate(f) if stray in x), None)) is not None:
            raise InputError(f"a single {stray!r} in {f[k]!r}: fields are {layout}", source=str(path), line=n,
                             field=names[k])
        try:
            r = float(f[cols["rating"]])
            if not np.isfinite(r) or "_" in f[cols["rating"]]:  # (float reads "1_0" as 10; pandas does not)
                raise ValueError
        except ValueError:
            raise InputError(f"not a number: {f[cols['rating']]!r}", source=str(path), line=n,
                             field=names[cols["rating"]]) from None
        if "timestamp" in cols:
            t = f[cols["timestamp"]].strip()
            if not re.fullmatch(r"-?[0-9]+", t) or abs(int(t)) >= 2**53:  # (isdigit takes "²", int does not)
                raise InputError(f"not a whole number under 2**53: {f[cols['timestamp']]!r}", source=str(path),
                                 line=n, field=names[cols["timestamp"]])


def _check_ratings(ratings: pd.DataFrame, scale: tuple[float, float], path: Path, first_line: int,
                   rating: str = "rating", timestamp: str = "timestamp") -> None:
    """The release's ratings on its scale, in its steps (whole or half stars), and no time negative."""
    if ratings.empty:
        raise InputError("no ratings", source=str(path), line=first_line)
    check_scale(ratings, scale, str(path), first_line=first_line, field=rating, step=STEP[scale])
    if ratings["timestamp"].dtype != object:  # (a release without times holds None)
        check_times(ratings["timestamp"].to_numpy(), str(path), first_line, timestamp)


RATINGS_ALONE = " (for ratings alone: `cfb ingest ratings`)"  # (`cfb eval` leaves it out: it measures releases)
GENERIC_RATINGS = " (a generic ratings file: `cfb ingest ratings` reads it)"  # (`cfb eval` says what it measures)


def _require_item_file(path: Path) -> None:
    """The release's item file is there: it names the items (the questionnaire asks by title)."""
    if not path.exists():
        raise InputError(f"file not found: the release lists its items there{RATINGS_ALONE}", source=str(path))


def _check_items(ratings: pd.DataFrame, items: pd.DataFrame, path: Path, first_line: int, field: str,
                 item_file: str) -> None:
    """Every rated item is in the release's item list."""
    check_listed(ratings, items["item"], str(path), first_line, field, item_file)


def _text_lines(path: Path, encoding: str) -> list[str]:
    """The lines of a text file, blank lines at its end left out."""
    return text_lines(without_trailing_blank_lines(read_text(path, encoding)))


def _listed(path: Path, rows: list) -> list:  # noqa: ANN001
    """``rows`` (lines or fields) of a release's item, user or tag file, refused when it lists nothing:
    an empty ``users.dat`` is a damaged release, not one without demographics."""
    texts = ("".join(row[1]) if isinstance(row, tuple) else row for row in rows)  # ((line, fields) or a line)
    if not any(text.strip() for text in texts):
        raise InputError("empty file", source=str(path), line=1)
    return rows


def read_dat_ratings(path: Path, encoding: str = "latin-1") -> pd.DataFrame:
    """``UserID::MovieID::Rating::Timestamp`` lines (MovieLens 1M and 10M)."""
    names = ["UserID", "MovieID", "Rating", "Timestamp"]
    cols = {"user": 0, "item": 1, "rating": 2, "timestamp": 3}
    require_file(path)
    try:
        rows = lines_before_trailing_blanks(path)  # (None: read to the end)
        # "a::b::c::d" split on ":" is 7 columns, the odd ones empty
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            with reading(path), open(path, "rb") as f:
                f.seek(len(UTF8_BOM) if f.read(len(UTF8_BOM)) == UTF8_BOM else 0)  # (not part of the first id)
                df = pd.read_csv(f, sep=":", header=None, names=list(range(7)), index_col=False, encoding=encoding,
                                 engine="c", dtype={0: str, 1: "category", 2: str, 3: "category", 4: "float64",
                                                    5: "category", 6: "int64"}, keep_default_na=False,
                                 skip_blank_lines=False, nrows=rows)
        users, items = id_column(df[0]), id_column(df[2])
        ok = all(set(df[c].cat.categories) <= {""} for c in (1, 3, 5))
        ok = ok and "" not in users.categories and "" not in items.categories and bool(np.isfinite(df[4]).all())
    except (ValueError, pd.errors.ParserError, pd.errors.ParserWarning, OverflowError):
        ok, df = False, None  # (a UnicodeDecodeError too: read_text below names its line)
    if not ok:
        _diagnose(path, [(n, line.split("::")) for n, line in enumerate(_text_lines(path, encoding), start=1)],
                  names, cols, "'::'-separated", stray=":")
        raise InputError("malformed ratings file", source=str(path))
    return pd.DataFrame({"user": users, "item": items, "rating": df[4].to_numpy(np.float32),
                         "timestamp": df[6].to_numpy(np.int64)})


def read_csv_ratings(path: Path, user: str, item: str, rating: str, timestamp: str | None) -> pd.DataFrame:
    """A ratings CSV whose header is exactly the release's columns (in any order)."""
    header = _csv_header(path)
    check_unique_columns(header, path, 1)
    wanted = [c for c in (user, item, rating, timestamp) if c]
    missing = [c for c in wanted if c not in header]
    if missing:
        generic = GENERIC_RATINGS if {"user", "item", "rating"} <= set(header) else ""
        raise InputError(f"missing column(s) {', '.join(missing)}; header has {', '.join(header)}{generic}",
                         source=str(path), line=1, field=missing[0])
    lines = lines_before_trailing_blanks(path)
    rows = None if lines is None else lines - 1  # (None: read to the end)
    with reading(path):  # (a read error anywhere below names the file)
        return _read_csv_ratings(path, header, user, item, rating, timestamp, rows)


def _read_csv_ratings(path: Path, header: list[str], user: str, item: str, rating: str, timestamp: str | None,
                      rows: int | None) -> pd.DataFrame:
    """``read_csv_ratings`` after its header is checked: ``rows`` lines after the header (None: all)."""
    fast = _with_whole_number_ids(path, header, user, item, rating, timestamp, rows)
    if fast is not None:
        return fast
    numbers = {rating: "float64", **({timestamp: "int64"} if timestamp else {})}
    try:
        with warnings.catch_warnings():  # rows longer than the header: an error, not a warning
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, header=0, names=header, index_col=False, dtype={user: str, item: str, **numbers},
                             encoding="utf-8-sig", engine="c", keep_default_na=False, skip_blank_lines=False,
                             skipinitialspace=True, nrows=rows)
        users, items = id_column(df[user]), id_column(df[item])
        ok = len(df.columns) == len(header) and "" not in users.categories and "" not in items.categories \
            and bool(np.isfinite(df[rating]).all())
        if ok and _holds_a_quote(path):  # pandas reads a stray quote into the value ("2"2 as 22)
            _refuse_stray_quotes(path)
    except (ValueError, KeyError, pd.errors.ParserError, pd.errors.ParserWarning, OverflowError):
        ok, df = False, None  # (a UnicodeDecodeError too: read_text below names its line)
    if not ok:
        reader = csv.reader(io.StringIO(without_trailing_blank_lines(read_text(path, csv_header=True)), newline=""))
        lines = []
        try:
            next(reader)
            lines = [(reader.line_num, row) for row in reader]
        except csv.Error as e:
            raise InputError(f"malformed CSV ({e})", source=str(path), line=reader.line_num) from None
        _diagnose(path, lines, header, {k: header.index(c) for k, c in
                                         (("user", user), ("item", item), ("rating", rating), ("timestamp", timestamp))
                                         if c}, "comma-separated")
        raise InputError("malformed ratings file", source=str(path))
    out = pd.DataFrame({"user": users, "item": items, "rating": df[rating].to_numpy(np.float32)})
    out["timestamp"] = df[timestamp].to_numpy(np.int64) if timestamp else None
    return out


def _holds_a_quote(path: Path) -> bool:
    with open(path, "rb") as f:
        return any(b'"' in block for block in iter(lambda: f.read(1 << 24), b""))


def _refuse_stray_quotes(path: Path) -> None:
    """An ``InputError`` naming the line of the first record where a quote is left open or stands inside
    a field (read as the csv module reads it, a line at a time: not the whole file in memory)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        start = 1
        try:
            for _ in reader:
                start = reader.line_num + 1
        except csv.Error as e:
            raise InputError(f"malformed CSV in the record that starts here ({e})", source=str(path),
                             line=start) from None


POWERS_OF_TEN = 10 ** np.arange(1, 19, dtype=np.int64)


def _with_whole_number_ids(path: Path, header: list[str], user: str, item: str, rating: str,
                           timestamp: str | None, rows: int | None = None) -> pd.DataFrame | None:
    """The ratings read with their ids parsed as whole numbers (several times faster than as text), or
    None unless that gives exactly what reading them as text gives: the ids are the first two columns
    and every one is written as ``str(int)`` writes it (no sign, leading zero, space or quote), which
    is checked on the raw bytes: each id's text must be exactly as long as its number's digits.
    ``rows``: how many data lines to read (the blank lines after them left out), None: all."""
    if sorted(header[:2]) != sorted([user, item]) or len(header) != len(set(header)):
        return None
    numbers = {rating: "float64", **({timestamp: "int64"} if timestamp else {})}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, header=0, index_col=False, dtype={user: "int64", item: "int64", **numbers},
                             encoding="utf-8-sig", engine="c", keep_default_na=False, skip_blank_lines=False,
                             skipinitialspace=True, nrows=rows)
    except (ValueError, KeyError, pd.errors.ParserError, pd.errors.ParserWarning, OverflowError, UnicodeError):
        return None
    if list(df.columns) != header or not np.isfinite(df[rating]).all():
        return None
    try:
        raw = np.memmap(path, np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    except OSError:  # (a file system that cannot map files: the careful reader reads it)
        return None
    # byte offsets as int32 when they fit, and arrays reused in place: on a large release each fresh
    # array of offsets costs more in first-touched memory than the arithmetic on it
    at_type = np.int32 if len(raw) < 2**31 - 64 else np.int64
    chunk = 1 << 24  # in slices: one comparison over the whole file costs twice as much in page faults
    pieces = [np.zeros(0, at_type)]
    for at in range(0, len(raw), chunk):
        piece = raw[at:at + chunk]
        if (piece == ord('"')).any():
            return None  # a quoted field may hold a line break: line counts alone cannot tell
        pieces.append((np.flatnonzero(piece == ord("\n")) + (at + 1)).astype(at_type))
    starts = np.concatenate(pieces)
    if len(starts) and starts[-1] >= len(raw):
        starts = starts[:-1]  # each data line's first byte (the header's line is first)
    starts = starts[:rows]  # (rows: the blank lines after them left out)
    if len(starts) != len(df):
        return None  # blank lines, quoted line breaks...: the careful reader decides
    factorized = {}
    last = len(raw) - 1
    for k, column in enumerate(header[:2]):
        codes, distinct = factorized[column] = pd.factorize(df[column].to_numpy())
        if len(distinct) and distinct.min() < 0:
            return None
        ends = np.searchsorted(POWERS_OF_TEN, distinct, side="right").astype(at_type)[codes]  # each id's digits - 1
        ends += starts
        ends += 1  # the byte after the id
        after = raw[np.minimum(ends, last)]
        if k == 0 or len(header) > 2:
            ok = (ends <= last) & (after == ord(","))
        else:  # the last column: the line ends there
            ok = (ends > last) | (after == ord("\n")) | (after == ord("\r"))
        if not ok.all():
            return None
        starts = ends
        starts += 1
    out = pd.DataFrame({"user": id_column(df[user], factorized[user]), "item": id_column(df[item], factorized[item]),
                        "rating": df[rating].to_numpy(np.float32)})
    out["timestamp"] = df[timestamp].to_numpy(np.int64) if timestamp else None
    return out


def _first_line(path: Path) -> str:
    """The file's first line (ended by "\n", "\r\n" or a lone "\r", as pandas ends lines), as UTF-8 text."""
    blocks: list[bytes] = []
    with reading(path), open(require_file(path), "rb") as f:
        while block := f.read(1 << 16):
            ends = [k for k in (block.find(b"\n"), block.find(b"\r")) if k >= 0]
            blocks.append(block[:min(ends)] if ends else block)
            if ends:
                break
    head = b"".join(blocks)
    try:
        line = head.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError:
        raise InputError("not valid utf-8 text", source=str(path), line=1) from None
    if not line.strip():
        raise InputError("empty file" if not blocks else BLANK_HEADER, source=str(path), line=1)
    return line


def _csv_header(path: Path) -> list[str]:
    """The column names of a CSV file's first line (``header_names``)."""
    return header_names(_first_line(path), path, 1)


BLANK_HEADER = "blank line where the header should be (the header is the file's first line)"


def _csv_rows(path: Path, required: list[str], listing: str | None = None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line, fields) of a small CSV, checked for its column count (blank lines at its end
    left out); a record's line is the one it starts on (a quoted field may hold line breaks). A file
    ``listing`` something (its items) is refused when it has no row after its header."""
    text = without_trailing_blank_lines(read_text(path, csv_header=True).lstrip("\ufeff"))
    if not text.strip():
        raise InputError("empty file", source=str(path), line=1)
    if not text_lines(text)[0].strip():
        raise InputError(BLANK_HEADER, source=str(path), line=1)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # ("ab"cd: an error, not abcd)
    rows = []
    start = 1  # the line the record being read starts on
    try:
        header = [h.strip() for h in next(reader)]
        missing = [c for c in required if c not in header]
        if missing:
            raise InputError(f"missing column(s) {', '.join(missing)}; header has {', '.join(header)}",
                             source=str(path), line=1, field=missing[0])
        start = reader.line_num + 1
        for row in reader:
            if len(row) != len(header):
                raise InputError(f"expected {len(header)} fields, found {len(row)}", source=str(path), line=start)
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise InputError(f"malformed CSV in the record that starts here ({e})", source=str(path),
                         line=start) from None
    if listing and not rows:
        raise InputError(f"no {listing} after the header", source=str(path), line=2)
    return header, rows


def _check_ids(path: Path, rows: list[tuple[int, list[str]]], k: int, field: str,
               seen: dict[str, int] | None = None, what: str = "item") -> None:
    """Field ``k`` of every row is a non-empty id not seen before (``seen``: id -> line, kept across
    calls) that a ``what`` ("item", "user") can have (``store.id_problem``: not too long, no NUL)."""
    seen = {} if seen is None else seen
    for n, f in rows:
        _check_id(f[k].strip(), path, n, field, seen, what)


def _check_id(v: str, path: Path, n: int, field: str, seen: dict[str, int], what: str) -> None:
    """One row's id ``v`` for ``_check_ids``, named by its file, line ``n`` and ``field``."""
    from .store import check_id

    _check_unique(v, path, n, field, seen)
    check_id(v, what, source=str(path), line=n, field=field)
    seen[v] = n


def _check_unique(v: str, path: Path, n: int, field: str, seen: dict[str, int]) -> None:
    """Row ``n``'s key ``v`` is not empty and not one of ``seen`` (key -> its line)."""
    if not v:
        raise InputError("empty id", source=str(path), line=n, field=field)
    if v in seen:
        raise InputError(f"duplicate id {v!r} (first on line {seen[v]})", source=str(path), line=n, field=field)


def _title(text: str, path: Path, n: int, field: str) -> str:
    """An item's title from its file, surrounding spaces stripped (a lookup by title strips the query
    alike); an empty one, or one holding a NUL (PostgreSQL stores none), is refused."""
    from .store import shown_id

    title = text.strip()
    if not title:  # (the questionnaire and the web page ask about an item by its title)
        raise InputError("empty title", source=str(path), line=n, field=field)
    if "\x00" in title:
        raise InputError(f"title {shown_id(title)} contains a NUL character", source=str(path), line=n, field=field)
    return title


def _top_tags(df: pd.DataFrame, key: str, tag: str, weight: str | None = None,
              n: int = TOP_TAGS) -> dict[str, list[str]]:
    """key -> its ``n`` most applied tags (by count of applications, or summed ``weight``)."""
    if df.empty:
        return {}
    d = pd.DataFrame({"key": df[key].to_numpy(), "tag": df[tag].to_numpy(),
                      "w": df[weight].to_numpy(np.float64) if weight else 1.0})
    d["order"] = np.arange(len(d))
    g = d.groupby(["key", "tag"], sort=False).agg(w=("w", "sum"), order=("order", "min")).reset_index()
    g = g.sort_values(["key", "w", "order"], ascending=[True, False, True])
    g = g.groupby("key", sort=False).head(n)
    return {k: list(v) for k, v in g.groupby("key", sort=False)["tag"]}


# --- MovieLens -----------------------------------------------------------------------------------------
def existing_folder(folder: Path) -> Path:
    """``folder`` as a Path; an ``InputError`` naming it when it is missing or is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("folder not found" if not folder.exists() else "expected a folder", source=str(folder))
    return folder


def movielens_layout(folder: Path) -> str:
    """'100k', '1m', '10m' or 'csv', from the files in ``folder``."""
    folder = existing_folder(folder)
    found = [name for name, _ in MOVIELENS_MARKERS if (folder / name).exists()]
    if len(found) > 1:
        raise InputError(f"holds the ratings of two MovieLens layouts ({' and '.join(found)}): keep one release "
                         "a folder", source=str(folder))
    if found == ["u.data"]:
        return "100k"
    if found == ["ratings.dat"]:
        return "1m" if (folder / "users.dat").exists() else "10m"
    if found == ["ratings.csv"]:
        if is_goodbooks(folder):
            raise InputError("a goodbooks-10k folder, not a MovieLens release: use `cfb ingest goodbooks`",
                             source=str(folder))
        return "csv"
    looked = ", ".join(f"{name} ({what})" for name, what in MOVIELENS_MARKERS)
    raise InputError(f"not a MovieLens folder: looked for {looked}", source=str(folder))


def read_movielens(folder: Path) -> Dataset:
    """Any MovieLens release, recognised by its files (see the module docstring)."""
    layout = movielens_layout(folder)
    return {"100k": read_ml100k, "1m": read_ml1m, "10m": read_ml10m, "csv": read_ml_csv}[layout](Path(folder))


def read_ml100k(folder: Path) -> Dataset:
    """MovieLens 100k: ``u.data`` (tab-separated), ``u.item`` (titles, genre flags), ``u.user``."""
    folder = Path(folder)
    ratings_path = folder / "u.data"
    rows = _fields(ratings_path, "\t")
    for n, row in rows:
        if len(row) != 4:
            raise InputError(f"expected 4 tab-separated fields, found {len(row)}", source=str(ratings_path), line=n)
        for k, field in ((0, "user"), (1, "item")):
            if not row[k].strip():
                raise InputError("empty id", source=str(ratings_path), line=n, field=field)
    raw = pd.DataFrame([row for _, row in rows], columns=["user", "item", "rating", "timestamp"])
    ratings = pd.DataFrame({
        "user": raw["user"].str.strip(), "item": raw["item"].str.strip(),
        "rating": _numeric(raw, "rating", ratings_path, 1).astype(np.float32),
        "timestamp": _numeric(raw, "timestamp", ratings_path, 1, integer=True).astype(np.int64)})
    _check_ratings(ratings, WHOLE_STARS, ratings_path, 1)

    item_path = folder / "u.item"
    _require_item_file(item_path)
    recs = []
    seen: dict[str, int] = {}
    for n, f in _listed(item_path, _fields(item_path, "|", _guess_encoding(item_path))):
        if len(f) != 5 + len(ML100K_GENRES):
            raise InputError(f"expected {5 + len(ML100K_GENRES)} '|'-separated fields, found {len(f)}",
                             source=str(item_path), line=n)
        _check_ids(item_path, [(n, f)], 0, "id", seen)
        title = _title(f[1], item_path, n, "title")
        flags = [flag.strip() for flag in f[5:5 + len(ML100K_GENRES)]]
        for genre, flag in zip(ML100K_GENRES, flags):
            if flag not in ("0", "1"):
                raise InputError(f"expected a genre flag 0 or 1, found {flag!r}", source=str(item_path), line=n,
                                 field=genre)
        genres = [g for g, flag in zip(ML100K_GENRES, flags) if flag == "1"]
        recs.append({"item": f[0].strip(), "title": title,
                     "attributes": _item_attrs(title, genres, release_date=f[2]), "line": n})
    items = pd.DataFrame(recs, columns=["item", "title", "attributes", "line"])
    _check_items(ratings, items, ratings_path, 1, "item", item_path.name)

    users = None
    user_path = folder / "u.user"
    if user_path.exists():
        recs = []
        rows = _listed(user_path, _fields(user_path, "|", _guess_encoding(user_path)))
        _check_ids(user_path, rows, 0, "id", what="user")
        occupation_path = folder / "u.occupation"  # (the release lists its occupations)
        occupations = {line.strip() for _, (line, *_) in _listed(occupation_path, _fields(
            occupation_path, "|", _guess_encoding(occupation_path))) if line.strip()} if occupation_path.exists() else None
        for n, f in rows:
            if len(f) != 5:
                raise InputError(f"expected id|age|gender|occupation|zip, found {len(f)} '|'-separated fields",
                                 source=str(user_path), line=n)
            if not (f[1].strip().isascii() and f[1].strip().isdigit()):
                raise InputError(f"expected a whole number of years, found {f[1]!r}", source=str(user_path),
                                 line=n, field="age")
            if f[2].strip() not in ("M", "F"):
                raise InputError(f"expected M or F, found {f[2]!r}", source=str(user_path), line=n, field="gender")
            if occupations is not None and f[3].strip() not in occupations:
                raise InputError(f"occupation {f[3]!r} is not in {occupation_path.name}", source=str(user_path),
                                 line=n, field="occupation")
            attrs = {"age": int(f[1]), "gender": f[2].strip(), "occupation": f[3].strip()}
            if f[4].strip():  # (an empty zip is no answer, as 1M's reader has it)
                attrs["zip"] = f[4].strip()
            recs.append({"user": f[0].strip(), "attributes": attrs, "line": n})
        users = pd.DataFrame(recs)
        # (its README: every user who rated is listed, with demographics; an id that is not is damage)
        check_listed(ratings, users["user"], str(ratings_path), 1, "user", user_path.name, column="user")
    return Dataset(ratings, items, users, scale=WHOLE_STARS, step=STEP[WHOLE_STARS], name="movielens-100k",
                   source=str(ratings_path), first_line=1, catalogue=ML100K_CATALOGUE, population="movielens-100k",
                   items_source=str(item_path), users_source=str(user_path))


def _read_dat_movies(path: Path, encoding: str) -> pd.DataFrame:
    recs = []
    seen: dict[str, int] = {}
    for n, line in enumerate(_listed(path, _text_lines(path, encoding)), start=1):
        f = line.split("::")
        if len(f) < 3:
            raise InputError(f"expected MovieID::Title::Genres, found {len(f)} '::'-separated fields",
                             source=str(path), line=n)
        head, genres = line.rsplit("::", 1)  # a title may hold "::" or end in ':' (the genres never do)
        f = [*head.split("::", 1), genres]
        item = f[0].strip()
        _check_id(item, path, n, "MovieID", seen, "item")
        title = _title(f[1], path, n, "Title")
        recs.append({"item": item, "title": title, "attributes": _item_attrs(title, _genres(f[2])), "line": n})
    return pd.DataFrame(recs, columns=["item", "title", "attributes", "line"])


def _guess_encoding(path: Path) -> str:
    """UTF-8 when the file decodes as such, else ISO-8859-1 (older MovieLens releases: a file of theirs
    saved again as UTF-8 is read as such, not as ISO-8859-1's mojibake)."""
    if not path.exists():
        return "latin-1"  # (the reader names the missing file)
    try:
        with reading(path):
            require_file(path).read_bytes().decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "latin-1"


MAX_YEAR = 100_000  # a goodbooks publication year's size (the release has years before 0: -1750, Gilgamesh)
DAT_FIELDS = ("Rating", "Timestamp")  # the names the README gives ratings.dat's fields
DAT_COLUMNS = {"rating": "Rating", "item": "MovieID", "user": "UserID"}


def _read_dat_release(folder: Path, scale: tuple[float, float]) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """The ratings (checked against ``scale``) and movies of a ``::`` release (1M, 10M), and the ratings'
    path (movies.dat is beside it)."""
    rpath = Path(folder) / "ratings.dat"
    ratings = read_dat_ratings(rpath, "latin-1")
    _check_ratings(ratings, scale, rpath, 1, *DAT_FIELDS)
    mpath = Path(folder) / "movies.dat"
    _require_item_file(mpath)
    items = _read_dat_movies(mpath, _guess_encoding(mpath))
    _check_items(ratings, items, rpath, 1, "MovieID", mpath.name)
    return ratings, items, rpath


def _dat_dataset(ratings: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame | None, rpath: Path,
                 scale: tuple[float, float], name: str) -> Dataset:
    return Dataset(ratings, items, users, scale=scale, step=STEP[scale], name=name, source=str(rpath),
                   first_line=1, columns=DAT_COLUMNS, catalogue=MOVIELENS_CATALOGUE, population=name,
                   items_source=str(rpath.parent / "movies.dat"), users_source=str(rpath.parent / "users.dat"))


def read_ml1m(folder: Path) -> Dataset:
    """MovieLens 1M: ``ratings.dat``, ``movies.dat``, ``users.dat`` (``::``, ISO-8859-1)."""
    folder = Path(folder)
    upath = folder / "users.dat"
    try:
        ratings, items, rpath = _read_dat_release(folder, WHOLE_STARS)
    except InputError as e:  # (10M's half stars, with a users.dat put beside them)
        if e.field != DAT_FIELDS[0] or "the scale" not in e.problem:
            raise
        raise InputError(f"{e.problem} (read as MovieLens 1M, whose ratings are whole stars, since the folder "
                         f"has {upath.name})", source=e.source, line=e.line, field=e.field) from None
    recs = []
    seen: dict[str, int] = {}
    for n, line in enumerate(_listed(upath, _text_lines(upath, _guess_encoding(upath))), start=1):
        f = [x.strip() for x in line.split("::")]
        if len(f) != 5:
            raise InputError(f"expected UserID::Gender::Age::Occupation::Zip-code, found {len(f)} '::'-separated "
                             "fields", source=str(upath), line=n)
        user, gender, age, occupation, zipcode = f
        _check_id(user, upath, n, "UserID", seen, "user")
        if gender not in ("M", "F"):
            raise InputError(f"expected M or F, found {gender!r}", source=str(upath), line=n, field="Gender")
        if age not in ML1M_AGES:
            raise InputError(f"unknown age code {age!r} (codes: {', '.join(ML1M_AGES)})", source=str(upath),
                             line=n, field="Age")
        if not re.fullmatch(r"[0-9]+", occupation) or int(occupation) >= len(ML1M_OCCUPATIONS):  # (isdigit: "²")
            raise InputError(f"unknown occupation code {occupation!r} (codes: 0..{len(ML1M_OCCUPATIONS) - 1})",
                             source=str(upath), line=n, field="Occupation")
        attrs = {"age": ML1M_AGES[age], "gender": gender, "occupation": ML1M_OCCUPATIONS[int(occupation)]}
        if zipcode:
            attrs["zip"] = zipcode
        recs.append({"user": user, "attributes": attrs, "line": n})
    users = pd.DataFrame(recs, columns=["user", "attributes", "line"])
    check_listed(ratings, users["user"], str(rpath), 1, "UserID", upath.name, column="user")
    return _dat_dataset(ratings, items, users, rpath, WHOLE_STARS, "movielens-1m")


def read_ml10m(folder: Path) -> Dataset:
    """MovieLens 10M: ``ratings.dat`` (half stars), ``movies.dat``, optional ``tags.dat`` (all ``::``)."""
    folder = Path(folder)
    ratings, items, rpath = _read_dat_release(folder, HALF_STARS)
    tpath = folder / "tags.dat"
    if not tpath.exists() and bool((ratings.rating.to_numpy() % 1 == 0).all()):  # 1M's files, users.dat left out
        return _dat_dataset(ratings, items, None, rpath, WHOLE_STARS, "movielens-1m")
    if tpath.exists():
        rows = []
        for n, line in enumerate(_listed(tpath, _text_lines(tpath, _guess_encoding(tpath))), start=1):
            f = line.split("::")
            if len(f) < 4:
                raise InputError(f"expected UserID::MovieID::Tag::Timestamp, found {len(f)} '::'-separated "
                                 "fields", source=str(tpath), line=n)
            head, stamp = line.rsplit("::", 1)  # a tag may hold "::" or end in ':' (a timestamp never does)
            f = [*head.split("::", 2), stamp]
            if f[2].strip():
                rows.append((f[1].strip(), f[2].strip().lower()))
        _add_tags(items, _top_tags(pd.DataFrame(rows, columns=["item", "tag"]), "item", "tag"))
    return _dat_dataset(ratings, items, None, rpath, HALF_STARS, "movielens-10m")


def _add_tags(items: pd.DataFrame, tags: dict[str, list[str]]) -> None:
    for attrs, item in zip(items["attributes"], items["item"]):
        if item in tags:
            attrs["tags"] = tags[item]


def read_ml_csv(folder: Path) -> Dataset:
    """MovieLens 20M/25M/32M/latest(-small): ``ratings.csv``, ``movies.csv``, optional ``tags.csv``."""
    folder = Path(folder)
    rpath = folder / "ratings.csv"
    ratings = read_csv_ratings(rpath, "userId", "movieId", "rating", "timestamp")
    _check_ratings(ratings, HALF_STARS, rpath, 2)
    mpath = folder / "movies.csv"
    _require_item_file(mpath)
    header, rows = _csv_rows(mpath, ["movieId", "title", "genres"], listing="items")
    k_id, k_title, k_genres = (header.index(c) for c in ("movieId", "title", "genres"))
    _check_ids(mpath, rows, k_id, "movieId")
    recs = []
    for n, f in rows:
        title = _title(f[k_title], mpath, n, "title")
        recs.append({"item": f[k_id].strip(), "title": title,
                     "attributes": _item_attrs(title, _genres(f[k_genres])), "line": n})
    items = pd.DataFrame(recs, columns=["item", "title", "attributes", "line"])
    _check_items(ratings, items, rpath, 2, "movieId", mpath.name)
    tpath = folder / "tags.csv"
    if tpath.exists():
        header, rows = _csv_rows(tpath, ["userId", "movieId", "tag"])
        k_item, k_tag = header.index("movieId"), header.index("tag")
        tags = pd.DataFrame([(f[k_item].strip(), f[k_tag].strip().lower()) for _, f in rows if f[k_tag].strip()],
                            columns=["item", "tag"])
        _add_tags(items, _top_tags(tags, "item", "tag"))
    return Dataset(ratings, items, None, scale=HALF_STARS, step=STEP[HALF_STARS], name="movielens-csv",
                   source=str(rpath), columns={"item": "movieId", "user": "userId"}, catalogue=MOVIELENS_CATALOGUE,
                   population=csv_release_population(ratings), items_source=str(mpath))


def csv_release_population(ratings: pd.DataFrame) -> str:
    """Whose user ids a MovieLens CSV release's are: 20M, 25M, 32M and each "latest" have the same files
    and number their users anew, so a release is told by its first user's ratings (what the same release
    read again repeats)."""
    if not len(ratings):
        return "movielens-csv"
    first = ratings["user"].iloc[0]
    mine = ratings[ratings["user"] == first]
    return (f"the MovieLens CSV release whose first user, {first}, rated {len(mine)} movies, first movie "
            f"{mine['item'].iloc[0]} at time {int(mine['timestamp'].iloc[0])}")


def release_reader(folder: Path) -> Callable[[Path], Dataset]:
    """The reader of the MovieLens or goodbooks release in ``folder`` (``read_goodbooks`` or
    ``read_movielens``), recognised by its files; an ``InputError`` naming the folder when it holds
    neither (the reader names what is wrong inside a release it takes)."""
    folder = existing_folder(folder)
    if is_goodbooks(folder):
        return read_goodbooks
    if not any((folder / name).exists() for name, _ in MOVIELENS_MARKERS):
        looked = ", ".join(f"{name} (MovieLens {what})" for name, what in MOVIELENS_MARKERS)
        raise InputError(f"not a MovieLens or goodbooks folder: looked for {looked} and books.csv (goodbooks)",
                         source=str(folder))
    return read_movielens


# --- goodbooks-10k -------------------------------------------------------------------------------------
def is_goodbooks(folder: Path) -> bool:
    """Whether ``folder`` holds goodbooks-10k: a ratings.csv whose header names book_id (a MovieLens CSV
    release's names movieId: a books.csv beside it is a stray), or, where its header names neither (or
    there is none to read), a books.csv and no MovieLens ratings file."""
    folder = Path(folder)
    try:
        header = _ratings_header(folder)
    except (InputError, OSError):
        header = []
    if "book_id" in header or "movieId" in header:
        return "book_id" in header
    if any((folder / name).exists() for name, _ in MOVIELENS_MARKERS if name != "ratings.csv"):
        return False  # (MovieLens' u.data or ratings.dat: a books.csv beside them is a stray)
    return (folder / "books.csv").exists()


def _ratings_header(folder: Path) -> list[str]:
    """The column names of ``folder``'s ratings.csv (spaces around them left out)."""
    return _csv_header(Path(folder) / "ratings.csv")


def goodbooks_release(folder: Path) -> str:
    """'v1' (``book_id,user_id,rating``) or 'v2' (``user_id,book_id,rating``), from ratings.csv's header."""
    path = Path(folder) / "ratings.csv"
    header = _ratings_header(folder)
    if header[:2] == ["book_id", "user_id"]:
        return "v1"
    if {"user_id", "book_id", "rating"} <= set(header):
        return "v2"
    raise InputError(f"expected the header user_id,book_id,rating (v2) or book_id,user_id,rating (v1); found "
                     f"{','.join(header)}", source=str(path), line=1)


def read_goodbooks(folder: Path) -> Dataset:
    """goodbooks-10k, v1 or v2 (see the module docstring)."""
    folder = Path(folder)
    movielens = [name for name, _ in MOVIELENS_MARKERS if (folder / name).exists()] if folder.is_dir() else []
    if movielens and not is_goodbooks(folder):
        raise InputError("a MovieLens release, not goodbooks-10k: use `cfb ingest movielens`", source=str(folder))
    stray = [name for name in movielens if name != "ratings.csv"]  # (goodbooks' own ratings file is ratings.csv)
    if stray:
        raise InputError(f"holds the ratings of goodbooks-10k and of MovieLens ({' and '.join(stray)}): keep one "
                         "release a folder", source=str(folder))
    release = goodbooks_release(folder)
    rpath = folder / "ratings.csv"
    given = read_csv_ratings(rpath, "user_id", "book_id", "rating", None)
    _check_ratings(given, WHOLE_STARS, rpath, 2)
    bpath = folder / "books.csv"
    _require_item_file(bpath)
    items, key = _read_books(folder, bpath)
    _check_items(given, items, rpath, 2, "book_id", f"{bpath.name} (its {key} column)")
    kept = ~given.duplicated(["user", "item"], keep="last").to_numpy()  # (v1 gives pairs twice: the last counts)
    ratings = given[kept].reset_index(drop=True)
    return Dataset(ratings, items, None, scale=WHOLE_STARS, step=STEP[WHOLE_STARS], name=f"goodbooks-{release}",
                   source=str(rpath), first_line=2 if kept.all() else 2 + np.flatnonzero(kept),
                   columns={"item": "book_id", "user": "user_id"}, catalogue="goodbooks-10k",
                   population="goodbooks-10k", items_source=str(bpath))  # (v2 is v1 cleaned: the same users)


def _read_books(folder: Path, bpath: Path) -> tuple[pd.DataFrame, str]:
    """The books (item, title, attributes) and the column that keys them (v1: id, v2: book_id)."""
    header, rows = _csv_rows(bpath, ["title"], listing="items")
    if "id" in header:  # v1: id is what ratings' book_id means; its book_id is the Goodreads id
        key, goodreads = "id", "book_id" if "book_id" in header else "goodreads_book_id"
    elif "book_id" in header:
        key, goodreads = "book_id", "goodreads_book_id"
    else:
        raise InputError(f"missing column(s) book_id; header has {', '.join(header)}", source=str(bpath), line=1,
                         field="book_id")
    _check_ids(bpath, rows, header.index(key), key)
    col = {c: header.index(c) for c in header}
    recs = []
    by_goodreads: dict[str, int] = {}
    for n, f in rows:
        title = _title(f[col["title"]], bpath, n, "title")
        attrs: dict = {}
        if "authors" in col and f[col["authors"]].strip():
            attrs["authors"] = [a.strip() for a in f[col["authors"]].split(",") if a.strip()]
        if "original_publication_year" in col and f[col["original_publication_year"]].strip():
            v = f[col["original_publication_year"]].strip()
            try:
                year = plain_float(v)  # ("1_999" and "１９９９" are no years)
                if not np.isfinite(year) or not year.is_integer() or abs(year) >= MAX_YEAR:
                    raise ValueError
            except ValueError:
                raise InputError(f"not a year: {v!r}", source=str(bpath), line=n,
                                 field="original_publication_year") from None
            attrs["original_publication_year"] = int(year)
        if "language_code" in col and f[col["language_code"]].strip():
            attrs["language_code"] = f[col["language_code"]].strip()
        if goodreads in col and f[col[goodreads]].strip():
            gid = f[col[goodreads]].strip()
            if gid in by_goodreads:  # (book_tags.csv's tags would land on one of the two)
                raise InputError(f"Goodreads id {gid!r} is given twice (first on line {recs[by_goodreads[gid]]['line']})",
                                 source=str(bpath), line=n, field=goodreads)
            by_goodreads[gid] = len(recs)
        recs.append({"item": f[col[key]].strip(), "title": title, "attributes": attrs, "line": n})
    items = pd.DataFrame(recs, columns=["item", "title", "attributes", "line"])
    btpath, tpath = folder / "book_tags.csv", folder / "tags.csv"
    if btpath.exists() != tpath.exists():  # (the tags would be left out without a word)
        given, lacking = (btpath, tpath) if btpath.exists() else (tpath, btpath)
        raise InputError(f"{given.name} needs {lacking.name} beside it (book_tags.csv gives tag ids and counts, "
                         "tags.csv their names)", source=str(lacking))
    if btpath.exists() and goodreads not in col:
        raise InputError(f"book_tags.csv keys books by their Goodreads id: {bpath.name} has no {goodreads} column",
                         source=str(bpath), line=1, field=goodreads)
    if btpath.exists() and tpath.exists() and by_goodreads:
        theader, trows = _csv_rows(tpath, ["tag_id", "tag_name"])
        names, kid, kname = {}, theader.index("tag_id"), theader.index("tag_name")
        tag_lines: dict[str, int] = {}
        for n, f in trows:
            tag_id = f[kid].strip()
            _check_unique(tag_id, tpath, n, "tag_id", tag_lines)  # (the last name would win without a word)
            names[tag_id], tag_lines[tag_id] = f[kname].strip(), n
        bheader, brows = _csv_rows(btpath, ["goodreads_book_id", "tag_id", "count"])
        kb, kt, kc = (bheader.index(c) for c in ("goodreads_book_id", "tag_id", "count"))
        data = []
        for n, f in brows:
            tag = names.get(f[kt].strip())
            if tag is None:
                raise InputError(f"tag id {f[kt].strip()!r} is not in {tpath.name}", source=str(btpath), line=n,
                                 field="tag_id")
            count = number_in_text(f[kc])  # (a finite number: "nan" or "inf" would rank a tag first or last)
            if count is None:
                raise InputError(f"{not_a_number_said(f[kc])}: {f[kc]!r}", source=str(btpath), line=n, field="count")
            count = max(count, 0.0)  # (the release has a few counts of -1; its author reads them as 0)
            book = by_goodreads.get(f[kb].strip())
            if book is not None and tag and tag.lower() not in GOODREADS_DEFAULT_SHELVES:  # (a blank name: no tag)
                data.append((book, tag, count))
        tags = _top_tags(pd.DataFrame(data, columns=["book", "tag", "count"]), "book", "tag", "count")
        for book, top in tags.items():
            items["attributes"].iat[book]["tags"] = top
    return items, key
