"""Integration: planted structure in -> trained model -> recommendations and similar items that follow it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select

from cfb.cf_core.errors import CfbError
from cfb.db import versions
from cfb.db.schema import ModelArrays, Rating, UserFactors
from cfb.db.sources import Dataset
from cfb.service.incremental import retrain_auto, retrain_incremental
from cfb.service.ingest import ingest_dataset
from cfb.service.serving import biases, predict_pairs, recommend, similar
from cfb.service.training import retrain_full

from .conftest import FAST


def group_of(item: str) -> str:
    return item[0]


def test_ingest_counts_and_latest_rating_wins(engine, planted):
    out = ingest_dataset(engine, planted)
    assert out["ratings"] == len(planted.ratings)
    first = planted.ratings.iloc[0]
    again = pd.DataFrame([{"user": first["user"], "item": first["item"], "rating": 3.0, "timestamp": 5}])
    ingest_dataset(engine, Dataset(again))
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Rating)) == len(planted.ratings)
        assert conn.scalar(select(func.max(Rating.rating)).where(Rating.timestamp == 5)) == 3.0


def test_recommendations_follow_planted_groups(trained):
    engine, report = trained
    assert report["valid_rmse"] < 0.8  # the structure is learnable; noise is ~0.4
    with engine.connect() as conn:
        for user in ("a0", "b1", "a10", "b11"):
            rec = recommend(conn, user, n=5)
            assert [group_of(r["item"]) for r in rec["items"]] == [user[0]] * 5


def test_recommend_by_rating_is_sorted_by_predicted_rating(trained):
    engine, _ = trained
    with engine.connect() as conn:
        scores = [r["score"] for r in recommend(conn, "a0", n=8, by="rating")["items"]]
    assert scores == sorted(scores, reverse=True)


def test_recommend_excludes_rated_items(trained, planted):
    engine, _ = trained
    rated = set(planted.ratings.loc[planted.ratings.user == "a0", "item"])
    with engine.connect() as conn:
        rec = recommend(conn, "a0", n=40)
    assert rated.isdisjoint(r["item"] for r in rec["items"])
    assert len(rec["items"]) == 40 - len(rated)


def test_similar_items_share_the_group(trained):
    engine, _ = trained
    with engine.connect() as conn:
        out = similar(conn, "Alpha film 3", n=5)
    assert out["item"] == "a3"
    assert all(group_of(r["item"]) == "a" for r in out["items"])
    assert all(-1 <= r["score"] <= 1 for r in out["items"])


def test_similar_near_miss_suggests_titles(trained):
    engine, _ = trained
    with engine.connect() as conn, pytest.raises(CfbError, match="did you mean.*Alpha film 3"):
        similar(conn, "Alpha film 3x")


def test_predictions_and_biases(trained):
    engine, _ = trained
    with engine.connect() as conn:
        high, low = predict_pairs(conn, [("a0", "a1"), ("a0", "b30")])
        assert high > 3.5 > 2.5 > low
        out = biases(conn, n=3)
    assert len(out["lowest"]) == len(out["highest"]) == 3
    assert out["lowest"][0]["score"] <= out["highest"][0]["score"]


def test_unknown_user_and_item_are_clear_errors(trained):
    engine, _ = trained
    with engine.connect() as conn:
        with pytest.raises(CfbError, match="unknown user 'nobody'"):
            recommend(conn, "nobody")
        with pytest.raises(CfbError, match="unknown item"):
            predict_pairs(conn, [("a0", "zzz")])


def test_no_model_and_no_ratings_are_clear_errors(engine, planted):
    with pytest.raises(CfbError, match="no ratings"):
        from cfb.db.store import create_schema

        create_schema(engine)
        retrain_full(engine, progress=False)
    ingest_dataset(engine, planted)
    with engine.connect() as conn, pytest.raises(CfbError, match="no trained model"):
        recommend(conn, "a0")


def test_nn_model_trains_and_serves(engine, planted):
    ingest_dataset(engine, planted)
    report = retrain_full(engine, kind="nn", valid_pct=0.2, progress=False, **{**FAST, "epochs": 15})
    assert report["kind"] == "nn" and report["valid_rmse"] < 1.0
    with engine.connect() as conn:
        rec = recommend(conn, "a0", n=3)
    assert [group_of(r["item"]) for r in rec["items"]] == ["a"] * 3


def test_new_ratings_count_at_once_and_incremental_retrain_adds_only_new_items(trained):
    engine, report = trained
    with engine.connect() as conn:
        before = [r["item"] for r in recommend(conn, "b1", n=40)["items"]]
    new = pd.DataFrame([{"user": "b1", "item": before[0], "rating": 1.0, "timestamp": 9},
                        {"user": "b1", "item": "new-item", "rating": 4.0, "timestamp": 10},
                        {"user": "a0", "item": "new-item", "rating": 5.0, "timestamp": 11}])
    ingest_dataset(engine, Dataset(new))
    with engine.connect() as conn:  # no retrain needed for b1's own rating to count
        assert before[0] not in {r["item"] for r in recommend(conn, "b1", n=40)["items"]}
    out = retrain_incremental(engine)
    assert out["mode"] == "incremental" and out["parent"] == report["version"]
    assert out["users_with_new_ratings"] == 2 and out["items_added"] == 1
    with engine.connect() as conn:
        v = out["version"]
        assert conn.scalar(select(func.count()).select_from(UserFactors).where(UserFactors.version_id == v)) == 0
        assert conn.scalar(select(func.count()).select_from(ModelArrays).where(ModelArrays.version_id == v)) == 1
        assert versions.serving_version(conn) == v
        assert "new-item" in {r["item"] for r in recommend(conn, "b3", n=40)["items"]}
    # nothing new: no new version
    assert retrain_incremental(engine)["mode"] == "none"


def test_new_items_are_solved_alike_whatever_number_of_raters_is_read_at_once(trained, monkeypatch):
    import cfb.service.incremental as incremental
    from cfb.db import store
    from cfb.db.schema import Item
    from cfb.service.state import load_served

    engine, _ = trained
    new = pd.DataFrame([{"user": u, "item": i, "rating": r, "timestamp": 20}
                        for i, raters in (("n1", ("a0", "a1", "b1")), ("n2", ("b1", "b2", "a3", "a4")))
                        for u, r in zip(raters, (5.0, 4.0, 2.0, 1.0))])
    ingest_dataset(engine, Dataset(new))
    with engine.connect() as conn:
        served = load_served(conn)
        ids = np.array([store.id_map(conn, Item)[i] for i in ("n1", "n2")])
        prior = {"item_factors": np.zeros((2, served.model.rating.item_factors.shape[1]), np.float32),
                 "item_bias": np.zeros(2, np.float32)}
        prior_ranker = {"out": np.zeros((2, served.model.ranker.out_.shape[1]), np.float32),
                        "out_bias": np.zeros(2, np.float32)}
        together = incremental._fold_in_items(conn, served, ids, prior, prior_ranker)
        monkeypatch.setattr(incremental, "RATERS_AT_ONCE", 2)
        in_parts = incremental._fold_in_items(conn, served, ids, prior, prior_ranker)
    for rows, more in zip(together, in_parts):
        for name in rows:
            assert np.allclose(rows[name], more[name], atol=1e-6) and np.abs(rows[name]).max() > 1e-3  # (moved)


def test_drift_policy_triggers_full_retrain(trained, planted):
    engine, _ = trained
    shifted = planted.ratings.assign(rating=6 - planted.ratings.rating)  # everyone changes their mind
    ingest_dataset(engine, Dataset(shifted))
    out = retrain_auto(engine, valid_pct=0.2, progress=False)
    assert out["mode"] == "full" and "full retrain" in out["reason"]
    with engine.connect() as conn:
        rec = recommend(conn, "a0", n=5)
    assert [group_of(r["item"]) for r in rec["items"]] == ["b"] * 5


def test_a_drift_retrain_keeps_the_chosen_settings_not_a_small_sets_defaults():
    """A full retrain forced by drift keeps the settings chosen for the version it replaces, but not the
    defaults that scaled with that version's size: a set that started with 1,400 ratings (batch 32)
    and grew gets the batch for its new size."""
    from cfb.service.incremental import chosen_settings
    from cfb.cf_core.fit import rating_params

    small = {"kind": "dot", "metrics": {"n_ratings": 1_400}, "hyperparams": rating_params("dot", 1_400, {})}
    assert small["hyperparams"]["bs"] == 32 and chosen_settings(small) == {}
    chosen = {**small, "hyperparams": rating_params("dot", 1_400, {"epochs": 20, "n_factors": 16})}
    assert chosen_settings(chosen) == {"epochs": 20, "n_factors": 16}
    older = {**small, "metrics": {}}  # (a version that does not say its size: everything kept, as before)
    assert chosen_settings(older)["bs"] == 32


def test_too_few_ratings_to_validate_are_not_validated(engine):
    """A share of a handful of ratings that holds out none is no measurement: the report says so
    (it was NaN, stored in the version and refused by every JSON answer after)."""
    import json

    ratings = pd.DataFrame({"user": ["a", "b"], "item": ["x", "y"], "rating": [1.0, 5.0], "timestamp": [1, 2]})
    ingest_dataset(engine, Dataset(ratings, scale=(1.0, 5.0)))
    report = retrain_full(engine, valid_pct=0.2, progress=False, **FAST)
    assert report["n_valid"] == 0 and report["valid_mse"] is None and "holds out none" in report["valid_note"]
    report = retrain_full(engine, valid_pct=0.9999, progress=False, **FAST)
    assert report["n_valid"] == 2 and report["valid_mse"] is None and "leaves none to train on" in report["valid_note"]
    with engine.connect() as conn:
        json.dumps([report, versions.list_versions(conn)], allow_nan=False, default=str)


def test_rollback_serves_previous_version(trained):
    engine, report = trained
    second = retrain_full(engine, valid_pct=0.0, progress=False, **FAST)
    assert "valid_rmse" not in second
    with engine.begin() as conn:
        versions.set_serving(conn, report["version"])
    with engine.connect() as conn:
        assert versions.serving_version(conn) == report["version"]
        listed = versions.list_versions(conn)
    assert [v["serving"] for v in listed] == [True, False]


def test_bulk_first_ingest_stores_the_same_as_row_order(tmp_path, planted, monkeypatch):
    """The bulk path of a first large ingest (key order, indexes rebuilt) stores exactly what the
    ordinary path stores, seq (the write order) included."""
    from cfb.db import ratings_io
    from cfb.db.engine import make_engine

    tables = []
    for bulk_rows in (10**9, 10):
        monkeypatch.setattr(ratings_io, "BULK_ROWS", bulk_rows)
        engine = make_engine(f"sqlite:///{tmp_path / f'{bulk_rows}.db'}")
        ingest_dataset(engine, planted)
        with engine.connect() as conn:
            tables.append(conn.exec_driver_sql(
                "SELECT user_id, item_id, rating, timestamp, seq FROM ratings ORDER BY seq").all())
            indexes = {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"ix_ratings_seq", "ix_ratings_item_id"} <= indexes
        engine.dispose()
    assert tables[0] == tables[1] and len(tables[0]) == len(planted.ratings)


def test_a_new_item_with_metadata_and_no_rating_reaches_the_users_it_suits(engine, planted, tmp_path):
    """Bootstrapping an item: the full retrain learns metadata -> item rows (genre A is the a-group's,
    B the b-group's); an item ingested with genre A and no rating joins at the next `cfb retrain`
    and ranks high for a-users, low for b-users."""
    from cfb.service.ingest import upsert_items

    genre = {i: ("A" if i.startswith("a") else "B") for i in planted.items.item}
    items = planted.items.assign(attributes=[{"genres": [genre[i]], "year": 1990} for i in planted.items.item])
    ingest_dataset(engine, Dataset(planted.ratings, items, planted.users, planted.scale))
    report = retrain_full(engine, progress=False, **FAST)
    assert report["hyperparams"]["item_prior"]["attributes"] == ["genres", "year"]
    upsert_items(engine, pd.DataFrame({"item": ["newA"], "title": ["New Alpha"],
                                       "attributes": [{"genres": ["A"], "year": 1991}]}))
    out = retrain_incremental(engine)
    assert out["mode"] == "incremental" and out["items_from_metadata"] == 1 and out["new_ratings"] == 0
    with engine.connect() as conn:
        rank_a = [r["item"] for r in recommend(conn, "a0", n=40)["items"]].index("newA")
        rank_b = [r["item"] for r in recommend(conn, "b1", n=40)["items"]].index("newA")
        (before,) = predict_pairs(conn, [("b1", "newA")])
    assert rank_a < 8 < rank_b
    # its genre corrected before any rating: the next retrain starts it from the new metadata
    upsert_items(engine, pd.DataFrame({"item": ["newA"], "title": ["New Alpha"],
                                       "attributes": [{"genres": ["B"], "year": 1991}]}))
    out = retrain_incremental(engine)
    assert (out["mode"], out["items_metadata_changed"], out["items_resolved"]) == ("incremental", 1, 1)
    with engine.connect() as conn:
        ranks = [[r["item"] for r in recommend(conn, u, n=40)["items"]].index("newA") for u in ("a0", "b1")]
    assert ranks[1] < 8 < ranks[0]
    assert retrain_incremental(engine)["mode"] == "none"  # (nothing changed since)
    upsert_items(engine, pd.DataFrame({"item": ["newA"], "title": ["New Alpha"],
                                       "attributes": [{"genres": ["A"], "year": 1991}]}))
    assert retrain_incremental(engine)["items_metadata_changed"] == 1
    with engine.connect() as conn:
        assert [r["item"] for r in recommend(conn, "a0", n=40)["items"]].index("newA") == rank_a
    # its ratings then fold it in (from its metadata row, every rating once): b-users love it after all
    ingest_dataset(engine, Dataset(pd.DataFrame([{"user": f"b{k}", "item": "newA", "rating": 5.0, "timestamp": k}
                                                 for k in range(1, 40, 2)])))
    out = retrain_incremental(engine)
    assert out["items_resolved"] == 1 and out["items_added"] == 0
    with engine.connect() as conn:
        (after,) = predict_pairs(conn, [("b3", "newA")])
    assert after > before + 0.5


def test_ratings_written_again_are_not_new_and_statistics_stay_exact(trained, planted):
    """The same file ingested again moves no seq (nothing is new to the model); a changed rating is
    new once, and the item statistics are the table's, not a running sum."""
    from cfb.service.state import load_served

    engine, _ = trained
    ingest_dataset(engine, planted)
    assert retrain_incremental(engine)["mode"] == "none"
    first = planted.ratings.iloc[0]
    ingest_dataset(engine, Dataset(pd.DataFrame([{**first.to_dict(), "rating": 6 - first["rating"]}])))
    out = retrain_incremental(engine)
    assert out["new_ratings"] == 1
    with engine.connect() as conn:
        model = load_served(conn).model
        stored = conn.scalar(select(func.sum(Rating.rating)))
    assert model.item_counts.sum() == len(planted.ratings) and model.item_sums.sum() == pytest.approx(stored)


def test_a_last_batch_of_one_rating_joins_the_one_before_it(engine, planted):
    """fastai's EmbeddingNN has a BatchNorm, which refuses a training batch of one row: 1,440 planted
    ratings in batches of 1,439 trained the nn model into a traceback. Every rating is still learned."""
    import torch

    from cfb.cf_core.loader import TensorBatches

    for n, bs in ((1440, 1439), (10, 3), (9, 3), (1, 4)):
        batches = TensorBatches(torch.arange(2 * n).reshape(n, 2), torch.arange(n), bs, shuffle=True,
                                generator=torch.Generator().manual_seed(0))
        sizes = [len(y) for _, y in batches]
        assert len(batches) == len(sizes) and sum(sizes) == n and (min(sizes) > 1 or n == 1), (n, bs, sizes)
        assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(n))
    ingest_dataset(engine, planted)
    report = retrain_full(engine, kind="nn", progress=False, **{**FAST, "bs": len(planted.ratings) - 1, "epochs": 2})
    assert report["kind"] == "nn"


def test_a_validation_split_that_leaves_the_nn_model_one_rating_is_not_measured(planted):
    """§7 measures on a split; one that leaves the nn model a single training rating is skipped with a
    note, as one that leaves none is (it was refused as if the database held one rating)."""
    from cfb.cf_core.data import CollabData
    from cfb.cf_core.fit import TrainingData, validate

    r = planted.ratings.head(4)
    users, items = pd.factorize(r.user)[0], pd.factorize(r.item)[0]
    td = TrainingData(CollabData(users, items, r.rating.to_numpy(np.float32), users.max() + 1, items.max() + 1),
                      np.arange(users.max() + 1), np.arange(items.max() + 1), r.timestamp.to_numpy(float),
                      [{}] * (users.max() + 1), (1.0, 5.0), 4)
    out = validate(td, "nn", {}, 0.7, 42, progress=False)
    assert out["valid_mse"] is None and out["valid_note"] == "4 ratings: a 0.7 share leaves the nn model 1 rating to train on"


def test_nn_incremental_retrain_adds_a_first_rated_item(engine, planted):
    ingest_dataset(engine, planted)
    retrain_full(engine, kind="nn", progress=False, **FAST)
    ingest_dataset(engine, Dataset(pd.DataFrame([{"user": "a0", "item": "brand-new", "rating": 5.0, "timestamp": 1}])))
    out = retrain_incremental(engine)
    assert out["mode"] == "incremental" and out["items_added"] == 1
    with engine.connect() as conn:
        assert "brand-new" in {r["item"] for r in recommend(conn, "b1", n=40)["items"]}


def test_rating_defaults_scale_with_the_data_and_keep_the_tuned_ones_on_100k():
    from cfb.cf_core.fit import DEFAULTS, MAX_BATCH_SCALE, rating_params

    assert rating_params("dot", 80_000, {}) == DEFAULTS["dot"]  # MovieLens 100k's training split
    mid = rating_params("dot", 1_000_000, {})  # ×16: 2^round(log2(12.5))
    assert (mid["bs"], mid["epochs"]) == (16 * 1024, 3) and mid["lr"] == pytest.approx(5e-3 * 4)
    big = rating_params("dot", 25_000_000, {"epochs": 5})
    assert big["bs"] == MAX_BATCH_SCALE * 1024 and big["epochs"] == 5  # capped; the user's setting wins
    small = rating_params("dot", 10_000, {})  # ×1/8: as many steps an epoch, the same learning rate
    assert (small["bs"], small["epochs"], small["lr"]) == (128, 8, 5e-3)
    assert rating_params("dot", 1_400, {})["bs"] == rating_params("nn", 1_400, {})["bs"] == 32  # (at least)


def test_inner_indices_of_whole_number_ids_match_a_sorted_unique():
    from cfb.cf_core.data import index_ids

    rng = np.random.default_rng(0)
    for ids in (rng.integers(1, 500, 2_000), np.array([7, 3, 7, 10**12]), np.array(["b", "a", "b"])):
        uniq, inner = index_ids(ids)
        want_uniq, want_inner = np.unique(ids, return_inverse=True)
        assert np.array_equal(uniq, want_uniq) and np.array_equal(inner, want_inner) and inner.dtype == np.int64


def test_the_ranker_trained_beside_the_rating_model_is_the_one_trained_after_it(engine, planted, monkeypatch):
    from cfb.cf_core import fit
    from cfb.service import training

    planted.items["attributes"] = [{"genres": [str(i)[0]], "year": 1950 + k % 40}  # so the item prior is fitted,
                                   for k, i in enumerate(planted.items["item"])]  # on user vectors made beside
    ingest_dataset(engine, planted)
    td, _ = training.load_training_data(engine)
    in_turn, report = fit.fit_model(td, "dot", FAST, progress=False)  # the tests run torch on one thread
    monkeypatch.setattr(fit, "SIDE_BY_SIDE_AT", 1)  # any size: the ranker in its own process
    beside, report_beside = fit.fit_model(td, "dot", FAST, progress=False)
    assert report_beside.get("side_by_side") and "side_by_side" not in report
    a, b = in_turn.ranker.to_arrays(), beside.ranker.to_arrays()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert np.array_equal(in_turn.user_factors, beside.user_factors)
    assert in_turn.item_prior is not None and beside.item_prior is not None
    a, b = in_turn.item_prior.to_arrays(), beside.item_prior.to_arrays()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_full_retrain_at_size_starts_its_side_process_before_reading(engine, planted, monkeypatch):
    """From SIDE_BY_SIDE_AT ratings the ranker's process is spawned before the ratings are read (its
    imports overlap the read), trains beside the rating model, and the version serves."""
    from cfb.cf_core import fit
    from cfb.service import training

    events = []
    start, load = fit.SideProcess.__init__, training.load_training_data
    monkeypatch.setattr(fit.SideProcess, "__init__", lambda self: (events.append("side"), start(self))[1])
    monkeypatch.setattr(training, "load_training_data", lambda e: (events.append("read"), load(e))[1])
    monkeypatch.setattr(fit, "SIDE_BY_SIDE_AT", 1)
    ingest_dataset(engine, planted)
    out = training.retrain_full(engine, progress=False, **FAST)
    assert events == ["side", "read"] and out["side_by_side"] and out["serving"]
    with engine.connect() as conn:
        assert recommend(conn, "a0", 5)["items"]


def test_a_side_process_is_closed_when_unused_and_never_waited_on_forever(engine, planted, monkeypatch):
    """When the side process sees a GPU the ranker trains in the retrain's own process and the side
    process ends at once; a side process that never says which device it sees (it died in its imports)
    is waited on for ``WARM_UP_WAIT_S`` only."""
    import time

    from cfb.cf_core import fit
    from cfb.service import training

    ingest_dataset(engine, planted)
    td, _ = training.load_training_data(engine)
    monkeypatch.setattr(fit, "SIDE_BY_SIDE_AT", 1)
    side = fit.SideProcess()
    try:
        monkeypatch.setattr(side, "device", lambda: "cuda")
        _, report = fit.fit_model(td, "dot", FAST, progress=False, side=side)
        assert side.pool is None and "side_by_side" not in report and report["ranker_fit_s"] > 0
    finally:
        side.close()
    monkeypatch.setattr(fit, "WARM_UP_WAIT_S", 0.5)
    side = fit.SideProcess()
    try:
        side._warmed = side.pool.apply_async(time.sleep, (30,))  # no answer in time
        t0 = time.perf_counter()
        assert side.device() == "cpu" and time.perf_counter() - t0 < 10
    finally:
        side.close()


@pytest.mark.parametrize("kind", ["dot", "nn"])
@pytest.mark.parametrize("lr, message", [
    (1e6, r"^training diverged \(non-finite loss at epoch \d+ of 12\); lower the learning rate \(--lr, now 1e\+06\)$"),
    (50.0, r"^training diverged or stalled \(training MSE \d+\.\d{4} is over 1\.1 × the variance \d\.\d{4} of the "
          r"training ratings: clearly worse than predicting their mean\); lower the learning rate \(--lr, now 50\)"),
    (1e39, r"^training diverged \(a step overflowed float32\); lower the learning rate \(--lr, now 1e\+39\)$"),
    (1e-300, r"^training stalled \(its weights did not move in 12 epochs, and its MSE \d\.\d{4} is no better than the "
             r"variance \d\.\d{4} of the training ratings\); raise the learning rate \(--lr, now 1e-300\)$"),
])
def test_a_diverging_retrain_is_refused_and_the_previous_version_serves(trained, kind, lr, message):
    """A learning rate that blows the weights up to NaN (1e6), or leaves a model worse than the mean
    rating (50: far past what trains, on any CPU), is a one-line error raised before anything is stored: the trained version keeps serving."""
    from cfb.cf_core.train import TrainingDiverged

    engine, report = trained
    with engine.connect() as conn:
        before = versions.list_versions(conn)
    with pytest.raises(TrainingDiverged, match=message):
        retrain_full(engine, kind=kind, valid_pct=0.0, progress=False, **{**FAST, "lr": lr})
    with pytest.raises(TrainingDiverged, match=message.split(";")[0]):  # the §7 measurement refuses it too
        retrain_full(engine, kind=kind, valid_pct=0.2, progress=False, **{**FAST, "lr": lr})
    with engine.connect() as conn:
        assert versions.list_versions(conn) == before
        assert versions.serving_version(conn) == report["version"]
        assert len(recommend(conn, "a0", n=3)["items"]) == 3


def test_a_tiny_set_that_trains_too_few_steps_is_told_to_train_more(engine):
    """Four ratings (three in the §7 split's training part) are one step an epoch: eight epochs end
    worse than the mean while the loss is still falling. That is an undertrained fit, not a diverged one: the error says to train more (or faster),
    not to lower the learning rate, and more epochs train it."""
    from cfb.cf_core.train import TrainingDiverged

    ingest_dataset(engine, Dataset(pd.DataFrame({"user": list("abcd"), "item": ["x"] * 4,
                                                 "rating": [5.0, 3.0, 4.0, 1.0], "timestamp": [1, 2, 3, 4]})))
    with pytest.raises(TrainingDiverged, match=r"^training stopped short \(training MSE \d\.\d{4} is over 1\.1 × the "
                                               r"variance \d\.\d{4} of the training ratings, though down from \d\.\d{4} "
                                               r"on its first batch: it was still learning\); train more epochs "
                                               r"\(--epochs, now 8\) or raise the learning rate \(--lr, now 0\.005\)$"):
        retrain_full(engine, valid_pct=0.2, progress=False)
    assert retrain_full(engine, valid_pct=0.2, progress=False, epochs=60)["version"] == 1


def test_a_weight_decay_that_diverges_is_named(trained):
    from cfb.cf_core.train import TrainingDiverged

    engine, _ = trained
    with pytest.raises(TrainingDiverged, match=r"lower the learning rate \(--lr, now [\d.e+-]+\) or the weight decay "
                                               r"\(--wd, now 1e\+09\)"):
        retrain_full(engine, valid_pct=0.0, progress=False, **{**FAST, "wd": 1e9})


@pytest.mark.parametrize("kind", ["dot", "nn"])
def test_non_finite_learned_weights_are_refused(planted, kind):
    from cfb.cf_core.data import CollabData, default_y_range, index_ids
    from cfb.cf_core.train import MODELS, TrainingDiverged

    r = planted.ratings
    (users, u), (items, i) = index_ids(r.user.to_numpy()), index_ids(r.item.to_numpy())
    data = CollabData(u, i, r.rating.to_numpy(), len(users), len(items))
    est = MODELS[kind](y_range=default_y_range(1, 5), progress=False, **FAST).fit(data)
    est._check_learned(data)  # a good fit passes
    arrays = est._learned_arrays()
    arrays[-1].flat[0] = float("inf")  # the NN: a weight of its head; the dot model: an item bias
    with pytest.raises(TrainingDiverged, match=r"^training diverged \(non-finite learned weights\)"):
        est._check_learned(data)


def test_python_api_refuses_plainly(trained, db_url, tmp_path):
    """`Database` methods refuse bad arguments with messages in Python's terms, nothing written."""
    import cfb

    from cfb.db.schema import Item, User

    engine, _ = trained
    with engine.connect() as conn:
        users = conn.scalar(select(func.count()).select_from(User))
    with cfb.open(db_url) as db:
        with pytest.raises(cfb.CfbError, match=r"^n must be a whole number from 1 to 1000, got 0$"):
            db.similar("a1", n=0)
        with pytest.raises(cfb.CfbError, match=r"^n must be a whole number from 1 to 1000, got 0$"):
            db.recommend("a0", n=0)  # (as before: the two agree)
        with pytest.raises(cfb.CfbError, match=r"^n must be a whole number from 1 to 1000, got 0$"):
            db.biases(n=0)
        for bad in ("x", ["x"], [{"answers": {"gender": "F"}}, 3]):
            where = "entry 2" if isinstance(bad, list) and len(bad) == 2 else "entry 1"
            with pytest.raises(cfb.CfbError, match=rf"^{where}: a signup must be a dict") as e:
                db.onboard(bad)
            assert "unknown key" not in str(e.value)
        for full in (True, False):
            with pytest.raises(cfb.CfbError, match=r"^valid_pct must be a number in \[0, 1\), got 2$") as e:
                db.retrain(full=full, valid_pct=2)
            assert "--valid-pct" not in str(e.value)
        with pytest.raises(cfb.InputError, match=r"^n_factors only applies to a full retrain"):
            db.retrain(n_factors=3)
        with pytest.raises(cfb.InputError, match=r"^kind, n_factors only apply to a full retrain"):
            db.retrain(kind="nn", n_factors=3)
        # the settings `cfb retrain --full` checks, checked before anything trains
        for full in (True, False):
            for bad, message in [({"n_factors": 0}, r"n_factors must be a whole number from 1 to 1024, got 0"),
                                 ({"n_factors": 2.5}, r"n_factors must be a whole number from 1 to 1024, got 2.5"),
                                 ({"epochs": True}, r"epochs must be a whole number from 1 to 1000, got True"),
                                 ({"lr": 0}, r"lr must be a finite number above 0, got 0"),
                                 ({"wd": float("nan")}, r"wd must be a finite number from 0, got nan"),
                                 ({"seed": -1}, r"seed must be a whole number from 0 to 4294967295, got -1"),
                                 ({"bs": 10**400}, r"bs must be a whole number from 1 to 1048576, got 1000000"),
                                 ({"factors": 8}, r"unknown training setting\(s\) factors \(settings: kind, n_factors"),
                                 ({"kind": "svd"}, r"kind must be 'dot' or 'nn', got 'svd'")]:
                with pytest.raises(cfb.CfbError, match="^" + message):
                    db.retrain(full=full, **bad)
        for bad in ("no", 1, None):  # (a truthy word would train a full version)
            with pytest.raises(cfb.CfbError, match=rf"^full must be True or False, got {bad!r}$"):
                db.retrain(full=bad)
        user = db.onboard({"answers": {"age": np.int64(30)}, "ratings": {"a1": np.float32(4)}})  # numpy, as pandas gives
        for bad in (True, None, "4"):
            with pytest.raises(cfb.CfbError, match=rf"^rating must be a number, got {bad!r}$"):
                db.rate(user, "a2", bad)
        with pytest.raises(cfb.CfbError, match=r"^rating must be a finite number, got a number of 401 digits$"):
            db.rate(user, "a2", 10**400)
        for bad in (True, "1", 1.0):
            with pytest.raises(cfb.CfbError, match=rf"^version must be a whole number, got {bad!r}$"):
                db.rollback(bad)
        for bad in (0, 2**63):  # (2**63 escaped as the driver's OverflowError)
            with pytest.raises(cfb.CfbError, match=rf"^version must be a whole number from 1 to 2147483647, got {bad}$"):
                db.rollback(bad)
        assert db.predict(pd.DataFrame({"user": [user], "item": ["a1"]})) == db.predict([(user, "a1")])
        for bad, message in [(pd.DataFrame({"u": [user]}), r"pairs: a DataFrame needs columns user and item, has u"),
                             ("pairs.csv", r"pairs must be \(user, item\) pairs"),
                             ([(user, "a1", "x")], r"pairs: entry 1 must be one \(user, item\) pair"),
                             (pd.DataFrame({"user": [1, None], "item": ["a1", "a2"]}), r"pairs: row 2 has no user$")]:
            with pytest.raises(cfb.CfbError, match="^" + message):
                db.predict(bad)
        assert len(db.models()) == 1
        assert db.models()["created"][0].endswith("+00:00")  # (UTC, said, as PostgreSQL's)
        # every argument the CLI checks as an option, checked before anything runs or is written
        for call, message in [
                (lambda: db.retrain(valid_pct=0.5), r"valid_pct only applies to a full retrain"),
                (lambda: db.retrain(progress="x"), r"progress must be True or False, got 'x'$"),
                (lambda: db.retrain(drift_limit=1.5), r"^drift_limit must be a number from 0 to 1, got 1.5$"),
                (lambda: db.retrain(drift_limit=float("nan")), r"^drift_limit must be a number from 0 to 1"),
                (lambda: db.retrain(drift_limit="0.5"), r"^drift_limit must be a number from 0 to 1, got '0.5'$"),
                (lambda: db.retrain(full=True, drift_limit=0.5), r"^drift_limit decides when a retrain without"),
                (lambda: db.biases(min_ratings=-1), r"min_ratings must be a whole number from 0, got -1$"),
                (lambda: db.biases(min_ratings="5"), r"min_ratings must be a whole number from 0, got '5'$"),
                (lambda: db.questionnaire(2.0), r"budget .* must be a whole number from 0 to 30, got 2.0$"),
                (lambda: db.questionnaire(True), r"budget .* got True$"),
                (lambda: db.pca(n=1), r"n must be a whole number from 2 to 100000, got 1$"),
                (lambda: db.pca(n=2.5), r"n must be a whole number from 2 to 100000, got 2.5$"),
                (lambda: db.pca(n=5, plot=str(tmp_path)), r"the plot is a PNG, give a file name ending in .png$"),
                (lambda: db.pca(n=5, plot=tmp_path / "map.txt"), r"the plot is a PNG"),
                (lambda: db.pca(n=5, plot=tmp_path / "no" / "map.png"), r"^cannot write .*map.png"),
                (lambda: db.serve(port=70000), r"port must be a whole number from 0 to 65535, got 70000$"),
                (lambda: db.serve(host=5), r"host must be a host name or address, got 5$"),
                (lambda: db.serve(token=123), r"token must be non-empty text \(or None: no token\), got 123$"),
                (lambda: db.app(token=""), r"token must be non-empty text"),
                # ids: text or whole numbers, never None, a float, a list or text no database can store
                (lambda: db.rate(user, None, 4, new_item=True), r"^item must be an id \(text or a whole number\), "
                                                                r"got NoneType None$"),
                (lambda: db.rate(user, float("nan"), 4, new_item=True), r"^item must be an id .*got float nan$"),
                (lambda: db.rate(user, ["a", "b"], 4, new_item=True), r"^item must be an id .*got list"),
                (lambda: db.rate(user, "made", 4, new_item="no"), r"^new_item must be True or False, got 'no'$"),
                (lambda: db.rate(None, "a1", 5), r"^user must be an id"),
                (lambda: db.rate("a\udc00", "a1", 4), r"^user 'a\\udc00' is not valid Unicode text$"),
                (lambda: db.recommend(None), r"^user must be an id"),
                (lambda: db.similar(1.5), r"^item must be an id .*got float 1.5$"),
                (lambda: db.predict([(True, "a1")]), r"^pairs: entry 1's user must be an id .*got bool True$"),
                (lambda: db.onboard({"user": "u\ud800"}), r"^entry 1, field 'user': 'u\\ud800' is not valid Unicode"),
                # keys given from Python as numbers are named as text (they raised a TypeError)
                (lambda: db.onboard({"answers": {7: 4}}), r"^entry 1, field 'answers.7': unknown attribute"),
                (lambda: db.onboard({"ratings": {10**60: 4}}), r"^entry 1, field 'ratings.10{31}\.\.\.': "
                                                                r"unknown item"),
                (lambda: db.onboard({"answers": {"gender": "F\ud800"}}), r"^entry 1, field 'answers.gender': "),
                (lambda: db.ingest_movielens(None), r"^folder must be a path, got NoneType None$"),
                (lambda: db.ingest_movielens(tmp_path / "nowhere"), r"nowhere: folder not found$"),
                (lambda: db.ingest_ratings(tmp_path / "r.csv", user_col=5), r"^user_col must be a column's name, got int 5$"),
                (lambda: db.ingest_ratings(tmp_path / "r.csv", item_col=None), r"^item_col must be a column's name"),
                (lambda: db.ingest_ratings(tmp_path / "r.csv", rating_col=["x"]), r"^rating_col must be a column's name"),
                (lambda: db.ingest_ratings(tmp_path / "r.csv", time_col=3), r"^time_col must be a column's name"),
                (lambda: db.ingest_users(tmp_path / "r.csv", user_col=1), r"^user_col must be a column's name"),
                (lambda: cfb.open(5), r"^url must be a database URL or a SQLite file's path, got int 5$")]:
            with pytest.raises(cfb.InputError, match=message):  # (README: each refusal of bad input an InputError)
                call()
        assert not list(tmp_path.glob("*.png")) and len(db.models()) == 1
        # as `cfb retrain --drift-limit`: the onboarded user's rating is drift, and a limit of 0 makes it full
        assert db.retrain(drift_limit=np.float64(1.0))["mode"] == "incremental"
        db.rate(user, "a2", 5)
        assert db.retrain(drift_limit=0.0)["mode"] == "full"
        assert db.models()["parent"].tolist()[:2] == [pd.NA, 1]  # (whole numbers, or missing, at any count)
    # closed (here by the with block) it refuses, as a closed file does; it went on working before
    assert db.closed
    for call in (lambda: db.recommend(user), lambda: db.models(), lambda: db.retrain(full=False)):
        with pytest.raises(cfb.CfbError, match=r"^this cfb.Database is closed: open it again with cfb.open\(url\)$"):
            call()
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(User)) == users + 1
        assert conn.scalar(select(func.count()).select_from(Item).where(Item.external_id.in_(["None", "nan", "made"]))) == 0


def test_a_changed_rating_brings_the_value_the_full_retrain_learned(trained):
    """The history a trained user is served from says, for a pair changed since the full retrain, the
    value that retrain learned (the row it replaced), so the change is folded in as a change; changed
    again, that value comes from the log of replaced rows. Pairs new since, and unchanged ones, have
    none; a database from before the log (its pair changed twice before it) has none either."""

    from cfb.db import store
    from cfb.db.engine import writing
    from cfb.service.ratings import rate_item
    from cfb.service.state import load_served, user_history

    engine, _ = trained
    with engine.connect() as conn:
        uid = store.user_id_of(conn, "a0")
        items, ratings = store.user_ratings_replaced(conn, uid)[:2]
        first = store.item_titles(conn, [int(items[0])])[int(items[0])][0]
    new_value = 1.0 if ratings[0] >= 3 else 5.0
    rate_item(engine, "a0", first, new_value)
    with engine.connect() as conn:
        h = user_history(conn, load_served(conn), uid)
    changed = h.items == items[0]
    assert h.ratings[changed][0] == new_value and h.learned_values[changed][0] == ratings[0]
    assert np.isnan(h.learned_values[~changed]).all() and h.newer[changed].all()
    for again in (3.0, 2.0):
        rate_item(engine, "a0", first, again)
        with engine.connect() as conn:
            h = user_history(conn, load_served(conn), uid)
        assert h.ratings[changed][0] == again and h.learned_values[changed][0] == ratings[0]
        assert np.isnan(h.learned_values[~changed]).all()
    with writing(engine) as conn:  # as a database whose pair was changed twice before the log began
        conn.exec_driver_sql("DROP TRIGGER ratings_keep_replaced")
        conn.exec_driver_sql("DROP TABLE replaced_ratings")
    with engine.connect() as conn:
        h = user_history(conn, load_served(conn), uid)
    assert np.isnan(h.learned_values).all()


def test_python_api_bad_arguments_are_input_errors(trained, db_url, tmp_path):
    """``cfb.InputError`` is bad input: an argument refused by one method is one in every method (a rating
    off the scale was a plain ``CfbError`` from ``rate`` and an ``InputError`` from ``onboard``); a numpy
    array where one value belongs is refused (it escaped as numpy's ``ValueError``, or a one-element
    array was taken for its value); ``rollback`` returns what `cfb rollback --json` prints."""
    from pathlib import PurePosixPath

    import cfb

    with cfb.open(db_url) as db:
        user = db.onboard({"answers": {}})
        before = db.recommend(user)
        for call in (lambda: db.rate(user, "a2", float("nan")), lambda: db.rate(user, "a2", 7),
                     lambda: db.rate(user, "a2", "4"), lambda: db.recommend(user, n=-1),
                     lambda: db.retrain(full=True, n_factors=0), lambda: db.rollback(0),
                     lambda: db.onboard({"ratings": {"a1": 9}}), lambda: db.questionnaire(-1)):
            with pytest.raises(cfb.InputError):
                call()
        for call, name in ((lambda: db.rate(user, "a2", np.array([4.0, 5.0])), "rating"),
                           (lambda: db.rate(user, "a2", np.array([4.0])), "rating"),
                           (lambda: db.recommend(np.array(["a0", "b1"])), "user"),
                           (lambda: db.rollback(np.array([1])), "version"),
                           (lambda: db.onboard({"ratings": {"a1": np.array([4.0])}}), r"entry 1\.ratings\.a1")):
            with pytest.raises(cfb.InputError, match=rf"^{name}: expected one value, got a numpy array of shape \(\d\,\)$"):
                call()
        for call, what in ((lambda: db.recommend(" "), "empty user id"), (lambda: db.ratings(""), "empty user id"),
                           (lambda: db.recommend(pd.Series([1, 2])), "user must be an id")):
            with pytest.raises(cfb.InputError, match=what) as caught:  # (one line: a Series' repr has several)
                call()
            assert "\n" not in str(caught.value)
        assert db.recommend(user).equals(before)  # (nothing written)
        db.rate(user, "a2", np.float32(4))  # (a numpy scalar is one value)
        assert db.rollback(np.int64(1)) == {"serving": 1}
        assert len(db.pca(n=5, plot=PurePosixPath(tmp_path / "map.png"))) == 5 and (tmp_path / "map.png").exists()


def test_learned_biases_leave_out_items_nobody_rated_unless_asked(engine, planted):
    """Chapter 8's lowest / highest biases are learned from ratings: an item known from its metadata
    alone (its bias a guess from its genre) is listed only with min_ratings=0; each says its ratings."""
    from cfb.service.ingest import upsert_items
    from cfb.service.serving import biases

    genre = {i: ("A" if i.startswith("a") else "B") for i in planted.items.item}
    items = planted.items.assign(attributes=[{"genres": [genre[i]], "year": 1990} for i in planted.items.item])
    ingest_dataset(engine, Dataset(planted.ratings, items, planted.users, planted.scale))
    retrain_full(engine, progress=False, **FAST)
    upsert_items(engine, pd.DataFrame({"item": ["newA"], "title": ["New Alpha"],
                                       "attributes": [{"genres": ["A"], "year": 1991}]}))
    assert retrain_incremental(engine)["items_from_metadata"] == 1
    with engine.connect() as conn:
        default, every = biases(conn, n=40), biases(conn, n=41, min_ratings=0)
    listed = lambda out: [r["item"] for r in out["lowest"]]  # noqa: E731
    assert "newA" not in listed(default) and len(listed(default)) == 40 and "newA" in listed(every)
    counts = planted.ratings.item.value_counts()
    assert all(r["ratings"] == (counts[r["item"]] if r["item"] != "newA" else 0) for r in every["highest"])


def test_items_similar_to_one_known_from_metadata_alone_are_those_its_metadata_is_like(engine, planted):
    """`cfb similar` on an item known from metadata alone compares every item's factors from metadata (the
    path taken; on MovieLens 100k, where the prior's rows lay new items nearer each other than any learned
    item, tests/test_movielens.py): its own genre's learned items come first, the other new item not."""
    from cfb.service.ingest import upsert_items
    from cfb.service.serving import similar

    genre = {i: ("A" if i.startswith("a") else "B") for i in planted.items.item}
    items = planted.items.assign(attributes=[{"genres": [genre[i]], "year": 1990} for i in planted.items.item])
    ingest_dataset(engine, Dataset(planted.ratings, items, planted.users, planted.scale))
    retrain_full(engine, progress=False, **FAST)
    upsert_items(engine, pd.DataFrame({"item": ["newA", "newB"], "title": ["New Alpha", "New Beta"],
                                       "attributes": [{"genres": ["A"], "year": 1991}, {"genres": ["B"], "year": 1991}]}))
    assert retrain_incremental(engine)["items_from_metadata"] == 2
    with engine.connect() as conn:
        near = [r["item"] for r in similar(conn, "newA", n=10)["items"]]
        learned = [r["item"] for r in similar(conn, "a1", n=10)["items"]]
    assert "newB" not in near and all(genre.get(i) == "A" for i in near), near
    assert sum(i.startswith("a") for i in learned) >= 8  # (a learned item: its own factors, as before)


def test_a_handle_opened_by_a_relative_sqlite_url_keeps_its_file(trained, tmp_path, monkeypatch):
    """``cfb.open("sqlite:///cfb.db")`` then a change of working directory: the handle read "no database
    at cfb.db" and an ingest made a second, empty database in the new directory."""
    import cfb

    monkeypatch.chdir(tmp_path)  # (the trained database is tmp_path / "cfb.db")
    with cfb.open("sqlite:///cfb.db") as db:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        assert len(db.recommend("a0", n=3)) == 3
        assert db.url == f"sqlite:///{tmp_path / 'cfb.db'}"
    assert not (elsewhere / "cfb.db").exists()


def test_python_api_errors_are_the_kinds_it_documents(trained, db_url):
    """An unknown model version is an unknown id (it was a bare CfbError); an unknown item among a sign-up's
    answers is bad input to the sign-up (InputError, 422 over HTTP), as the docs now say."""
    import cfb

    with cfb.open(db_url) as db:
        with pytest.raises(cfb.UnknownIdError, match=r"^no model version 99$") as e:
            db.rollback(99)
        assert e.value.field == "version"
        with pytest.raises(cfb.InputError, match=r"field 'ratings.nope': unknown item"):
            db.onboard({"ratings": {"nope": 4}})
        with pytest.raises(cfb.UnknownIdError):
            db.rate("a0", "nope", 4)


def test_an_errors_class_says_what_kind_of_problem_it_is(tmp_path):
    """Errors a caller catches by kind: a retrain with items and no ratings is not ready (it was the plain
    CfbError), and a scale other than the database's or a token no header can carry is bad input."""
    import cfb

    (tmp_path / "items.csv").write_text("item,title\ni1,One\n")
    (tmp_path / "r.csv").write_text("user,item,rating\nu1,i1,4\nu2,i1,3\n")
    with cfb.open(f"sqlite:///{tmp_path / 'x.db'}") as db:
        db.ingest_items(tmp_path / "items.csv")
        with pytest.raises(cfb.NotReadyError, match="no ratings in the database"):
            db.retrain(full=True)
        db.ingest_ratings(tmp_path / "r.csv", scale=(1, 5))
        with pytest.raises(cfb.InputError, match=r"rating scale is 1..5, not 0..10"):
            db.ingest_ratings(tmp_path / "r.csv", scale=(0, 10))
        with pytest.raises(cfb.InputError, match="printable ASCII"):
            db.app(token="tökén")
