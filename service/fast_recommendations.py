"""The fast path of ``GET /users/{user}/recommendations`` on SQLite: ``FastRecommendations``, an ASGI
middleware in front of FastAPI's routing, answers it from ``FastReader``, which reads the rows
``state.user_history`` reads with the SQLite driver's own cursor and keeps each answer while nothing it
depends on changed. Its answers and errors equal the route's and ``serving.recommend``'s
(tests/test_http.py, tests/test_http_fast.py)."""
from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import weakref
from typing import NamedTuple

import numpy as np
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from ..cf_core.errors import CfbError, NotReadyError, UnknownIdError
from ..cf_core.model import UserHistory
from ..db import store, versions
from .http_json import ApiError, database_error_answer, error_response, recommendation_query
from .state import CACHED_VERSIONS, changed_again, learned_values, load_served


class _Cached(NamedTuple):
    """A computed answer and what it depends on (``FastReader.cache``)."""

    state: tuple  # SQL_STATE's row less its last two columns, when the answer was computed
    root: int  # the serving version's full ancestor then
    ids: str  # the answer's item ids (JSON)
    body: bytes  # the answer (JSON)
    seq: int  # every rating's latest seq when ``state`` was last confirmed
    checked: tuple | None  # (the connection's number, its PRAGMA data_version) then


class _ThreadOwned:
    """Lives as long as a thread's local values (``FastReader._conn``)."""


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass


class FastReader:
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
        given, user = user, store.user_key(user)  # (as ``store.user_id_of`` and every reader)
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
        fresh = self._fresh(conn, user, n, by, given)
        if self.cache is not None:
            if len(self.cache) >= self.cache_size and key not in self.cache:
                try:
                    self.cache.pop(next(iter(self.cache)), None)  # the oldest entry
                except (RuntimeError, StopIteration):  # another thread changed it meanwhile
                    pass
            self.cache[key] = fresh._replace(checked=mark)
        return fresh.body

    def _fresh(self, conn: sqlite3.Connection, user: str, n: int, by: str, given: str | None = None) -> _Cached:
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
                raise UnknownIdError(f"unknown user {store.shown_id(user if given is None else given)}", field="user")
            uid, attrs, answer = row[1:4]
            bias, factors = cur.execute(self.SQL_FACTORS, (uid, root)).fetchone() or (None, None)
            if factors is not None:
                versions.check_user_row(factors, served.model.rating.user_dims, root, uid)
            top, scores = self._compute(cur, served, uid, attrs, answer, bias, factors, n, by)
            ids = json.dumps([int(i) for i in top])
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
        """(top items as database ids, their predicted ratings): what ``serving.recommend`` computes."""
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
        return model.recommend(model.user_vector(history), history.items, n, by)

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
            while len(self.served) >= CACHED_VERSIONS:  # a long-running server sees many versions: keep the latest few
                try:
                    self.served.pop(next(iter(self.served)), None)
                except (RuntimeError, StopIteration):  # another thread changed it meanwhile
                    break
            self.served[key] = served
        return served


class FastRecommendations:
    """ASGI middleware: ``GET /users/{user}/recommendations`` answered from ``FastReader.answer`` without
    FastAPI's routing, parameter and response machinery, which cost many times what a cached answer
    does (the hottest endpoint; bench/bench_http.py), with the route's body, status and errors; every
    other request goes on to ``app``."""

    PREFIX, SUFFIX = "/users/", "/recommendations"

    def __init__(self, app, fast: FastReader, in_threadpool: bool = False):
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
            answer = database_error_answer(e)  # (as the routes answer it: a busy writer, a file no database…)
            if answer is None:
                raise
            await error_response(answer)(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
