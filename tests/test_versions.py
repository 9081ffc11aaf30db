"""The served model is right: it learns from every rating, keeps ids stable across versions, folds
in honestly, and onboarding never edits a stored version (issue: one trained-model object)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select

from cfb.cf_core.errors import CfbError
from cfb.cf_core.model import UserHistory
from cfb.db import ratings_io, store, versions
from cfb.db.engine import writing
from cfb.db.schema import Item, ModelArrays, ModelVersion, Rating, Setting, UserFactors
from cfb.db.sources import Dataset
from cfb.service.incremental import retrain_incremental
from cfb.service.ingest import ingest_dataset
from cfb.service.onboard import onboard, questionnaire_json
from cfb.service.ratings import rate_item
from cfb.service.state import learned_values, load_served, user_vector
from cfb.service.training import retrain_full

from .conftest import FAST
from .test_concurrency import plant_lock


def test_served_model_learns_from_every_rating(trained, planted):
    """Validation is a measurement: the served version is refit on every rating, so every user
    with ratings has a trained row and every rating is counted."""
    engine, report = trained
    assert report["valid_pct"] == 0.2 and report["valid_rmse"] is not None
    assert report["n_ratings"] == len(planted.ratings)
    with engine.connect() as conn:
        ids, _, _ = versions.trained_rows(conn, report["version"])
        model = load_served(conn).model
    assert len(ids) == planted.ratings.user.nunique()
    assert model.item_counts.sum() == len(planted.ratings)


def test_questionnaire_and_answers_survive_an_item_with_a_lower_id(engine, planted):
    """An item that had no ratings at the full retrain (so a low database id outside the model)
    gets its first rating: the next version's questionnaire asks the same items, and the same
    answers give the same prior."""
    unrated = pd.DataFrame({"item": ["aaa-first"], "title": ["First film"], "attributes": [{}]})
    ingest_dataset(engine, Dataset(planted.ratings, pd.concat([unrated, planted.items]), planted.users, planted.scale))
    retrain_full(engine, progress=False, **FAST)
    with engine.connect() as conn:
        before = questionnaire_json(conn, 30)["items"]
        served = load_served(conn)
    rate_item(engine, "a0", "aaa-first", 5.0)
    out = retrain_incremental(engine)
    assert out["items_added"] == 1
    with engine.connect() as conn:
        after = questionnaire_json(conn, 30)
        grown = load_served(conn)
    assert after["version"] == out["version"] and after["items"] == before
    assert grown.model.item_index([grown.model.item_ids[-1]])[0] == served.model.n_items  # appended
    assert np.array_equal(grown.model.item_index(served.model.item_ids), np.arange(served.model.n_items))
    answers = {int(i): 5.0 for i in served.model.questionnaire.items[:5]}
    a = served.model.bootstrap.initial_factors([{"gender": "F"}], [answers])
    b = grown.model.bootstrap.initial_factors([{"gender": "F"}], [answers])
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_refolding_the_same_ratings_gives_the_same_user(trained):
    """A user's new ratings are applied once, from the full version's row: later incremental
    retrains (for other users' ratings) leave them exactly where they were."""
    engine, _ = trained
    rate_item(engine, "a0", "b30", 1.0)
    retrain_incremental(engine)
    with engine.connect() as conn:
        first, _ = user_vector(conn, load_served(conn), 1)
    for k in range(3):
        rate_item(engine, f"b{2 * k + 1}", "a3", 5.0)
        retrain_incremental(engine)
    with engine.connect() as conn:
        served = load_served(conn)
        again, _ = user_vector(conn, served, 1)
    assert served.version == 5
    assert np.array_equal(first.vec, again.vec) and first.bias == again.bias


def test_onboarding_leaves_stored_versions_alone(trained):
    engine, report = trained

    def snapshot():
        with engine.connect() as conn:
            return (conn.scalar(select(func.count()).select_from(UserFactors)),
                    conn.scalar(select(func.count()).select_from(ModelArrays)),
                    conn.scalar(select(func.count()).select_from(ModelVersion)),
                    versions.trained_rows(conn, report["version"])[1].mean(0).tolist())

    before = snapshot()
    onboard(engine, [(f"e{k}", {"user": f"new{k}", "answers": {"gender": "F"}, "ratings": {"a1": 5}})
                     for k in range(5)])
    assert snapshot() == before


@pytest.mark.parametrize("to", ["earlier", "serving"])
def test_rollback_during_a_full_retrain_is_not_overwritten(trained, monkeypatch, to):
    """A rollback made while a retrain runs stays, to an earlier version or to the one already serving
    (a choice to keep it): the new version is stored but not served."""
    engine, report = trained
    second = retrain_full(engine, progress=False, **FAST)
    chosen = report["version"] if to == "earlier" else second["version"]
    import cfb.service.training as training

    real_fit = training.fit_model

    def fit_then_rollback(*args, **kwargs):  # the rollback lands while the retrain trains
        out = real_fit(*args, **kwargs)
        with writing(engine) as conn:
            versions.set_serving(conn, chosen)
        return out

    monkeypatch.setattr(training, "fit_model", fit_then_rollback)
    third = retrain_full(engine, progress=False, **FAST)
    assert third["serving"] is False and f"cfb rollback {third['version']}" in third["reason"]
    with engine.connect() as conn:
        assert versions.serving_version(conn) == chosen != third["version"]
    if to == "earlier":  # `cfb retrain --full` says so, and does not call the version serving first
        from click.testing import CliRunner

        from cfb.cli.main import cli

        url = engine.url.render_as_string(hide_password=False)
        res = CliRunner().invoke(cli, ["--db", url, "retrain", "--full", "--quiet", "--valid-pct", "0",
                                       "--factors", "8", "--epochs", "2"])
        assert res.exit_code == 0, res.output
        assert res.stdout.startswith(f"version {third['version'] + 1} (dot, full, seed 42) stored;"), res.stdout
        assert f"version {chosen} was made serving during the retrain" in res.stdout


@pytest.mark.parametrize("to", ["earlier", "serving"])
def test_rollback_during_an_incremental_retrain_saves_nothing(trained, monkeypatch, to):
    """A rollback while an incremental retrain runs, to an earlier version or to the one it builds on
    (a choice to keep it: the retrain used to serve its version over that one), makes it save nothing."""
    engine, report = trained
    retrain_full(engine, progress=False, **FAST)
    rate_item(engine, "a0", "b30", 1.0)
    chosen = report["version"] if to == "earlier" else 2
    real_delta = versions.make_delta

    def rollback_then_delta(*args, **kwargs):  # noqa: ANN001
        with writing(engine) as conn:  # (another process's rollback, while the retrain works)
            versions.set_serving(conn, chosen)
        return real_delta(*args, **kwargs)

    monkeypatch.setattr(versions, "make_delta", rollback_then_delta)
    with engine.connect() as conn:
        n_before = conn.scalar(select(func.count()).select_from(ModelVersion))
    with pytest.raises(CfbError, match="changed from 2 to 1" if to == "earlier" else
                       r"version 2 was chosen as the serving one during the retrain \(`cfb rollback 2`\)"):
        retrain_incremental(engine)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(ModelVersion)) == n_before
        assert versions.serving_version(conn) == chosen  # the rollback stays


def test_a_retrain_whose_lock_was_taken_over_saves_nothing(trained, monkeypatch):
    """A retrain paused past the stale limit (its lock taken over by another, which may be saving a
    version of its own) saves nothing, full or incremental, and says why; it used to save all the same."""
    engine, report = trained
    import cfb.service.training as training

    real_fit, real_delta = training.fit_model, versions.make_delta

    def fit_then_lose_the_lock(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = real_fit(*args, **kwargs)
        plant_lock(engine, "elsewhere.example", 4242, age=0)  # (another process takes the lock over)
        return out

    def delta_then_lose_the_lock(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        plant_lock(engine, "elsewhere.example", 4242, age=0)  # (another process takes the lock over)
        return real_delta(*args, **kwargs)

    rate_item(engine, "a0", "b30", 1.0)
    with engine.connect() as conn:
        n_before, serving = conn.scalar(select(func.count()).select_from(ModelVersion)), versions.serving_version(conn)
    for path, patch in (("full", (training, "fit_model", fit_then_lose_the_lock)),
                        ("incremental", (versions, "make_delta", delta_then_lose_the_lock))):
        with monkeypatch.context() as m:
            m.setattr(*patch)
            with pytest.raises(CfbError, match=r"^this retrain's lock was taken over while it ran \(no heartbeat for "
                                               r"over 120 s; pid 4242 on elsewhere\.example holds it now\): nothing"):
                retrain_full(engine, progress=False, **FAST) if path == "full" else retrain_incremental(engine)
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(ModelVersion)) == n_before, path
            assert versions.serving_version(conn) == serving
            assert json.loads(store.get_setting(conn, versions.LOCK_KEY))["host"] == "elsewhere.example"
        with writing(engine) as conn:  # (the other process finishes)
            conn.execute(Setting.__table__.delete().where(Setting.key == versions.LOCK_KEY))
    assert retrain_incremental(engine)["new_ratings"] == 1


def test_rollback_then_incremental_retrain_builds_on_the_rolled_back_version(trained):
    engine, report = trained
    rate_item(engine, "a0", "b30", 1.0)
    v2 = retrain_incremental(engine)["version"]
    with writing(engine) as conn:
        versions.set_serving(conn, report["version"])
    rate_item(engine, "a2", "b31", 1.0)
    out = retrain_incremental(engine)
    assert out["parent"] == report["version"] != v2
    assert out["new_ratings"] == 2  # both ratings newer than the version it builds on


def test_an_incremental_version_stores_only_the_touched_items_statistics(trained):
    """A delta holds the statistics of the items whose ratings changed, not the whole catalogue's, and
    a delta written the older way (every item's statistics) still loads to the same model."""
    engine, report = trained
    rate_item(engine, "a0", "b21", 5.0)  # (a-users rate b-items 1 or 2: both ratings change or are new)
    rate_item(engine, "a2", "b21", 4.0)
    out = retrain_incremental(engine)
    with engine.connect() as conn:
        blob = conn.scalar(select(ModelArrays.data).where(ModelArrays.version_id == out["version"]))
        delta = versions.from_npz(blob)
        parent = versions.load_model(conn, report["version"])
        child = versions.load_model(conn, out["version"])
        b21 = store.id_map(conn, Item)["b21"]
        counts, sums = store.item_totals(conn, [b21])
    assert "item_counts" not in delta and delta["totals/item_ids"].tolist() == [b21]
    changed = parent.item_index([b21])
    assert child.item_counts[changed].tolist() == counts.tolist() and child.item_sums[changed].tolist() == sums.tolist()
    others = np.setdiff1d(np.arange(parent.n_items), changed)
    assert np.array_equal(child.item_counts[others], parent.item_counts[others])
    full = versions.make_delta(delta["added/item_ids"], {}, child)
    assert np.array_equal(versions.apply_delta(parent, full).item_counts, child.item_counts)
    assert np.array_equal(versions.apply_delta(parent, full).item_sums, child.item_sums)


def assert_statistics_are_the_tables(engine) -> None:  # noqa: ANN001
    with engine.connect() as conn:
        model = load_served(conn).model
        counts, sums = store.item_totals(conn, model.item_ids)
    assert np.array_equal(model.item_counts, counts) and np.allclose(model.item_sums, sums)


def test_incremental_statistics_follow_first_ratings_and_replaced_ones(trained, planted):
    """An incremental version's item statistics are the version's plus what the new rows changed: a
    first rating adds one, a changed rating swaps its old value for the new, a pair rated again twice
    since the version (its first value unknown from the row) re-reads its item, and a rollback's
    next version counts from the older version's statistics."""
    engine, report = trained
    rated = set(zip(planted.ratings.user, planted.ratings.item))
    old = next(p for p in sorted(rated) if p[0] == "a0")
    fresh = next((u, i) for u in ("a2",) for i in planted.items.item if (u, i) not in rated)
    rate_item(engine, *old, 6 - dict(zip(zip(planted.ratings.user, planted.ratings.item), planted.ratings.rating))[old])
    rate_item(engine, *fresh, 5.0)
    rate_item(engine, *fresh, 4.0)  # twice since the version
    with engine.connect() as conn:
        since = versions.get_version(conn, report["version"])["max_seq"]
        new = ratings_io.load_ratings(conn, since_seq=since, with_replaced=True)
    assert len(new) == 2 and 0 <= new.prev_seq[0] <= since < new.prev_seq[1]  # replaced: before, after it
    retrain_incremental(engine)
    assert_statistics_are_the_tables(engine)
    rate_item(engine, "b1", "a5", 5.0)  # (b-users rate a-items 1 or 2: new or changed)
    rate_item(engine, "b1", "a5", 5.0)  # the same again: not new
    retrain_incremental(engine)
    assert_statistics_are_the_tables(engine)
    with writing(engine) as conn:
        versions.set_serving(conn, report["version"])
    rate_item(engine, "b3", "a7", 3.0)
    assert retrain_incremental(engine)["new_ratings"] == 4  # everything since the older version, once
    assert_statistics_are_the_tables(engine)


def test_a_full_retrain_keeps_the_replaced_rows_a_version_learned_and_drops_the_rest(trained, planted):
    """The log of replaced rating rows does not grow without end: a full version drops the rows no
    version learned (changed again before any full retrain read them), and keeps the row each full
    version learned for a pair changed since, so a rollback to it still folds out the right value."""
    engine, report = trained
    pair = ("a0", next(i for u, i in zip(planted.ratings.user, planted.ratings.item) if u == "a0"))
    original = float(planted.ratings[(planted.ratings.user == pair[0]) & (planted.ratings.item == pair[1])].rating.iloc[0])
    changes = [v for v in (1.0, 2.0, 3.0, 4.0, 5.0) if v != original]
    for value in changes[:3]:
        rate_item(engine, *pair, value)
    with engine.connect() as conn:
        uid, iid = store.user_id_of(conn, pair[0]), conn.scalar(select(Item.id).where(Item.external_id == pair[1]))
        root1 = versions.get_version(conn, report["version"])["max_seq"]

    def logged() -> list[float]:
        with engine.connect() as conn:
            items, _, values = store.replaced_ratings_of(conn, uid, 10**12)
        return values[items == iid].tolist()

    assert logged() == [original, *changes[:2]]
    second = retrain_full(engine, progress=False, **FAST)
    assert logged() == [original]  # learned by version 1; the two in between by no version
    rate_item(engine, *pair, changes[3])
    rate_item(engine, *pair, original)
    assert logged() == [original, changes[2], changes[3]]
    with writing(engine) as conn:
        assert store.prune_replaced_ratings(conn) == 1  # changes[3]: no full version read it
    assert logged() == [original, changes[2]]
    with engine.connect() as conn:  # what each version learned for the pair, as served
        for version, learned in ((report["version"], original), (second["version"], changes[2])):
            root = versions.get_version(conn, version)["max_seq"]
            items, ratings, seq, prev, prev_seq = store.user_ratings_replaced(conn, uid)
            k = int(np.flatnonzero(items == iid)[0])
            assert learned_values(items, seq, prev, prev_seq, root,
                                  store.replaced_ratings_of(conn, uid, root))[k] == learned
    assert root1 < root


def test_a_database_from_before_the_replaced_rating_log_gets_it_from_its_next_writer(trained):
    """A database with the replaced-value columns but no log (made by the cfb before it): a process
    whose first use is a read (a server's first request) still starts the log at its first write."""
    engine, _ = trained
    url = str(engine.url)
    with writing(engine) as conn:
        conn.exec_driver_sql("DROP TRIGGER ratings_keep_replaced")
        conn.exec_driver_sql("DROP TABLE replaced_ratings")
    store._HAVE_HISTORY.discard(url), store._HAVE_LOG.discard(url)  # (as in a new process)
    with engine.connect() as conn:
        a0 = store.user_id_of(conn, "a0")
        assert store.has_rating_history(conn) and len(store.user_ratings_replaced(conn, a0)[0])
        assert len(store.replaced_ratings_of(conn, a0, 10**9)[0]) == 0
    rate_item(engine, "a0", "a1", 2.0)
    rate_item(engine, "a0", "a1", 3.0)
    with engine.connect() as conn:
        assert store._has_replaced_log(conn)
        assert store.replaced_ratings_of(conn, a0, 10**9)[2][-1] == 2.0


def test_a_ratings_table_from_before_the_replaced_columns_gets_them(trained):
    """A database made before ``prev_rating``/``prev_seq``: the first write adds them; rows written
    before that are re-read for their items' statistics, rows after count as their own."""
    engine, _ = trained
    with writing(engine) as conn:
        conn.exec_driver_sql("ALTER TABLE ratings DROP COLUMN prev_rating")
        conn.exec_driver_sql("ALTER TABLE ratings DROP COLUMN prev_seq")
        conn.exec_driver_sql("DROP TRIGGER ratings_keep_replaced")
        conn.exec_driver_sql("DROP TABLE replaced_ratings")
        # an earlier cfb's write after the version: a changed rating that does not say what it replaced
        conn.exec_driver_sql("UPDATE ratings SET rating = 6 - rating, seq = (SELECT max(seq) + 1 FROM ratings) "
                             "WHERE seq = (SELECT min(seq) FROM ratings)")
    store._HAVE_HISTORY.discard(str(engine.url))
    with pytest.raises(RuntimeError), writing(engine) as conn:  # a migration rolled back with its transaction
        ratings_io.write_ratings(conn, [1], [1], [4.0], [1])
        raise RuntimeError("a later step of the same transaction fails")
    with engine.connect() as conn:
        assert not store._has_history_columns(conn) and not store._has_replaced_log(conn)
    rate_item(engine, "a0", "a1", 2.0)  # adds the columns and the log, in the same transaction as the rating
    with engine.connect() as conn:
        first_tracked = int(store.get_setting(conn, store.HISTORY_FROM_KEY))
        seq = conn.scalar(select(func.max(Rating.seq)))
        assert store._has_replaced_log(conn)
    assert first_tracked == seq
    rate_item(engine, "a0", "a1", 3.0)
    with engine.connect() as conn:
        a0 = store.user_id_of(conn, "a0")
        logged = store.replaced_ratings_of(conn, a0, seq)[2].tolist()
    assert len(logged) == 2 and logged[1] == 2.0  # the rows both writes replaced (the log began with the first)
    rate_item(engine, "b1", "b31", 1.0)
    retrain_incremental(engine)
    assert_statistics_are_the_tables(engine)


def test_a_database_made_again_at_the_same_address_is_not_served_from_the_old_ones_cache(trained, tmp_path):
    """The process keeps loaded versions per database address and version id; a database deleted and
    made again at the same address starts its ids at 1 again, and must serve its own model."""
    from cfb.db.engine import make_engine

    from .conftest import planted_ratings

    engine, _ = trained
    with engine.connect() as conn:
        assert load_served(conn).model.kind == "dot"
    engine.dispose()
    for f in tmp_path.glob("cfb.db*"):
        f.unlink()
    again = make_engine(str(engine.url))
    ingest_dataset(again, planted_ratings(seed=1))
    assert retrain_full(again, kind="nn", valid_pct=0, progress=False, **FAST)["version"] == 1
    with again.connect() as conn:
        assert load_served(conn).model.kind == "nn"
    again.dispose()


def test_histories_read_together_are_the_ones_read_one_by_one(trained):
    """``user_histories`` (a few queries for many users: an incremental retrain's raters of an item)
    gives each user the history ``user_history`` reads alone: trained, onboarded (with ``asked``),
    with a pair changed twice since the retrain, and unknown to the ratings table."""
    from cfb.service.state import user_histories, user_history

    engine, _ = trained
    onboard(engine, [("e", {"user": "fresh", "answers": {"gender": "F"}, "ratings": {"a1": 5}, "asked": 5}),
                     ("f", {"user": "quiet", "answers": {}})])
    for value in (1.0, 2.0):
        rate_item(engine, "a0", "a2", value)
    with engine.connect() as conn:
        served = load_served(conn)
        ids = [store.user_id_of(conn, u) for u in ("fresh", "a0", "quiet", "b3", "a0")]
        together = user_histories(conn, served, ids)
        alone = [user_history(conn, served, u) for u in ids]
    for a, b in zip(together, alone):
        assert a.attributes == b.attributes and a.signup_items == b.signup_items and a.asked == b.asked
        for field in ("items", "ratings", "newer", "learned_values"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None and y is None) or np.array_equal(x, y, equal_nan=True), field
        assert (a.trained_row is None) == (b.trained_row is None)
        assert a.trained_row is None or np.array_equal(a.trained_row[0], b.trained_row[0])
    assert together[0].asked == 5 and len(together[0].signup_items) == 1 and together[2].items.size == 0
    assert np.isfinite(together[1].learned_values).sum() == 1  # a0's pair: the value the retrain learned


def test_a_new_items_ranking_follows_its_ratings(trained):
    """An item added after the full retrain and rated 5 by "a" users and 1 by "b" users climbs the
    ranking of a new "a" user (whom the ranker knows from their answers alone) and stays low for a
    new "b" user; its stored ranker rows load back as they were served. (Its ranker row used to stay
    the one it was added with, so its place moved with no rating.)"""
    engine, _ = trained
    rows = [(f"a{u}", "fresh", 5.0, 9_000_000 + u) for u in range(0, 24, 2)]
    rows += [(f"b{u}", "fresh", 1.0, 9_000_100 + u) for u in range(1, 25, 2)]
    items = pd.DataFrame({"item": ["fresh"], "title": ["A fresh film"], "attributes": [{}]})
    ingest_dataset(engine, Dataset(pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"]), items))
    out = retrain_incremental(engine)
    assert out["mode"] == "incremental" and out["items_added"] == 1
    with engine.connect() as conn:
        served = load_served(conn)
        model = served.model
        ids = store.id_map(conn, Item)
        fresh = model.item_index([ids["fresh"]])[0]
        stored = versions.load_model(conn, out["version"])
    assert fresh == model.n_learned_items  # an added item
    assert np.array_equal(stored.ranker.out_, model.ranker.out_)

    def scores(gender: str) -> np.ndarray:  # of a new user who gave their gender only
        return model.scores(model.user_vector(UserHistory({"gender": gender}, np.zeros(0, np.int64), np.zeros(0))))

    f, m = scores("F"), scores("M")
    alpha, beta = (model.item_index([ids[f"{g}{i}"] for i in range(40) if f"{g}{i}" in ids]) for g in "ab")
    assert f[fresh] > f[beta].max() and m[fresh] < m[beta].min()  # with the "a" items for both
    assert f[fresh] - m[fresh] > 0.5 * np.median(f[alpha] - m[alpha]) > 0.5
    # one more 5 from an "a" user: a re-solved item moves again, from its prior, by all its ratings
    ingest_dataset(engine, Dataset(pd.DataFrame([("a30", "fresh", 5.0, 9_000_200)],
                                                columns=["user", "item", "rating", "timestamp"])))
    again = retrain_incremental(engine)
    assert again["items_resolved"] == 1
    with engine.connect() as conn:
        after = versions.load_model(conn, again["version"])
    assert after.ranker.out_bias_[fresh] > model.ranker.out_bias_[fresh]
    assert np.array_equal(after.ranker.out_[:fresh], model.ranker.out_[:fresh])  # the learned items' rows stay


def test_added_items_are_solved_from_their_ratings_whatever_retrains_came_before(trained):
    """Items added after the full retrain, rated by the same users: after one of those ratings is
    changed and changed back (two more incremental retrains), every added item's rows, and so every
    prediction, are what they were. (A rater's vector used to fold in their ratings of the added items
    with those items' rows from the retrain before, so each retrain's solution moved the next one.)"""
    engine, _ = trained

    def rate(rows: list[tuple[str, str, float]], at: int) -> None:
        ratings = pd.DataFrame([(u, i, r, at + k) for k, (u, i, r) in enumerate(rows)],
                               columns=["user", "item", "rating", "timestamp"])
        ingest_dataset(engine, Dataset(ratings))
        assert retrain_incremental(engine)["mode"] == "incremental"

    rate([("a0", "n1", 5.0), ("a2", "n1", 4.0), ("b1", "n1", 2.0), ("a0", "n2", 3.0), ("b3", "n2", 5.0),
          ("a2", "n2", 1.0)], 9_000_000)

    def rows_of_added() -> dict[str, np.ndarray]:
        with engine.connect() as conn:
            model = load_served(conn).model
        added = model.added_items()
        assert len(added) == 2
        return {"factors": model.rating.item_factors[added], "bias": model.rating.item_bias[added],
                "out": model.ranker.out_[added], "out_bias": model.ranker.out_bias_[added]}

    before = rows_of_added()
    rate([("a0", "n1", 1.0)], 9_000_100)
    assert not np.allclose(rows_of_added()["bias"], before["bias"])
    rate([("a0", "n1", 5.0)], 9_000_200)
    after = rows_of_added()
    for name in before:
        assert np.allclose(after[name], before[name], atol=1e-6), name


def test_a_long_run_of_incremental_versions_loads_from_a_checkpoint(trained, monkeypatch):
    """Each incremental version is a delta on its parent; where loading one would apply
    CHECKPOINT_EVERY deltas in a row, it also stores its whole model, and loading starts there: the
    same model as applying every delta from the full version (loading used to grow with every
    incremental retrain since the full one)."""
    engine, _ = trained
    monkeypatch.setattr(versions, "CHECKPOINT_EVERY", 3)
    for k in range(7):
        rows = [("a0", f"new{k}", 4.0, 9_000_000 + k), ("b1", "a2", float(1 + k % 5), 9_000_100 + k)]
        ingest_dataset(engine, Dataset(pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])))
        assert retrain_incremental(engine)["mode"] == "incremental"
    with engine.connect() as conn:
        serving = versions.serving_version(conn)
        line = versions.chain(conn, serving)
        whole = set(conn.scalars(select(ModelArrays.version_id).where(ModelArrays.name == versions.MODEL_BLOB)))
        assert [v for v in line if v in whole] == [line[0], line[3], line[6]]  # the full one, then every third
        assert versions._deltas_to_apply(conn, line) == line[7:]
        loaded = versions.load_model(conn, serving)
        monkeypatch.setattr(versions, "_deltas_to_apply", lambda conn, line: line[1:])  # every delta, from the full one
        replayed = versions.load_model(conn, serving)
    a, b = loaded.to_arrays(), replayed.to_arrays()
    assert a.keys() == b.keys() and loaded.n_items == loaded.n_learned_items + 7
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def added_rows_after_each_path(template, tmp_path, paths: dict) -> dict[str, list[np.ndarray]]:  # noqa: ANN001
    """Each path (name -> steps on an engine) run on its own copy of the trained ``template``; then every
    added item's rating row, rating bias, ranker row and ranker bias in the version it serves."""
    from cfb.db.engine import make_engine

    from .conftest import checkpointed_copy

    rows = {}
    for name, steps in paths.items():
        checkpointed_copy(template, tmp_path / f"{name}.db")
        engine = make_engine(f"sqlite:///{tmp_path / name}.db")
        steps(engine)
        with engine.connect() as conn:
            model = load_served(conn).model
        at = model.added_items()
        rows[name] = [model.rating.item_factors[at], model.rating.item_bias[at], model.ranker.out_[at],
                      model.ranker.out_bias_[at]]
        engine.dispose()
    return rows


def test_an_added_items_rows_are_the_same_whichever_retrain_brought_its_raters_other_ratings(trained_template, tmp_path):
    """The same ratings in one incremental retrain, or in two where the second brings only a rater's
    ratings of learned items: the added item's rows are the same (a rater's vector moves with those
    ratings, so the item is solved again; it used to keep the row of the retrain before)."""
    first = [("a0", "newZ", 5.0, 9_000_001)]
    then = [("a0", "b21", 1.0, 9_000_002), ("a0", "b22", 1.0, 9_000_003), ("a0", "a3", 5.0, 9_000_004)]

    def retrains(*batches):  # noqa: ANN002, ANN202
        def steps(engine) -> None:  # noqa: ANN001
            for batch in batches:
                ingest_dataset(engine, Dataset(pd.DataFrame(batch, columns=["user", "item", "rating", "timestamp"])))
                assert retrain_incremental(engine)["mode"] == "incremental"
        return steps

    rows = added_rows_after_each_path(trained_template[0], tmp_path,
                                      {"one": retrains(first + then), "two": retrains(first, then)})
    for a, b in zip(rows["one"], rows["two"]):
        assert np.allclose(a, b, atol=1e-6)


def test_an_added_items_rows_do_not_depend_on_when_a_raters_attributes_changed(trained_template, tmp_path):
    """A new user rates an added item and their attributes are corrected (`cfb ingest users`) before the
    incremental retrain, or after it (then a second retrain): the same ratings and attributes, the same
    rows. (An untrained rater's prior came from their attributes, and a change of attributes alone never
    marks the item for solving again; a helper's review found it.)"""
    ratings = pd.DataFrame([("z1", "fresh", 5.0, 9_000_001), ("z1", "a1", 5.0, 9_000_002),
                            ("z1", "b21", 1.0, 9_000_003), ("a0", "fresh", 4.0, 9_000_004)],
                           columns=["user", "item", "rating", "timestamp"])
    said = {g: pd.DataFrame({"user": ["z1"], "attributes": [{"gender": g, "age": 30}]}) for g in "FM"}

    def before(engine) -> None:  # noqa: ANN001
        ingest_dataset(engine, Dataset(ratings, users=said["M"]))
        assert retrain_incremental(engine)["items_added"] == 1

    def after(engine) -> None:  # noqa: ANN001
        ingest_dataset(engine, Dataset(ratings, users=said["F"]))
        assert retrain_incremental(engine)["items_added"] == 1
        ingest_dataset(engine, Dataset(ratings.iloc[:0], users=said["M"]))
        retrain_incremental(engine)

    rows = added_rows_after_each_path(trained_template[0], tmp_path, {"before": before, "after": after})
    for a, b in zip(rows["before"], rows["after"]):
        assert np.allclose(a, b, atol=1e-6)


def test_an_nn_models_added_item_is_solved_through_its_mlp_from_its_ratings(engine, planted):
    """With the nn rating model, an item added after the full retrain and rated 5 by "a" users and 1 by
    "b" users is predicted high for another "a" user and low for another "b" user (its embedding is
    solved through the MLP against its raters; it used to keep its metadata row until a full retrain)."""
    from .conftest import FAST

    ingest_dataset(engine, planted)
    retrain_full(engine, kind="nn", valid_pct=0.0, progress=False, **FAST)
    rows = [(f"a{u}", "fresh", 5.0, 9_000_000 + u) for u in range(0, 20, 2)]
    rows += [(f"b{u}", "fresh", 1.0, 9_000_100 + u) for u in range(1, 21, 2)]
    ingest_dataset(engine, Dataset(pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])))
    assert retrain_incremental(engine)["items_added"] == 1
    with engine.connect() as conn:
        served = load_served(conn)
        fresh = served.model.item_index([store.id_map(conn, Item)["fresh"]])
        a, b = (served.model.predict(user_vector(conn, served, store.user_id_of(conn, u))[0], fresh)[0]
                for u in ("a40", "b41"))
    assert a > 3.5 and b < 2.5, (a, b)


def test_an_added_copy_of_a_learned_items_ratings_gets_a_ranker_bias_like_the_originals(trained, planted):
    """An item added after the full retrain with exactly the ratings of a learned one: its ranker bias is
    drawn from where an item known from nothing starts (the learned items' lowest) toward what the
    learned items' rows and rating counts say of it, which is near the original's; a new "a" user ranks it
    above every "b" item. (Its bias used to stay at the lowest, whatever its ratings.)"""
    engine, _ = trained
    original = planted.ratings[planted.ratings.item == "a1"]
    copy = original.assign(item="a1-copy", timestamp=original.timestamp + 9_000_000)
    ingest_dataset(engine, Dataset(copy.reset_index(drop=True)))
    assert retrain_incremental(engine)["items_added"] == 1
    with engine.connect() as conn:
        model = load_served(conn).model
        ids = store.id_map(conn, Item)
    a1, twin = model.item_index([ids["a1"], ids["a1-copy"]])
    bias, lowest = model.ranker.out_bias_, model.ranker.out_bias_[:model.n_learned_items].min()
    assert bias[twin] - lowest > (bias[a1] - lowest) / 3
    beta = model.item_index([ids[f"b{i}"] for i in range(20, 40)])
    s = model.scores(model.user_vector(UserHistory({"gender": "F"}, np.zeros(0, np.int64), np.zeros(0))))
    assert s[twin] > s[beta].max()


def test_a_damaged_stored_version_is_one_line_and_rollback_serves_again(trained, db_url):
    """A version's arrays changed in the database (here, a delta cut short and a full version's blob
    overwritten) make every command that loads it say so in one line, naming the version and what to
    do, instead of a traceback; rolling back to an intact version serves again."""
    from click.testing import CliRunner

    from cfb.cli.main import cli
    from cfb.service import state

    def command(*args: str):  # noqa: ANN202  (as a fresh process: nothing loaded before)
        state._CACHE.clear()
        return CliRunner().invoke(cli, ["--db", db_url, *args])

    engine, report = trained
    first = report["version"]
    rate_item(engine, "a0", "a1", 1)
    second = retrain_incremental(engine)["version"]
    with writing(engine) as conn:
        blob = conn.scalar(select(ModelArrays.data).where(ModelArrays.version_id == second))
        conn.execute(ModelArrays.__table__.update().where(ModelArrays.version_id == second).values(data=blob[:len(blob) // 2]))
    res = command("recommend", "a0", "--json")
    assert res.exit_code == 1 and res.output.startswith(f"Error: model version {second} is damaged"), res.output
    assert len(res.output.strip().splitlines()) == 1 and "cfb rollback" in res.output
    assert command("rollback", str(first)).exit_code == 0
    assert command("recommend", "a0", "--json").exit_code == 0
    with writing(engine) as conn:
        conn.execute(ModelArrays.__table__.update().where(ModelArrays.version_id == first).values(data=b"garbage"))
    res = command("similar", "a1")
    assert res.exit_code == 1 and res.output.startswith(f"Error: model version {first} is damaged"), res.output


def test_a_damaged_trained_user_row_is_one_line(trained, db_url):
    """A trained user's stored row cut short (by 2 bytes: no whole float; by 4: one float less, what a
    row of its own seems fine) names the version it belongs to, as a damaged model does, not a traceback."""
    from click.testing import CliRunner
    from fastapi.testclient import TestClient
    from sqlalchemy import update

    from cfb.cli.main import cli
    from cfb.service import state
    from cfb.service.http import create_app

    engine, report = trained
    with engine.connect() as conn:
        uid = store.user_id_of(conn, "a0")
        row = conn.scalar(select(UserFactors.factors).where(UserFactors.user_id == uid))
    for cut in (2, 4):
        with writing(engine) as conn:
            conn.execute(update(UserFactors).where(UserFactors.user_id == uid).values(factors=row[:-cut]))
        state._CACHE.clear()
        res = CliRunner().invoke(cli, ["--db", db_url, "recommend", "a0"])
        assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
        assert res.output.startswith(f"Error: model version {report['version']} is damaged") and "bytes" in res.output
        with TestClient(create_app(db_url)) as client:  # the server's fast path (SQLite) reads the row itself
            r = client.get("/users/a0/recommendations")
            assert r.status_code == 503 and r.json()["error"] == res.output.strip().removeprefix("Error: ")
    state._CACHE.clear()
    assert CliRunner().invoke(cli, ["--db", db_url, "recommend", "b1"]).exit_code == 0  # (another user's row is whole)
