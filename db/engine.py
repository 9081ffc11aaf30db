"""Database URL resolution and engine creation (SQLite in WAL mode by default)."""
from __future__ import annotations

import glob
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text

from ..cf_core.errors import BusyError, CfbError, NotReadyError

BUSY_TIMEOUT_MS = 30_000  # SQLite: how long a connection waits for another's lock
T = TypeVar("T")
_HOST = socket.gethostname().replace(".", "-").replace("/", "-") or "host"  # (in partial files' names)
WRITE_OPTION = "cfb_write"  # execution option: this connection's transactions write (see ``writing``)


def cfb_home() -> Path:
    """The folder for cfb's default database and caches (``$CFB_HOME``, default ``~/.cfb``)."""
    return Path(os.environ.get("CFB_HOME") or Path.home() / ".cfb")


# a known backend's name (and driver), then a colon or "//": the start of a database URL, never a file's path
_BACKEND_COLON = re.compile(r"(?i)(sqlite|postgresql|postgres|mysql|mariadb|oracle|mssql)(\+\w+)?(:|//)")


def hidden_password(url: str) -> str:
    """``url`` as it may be shown: its password (between the user's ``:`` and the last ``@`` before the
    host's path, or a ``password=`` query value) written ``***``."""
    url = re.sub(r"^([^:/]*:?/*[^:/@]*:)[^/]*@", r"\1***@", str(url))
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", url)


def resolve_url(url: str | None = None) -> str:
    """The database URL: the explicit one, else ``$CFB_DATABASE_URL``, else SQLite in ``cfb_home()``.
    A value without ``://`` is a SQLite file's path (``--db ratings.db``). A SQLite file named relative
    to the working directory (``sqlite:///cfb.db``) is made absolute: a handle keeps the file it opened."""
    url = url or os.environ.get("CFB_DATABASE_URL")
    if url and "://" not in url and _BACKEND_COLON.match(url):
        raise CfbError(f"invalid database URL {hidden_password(url)}: expected backend://… (e.g. postgresql+psycopg://user@host/db, "
                       "sqlite:///path; a SQLite file's path is given without a scheme)")
    if url and "://" in url:  # a URL's scheme is case-insensitive (POSTGRESQL://); SQLAlchemy's names are lower case
        scheme, rest = url.split("://", 1)
        url = f"{scheme.lower()}://{rest}"
        parsed = parse_url(url) if scheme.lower().startswith("sqlite") else None
        if parsed is not None and parsed.database and parsed.database != ":memory:" and \
                not parsed.query.get("uri") and not os.path.isabs(parsed.database):
            return parsed.set(database=os.path.abspath(parsed.database)).render_as_string(hide_password=False)
        return url
    if url:
        return sqlite_url(Path(url).expanduser().absolute())
    return sqlite_url(cfb_home() / "cfb.db")


def _make_home_for(path: Path | None) -> None:
    """cfb's own folder, made when a database is first written in it (the default database): a command
    that only reads, and fails for want of a database, leaves no folder behind."""
    home = cfb_home()
    if path is None or path.parent != home or home.is_dir():
        return
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CfbError(f"cannot create cfb's folder {home} ({e.strerror or e}): set CFB_HOME to a writable "
                       "folder, or give --db") from None


EMPTY_DATABASE = "the database holds no cfb data yet: run `cfb ingest …` first"


def is_missing_table(e: BaseException) -> bool:
    """Whether a database error says a table is missing: a database cfb has not written to yet."""
    msg = str(getattr(e, "orig", None) or e)
    return "no such table" in msg or ("relation" in msg and "does not exist" in msg)


BUSY = "the database is busy with another writer (an ingest or a retrain's save): try again shortly"
NO_FREE_CONNECTION = ("every database connection of this process is in use (threads sharing one cfb.open): try "
                      "again shortly")


def database_error(e: BaseException, url: str | None = None) -> CfbError | None:
    """The one-line ``CfbError`` for a database URL's or driver's error (a bad URL, a server that
    refuses, a file that is not a database, …), else None. With the database's ``url``, a SQLite
    file's error names the file (SQLite's messages never do; a server's name its database)."""
    from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    if isinstance(e, (ArgumentError, NoSuchModuleError)):
        return CfbError(f"invalid database URL: {str(e).splitlines()[0]}")
    if isinstance(e, PoolTimeoutError):  # every pooled connection in use past the wait (threads sharing a cfb.open)
        return BusyError(NO_FREE_CONNECTION)
    if not isinstance(e, (DatabaseError, sqlite3.DatabaseError)):  # (SQLAlchemy's, or the SQLite driver's own)
        return None
    msg = (str(e.orig) if getattr(e, "orig", None) else str(e)).strip().splitlines()[0]
    if "connection failed" in msg:  # (PostgreSQL: e.g. the database itself does not exist)
        msg = msg.split("FATAL:")[-1].strip()
    elif is_missing_table(e):  # (a state, not a failure: said as every command says it)
        return NotReadyError(EMPTY_DATABASE)
    elif is_busy(e):
        return BusyError(BUSY)
    path = _sqlite_file_quietly(url)
    return CfbError(f"database error: {msg}" + (f" ({path})" if path else ""))


def _sqlite_file_quietly(url: str | None) -> Path | None:
    """``sqlite_file(url)``, None for no URL or one that does not parse."""
    try:
        return sqlite_file(url) if url else None
    except Exception:  # noqa: BLE001  (a message's detail: never an error of its own)
        return None


def is_busy(e: BaseException) -> bool:
    """Whether a database error says another connection held a lock past the wait (SQLite's busy
    timeout; PostgreSQL's lock timeout, where one is set)."""
    msg = str(getattr(e, "orig", None) or e)
    return "database is locked" in msg or "lock timeout" in msg


def sqlite_url(path: Path, like: str | None = None) -> str:
    """The URL of the SQLite file ``path`` (a ``?`` or ``%`` in its name escaped), with the options of
    the URL ``like`` when given."""
    from sqlalchemy.engine import URL

    base = parse_url(like) if like else URL.create("sqlite")
    return base.set(database=str(path)).render_as_string(hide_password=False)


def made_whole(url: str | None, write: Callable[[str], T]) -> T:
    """``write(url)`` (which must dispose of its engines before it returns), where a SQLite file that is
    not there yet is made whole or not at all: ``write`` gets a temporary file beside it, linked into
    place when ``write`` returns, so a failed first ingest leaves no database behind (a linked file
    never replaces one another process made meanwhile: ``write`` then runs again, into that one)."""
    url = resolve_url(url)
    path = sqlite_file(url)
    _refuse_a_folder(path)
    _make_home_for(path)
    if path is not None and not path.parent.is_dir():
        raise CfbError(f"no folder {path.parent} to make the database {path.name} in")
    if path is not None:  # (one killed just after linking its file into place leaves it beside the database)
        _remove_dead_partials(path)
    if path is None or path.exists():
        return write(url)
    # unique to this call: another thread of this process, or a process of another machine sharing the folder
    partial = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        out = write(sqlite_url(partial.absolute(), like=url))
        _remove_orphan_sidecars(path)
        try:
            os.link(partial, path)  # (fails where a file is there: never replaces one)
        except FileExistsError:
            return write(url)
        except OSError:  # a file system without hard links
            if path.exists():
                return write(url)
            os.replace(partial, path)
        return out
    finally:
        for leftover in (partial, *(partial.with_name(partial.name + end) for end in SIDECARS)):
            leftover.unlink(missing_ok=True)


SIDECARS = ("-wal", "-shm", "-journal")  # the files SQLite keeps beside a database


def _remove_orphan_sidecars(path: Path) -> None:
    """The write-ahead log, shared-memory index and journal at ``path`` where no database file is: a
    database deleted while a connection (a server's) held it open leaves them there, and SQLite would
    read them into the next database made at the path (the deleted one's pages in it, the file
    malformed). The connections that hold them keep their own files. (Between the look and the unlinks
    another process could link a first database of its own into place and start its log: microseconds,
    and a first ingest racing another into one path is refused or merged by ``made_whole`` anyway.)"""
    if not path.exists():
        for end in SIDECARS:
            path.with_name(path.name + end).unlink(missing_ok=True)


STALE_PARTIAL_S = 24 * 3600  # another machine's partial file untouched this long: its ingest was killed


def _remove_dead_partials(path: Path) -> None:
    """The partial files (``made_whole``) of first ingests into ``path`` that were killed: on this
    machine, those whose process is gone; of another machine (a container run before), those untouched
    for ``STALE_PARTIAL_S`` (a running ingest writes its file all along)."""
    mine = f".{path.name}.{_HOST}."
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.partial*"):
        if leftover.name.startswith(mine):
            pid = leftover.name[len(mine):].split(".")[0]
            dead = pid.isdigit() and not process_alive(int(pid))
        else:
            try:
                dead = time.time() - leftover.stat().st_mtime > STALE_PARTIAL_S
            except OSError:
                continue
        if dead:
            try:
                leftover.unlink(missing_ok=True)
            except OSError:  # (another user's, in a shared folder: theirs to remove)
                pass


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running. A zombie (killed, its parent has not yet
    reaped it) is not: it holds nothing and will never run again."""
    if pid <= 0:  # (os.kill would signal a process group, or every process)
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (no such process; no pid this machine can have)
        return False
    except OSError:  # (alive, another user's)
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:  # "pid (name) state ...": Linux's; elsewhere no such file
            return f.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:
        return True


def parse_url(url: str):  # noqa: ANN201  (-> sqlalchemy.engine.URL)
    """``url`` parsed by SQLAlchemy; a URL whose parts do not parse (a port that is no number, an
    unclosed ``[`` of an IPv6 host: SQLAlchemy raises a bare ValueError) is a one-line ``CfbError``
    with its password hidden. (A URL of no known form is SQLAlchemy's ArgumentError, ``database_error``'s.)"""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url)
    except ValueError as e:
        raise CfbError(f"invalid database URL {hidden_password(url)}: {e}") from None


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None: another backend, or an in-memory database)."""
    u = parse_url(url)
    if u.get_backend_name().lower() != "sqlite" or u.database in (None, "", ":memory:") \
            or u.database.startswith("file:"):
        return None
    return Path(u.database)


def in_memory_sqlite(url: str) -> bool:
    """Whether ``url`` names an in-memory SQLite database (``sqlite://``, ``:memory:``, a ``file:``
    URI of one): gone when the process ends. A URL that does not parse is not one (it fails later)."""
    from sqlalchemy.exc import ArgumentError

    try:
        u = parse_url(url)
    except (ArgumentError, CfbError):
        return False
    if u.get_backend_name().lower() != "sqlite":
        return False
    where = u.database or ""
    if u.query.get("uri") == "true" and where.startswith("file:"):  # (a URI only with uri=true)
        path, fragment = where[len("file:"):].partition("#")[::2]
        query = {} if fragment else u.query  # (after a '#' the parameters are the fragment's)
        return path.partition("?")[0] in ("", ":memory:") or query.get("mode") == "memory" \
            or query.get("vfs") == "memdb"
    return where in ("", ":memory:")


def _sqlite_pragmas(dbapi_conn, foreign_keys: bool) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA page_size=16384")  # a new database only (before WAL): fewer, fuller b-tree pages
    _set_wal(cur)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.close()


def _set_wal(cur: sqlite3.Cursor) -> None:
    """``journal_mode=WAL``. SQLite refuses the switch at once, without its busy timeout, while
    another connection holds the database in a rollback journal (a first load, see ``writing``): try
    again until the busy timeout, as any other wait for a lock."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


WAIT_SLICE_MS = 200  # a writer waits for SQLite's lock in slices this long (see ``_sqlite_begin``)


def _sqlite_begin(conn: Connection) -> None:
    """BEGIN (a read) or BEGIN IMMEDIATE (``writing``). A writer waits for the lock in slices of
    ``WAIT_SLICE_MS`` up to the connection's busy timeout, not in one call: SQLite waits in C, where
    Python's signal handlers cannot run, so a command queued behind another writer ignored Ctrl-C and
    SIGTERM until the lock came or the 30 s ran out."""
    if not conn.get_execution_options().get(WRITE_OPTION):
        conn.exec_driver_sql("BEGIN")
        return
    raw = conn.connection.driver_connection
    allowed = int(raw.execute("PRAGMA busy_timeout").fetchone()[0])  # (``writing``'s wait, or the busy timeout)
    deadline = time.monotonic() + allowed / 1000
    try:
        while (left := int((deadline - time.monotonic()) * 1000)) > WAIT_SLICE_MS:
            raw.execute(f"PRAGMA busy_timeout={WAIT_SLICE_MS}")
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.Error as e:
                if "locked" not in str(e):
                    break  # (not a wait: raised below as the engine raises any error, SQLAlchemy's)
        raw.execute(f"PRAGMA busy_timeout={max(1, left)}")
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # the last slice: its error the engine's own (busy: ``is_busy``)
    finally:
        raw.execute(f"PRAGMA busy_timeout={allowed}")


# A process that runs many writes at once (the HTTP server) sets a semaphore here for the thread of each
# write: ``writing`` takes one of its turns before it takes a pooled connection, so at most that many
# writes hold a connection while they wait for the database's writer (the pool stays for the reads); the
# wait for a turn counts in the busy timeout, and the wait for the writer gets only what is left of it.
WRITE_TURNS: ContextVar[threading.BoundedSemaphore | None] = ContextVar("cfb_write_turns", default=None)


@contextmanager
def writing(engine: Engine, first_load: bool = False) -> Iterator[Connection]:
    """A connection in a write transaction, committed on success, rolled back on error.

    Use it instead of ``engine.begin()`` for every transaction that writes: on SQLite it starts with
    ``BEGIN IMMEDIATE`` (writers queue on the busy timeout instead of failing when a deferred
    transaction tries to upgrade its read lock); on PostgreSQL it takes an advisory lock first
    (``lock_writers``), to the same effect.
    Reads through ``engine.connect()`` keep a deferred BEGIN, so readers never wait (WAL).

    ``first_load`` (a first large ingest): on SQLite, when no other connection has the database
    open, the transaction goes through a rollback journal instead of the write-ahead log (see
    ``_rollback_journal``): its pages are written once, not to the log and then again by the
    checkpoint after the commit. It is as atomic; other processes wait for it, as they would for
    any writer, instead of reading beside it.

    Where ``WRITE_TURNS`` holds a semaphore (the HTTP server's writes), a turn in it is taken first,
    within the busy timeout, and the wait for the database's writer gets what is left of it."""
    turns = WRITE_TURNS.get()
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    if turns is not None and not turns.acquire(timeout=BUSY_TIMEOUT_MS / 1000):
        raise BusyError(BUSY)
    try:
        # a turn's wait counts in the busy timeout: the wait for the writer gets what is left of it
        wait_ms = None if turns is None else max(1, int((deadline - time.monotonic()) * 1000))
        with engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})  # in place, for this Connection only
            with _rollback_journal(conn, first_load and conn.dialect.name == "sqlite"), \
                    _sqlite_busy_timeout(conn, wait_ms):
                with conn.begin():
                    lock_writers(conn, wait_ms)
                    yield conn
    finally:
        if turns is not None:
            turns.release()


@contextmanager
def _sqlite_busy_timeout(conn: Connection, wait_ms: int | None) -> Iterator[None]:
    """Within: this SQLite connection waits at most ``wait_ms`` (when given) for a lock; the busy
    timeout again after (unless the connection was closed meanwhile: an exit on a signal)."""
    raw = conn.connection.driver_connection if conn.dialect.name == "sqlite" and wait_ms is not None else None
    if raw is not None:
        raw.execute(f"PRAGMA busy_timeout={wait_ms}")
    try:
        yield
    finally:
        if raw is not None:
            try:
                raw.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            except sqlite3.Error:
                pass


# pg_advisory_xact_lock key serialising writers on PostgreSQL (any constant bigint; the lock is per database)
WRITERS_LOCK_KEY = 0x63666272617465  # "cfbrate"


def lock_writers(conn: Connection, wait_ms: int | None = None) -> None:
    """Hold, until this transaction ends, the right to write (PostgreSQL; re-entrant): what SQLite's
    ``BEGIN IMMEDIATE`` gives every transaction of ``writing``.

    Writers read before they write (a rating's seq is max(seq)+1, an anonymous sign-up's id the first
    free ``new-N``, a first rating of a new item looks the item up before adding it), so they must not
    overlap: with the lock taken first, each sees the previous one's committed rows, and seq order is
    commit order (an incremental retrain reading ``seq > max_seq`` then misses nothing). A writer waits
    for the lock, and for any other in its transaction, at most ``BUSY_TIMEOUT_MS`` (as SQLite's busy
    timeout; ``wait_ms`` when given), then fails as busy (``is_busy``: a 503 over HTTP) instead of
    holding a pooled connection on."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SET LOCAL lock_timeout = {int(BUSY_TIMEOUT_MS if wait_ms is None else wait_ms)}"))
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITERS_LOCK_KEY})


@contextmanager
def _rollback_journal(conn: Connection, wanted: bool) -> Iterator[None]:
    """Within: this SQLite connection's database in ``journal_mode=DELETE`` with ``synchronous=FULL``
    (every commit durable, a crash rolled back from the journal by the next connection) and
    multi-threaded sorting for index builds; WAL again after. Nothing changes when the switch is
    refused at once (another connection has the database open: leaving WAL needs it alone). Within,
    other connections wait for the transaction (``_set_wal``), and its COMMIT waits for readers."""
    raw = conn.connection.driver_connection if wanted else None
    switched = False
    if raw is not None:
        raw.execute("PRAGMA busy_timeout=0")
        try:
            switched = raw.execute("PRAGMA journal_mode=DELETE").fetchone()[0].lower() == "delete"
        except sqlite3.OperationalError:  # database is locked: it stays in WAL
            pass
        finally:
            raw.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    if switched:
        raw.execute("PRAGMA synchronous=FULL")
        raw.execute("PRAGMA threads=2")
    try:
        yield
    finally:
        if switched:
            try:
                if raw.in_transaction:  # its COMMIT failed (a reader kept its lock past the busy timeout)
                    raw.execute("ROLLBACK")
                raw.execute("PRAGMA threads=0")
                raw.execute("PRAGMA journal_mode=WAL")
                raw.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error:  # (a reader still holds the database) this connection is dropped,
                conn.invalidate()  # and the next one sets WAL when it connects (``_set_wal``)


def _refuse_a_folder(path: Path | None) -> None:
    if path is not None and path.is_dir():
        raise CfbError(f"{path} is a folder, not a database file")


def require_database(url: str) -> None:
    """A SQLite file that is not there (or is empty) is an error, not a new empty database (what only
    reads or serves: a mistyped path makes no file, an empty one stays empty; an ingest makes a database)."""
    path = sqlite_file(url)
    _refuse_a_folder(path)
    if path is not None:
        _remove_dead_partials(path)  # (a killed first ingest's: whoever next looks for the database)
    if path is not None and (not path.exists() or path.stat().st_size == 0):
        empty = " (an empty file)" if path.exists() else ""  # (reading it would write a database's header into it)
        raise CfbError(f"no database at {path}{empty}: `cfb ingest …` makes one (or check --db / CFB_DATABASE_URL, "
                       "or the URL given to cfb.open)")


def make_engine(url: str | None = None, bulk: bool = False, must_exist: bool = False) -> Engine:
    """Create an engine for ``url`` (see ``resolve_url``); SQLite gets WAL mode and a busy timeout.

    ``must_exist``: a SQLite file that is not there is an error, not a new empty database (commands
    that only read or serve: a mistyped path makes no file).

    ``bulk`` (for ingests): SQLite does not check the foreign keys row by row; ``ratings_io.write_ratings``
    then checks every user and item id it writes at once (the row-by-row checks took about 40% of
    a large ingest's insert time)."""
    url = resolve_url(url)
    if must_exist:
        require_database(url)
    else:
        _make_home_for(sqlite_file(url))
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", lambda dbapi_conn, _record: _sqlite_pragmas(dbapi_conn, not bulk))
        # pysqlite's own transaction handling defers BEGIN; emit it ourselves so that a
        # write transaction is one unit (SQLAlchemy's documented recipe). Writers (``writing``)
        # take the write lock up front with BEGIN IMMEDIATE, so a second writer waits in
        # busy_timeout instead of failing with "database is locked" when it first writes.
        event.listen(engine, "begin", _sqlite_begin)

        @event.listens_for(engine, "connect")
        def _no_autobegin(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None

        return engine
    scheme = url.split(":", 1)[0]
    if scheme.lower().split("+")[0] == "postgres":  # (the short form some hosts print; SQLAlchemy has the long one)
        raise CfbError(f"invalid database URL: {scheme}:// is written postgresql+psycopg:// here (psycopg 3, the "
                       "driver `pip install 'cfb[postgres]'` installs)")
    try:
        return create_engine(url, pool_pre_ping=True)
    except ModuleNotFoundError as e:  # (psycopg2: what postgresql:// means to SQLAlchemy before 2.1)
        advice = ("use postgresql+psycopg:// (psycopg 3, what pip install 'cfb[postgres]' installs)"
                  if e.name == "psycopg2" else "for PostgreSQL: pip install 'cfb[postgres]'")
        raise CfbError(f"the database driver for {scheme} is not installed ({e.name}); {advice}") from None
