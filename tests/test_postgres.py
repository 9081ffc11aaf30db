"""The same code on PostgreSQL: runs when CFB_TEST_POSTGRES_URL points at a database it may wipe
(e.g. postgresql+psycopg://cfb:cfb@localhost/cfb_test); skipped otherwise."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from cfb.db.engine import make_engine
from cfb.db.schema import Base
from cfb.db.sources import Dataset
from cfb.service.incremental import retrain_incremental
from cfb.service.ingest import ingest_dataset
from cfb.service.onboard import onboard
from cfb.service.serving import recommend, similar
from cfb.service.training import retrain_full

from .conftest import FAST

URL = os.environ.get("CFB_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not URL, reason="set CFB_TEST_POSTGRES_URL to run against PostgreSQL")


@pytest.fixture
def pg_engine():
    engine = make_engine(URL)
    Base.metadata.drop_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
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
        assert all(r["item"][0] == "a" for r in similar(conn, "a3", n=3)["items"])
    out = onboard(pg_engine, [("entry 1", json.loads('{"user": "pg", "answers": {"gender": "M"}}'))])
    assert out["onboarded"] == [{"user": "pg", "ratings": 0}]
    ingest_dataset(pg_engine, Dataset(pd.DataFrame([{"user": "pg", "item": "b20", "rating": 5.0, "timestamp": 3}])))
    inc = retrain_incremental(pg_engine)
    assert inc["mode"] == "incremental" and inc["users_with_new_ratings"] == 1
    with pg_engine.connect() as conn:
        assert [r["item"][0] for r in recommend(conn, "pg", n=3)["items"]] == ["b"] * 3
