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
    report = retrain_full(ml_engine, kind="dot", valid_pct=0.2, progress=False)
    assert report["n_valid"] == 20_000
    assert 0.85 < report["valid_rmse"] <= 0.915  # fastai chapter 8: MSE ~0.83
    with ml_engine.connect() as conn:
        top5 = [r["title"] for r in similar(conn, "Star Wars (1977)", n=5)["items"]]
        assert {"Return of the Jedi (1983)", "Empire Strikes Back, The (1980)"} & set(top5)
        rec = recommend(conn, "1", n=10)
    assert len(rec["items"]) == 10


def test_new_items_from_metadata_on_real_data(ml_engine):
    """On the dot version above, items added from metadata (`cfb ingest items`, `cfb retrain`): `cfb similar`
    on one compares it by metadata with every item (the prior's factors lay new items closer to each
    other than to any learned item: a science-fiction film's nearest were a documentary and an item of no
    genre); and an item that sixty users chosen at random rated 5 does not go to the top for everyone (its
    solved bias, 1.5 against the learned items' 0.3 at most, was carried past what the map from rating rows
    to ranker rows was fitted on: in 671 of 943 users' top 10, and in none after a full retrain)."""
    import numpy as np
    import pandas as pd

    from cfb.db.sources import Dataset
    from cfb.service.incremental import retrain_incremental
    from cfb.service.ingest import upsert_items

    upsert_items(ml_engine, pd.DataFrame({
        "item": ["n1", "n2", "n3"], "title": ["Star Voyage (1998)", "Ocean Deep (1998)", "Toon (1995)"],
        "attributes": [{"genres": ["Action", "Adventure", "Sci-Fi"], "year": 1998}, {"genres": ["Documentary"], "year": 1998},
                       {"genres": ["Animation", "Children's"], "year": 1995}]}))
    assert retrain_incremental(ml_engine)["items_from_metadata"] == 3
    with ml_engine.connect() as conn:
        near = similar(conn, "Star Voyage (1998)", n=10)["items"]
    assert not {"n2", "n3"} & {r["item"] for r in near}, near
    users = [str(u) for u in np.random.default_rng(0).choice(np.arange(1, 944), 60, replace=False)]
    ingest_dataset(ml_engine, Dataset(pd.DataFrame({"user": users, "item": "n2", "rating": 5.0,
                                                    "timestamp": 893286638 + np.arange(60)})))
    assert retrain_incremental(ml_engine)["items_resolved"] >= 1
    with ml_engine.connect() as conn:
        tops = sum("n2" in {r["item"] for r in recommend(conn, str(u), n=10)["items"]} for u in range(1, 944))
    assert tops < 94, tops  # (a tenth of the users at most)


def test_nn_model_matches_the_books_recipe(ml_engine):
    """Stock fastai EmbeddingNN (layers 100-50, bs 64, 5 epochs, lr 5e-3, wd 0.1) reaches MSE 0.876 on this split."""
    report = retrain_full(ml_engine, kind="nn", valid_pct=0.2, progress=False)
    assert report["valid_mse"] <= 0.876


def test_real_100k_layout_fields():
    """The real 100k files through the layout dispatcher: every field where it was, plus the title's year."""
    from cfb.db.layouts import movielens_layout

    assert movielens_layout(SHARED_ML100K) == "100k"
    ds = read_movielens(SHARED_ML100K)
    assert (len(ds.ratings), len(ds.users), len(ds.items)) == (100_000, 943, 1682)
    assert ds.scale == (1.0, 5.0) and ds.ratings["rating"].between(1, 5).all()
    star_wars = ds.items.set_index("item").loc["50"]
    assert star_wars["title"] == "Star Wars (1977)"
    assert star_wars["attributes"]["year"] == 1977
    assert {"Action", "Sci-Fi"} <= set(star_wars["attributes"]["genres"])
    assert ds.users.set_index("user").loc["1"]["attributes"] == {"age": 24, "gender": "M",
                                                                 "occupation": "technician", "zip": "85711"}
