"""A user's metadata affinity: what their ratings say beyond the item prior's rows, added to the
predicted rating of items known only from their metadata."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from cfb.cf_core.meta_affinity import append_rows, dense_rows, item_term, to_csr, user_affinity, with_rows
from cfb.cf_core.model import TrainedModel, UserHistory
from cfb.cf_core.scoring import sigmoid_range
from cfb.db import versions
from cfb.db.sources import Dataset
from cfb.service.incremental import retrain_incremental
from cfb.service.ingest import ingest_dataset
from cfb.service.training import load_training_data, retrain_full

from .conftest import FAST, planted_ratings


def test_csr_rows_round_trip_and_append():
    X = np.array([[1, 0, 0.5], [0, 0, 0], [1, 1, 0]], np.float32)
    csr = to_csr(X)
    assert np.array_equal(dense_rows(csr, [2, 0, 1], 3), X[[2, 0, 1]])
    both = append_rows(csr, X[:2], 2)
    assert np.array_equal(dense_rows(both, np.arange(5), 3), np.vstack([X, X[:2]]))
    assert np.array_equal(dense_rows(append_rows(csr, None, 2), [3, 4], 3), np.zeros((2, 3)))
    new_rows = np.array([[0, 2, 0], [0, 0, 0]], np.float32)  # rows replaced in place, other rows kept
    expected = X.copy()
    expected[[2, 0]] = new_rows
    assert np.array_equal(dense_rows(with_rows(csr, [2, 0], new_rows), np.arange(3), 3), expected)
    assert np.array_equal(dense_rows(with_rows(csr, [], np.zeros((0, 3))), np.arange(3), 3), X)


def test_affinity_is_a_shrunk_mean_residual_per_feature_and_an_items_average_over_its_features():
    X = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 1]], np.float64)  # constant, genre A, genre B
    aff = user_affinity(X, np.array([1.0, 1.0, -1.0]), shrink=2.0)
    assert np.allclose(aff, [1 / 5, 2 / 4, -1 / 3])
    assert np.allclose(item_term(np.array([[1, 1, 0], [0, 0, 0]], np.float64), aff), [(1 / 5 + 2 / 4) / 2, 0.0])


def _with_genres(ds: Dataset) -> Dataset:
    items = ds.items.assign(attributes=[{"genres": [t.split()[0]], "year": 1980 + k % 20}
                                        for k, t in enumerate(ds.items.title)])
    return Dataset(ds.ratings, items, ds.users, ds.scale, ds.name)


def test_a_new_items_prediction_carries_the_users_metadata_affinity(engine):
    """Through the pipeline (dot model): a version stores every item's encoded metadata; an item added
    from its metadata is predicted as the rating model predicts plus the weight × the user's affinity
    for its features (computed from their ratings against the prior's rows); items the full retrain
    learned are not touched; an incremental version carries the new item's metadata row."""
    ingest_dataset(engine, _with_genres(planted_ratings()))
    report = retrain_full(engine, kind="dot", valid_pct=0.0, progress=False, **FAST)
    td, _ = load_training_data(engine)
    with engine.connect() as conn:
        model = versions.load_model(conn, report["version"])
        ids, factors, bias = versions.trained_rows(conn, report["version"])
    assert model.item_meta is not None and len(model.item_meta["indptr"]) == model.n_items + 1
    again = TrainedModel.from_arrays(model.to_arrays())
    assert all(np.array_equal(again.item_meta[k], model.item_meta[k]) for k in model.item_meta)

    new = [{"genres": ["Alpha"], "year": 1990}, {"genres": ["Beta"], "year": 1985}]
    rows, ranker_rows = model.metadata_rows(new)
    grown = model.add_items(np.array([10_001, 10_002]), rows, ranker_rows)
    u = 0
    mine = td.data.users == u
    history = UserHistory({}, td.item_ids[td.data.items[mine]], td.data.ratings[mine],
                          newer=np.zeros(mine.sum(), bool), trained_row=(factors[u], float(bias[u])))
    user = grown.user_vector(history)
    X = dense_rows(grown.item_meta, np.arange(grown.n_items), grown.item_prior.W_.shape[0]).astype(np.float64)
    learned = td.data.items[mine]
    z = X[learned] @ (grown.item_prior.W_ @ factors[u]) + bias[u] + X[learned] @ grown.item_prior.w_
    resid = td.data.ratings[mine] - np.clip(sigmoid_range(z, *grown.rating.y_range), 1, 5)
    affinity = user_affinity(X[learned], resid, grown.config.metadata_affinity_shrink)
    assert np.allclose(user.meta_affinity, affinity, atol=1e-5) and np.abs(affinity).max() > 0.01

    plain = grown.rating.predict(user.vec, user.bias)
    expected = plain.astype(np.float64)
    added = np.arange(model.n_items, grown.n_items)
    expected[added] += grown.config.metadata_affinity_weight * item_term(X[added], affinity)
    assert np.allclose(grown.predict(user), np.clip(expected, 1, 5), atol=1e-4)
    assert np.array_equal(grown.predict(user)[:model.n_items], np.clip(plain[:model.n_items], 1, 5))
    off = replace(grown, config=replace(grown.config, metadata_affinity_weight=0.0))
    assert np.array_equal(off.predict(off.user_vector(history)), np.clip(plain, 1, 5))

    items = pd.DataFrame({"item": ["gamma-new"], "title": ["Alpha film new"],
                          "attributes": [{"genres": ["Alpha"], "year": 1990}]})
    one = pd.DataFrame([{"user": "a0", "item": "gamma-new", "rating": 5.0, "timestamp": 9}])
    ingest_dataset(engine, Dataset(one, items))
    out = retrain_incremental(engine)
    with engine.connect() as conn:
        after = versions.load_model(conn, out["version"])
    n_features = after.item_prior.W_.shape[0]
    assert len(after.item_meta["indptr"]) == after.n_items + 1
    assert np.array_equal(dense_rows(after.item_meta, [after.n_items - 1], n_features),
                          after.item_prior.encoder_.encode([{"genres": ["Alpha"], "year": 1990}]))
    # solved against its rater, the item's row is a fit of its own: no affinity on top of it
    rated = after.item_index([after.item_ids[-1]])
    assert after.item_counts[rated[0]] == 1
    assert after.user_vector(history).meta_affinity is None  # no item known from metadata alone: none computed
    beside = after.add_items(np.array([10_003]), *after.metadata_rows([{"genres": ["Beta"], "year": 1985}]))
    user = beside.user_vector(history)  # (one unrated item beside it: the affinity is computed)
    plain = np.clip(beside.rating.predict(user.vec, user.bias, rated), 1, 5)
    assert user.meta_affinity is not None and np.array_equal(beside.predict(user, rated), plain)
