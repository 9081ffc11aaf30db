"""Concurrent writers and the retrain lock: no "database is locked", distinct seq numbers in commit
order (so an incremental retrain reading ``seq > max_seq`` misses nothing), and stale locks."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import func, insert, select, text

from cfb.cf_core.errors import CfbError
from cfb.db import ratings_io, store, versions
from cfb.db.engine import make_engine, writing
from cfb.db.schema import Base, Item, Rating, Setting, User
from cfb.db.sources import Dataset
from cfb.service.ingest import ingest_dataset

from .conftest import fresh_pg_schema, planted_ratings

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork start method")

PG_SCHEMA = "cfb_concurrency"  # a schema of its own (with the process id: conftest.fresh_pg_schema)
WORKERS, PER_WORKER = 4, 12


def _fork():
    return multiprocessing.get_context("fork")


def seed(engine) -> None:  # noqa: ANN001
    """Users w0.., items i0.. and one rating (which fixes the 1..5 scale)."""
    users = pd.DataFrame({"user": [f"w{w}" for w in range(WORKERS)], "attributes": [{}] * WORKERS})
    items = pd.DataFrame({"item": [f"i{k}" for k in range(PER_WORKER)], "title": [None] * PER_WORKER,
                          "attributes": [{}] * PER_WORKER})
    ratings = pd.DataFrame([{"user": "w0", "item": "i0", "rating": 3.0, "timestamp": 1}])
    ingest_dataset(engine, Dataset(ratings, items, users, scale=(1.0, 5.0)))


def wanted(w: int, k: int) -> float:
    return float(1 + (w + k) % 5)


def _rate_worker(url: str, w: int, barrier, hold: float) -> None:  # noqa: ANN001
    """Worker ``w`` rates every item, each rating its own transaction, all workers starting together."""
    engine = make_engine(url)
    barrier.wait(timeout=60)
    for k in range(PER_WORKER):
        if hold:  # keep the transaction open a while after the seq numbers are taken
            with writing(engine) as conn:
                uid = store.user_id_of(conn, f"w{w}")
                iid = conn.scalar(select(Item.id).where(Item.external_id == f"i{k}"))
                ratings_io.write_ratings(conn, [uid], [iid], [wanted(w, k)], [k])
                time.sleep(hold * ((w + k) % 3))
        else:
            from cfb.service.ratings import rate_item

            rate_item(engine, f"w{w}", f"i{k}", wanted(w, k))
    engine.dispose()


def run_writers(url: str, hold: float = 0.0, during=None) -> None:  # noqa: ANN001
    """WORKERS processes writing at once; ``during()`` runs here meanwhile, until they have exited."""
    ctx = _fork()
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_rate_worker, args=(url, w, barrier, hold)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    if during:
        during(lambda: any(p.is_alive() for p in procs))
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WORKERS


def check_all_stored(engine) -> list[int]:  # noqa: ANN001
    """Every worker's rating is there, and no two ratings share a seq number."""
    with engine.connect() as conn:
        rows = conn.execute(select(User.external_id, Item.external_id, Rating.rating, Rating.seq)
                            .join(User, User.id == Rating.user_id).join(Item, Item.id == Rating.item_id)).all()
    got = {(u, i): r for u, i, r, _ in rows}
    for w in range(WORKERS):
        for k in range(PER_WORKER):
            assert got[(f"w{w}", f"i{k}")] == wanted(w, k)
    seqs = [s for *_, s in rows]
    assert len(seqs) == len(set(seqs)) == WORKERS * PER_WORKER
    return seqs


# --- (a) SQLite: concurrent writers queue instead of failing -------------------------------------
def test_concurrent_ratings_on_sqlite(engine, db_url):
    seed(engine)
    engine.dispose()  # no pooled connection crosses the fork
    run_writers(db_url)
    check_all_stored(engine)


def test_concurrent_rate_commands(engine, db_url):
    """The `cfb rate` command itself, from separate processes."""
    import subprocess

    seed(engine)
    cmd = [sys.executable, "-m", "cfb.cli", "--db", db_url, "rate"]
    procs = [subprocess.Popen([*cmd, f"w{w}", f"i{k}", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for w in range(2) for k in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with engine.connect() as conn:
        seqs = conn.scalars(select(Rating.seq)).all()
        assert conn.scalar(select(func.count()).select_from(Rating).where(Rating.rating == 5.0)) == 4
    assert len(seqs) == len(set(seqs))


# --- (b) PostgreSQL: distinct seq numbers, in commit order ----------------------------------------
@pytest.fixture
def pg_url():
    with fresh_pg_schema(PG_SCHEMA) as url:
        yield url


def test_concurrent_ratings_on_postgres_keep_commit_order(pg_url):
    engine = make_engine(pg_url)
    try:
        assert engine.dialect.name == "postgresql"
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT current_schema()")) == f"{PG_SCHEMA}_{os.getpid()}"
        seed(engine)
        with engine.connect() as conn:
            start = conn.scalar(select(func.max(Rating.seq)))
        seen: dict[tuple[int, int], int] = {}

        def poll(running) -> None:  # noqa: ANN001
            """What an incremental retrain does: read ``seq > last seen``, again and again."""
            last = start
            while True:
                alive = running()
                with engine.connect() as conn:
                    new = ratings_io.load_ratings(conn, since_seq=last)
                for u, i, s in zip(new.user_id, new.item_id, new.seq):
                    seen[(int(u), int(i))] = int(s)
                if len(new):
                    last = int(new.seq.max())
                if not alive:
                    return
                time.sleep(0.005)

        engine.dispose()
        run_writers(pg_url, hold=0.02, during=poll)
        seqs = check_all_stored(engine)
        with engine.connect() as conn:
            final = ratings_io.load_ratings(conn, since_seq=start)
        # every rating was seen by the poller, with its final seq: none committed behind its back
        assert {(int(u), int(i)): int(s) for u, i, s in zip(final.user_id, final.item_id, final.seq)} == seen
        assert len(seen) == WORKERS * PER_WORKER and len(set(seqs)) == len(seqs)
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


# --- (c) the retrain lock's heartbeat -------------------------------------------------------------
def plant_lock(engine, host: str, pid: int, age: float) -> None:  # noqa: ANN001
    with writing(engine) as conn:
        conn.execute(Setting.__table__.delete().where(Setting.key == versions.LOCK_KEY))
        beat = versions.db_now(conn) - age
        conn.execute(insert(Setting).values(key=versions.LOCK_KEY, value=json.dumps(
            {"pid": pid, "host": host, "token": "x", "heartbeat": beat})))


def lock_row(engine) -> dict | None:  # noqa: ANN001
    with engine.connect() as conn:
        raw = store.get_setting(conn, versions.LOCK_KEY)
    return json.loads(raw) if raw else None


def test_stale_lock_from_another_host_is_taken_over(engine, monkeypatch):
    store.create_schema(engine)
    monkeypatch.delenv("CFB_LOCK_STALE_S", raising=False)
    plant_lock(engine, "elsewhere.example", 4242, age=10)  # fresh: its holder may well be running
    with pytest.raises(CfbError, match="another retrain is running"):
        versions.acquire_retrain_lock(engine)
    assert lock_row(engine)["host"] == "elsewhere.example"

    plant_lock(engine, "elsewhere.example", 4242, age=versions.DEFAULT_STALE_S + 30)  # its holder died
    me = versions.acquire_retrain_lock(engine)
    try:
        assert lock_row(engine)["token"] == me["token"] and lock_row(engine)["host"] == socket.gethostname()
    finally:
        versions.release_retrain_lock(engine, me)
    assert lock_row(engine) is None

    monkeypatch.setenv("CFB_LOCK_STALE_S", "15")  # the limit is configurable
    plant_lock(engine, "elsewhere.example", 4242, age=20)
    me = versions.acquire_retrain_lock(engine)
    versions.release_retrain_lock(engine, me)
    assert lock_row(engine) is None
    for limit in ("-5", "0", "3", "nan", "inf", "abc"):  # (-5 took over a lock with a fresh heartbeat)
        monkeypatch.setenv("CFB_LOCK_STALE_S", limit)
        plant_lock(engine, "elsewhere.example", 4242, age=1)
        with pytest.raises(CfbError, match=rf"^CFB_LOCK_STALE_S must be a number of seconds from 10 .*not '{limit}'$"):
            versions.acquire_retrain_lock(engine)
        assert lock_row(engine)["host"] == "elsewhere.example"


def test_dead_process_on_this_host_is_taken_over_at_once(engine):
    store.create_schema(engine)
    ctx = _fork()
    p = ctx.Process(target=os._exit, args=(0,))
    p.start()
    p.join()
    plant_lock(engine, socket.gethostname(), p.pid, age=0)
    me = versions.acquire_retrain_lock(engine)
    versions.release_retrain_lock(engine, me)
    plant_lock(engine, socket.gethostname(), os.getpid(), age=0)  # alive: refused
    with pytest.raises(CfbError, match="another retrain is running"):
        versions.acquire_retrain_lock(engine)
    # alive, its heartbeat ahead of this host's clock (the clock stepped back since it beat): still refused
    plant_lock(engine, socket.gethostname(), os.getpid(), age=-(versions.DEFAULT_STALE_S + 3600))
    with pytest.raises(CfbError, match=r"another retrain is running .*last heartbeat 37[0-9][0-9] s ahead of this clock\)"):
        versions.acquire_retrain_lock(engine)
    plant_lock(engine, socket.gethostname(), os.getpid(), age=-2 * versions.CLOCK_STEP_S)  # no clock steps that far
    me = versions.acquire_retrain_lock(engine)
    versions.release_retrain_lock(engine, me)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are told apart through Linux's /proc")
def test_a_killed_holder_its_parent_has_not_reaped_is_dead(engine):
    """A retrain killed under a supervisor that has not yet waited for it (Python's subprocess, an init
    that does not reap) is a zombie: its lock is taken over at once (it blocked the next retrain for the
    stale limit, two minutes, saying "another retrain is running")."""
    import signal
    import subprocess

    from cfb.db.engine import process_alive

    store.create_schema(engine)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert process_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        for _ in range(200):  # (until the kernel has made it a zombie)
            if Path(f"/proc/{child.pid}/stat").read_bytes().rpartition(b")")[2].split()[0] == b"Z":
                break
            time.sleep(0.01)
        assert not process_alive(child.pid)
        plant_lock(engine, socket.gethostname(), child.pid, age=0)
        me = versions.acquire_retrain_lock(engine)
        versions.release_retrain_lock(engine, me)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(0) and not process_alive(-1) and not process_alive(2**80)


@pytest.mark.parametrize("row", ["garbage", "[1, 2]", '{"pid": "abc", "host": "h"}', '{"host": "h"}',
                                 '{"pid": 1, "host": 7, "heartbeat": 0}', '{"pid": 1, "host": "h", "heartbeat": "NaN"}',
                                 '{"pid": 100000000000000000000000, "host": "HOST", "heartbeat": 0}',
                                 '{"pid": -1, "host": "HOST", "heartbeat": 1e18}',
                                 '{"pid": Infinity, "host": "h", "heartbeat": 0}',
                                 '{"pid": 7, "host": "elsewhere", "heartbeat": 1e12}'])
def test_a_lock_row_this_code_did_not_write_is_taken_over(engine, row):
    """A truncated or hand-edited lock row has no holder to wait for: the next retrain takes the lock
    (it used to end every retrain in a traceback)."""
    store.create_schema(engine)
    with writing(engine) as conn:  # (HOST: this machine, whose processes are checked)
        store.set_setting(conn, versions.LOCK_KEY, row.replace("HOST", socket.gethostname()))
    me = versions.acquire_retrain_lock(engine)
    try:
        assert lock_row(engine)["token"] == me["token"]
    finally:
        versions.release_retrain_lock(engine, me)
    assert lock_row(engine) is None


def test_heartbeat_refreshes_the_lock_until_release(engine, monkeypatch):
    store.create_schema(engine)
    monkeypatch.setattr(versions, "HEARTBEAT_S", 0.1)
    me = versions.acquire_retrain_lock(engine)
    first = lock_row(engine)["heartbeat"]
    thread, _ = versions._heartbeats[me["token"]]
    deadline = time.time() + 10
    while lock_row(engine)["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert lock_row(engine)["heartbeat"] > first
    versions.release_retrain_lock(engine, me)
    assert not thread.is_alive() and lock_row(engine) is None
    assert me["token"] not in versions._heartbeats


def test_heartbeat_stops_when_the_lock_was_taken_over(engine, monkeypatch):
    store.create_schema(engine)
    monkeypatch.setattr(versions, "HEARTBEAT_S", 0.05)
    me = versions.acquire_retrain_lock(engine)
    thread, _ = versions._heartbeats[me["token"]]
    plant_lock(engine, "elsewhere.example", 1, age=0)  # as if another host had taken it over
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert lock_row(engine)["host"] == "elsewhere.example"  # not overwritten by the old holder
    versions.release_retrain_lock(engine, me)  # not ours any more: left alone
    assert lock_row(engine)["host"] == "elsewhere.example"


# --- (d) readers never block writers, nor writers readers ---------------------------------------
def test_ingest_while_a_read_transaction_is_open(engine):
    ingest_dataset(engine, planted_ratings(n_users=10, n_items=8))
    with engine.connect() as reader:
        with reader.begin():
            before = store.count_ratings(reader)  # the read transaction now holds its snapshot
            more = pd.DataFrame([{"user": "a0", "item": "zz", "rating": 4.0, "timestamp": 1}])
            t0 = time.time()
            assert ingest_dataset(engine, Dataset(more))["ratings"] == 1
            assert time.time() - t0 < 10
            assert store.count_ratings(reader) == before  # its snapshot is unchanged
        assert store.count_ratings(reader) == before + 1


def test_readers_do_not_wait_for_an_open_write_transaction(engine):
    ingest_dataset(engine, planted_ratings(n_users=10, n_items=8))
    with engine.connect() as conn:
        before = store.count_ratings(conn)
    with writing(engine) as w:
        ratings_io.write_ratings(w, [1], [2], [5.0], [None])
        done = []

        def read() -> None:
            with engine.connect() as conn:
                done.append(store.count_ratings(conn))

        t = threading.Thread(target=read)
        t.start()
        t.join(timeout=5)
        assert done == [before]  # read at once, without the uncommitted write
