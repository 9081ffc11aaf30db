"""Readers for ratings files (generic CSV, users and items CSVs; the public datasets' layouts are in
``layouts``), validated up front.

Each returns pandas frames with raw string ids (in ratings, categorical columns of them: see
``id_column``); any problem raises ``InputError`` naming the file, line and field, before anything
is written."""
from __future__ import annotations

import csv
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..cf_core.errors import InputError
from .store import FLOAT32_MAX, STEP_TOLERANCE, rating_problem, scale_slack, shown_id
from .textfile import (check_unique_columns, csv_records, header_names, read_text, text_lines,
                       without_trailing_blank_lines)

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def is_blank_row(row: list[str]) -> bool:
    """Whether a row the csv module read is a blank line (or one of spaces), which pandas skips."""
    return len(row) <= 1 and not "".join(row).strip()


class CsvRowLines:
    """Each row's line in a CSV file with a header, as pandas reads its ``n_rows`` rows, found when first
    asked for (by an error naming one): pandas skips blank lines and a quoted line break spans two, so
    row k is not always on line k + 2. None for a row when the count does not come out as pandas'."""

    def __init__(self, path: Path, n_rows: int):
        self.path, self.n_rows, self._lines = Path(path), n_rows, None

    def __getitem__(self, pos: int) -> int | None:
        if self._lines is None:
            reader = csv.reader(io.StringIO(read_text(self.path).lstrip("\ufeff"), newline=""), skipinitialspace=True)
            lines, start = [], 1
            try:
                for row in reader:
                    if not is_blank_row(row):  # (the header, then the rows)
                        lines.append(start)
                    start = reader.line_num + 1
            except csv.Error:
                lines = []
            self._lines = lines[1:] if len(lines) == self.n_rows + 1 else []
        return self._lines[pos] if pos < len(self._lines) else None


# where a dataset's rows are in their file: the first row's line (the others follow), each row's line
# (``CsvRowLines``, or an array of them), or None (rows are not lines of a file)
RowLines = int | CsvRowLines | np.ndarray | None


@dataclass
class Dataset:
    """What an ingest writes: ratings (user, item, rating, timestamp), and optionally items and users."""

    ratings: pd.DataFrame
    items: pd.DataFrame | None = None  # item, title, attributes (dict)
    users: pd.DataFrame | None = None  # user, attributes (dict)
    scale: tuple[float, float] | None = None
    name: str = "ratings"
    source: str | None = None  # the ratings file, for errors found while writing
    first_line: RowLines = 2  # where the ratings are in ``source`` (``RowLines``)
    columns: dict[str, str] = field(default_factory=dict)  # {"rating"/"item": its name in ``source``} if not so
    step: float | None = None  # the step between ratings where the layout fixes one (whole or half stars)
    catalogue: str | None = None  # whose item ids these are, for a public release ("movielens", "goodbooks", ...)
    population: str | None = None  # whose user ids these are, for a public release (each numbers its users anew)
    items_source: str | None = None  # the items file, for errors found while writing (else ``source``)
    users_source: str | None = None  # the users file, likewise


def _numeric(df: pd.DataFrame, col: str, path: Path, first_line: RowLines, integer: bool = False,
             single: bool = False) -> np.ndarray:
    """A column's values as finite numbers (``integer``: whole ones under 2**53; ``single``: ones a
    float32 holds), else an error naming the first other value, its line and the column."""
    values = pd.to_numeric(df[col], errors="coerce")
    x = values.to_numpy(dtype=float, na_value=np.nan)
    bad = values.isna() | ~np.isfinite(x)
    what = "a number"
    if integer:  # a whole number that int64 (and a float) holds exactly
        v = values.to_numpy(dtype=float, na_value=0.0)
        bad |= (v % 1 != 0) | (np.abs(v) >= 2.0 ** 53)
        what = "a whole number under 2**53"
    if single and not bad.any():
        bad |= np.abs(x) > np.finfo(np.float32).max
        what = "a number under 3.4e38 (a 32-bit float)"
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"not {what}: {df[col].iloc[pos]!r}", source=str(path), line=row_line(first_line, pos),
                         field=col)
    return values.to_numpy()


def _nonempty_ids(df: pd.DataFrame, col: str, path: Path, first_line: RowLines) -> None:
    empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
    if empty.any():
        pos = int(np.flatnonzero(empty.to_numpy())[0])
        raise InputError("empty id", source=str(path), line=row_line(first_line, pos), field=col)


def id_column(values: pd.Series, factorized: tuple[np.ndarray, np.ndarray] | None = None) -> pd.Categorical:
    """Ids as a categorical of their stripped text: a few distinct ids, each kept once, so grouping,
    de-duplicating and mapping them to database ids work on small integer codes. ``factorized``:
    ``pd.factorize(values)`` when the caller has it already."""
    codes, uniques = factorized if factorized is not None else pd.factorize(values)  # categories in order of first appearance
    text = pd.Index(uniques).astype(str).str.strip()
    if not text.is_unique:  # "7" and " 7" are one id
        merged, text = pd.factorize(text)
        codes = merged[codes]
    return pd.Categorical.from_codes(codes, categories=text)


def row_line(first_line: RowLines, pos: int) -> int | None:
    """The line of the row at ``pos``: ``first_line + pos`` when rows follow the lines from
    ``first_line`` on, ``first_line[pos]`` when it knows each row's line, None when rows are not lines."""
    if first_line is None:
        return None
    if isinstance(first_line, int):
        return first_line + int(pos)
    line = first_line[int(pos)]
    return None if line is None else int(line)


def check_scale(ratings: pd.DataFrame, scale: tuple[float, float], source: str, first_line: RowLines = 2,
                field: str = "rating", step: float | None = None) -> None:
    """Every rating lies within ``scale`` (inclusive) and, given a ``step``, on a step from its low end,
    else an error naming the first offender (first out of the scale, then off the steps)."""
    r = ratings["rating"].to_numpy(dtype=float)
    slack = scale_slack(scale)
    bad = (r < scale[0] - slack) | (r > scale[1] + slack)
    if step is not None and not bad.any():
        steps = (r - scale[0]) / step
        bad = np.abs(steps - np.round(steps)) > STEP_TOLERANCE
    if bad.any():  # (the rule is ``store.rating_problem``'s, for the first offender: one message everywhere)
        pos = int(np.flatnonzero(bad)[0])
        raise InputError(rating_problem(float(r[pos]), scale, step), source=source, line=row_line(first_line, pos),
                         field=field)


def check_times(times: np.ndarray, source: str, first_line: RowLines, field: str = "timestamp") -> None:
    """No time is negative (seconds since 1970) or 2**53 or more (every reader's rule, as ``_numeric``'s),
    else an error naming the first one."""
    for bad, what in ((times < 0, "negative time '{}' (seconds since 1970 expected)"),
                      (times >= 2**53, "not a whole number under 2**53: '{}'")):
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            raise InputError(what.format(int(times[pos])), source=source, line=row_line(first_line, pos), field=field)


def check_listed(ratings: pd.DataFrame, listed: pd.Series, source: str, first_line: RowLines, field: str,
                 listing_file: str, column: str = "item") -> None:
    """Every rating's ``column`` ("item" or "user") is one of ``listed`` (the release's item or user list,
    ids as text), else an error naming the first rating of an unknown one. Compares the distinct ids,
    then finds the row only on failure."""
    codes, distinct = _codes(ratings[column])
    unknown = ~pd.Index(distinct).isin(pd.Index(listed.astype(str)))
    if unknown.any():
        pos = int(np.flatnonzero(unknown[codes])[0])
        raise InputError(f"{column} {str(distinct[codes[pos]])!r} is not in {listing_file}", source=source,
                         line=row_line(first_line, pos), field=field)


def _codes(ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(each row's code, the distinct ids as text) of an id column, categorical or not."""
    if isinstance(ids.dtype, pd.CategoricalDtype):
        return np.asarray(ids.array.codes), np.asarray(ids.array.categories.astype(str))
    codes, distinct = pd.factorize(ids)
    return codes, np.asarray(pd.Index(distinct).astype(str))


def _raise_csv_problem(path: Path, text: str, quotes_only: bool = False) -> None:
    """Raise an ``InputError`` naming the first line of ``text`` (a CSV with a header) whose number of
    fields differs from the header's (unless ``quotes_only``), or where a quote is left open or stands
    inside a field; return if there is none."""
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    start = 1  # the line the record being read starts on
    try:
        header = next(row for row in reader if not is_blank_row(row))
        start = reader.line_num + 1
        for row in reader:
            if not quotes_only and not is_blank_row(row) and len(row) != len(header):
                raise InputError(f"expected {len(header)} fields, found {len(row)}", source=str(path), line=start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise InputError(f"malformed CSV in the record that starts here ({e})", source=str(path), line=start) from None


def read_csv_table(path: Path, required: list[str]) -> pd.DataFrame:
    """A CSV with a header, all columns as strings; missing columns are named."""
    text = read_text(path, csv_header=True)
    if not text.strip():
        raise InputError("empty file", source=str(path), line=1)
    at, first = next(((n, line) for n, line in enumerate(text_lines(text.lstrip("\ufeff")), start=1)
                      if line.strip()), (1, ""))  # (the header: pandas skips blank lines before it)
    header = header_names(first, path, at, skipinitialspace=True)  # ("rating " is rating)
    check_unique_columns(header, path, at)
    try:
        with warnings.catch_warnings():  # a row longer than the header: an error (pandas would take the
            warnings.simplefilter("error", pd.errors.ParserWarning)  # first column as an index)
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True,
                             index_col=False)
        if len(df.columns) == len(header):
            df.columns = header
        last = df.columns[-1] if len(df.columns) else None
        if last is not None and (df[last] == "").any():  # maybe a row shorter than the header (its missing
            _raise_csv_problem(path, text)  # fields read as ""): name it (a last field given empty passes)
        if '"' in text:  # pandas reads a stray quote into the value ("ab"cd as abcd): the csv module refuses it
            _raise_csv_problem(path, text, quotes_only=True)
    except (pd.errors.ParserError, pd.errors.ParserWarning, csv.Error) as e:
        _raise_csv_problem(path, text)  # the line at fault, found again by the csv module
        raise InputError(f"malformed CSV ({str(e).splitlines()[0]})", source=str(path)) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        named = ", ".join(name or f"column {k + 1} (no name)" for k, name in enumerate(header))
        raise InputError(f"missing column(s) {', '.join(missing)}; header has {named}",
                         source=str(path), line=at, field=missing[0])
    return df


def read_ratings_csv(path: Path, user_col: str = "user", item_col: str = "item", rating_col: str = "rating",
                     time_col: str | None = None) -> pd.DataFrame:
    """A ratings CSV with a header: ``user,item,rating[,timestamp]`` (column names configurable; a
    ``time_col`` named must be there, while the default takes a ``timestamp`` column if there is one).
    Its rows' lines in the file: ``CsvRowLines(path, len(out))``."""
    path = Path(path)
    optional_time = time_col is None  # then a "timestamp" column is taken if there is one (and no other role's)
    if optional_time and "timestamp" not in (user_col, item_col, rating_col):
        time_col = "timestamp"
    roles = {"user": user_col, "item": item_col, "rating": rating_col, "time": time_col}
    for role, col in roles.items():
        others = [r for r, c in roles.items() if c == col and r != role]
        if col is not None and others:
            raise InputError(f"column {col!r} is given as both the {role} and the {others[0]} column",
                             source=str(path))
    df = read_csv_table(path, [user_col, item_col, rating_col] + ([] if optional_time else [time_col]))
    if df.empty:
        raise InputError("no ratings after the header", source=str(path), line=2)
    lines = CsvRowLines(path, len(df))
    _nonempty_ids(df, user_col, path, lines)
    _nonempty_ids(df, item_col, path, lines)
    out = pd.DataFrame({"user": id_column(df[user_col]), "item": id_column(df[item_col]),
                        "rating": _numeric(df, rating_col, path, lines, single=True).astype(np.float32)})
    if time_col and time_col in df.columns:  # an empty cell: a rating without a time
        empty = (df[time_col].isna() | (df[time_col].astype(str).str.strip() == "")).to_numpy()
        times = _numeric(df.assign(**{time_col: df[time_col].where(~empty, "0")}), time_col, path, lines,
                         integer=True).astype(np.int64)
        check_times(times, str(path), lines, time_col)
        out["timestamp"] = np.where(empty, np.nan, times) if empty.any() else times
    else:
        out["timestamp"] = None
    return out


def _keyed_rows(path: Path, key: str, what: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """``csv_records`` of a CSV with one row per ``key``: an empty or duplicate key is an ``InputError``
    naming file, line and field too."""
    src = str(path)
    header, rows = csv_records(path, (key,), what)
    k, seen = header.index(key), {}
    for n, row in rows:
        if not row[k]:
            raise InputError("empty id", source=src, line=n, field=key)
        if row[k] in seen:
            raise InputError(f"duplicate {what} {row[k]!r} (first on line {seen[row[k]]})", source=src, line=n,
                             field=key)
        seen[row[k]] = n
    return header, rows


def read_users_csv(path: Path, user_col: str = "user") -> pd.DataFrame:
    """User attributes: a CSV with a ``user`` column; every other column is an attribute.

    Every value is read as text; a column becomes numbers only when all its non-empty values are
    finite numbers (``number_in_text``: "41", "1e5"; zip code "02139" stays "02139"), and a column of
    numbers with a "no value" word or a nan in it is refused (``_numeric_column``). Empty cells are
    left out. Bad rows are reported with file, line and field; the ``line`` column keeps each row's
    line for later checks."""
    header, rows = _keyed_rows(Path(path), user_col, "user")
    u = header.index(user_col)
    records: list[dict] = [{} for _ in rows]
    for k, name in enumerate(header):
        if k == u:
            continue
        values = [row[k] for _, row in rows]
        numeric = _numeric_column(values, [line for line, _ in rows], name, str(path))
        for rec, v in zip(records, values):
            if v != "":
                rec[name] = _scalar(v) if numeric else v
    return pd.DataFrame({"user": [row[u] for _, row in rows], "attributes": records,
                         "line": [line for line, _ in rows]})


NO_VALUE = {"na", "n/a", "nan", "null", "none", "unknown", "missing", "-", "?"}  # (lower case)


def _numeric_column(values: list[str], lines: list[int], name: str, source: str) -> bool:
    """Whether a column holds numbers: every non-empty value is a finite number (``number_in_text``).
    A column of numbers but for "no value" markers ("NA", "null", "unknown", …) or infinite or
    undefined numbers ("nan", "inf", "1e400") is refused at the first of those, naming ``source``, its
    line and the field ``name``: one such cell would turn the column into text (as a later file's cell
    would be refused by the stored numbers); an empty cell is the way to give no value. Any other
    text (a title "1984" among words, a code "02139") makes the column text."""
    others = [(v, line) for v, line in zip(values, lines) if v != "" and number_in_text(v) is None]
    if not others:
        return True
    if len(others) < sum(v != "" for v in values) and all(
            is_non_finite(v) or v.strip().lower() in NO_VALUE for v, _ in others):
        value, line = others[0]
        raise InputError(f"{shown_id(value)} is {not_a_number_said(value)}, and the column's other values are "
                         "numbers (leave a cell empty for no value)", source=source, line=line, field=name)
    return False


ZERO_PADDED = re.compile(r"[+-]?0[0-9]")
WHOLE = re.compile(r"[+-]?[0-9]+")


NUMBER_LIMIT = FLOAT32_MAX  # an attribute's number: one a 32-bit float holds, as a rating


def number_in_text(v: str) -> int | float | None:
    """The finite number a text writes, in any notation Python reads ("41", "-1.5", "1e5", "+4"; a whole
    number as an int), else None: for words, for infinite or undefined numbers ("inf", "1e400", "nan")
    or ones beyond ``NUMBER_LIMIT`` (whose arithmetic overflows), for zero-padded codes such as the
    zip "02139", and for digits other than ASCII's ("０２１３９", "٣٠"), which stay text, as every other
    reader of numbers takes ASCII only."""
    v = str(v).strip()
    if not v or not v.isascii() or ZERO_PADDED.match(v) or "_" in v:  # (float() also reads "1_000" and "٣٠")
        return None
    try:
        x = float(v)
    except ValueError:
        return None
    if not abs(x) <= NUMBER_LIMIT:
        return None
    if WHOLE.fullmatch(v):
        return int(v)  # exactly
    if x.is_integer() and abs(x) < 2 ** 53 and "." not in v:
        return int(x)
    return x


def is_non_finite(v: str) -> bool:
    """A text that Python reads as an infinite or undefined number ("inf", "1e400", "NaN"), or as one
    beyond ``NUMBER_LIMIT``."""
    try:
        return not abs(float(str(v).strip())) <= NUMBER_LIMIT
    except ValueError:
        return False


def not_a_number_said(v) -> str:  # noqa: ANN001
    """What keeps a value that ``number_in_text`` does not read from being a number, for a message."""
    if not is_non_finite(v):
        return "not a number"
    undefined = any(word in str(v).lower() for word in ("nan", "inf"))  # (not "1e400": a number, too large)
    return "not a finite number" if undefined else "larger than a 32-bit float holds (3.4e38)"


def _scalar(v: str):
    """A number (``number_in_text``) as int/float, anything else as its stripped text."""
    v = str(v).strip()
    x = number_in_text(v)
    return v if x is None else x


def _fields(path: Path, sep: str, encoding: str = "utf-8") -> list[tuple[int, list[str]]]:
    """(line number, fields) of every line of a delimited file without a header (blank lines at its end
    left out)."""
    text = without_trailing_blank_lines(read_text(path, encoding))
    return [(n, line.split(sep)) for n, line in enumerate(text_lines(text), start=1)]


def read_movielens(folder: Path) -> Dataset:
    """Any MovieLens release in ``folder``, recognised by its files (100k, 1M, 10M, 20M/25M/32M/latest);
    see ``cfb.db.layouts``."""
    from .layouts import read_movielens as read

    return read(folder)


def read_goodbooks(folder: Path) -> Dataset:
    """goodbooks-10k, v1 or v2 (told apart by ratings.csv's header); see ``cfb.db.layouts``."""
    from .layouts import read_goodbooks as read

    return read(folder)


def read_items_csv(path: Path) -> pd.DataFrame:
    """Your own catalogue: a CSV with a header ``item[,title][,attribute columns...]``.

    Returns item, title (None where the cell is empty) and attributes: a column whose values contain
    '|' holds lists ("Drama|War" -> ["Drama", "War"]); a column whose non-empty values are all finite
    numbers holds numbers; empty cells are left out. Problems name file, line and field (``line``: each
    row's line)."""
    header, rows = _keyed_rows(Path(path), "item", "item")
    k_item = header.index("item")
    records: list[dict] = [{} for _ in rows]
    for k, name in enumerate(header):
        if name in ("item", "title"):
            continue
        values = [row[k] for _, row in rows]
        if any("|" in v for v in values):
            for rec, v in zip(records, values):
                if listed := [x.strip() for x in v.split("|") if x.strip()]:  # ("|" alone: no value, as "")
                    rec[name] = listed
            continue
        numeric = _numeric_column(values, [line for line, _ in rows], name, str(path))
        for rec, v in zip(records, values):
            if v:
                rec[name] = _scalar(v) if numeric else v
    titles = [row[header.index("title")] or None for _, row in rows] if "title" in header else [None] * len(rows)
    return pd.DataFrame({"item": [row[k_item] for _, row in rows], "title": titles, "attributes": records,
                         "line": [line for line, _ in rows]})
