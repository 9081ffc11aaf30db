"""Reads and writes of users, items, settings and single ratings (transactional, SQLite or PostgreSQL);
the ratings table in bulk is ``ratings_io``'s."""
from __future__ import annotations

import re
import sqlite3
import unicodedata
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import Connection, Engine, bindparam, func, inspect, select, text

from ..cf_core.errors import CfbError, InputError, NotReadyError, UnknownIdError, argument_error
from .engine import EMPTY_DATABASE, lock_writers, writing
from .schema import REPLACED_RATING_TRIGGER, Base, Item, Rating, ReplacedRating, Setting, User, utcnow

if TYPE_CHECKING:
    from .ratings_io import RatingsArrays

CHUNK = 20_000


HISTORY_FROM_KEY = "rating_history_from_seq"  # setting: the first seq whose row records what it replaced
_HAVE_HISTORY: set[str] = set()  # database URLs whose ratings table was found with prev_rating/prev_seq
_HAVE_LOG: set[str] = set()  # database URLs found with the replaced-rating log (table and trigger)
_HAVE_ASKED: set[str] = set()  # database URLs whose answers table was found with ``asked``


# columns of cfb's tables that a database made by an earlier cfb may lack (``create_schema`` adds them)
ADDED_LATER = {"ratings": {"prev_rating", "prev_seq"}, "answers": {"asked"}}


def others_tables(conn: Connection) -> str | None:
    """What shows that tables named as cfb's in this database were made by another program, else None:
    some of them where cfb's ratings table is not (cfb makes every table at once), or one that lacks a
    column cfb's has always had."""
    found = inspect(conn)
    present = sorted(set(found.get_table_names()) & set(Base.metadata.tables))
    if not present:
        return None
    if Rating.__tablename__ not in present:
        return f"tables named as cfb's that cfb did not make ({', '.join(present)})"
    for name in present:
        have = {c["name"] for c in found.get_columns(name)}
        lacking = sorted(set(Base.metadata.tables[name].columns.keys()) - ADDED_LATER.get(name, set()) - have)
        if lacking:
            return f"a table {name} that cfb did not make (it has no column {lacking[0]})"
    return None


def refuse_others_tables(conn: Connection) -> None:
    """Refuse (``CfbError``, one line) a database whose tables named as cfb's are another program's
    (``others_tables``): checked before cfb makes or changes a table there."""
    problem = others_tables(conn)
    if problem is not None:
        raise CfbError(f"this database holds {problem}: give cfb a database (or a PostgreSQL schema) of its own")


def upgrade_schema(engine: Engine) -> None:
    """``create_schema`` for a database cfb has written (one from an earlier cfb gets what it lacks);
    any other (tables of another program's, or none) is refused, as every reading command refuses it,
    and nothing is written into it."""
    if not inspect(engine).has_table(Rating.__tablename__):
        raise NotReadyError(EMPTY_DATABASE)
    create_schema(engine)


def schema_for_first_write(engine: Engine) -> bool:
    """Ready the schema for a write: True where the write must make the tables itself, in its own
    transaction (``create_tables``): a PostgreSQL database without cfb's ratings table, whose DDL then
    rolls back with a refused or killed first ingest, leaving the database as it was (a first SQLite
    file is made whole beside its path instead). Otherwise what is missing is made now
    (``create_schema``) and False. Another program's tables named as cfb's are refused first
    (``refuse_others_tables``)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            if not inspect(conn).has_table(Rating.__tablename__):
                refuse_others_tables(conn)
                return True
    create_schema(engine)
    return False


def create_tables(conn: Connection) -> None:
    """Every missing table (with the replaced-rating log's trigger), in the caller's write transaction."""
    Base.metadata.create_all(conn)


def create_schema(engine: Engine) -> None:
    """Create every table that is missing, and what tables made by an earlier cfb lack (the ratings
    table's replaced-value columns, the trigger that logs replaced rows, the answers' ``asked``)."""
    url = str(engine.url)
    upgraded = url in _HAVE_HISTORY and url in _HAVE_LOG and url in _HAVE_ASKED  # (found so before, this process)
    with engine.connect() as conn:  # (a database that has them all is not made to wait for another writer)
        missing = set(Base.metadata.tables) - set(inspect(conn).get_table_names())
        if missing or not upgraded:
            refuse_others_tables(conn)  # (before cfb makes or changes a table there)
    if missing:
        with writing(engine) as conn:  # one writer at a time makes them (two first ingests at once on PostgreSQL)
            create_tables(conn)
    if not upgraded:
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
    no line break, which no route of the HTTP API matches; not empty or blank)."""
    if not external_id.strip():
        return "is empty (or blank)"
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


_SPACE = re.compile(r"\s")


def first_bad_id(external_ids: list[str]) -> int | None:
    """The position of the first id that cannot be a user's or item's (``id_problem``), else None;
    quick when every one can (a million ids in about 0.1 s)."""
    joined = "".join(external_ids)
    if not external_ids or (max(map(len, external_ids)) <= MAX_ID_LENGTH and "\x00" not in joined
                            and "\n" not in joined and "\r" not in joined and "" not in external_ids
                            and (not _SPACE.search(joined) or all(map(str.strip, external_ids)))
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
        # an id given twice: its last row (numbered where it first came); stored ids are updated and new
        # ones inserted, not upserted: PostgreSQL draws a row id for every row an upsert tries, so a
        # re-ingest of every user would move the next row id (and the N of ``new-N``) past them all
        rows = {e: {"external_id": e, **{k: v[i] for k, v in extra.items()}} for i, e in enumerate(external_ids)}
        known = id_map(conn, table)
        _upsert(conn, table.__table__, [r for e, r in rows.items() if e not in known], ["external_id"], [])
        stored = [r for e, r in rows.items() if e in known]
        if stored and update_cols:
            t = table.__table__
            stmt = t.update().where(t.c.external_id == bindparam("_eid")).values({c: bindparam(c) for c in update_cols})
            for start in range(0, len(stored), CHUNK):
                conn.execute(stmt, [{"_eid": r["external_id"], **{c: r[c] for c in update_cols}}
                                    for r in stored[start:start + CHUNK]])
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
        insert_many(conn, table.__tablename__, ["external_id", *(c.name for c in columns)], len(new),
                lambda rows: [x for e in new[rows] for x in (e, *values)])
    return id_map(conn, table)


def insert_many(conn: Connection, table: str, columns: list[str], n: int, params: Callable[[slice], list],
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


def max_parameters(conn: Connection) -> int:
    """How many bound parameters one statement may hold (SQLite's compile-time limit; psycopg's 65535)."""
    if conn.dialect.name == "postgresql":
        return 65_535
    getlimit = getattr(conn.connection.driver_connection, "getlimit", None)  # Python 3.11+
    return getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if getlimit else 999


def count_rows(conn: Connection, table) -> int:  # noqa: ANN001
    return int(conn.scalar(select(func.count()).select_from(table)))


def next_seq(conn: Connection) -> int:
    return int(conn.scalar(select(func.coalesce(func.max(Rating.seq), 0)))) + 1


def user_key(external_id: str) -> str:
    """A user's external id as every reader looks it up (surrounding spaces aside); an empty one refused
    (as `cfb onboard` and an item say it)."""
    key = str(external_id).strip()
    if not key:
        raise argument_error("empty user id", "user")
    return key


def user_id_of(conn: Connection, external_id: str) -> int:
    """The database id of a user (``user_key``); one that no user can have (``can_exist``) is unknown
    without a query."""
    key = user_key(external_id)
    uid = conn.scalar(select(User.id).where(User.external_id == key)) if can_exist(key) else None
    if uid is None:
        raise UnknownIdError(f"unknown user {shown_id(str(external_id))}", field="user")
    return uid


def ratings_newest_first(conn: Connection, user_id: int, limit: int) -> tuple[list[dict], int]:
    """A user's latest ``limit`` ratings, newest first, as ``{"item", "title", "rating"}`` (the item's
    external id; the rating as it was typed, ``as_typed``: 0.3, not its float32 0.30000001), and how many
    ratings they have. Newest by the time each was given (a release's file is not in time order); the
    order written breaks ties, and a rating without a time counts as older than any with one."""
    rows = conn.execute(select(Item.external_id, Item.title, Rating.rating).join(Item, Item.id == Rating.item_id)
                        .where(Rating.user_id == user_id)
                        .order_by(Rating.timestamp.is_(None), Rating.timestamp.desc(), Rating.seq.desc())
                        .limit(limit)).all()
    count = conn.scalar(select(func.count()).select_from(Rating).where(Rating.user_id == user_id))
    return [{"item": ext, "title": title, "rating": float(as_typed(r))} for ext, title, r in rows], int(count)


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


def title_forms(query: str) -> list[str]:
    """``query`` and, where they differ, its Unicode composed (NFC) and decomposed (NFD) forms: the ways a
    title that looks the same may be typed (macOS writes NFD); an item titled in any of them is titled so."""
    forms = [query] if query.isascii() else [query, composed(query), unicodedata.normalize("NFD", query)]
    return list(dict.fromkeys(forms))


def composed(text: str) -> str:
    """``text`` in Unicode's composed form (NFC): two texts that look the same compare equal."""
    return text if text.isascii() else unicodedata.normalize("NFC", text)


def items_titled(query: str, titled: Callable[[str], Iterable[str]],
                 composed_titles: Callable[[], dict[str, list[str]]]) -> list[str]:
    """The external ids (sorted) of the items titled ``query``: in any of its forms (``title_forms``, each
    looked up by ``titled``), else, for a title an older cfb stored in neither form, in
    ``composed_titles()`` (``items_by_composed_title``: every title read, so only on a miss)."""
    hits = sorted({ext for title in title_forms(query) for ext in titled(title)})
    return hits or sorted(composed_titles().get(composed(query), []))


def items_by_composed_title(conn: Connection) -> dict[str, list[str]]:
    """``items_by_title`` keyed by each title's composed form (``composed``): the items a text names
    as a title, whichever Unicode form either was written in."""
    out: dict[str, list[str]] = {}
    for title, ids in items_by_title(conn).items():
        out[composed(title)] = sorted(out.get(composed(title), []) + ids)
    return out


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

