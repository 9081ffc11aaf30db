"""cfb: cold-start collaborative filtering, as a Python API for notebooks and scripts.

    >>> import cfb
    >>> db = cfb.open("sqlite:///cfb.db")           # the database the `cfb` CLI uses with --db
    >>> db.ingest_movielens("ml-100k")               # once: ratings, items, users
    >>> db.retrain(full=True)                        # a first model version, now serving
    >>> db.questionnaire(budget=10)                  # what a new user is asked
    >>> user = db.onboard({"answers": {"gender": "F"}, "ratings": {"50": 5, "181": 4}})
    >>> db.recommend(user, n=10)                     # a pandas DataFrame: item, title, score
    >>> db.rate(user, "Fargo (1996)", 5)             # counts at once, no retrain needed
    >>> db.similar("Star Wars (1977)", n=5)
    >>> db.pca(n=50, plot="map.png")                 # chapter 8's map of the item factors

Each method calls the same service function as the CLI command of the same name and returns what
its ``--json`` prints (tables as DataFrames; ``predict``: one predicted rating per pair, in their order).
Errors are ``cfb.CfbError`` with a one-line message; its kinds: ``cfb.InputError`` (bad input, an
unknown item among a sign-up's answers included; ``cfb.UserExistsError``, a sign-up under a taken id),
``cfb.UnknownIdError`` (no such user, item or model version as a call's argument),
``cfb.NotReadyError`` (nothing ingested or trained yet),
``cfb.CannotAnswerError`` (the serving version cannot answer it: an item it does not hold yet) and
``cfb.BusyError`` (a write that waited out another writer: try again shortly).

This module imports nothing heavy: ``import cfb.service.serving`` (which imports this package first)
stays free of torch and pandas."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .database import Database

__version__ = "0.1.0"
ERRORS = ("CfbError", "InputError", "UserExistsError", "UnknownIdError", "NotReadyError", "CannotAnswerError",
          "BusyError")
__all__ = ["open", "Database", *ERRORS, "__version__"]


def open(url: str | None = None) -> "Database":  # noqa: A001 - cfb.open(url), like sqlite3.connect
    """The database at ``url`` (a SQLAlchemy URL; None: ``$CFB_DATABASE_URL``, else ``$CFB_HOME/cfb.db``)."""
    from .database import Database

    return Database(url)


def __getattr__(name: str):
    if name == "Database":
        from .database import Database

        return Database
    if name in ERRORS:
        from .cf_core import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'cfb' has no attribute {name!r}")
