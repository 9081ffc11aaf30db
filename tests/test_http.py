"""`cfb serve`: a real uvicorn server on 127.0.0.1 over a copy of the trained planted database,
driven with httpx: every endpoint's shape (the CLI's --json), the error codes, ratings that count
at once, and a version written by another connection served within a second."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from html import escape

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from click.testing import CliRunner  # noqa: E402

from cfb.cf_core.errors import CfbError, InputError  # noqa: E402
from cfb.cli.main import cli  # noqa: E402
from sqlalchemy import Engine  # noqa: E402

from cfb.db.engine import BUSY  # noqa: E402
from cfb.service.http import create_app  # noqa: E402

XSS = "<script>alert(1)</script>"


@contextmanager
def running_server(url_or_engine, token: str | None = None, **kwargs):
    """``cfb serve``'s app in a uvicorn server on a free 127.0.0.1 port (a thread); yields its base URL."""
    from cfb.service.http import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(url_or_engine, token=token, **kwargs), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def cli_json(db_url: str, *args: str):
    res = CliRunner().invoke(cli, ["--db", db_url, *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def user_count(engine) -> int:
    from sqlalchemy import func, select

    from cfb.db.schema import User

    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(User)))


@pytest.fixture
def server(trained, db_url):
    with running_server(db_url) as base, httpx.Client(base_url=base, timeout=30) as client:
        yield client


def test_read_endpoints_answer_what_the_cli_prints(server, db_url):
    assert server.get("/health").json() == {"status": "ok", "version": 1}
    for path in ("/health", "/", "/questionnaire", "/models", "/users/a0/recommendations", "/users/a0/ratings",
                 "/items/a1/similar", "/inspect/biases", "/inspect/pca"):  # (HEAD wherever GET: monitors and caches probe with it)
        r = server.head(path)
        assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0, path
    assert server.head("/users/nobody/recommendations").status_code == 404
    for method, path, allow in [("PUT", "/health", "GET, HEAD"), ("DELETE", "/users/a0/recommendations", "GET, HEAD"),
                                ("PUT", "/items/a1/similar", "GET, HEAD"), ("PUT", "/", "GET, HEAD"),
                                ("DELETE", "/users/a0/ratings", "GET, HEAD, POST"), ("DELETE", "/users", "POST"),
                                ("POST", "/static/app.js", "GET, HEAD")]:  # (a mount's own)
        r = server.request(method, path)  # a 405 names every method the path takes
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers.get("allow"))
    assert server.get("/questionnaire", params={"budget": 4}).json() == cli_json(db_url, "questionnaire", "--budget", "4")
    assert server.get("/models").json() == cli_json(db_url, "models")
    assert server.get("/users/a0/ratings", params={"n": 3}).json() == cli_json(db_url, "ratings", "a0", "-n", "3")
    for by in ("rank", "rating"):
        r = server.get("/users/a0/recommendations", params={"n": 5, "by": by})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        assert r.json() == cli_json(db_url, "recommend", "a0", "-n", "5", "--by", by)[0]
    rec = server.get("/users/b1/recommendations").json()
    assert set(rec) == {"user", "items"} and len(rec["items"]) == 10
    assert all(set(i) == {"item", "title", "score"} for i in rec["items"])
    sim = server.get("/items/a1/similar", params={"n": 3}).json()
    assert sim == cli_json(db_url, "similar", "a1", "-n", "3")
    assert server.get("/items/Alpha film 1/similar", params={"n": 3}).json() == sim  # by exact title
    assert server.get("/inspect/biases", params={"n": 3}).json() == cli_json(db_url, "inspect", "biases", "-n", "3")
    pca = server.get("/inspect/pca", params={"n": 10}).json()
    assert pca == cli_json(db_url, "inspect", "pca", "-n", "10")
    assert len(pca["items"]) == 10 and {"item", "title", "pc1", "pc2", "pc3"} <= set(pca["items"][0])


def test_docs_and_openapi_are_served_offline(server):
    spec = server.get("/openapi.json").json()
    for path in ("/health", "/questionnaire", "/users", "/users/{user}/recommendations", "/users/{user}/ratings",
                 "/items/{item}/similar", "/models"):
        assert path in spec["paths"], path
    page = server.get("/docs")
    assert page.status_code == 200
    assert "https://" not in page.text and "http://" not in page.text  # nothing from a CDN
    if "/static/swagger/swagger-ui-bundle.js" in page.text:
        assert server.get("/static/swagger/swagger-ui-bundle.js").status_code == 200


def test_signup_then_rating_changes_the_next_recommendations(server, trained, db_url):
    engine, _ = trained
    r = server.post("/users", json={"user": "web1", "answers": {"gender": "F"}, "ratings": {"a1": 5, "b21": 1}})
    assert r.status_code == 201, r.text
    assert r.json()["user"] == "web1" and r.json()["ratings"] == 2
    before = server.get("/users/web1/recommendations", params={"n": 10}).json()
    assert before["user"] == "web1" and len(before["items"]) == 10
    assert {"a1", "b21"}.isdisjoint(i["item"] for i in before["items"])
    top = before["items"][0]["item"]
    r = server.post("/users/web1/ratings", json={"item": top, "rating": 1})
    assert r.status_code == 201, r.text
    assert r.json() == {"user": "web1", "item": top, "title": before["items"][0]["title"], "rating": 1.0}
    after = server.get("/users/web1/recommendations", params={"n": 10}).json()
    assert after != before and top not in [i["item"] for i in after["items"]]
    # the server's fast path answers what the service function answers
    from cfb.service.serving import recommend

    with engine.connect() as conn:
        assert after == recommend(conn, "web1", 10)
    # by title, and an assigned id when none is given
    r = server.post("/users/web1/ratings", json={"item": "Beta film 22", "rating": 2.5})
    assert r.status_code == 201 and r.json()["item"] == "b22"
    r = server.post("/users", json={"answers": {"gender": "M"}})
    assert r.status_code == 201 and r.json()["user"].startswith("new-")
    assert r.headers["location"].endswith("/recommendations")
    assert server.get(r.headers["location"]).status_code == 200


def test_a_user_id_with_a_slash_is_reachable(server, trained):
    r = server.post("/users", json={"user": "team/a", "answers": {"gender": "F"}})
    assert r.status_code == 201, r.text
    for path in ("/users/team%2Fa/recommendations", r.headers["location"]):
        got = server.get(path)
        assert got.status_code == 200 and got.json()["user"] == "team/a", path
    r = server.post("/users/team%2Fa/ratings", json={"item": "a1", "rating": 5})
    assert r.status_code == 201 and r.json()["user"] == "team/a"
    assert server.get("/user/team%2Fa").status_code == 200


@pytest.mark.parametrize("path, raw, field, message", [
    ("/users", b'{"answers": {"age": 30, "age": 40}}', "answers.age", "key 'age' given twice"),
    ("/users", b'{"answers": {"age": 1e300}}', "answers.age", "is out of range"),
    ("/users/a0/ratings", b'{"item": "a1", "rating": 9}', "rating", "rating 9 outside the scale"),
    ("/users", b'{"ratings": {"b22": 4, "Beta film 22": 2}}', "ratings.Beta film 22", "the same item as 'b22'"),
])
def test_more_invalid_bodies_are_422_naming_the_field(server, trained, path, raw, field, message):
    engine, _ = trained
    n = user_count(engine)
    r = server.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    out = r.json()
    assert out["field"] == field and out["error"].startswith(f"request body, field '{field}': ") and message in out["error"]
    assert user_count(engine) == n


@pytest.mark.parametrize("body, field", [
    ({"answers": {"gender": "X"}}, "answers.gender"),
    ({"answers": {"shoe": 1}}, "answers.shoe"),
    ({"ratings": {"nope": 5}}, "ratings.nope"),
    ({"ratings": {"a1": 9}}, "ratings.a1"),
    ({"ratings": {"a1": "five"}}, "ratings.a1"),
    ({"user": ["x"]}, "user"),
    ({"colour": "red"}, "colour"),
    ({"version": 99}, "version"),
])
def test_invalid_signup_is_422_naming_the_field_and_writes_nothing(server, trained, body, field):
    engine, _ = trained
    n = user_count(engine)
    r = server.post("/users", json=body)
    assert r.status_code == 422, r.text
    out = r.json()
    assert out["field"] == field and f"field '{field}'" in out["error"] and "\n" not in out["error"]
    assert user_count(engine) == n


LONG = "x" * 60_000


@pytest.mark.parametrize("path, body, field", [
    ("/users", {"answers": {"gender": LONG}}, "answers.gender"),
    ("/users", {"answers": {"age": "9" * 60_000}}, "answers.age"),
    ("/users", {"ratings": {"a1": LONG}}, "ratings.a1"),
    ("/users", {"ratings": {LONG: 4}}, "ratings." + "x" * 255 + "..."),  # (whole up to the longest id: below)
    ("/users", {"user": "b", LONG: 1}, "xxxxxxxxxxxxxxxxxxxx..."),
    ("/users", {"answers": {LONG: 1}}, "answers." + "x" * 255 + "..."),
    ("/users/a0/ratings", {"item": "a1", "rating": LONG}, "rating"),
    ("/users/a0/ratings", {"item": "a1", "rating": 4, LONG: 1}, "xxxxxxxxxxxxxxxxxxxx..."),
])
def test_a_long_value_or_key_is_cut_short_in_the_error(server, trained, path, body, field):
    """A 60,000-character value or key came back whole in the message, up to three times (a review)."""
    r = server.post(path, json=body)
    assert r.status_code == 422, r.text
    out = r.json()
    assert out["field"] == field and len(out["error"]) < 300, out["error"][:300]


@pytest.mark.parametrize("body, message", [
    (b'{"user":"', "invalid JSON (Unterminated string starting at line 1 column 9)"),
    (b'{"user": "a"} x', "invalid JSON (Extra data at line 1 column 15)"),
    (b'\xff{}', "invalid JSON (not UTF-8)")])
def test_an_unreadable_body_is_422_saying_where(server, trained, body, message):
    engine, _ = trained
    n = user_count(engine)
    r = server.post("/users", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == f"request body: {message}"
    assert user_count(engine) == n


def test_error_codes(server, trained):
    engine, _ = trained
    n = user_count(engine)
    r = server.post("/users", json={"user": "a0", "answers": {}})
    assert r.status_code == 409 and "already exists" in r.json()["error"]
    for raw in ('{"answers": {"age": NaN}}', '{"answers": ', '[1, 2]', '{"answers": {"age": 1e999}}'):
        r = server.post("/users", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
    assert user_count(engine) == n
    for path, field in (("/users/nobody/recommendations", "user"), ("/items/nothing-like-it/similar", "item"),
                        (f"/users/{'x' * 5000}/recommendations", "user"), (f"/items/{'y' * 5000}/similar", "item")):
        r = server.get(path)  # the id in the path is the field; a long one is cut short in the message
        assert r.status_code == 404 and r.json()["field"] == field and len(r.json()["error"]) < 120, (path, r.text)
    r = server.post("/users/nobody/ratings", json={"item": "a1", "rating": 3})
    assert r.status_code == 404 and r.json() == {"error": "unknown user 'nobody'", "field": "user"}
    r = server.post("/users/a0/ratings", json={"item": "no such item", "rating": 3})
    assert r.status_code == 404 and r.json()["field"] == "item"
    r = server.post("/users/a0/ratings", json={"item": "a1", "rating": 7})
    assert r.status_code == 422 and r.json()["field"] == "rating"
    assert server.post("/users/a0/ratings", json={"item": "a1"}).status_code == 422
    for value, said in ((50.0, "50.0"), (None, "null"), ({"id": 1}, '{"id": 1}')):  # (50.0 was item "50.0")
        r = server.post("/users/a0/ratings", json={"item": value, "rating": 4})
        assert r.status_code == 422 and r.json()["field"] == "item" and r.json()["error"].endswith(f"got {said}"), r.text
    for value, said in ((True, "true"), (None, "null"), ([4], "[4]")):  # (named as the JSON wrote it)
        r = server.post("/users/a0/ratings", json={"item": "a1", "rating": value})
        assert r.status_code == 422 and r.json()["error"].endswith(f"expected a number, got {said}"), r.text
    for n_ in (0, 101, "x"):
        r = server.get("/users/a0/recommendations", params={"n": n_})
        assert r.status_code == 422 and r.json()["field"] == "n", r.text
    assert server.get("/users/a0/recommendations", params={"n": 100}).status_code == 200
    assert server.get("/users/a0/recommendations", params={"by": "magic"}).status_code == 422
    for raw, ok in (("2", True), ("+2", True), ("02", True), ("2.0", False), ("1_0", False), ("\u0662", False),
                    ("0x2", False), ("2e0", False)):
        # the hand-parsed recommendations take n as every other route does, and as the CLI reads it
        for path in ("/users/a0/recommendations", "/items/a1/similar"):
            r = server.get(path, params={"n": raw})
            assert r.status_code == (200 if ok else 422), (path, raw, r.text)
            assert ok or r.json()["field"] == "n"
    r = server.get("/items/%20/similar")  # a blank id is no id: 422 as everywhere, not 404 listing titles
    assert r.status_code == 422 and r.json() == {"error": "empty item id", "field": "item"}, r.text
    for budget in (-1, 31):
        assert server.get("/questionnaire", params={"budget": budget}).status_code == 422


def test_a_query_number_is_read_as_the_cli_reads_it_on_every_route(server):
    """FastAPI's int took "1_0" as 10 and "3.0" as 3 (the CLI refuses both); every route now reads a
    query parameter's whole number as the CLI does."""
    for path, name in (("/questionnaire", "budget"), ("/items/a1/similar", "n"), ("/inspect/biases", "min_ratings"),
                       ("/inspect/pca", "n"), ("/users/a0/recommendations", "n")):
        assert server.get(path, params={name: "3"}).status_code == 200, path
        for raw in ("1_0", "3.0"):
            r = server.get(path, params={name: raw})
            assert r.status_code == 422 and r.json() == {
                "error": f"query parameter '{name}': Input should be a whole number", "field": name}, (path, r.text)
    page = server.get("/", params={"budget": "1_0"}, headers={"Accept": "text/html"})
    assert page.status_code == 422 and "Input should be a whole number" in page.text


def test_a_write_sent_as_other_than_json_is_415(server, trained):
    """A body sent as text/plain or a form was read as JSON and written (a cross-site form sends those
    without asking the browser first); JSON types and a body with no Content-Type are read."""
    engine, _ = trained
    ratings, users = rating_count(engine), user_count(engine)
    body = '{"item": "a1", "rating": 2}'
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/json"):
        for path, content in (("/users/a0/ratings", body), ("/users", '{"answers": {}}')):
            r = server.post(path, content=content, headers={"Content-Type": kind})
            assert r.status_code == 415 and r.json()["error"] == (
                f"request body: Content-Type must be application/json, got {kind!r}"), (kind, r.text)
    assert (rating_count(engine), user_count(engine)) == (ratings, users)
    for kind in ("application/json", "Application/JSON; charset=utf-8", "application/merge-patch+json", None):
        r = server.post("/users/a0/ratings", content=body, headers={"Content-Type": kind} if kind else {})
        assert r.status_code == 201, (kind, r.text)
    spec = server.get("/openapi.json").json()["paths"]
    assert {"400", "415"} <= set(spec["/users/{user}/ratings"]["post"]["responses"]) and \
        "400" in spec["/models"]["get"]["responses"]


def test_a_path_that_is_not_utf8_is_400(server, trained):
    """%FF decoded to U+FFFD, so /users/%FF, /users/%FE and /users/%C3 were one user, read and written."""
    engine, _ = trained
    ratings = rating_count(engine)
    for path in ("/users/%FF/recommendations", "/users/%C3/recommendations", "/items/%FE/similar", "/user/%FF"):
        r = server.get(path)
        assert r.status_code == 400 and r.json() == {"error": "the path is not UTF-8 once its %-escapes are decoded"}, \
            (path, r.text)
    r = server.post("/users/%FF/ratings", json={"item": "a1", "rating": 3})
    assert r.status_code == 400 and rating_count(engine) == ratings
    assert server.get("/users/%C3%A9/recommendations").json()["error"] == "unknown user 'é'"  # (UTF-8: read)
    page = server.get("/user/%FF", headers={"Accept": "text/html,*/*;q=0.8"})  # a browser: a page, as every error
    assert page.status_code == 400 and page.headers["content-type"].startswith("text/html")
    assert "<h1>This request cannot be answered</h1>" in page.text and "the path is not UTF-8" in page.text


def test_a_null_user_is_declared_and_a_long_text_answer_refused(server, trained):
    """``"user": null`` signs up a user with an assigned id, as a left-out user does, and /openapi.json
    says so (it declared text or a number only); a text answer is at most 255 characters, as an id."""
    engine, _ = trained
    users = user_count(engine)
    signup = server.get("/openapi.json").json()["paths"]["/users"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert "null" in signup["properties"]["user"]["type"]
    r = server.post("/users", json={"user": None, "answers": {"gender": "F"}})
    assert r.status_code == 201 and r.json()["user"], r.text
    assert user_count(engine) == users + 1


def test_a_client_that_hangs_up_mid_body_is_no_server_error(trained, db_url):
    """A client that closes the connection before sending the body it announced: nothing written, and
    no "Exception in ASGI application" traceback in the server's log."""
    import logging

    engine, _ = trained
    n = user_count(engine)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    with running_server(db_url) as base:
        host, port = base.removeprefix("http://").split(":")
        logger.addHandler(handler)
        try:
            with socket.create_connection((host, int(port))) as s:
                s.sendall(f"POST /users HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                          "Content-Length: 50\r\n\r\n".encode() + b'{"user": "half", "answ')
                time.sleep(0.3)
            time.sleep(0.5)
            assert httpx.get(base + "/health").status_code == 200
        finally:
            logger.removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []
    assert user_count(engine) == n


def test_similar_names_the_item_it_cannot_answer_for(server, db_url, tmp_path):
    """An ambiguous title (422) and an item not in the serving model yet (409) name the field, as an
    unknown item (404) does."""
    items = tmp_path / "items.csv"
    items.write_text("item,title\nx3,Alpha film 1\nx4,Gamma film\n")
    assert CliRunner().invoke(cli, ["--db", db_url, "ingest", "items", str(items), "--quiet"]).exit_code == 0
    for path, status, said in (("/items/Alpha%20film%201/similar", 422, "2 items are titled 'Alpha film 1'"),
                               ("/items/x4/similar", 409, "item 'x4' is not in the serving model yet")):
        r = server.get(path)
        assert r.status_code == status and r.json()["field"] == "item" and r.json()["error"].startswith(said), r.text
    # what to ask for instead: each item of that title, by id; a page links each (it was a dead end)
    assert server.get("/items/Alpha%20film%201/similar").json()["suggestions"] == ["a1", "x3"]
    page = server.get("/item/Alpha%20film%201", headers={"Accept": "text/html"})
    assert page.status_code == 422 and "<a href='/item/a1'>a1</a>" in page.text and "<a href='/item/x3'>x3</a>" in page.text


def test_the_page_of_an_item_not_in_the_model_yet_shows_it_in_a_readers_words(server, db_url, tmp_path):
    """A new item's page (added to the catalogue, not yet in a trained version) is the item's page, with
    its title and when similar items come, not a 409 error page quoting the operator's command."""
    items = tmp_path / "items.csv"
    items.write_text("item,title,genres\nx4,Gamma film,Drama\nx5,Delta film,\n")
    assert CliRunner().invoke(cli, ["--db", db_url, "ingest", "items", str(items), "--quiet"]).exit_code == 0
    assert CliRunner().invoke(cli, ["--db", db_url, "rate", "a0", "x4", "4"]).exit_code == 0  # (rated: due)
    for item, title, when in (("x4", "Gamma film", "at the recommender's next update"),
                              ("x5", "Delta film", "once someone has rated it")):
        page = server.get(f"/item/{item}", headers={"Accept": "text/html"})
        assert page.status_code == 200, page.text
        assert f"<h1 id='item-title'>{title}</h1>" in page.text and "id='not-yet'" in page.text
        assert when in page.text and "cfb retrain" not in page.text and "serving model" not in page.text
    assert server.get("/items/x4/similar").status_code == 409  # (the API still says it cannot answer)


def test_an_error_status_follows_what_went_wrong_not_the_words_of_the_input(server, engine):
    """A sign-up naming an item "… is not in the serving model yet" or "unknown user …" is bad input
    (422), whatever its words; a rating of an unknown item is 404 and one off the scale 422, each
    naming its field."""
    users = user_count(engine)
    for name in ("x is not in the serving model yet", "unknown user x", "biases are learned by the dot model only"):
        r = server.post("/users", json={"ratings": {name: 4}})
        assert r.status_code == 422 and r.json()["field"] == f"ratings.{name}", r.text
    r = server.post("/users", json={"user": "already exists " + "x" * 300, "answers": {}})  # (too long: not taken)
    assert (r.status_code, r.json()["field"]) == (422, "user") and "characters long" in r.json()["error"], r.text
    assert user_count(engine) == users
    r = server.post("/users/a0/ratings", json={"item": "no such film", "rating": 3})
    assert r.status_code == 404 and r.json()["field"] == "item", r.text
    r = server.post("/users/a0/ratings", json={"item": "a1", "rating": 9})
    assert (r.status_code, r.json()["field"]) == (422, "rating") and "outside the scale" in r.json()["error"]


def test_the_openapi_schema_describes_the_error_bodies_the_server_sends(server):
    spec = server.get("/openapi.json").json()
    assert set(spec["components"]["schemas"]) == {"Error"}
    errors = [response for ops in spec["paths"].values() for op in ops.values()
              for status, response in op["responses"].items() if status[0] in "45"]
    assert len(errors) >= 8 and all(r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
                                    for r in errors)
    r = server.get("/questionnaire", params={"budget": 31})
    assert r.status_code == 422 and set(r.json()) <= set(spec["components"]["schemas"]["Error"]["properties"])
    for path, ops in spec["paths"].items():  # each answer's shape, and the errors any route may give
        for method, op in ops.items():
            ok = op["responses"].get("201" if method == "post" else "200")
            assert ok and ok["description"] != "Successful Response" and "{" in ok["description"], (method, path)
            assert {"503", *(("401", "403", "413") if method == "post" else ())} <= set(op["responses"]), (method, path)
    assert "409" in spec["paths"]["/items/{item}/similar"]["get"]["responses"]
    assert "securitySchemes" not in spec["components"]  # (no token: nothing to authorise)
    # a parameter's bounds in JSON Schema's words (pydantic's ge/le are not: generated clients dropped them)
    bounds = {(path, p["name"]): p["schema"] for path, ops in spec["paths"].items() for op in ops.values()
              for p in op.get("parameters", []) if p["in"] == "query"}
    assert not any({"ge", "le", "gt", "lt"} & set(schema) for schema in bounds.values()), bounds
    assert (bounds["/questionnaire", "budget"]["minimum"], bounds["/questionnaire", "budget"]["maximum"]) == (0, 30)
    assert bounds["/inspect/biases", "min_ratings"]["minimum"] == 0 and bounds["/items/{item}/similar", "n"]["minimum"] == 1
    rec = server.get("/users/a0/recommendations").json()
    assert all(f'"{key}"' in spec["paths"]["/users/{user}/recommendations"]["get"]["responses"]["200"]["description"]
               for key in [*rec, *rec["items"][0]])


def test_an_id_with_a_line_break_is_an_unknown_id_on_every_route(server, trained):
    """Starlette's path parameter matches no line break: such an id got a bare "Not Found" on some routes
    and "unknown user" on others (a review)."""
    for method, path, who in (("get", "/users/a%0Ab/recommendations", "user"), ("post", "/users/a%0Ab/ratings", "user"),
                              ("get", "/items/a%0Ab/similar", "item")):
        r = server.request(method, path, json={"item": "a1", "rating": 3} if method == "post" else None)
        assert r.status_code == 404 and r.json() == {"error": f"unknown {who} 'a\\nb'", "field": who}, (path, r.text)
    for page in ("/user/a%0Ab", "/item/a%0Ab"):
        r = server.get(page)
        assert r.status_code == 404 and "unknown" in r.text and "Not Found" not in r.text, (page, r.text[:300])


def test_an_address_no_route_has_is_named(server):
    """An address no route has says which (its page said "Not found" twice: heading and Starlette's
    "Not Found"), as JSON to a client and as a page to a browser."""
    r = server.get("/recomendations")
    assert r.status_code == 404 and r.json() == {"error": "no page or API route at /recomendations"}
    page = server.get("/recomendations", headers={"Accept": "text/html"})
    assert page.status_code == 404 and "no page or API route at /recomendations" in page.text
    assert "Not Found" not in page.text


def test_biases_of_an_nn_version_are_a_conflict_not_a_bad_parameter(trained, monkeypatch):
    """An nn version learns no item biases: the request is valid, the serving version cannot answer it (409)."""
    from types import SimpleNamespace

    from cfb.service import serving
    from cfb.service.http_json import error_response

    engine, _ = trained
    monkeypatch.setattr(serving, "load_served", lambda conn: SimpleNamespace(model=SimpleNamespace(kind="nn")))
    with engine.connect() as conn, pytest.raises(CfbError) as e:
        serving.biases(conn)
    assert str(e.value) == "biases are learned by the dot model only (this version is 'nn')"
    assert error_response(e.value).status_code == 409


def test_ids_that_cannot_be_stored_are_422_and_unknown_ones_404(server, trained):
    """An id over 255 characters or with a NUL is refused where it would be created (422 naming the
    field, nothing written) and unknown where it is looked up (404), as on PostgreSQL (tests/test_postgres.py)."""
    engine, _ = trained
    users, ratings = user_count(engine), rating_count(engine)
    for user, problem in (("a" * 10_000, "is 10000 characters long (at most 255)"), ("a\x00b", "contains a NUL"),
                          ("..", "which a URL cannot name"), ("new\nline", "contains a line break"),
                          ("a\rb", "contains a line break")):
        r = server.post("/users", json={"user": user, "answers": {}})
        assert r.status_code == 422 and r.json()["field"] == "user", r.text
        assert r.json()["error"].startswith("request body, field 'user': user id ") and problem in r.json()["error"]
    r = server.post("/users", json={"ratings": {"x\x00": 3}})
    assert r.status_code == 422 and r.json()["field"] == "ratings.x\x00" and "unknown item" in r.json()["error"]
    for path in ("/users/%00/recommendations", f"/users/{'L' * 256}/recommendations", "/user/%00"):
        r = server.get(path)
        assert r.status_code == 404 and "unknown user" in r.text, (path, r.text)
    for path in ("/items/%00/similar", f"/items/{'L' * 256}/similar", "/item/%00"):
        r = server.get(path)
        assert r.status_code == 404 and "unknown item" in r.text, (path, r.text)
    assert server.post("/users/%00/ratings", json={"item": "a1", "rating": 3}).status_code == 404
    r = server.post("/users/a0/ratings", json={"item": "a1\x00", "rating": 3})
    assert r.status_code == 404 and r.json()["field"] == "item" and "unknown item" in r.json()["error"]
    assert (user_count(engine), rating_count(engine)) == (users, ratings)
    r = server.post("/users", json={"user": "é" * 255, "answers": {}})  # the longest id there may be
    assert r.status_code == 201 and server.get(r.headers["location"]).status_code == 200


def rating_count(engine) -> int:
    from sqlalchemy import func, select

    from cfb.db.schema import Rating

    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(Rating)))


HUGE = "1" + "0" * 400  # 10**400 as JSON digits: a valid JSON number no float holds


@pytest.mark.parametrize("path, raw, field", [
    ("/users/a0/ratings", '{"item": "a1", "rating": %s}' % HUGE, "rating"),
    ("/users/a0/ratings", '{"item": "a1", "rating": -%s}' % HUGE, "rating"),
    ("/users/a0/ratings", '{"item": "a1", "rating": %s}' % ("9" * 5000), "rating"),  # over int()'s digit limit
    ("/users/a0/ratings", '{"item": "a1", "rating": 1e400}', "rating"),  # Python's float: inf
    ("/users/a0/ratings", '{"item": "a1", "rating": NaN}', "rating"),
    ("/users/a0/ratings", '{"item": "a1", "rating": -Infinity}', "rating"),
    ("/users/a0/ratings", '{"item": %s, "rating": 3}' % HUGE, "item"),
    ("/users", '{"ratings": {"a1": %s}}' % HUGE, "ratings.a1"),
    ("/users", '{"ratings": {"a1": 1e400}}', "ratings.a1"),
    ("/users", '{"answers": {"age": %s}}' % HUGE, "answers.age"),
    ("/users", '{"answers": {"age": -1e400}}', "answers.age"),
    ("/users", '{"user": %s}' % HUGE, "user"),
    ("/users", HUGE, None),  # not an object: no field to name
])
def test_huge_and_non_finite_numbers_are_422_naming_the_field(server, trained, path, raw, field):
    engine, _ = trained
    users, ratings = user_count(engine), rating_count(engine)
    r = server.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    out = r.json()
    assert out.get("field") == field and "\n" not in out["error"] and len(out["error"]) < 200
    assert out["error"].startswith(f"request body, field '{field}': " if field else "request body: "), out["error"]
    # NaN and Infinity are not finite; 1e400 or 400 digits are finite, but too large (they were "not finite")
    said = "numbers must be finite" if "NaN" in raw or "Infinity" in raw else "the number is too large"
    assert said in out["error"], out["error"]
    assert (user_count(engine), rating_count(engine)) == (users, ratings)


@pytest.mark.parametrize("path, raw, field", [
    ("/users", '{"user": "\\ud800"}', "user"),
    ("/users", '{"answers": {"gender": "F\\udfff"}}', "answers.gender"),
    ("/users", '{"ratings": {"a1\\ud800": 4}}', "ratings"),
    ("/users/a0/ratings", '{"item": "\\ud800", "rating": 3}', "item"),
])
def test_text_that_is_not_unicode_is_422_naming_the_field(server, trained, path, raw, field):
    """A lone surrogate ("\\ud800" in JSON) is no text a database can store: a 422, nothing written."""
    engine, _ = trained
    users, ratings = user_count(engine), rating_count(engine)
    r = server.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json().get("field") == field and "not valid Unicode text" in r.json()["error"]
    assert (user_count(engine), rating_count(engine)) == (users, ratings)


@pytest.mark.parametrize("path, field", [
    ("/inspect/biases?min_ratings=" + HUGE, "min_ratings"), ("/inspect/biases?min_ratings=1e400", "min_ratings"),
    ("/inspect/biases?n=" + HUGE, "n"), ("/inspect/pca?n=" + HUGE, "n"), ("/items/a1/similar?n=" + HUGE, "n"),
    ("/questionnaire?budget=" + HUGE, "budget"), ("/questionnaire?budget=nan", "budget"),
    ("/users/a0/recommendations?n=" + HUGE, "n"), ("/users/a0/recommendations?n=1e400", "n"),
])
def test_huge_query_numbers_are_422_naming_the_parameter(server, path, field):
    r = server.get(path)
    assert r.status_code == 422 and r.headers["content-type"] == "application/json", r.text
    out = r.json()
    assert out["field"] == field and out["error"].startswith(f"query parameter '{field}': ")
    assert "\n" not in out["error"]
    assert server.get("/inspect/biases", params={"min_ratings": 10**9}).json() == {"lowest": [], "highest": []}


@pytest.mark.parametrize("page, api", [
    ("/?budget=99", "/questionnaire?budget=99"), ("/?budget=x", "/questionnaire?budget=x"),
    ("/user/a0?n=0", "/users/a0/recommendations?n=0"), ("/user/a0?n=" + HUGE, "/users/a0/recommendations?n=" + HUGE),
    ("/item/a1?n=abc", "/items/a1/similar?n=abc"), ("/explore?n=1", "/inspect/pca?n=1"),
    ("/explore?min_ratings=-1", "/inspect/biases?min_ratings=-1"),
    ("/explore?min_ratings=" + HUGE, "/inspect/biases?min_ratings=" + HUGE),
    ("/user/nobody", "/users/nobody/recommendations"), ("/item/nothing-like-it", "/items/nothing-like-it/similar"),
    (f"/user/{XSS}", f"/users/{XSS}/recommendations"),
])
def test_web_pages_answer_bad_input_with_an_html_error_page(server, page, api):
    """A page's error is an HTML page with the JSON API's status and one-line message (escaped) and a link
    back; the API's answer to the same input stays JSON."""
    want = server.get(api)
    assert want.status_code in (404, 422) and want.headers["content-type"] == "application/json"
    got = server.get(page)
    assert got.status_code == want.status_code, got.text
    assert got.headers["content-type"].startswith("text/html")
    message = want.json()["error"]
    assert "\n" not in message and f"<p class='error' role='alert'>{escape(message)}</p>" in got.text
    assert "<a id='back' href='/'>" in got.text and XSS not in got.text


def test_an_address_no_route_has_is_a_page_to_a_browser_and_json_to_a_client(server):
    """A browser following a wrong link gets the 404 as a page with a link back; an API client (curl,
    fetch: Accept */*) gets it as JSON."""
    api = server.get("/no/such/page")
    assert api.status_code == 404 and api.headers["content-type"] == "application/json" and api.json()["error"]
    page = server.get("/no/such/page", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert f"<p class='error' role='alert'>{escape(api.json()['error'])}</p>" in page.text
    assert "<a id='back' href='/'>" in page.text
    assert server.post("/no/such/page", headers={"Accept": "text/html"}).headers["content-type"] == "application/json"
    for path in ("/static/missing.png", "/static/"):  # (the static folder's own 404 was JSON to a browser too)
        page = server.get(path, headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        assert page.status_code == 404 and page.headers["content-type"].startswith("text/html"), path
        assert server.get(path).headers["content-type"] == "application/json"
    assert server.get("/static/style.css", headers={"Accept": "text/html"}).status_code == 200


def test_request_bodies_are_size_limited(server, trained):
    engine, _ = trained
    n = user_count(engine)
    big = json.dumps({"answers": {}, "ratings": {}, "user": "x" * (70 * 1024)})
    r = server.post("/users", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = server.post("/users", content=iter([big[:40_000].encode(), big[40_000:].encode()]),  # chunked: no length
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert user_count(engine) == n


def test_writes_need_the_token_when_one_is_set(trained, db_url):
    engine, _ = trained
    with running_server(db_url, token="s3cret") as base, httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/users/a0/recommendations").status_code == 200  # reads are open
        n = user_count(engine)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = client.post("/users", json={"answers": {}}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            wrong = "the token given is not this server's: " if "Bearer" in headers.get("Authorization", "") else ""
            assert r.json()["error"] == f"{wrong}this server needs `Authorization: Bearer <token>` to write"
            assert client.post("/users/a0/ratings", json={"item": "a1", "rating": 3}, headers=headers).status_code == 401
        assert user_count(engine) == n
        ok = {"Authorization": "Bearer s3cret"}
        assert client.post("/users", json={"user": "t1", "answers": {}}, headers=ok).status_code == 201
        assert client.post("/users/t1/ratings", json={"item": "a1", "rating": 3}, headers=ok).status_code == 201
        # /docs can send it: the schema says the writes need a bearer token (it had no "Authorize" button)
        spec = client.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"] == {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        ops = [(m, op) for path_ops in spec["paths"].values() for m, op in path_ops.items()]
        assert all((op.get("security") == [{"bearerAuth": []}]) == (m == "post") for m, op in ops)
    # a token no client can send as it is (a header is read as Latin-1) is refused at the start
    for bad in ("pässwörd", " s3cret", "s3\ncret"):
        with pytest.raises(CfbError, match=r"^the token must be printable ASCII characters"):
            create_app(db_url, token=bad)
        r = CliRunner().invoke(cli, ["--db", db_url, "serve", "--port", "0", "--token", bad])
        assert r.exit_code == 2 and "--token" in r.output and "printable ASCII" in r.output, r.output


def _wait_for(client, predicate, limit_s: float = 1.0):
    """Seconds until ``predicate(client)`` holds (fails after ``limit_s``)."""
    t0 = time.monotonic()
    while not predicate(client):
        assert time.monotonic() - t0 < limit_s, "the server did not pick up the new serving version in time"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_a_version_written_elsewhere_is_served_within_a_second(server, trained, db_url):
    from .conftest import FAST

    from cfb.db import versions
    from cfb.db.engine import make_engine, writing
    from cfb.service.training import retrain_full

    first = server.get("/users/a0/recommendations").json()
    other = make_engine(db_url)  # another connection pool, as another process would have
    try:
        out = retrain_full(other, kind="dot", valid_pct=0.0, progress=False, seed=7, **{**FAST, "n_factors": 4})
        assert out["version"] == 2 and out["serving"]
        _wait_for(server, lambda c: c.get("/health").json()["version"] == 2)
        assert server.get("/models").json()[-1]["serving"] is True
        assert server.get("/users/a0/recommendations").json() != first
        with writing(other) as conn:  # a rollback, as `cfb rollback 1` does
            versions.set_serving(conn, 1)
        _wait_for(server, lambda c: c.get("/health").json()["version"] == 1)
        assert server.get("/users/a0/recommendations").json() == first
    finally:
        other.dispose()


def test_web_pages_escape_every_title(trained, db_url, tmp_path):
    csv = tmp_path / "items.csv"
    csv.write_text(f'item,title\na1,"{XSS}"\n', encoding="utf-8")
    res = CliRunner().invoke(cli, ["--db", db_url, "ingest", "items", str(csv)])
    assert res.exit_code == 0, res.output
    with running_server(db_url) as base, httpx.Client(base_url=base, timeout=30) as client:
        assert client.post("/users", json={"user": "x1", "answers": {"gender": "F"}}).status_code == 201
        pages = [client.get("/", params={"budget": 30}), client.get("/user/x1", params={"n": 40}),
                 client.get("/item/a1"), client.get("/item/a2"), client.get("/explore", params={"n": 40})]
        for page in pages:
            assert page.status_code == 200, page.url
            assert page.headers["content-type"].startswith("text/html")
            assert XSS not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text, page.url
            assert "https://" not in page.text and "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")
        assert "<svg" in pages[-1].text
        assert client.get("/user/nobody").status_code == 404
        assert client.get("/static/app.js").status_code == 200
        assert "innerHTML" not in client.get("/static/app.js").text


def test_server_process_imports_no_training_framework(trained, db_url):
    """The whole API driven in a server process: torch, fastai, pandas and sklearn stay out of it."""
    script = f"""
import sys, httpx
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
from test_http import running_server
with running_server({db_url!r}) as base, httpx.Client(base_url=base, timeout=30) as c:
    for path in ["/health", "/questionnaire", "/models", "/users/a0/recommendations", "/items/a1/similar",
                 "/inspect/biases", "/inspect/pca", "/", "/user/a0", "/item/a1", "/explore", "/docs", "/openapi.json"]:
        assert c.get(path).status_code == 200, path
    assert c.post("/users", json={{"user": "p1", "answers": {{"gender": "F"}}, "ratings": {{"a1": 5}}}}).status_code == 201
    assert c.post("/users/p1/ratings", json={{"item": "a2", "rating": 4}}).status_code == 201
    assert c.get("/users/p1/recommendations").status_code == 200
print(sorted(m for m in ("torch", "fastai", "pandas", "sklearn", "matplotlib") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_serve_command_binds_localhost_by_default():
    from cfb.cli.main import serve

    params = {p.name: p for p in serve.params}
    assert params["host"].default == "127.0.0.1"
    assert params["token"].envvar == "CFB_API_TOKEN"


@pytest.mark.parametrize("entry", [
    {"answers": {"gender": "X"}}, {"ratings": {"nope": 5}}, {"ratings": {"a1": 9}}, {"user": "a0"},
    {"user": "  "}, {"answers": {"age": "old"}}, {"ratings": {"Alpha film 1": "x"}}, {"extra": 1},
    {"user": "L" * 256}, {"user": "a\x00b"}, {"ratings": {"x\x00": 3}}, {"ratings": {"L" * 256: 3}},
])
def test_server_signup_checks_what_onboard_checks(trained, entry):
    from cfb.cf_core.errors import InputError
    from cfb.service.signup import signup_one
    from cfb.service.onboard import onboard

    engine, _ = trained
    with pytest.raises(InputError) as expected:
        onboard(engine, [("request body", entry)])
    with pytest.raises(InputError) as got:
        signup_one(engine, entry)
    assert str(got.value) == str(expected.value) and got.value.field == expected.value.field


def test_server_signup_stores_what_onboard_stores(trained):
    from sqlalchemy import text

    from cfb.service.signup import signup_one
    from cfb.service.onboard import onboard

    engine, _ = trained
    entry = {"answers": {"gender": "F", "age": 30}, "ratings": {"a1": 5, "Beta film 21": 1}}
    first = onboard(engine, [("e", entry)])["onboarded"][0]
    second = signup_one(engine, entry)["onboarded"][0]
    assert first["ratings"] == second["ratings"] == 2
    n1, n2 = int(first["user"].split("-")[1]), int(second["user"].split("-")[1])
    assert first["user"].startswith("new-") and n2 == n1 + 1
    q = ("SELECT u.attributes, a.answers, a.ratings, (SELECT group_concat(item_id || ':' || rating) FROM ratings r "
         "WHERE r.user_id = u.id) FROM users u JOIN answers a ON a.user_id = u.id WHERE u.external_id = :u")
    with engine.connect() as conn:
        rows = [conn.execute(text(q), {"u": f["user"]}).one() for f in (first, second)]
    assert rows[0] == rows[1]


def test_a_signup_asks_again_under_the_lock_for_an_id_it_missed(trained, monkeypatch):
    """A title misses as an id when the signup is checked; if another writer adds an item with that id
    before the write lock is taken, the id wins under the lock, as `cfb onboard` would have it (only
    the ids found are reused from the first check)."""
    import contextlib

    from sqlalchemy import insert, text

    import cfb.service.signup as signup
    from cfb.db.schema import Item

    engine, _ = trained
    real = signup.writing

    @contextlib.contextmanager
    def another_writer_first(eng):  # noqa: ANN001, ANN202
        with eng.begin() as conn:
            conn.execute(insert(Item).values(external_id="Alpha film 0", title=None, attributes={}))
        with real(eng) as conn:
            yield conn

    monkeypatch.setattr(signup, "writing", another_writer_first)
    user = signup.signup_one(engine, {"ratings": {"Alpha film 0": 5}})["onboarded"][0]["user"]
    with engine.connect() as conn:
        rated = conn.execute(text("SELECT i.external_id FROM ratings r JOIN users u ON u.id = r.user_id "
                                  "JOIN items i ON i.id = r.item_id WHERE u.external_id = :u"), {"u": user}).scalars().all()
    assert rated == ["Alpha film 0"]  # the item whose id it is, not a0 (titled so)


def test_a_servers_signup_looks_its_items_up_in_one_query(trained):
    """A signup's statements do not grow with its ratings (each item was once a query of its own, twice:
    checked outside the write lock and again inside), and items named by title still land."""
    from sqlalchemy import event, text

    from cfb.service.signup import signup_one

    engine, _ = trained

    def statements(entry: dict) -> tuple[list[str], str]:
        seen: list[str] = []
        listener = lambda conn, cursor, statement, *rest: seen.append(statement)  # noqa: E731
        event.listen(engine, "before_cursor_execute", listener)
        try:
            user = signup_one(engine, entry)["onboarded"][0]["user"]
        finally:
            event.remove(engine, "before_cursor_execute", listener)
        return seen, user

    statements({"ratings": {"a1": 5}})  # (the serving version is loaded and cached)
    few, _ = statements({"ratings": {"a1": 5, "b21": 1}})
    many, _ = statements({"ratings": {f"a{i}": 5 for i in range(12)} | {"b21": 1, "b23": 2}})
    assert len(many) == len(few)
    _, user = statements({"ratings": {**{f"a{i}": 5 for i in range(12)}, "Beta film 22": 1, "b23": 2}})
    with engine.connect() as conn:
        stored = dict(conn.execute(text("SELECT i.external_id, r.rating FROM ratings r JOIN users u ON u.id = r.user_id "
                                        "JOIN items i ON i.id = r.item_id WHERE u.external_id = :u"), {"u": user}).all())
    assert stored == {**{f"a{i}": 5.0 for i in range(12)}, "b22": 1.0, "b23": 2.0}


def test_the_servers_answer_cache_never_serves_a_stale_answer(server, trained, db_url, tmp_path):
    from sqlalchemy import select

    from cfb.db import store
    from cfb.db.schema import Item
    from cfb.service.serving import recommend

    engine, _ = trained

    def same_as_service(user: str, n: int = 10) -> dict:
        got = server.get(f"/users/{user}/recommendations", params={"n": n}).json()
        with engine.connect() as conn:
            assert got == recommend(conn, user, n)
        return got

    first = same_as_service("b1")
    assert same_as_service("b1") == first  # asked again, nothing changed
    rated = server.post("/users/b1/ratings", json={"item": first["items"][3]["item"], "rating": 5}).json()
    second = same_as_service("b1")
    assert rated["item"] not in [i["item"] for i in second["items"]]
    # re-rating an item the user already rated (same number of ratings) counts too
    again = server.post("/users/b1/ratings", json={"item": rated["item"], "rating": 1})
    assert again.status_code == 201
    same_as_service("b1")
    # a pair the full retrain learned, changed twice since (its learned value read from the replaced rows)
    with engine.connect() as conn:
        learned = store.user_ratings_replaced(conn, store.user_id_of(conn, "b1"))[0][0]
        key = conn.scalar(select(Item.external_id).where(Item.id == int(learned)))
    for value in (1, 4):
        assert server.post("/users/b1/ratings", json={"item": key, "rating": value}).status_code == 201
        same_as_service("b1")
    # new attributes (cfb ingest users) count at once
    users = tmp_path / "users.csv"
    users.write_text("user,gender,age\nb1,F,20\n", encoding="utf-8")
    assert CliRunner().invoke(cli, ["--db", db_url, "ingest", "users", str(users)]).exit_code == 0
    same_as_service("b1")
    same_as_service("b1", 3)


def test_inspect_pca_command_and_plot(trained, db_url, tmp_path):
    out = cli_json(db_url, "inspect", "pca", "-n", "12")
    assert out["version"] == 1 and len(out["items"]) == 12 and len(out["explained_variance"]) == 3
    counts = [i["ratings"] for i in out["items"]]
    assert counts == sorted(counts, reverse=True)  # the most-rated items
    png = tmp_path / "map.png"
    res = CliRunner().invoke(cli, ["--db", db_url, "inspect", "pca", "-n", "12", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plot written" in res.output
    for bad in ("noext", "x.xyz"):  # a name the PNG would not be written under: refused, nothing written
        res = CliRunner().invoke(cli, ["--db", db_url, "inspect", "pca", "--plot", str(tmp_path / bad)])
        assert res.exit_code == 1 and "give a file name ending in .png" in res.output
        assert not list(tmp_path.glob(bad + "*"))
    # the planted taste groups separate along the first component
    a = [i["pc1"] for i in out["items"] if i["item"].startswith("a")]
    b = [i["pc1"] for i in out["items"] if i["item"].startswith("b")]
    assert a and b and (max(a) < min(b) or max(b) < min(a))


def test_a_plot_draws_titles_as_they_are_and_says_which_characters_its_font_lacks(tmp_path):
    """Titles are users' text (`cfb ingest items`): a `$` is no math (two of them crashed matplotlib's
    parser, a valid pair turned into italics), and characters the font has no glyph for are one list,
    not a warning per glyph."""
    import warnings

    from cfb.service.inspect import plot_pca

    titles = ["Money $\\frac$ Talks", "Price_$x^$ 2", "東京物語 (1953)", "Plain"]
    result = {"version": 1, "explained_variance": [0.2, 0.1],
              "items": [{"item": str(k), "title": t, "pc1": float(k), "pc2": float(-k)} for k, t in enumerate(titles)]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        missing = plot_pca(result, tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert missing == "".join(sorted("東京物語")) and not [w for w in caught if "Glyph" in str(w.message)]


def test_a_plot_name_is_quoted_as_given(trained, db_url, tmp_path):
    res = CliRunner().invoke(cli, ["--db", db_url, "inspect", "pca", "--plot", ""])
    assert res.exit_code in (1, 2) and "'.'" not in res.output, res.output
    res = CliRunner().invoke(cli, ["--db", db_url, "inspect", "pca", "-n", "5", "--plot", str(tmp_path / ".png")])
    assert res.exit_code == 0 and (tmp_path / ".png").exists(), res.output  # (a name that ends in .png)
    # a title the font cannot draw: one note from the CLI (stderr), one warning from Python
    import cfb

    csv = tmp_path / "cjk.csv"
    csv.write_text("item,title\na1,東京物語\n", encoding="utf-8")
    assert CliRunner().invoke(cli, ["--db", db_url, "ingest", "items", str(csv)]).exit_code == 0
    res = CliRunner().invoke(cli, ["--db", db_url, "inspect", "pca", "-n", "40", "--plot", str(tmp_path / "m.png"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["plot"] == str(tmp_path / "m.png")
    assert res.stderr.strip().splitlines() == ["note: the plot's font has no glyph for 4 character(s) of its labels "
                                               "(drawn as boxes): " + "".join(sorted("東京物語"))]
    with pytest.warns(UserWarning, match="no glyph for 4 character") as caught:
        cfb.open(db_url).pca(n=40, plot=tmp_path / "p.png")
    assert caught[0].filename == __file__  # (the caller's line, not cfb's wrapper)


def test_python_api(trained, db_url, tmp_path):
    import cfb

    assert cfb.CfbError.__name__ == "CfbError"
    with cfb.open(db_url) as db:
        q = db.questionnaire(budget=3)
        assert len(q["items"]) == 3 and q["attributes"]
        user = db.onboard({"answers": {"gender": "F"}, "ratings": {"a1": 5}})
        assert user.startswith("new-")
        recs = db.recommend(user, n=5)
        assert list(recs.columns) == ["item", "title", "score"] and len(recs) == 5
        db.rate(user, recs.item[0], 1)
        assert recs.item[0] not in set(db.recommend(user, n=5).item)
        sim = db.similar("a1", n=3)
        assert len(sim) == 3 and "a1" not in set(sim.item)
        mapped = db.pca(n=10, plot=tmp_path / "m.png")
        assert mapped.shape[0] == 10
        whole = json.loads(CliRunner().invoke(cli, ["--db", db_url, "inspect", "pca", "-n", "10", "--json"]).output)
        assert mapped.attrs == {k: v for k, v in whole.items() if k != "items"}  # (the explained variance too)
        assert set(mapped.attrs) == {"version", "fitted_on", "explained_variance"}
        assert db.models().serving.tolist() == [True]
        with pytest.raises(cfb.UnknownIdError, match="unknown user"):  # (a CfbError of its kind)
            db.recommend("nobody")
        with pytest.raises(cfb.UnknownIdError, match="unknown item") as caught:
            db.similar("no such film")
        assert caught.value.field == "item" and isinstance(caught.value, cfb.CfbError)
        with pytest.raises(cfb.UserExistsError, match="already exists"):
            db.onboard({"user": user, "answers": {}})
        with pytest.raises(cfb.CfbError, match=r"rating nan is not a finite number"):
            db.rate(user, "a2", float("nan"))
        with pytest.raises(cfb.CfbError, match=r"^empty item id$"):
            db.rate(user, " ", 4)
        with pytest.raises(cfb.CfbError, match=r"kind, n_factors only apply to a full retrain"):
            db.retrain(kind="nn", n_factors=3)
        # every `cfb ingest` command has its method, with the CLI's checks
        items = tmp_path / "items.csv"
        items.write_text("item,title,genres\nfresh1,Fresh One,Action|Thriller\n")
        assert db.ingest_items(items) == {"items": 1, "added": 1, "updated": 0, "unchanged": 0, "shared_titles": []}
        users = tmp_path / "users.csv"
        users.write_text("user,age\n" + user + ",33\n")
        assert db.ingest_users(str(users))["users"] == 1
        ratings = tmp_path / "ratings.csv"
        ratings.write_text("user,item,rating\n" + user + ",fresh1,5\n")
        assert db.ingest_ratings(ratings)["new_ratings"] == 1
        assert db.retrain()["items_added"] == 1 and db.predict([(user, "fresh1")])[0] > 0
        for call, message in [(lambda: db.ingest_ratings(ratings, scale=(1, 10)), r"rating scale is 1..5, not 1..10"),
                              (lambda: db.ingest_ratings(ratings, scale=(5, 1)), r"^scale must be \(low, high\)"),
                              (lambda: db.ingest_ratings(ratings, scale=(0, 3e38)), r"^a rating scale 0..3e\+38"),
                              (lambda: db.ingest_items(tmp_path), r"^file .* is a directory$"),
                              (lambda: db.ingest_users(tmp_path / "no.csv"), r"^file .*no.csv' does not exist$"),
                              (lambda: db.ingest_goodbooks(tmp_path / "none"), r"ratings.csv")]:
            with pytest.raises(cfb.CfbError, match=message):
                call()
    missing = tmp_path / "typo.db"  # a mistyped path: only an ingest makes a database
    with cfb.open(f"sqlite:///{missing}") as db:
        for call in (lambda: db.recommend("1"), db.models, lambda: db.retrain(full=True),
                     lambda: db.rate("u", "i", 4), lambda: db.onboard({"answers": {}}), db.app,
                     lambda: db.serve(port=1)):
            with pytest.raises(cfb.CfbError, match=r"^no database at .*typo\.db: `cfb ingest"):
                call()
    assert not missing.exists()
    with cfb.open(f"sqlite:///{missing}") as db:  # ingested, not trained: no version, the columns still there
        db.ingest_ratings(ratings, scale=(1, 5))
        assert db.models().empty and "serving" in db.models().columns


@pytest.mark.parametrize("fast_path", [True, False])
def test_an_empty_database_answers_503_with_one_line_on_every_route(tmp_path, fast_path):
    """A server on a database nothing was ingested into (tables missing) answers each request with 503
    and what to do, as JSON (the web page: as a page), never a 500."""
    (tmp_path / "empty.db").touch()
    with running_server(f"sqlite:///{tmp_path / 'empty.db'}", fast_path=fast_path) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        for method, path in [("GET", "/health"), ("GET", "/questionnaire"), ("GET", "/users/1/recommendations"),
                             ("GET", "/items/1/similar"), ("GET", "/models"), ("POST", "/users")]:
            res = client.request(method, path, json={} if method == "POST" else None)
            assert res.status_code == 503, (path, res.text)
            assert res.json() == {"error": "the database holds no cfb data yet: run `cfb ingest …` first"}
        page = client.get("/user/1")
        assert page.status_code == 503 and "the database holds no cfb data yet" in page.text


def test_ready_answers_200_only_while_a_version_can_serve(trained, db_url, tmp_path):
    """``/health`` is liveness (200 while the database answers, whatever it holds); ``/ready`` is
    readiness: 200 with the version once one is loaded and can answer, 503 saying what to do before any
    retrain and while the serving version's arrays cannot be read (a load balancer sends it no one)."""
    import cfb
    from cfb.db.engine import writing
    from cfb.db.schema import ModelArrays
    from cfb.service import state

    (tmp_path / "r.csv").write_text("user,item,rating\nu1,i1,4\nu2,i1,3\n")
    untrained = f"sqlite:///{tmp_path / 'untrained.db'}"
    with cfb.open(untrained) as db:
        db.ingest_ratings(tmp_path / "r.csv", scale=(1, 5))
    with running_server(untrained) as base, httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/health").json() == {"status": "ok", "version": None}
        res = client.get("/ready")
        assert res.status_code == 503 and "cfb retrain --full" in res.json()["error"], res.text
        assert client.head("/ready").status_code == 503
    engine, report = trained
    with running_server(db_url) as base, httpx.Client(base_url=base, timeout=30) as client:
        res = client.get("/ready")
        assert res.status_code == 200 and res.json() == {"status": "ready", "version": report["version"]}
        assert client.head("/ready").status_code == 200
        with writing(engine) as conn:
            conn.execute(ModelArrays.__table__.update()
                         .where(ModelArrays.version_id == report["version"]).values(data=b"garbage"))
        state._CACHE.clear()  # (as a server started after the damage)
        res = client.get("/ready")
        assert res.status_code == 503, res.text
        assert res.json()["error"].startswith(f"model version {report['version']} is damaged")
        assert client.get("/health").status_code == 200


def test_a_write_from_another_sites_page_is_refused(server, db_url):
    """Without a token too: a browser on another site may POST text/plain here without asking (a
    "simple" request), but it says where the page came from; this server's own page passes."""
    body = '{"item": "a1", "rating": 4}'
    for origin in ("http://evil.example", "null", "", "file://"):
        res = server.post("/users/a0/ratings", content=body, headers={"Origin": origin, "Content-Type": "text/plain"})
        assert res.status_code == 403 and "refused" in res.json()["error"]
    own = server.base_url.netloc.decode() if isinstance(server.base_url.netloc, bytes) else server.base_url.netloc
    res = server.post("/users/a0/ratings", content=body, headers={"Origin": f"http://{own}"})
    assert res.status_code == 201
    assert server.post("/users/a0/ratings", content=body).status_code == 201  # (no Origin: not a browser page)


def test_a_site_let_in_may_write_and_a_proxys_host_counts_as_ours(trained, db_url):
    body = '{"item": "a1", "rating": 4}'
    with running_server(db_url, allowed_origins=("https://shop.example/",)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        assert client.post("/users/a0/ratings", content=body, headers={"Origin": "https://shop.example"}).status_code == 201
        assert client.post("/users/a0/ratings", content=body, headers={"Origin": "https://other.example"}).status_code == 403
        proxied = {"Origin": "https://cfb.example", "X-Forwarded-Host": "cfb.example"}
        assert client.post("/users/a0/ratings", content=body, headers=proxied).status_code == 201
        # a browser asks first (a JSON body, a token), then lets the page read the answer: CORS for that site only
        ask = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}
        r = client.options("/users/a0/ratings", headers=ask)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://shop.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        for refused in ({**ask, "Origin": "https://other.example"}, {**ask, "Access-Control-Request-Method": "DELETE"}):
            r = client.options("/users/a0/ratings", headers=refused)  # (answered as every error is: it was text)
            assert r.status_code == 400 and r.headers["content-type"] == "application/json"
            assert r.headers.get("access-control-allow-origin") == (None if "other" in refused["Origin"] else
                                                                   "https://shop.example")
            assert r.json()["error"].startswith("CORS preflight refused: Disallowed CORS ")
        for r in (client.post("/users/a0/ratings", json={"item": "a1", "rating": 4}, headers={"Origin": "https://shop.example"}),
                  client.get("/users/a0/recommendations", headers={"Origin": "https://shop.example"})):
            assert r.status_code in (200, 201) and r.headers["access-control-allow-origin"] == "https://shop.example"
        r = client.get("/users/a0/recommendations", headers={"Origin": "https://other.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # (the browser hides it)


def test_a_signups_misspelt_title_suggests_titles_as_the_cli_does(server):
    r = server.post("/users", json={"ratings": {"Alpha flim 1": 5}})
    assert r.status_code == 422 and r.json()["field"] == "ratings.Alpha flim 1"
    assert "unknown item; did you mean: Alpha film 1" in r.json()["error"]


def test_a_long_field_is_named_whole_in_the_json_and_cut_in_the_message(server):
    """The API's ``field`` names the answer or rating whole (the page finds its control by it), while the
    one-line message cuts a long name short."""
    long_attr, long_item = "a" * 80 + "z", "Alpha film 1 " + "x" * 80
    for body, field in (({"answers": {long_attr: "x"}}, f"answers.{long_attr}"),
                        ({"ratings": {long_item: 5}}, f"ratings.{long_item}")):
        r = server.post("/users", json=body)
        assert r.status_code == 422 and r.json()["field"] == field, r.text
        assert field not in r.json()["error"] and f"field '{field[:30]}" in r.json()["error"]
        assert len(r.json()["error"].split(":")[0]) < 90 and "\n" not in r.json()["error"]


def test_the_sign_up_page_sends_an_answer_exactly_as_stored(trained, db_url, tmp_path):
    """An option's value is its stored text: without ``value`` a browser sends the option's text with
    its spaces trimmed and collapsed ("Bosnia  and Herzegovina" became a value no question offers)."""
    from cfb.service.training import retrain_full

    from .conftest import FAST

    engine, _ = trained
    users = tmp_path / "users.csv"
    users.write_text("user,country\n" + "".join(f"a{k},{'Bosnia  and Herzegovina' if k % 4 else 'Brazil'}\n"
                                                for k in range(0, 24, 2)))  # (trained users: a0, a2, ...)
    assert CliRunner().invoke(cli, ["--db", db_url, "ingest", "users", str(users)]).exit_code == 0
    retrain_full(engine, kind="dot", valid_pct=0.0, progress=False, **FAST)
    with running_server(db_url) as base, httpx.Client(base_url=base, timeout=30) as client:
        page = client.get("/").text
        assert "<option value='Bosnia  and Herzegovina'>" in page and "<option>" not in page
        signup = {"answers": {"country": "Bosnia  and Herzegovina"}}
        assert client.post("/users", json=signup).status_code == 201


def test_the_page_offers_the_ratings_the_scale_takes():
    """The sign-up and rating pages offer each rating the database takes: its fixed step, half
    stars, tenths of a narrow scale; never a value the API would refuse."""
    from cfb.db.store import rating_problem
    from cfb.service.web_pages import rating_choices

    assert rating_choices((1.0, 5.0), 1.0) == rating_choices((1.0, 5.0), None) == [1, 2, 3, 4, 5]
    assert rating_choices((0.5, 5.0), 0.5) == [k / 2 for k in range(1, 11)]
    assert rating_choices((1.0, 5.0), 0.5) == [1 + k / 2 for k in range(9)]  # whole ends, half stars
    assert rating_choices((0.1, 0.3), None) == [0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.22, 0.24, 0.26, 0.28, 0.3]
    assert rating_choices((0.0, 1.0), None) == [k / 10 for k in range(11)]
    assert rating_choices((1.0, 3.0), None) == [1, 2, 3]
    wide = rating_choices((0.0, 1000.0), 1.0)
    assert len(wide) == 11 and wide[0] == 0 and wide[-1] == 1000
    for scale, step in (((1.0, 5.0), 0.5), ((0.5, 5.0), 0.5), ((0.0, 1000.0), 1.0), ((0.1, 0.3), None)):
        assert all(rating_problem(v, scale, step) is None for v in rating_choices(scale, step))


def test_origin_keys_are_what_a_browser_sends():
    from cfb.service.http_guards import origin_key

    assert origin_key("https://Shop.example:443/") == origin_key("https://shop.example") == "https://shop.example"
    assert origin_key("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert origin_key("http://[::1]:80") == "http://[::1]"
    for bad in ("shop.example", "ftp://x", "null", "", "https://x/path", "file://"):
        assert origin_key(bad) is None


def test_a_server_for_this_machine_only_refuses_other_host_names(trained, db_url):
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends Host and Origin
    evil.example, which match each other; a server bound to this machine answers only for its names."""
    body = '{"item": "a1", "rating": 4}'
    with running_server(db_url, local_hosts_only=True, allowed_origins=("https://shop.example",)) as base, \
            httpx.Client(base_url=base, timeout=30) as client:
        port = base.rsplit(":", 1)[1]
        rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        r = client.post("/users/a0/ratings", content=body, headers=rebound)
        assert r.status_code == 400 and "this machine only" in r.json()["error"]
        assert client.get("/users/a0/recommendations", headers={"Host": f"evil.example:{port}"}).status_code == 400
        assert client.get("/health").status_code == 200
        assert client.get("/health", headers={"Host": f"localhost:{port}"}).status_code == 200
        assert client.get("/health", headers={"Host": "shop.example"}).status_code == 200


def test_every_loopback_host_binds_this_machine_only(monkeypatch):
    """`cfb serve --host 127.0.0.2` (or the machine's own name, which Debian maps to 127.0.1.1) is as
    local as 127.0.0.1: the Host guard must be on for it too; a public address leaves it off."""
    from cfb.service import http_guards
    from cfb.service.http_guards import binds_this_machine_only

    for host in ("127.0.0.1", "127.0.0.2", "127.0.1.1", "::1", "localhost"):
        assert binds_this_machine_only(host), host
    for host in ("0.0.0.0", "::", "192.0.2.7", "2001:db8::1"):
        assert not binds_this_machine_only(host), host
    real = socket.getaddrinfo
    names = {"myhost": "127.0.1.1", "pubhost": "192.0.2.7"}
    monkeypatch.setattr(http_guards.socket, "getaddrinfo", lambda host, *a, **k: (
        [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], 0))] if host in names else real(host, *a, **k)))
    assert binds_this_machine_only("myhost") and not binds_this_machine_only("pubhost")


def test_a_server_bound_to_another_loopback_address_refuses_other_host_names(trained, db_url):
    """The real `cfb serve --host 127.0.0.2`: a request naming evil.example is refused as on 127.0.0.1
    (it was answered, and a rating written, with no Host check); the bound address and the machine's
    loopback names are answered."""
    from pathlib import Path

    from sqlalchemy import create_engine, select

    from cfb.db.schema import Rating, User

    def a0_ratings() -> list:
        engine = create_engine(db_url)
        with engine.connect() as conn:
            rows = conn.execute(select(Rating.item_id, Rating.rating, Rating.seq).join(User, User.id == Rating.user_id)
                                .where(User.external_id == "a0").order_by(Rating.item_id)).all()
        engine.dispose()
        return rows

    before = a0_ratings()
    exe = Path(sys.executable).with_name("cfb")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cfb.cli"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([*cmd, "--db", db_url, "serve", "--host", "127.0.0.2", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.2:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{base}/health", timeout=5)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.2)
        rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}",
                   "Content-Type": "application/json"}
        r = httpx.post(f"{base}/users/a0/ratings", content='{"item": "a1", "rating": 1}', headers=rebound, timeout=30)
        assert r.status_code == 400 and "this machine only" in r.json()["error"], r.text
        for host in (f"127.0.0.2:{port}", f"localhost:{port}", "127.0.0.1"):
            assert httpx.get(f"{base}/health", headers={"Host": host}, timeout=30).status_code == 200, host
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert a0_ratings() == before  # nothing was written by the refused request


def test_an_unknown_items_hint_is_found_outside_the_write_lock(trained, monkeypatch):
    """The hint for an unknown item reads and compares every title (seconds on a large catalogue), so a
    sign-up or a rating naming one is refused before the write transaction: other writers never wait
    for it."""
    import sqlite3

    from cfb.service import serving
    from cfb.service.signup import signup_one
    from cfb.service.ratings import rate_item

    engine, _ = trained
    locked = []

    def hint_noting_the_lock(query, titles):  # noqa: ANN001
        probe = sqlite3.connect(engine.url.database, timeout=0)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.rollback()
            locked.append(False)
        except sqlite3.OperationalError:  # database is locked: a writer holds it
            locked.append(True)
        finally:
            probe.close()
        return real_close(query, titles)

    real_close = serving.close_titles  # (what a sign-up's and a rating's hints both call)
    monkeypatch.setattr(serving, "close_titles", hint_noting_the_lock)
    with pytest.raises(InputError, match="field 'ratings.Alpha flim 1': unknown item; did you mean: Alpha film 1"):
        signup_one(engine, {"ratings": {"Alpha flim 1": 5}})
    with pytest.raises(CfbError, match="unknown item 'Alpha flim 1'; did you mean: Alpha film 1"):
        rate_item(engine, "a0", "Alpha flim 1", 5)
    assert locked == [False, False]


def test_a_write_that_waits_out_another_writer_is_503_with_retry_after(trained, db_url, monkeypatch, tmp_path):
    """A long ingest holds SQLite's write lock past the busy timeout: a rating or sign-up sent meanwhile
    is told to try again (503, Retry-After, one line), while reads go on; nothing is written."""
    import sqlite3

    import cfb

    from .conftest import write

    from cfb.db import engine as engine_module

    engine, _ = trained
    monkeypatch.setattr(engine_module, "BUSY_TIMEOUT_MS", 300)
    body = {"item": "a1", "rating": 4}
    with running_server(db_url) as base, httpx.Client(base_url=base, timeout=30) as client:
        n = user_count(engine)
        writer = sqlite3.connect(engine.url.database, timeout=0)
        writer.execute("BEGIN IMMEDIATE")
        try:
            for r in (client.post("/users/a0/ratings", json=body), client.post("/users", json={"answers": {}})):
                assert r.status_code == 503 and r.headers["retry-after"] == "10", r.text
                assert "busy" in r.json()["error"] and "\n" not in r.json()["error"]
            assert client.get("/users/a0/recommendations").status_code == 200
            res = CliRunner().invoke(cli, ["--db", db_url, "rate", "a0", "a1", "4"])  # the CLI says the same
            assert res.exit_code == 1 and res.output.strip() == f"Error: {BUSY}", res.output
            with cfb.open(db_url) as db, pytest.raises(cfb.BusyError, match=re.escape(BUSY)):  # and Python, a kind of its own
                db.rate("a0", "a1", 4)
            for args, said in ((["rate", "nobody", "a1", "4"], "unknown user 'nobody'"),  # bad input: its own error,
                               (["rate", "a0", "a1", "9"], "outside the scale"),  # found before the wait
                               (["onboard", "--answers", str(write(tmp_path / "a.json", '[{"user": "a0"}]'))],
                                "user 'a0' already exists"),
                               (["ingest", "ratings", str(write(tmp_path / "r.csv", "user,item,rating\na0,a1,9\n"))],
                                "outside the scale")):
                res = CliRunner().invoke(cli, ["--db", db_url, *args])
                assert res.exit_code == 1 and said in res.output and "busy" not in res.output, res.output
        finally:
            writer.rollback()
            writer.close()
        assert user_count(engine) == n
        assert client.post("/users/a0/ratings", json=body).status_code == 201


def test_many_writes_waiting_on_another_writer_leave_connections_for_the_reads(trained, db_url, monkeypatch):
    """Twenty writes sent while another process holds the write lock: at most ``WAITING_WRITERS`` of
    them hold a pooled connection while they wait (they held one each, so past 15 the pool ran dry:
    the rest failed with a 500 and every read, on the event loop, waited for a connection); each is
    answered 503 with Retry-After, and reads are answered meanwhile. (tests/test_postgres.py: the same
    on PostgreSQL.)"""
    import sqlite3

    from cfb.db import engine as engine_module
    from cfb.db.engine import make_engine

    @contextmanager
    def another_writer():  # noqa: ANN202
        writer = sqlite3.connect(engine.url.database, timeout=0)
        writer.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            writer.rollback()
            writer.close()

    engine, _ = trained
    monkeypatch.setattr(engine_module, "BUSY_TIMEOUT_MS", 3000)
    check_writes_wait_without_starving_reads(make_engine(db_url), another_writer, lambda: user_count(engine))


def check_writes_wait_without_starving_reads(served: Engine, another_writer, users: Callable[[], int]) -> None:
    """20 sign-ups at once to a server over ``served`` while ``another_writer()`` holds the write lock:
    each answered 503 with Retry-After within about the busy timeout (the wait for a turn counts in it),
    none written; meanwhile reads on the event loop and on the thread pool (/health, similar items, a
    page) are answered, bad input is answered as such (it is found before the write waits), and at most
    ``WAITING_WRITERS`` (+ the read of the moment) of ``served``'s pooled connections are in use."""
    from concurrent.futures import ThreadPoolExecutor

    from cfb.db import engine as engine_module
    from cfb.service.http import WAITING_WRITERS

    held = []
    with running_server(served, fast_path=False) as base, httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/health").status_code == 200
        n = users()
        with another_writer(), ThreadPoolExecutor(20) as pool:
            started = time.monotonic()
            sent = [pool.submit(client.post, "/users", json={"answers": {}}) for _ in range(20)]
            time.sleep(0.3)
            assert client.get("/items/a1/similar").status_code == 200 and client.get("/user/a0").status_code == 200
            assert client.post("/users/a0/ratings", json={"item": "no such item", "rating": 4}).status_code == 404
            assert client.post("/users/nobody/ratings", json={"item": "a1", "rating": 4}).status_code == 404
            assert client.post("/users/a0/ratings", json={"item": "a1", "rating": 99}).status_code == 422
            assert client.post("/users", json={"ratings": {"no such item": 4}}).status_code == 422
            assert not any(f.done() for f in sent)  # (all of that while every write still waited)
            while not all(f.done() for f in sent):
                held.append(served.pool.checkedout())
                assert client.get("/health").status_code == 200
                time.sleep(0.05)
            answers, waited = [f.result() for f in sent], time.monotonic() - started
        assert {r.status_code for r in answers} == {503}, {r.status_code for r in answers}
        assert all(r.headers["retry-after"] == "10" for r in answers)
        assert waited < 1.5 * engine_module.BUSY_TIMEOUT_MS / 1000  # (a turn's wait and the lock's were added)
        assert users() == n
    assert 1 <= max(held) <= WAITING_WRITERS + 1
    served.dispose()


def test_a_pool_with_no_free_connection_is_503_not_500(trained, db_url):
    """A request that waits out the connection pool's timeout (every connection in use) is told to try
    again, as a busy database is, not answered with a server error."""
    from sqlalchemy import create_engine

    tiny = create_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=0.5)
    with running_server(tiny, fast_path=False) as base, httpx.Client(base_url=base, timeout=30) as client:
        with tiny.connect():  # the pool's one connection, held
            r = client.get("/users/a0/recommendations")
        assert r.status_code == 503 and r.headers["retry-after"] == "10" and "busy" in r.json()["error"], r.text
        assert client.get("/users/a0/recommendations").status_code == 200
    tiny.dispose()


def test_a_user_id_with_surrounding_spaces_is_the_user_on_every_path(trained, db_url):
    """As every reader strips an id's surrounding spaces, so do the recommendations, on the fast path
    (SQLite) as on the route."""
    for fast in (True, False):
        with running_server(db_url, fast_path=fast) as base, httpx.Client(base_url=base, timeout=30) as client:
            plain = client.get("/users/a0/recommendations").json()
            assert client.get("/users/%20a0%20/recommendations").json() == plain
            assert plain["user"] == "a0"
            rated = client.post("/users/%20a0%20/ratings", json={"item": "a1", "rating": 4})
            assert rated.status_code == 201 and rated.json()["user"] == "a0"  # the user it was stored for


def test_a_database_made_again_at_the_same_path_is_served_within_a_second(trained, db_url, tmp_path):
    """`./quickstart.sh` deletes and makes the demo database again while a server may still run on it:
    the server notices the new file and reads and writes it, not the deleted one (its connections
    would otherwise keep the old file open), and answers from the new file's model and ids though
    its version has the same number."""
    import sqlite3
    from pathlib import Path

    import pandas as pd

    from cfb.db.engine import make_engine
    from cfb.service.ingest import ingest_dataset
    from cfb.service.onboard import onboard
    from cfb.service.training import retrain_full

    from .conftest import FAST, checkpointed_copy, planted_ratings

    engine, _ = trained
    (tmp_path / "other").mkdir()
    other = make_engine(f"sqlite:///{tmp_path / 'other' / 'cfb.db'}")
    again = planted_ratings(seed=1)  # other ratings, and every item one database id further on
    again.items = pd.concat([pd.DataFrame({"item": ["aaa-first"], "title": ["First"], "attributes": [{}]}), again.items])
    again.ratings = pd.concat([pd.DataFrame([{"user": "a0", "item": "aaa-first", "rating": 5.0, "timestamp": 0}]),
                               again.ratings])
    ingest_dataset(other, again)
    assert retrain_full(other, progress=False, **{**FAST, "seed": 7})["version"] == 1
    onboard(other, [("e", {"user": "only-in-the-new-file", "answers": {}, "ratings": {"a1": 5}})])
    with running_server(db_url) as base, httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/users/only-in-the-new-file/recommendations").status_code == 404
        assert client.get("/users/a0/recommendations").status_code == 200  # (the fast path has its connection)
        path = Path(engine.url.database)
        for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            leftover.unlink(missing_ok=True)
        # while no file is there: 503 to every request (not answered from, nor written into, the deleted file)
        for r in (client.get("/health"), client.get("/users/a0/recommendations"),
                  client.post("/users/a0/ratings", json={"item": "a2", "rating": 5})):
            assert r.status_code == 503 and f"no database at {path}" in r.json()["error"], r.text
        page = client.get("/", headers={"accept": "text/html"})
        assert page.status_code == 503 and "no database at" in page.text and "<html" in page.text.lower()
        assert not path.exists()
        checkpointed_copy(other, path)
        # at once, before the server's poll: the request itself moves the server to the new file
        assert client.post("/users/only-in-the-new-file/ratings", json={"item": "a3", "rating": 4}).status_code == 201
        deadline = time.monotonic() + 10
        while client.get("/users/only-in-the-new-file/recommendations").status_code != 200:
            assert time.monotonic() < deadline, "the server still reads the deleted file"
            time.sleep(0.1)
        with running_server(db_url, fast_path=False) as fresh_base, httpx.Client(base_url=fresh_base) as fresh:
            for user in ("a0", "only-in-the-new-file"):
                url = f"/users/{user}/recommendations"
                assert client.get(url).json() == fresh.get(url).json()  # the new file's model and ids
        assert client.post("/users/only-in-the-new-file/ratings", json={"item": "a2", "rating": 5}).status_code == 201
    with sqlite3.connect(path) as conn:  # the write went to the new file
        assert conn.execute("SELECT count(*) FROM ratings r JOIN users u ON u.id = r.user_id "
                            "WHERE u.external_id = 'only-in-the-new-file'").fetchone() == (3,)


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_file_that_is_no_database_is_a_json_503_not_a_bare_500(trained, db_url, tmp_path, fast_path):
    """A database file replaced by one that is not a database (or is damaged) while the server runs: every
    request is answered with the Error body, 503, saying so in one line (it was "Internal Server Error" as
    text, and a traceback in the log)."""
    import os
    from pathlib import Path

    engine, _ = trained
    path = Path(engine.url.database)
    with running_server(db_url, fast_path=fast_path) as base, httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/users/a0/recommendations").status_code == 200
        garbage = tmp_path / "garbage.db"
        garbage.write_bytes(os.urandom(100_000))
        for end in ("-wal", "-shm"):
            path.with_name(path.name + end).unlink(missing_ok=True)
        os.replace(garbage, path)
        for r in (client.get("/health"), client.get("/users/a0/recommendations"), client.get("/questionnaire"),
                  client.post("/users/a0/ratings", json={"item": "a2", "rating": 5})):
            assert r.status_code == 503 and r.headers["content-type"] == "application/json", (r.request.url, r.text)
            assert r.json()["error"].startswith("database error: file is not a database"), r.text
            assert "retry-after" not in r.headers  # (waiting will not cure it, as it cures a busy writer)
        page = client.get("/user/a0", headers={"accept": "text/html"})
        assert page.status_code == 503 and "file is not a database" in page.text and "<html" in page.text.lower()


def test_inspect_pca_of_two_items_prints_the_axes_it_has(tmp_path):
    """Two items, centred, lie on one principal axis (three on two): the text shows the axes there are,
    as the JSON does (no axis of zeros)."""
    url = f"sqlite:///{tmp_path / 'two.db'}"
    ratings = tmp_path / "r.csv"

    def trained_on(items: str) -> None:
        ratings.write_text("user,item,rating\n" + "".join(f"u{u},{i},{1 + (u * 7 + k * 3) % 5}\n"
                                                         for u in range(8) for k, i in enumerate(items)))
        for args in (["ingest", "ratings", str(ratings), "--quiet"], ["retrain", "--full", "--valid-pct", "0", "--quiet"]):
            res = CliRunner().invoke(cli, ["--db", url, *args])
            assert res.exit_code == 0, res.output

    trained_on("xy")
    out = cli_json(url, "inspect", "pca", "-n", "2")
    assert out["explained_variance"] == [1.0] and "pc2" not in out["items"][0] and out["fitted_on"] == 2
    res = CliRunner().invoke(cli, ["--db", url, "inspect", "pca", "-n", "2"])
    assert res.exit_code == 0 and res.output.splitlines()[1].split() == ["pc1", "title"], res.output
    trained_on("xyz")
    out = cli_json(url, "inspect", "pca", "-n", "3")
    assert len(out["explained_variance"]) == 2 and min(out["explained_variance"]) > 0 and "pc3" not in out["items"][0]


def test_inspect_pca_fits_its_axes_on_the_most_rated_items_whatever_it_maps(trained, db_url):
    """As chapter 8: the axes come from the 1,000 most-rated items (here every item), and -n says only how
    many of them the map shows, so the first items of a short map sit where they do in a long one."""
    long, short = cli_json(db_url, "inspect", "pca", "-n", "12"), cli_json(db_url, "inspect", "pca", "-n", "3")
    assert short["fitted_on"] == long["fitted_on"] > 12
    assert short["items"] == long["items"][:3] and short["explained_variance"] == long["explained_variance"]
    res = CliRunner().invoke(cli, ["--db", db_url, "inspect", "pca", "-n", "3"])
    assert f"axes fitted on the {long['fitted_on']} most-rated items" in res.output.splitlines()[0]




def test_a_path_with_a_trailing_slash_is_not_redirected_to_another_user(server, trained):
    """Starlette redirected ``/users/%2541x/ratings/`` to the path decoded once, ``/users/%41x/ratings``,
    which the client's next request decoded again: the rating went to user "Ax". A trailing slash is
    now not found (no redirect), and nothing is written."""
    engine, _ = trained
    for user in ("Ax", "%41x"):
        assert server.post("/users", json={"user": user, "answers": {}}).status_code == 201
    ratings = rating_count(engine)
    for method, path in (("POST", "/users/%2541x/ratings/"), ("GET", "/users/%2541x/recommendations/"),
                         ("GET", "/users/a%252Fb/recommendations/")):
        r = server.request(method, path, json={"item": "a1", "rating": 1} if method == "POST" else None)
        assert r.status_code == 404 and "location" not in r.headers and "error" in r.json(), (path, r.text)
    assert rating_count(engine) == ratings


def conforms(value, schema: dict) -> bool:
    """Whether ``value`` has the JSON Schema ``schema``'s types, required keys and item types (the subset
    /openapi.json uses for answers)."""
    kinds = {"string": str, "integer": int, "number": (int, float), "object": dict, "array": list, "null": type(None),
             "boolean": bool}
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types or []
    if types and not any(isinstance(value, kinds[t]) and (t == "boolean") == isinstance(value, bool) for t in types):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return set(schema.get("required", [])) <= set(value) and all(conforms(value[k], props[k]) for k in props if k in value)
    if isinstance(value, list):
        return all(conforms(v, schema.get("items", {})) for v in value)
    return True


def test_the_answers_are_what_openapi_json_declares(server):
    """/openapi.json declares every JSON answer (they were untyped, ``{}``) and that an id may be given as a
    whole number; what the server answers conforms (the fast path's too)."""
    spec = server.get("/openapi.json").json()
    ops = spec["paths"]

    def declared(path: str, method: str, status: str) -> dict:
        return ops[path][method]["responses"][status]["content"]["application/json"]["schema"]

    body = ops["/users/{user}/ratings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["item"]["type"] == ["string", "integer"]
    r = server.post("/users", json={"user": 77, "answers": {}, "ratings": {"a1": 5}})
    assert r.status_code == 201 and conforms(r.json(), declared("/users", "post", "201")), r.text
    r = server.post("/users/77/ratings", json={"item": "a2", "rating": 4})
    assert r.status_code == 201 and conforms(r.json(), declared("/users/{user}/ratings", "post", "201")), r.text
    schema = declared("/users/{user}/recommendations", "get", "200")
    json_answers = [(path, m) for path, ops_ in ops.items() for m, op in ops_.items()  # (every one declared)
                    if "api" in op.get("tags", []) and not any("content" in r for r in op["responses"].values())]
    assert json_answers == []
    for user in ("77", "a0"):
        r = server.get(f"/users/{user}/recommendations", params={"n": 5})
        assert r.status_code == 200 and r.json()["items"] and conforms(r.json(), schema), r.text
    assert not conforms({"user": "77", "items": [{"item": 1}]}, schema)  # (the checker can fail)
    for path, declared_at in (("/health", "/health"), ("/questionnaire?budget=5", "/questionnaire"),
                              ("/items/a1/similar?n=3", "/items/{item}/similar"), ("/models", "/models"),
                              ("/inspect/biases?n=3", "/inspect/biases"), ("/inspect/pca?n=5", "/inspect/pca")):
        r = server.get(path)
        assert r.status_code == 200 and conforms(r.json(), declared(declared_at, "get", "200")), (path, r.text)


def test_a_pca_of_two_factors_is_what_openapi_json_declares(trained, db_url):
    """A model of two factors has two principal axes: its items have no pc3, which the declared schema
    required (a client validating answers refused them)."""
    from cfb.service.training import retrain_full

    from .conftest import FAST

    engine, _ = trained
    retrain_full(engine, valid_pct=0.0, progress=False, **{**FAST, "n_factors": 2})
    with running_server(db_url) as base, httpx.Client(base_url=base, timeout=30) as client:
        schema = client.get("/openapi.json").json()["paths"]["/inspect/pca"]["get"]["responses"]["200"]["content"][
            "application/json"]["schema"]
        answer = client.get("/inspect/pca", params={"n": 5}).json()
    assert {"pc1", "pc2"} <= set(answer["items"][0]) and "pc3" not in answer["items"][0]
    assert conforms(answer, schema), schema


def test_pages_say_what_an_empty_part_means(server):
    """A bias list of no item (min_ratings past every item's count) says so and links to every rated item
    (two empty lists said nothing); a questionnaire of no items shows no empty box to rate in."""
    page = server.get("/explore", params={"n": 5, "min_ratings": 100000}, headers={"Accept": "text/html"}).text
    assert "<p id='no-biases'>No item has 100,000 ratings or more" in page and "Lowest bias" not in page
    assert "Lowest bias" in server.get("/explore", params={"n": 5}, headers={"Accept": "text/html"}).text
    assert "Rate the ones you know" not in server.get("/", params={"budget": 0}).text
    assert "Rate the ones you know" in server.get("/", params={"budget": 5}).text


def test_a_users_ratings_newest_first(server, trained):
    """GET /users/{user}/ratings: the latest n ratings, newest first, with the count of all of them."""
    assert server.post("/users/a0/ratings", json={"item": "b21", "rating": 3.7}).status_code == 201
    assert server.post("/users/a0/ratings", json={"item": "b22", "rating": 3.3}).status_code == 201
    out = server.get("/users/a0/ratings?n=3").json()
    assert out["user"] == "a0" and out["ratings"][:2] == [  # newest first, as typed (not the float32 3.2999999)
        {"item": "b22", "title": "Beta film 22", "rating": 3.3}, {"item": "b21", "title": "Beta film 21", "rating": 3.7}]
    assert len(out["ratings"]) == 3 and out["count"] == len(server.get("/users/a0/ratings?n=100").json()["ratings"])
    assert server.get("/users/nobody/ratings").status_code == 404
    assert server.get("/users/a0/ratings?n=0").status_code == 422
    assert "get" in server.get("/openapi.json").json()["paths"]["/users/{user}/ratings"]


def test_a_title_two_items_share_is_suggested_once():
    """Two items titled alike (two books may share a title) are one suggestion, not the same text twice."""
    from cfb.service.serving import close_titles

    titles = ["Hamlet (1996)", "Hamlet (1996)", "Hamlet (1990)", "Hamlet (1948)", "Hamlet (1964)", "Hamlet (2000)"]
    assert sorted(close_titles("Hamlet (199)", titles)) == sorted(set(titles))
    assert sorted(close_titles("amlet", ["Hamlet (1996)", "Hamlet (1996)", "Hamlets"])) == ["Hamlet (1996)", "Hamlets"]


def test_an_unknown_items_close_titles_are_listed_and_linked(server, trained):
    """A near-miss title: the API lists the close titles beside its message, and a page links each to its
    item (they were text inside the message, to be copied by hand)."""
    import pandas as pd

    from cfb.service.ingest import upsert_items

    engine, _ = trained
    upsert_items(engine, pd.DataFrame({"item": ["x9"], "title": [f"Alpha film 1 {XSS}"], "attributes": [{}]}))
    r = server.get("/items/Alpha flim 1/similar")
    assert r.status_code == 404 and r.json()["suggestions"][0] == "Alpha film 1"
    assert r.json()["error"].startswith("unknown item 'Alpha flim 1'; did you mean: Alpha film 1")
    assert "suggestions" not in server.get("/items/zzzzzzzz/similar").json()  # (none close: no list)
    page = server.get("/item/Alpha flim 1", headers={"Accept": "text/html"})
    assert page.status_code == 404 and "<a href='/item/Alpha%20film%201'>Alpha film 1</a>" in page.text
    assert "unknown item &#x27;Alpha flim 1&#x27;</p>" in page.text and "did you mean: " not in page.text  # (once: links)
    page = server.get(f"/item/Alpha film 1 {XSS[:-1]}", headers={"Accept": "text/html"})  # (the title with markup)
    assert page.status_code == 404 and XSS not in page.text
    assert "<li><a href='/item/Alpha%20film%201%20%3Cscript%3Ealert%281%29%3C%2Fscript%3E'>Alpha film 1 " \
           "&lt;script&gt;alert(1)&lt;/script&gt;</a></li>" in page.text  # (as text, its link quoted)
    assert "suggestions" in server.get("/openapi.json").json()["components"]["schemas"]["Error"]["properties"]
