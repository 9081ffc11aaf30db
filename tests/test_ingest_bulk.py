"""Bulk writes of ratings (issue #11): the fast paths store exactly what row-by-row upserts would."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, inspect, select, text

from cfb.cf_core.errors import CfbError
from cfb.db import ratings_io, store
from cfb.db.engine import make_engine, writing
from cfb.db.schema import Item, Rating, User
from cfb.db.sources import Dataset, read_movielens
from cfb.service.ingest import ingest_dataset

from .conftest import fresh_pg_schema, write

PG_SCHEMA = "cfb_test_ingest_bulk"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_engine(request, tmp_path: Path):
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'cfb.db'}")
        yield engine
        engine.dispose()
        return
    with fresh_pg_schema(PG_SCHEMA) as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


@pytest.fixture(autouse=True)
def _small_statements(monkeypatch):
    """7 rows to a statement, so that every write here spans several."""
    monkeypatch.setattr(store, "max_parameters", lambda conn: 35)


def stored(engine) -> dict[tuple[str, str], tuple[float, int | None, int]]:  # noqa: ANN001
    """(user, item) -> (rating, timestamp, seq), by external ids."""
    with engine.connect() as conn:
        rows = conn.execute(select(User.external_id, Item.external_id, Rating.rating, Rating.timestamp, Rating.seq)
                            .join(User, User.id == Rating.user_id).join(Item, Item.id == Rating.item_id))
        return {(u, i): (r, t, s) for u, i, r, t, s in rows}


def ratings_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """``n`` ratings of 30 users on 25 items, some pairs given more than once."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user": [f"u{k}" for k in rng.integers(0, 30, n)],
                         "item": [str(k) for k in rng.integers(0, 25, n)],
                         "rating": rng.integers(1, 11, n) / 2, "timestamp": 1_000 + np.arange(n)})


def test_a_full_read_gives_the_ratings_a_row_read_gives(tmp_path):
    """SQLite's full read (text columns) gives each stored double back exactly, as its row-by-row read
    and PostgreSQL's binary read do: with 15 digits, a rating stored by `cfb rate` on a scale without
    steps (3.000000119209289, a float32 midpoint) came back as the next float32 up."""
    from cfb.service.ratings import rate_item

    engine = make_engine(f"sqlite:///{tmp_path / 'cfb.db'}")
    ingest_dataset(engine, Dataset(pd.DataFrame({"user": ["u0", "u1", "u1"], "item": ["1", "2", "3"],
                                                 "rating": [1.0, 5.0, 2.0], "timestamp": [1, 2, 3]})))
    for k, value in enumerate((3.000000119209289, 0.1 + 0.2 + 3, 1 / 3 + 2)):
        rate_item(engine, "u0", str(k + 1), value)
    with engine.connect() as conn:
        full, rows = ratings_io.load_ratings(conn), ratings_io.load_ratings(conn, with_replaced=True)
    assert np.array_equal(full.rating, rows.rating) and full.rating.dtype == np.float32
    assert np.float32(3.000000119209289) == np.float32(3.0) in full.rating
    engine.dispose()


def test_bulk_ingest_stores_what_row_by_row_upserts_store(tmp_path, monkeypatch):
    df = ratings_frame()
    expected: dict = {}
    for k, (u, i, r, t) in enumerate(df.itertuples(index=False), start=1):  # the upserts' meaning
        old = expected.get((u, i))
        expected[(u, i)] = old if old and old[:2] == (r, t) else (r, t, k)
    ordinary = make_engine(f"sqlite:///{tmp_path / 'ordinary.db'}")
    ingest_dataset(ordinary, Dataset(df))
    monkeypatch.setattr(ratings_io, "BULK_ROWS", 100)
    bulk = make_engine(f"sqlite:///{tmp_path / 'bulk.db'}", bulk=True)
    ingest_dataset(bulk, Dataset(df))
    # the ingest keeps each pair's last row; seq follows the file's order
    last = df.drop_duplicates(["user", "item"], keep="last")
    assert stored(bulk) == stored(ordinary) == {
        (u, i): (r, t, k) for k, (u, i, r, t) in enumerate(last.itertuples(index=False), start=1)}
    assert {k: v[:2] for k, v in stored(bulk).items()} == {k: v[:2] for k, v in expected.items()}
    assert {ix["name"] for ix in inspect(bulk).get_indexes("ratings")} == {"ix_ratings_item_id", "ix_ratings_seq"}
    for engine in (ordinary, bulk):
        engine.dispose()


def test_later_writes_keep_unchanged_seq_and_the_last_of_a_pair(any_engine):
    ingest_dataset(any_engine, Dataset(ratings_frame(60)))
    before = stored(any_engine)
    (same, kept), (changed, old) = list(before.items())[:2]
    with writing(any_engine) as conn:
        pairs = [same, changed, changed, ("u1", "new item"), ("new user", "3")]
        store.ensure_ids(conn, User, [p[0] for p in pairs])
        store.ensure_ids(conn, Item, [p[1] for p in pairs])
        users, items = store.id_map(conn, User), store.id_map(conn, Item)
        n = ratings_io.write_ratings(conn, [users[u] for u, _ in pairs], [items[i] for _, i in pairs],
                                [kept[0], 1.0, 0.5 if old[0] != 0.5 else 1.5, 4.0, 3.0],
                                [kept[1], None, 7, None, float("nan")])
    assert n == 4  # distinct pairs
    after = stored(any_engine)
    top = max(s for _, _, s in before.values())
    assert after[same] == kept  # written again unchanged: not new to any model version
    assert after[changed][:2] == (0.5 if old[0] != 0.5 else 1.5, 7) and after[changed][2] > top
    assert after[("u1", "new item")][:2] == (4.0, None) and after[("new user", "3")][:2] == (3.0, None)
    assert len(after) == len(before) + 2


def test_one_statement_starts_no_thread_and_many_make_the_next_ahead(tmp_path, monkeypatch):
    """A rating or a sign-up is one INSERT, written at once (starting a thread cost more than it); rows
    that take several statements have the next one's parameters made in a second thread meanwhile."""
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    ingest_dataset(engine, Dataset(ratings_frame(60)))
    started = []
    real = store.ThreadPoolExecutor
    monkeypatch.setattr(store, "ThreadPoolExecutor", lambda *a, **k: started.append(1) or real(*a, **k))
    with writing(engine) as conn:
        ratings_io.write_ratings(conn, [1], [1], [2.0], [5])
    assert started == []
    monkeypatch.setattr(store, "max_parameters", lambda conn: 10)  # two rows a statement
    with writing(engine) as conn:
        ratings_io.write_ratings(conn, [1, 1, 1], [1, 2, 3], [4.0, 4.0, 4.0], [6, 6, 6])
    with engine.connect() as conn:
        written = set(conn.execute(select(Rating.item_id, Rating.rating).where(Rating.user_id == 1)).all())
    assert started == [1] and {(1, 4.0), (2, 4.0), (3, 4.0)} <= written
    engine.dispose()


def test_a_failed_bulk_ingest_leaves_nothing_and_keeps_the_indexes(tmp_path, monkeypatch):
    monkeypatch.setattr(ratings_io, "BULK_ROWS", 100)
    engine = make_engine(f"sqlite:///{tmp_path / 'cfb.db'}", bulk=True)
    df = ratings_frame()
    df.loc[len(df) - 1, "rating"] = float("nan")  # NOT NULL fails among the inserts, after the first ones
    with pytest.raises(sqlite3.IntegrityError):  # from the DB-API cursor the rows go through
        ingest_dataset(engine, Dataset(df), scale=(0.5, 5.0))
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Rating)) == 0
        assert conn.scalar(select(func.count()).select_from(User)) == 0
    assert {ix["name"] for ix in inspect(engine).get_indexes("ratings")} == {"ix_ratings_item_id", "ix_ratings_seq"}
    engine.dispose()


def test_without_foreign_keys_write_ratings_checks_the_ids_itself(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'cfb.db'}", bulk=True)
    ingest_dataset(engine, Dataset(ratings_frame(50)))
    before = stored(engine)
    for users, items, unknown in (([999], [1], "user with database id 999"), ([1], [999], "item with database id 999")):
        with pytest.raises(CfbError, match=unknown), writing(engine) as conn:
            ratings_io.write_ratings(conn, [1, *users], [2, *items], [4.0, 4.0], [None, None])
    assert stored(engine) == before
    engine.dispose()


def test_movielens_ids_are_read_as_written(tmp_path):
    folder = tmp_path / "ml"
    folder.mkdir()
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n2,10,4.0,5\n1,10,3.5,6\n2,007,1.0,7\n")
    write(folder / "movies.csv", "movieId,title,genres\n10,Ten (1990),Drama\n007,Seven (1990),Drama\nm10,M (1990),Drama\n")
    r = read_movielens(folder).ratings
    assert isinstance(r["user"].dtype, pd.CategoricalDtype)
    assert r["user"].tolist() == ["2", "1", "2"] and r["item"].tolist() == ["10", "10", "007"]  # as movies.csv has it
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\nu2, m10 ,4.0,5\nu1,m10,3.5,6\n")
    r = read_movielens(folder).ratings
    assert r["user"].tolist() == ["u2", "u1"] and r["item"].tolist() == ["m10", "m10"]
    assert r["item"].cat.categories.tolist() == ["m10"]


def test_a_missing_id_fails_the_ingest_and_unused_ids_are_not_created(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    frame = pd.DataFrame({"user": pd.Categorical(["a", "b", None]), "item": ["x", "y", "z"],
                          "rating": [5.0, 4.0, 3.0], "timestamp": [1, 2, 3]})
    with pytest.raises(CfbError, match="row 3: missing user"):
        ingest_dataset(engine, Dataset(frame, scale=(1.0, 5.0)))
    assert stored(engine) == {}
    cats = pd.DataFrame({"user": pd.Categorical(["c", "d"]), "item": ["x", "y"], "rating": [5.0, 4.0],
                         "timestamp": [1, 2]})
    ingest_dataset(engine, Dataset(cats[cats.user == "c"], scale=(1.0, 5.0)))
    with engine.connect() as conn:
        assert sorted(conn.scalars(select(User.external_id))) == ["c"]
    assert list(stored(engine)) == [("c", "x")]
    engine.dispose()


@pytest.mark.parametrize("blank", ["", "  "])
def test_an_empty_or_blank_id_is_refused_by_the_bulk_write_itself(tmp_path, blank):
    """Whatever reader a dataset comes from, the write refuses an id no command or URL can name (a 100k
    u.data without u.user stored user '')."""
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    for col in ("user", "item"):
        frame = pd.DataFrame({"user": ["a", "b"], "item": ["x", "y"], "rating": [5.0, 4.0], "timestamp": [1, 2]})
        frame.loc[1, col] = blank
        with pytest.raises(CfbError, match=rf"{col} id '{blank}' is empty \(or blank\)$"):
            ingest_dataset(engine, Dataset(frame, scale=(1.0, 5.0)))
        assert stored(engine) == {}
    engine.dispose()


def test_a_full_read_returns_every_rating_in_seq_order_as_the_row_query_does(any_engine, monkeypatch):
    df = ratings_frame(300)
    df.loc[::7, "timestamp"] = None  # unknown times come back as -1
    df.loc[::5, "rating"] = 2.25  # a value that is not a half star
    ingest_dataset(any_engine, Dataset(df))
    monkeypatch.setattr(ratings_io, "SCAN_CHUNK", 40)  # several user ranges per read
    with any_engine.connect() as conn:
        full = ratings_io.load_ratings(conn)
        rows = ratings_io._fetch_rows(conn, "SELECT user_id, item_id, rating, COALESCE(timestamp, -1), seq FROM ratings "
                                       "ORDER BY seq")
        tail = ratings_io.load_ratings(conn, since_seq=int(full.seq[-10]))
    assert len(full) == df.drop_duplicates(["user", "item"]).shape[0]
    for got, want in zip((full.user_id, full.item_id, full.rating, full.timestamp, full.seq), rows):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert np.all(np.diff(full.seq) > 0) and set(np.round(full.rating, 2)) >= {2.25} and (full.timestamp == -1).any()
    assert np.array_equal(tail.seq, full.seq[-9:]) and np.array_equal(tail.rating, full.rating[-9:])


def test_seq_order_sorts_dense_and_sparse_numbers():
    rng = np.random.default_rng(1)
    for seq in (rng.permutation(500) + 7, rng.choice(10**6, 50, replace=False), np.array([3]), np.zeros(0, np.int64)):
        assert np.array_equal(ratings_io.seq_order(seq), np.argsort(seq))


@pytest.mark.parametrize("presorted", [True, False])
def test_latest_per_pair_keeps_each_pairs_last_row_in_pair_order(presorted):
    """Input already in (user, item) order skips the sort; either way the answer is the lexsort one."""
    rng = np.random.default_rng(3)
    users, items = rng.integers(0, 50, 5000), rng.integers(0, 30, 5000)  # many repeated pairs
    if presorted:
        order = np.lexsort((items, users))
        users, items = users[order], items[order]
    got = ratings_io.latest_per_pair(users, items)
    ref = {}
    for k, pair in enumerate(zip(users.tolist(), items.tolist())):
        ref[pair] = k  # the last row of each pair
    assert got.tolist() == [ref[p] for p in sorted(ref)]


def test_a_pair_given_twice_keeps_its_latest_timed_row(engine):
    """In one file, the row with the latest timestamp wins (file order only breaks ties and orders
    rows without a time); a row with a time wins over one without."""
    rows = pd.DataFrame({"user": ["1", "1", "2", "2", "3", "3", "4", "4"], "item": ["a", "a", "b", "b", "c", "c", "d", "d"],
                         "rating": [4.0, 2.0, 3.0, 5.0, 1.0, 2.0, 1.0, 5.0],
                         "timestamp": [100, 50, 10, None, None, None, 7, 7]})
    ingest_dataset(engine, Dataset(rows, scale=(1.0, 5.0)))
    with engine.connect() as conn:
        got = dict(conn.execute(select(User.external_id, Rating.rating).join(Rating, Rating.user_id == User.id)).all())
    assert got == {"1": 4.0, "2": 3.0, "3": 2.0, "4": 5.0}


def test_a_ratings_csv_row_with_an_empty_time_is_a_rating_without_one(engine, tmp_path):
    """`cfb ingest ratings`: an empty timestamp cell is a rating without a time (so a pair given twice
    keeps its row with a time), not an error; a bad time still names its line."""
    from cfb.cf_core.errors import InputError
    from cfb.db.sources import read_ratings_csv

    path = write(tmp_path / "r.csv", "user,item,rating,timestamp\nu1,m9,2,100\nu2,m9,5,\nu1,m9,4, \nu3,m1,3,7\n")
    ingest_dataset(engine, Dataset(read_ratings_csv(path), scale=(1.0, 5.0)))
    with engine.connect() as conn:
        got = {u: (r, t) for u, r, t in conn.execute(select(User.external_id, Rating.rating, Rating.timestamp)
                                                     .join(Rating, Rating.user_id == User.id))}
    assert got == {"u1": (2.0, 100), "u2": (5.0, None), "u3": (3.0, 7)}
    write(path, "user,item,rating,timestamp\nu1,m9,2,\nu2,m9,5,x\n")
    with pytest.raises(InputError, match=r"r\.csv, line 3, field 'timestamp': not a whole number under 2\*\*53: 'x'$"):
        read_ratings_csv(path)


@pytest.mark.parametrize("body", [
    "1,10,4.0,5\n2,7,3.5,6\n1,7,1.0,7\n",  # whole numbers as str(int) writes them: the fast reader
    "1,10,4.0,5\n2,007,3.5,6\n2,7,1.0,7\n",  # "007" and "7" are different ids
    "1,10,4.0,5\n+2,7,3.5,6\n",  # a sign
    "1,10,4.0,5\n 2,7,3.5,6\n",  # a space
    "1,10,4.0,5\n\"2\",7,3.5,6\n",  # quotes
    "0,0,4.0,5\n00,0,3.5,6\n",  # "00" is not "0"
    "1,10,4.0,5\r\n2,7,3.5,6\r\n",  # Windows line ends
    "1,10,4.0,5\n2,7,3.5,6",  # no line end at the end
    "1,-3,4.0,5\n2,7,3.5,6\n",  # a negative id
    '1,2,3.0,"x\n9,8,"\n6,7,3.0,z\r04,5,3.0,w\n',  # a quoted line break and a lone CR: line counts agree
])
def test_ids_read_as_whole_numbers_only_when_that_equals_reading_them_as_text(tmp_path, body, monkeypatch):
    from cfb.db import layouts

    last = "note" if '"' in body else "timestamp"  # (a text column for the quoted case)
    path = write(tmp_path / "ratings.csv", f"userId,movieId,rating,{last}\n" + body)
    time_column = None if last == "note" else "timestamp"
    read = layouts.read_csv_ratings(path, "userId", "movieId", "rating", time_column)
    monkeypatch.setattr(layouts, "_with_whole_number_ids", lambda *a: None)
    as_text = layouts.read_csv_ratings(path, "userId", "movieId", "rating", time_column)
    pd.testing.assert_frame_equal(read, as_text)
    assert read["item"].cat.categories.tolist() == as_text["item"].cat.categories.tolist()


def test_the_whole_number_reader_is_used_on_a_plain_release(tmp_path, monkeypatch):
    from cfb.db import layouts

    path = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,5\n2,7,3.5,6\n")
    assert layouts._with_whole_number_ids(path, ["userId", "movieId", "rating", "timestamp"], "userId",
                                          "movieId", "rating", "timestamp") is not None
    bad = write(tmp_path / "bad.csv", "userId,movieId,rating,timestamp\n1,010,4.0,5\n")
    assert layouts._with_whole_number_ids(bad, ["userId", "movieId", "rating", "timestamp"], "userId",
                                          "movieId", "rating", "timestamp") is None


def test_a_bulk_ingest_in_key_order_keeps_the_seq_index_and_stores_the_same(tmp_path, monkeypatch):
    """Rows in (user, item) order (as releases come) go in with the seq index in place, which then
    receives ascending seqs; the other index is built after. What is stored is the same."""
    from sqlalchemy import Index

    df = ratings_frame().drop_duplicates(["user", "item"], keep="last")
    users, items = sorted(df.user.unique()), sorted(df.item.unique())
    df = df.assign(u=df.user.map(users.index), i=df.item.map(items.index)).sort_values(["u", "i"])
    df = df.drop(columns=["u", "i"]).reset_index(drop=True)
    catalogue = pd.DataFrame({"item": items, "title": items, "attributes": [{}] * len(items)})
    ordinary = make_engine(f"sqlite:///{tmp_path / 'ordinary.db'}")
    ingest_dataset(ordinary, Dataset(df, catalogue))
    monkeypatch.setattr(ratings_io, "BULK_ROWS", 100)
    dropped = []
    monkeypatch.setattr(Index, "drop", lambda self, conn, **kw: (dropped.append(self.name),
                                                                 conn.execute(text(f"DROP INDEX {self.name}"))))
    bulk = make_engine(f"sqlite:///{tmp_path / 'bulk.db'}", bulk=True)
    ingest_dataset(bulk, Dataset(df, catalogue))
    assert dropped == ["ix_ratings_item_id"]
    assert stored(bulk) == stored(ordinary)
    assert {ix["name"] for ix in inspect(bulk).get_indexes("ratings")} == {"ix_ratings_item_id", "ix_ratings_seq"}
    for engine in (ordinary, bulk):
        engine.dispose()


def test_a_header_with_spaces_is_read_the_same_either_way(tmp_path, monkeypatch):
    from cfb.db import layouts

    path = write(tmp_path / "ratings.csv", "userId, movieId, rating, timestamp\n1,10,4.0,5\n2,7,3.5,6\n")
    read = layouts.read_csv_ratings(path, "userId", "movieId", "rating", "timestamp")
    monkeypatch.setattr(layouts, "_with_whole_number_ids", lambda *a: None)
    pd.testing.assert_frame_equal(read, layouts.read_csv_ratings(path, "userId", "movieId", "rating", "timestamp"))
    assert read["item"].tolist() == ["10", "7"]


def journal_mode(path: Path) -> str:
    with sqlite3.connect(path) as raw:
        return raw.execute("PRAGMA journal_mode").fetchone()[0]


def test_a_first_large_ingest_writes_through_a_rollback_journal_and_leaves_wal(tmp_path, monkeypatch):
    monkeypatch.setattr(ratings_io, "BULK_ROWS", 100)
    path = tmp_path / "cfb.db"
    journal = path.with_name("cfb.db-journal")
    engine = make_engine(f"sqlite:///{path}", bulk=True)
    seen: list[bool] = []
    ingest_dataset(engine, Dataset(ratings_frame()), progress=lambda n: seen.append(journal.exists()))
    assert seen and all(seen)  # the first load's pages went through a rollback journal
    assert not journal.exists() and journal_mode(path) == "wal"
    seen.clear()
    ingest_dataset(engine, Dataset(ratings_frame(seed=1)), progress=lambda n: seen.append(journal.exists()))
    assert seen and not any(seen)  # a later one goes through the write-ahead log as every write does
    engine.dispose()


def test_a_first_large_ingest_beside_an_open_connection_keeps_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(ratings_io, "BULK_ROWS", 100)
    path = tmp_path / "cfb.db"
    engine = make_engine(f"sqlite:///{path}", bulk=True)
    store.create_schema(engine)
    reader = sqlite3.connect(path)  # e.g. a server that has the database open: leaving WAL needs it alone
    reader.execute("SELECT count(*) FROM ratings").fetchone()
    seen: list[bool] = []
    ingest_dataset(engine, Dataset(ratings_frame()), progress=lambda n: seen.append(path.with_name("cfb.db-journal").exists()))
    assert seen and not any(seen)
    assert reader.execute("SELECT count(*) FROM ratings").fetchone()[0] == len(stored(engine)) > 0
    reader.close()
    engine.dispose()
    assert journal_mode(path) == "wal"


def test_a_first_large_ingest_killed_midway_leaves_an_empty_database_in_wal(tmp_path):
    path = tmp_path / "cfb.db"
    frame = tmp_path / "ratings.csv"
    ratings_frame().to_csv(frame, index=False)
    script = f"""
import os, signal
import pandas as pd
from cfb.db import ratings_io, store
from cfb.db.engine import make_engine
from cfb.db.sources import Dataset
from cfb.service.ingest import ingest_dataset
ratings_io.BULK_ROWS = 100
store.max_parameters = lambda conn: 35
def die(n):  # after the first statement's rows are written
    os.kill(os.getpid(), signal.SIGKILL)
ingest_dataset(make_engine({f"sqlite:///{path}"!r}, bulk=True),
               Dataset(pd.read_csv({str(frame)!r}, dtype={{"user": str, "item": str}})), progress=die)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.with_name("cfb.db-journal").exists()  # hot: the next connection rolls it back
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Rating)) == 0
        assert conn.scalar(select(func.count()).select_from(User)) == 0
    assert journal_mode(path) == "wal"
    assert ingest_dataset(engine, Dataset(ratings_frame()))["ratings"] == len(stored(engine)) > 0
    engine.dispose()


def test_new_ids_are_numbered_in_the_order_given_so_a_sorted_release_comes_in_key_order(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'cfb.db'}")
    df = pd.DataFrame({"user": ["1", "1", "2", "10", "10"], "item": ["5", "40", "5", "5", "300"],
                       "rating": [4.0, 3.0, 5.0, 2.0, 1.0], "timestamp": [1, 2, 3, 4, 5]})
    ingest_dataset(engine, Dataset(df))
    with engine.connect() as conn:
        users, items = store.id_map(conn, User), store.id_map(conn, Item)
        keys = conn.execute(select(Rating.user_id, Rating.item_id).order_by(Rating.seq)).all()
    assert users["1"] < users["2"] < users["10"]  # not "1" < "10" < "2", the ids' text order
    assert items["5"] < items["40"] < items["300"]
    assert keys == sorted(keys)  # the file's order is the key order
    engine.dispose()


def test_a_connection_opened_during_a_first_load_waits_for_it_and_sees_every_row(tmp_path, monkeypatch):
    monkeypatch.setattr(ratings_io, "BULK_ROWS", 100)
    url = f"sqlite:///{tmp_path / 'cfb.db'}"
    engine = make_engine(url, bulk=True)
    seen: dict = {}

    def newcomer() -> None:  # e.g. `cfb recommend` started while the load runs
        other = make_engine(url)
        try:
            with other.connect() as conn:
                seen["ratings"] = conn.scalar(select(func.count()).select_from(Rating))
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            seen["error"] = repr(e)
        other.dispose()

    thread = threading.Thread(target=newcomer)

    def progress(n: int) -> None:
        if not thread.is_alive() and "started" not in seen:
            seen["started"] = True
            thread.start()
            time.sleep(0.3)  # it connects while the load holds the database

    n = ingest_dataset(engine, Dataset(ratings_frame()), progress=progress)["ratings"]
    thread.join(timeout=60)
    assert seen.get("ratings") == n > 0, seen
    engine.dispose()


def test_a_first_load_whose_commit_times_out_writes_nothing_and_leaves_wal(tmp_path, monkeypatch):
    from cfb.db import engine as engine_module

    monkeypatch.setattr(ratings_io, "BULK_ROWS", 100)
    monkeypatch.setattr(engine_module, "BUSY_TIMEOUT_MS", 300)
    path = tmp_path / "cfb.db"
    engine = make_engine(f"sqlite:///{path}", bulk=True)
    store.create_schema(engine)
    readers: list[sqlite3.Connection] = []

    def progress(n: int) -> None:  # a reader takes its lock during the load and keeps it
        if not readers:
            reader = sqlite3.connect(path, isolation_level=None)
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM settings").fetchone()
            readers.append(reader)

    with pytest.raises(Exception, match="locked"):
        ingest_dataset(engine, Dataset(ratings_frame()), progress=progress)
    readers[0].execute("ROLLBACK")
    readers[0].close()
    with engine.connect() as conn:  # (the load's connection was dropped: it could not leave the journal)
        assert conn.scalar(select(func.count()).select_from(Rating)) == 0
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL, as every connection
    assert journal_mode(path) == "wal"
    engine.dispose()
