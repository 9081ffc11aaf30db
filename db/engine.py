"""Database URL resolution and engine creation (SQLite in WAL mode by default)."""
from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event

from ..cf_core.errors import CfbError


def cfb_home() -> Path:
    """The folder for cfb's default database and caches (``$CFB_HOME``, default ``~/.cfb``)."""
    return Path(os.environ.get("CFB_HOME") or Path.home() / ".cfb")


def resolve_url(url: str | None = None) -> str:
    """The database URL: the explicit one, else ``$CFB_DATABASE_URL``, else SQLite in ``cfb_home()``."""
    if url:
        return url
    if os.environ.get("CFB_DATABASE_URL"):
        return os.environ["CFB_DATABASE_URL"]
    home = cfb_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'cfb.db'}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str | None = None) -> Engine:
    """Create an engine for ``url`` (see ``resolve_url``); SQLite gets WAL mode and a busy timeout."""
    url = resolve_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; emit it ourselves so that a
        # write transaction is one unit (SQLAlchemy's documented recipe).
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))

        @event.listens_for(engine, "connect")
        def _no_autobegin(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None

        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except ModuleNotFoundError as e:
        raise CfbError(f"the database driver for {url.split(':', 1)[0]} is not installed ({e.name}); "
                       "for PostgreSQL: pip install 'cfb[postgres]'") from None
