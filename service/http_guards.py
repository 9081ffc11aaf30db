"""ASGI middleware that refuses a request before the app reads it: another host's name (DNS
rebinding), a path that is not UTF-8, a body over the limit, a SQLite file deleted under the running server, a CORS preflight
another site may not make."""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from .http_json import RETRY_AFTER, ApiError, error_response, json_response

MAX_BODY = 64 * 1024  # bytes: larger request bodies are refused with 413


class JsonCORS(CORSMiddleware):
    """Starlette's CORS, a refused preflight answered as every other error is (``{"error": ...}``, 400,
    one line) instead of as plain text; its CORS headers kept."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        keep = {k: v for k, v in response.headers.items() if k.lower() not in ("content-type", "content-length")}
        return json_response({"error": f"CORS preflight refused: {bytes(response.body).decode()}"}, 400, keep)


def wants_html(method: str, accept: str) -> bool:
    """A browser's page request: a GET (or HEAD) whose Accept header names text/html (an API client's
    says */* or JSON)."""
    return method in ("GET", "HEAD") and "text/html" in accept


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def is_loopback_address(name: str) -> bool:
    """Whether ``name`` is an IP address of this machine's loopback (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def binds_this_machine_only(host: str) -> bool:
    """Whether a server bound to ``host`` is reached from this machine only: a loopback name or address,
    or a name whose every address is one (Debian maps the machine's own name to 127.0.1.1)."""
    if host in LOOPBACK_NAMES or is_loopback_address(host):
        return True
    try:
        found = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return bool(found) and all(is_loopback_address(str(info[4][0])) for info in found)


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
    400, unless that host is a loopback name or address or one of ``allowed`` (the name the server is
    bound to, the hosts of ``--allow-origin``)."""

    def __init__(self, app, allowed: frozenset[str] = frozenset()):
        self.app, self.allowed = app, LOOPBACK_NAMES | allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
            if name not in self.allowed and not is_loopback_address(name):
                await error_response(ApiError(400, f"this server answers for this machine only, not for host "
                                                   f"{host!r} (`cfb serve --allow-origin` names another)"))(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


class Utf8Path:
    """ASGI middleware: a path whose %-escapes do not decode to UTF-8 (``/users/%FF``) gets 400; the
    server would read each bad byte as U+FFFD, so every such path named one and the same user. A
    browser's page request is answered by ``error_page(message, status)`` when given (else JSON)."""

    def __init__(self, app, error_page: Callable[[str, int], Response] | None = None):
        self.app, self.error_page = app, error_page

    async def __call__(self, scope, receive, send):
        raw = (scope.get("raw_path") or b"") if scope["type"] == "http" else b""
        if b"%" in raw or not raw.isascii():  # (a plain ASCII path, nearly every request, is UTF-8)
            try:
                unquote_to_bytes(raw.split(b"?", 1)[0]).decode("utf-8")
            except UnicodeDecodeError:
                message = "the path is not UTF-8 once its %-escapes are decoded"
                page = self.error_page is not None and wants_html(scope["method"], dict(scope["headers"]).get(
                    b"accept", b"").decode("latin-1"))
                await (self.error_page(message, 400) if page else json_response({"error": message}, 400))(
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
            answer = self.page(message) if browser else json_response({"error": message}, 503, RETRY_AFTER)
            await answer(scope, receive, send)
            return
        await self.app(scope, receive, send)
