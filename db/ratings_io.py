"""The ratings table in bulk: many rows written in one transaction (multi-row INSERTs on SQLite,
COPY on PostgreSQL) and every rating read back as numpy arrays."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, inspect, select

from ..cf_core.errors import CfbError
from .engine import lock_writers
from .schema import Item, Rating, User
from .store import as_stored, ensure_rating_history, insert_many, next_seq, rating_scale_and_step

BULK_ROWS = 200_000  # a first ingest this large into an empty ratings table takes the bulk path


def write_ratings(conn: Connection, users, items, ratings, timestamps, progress=None) -> int:  # noqa: ANN001
    """Upsert ratings by database ids; returns how many pairs were written.

    A pair given twice keeps its row with the latest timestamp (a row with one over a row without; the
    last of those rows), and seq numbers the kept rows in the given order. Rows go in (user, item)
    order, many to a statement (see ``store.insert_many``; on PostgreSQL from ``PG_COPY_ROWS`` rows through
    COPY, ``_write_postgres_by_copy``). A first large ingest (``BULK_ROWS`` or more into an empty
    table) drops the secondary indexes (on PostgreSQL also the keys) and builds them once at the end,
    in the same transaction. On a SQLite connection without foreign keys (``make_engine(bulk=True)``)
    every id is checked here, at once. ``progress(n)`` is called after each statement of ``n`` rows.
    Writers are serialised (see ``engine.lock_writers``), so call it inside a write transaction that
    commits promptly."""
    lock_writers(conn)
    ensure_rating_history(conn)
    seq0 = next_seq(conn)
    u, i = _array(users, np.int64), _array(items, np.int64)
    r = as_stored(_array(ratings, np.float64), *rating_scale_and_step(conn))
    ts, missing = _timestamps(timestamps)
    keep = rows_kept(u, i, ts, missing)
    kept = np.zeros(len(r), bool)
    kept[keep] = True
    seq = seq0 - 1 + np.cumsum(kept)  # the kept rows' order, as given
    sqlite = conn.dialect.name == "sqlite"
    if sqlite and not conn.exec_driver_sql("PRAGMA foreign_keys").scalar():
        _check_references(conn, u, i)
    bulk = sqlite and len(keep) >= BULK_ROWS and seq0 == 1
    bulk_postgres = not sqlite and len(keep) >= BULK_ROWS and seq0 == 1
    # a bulk ingest builds the secondary indexes once, after the rows; but when the rows come in key
    # order their seq ascends as they go in, and appending to the seq index costs less than building it
    in_order = bulk and bool((keep[1:] > keep[:-1]).all())
    rebuilt = [ix for ix in Rating.__table__.indexes if not (in_order and list(ix.columns.keys()) == ["seq"])] \
        if bulk else []
    for index in rebuilt:
        index.drop(conn)
    changed = f"ratings.rating {'IS NOT' if sqlite else 'IS DISTINCT FROM'} excluded.rating"
    # a rating written again with the same value keeps its row (seq and time): it is not new to any model
    # version (`cfb rate` stamps every rating with the time it is written); it only gives a row stored
    # without a time the one it now comes with. A changed one records the row it replaces (the SET
    # expressions read the row as it was).
    upsert = ("ON CONFLICT (user_id, item_id) DO UPDATE SET "
              f"prev_rating = CASE WHEN {changed} THEN ratings.rating ELSE ratings.prev_rating END, "
              f"prev_seq = CASE WHEN {changed} THEN ratings.seq ELSE ratings.prev_seq END, "
              "rating = excluded.rating, timestamp = excluded.timestamp, "
              f"seq = CASE WHEN {changed} THEN excluded.seq ELSE ratings.seq END "
              f"WHERE {changed} OR (ratings.timestamp IS NULL AND excluded.timestamp IS NOT NULL)")

    if not sqlite and len(keep) >= PG_COPY_ROWS:
        if bulk_postgres:  # keys and indexes built once after the rows: seconds, where checks per row took minutes
            _check_references(conn, u, i)
            _drop_rating_constraints_postgres(conn)
        _write_postgres_by_copy(conn, u[keep], i[keep], r[keep], ts[keep], missing[keep], seq[keep],
                                "" if bulk_postgres else upsert, progress)
        if bulk_postgres:
            _restore_rating_constraints_postgres(conn)
        return len(keep)

    def params(rows: slice) -> list:
        at = keep[rows]
        gone = missing[at]
        if gone.all():
            stamps = [None] * len(at)
        else:
            stamps = ts[at].tolist()
            if gone.any():
                stamps = [None if m else t for t, m in zip(stamps, gone.tolist())]
        cols = (u[at].tolist(), i[at].tolist(), r[at].tolist(), stamps, seq[at].tolist())
        return list(itertools.chain.from_iterable(zip(*cols)))

    insert_many(conn, "ratings", ["user_id", "item_id", "rating", "timestamp", "seq"], len(keep), params, upsert,
            progress)
    for index in rebuilt:
        index.create(conn)
    return len(keep)


PG_COPY_ROWS = 10_000  # from this many ratings, PostgreSQL gets them through COPY (an INSERT … SELECT per chunk)
COPY_CHUNK = 1_000_000  # rows encoded, sent and inserted at a time


def _drop_rating_constraints_postgres(conn: Connection) -> None:
    """Before a first bulk ingest into PostgreSQL: the ratings table's keys and indexes dropped
    (``_restore_rating_constraints_postgres`` builds them after the rows, in the same transaction)."""
    found = inspect(conn)
    for name in [fk["name"] for fk in found.get_foreign_keys("ratings")] + [found.get_pk_constraint("ratings")["name"]]:
        conn.exec_driver_sql(f'ALTER TABLE ratings DROP CONSTRAINT "{name}"')
    for index in Rating.__table__.indexes:
        index.drop(conn)


def _restore_rating_constraints_postgres(conn: Connection) -> None:
    # (plain SQL: SQLAlchemy's AddConstraint would leave the constraint out of later CREATE TABLEs)
    table = Rating.__table__
    conn.exec_driver_sql(f"ALTER TABLE ratings ADD PRIMARY KEY ({', '.join(c.name for c in table.primary_key)})")
    for index in table.indexes:
        index.create(conn)
    for fk in table.foreign_key_constraints:  # each checked by one join, not a trigger per row
        conn.exec_driver_sql(f"ALTER TABLE ratings ADD FOREIGN KEY ({', '.join(fk.column_keys)}) REFERENCES "
                             f"{fk.referred_table.name} ({', '.join(e.column.name for e in fk.elements)})")
    conn.exec_driver_sql("ANALYZE ratings")  # the planner's statistics for the table it has not seen filled


def _copy_row(types: list[str]) -> np.dtype:
    """A row of PostgreSQL's binary COPY format whose fields have these fixed-width numpy types (big
    endian; no NULLs): the number of fields, then each field's length and value."""
    return np.dtype([("n", ">i2")] + [f for k, t in enumerate(types) for f in ((f"len{k}", ">i4"), (f"c{k}", t))])


def _write_postgres_by_copy(conn: Connection, u: np.ndarray, i: np.ndarray, r: np.ndarray, ts: np.ndarray,
                            missing: np.ndarray, seq: np.ndarray, upsert: str, progress=None) -> None:  # noqa: ANN001
    """Many ratings into PostgreSQL, ``COPY_CHUNK`` rows at a time: ``COPY … FROM STDIN (FORMAT
    BINARY)`` into a temporary table (rows encoded by numpy, no Python object per value), then one
    ``INSERT … SELECT`` into ``ratings``, ending with ``upsert`` (ON CONFLICT …; none into an empty
    table); ``progress`` follows each chunk once it is in ``ratings``. Multi-row INSERT statements
    managed about 23k ratings/s."""
    conn.exec_driver_sql("CREATE TEMP TABLE ratings_in (user_id int4, item_id int4, rating float8, "
                         "timestamp int8, missing bool, seq int8) ON COMMIT DROP")
    columns = [(u, ">i4"), (i, ">i4"), (r, ">f8"), (ts, ">i8"), (missing, "?"), (seq, ">i8")]
    row = _copy_row([t for _, t in columns])
    cursor = conn.connection.driver_connection.cursor()
    try:
        for start in range(0, len(u), COPY_CHUNK):
            part = slice(start, start + COPY_CHUNK)
            rows = np.empty(len(u[part]), row)
            rows["n"] = len(columns)
            for k, (values, t) in enumerate(columns):
                rows[f"len{k}"], rows[f"c{k}"] = np.dtype(t).itemsize, values[part]
            with cursor.copy("COPY ratings_in FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(b"PGCOPY\n\xff\r\n\x00" + bytes(8))  # signature, flags, no header extension
                copy.write(rows.tobytes())
                copy.write(b"\xff\xff")
            conn.exec_driver_sql("INSERT INTO ratings (user_id, item_id, rating, timestamp, seq) SELECT user_id, "
                                 "item_id, rating, CASE WHEN missing THEN NULL ELSE timestamp END, seq FROM ratings_in "
                                 f"ORDER BY user_id, item_id {upsert}")
            conn.exec_driver_sql("TRUNCATE ratings_in")
            if progress:
                progress(len(rows))
    finally:
        cursor.close()
    conn.exec_driver_sql("DROP TABLE ratings_in")


def _check_references(conn: Connection, users: np.ndarray, items: np.ndarray) -> None:
    """What the foreign keys check row by row, for all rows at once: every user and item id exists."""
    import pandas as pd  # (not at the top: the HTTP server imports this module, and no pandas)

    for table, ids in ((User, users), (Item, items)):
        known = np.fromiter(conn.scalars(select(table.id)), np.int64)
        unknown = np.setdiff1d(pd.unique(ids), known)
        if len(unknown):
            raise CfbError(f"no {table.__tablename__[:-1]} with database id {unknown[0]}")


def _array(values, dtype: type) -> np.ndarray:  # noqa: ANN001
    """``values`` as an array; a list of Python numbers without numpy's type discovery pass over it."""
    if isinstance(values, list):
        try:
            return np.fromiter(values, dtype, len(values))
        except (TypeError, ValueError):  # e.g. None among them
            pass
    return np.asarray(values, dtype)


def _timestamps(values) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(int64 timestamps, where there is none: None or NaN)."""
    floats = isinstance(values, np.ndarray) and values.dtype.kind == "f"
    if not floats:
        try:
            t = _array(values, np.int64)  # whole numbers, none missing: the usual case
            return t, np.zeros(len(t), bool)
        except (TypeError, ValueError):
            values = np.asarray(values, object)
    import pandas as pd  # (here only: a server writes whole numbers and stays without pandas)

    missing = pd.isna(values)  # one C pass (a release without timestamps is all None)
    t = np.zeros(len(values), np.int64)
    if not missing.all():
        t[~missing] = values[~missing].astype(np.float64)
    return t, missing


def rows_kept(users: np.ndarray, items: np.ndarray, ts: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Positions of the row each (user, item) pair keeps, in (user, item) order: of a pair given twice,
    its row with the latest timestamp (a row with one over a row without; the last of those rows)."""
    keep = latest_per_pair(users, items)
    if len(keep) < len(users) and not missing.all():
        keep = latest_per_pair(users, items, np.where(missing, np.iinfo(np.int64).min, ts))
    return keep


def one_row_per_pair(ratings):  # noqa: ANN001, ANN201  (a DataFrame of user, item, rating[, timestamp])
    """``ratings`` as an ingest stores them: one row per (user, item) (``rows_kept``), in the given order."""
    import pandas as pd

    u = pd.factorize(ratings["user"].astype(str))[0].astype(np.int64)
    i = pd.factorize(ratings["item"].astype(str))[0].astype(np.int64)
    ts, missing = _timestamps(ratings["timestamp"].to_numpy() if "timestamp" in ratings else [None] * len(u))
    keep = rows_kept(u, i, ts, missing)
    return ratings if len(keep) == len(ratings) else ratings.iloc[np.sort(keep)].reset_index(drop=True)


def latest_per_pair(users: np.ndarray, items: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
    """Positions of each (user, item) pair's last row, in (user, item) order; with ``times``, its row
    with the latest time (of those, the last)."""
    fits = len(users) and 0 <= min(users.min(), items.min()) and max(users.max(), items.max()) < 2**31
    if times is None and fits:
        key = (users << 32) | items  # one int64 key: sorts several times faster than lexsort
        if len(key) > 1 and (key[1:] >= key[:-1]).all():  # already in order (releases sorted by user, item)
            order = np.arange(len(key))
        else:
            order = np.argsort(key, kind="stable")
            key = key[order]
        differs = key[1:] != key[:-1]
    else:  # (lexsort is stable: of equal keys, the last row given is last)
        order = np.lexsort((items, users) if times is None else (times, items, users))
        u, i = users[order], items[order]
        differs = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    last = np.ones(len(order), bool)
    last[:-1] = differs
    return order[last]


@dataclass
class RatingsArrays:
    """Every rating, in write order: database ids, values, timestamps (-1 unknown), seq; with
    ``load_ratings(…, with_replaced=True)`` also the rating and seq of the row each replaced (-1: none)."""

    user_id: np.ndarray
    item_id: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    seq: np.ndarray
    prev_rating: np.ndarray | None = None
    prev_seq: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rating)


def load_ratings(conn: Connection, since_seq: int = 0, with_replaced: bool = False) -> RatingsArrays:
    """Ratings with ``seq > since_seq``, ordered by seq, as numpy arrays (``with_replaced``: also what
    each row replaced).

    Read through the raw DB-API cursor: no Row objects for millions of ratings. All of a SQLite
    database's ratings (a full retrain) are read as text columns (``_scan_sqlite``), PostgreSQL's
    as binary COPY output (``_copy_postgres``)."""
    if since_seq <= 0 and conn.dialect.name == "sqlite" and not with_replaced:
        columns = _scan_sqlite(conn)  # in key order
        order = seq_order(columns[4])
        return RatingsArrays(*(c[order] for c in columns))
    columns = ["user_id", "item_id", "rating", "COALESCE(timestamp, -1)", "seq"]
    if with_replaced:
        columns += ["COALESCE(prev_rating, -1)", "COALESCE(prev_seq, -1)"]
    rest = f"FROM ratings WHERE seq > {int(since_seq)}"
    if conn.dialect.name == "postgresql":  # ordered here: a full read's sort by seq took PostgreSQL seconds
        arrays = _copy_postgres(conn, columns, "iifll" + ("fl" if with_replaced else ""), rest)
        order = seq_order(arrays[4])
        arrays = [a[order] for a in arrays]
    else:
        arrays = _fetch_rows(conn, f"SELECT {', '.join(columns)} {rest} ORDER BY seq", len(columns))
    arrays[2] = arrays[2].astype(np.float32)
    if with_replaced:
        arrays[5], arrays[6] = arrays[5].astype(np.float32), arrays[6].astype(np.int64)
    return RatingsArrays(*arrays)


_PG_BINARY = {"i": ("int4", ">i4"), "l": ("int8", ">i8"), "f": ("float8", ">f8")}
COPY_BLOCK = 1 << 26  # bytes of COPY output parsed at a time


def _copy_postgres(conn: Connection, columns: list[str], kinds: str, rest: str) -> list[np.ndarray]:
    """``SELECT columns rest`` (no NULLs; ``kinds``: i = int4, l = int8, f = float8 per column) as
    arrays, through ``COPY … TO STDOUT (FORMAT BINARY)``: every row then has the same layout, which
    numpy reads as a structured array (no Python object per value, as a row by row fetch makes)."""
    cast = ", ".join(f"({c})::{_PG_BINARY[k][0]}" for c, k in zip(columns, kinds))
    row = _copy_row([_PG_BINARY[k][1] for k in kinds])
    parts, pending, header = [], bytearray(), True
    cursor = conn.connection.driver_connection.cursor()
    try:
        with cursor.copy(f"COPY (SELECT {cast} {rest}) TO STDOUT (FORMAT BINARY)") as copy:
            for data in itertools.chain(copy, [None]):
                if data is not None:
                    pending += data
                    if len(pending) < COPY_BLOCK:
                        continue
                if header:  # signature (11 bytes), flags, then the header extension's length and bytes
                    del pending[:19 + int.from_bytes(pending[15:19], "big")]
                    header = False
                whole = len(pending) // row.itemsize * row.itemsize
                if whole:
                    parts.append(np.frombuffer(bytes(pending[:whole]), row))
                    del pending[:whole]
    finally:
        cursor.close()
    rows = np.concatenate(parts) if parts else np.zeros(0, row)
    widths = [np.dtype(_PG_BINARY[k][1]).itemsize for k in kinds]
    if pending != b"\xff\xff" or (rows["n"] != len(kinds)).any() or any(
            (rows[f"len{k}"] != w).any() for k, w in enumerate(widths)):  # (a NULL would have length -1)
        raise CfbError("unexpected COPY output from PostgreSQL")
    return [rows[f"c{k}"].astype(np.float64 if kind == "f" else np.int64) for k, kind in enumerate(kinds)]


def seq_order(seq: np.ndarray) -> np.ndarray:
    """The permutation that sorts unique ``seq`` numbers: by placing each at its offset when they span
    at most four times their count (as after an ingest: linear time), else by sorting."""
    if len(seq) == 0:
        return np.zeros(0, np.int64)
    lo, span = int(seq.min()), int(seq.max()) - int(seq.min()) + 1
    if span > 4 * len(seq):
        return np.argsort(seq)
    slot = np.full(span, -1, np.int64)
    slot[seq - lo] = np.arange(len(seq))
    return slot[slot >= 0]


def _fetch_rows(conn: Connection, sql: str, n_columns: int = 5) -> list[np.ndarray]:
    """(user_id, item_id, rating, timestamp, seq[, more as float64]) columns of ``sql``'s rows."""
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.execute(sql)
        chunks = []
        while rows := cursor.fetchmany(500_000):
            chunks.append(np.array(rows, dtype=np.float64))
    finally:
        cursor.close()
    arr = np.concatenate(chunks) if chunks else np.zeros((0, n_columns))
    return [arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2].astype(np.float32),
            arr[:, 3].astype(np.int64), arr[:, 4].astype(np.int64), *(arr[:, k] for k in range(5, n_columns))]


SCAN_CHUNK = 2_000_000  # ratings per statement of ``_scan_sqlite`` (about, for evenly spread user ids)


def _scan_sqlite(conn: Connection) -> list[np.ndarray]:
    """Every rating of a SQLite database as (user_id, item_id, rating, timestamp, seq) columns, in key
    order. Python's sqlite3 makes an object per value (most of a full read's time at millions of
    ratings); here SQLite joins each column of a range of users into one comma-separated text, which
    numpy parses. The five aggregates run over the same rows, so position k of each is one rating."""
    cursor = conn.connection.driver_connection.cursor()
    try:
        lo, hi, n = cursor.execute("SELECT min(user_id), max(user_id), max(seq) FROM ratings").fetchone()
        parts = []
        if lo is not None:
            edges = np.unique(np.linspace(lo, hi + 1, max(2, -(-n // SCAN_CHUNK) + 1)).astype(np.int64))
            sql = ("SELECT group_concat(user_id), group_concat(item_id), group_concat(CASE WHEN rating = "
                   "CAST(rating AS INTEGER) THEN CAST(rating AS INTEGER) ELSE printf('%!.17g', rating) END), "  # "4", not "4.0";
                   # (the digits that give the stored double back: group_concat's 15 could move a rating
                   # by one float32 step, 3.000000119209289 read as 3.0000002 where PostgreSQL reads 3.0)
                   "group_concat(COALESCE(timestamp, -1)), group_concat(seq) FROM ratings "
                   "WHERE user_id >= ? AND user_id < ?")
            for a, b in zip(edges[:-1], edges[1:]):
                texts = cursor.execute(sql, (int(a), int(b))).fetchone()
                if texts[0] is not None:
                    parts.append([np.fromstring(t, sep=",", dtype=np.float64 if k == 2 else np.int64)
                                  for k, t in enumerate(texts)])
    finally:
        cursor.close()
    if not parts:
        return [np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64),
                np.zeros(0, np.int64)]
    cols = [np.concatenate([p[k] for p in parts]) for k in range(5)]
    cols[2] = cols[2].astype(np.float32)
    return cols
