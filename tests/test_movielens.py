"""Accuracy bands on MovieLens 100k (slow; skipped when ../shared/data is absent)."""
from __future__ import annotations

import pytest

from cfb.db.sources import read_movielens
from cfb.service.ingest import ingest_dataset
from cfb.service.serving import recommend, similar
from cfb.service.training import retrain_full

from .conftest import SHARED_ML100K, ml100k_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ml100k_available(), reason="MovieLens 100k not in ../shared/data")]


@pytest.fixture(scope="module")
def ml_engine(tmp_path_factory):
    from cfb.db.engine import make_engine

    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('ml') / 'cfb.db'}")
    ingest_dataset(engine, read_movielens(SHARED_ML100K))
    return engine


def test_dot_model_reaches_chapter_8_accuracy(ml_engine):
    report = retrain_full(ml_engine, kind="dot", progress=False)
    assert report["n_valid"] == 20_000
    assert 0.85 < report["valid_rmse"] <= 0.915  # fastai chapter 8: MSE ~0.83
    with ml_engine.connect() as conn:
        top5 = [r["title"] for r in similar(conn, "Star Wars (1977)", n=5)["items"]]
        assert {"Return of the Jedi (1983)", "Empire Strikes Back, The (1980)"} & set(top5)
        rec = recommend(conn, "1", n=10)
    assert len(rec["items"]) == 10


def test_nn_model_band(ml_engine):
    report = retrain_full(ml_engine, kind="nn", progress=False)
    assert report["valid_rmse"] <= 0.98
