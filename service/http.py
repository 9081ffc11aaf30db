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
with the driver's own cursor (``FastReader``); its answers and errors equal the route's and
``serving.recommend``'s (tests/test_http.py, tests/test_http_fast.py check it)."""
from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit

import anyio
import anyio.to_thread
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Engine
from sqlalchemy.exc import DatabaseError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.concurrency import run_in_threadpool
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from ..bootstrap.questionnaire import MAX_BUDGET
from ..cf_core.errors import BusyError, CannotAnswerError, CfbError, InputError, UserExistsError, cut, json_shown
from ..db import store, versions
from ..db.engine import BUSY, WRITE_TURNS, make_engine, sqlite_file
from . import serving, web_pages
from .fast_recommendations import FastRecommendations, FastReader
from .http_guards import (MAX_BODY, BodyLimit, DatabaseFileGone, JsonCORS, LocalHostsOnly, Utf8Path, wants_html,
                          binds_this_machine_only, origin_key)
from .http_json import (MAX_MIN_RATINGS, MAX_N, RETRY_AFTER, ApiError, WholeNumber, database_error_answer,
                        error_response, error_status, is_json_media_type, json_response, recommendation_query)
from .signup import signup_one
from .state import load_served

POLL_S = 0.25  # how often the server looks for a new serving version to load ahead of requests
# writes let wait for the database's one writer at once, each holding a pooled connection meanwhile
# (``db.engine.WRITE_TURNS``); the others wait for a turn holding none, so the pool stays for the reads
WAITING_WRITERS = 4
# writes in progress at once, each on a thread of their own pool (not the one the reads and pages run
# in); one more is answered 503 at once
MAX_WRITES = 64


class IdConvertor(PathConvertor):
    """A user or item id in a path: any text, slashes and line breaks included (Starlette's ``path``
    matches no line break, so such an id got a bare "Not Found" instead of "unknown user ...")."""

    regex = "(?s:.*)"


register_url_convertor("id", IdConvertor())  # (the routes below name it: ``{user:id}``)


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "string", "description": "the problem, one line"},
    "field": {"type": "string", "description": "the parameter or body field at fault, where there is one"},
    "suggestions": {"type": "array", "items": {"type": "string"},
                    "description": "an unknown item's close titles, where there are some; the ids of the "
                                   "items a title asked for names"}}}


COMMON_ERRORS = {  # error answers any route may give, for the OpenAPI schema
    "503": "no database, nothing ingested or no trained model yet; or a write that waited out another "
           "writer (with Retry-After)",
    "post": {"401": "this server has a token and the request did not give it (`Authorization: Bearer <token>`)",
             "403": "a write sent by another site's page (its Origin is not allowed)",
             "413": "a body over 64 KiB",
             "415": "a body sent as other than JSON (its Content-Type, where given, must be application/json)"},
    "400": "a request naming another host than this machine (a server bound to it), a path that is not "
           "UTF-8 once its %-escapes are decoded, or a body the client stopped sending"}


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
# the answers of the writes and of recommendations, as /openapi.json declares them (clients generated from it)
_TEXT_OR_NONE = {"type": ["string", "null"]}
SIGNED_UP = {"type": "object", "required": ["user", "ratings", "version"], "properties": {
    "user": {"type": "string"}, "ratings": {"type": "integer"}, "version": {"type": "integer"}}}
RECOMMENDED = {"type": "object", "required": ["user", "items"], "properties": {
    "user": {"type": "string"},
    "items": {"type": "array", "items": {"type": "object", "required": ["item", "title", "score"], "properties": {
        "item": {"type": "string"}, "title": _TEXT_OR_NONE, "score": {"type": "number"}}}}}}
RATED = {"type": "object", "required": ["user", "item", "title", "rating"], "properties": {
    "user": {"type": "string"}, "item": {"type": "string"}, "title": _TEXT_OR_NONE, "rating": {"type": "number"}}}
USER_RATINGS = {"type": "object", "required": ["user", "count", "ratings"], "properties": {
    "user": {"type": "string"}, "count": {"type": "integer", "description": "all the user's ratings"},
    "ratings": {"type": "array", "items": {"type": "object", "required": ["item", "title", "rating"], "properties": {
        "item": {"type": "string"}, "title": _TEXT_OR_NONE, "rating": {"type": "number"}}}}}}
_ITEMS = {"type": "array", "items": {"type": "object", "required": ["item", "title"], "properties": {
    "item": {"type": "string"}, "title": _TEXT_OR_NONE, "score": {"type": "number"}}}}
HEALTH = {"type": "object", "required": ["status", "version"], "properties": {
    "status": {"type": "string"}, "version": {"type": ["integer", "null"]}}}
READY = {"type": "object", "required": ["status", "version"], "properties": {
    "status": {"type": "string", "enum": ["ready"]}, "version": {"type": "integer"}}}
QUESTIONNAIRE = {"type": "object", "required": ["version", "attributes", "items"], "properties": {
    "version": {"type": "integer"}, "items": _ITEMS,
    "attributes": {"type": "array", "items": {"type": "object", "required": ["name", "type"], "properties": {
        "name": {"type": "string"}, "type": {"type": "string", "enum": ["number", "category", "text"]}}}}}}
SIMILAR = {"type": "object", "required": ["item", "title", "items"], "properties": {
    "item": {"type": "string"}, "title": _TEXT_OR_NONE, "items": _ITEMS}}
_BIASED = {"type": "array", "items": {"type": "object", "required": ["item", "title", "score", "ratings"], "properties": {
    "item": {"type": "string"}, "title": _TEXT_OR_NONE, "score": {"type": "number"}, "ratings": {"type": "integer"}}}}
BIASES = {"type": "object", "required": ["lowest", "highest"], "properties": {"lowest": _BIASED, "highest": _BIASED}}
PCA = {"type": "object", "required": ["version", "explained_variance", "items"], "properties": {
    "version": {"type": "integer"}, "explained_variance": {"type": "array", "items": {"type": "number"}},
    "items": {"type": "array", "items": {"type": "object", "required": ["item", "title", "pc1"],
                                         "properties": {"item": {"type": "string"}, "title": _TEXT_OR_NONE,
                                                        "ratings": {"type": "integer"}, "pc1": {"type": "number"},
                                                        "pc2": {"type": "number"}, "pc3": {"type": "number"}}}}}}
MODELS = {"type": "array", "items": {"type": "object", "required": ["version", "kind", "serving"], "properties": {
    "version": {"type": "integer"}, "kind": {"type": "string"}, "serving": {"type": "boolean"}}}}


# a query parameter's bounds as JSON Schema says them (FastAPI writes a validated type's as pydantic's ge/le)
JSON_SCHEMA_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def check_token_text(token: str | None) -> str | None:
    """A bearer token a client can send: printable ASCII (HTTP header values are read as Latin-1, and
    browsers refuse to send other characters in one), with no space at either end."""
    if token is not None and (not token.isascii() or not token.isprintable() or token != token.strip()):
        raise InputError("the token must be printable ASCII characters with no space at either end "
                       "(what an HTTP header carries as it is)")
    return token


def create_app(engine_or_url: Engine | str | None = None, token: str | None = None, max_body: int = MAX_BODY,
               fast_path: bool = True, reads_in_threadpool: bool | None = None,
               cache_size: int | None = None, allowed_origins: tuple[str, ...] | None = None,
               local_hosts_only: bool | str | None = None) -> FastAPI:
    """The API and web page over ``engine_or_url`` (an Engine or a database URL; None: the CLI's default).

    With ``token``, every request that writes must carry ``Authorization: Bearer <token>``. A write
    from a browser page is taken from this server's own origin (its ``Host``, or ``X-Forwarded-Host``
    behind a proxy) and from ``allowed_origins`` (default ``$CFB_ALLOWED_ORIGINS``, comma-separated,
    e.g. ``https://shop.example``), never from another site's page. ``local_hosts_only`` (default
    ``$CFB_LOCAL_HOSTS_ONLY``; `cfb serve` on a host reached from this machine only sets it to that
    host's name): requests must name this machine (a loopback name or address, the name given here
    when it is text, or an allowed origin's host) in ``Host``.
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
        local_hosts_only = os.environ.get("CFB_LOCAL_HOSTS_ONLY", "") or False
    engine = engine_or_url if isinstance(engine_or_url, Engine) else make_engine(engine_or_url)
    on_file = engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:")
    fast = FastReader(engine, cache_size) if fast_path and on_file else None  # (it keeps its own connections)
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
    # redirect_slashes off: Starlette's redirect of "/users/%2541x/ratings/" names the path decoded once, so the
    # client's next request decodes it again, to user "Ax": a path with a trailing slash is not found instead
    app = FastAPI(title="cfb", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan, **extra,
                  redirect_slashes=False,
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

    def _page(title: str, body: str) -> HTMLResponse:
        """A page in the site's frame, its script told whether writes need this server's token."""
        return web_pages.page(title, body, token is not None)

    def error_page(message: str, status: int, headers: dict | None = None,
                   suggestions: list[str] | None = None) -> HTMLResponse:
        """A web page's error: its one-line message, what to ask for instead as links (``error_body``), and
        a link back, with the API's status."""
        heading = web_pages.error_heading(status)
        page_ = _page(f"cfb: {heading.lower()}", web_pages.error_body(heading, message, suggestions))
        page_.status_code = status
        page_.headers.update(headers or {})
        return page_

    def answer_error(request: Request, e: ApiError | CfbError) -> Response:
        """``error_response(e)`` (JSON), or on a web page the same message and status as an HTML page; an
        address no route has is answered as a page to a browser (which asks for HTML first)."""
        endpoint = request.scope.get("endpoint")
        no_route = endpoint is None or isinstance(endpoint, StaticFiles)  # (a file the static folder lacks too)
        browser = wants_html(request.method, request.headers.get("accept", ""))
        if endpoint not in pages and not (no_route and browser):
            return error_response(e)
        if isinstance(e, ApiError):
            return error_page(e.message, e.status, e.headers)
        suggestions = getattr(e, "suggestions", None)
        message, hint = str(e), serving.hint_of(suggestions or [])
        if hint and message.endswith(hint):  # (the page lists them as links: not twice)
            message = message[:-len(hint)]
        return error_page(message, error_status(e), suggestions=suggestions)

    @app.exception_handler(ApiError)
    @app.exception_handler(CfbError)
    async def _api_error(request: Request, e: ApiError | CfbError):
        return answer_error(request, e)

    @app.exception_handler(DatabaseError)
    async def _database_error(request: Request, e: DatabaseError):
        answer = database_error_answer(e)  # (a busy writer, a database not written yet, a file no database)
        if answer is None:
            raise e
        return answer_error(request, answer)

    @app.exception_handler(PoolTimeoutError)
    async def _pool_timeout(request: Request, e: PoolTimeoutError):  # every pooled connection busy past the wait
        return answer_error(request, ApiError(503, "the server is busy: try again shortly", headers=RETRY_AFTER))

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
        said = str(e.detail)
        if e.status_code == 404 and said == "Not Found":  # (Starlette's, for an address no route has)
            said = f"no page or API route at {request.url.path[:200]}"
        return answer_error(request, ApiError(e.status_code, said, headers=headers))

    def allowed_methods(scope: dict) -> list[str]:
        """The methods the routes matching the request's path take (GET's HEAD included)."""
        from starlette.routing import Match

        return sorted({m for r in app.router.routes if getattr(r, "methods", None)
                       and r.matches(scope)[0] != Match.NONE for m in r.methods})

    if fast is not None:  # inside BodyLimit: a GET with a body over the limit is still refused
        app.add_middleware(FastRecommendations, fast=fast, in_threadpool=reads_in_threadpool)
    app.add_middleware(Utf8Path, error_page=error_page)
    app.add_middleware(BodyLimit, max_body=max_body)
    if file is not None:  # before the fast path: nothing is read from a deleted file
        app.add_middleware(DatabaseFileGone, file=file, present=_follow_file,
                           page=lambda message: error_page(message, 503, RETRY_AFTER))
    if allowed:  # an allowed site's page asks the browser first (a JSON body or a token is not a "simple"
        # request) and may read the answers: CORS for those sites only, answered before any route
        app.add_middleware(JsonCORS, allow_origins=sorted(allowed), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"],
                           expose_headers=["Location", "Retry-After"], max_age=600)
    if local_hosts_only:  # outermost: before anything is read
        bound = {local_hosts_only.lower()} if isinstance(local_hosts_only, str) else set()
        app.add_middleware(LocalHostsOnly, allowed=frozenset(urlsplit(o).hostname for o in allowed) | bound)

    waiting_writers = threading.BoundedSemaphore(WAITING_WRITERS)
    writes: dict = {"running": 0, "threads": None}  # (the threads' limiter is made in the event loop)

    async def run_write(write: Callable[[], object]) -> object:
        """``write()`` on a thread of the writes' own pool, taking one of the ``WAITING_WRITERS`` turns
        when it writes (``writing``); past ``MAX_WRITES`` at once, 503 at once."""
        if writes["running"] >= MAX_WRITES:
            raise ApiError(503, BUSY, headers=RETRY_AFTER)
        if writes["threads"] is None:
            writes["threads"] = anyio.CapacityLimiter(MAX_WRITES)

        def in_turn():  # noqa: ANN202
            token = WRITE_TURNS.set(waiting_writers)
            try:
                return write()
            finally:
                WRITE_TURNS.reset(token)

        writes["running"] += 1
        try:
            return await anyio.to_thread.run_sync(in_turn, limiter=writes["threads"])
        finally:
            writes["running"] -= 1

    async def read_json(request: Request) -> dict:
        """The request body as a JSON object, at most ``max_body`` bytes (also when chunked), sent as JSON
        (a Content-Type, where given, of application/json or another ``+json`` type)."""
        from starlette.requests import ClientDisconnect

        kind = request.headers.get("content-type")
        if kind is not None and not is_json_media_type(kind):  # (a cross-site form sends these unasked)
            raise ApiError(415, f"request body: Content-Type must be application/json, got {cut(kind)!r}")
        size, chunks = 0, []
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise ApiError(413, f"request body over {max_body} bytes")
                chunks.append(chunk)
        except ClientDisconnect:  # (nobody reads the answer; not a server error to log)
            raise ApiError(400, "request body: the client closed the connection before sending all of it") from None
        from .onboard import first_unreadable_value, json_problem, load_answers_json

        try:
            doc = load_answers_json(b"".join(chunks).decode("utf-8"))
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
             responses={200: {"description": '{"status": "ok", "version": v}',
                              "content": {"application/json": {"schema": HEALTH}}}})
    async def health():
        with engine.connect() as conn:
            return json_response({"status": "ok", "version": versions.serving_version(conn)})

    @api_get("/ready", tags=["api"], summary="Readiness: 200 once the serving version is loaded and can answer",
             responses={200: {"description": '{"status": "ready", "version": v}',
                              "content": {"application/json": {"schema": READY}}},
                        503: {"description": "no trained version yet, or the serving one cannot be read"}})
    def ready():
        with engine.connect() as conn:
            return json_response({"status": "ready", "version": load_served(conn).version})

    @api_get("/questionnaire", tags=["api"], summary="The signup questionnaire (`cfb questionnaire --json`)",
             responses={200: {"description": '{"version": v, "attributes": [{"name", "type", ...}], '
                                             '"items": [{"item", "title"}]}',
                              "content": {"application/json": {"schema": QUESTIONNAIRE}}}})
    async def questionnaire(budget: Annotated[WholeNumber, Query(ge=0, le=MAX_BUDGET,
                                                                 description="Number of items to ask about")] = 15):
        from .onboard import questionnaire_json

        with engine.connect() as conn:
            return json_response(questionnaire_json(conn, budget))

    signup_schema = {"type": "object", "additionalProperties": False, "properties": {
        "user": {"type": ["string", "integer", "null"], "description": "external user id, text or a whole number "
                                                                        "(left out or null: one is assigned)"},
        "answers": {"type": "object", "description": "attribute answers, as named by GET /questionnaire"},
        "ratings": {"type": "object", "additionalProperties": {"type": "number"},
                    "description": "item id or exact title -> rating; leave out items not seen"},
        "asked": {"type": "integer", "minimum": 0, "maximum": MAX_BUDGET,
                  "description": "how many of GET /questionnaire's items were shown (its budget): the ones "
                                 "not rated count as not seen (a JSON integer: 15, not 15.0)"},
        "version": {"type": "integer", "minimum": 1,
                    "description": "the model version whose questionnaire was shown (GET /questionnaire's "
                                   "`version`): answers are checked against it, as a full retrain since may "
                                   "have changed the questionnaire (default: the serving version; a JSON "
                                   "integer: 2, not 2.0)"}},
        "example": {"answers": {"gender": "F"}, "ratings": {"50": 5, "181": 4}, "asked": 15, "version": 1}}

    @app.post("/users", status_code=201, tags=["api"], summary="Sign a user up (`cfb onboard` with one entry)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": signup_schema}}}},
              responses={201: {"description": '{"user": id, "ratings": k, "version": v}',
                               "content": {"application/json": {"schema": SIGNED_UP}}},
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

        out = await run_write(run)
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
             responses={200: {"description": '{"user": id, "items": [{"item", "title", "score"}]}',
                              "content": {"application/json": {"schema": RECOMMENDED}}},
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
                     "properties": {"item": {"type": ["string", "integer"],
                                             "description": "item id (text or a whole number) or exact title"},
                                    "rating": {"type": "number"}},
                     "example": {"item": "50", "rating": 5}}

    @app.post("/users/{user:id}/ratings", status_code=201, tags=["api"], summary="Store a rating (`cfb rate --json`)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": rating_schema}}}},
              responses={201: {"description": '{"user", "item", "title", "rating"}',
                               "content": {"application/json": {"schema": RATED}}},
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
                if e.field == "user" or isinstance(e, BusyError):  # (answered as every route answers them)
                    raise
                raise ApiError(error_status(e), f"request body, field '{e.field}': {e}" if e.field else str(e),
                               e.field) from None

        return json_response(await run_write(run), 201)

    @api_get("/users/{user:id}/ratings", tags=["api"], summary="A user's latest n ratings (`cfb ratings --json`)",
             responses={200: {"description": '{"user": id, "count", "ratings": [{"item", "title", "rating"}]}, '
                                             'newest first', "content": {"application/json": {"schema": USER_RATINGS}}},
                        404: {"description": "unknown user"}})
    async def user_ratings(user: str, n: Annotated[WholeNumber, Query(ge=1, le=MAX_N)] = 20):
        def run():
            with engine.connect() as conn:
                return serving.user_ratings(conn, user, n)

        return json_response(await run_in_threadpool(run) if reads_in_threadpool else run())

    @api_get("/items/{item:id}/similar", tags=["api"], summary="Items most similar to an item (`cfb similar --json`)",
             responses={200: {"description": '{"item": id, "title", "items": [{"item", "title", "score"}]}',
                              "content": {"application/json": {"schema": SIMILAR}}},
                        404: {"description": "unknown item"},
                        409: {"description": "the item is not in the serving model yet (a retrain brings it)"}})
    async def similar(item: str, n: Annotated[WholeNumber, Query(ge=1, le=MAX_N)] = 10):
        def run():  # (an unknown item's hint reads every title: not on the event loop)
            with engine.connect() as conn:
                return serving.similar(conn, item, n)

        return json_response(await run_in_threadpool(run))

    @api_get("/models", tags=["api"], summary="Model versions (`cfb models --json`)",
             responses={200: {"description": '[{"version", "kind", "mode", "parent", "created", '
                                             '"metrics", "hyperparams", "serving"}]',
                              "content": {"application/json": {"schema": MODELS}}}})
    async def models():
        with engine.connect() as conn:
            return json_response(versions.list_versions(conn))

    @api_get("/inspect/biases", tags=["api"], summary="Lowest and highest item biases (`cfb inspect biases --json`)",
             responses={200: {"description": '{"lowest": [{"item", "title", "score", "ratings"}], "highest": [...]}',
                              "content": {"application/json": {"schema": BIASES}}},
                        409: {"description": "the serving version is an nn model: it learns no item biases"}})
    async def inspect_biases(n: Annotated[WholeNumber, Query(ge=1, le=MAX_N)] = 10,
                             min_ratings: Annotated[WholeNumber, Query(ge=0, le=MAX_MIN_RATINGS)] = 1):
        with engine.connect() as conn:
            return json_response(serving.biases(conn, n, min_ratings))

    @api_get("/inspect/pca", tags=["api"], summary="PCA of the item factors (`cfb inspect pca --json`)",
             responses={200: {"description": '{"version", "fitted_on", "explained_variance", '
                                             '"items": [{"item", "title", "ratings", "pc1", "pc2", "pc3"}]} '
                                             '(pc2 and pc3 as far as the factors allow: one per factor)',
                              "content": {"application/json": {"schema": PCA}}}})
    async def inspect_pca(n: Annotated[WholeNumber, Query(ge=2, le=5000)] = 50):
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
                for parameter in operation.get("parameters", []):  # (a WholeNumber's bounds come out as pydantic's)
                    schema = parameter.get("schema", {})
                    for pydantic_word, json_schema_word in JSON_SCHEMA_BOUNDS.items():
                        if pydantic_word in schema:
                            schema[json_schema_word] = schema.pop(pydantic_word)
                if token is not None and method == "post":
                    operation["security"] = [{"bearerAuth": []}]
                responses = operation.setdefault("responses", {})
                for status, description in (COMMON_ERRORS["post"] if method == "post" else {}).items():
                    responses.setdefault(status, {"description": description})
                for status in ("400", "503"):
                    responses.setdefault(status, {"description": COMMON_ERRORS[status]})
                for status, response in responses.items():
                    if status[0] in "45":
                        response["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
                        if response.get("description") == "Validation Error":
                            response["description"] = "a parameter out of range, or an empty id"
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
    swagger = _swagger_dir()
    if swagger is not None:
        app.mount("/static/swagger", StaticFiles(directory=swagger), name="swagger")
    app.mount("/static", StaticFiles(directory=web_pages.WEB / "static"), name="static")

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

    # --- web pages (their HTML: web_pages) ------------------------------------------------------
    def _scale(conn) -> list[float]:  # noqa: ANN001
        scale, step = store.rating_scale_and_step(conn)
        return web_pages.rating_choices(scale or (1.0, 5.0), step)

    @page("/")
    def home(budget: Annotated[WholeNumber, Query(ge=0, le=MAX_BUDGET)] = 15):
        from .onboard import questionnaire_json

        with engine.connect() as conn:
            q = questionnaire_json(conn, budget)  # a CfbError: an error page (answer_error)
            scale = _scale(conn)
        return _page("cfb: sign up", web_pages.signup_body(q, scale))

    @page("/user/{user:id}")
    def user_page(user: str, n: Annotated[WholeNumber, Query(ge=1, le=MAX_N)] = 10):
        with engine.connect() as conn:
            rec = serving.recommend(conn, user, n)
            given = serving.user_ratings(conn, user, web_pages.RATINGS_SHOWN)
            scale = _scale(conn)
        return _page(f"cfb: {rec['user']}", web_pages.user_body(rec, given, scale, n))

    @page("/item/{item:id}")
    def item_page(item: str, n: Annotated[WholeNumber, Query(ge=1, le=MAX_N)] = 10):
        with engine.connect() as conn:
            try:
                out = serving.similar(conn, item, n)
            except CannotAnswerError:  # in the catalogue, not yet in a trained version: its page all the same
                new = serving.item_not_in_model(conn, item)
                if new is None:  # (a version that holds it came in between: said as the API says it)
                    raise
                return _page(f"cfb: {new.get('title') or new['item']}", web_pages.new_item_body(new))
        return _page(f"cfb: {out.get('title') or out['item']}", web_pages.item_body(out))

    @page("/find")
    def find(user: str | None = None, item: str | None = None):
        """A user's recommendations or an item's page by its id (an item also by its title), from a form."""
        for kind, value in (("user", user), ("item", item)):
            if value is not None and value.strip():
                return RedirectResponse(f"/{kind}/{quote(value.strip(), safe='')}", status_code=303)
        return _page("cfb: find", web_pages.FIND_BODY)

    @page("/explore")
    def explore(n: Annotated[WholeNumber, Query(ge=2, le=500)] = 50,
                min_ratings: Annotated[WholeNumber, Query(ge=0, le=MAX_MIN_RATINGS)] = 1):
        from .inspect import pca

        with engine.connect() as conn:
            result = pca(conn, n)
            biases, why = None, None
            try:
                biases = serving.biases(conn, 10, min_ratings)
            except CfbError as e:  # (the nn model learns no biases: said on the page)
                why = str(e)
        return _page("cfb: explore", web_pages.explore_body(result, biases, why, n, min_ratings))

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
    if binds_this_machine_only(host):
        os.environ["CFB_LOCAL_HOSTS_ONLY"] = host  # (the name it is bound to: requests may name it)
    if workers > 1:
        os.environ["CFB_DATABASE_URL"] = url
        if token:
            os.environ["CFB_API_TOKEN"] = token
        uvicorn.run("cfb.service.http:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, access_log=False)
    else:
        uvicorn.run(create_app(url, token), host=host, port=port, log_level=log_level, access_log=False)
