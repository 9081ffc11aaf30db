"""Shared fixtures: a synthetic ratings set with planted structure, and temporary databases."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import pytest

from sqlalchemy import text

from cfb.db.engine import make_engine, process_alive
from cfb.db.sources import Dataset

SHARED_ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"
# Small, fast training settings that learn the planted structure.
FAST = {"n_factors": 8, "epochs": 12, "lr": 0.03, "bs": 256, "wd": 0.05}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests train tiny models, where a second thread only adds contention (see docs/bench)."""
    import torch

    torch.set_num_threads(1)


def planted_ratings(n_users: int = 60, n_items: int = 40, seed: int = 0) -> Dataset:
    """Two taste groups: "a" users (gender F) love items a0.. and dislike b0..; "b" users (M) the opposite.

    Each user rates a random 60% of the items; ratings are 1..5 with a little noise."""
    rng = np.random.default_rng(seed)
    rows, users = [], []
    half = n_items // 2
    for u in range(n_users):
        group = "a" if u % 2 == 0 else "b"
        users.append({"user": f"{group}{u}", "attributes": {"gender": "F" if group == "a" else "M",
                                                            "age": int(rng.integers(18, 60))}})
        for i in rng.permutation(n_items)[: int(n_items * 0.6)]:
            item_group = "a" if i < half else "b"
            base = 4.6 if item_group == group else 1.6
            r = float(np.clip(np.round(base + rng.normal(0, 0.4)), 1, 5))
            rows.append((f"{group}{u}", f"{item_group}{i}", r, 1_000_000 + len(rows)))
    ratings = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    items = pd.DataFrame({"item": [f"{'a' if i < half else 'b'}{i}" for i in range(n_items)],
                          "title": [f"{'Alpha' if i < half else 'Beta'} film {i}" for i in range(n_items)],
                          "attributes": [{} for _ in range(n_items)]})
    return Dataset(ratings, items, pd.DataFrame(users), scale=(1.0, 5.0), name="planted")


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cfb.db'}"


@pytest.fixture
def engine(db_url: str):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def planted() -> Dataset:
    return planted_ratings()


def checkpointed_copy(engine, dst: Path) -> None:  # noqa: ANN001
    """Copy a SQLite database (WAL folded in first) to ``dst``."""
    src = Path(engine.url.database)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    shutil.copy(src, dst)


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory):
    """The planted set ingested and a dot model trained (version 1), once per test session."""
    from cfb.service.ingest import ingest_dataset
    from cfb.service.training import retrain_full

    path = tmp_path_factory.mktemp("template") / "cfb.db"
    engine = make_engine(f"sqlite:///{path}")
    ingest_dataset(engine, planted_ratings())
    report = retrain_full(engine, kind="dot", valid_pct=0.2, progress=False, **FAST)
    engine.dispose()
    return engine, report


@pytest.fixture
def trained(trained_template, engine, tmp_path):
    """A fresh copy of the trained template database, at ``db_url``."""
    template, report = trained_template
    checkpointed_copy(template, tmp_path / "cfb.db")
    return engine, report


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CFB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CFB_DATABASE_URL", raising=False)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def ml100k_available() -> bool:
    return (SHARED_ML100K / "u.data").exists() and os.access(SHARED_ML100K / "u.data", os.R_OK)


@contextmanager
def fresh_pg_schema(schema: str) -> Iterator[str]:
    """A URL of the PostgreSQL test server ($CFB_TEST_POSTGRES_URL) whose search path is a schema of
    this test run's own (``schema`` and the process id: two runs against one server do not meet),
    created empty and dropped afterwards (as are those a killed run of this machine left); skips the
    test without a server."""
    url = os.environ.get("CFB_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set CFB_TEST_POSTGRES_URL to run against PostgreSQL")
    prefix, schema = f"{schema}_", f"{schema}_{os.getpid()}"
    base = make_engine(url)
    with base.begin() as conn:
        for (left,) in conn.execute(text("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, :p)"),
                                    {"p": prefix}).all():  # a killed run's (its process is gone): dropped
            pid = left[len(prefix):]
            if pid.isdigit() and not process_alive(int(pid)):
                conn.execute(text(f"DROP SCHEMA IF EXISTS {left} CASCADE"))
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield url + ("&" if "?" in url else "?") + "options=" + quote(f"-csearch_path={schema}")
    finally:
        with base.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        base.dispose()
