"""``cfb.Database``: one database, and the service functions the CLI calls, as methods."""
from __future__ import annotations

import math
import numbers
import os
import warnings
from pathlib import Path

from .cf_core.errors import CfbError, InputError, check_whole, printable


def _check_valid_pct(valid_pct: float) -> None:
    """``valid_pct``: the share of ratings held out for validation, in [0, 1)."""
    ok = isinstance(valid_pct, numbers.Real) and not isinstance(valid_pct, bool) and math.isfinite(valid_pct)
    if not (ok and 0 <= valid_pct < 1):
        raise InputError(f"valid_pct must be a number in [0, 1), got {valid_pct!r}")


def _check_entries(entries: list) -> None:
    """Each signup must be a dict; name the first that is not."""
    from .service.onboard import first_unreadable_value

    for k, e in enumerate(entries):
        if not isinstance(e, dict):
            raise InputError(f"a signup must be a dict {{\"user\"?, \"answers\": {{...}}, \"ratings\": {{...}}}}, "
                             f"got {type(e).__name__} {_shown(e)[:40]}", source=f"entry {k + 1}")
        bad = first_unreadable_value(e)  # (text that is not valid Unicode, as the JSON readers refuse it)
        if bad is not None:
            raise InputError(bad[1], source=f"entry {k + 1}", field=bad[0] or None)


# name -> (whole number?, lowest, lowest excluded?, highest): a full retrain's settings, checked here
# and as `cfb retrain --full`'s options (``cli.main.setting_type``)
TRAINING_SETTINGS = {"n_factors": (True, 1, False, 1024), "epochs": (True, 1, False, 1000),
                     "lr": (False, 0, True, None), "wd": (False, 0, False, None), "bs": (True, 1, False, 2**20),
                     "seed": (True, 0, False, 2**32 - 1)}


def _check_training_settings(kind: str | None, params: dict) -> dict:
    """The retrain settings as plain numbers, each checked as `cfb retrain` checks its options."""
    unknown = sorted(set(params) - set(TRAINING_SETTINGS))
    if unknown:
        raise InputError(f"unknown training setting(s) {', '.join(unknown)} "
                         f"(settings: kind, {', '.join(TRAINING_SETTINGS)}, valid_pct)")
    if kind not in (None, "dot", "nn"):
        raise InputError(f"kind must be 'dot' or 'nn', got {kind!r}")
    out = {}
    for name, value in params.items():
        if value is None:
            continue
        whole, lo, lo_open, hi = TRAINING_SETTINGS[name]
        if whole:  # (no whole-number setting excludes its lowest value)
            out[name] = check_whole(value, name, lo, hi)
            continue
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
            and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
        if not ok:
            bounds = f"{'above' if lo_open else 'from'} {lo}" + ("" if hi is None else f" to {hi}")
            raise InputError(f"{name} must be a finite number {bounds}, got {value!r}")
        out[name] = float(value)
    return out


def _check_token(token):  # noqa: ANN001, ANN202
    """A server's bearer token: non-empty text, or None for none (an empty one would leave writes open)."""
    from .service.http import check_token_text

    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise InputError(f"token must be non-empty text (or None: no token), got {token!r}")
    return check_token_text(token)


def _plain(value, name: str):  # noqa: ANN001, ANN202
    """``value`` (the argument ``name``) with numpy scalars (as pandas hands them out) made Python numbers,
    in dicts and lists too (their parts named ``name.key``, ``name[k]``)."""
    if isinstance(value, dict):
        return {k: _plain(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, f"{name}[{k}]") for k, v in enumerate(value)]
    if type(value).__module__ != "numpy" or not hasattr(value, "item"):
        return value
    if getattr(value, "ndim", 0):  # (an array of one value is one too many levels deep: refused, not unwrapped)
        raise InputError(f"{printable(name)}: expected one value, got a numpy array of shape {tuple(value.shape)}")
    return value.item()


def _shown(value) -> str:  # noqa: ANN001
    """``value``'s repr on one line, cut to 60 characters (a pandas object's spans several)."""
    return printable(repr(value))[:60]


def _number(value, what: str) -> float:  # noqa: ANN001
    """A number given from Python (numpy's too), as a float; bools, text and None are refused (and
    a whole number too large for a float: the caller refuses NaN and infinities in its own words)."""
    value = _plain(value, what)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise InputError(f"{what} must be a number, got {_shown(value)}")
    try:
        return float(value)
    except OverflowError:
        raise InputError(f"{what} must be a finite number, got a number of {len(str(abs(value)))} digits") from None


def _id(value, what: str) -> str:  # noqa: ANN001
    """A user's or item's id (or an item's title) given from Python: text, or a whole number (numpy's
    too) as its digits; anything else (None, a float, a list, text that is not valid Unicode) refused."""
    from .service.onboard import is_unicode_text

    value = _plain(value, what)
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise InputError(f"{what} must be an id (text or a whole number), got {type(value).__name__} {_shown(value)}")
    text = str(value)
    if not is_unicode_text(text):
        raise InputError(f"{what} {text!r:.60} is not valid Unicode text")
    return text


def _path(value, what: str) -> Path:  # noqa: ANN001
    """A file or folder given from Python: text or a path-like object."""
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{what} must be a path, got {type(value).__name__} {value!r:.60}")
    return Path(value)


def _column(value, what: str) -> str:  # noqa: ANN001
    """A column's name given from Python: text (as the CLI's ``--user-col`` and the like)."""
    if not isinstance(value, str):
        raise InputError(f"{what} must be a column's name, got {type(value).__name__} {value!r:.60}")
    return value


def _file(value) -> Path:  # noqa: ANN001
    """An existing file given from Python (as the CLI's ``click.Path(exists=True, dir_okay=False)``)."""
    path = _path(value, "file")
    if path.is_dir():
        raise InputError(f"file {str(path)!r} is a directory")
    if not path.exists():
        raise InputError(f"file {str(path)!r} does not exist")
    return path


class Database:
    """A cfb database (SQLite or PostgreSQL). Use ``cfb.open(url)``; ``close()`` (or ``with``) when done."""

    def __init__(self, url: str | None = None):
        from .db.engine import make_engine, resolve_url

        if url is not None and not isinstance(url, (str, os.PathLike)):
            raise InputError(f"url must be a database URL or a SQLite file's path, got {type(url).__name__} {url!r:.60}")
        self._url = resolve_url(None if url is None else os.fspath(url))
        self.engine = make_engine(self._url)
        self.closed = False

    @property
    def url(self) -> str:
        """The database's URL; every method reaches the database through it, so a closed one refuses."""
        if self.closed:
            raise CfbError("this cfb.Database is closed: open it again with cfb.open(url)")
        return self._url

    def __repr__(self) -> str:
        return f"cfb.Database({self.engine.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the database's connections; the object cannot be used after (``closed``)."""
        self.engine.dispose()
        self.closed = True

    def _existing(self):  # noqa: ANN202
        """The engine, for what reads, trains or serves: a SQLite file that is not there is an error
        (only an ingest makes a database)."""
        from .db.engine import require_database

        require_database(self.url)
        return self.engine

    # --- data -------------------------------------------------------------------------------------
    def ingest_movielens(self, folder: str | Path) -> dict:
        """Load a MovieLens release from ``folder`` (`cfb ingest movielens FOLDER`)."""
        from .db.sources import read_movielens

        ds = read_movielens(_path(folder, "folder"))
        return self._write(ds, ds.source or str(folder))

    def ingest_goodbooks(self, folder: str | Path) -> dict:
        """Load a goodbooks-10k release (v1 or v2) from ``folder`` (`cfb ingest goodbooks FOLDER`)."""
        from .db.sources import read_goodbooks

        ds = read_goodbooks(_path(folder, "folder"))
        return self._write(ds, ds.source or str(folder))

    def ingest_ratings(self, file: str | Path, scale: tuple[float, float] | None = None, user_col: str = "user",
                       item_col: str = "item", rating_col: str = "rating", time_col: str | None = None) -> dict:
        """Add ratings from a CSV with a header (`cfb ingest ratings FILE [--scale LO,HI]`)."""
        from .db.sources import CsvRowLines, Dataset, read_ratings_csv
        from .db.store import scale_problem

        if scale is not None:  # (as `--scale LO,HI`)
            ends = list(scale) if isinstance(scale, (tuple, list)) else []
            lo, hi = (_number(x, "scale") for x in ends) if len(ends) == 2 else (math.nan, math.nan)
            if not lo < hi:
                raise InputError(f"scale must be (low, high) with low < high, got {scale!r:.60}")
            if problem := scale_problem((lo, hi)):
                raise InputError(problem)
            scale = (lo, hi)
        user_col, item_col, rating_col = (_column(c, n) for c, n in ((user_col, "user_col"), (item_col, "item_col"),
                                                                    (rating_col, "rating_col")))
        time_col = None if time_col is None else _column(time_col, "time_col")
        path = _file(file)
        ratings = read_ratings_csv(path, user_col, item_col, rating_col, time_col)
        return self._write(Dataset(ratings, first_line=CsvRowLines(path, len(ratings))), str(path), scale)

    def ingest_users(self, file: str | Path, user_col: str = "user") -> dict:
        """Add or update user attributes from a CSV with a header (`cfb ingest users FILE`)."""
        import pandas as pd

        from .db.sources import Dataset, read_users_csv

        user_col = _column(user_col, "user_col")
        path = _file(file)
        users = read_users_csv(path, user_col)
        return self._write(Dataset(pd.DataFrame({"user": [], "item": [], "rating": [], "timestamp": []}),
                                   users=users), str(path))

    def ingest_items(self, file: str | Path) -> dict:
        """Add or update items from a CSV ``item[,title],<attribute>...`` (`cfb ingest items FILE`); a
        retrain then adds those with metadata and no rating from their metadata."""
        from .db.sources import read_items_csv
        from .service.ingest import upsert_items_at

        path = _file(file)
        return upsert_items_at(self.url, read_items_csv(path), source=str(path))

    def _write(self, ds, source: str, scale: tuple[float, float] | None = None) -> dict:  # noqa: ANN001
        """Ingest ``ds`` as `cfb ingest` does: one transaction; a first ingest makes the database whole
        or not at all."""
        from .db.engine import made_whole, make_engine
        from .service.ingest import ingest_dataset

        def write(url: str) -> dict:
            engine = make_engine(url, bulk=True)  # (as `cfb ingest`)
            try:
                return ingest_dataset(engine, ds, scale=scale, source=source)
            finally:
                engine.dispose()

        return made_whole(self.url, write)

    # --- training -----------------------------------------------------------------------------------
    def retrain(self, full: bool = False, kind: str | None = None, valid_pct: float | None = None,
                progress: bool = False, drift_limit: float | None = None, **params) -> dict:
        """Train a new version and serve it (`cfb retrain [--full]`): incremental unless ``full``, or
        there is no model yet, or more than ``drift_limit`` (default 0.2) of the ratings are newer
        than the last full retrain. ``valid_pct`` (default 0.2; a full retrain that drift forces keeps the
        replaced version's, as its seed) and ``params`` (n_factors, epochs, lr, wd, bs, seed) apply to a
        full retrain; an incremental one refuses them and ``kind``."""
        from .service.incremental import DEFAULT_VALID_PCT, DRIFT_LIMIT

        for name, value in (("full", full), ("progress", progress)):
            if not isinstance(_plain(value, name), bool):
                raise InputError(f"{name} must be True or False, got {_shown(value)}")
        if valid_pct is not None:
            _check_valid_pct(valid_pct)
        if drift_limit is not None:
            value = _plain(drift_limit, "drift_limit")
            if full:
                raise InputError("drift_limit decides when a retrain without full=True goes full; with full=True "
                                 "it has no effect")
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= 1:
                raise InputError(f"drift_limit must be a number from 0 to 1, got {drift_limit!r}")
        params = _check_training_settings(kind, params)
        if full:
            from .service.training import retrain_full

            return retrain_full(self._existing(), kind=kind or "dot", progress=progress, **params,
                                valid_pct=DEFAULT_VALID_PCT if valid_pct is None else float(valid_pct))
        from .service.incremental import retrain_auto

        full_only = (("kind",) if kind is not None else ()) + (("valid_pct",) if valid_pct is not None else ()) \
            + tuple(params)
        return retrain_auto(self._existing(), kind=kind, valid_pct=valid_pct, progress=progress, full_only=full_only,
                            drift_limit=DRIFT_LIMIT if drift_limit is None else float(drift_limit), **params)

    def models(self):
        """Model versions as a DataFrame (`cfb models --json`)."""
        import pandas as pd

        from .db import versions

        with self._existing().connect() as conn:
            rows = versions.list_versions(conn)
        frame = pd.DataFrame(rows, columns=["version", "kind", "mode", "parent", "created", "metrics", "hyperparams",
                                            "serving"])  # (the columns even with no version yet)
        return frame.astype({"parent": "Int64"})  # (a whole number or missing, however many versions)

    def rollback(self, version: int) -> dict:
        """Serve an earlier ``version`` (`cfb rollback`); returns ``{"serving": version}``, as its ``--json``."""
        from .db import versions
        from .db.engine import writing

        version = _plain(version, "version")
        if not isinstance(version, numbers.Integral) or isinstance(version, bool):
            raise InputError(f"version must be a whole number, got {_shown(version)}")
        if not 1 <= version <= 2**31 - 1:  # (as `cfb rollback`; a larger one does not fit the database's integer)
            raise InputError(f"version must be a whole number from 1 to {2**31 - 1}, got {version}")
        with writing(self._existing()) as conn:
            versions.set_serving(conn, int(version))
        return {"serving": int(version)}

    # --- users ----------------------------------------------------------------------------------------
    def questionnaire(self, budget: int = 15) -> dict:
        """The signup questionnaire (`cfb questionnaire --json`): attribute questions and items to rate."""
        from .service.onboard import questionnaire_json

        with self._existing().connect() as conn:
            return questionnaire_json(conn, budget)

    def onboard(self, answers: dict | list[dict]):
        """Sign up one user (a dict ``{"user"?, "answers": {...}, "ratings": {item: rating}, "asked"?}``,
        ``asked``: how many of the questionnaire's items were shown) or several (a list, all or
        nothing); returns the new user id (or the list of ids)."""
        from .service.onboard import onboard

        given = answers if isinstance(answers, list) else [answers]
        entries = [_plain(e, f"entry {k + 1}") for k, e in enumerate(given)]
        _check_entries(entries)
        out = onboard(self._existing(), [(f"entry {k + 1}", e) for k, e in enumerate(entries)])
        ids = [u["user"] for u in out["onboarded"]]
        return ids if isinstance(answers, list) else ids[0]

    def rate(self, user: str, item: str, rating: float, new_item: bool = False) -> dict:
        """Store ``user``'s rating of ``item`` (id or exact title); the next recommendations use it."""
        from .service.ratings import rate_item

        if not isinstance(_plain(new_item, "new_item"), bool):
            raise InputError(f"new_item must be True or False, got {_shown(new_item)}")
        return rate_item(self._existing(), _id(user, "user"), _id(item, "item"), _number(rating, "rating"),
                         create_item=new_item)

    # --- answers --------------------------------------------------------------------------------------
    def recommend(self, user: str, n: int = 10, by: str = "rank"):
        """The user's top ``n`` unrated items: a DataFrame with columns item, title, score (the predicted
        rating), in the order ``by`` says: the version's ranking score (``"rank"``: what the user would
        watch and like, so the scores need not fall row by row) or the predicted rating (``"rating"``)."""
        import pandas as pd

        from .service.serving import recommend

        with self._existing().connect() as conn:
            out = recommend(conn, _id(user, "user"), n, by)
        return pd.DataFrame(out["items"], columns=["item", "title", "score"])

    def ratings(self, user: str, n: int = 20):
        """The user's latest ``n`` ratings, newest first (`cfb ratings USER -n N --json`'s "ratings"): a
        DataFrame with columns item, title, rating."""
        import pandas as pd

        from .service.serving import user_ratings

        with self._existing().connect() as conn:
            out = user_ratings(conn, _id(user, "user"), n)
        return pd.DataFrame(out["ratings"], columns=["item", "title", "rating"])

    def predict(self, pairs) -> list[float]:
        """Predicted ratings of (user, item) pairs: a list of pairs, or a DataFrame with columns user
        and item (`cfb predict --pairs`)."""
        from .service.serving import predict_pairs

        if hasattr(pairs, "columns"):  # a DataFrame
            if not {"user", "item"} <= set(pairs.columns):
                raise InputError("pairs: a DataFrame needs columns user and item, has "
                                 f"{', '.join(map(str, pairs.columns))}")
            for column in ("user", "item"):  # (a missing id makes pandas turn the column's ids into floats)
                missing = pairs[column].isna().to_numpy()
                if missing.any():
                    raise InputError(f"pairs: row {int(missing.argmax()) + 1} has no {column}")
            pairs = list(zip(pairs["user"], pairs["item"]))
        if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
            raise InputError("pairs must be (user, item) pairs or a DataFrame with columns user and item, "
                             f"got {pairs!r:.60}")
        pairs = list(pairs)
        for k, pair in enumerate(pairs):
            if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
                raise InputError(f"pairs: entry {k + 1} must be one (user, item) pair, got {pair!r:.60}")
        with self._existing().connect() as conn:
            return predict_pairs(conn, [(_id(u, f"pairs: entry {k + 1}'s user"), _id(i, f"pairs: entry {k + 1}'s item"))
                                        for k, (u, i) in enumerate(pairs)])

    def similar(self, item: str, n: int = 10):
        """Items closest to ``item`` (id or exact title) by item factors: a DataFrame item, title, score."""
        import pandas as pd

        from .service.serving import similar

        with self._existing().connect() as conn:
            out = similar(conn, _id(item, "item"), n)
        return pd.DataFrame(out["items"], columns=["item", "title", "score"])

    def biases(self, n: int = 10, min_ratings: int = 1) -> dict:
        """Items with the lowest and highest learned bias: {"lowest": DataFrame, "highest": DataFrame}."""
        import pandas as pd

        from .service.serving import biases

        with self._existing().connect() as conn:
            out = biases(conn, n, min_ratings)
        return {k: pd.DataFrame(v, columns=["item", "title", "score", "ratings"]) for k, v in out.items()}

    def pca(self, n: int = 50, plot: str | Path | None = None):
        """PCA of the item factors of the ``n`` most-rated items: a DataFrame item, title, ratings,
        pc1, pc2, pc3 (and, with ``plot``, a labelled PNG of PC1 and PC2 written there); its ``attrs``
        hold the rest of `cfb inspect pca --json`: version, fitted_on, explained_variance."""
        import pandas as pd

        from .service.inspect import is_png_name, missing_glyphs_note, pca, plot_pca

        if plot is not None:  # (checked as `cfb inspect pca --plot` checks it)
            if not isinstance(plot, (str, os.PathLike)) or not is_png_name(os.fspath(plot)) or Path(plot).is_dir():
                raise InputError(f"plot {plot!r}: the plot is a PNG, give a file name ending in .png")
        with self._existing().connect() as conn:
            out = pca(conn, n)
        if plot is not None:
            try:
                missing = plot_pca(out, Path(plot))
            except OSError as e:
                raise InputError(f"cannot write {plot}: {e.strerror or e}") from None
            if missing:  # (as `cfb inspect pca --plot` notes it)
                warnings.warn(missing_glyphs_note(missing), stacklevel=3)  # (the caller's line: a wrapper between)
        frame = pd.DataFrame(out["items"])
        frame.attrs.update({k: v for k, v in out.items() if k != "items"})
        return frame

    # --- serving ------------------------------------------------------------------------------------
    def app(self, token: str | None = None):
        """The HTTP app (FastAPI) over this database, e.g. for ``uvicorn`` or a test client."""
        from .service.http import create_app

        return create_app(self._existing(), _check_token(token))

    def serve(self, host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> None:
        """Run `cfb serve` in this process (blocks)."""
        from .service.http import serve

        if not isinstance(host, str) or not host.strip():
            raise InputError(f"host must be a host name or address, got {host!r}")
        port = check_whole(_plain(port, "port"), "port", 0, 65535)
        token = _check_token(token)
        self._existing()
        serve(self.url, host=host, port=port, token=token)


def _database_errors_as_cfb_errors(method):  # noqa: ANN001, ANN202
    """``method`` raising a database's or URL's error as the ``CfbError`` the CLI prints for it."""
    import functools

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        from sqlalchemy.exc import SQLAlchemyError

        from .db.engine import database_error

        try:
            return method(*args, **kwargs)
        except SQLAlchemyError as e:
            error = database_error(e, getattr(args[0], "url", None) if args else None)
            if error is None:
                raise
            raise error from None

    return wrapper


for _name, _method in list(vars(Database).items()):
    if callable(_method) and (_name == "__init__" or not _name.startswith("_")):
        setattr(Database, _name, _database_errors_as_cfb_errors(_method))
