"""The fast path of GET /users/{user}/recommendations (``FastRecommendations`` over ``FastReader``):
the same bodies and errors as the FastAPI route over ``serving.recommend``, and never a stale answer:
what another connection writes (as another process would) counts from the next request on."""
from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from click.testing import CliRunner  # noqa: E402

from cfb.cli.main import cli  # noqa: E402

from .test_http import running_server  # noqa: E402

USERS = ["a0", "b1", "a2", "b3", "a10", "b59"]


@pytest.fixture
def fast_and_slow(trained, db_url, monkeypatch):
    """(fast client, slow client, the fast path's calls): two servers over one database, one with the
    fast path, one answering from the FastAPI route (``fast_path=False``)."""
    from cfb.service import fast_recommendations

    calls = []
    answer = fast_recommendations.FastReader.answer

    def counted(self, user: str, n: int, by: str) -> bytes:
        calls.append((user, n, by))
        return answer(self, user, n, by)

    monkeypatch.setattr(fast_recommendations.FastReader, "answer", counted)
    with running_server(db_url) as fast, running_server(db_url, fast_path=False) as slow, \
            httpx.Client(base_url=fast, timeout=30) as f, httpx.Client(base_url=slow, timeout=30) as s:
        yield f, s, calls


def test_fast_path_answers_what_the_route_answers(fast_and_slow):
    fast, slow, calls = fast_and_slow
    for user in USERS:
        for params in ({}, {"n": 1}, {"n": 5, "by": "rating"}, {"n": 40}, {"n": 100, "by": "rank"}):
            want = slow.get(f"/users/{user}/recommendations", params=params)
            for _ in range(2):  # computed, then from the cache
                got = fast.get(f"/users/{user}/recommendations", params=params)
                assert got.status_code == want.status_code == 200
                assert got.content == want.content, (user, params)
                assert got.headers["content-type"] == want.headers["content-type"] == "application/json"
                assert got.headers["content-length"] == want.headers["content-length"]
    assert len(calls) == len(USERS) * 5 * 2  # every one answered by the fast path


def test_fast_path_answers_a_signup_that_says_how_many_items_it_showed(fast_and_slow):
    """A signup with ``asked`` (the questionnaire size shown: unrated items are "not seen") is answered
    alike by both paths, and differently from one that does not say it."""
    fast, slow, calls = fast_and_slow
    for user, asked in (("shown", 15), ("unsaid", None)):
        body = {"user": user, "answers": {"gender": "F"}} | ({"asked": asked} if asked is not None else {})
        assert fast.post("/users", json=body).status_code == 201
    got = {u: fast.get(f"/users/{u}/recommendations", params={"n": 20}) for u in ("shown", "unsaid")}
    want = {u: slow.get(f"/users/{u}/recommendations", params={"n": 20}) for u in ("shown", "unsaid")}
    assert all(got[u].content == want[u].content for u in got) and len(calls) == 2
    assert got["shown"].json()["items"] != got["unsaid"].json()["items"]
    bad = fast.post("/users", json={"answers": {}, "asked": 99})
    assert bad.status_code == 422 and bad.json()["field"] == "asked"


def test_fast_path_answers_a_user_id_holding_a_slash(fast_and_slow):
    fast, slow, calls = fast_and_slow
    assert fast.post("/users", json={"user": "team/a", "answers": {"gender": "F"}}).status_code == 201
    got, want = fast.get("/users/team%2Fa/recommendations"), slow.get("/users/team%2Fa/recommendations")
    assert got.status_code == want.status_code == 200 and got.content == want.content
    assert calls and calls[-1][0] == "team/a"  # answered by the fast path


@pytest.mark.parametrize("path", [
    "/users/a0/recommendations?n=0", "/users/a0/recommendations?n=101", "/users/a0/recommendations?n=x",
    "/users/a0/recommendations?n=", "/users/a0/recommendations?n=2.5", "/users/a0/recommendations?by=magic",
    "/users/a0/recommendations?n=5&n=0", "/users/a0/recommendations?n=0&n=5", "/users/a0/recommendations?n=%207%20",
    "/users/a0/recommendations?by=rating&by=", "/users/nobody/recommendations", "/users/nobody/recommendations?n=0",
    "/users/a%2F0/recommendations", "/users//recommendations", "/users/recommendations",
    "/users/a0/recommendations/", "/users/a0/recommendationsx", "/users/%C3%A9t%C3%A9/recommendations",
    "/users/a0/recommendations?n=1" + "0" * 400, "/users/a0/recommendations?n=1e400", "/users/a0/recommendations?n=nan",
    "/users/%20/recommendations", "/users/%09/recommendations", "/users/%20nobody%20/recommendations",
    "/users/nobody%0A/recommendations",  # (blank or padded ids: the fast path said "unknown user ''" or 'nobody')
])
def test_fast_path_parses_and_refuses_what_the_route_does(fast_and_slow, path):
    fast, slow, _ = fast_and_slow
    got, want = fast.get(path), slow.get(path)
    assert got.status_code == want.status_code, path
    assert got.content == want.content, path
    assert got.status_code == 200 or "error" in got.json()


def test_reads_in_the_thread_pool_answer_the_same(trained, db_url):
    with running_server(db_url, reads_in_threadpool=True) as base, httpx.Client(base_url=base, timeout=30) as c:
        from cfb.service.serving import recommend

        engine, _ = trained
        for user in USERS[:3]:
            with engine.connect() as conn:
                want = recommend(conn, user, 7)
            assert c.get(f"/users/{user}/recommendations", params={"n": 7}).json() == want
        assert c.get("/users/nobody/recommendations").status_code == 404
        assert c.get("/users/a0/recommendations", params={"n": 0}).json()["field"] == "n"


def test_writes_from_another_process_count_on_the_next_request(fast_and_slow, trained, db_url, tmp_path):
    from cfb.db.engine import make_engine
    from cfb.service.ratings import rate_item
    from cfb.service.serving import recommend

    fast, _, _ = fast_and_slow
    engine, _ = trained
    other = make_engine(db_url)  # its own connection pool, as another process has

    def same_as_service(user: str = "a0") -> dict:
        got = fast.get(f"/users/{user}/recommendations").json()
        with engine.connect() as conn:
            assert got == recommend(conn, user, 10)
        return got

    try:
        first = same_as_service()
        top = first["items"][0]["item"]
        rate_item(other, "b1", top, 1.0)  # another user's rating: a0's answer stands
        assert same_as_service() == first
        rate_item(other, "a0", top, 1.0)  # a0's own
        second = same_as_service()
        assert top not in [i["item"] for i in second["items"]]
        rate_item(other, "a0", top, 5.0)  # the same item again: the count of a0's ratings stays the same
        same_as_service()
        csv = tmp_path / "ratings.csv"  # more ratings than the fast check looks through, then one of a0's
        rows = [f"b{u},b{i},{1 + (u + i) % 5}" for u in range(1, 60, 2) for i in range(20, 40)]
        csv.write_text("user,item,rating\n" + "\n".join(rows) + "\n", encoding="utf-8")
        assert CliRunner().invoke(cli, ["--db", db_url, "ingest", "ratings", str(csv)]).exit_code == 0
        same_as_service()
        rate_item(other, "a0", second["items"][0]["item"], 1.0)
        third = same_as_service()
        assert second["items"][0]["item"] not in [i["item"] for i in third["items"]]
        items = tmp_path / "items.csv"  # a new title
        items.write_text(f"item,title\n{third['items'][1]['item']},Renamed film\n", encoding="utf-8")
        assert CliRunner().invoke(cli, ["--db", db_url, "ingest", "items", str(items)]).exit_code == 0
        assert "Renamed film" in [i["title"] for i in same_as_service()["items"]]
    finally:
        other.dispose()


def test_the_cache_recomputes_only_what_changed(trained, db_url, monkeypatch):
    """A write of another user's rating costs a check, not a recomputation; one of the user's own, or
    more writes since than the check looks through, recompute; any answer equals the service's."""
    from cfb.db.engine import make_engine
    from cfb.service.fast_recommendations import FastReader
    from cfb.service.ratings import rate_item
    from cfb.service.serving import recommend

    engine, _ = trained
    reader = FastReader(engine)
    computed = []
    fresh = reader._fresh
    monkeypatch.setattr(reader, "_fresh", lambda *a: computed.append(a[1]) or fresh(*a))
    other = make_engine(db_url)

    def answer(user: str = "a0") -> bytes:
        import json

        body = reader.answer(user, 10, "rank")
        with engine.connect() as conn:
            assert json.loads(body) == recommend(conn, user, 10)
        return body

    try:
        first = answer()
        statements = []
        reader._conn()[0].set_trace_callback(statements.append)
        assert answer() is first and computed == ["a0"]
        assert statements == ["PRAGMA data_version"]  # nothing written since: nothing else read
        reader._conn()[0].set_trace_callback(None)
        rate_item(other, "b1", "b21", 2.0)
        assert answer() is first and computed == ["a0"]  # checked, not recomputed
        rate_item(other, "a0", "b21", 4.0)
        answer()
        assert computed == ["a0", "a0"]
        for k in range(2 * FastReader.SCAN_MAX):  # more ratings written than the check looks through
            rate_item(other, f"b{1 + 2 * (k % 30)}", f"b{20 + k // 30}", 1.0 + k % 5)
        answer()
        assert computed == ["a0"] * 3
    finally:
        other.dispose()


def test_the_check_reads_no_whole_table(trained):
    """SQL_STATE finds each row by an index (a full scan of the ratings would cost ~1 ms on 100k)."""
    from cfb.service.fast_recommendations import FastReader

    engine, _ = trained
    raw = engine.raw_connection()
    try:
        plan = [row[-1] for row in raw.cursor().execute(
            "EXPLAIN QUERY PLAN " + FastReader.SQL_STATE, {"root": 1, "ids": "[1, 2]", "seq": 0, "user": "a0"})]
    finally:
        raw.close()
    scans = [p for p in plan if p.startswith("SCAN") and "VIRTUAL TABLE" not in p and "subquery" not in p]
    assert not scans, plan
    assert any("(seq>?)" in p for p in plan), plan  # the user's new ratings are looked up on the seq index
