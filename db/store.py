"""Reads and writes of users, items and ratings (bulk, transactional, SQLite or PostgreSQL)."""
from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, Engine, func, inspect, select, text

from ..cf_core.errors import CfbError, InputError, NotReadyError, UnknownIdError
from .engine import EMPTY_DATABASE, lock_writers, writing
from .schema import REPLACED_RATING_TRIGGER, Base, Item, Rating, ReplacedRating, Setting, User, utcnow

CHUNK = 20_000
BULK_ROWS = 200_000  # a first ingest this large into an empty ratings table takes the bulk path


HISTORY_FROM_KEY = "rating_history_from_seq"  # setting: the first seq whose row records what it replaced
_HAVE_HISTORY: set[str] = set()  # database URLs whose ratings table was found with prev_rating/prev_seq
_HAVE_LOG: set[str] = set()  # database URLs found with the replaced-rating log (table and trigger)
_HAVE_ASKED: set[str] = set()  # database URLs whose answers table was found with ``asked``


def upgrade_schema(engine: Engine) -> None:
    """``create_schema`` for a database cfb has written (one from an earlier cfb gets what it lacks);
    any other (tables of another program's, or none) is refused, as every reading command refuses it,
    and nothing is written into it."""
    if not inspect(engine).has_table(Rating.__tablename__):
        raise NotReadyError(EMPTY_DATABASE)
    create_schema(engine)


def create_schema(engine: Engine) -> None:
    """Create every table that is missing, and what tables made by an earlier cfb lack (the ratings
    table's replaced-value columns, the trigger that logs replaced rows, the answers' ``asked``)."""
    with writing(engine) as conn:  # one writer at a time makes them (two first ingests at once on PostgreSQL)
        Base.metadata.create_all(conn)
    url = str(engine.url)
    if url not in _HAVE_HISTORY or url not in _HAVE_LOG or url not in _HAVE_ASKED:
        with engine.connect() as conn:
            if _has_history_columns(conn) and _has_replaced_log(conn) and has_answers_asked(conn):
                _HAVE_HISTORY.add(url)
                _HAVE_LOG.add(url)
                return
        with writing(engine) as conn:  # (so that a sign-up seldom has to add ``asked`` itself)
            ensure_rating_history(conn)
            ensure_answers_asked(conn)


def has_answers_asked(conn: Connection) -> bool:
    """Whether the answers table has ``asked`` (a database made before it gets it from its next sign-up)."""
    url = str(conn.engine.url)
    if url not in _HAVE_ASKED and _has_asked_column(conn):
        _HAVE_ASKED.add(url)
    return url in _HAVE_ASKED


def ensure_answers_asked(conn: Connection) -> None:
    """Give an answers table made before ``asked`` that column (in the caller's write transaction;
    remembered once found, i.e. committed)."""
    if str(conn.engine.url) in _HAVE_ASKED or _has_asked_column(conn):
        return
    if_missing = "" if conn.dialect.name == "sqlite" else "IF NOT EXISTS "  # (PostgreSQL: another writer's)
    conn.exec_driver_sql(f"ALTER TABLE answers ADD COLUMN {if_missing}asked INTEGER")


def _has_asked_column(conn: Connection) -> bool:
    return "asked" in {c["name"] for c in inspect(conn).get_columns("answers")}


def _has_history_columns(conn: Connection) -> bool:
    return "prev_seq" in {c["name"] for c in inspect(conn).get_columns("ratings")}


def _has_replaced_log(conn: Connection) -> bool:
    """Whether replaced rating rows are logged (the ``replaced_ratings`` table and its trigger)."""
    if conn.dialect.name == "sqlite":
        found = "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = 'ratings_keep_replaced'"
    else:
        found = "SELECT 1 FROM pg_trigger WHERE tgname = 'ratings_keep_replaced' AND tgrelid = 'ratings'::regclass"
    return conn.exec_driver_sql(found).first() is not None and inspect(conn).has_table(ReplacedRating.__tablename__)


def ensure_rating_history(conn: Connection) -> None:
    """Give a ratings table made before ``prev_rating``/``prev_seq`` those columns, and one made before
    the replaced-rating log its table and trigger (in the caller's write transaction). Rows written
    before the columns are marked as not recording what they replaced (``HISTORY_FROM_KEY``), so
    ``totals_since`` reads their items' statistics from the table.

    The URL is remembered only once both were found, i.e. committed: a migration rolled back with its
    transaction is made again by the next writer. (A cfb older than these must not write to the
    database after them: its replaced rows would not say so.)"""
    url = str(conn.engine.url)
    if url in _HAVE_HISTORY and url in _HAVE_LOG:
        return
    lock_writers(conn)  # PostgreSQL: one migration at a time (SQLite's writers already queue)
    columns, logged = _has_history_columns(conn), _has_replaced_log(conn)
    if columns and logged:
        _HAVE_HISTORY.add(url)
        _HAVE_LOG.add(url)
        return
    if not columns:
        first_tracked = next_seq(conn)
        conn.exec_driver_sql("ALTER TABLE ratings ADD COLUMN prev_rating FLOAT")
        conn.exec_driver_sql("ALTER TABLE ratings ADD COLUMN prev_seq BIGINT")
        set_setting(conn, HISTORY_FROM_KEY, str(first_tracked))
    if not logged:
        ReplacedRating.__table__.create(conn, checkfirst=True)
        for statement in REPLACED_RATING_TRIGGER[conn.dialect.name]:
            conn.exec_driver_sql(statement)


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


def one_of(column, values: list):  # noqa: ANN001, ANN201
    """``column IN values``, written ``column = value`` for one value: a request about one user is the
    common case, and an IN list is rendered again at every execution."""
    return column == values[0] if len(values) == 1 else column.in_(values)


def get_setting(conn: Connection, key: str) -> str | None:
    return conn.scalar(select(Setting.value).where(Setting.key == key))


def set_setting(conn: Connection, key: str, value: str) -> None:
    _upsert(conn, Setting.__table__, [{"key": key, "value": value}], ["key"], ["value"])


def rating_scale(conn: Connection) -> tuple[float, float] | None:
    """The rating scale fixed by the first ingest (e.g. 1..5), or None for an empty database."""
    return _as_scale(get_setting(conn, "rating_scale"))


def rating_step(conn: Connection) -> float | None:
    """The step between ratings fixed by the first ingest where its layout has one (MovieLens, goodbooks)."""
    return _as_step(get_setting(conn, "rating_step"))


def rating_scale_and_step(conn: Connection) -> tuple[tuple[float, float] | None, float | None]:
    """``(rating_scale(conn), rating_step(conn))`` read in one query."""
    values = dict(conn.execute(select(Setting.key, Setting.value)
                               .where(Setting.key.in_(("rating_scale", "rating_step")))).all())
    return _as_scale(values.get("rating_scale")), _as_step(values.get("rating_step"))


def _as_scale(value: str | None) -> tuple[float, float] | None:
    return tuple(float(x) for x in value.split(",")) if value else None  # type: ignore[return-value]


def _as_step(value: str | None) -> float | None:
    return float(value) if value else None


SCALE_LIMIT = 1e6  # the widest rating scale taken: training's squared errors are 32-bit floats


def scale_problem(scale: tuple[float, float]) -> str | None:
    """Why a rating scale cannot be trained on (its ends or width out of bounds), or None."""
    lo, hi = (float(x) for x in scale)
    if not max(abs(lo), abs(hi), hi - lo) <= SCALE_LIMIT:
        return (f"a rating scale {lo:g}..{hi:g} is not taken: its ends and width must be within "
                f"{SCALE_LIMIT:,.0f} (training works in 32-bit floats)")
    return None


FLOAT32_MAX = float(np.finfo(np.float32).max)  # the largest rating or attribute number (the models' arrays)


def rating_problem(value: float, scale: tuple[float, float] | None, step: float | None) -> str | None:
    """Why one rating cannot be stored on ``scale`` (with ``step`` between ratings, if any), else None;
    with no scale yet, a rating beyond what a 32-bit float holds (the models' arrays) is the one refused."""
    if not abs(value) <= FLOAT32_MAX:
        return f"rating {value:g} is larger than a 32-bit float holds (3.4e38)"
    if scale is None:
        return None
    slack = scale_slack(scale)
    if not scale[0] - slack <= value <= scale[1] + slack:
        return f"rating {as_typed(value)} outside the scale {scale[0]:g}..{scale[1]:g}"
    if step is not None and abs((value - scale[0]) / step - round((value - scale[0]) / step)) > STEP_TOLERANCE:
        return f"rating {as_typed(value)} not on the scale {scale[0]:g}..{scale[1]:g} in steps of {step:g}"
    return None


def as_typed(value: float) -> str:
    """A number as it was most likely typed: the shortest digits that read back as it (as a float32
    where it is one, as the readers' arrays hold ratings: 3.3 read that way is "3.3"; 1e+38 for a large
    one), or 12 significant digits for a long one."""
    with np.errstate(over="ignore"):  # (a number too large for a float32 is not one)
        single = np.float32(value)
    x = single if float(single) == float(value) else float(value)
    text = np.format_float_positional(x, trim="-")
    if len(text) <= 16:
        return text
    return np.format_float_scientific(x, trim="-") if abs(float(value)) >= 1e16 else f"{float(value):.12g}"


# How far off its step (a share of the step) and off its scale's ends (a share of the scale's largest
# end or width) a rating may be: as far as a typed decimal read as a float32 is (4.0000001 reads as 4,
# 0.3 as 0.30000001); such a rating is stored on its step and within the scale (``on_step``).
STEP_TOLERANCE = 1e-5
SCALE_TOLERANCE = 1e-6


def scale_slack(scale: tuple[float, float]) -> float:
    """How far outside ``scale`` a rating may lie and still be on it (``SCALE_TOLERANCE``)."""
    return SCALE_TOLERANCE * max(abs(scale[0]), abs(scale[1]), scale[1] - scale[0])


def on_step(ratings, scale: tuple[float, float] | None, step: float | None):  # noqa: ANN001, ANN201
    """Ratings that ``rating_problem`` let through, put exactly on their step (3.9999999999 is 4) and
    within the scale (0.30000001 on 0.1..0.3 is 0.3)."""
    if scale is None:
        return ratings
    r = np.asarray(ratings, np.float64)
    if step is not None:
        r = scale[0] + np.round((r - scale[0]) / step) * step
    return np.clip(r, scale[0], scale[1])


def as_stored(ratings, scale: tuple[float, float] | None, step: float | None):  # noqa: ANN001, ANN201
    """Ratings as they are stored: read as 32-bit floats, as every file reader reads them and every
    model learns them (so `cfb rate X I 3.7` stores what an ingest of 3.7 does, and writing it again is
    no change), then put on their step and within the scale (``on_step``)."""
    with np.errstate(over="ignore"):
        r = np.asarray(ratings, np.float64).astype(np.float32).astype(np.float64)
    return on_step(r, scale, step)


MAX_ID_LENGTH = 255  # users.external_id and items.external_id are VARCHAR(255)


def id_problem(external_id: str, what: str = "user") -> str | None:
    """Why ``external_id`` cannot be a ``what``'s ("user", "item") id, else None: the one rule on every
    backend (at most ``MAX_ID_LENGTH`` characters, no NUL: PostgreSQL refuses both, and SQLite must not
    take them; not ``.`` or ``..``, which no URL path can name: a browser or client resolves them away;
    no line break, which no route of the HTTP API matches)."""
    if external_id in (".", ".."):
        where = "/items/" if what == "item" else "/users/"
        return f"is {external_id!r}, which a URL cannot name ({where}{external_id}/… is read as another path)"
    if len(external_id) > MAX_ID_LENGTH:
        return f"is {len(external_id)} characters long (at most {MAX_ID_LENGTH})"
    if "\x00" in external_id:
        return "contains a NUL character"
    if "\n" in external_id or "\r" in external_id:
        return "contains a line break (no URL path can hold one)"
    return None


def can_exist(external_id: str) -> bool:
    """Whether a user or item may have ``external_id``: one that cannot is unknown without asking the
    database (PostgreSQL refuses a NUL even in a query)."""
    return id_problem(external_id) is None


def shown_id(external_id: str) -> str:
    """An id for a one-line message: quoted (a NUL or line break escaped), a long one cut short."""
    return repr(external_id if len(external_id) <= 40 else external_id[:20] + "...")  # (a list from JSON too)


def check_id(external_id: str, what: str = "id", *, source: str | None = None, line: int | None = None,
             field: str | None = None) -> None:
    """Raise ``InputError`` (naming ``source``, ``line`` and ``field``) when ``external_id`` cannot be
    a ``what`` ("user", "item") id (``id_problem``)."""
    problem = id_problem(external_id, what)
    if problem is not None:
        raise InputError(f"{what} id {shown_id(external_id)} {problem}", source=source, line=line, field=field)


def first_bad_id(external_ids: list[str]) -> int | None:
    """The position of the first id that cannot be a user's or item's (``id_problem``), else None;
    quick when every one can (a million ids in about 40 ms)."""
    joined = "".join(external_ids)
    if not external_ids or (max(map(len, external_ids)) <= MAX_ID_LENGTH and "\x00" not in joined
                            and "\n" not in joined and "\r" not in joined
                            and "." not in external_ids and ".." not in external_ids):
        return None
    return next(k for k, e in enumerate(external_ids) if id_problem(e) is not None)


def id_map(conn: Connection, table) -> dict[str, int]:  # noqa: ANN001
    """external id -> database id for users or items."""
    cursor = conn.connection.driver_connection.cursor()  # no Row objects for a million ids
    try:
        cursor.execute(f"SELECT external_id, id FROM {table.__tablename__}")
        return dict(cursor.fetchall())
    finally:
        cursor.close()


def ensure_ids(conn: Connection, table, external_ids, extra: dict[str, list] | None = None,
               update_cols: tuple[str, ...] = ()) -> dict[str, int]:
    """Insert the external ids that are missing (with optional extra columns), numbered in the order
    given; return the id map.

    Columns in ``update_cols`` are overwritten for ids that already exist. An id that cannot be one
    (``id_problem``) is an ``InputError``, before anything is written (callers that know the ids' file
    lines check them first, to name the line)."""
    external_ids = [str(x) for x in external_ids]
    bad = first_bad_id(external_ids)
    if bad is not None:
        check_id(external_ids[bad], table.__tablename__[:-1])
    if extra:
        rows = [{"external_id": e, **{k: v[i] for k, v in extra.items()}} for i, e in enumerate(external_ids)]
        _upsert(conn, table.__table__, rows, ["external_id"], list(update_cols))
    else:
        known = id_map(conn, table)
        # numbered in the order given (a release's order of first appearance, not the ids' text order):
        # ratings sorted by user then item then come in key order (see ``write_ratings``)
        new = [e for e in dict.fromkeys(external_ids) if e not in known]
        # the columns' defaults, made and converted for the driver once for all rows
        defaults = {"attributes": {}, "created_at": utcnow()}
        columns = [c for c in table.__table__.columns if c.name in defaults]
        values = []
        for c in columns:
            to_driver = c.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
            values.append(to_driver(defaults[c.name]) if to_driver else defaults[c.name])
        _insert(conn, table.__tablename__, ["external_id", *(c.name for c in columns)], len(new),
                lambda rows: [x for e in new[rows] for x in (e, *values)])
    return id_map(conn, table)


def count_rows(conn: Connection, table) -> int:  # noqa: ANN001
    return int(conn.scalar(select(func.count()).select_from(table)))


def next_seq(conn: Connection) -> int:
    return int(conn.scalar(select(func.coalesce(func.max(Rating.seq), 0)))) + 1


def write_ratings(conn: Connection, users, items, ratings, timestamps, progress=None) -> int:  # noqa: ANN001
    """Upsert ratings by database ids; returns how many pairs were written.

    A pair given twice keeps its row with the latest timestamp (a row with one over a row without; the
    last of those rows), and seq numbers the kept rows in the given order. Rows go in (user, item)
    order, many to a statement (see ``_insert``; on PostgreSQL from ``PG_COPY_ROWS`` rows through
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
    keep = latest_per_pair(u, i)
    if len(keep) < len(u) and not missing.all():  # a pair given twice: its row with the latest time wins
        keep = latest_per_pair(u, i, np.where(missing, np.iinfo(np.int64).min, ts))
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

    _insert(conn, "ratings", ["user_id", "item_id", "rating", "timestamp", "seq"], len(keep), params, upsert,
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


def _insert(conn: Connection, table: str, columns: list[str], n: int, params: Callable[[slice], list],
            suffix: str = "", progress=None) -> None:  # noqa: ANN001
    """INSERT ``n`` rows into ``table``, as many to a multi-row ``VALUES`` statement as the driver may
    bind (binding a statement's parameters in C is several times faster than ``executemany``'s
    row by row): ``params(rows)`` gives the flat parameters of a slice of the rows; ``suffix`` ends
    each statement (ON CONFLICT …); ``progress(k)`` follows each statement of ``k`` rows.

    The next statement's parameters are made in a second thread while the database runs the current
    one (the driver lets go of the GIL while the statement runs): on 2 cores a large ingest's
    parameter lists then cost almost nothing. One statement (a rating, a sign-up) needs no thread:
    starting one cost more than the statement (py-spy: about half of a rating's time in the server)."""
    mark = "%s" if conn.dialect.name == "postgresql" else "?"
    row = f"({', '.join([mark] * len(columns))})"
    head = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
    per_statement = max_parameters(conn) // len(columns)
    slices = [slice(start, min(n, start + per_statement)) for start in range(0, n, per_statement)]
    statements: dict[int, str] = {}
    cursor = conn.connection.driver_connection.cursor()

    def execute(rows: slice, values: list) -> None:
        count = rows.stop - rows.start
        if count not in statements:
            statements[count] = f"{head}{', '.join([row] * count)} {suffix}"
        cursor.execute(statements[count], values)
        if progress:
            progress(count)

    try:
        if len(slices) <= 1:
            for rows in slices:
                execute(rows, params(rows))
            return
        with ThreadPoolExecutor(max_workers=1) as ahead:
            upcoming = ahead.submit(params, slices[0])
            for k, rows in enumerate(slices):
                values = upcoming.result()
                upcoming = ahead.submit(params, slices[k + 1]) if k + 1 < len(slices) else None
                execute(rows, values)
    finally:
        cursor.close()


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


def max_parameters(conn: Connection) -> int:
    """How many bound parameters one statement may hold (SQLite's compile-time limit; psycopg's 65535)."""
    if conn.dialect.name == "postgresql":
        return 65_535
    getlimit = getattr(conn.connection.driver_connection, "getlimit", None)  # Python 3.11+
    return getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if getlimit else 999


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


def user_id_of(conn: Connection, external_id: str) -> int:
    """The database id of a user (the external id as written, surrounding spaces aside, as every reader
    strips them); one that no user can have (``can_exist``) is unknown without a query."""
    key = str(external_id).strip()
    if not key:  # (as `cfb onboard` and an item say it)
        raise CfbError("empty user id", field="user")
    uid = conn.scalar(select(User.id).where(User.external_id == key)) if can_exist(key) else None
    if uid is None:
        raise UnknownIdError(f"unknown user {shown_id(str(external_id))}", field="user")
    return uid


def item_titles(conn: Connection, item_ids) -> dict[int, tuple[str, str | None]]:
    """database id -> (external id, title)."""
    ids = [int(i) for i in item_ids]
    out = {}
    for start in range(0, len(ids), 900):
        for row in conn.execute(select(Item.id, Item.external_id, Item.title).where(Item.id.in_(ids[start:start + 900]))):
            out[row[0]] = (row[1], row[2])
    return out


def item_title_list(conn: Connection) -> list[str]:
    """Every item's title (items without one left out), in item order (the same on every backend: a
    hint's titles are the first close ones): what a near-miss title is matched against."""
    return conn.scalars(select(Item.title).where(Item.title.is_not(None)).order_by(Item.id)).all()


def items_by_title(conn: Connection) -> dict[str, list[str]]:
    """title -> the external ids of the items so titled (sorted), titles in item order."""
    out: dict[str, list[str]] = {}
    for ext, title in conn.execute(select(Item.external_id, Item.title).where(Item.title.is_not(None))
                                   .order_by(Item.id)):
        out.setdefault(title, []).append(ext)
    return {t: sorted(ids) for t, ids in out.items()}


def has_rating_history(conn: Connection) -> bool:
    """Whether the ratings table records what each row replaced (``prev_rating``/``prev_seq``; a
    database made before them gets them from its next writer)."""
    url = str(conn.engine.url)
    if url not in _HAVE_HISTORY and _has_history_columns(conn):
        _HAVE_HISTORY.add(url)
    return url in _HAVE_HISTORY


def user_ratings_replaced(conn: Connection, user_id: int) -> tuple[np.ndarray, ...]:
    """(item ids, ratings, seq, prev_rating, prev_seq) of one user in write order (see
    ``users_ratings_replaced``)."""
    return users_ratings_replaced(conn, [user_id])[int(user_id)]


def items_rated_by(conn: Connection, user_ids, among: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """The item ids of ``among`` that any of ``user_ids`` has rated (sorted; a query per 900 users)."""
    among = np.unique(np.asarray(among, np.int64))
    ids = sorted({int(u) for u in user_ids})
    if not len(among) or not ids:
        return among[:0]
    found: set[int] = set()
    for start in range(0, len(ids), 900):
        found.update(conn.scalars(select(Rating.item_id).distinct().where(one_of(Rating.user_id, ids[start:start + 900]))))
    return among[np.isin(among, np.fromiter(found, np.int64, len(found)))]


def users_ratings_replaced(conn: Connection, user_ids) -> dict[int, tuple[np.ndarray, ...]]:  # noqa: ANN001
    """user id -> (item ids, ratings, seq, prev_rating, prev_seq) of each of ``user_ids`` in write order,
    a query per 900 users (NaN and -1 where a row replaced nothing, or the table does not record
    what it replaced)."""
    history = has_rating_history(conn)
    cols = [Rating.user_id, Rating.item_id, Rating.rating, Rating.seq] + \
        ([Rating.prev_rating, Rating.prev_seq] if history else [])
    ids = sorted({int(u) for u in user_ids})
    rows: list = []
    for start in range(0, len(ids), 900):
        rows += conn.execute(select(*cols).where(one_of(Rating.user_id, ids[start:start + 900]))
                             .order_by(Rating.user_id, Rating.seq)).all()
    users = np.array([r[0] for r in rows], np.int64)
    items = np.array([r[1] for r in rows], np.int64)
    ratings = np.array([r[2] for r in rows], np.float32)
    seq = np.array([r[3] for r in rows], np.int64)
    prev = np.array([np.nan if not history or r[4] is None else r[4] for r in rows], np.float64)
    prev_seq = np.array([-1 if not history or r[5] is None else r[5] for r in rows], np.int64)
    bounds = np.searchsorted(users, ids, side="left"), np.searchsorted(users, ids, side="right")
    return {u: tuple(a[lo:hi] for a in (items, ratings, seq, prev, prev_seq))
            for u, lo, hi in zip(ids, *bounds)}


def replaced_ratings_of(conn: Connection, user_id: int, max_seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item ids, seq, ratings) of the user's replaced rating rows with seq ≤ ``max_seq``, in seq order
    (none on a database whose next writer has yet to start the log)."""
    if not inspect(conn).has_table(ReplacedRating.__tablename__):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    rows = conn.execute(select(ReplacedRating.item_id, ReplacedRating.seq, ReplacedRating.rating)
                        .where(ReplacedRating.user_id == user_id, ReplacedRating.seq <= max_seq)
                        .order_by(ReplacedRating.seq)).all()
    return (np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.int64),
            np.array([r[2] for r in rows], np.float64))


def prune_replaced_ratings(conn: Connection) -> int:
    """Delete the replaced rating rows that no full version learned, and that none ever will; returns
    how many. A full version read every row up to its ``max_seq``, so of a pair's rows it learned the
    one with seq ≤ ``max_seq`` < the seq of the pair's next row (a later replaced row, or the current
    rating); a replaced row is kept while some full version's ``max_seq`` lies in that span (a rollback
    may serve any version). Future full versions read from the current rows, so a row no version
    learned is never needed again. Call in the write transaction that stores a full version (the
    retrain lock keeps any other full retrain from being in flight)."""
    if not inspect(conn).has_table(ReplacedRating.__tablename__):
        return 0
    return conn.execute(text(
        "DELETE FROM replaced_ratings WHERE NOT EXISTS ("
        " SELECT 1 FROM model_versions v WHERE v.mode = 'full' AND v.max_seq >= replaced_ratings.seq"
        " AND v.max_seq < COALESCE("
        "  (SELECT MIN(n.seq) FROM replaced_ratings n WHERE n.user_id = replaced_ratings.user_id"
        "   AND n.item_id = replaced_ratings.item_id AND n.seq > replaced_ratings.seq),"
        "  (SELECT r.seq FROM ratings r WHERE r.user_id = replaced_ratings.user_id"
        "   AND r.item_id = replaced_ratings.item_id),"
        "  9223372036854775807))")).rowcount


def item_ratings(conn: Connection, item_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, ratings) of one item."""
    rows = conn.execute(select(Rating.user_id, Rating.rating).where(Rating.item_id == item_id)
                        .order_by(Rating.seq)).all()
    return np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.float32)


def count_ratings(conn: Connection, since_seq: int = 0) -> int:
    return int(conn.scalar(select(func.count()).select_from(Rating).where(Rating.seq > since_seq)))


def users_attributes_of(conn: Connection, user_ids) -> dict[int, dict]:  # noqa: ANN001
    """user id -> attributes ({} for none) of each of ``user_ids``, a query per 900 users."""
    ids = sorted({int(u) for u in user_ids})
    found: dict[int, dict] = {}
    for start in range(0, len(ids), 900):
        found.update(conn.execute(select(User.id, User.attributes).where(one_of(User.id, ids[start:start + 900]))).all())
    return {u: found.get(u) or {} for u in ids}


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


def totals_since(conn: Connection, new: RatingsArrays, since_seq: int, item_ids: np.ndarray,
                 counts: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(number of ratings, sum of ratings) of each of ``item_ids`` after ``new`` (the ratings with seq
    > ``since_seq``, read ``with_replaced``), given their ``counts`` and ``sums`` at ``since_seq``.

    A pair's first rating adds one rating; a rating that replaced a row of seq ≤ ``since_seq`` swaps
    that row's value for its own. Only an item where that is unknown (a pair rated again twice since
    ``since_seq``, or a row written before the table recorded what it replaced) is re-read from the
    table, so the work follows the new ratings, not the items' popularity."""
    item_ids = np.asarray(item_ids, np.int64)
    counts, sums = np.array(counts, np.float64), np.array(sums, np.float64)
    at = np.searchsorted(item_ids, new.item_id)  # item_ids sorted and holding every new rating's item
    tracked = new.seq >= int(get_setting(conn, HISTORY_FROM_KEY) or 0)
    first = tracked & (new.prev_seq < 0)
    swapped = (new.prev_seq >= 0) & (new.prev_seq <= since_seq)
    np.add.at(counts, at[first], 1.0)
    r, before = new.rating.astype(np.float64), new.prev_rating.astype(np.float64)  # (as a full retrain sums them)
    np.add.at(sums, at, np.where(first, r, 0.0) + np.where(swapped, r - before, 0.0))
    unknown = np.unique(at[~(first | swapped)])
    if len(unknown):
        counts[unknown], sums[unknown] = item_totals(conn, item_ids[unknown])
    return counts, sums


def all_item_ids(conn: Connection) -> np.ndarray:
    """Every item's database id (catalogue items with or without ratings)."""
    cursor = conn.connection.driver_connection.cursor()  # plain tuples: 59k ids in a few ms
    try:
        rows = cursor.execute("SELECT id FROM items ORDER BY id").fetchall()
    finally:
        cursor.close()
    return np.fromiter((r[0] for r in rows), np.int64, len(rows))


def item_attributes(conn: Connection, item_ids=None) -> dict[int, dict]:  # noqa: ANN001
    """database id -> item metadata (all items, or ``item_ids``: 10,000 to a query, as PostgreSQL takes
    at most 65,535 parameters)."""
    stmt = select(Item.id, Item.attributes)
    if item_ids is None:
        return {i: a or {} for i, a in conn.execute(stmt).all()}
    ids = [int(i) for i in item_ids]
    out: dict[int, dict] = {}
    for start in range(0, len(ids), 10_000):
        out.update({i: a or {} for i, a in conn.execute(stmt.where(Item.id.in_(ids[start:start + 10_000]))).all()})
    return out

