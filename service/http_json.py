"""JSON in and out of the HTTP API, shared by its routes, its middleware and the fast path: an error's
answer (``{"error": message[, "field": name]}`` with its status) and the recommendations' query."""
from __future__ import annotations

import json
from typing import Annotated
from urllib.parse import parse_qsl

from pydantic import BeforeValidator, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError
from starlette.responses import Response

from ..cf_core.errors import BusyError, CannotAnswerError, CfbError, NotReadyError, UnknownIdError
from ..db.textfile import plain_int

MAX_N = 100  # the most recommendations or similar items one request asks for


class ApiError(Exception):
    """An error answered as ``{"error": message[, "field": name]}`` with an HTTP status."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    """``obj`` as JSON (UTF-8, like the CLI's ``--json``)."""
    body = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return Response(body, status_code=status, media_type="application/json", headers=headers)


class ServiceUnavailable(CfbError):
    """The database cannot answer (not a busy writer: trying again soon will not cure it); HTTP 503."""


ERROR_STATUS = ((UnknownIdError, 404), (NotReadyError, 503), (BusyError, 503), (ServiceUnavailable, 503),
                (CannotAnswerError, 409))  # any other CfbError: 422
RETRY_AFTER = {"Retry-After": "10"}  # seconds: with a 503 that trying again will cure (a busy database)
MAX_MIN_RATINGS = 10**9  # min_ratings' bound: more than any item has (a larger int does not fit numpy's compare)


def database_error_answer(e: BaseException) -> CfbError | None:
    """How the API answers a database's error (SQLAlchemy's, or the SQLite driver's as the fast path meets
    them): ``db.engine.database_error``'s, busy (another writer past the wait: 503 with Retry-After), a
    database cfb has not written yet (503, not ready), or any other as a 503 naming it in one line (a file
    that is not a database or is damaged, a server gone); None for what is no state of the database but a
    programming error (a 500)."""
    import sqlite3

    from sqlalchemy.exc import DatabaseError, IntegrityError, ProgrammingError

    from ..db.engine import database_error, is_missing_table

    if not isinstance(e, (DatabaseError, sqlite3.DatabaseError)):
        return None
    if isinstance(e, (ProgrammingError, IntegrityError, sqlite3.ProgrammingError, sqlite3.IntegrityError)) \
            and not is_missing_table(e):
        return None
    error = database_error(e)
    return error if isinstance(error, (BusyError, NotReadyError)) else ServiceUnavailable(str(error))


def error_status(e: CfbError) -> int:
    return next((status for kind, status in ERROR_STATUS if isinstance(e, kind)), 422)


def error_response(e: ApiError | CfbError) -> Response:
    """An error's answer: ``{"error": message[, "field": name][, "suggestions": [...]]}`` (an unknown item's
    close titles, or the ids of the items a shared title names) with its HTTP status."""
    if isinstance(e, ApiError):
        body, field, status, headers = {"error": e.message}, e.field, e.status, e.headers
    else:
        body, status, headers = {"error": str(e)}, error_status(e), RETRY_AFTER if isinstance(e, BusyError) else None
        field = e.field
    if field:
        body["field"] = field
    if getattr(e, "suggestions", None):
        body["suggestions"] = list(e.suggestions)
    return json_response(body, status, headers)


def _in_digits(value: object) -> object:
    """A query parameter's text read as the CLI reads a whole number (``plain_int``): ASCII digits, not
    "1_0", "3.0" or "٣" (pydantic took all three)."""
    if isinstance(value, str):
        try:
            return plain_int(value)
        except ValueError:
            raise PydanticCustomError("int_parsing", "Input should be a whole number") from None
    return value


WholeNumber = Annotated[int, BeforeValidator(_in_digits)]  # a query parameter's whole number
QUERY_INT = TypeAdapter(WholeNumber)


def is_json_media_type(content_type: str) -> bool:
    """Whether a Content-Type header names JSON: application/json or an application/…+json type."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def recommendation_query(query_string: bytes) -> tuple[int, str]:
    """(n, by) from the query string of GET /users/{user}/recommendations, checked as its schema says
    (ApiError 422 naming the parameter); of a repeated parameter the last counts, as in Starlette."""
    query = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
    raw_n, by = query.get("n", "10"), query.get("by", "rank")
    try:
        n = QUERY_INT.validate_python(raw_n)  # (as every other route takes a whole number)
    except ValidationError as e:
        raise ApiError(422, f"query parameter 'n': {e.errors()[0]['msg']}", "n") from None
    if not 1 <= n <= MAX_N:
        bound = "greater than or equal to 1" if n < 1 else f"less than or equal to {MAX_N}"
        raise ApiError(422, f"query parameter 'n': Input should be {bound}", "n")
    if by not in ("rank", "rating"):
        raise ApiError(422, "query parameter 'by': Input should be 'rank' or 'rating'", "by")
    return n, by
