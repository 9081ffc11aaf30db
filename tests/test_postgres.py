"""The same code on PostgreSQL: runs when CFB_TEST_POSTGRES_URL points at a database in which it may
create schemas (e.g. postgresql+psycopg://cfb:cfb@localhost/cfb_test; each test works in a schema of
its own, dropped after it); skipped otherwise."""
from __future__ import annotations

import json
import os
import time

import pandas as pd
import pytest
from sqlalchemy import func, select

from cfb.db import versions
from cfb.db.engine import make_engine
from cfb.db.schema import Rating
from cfb.db.sources import Dataset
from cfb.service.incremental import retrain_incremental
from cfb.service.ingest import ingest_dataset
from cfb.service.onboard import onboard
from cfb.service.serving import recommend, similar
from cfb.service.training import retrain_full

from .conftest import FAST, fresh_pg_schema

URL = os.environ.get("CFB_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not URL, reason="set CFB_TEST_POSTGRES_URL to run against PostgreSQL")


@pytest.fixture
def pg_url():
    """The test server's URL with a schema of this test's own as its search path."""
    with fresh_pg_schema("cfb_test_postgres") as url:
        yield url


@pytest.fixture
def pg_engine(pg_url):
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


def test_whole_pipeline_on_postgres(pg_engine, planted):
    assert pg_engine.dialect.name == "postgresql"
    ingest_dataset(pg_engine, planted)
    again = pd.DataFrame([{"user": "a0", "item": "a1", "rating": 2.0, "timestamp": 1},
                          {"user": "a0", "item": "a1", "rating": 5.0, "timestamp": 2}])  # latest wins
    ingest_dataset(pg_engine, Dataset(again))
    report = retrain_full(pg_engine, valid_pct=0.2, progress=False, **FAST)
    assert report["valid_rmse"] < 0.8
    with pg_engine.connect() as conn:
        assert [r["item"][0] for r in recommend(conn, "b1", n=5)["items"]] == ["b"] * 5
        # the trained rows of more users than a statement takes parameters (65,535)
        everyone = versions.trained_rows(conn, report["version"])
        asked = versions.trained_rows(conn, report["version"], range(70_000))
        assert all((a == b).all() for a, b in zip(everyone, asked)) and len(asked[0]) == planted.ratings.user.nunique()
        assert all(r["item"][0] == "a" for r in similar(conn, "a3", n=3)["items"])
    out = onboard(pg_engine, [("entry 1", json.loads('{"user": "pg", "answers": {"gender": "M"}}'))])
    assert out["onboarded"] == [{"user": "pg", "ratings": 0}]
    ingest_dataset(pg_engine, Dataset(pd.DataFrame([{"user": "pg", "item": "b20", "rating": 5.0, "timestamp": 3}])))
    inc = retrain_incremental(pg_engine)
    assert inc["mode"] == "incremental" and inc["users_with_new_ratings"] == 1
    with pg_engine.connect() as conn:
        assert [r["item"][0] for r in recommend(conn, "pg", n=3)["items"]] == ["b"] * 3
    # the same rating again is not new; stored without a time, it takes the one it comes with
    untimed = {"user": "pg", "item": "b21", "rating": 4.0, "timestamp": None}
    assert ingest_dataset(pg_engine, Dataset(pd.DataFrame([untimed])))["new_ratings"] == 1
    assert ingest_dataset(pg_engine, Dataset(pd.DataFrame([{**untimed, "timestamp": 9}])))["new_ratings"] == 0
    with pg_engine.connect() as conn:
        stamps = conn.execute(select(Rating.timestamp, Rating.prev_seq).order_by(Rating.seq.desc()).limit(1)).one()
    assert tuple(stamps) == (9, None)


def test_large_writes_through_copy_match_sqlite(pg_engine, planted, tmp_path, monkeypatch):
    """From ``PG_COPY_ROWS`` ratings PostgreSQL gets them through COPY, chunk by chunk (and a first bulk
    ingest builds its keys and indexes after the rows): the same ingests leave the same rows as on
    SQLite, replaced values and missing timestamps included, and the keys are back."""
    import numpy as np
    from sqlalchemy import insert, inspect

    from cfb.db import ratings_io, store
    from cfb.db.engine import writing
    from cfb.db.schema import ModelVersion

    monkeypatch.setattr(ratings_io, "PG_COPY_ROWS", 100)
    monkeypatch.setattr(ratings_io, "BULK_ROWS", 1000)
    monkeypatch.setattr(ratings_io, "COPY_CHUNK", 64)  # the later ingest's upserts span several chunks too
    assert len(planted.ratings) >= 1000
    changed = planted.ratings.iloc[::7].assign(rating=lambda d: 6 - d.rating, timestamp=None)
    new_pairs = pd.DataFrame([{"user": f"n{k}", "item": f"a{k % 20}", "rating": 4.0, "timestamp": k} for k in range(90)])
    later = pd.concat([changed, new_pairs, planted.ratings.iloc[1:8:7]])  # and two rows written again unchanged
    sqlite = make_engine(f"sqlite:///{tmp_path / 'same.db'}")
    rows, reported, replaced, pruned = [], [], [], []
    for engine in (pg_engine, sqlite):
        ingest_dataset(engine, planted)
        reported.append(ingest_dataset(engine, Dataset(later.reset_index(drop=True)))["new_ratings"])
        with engine.connect() as conn:
            r = ratings_io.load_ratings(conn, with_replaced=True)
        rows.append(pd.DataFrame(vars(r)).sort_values("seq").reset_index(drop=True))
        ingest_dataset(engine, Dataset(changed.assign(rating=changed.rating % 5 + 1).reset_index(drop=True)))
        with engine.connect() as conn:  # every replaced row is logged (by a trigger: plpgsql here)
            replaced.append(pd.read_sql("SELECT user_id, item_id, seq, rating FROM replaced_ratings "
                                        "ORDER BY seq", conn))
        with writing(engine) as conn:  # a full version that read up to `later`: it learned only `later`'s rows
            conn.execute(insert(ModelVersion).values(kind="dot", mode="full", max_seq=int(r.seq.max())))
            pruned.append(store.prune_replaced_ratings(conn))
    sqlite.dispose()
    pd.testing.assert_frame_equal(rows[0], rows[1])
    pd.testing.assert_frame_equal(replaced[0], replaced[1])
    n_changed = int((changed.rating != planted.ratings.iloc[::7].rating).sum())  # (6 - 3 = 3: the same value)
    assert len(replaced[0]) == n_changed + len(changed)  # changed once by `later`, all again by the last
    assert pruned == [n_changed] * 2  # the rows `later` replaced: no version read them
    assert 0 < n_changed < len(changed)
    assert reported == [n_changed + len(new_pairs)] * 2  # new or changed: the same rows on both
    assert (rows[0].prev_seq >= 0).sum() == n_changed and (rows[0].timestamp == -1).sum() == n_changed
    found = inspect(pg_engine)
    assert found.get_pk_constraint("ratings")["constrained_columns"] == ["user_id", "item_id"]
    assert {tuple(fk["constrained_columns"]) for fk in found.get_foreign_keys("ratings")} == {("user_id",), ("item_id",)}
    assert {tuple(ix["column_names"]) for ix in found.get_indexes("ratings")} == {("item_id",), ("seq",)}
    assert np.isfinite(rows[0].rating).all()


def test_a_large_write_on_postgres_reports_progress_as_its_rows_land(pg_engine, monkeypatch):
    """Each COPY chunk goes into ``ratings`` before the next is sent, and the progress follows it, so
    a large write's progress bar does not sit full while the rows are still being inserted."""
    from psycopg.pq import TransactionStatus
    from sqlalchemy import func, select

    from cfb.db import ratings_io
    from cfb.db.engine import writing
    from cfb.db.schema import Item, Rating, User

    monkeypatch.setattr(ratings_io, "PG_COPY_ROWS", 10)
    monkeypatch.setattr(ratings_io, "COPY_CHUNK", 7)
    ingest_dataset(pg_engine, Dataset(pd.DataFrame([{"user": "u", "item": f"i{k}", "rating": 3.0, "timestamp": k}
                                                    for k in range(30)]), scale=(1.0, 5.0)))
    with writing(pg_engine) as conn:
        uid, items = conn.scalar(select(User.id)), sorted(conn.scalars(select(Item.id)))
        conn.execute(Rating.__table__.delete())
        landed = []

        def progress(n: int) -> None:  # the rows in the table by then (None: a statement, e.g. COPY, still open)
            idle = conn.connection.driver_connection.info.transaction_status == TransactionStatus.INTRANS
            landed.append((n, conn.scalar(select(func.count()).select_from(Rating)) if idle else None))

        ratings_io.write_ratings(conn, [uid] * 30, items, [4.0] * 30, list(range(30)), progress=progress)
    assert landed == [(7, 7), (7, 14), (7, 21), (7, 28), (2, 30)]


def test_a_bulk_write_with_an_unknown_id_writes_nothing_on_postgres(pg_engine, monkeypatch):
    from sqlalchemy import func, inspect, select

    from cfb.cf_core.errors import CfbError
    from cfb.db import ratings_io
    from cfb.db.engine import writing
    from cfb.db.schema import Item, Rating, User

    monkeypatch.setattr(ratings_io, "BULK_ROWS", 10)
    monkeypatch.setattr(ratings_io, "PG_COPY_ROWS", 10)
    ingest_dataset(pg_engine, Dataset(pd.DataFrame([{"user": "u", "item": f"i{k}", "rating": 3.0, "timestamp": k}
                                                    for k in range(20)]), scale=(1.0, 5.0)))
    with writing(pg_engine) as conn:
        conn.execute(Rating.__table__.delete())
        uid, items = conn.scalar(select(User.id)), sorted(conn.scalars(select(Item.id)))
    with pytest.raises(CfbError, match="no item with database id 999"):
        with writing(pg_engine) as conn:
            ratings_io.write_ratings(conn, [uid] * 20, items[:19] + [999], [3.0] * 20, list(range(20)))
    with pg_engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Rating)) == 0
    assert len(inspect(pg_engine).get_foreign_keys("ratings")) == 2


def test_two_writers_migrating_an_older_ratings_table_at_once_on_postgres(pg_engine, planted):
    """Two processes meeting a ratings table without the replaced-value columns: the second waits for
    the first's migration and finds the columns, instead of failing to add them again."""
    import threading
    import time

    from cfb.db import store
    from cfb.db.engine import writing

    ingest_dataset(pg_engine, planted)
    with writing(pg_engine) as conn:
        conn.exec_driver_sql("ALTER TABLE ratings DROP COLUMN prev_rating")
        conn.exec_driver_sql("ALTER TABLE ratings DROP COLUMN prev_seq")
    first_migrated, commit_first, errors = threading.Event(), threading.Event(), []

    def migrate(first: bool) -> None:
        try:
            with writing(pg_engine) as conn:
                store._HAVE_HISTORY.discard(str(pg_engine.url))  # (as in another process)
                store.ensure_rating_history(conn)
                if first:
                    first_migrated.set()
                    commit_first.wait(10)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    first = threading.Thread(target=migrate, args=(True,))
    first.start()
    assert first_migrated.wait(10)
    second = threading.Thread(target=migrate, args=(False,))
    second.start()
    time.sleep(0.5)  # the second is now waiting on the first's transaction
    commit_first.set()
    first.join()
    second.join()
    assert errors == []
    with pg_engine.connect() as conn:
        assert store._has_history_columns(conn)


def test_ids_postgres_cannot_store_are_refused_or_unknown_as_on_sqlite(pg_engine, pg_url, planted, tmp_path):
    """PostgreSQL refuses an id over 255 characters (VARCHAR(255)) or holding a NUL, even in a query:
    each is refused where it would be created (one error line naming file, line and field, a 422 over
    HTTP, nothing written) and unknown where it is looked up (a 404), as on SQLite
    (tests/test_bad_input.py, tests/test_http.py); an id of 255 characters works."""
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from cfb.cli.main import cli
    from cfb.service.http import create_app

    from .conftest import write
    from .test_bad_input import check_rejected

    ingest_dataset(pg_engine, planted)
    retrain_full(pg_engine, valid_pct=0.2, progress=False, **FAST)
    long_id = "L" * 256
    for kind, body, expected in [
        ("onboard", json.dumps({"user": long_id, "answers": {}}), ["entry 1", "field 'user'", "at most 255"]),
        ("onboard", json.dumps({"user": "a\u0000b", "answers": {}}), ["entry 1", "field 'user'", "NUL character"]),
        ("ratings", f"user,item,rating\nn1,a1,4\n{long_id},a1,3\n", ["line 3", "field 'user'", "at most 255"]),
        ("ratings", "user,item,rating\nn1,a1,4\nn1,x\0y,3\n", ["line 3", "field 'item'", "NUL character"]),
        ("users", f"user,age\n{long_id},30\n", ["line 2", "field 'user'", "at most 255"]),
        ("items", "item,title\nnew1,Fine\nx\0y,Nul\n", ["line 3", "field 'item'", "NUL character"]),
    ]:
        path = write(tmp_path / f"in{len(body)}.{'json' if kind == 'onboard' else 'csv'}", body)
        command = ["onboard", "--answers"] if kind == "onboard" else ["ingest", kind]
        check_rejected(pg_url, [*command, str(path)], str(path), *expected)
    check_rejected(pg_url, ["rate", "a0", long_id, "3", "--new-item"], "item id 'LLLL", "256 characters long")
    check_rejected(pg_url, ["recommend", long_id], "unknown user")
    check_rejected(pg_url, ["similar", long_id], "unknown item")
    pairs = write(tmp_path / "pairs.csv", "user,item\na0,a1\na0,x\0y\n")
    check_rejected(pg_url, ["predict", "--pairs", str(pairs)], str(pairs), "line 3", "unknown item")
    with TestClient(create_app(pg_engine), raise_server_exceptions=False) as client:
        for user in ("a" * 10_000, "a\u0000b"):
            r = client.post("/users", json={"user": user, "answers": {}})
            assert r.status_code == 422 and r.json()["field"] == "user", r.text
        r = client.post("/users", json={"ratings": {"x\u0000": 3}})
        assert r.status_code == 422 and r.json()["field"] == "ratings.x\u0000", r.text
        for path in ("/users/%00/recommendations", "/user/%00", "/items/%00/similar", "/item/%00"):
            assert client.get(path).status_code == 404, path
        assert client.post("/users/%00/ratings", json={"item": "a1", "rating": 3}).status_code == 404
        r = client.post("/users/a0/ratings", json={"item": "a1\u0000", "rating": 3})
        assert r.status_code == 404 and r.json()["field"] == "item", r.text
        r = client.post("/users", json={"user": "é" * 255, "answers": {}})  # the longest id there may be
        assert r.status_code == 201 and client.get(r.headers["location"]).status_code == 200
    res = CliRunner().invoke(cli, ["--db", pg_url, "rate", "é" * 255, "é" * 255, "4", "--new-item"])
    assert res.exit_code == 0, res.output


def test_reingesting_users_moves_no_generated_id_on_postgres(pg_engine, planted, engine):
    """PostgreSQL draws a row id for every row an upsert tries: ingesting the same users again moved the
    next sign-up's new-N past all of them (new-61, then new-182). Stored users are updated, new ones
    inserted, so the same steps give the same ids on both backends."""
    got = {}
    for name, eng in (("postgres", pg_engine), ("sqlite", engine)):
        ingest_dataset(eng, planted)
        retrain_full(eng, progress=False, **FAST)
        ingest_dataset(eng, planted)  # (the same release again: every user and item again)
        got[name] = [onboard(eng, [("e", {"answers": {}})])["onboarded"][0]["user"] for _ in range(2)]
    assert got["postgres"] == got["sqlite"] == ["new-61", "new-62"]


def test_two_signups_of_one_user_at_once_on_postgres(pg_engine, planted):
    """On PostgreSQL a sign-up validates before the row is written, so another process can sign the same
    user up in between: the loser gets the one-line "already exists" naming entry and field, and
    nothing of its batch is written."""
    import threading

    from sqlalchemy import func, insert, text

    from cfb.cf_core.errors import InputError
    from cfb.db.schema import User

    ingest_dataset(pg_engine, planted)
    retrain_full(pg_engine, progress=False, **FAST)
    entries = [("entry 1", {"user": "fresh", "answers": {}}), ("entry 2", {"user": "race1", "answers": {}})]
    with pg_engine.connect() as other:
        other.execute(insert(User).values(external_id="race1", attributes={}))  # not committed yet
        failed = []
        loser = threading.Thread(target=lambda: failed.append(_error_of(lambda: onboard(pg_engine, entries))))
        loser.start()
        deadline = time.monotonic() + 30
        with pg_engine.connect() as watch:  # until it has validated and waits on the unique key
            while not watch.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                        "AND datname = current_database()")) and time.monotonic() < deadline:
                time.sleep(0.05)
                watch.rollback()
        other.commit()
    loser.join(30)
    assert isinstance(failed[0], InputError)
    assert str(failed[0]) == "entry 2, field 'user': user 'race1' already exists (signed up meanwhile)"
    with pg_engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(User).where(User.external_id.in_(["fresh", "race1"]))) == 1


def test_writers_that_choose_or_look_up_ids_queue_on_postgres(pg_engine, planted):
    """Anonymous sign-ups pick the first free ``new-N`` and a first rating of a new item adds it after
    looking it up: on PostgreSQL, as on SQLite, such writers queue instead of failing on the unique key."""
    import threading

    from sqlalchemy import func

    from cfb.db.schema import Item, User
    from cfb.service.ratings import rate_item

    ingest_dataset(pg_engine, planted)
    retrain_full(pg_engine, progress=False, **FAST)
    errors, users = [], []
    barrier = threading.Barrier(4)

    def sign_up_and_rate(k: int) -> None:
        barrier.wait()
        for j in range(5):
            try:
                user = onboard(pg_engine, [(f"t{k}", {"answers": {}})])["onboarded"][0]["user"]
                users.append(user)
                rate_item(pg_engine, user, f"fresh-{j}", 4, create_item=True)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=sign_up_and_rate, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(set(users)) == 20
    with pg_engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Item).where(Item.external_id.like("fresh-%"))) == 5
        assert conn.scalar(select(func.count()).select_from(Rating).join(User, User.id == Rating.user_id)
                           .where(User.external_id.in_(users))) == 20


def test_a_writer_waits_for_another_at_most_the_busy_timeout_on_postgres(pg_engine, planted, monkeypatch):
    """A writer queued behind another (a long ingest, a retrain's save) gives up after the busy timeout, as
    on SQLite, as busy (a 503 over HTTP) rather than holding a pooled connection for as long as it takes."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from cfb.db import engine as engine_module
    from cfb.db.schema import User

    ingest_dataset(pg_engine, planted)
    retrain_full(pg_engine, progress=False, **FAST)
    monkeypatch.setattr(engine_module, "BUSY_TIMEOUT_MS", 300)
    with pg_engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": engine_module.WRITERS_LOCK_KEY})
        started = time.monotonic()
        with pytest.raises(OperationalError) as e:
            onboard(pg_engine, [("entry 1", {"user": "queued", "answers": {}})])
        assert engine_module.is_busy(e.value) and time.monotonic() - started < 10
        holder.rollback()
    with pg_engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(User).where(User.external_id == "queued")) == 0
    onboard(pg_engine, [("entry 1", {"user": "queued", "answers": {}})])  # the lock released: it goes through


def test_first_ingests_at_once_into_an_empty_postgres_database(pg_engine, planted):
    """Two first ingests at once: the second waits for the first's tables rather than failing to make them too."""
    import threading

    errors = []

    def ingest() -> None:
        try:
            ingest_dataset(pg_engine, planted)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ingest) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with pg_engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Rating)) == len(planted.ratings)


def _error_of(call) -> BaseException | None:  # noqa: ANN001
    try:
        call()
    except BaseException as e:  # noqa: BLE001
        return e
    return None


def test_a_refused_first_ingest_leaves_a_postgres_database_as_it_was(pg_engine, planted, monkeypatch):
    """As on SQLite (no file is left): a first ingest refused, or a first bulk ingest refused in its
    write, made cfb's nine tables in the database all the same (its DDL committed apart), after which
    `cfb recommend` said to retrain and a retrain said to ingest. The tables are made in the ingest's
    own transaction now."""
    from sqlalchemy import inspect

    from cfb.cf_core.errors import CfbError
    from cfb.db import ratings_io
    from cfb.service.ingest import upsert_items

    same = pd.DataFrame({"user": ["u1", "u2"], "item": ["i1", "i1"], "rating": [3.0, 3.0], "timestamp": [1, 2]})
    with pytest.raises(CfbError, match="every rating is 3"):
        ingest_dataset(pg_engine, Dataset(same))
    assert inspect(pg_engine).get_table_names() == []
    monkeypatch.setattr(ratings_io, "BULK_ROWS", 100)  # the bulk path: its unknown item found while writing
    bad = planted.ratings.copy()
    bad.loc[len(bad) - 1, "user"] = " "
    with pytest.raises(CfbError):
        ingest_dataset(pg_engine, Dataset(bad.reset_index(drop=True)))
    assert inspect(pg_engine).get_table_names() == []
    with pytest.raises(CfbError, match="empty"):
        upsert_items(pg_engine, pd.DataFrame({"item": ["x", ""], "title": ["X", "Y"], "attributes": [{}, {}]}))
    assert inspect(pg_engine).get_table_names() == []
    assert ingest_dataset(pg_engine, planted)["ratings"] == len(planted.ratings)
    assert len(inspect(pg_engine).get_table_names()) == 9


def test_another_programs_tables_are_refused_on_postgres(pg_engine):
    from .test_ingest_errors import check_other_programs_tables_are_refused

    check_other_programs_tables_are_refused(pg_engine)


def test_a_postgres_database_that_is_not_there_is_one_line_to_serve_and_503_to_requests(tmp_path):
    """`cfb serve` on a PostgreSQL URL that cannot be reached stops at once with the one-line error the
    other commands give; an app made over it answers JSON 503s, not plain-text 500s."""
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from cfb.cli.main import cli
    from cfb.service.http import create_app

    gone = URL.rsplit("/", 1)[0] + "/no_such_database_here"
    res = CliRunner().invoke(cli, ["--db", gone, "serve", "--port", "0"])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        'Error: database error: database "no_such_database_here" does not exist'], res.output
    with TestClient(create_app(gone), raise_server_exceptions=False) as client:
        for path in ("/health", "/users/1/recommendations", "/"):
            r = client.get(path)
            assert r.status_code == 503 and "no_such_database_here" in r.text, (path, r.text)
        assert r.headers["content-type"].startswith("text/html")  # (the page: as a page)
        assert client.get("/health").json()["error"].startswith("database error: ")


def test_titles_are_read_in_item_order_after_an_update_on_postgres(pg_engine, tmp_path):
    """PostgreSQL returns an updated row last: titles are still read in item order (as on SQLite)."""
    from .test_ingest_errors import titles_read_in_item_order_after_an_update

    titles_read_in_item_order_after_an_update(pg_engine, tmp_path)


def test_many_writes_waiting_on_another_writer_leave_connections_for_the_reads_on_postgres(
        pg_engine, pg_url, planted, monkeypatch):
    """As on SQLite (tests/test_http.py): writes queued behind a long writer hold at most a few pooled
    connections, so reads (on the event loop: no fast path here) are answered meanwhile and every queued
    write gets 503 (on PostgreSQL a GET waited 28 s and some answers were 500s)."""
    from contextlib import contextmanager

    from sqlalchemy import text

    from cfb.db import engine as engine_module
    from cfb.db.engine import make_engine
    from cfb.db.schema import User

    from .test_http import check_writes_wait_without_starving_reads

    ingest_dataset(pg_engine, planted)
    retrain_full(pg_engine, progress=False, **FAST)
    monkeypatch.setattr(engine_module, "BUSY_TIMEOUT_MS", 3000)

    @contextmanager
    def another_writer():  # noqa: ANN202  (what an ingest holds: the writers' lock)
        with pg_engine.connect() as holder:
            holder.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": engine_module.WRITERS_LOCK_KEY})
            yield
            holder.rollback()

    def users() -> int:
        with pg_engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(User)))

    check_writes_wait_without_starving_reads(make_engine(pg_url), another_writer, users)
