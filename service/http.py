"""`cfb serve`: the JSON API and the web page over one database (FastAPI, served by uvicorn).

Every answer is what the CLI's ``--json`` prints for the same question, computed by the same
service functions (numpy only: no torch in the server process). A user's recommendations are
computed from their stored answers and ratings, so a rating counts at once; the serving version is
read from the database too, so a version written by another process (a retrain, a rollback) is
served from the next request on. An answer is kept while nothing it depends on changed: each
request checks that first, in one SQLite statement (none while the database is unchanged).

Reads run on the event loop (each is a few SQLite reads and a little numpy: faster than a hop to
the thread pool, measured in bench/bench_http.py); writes run in the thread pool, since a write may
wait for the database's write lock. On SQLite, GET /users/{user}/recommendations is answered by an
ASGI middleware in front of FastAPI's routing (``FastRecommendations``) that reads the same rows
with the driver's own cursor (``_FastReader``); its answers and errors equal the route's and
``serving.recommend``'s (tests/test_http.py, tests/test_http_fast.py check it)."""
from __future__ import annotations

import asyncio
import hmac
import inspect
import itertools
import json
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable
from html import escape
from pathlib import Path
from string import Template
from typing import NamedTuple
from urllib.parse import parse_qsl, quote, urlsplit

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.concurrency import run_in_threadpool
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles

from ..bootstrap.questionnaire import MAX_BUDGET
from ..cf_core.errors import (CannotAnswerError, CfbError, InputError, NotReadyError, UnknownIdError, UserExistsError,
                              cut, json_shown)
from ..cf_core.model import UserHistory
from ..db import store, versions
from ..db.engine import (BUSY, EMPTY_DATABASE, database_error, is_busy, is_missing_table, make_engine, sqlite_file,
                         writing)
from . import serving
from .state import Served, changed_again, learned_values, load_served

MAX_BODY = 64 * 1024  # bytes: larger request bodies are refused with 413
MAX_N = 100
MAX_MIN_RATINGS = 10**9  # min_ratings' bound: more than any item has (a larger int does not fit numpy's compare)
WEB = Path(__file__).parent / "web"
POLL_S = 0.25  # how often the server looks for a new serving version to load ahead of requests
# writes let wait for the database's one writer at once, each holding a pooled connection meanwhile; the
# others wait for a turn holding none, so that the pool (15 connections) never runs dry for the reads
WAITING_WRITERS = 4


class IdConvertor(PathConvertor):
    """A user or item id in a path: any text, slashes and line breaks included (Starlette's ``path``
    matches no line break, so such an id got a bare "Not Found" instead of "unknown user ...")."""

    regex = "(?s:.*)"


register_url_convertor("id", IdConvertor())  # (the routes below name it: ``{user:id}``)


class ApiError(Exception):
    """An error answered as ``{"error": message[, "field": name]}`` with an HTTP status."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "string", "description": "the problem, one line"},
    "field": {"type": "string", "description": "the parameter or body field at fault, where there is one"}}}


COMMON_ERRORS = {  # error answers any route may give, for the OpenAPI schema
    "503": "no database, nothing ingested or no trained model yet; or a write that waited out another "
           "writer (with Retry-After)",
    "post": {"401": "this server has a token and the request did not give it (`Authorization: Bearer <token>`)",
             "403": "a write sent by another site's page (its Origin is not allowed)",
             "413": "a body over 64 KiB"}}


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    """``obj`` as JSON (UTF-8, like the CLI's ``--json``)."""
    body = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return Response(body, status_code=status, media_type="application/json", headers=headers)


ERROR_STATUS = ((UnknownIdError, 404), (NotReadyError, 503), (CannotAnswerError, 409))  # any other CfbError: 422


def _error_status(e: CfbError) -> int:
    return next((status for kind, status in ERROR_STATUS if isinstance(e, kind)), 422)


def error_response(e: ApiError | CfbError) -> Response:
    """An error's answer: ``{"error": message[, "field": name]}`` with its HTTP status."""
    if isinstance(e, ApiError):
        body, field, status, headers = {"error": e.message}, e.field, e.status, e.headers
    else:
        body, status, headers = {"error": str(e)}, _error_status(e), None
        field = e.field
    if field:
        body["field"] = field
    return json_response(body, status, headers)


QUERY_INT = TypeAdapter(int)


def recommendation_query(query_string: bytes) -> tuple[int, str]:
    """(n, by) from the query string of GET /users/{user}/recommendations, checked as its schema says
    (ApiError 422 naming the parameter); of a repeated parameter the last counts, as in Starlette."""
    query = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
    raw_n, by = query.get("n", "10"), query.get("by", "rank")
    try:
        n = QUERY_INT.validate_python(raw_n)  # (what FastAPI takes for an int on every other route)
    except ValidationError as e:
        raise ApiError(422, f"query parameter 'n': {e.errors()[0]['msg']}", "n") from None
    if not 1 <= n <= MAX_N:
        bound = "greater than or equal to 1" if n < 1 else f"less than or equal to {MAX_N}"
        raise ApiError(422, f"query parameter 'n': Input should be {bound}", "n")
    if by not in ("rank", "rating"):
        raise ApiError(422, "query parameter 'by': Input should be 'rank' or 'rating'", "by")
    return n, by


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def rating_choices(scale: tuple[float, float], step: float | None) -> list[float]:
    """The ratings the web page offers: each step of the scale (the step its first ingest fixed; else
    whole stars, half stars on a scale that starts at a half, or tenths of a scale narrower than two
    stars), or 11 of them spread evenly where there would be over 101."""
    lo, hi = scale
    if step is None:
        step = 0.5 if lo % 1 else 1.0
        if hi - lo < 2 * step:
            step = (hi - lo) / 10 or 1.0
    n = int(round((hi - lo) / step))
    k = np.round(np.linspace(0, n, 11)) if n > 100 else np.arange(n + 1)
    return [round(lo + float(x) * step, 10) for x in k]


def origin_key(origin: str) -> str | None:
    """``scheme://host[:port]`` as a browser sends it in ``Origin`` (lower case, no default port, no
    trailing slash), or None when ``origin`` is not an http(s) origin."""
    try:
        u = urlsplit(origin.strip())
        port = u.port
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") or u.query or u.fragment:
        return None
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    default = {"http": 80, "https": 443}[u.scheme]
    return f"{u.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


class LocalHostsOnly:
    """ASGI middleware for a server bound to this machine only: a request naming another host in its
    ``Host`` header (a page of another site whose name was re-pointed at 127.0.0.1: DNS rebinding) gets
    400, unless that host is one of ``allowed`` (the hosts of ``--allow-origin``)."""

    def __init__(self, app, allowed: frozenset[str] = frozenset()):
        self.app, self.allowed = app, LOOPBACK_NAMES | allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
            if name not in self.allowed:
                await error_response(ApiError(400, f"this server answers for this machine only, not for host "
                                                   f"{host!r} (`cfb serve --allow-origin` names another)"))(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request whose declared Content-Length is over ``max_body`` gets 413 at once
    (a chunked body is counted while it is read: see ``read_json``)."""

    def __init__(self, app, max_body: int = MAX_BODY):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length":
                    try:
                        too_big = int(value) > self.max_body
                    except ValueError:
                        too_big = None
                    if too_big is not False:
                        status, msg = (413, f"request body over {self.max_body} bytes") if too_big else (
                            400, "invalid Content-Length")
                        await json_response({"error": msg}, status)(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


class DatabaseFileGone:
    """ASGI middleware: while the SQLite file is not at its path (deleted under a running server), every
    request but a static file's is 503, not read from or written into the deleted file that the
    server's connections still hold; ``present()`` says whether it is there (and moves the server to a
    file made again there before the request goes on); ``page(message)`` answers a browser."""

    def __init__(self, app, file: Path, present: Callable[[], bool], page: Callable[[str], Response]):
        self.app, self.file, self.present, self.page = app, file, present, page

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope["path"].startswith("/static/") and not self.present():
            message = f"no database at {self.file} (deleted while this server runs): `cfb ingest …` makes one"
            browser = any(name == b"accept" and b"text/html" in value for name, value in scope["headers"])
            answer = self.page(message) if browser else json_response({"error": message}, 503, {"Retry-After": "10"})
            await answer(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --- fast reads on SQLite ---------------------------------------------------------------------
class _Cached(NamedTuple):
    """A computed answer and what it depends on (``_FastReader.cache``)."""

    state: tuple  # SQL_STATE's row less its last two columns, when the answer was computed
    root: int  # the serving version's full ancestor then
    ids: str  # the answer's item ids (JSON)
    body: bytes  # the answer (JSON)
    seq: int  # every rating's latest seq when ``state`` was last confirmed
    checked: tuple | None  # (the connection's number, its PRAGMA data_version) then


class _ThreadOwned:
    """Lives as long as a thread's local values (``_FastReader._conn``)."""


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass


class _FastReader:
    """A user's recommendations read with the SQLite driver's own cursor (one connection per thread,
    one read transaction per computed answer): the rows ``state.user_history`` reads, without the cost
    of building SQLAlchemy statements for each, and the JSON answer reused while nothing it depends on
    changed."""

    SCAN_MAX = 200  # over this many ratings written since an answer was confirmed: recompute it
    SQL_VERSION = "SELECT value FROM settings WHERE key = 'serving_version'"
    # :ids (a JSON list of item ids) -> '[[id, external id, title], ...]' in that order
    SQL_TITLES = ("(SELECT json_group_array(json_array(id, external_id, title)) FROM (SELECT i.id, i.external_id, "
                  "i.title FROM json_each(:ids) AS j JOIN items AS i ON i.id = j.value ORDER BY j.key))")
    # What an answer depends on, in one statement (one snapshot): the serving version; the user's id,
    # attributes and signup answers; whether the version's full ancestor (:root) has trained factors for
    # them; their ratings' count; the answer's items' titles; then every rating's latest seq, and whether
    # the user has a rating with seq > :seq (1 too when over SCAN_MAX ratings were written since :seq).
    # A new or changed rating gets seq = max(seq) + 1 (db/store.py: seq order is commit order), so the
    # user's ratings are the same as when all ratings' latest seq was :seq iff their count is the same
    # and none has seq > :seq: found on the seq index (``+user_id``: not on the user's every rating).
    SQL_STATE = ("SELECT (SELECT value FROM settings WHERE key = 'serving_version'), u.id, u.attributes, a.ratings, "
                 "EXISTS (SELECT 1 FROM user_factors f WHERE f.user_id = u.id AND f.version_id = :root), "
                 "(SELECT count(*) FROM ratings r WHERE r.user_id = u.id), " + SQL_TITLES + ", "
                 "(SELECT max(seq) FROM ratings), "
                 f"CASE WHEN (SELECT max(seq) FROM ratings) - :seq > {SCAN_MAX} THEN 1 "
                 "ELSE EXISTS (SELECT 1 FROM ratings r WHERE r.seq > :seq AND +r.user_id = u.id) END "
                 "FROM users u LEFT JOIN answers a ON a.user_id = u.id WHERE u.external_id = :user")
    SQL_FACTORS = "SELECT bias, factors FROM user_factors WHERE user_id = ? AND version_id = ?"
    SQL_RATINGS = "SELECT item_id, rating, seq, prev_rating, prev_seq FROM ratings WHERE user_id = ? ORDER BY seq"
    SQL_ASKED = "SELECT asked FROM answers WHERE user_id = ?"
    SQL_REPLACED = "SELECT item_id, seq, rating FROM replaced_ratings WHERE user_id = ? AND seq <= ? ORDER BY seq"
    SQL_RATINGS_BEFORE_HISTORY = "SELECT item_id, rating, seq, NULL, NULL FROM ratings WHERE user_id = ? ORDER BY seq"

    def __init__(self, engine: Engine, cache_size: int = 10_000):
        self.engine = engine
        # (keyed by ``generation`` too: a request still running on a connection to a file made again
        # never fills them for the requests on the new file)
        self.roots: dict[tuple[int, int], int] = {}  # version -> its full ancestor (versions never change)
        self.item_ids: dict[tuple[int, str], int] = {}  # external id -> database id (neither ever changes)
        self.served: dict = {}  # the last few versions' state.Served (what load_served caches)
        # (user, n, by) -> _Cached: a user asking again with nothing changed gets the same body without
        # recomputing it; any change (a rating gets a new seq) recomputes at once. While the connection
        # that last confirmed an answer reads the same PRAGMA data_version, no other connection or
        # process has committed anything since, so nothing needs reading again.
        self.cache: dict[tuple, _Cached] | None = {} if cache_size > 0 else None
        self.cache_size = cache_size
        self.local = threading.local()  # each thread's own connection
        self._tokens = itertools.count()
        self.generation = 0  # ``reopen`` makes every thread open a new connection

    def reopen(self) -> None:
        """Drop every thread's connection and everything read from the file: it was made again (its
        version 1 is another model, its ids other items)."""
        self.generation += 1
        for known in (self.cache, self.roots, self.item_ids, self.served):
            if known is not None:
                known.clear()

    def _root(self, version: int) -> int:
        key = (self.local.generation, version)
        root = self.roots.get(key)
        if root is None:
            with self.engine.connect() as conn:
                root = self.roots[key] = versions.chain(conn, version)[0]
        return root

    def _conn(self) -> tuple[sqlite3.Connection, int]:
        """This thread's connection (the engine's: WAL, busy timeout, autocommit; kept out of the pool),
        and a number naming it that is never reused (the cache keeps that, not the connection)."""
        conn = getattr(self.local, "conn", None)
        if conn is not None and self.local.generation != self.generation:
            _close_quietly(conn)
            conn = None
        if conn is None:
            self.local.generation = self.generation
            raw = self.engine.raw_connection()
            conn = self.local.conn = raw.driver_connection
            raw.detach()  # this thread's for good: no pool checkout per request
            self.local.token = next(self._tokens)
            # when the thread ends its local values go, and the connection is closed with them
            self.local.owner = _ThreadOwned()
            weakref.finalize(self.local.owner, _close_quietly, conn)
        return conn, self.local.token

    def answer(self, user: str, n: int, by: str) -> bytes:
        """``user``'s top ``n`` as the JSON body of ``serving.recommend``'s answer (UTF-8), from the cache
        when nothing it depends on changed since it was computed."""
        user = user.strip()  # (surrounding spaces aside, as ``store.user_id_of`` and every reader)
        conn, token = self._conn()
        key = (user, n, by)
        hit = mark = None
        if self.cache is not None:
            mark = (token, conn.execute("PRAGMA data_version").fetchone()[0])  # before any read below
            hit = self.cache.get(key)
        if hit is not None:
            if hit.checked == mark:
                return hit.body
            row = conn.execute(self.SQL_STATE, {"root": hit.root, "ids": hit.ids, "seq": hit.seq,
                                                "user": user}).fetchone()
            if row is not None and row[:-2] == hit.state and not row[-1]:
                self.cache[key] = hit._replace(seq=row[-2] or 0, checked=mark)
                return hit.body
        fresh = self._fresh(conn, user, n, by)
        if self.cache is not None:
            if len(self.cache) >= self.cache_size and key not in self.cache:
                try:
                    self.cache.pop(next(iter(self.cache)), None)  # the oldest entry
                except (RuntimeError, StopIteration):  # another thread changed it meanwhile
                    pass
            self.cache[key] = fresh._replace(checked=mark)
        return fresh.body

    def _fresh(self, conn: sqlite3.Connection, user: str, n: int, by: str) -> _Cached:
        """The answer computed in one read transaction, with what it depends on."""
        cur = conn.cursor()
        cur.execute("BEGIN")  # one snapshot for every read below
        try:
            row = cur.execute(self.SQL_VERSION).fetchone()
            if not row or not row[0]:
                raise NotReadyError(versions.NO_MODEL)
            version = int(row[0])
            served, root = self._served(version), self._root(version)
            row = cur.execute(self.SQL_STATE, {"root": root, "ids": "[]", "seq": 1 << 62, "user": user}).fetchone() \
                if store.can_exist(user) else None  # (as ``store.user_id_of``)
            if row is None:
                raise UnknownIdError(f"unknown user {store.shown_id(user)}", field="user")
            uid, attrs, answer = row[1:4]
            bias, factors = cur.execute(self.SQL_FACTORS, (uid, root)).fetchone() or (None, None)
            top, scores = self._compute(cur, served, uid, attrs, answer, bias, factors, n, by)
            ids = json.dumps([int(i) for i in served.model.item_ids[top]])
            titles = cur.execute("SELECT " + self.SQL_TITLES, {"ids": ids}).fetchone()[0]
        finally:
            cur.execute("COMMIT")
            cur.close()
        found = {i: (item, title) for i, item, title in json.loads(titles)}
        items = [{"item": found[i][0], "title": found[i][1], "score": round(float(s), 4)}
                 for i, s in zip(json.loads(ids), scores)]
        body = json.dumps({"user": user, "items": items}, ensure_ascii=False, allow_nan=False).encode("utf-8")
        return _Cached(row[:-3] + (titles,), root, ids, body, row[-2] or 0, None)

    def _compute(self, cur, served, uid, attrs, answer, bias, factors, n: int, by: str):
        """(top inner items, their predicted ratings): what ``serving.recommend`` computes."""
        attrs = json.loads(attrs) if isinstance(attrs, str) else attrs
        try:
            rows = cur.execute(self.SQL_RATINGS, (uid,)).fetchall()
        except sqlite3.OperationalError as e:  # a table from before prev_rating/prev_seq (its next writer adds them)
            if "no such column" not in str(e):
                raise
            rows = cur.execute(self.SQL_RATINGS_BEFORE_HISTORY, (uid,)).fetchall()
        if rows:
            arr = np.array(rows, dtype=np.float64)  # (NULL -> nan)
            items, ratings, seq = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.float32), arr[:, 2]
            prev, prev_seq = arr[:, 3], np.where(np.isnan(arr[:, 4]), -1, arr[:, 4]).astype(np.int64)
        else:
            items, ratings, seq = np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0)
            prev, prev_seq = np.zeros(0), np.zeros(0, np.int64)
        row_ = None
        if factors is not None:
            row_ = (np.frombuffer(factors, dtype="<f4").astype(np.float32), float(bias))
        signup = frozenset()
        answer = json.loads(answer) if isinstance(answer, str) else answer
        if answer:
            signup = frozenset(self._item_ids(cur, [str(k) for k in answer]))
        asked = None
        if answer is not None:  # a signup: how many questionnaire items it showed (an answers row never changes)
            try:
                asked = cur.execute(self.SQL_ASKED, (uid,)).fetchone()[0]
            except sqlite3.OperationalError as e:  # a table from before ``asked`` (its next signup adds it)
                if "no such column" not in str(e):
                    raise
        learned = None
        if row_ is not None:
            replaced = None
            if changed_again(seq, prev_seq, served.root_seq).any():
                try:
                    found = np.array(cur.execute(self.SQL_REPLACED, (uid, served.root_seq)).fetchall(),
                                     np.float64).reshape(-1, 3)
                except sqlite3.OperationalError as e:  # a database whose next writer has yet to start the log
                    if "no such table" not in str(e):
                        raise
                    found = np.zeros((0, 3))
                replaced = (found[:, 0].astype(np.int64), found[:, 1].astype(np.int64), found[:, 2])
            learned = learned_values(items, seq, prev, prev_seq, served.root_seq, replaced)
        history = UserHistory(attrs or {}, items, ratings, newer=seq > served.root_seq, signup_items=signup,
                              trained_row=row_, learned_values=learned, asked=asked)
        model = served.model
        vector = model.user_vector(history)
        top = model.recommend(vector, model.item_index(history.items), n, by)
        scores = model.predict(vector, top)
        return top, scores

    def _item_ids(self, cur, keys: list[str]) -> list[int]:
        gen = self.local.generation
        missing = [k for k in keys if (gen, k) not in self.item_ids]
        for start in range(0, len(missing), 900):
            part = missing[start:start + 900]
            self.item_ids.update(((gen, e), i) for e, i in cur.execute(
                f"SELECT external_id, id FROM items WHERE external_id IN ({','.join('?' * len(part))})", part))
        found = [self.item_ids.get((gen, k)) for k in keys]
        return [i for i in found if i is not None]

    def _served(self, version: int):
        key = (self.local.generation, version)
        served = self.served.get(key)
        if served is None:
            with self.engine.connect() as conn:
                served = load_served(conn, version)
            while len(self.served) >= 4:  # a long-running server sees many versions: keep the latest few
                try:
                    self.served.pop(next(iter(self.served)), None)
                except (RuntimeError, StopIteration):  # another thread changed it meanwhile
                    break
            self.served[key] = served
        return served


class FastRecommendations:
    """ASGI middleware: ``GET /users/{user}/recommendations`` answered from ``_FastReader.answer`` without
    FastAPI's routing, parameter and response machinery, which cost many times what a cached answer
    does (the hottest endpoint; bench/bench_http.py), with the route's body, status and errors; every
    other request goes on to ``app``."""

    PREFIX, SUFFIX = "/users/", "/recommendations"

    def __init__(self, app, fast: _FastReader, in_threadpool: bool = False):
        self.app, self.fast, self.in_threadpool = app, fast, in_threadpool

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        user = ""
        if (scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path")
                and path.startswith(self.PREFIX) and path.endswith(self.SUFFIX)):
            user = path[len(self.PREFIX):-len(self.SUFFIX)]
        if not user:  # the route's {user} is non-empty (and may hold a "/", as an id may)
            await self.app(scope, receive, send)
            return
        try:
            n, by = recommendation_query(scope["query_string"])
            if self.in_threadpool:
                body = await run_in_threadpool(self.fast.answer, user, n, by)
            else:
                body = self.fast.answer(user, n, by)
        except (ApiError, CfbError) as e:
            await error_response(e)(scope, receive, send)
            return
        except Exception as e:
            if not is_missing_table(e):
                raise
            await error_response(NotReadyError(EMPTY_DATABASE))(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


# --- one signup, without reading the whole catalogue ------------------------------------------------
class _Lookup:
    """A read-only mapping answered by one query per key (``get``, ``in``), for ``SignupValidator``; a key
    that ``possible`` refuses (an id no row can have) is missing without a query. ``prefetch`` answers
    many keys in one query where the lookup has a ``batch`` statement (``keys``: a list parameter)."""

    PREFETCH_MAX = 500  # keys a prefetch asks for in one statement (the rest are looked up one by one)

    def __init__(self, conn, stmt, many: bool = False, possible: Callable[[str], bool] = store.can_exist,
                 batch=None):  # noqa: ANN001
        self.conn, self.stmt, self.many, self.possible, self.batch, self.seen = conn, stmt, many, possible, batch, {}

    def prefetch(self, keys) -> None:  # noqa: ANN001
        """Look up ``keys`` (those not seen yet, up to PREFETCH_MAX) in one query (one-to-one lookups)."""
        wanted = list(dict.fromkeys(k for k in map(str, keys) if k not in self.seen and self.possible(k)))
        wanted = wanted[:self.PREFETCH_MAX]
        if self.batch is None or self.many or not wanted:
            return
        found = dict(self.conn.execute(self.batch, {"keys": wanted}).all())
        self.seen.update({k: found.get(k) for k in wanted})

    def get(self, key, default=None):
        key = str(key)
        if key not in self.seen:
            rows = self.conn.execute(self.stmt, {"key": key}).scalars().all() if self.possible(key) else []
            self.seen[key] = rows if self.many else (rows[0] if rows else None)
        value = self.seen[key]
        return default if value is None or value == [] else value

    def __contains__(self, key) -> bool:
        return self.get(key) is not None


def signup_one(engine: Engine, entry: dict, where: str = "request body") -> dict:
    """``onboard(engine, [(where, entry)])`` for one entry: the same checks (``SignupValidator.validate``)
    and the same rows (``store_signup``), with the catalogue and the users looked up per key instead of
    read whole (a signup costs the same with 1,000 or 1,000,000 users)."""
    from sqlalchemy import bindparam, select

    from ..db import store
    from ..db.schema import Item, User
    from .onboard import SignupValidator, store_signup

    # an item's external id and database id never change (items are never deleted or renumbered): the
    # entry's items are looked up once, in one query, and the ids found reused under the write lock (a
    # miss is asked again there: another writer may have added that id meanwhile)
    items = _Lookup(None, select(Item.id).where(Item.external_id == bindparam("key")),
                    batch=select(Item.external_id, Item.id).where(Item.external_id.in_(bindparam("keys", expanding=True))))

    def validator_on(conn: Connection, served: Served) -> SignupValidator:
        items.conn = conn
        return SignupValidator(
            conn, served, items=items,
            titles=_Lookup(conn, select(Item.external_id).where(Item.title == bindparam("key")), many=True,
                           possible=lambda title: "\x00" not in title),  # (as ``serving.find_item``)
            all_titles=lambda: store.item_title_list(conn),  # (read on an unknown item only)
            known_users=_Lookup(conn, select(User.id).where(User.external_id == bindparam("key"))))

    with engine.connect() as conn:  # bad input is found here, outside the write lock (an unknown item's
        validator = validator_on(conn, load_served(conn))  # hint reads every title)
        if isinstance(entry.get("ratings"), dict):
            items.prefetch(str(key).strip() for key in entry["ratings"])
        validator.validate(where, entry)
    items.seen = {key: found for key, found in items.seen.items() if found is not None}
    with writing(engine) as conn:
        served = load_served(conn)
        validator = validator_on(conn, served)
        signup = validator.validate(where, entry)
        if signup.user is None:  # onboard's `new-N` (N = the next row id), without reading every user
            n = int(conn.scalar(select(User.id).order_by(User.id.desc()).limit(1)) or 0) + 1
            while f"new-{n}" in validator.known_users:
                n += 1
            signup.user = f"new-{n}"
        external, _ = store_signup(conn, served, signup)
    return {"version": served.version, "onboarded": [{"user": external, "ratings": len(signup.ratings)}],
            "skipped": []}


def _file_identity(path: Path | None) -> tuple[int, int] | None:
    """(device, inode) of a database file, to tell a file made again at the same path (None: no file)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# --- the app ---------------------------------------------------------------------------------------
def _page(title: str, body: str, token_required: bool = False) -> HTMLResponse:
    base = Template((WEB / "templates" / "base.html").read_text(encoding="utf-8"))
    return HTMLResponse(base.substitute(title=escape(title), body=body,
                                        token_required="true" if token_required else "false"))


def _wants_html(request: Request) -> bool:
    """A browser's GET (its Accept header names text/html; an API client's says */* or JSON)."""
    return request.method in ("GET", "HEAD") and "text/html" in request.headers.get("accept", "")


def _item_href(item: str) -> str:
    return escape("/item/" + quote(str(item), safe=""))


def _user_href(user: str) -> str:
    return escape("/user/" + quote(str(user), safe=""))


def _name(entry: dict) -> str:
    return escape(str(entry.get("title") or entry.get("item")))


def check_token_text(token: str | None) -> str | None:
    """A bearer token a client can send: printable ASCII (HTTP header values are read as Latin-1, and
    browsers refuse to send other characters in one), with no space at either end."""
    if token is not None and (not token.isascii() or not token.isprintable() or token != token.strip()):
        raise CfbError("the token must be printable ASCII characters with no space at either end "
                       "(what an HTTP header carries as it is)")
    return token


def create_app(engine_or_url: Engine | str | None = None, token: str | None = None, max_body: int = MAX_BODY,
               fast_path: bool = True, reads_in_threadpool: bool | None = None,
               cache_size: int | None = None, allowed_origins: tuple[str, ...] | None = None,
               local_hosts_only: bool | None = None) -> FastAPI:
    """The API and web page over ``engine_or_url`` (an Engine or a database URL; None: the CLI's default).

    With ``token``, every request that writes must carry ``Authorization: Bearer <token>``. A write
    from a browser page is taken from this server's own origin (its ``Host``, or ``X-Forwarded-Host``
    behind a proxy) and from ``allowed_origins`` (default ``$CFB_ALLOWED_ORIGINS``, comma-separated,
    e.g. ``https://shop.example``), never from another site's page. ``local_hosts_only`` (default
    ``$CFB_LOCAL_HOSTS_ONLY``; `cfb serve` on a loopback address sets it): requests must name this
    machine (or an allowed origin's host) in ``Host``.
    ``reads_in_threadpool`` (default: ``$CFB_HTTP_READS == "thread"``) computes recommendations in
    the thread pool instead of on the event loop: slower, measured by bench/bench_http.py.
    ``cache_size`` (default ``$CFB_HTTP_CACHE`` or 10,000; 0: none) bounds the users whose last
    answer is kept for when they ask again with nothing changed."""
    if cache_size is None:
        cache_size = int(os.environ.get("CFB_HTTP_CACHE") or 10_000)
    if reads_in_threadpool is None:
        reads_in_threadpool = os.environ.get("CFB_HTTP_READS", "") == "thread"
    if allowed_origins is None:
        allowed_origins = tuple(os.environ.get("CFB_ALLOWED_ORIGINS", "").replace(",", " ").split())
    allowed = {key for key in map(origin_key, allowed_origins) if key}
    if local_hosts_only is None:
        local_hosts_only = os.environ.get("CFB_LOCAL_HOSTS_ONLY", "") == "1"
    engine = engine_or_url if isinstance(engine_or_url, Engine) else make_engine(engine_or_url)
    on_file = engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:")
    fast = _FastReader(engine, cache_size) if fast_path and on_file else None  # (it keeps its own connections)
    token = check_token_text(token or None)

    async def _poll_versions() -> None:
        """Load a new serving version into memory as soon as it appears (before a request needs it)."""
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await run_in_threadpool(_load_serving)
            except Exception:  # noqa: BLE001 - an empty or busy database: the requests will say so
                pass

    file = sqlite_file(engine.url.render_as_string(hide_password=False))
    seen_file = [_file_identity(file)]

    follow_lock = threading.Lock()

    def _follow_file() -> bool:
        """Whether the database file is there; one made again at its path (a new quickstart) since the
        last look is the one read and written from now on (every connection held the old file)."""
        now = _file_identity(file)
        if now is not None and now != seen_file[0]:
            with follow_lock:
                if now != seen_file[0]:
                    engine.dispose()
                    if fast is not None:
                        fast.reopen()
                    seen_file[0] = now
        return now is not None

    def _load_serving() -> None:
        _follow_file()
        with engine.connect() as conn:
            if versions.serving_version(conn) is not None:
                load_served(conn)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(_poll_versions())
        try:
            yield
        finally:
            task.cancel()

    extra = {}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:  # FastAPI >= 0.16x: no tracing hooks
        extra["telemetry"] = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    app = FastAPI(title="cfb", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan, **extra,
                  description="Cold-start collaborative filtering: the same answers as the `cfb` CLI's `--json`. "
                              "Writing endpoints need `Authorization: Bearer <token>` when the server has a token.")
    app.state.engine = engine

    # --- plumbing: errors, body limit, auth ---------------------------------------------------
    pages: set[Callable] = set()  # the web pages' endpoints (``page``): their errors are answered as HTML pages

    def page(path: str) -> Callable[[Callable], Callable]:
        """``app.get(path)`` for a web page: HTML (its errors too, by ``answer_error``), not in the API schema."""
        def register(endpoint: Callable) -> Callable:
            pages.add(endpoint)
            return app.api_route(path, methods=["GET", "HEAD"], response_class=HTMLResponse,  # (HEAD: monitors)
                                 include_in_schema=False)(endpoint)
        return register

    def api_get(path: str, **kwargs) -> Callable[[Callable], Callable]:
        """``app.get(path, **kwargs)``, answering HEAD too (a monitor's or a cache's probe)."""
        def register(endpoint: Callable) -> Callable:
            app.head(path, include_in_schema=False)(endpoint)
            return app.get(path, **kwargs)(endpoint)
        return register

    def error_page(message: str, status: int, headers: dict | None = None) -> HTMLResponse:
        """A web page's error: its one-line message (escaped) and a link back, with the API's status."""
        body = (f"<h1>cfb</h1><p class='error' role='alert'>{escape(message)}</p>"
                f"<p><a id='back' href='/'>Back to the start page</a></p>")
        page_ = _page("cfb: error", body, token is not None)
        page_.status_code = status
        page_.headers.update(headers or {})
        return page_

    def answer_error(request: Request, e: ApiError | CfbError) -> Response:
        """``error_response(e)`` (JSON), or on a web page the same message and status as an HTML page; an
        address no route has is answered as a page to a browser (which asks for HTML first)."""
        endpoint = request.scope.get("endpoint")
        if endpoint not in pages and not (endpoint is None and _wants_html(request)):
            return error_response(e)
        if isinstance(e, ApiError):
            return error_page(e.message, e.status, e.headers)
        return error_page(str(e), _error_status(e))

    @app.exception_handler(ApiError)
    @app.exception_handler(CfbError)
    async def _api_error(request: Request, e: ApiError | CfbError):
        return answer_error(request, e)

    @app.exception_handler(OperationalError)
    @app.exception_handler(ProgrammingError)
    async def _database_error(request: Request, e: OperationalError | ProgrammingError):
        if is_busy(e):  # a write that waited out the busy timeout behind another writer (a long ingest)
            return answer_error(request, ApiError(503, BUSY, headers={"Retry-After": "10"}))
        if is_missing_table(e):
            return answer_error(request, NotReadyError(EMPTY_DATABASE))
        if isinstance(e, OperationalError):  # the database went away (a server stopped, a file unreadable)
            return answer_error(request, ApiError(503, str(database_error(e)), headers={"Retry-After": "10"}))
        raise e

    @app.exception_handler(PoolTimeoutError)
    async def _pool_timeout(request: Request, e: PoolTimeoutError):  # every pooled connection busy past the wait
        return answer_error(request, ApiError(503, "the server is busy: try again shortly", headers={"Retry-After": "10"}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        loc = [str(x) for x in err.get("loc", ())]
        field = loc[-1] if loc else None
        where = f"{loc[0]} parameter '{field}'" if len(loc) >= 2 and loc[0] in ("query", "path") else f"field '{field}'"
        return answer_error(request, ApiError(422, f"{where}: {err.get('msg', 'invalid')}", field))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        headers = getattr(e, "headers", None)
        methods = allowed_methods(request.scope) if e.status_code == 405 else []
        if methods:  # every method a route of the path takes (Starlette names the first route's; a mount its own)
            headers = {**(headers or {}), "Allow": ", ".join(methods)}
        return answer_error(request, ApiError(e.status_code, str(e.detail), headers=headers))

    def allowed_methods(scope: dict) -> list[str]:
        """The methods the routes matching the request's path take (GET's HEAD included)."""
        from starlette.routing import Match

        return sorted({m for r in app.router.routes if getattr(r, "methods", None)
                       and r.matches(scope)[0] != Match.NONE for m in r.methods})

    if fast is not None:  # inside BodyLimit: a GET with a body over the limit is still refused
        app.add_middleware(FastRecommendations, fast=fast, in_threadpool=reads_in_threadpool)
    app.add_middleware(BodyLimit, max_body=max_body)
    if file is not None:  # before the fast path: nothing is read from a deleted file
        app.add_middleware(DatabaseFileGone, file=file, present=_follow_file,
                           page=lambda message: error_page(message, 503, {"Retry-After": "10"}))
    if allowed:  # an allowed site's page asks the browser first (a JSON body or a token is not a "simple"
        # request) and may read the answers: CORS for those sites only, answered before any route
        app.add_middleware(CORSMiddleware, allow_origins=sorted(allowed), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"],
                           expose_headers=["Location", "Retry-After"], max_age=600)
    if local_hosts_only:  # outermost: before anything is read
        app.add_middleware(LocalHostsOnly, allowed=frozenset(urlsplit(o).hostname for o in allowed))

    waiting_writers = threading.BoundedSemaphore(WAITING_WRITERS)

    def one_writer_of_few(write: Callable[[], object]) -> Callable[[], object]:
        """``write`` (run in the thread pool) once it is one of the ``WAITING_WRITERS`` writes let wait
        for the database's writer; a write that gets no turn within the busy timeout is answered as busy."""
        from ..db import engine as engine_module

        def gated():  # noqa: ANN202
            if not waiting_writers.acquire(timeout=engine_module.BUSY_TIMEOUT_MS / 1000):
                raise ApiError(503, BUSY, headers={"Retry-After": "10"})
            try:
                return write()
            finally:
                waiting_writers.release()

        return gated

    async def read_json(request: Request) -> dict:
        """The request body as a JSON object, at most ``max_body`` bytes (also when chunked)."""
        from starlette.requests import ClientDisconnect

        size, chunks = 0, []
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise ApiError(413, f"request body over {max_body} bytes")
                chunks.append(chunk)
        except ClientDisconnect:  # (nobody reads the answer; not a server error to log)
            raise ApiError(400, "request body: the client closed the connection before sending all of it") from None
        from .onboard import _loads, first_unreadable_value, json_problem

        try:
            doc = _loads(b"".join(chunks).decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(422, "request body: invalid JSON (not UTF-8)") from None
        except json.JSONDecodeError as e:
            raise ApiError(422, f"request body: {json_problem(e, line=True)}") from None
        except RecursionError:
            raise ApiError(422, "request body: JSON nested too deeply") from None
        bad = first_unreadable_value(doc)
        if bad is not None:
            where = f"request body, field '{bad[0]}'" if bad[0] else "request body"  # '': the body itself
            raise ApiError(422, f"{where}: {bad[1]}", field=bad[0] or None)
        if not isinstance(doc, dict):
            raise ApiError(422, "request body: expected a JSON object")
        return doc

    def check_token(request: Request) -> None:
        """A write needs the token (when the server has one), and is never one a page of another site
        made a browser send: a cross-site request carries an ``Origin`` other than this server."""
        origin = request.headers.get("origin")
        if origin is not None and origin_key(origin) not in allowed:
            ours = {request.headers.get(h, "").lower() for h in ("host", "x-forwarded-host")} - {""}  # (behind a proxy)
            if urlsplit(origin).netloc.lower() not in ours:
                raise ApiError(403, f"writes from another site's page ({origin or 'no origin'}) are refused "
                                    "(`cfb serve --allow-origin URL` lets one in)")
        if token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            said = "the token given is not this server's: " if scheme.lower() == "bearer" else ""
            raise ApiError(401, f"{said}this server needs `Authorization: Bearer <token>` to write",
                           headers={"WWW-Authenticate": "Bearer"})

    # --- JSON API ----------------------------------------------------------------------------------
    @api_get("/health", tags=["api"], summary="Liveness and the serving model version",
             responses={200: {"description": '{"status": "ok", "version": v}'}})
    async def health():
        with engine.connect() as conn:
            return json_response({"status": "ok", "version": versions.serving_version(conn)})

    @api_get("/questionnaire", tags=["api"], summary="The signup questionnaire (`cfb questionnaire --json`)",
             responses={200: {"description": '{"version": v, "attributes": [{"name", "type", ...}], '
                                             '"items": [{"item", "title"}]}'}})
    async def questionnaire(budget: int = Query(15, ge=0, le=MAX_BUDGET, description="Number of items to ask about")):
        from .onboard import questionnaire_json

        with engine.connect() as conn:
            return json_response(questionnaire_json(conn, budget))

    signup_schema = {"type": "object", "additionalProperties": False, "properties": {
        "user": {"type": "string", "description": "external user id (default: one is assigned)"},
        "answers": {"type": "object", "description": "attribute answers, as named by GET /questionnaire"},
        "ratings": {"type": "object", "additionalProperties": {"type": "number"},
                    "description": "item id or exact title -> rating; leave out items not seen"},
        "asked": {"type": "integer", "minimum": 0, "maximum": MAX_BUDGET,
                  "description": "how many of GET /questionnaire's items were shown (its budget): the ones "
                                 "not rated count as not seen"},
        "version": {"type": "integer", "minimum": 1,
                    "description": "the model version whose questionnaire was shown (GET /questionnaire's "
                                   "`version`): answers are checked against it, as a full retrain since may "
                                   "have changed the questionnaire (default: the serving version)"}},
        "example": {"answers": {"gender": "F"}, "ratings": {"50": 5, "181": 4}, "asked": 15, "version": 1}}

    @app.post("/users", status_code=201, tags=["api"], summary="Sign a user up (`cfb onboard` with one entry)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": signup_schema}}}},
              responses={201: {"description": '{"user": id, "ratings": k, "version": v}'},
                         409: {"description": "the user id exists"}, 422: {"description": "invalid answers"}})
    async def create_user(request: Request):
        check_token(request)
        entry = await read_json(request)

        def run():
            try:
                return signup_one(engine, entry)
            except InputError as e:
                raise ApiError(409 if isinstance(e, UserExistsError) else 422, str(e), e.field) from None
            except IntegrityError:  # a concurrent signup took the id first
                user = entry.get("user")
                said = (f"user {user!r} already exists" if user is not None
                        else "the id assigned was taken meanwhile by another writer; send the sign-up again")
                raise ApiError(409, f"request body, field 'user': {said}", "user") from None

        out = await run_in_threadpool(one_writer_of_few(run))
        done = out["onboarded"][0]
        return json_response({"user": done["user"], "ratings": done["ratings"], "version": out["version"]}, 201,
                             {"Location": f"/users/{quote(done['user'], safe='')}/recommendations"})

    rec_params = [  # parsed by hand below (the hottest endpoint: FastAPI's parameter machinery costs ~15%)
        {"name": "n", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_N, "default": 10}},
        {"name": "by", "in": "query", "required": False,
         "schema": {"type": "string", "enum": ["rank", "rating"], "default": "rank"},
         "description": "rank: what the user would watch and like; rating: predicted rating alone"}]

    @api_get("/users/{user:id}/recommendations", tags=["api"],
             summary="Top n items for a user (`cfb recommend --json`)",
             responses={200: {"description": '{"user": id, "items": [{"item", "title", "score"}]}'},
                        404: {"description": "unknown user"}, 422: {"description": "n or by out of range"}},
             openapi_extra={"parameters": rec_params})
    async def recommendations(user: str, request: Request):
        # on SQLite a GET is answered before it gets here, by FastRecommendations (the same answers)
        n, by = recommendation_query(request.scope["query_string"])

        def run():
            with engine.connect() as conn:
                return serving.recommend(conn, user, n, by)

        return json_response(await run_in_threadpool(run) if reads_in_threadpool else run())

    rating_schema = {"type": "object", "required": ["item", "rating"], "additionalProperties": False,
                     "properties": {"item": {"type": "string", "description": "item id or exact title"},
                                    "rating": {"type": "number"}},
                     "example": {"item": "50", "rating": 5}}

    @app.post("/users/{user:id}/ratings", status_code=201, tags=["api"], summary="Store a rating (`cfb rate --json`)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": rating_schema}}}},
              responses={201: {"description": '{"user", "item", "title", "rating"}'},
                         404: {"description": "unknown user or item"}, 422: {"description": "invalid rating"}})
    async def rate(user: str, request: Request):
        check_token(request)
        body = await read_json(request)
        extra = [cut(k) for k in sorted(set(body) - {"item", "rating"})]
        if extra:
            raise ApiError(422, f"request body, field '{extra[0]}': unknown key(s) {', '.join(extra)}", extra[0])
        for key in ("item", "rating"):
            if key not in body:
                raise ApiError(422, f"request body, field '{key}': missing", key)
        item, rating = body["item"], body["rating"]
        if isinstance(item, (dict, list, bool, float)) or item is None or not str(item).strip():
            # (a float's text is not an id: 50.0 would be item "50.0", as a sign-up's user id)
            raise ApiError(422, f"request body, field 'item': expected an item id or title (text or a whole number), "
                           f"got {json_shown(item)}", "item")
        if isinstance(rating, bool) or not isinstance(rating, (int, float)):
            raise ApiError(422, f"request body, field 'rating': expected a number, got {json_shown(rating)}", "rating")
        from .ratings import rate_item

        def run():
            try:
                return rate_item(engine, user, str(item), float(rating))
            except CfbError as e:
                if e.field == "user":  # (the path's: answered as every route answers it)
                    raise
                raise ApiError(_error_status(e), f"request body, field '{e.field}': {e}" if e.field else str(e),
                               e.field) from None

        return json_response(await run_in_threadpool(one_writer_of_few(run)), 201)

    @api_get("/items/{item:id}/similar", tags=["api"], summary="Items most similar to an item (`cfb similar --json`)",
             responses={200: {"description": '{"item": id, "title", "items": [{"item", "title", "score"}]}'},
                        404: {"description": "unknown item"},
                        409: {"description": "the item is not in the serving model yet (a retrain brings it)"}})
    async def similar(item: str, n: int = Query(10, ge=1, le=MAX_N)):
        def run():  # (an unknown item's hint reads every title: not on the event loop)
            with engine.connect() as conn:
                return serving.similar(conn, item, n)

        return json_response(await run_in_threadpool(run))

    @api_get("/models", tags=["api"], summary="Model versions (`cfb models --json`)",
             responses={200: {"description": '[{"version", "kind", "mode", "parent", "created", '
                                             '"metrics", "hyperparams", "serving"}]'}})
    async def models():
        with engine.connect() as conn:
            return json_response(versions.list_versions(conn))

    @api_get("/inspect/biases", tags=["api"], summary="Lowest and highest item biases (`cfb inspect biases --json`)",
             responses={200: {"description": '{"lowest": [{"item", "title", "score"}], "highest": [...]}'},
                        409: {"description": "the serving version is an nn model: it learns no item biases"}})
    async def inspect_biases(n: int = Query(10, ge=1, le=MAX_N),
                             min_ratings: int = Query(0, ge=0, le=MAX_MIN_RATINGS)):
        with engine.connect() as conn:
            return json_response(serving.biases(conn, n, min_ratings))

    @api_get("/inspect/pca", tags=["api"], summary="PCA of the item factors (`cfb inspect pca --json`)",
             responses={200: {"description": '{"version", "fitted_on", "explained_variance", '
                                             '"items": [{"item", "title", "ratings", "pc1", "pc2", "pc3"}]}'}})
    async def inspect_pca(n: int = Query(50, ge=2, le=5000)):
        from .inspect import pca

        with engine.connect() as conn:
            return json_response(pca(conn, n))

    # --- docs, offline ---------------------------------------------------------------------------
    def openapi() -> dict:
        """FastAPI's schema with this server's error body on every error response (a 422 is
        ``{"error": …, "field": …}`` here, not FastAPI's ``{"detail": […]}``)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            spec.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                spec["components"]["schemas"].pop(name, None)
            spec["components"]["schemas"]["Error"] = ERROR_SCHEMA
            if token is not None:  # the writes need the token: /docs then has an "Authorize" button for it
                spec["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
            for method, operation in ((m, op) for ops in spec["paths"].values() for m, op in ops.items()):
                if token is not None and method == "post":
                    operation["security"] = [{"bearerAuth": []}]
                responses = operation.setdefault("responses", {})
                for status, description in (COMMON_ERRORS["post"] if method == "post" else {}).items():
                    responses.setdefault(status, {"description": description})
                responses.setdefault("503", {"description": COMMON_ERRORS["503"]})
                for status, response in responses.items():
                    if status[0] in "45":
                        response["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
                        if response.get("description") == "Validation Error":
                            response["description"] = "a parameter out of range"
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
    swagger = _swagger_dir()
    if swagger is not None:
        app.mount("/static/swagger", StaticFiles(directory=swagger), name="swagger")
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")

    @page("/docs")
    async def docs():
        if swagger is None:
            return HTMLResponse("<!doctype html><title>cfb API</title><p>Swagger UI is not installed "
                                "(pip install swagger-ui-bundle-v2); the schema is at "
                                "<a href='/openapi.json'>/openapi.json</a>.</p>")
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="cfb API",
                                   swagger_js_url="/static/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger/swagger-ui.css",
                                   swagger_favicon_url="/static/swagger/favicon-32x32.png")

    # --- web pages ---------------------------------------------------------------------------------
    def _scale(conn) -> list[float]:
        scale, step = store.rating_scale_and_step(conn)
        return rating_choices(scale or (1.0, 5.0), step)

    def _rating_select(scale: list[float], name: str, entry: dict, blank: str) -> str:
        """The rating control of an item (``entry``: its "item" and "title"), named after the item."""
        opts = [f"<option value=''>{escape(blank)}</option>"]
        opts += [f"<option value='{v:g}'>{v:g}</option>" for v in scale]
        return (f"<select name='{escape(name)}' data-item='{escape(str(entry['item']))}' "
                f"aria-label='rating for {_name(entry)}'>{''.join(opts)}</select>")

    @page("/")
    def home(budget: int = Query(15, ge=0, le=MAX_BUDGET)):
        from .onboard import questionnaire_json

        with engine.connect() as conn:
            q = questionnaire_json(conn, budget)  # a CfbError: an error page (answer_error)
            scale = _scale(conn)
        rows = []
        for a in q["attributes"]:
            name = escape(a["name"])
            if a.get("type") == "category":
                opts = "".join(f"<option value='{escape(str(v))}'>{escape(str(v))}</option>"  # (the value
                               for v in a.get("values") or [])  # exactly: a browser trims an option's text)
                field = f"<select name='{name}' data-attr='{name}'><option value=''>(no answer)</option>{opts}</select>"
            elif a.get("type") == "number":
                lo, hi = a.get("accepts") or (None, None)
                bounds = "" if lo is None else f" min='{lo!r}' max='{hi!r}'"  # (exactly: ':g' rounds 2469134)
                field = f"<input type='number' step='any'{bounds} name='{name}' data-attr='{name}' data-number='1'>"
            else:
                field = f"<input type='text' name='{name}' data-attr='{name}'>"
            rows.append(f"<label>{name} {field}</label>")
        items = [f"<li><span class='title'>{_name(it)}</span> "
                 f"{_rating_select(scale, 'rate', it, 'not seen')}</li>" for it in q["items"]]
        body = (f"<h1>Sign up</h1><form id='signup' data-asked='{len(q['items'])}' data-version='{q['version']}'>"
                f"<fieldset><legend>About you</legend>"
                f"<label>user id (optional) <input type='text' name='user' id='user-id'></label>"
                f"{''.join(rows)}</fieldset>"
                f"<fieldset><legend>Rate what you have seen</legend><ol class='rate-items'>{''.join(items)}</ol>"
                f"</fieldset><button type='submit' id='signup-submit'>Sign up and get recommendations</button>"
                f"<p id='signup-error' class='error' role='alert'></p></form>"
                f"<p class='small'>Model version {q['version']}.</p>")
        return _page("cfb: sign up", body, token is not None)

    @page("/user/{user:id}")
    def user_page(user: str, n: int = Query(10, ge=1, le=MAX_N)):
        with engine.connect() as conn:
            rec = serving.recommend(conn, user, n)
            scale = _scale(conn)
        items = "".join(_rec_row(it, scale) for it in rec["items"])
        body = (f"<h1>Recommendations for <span id='user-name'>{escape(rec['user'])}</span></h1>"
                f"<p>The number is the predicted rating. Rate any of them: the list updates at once.</p>"
                f"<ol id='recs' data-user='{escape(rec['user'])}' data-n='{n}' "
                f"data-scale='{escape(json.dumps(scale))}'>{items}</ol>"
                f"<p id='rate-status' role='status'></p><p id='rate-error' class='error' role='alert'></p>")
        return _page(f"cfb: {rec['user']}", body, token is not None)

    def _rec_row(it: dict, scale: list[float]) -> str:
        return (f"<li data-item='{escape(str(it['item']))}'><a class='title' href='{_item_href(it['item'])}'>"
                f"{_name(it)}</a> <span class='score'>{it['score']:.2f}</span> "
                f"{_rating_select(scale, 'rate', it, 'rate…')}</li>")

    @page("/item/{item:id}")
    def item_page(item: str, n: int = Query(10, ge=1, le=MAX_N)):
        with engine.connect() as conn:
            out = serving.similar(conn, item, n)
        rows = "".join(f"<li><a href='{_item_href(it['item'])}'>{_name(it)}</a> "
                       f"<span class='score'>{it['score']:.3f}</span></li>" for it in out["items"])
        body = (f"<h1 id='item-title'>{_name(out)}</h1><p class='small'>item {escape(str(out['item']))}</p>"
                f"<h2>Similar items</h2><ol id='similar'>{rows}</ol>")
        return _page(f"cfb: {out.get('title') or out['item']}", body, token is not None)

    @page("/explore")
    def explore(n: int = Query(50, ge=2, le=500), min_ratings: int = Query(0, ge=0, le=MAX_MIN_RATINGS)):
        from .inspect import pca, pca_svg

        with engine.connect() as conn:
            result = pca(conn, n)
            try:
                b = serving.biases(conn, 10, min_ratings)
                biases_html = "".join(
                    f"<div><h2>{label} bias</h2><ol>" + "".join(
                        f"<li><a href='{_item_href(it['item'])}'>{_name(it)}</a> "
                        f"<span class='score'>{it['score']:+.3f}</span></li>" for it in b[key]) + "</ol></div>"
                    for label, key in (("Lowest", "lowest"), ("Highest", "highest")))
            except CfbError as e:
                biases_html = f"<p class='error'>{escape(str(e))}</p>"
        ev = ", ".join(f"PC{k + 1} {v:.0%}" for k, v in enumerate(result["explained_variance"]))
        body = (f"<h1>Explore the model (version {result['version']})</h1>"
                f"<h2>Item factors of the {len(result['items'])} most-rated items: PCA</h2>"
                f"<p class='small'>Axes fitted on the {result['fitted_on']:,} most-rated items; share of their "
                f"variance: {escape(ev)}. Items close together are liked by the same "
                f"people. <a href='/inspect/pca?n={n}'>JSON</a></p>"
                f"<figure id='pca'>{pca_svg(result)}</figure>"
                f"<section class='biases'>{biases_html}</section>")
        return _page("cfb: explore", body, token is not None)

    return app


def _swagger_dir() -> str | None:
    """Swagger UI's files from a pip package (``swagger-ui-bundle-v2``), so /docs works offline."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return str(swagger_ui_path) if Path(swagger_ui_path, "swagger-ui-bundle.js").exists() else None


def one_blas_thread() -> None:
    """Serve on one BLAS thread per process: a request's matrix products are small, and OpenBLAS's
    threads only contend with the other requests (about 30% less time per request, bench/bench_http.py)."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")  # for worker processes started from here
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn's dependency; without it the environment above still holds for workers
        return
    threadpool_limits(limits=int(os.environ["OPENBLAS_NUM_THREADS"]), user_api="blas")


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory`` (several workers): URL and token from the environment."""
    one_blas_thread()
    return create_app(os.environ.get("CFB_DATABASE_URL") or None, os.environ.get("CFB_API_TOKEN") or None)


def serve(url: str | None = None, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          workers: int = 1, log_level: str = "warning", allowed_origins: tuple[str, ...] = ()) -> None:
    """Run the server (blocks). With ``workers`` > 1, uvicorn forks that many processes."""
    import uvicorn

    from ..db.engine import resolve_url

    url = resolve_url(url)
    one_blas_thread()
    if allowed_origins:
        os.environ["CFB_ALLOWED_ORIGINS"] = ",".join(allowed_origins)
    if host in LOOPBACK_NAMES:
        os.environ["CFB_LOCAL_HOSTS_ONLY"] = "1"
    if workers > 1:
        os.environ["CFB_DATABASE_URL"] = url
        if token:
            os.environ["CFB_API_TOKEN"] = token
        uvicorn.run("cfb.service.http:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, access_log=False)
    else:
        uvicorn.run(create_app(url, token), host=host, port=port, log_level=log_level, access_log=False)
