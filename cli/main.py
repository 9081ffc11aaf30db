"""`cfb`: ingest ratings, retrain, onboard new users, recommend, evaluate."""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from ..cf_core.errors import CfbError
from ..database import TRAINING_SETTINGS
from ..db.textfile import plain_float, plain_int


def emit(obj, as_json: bool, text: str | None = None) -> None:
    """Print ``obj`` as JSON, or ``text`` for people."""
    click.echo(json.dumps(obj, ensure_ascii=False) if as_json or text is None else text)


def shown(text: object) -> str:
    """``text`` for a terminal line: control characters (a line break, an escape code) written as escapes."""
    return "".join(c.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in str(text))


def named(entry: dict) -> str:
    """An item as text output names it: its title, else its id (``shown``)."""
    return shown(entry.get("title") or entry["item"])


def fail_cleanly(fn):
    """Turn expected errors into one line on stderr and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sqlalchemy.exc import SQLAlchemyError

        from ..db.engine import database_error, resolve_url

        try:
            return fn(*args, **kwargs)
        except CfbError as e:  # (``shown``: one line, whatever text from the input a message quotes)
            raise click.ClickException(shown(e)) from None
        except SQLAlchemyError as e:
            ctx = next((a for a in args if isinstance(a, Ctx)), None)
            error = database_error(e, resolve_url(ctx.url) if ctx is not None else None)
            if error is None:
                raise
            raise click.ClickException(shown(error)) from None
        except OSError as e:  # (a file the readers did not name themselves: still one line)
            if isinstance(e, BrokenPipeError):  # (`cfb … | head`: click ends quietly, as every Unix tool)
                raise
            said = e.strerror or str(e)
            raise click.ClickException(shown(f"{e.filename}: {said}" if e.filename else said)) from None

    return wrapper


class FiniteFloat(click.ParamType):
    """A finite float (no nan/inf) within optional bounds; ``min_open``/``max_open`` exclude the bound."""

    name = "float"

    def __init__(self, min: float | None = None, max: float | None = None, min_open: bool = False,
                 max_open: bool = False):
        self.min, self.max, self.min_open, self.max_open = min, max, min_open, max_open

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            x = float(value)
        else:
            try:
                x = plain_float(value)
            except ValueError:
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.min is not None and (x < self.min or (self.min_open and x == self.min)):
            self.fail(f"{x:g} must be {'>' if self.min_open else '>='} {self.min:g}", param, ctx)
        if self.max is not None and (x > self.max or (self.max_open and x == self.max)):
            self.fail(f"{x:g} must be {'<' if self.max_open else '<='} {self.max:g}", param, ctx)
        return x


class WholeRange(click.IntRange):
    """``click.IntRange`` read as the file readers read numbers: ASCII digits only, no '_' (``int``
    alone reads "１" and "1_0")."""

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            try:
                plain_int(value)
            except ValueError:
                self.fail(f"{value!r} is not a whole number", param, ctx)
        return super().convert(value, param, ctx)


class NumberArguments(click.Command):
    """A command whose arguments may be negative numbers ("-1" is a value, not an option: click's
    ``ignore_unknown_options``), but that still refuses an unknown option by its name ("--jsn"), instead
    of reading it as an argument and failing on another."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        kwargs["context_settings"] = {**(kwargs.get("context_settings") or {}), "ignore_unknown_options": True}
        super().__init__(*args, **kwargs)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        import difflib

        known = {opt for param in self.get_params(ctx) for opt in (*param.opts, *param.secondary_opts)}
        for arg in args:
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            attached = not arg.startswith("--") and arg[:2] in known and _reads_as_number(arg[2:])  # (-n2)
            if arg.startswith("-") and arg != "-" and name not in known and not attached and not _reads_as_number(arg):
                close = difflib.get_close_matches(name, sorted(known))
                raise click.NoSuchOption(name, None if close else f"No such option '{name}' (an argument that "
                                         "starts with '-', such as an id, goes after '--')", close, ctx=ctx)
        return super().parse_args(ctx, args)


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def setting_type(name: str) -> click.ParamType:
    """The option type of a full retrain's setting ``name`` (its range in ``TRAINING_SETTINGS``)."""
    whole, lo, lo_open, hi = TRAINING_SETTINGS[name]
    return WholeRange(lo, hi) if whole else FiniteFloat(min=lo, max=hi, min_open=lo_open)


class Ctx:
    def __init__(self, url: str | None):
        self.url = url
        self._engine = None

    @property
    def engine(self):
        if self._engine is None:
            from ..db.engine import make_engine

            self._engine = make_engine(self.url, must_exist=True)  # (only `cfb ingest` makes a database)
        return self._engine

    def close(self) -> None:
        """Close the engine's connections when the command ends (a SQLite file's -wal and -shm go with
        the last one), rather than whenever the engine is garbage collected."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


pass_ctx = click.make_pass_decorator(Ctx)


NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # (click >= 8.2)


class OneLineUsageError(click.UsageError):
    """A usage error as one line on stderr, naming the command's --help; exit status 2."""

    def show(self, file=None) -> None:  # noqa: ANN001
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        message = " ".join(self.format_message().split())  # (a choice's list of values is one line too)
        click.echo(f"Error: {message}{hint}", file=file, err=file is None)


class CfbGroup(click.Group):
    """The ``cfb`` command: an argument that is not UTF-8 text is refused before anything runs, and a
    usage error (an option out of range, a missing argument) is one line, as every other error."""

    def main(self, args=None, *rest, **kwargs):  # noqa: ANN001, ANN201
        args = list(sys.argv[1:] if args is None else args)
        for k, arg in enumerate(args, 1):
            bad = next((c for c in arg if "\udc80" <= c <= "\udcff"), None)  # (bytes the locale could not decode)
            if bad is not None:
                click.echo(f"Error: argument {k} is not valid UTF-8 text (byte 0x{ord(bad) - 0xDC00:02x})", err=True)
                sys.exit(2)
        return super().main(args, *rest, **kwargs)

    def make_context(self, *args, **kwargs) -> click.Context:  # noqa: ANN002, ANN003  (cfb's own options)
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context):  # noqa: ANN201  (a command's options and arguments)
        with _one_line_usage_errors():
            return super().invoke(ctx)


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except click.UsageError as e:
        if isinstance(e, (OneLineUsageError, NO_ARGS_IS_HELP)):  # (a group without its command: its help)
            raise
        raise OneLineUsageError(e.format_message(), e.ctx) from None


@click.group(cls=CfbGroup)
@click.option("--db", "url", envvar="CFB_DATABASE_URL",
              help="Database URL (sqlite:///FILE, postgresql://…) or a SQLite file's path "
                   "(default: SQLite at $CFB_HOME/cfb.db).")
@click.pass_context
def cli(ctx: click.Context, url: str | None) -> None:
    """cfb: cold-start collaborative filtering (fastai embeddings + a signup questionnaire)."""
    from ..db.engine import in_memory_sqlite

    if url and "://" in url and in_memory_sqlite(url):
        raise click.BadParameter("an in-memory SQLite database keeps nothing after the command: give a file "
                                 "(sqlite:///cfb.db, or a path)", param_hint="--db (or $CFB_DATABASE_URL)")
    ctx.obj = Ctx(url)
    ctx.call_on_close(ctx.obj.close)
    if threading.current_thread() is threading.main_thread():  # (signal handlers belong to the main thread)
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # (None: a handler set outside Python)
        ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous))


# --- ingest -----------------------------------------------------------------------------------
@cli.group()
def ingest() -> None:
    """Load ratings, items and users into the database (all or nothing)."""


def _ingest(ctx: Ctx, ds, as_json: bool, scale=None, source: str = "", quiet: bool = False) -> None:
    from ..db.engine import made_whole, make_engine
    from ..service.ingest import ingest_dataset

    show = not quiet and len(ds.ratings) >= 100_000

    def write(url: str) -> dict:
        engine = make_engine(url, bulk=True)  # ids checked once per ingest, not row by row
        try:
            with click.progressbar(length=len(ds.ratings), label="writing ratings", file=sys.stderr,
                                   hidden=not show) as bar:
                return ingest_dataset(engine, ds, scale=scale, source=source, progress=bar.update)
        finally:
            engine.dispose()

    out = made_whole(ctx.url, write)  # a failed first ingest leaves no database file
    emit(out, as_json, f"ingested {out['ratings']} ratings ({out['new_ratings']} new or changed), "
                       f"{out['users']} users ({out['new_users']} new), {out['items']} items ({out['new_items']} new)")


def _scale(value: str | None):
    if not value:
        return None
    try:
        lo, hi = (plain_float(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter("expected LO,HI, e.g. 1,5") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise click.BadParameter(f"expected finite LO < HI, got {value!r}")
    from ..db.store import scale_problem

    if problem := scale_problem((lo, hi)):
        raise click.BadParameter(problem)
    return lo, hi


def _check_scale(ctx, param, value: str | None) -> str | None:
    """Option callback: reject a bad --scale while parsing (the value is kept as text)."""
    _scale(value)
    return value


def _dataset_command(name: str, reader: str, marker: str, help_text: str) -> None:
    """`cfb ingest NAME FOLDER` for a public dataset's layout (``reader`` in ``cfb.db.sources``)."""

    @ingest.command(name, help=help_text)
    @click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.option("--quiet", is_flag=True, help="No progress bar.")
    @click.option("--json", "as_json", is_flag=True)
    @pass_ctx
    @fail_cleanly
    def command(ctx: Ctx, folder: Path, quiet: bool, as_json: bool) -> None:
        from ..db import sources

        ds = getattr(sources, reader)(folder)
        _ingest(ctx, ds, as_json, source=ds.source or str(folder / marker), quiet=quiet)


_dataset_command("movielens", "read_movielens", "u.data",
                 "Any MovieLens release from FOLDER, recognised by its files: 100k (u.data, u.item, u.user), "
                 "1M (ratings.dat, movies.dat, users.dat), 10M (ratings.dat, movies.dat, tags.dat), "
                 "20M/25M/32M/latest/latest-small (ratings.csv, movies.csv, tags.csv). Titles, genres, year "
                 "and top tags become item attributes; the demographics of 100k and 1M user attributes.")
_dataset_command("goodbooks", "read_goodbooks", "ratings.csv",
                 "goodbooks-10k from FOLDER, v1 or v2 (ratings.csv, books.csv, book_tags.csv + tags.csv): "
                 "titles, authors, original_publication_year and top tags become item attributes.")


@ingest.command("items")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--quiet", is_flag=True, help="No progress output (an items file shows none: for scripts "
                                            "that pass it to every ingest).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def ingest_items(ctx: Ctx, file: Path, quiet: bool, as_json: bool) -> None:
    """Add or update items from a CSV with a header (item, an optional title, then one column per attribute).

    Numbers stay numbers (as text where the stored items hold that attribute as text), a value with '|'
    becomes a list ("Drama|War"), empty cells change nothing; given attributes replace those of the
    same name, others are kept; a word where the stored items hold numbers is refused."""
    from ..db.sources import read_items_csv
    from ..service.ingest import upsert_items_at

    out = upsert_items_at(ctx.url, read_items_csv(file), source=str(file))  # (may make the database, whole)
    emit(out, as_json, f"{out['added']} items added, {out['updated']} updated, {out['unchanged']} unchanged")
    for shared in out["shared_titles"][:5]:  # (legitimate: two books of one title; said, as lookups then need an id)
        click.echo(f"note: title '{shown(shared['title'])}' is now held by {len(shared['items'])} items "
                   f"({', '.join(map(shown, shared['items']))}): look them up by id", err=True)
    if len(out["shared_titles"]) > 5:
        click.echo(f"note: {len(out['shared_titles']) - 5} more titles given are held by more than one item "
                   "(--json lists them)", err=True)


@ingest.command("ratings")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--user-col", default="user", show_default=True)
@click.option("--item-col", default="item", show_default=True)
@click.option("--rating-col", default="rating", show_default=True)
@click.option("--time-col", help="Column of the rating times (must be there) [default: timestamp, if there].")
@click.option("--scale", callback=_check_scale,
              help="Rating scale LO,HI (default: the database's, else the data's range).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def ingest_ratings(ctx: Ctx, file: Path, user_col, item_col, rating_col, time_col, scale, quiet, as_json) -> None:
    """Add ratings from a CSV with a header (user,item,rating[,timestamp])."""
    from ..db.sources import CsvRowLines, Dataset, read_ratings_csv

    ratings = read_ratings_csv(file, user_col, item_col, rating_col, time_col)
    ds = Dataset(ratings, first_line=CsvRowLines(file, len(ratings)))
    _ingest(ctx, ds, as_json, scale=_scale(scale), source=str(file), quiet=quiet)


@ingest.command("users")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--user-col", default="user", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress output (a users file shows none: for scripts "
                                            "that pass it to every ingest).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def ingest_users(ctx: Ctx, file: Path, user_col: str, quiet: bool, as_json: bool) -> None:
    """User attributes from a CSV with a header (user, then one column per attribute)."""
    import pandas as pd

    from ..db.sources import Dataset, read_users_csv

    ds = Dataset(pd.DataFrame({"user": [], "item": [], "rating": [], "timestamp": []}), users=read_users_csv(file, user_col))
    _ingest(ctx, ds, as_json, source=str(file))


# --- data ---------------------------------------------------------------------------------------
def download_bar(name: str, quiet: bool):  # -> (total bytes or None) -> click progress bar, or None
    """The ``progress`` of ``cfb.db.download.download``: a bar on stderr (hidden for an unknown size);
    None with ``quiet``, so that the download says nothing (not even that it waits for another)."""
    if quiet:
        return None

    def bar(total: int | None):
        return click.progressbar(length=total or 0, label=f"downloading {name}", file=sys.stderr, hidden=not total)

    return bar


@cli.group()
def data() -> None:
    """Public datasets."""


DATASETS = ["movielens-100k", "movielens-1m", "movielens-10m", "movielens-25m", "movielens-32m",
            "movielens-latest-small", "goodbooks-10k"]  # cfb.db.download.SOURCES (kept here: no import at startup)


@data.command("download")
@click.argument("name", type=click.Choice(DATASETS))
@click.option("--sha256", help="Also check the archive against this SHA-256.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True)
@fail_cleanly
def data_download(name: str, sha256: str | None, quiet: bool, as_json: bool) -> None:
    """Fetch NAME from its official address into $CFB_HOME/data, verified and unpacked; print the folder."""
    from ..db.download import STAMP, download

    folder = download(name, progress=download_bar(name, quiet), sha256=sha256)
    try:
        verified = json.loads((folder / STAMP).read_text()).get("verified_by")
    except (OSError, ValueError):
        verified = None
    if sha256 and str(verified).startswith("none"):  # (a cached copy, its recorded SHA-256 checked against it)
        verified = "sha256 = the given SHA-256"
    if str(verified).startswith("none") and not quiet:  # (goodbooks-10k publishes no checksum)
        click.echo(f"note: {name} publishes no checksum, so its archive was not verified (--sha256 pins one)",
                   err=True)
    emit({"dataset": name, "path": str(folder), "verified_by": verified}, as_json, str(folder))


# --- training -------------------------------------------------------------------------------------
@cli.command()
@click.option("--full", is_flag=True, help="Retrain from scratch on every rating.")
@click.option("--model", "kind", type=click.Choice(["dot", "nn"]),
              help="Model kind [default: dot for a first or --full retrain, else the serving version's]. This and "
                   "the training options below apply to a full retrain (an incremental one refuses them).")
@click.option("--factors", "n_factors", type=setting_type("n_factors"))
@click.option("--epochs", type=setting_type("epochs"))
@click.option("--lr", type=setting_type("lr"))
@click.option("--wd", type=setting_type("wd"))
@click.option("--bs", type=setting_type("bs"), help="Batch size.")
@click.option("--seed", type=setting_type("seed"),
              help="[default: 42; a full retrain that drift forces keeps the seed of the version it replaces]")
@click.option("--valid-pct", type=FiniteFloat(0, 1, max_open=True), default=0.2, show_default=True,
              help="Share of ratings held out for validation (protocol §7); 0 trains on all. A full retrain "
                   "that drift forces keeps the share of the version it replaces.")
@click.option("--drift-limit", type=FiniteFloat(0, 1), default=0.2, show_default=True,
              help="Without --full: retrain fully when the ratings newer than the last full retrain are this share "
                   "of those it learned plus them (a changed re-rating counts as a newer rating).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def retrain(ctx: Ctx, full: bool, kind: str, n_factors, epochs, lr, wd, bs, seed, valid_pct, drift_limit, quiet,
            as_json) -> None:
    """Train a new model version and serve it (incremental fold-in unless --full or drift is large)."""
    from ..service.training import retrain_full

    params = {"n_factors": n_factors, "epochs": epochs, "lr": lr, "wd": wd, "bs": bs,
              **({} if seed is None else {"seed": seed})}
    given = click.get_current_context().get_parameter_source
    if full and given("drift_limit") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--drift-limit decides when a retrain without --full goes full; with --full it "
                               "has nothing to decide")
    if not full:
        from ..service.incremental import retrain_auto

        options = {"kind": "--model", "n_factors": "--factors", "epochs": "--epochs", "lr": "--lr", "wd": "--wd",
                   "bs": "--bs", "seed": "--seed", "valid_pct": "--valid-pct"}
        full_only = tuple(flag for param, flag in options.items()
                          if given(param) == click.core.ParameterSource.COMMANDLINE)
        out = retrain_auto(ctx.engine, kind=kind, progress=not quiet, drift_limit=drift_limit, full_only=full_only,
                           valid_pct=valid_pct if "--valid-pct" in full_only else None, **params)
    else:
        out = retrain_full(ctx.engine, kind=kind or "dot", valid_pct=valid_pct, progress=not quiet, **params)
    seed = (out.get("hyperparams") or {}).get("seed")
    text = (f"version {out['version']} ({out['kind']}, {out['mode']}{'' if seed is None else f', seed {seed}'}) "
            f"{'serving' if out.get('serving', True) else 'stored'}")
    if out.get("valid_rmse") is not None:  # (with what protocol §7 reports beside it: the epochs and the time)
        text += (f"; validation MSE {out['valid_mse']:.4f}, RMSE {out['valid_rmse']:.4f} "
                 f"({out['hyperparams']['epochs']} epochs; retrain {out['total_s']:.1f} s)")
    elif out.get("valid_note"):
        text += f"; not validated ({out['valid_note']})"
    if out.get("reason"):
        text += f"; {out['reason']}"
    emit(out, as_json, text)


# --- serving ----------------------------------------------------------------------------------------
@cli.command(cls=NumberArguments)  # (a negative number is an id, not an option)
@click.argument("users", nargs=-1, required=True)
@click.option("-n", "n", type=WholeRange(1, 1000), default=10, show_default=True)
@click.option("--by", type=click.Choice(["rank", "rating"]), default="rank", show_default=True,
              help="rank: what the user would watch and like (the ranking model's order); "
                   "rating: predicted rating alone.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def recommend(ctx: Ctx, users: tuple[str, ...], n: int, by: str, as_json: bool) -> None:
    """Top N items each USER has not rated; the score is the predicted rating."""
    from ..service.serving import NOTHING_LEFT
    from ..service.serving import recommend as recommend_items

    with ctx.engine.connect() as conn:
        out = [recommend_items(conn, u, n, by) for u in users]
    lines = []
    for rec in out:
        lines.append(f"user {shown(rec['user'])} (predicted rating, title):")
        lines += [f"  {r['score']:.2f}  {named(r)}" for r in rec["items"]] or [f"  ({NOTHING_LEFT})"]
    emit(out, as_json, "\n".join(lines))


@cli.command(cls=NumberArguments)  # (a negative number is an id, not an option)
@click.argument("user")
@click.option("-n", "n", type=WholeRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def ratings(ctx: Ctx, user: str, n: int, as_json: bool) -> None:
    """USER's latest N ratings, newest first (every stored rating counts, retrained or not)."""
    from ..service.serving import user_ratings

    with ctx.engine.connect() as conn:
        out = user_ratings(conn, user, n)
    shown_of = "" if out["count"] <= n else f", the latest {n} of {out['count']:,} (-n for more)"
    lines = [f"user {shown(out['user'])} (rating, title{shown_of}):"]
    lines += [f"  {r['rating']:g}  {named(r)}" for r in out["ratings"]] or ["  (no ratings yet)"]
    emit(out, as_json, "\n".join(lines))


@cli.command()
@click.option("--pairs", "pairs_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="CSV with header user,item.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def predict(ctx: Ctx, pairs_file: Path, as_json: bool) -> None:
    """Predicted rating for each user,item row of a CSV (an item by id or exact title); prints CSV
    user,item,prediction, the item by its id (--json: with its title)."""
    import csv

    from ..cf_core.errors import InputError
    from ..db.textfile import read_pairs_csv
    from ..service.serving import predictions_table

    src = str(pairs_file)
    pairs, lines = read_pairs_csv(pairs_file)
    try:
        with ctx.engine.connect() as conn:
            table = predictions_table(conn, pairs)
    except CfbError as e:  # an error about row K -> the file and line of that row
        row = getattr(e, "row", None)
        if row is None:
            raise
        raise InputError(e.detail, source=src, line=lines[row - 1], field=e.field or "item") from None
    if as_json:
        emit([{**row, "prediction": round(row["prediction"], 4)} for row in table], True)
    else:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["user", "item", "prediction"])
        w.writerows([row["user"], row["item"], f"{row['prediction']:.4f}"] for row in table)


@cli.command(cls=NumberArguments)  # (a negative number is an id, not an option)
@click.argument("item")
@click.option("-n", "n", type=WholeRange(1, 1000), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def similar(ctx: Ctx, item: str, n: int, as_json: bool) -> None:
    """Items most similar to ITEM (id or exact title), by cosine similarity of item factors."""
    from ..service.serving import similar as similar_items

    with ctx.engine.connect() as conn:
        out = similar_items(conn, item, n)
    text = "\n".join([f"similar to {named(out)}:"] +
                     [f"  {r['score']:.3f}  {named(r)}" for r in out["items"]])
    emit(out, as_json, text)


@cli.group()
def inspect() -> None:
    """Look inside the serving model."""


@inspect.command("biases")
@click.option("-n", "n", type=WholeRange(1, 1000), default=10, show_default=True)
@click.option("--min-ratings", type=WholeRange(min=0), default=1, show_default=True,
              help="Only items with at least this many ratings (0: also those whose bias came from metadata).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def inspect_biases(ctx: Ctx, n: int, min_ratings: int, as_json: bool) -> None:
    """Items with the lowest and highest learned bias (the dot model's: an nn version has none)."""
    from ..service.serving import biases

    with ctx.engine.connect() as conn:
        out = biases(conn, n, min_ratings)

    def line(r: dict) -> str:
        return f"  {r['score']:+.3f}  {named(r)}  ({r['ratings']:,} ratings)"

    text = "\n".join(["lowest bias:"] + [line(r) for r in out["lowest"]] + ["highest bias:"] + [line(r) for r in out["highest"]])
    emit(out, as_json, text)


@inspect.command("pca")
@click.option("-n", "n", type=WholeRange(2, 100_000), default=50, show_default=True,
              help="Map the N most-rated items.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Also write a labelled scatter of PC1 and PC2 to this PNG (matplotlib).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def inspect_pca(ctx: Ctx, n: int, plot: str | None, as_json: bool) -> None:
    """PCA of the item factors, mapping the N most-rated items (fastai book, chapter 8: the axes are fitted
    on the 1,000 most-rated items, or the N if more): pc1..pc3 per item (as many axes as the items and the
    factors allow)."""
    from ..service.inspect import is_png_name, missing_glyphs_note, pca, plot_pca

    if plot is not None and not is_png_name(plot):
        raise CfbError(f"--plot {shown(repr(plot))}: the plot is a PNG, give a file name ending in .png")
    with ctx.engine.connect() as conn:
        out = pca(conn, n)
    if plot is not None:
        try:
            missing = plot_pca(out, Path(plot))
        except OSError as e:
            raise CfbError(f"cannot write {shown(plot)}: {e.strerror or e}") from None
        out["plot"] = str(plot)
        if missing:
            click.echo(f"note: {shown(missing_glyphs_note(missing))}", err=True)
    ev = ", ".join(f"PC{k + 1} {v:.1%}" for k, v in enumerate(out["explained_variance"]))
    axes = [f"pc{k + 1}" for k in range(len(out["explained_variance"]))]  # (up to three: fewer items, fewer axes)
    lines = [f"explained variance (axes fitted on the {out['fitted_on']:,} most-rated items): {ev}",
             "".join(f"{a:>8}" for a in axes) + "  title"]
    lines += ["".join(f"{r[a]:+8.3f}" for a in axes) + f"  {named(r)}"
              for r in out["items"]]
    if plot is not None:
        lines.append(f"plot written to {plot}")
    emit(out, as_json, "\n".join(lines))


# --- the HTTP server ------------------------------------------------------------------------------------
@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (default: this machine only).")
@click.option("--port", type=WholeRange(0, 65535), default=8000, show_default=True)
@click.option("--token", envvar="CFB_API_TOKEN", help="Require `Authorization: Bearer TOKEN` on writes [env CFB_API_TOKEN].")
@click.option("--workers", type=WholeRange(1, 64), default=1, show_default=True, help="Server processes.")
@click.option("--allow-origin", "allowed_origins", multiple=True, envvar="CFB_ALLOWED_ORIGINS",
              help="A site whose pages may write here (e.g. https://shop.example; repeatable) [env CFB_ALLOWED_ORIGINS]. "
                   "This server's own pages always may.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@pass_ctx
@fail_cleanly
def serve(ctx: Ctx, host: str, port: int, token: str | None, workers: int, log_level: str,
          allowed_origins: tuple[str, ...]) -> None:
    """Serve the JSON API, the web page (/) and the API docs (/docs) over HTTP."""
    import socket

    from ..service.http import check_token_text, serve as run_server
    from ..service.http_guards import origin_key

    if not host.strip():  # (an empty host listens on every interface: `--host "$HOST"` with HOST unset)
        raise click.BadParameter("give an address (0.0.0.0 to listen on every interface)", param_hint="--host")
    from_env = os.environ.get("CFB_API_TOKEN")  # (click takes an empty variable for an unset one)
    if (token is not None and not token.strip()) or (token is None and from_env is not None and not from_env.strip()):
        # (`--token "$TOKEN"` or `CFB_API_TOKEN=$TOKEN` with TOKEN unset: writes would be open)
        raise click.BadParameter("give a token, or leave --token out to serve without one",
                                 param_hint="--token (or $CFB_API_TOKEN)")
    try:
        check_token_text(token)
    except CfbError as e:
        raise click.BadParameter(str(e), param_hint="--token (or $CFB_API_TOKEN)") from None
    for origin in allowed_origins:
        for one in origin.replace(",", " ").split():
            if origin_key(one) is None:
                raise click.BadParameter(f"{one!r} is not an origin (scheme://host[:port], e.g. https://shop.example)",
                                         param_hint="--allow-origin")
    with ctx.engine.connect():  # a missing database file or a server that refuses is an error here, not
        pass  # a server answering every request with one
    try:  # a port in use is one line here, not uvicorn's log lines and exit status 3
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds)
            probe.bind((host, port))
    except OSError as e:
        raise CfbError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host") from None
    if port:  # (port 0: the system chooses one, which uvicorn's own line then says)
        click.echo(f"cfb serving http://{f'[{host}]' if ':' in host else host}:{port}/ (API docs at /docs)", err=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (uvicorn shuts down on it gracefully, then ends by it)
    run_server(ctx.url, host=host, port=port, token=token, workers=workers, log_level=log_level,
               allowed_origins=allowed_origins)


# --- cold start -----------------------------------------------------------------------------------------
@cli.command()
@click.option("--budget", type=WholeRange(0, 30), default=15, show_default=True,  # 30: bootstrap's MAX_BUDGET
              help="Number of items to ask about (at most 30).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def questionnaire(ctx: Ctx, budget: int, as_json: bool) -> None:
    """The signup questionnaire of the serving model."""
    from ..service.onboard import questionnaire_json

    with ctx.engine.connect() as conn:
        out = questionnaire_json(conn, budget)
    lines = ["attributes:"]
    for a in out["attributes"]:
        values = f" ({', '.join(map(shown, a['values']))})" if a.get("values") else ""
        if a.get("accepts"):
            values = f" ({a['accepts'][0]:g}..{a['accepts'][1]:g})"
        lines.append(f"  {shown(a['name'])}: {a['type']}{values}")
    lines.append("rate the ones you know (seen, read, used; the rest count as not known):")
    lines += [f"  {shown(r['item'])}: {named(r)}" for r in out["items"]]
    emit(out, as_json, "\n".join(lines))


@cli.command()
@click.option("--answers", "answers_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="JSON object, list, or JSON lines: {user?, answers?: {...}, ratings?: {item: rating}, asked?, "
                   "version?} (?: optional; asked: how many of `cfb questionnaire`'s items were shown; version: the model "
                   "version whose questionnaire was shown).")
@click.option("--skip-invalid", is_flag=True,
              help="Store the valid entries and report the others (exit status 1 when any was skipped).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def onboard(ctx: Ctx, answers_file: Path, skip_invalid: bool, as_json: bool) -> None:
    """Sign up new users from their questionnaire answers; prints each new user's id."""
    from ..cf_core.errors import InputError
    from ..service.onboard import onboard as onboard_users
    from ..service.onboard import read_answers_file

    entries = read_answers_file(answers_file)
    if not entries:  # (`[]`): refused like a pairs file with no rows
        raise InputError("no entries (an empty list): nobody to onboard", source=str(answers_file))
    out = onboard_users(ctx.engine, entries, skip_invalid=skip_invalid)
    if as_json or out["onboarded"]:
        emit(out, as_json, "\n".join(shown(u["user"]) for u in out["onboarded"]))
    if not as_json:  # (stdout holds the new ids alone; with --json the skipped entries are in its JSON)
        for s in out["skipped"]:
            click.echo(f"skipped: {shown(s['error'])}", err=True)
    if out["skipped"]:
        sys.exit(1)


@cli.command(cls=NumberArguments)  # (a negative number is a value, not an option)
@click.argument("user")
@click.argument("item")
@click.argument("rating", type=FiniteFloat())
@click.option("--new-item", is_flag=True, help="Create ITEM if it is not in the catalogue.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def rate(ctx: Ctx, user: str, item: str, rating: float, new_item: bool, as_json: bool) -> None:
    """Record USER's RATING of ITEM (id or exact title); it counts in their recommendations at once
    (`cfb retrain` then folds it into the model)."""
    from ..service.ratings import rate_item

    out = rate_item(ctx.engine, user, item, rating, create_item=new_item)
    emit(out, as_json, f"user {shown(out['user'])} rated {named(out)}: {out['rating']:g}")


# --- versions -------------------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def models(ctx: Ctx, as_json: bool) -> None:
    """List model versions."""
    from ..db import versions

    with ctx.engine.connect() as conn:
        out = versions.list_versions(conn)
    lines = []
    for v in out:
        m = v["metrics"] or {}
        rmse = f" valid RMSE {m['valid_rmse']:.4f}" if m.get("valid_rmse") is not None else ""
        seed = (v.get("hyperparams") or {}).get("seed")
        lines.append(f"{'*' if v['serving'] else ' '} {v['version']:>4}  {v['kind']:<3} {v['mode']:<11} "
                     f"{v['created']}{'' if seed is None else f' seed {seed}'}{rmse}")
    emit(out, as_json, "\n".join(lines) or "no model versions yet")


@cli.command(cls=NumberArguments)  # (a negative number is a value, not an option)
@click.argument("version", type=WholeRange(1, 2**31 - 1))
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@fail_cleanly
def rollback(ctx: Ctx, version: int, as_json: bool) -> None:
    """Serve an earlier VERSION."""
    from ..db import versions
    from ..db.engine import writing

    with writing(ctx.engine) as conn:
        versions.set_serving(conn, version)
    emit({"serving": version}, as_json, f"version {version} serving")


# --- evaluation -----------------------------------------------------------------------------------------
@cli.group("eval")
def eval_group() -> None:
    """Measure quality."""


def _ints(value: str) -> tuple[int, ...]:
    """Comma-separated non-negative integers (an empty value: none; an empty entry among others is refused)."""
    entries = value.split(",")
    if all(not x.strip() for x in entries):
        return ()
    if any(not x.strip() for x in entries):
        raise click.BadParameter(f"an empty entry in {value!r}")
    try:
        out = tuple(plain_int(x) for x in entries)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if any(x < 0 for x in out):
        raise click.BadParameter(f"expected non-negative integers, got {value!r}")
    return out


def _check_ints(ctx, param, value: str) -> str:
    """Option callback: reject a bad --seeds/--budgets/--fold-steps while parsing (the value is kept as text)."""
    from ..bootstrap.questionnaire import MAX_BUDGET

    values = _ints(value)
    if param.name == "budgets" and any(q > MAX_BUDGET for q in values):
        raise click.BadParameter(f"a questionnaire asks about 0 to {MAX_BUDGET} items, got {value!r}")
    if param.name == "fold_steps":
        from ..evaluation.coldstart import FIRST_REVEALS

        if any(n > FIRST_REVEALS for n in values):
            raise click.BadParameter(f"the fold-in curve reveals 0 to {FIRST_REVEALS} ratings (it is scored on "
                                     f"the ratings after the first {FIRST_REVEALS}), got {value!r}")
    if param.name == "seeds" and not values:
        raise click.UsageError("--seeds: give at least one seed", ctx)
    if param.name == "seeds" and max(values) > 2**32 - 1:  # (as `cfb retrain --seed`)
        raise click.BadParameter(f"a seed is a whole number from 0 to {2**32 - 1}, got {max(values)}")
    if len(set(values)) < len(values):
        raise click.BadParameter(f"{value!r} names a value twice")
    return value


def _exit_on_sigterm(signum: int, _frame) -> None:  # noqa: ANN001
    """A SIGTERM (``timeout``, ``docker stop``, systemd, a CI job's end) as an exit, as Ctrl-C is: ``finally``
    blocks run (a retrain's lock is released, an eval's temporary databases go), one line says so, and the
    exit status is 128 + 15. What was not committed is not written; the serving version stays."""
    click.echo("Aborted! (SIGTERM)", err=True)
    raise SystemExit(128 + signum)


def _check_something_to_measure(budgets: str, fold_steps: str) -> None:
    """The user protocol measures questionnaire budgets and fold-in steps: refuse to run it for neither."""
    if not _ints(budgets) and not _ints(fold_steps):
        raise click.UsageError("--budgets and --fold-steps are both empty: give at least one budget or fold-in step")


def _for_eval(error: CfbError) -> CfbError:
    """A download or reading error worded for `cfb eval`: a folder one has is given with --data, not
    ingested, and a release without its item file cannot be measured from its ratings alone."""
    import re

    from ..db.layouts import GENERIC_RATINGS, RATINGS_ALONE

    text = re.sub(r"(use|ingest it with) `cfb ingest \w+ ([^`]+)`", r"pass `--data \2`", str(error))
    return CfbError(text.replace(RATINGS_ALONE, "").replace(
        GENERIC_RATINGS, " (a generic ratings file, which `cfb eval` does not measure: it measures MovieLens and "
                         "goodbooks releases, such as ratings.csv as userId,movieId,rating,timestamp beside a movies.csv)"))


DEFAULT_EVAL_DATA = "../shared/data/ml-100k"


@eval_group.command("cold-start")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=DEFAULT_EVAL_DATA,
              show_default=True, help="A MovieLens or goodbooks folder (MovieLens 100k is downloaded if the default is absent).")
@click.option("--seeds", default="42,43,44", show_default=True, callback=_check_ints)
@click.option("--budgets", default="0,5,15,30", show_default=True, callback=_check_ints,
              help="Protocol §4b's questionnaire sizes; empty to skip.")
@click.option("--fold-steps", default="0,1,3,5,10", show_default=True, callback=_check_ints,
              help="Protocol §5; empty to skip.")
@click.option("--model", "kind", type=click.Choice(["dot", "nn"]), default="dot", show_default=True)
@click.option("--items", "new_items", is_flag=True, help="New items instead of new users (protocol §8).")
@click.option("--quiet", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@fail_cleanly
def eval_cold_start(data_dir: Path, seeds: str, budgets: str, fold_steps: str, kind: str, new_items: bool,
                    quiet: bool, as_json: bool) -> None:
    """The cold-start protocol (docs/protocol.md) through the real pipeline in a temporary database.

    --data takes any folder `cfb ingest movielens` or `cfb ingest goodbooks` reads."""
    from ..evaluation.coldstart import no_fold_in_curve, run_protocol
    from ..evaluation.report import render

    if not new_items:
        _check_something_to_measure(budgets, fold_steps)
    else:
        source = click.get_current_context().get_parameter_source
        given = [f"--{n.replace('_', '-')}" for n in ("budgets", "fold_steps")
                 if source(n) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)}: new users' settings; --items measures new items (protocol §8)")
    data_given = click.get_current_context().get_parameter_source("data_dir") is not click.core.ParameterSource.DEFAULT
    if not data_dir.exists() and not data_given:  # (a folder named by --data is that folder: never a download)
        from ..db.download import download

        try:
            data_dir = download("movielens-100k", progress=download_bar("movielens-100k", quiet))
        except CfbError as e:
            raise _for_eval(e) from None
    from ..db.layouts import release_reader

    read = release_reader(data_dir)
    seed_list = _ints(seeds)
    log = None if quiet else (lambda message: click.echo(message, err=True))
    if log:
        log(f"running the protocol on {data_dir} for seeds {', '.join(map(str, seed_list))} ...")
    from ..cf_core.train import TrainingDiverged

    try:
        try:
            ds = read(data_dir)
        except CfbError as e:
            raise _for_eval(e) from None
        why = None if new_items or _ints(budgets) else no_fold_in_curve(ds.ratings, seed_list)
        if why:
            raise click.UsageError(f"--budgets is empty, and there is no fold-in curve (§5) to measure either "
                                   f"(the data: {why}): give a budget")
        if new_items:
            from ..evaluation import item_coldstart

            out = {"data": str(data_dir.resolve()),
                   **item_coldstart.run_items_protocol(ds, seed_list, kind, progress=not quiet, log=log)}
            emit(out, as_json, item_coldstart.render(out))
            return
        out = {"data": str(data_dir.resolve()),  # (budgets in order, as the fold-in's steps are)
               **run_protocol(ds, seed_list, tuple(sorted(_ints(budgets))), _ints(fold_steps), kind,
                              progress=not quiet, log=log)}
    except TrainingDiverged as e:  # (its advice names `cfb retrain`'s options, which eval does not take)
        raise CfbError(str(e).split("; ")[0] + f"; cfb eval trains with `cfb retrain --full`'s defaults, which "
                       f"did not fit this data's training split ({len(ds.ratings):,} ratings in all): with more "
                       "data they may, or `cfb retrain --full` on it can try other settings") from None
    emit(out, as_json, render(out))
