"""Readers for ratings files (MovieLens 100k, goodbooks-10k, generic CSV), validated up front.

Each returns pandas frames with raw string ids; any problem raises ``InputError`` naming the file,
line and field, before anything is written."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..cf_core.errors import InputError
from .textfile import read_text

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


@dataclass
class Dataset:
    """What an ingest writes: ratings (user, item, rating, timestamp), and optionally items and users."""

    ratings: pd.DataFrame
    items: pd.DataFrame | None = None  # item, title, attributes (dict)
    users: pd.DataFrame | None = None  # user, attributes (dict)
    scale: tuple[float, float] | None = None
    name: str = "ratings"


def _numeric(df: pd.DataFrame, col: str, path: Path, first_line: int, integer: bool = False) -> np.ndarray:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
    if integer:
        bad |= values.fillna(0) % 1 != 0
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"not a number: {df[col].iloc[pos]!r}", source=str(path), line=first_line + pos, field=col)
    return values.to_numpy()


def _nonempty_ids(df: pd.DataFrame, col: str, path: Path, first_line: int) -> None:
    empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
    if empty.any():
        pos = int(np.flatnonzero(empty.to_numpy())[0])
        raise InputError("empty id", source=str(path), line=first_line + pos, field=col)


def check_scale(ratings: pd.DataFrame, scale: tuple[float, float], source: str, first_line: int = 2,
                field: str = "rating") -> None:
    """Every rating lies within ``scale`` (inclusive), else an error naming the first offender."""
    r = ratings["rating"].to_numpy(dtype=float)
    bad = (r < scale[0]) | (r > scale[1])
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise InputError(f"rating {r[pos]:g} outside the scale {scale[0]:g}..{scale[1]:g}",
                         source=source, line=first_line + pos, field=field)


def read_csv_table(path: Path, required: list[str]) -> pd.DataFrame:
    """A CSV with a header, all columns as strings; missing columns are named."""
    text = read_text(path)
    if not text.strip():
        raise InputError("empty file", source=str(path), line=1)
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, csv.Error) as e:
        raise InputError(f"malformed CSV ({str(e).splitlines()[0]})", source=str(path)) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {', '.join(missing)}; header has {', '.join(df.columns)}",
                         source=str(path), line=1, field=missing[0])
    return df


def read_ratings_csv(path: Path, user_col: str = "user", item_col: str = "item", rating_col: str = "rating",
                     time_col: str | None = "timestamp") -> pd.DataFrame:
    """A ratings CSV with a header: ``user,item,rating[,timestamp]`` (column names configurable)."""
    path = Path(path)
    df = read_csv_table(path, [user_col, item_col, rating_col])
    _nonempty_ids(df, user_col, path, 2)
    _nonempty_ids(df, item_col, path, 2)
    out = pd.DataFrame({"user": df[user_col].str.strip(), "item": df[item_col].str.strip(),
                        "rating": _numeric(df, rating_col, path, 2).astype(np.float32)})
    if time_col and time_col in df.columns:
        out["timestamp"] = _numeric(df, time_col, path, 2, integer=True).astype(np.int64)
    else:
        out["timestamp"] = None
    return out


def read_users_csv(path: Path, user_col: str = "user") -> pd.DataFrame:
    """User attributes: a CSV with a ``user`` column; every other column is an attribute
    (numbers stay numbers, empty cells are left out)."""
    path = Path(path)
    df = read_csv_table(path, [user_col])
    _nonempty_ids(df, user_col, path, 2)
    attrs = [c for c in df.columns if c != user_col]
    records = []
    for row in df[attrs].to_dict("records"):
        records.append({k: _scalar(v) for k, v in row.items() if str(v).strip() != ""})
    return pd.DataFrame({"user": df[user_col].str.strip(), "attributes": records})


def _scalar(v: str):
    v = str(v).strip()
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v else f


def _fields(path: Path, sep: str, encoding: str = "utf-8") -> list[tuple[int, list[str]]]:
    """(line number, fields) of every line of a delimited file without a header."""
    return [(n, line.split(sep)) for n, line in enumerate(read_text(path, encoding).splitlines(), start=1)]


def read_movielens(folder: Path) -> Dataset:
    """MovieLens 100k: ``u.data`` (tab-separated), ``u.item`` (titles, genre flags), ``u.user``."""
    folder = Path(folder)
    ratings_path = folder / "u.data"
    rows = _fields(ratings_path, "\t")
    for n, row in rows:
        if len(row) != 4:
            raise InputError(f"expected 4 tab-separated fields, found {len(row)}", source=str(ratings_path), line=n)
    raw = pd.DataFrame([row for _, row in rows], columns=["user", "item", "rating", "timestamp"])
    ratings = pd.DataFrame({
        "user": raw["user"].str.strip(), "item": raw["item"].str.strip(),
        "rating": _numeric(raw, "rating", ratings_path, 1).astype(np.float32),
        "timestamp": _numeric(raw, "timestamp", ratings_path, 1, integer=True).astype(np.int64)})
    check_scale(ratings, (1, 5), str(ratings_path), first_line=1)

    items = None
    item_path = folder / "u.item"
    if item_path.exists():
        recs = []
        for n, f in _fields(item_path, "|", "latin-1"):
            if len(f) < 5 + len(ML100K_GENRES):
                raise InputError(f"expected {5 + len(ML100K_GENRES)} '|'-separated fields, found {len(f)}",
                                 source=str(item_path), line=n)
            genres = [g for g, flag in zip(ML100K_GENRES, f[5:]) if flag.strip() == "1"]
            recs.append({"item": f[0].strip(), "title": f[1],
                         "attributes": {"genres": genres, "release_date": f[2]}})
        items = pd.DataFrame(recs)

    users = None
    user_path = folder / "u.user"
    if user_path.exists():
        recs = []
        for n, f in _fields(user_path, "|", "latin-1"):
            if len(f) != 5 or not f[1].strip().isdigit():
                raise InputError("expected id|age|gender|occupation|zip", source=str(user_path), line=n)
            recs.append({"user": f[0].strip(), "attributes": {
                "age": int(f[1]), "gender": f[2], "occupation": f[3], "zip": f[4]}})
        users = pd.DataFrame(recs)
    return Dataset(ratings, items, users, scale=(1.0, 5.0), name="movielens")


def read_goodbooks(folder: Path) -> Dataset:
    """goodbooks-10k: ``ratings.csv`` (user_id, book_id, rating) and ``books.csv`` (book_id, title, ...)."""
    folder = Path(folder)
    ratings = read_ratings_csv(folder / "ratings.csv", "user_id", "book_id", "rating", None)
    check_scale(ratings, (1, 5), str(folder / "ratings.csv"))
    items = None
    books_path = folder / "books.csv"
    if books_path.exists():
        books = read_csv_table(books_path, ["book_id", "title"])
        extra = [c for c in ("authors", "original_publication_year", "language_code") if c in books.columns]
        items = pd.DataFrame({"item": books["book_id"].str.strip(), "title": books["title"],
                              "attributes": books[extra].to_dict("records")})
    return Dataset(ratings, items, None, scale=(1.0, 5.0), name="goodbooks")
