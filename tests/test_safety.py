"""Crash safety with real processes: SIGKILL mid-retrain, concurrent retrains, serving during a retrain."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from cfb.db import versions
from cfb.db.schema import ModelArrays, ModelVersion, Rating, UserFactors

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def cfb_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("cfb")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cfb.cli"]


def start_long_retrain(url: str) -> subprocess.Popen:
    return subprocess.Popen([*cfb_cmd(), "--db", url, "retrain", "--full", "--quiet", "--epochs", "300",
                             "--bs", "64", "--factors", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lock(engine, proc, timeout: float = 60) -> None:  # noqa: ANN001
    """Until the retrain holds its lock (it is then loading or training)."""
    from cfb.db.store import get_setting

    deadline = time.time() + timeout
    while time.time() < deadline:
        with engine.connect() as conn:
            if get_setting(conn, versions.LOCK_KEY):
                return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    raise AssertionError("retrain never took its lock")


def table_counts(engine) -> dict:  # noqa: ANN001
    with engine.connect() as conn:
        return {t.__tablename__: conn.scalar(select(func.count()).select_from(t))
                for t in (ModelVersion, UserFactors, ModelArrays, Rating)}


@pytest.mark.parametrize("extra_delay", [0.0, 1.5])
def test_sigkill_mid_retrain_keeps_previous_version(trained, db_url, extra_delay):
    engine, report = trained
    before = table_counts(engine)
    proc = start_long_retrain(db_url)
    wait_for_lock(engine, proc)
    time.sleep(extra_delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert table_counts(engine) == before  # no partial rows, no lost ratings
    with engine.connect() as conn:
        assert versions.serving_version(conn) == report["version"]
    # the dead process's lock is taken over by the next retrain
    res = subprocess.run([*cfb_cmd(), "--db", db_url, "retrain", "--full", "--json", "--epochs", "2", "--lr", "0.03",
                          "--bs", "256", "--factors", "8"],  # (default settings learn nothing in 2 epochs here)
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["version"] == report["version"] + 1


def test_second_retrain_fails_clearly_and_serving_continues(trained, db_url):
    engine, report = trained
    proc = start_long_retrain(db_url)
    try:
        wait_for_lock(engine, proc)
        second = subprocess.run([*cfb_cmd(), "--db", db_url, "retrain", "--full"], capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 1
        assert "another retrain is running" in second.stderr and "Traceback" not in second.stderr
        served = subprocess.run([*cfb_cmd(), "--db", db_url, "recommend", "a0", "-n", "3", "--json"],
                                capture_output=True, text=True, timeout=120)
        assert served.returncode == 0, served.stderr
        assert len(json.loads(served.stdout)[0]["items"]) == 3
        assert proc.poll() is None  # the first retrain was still running throughout
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    with engine.connect() as conn:
        assert versions.serving_version(conn) == report["version"]


def test_onboarding_during_a_full_retrain(trained, db_url, tmp_path):
    """A signup while a full retrain trains is stored at once and served from the version serving now;
    the retrain that then finishes serves the new user too."""
    engine, report = trained
    answers = tmp_path / "q.json"
    answers.write_text(json.dumps({"user": "mid-retrain", "answers": {"gender": "M"}, "ratings": {"b21": 5}}))
    proc = subprocess.Popen([*cfb_cmd(), "--db", db_url, "retrain", "--full", "--quiet", "--json", "--epochs", "40",
                             "--bs", "64", "--factors", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lock(engine, proc)
    res = subprocess.run([*cfb_cmd(), "--db", db_url, "onboard", "--answers", str(answers), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert proc.poll() is None  # the onboarding did not wait for the retrain
    rec = subprocess.run([*cfb_cmd(), "--db", db_url, "recommend", "mid-retrain", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert rec.returncode == 0 and json.loads(rec.stdout)[0]["items"]
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    with engine.connect() as conn:
        assert versions.serving_version(conn) == json.loads(out)["version"] == report["version"] + 1
    rec = subprocess.run([*cfb_cmd(), "--db", db_url, "recommend", "mid-retrain", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert rec.returncode == 0 and json.loads(rec.stdout)[0]["items"]


def test_sigkill_at_any_moment_of_incremental_retrains(trained, db_url):
    """Kill `cfb retrain` (incremental) at spread-out moments: every version is whole or absent."""
    import pandas as pd

    from cfb.db.sources import Dataset
    from cfb.service.ingest import ingest_dataset

    engine, _ = trained
    for attempt, delay in enumerate(np.linspace(0.2, 2.0, 8)):
        new = pd.DataFrame([{"user": f"b{2 * attempt + 1}", "item": "a3", "rating": 5.0, "timestamp": attempt}])
        ingest_dataset(engine, Dataset(new))
        ratings_before = table_counts(engine)["ratings"]
        proc = subprocess.Popen([*cfb_cmd(), "--db", db_url, "retrain", "--quiet"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        with engine.connect() as conn:
            serving = versions.serving_version(conn)
            for v in versions.list_versions(conn):
                n_users = conn.scalar(select(func.count()).select_from(UserFactors)
                                      .where(UserFactors.version_id == v["version"]))
                if v["mode"] == "incremental":  # written whole: its delta, and no user rows
                    assert n_users == 0
                assert conn.scalar(select(func.count()).select_from(ModelArrays)
                                   .where(ModelArrays.version_id == v["version"])) == 1
            assert serving == max(v["version"] for v in versions.list_versions(conn))
        assert table_counts(engine)["ratings"] == ratings_before  # no rating lost


def test_a_database_made_where_one_was_deleted_under_an_open_connection_is_only_the_new_one(tmp_path):
    """`rm cfb.db` while a server still has it open leaves its write-ahead log and shared-memory index at
    the path (SQLite keeps them for the open connections); a first ingest there linked its new file beside
    them, and SQLite read the deleted database's log into it: the old users back, the new ones missing,
    the file malformed (a review). A database made at a path with no file starts without them."""
    import sqlite3

    from click.testing import CliRunner

    from cfb.cli.main import cli

    path = tmp_path / "cfb.db"
    old = sqlite3.connect(path, isolation_level=None)  # (the server's connection, kept open throughout)
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("PRAGMA wal_autocheckpoint=0")  # (its pages stay in the log, as a busy server's do)
    old.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, external_id TEXT)")
    old.executemany("INSERT INTO users (external_id) VALUES (?)", [(f"ghost{k}",) for k in range(500)])
    try:
        path.unlink()  # only the database file, as `rm ~/.cfb/cfb.db` does
        assert path.with_name("cfb.db-wal").exists() and path.with_name("cfb.db-shm").exists()
        ratings = tmp_path / "r.csv"
        ratings.write_text("user,item,rating\nalice,a1,5\nalice,a2,3\nbob,a1,4\nbob,a3,2\n")
        res = CliRunner().invoke(cli, ["--db", f"sqlite:///{path}", "ingest", "ratings", str(ratings), "--quiet"])
        assert res.exit_code == 0, res.output
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert sorted(u for (u,) in conn.execute("SELECT external_id FROM users")) == ["alice", "bob"]
    finally:
        old.close()


def test_a_write_on_a_file_damaged_under_an_open_connection_raises_the_engines_error(tmp_path):
    """A writer's wait for SQLite's lock runs through the driver's own connection (``_sqlite_begin``): a
    file damaged under a pooled connection raised the driver's bare error there, which the server's error
    answers do not know (they know SQLAlchemy's, as every read raises it)."""
    import sqlalchemy.exc
    from sqlalchemy import text

    from cfb.db.engine import make_engine, writing

    path = tmp_path / "cfb.db"
    engine = make_engine(f"sqlite:///{path}")
    with writing(engine) as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    with engine.connect() as conn:  # (a pooled connection, open on the file)
        conn.execute(text("SELECT count(*) FROM t")).scalar()
    with open(path, "r+b") as f:  # damaged in place (the same file: its pages and its log's overwritten)
        f.write(os.urandom(path.stat().st_size))
    for end in ("-wal", "-shm"):
        side = path.with_name(path.name + end)
        if side.exists():
            side.write_bytes(b"\0" * side.stat().st_size)
    with pytest.raises(sqlalchemy.exc.DatabaseError):
        with writing(engine) as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
    engine.dispose()
