"""Reads and writes of users, items and ratings (bulk, transactional, SQLite or PostgreSQL)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, Engine, func, insert, select, text

from ..cf_core.errors import CfbError
from .schema import Base, Item, Rating, Setting, User

CHUNK = 20_000
BULK_ROWS = 200_000  # a first ingest this large into an empty ratings table takes the bulk path


def create_schema(engine: Engine) -> None:
    """Create every table that is missing."""
    Base.metadata.create_all(engine)


def _upsert(conn: Connection, table, rows: list[dict], keys: list[str], update_cols: list[str],
            progress=None) -> None:  # noqa: ANN001
    """INSERT … ON CONFLICT (keys) DO UPDATE, for SQLite and PostgreSQL alike."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    for start in range(0, len(rows), CHUNK):
        stmt = dialect_insert(table)
        if update_cols:
            stmt = stmt.on_conflict_do_update(index_elements=keys,
                                              set_={c: stmt.excluded[c] for c in update_cols})
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=keys)
        conn.execute(stmt, rows[start:start + CHUNK])
        if progress:
            progress(len(rows[start:start + CHUNK]))


def get_setting(conn: Connection, key: str) -> str | None:
    return conn.scalar(select(Setting.value).where(Setting.key == key))


def set_setting(conn: Connection, key: str, value: str) -> None:
    _upsert(conn, Setting.__table__, [{"key": key, "value": value}], ["key"], ["value"])


def rating_scale(conn: Connection) -> tuple[float, float] | None:
    """The rating scale fixed by the first ingest (e.g. 1..5), or None for an empty database."""
    v = get_setting(conn, "rating_scale")
    return tuple(float(x) for x in v.split(",")) if v else None  # type: ignore[return-value]


def id_map(conn: Connection, table) -> dict[str, int]:
    """external id -> database id for users or items."""
    return dict(conn.execute(select(table.external_id, table.id)).all())


def ensure_ids(conn: Connection, table, external_ids, extra: dict[str, list] | None = None,
               update_cols: tuple[str, ...] = ()) -> dict[str, int]:
    """Insert the external ids that are missing (with optional extra columns); return the id map.

    Columns in ``update_cols`` are overwritten for ids that already exist."""
    external_ids = [str(x) for x in external_ids]
    if extra:
        rows = [{"external_id": e, **{k: v[i] for k, v in extra.items()}} for i, e in enumerate(external_ids)]
        _upsert(conn, table.__table__, rows, ["external_id"], list(update_cols))
    else:
        known = id_map(conn, table)
        new = sorted(set(external_ids) - known.keys())
        if new:
            defaults = {"attributes": {}} if hasattr(table, "attributes") else {}
            for start in range(0, len(new), CHUNK):
                conn.execute(insert(table), [{"external_id": e, **defaults} for e in new[start:start + CHUNK]])
    return id_map(conn, table)


def next_seq(conn: Connection) -> int:
    return int(conn.scalar(select(func.coalesce(func.max(Rating.seq), 0)))) + 1


# pg_advisory_xact_lock key serialising rating writers on PostgreSQL (any constant bigint; the lock is per database)
RATINGS_LOCK_KEY = 0x63666272617465  # "cfbrate"


def lock_rating_writers(conn: Connection) -> None:
    """Hold, until this transaction ends, the right to write ratings (PostgreSQL; re-entrant).

    seq numbers come from max(seq)+1, so writers must not overlap: with the lock taken before that
    read, each writer sees the previous one's committed rows and seq order is commit order (an
    incremental retrain reading ``seq > max_seq`` then misses nothing). SQLite's BEGIN IMMEDIATE
    (``db.engine.writing``) already serialises writers."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": RATINGS_LOCK_KEY})


def write_ratings(conn: Connection, users, items, ratings, timestamps, progress=None) -> int:  # noqa: ANN001
    """Upsert ratings by database ids (latest wins), in the given order; returns the count.

    Bulk: one prepared upsert through the DB-API cursor's ``executemany`` over plain tuples, in
    chunks. ``progress(n)`` is called after each chunk of ``n`` rows. Writers are serialised (see
    ``lock_rating_writers``), so call it inside a write transaction that commits promptly."""
    lock_rating_writers(conn)
    seq0 = next_seq(conn)
    ts = np.asarray(timestamps, dtype=object)
    ts = [None if t is None or (isinstance(t, float) and np.isnan(t)) else int(t) for t in ts.tolist()]
    n = len(ts)
    rows = zip(np.asarray(users, np.int64).tolist(), np.asarray(items, np.int64).tolist(),
               np.asarray(ratings, np.float64).tolist(), ts, range(seq0, seq0 + n))
    bulk = conn.dialect.name == "sqlite" and n >= BULK_ROWS and seq0 == 1
    if bulk:  # a first large ingest: key order into the primary key, secondary indexes built once at the end
        rows = iter(sorted(rows, key=lambda r: (r[0], r[1])))
        for index in Rating.__table__.indexes:
            index.drop(conn)
    mark = "%s" if conn.dialect.name == "postgresql" else "?"
    differs = "IS DISTINCT FROM" if conn.dialect.name == "postgresql" else "IS NOT"
    # a rating written again unchanged keeps its seq: it is not new to any model version
    sql = (f"INSERT INTO ratings (user_id, item_id, rating, timestamp, seq) VALUES ({', '.join([mark] * 5)}) "
           "ON CONFLICT (user_id, item_id) DO UPDATE SET rating = excluded.rating, "
           "timestamp = excluded.timestamp, seq = excluded.seq "
           f"WHERE ratings.rating {differs} excluded.rating OR ratings.timestamp {differs} excluded.timestamp")
    cursor = conn.connection.driver_connection.cursor()
    try:
        for start in range(0, n, CHUNK * 5):
            chunk = list(itertools.islice(rows, CHUNK * 5))
            cursor.executemany(sql, chunk)
            if progress:
                progress(len(chunk))
    finally:
        cursor.close()
    if bulk:
        for index in Rating.__table__.indexes:
            index.create(conn)
    return n


@dataclass
class RatingsArrays:
    """Every rating, in write order: database ids, values, timestamps (-1 unknown), seq."""

    user_id: np.ndarray
    item_id: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    seq: np.ndarray

    def __len__(self) -> int:
        return len(self.rating)


def load_ratings(conn: Connection, since_seq: int = 0) -> RatingsArrays:
    """Ratings with ``seq > since_seq``, ordered by seq, as numpy arrays.

    Read through the raw DB-API cursor in large chunks: no Row objects for millions of ratings."""
    sql = ("SELECT user_id, item_id, rating, COALESCE(timestamp, -1), seq FROM ratings "
           f"WHERE seq > {int(since_seq)} ORDER BY seq")
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.execute(sql)
        chunks = []
        while rows := cursor.fetchmany(500_000):
            chunks.append(np.array(rows, dtype=np.float64))
    finally:
        cursor.close()
    if not chunks:
        z = np.zeros(0, dtype=np.int64)
        return RatingsArrays(z, z, np.zeros(0, dtype=np.float32), z, z)
    arr = np.concatenate(chunks)
    return RatingsArrays(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2].astype(np.float32),
                         arr[:, 3].astype(np.int64), arr[:, 4].astype(np.int64))


def user_id_of(conn: Connection, external_id: str) -> int:
    uid = conn.scalar(select(User.id).where(User.external_id == str(external_id)))
    if uid is None:
        raise CfbError(f"unknown user {external_id!r}")
    return uid


def item_titles(conn: Connection, item_ids) -> dict[int, tuple[str, str | None]]:
    """database id -> (external id, title)."""
    ids = [int(i) for i in item_ids]
    out = {}
    for start in range(0, len(ids), 900):
        for row in conn.execute(select(Item.id, Item.external_id, Item.title).where(Item.id.in_(ids[start:start + 900]))):
            out[row[0]] = (row[1], row[2])
    return out


def _ratings_where(conn: Connection, key, other, value: int, with_seq: bool = False):  # noqa: ANN001, ANN202
    rows = conn.execute(select(other, Rating.rating, Rating.seq).where(key == value).order_by(Rating.seq)).all()
    out = (np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.float32))
    return (*out, np.array([r[2] for r in rows], np.int64)) if with_seq else out


def user_ratings(conn: Connection, user_id: int, with_seq: bool = False):  # noqa: ANN201
    """(item ids, ratings[, seq]) of one user, in write order."""
    return _ratings_where(conn, Rating.user_id, Rating.item_id, user_id, with_seq)


def item_ratings(conn: Connection, item_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, ratings) of one item."""
    return _ratings_where(conn, Rating.item_id, Rating.user_id, item_id)


def count_ratings(conn: Connection, since_seq: int = 0) -> int:
    return int(conn.scalar(select(func.count()).select_from(Rating).where(Rating.seq > since_seq)))


def user_attributes_of(conn: Connection, user_id: int) -> dict:
    return conn.scalar(select(User.attributes).where(User.id == user_id)) or {}


def user_attributes(conn: Connection) -> dict[int, dict]:
    return dict(conn.execute(select(User.id, User.attributes)).all())


def item_totals(conn: Connection, item_ids) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(number of ratings, sum of ratings) of each of ``item_ids``, as the table holds them now."""
    ids = [int(i) for i in item_ids]
    found: dict[int, tuple[int, float]] = {}
    for start in range(0, len(ids), 900):
        rows = conn.execute(select(Rating.item_id, func.count(), func.sum(Rating.rating))
                            .where(Rating.item_id.in_(ids[start:start + 900])).group_by(Rating.item_id)).all()
        found.update({int(i): (int(c), float(t)) for i, c, t in rows})
    return (np.array([found.get(i, (0, 0.0))[0] for i in ids], np.float64),
            np.array([found.get(i, (0, 0.0))[1] for i in ids], np.float64))


def all_item_ids(conn: Connection) -> np.ndarray:
    """Every item's database id (catalogue items with or without ratings)."""
    return np.array(conn.scalars(select(Item.id)).all(), np.int64)


def item_attributes(conn: Connection, item_ids=None) -> dict[int, dict]:  # noqa: ANN001
    """database id -> item metadata (all items, or ``item_ids``)."""
    stmt = select(Item.id, Item.attributes)
    if item_ids is not None:
        stmt = stmt.where(Item.id.in_([int(i) for i in item_ids]))
    return {i: a or {} for i, a in conn.execute(stmt).all()}

